// Host entry points of the (max, min) product CUDA engine (the *maxmin_matmul* ops of registration.cpp):
// params structs of raw device pointers, sizes and strides, so the kernels build under plain nvcc and only
// maxmin_cuda.cpp sees at::Tensor. Every entry is instantiated for T in {float, double, __half,
// __nv_bfloat16}, enqueues on p.stream, never syncs, and returns the launch status.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

#include "common/pk_common.h"

namespace pk::cuda::flow {

// fp16/bf16/fp32 accumulate in float, fp64 in double; also the dtype of the soft product's sum.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// A [batch, rows, cols] matrix read through its strides, in elements. Any stride may be 0 (a broadcast
// batch, an expanded row), so inputs are never materialised.
template <typename T>
struct Matrix {
  T* data;
  int64_t batch_stride, row_stride, col_stride;

  PK_HOST_DEVICE T& at(int64_t b, int64_t r, int64_t c) const {
    return data[b * batch_stride + r * row_stride + c * col_stride];
  }
  // The same memory read as [batch, cols, rows].
  PK_HOST_DEVICE Matrix transposed() const { return {data, batch_stride, col_stride, row_stride}; }
};

// a [batch, m, k], b [batch, k, n], k >= 1; outputs contiguous [batch, m, n].
template <typename T>
struct ForwardParams {
  Matrix<const T> a, b;
  int64_t batch, m, n, k;
  T* out;
  int32_t* argk;      // hard product: the lowest maximising k; nullptr for the soft one
  T* hard;            // soft product: the hard product (its shift); nullptr for the hard one
  acc_t<T>* sum;      // soft product: sum_k 1 / (e_x + e_y); nullptr for the hard one
  acc_t<T> temperature, inv_temperature;  // soft product only
  cudaStream_t stream;
};

// The per-output tensors ([batch, m, n], any strides) are those the forward kept: argk for the hard
// product, hard and sum for the soft one (soft == true). grad_a [batch, m, k] and grad_b [batch, k, n] are
// contiguous, or nullptr when not wanted.
template <typename T>
struct BackwardParams {
  Matrix<const T> a, b;
  int64_t batch, m, n, k;
  bool soft;
  Matrix<const int32_t> argk;
  Matrix<const T> hard;
  Matrix<const acc_t<T>> sum;
  Matrix<const T> grad_out;
  T* grad_a;
  T* grad_b;
  acc_t<T> inv_temperature;  // soft product only
  cudaStream_t stream;
};

template <typename T>
cudaError_t forward(const ForwardParams<T>& p);
template <typename T>
cudaError_t backward(const BackwardParams<T>& p);

}  // namespace pk::cuda::flow
