#pragma once
#include <c10/util/string_view.h>

#include "common/checks.h"
#include "graph/reduce.h"

namespace pk {

inline void check_csr(const char* op, const at::Tensor& rowptr, const at::Tensor& col) {
  PK_CHECK_INDEX_TENSOR(op, "rowptr", rowptr);
  PK_CHECK_INDEX_TENSOR(op, "col", col);
  PK_CHECK_DIM(op, "rowptr", rowptr, 1);
  PK_CHECK_DIM(op, "col", col, 1);
  TORCH_CHECK(rowptr.numel() >= 1, op, ": rowptr must have at least one entry");
  PK_CHECK_SAME_DEVICE(op, "col", col, rowptr);
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

}  // namespace pk
