#pragma once
#include "common/checks.h"

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

}  // namespace pk
