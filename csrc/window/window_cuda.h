// Host entry points of the CUDA engine of window_attention and neighborhood_attention_2d (and their
// backwards): params structs of raw device pointers, sizes and strides, so the kernels build under plain
// nvcc and only the *_cuda.cpp launchers see at::Tensor. Every entry is instantiated for T in {float,
// double, __half, __nv_bfloat16}, enqueues on the params' stream, never syncs, and returns the launch
// status (cudaErrorLaunchOutOfResources when a head dim needs more shared memory than the device has).
#pragma once
#include "attention/attention_cuda.h"
#include "window/neighborhood.h"
#include "window/window.h"

namespace pk::cuda::win {

using attn::acc_t;
using attn::Rows;

// What every window_attention kernel reads. Pad tokens (outside the H x W grid, inside the padded one)
// have k = pad_kv[0, h] and v = pad_kv[1, h], or zeros when pad_kv is null; their queries are never stored.
template <typename T>
struct WindowInputs {
  Rows<const T> q, k, v;
  const T* pad_kv;      // contiguous [2, heads, D], or nullptr
  const T* table;       // contiguous [(2 wh - 1)(2 ww - 1), heads], or nullptr
  const T* dense;       // [heads, n, n] through dense_stride, or nullptr
  int64_t dense_stride[3];
  window::Geometry geo;
  bool shift_mask;      // -100 between Swin regions, in the windows where the regions split
  int64_t batch, heads, tokens, d, dv;
  acc_t<T> scale;
  cudaStream_t stream;
};

template <typename T>
struct WindowForwardParams {
  WindowInputs<T> in;
  Rows<T> out;    // [B, heads, tokens, Dv]
  acc_t<T>* lse;  // contiguous [B, heads, tokens]
};

template <typename T>
struct WindowBackwardParams {
  WindowInputs<T> in;
  Rows<const T> out, grad_out;
  const acc_t<T>* lse;  // contiguous [B, heads, tokens]
  Rows<T> grad_q, grad_k, grad_v;
  acc_t<T>* delta;      // [B, heads, tokens] scratch: grad_out . out, written by the dq pass
  // Bias gradient (grad_bias null: none). The dq pass sums dS over the (b, window) pairs of each of
  // `groups` groups into partial [groups, heads, n, n] (zero-filled by the caller); the groups are then
  // summed in order into dense_grad [heads, n, n], and for a table folded into grad_bias.
  int64_t groups;
  acc_t<T>* partial;
  acc_t<T>* dense_grad;
  T* grad_bias;  // contiguous: like dense_bias [heads, n, n] or like bias_table [rows, heads]
};

template <typename T>
cudaError_t window_forward(const WindowForwardParams<T>& p);
template <typename T>
cudaError_t window_backward(const WindowBackwardParams<T>& p);

// neighborhood_attention_2d's inputs; tokens are row-major over y.length x x.length.
template <typename T>
struct NeighborhoodInputs {
  Rows<const T> q, k, v;
  const T* rpb;  // contiguous [heads, 2 kh - 1, 2 kw - 1], or nullptr
  neighborhood::Axis y, x;
  int64_t batch, heads, d, dv;
  acc_t<T> scale;
  cudaStream_t stream;
};

template <typename T>
struct NeighborhoodForwardParams {
  NeighborhoodInputs<T> in;
  Rows<T> out;    // [B, heads, tokens, Dv]
  acc_t<T>* lse;  // contiguous [B, heads, tokens]
};

template <typename T>
struct NeighborhoodBackwardParams {
  NeighborhoodInputs<T> in;
  Rows<const T> out, grad_out;
  const acc_t<T>* lse;  // contiguous [B, heads, tokens]
  Rows<T> grad_q, grad_k, grad_v;
  acc_t<T>* delta;      // [B, heads, tokens] scratch: grad_out . out, written by the query pass
  acc_t<T>* ds;         // [B, heads, tokens, kh * kw] scratch of dS per window slot, or nullptr
  T* grad_rpb;          // contiguous [heads, 2 kh - 1, 2 kw - 1], or nullptr
};

template <typename T>
cudaError_t neighborhood_forward(const NeighborhoodForwardParams<T>& p);
template <typename T>
cudaError_t neighborhood_backward(const NeighborhoodBackwardParams<T>& p);

}  // namespace pk::cuda::win
