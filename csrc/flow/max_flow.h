// Exact maximum flow, torch-free: residual networks for general and layered graphs, and the engine.
//
// Residual network: every original edge u -> v becomes an arc pair (u -> v with residual = capacity, v -> u
// with residual 0); the arcs of node u are the ids [begin(u), end(u)) into one residual array, and the
// algorithm only asks a network for head(u, a) and rev(u, a) (the paired arc). CsrNetwork stores those two
// arrays; LayeredNetwork computes them from the layer sizes, so the layered op reads 8 bytes per arc
// (the residual) instead of 24.
//
// Numerics: capacities are doubles and are never rounded to integers. A push moves
// delta = min(excess, residual), so the arc it saturates lands on exactly 0 and the node it empties on
// exactly 0. Rounding elsewhere can leave residuals or excesses that should be 0 at ~1e-17;
// chasing those would only waste work, so a residual <= eps counts as saturated and an excess <= eps as
// none, with eps = kRelativeEps * (largest capacity). Each ignored quantity is at most eps, so the value
// returned is below the exact one by at most (num_nodes + num_arcs) * eps (a cut argument), and never above
// it beyond double rounding.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace pk {
namespace flow {

constexpr double kRelativeEps = 1e-12;

// The residual network of an arbitrary directed graph, built once and shared (read-only) by all queries.
struct CsrNetwork {
  int64_t num_nodes = 0;
  std::vector<int64_t> arc_begin;  // [num_nodes + 1]
  std::vector<int64_t> heads;      // [num_arcs]
  std::vector<int64_t> revs;       // [num_arcs]
  std::vector<double> initial;     // [num_arcs] residual before any flow

  int64_t num_arcs() const { return arc_begin[num_nodes]; }
  int64_t begin(int64_t u) const { return arc_begin[u]; }
  int64_t end(int64_t u) const { return arc_begin[u + 1]; }
  int64_t head(int64_t, int64_t a) const { return heads[a]; }
  int64_t rev(int64_t, int64_t a) const { return revs[a]; }
};

// Builds the residual network from a CSR over tail nodes. Self loops never carry flow from s to t and are
// dropped; parallel and antiparallel edges each keep their own arc pair.
inline CsrNetwork build_csr_network(int64_t num_nodes, const int64_t* rowptr, const int64_t* col,
                                    const double* capacity) {
  CsrNetwork g;
  g.num_nodes = num_nodes;
  std::vector<int64_t> degree(num_nodes + 1, 0);
  for (int64_t u = 0; u < num_nodes; ++u) {
    for (int64_t e = rowptr[u]; e < rowptr[u + 1]; ++e) {
      if (col[e] == u) continue;
      ++degree[u];
      ++degree[col[e]];
    }
  }
  g.arc_begin.assign(num_nodes + 1, 0);
  for (int64_t u = 0; u < num_nodes; ++u) g.arc_begin[u + 1] = g.arc_begin[u] + degree[u];
  const int64_t arcs = g.arc_begin[num_nodes];
  g.heads.resize(arcs);
  g.revs.resize(arcs);
  g.initial.resize(arcs);
  std::vector<int64_t> cursor(g.arc_begin.begin(), g.arc_begin.end() - 1);
  for (int64_t u = 0; u < num_nodes; ++u) {
    for (int64_t e = rowptr[u]; e < rowptr[u + 1]; ++e) {
      const int64_t v = col[e];
      if (v == u) continue;
      const int64_t a = cursor[u]++, b = cursor[v]++;
      g.heads[a] = v;
      g.heads[b] = u;
      g.revs[a] = b;
      g.revs[b] = a;
      g.initial[a] = capacity[e];
      g.initial[b] = 0.0;
    }
  }
  return g;
}

// The layered DAG with node layers of sizes sizes[0..L]; every node of layer l has an edge to every node of
// layer l + 1. Node ids run layer by layer. The arcs of node (l, j) are first its n_{l+1} forward arcs, then
// its n_{l-1} backward arcs (forward first: those are the ones a search from s finds useful first), so the
// reverse of (l, j) -> (l + 1, i) is arc n_{l+2} + j of (l + 1, i) and the reverse of (l, j) -> (l - 1, k)
// is arc j of (l - 1, k).
class LayeredNetwork {
 public:
  explicit LayeredNetwork(const std::vector<int64_t>& sizes) : sizes_(sizes) {
    const int64_t layers = static_cast<int64_t>(sizes.size());
    node_offset_.assign(layers + 1, 0);
    for (int64_t l = 0; l < layers; ++l) node_offset_[l + 1] = node_offset_[l] + sizes[l];
    num_nodes = node_offset_[layers];
    layer_.resize(num_nodes);
    local_.resize(num_nodes);
    arc_begin_.resize(num_nodes + 1);
    int64_t arcs = 0;
    for (int64_t l = 0; l < layers; ++l) {
      for (int64_t j = 0; j < sizes[l]; ++j) {
        const int64_t u = node_offset_[l] + j;
        layer_[u] = l;
        local_[u] = j;
        arc_begin_[u] = arcs;
        arcs += prev_size(l) + next_size(l);
      }
    }
    arc_begin_[num_nodes] = arcs;
  }

