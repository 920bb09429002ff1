// CUDA launchers of the dense attention ops: the entry checks shared with the CPU engine
// (attention_checks.h), this engine's head-dim limit, then at::Tensor -> params on the current stream.
// Outputs are allocated as in attention_cpu.cpp; the kernels write every element of them.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include "attention/attention_checks.h"
#include "attention/attention_launch.h"

namespace pk {
namespace {

namespace attn = cuda::attn;

template <typename S>
attn::Scores<cuda_t<S>> bias_scores(const std::optional<at::Tensor>& bias) {
  if (!bias) return {};
  return {cuda::data<S>(*bias), bias->stride(0), bias->stride(1), bias->stride(2), bias->stride(3)};
}

// v is null for the map ops, which never read it.
template <typename S>
attn::Inputs<cuda_t<S>> inputs(const AttentionDims& d, const at::Tensor& q, const at::Tensor& k, const at::Tensor* v,
                               const std::optional<at::Tensor>& bias, bool causal, double scale) {
  using T = cuda_t<S>;
  return {rows<S, const T>(q), rows<S, const T>(k), v ? rows<S, const T>(*v) : attn::Rows<const T>{},
          bias_scores<S>(bias), d.batch, d.heads, d.kv_heads, d.nq, d.nk, d.dqk, d.dv,
          static_cast<attn::acc_t<T>>(scale), causal, cuda::current_stream()};
}

// The bias gradient as the kernels write it: contiguous [B, H, Nq, Nk], or an empty tensor when not asked for.
at::Tensor bias_grad_buffer(const at::Tensor& q, const AttentionDims& d, bool bias_grad) {
  return bias_grad ? at::empty({d.batch, d.heads, d.nq, d.nk}, q.options()) : at::empty({0}, q.options());
}

at::Tensor row_scratch(const at::Tensor& q, const AttentionDims& d) {
  return at::empty({d.batch, d.heads, d.nq}, q.options().dtype(attention_lse_dtype(q.scalar_type())));
}

std::tuple<at::Tensor, at::Tensor> attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const std::optional<at::Tensor>& bias, bool causal, double scale) {
  const char* op = "pykernels.attention";
  const AttentionDims d = check_attention(op, q, k, v, bias);
  check_head_dims(op, d);
  const cuda::DeviceGuard guard(q.device());
  at::Tensor out = at::empty({d.batch, d.heads, d.nq, d.dv}, q.options());
  at::Tensor lse = row_scratch(q, d);
  PK_DISPATCH_FLOATS(q.scalar_type(), "attention_cuda", [&] {
    using T = cuda_t<scalar_t>;
    const attn::ForwardParams<T> p{inputs<scalar_t>(d, q, k, &v, bias, causal, scale), rows<scalar_t>(out),
                                   acc_data<scalar_t>(lse)};
    check_launch(op, attn::forward(p), q, d);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& bias,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& grad_out, bool causal, double scale,
    bool bias_grad) {
  const char* op = "pykernels.attention_backward";
  const AttentionDims d = check_attention_backward(op, q, k, v, bias, out, lse, grad_out);
  check_head_dims(op, d);
  const cuda::DeviceGuard guard(q.device());
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  at::Tensor dbias = bias_grad_buffer(q, d, bias_grad);
  const at::Tensor lse_rows = lse.contiguous();
  at::Tensor delta = row_scratch(q, d);
  PK_DISPATCH_FLOATS(q.scalar_type(), "attention_backward_cuda", [&] {
    using T = cuda_t<scalar_t>;
    const attn::BackwardParams<T> p{inputs<scalar_t>(d, q, k, &v, bias, causal, scale),
                                    rows<scalar_t, const T>(out),
                                    rows<scalar_t, const T>(grad_out),
                                    acc_data<scalar_t>(lse_rows),
                                    rows<scalar_t>(dq),
                                    rows<scalar_t>(dk),
                                    rows<scalar_t>(dv),
                                    bias_grad ? cuda::data<scalar_t>(dbias) : nullptr,
                                    acc_data<scalar_t>(delta)};
    check_launch(op, attn::backward(p), q, d);
  });
  return {dq, dk, dv, dbias};
}

at::Tensor attention_map_cuda(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& bias,
                              const at::Tensor& lse, bool causal, double scale) {
  const char* op = "pykernels.attention_map";
  const AttentionDims d = check_attention_map(op, q, k, bias, lse);
  check_head_dims(op, d);
  const cuda::DeviceGuard guard(q.device());
  at::Tensor map = at::empty({d.batch, d.nq, d.nk}, q.options());
  const at::Tensor lse_rows = lse.contiguous();
  PK_DISPATCH_FLOATS(q.scalar_type(), "attention_map_cuda", [&] {
    using T = cuda_t<scalar_t>;
    const attn::MapParams<T> p{inputs<scalar_t>(d, q, k, nullptr, bias, causal, scale), acc_data<scalar_t>(lse_rows),
                               cuda::data<scalar_t>(map)};
    check_launch(op, attn::map(p), q, d);
  });
  return map;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_map_backward_cuda(
    const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& bias, const at::Tensor& lse,
    const at::Tensor& grad_map, bool causal, double scale, bool bias_grad) {
  const char* op = "pykernels.attention_map_backward";
  const AttentionDims d = check_attention_map_backward(op, q, k, bias, lse, grad_map);
  check_head_dims(op, d);
  const cuda::DeviceGuard guard(q.device());
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k);
  at::Tensor dbias = bias_grad_buffer(q, d, bias_grad);
  const at::Tensor lse_rows = lse.contiguous();
  at::Tensor row_dot = row_scratch(q, d);
  PK_DISPATCH_FLOATS(q.scalar_type(), "attention_map_backward_cuda", [&] {
    using T = cuda_t<scalar_t>;
    const attn::Scores<T> grad{cuda::data<scalar_t>(grad_map), grad_map.stride(0), 0, grad_map.stride(1),
                               grad_map.stride(2)};
    const attn::MapBackwardParams<T> p{inputs<scalar_t>(d, q, k, nullptr, bias, causal, scale),
                                       acc_data<scalar_t>(lse_rows),
                                       grad,
                                       rows<scalar_t>(dq),
                                       rows<scalar_t>(dk),
                                       bias_grad ? cuda::data<scalar_t>(dbias) : nullptr,
                                       acc_data<scalar_t>(row_dot)};
    check_launch(op, attn::map_backward(p), q, d);
  });
  return {dq, dk, dbias};
}

// This engine has no shared kernel for the output and the map: the two ops run one after the other, and the
// backward adds the map's gradients to the output's.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_with_map_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                       const at::Tensor& v,
                                                                       const std::optional<at::Tensor>& bias,
                                                                       bool causal, double scale) {
  auto [out, lse] = attention_cuda(q, k, v, bias, causal, scale);
  at::Tensor map = attention_map_cuda(q, k, bias, lse, causal, scale);
  return {out, lse, map};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_with_map_backward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& bias,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& grad_out, const at::Tensor& grad_map, bool causal,
    double scale, bool bias_grad) {
  auto [dq, dk, dv, dbias] = attention_backward_cuda(q, k, v, bias, out, lse, grad_out, causal, scale, bias_grad);
  auto [map_dq, map_dk, map_dbias] = attention_map_backward_cuda(q, k, bias, lse, grad_map, causal, scale, bias_grad);
  dq.add_(map_dq);
  dk.add_(map_dk);
  if (bias_grad) dbias.add_(map_dbias);
  return {dq, dk, dv, dbias};
}

}  // namespace

PK_CUDA_LIBRARY_IMPL(m) {
  m.impl("attention", &attention_cuda);
  m.impl("attention_backward", &attention_backward_cuda);
  m.impl("attention_map", &attention_map_cuda);
  m.impl("attention_map_backward", &attention_map_backward_cuda);
  m.impl("attention_with_map", &attention_with_map_cuda);
  m.impl("attention_with_map_backward", &attention_with_map_backward_cuda);
}

}  // namespace pk
