#pragma once
#include <ATen/Parallel.h>
#include <c10/util/string_view.h>

#include <algorithm>
#include <array>
#include <limits>
#include <string>
#include <utility>

#include "common/checks.h"
#include "graph/reduce.h"

namespace pk {

// Entry checks of coo_to_csr; ctx names the caller and argument (e.g. "pykernels.scatter: index").
inline void check_coo(const std::string& ctx, const at::Tensor& row, const at::Tensor& col, int64_t num_rows,
                      int64_t num_cols) {
  TORCH_CHECK(num_rows >= 0 && num_cols >= 0, ctx, ": node counts must be non-negative, got ", num_rows, " and ",
              num_cols);
  TORCH_CHECK(row.dim() == 1 && col.dim() == 1 && row.numel() == col.numel(), ctx,
              ": row and col must be 1-D of equal length");
  TORCH_CHECK(row.scalar_type() == col.scalar_type() &&
                  (row.scalar_type() == at::kLong || row.scalar_type() == at::kInt),
              ctx, ": indices must be int32 or int64, got ", row.scalar_type());
  PK_CHECK_SAME_DEVICE(ctx, "col", col, row);
}

inline void check_arg_to_source(const char* op, const at::Tensor& arg, const at::Tensor& col) {
  TORCH_CHECK(arg.scalar_type() == at::kLong && col.scalar_type() == at::kLong, op,
              ": arg and col must be int64, got ", arg.scalar_type(), " and ", col.scalar_type());
  TORCH_CHECK(arg.is_contiguous() && col.dim() == 1 && col.is_contiguous(), op,
              ": arg must be contiguous and col 1-D contiguous");
  TORCH_CHECK(arg.device() == col.device(), op, ": arg is on ", arg.device(), ", col on ", col.device());
}

inline void check_csr(const char* op, const at::Tensor& rowptr, const at::Tensor& col) {
  PK_CHECK_INDEX_TENSOR(op, "rowptr", rowptr);
  PK_CHECK_INDEX_TENSOR(op, "col", col);
  PK_CHECK_DIM(op, "rowptr", rowptr, 1);
  PK_CHECK_DIM(op, "col", col, 1);
  TORCH_CHECK(rowptr.numel() >= 1, op, ": rowptr must have at least one entry");
  PK_CHECK_SAME_DEVICE(op, "col", col, rowptr);
}

// The contents of index arrays, which the CPU engines use as offsets without further checks: the ops are
// public (torch.ops.pykernels.*), and a col entry past the node count would read or write out of bounds.
// O(len) in parallel, a small share of any op that reads a feature row per edge. The CUDA engines do not
// read their indices back to the host (a synchronisation per call): there the contract is the caller's,
// as documented on pykernels.CSR, whose constructors produce valid indices.

// Every idx[i] in [lo, bound); `what` says what bound counts.
inline void check_index_range(const char* op, const char* name, const at::Tensor& idx, int64_t lo, int64_t bound,
                              const char* what) {
  const int64_t n = idx.numel();
  if (n == 0) return;
  const int64_t* d = idx.data_ptr<int64_t>();
  using Range = std::pair<int64_t, int64_t>;
  const Range range = at::parallel_reduce(
      0, n, 1 << 16, Range{std::numeric_limits<int64_t>::max(), std::numeric_limits<int64_t>::min()},
      [&](int64_t begin, int64_t end, Range r) {
        for (int64_t i = begin; i < end; ++i) r = {std::min(r.first, d[i]), std::max(r.second, d[i])};
        return r;
      },
      [](Range a, Range b) { return Range{std::min(a.first, b.first), std::max(a.second, b.second)}; });
  if (range.first >= lo && range.second < bound) return;
  const int64_t bad = range.first < lo ? range.first : range.second;
  TORCH_CHECK_INDEX(false, op, ": ", name, "[", std::find(d, d + n, bad) - d, "] = ", bad,
                    " is out of range: expected values in [", lo, ", ", bound, ") (", what, ")");
}

// rowptr of a CSR over `edges` entries: starts at 0, non-decreasing, ends at edges.
inline void check_rowptr(const char* op, const char* name, const at::Tensor& rowptr, int64_t edges,
                         const char* edges_name) {
  const int64_t n = rowptr.numel();
  TORCH_CHECK(n >= 1, op, ": ", name, " must have at least one entry");
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  TORCH_CHECK_INDEX(rp[0] == 0 && rp[n - 1] == edges, op, ": ", name, " must start at 0 and end at ", edges,
                    " (the length of ", edges_name, "), got ", rp[0], " and ", rp[n - 1]);
  const int64_t drop = at::parallel_reduce(
      0, n - 1, 1 << 16, n - 1,
      [&](int64_t begin, int64_t end, int64_t first) {
        for (int64_t i = begin; i < end; ++i)
          if (rp[i] > rp[i + 1]) return std::min(first, i);
        return first;
      },
      [](int64_t a, int64_t b) { return std::min(a, b); });
  TORCH_CHECK_INDEX(drop == n - 1, op, ": ", name, " must be non-decreasing, got ", name, "[", drop, "] = ",
                    drop < n - 1 ? rp[drop] : 0, " > ", name, "[", drop + 1, "] = ", drop < n - 1 ? rp[drop + 1] : 0);
}

// A CSR's contents: rowptr delimits col, whose entries index num_cols source nodes.
inline void check_csr_contents(const char* op, const at::Tensor& rowptr, const at::Tensor& col, int64_t num_cols,
                               const char* what) {
  check_rowptr(op, "rowptr", rowptr, col.numel(), "col");
  check_index_range(op, "col", col, 0, num_cols, what);
}

// The transpose that a backward reads: rowptr_t delimits col_t, whose entries index num_rows targets, and
// perm_t maps its positions to the num_edges CSR positions.
inline void check_transpose_contents(const char* op, const at::Tensor& rowptr_t, const at::Tensor& col_t,
                                     const at::Tensor& perm_t, int64_t num_rows, int64_t num_edges) {
  check_rowptr(op, "rowptr_t", rowptr_t, col_t.numel(), "col_t");
  check_index_range(op, "col_t", col_t, 0, num_rows, "the graph's target count");
  check_index_range(op, "perm_t", perm_t, 0, num_edges, "the graph's edge count");
}

// Per-edge values in CSR order: [E, H] (a single head is [E, 1]).
inline void check_edge_values(const char* op, const char* name, const at::Tensor& t, int64_t num_edges,
                              int64_t heads, at::ScalarType dtype) {
  PK_CHECK_FLOAT_TENSOR(op, name, t);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == num_edges && t.size(1) == heads, op, ": ", name, " must have shape [",
              num_edges, ", ", heads, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " has dtype ", t.scalar_type(), ", expected ", dtype);
}

