// CPU engine of max_flow and max_flow_layered: push-relabel (flow/max_flow.h) per query, queries spread over
// threads with at::parallel_for. The residual network is built once per call and shared read-only; every
// chunk of queries owns its workspace, and each query starts from a fresh copy of the initial residuals, so
// a result never depends on the thread count or on the other queries.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "common/checks.h"
#include "flow/max_flow.h"

namespace pk {
namespace {

// Capacities as contiguous float64, checked finite and >= 0; returns the largest one (0 when empty).
double check_capacity(const char* op, const std::string& name, const at::Tensor& cap, at::Tensor& out) {
  TORCH_CHECK(cap.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", cap.device());
  TORCH_CHECK(at::isFloatingType(cap.scalar_type()), op, ": ", name, " must be a floating tensor, got ",
              cap.scalar_type());
  out = cap.to(at::kDouble).contiguous();
  const double* c = out.data_ptr<double>();
  double largest = 0.0;
  for (int64_t k = 0, n = out.numel(); k < n; ++k) {
    TORCH_CHECK(std::isfinite(c[k]) && c[k] >= 0.0, op, ": ", name, " must be finite and >= 0, got ", c[k],
                " at flat position ", k);
    largest = std::max(largest, c[k]);
  }
  return largest;
}

// sources/sinks: int64 1-D of equal length, in range, pairwise distinct.
void check_queries(const char* op, const at::Tensor& sources, const at::Tensor& sinks, int64_t num_sources,
                   int64_t num_sinks, bool same_node_space) {
  TORCH_CHECK(sources.device().is_cpu() && sinks.device().is_cpu(), op, ": sources and sinks must be CPU tensors");
  PK_CHECK_INDEX_TENSOR(op, "sources", sources);
  PK_CHECK_INDEX_TENSOR(op, "sinks", sinks);
  PK_CHECK_DIM(op, "sources", sources, 1);
  PK_CHECK_DIM(op, "sinks", sinks, 1);
  TORCH_CHECK(sources.numel() == sinks.numel(), op, ": sources and sinks must have equal length, got ",
              sources.numel(), " and ", sinks.numel());
  const int64_t* s = sources.data_ptr<int64_t>();
  const int64_t* t = sinks.data_ptr<int64_t>();
  for (int64_t q = 0; q < sources.numel(); ++q) {
    TORCH_CHECK_INDEX(s[q] >= 0 && s[q] < num_sources, op, ": sources[", q, "] = ", s[q], " is out of range for ",
                      num_sources, " nodes");
    TORCH_CHECK_INDEX(t[q] >= 0 && t[q] < num_sinks, op, ": sinks[", q, "] = ", t[q], " is out of range for ",
                      num_sinks, " nodes");
    TORCH_CHECK(!same_node_space || s[q] != t[q], op, ": query ", q, " has source == sink (node ", s[q],
                "); the max-flow value is undefined");
  }
}

// Runs solve(workspace, q) for every query; workspaces are sized once per chunk.
template <class Solve>
at::Tensor for_each_query(int64_t num_queries, int64_t nodes, int64_t arcs, const Solve& solve) {
  auto out = at::empty({num_queries}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  // A query costs a few passes over its arcs (~0.3 ms at 1e5 arcs). A chunk of ~2^20 arcs' worth keeps a
  // handful of queries on one thread, where waking a second one would cost more than it saves (~4 ms, a
  // scheduler tick, when the cores are shared), yet splits large query sets into many chunks to balance.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(arcs, 1));
  at::parallel_for(0, num_queries, grain, [&](int64_t begin, int64_t end) {
    flow::Workspace ws;
    ws.reserve(nodes, arcs);
    for (int64_t q = begin; q < end; ++q) o[q] = solve(ws, q);
  });
  return out;
}

at::Tensor max_flow_cpu(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& capacity,
                        const at::Tensor& sources, const at::Tensor& sinks) {
  const char* op = "pykernels.max_flow";
  TORCH_CHECK(rowptr.device().is_cpu() && col.device().is_cpu(), op, ": rowptr and col must be CPU tensors");
  PK_CHECK_INDEX_TENSOR(op, "rowptr", rowptr);
  PK_CHECK_INDEX_TENSOR(op, "col", col);
  PK_CHECK_DIM(op, "rowptr", rowptr, 1);
  PK_CHECK_DIM(op, "col", col, 1);
  PK_CHECK_DIM(op, "capacity", capacity, 1);
  TORCH_CHECK(rowptr.numel() >= 1, op, ": rowptr must have at least one entry");
  const int64_t num_nodes = rowptr.numel() - 1, num_edges = col.numel();
  TORCH_CHECK(capacity.numel() == num_edges, op, ": capacity has ", capacity.numel(), " entries, col has ",
              num_edges);
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const int64_t* c = col.data_ptr<int64_t>();
  TORCH_CHECK(rp[0] == 0 && rp[num_nodes] == num_edges, op, ": rowptr must start at 0 and end at len(col) = ",
              num_edges, ", got ", rp[0], " and ", rp[num_nodes]);
  for (int64_t u = 0; u < num_nodes; ++u) {
    TORCH_CHECK(rp[u] <= rp[u + 1], op, ": rowptr must be non-decreasing, but rowptr[", u, "] > rowptr[", u + 1,
                "]");
  }
  for (int64_t e = 0; e < num_edges; ++e) {
    TORCH_CHECK_INDEX(c[e] >= 0 && c[e] < num_nodes, op, ": col[", e, "] = ", c[e], " is out of range for ",
                      num_nodes, " nodes");
  }
  at::Tensor cap;
  const double eps = flow::kRelativeEps * check_capacity(op, "capacity", capacity, cap);
  check_queries(op, sources, sinks, num_nodes, num_nodes, true);

  const flow::CsrNetwork g = flow::build_csr_network(num_nodes, rp, c, cap.data_ptr<double>());
  const int64_t* s = sources.data_ptr<int64_t>();
  const int64_t* t = sinks.data_ptr<int64_t>();
  return for_each_query(sources.numel(), num_nodes, g.num_arcs(), [&](flow::Workspace& ws, int64_t q) {
    std::copy(g.initial.begin(), g.initial.end(), ws.residual.begin());
    return flow::push_relabel(g, s[q], t[q], eps, ws);
  });
}

// Query (j, i) only ever uses node j of layer 0 and node i of layer L (the other first-layer nodes receive
// nothing, the other last-layer nodes lead nowhere), so every query runs on one network whose end layers
// hold a single node: the middle layers' residuals are shared and only the two end blocks are per query.
at::Tensor max_flow_layered_cpu(at::TensorList capacities, const at::Tensor& sources, const at::Tensor& sinks) {
  const char* op = "pykernels.max_flow_layered";
  const int64_t num_maps = static_cast<int64_t>(capacities.size());
  TORCH_CHECK(num_maps >= 1, op, ": capacities must hold at least one map");
  std::vector<at::Tensor> caps(num_maps);
  std::vector<int64_t> n(num_maps + 1);
  double largest = 0.0;
  for (int64_t l = 0; l < num_maps; ++l) {
    const std::string name = "capacities[" + std::to_string(l) + "]";
    TORCH_CHECK(capacities[l].dim() == 2, op, ": ", name, " must be 2-D [n_{l+1}, n_l], got shape ",
                capacities[l].sizes());
    if (l == 0) n[0] = capacities[0].size(1);
    TORCH_CHECK(capacities[l].size(1) == n[l], op, ": ", name, " has ", capacities[l].size(1),
                " columns but layer ", l, " has ", n[l], " nodes (capacities[", l - 1, "] has that many rows)");
    n[l + 1] = capacities[l].size(0);
    largest = std::max(largest, check_capacity(op, name, capacities[l], caps[l]));
  }
  check_queries(op, sources, sinks, n[0], n[num_maps], false);
  const double eps = flow::kRelativeEps * largest;

  std::vector<int64_t> sizes(n);
  sizes.front() = 1;
  sizes.back() = 1;
  const flow::LayeredNetwork g(sizes);
  std::vector<double> initial(g.num_arcs(), 0.0);
  for (int64_t l = 1; l + 1 < num_maps; ++l) {
    const double* a = caps[l].data_ptr<double>();
    for (int64_t i = 0; i < n[l + 1]; ++i) {
      for (int64_t j = 0; j < n[l]; ++j) initial[g.forward_arc(l, j, i)] = a[i * n[l] + j];
    }
  }
  const double* first = caps.front().data_ptr<double>();
  const double* last = caps.back().data_ptr<double>();
  const int64_t last_layer = num_maps - 1;
  const int64_t* src = sources.data_ptr<int64_t>();
  const int64_t* snk = sinks.data_ptr<int64_t>();
  return for_each_query(sources.numel(), g.num_nodes, g.num_arcs(), [&](flow::Workspace& ws, int64_t q) {
    std::copy(initial.begin(), initial.end(), ws.residual.begin());
    double* res = ws.residual.data();
    const int64_t j = src[q], i = snk[q];
    if (num_maps == 1) {
      res[g.forward_arc(0, 0, 0)] = first[i * n[0] + j];
    } else {
      for (int64_t k = 0; k < n[1]; ++k) res[g.forward_arc(0, 0, k)] = first[k * n[0] + j];
      for (int64_t k = 0; k < n[last_layer]; ++k) {
        res[g.forward_arc(last_layer, k, 0)] = last[i * n[last_layer] + k];
      }
    }
    return flow::push_relabel(g, g.node(0, 0), g.node(num_maps, 0), eps, ws);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("max_flow", &max_flow_cpu);
  m.impl("max_flow_layered", &max_flow_layered_cpu);
}

}  // namespace pk
