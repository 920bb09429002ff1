// CUDA launchers for edge_softmax and its backward: the CPU engine's entry checks
// (edge_softmax_cpu.cpp), plus device checks.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_launch.h"
#include "graph/graph_cuda.h"

namespace pk {
namespace {

at::Tensor edge_softmax_cuda(const at::Tensor& rowptr, const at::Tensor& scores) {
  constexpr const char* op = "pykernels.edge_softmax";
  PK_CHECK_INDEX_TENSOR(op, "rowptr", rowptr);
  TORCH_CHECK(rowptr.dim() == 1 && rowptr.numel() >= 1, op, ": rowptr must be 1-D with at least one entry");
  PK_CHECK_FLOAT_TENSOR(op, "scores", scores);
  PK_CHECK_DIM(op, "scores", scores, 2);
  PK_CHECK_SAME_DEVICE(op, "scores", scores, rowptr);
  const int64_t num_rows = rowptr.numel() - 1;
  const cuda::DeviceGuard guard(scores.device());
  auto out = at::empty_like(scores);
  PK_DISPATCH_FLOATS(scores.scalar_type(), "edge_softmax_cuda", [&] {
    cuda::edge_softmax(cuda::EdgeSoftmaxParams<cuda::cuda_scalar_t<scalar_t>>{
        cuda::data<int64_t>(rowptr), num_rows, scores.size(0), scores.size(1), cuda::data<scalar_t>(scores),
        cuda::data<scalar_t>(out), cuda::current_stream()});
    PK_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor edge_softmax_backward_cuda(const at::Tensor& rowptr, const at::Tensor& probs, const at::Tensor& grad) {
  constexpr const char* op = "pykernels.edge_softmax_backward";
  PK_CHECK_INDEX_TENSOR(op, "rowptr", rowptr);
  TORCH_CHECK(rowptr.dim() == 1 && rowptr.numel() >= 1, op, ": rowptr must be 1-D with at least one entry");
  PK_CHECK_FLOAT_TENSOR(op, "probs", probs);
  PK_CHECK_FLOAT_TENSOR(op, "grad", grad);
  TORCH_CHECK(probs.sizes() == grad.sizes() && probs.dim() == 2, op, ": probs and grad must be [E, H]");
  PK_CHECK_SAME_DEVICE(op, "probs", probs, rowptr);
  PK_CHECK_SAME_DEVICE(op, "grad", grad, rowptr);
  const int64_t num_rows = rowptr.numel() - 1;
  const cuda::DeviceGuard guard(probs.device());
  auto out = at::empty_like(probs);
  PK_DISPATCH_FLOATS(probs.scalar_type(), "edge_softmax_backward_cuda", [&] {
    cuda::edge_softmax_backward(cuda::EdgeSoftmaxBackwardParams<cuda::cuda_scalar_t<scalar_t>>{
        cuda::data<int64_t>(rowptr), num_rows, probs.size(0), probs.size(1), cuda::data<scalar_t>(probs),
        cuda::data<scalar_t>(grad), cuda::data<scalar_t>(out), cuda::current_stream()});
    PK_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

PK_CUDA_LIBRARY_IMPL(m) {
  m.impl("edge_softmax", &edge_softmax_cuda);
  m.impl("edge_softmax_backward", &edge_softmax_backward_cuda);
}

}  // namespace pk