inline Reduce parse_reduce(c10::string_view reduce) {
  if (reduce == "sum") return Reduce::kSum;
  if (reduce == "mean") return Reduce::kMean;
  if (reduce == "max") return Reduce::kMax;
  if (reduce == "min") return Reduce::kMin;
  TORCH_CHECK(false, "pykernels.spmm: reduce must be one of sum, mean, max, min; got '", std::string(reduce), "'");
}

// The log-sum-exp is kept in the accumulation type: float32, or float64 for float64 inputs.
inline at::ScalarType lse_dtype(at::ScalarType input) { return input == at::kDouble ? at::kDouble : at::kFloat; }

struct AttnShapes {
  int64_t num_rows, num_cols, heads, dqk, dv;
};

inline AttnShapes check_attention(const char* op, const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& q,
                           const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& bias) {
  check_csr(op, rowptr, col);
  PK_CHECK_FLOAT_TENSOR(op, "q", q);
  PK_CHECK_FLOAT_TENSOR(op, "k", k);
  PK_CHECK_FLOAT_TENSOR(op, "v", v);
  PK_CHECK_DIM(op, "q", q, 3);
  PK_CHECK_DIM(op, "k", k, 3);
  PK_CHECK_DIM(op, "v", v, 3);
  PK_CHECK_SAME_DEVICE(op, "q", q, rowptr);
  PK_CHECK_SAME_DEVICE(op, "k", k, rowptr);
  PK_CHECK_SAME_DEVICE(op, "v", v, rowptr);
  AttnShapes s{rowptr.numel() - 1, k.size(0), q.size(1), q.size(2), v.size(2)};
  TORCH_CHECK(q.size(0) == s.num_rows, op, ": q has ", q.size(0), " rows, graph has ", s.num_rows, " targets");
  TORCH_CHECK(k.size(1) == s.heads && v.size(1) == s.heads && k.size(2) == s.dqk && v.size(0) == s.num_cols, op,
              ": q, k, v shapes disagree: ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k, v must share a dtype");
  if (bias) {
    check_edge_values(op, "edge_bias", *bias, col.numel(), s.heads, q.scalar_type());
    PK_CHECK_SAME_DEVICE(op, "edge_bias", *bias, rowptr);
  }
  return s;
}


