// CUDA launchers for graph_attention and its backward: the CPU engine's entry checks
// (graph_attention_cpu.cpp), plus device checks and the shapes of out/grad_out, which the kernels index
// directly.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>

#include "common/checks.h"
#include "common/cuda_launch.h"
#include "graph/graph_checks.h"
#include "graph/graph_cuda.h"

namespace pk {
namespace {

std::tuple<at::Tensor, at::Tensor> graph_attention_cuda(const at::Tensor& rowptr, const at::Tensor& col,
                                                        const std::optional<at::Tensor>&,
                                                        const std::optional<at::Tensor>&,
                                                        const std::optional<at::Tensor>&, const at::Tensor& q,
                                                        const at::Tensor& k, const at::Tensor& v,
                                                        const std::optional<at::Tensor>& bias, double scale) {
  const AttnShapes s = check_attention("pykernels.graph_attention", rowptr, col, q, k, v, bias);
  const cuda::DeviceGuard guard(q.device());
  auto out = at::empty({s.num_rows, s.heads, s.dv}, q.options());
  auto lse = at::empty({s.num_rows, s.heads}, q.options().dtype(lse_dtype(q.scalar_type())));
  PK_DISPATCH_FLOATS(q.scalar_type(), "graph_attention_cuda", [&] {
    using T = cuda::cuda_scalar_t<scalar_t>;
    using A = cuda::acc_t<T>;
    cuda::graph_attention(cuda::GraphAttentionParams<T>{
        {cuda::data<int64_t>(rowptr), cuda::data<int64_t>(col), s.num_rows}, cuda::data<scalar_t>(q),
        cuda::data<scalar_t>(k), cuda::data<scalar_t>(v), cuda::data<scalar_t>(bias), cuda::data<scalar_t>(out),
        cuda::data<A>(lse), s.heads, s.dqk, s.dv, static_cast<A>(scale), cuda::current_stream()});
    PK_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> graph_attention_backward_cuda(
    const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& rowptr_t, const at::Tensor& col_t,
    const at::Tensor& perm_t, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& bias, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& grad_out,
    double scale, bool bias_grad) {
  const AttnShapes s = check_attention_backward("pykernels.graph_attention_backward", rowptr, col, rowptr_t, col_t,
                                                perm_t, q, k, v, bias, out, lse, grad_out);
  const int64_t num_edges = col.numel();
  const cuda::DeviceGuard guard(q.device());
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  auto dbias = bias_grad ? at::empty({num_edges, s.heads}, q.options()) : at::empty({0}, q.options());
  auto probs = at::empty({num_edges, s.heads}, q.options().dtype(lse_dtype(q.scalar_type())));
  auto dscore = at::empty_like(probs);
  PK_DISPATCH_FLOATS(q.scalar_type(), "graph_attention_backward_cuda", [&] {
    using T = cuda::cuda_scalar_t<scalar_t>;
    using A = cuda::acc_t<T>;
    cuda::graph_attention_backward(cuda::GraphAttentionBackwardParams<T>{
        {cuda::data<int64_t>(rowptr), cuda::data<int64_t>(col), s.num_rows},
        {cuda::data<int64_t>(rowptr_t), cuda::data<int64_t>(col_t), s.num_cols}, cuda::data<int64_t>(perm_t),
        cuda::data<scalar_t>(q), cuda::data<scalar_t>(k), cuda::data<scalar_t>(v), cuda::data<scalar_t>(bias),
        cuda::data<scalar_t>(out), cuda::data<A>(lse), cuda::data<scalar_t>(grad_out), cuda::data<scalar_t>(dq),
        cuda::data<scalar_t>(dk), cuda::data<scalar_t>(dv), bias_grad ? cuda::data<scalar_t>(dbias) : nullptr,
        cuda::data<A>(probs), cuda::data<A>(dscore), s.heads, s.dqk, s.dv, static_cast<A>(scale),
        cuda::current_stream()});
    PK_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dq, dk, dv, dbias};
}

}  // namespace

PK_CUDA_LIBRARY_IMPL(m) {
  m.impl("graph_attention", &graph_attention_cuda);
  m.impl("graph_attention_backward", &graph_attention_backward_cuda);
}

}  // namespace pk
