// Host entry points of the graph CUDA engine: params structs of raw device pointers and sizes, so the
// kernels build under plain nvcc and only the launchers (*_cuda.cpp) see at::Tensor. Every function is
// instantiated for T in {float, double, __half, __nv_bfloat16}, enqueues on p.stream, and never syncs.
// Semantics (edge order, ties, NaN, empty and fully-masked rows) are those of the CPU engine, *_cpu.cpp.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "graph/reduce.h"

namespace pk::cuda {

// fp16/bf16/fp32 accumulate in float, fp64 in double; also the dtype of the attention lse and of the
// per-edge probabilities kept for its backward.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// A CSR graph on the device: rowptr[num_rows + 1], col[rowptr[num_rows]].
struct Csr {
  const int64_t* rowptr;
  const int64_t* col;
  int64_t num_rows;
};

// ------------------------------------------------------------------------------------------ coo_to_csr

// The first edge with an out-of-range index: position is -1 when every index is in range.
struct CooStatus {
  int64_t position, row, col;
};

template <typename I>  // int32_t or int64_t
struct CooToCsrParams {
  const I* row;
  const I* col;
  int64_t num_edges, num_rows, num_cols;
  int64_t* rowptr;   // [num_rows + 1]
  int64_t* col_out;  // [num_edges]
  int64_t* perm;     // [num_edges]
  CooStatus* status;  // device memory
  void* workspace;    // coo_to_csr_workspace_bytes() bytes
  cudaStream_t stream;
};

template <typename I>
size_t coo_to_csr_workspace_bytes(int64_t num_edges, int64_t num_rows);
// Counts edges per row into rowptr[1:] and writes the first invalid edge into *status.
template <typename I>
cudaError_t coo_to_csr_count(const CooToCsrParams<I>& p);
// Valid only after count found every index in range: scans rowptr and fills col_out/perm stably.
template <typename I>
cudaError_t coo_to_csr_fill(const CooToCsrParams<I>& p);

// ------------------------------------------------------------------------------------------------ spmm

using pk::Reduce;

template <typename T>
struct SpmmParams {
  Csr graph;
  const T* weight;  // [E, heads] or nullptr
  const T* x;       // [num_sources, heads, feats]
  T* out;           // [num_rows, heads, feats]
  int64_t* arg;     // [num_rows, heads, feats], max/min only: the winning CSR edge, -1 for none
  int64_t heads, feats;
  Reduce reduce;
  cudaStream_t stream;
};

template <typename T>
void spmm(const SpmmParams<T>& p);

template <typename T>
struct SpmmArgBackwardParams {
  Csr graph;          // target-major
  Csr transpose;      // source-major
  const int64_t* perm_t;  // transpose position -> CSR position
  const T* weight;    // [E, heads] or nullptr
  const int64_t* arg;
  const T* grad_out;  // [num_rows, heads, feats]
  const T* x;         // [num_sources, heads, feats]
  T* grad_x;
  T* grad_weight;     // [E, heads] or nullptr
  int64_t heads, feats;
  cudaStream_t stream;
};

template <typename T>
void spmm_arg_backward(const SpmmArgBackwardParams<T>& p);

// ----------------------------------------------------------------------------------------------- sddmm

template <typename T>
struct SddmmParams {
  Csr graph;
  const T* a;  // [num_rows, heads, feats]
  const T* b;  // [num_sources, heads, feats]
  T* out;      // [E, heads]
  int64_t heads, feats;
  cudaStream_t stream;
};

template <typename T>
void sddmm(const SddmmParams<T>& p);

// ---------------------------------------------------------------------------------------- edge softmax

template <typename T>
struct EdgeSoftmaxParams {
  const int64_t* rowptr;
  int64_t num_rows, num_edges, heads;
  const T* scores;  // [E, heads]
  T* out;
  cudaStream_t stream;
};

template <typename T>
void edge_softmax(const EdgeSoftmaxParams<T>& p);

template <typename T>
struct EdgeSoftmaxBackwardParams {
  const int64_t* rowptr;
  int64_t num_rows, num_edges, heads;
  const T* probs;  // [E, heads]
  const T* grad;
  T* out;
  cudaStream_t stream;
};

template <typename T>
void edge_softmax_backward(const EdgeSoftmaxBackwardParams<T>& p);

// ------------------------------------------------------------------------------------- graph attention

template <typename T>
struct GraphAttentionParams {
  Csr graph;
  const T* q;     // [num_rows, heads, dqk]
  const T* k;     // [num_sources, heads, dqk]
  const T* v;     // [num_sources, heads, dv]
  const T* bias;  // [E, heads] or nullptr
  T* out;         // [num_rows, heads, dv]
  acc_t<T>* lse;  // [num_rows, heads]
  int64_t heads, dqk, dv;
  acc_t<T> scale;
  cudaStream_t stream;
};

template <typename T>
void graph_attention(const GraphAttentionParams<T>& p);

template <typename T>
struct GraphAttentionBackwardParams {
  Csr graph;
  Csr transpose;
  const int64_t* perm_t;
  const T* q;
  const T* k;
  const T* v;
  const T* bias;  // or nullptr
  const T* out;
  const acc_t<T>* lse;
  const T* grad_out;
  T* grad_q;
  T* grad_k;
  T* grad_v;
  T* grad_bias;      // [E, heads] or nullptr
  acc_t<T>* probs;   // [E, heads] scratch, written by the target pass, read by the source pass
  acc_t<T>* dscore;  // [E, heads] scratch, likewise
  int64_t heads, dqk, dv;
  acc_t<T> scale;
  cudaStream_t stream;
};

template <typename T>
void graph_attention_backward(const GraphAttentionBackwardParams<T>& p);

}  // namespace pk::cuda
