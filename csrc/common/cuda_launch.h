// Launcher-side glue between at::Tensor and the torch-free CUDA kernels: the CUDA type each ATen
// float type is instantiated as, typed device pointers, and the current stream. Included only by the
// *_cuda.cpp launchers, which are built only against a CUDA torch.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <optional>

namespace pk::cuda {

template <typename S>
struct CudaScalar {
  using type = S;
};
template <>
struct CudaScalar<c10::Half> {
  using type = __half;
};
template <>
struct CudaScalar<c10::BFloat16> {
  using type = __nv_bfloat16;
};
template <typename S>
using cuda_scalar_t = typename CudaScalar<S>::type;

static_assert(sizeof(c10::Half) == sizeof(__half) && sizeof(c10::BFloat16) == sizeof(__nv_bfloat16),
              "ATen and CUDA half types must share a layout");

// data_ptr<S>() checks the dtype, so a mismatched tensor fails with the same error as in the CPU engine
// instead of being reinterpreted.
template <typename S>
cuda_scalar_t<S>* data(const at::Tensor& t) {
  return reinterpret_cast<cuda_scalar_t<S>*>(t.data_ptr<S>());
}
template <typename S>
cuda_scalar_t<S>* data(const std::optional<at::Tensor>& t) {
  return t ? data<S>(*t) : nullptr;
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

}  // namespace pk::cuda
