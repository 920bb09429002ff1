// Building blocks of the dense attention kernels.
//
// Every kernel is one FlashAttention-2 loop: a CTA owns a block of "rows" (queries; keys in the dk/dv
// pass), 16 per warp, and streams blocks of "columns" through shared memory. A warp keeps its 16 x N
// products in registers in the C layout of mma.m16n8k16 (Frag). fp16/bf16 multiply on tensor cores
// (mma.sync, fp32 accumulate); fp32/fp64 run a SIMT product that fills the same layout, so masking,
// softmax and stores are written once for both.
//
// Operand tiles sit in shared memory as [rows, kDim], kDim being the head dim rounded up to a compiled
// bucket. Rows are 16 bytes longer than kDim, which makes the row stride an odd multiple of 16 bytes: the
// eight rows a fragment load touches then fall in distinct banks. Tiles are zero-filled past the tensor,
// so padded rows and head dims contribute exact zeros (never stale NaNs) to every product.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "attention/attention_cuda.h"
#include "common/cuda_utils.cuh"
#include "common/ptx.cuh"

namespace pk::cuda::attn {

// Scores live in log2 units so that the softmax is one exp2 per element.
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

template <typename T>
constexpr bool kTensorCores = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

// ------------------------------------------------------------------------------------ block shape

struct TileShape {
  int warps, cols;
};

// Per CTA: within the 99 KB per block of sm_86/89. Most plans stay well below it (see pick_shape), so
// sm_80/90 usually run two or three CTAs per SM.
constexpr size_t kSmemBudget = 96 * 1024;

// Shared memory of row_tiles [16 * warps, dim] tiles, col_tiles [cols, dim] tiles, optionally a
// [16 * warps, cols] staging tile and two per-column vectors in the accumulation type.
template <typename T>
constexpr size_t plan_bytes(int dim, int row_tiles, int col_tiles, bool stage, bool col_stats, TileShape s) {
  const size_t pad = 16 / sizeof(T), rows = 16 * s.warps, cols = s.cols;
  const size_t elems = (row_tiles * rows + col_tiles * cols) * (dim + pad) + (stage ? rows * (cols + pad) : 0);
  return elems * sizeof(T) + (col_stats ? 2 * cols * sizeof(acc_t<T>) : 0);
}

// The largest shape within budget: more rows per CTA reuse each streamed column tile more; wider column
// tiles mean fewer barriers. Large fp64 heads exceed the budget even at the smallest shape and then need
// a GPU with more shared memory (launch() checks).
template <typename T>
constexpr TileShape pick_shape(int dim, int row_tiles, int col_tiles, bool stage, bool col_stats) {
  constexpr TileShape kShapes[] = {{4, 64}, {4, 32}, {4, 16}, {2, 32}, {2, 16}, {1, 16}};
  for (const TileShape& s : kShapes)
    if (plan_bytes<T>(dim, row_tiles, col_tiles, stage, col_stats, s) <= kSmemBudget) return s;
  return kShapes[5];
}

// A kernel's block shape and shared memory layout: row tiles, column tiles, per-warp staging, column stats.
template <typename T, int kDim, int kRowTiles, int kColTiles, bool kStage, bool kColStats>
struct Plan {
  static constexpr TileShape kShape = pick_shape<T>(kDim, kRowTiles, kColTiles, kStage, kColStats);
  static constexpr int kWarps = kShape.warps, kCols = kShape.cols;
  static constexpr int kRows = 16 * kWarps, kThreads = 32 * kWarps;
  static constexpr int kHeadDim = kDim, kPad = static_cast<int>(16 / sizeof(T));
  static constexpr int kLd = kDim + kPad, kLdStage = kCols + kPad;
  static constexpr size_t kBytes = plan_bytes<T>(kDim, kRowTiles, kColTiles, kStage, kColStats, kShape);

