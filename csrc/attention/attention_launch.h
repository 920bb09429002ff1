// Launcher glue shared by the CUDA engines built on the attention tiles (dense, windowed and
// neighbourhood attention): the head-dim limit, the launch-status check, and at::Tensor -> the kernels'
// row views and accumulation-type pointers. Included only by *_cuda.cpp launchers.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>

#include "attention/attention_cuda.h"
#include "common/cuda_launch.h"

namespace pk {

// Dims: any of AttentionDims, WindowDims, NeighborhoodDims (head dims dqk and dv).
template <typename Dims>
void check_head_dims(const char* op, const Dims& d) {
  TORCH_CHECK(d.dqk <= cuda::attn::kMaxHeadDim && d.dv <= cuda::attn::kMaxHeadDim, op,
              ": the CUDA engine supports head dims up to ", cuda::attn::kMaxHeadDim, ", got D = ", d.dqk,
              " and Dv = ", d.dv);
}

template <typename Dims>
void check_launch(const char* op, cudaError_t err, const at::Tensor& q, const Dims& d) {
  TORCH_CHECK(err != cudaErrorLaunchOutOfResources, op, ": head dim ", std::max(d.dqk, d.dv), " in ",
              q.scalar_type(), " needs more shared memory per block than ", q.device(), " offers");
  PK_CUDA_CHECK(err);
}

template <typename S>
using cuda_t = cuda::cuda_scalar_t<S>;

template <typename S, typename P = cuda_t<S>>
cuda::attn::Rows<P> rows(const at::Tensor& t) {
  return {cuda::data<S>(t), t.stride(0), t.stride(1), t.stride(2)};
}

template <typename S>
cuda::attn::acc_t<cuda_t<S>>* acc_data(const at::Tensor& t) {
  return cuda::data<cuda::attn::acc_t<cuda_t<S>>>(t);
}

}  // namespace pk
