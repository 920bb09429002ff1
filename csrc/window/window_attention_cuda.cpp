// CUDA launchers of window_attention and its backward: the entry checks shared with the CPU engine
// (window_attention_checks.h), this engine's head-dim limit, then at::Tensor -> params on the current
// stream. Outputs are allocated as in window_attention_cpu.cpp; the kernels write every element of them.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include "attention/attention_launch.h"
#include "window/window_attention_checks.h"
#include "window/window_cuda.h"

namespace pk {
namespace {

namespace win = cuda::win;

// Bounds the bias-gradient partial sums ([groups, heads, n, n] in the accumulation type) to 2^25 elements:
// Swin's windows keep one group per (b, window); MSW-MSA's 64 x 64 windows share a few groups.
constexpr int64_t kMaxPartial = int64_t(1) << 25;

template <typename S>
win::WindowInputs<cuda_t<S>> inputs(const WindowDims& d, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, const std::optional<at::Tensor>& bias_table,
                                    const std::optional<at::Tensor>& dense_bias,
                                    const std::optional<at::Tensor>& pad_kv, bool shift_mask, double scale) {
  using T = cuda_t<S>;
  win::WindowInputs<T> in{rows<S, const T>(q), rows<S, const T>(k), rows<S, const T>(v), cuda::data<S>(pad_kv),
                          cuda::data<S>(bias_table), cuda::data<S>(dense_bias), {0, 0, 0}, d.geo,
                          shift_mask && (d.geo.shift_h > 0 || d.geo.shift_w > 0), d.batch, d.heads, d.tokens, d.dqk,
                          d.dv, static_cast<win::acc_t<T>>(scale), cuda::current_stream()};
  if (dense_bias)
    for (int i = 0; i < 3; ++i) in.dense_stride[i] = dense_bias->stride(i);
  return in;
}

std::tuple<at::Tensor, at::Tensor> window_attention_cuda(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, at::IntArrayRef spatial_shape,
                                                         at::IntArrayRef window, at::IntArrayRef shift,
                                                         const std::optional<at::Tensor>& bias_table,
                                                         const std::optional<at::Tensor>& dense_bias,
                                                         const std::optional<at::Tensor>& pad_kv, bool shift_mask,
                                                         double scale) {
  const char* op = "pykernels.window_attention";
  const WindowDims d =
      check_window_attention(op, q, k, v, spatial_shape, window, shift, bias_table, dense_bias, pad_kv);
  check_head_dims(op, d);
  const cuda::DeviceGuard guard(q.device());
  at::Tensor out = at::empty({d.batch, d.heads, d.tokens, d.dv}, q.options());
  at::Tensor lse = at::empty({d.batch, d.heads, d.tokens}, q.options().dtype(attention_lse_dtype(q.scalar_type())));
  PK_DISPATCH_FLOATS(q.scalar_type(), "window_attention_cuda", [&] {
    using T = cuda_t<scalar_t>;
    const win::WindowForwardParams<T> p{
        inputs<scalar_t>(d, q, k, v, bias_table, dense_bias, pad_kv, shift_mask, scale), rows<scalar_t>(out),
        acc_data<scalar_t>(lse)};
    check_launch(op, win::window_forward(p), q, d);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_attention_backward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::IntArrayRef spatial_shape,
    at::IntArrayRef window, at::IntArrayRef shift, const std::optional<at::Tensor>& bias_table,
    const std::optional<at::Tensor>& dense_bias, const std::optional<at::Tensor>& pad_kv, bool shift_mask,
    double scale, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& grad_out, bool bias_grad) {
  const char* op = "pykernels.window_attention_backward";
  const WindowDims d =
      check_window_attention(op, q, k, v, spatial_shape, window, shift, bias_table, dense_bias, pad_kv);
  check_window_attention_backward(op, q, d, out, lse, grad_out);
  check_head_dims(op, d);
  const cuda::DeviceGuard guard(q.device());
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  const bool dense_grad = bias_grad && dense_bias.has_value(), table_grad = bias_grad && bias_table.has_value();
  at::Tensor dbias = dense_grad   ? at::empty(dense_bias->sizes(), q.options())
                     : table_grad ? at::empty(bias_table->sizes(), q.options())
                                  : at::empty({0}, q.options());
  const at::TensorOptions acc = q.options().dtype(attention_lse_dtype(q.scalar_type()));
  const int64_t n = d.geo.positions(), items = d.batch * d.geo.windows(), per_group = d.heads * n * n;
  const int64_t groups =
      dense_grad || table_grad ? std::min(items, std::max<int64_t>(1, kMaxPartial / std::max<int64_t>(1, per_group)))
                               : items;
  at::Tensor partial = dense_grad || table_grad ? at::zeros({groups * per_group}, acc) : at::empty({0}, acc);
  at::Tensor dense_sum = table_grad ? at::empty({per_group}, acc) : at::empty({0}, acc);
  at::Tensor delta = at::empty({d.batch, d.heads, d.tokens}, acc);
  const at::Tensor lse_rows = lse.contiguous();
  PK_DISPATCH_FLOATS(q.scalar_type(), "window_attention_backward_cuda", [&] {
    using T = cuda_t<scalar_t>;
    const win::WindowBackwardParams<T> p{
        inputs<scalar_t>(d, q, k, v, bias_table, dense_bias, pad_kv, shift_mask, scale),
        rows<scalar_t, const T>(out),
        rows<scalar_t, const T>(grad_out),
        acc_data<scalar_t>(lse_rows),
        rows<scalar_t>(dq),
        rows<scalar_t>(dk),
        rows<scalar_t>(dv),
        acc_data<scalar_t>(delta),
        groups,
        partial.numel() ? acc_data<scalar_t>(partial) : nullptr,
        dense_sum.numel() ? acc_data<scalar_t>(dense_sum) : nullptr,
        dense_grad || table_grad ? cuda::data<scalar_t>(dbias) : nullptr};
    check_launch(op, win::window_backward(p), q, d);
  });
  return {dq, dk, dv, dbias};
}

}  // namespace

PK_CUDA_LIBRARY_IMPL(m) {
  m.impl("window_attention", &window_attention_cuda);
  m.impl("window_attention_backward", &window_attention_backward_cuda);
}

}  // namespace pk
