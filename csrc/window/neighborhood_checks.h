// Entry checks of neighborhood_attention_2d and its backward, for every engine. The Python layer validates
// first with friendlier messages; these keep direct torch.ops calls from reading out of bounds.
#pragma once
#include "attention/attention_checks.h"
#include "window/neighborhood.h"

namespace pk {

struct NeighborhoodDims {
  int64_t batch, heads, tokens, dqk, dv;
  neighborhood::Axis y, x;
  int64_t bias_entries() const { return (2 * y.kernel - 1) * (2 * x.kernel - 1); }
};

namespace neighborhood_detail {

inline neighborhood::Axis check_axis(const char* op, const char* axis, int64_t length, int64_t kernel,
                                     int64_t dilation) {
  TORCH_CHECK(length >= 1, op, ": spatial_shape ", axis, " must be positive, got ", length);
  TORCH_CHECK(kernel >= 1 && kernel % 2 == 1, op, ": kernel_size ", axis, " must be odd and positive, got ", kernel);
  TORCH_CHECK(dilation >= 1, op, ": dilation ", axis, " must be positive, got ", dilation);
  // kernel * dilation <= length, without the product: a direct call's huge kernel_size would wrap it past the check.
  TORCH_CHECK(kernel <= length / dilation, op, ": kernel_size * dilation along ", axis, " (", kernel, " * ", dilation,
              ") exceeds the map's ", axis, " ", length);
  return {length, kernel, dilation};
}

// Token rows are read through the first three strides; each must be contiguous. An empty tensor is never
// read (autograd hands an empty one over with all strides 0).
inline void check_tokens(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  attention_detail::check_floating(op, name, t, q);
  PK_CHECK_DIM(op, name, t, 4);
  TORCH_CHECK(t.numel() == 0 || t.size(3) <= 1 || t.stride(3) == 1, op, ": ", name,
              " must have a contiguous last dimension, got strides ", t.strides());
}

inline void check_pair(const char* op, const char* name, at::IntArrayRef v) {
  TORCH_CHECK(v.size() == 2, op, ": ", name, " must have two entries (height, width), got ", v);
}

}  // namespace neighborhood_detail

inline NeighborhoodDims check_neighborhood(const char* op, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, at::IntArrayRef spatial_shape,
                                           at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                                           const std::optional<at::Tensor>& rpb) {
  using namespace attention_detail;
  using namespace neighborhood_detail;
  check_tokens(op, "q", q, q);
  check_tokens(op, "k", k, q);
  check_tokens(op, "v", v, q);
  check_shape(op, "k", k, q.sizes());
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == q.size(2), op,
              ": v must be [B, heads, tokens, Dv] like q ", q.sizes(), ", got ", v.sizes());
  check_pair(op, "spatial_shape", spatial_shape);
  check_pair(op, "kernel_size", kernel_size);
  check_pair(op, "dilation", dilation);
  NeighborhoodDims d{q.size(0), q.size(1), q.size(2), q.size(3), v.size(3),
                     check_axis(op, "height", spatial_shape[0], kernel_size[0], dilation[0]),
                     check_axis(op, "width", spatial_shape[1], kernel_size[1], dilation[1])};
  int64_t cells = 0;
  TORCH_CHECK(!__builtin_mul_overflow(d.y.length, d.x.length, &cells), op, ": spatial_shape ", spatial_shape,
              " holds more tokens than int64 counts");
  TORCH_CHECK(cells == d.tokens, op, ": spatial_shape ", spatial_shape, " holds ", cells, " tokens, q has ", d.tokens);
  if (rpb) {
    check_floating(op, "rpb", *rpb, q);
    check_shape(op, "rpb", *rpb, {d.heads, 2 * d.y.kernel - 1, 2 * d.x.kernel - 1});
  }
  return d;
}

inline NeighborhoodDims check_neighborhood_backward(const char* op, const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v, at::IntArrayRef spatial_shape,
                                                    at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                                                    const std::optional<at::Tensor>& rpb, const at::Tensor& out,
                                                    const at::Tensor& lse, const at::Tensor& grad_out,
                                                    bool rpb_grad) {
  using namespace attention_detail;
  using namespace neighborhood_detail;
  const NeighborhoodDims d = check_neighborhood(op, q, k, v, spatial_shape, kernel_size, dilation, rpb);
  TORCH_CHECK(!rpb_grad || rpb, op, ": rpb_grad needs an rpb");
  const std::array<int64_t, 4> out_shape{d.batch, d.heads, d.tokens, d.dv};
  check_tokens(op, "out", out, q);
  check_shape(op, "out", out, out_shape);
  check_tokens(op, "grad_out", grad_out, q);
  check_shape(op, "grad_out", grad_out, out_shape);
  check_lse(op, lse, q, AttentionDims{d.batch, d.heads, d.heads, d.tokens, d.tokens, d.dqk, d.dv});
  return d;
}

}  // namespace pk
