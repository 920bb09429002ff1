// CUDA launchers of neighborhood_attention_2d and its backward: the entry checks shared with the CPU engine
// (neighborhood_checks.h), this engine's head-dim limit, then at::Tensor -> params on the current stream.
// Outputs are allocated as in neighborhood_cpu.cpp; the kernels write every element of them.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "attention/attention_launch.h"
#include "window/neighborhood_checks.h"
#include "window/window_cuda.h"

namespace pk {
namespace {

namespace win = cuda::win;

// rpb_rows: rpb made contiguous (or undefined).
template <typename S>
win::NeighborhoodInputs<cuda_t<S>> inputs(const NeighborhoodDims& d, const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, const at::Tensor& rpb_rows, double scale) {
  using T = cuda_t<S>;
  return {rows<S, const T>(q), rows<S, const T>(k), rows<S, const T>(v),
          rpb_rows.defined() ? cuda::data<S>(rpb_rows) : nullptr, d.y, d.x, d.batch, d.heads, d.dqk, d.dv,
          static_cast<win::acc_t<T>>(scale), cuda::current_stream()};
}

at::Tensor contiguous_rpb(const std::optional<at::Tensor>& rpb) { return rpb ? rpb->contiguous() : at::Tensor(); }

std::tuple<at::Tensor, at::Tensor> neighborhood_attention_2d_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& v, at::IntArrayRef spatial_shape,
                                                                  at::IntArrayRef kernel_size,
                                                                  at::IntArrayRef dilation,
                                                                  const std::optional<at::Tensor>& rpb, double scale) {
  const char* op = "pykernels.neighborhood_attention_2d";
  const NeighborhoodDims d = check_neighborhood(op, q, k, v, spatial_shape, kernel_size, dilation, rpb);
  check_head_dims(op, d);
  const cuda::DeviceGuard guard(q.device());
  at::Tensor out = at::empty({d.batch, d.heads, d.tokens, d.dv}, q.options());
  at::Tensor lse = at::empty({d.batch, d.heads, d.tokens}, q.options().dtype(attention_lse_dtype(q.scalar_type())));
  const at::Tensor bias = contiguous_rpb(rpb);
  PK_DISPATCH_FLOATS(q.scalar_type(), "neighborhood_attention_2d_cuda", [&] {
    using T = cuda_t<scalar_t>;
    const win::NeighborhoodForwardParams<T> p{inputs<scalar_t>(d, q, k, v, bias, scale), rows<scalar_t>(out),
                                              acc_data<scalar_t>(lse)};
    PK_CUDA_CHECK(win::neighborhood_forward(p));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> neighborhood_attention_2d_backward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::IntArrayRef spatial_shape,
    at::IntArrayRef kernel_size, at::IntArrayRef dilation, const std::optional<at::Tensor>& rpb, double scale,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& grad_out, bool rpb_grad) {
  const char* op = "pykernels.neighborhood_attention_2d_backward";
  const NeighborhoodDims d = check_neighborhood_backward(op, q, k, v, spatial_shape, kernel_size, dilation, rpb, out,
                                                         lse, grad_out, rpb_grad);
  check_head_dims(op, d);
  const cuda::DeviceGuard guard(q.device());
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  at::Tensor drpb = rpb_grad ? at::empty({d.heads, 2 * d.y.kernel - 1, 2 * d.x.kernel - 1}, q.options())
                             : at::empty({0}, q.options());
  const at::TensorOptions acc = q.options().dtype(attention_lse_dtype(q.scalar_type()));
  at::Tensor delta = at::empty({d.batch, d.heads, d.tokens}, acc);
  // dS per (query, window slot): what the rpb gradient sums, kept so that the sum has a fixed order.
  at::Tensor ds = rpb_grad ? at::empty({d.batch, d.heads, d.tokens, d.y.kernel * d.x.kernel}, acc)
                           : at::empty({0}, acc);
  const at::Tensor bias = contiguous_rpb(rpb), lse_rows = lse.contiguous();
  PK_DISPATCH_FLOATS(q.scalar_type(), "neighborhood_attention_2d_backward_cuda", [&] {
    using T = cuda_t<scalar_t>;
    const win::NeighborhoodBackwardParams<T> p{inputs<scalar_t>(d, q, k, v, bias, scale),
                                               rows<scalar_t, const T>(out),
                                               rows<scalar_t, const T>(grad_out),
                                               acc_data<scalar_t>(lse_rows),
                                               rows<scalar_t>(dq),
                                               rows<scalar_t>(dk),
                                               rows<scalar_t>(dv),
                                               acc_data<scalar_t>(delta),
                                               rpb_grad ? acc_data<scalar_t>(ds) : nullptr,
                                               rpb_grad ? cuda::data<scalar_t>(drpb) : nullptr};
    PK_CUDA_CHECK(win::neighborhood_backward(p));
  });
  return {dq, dk, dv, drpb};
}

}  // namespace

PK_CUDA_LIBRARY_IMPL(m) {
  m.impl("neighborhood_attention_2d", &neighborhood_attention_2d_cuda);
  m.impl("neighborhood_attention_2d_backward", &neighborhood_attention_2d_backward_cuda);
}

}  // namespace pk