  int64_t num_nodes = 0;
  int64_t num_arcs() const { return arc_begin_[num_nodes]; }
  int64_t node(int64_t l, int64_t j) const { return node_offset_[l] + j; }
  int64_t begin(int64_t u) const { return arc_begin_[u]; }
  int64_t end(int64_t u) const { return arc_begin_[u + 1]; }
  // The forward arc (l, j) -> (l + 1, i).
  int64_t forward_arc(int64_t l, int64_t j, int64_t i) const { return arc_begin_[node(l, j)] + prev_size(l) + i; }

  int64_t head(int64_t u, int64_t a) const {
    const int64_t l = layer_[u], p = a - arc_begin_[u], np = prev_size(l);
    return p < np ? node_offset_[l - 1] + p : node_offset_[l + 1] + (p - np);
  }
  int64_t rev(int64_t u, int64_t a) const {
    const int64_t l = layer_[u], p = a - arc_begin_[u], np = prev_size(l), j = local_[u];
    return p < np ? arc_begin_[node_offset_[l - 1] + p] + prev_size(l - 1) + j
                  : arc_begin_[node_offset_[l + 1] + (p - np)] + j;
  }

 private:
  int64_t prev_size(int64_t l) const { return l > 0 ? sizes_[l - 1] : 0; }
  int64_t next_size(int64_t l) const { return l + 1 < static_cast<int64_t>(sizes_.size()) ? sizes_[l + 1] : 0; }

  std::vector<int64_t> sizes_, node_offset_, layer_, local_, arc_begin_;
};

// Per-query scratch, reused across the queries one thread runs; no state survives between queries.
struct Workspace {
  std::vector<double> residual, excess;
  std::vector<int64_t> label, current, queue, active_next, active_head, layer_next, layer_prev, layer_head;