  __device__ static T* row_tile(unsigned char* smem, int i) { return reinterpret_cast<T*>(smem) + i * kRows * kLd; }
  __device__ static T* col_tile(unsigned char* smem, int i) {
    return row_tile(smem, kRowTiles) + i * kCols * kLd;
  }
  // Warp w's [16, kCols] rows of the staging tile, which feed probabilities back as the A operand.
  __device__ static T* stage(unsigned char* smem, int w) { return col_tile(smem, kColTiles) + w * 16 * kLdStage; }
  __device__ static acc_t<T>* col_stats(unsigned char* smem, int i) {
    return reinterpret_cast<acc_t<T>*>(col_tile(smem, kColTiles) + (kStage ? kRows * kLdStage : 0)) + i * kCols;
  }
};

// ------------------------------------------------------------------------------------ warp fragments

// This thread's place in the m16n8k16 layouts: warp, row group g = lane / 4, thread in group t = lane % 4.
struct Lane {
  int warp, g, t;

  __device__ Lane() : warp(threadIdx.x / kWarpSize), g(threadIdx.x % kWarpSize / 4), t(threadIdx.x % 4) {}
  __device__ int row(int e) const { return g + 8 * (e >> 1); }
  __device__ int col(int j, int e) const { return 8 * j + 2 * t + (e & 1); }
};

// A warp's 16 x kN accumulator: x[j][e] is row lane.row(e), column lane.col(j, e). Rows g and g + 8 are
// spread over the four threads of a group, so a row reduction is two shuffles.
template <typename A, int kN>
struct Frag {
  static_assert(kN % 16 == 0, "fragments cover whole 16-column steps");
  A x[kN / 8][4];
};

__device__ __forceinline__ uint32_t ld32(const void* p) { return *static_cast<const uint32_t*>(p); }

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>)
    ptx::mma_m16n8k16_f16(c, a, b0, b1);
  else
    ptx::mma_m16n8k16_bf16(c, a, b0, b1);
}

// The A fragment of rows [0, 16) x columns [k, k + 16) of a row-major b16 tile.
template <typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int ld, int k, const Lane& lane) {
  const T* lo = tile + lane.g * ld + k + 2 * lane.t;
  const T* hi = lo + 8 * ld;
  a[0] = ld32(lo);
  a[1] = ld32(hi);
  a[2] = ld32(lo + 8);
  a[3] = ld32(hi + 8);
}

// acc[16 x kN] += A[16 x k] * B[kN x k]^T, both row-major in shared memory (k contiguous), over the first
// k_lim <= kK columns (k_lim a multiple of 16).
template <int kN, int kK, typename T, typename A>
__device__ __forceinline__ void gemm_nt(Frag<A, kN>& acc, const T* a, int lda, const T* b, int ldb, int k_lim,
                                        const Lane& lane) {
  if constexpr (kTensorCores<T>) {
#pragma unroll
    for (int k = 0; k < kK; k += 16) {
      if (k >= k_lim) break;
      uint32_t af[4];
      load_a(af, a, lda, k, lane);
#pragma unroll
      for (int j = 0; j < kN / 8; ++j) {
        const T* bj = b + (8 * j + lane.g) * ldb + k + 2 * lane.t;
        mma_16816<T>(acc.x[j], af, ld32(bj), ld32(bj + 8));
      }
    }
  } else {
#pragma unroll 4
    for (int k = 0; k < k_lim; ++k) {
      const A a_lo = a[lane.g * lda + k], a_hi = a[(lane.g + 8) * lda + k];
#pragma unroll
      for (int j = 0; j < kN / 8; ++j) {
        const T* bj = b + (8 * j + 2 * lane.t) * ldb + k;
        const A b0 = bj[0], b1 = bj[ldb];
        acc.x[j][0] += a_lo * b0;
        acc.x[j][1] += a_lo * b1;
        acc.x[j][2] += a_hi * b0;
        acc.x[j][3] += a_hi * b1;
      }
    }
  }
}

