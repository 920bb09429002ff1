// Entry checks of the dense attention ops, shared by the CPU and CUDA engines. The Python layer validates
// first with friendlier messages; these keep direct torch.ops.pykernels.* calls from reading out of bounds.
#pragma once
#include <array>

#include "common/checks.h"

namespace pk {

struct AttentionDims {
  int64_t batch, heads, kv_heads, nq, nk, dqk, dv;
  // query heads per key/value head (heads == 0 allows kv_heads == 0)
  int64_t group() const { return kv_heads > 0 ? heads / kv_heads : 1; }
};

// The log-sum-exp is kept in the accumulation type: float32, or float64 for float64 inputs.
inline at::ScalarType attention_lse_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

namespace attention_detail {

inline void check_floating(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": ", name, " must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(dtype == q.scalar_type(), op, ": ", name, " has dtype ", dtype, ", q has ", q.scalar_type());
  PK_CHECK_SAME_DEVICE(op, name, t, q);
}

// Rows are read through the first three strides; each row must be contiguous.
inline void check_rows(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  check_floating(op, name, t, q);
  PK_CHECK_DIM(op, name, t, 4);
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, op, ": ", name,
              " must have a contiguous last dimension, got strides ", t.strides());
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ", t.sizes());
}

inline AttentionDims check_qk(const char* op, const at::Tensor& q, const at::Tensor& k) {
  check_rows(op, "q", q, q);
  check_rows(op, "k", k, q);
  const AttentionDims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), 0};
  TORCH_CHECK(k.size(0) == d.batch, op, ": q and k batch sizes differ: ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(k.size(3) == d.dqk, op, ": q and k head dims differ: ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(d.kv_heads > 0 ? d.heads % d.kv_heads == 0 : d.heads == 0, op, ": the ", d.heads,
              " query heads must be a multiple of the ", d.kv_heads, " key/value heads");
  return d;
}

inline void check_v(const char* op, const at::Tensor& v, const at::Tensor& q, AttentionDims& d) {
  check_rows(op, "v", v, q);
  TORCH_CHECK(v.size(0) == d.batch && v.size(1) == d.kv_heads && v.size(2) == d.nk, op,
              ": v must be [", d.batch, ", ", d.kv_heads, ", ", d.nk, ", Dv] like k, got ", v.sizes());
  d.dv = v.size(3);
}

// Any strides (stride 0 for broadcast dimensions): the engines read the bias element by element.
inline void check_bias(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& q,
                       const AttentionDims& d) {
  if (!bias) return;
  check_floating(op, "bias", *bias, q);
  check_shape(op, "bias", *bias, {d.batch, d.heads, d.nq, d.nk});
}

inline void check_lse(const char* op, const at::Tensor& lse, const at::Tensor& q, const AttentionDims& d) {
  const auto dtype = attention_lse_dtype(q.scalar_type());
  TORCH_CHECK(lse.scalar_type() == dtype, op, ": lse must be ", dtype, " for ", q.scalar_type(), " inputs, got ",
              lse.scalar_type());
  PK_CHECK_SAME_DEVICE(op, "lse", lse, q);
  check_shape(op, "lse", lse, {d.batch, d.heads, d.nq});
}

}  // namespace attention_detail

inline AttentionDims check_attention(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const std::optional<at::Tensor>& bias) {
  using namespace attention_detail;
  AttentionDims d = check_qk(op, q, k);
  check_v(op, v, q, d);
  check_bias(op, bias, q, d);
  return d;
}

inline AttentionDims check_attention_backward(const char* op, const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& v, const std::optional<at::Tensor>& bias,
                                              const at::Tensor& out, const at::Tensor& lse,
                                              const at::Tensor& grad_out) {
  using namespace attention_detail;
  const AttentionDims d = check_attention(op, q, k, v, bias);
  check_lse(op, lse, q, d);
  const std::array<int64_t, 4> out_shape{d.batch, d.heads, d.nq, d.dv};
  check_rows(op, "out", out, q);
  check_shape(op, "out", out, out_shape);
  check_rows(op, "grad_out", grad_out, q);
  check_shape(op, "grad_out", grad_out, out_shape);
  return d;
}

inline AttentionDims check_attention_map(const char* op, const at::Tensor& q, const at::Tensor& k,
                                         const std::optional<at::Tensor>& bias, const at::Tensor& lse) {
  using namespace attention_detail;
  const AttentionDims d = check_qk(op, q, k);
  check_bias(op, bias, q, d);
  check_lse(op, lse, q, d);
  return d;
}

inline AttentionDims check_attention_map_backward(const char* op, const at::Tensor& q, const at::Tensor& k,
                                                  const std::optional<at::Tensor>& bias, const at::Tensor& lse,
                                                  const at::Tensor& grad_map) {
  using namespace attention_detail;
  const AttentionDims d = check_attention_map(op, q, k, bias, lse);
  check_floating(op, "grad_map", grad_map, q);
  check_shape(op, "grad_map", grad_map, {d.batch, d.nq, d.nk});
  return d;
}

}  // namespace pk