  void reserve(int64_t nodes, int64_t arcs) {
    residual.resize(arcs);
    excess.resize(nodes);
    label.resize(nodes);
    current.resize(nodes);
    queue.resize(nodes);
    active_next.resize(nodes);
    active_head.resize(nodes + 1);
    layer_next.resize(nodes);
    layer_prev.resize(nodes);
    layer_head.resize(nodes + 1);
  }
};

// Engine choice, measured single-threaded on an AMD EPYC (2 cores, g++ -O2 -march=native), same queries,
// same answers to 1e-15, ms per query:
//   layered softmax maps, L = 12, n = 20 / 64 / 128:  Dinic 0.039 / 0.25 / 0.86-0.94   push-relabel 0.039 /
//     0.26 / 0.89 (a tie within the noise of a shared machine)
//   random graphs (N, E) = (1e3, 5e3) / (2e3, 2e4) / (1e4, 1e5) / (5e3, 2e5):  Dinic 0.23 / 0.66 / 4.1 / 3.2
//     push-relabel 0.084 / 0.17 / 1.2 / 1.0
// so both ops use push-relabel; Dinic lost 3-4x on general graphs, where many short phases each pay O(n).
//
// Push-relabel, highest-label selection, phase one only: it ends with a maximum preflow, whose excess at t
// is the max-flow value (returning the surplus to s would not change it). Exact distance labels from a
// backward BFS (global relabelling) at the start and after every ~(6 n + m) units of relabel work; the gap
// heuristic removes nodes that can no longer reach t. A gap walks only the labels above it that are in use,
// and lowers that ceiling, so its cost is paid for by the relabels that raised it (no O(n) scan per gap,
// which made a 40k-node path with decreasing capacities take 1.5 s). ws.residual holds the initial
// residuals on entry.
template <class Net>
double push_relabel(const Net& g, int64_t s, int64_t t, double eps, Workspace& ws) {
  const int64_t n = g.num_nodes;
  double* res = ws.residual.data();
  double* excess = ws.excess.data();
  int64_t* label = ws.label.data();
  int64_t* cur = ws.current.data();
  int64_t* queue = ws.queue.data();
  // Active nodes by label (a stack per label, linked through next; entries go stale when a node is
  // relabelled or removed and are skipped when popped) and all nodes with a label in (0, n), by label, in
  // doubly linked lists for the gap heuristic; max_label bounds the labels in use.
  int64_t* next = ws.active_next.data();
  int64_t* head = ws.active_head.data();
  int64_t* layer_next = ws.layer_next.data();
  int64_t* layer_prev = ws.layer_prev.data();
  int64_t* layer_head = ws.layer_head.data();
  std::fill(excess, excess + n, 0.0);
  for (int64_t a = g.begin(s), e = g.end(s); a < e; ++a) {
    const double c = res[a];
    if (c <= 0.0) continue;
    res[a] = 0.0;
    res[g.rev(s, a)] += c;
    excess[g.head(s, a)] += c;
  }
  int64_t max_active = -1, max_label = 0;
  auto insert = [&](int64_t v) {
    const int64_t d = label[v];
    layer_prev[v] = -1;
    layer_next[v] = layer_head[d];
    if (layer_head[d] >= 0) layer_prev[layer_head[d]] = v;
    layer_head[d] = v;
    max_label = std::max(max_label, d);
  };
  auto erase = [&](int64_t v) {
    if (layer_prev[v] >= 0) {
      layer_next[layer_prev[v]] = layer_next[v];
    } else {
      layer_head[label[v]] = layer_next[v];
    }
    if (layer_next[v] >= 0) layer_prev[layer_next[v]] = layer_prev[v];
  };
  auto activate = [&](int64_t v) {
    next[v] = head[label[v]];
    head[label[v]] = v;
    max_active = std::max(max_active, label[v]);
  };
  auto global_relabel = [&]() {
    std::fill(label, label + n, n);
    std::fill(head, head + n + 1, -1);
    std::fill(layer_head, layer_head + n + 1, -1);
    max_active = -1;
    max_label = 0;
    label[t] = 0;
    int64_t qhead = 0, qtail = 0;
    queue[qtail++] = t;
    while (qhead < qtail) {
      const int64_t u = queue[qhead++];
      for (int64_t a = g.begin(u), e = g.end(u); a < e; ++a) {
        const int64_t v = g.head(u, a);
        if (label[v] < n || v == s || res[g.rev(u, a)] <= eps) continue;
        label[v] = label[u] + 1;
        queue[qtail++] = v;
      }
    }
    for (int64_t k = 1; k < qtail; ++k) {
      const int64_t v = queue[k];
      cur[v] = g.begin(v);
      insert(v);
      if (excess[v] > eps) activate(v);
    }
  };
  global_relabel();
  const int64_t relabel_period = 6 * n + g.num_arcs() / 2;
  int64_t work = 0;
  while (max_active >= 0) {
    const int64_t u = head[max_active];
    if (u < 0) {
      --max_active;
      continue;
    }
    head[max_active] = next[u];
    if (label[u] != max_active) continue;  // stale entry: u was relabelled or removed by a gap
    // Discharge u: push along admissible arcs, relabel when none is left.
    while (excess[u] > eps) {
      const int64_t e = g.end(u);
      int64_t a = cur[u];
      for (; a < e; ++a) {
        if (res[a] <= eps) continue;
        const int64_t v = g.head(u, a);
        if (label[v] + 1 != label[u]) continue;
        const double delta = std::min(excess[u], res[a]);
        res[a] -= delta;
        res[g.rev(u, a)] += delta;
        excess[u] -= delta;
        if (v != t && excess[v] <= eps && excess[v] + delta > eps) activate(v);
        excess[v] += delta;
        if (excess[u] <= eps) break;
      }
      cur[u] = a;
      if (excess[u] <= eps) break;
      const int64_t old = label[u];
      int64_t best = n;
      for (int64_t b = g.begin(u); b < e; ++b) {
        if (res[b] > eps) best = std::min(best, label[g.head(u, b)] + 1);
      }
      work += 12 + (e - g.begin(u));
      erase(u);
      if (layer_head[old] < 0) {
        // Gap: nothing at label `old` is left, so nodes above it cannot reach t any more.
        for (int64_t d = old + 1; d <= max_label; ++d) {
          for (int64_t v = layer_head[d]; v >= 0; v = layer_next[v]) label[v] = n;
          layer_head[d] = -1;
        }
        max_label = old - 1;
        label[u] = n;
        break;
      }
      if (best >= n) {
        label[u] = n;
        break;
      }
      label[u] = best;
      insert(u);
      cur[u] = g.begin(u);
      if (work > relabel_period) break;
    }
    if (label[u] < n && excess[u] > eps) activate(u);
    if (work > relabel_period) {
      work = 0;
      global_relabel();
    }
  }
  return excess[t];
}

}  // namespace flow
}  // namespace pk