// acc[16 x kN] += A[16 x kK] * B[kK x kN], both row-major in shared memory, over the first n_lim <= kN
// output columns (n_lim a multiple of 16).
template <int kN, int kK, typename T, typename A>
__device__ __forceinline__ void gemm_nn(Frag<A, kN>& acc, const T* a, int lda, const T* b, int ldb, int n_lim,
                                        const Lane& lane) {
  if constexpr (kTensorCores<T>) {
    const int lane_id = threadIdx.x % kWarpSize;
#pragma unroll
    for (int k = 0; k < kK; k += 16) {
      uint32_t af[4];
      load_a(af, a, lda, k, lane);
#pragma unroll
      for (int n = 0; n < kN; n += 16) {
        if (n >= n_lim) break;
        // Matrices 0..3 are B[k..k+8, n..n+8], B[k+8.., n..], B[k.., n+8..], B[k+8.., n+8..]: the b0/b1
        // registers of n-tiles n / 8 and n / 8 + 1.
        uint32_t bf[4];
        ptx::ldmatrix_x4_trans(bf, b + (k + (lane_id & 15)) * ldb + n + (lane_id >> 4) * 8);
        mma_16816<T>(acc.x[n / 8], af, bf[0], bf[1]);
        mma_16816<T>(acc.x[n / 8 + 1], af, bf[2], bf[3]);
      }
    }
  } else {
#pragma unroll 4
    for (int k = 0; k < kK; ++k) {
      const A a_lo = a[lane.g * lda + k], a_hi = a[(lane.g + 8) * lda + k];
#pragma unroll
      for (int j = 0; j < kN / 8; ++j) {
        if (8 * j >= n_lim) break;
        const Vec<T, 2> bj = load_vec<2>(b + k * ldb + 8 * j + 2 * lane.t);
        acc.x[j][0] += a_lo * bj.v[0];
        acc.x[j][1] += a_lo * bj.v[1];
        acc.x[j][2] += a_hi * bj.v[0];
        acc.x[j][3] += a_hi * bj.v[1];
      }
    }
  }
}

template <typename T, typename A>
__device__ __forceinline__ void store_pair(T* p, A lo, A hi) {
  if constexpr (std::is_same_v<T, __half>)
    *reinterpret_cast<__half2*>(p) = __floats2half2_rn(lo, hi);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>)
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(lo, hi);
  else
    store_vec<2>(p, Vec<T, 2>{{lo, hi}});
}

// Writes a fragment into the warp's staging rows, rounded to T: the A operand of the next product.
template <typename T, typename A, int kN>
__device__ __forceinline__ void stage_frag(const Frag<A, kN>& f, T* stage, int ld, const Lane& lane) {
#pragma unroll
  for (int j = 0; j < kN / 8; ++j) {
    store_pair(stage + lane.g * ld + 8 * j + 2 * lane.t, f.x[j][0], f.x[j][1]);
    store_pair(stage + (lane.g + 8) * ld + 8 * j + 2 * lane.t, f.x[j][2], f.x[j][3]);
  }
}

// dst[r, c] = f[r, c] * row_scale[r / 8] for the fragment rows r < rows and columns c < cols.
template <typename T, typename A, int kN>
__device__ __forceinline__ void store_frag(const Frag<A, kN>& f, T* dst, index_t row_stride, index_t rows,
                                           index_t cols, const A (&row_scale)[2], const Lane& lane) {
#pragma unroll
  for (int j = 0; j < kN / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = lane.row(e), c = lane.col(j, e);
      if (r < rows && c < cols) dst[r * row_stride + c] = from_acc<T>(f.x[j][e] * row_scale[e >> 1]);
    }
}

// ------------------------------------------------------------------------------------ tile loads

// Copies rows [0, rows) x columns [0, cols) of a row-major block (row stride `stride`) into a [kRows,
// kDim] shared tile of row stride ld, zero-filling the rest. Whole 16-byte chunks when the block allows.
template <int kRows, int kDim, int kThreads, typename T>
__device__ __forceinline__ void load_tile(T* dst, int ld, const T* src, index_t stride, index_t rows, index_t cols) {
  constexpr int kVec = static_cast<int>(16 / sizeof(T));
  if (reinterpret_cast<uintptr_t>(src) % 16 == 0 && stride % kVec == 0 && cols % kVec == 0) {
    constexpr int kChunks = kDim / kVec;
    for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kThreads) {
      const int r = idx / kChunks, c = idx % kChunks * kVec;
      Vec<T, kVec> v{};
      if (r < rows && c < cols) v = load_vec<kVec>(src + r * stride + c);
      store_vec<kVec>(dst + r * ld + c, v);
    }
  } else {
    for (int idx = threadIdx.x; idx < kRows * kDim; idx += kThreads) {
      const int r = idx / kDim, c = idx % kDim;
      dst[r * ld + c] = r < rows && c < cols ? src[r * stride + c] : T{};
    }
  }
}

