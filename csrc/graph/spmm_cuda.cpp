// CUDA launchers for spmm and spmm_arg_backward: the CPU engine's entry checks (spmm_cpu.cpp), plus
// device checks, then one enqueue on the current stream. The transpose is only read by the backward.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_launch.h"
#include "graph/graph_checks.h"
#include "graph/graph_cuda.h"

namespace pk {
namespace {

std::tuple<at::Tensor, at::Tensor> spmm_cuda(const at::Tensor& rowptr, const at::Tensor& col,
                                             const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                             const std::optional<at::Tensor>&, const std::optional<at::Tensor>& weight,
                                             const at::Tensor& x, c10::string_view reduce_name) {
  constexpr const char* op = "pykernels.spmm";
  const Reduce reduce = parse_reduce(reduce_name);
  check_csr(op, rowptr, col);
  PK_CHECK_FLOAT_TENSOR(op, "x", x);
  PK_CHECK_DIM(op, "x", x, 3);
  PK_CHECK_SAME_DEVICE(op, "x", x, rowptr);
  const int64_t num_rows = rowptr.numel() - 1, heads = x.size(1), feats = x.size(2);
  if (weight) {
    check_edge_values(op, "edge_weight", *weight, col.numel(), heads, x.scalar_type());
    PK_CHECK_SAME_DEVICE(op, "edge_weight", *weight, rowptr);
  }
  const cuda::DeviceGuard guard(x.device());
  auto out = at::empty({num_rows, heads, feats}, x.options());
  const bool with_arg = reduce == Reduce::kMax || reduce == Reduce::kMin;
  auto arg = at::empty({with_arg ? num_rows : 0, heads, feats}, x.options().dtype(at::kLong));
  PK_DISPATCH_FLOATS(x.scalar_type(), "spmm_cuda", [&] {
    cuda::spmm(cuda::SpmmParams<cuda::cuda_scalar_t<scalar_t>>{
        {cuda::data<int64_t>(rowptr), cuda::data<int64_t>(col), num_rows}, cuda::data<scalar_t>(weight),
        cuda::data<scalar_t>(x), cuda::data<scalar_t>(out), with_arg ? cuda::data<int64_t>(arg) : nullptr, heads,
        feats, reduce, cuda::current_stream()});
    PK_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, arg};
}

std::tuple<at::Tensor, at::Tensor> spmm_arg_backward_cuda(const at::Tensor& rowptr, const at::Tensor& col,
                                                          const at::Tensor& rowptr_t, const at::Tensor& col_t,
                                                          const at::Tensor& perm_t,
                                                          const std::optional<at::Tensor>& weight,
                                                          const at::Tensor& arg, const at::Tensor& grad_out,
                                                          const at::Tensor& x, bool weight_grad) {
  // Plain variables, not structured bindings: C++17 lambdas cannot capture the latter.
  const std::pair<int64_t, int64_t> heads_feats = check_spmm_arg_backward(
      "pykernels.spmm_arg_backward", rowptr, col, rowptr_t, col_t, perm_t, weight, arg, grad_out, x);
  const int64_t heads = heads_feats.first, feats = heads_feats.second;
  const int64_t num_rows = rowptr.numel() - 1, num_cols = rowptr_t.numel() - 1;
  const cuda::DeviceGuard guard(x.device());
  auto grad_x = at::empty_like(x);
  auto grad_w = weight_grad ? at::empty({col.numel(), heads}, x.options()) : at::empty({0}, x.options());
  PK_DISPATCH_FLOATS(x.scalar_type(), "spmm_arg_backward_cuda", [&] {
    cuda::spmm_arg_backward(cuda::SpmmArgBackwardParams<cuda::cuda_scalar_t<scalar_t>>{
        {cuda::data<int64_t>(rowptr), cuda::data<int64_t>(col), num_rows},
        {cuda::data<int64_t>(rowptr_t), cuda::data<int64_t>(col_t), num_cols}, cuda::data<int64_t>(perm_t),
        cuda::data<scalar_t>(weight), cuda::data<int64_t>(arg), cuda::data<scalar_t>(grad_out), cuda::data<scalar_t>(x),
        cuda::data<scalar_t>(grad_x), weight_grad ? cuda::data<scalar_t>(grad_w) : nullptr, heads, feats,
        cuda::current_stream()});
    PK_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, grad_w};
}

}  // namespace

PK_CUDA_LIBRARY_IMPL(m) {
  m.impl("spmm", &spmm_cuda);
  m.impl("spmm_arg_backward", &spmm_arg_backward_cuda);
}

}  // namespace pk
