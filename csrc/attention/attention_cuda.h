// Host entry points of the dense attention CUDA engine (the attention* ops of registration.cpp): params
// structs of raw device pointers, sizes and strides, so the kernels build under plain nvcc and only
// attention_cuda.cpp sees at::Tensor. Every entry is instantiated for T in {float, double, __half,
// __nv_bfloat16}, enqueues on in.stream, never syncs, and returns the launch status:
// cudaErrorLaunchOutOfResources when a head dim needs more shared memory per block than the device has
// (fp64 heads above 128 on GPUs with 99 KB per block, such as sm_86 and sm_89).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

#include "common/pk_common.h"

namespace pk::cuda::attn {

// fp16/bf16/fp32 accumulate in float, fp64 in double; also the dtype of lse and of the row scratch.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// The kernels keep a head (D and Dv) in shared memory and registers; longer heads are rejected up front.
constexpr int64_t kMaxHeadDim = 256;

// A [B, heads, rows, dim] tensor with a contiguous last dimension; strides in elements.
template <typename T>
struct Rows {
  T* data;
  int64_t batch_stride, head_stride, row_stride;

  PK_HOST_DEVICE T* at(int64_t b, int64_t h, int64_t row) const {
    return data + b * batch_stride + h * head_stride + row * row_stride;
  }
};

// A [B, H, Nq, Nk] tensor read element by element (the bias; the map gradient [B, Nq, Nk] with head_stride
// 0). Any stride may be 0, so an expanded tensor is read without being materialised.
template <typename T>
struct Scores {
  const T* data;
  int64_t batch_stride, head_stride, query_stride, key_stride;

  PK_HOST_DEVICE const T& at(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return data[b * batch_stride + h * head_stride + i * query_stride + j * key_stride];
  }
};

// What all four ops read: q [B, H, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] (unused by the map ops),
// the optional bias, and the score scale; query head h reads kv head h / (H / Hkv).
template <typename T>
struct Inputs {
  Rows<const T> q, k, v;
  Scores<T> bias;  // data == nullptr: no bias
  int64_t batch, heads, kv_heads, nq, nk, d, dv;
  acc_t<T> scale;
  bool causal;  // key j visible to query i iff j <= i
  cudaStream_t stream;
};

template <typename T>
struct ForwardParams {
  Inputs<T> in;
  Rows<T> out;    // [B, H, Nq, Dv]
  acc_t<T>* lse;  // [B, H, Nq], contiguous
};

template <typename T>
struct BackwardParams {
  Inputs<T> in;
  Rows<const T> out, grad_out;  // [B, H, Nq, Dv]
  const acc_t<T>* lse;          // [B, H, Nq], contiguous
  Rows<T> grad_q, grad_k, grad_v;
  T* grad_bias;     // contiguous [B, H, Nq, Nk], or nullptr
  acc_t<T>* delta;  // [B, H, Nq] scratch: rowsum(grad_out * out)
};

template <typename T>
struct MapParams {
  Inputs<T> in;
  const acc_t<T>* lse;  // [B, H, Nq], contiguous
  T* map;               // contiguous [B, Nq, Nk]
};

template <typename T>
struct MapBackwardParams {
  Inputs<T> in;
  const acc_t<T>* lse;  // [B, H, Nq], contiguous
  Scores<T> grad_map;   // [B, Nq, Nk]: head_stride 0
  Rows<T> grad_q, grad_k;
  T* grad_bias;         // contiguous [B, H, Nq, Nk], or nullptr
  acc_t<T>* row_dot;    // [B, H, Nq] scratch: rowsum(P * grad_map) / H
};

template <typename T>
cudaError_t forward(const ForwardParams<T>& p);
template <typename T>
cudaError_t backward(const BackwardParams<T>& p);
template <typename T>
cudaError_t map(const MapParams<T>& p);
template <typename T>
cudaError_t map_backward(const MapBackwardParams<T>& p);

}  // namespace pk::cuda::attn