// ------------------------------------------------------------------------------------ softmax math

__device__ __forceinline__ float exp2_acc(float x) { return exp2f(x); }
__device__ __forceinline__ double exp2_acc(double x) { return exp2(x); }
__device__ __forceinline__ float log2_acc(float x) { return log2f(x); }
__device__ __forceinline__ double log2_acc(double x) { return log2(x); }

// Reductions over the four threads that share a fragment row.
template <typename A>
__device__ __forceinline__ A quad_max(A v) {
  v = fmax(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmax(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
template <typename A>
__device__ __forceinline__ A quad_sum(A v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// (dot * scale + bias) * log2 e for query i and key j of head h, or -inf where the key is hidden: past
// the sequence ends or above the causal diagonal. scale2 = scale * log2 e.
template <typename T, typename A>
__device__ __forceinline__ A score2(const Inputs<T>& in, A dot, A scale2, index_t b, index_t h, index_t i,
                                    index_t j) {
  if (i >= in.nq || j >= in.nk || (in.causal && j > i)) return A(-INFINITY);
  A s = dot * scale2;
  if (in.bias.data) s += to_acc(in.bias.at(b, h, i, j)) * A(kLog2e);
  return s;
}

// exp(score - lse) in log2 units; a row that saw no key (lse = -inf) has probability 0 everywhere.
template <typename A>
__device__ __forceinline__ A prob2(A score2, A lse2) {
  return lse2 == A(-INFINITY) ? A(0) : exp2_acc(score2 - lse2);
}

// ------------------------------------------------------------------------------------ launching

template <typename X>
PK_HOST_DEVICE X imin(X a, X b) {
  return a < b ? a : b;
}
PK_HOST_DEVICE index_t ceil_div(index_t a, index_t b) { return (a + b - 1) / b; }
PK_HOST_DEVICE int round16(index_t n) { return static_cast<int>((n + 15) / 16 * 16); }

// Launches kernel<<<blocks, threads, smem>>>(args), first opting in to more than 48 KB of dynamic shared
// memory. A plan that, with the kernel's static __shared__ arrays (the window kernels' token slots), is larger
// than the device allows per block is reported as cudaErrorLaunchOutOfResources.
template <typename Args>
cudaError_t launch(void (*kernel)(Args), index_t blocks, int threads, size_t smem, cudaStream_t stream,
                   const Args& args) {
  if (blocks == 0) return cudaSuccess;
  if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  int device = 0, limit = 0;
  cudaFuncAttributes attributes{};
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attributes, kernel);
  if (err != cudaSuccess) return err;
  if (attributes.sharedSizeBytes + smem > static_cast<size_t>(limit)) return cudaErrorLaunchOutOfResources;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  PK_LAUNCH(static_cast<unsigned>(blocks), threads, smem, stream, kernel)(args);
  return cudaGetLastError();
}

// Runs f(std::integral_constant<int, kDim>{}) for the compiled head-dim bucket holding `dim`. Buckets are
// multiples of 32 (products step through them 16 at a time and stop at the real dim rounded up to 16), so
// the padding costs registers and shared memory, not multiplies.
template <typename F>
cudaError_t dispatch_head_dim(int64_t dim, F&& f) {
  using std::integral_constant;
  if (dim <= 32) return f(integral_constant<int, 32>{});
  if (dim <= 64) return f(integral_constant<int, 64>{});
  if (dim <= 96) return f(integral_constant<int, 96>{});
  if (dim <= 128) return f(integral_constant<int, 128>{});
  if (dim <= 192) return f(integral_constant<int, 192>{});
  if (dim <= kMaxHeadDim) return f(integral_constant<int, 256>{});
  return cudaErrorInvalidValue;
}

}  // namespace pk::cuda::attn

// Explicit instantiations of a host entry `cudaError_t FN<T>(const PARAMS<T>&)` for every float dtype.
#define PK_ATTN_INSTANTIATE(FN, PARAMS)                                   \
  template cudaError_t FN<float>(const PARAMS<float>&);                   \
  template cudaError_t FN<double>(const PARAMS<double>&);                 \
  template cudaError_t FN<__half>(const PARAMS<__half>&);                 \
  template cudaError_t FN<__nv_bfloat16>(const PARAMS<__nv_bfloat16>&)