// Entry checks of spmm_arg_backward; returns {heads, feats}.
inline std::pair<int64_t, int64_t> check_spmm_arg_backward(const char* op, const at::Tensor& rowptr,
                                                           const at::Tensor& col, const at::Tensor& rowptr_t,
                                                           const at::Tensor& col_t, const at::Tensor& perm_t,
                                                           const std::optional<at::Tensor>& weight,
                                                           const at::Tensor& arg, const at::Tensor& grad_out,
                                                           const at::Tensor& x) {
  check_csr(op, rowptr, col);
  check_csr(op, rowptr_t, col_t);
  PK_CHECK_INDEX_TENSOR(op, "perm_t", perm_t);
  PK_CHECK_FLOAT_TENSOR(op, "grad_out", grad_out);
  PK_CHECK_FLOAT_TENSOR(op, "x", x);
  PK_CHECK_INDEX_TENSOR(op, "arg", arg);
  PK_CHECK_DIM(op, "x", x, 3);
  PK_CHECK_SAME_DEVICE(op, "rowptr_t", rowptr_t, rowptr);
  PK_CHECK_SAME_DEVICE(op, "perm_t", perm_t, rowptr);
  PK_CHECK_SAME_DEVICE(op, "arg", arg, rowptr);
  PK_CHECK_SAME_DEVICE(op, "grad_out", grad_out, rowptr);
  PK_CHECK_SAME_DEVICE(op, "x", x, rowptr);
  const int64_t num_rows = rowptr.numel() - 1, num_cols = rowptr_t.numel() - 1;
  const int64_t heads = x.size(1), feats = x.size(2);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({num_rows, heads, feats}) && arg.sizes() == grad_out.sizes(), op,
              ": grad_out/arg shape mismatch");
  TORCH_CHECK(x.size(0) == num_cols, op, ": x has ", x.size(0), " rows, graph has ", num_cols, " sources");
  TORCH_CHECK(perm_t.numel() == col_t.numel(), op, ": perm_t must have one entry per transposed edge");
  if (weight) {
    check_edge_values(op, "edge_weight", *weight, col.numel(), heads, x.scalar_type());
    PK_CHECK_SAME_DEVICE(op, "edge_weight", *weight, rowptr);
  }
  return {heads, feats};
}

// Entry checks of graph_attention_backward.
inline AttnShapes check_attention_backward(const char* op, const at::Tensor& rowptr, const at::Tensor& col,
                                           const at::Tensor& rowptr_t, const at::Tensor& col_t,
                                           const at::Tensor& perm_t, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const std::optional<at::Tensor>& bias,
                                           const at::Tensor& out, const at::Tensor& lse, const at::Tensor& grad_out) {
  const AttnShapes s = check_attention(op, rowptr, col, q, k, v, bias);
  check_csr(op, rowptr_t, col_t);
  PK_CHECK_INDEX_TENSOR(op, "perm_t", perm_t);
  TORCH_CHECK(rowptr_t.numel() - 1 == s.num_cols, op, ": transpose has ", rowptr_t.numel() - 1, " rows, expected ",
              s.num_cols);
  TORCH_CHECK(perm_t.numel() == col_t.numel(), op, ": perm_t must have one entry per transposed edge");
  PK_CHECK_FLOAT_TENSOR(op, "out", out);
  PK_CHECK_FLOAT_TENSOR(op, "grad_out", grad_out);
  TORCH_CHECK(lse.scalar_type() == lse_dtype(q.scalar_type()) && lse.is_contiguous(), op,
              ": lse must be contiguous ", lse_dtype(q.scalar_type()));
  const std::array<int64_t, 3> out_shape{s.num_rows, s.heads, s.dv};
  TORCH_CHECK(out.sizes().equals(out_shape) && grad_out.sizes().equals(out_shape), op, ": out and grad_out must be ",
              at::IntArrayRef(out_shape), ", got ", out.sizes(), " and ", grad_out.sizes());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({s.num_rows, s.heads}), op, ": lse must be [", s.num_rows, ", ",
              s.heads, "], got ", lse.sizes());
  PK_CHECK_SAME_DEVICE(op, "rowptr_t", rowptr_t, rowptr);
  PK_CHECK_SAME_DEVICE(op, "perm_t", perm_t, rowptr);
  PK_CHECK_SAME_DEVICE(op, "out", out, rowptr);
  PK_CHECK_SAME_DEVICE(op, "lse", lse, rowptr);
  PK_CHECK_SAME_DEVICE(op, "grad_out", grad_out, rowptr);
  return s;
}

}  // namespace pk
