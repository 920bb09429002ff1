// Entry checks of the (max, min) product ops, shared by the CPU and CUDA engines. The Python layer validates
// first with friendlier messages; these keep direct torch.ops.pykernels.* calls from reading out of bounds.
#pragma once
#include <cmath>
#include <limits>

#include "common/checks.h"

namespace pk {

struct ProductDims {
  int64_t batch, m, k, n;
};

// a [batch, m, k], b [batch, k, n], one float dtype, one device, 1 <= k < 2^31 (argk is int32).
inline ProductDims check_product(const char* op, const at::Tensor& a, const at::Tensor& b) {
  for (const auto* t : {&a, &b}) {
    const char* name = t == &a ? "a" : "b";
    const auto dtype = t->scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
                ": ", name, " must be float32, float64, float16 or bfloat16, got ", dtype);
    PK_CHECK_DIM(op, name, *t, 3);
  }
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), op, ": a is ", a.scalar_type(), " but b is ", b.scalar_type());
  PK_CHECK_SAME_DEVICE(op, "b", b, a);
  TORCH_CHECK(a.size(0) == b.size(0), op, ": a and b must have the same batch size, got ", a.sizes(), " and ",
              b.sizes());
  TORCH_CHECK(a.size(2) == b.size(1), op, ": inner sizes differ: a ", a.sizes(), ", b ", b.sizes());
  TORCH_CHECK(a.size(2) >= 1, op, ": the inner size k must be at least 1");
  TORCH_CHECK(a.size(2) <= std::numeric_limits<int32_t>::max(), op, ": the inner size k must fit in int32");
  return {a.size(0), a.size(1), a.size(2), b.size(2)};
}

// A per-output tensor (argk, hard, sum, grad_out): [batch, m, n] of dtype on a's device.
inline void check_like(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype,
                       const ProductDims& d, const at::Tensor& a) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  PK_CHECK_SAME_DEVICE(op, name, t, a);
  TORCH_CHECK(t.sizes() == at::IntArrayRef({d.batch, d.m, d.n}), op, ": ", name, " must have shape [", d.batch,
              ", ", d.m, ", ", d.n, "], got ", t.sizes());
}

inline void check_temperature(const char* op, double temperature) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op, ": temperature must be finite and > 0, got ",
              temperature);
}

// The soft product's sum (and every accumulation) is float32, float64 for float64 inputs.
inline at::ScalarType product_acc_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace pk
