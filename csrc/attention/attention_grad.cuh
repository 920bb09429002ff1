// The two gradient passes shared by attention_backward and attention_map_backward. Both differentiate
// P = softmax(S) against some dL/dP: the attention backward's dP = dO V^T, or the map backward's
// dP = G / H. With delta = rowsum(P * dP) precomputed per query row, dS = P * (dP - delta), and
//   dq pass   (CTA per query block, per b * h):   dQ = scale * dS K, and dbias = dS;
//   dk/dv pass (CTA per key block, per b * kv head, looping the group's query heads and query blocks):
//              dK = scale * dS^T Q and (attention only) dV = P^T dO.
// Each output element is written by one CTA after a fixed-order loop: no atomics, deterministic results.
// P is recomputed from the forward's lse; staged P and dS are rounded to T before their products, as in
// FlashAttention-2.
#pragma once
#include "attention/attention_tile.cuh"

namespace pk::cuda::attn {

enum class GradMode { kAttention, kMap };

template <typename T>
struct GradArgs {
  Inputs<T> in;
  const acc_t<T>* lse;
  acc_t<T>* delta;          // [B, H, Nq]
  Rows<const T> grad_out;   // attention: dL/d out
  Scores<T> grad_map;       // map: dL/d map, head_stride 0
  acc_t<T> map_scale;       // map: 1 / H
  Rows<T> grad_q, grad_k, grad_v;  // grad_v: attention only
  T* grad_bias;             // contiguous [B, H, Nq, Nk], or nullptr
};

// dP of query i and key j in map mode, read only where P is non-zero.
template <typename T, typename A>
__device__ __forceinline__ A map_grad(const GradArgs<T>& p, A prob, index_t b, index_t i, index_t j) {
  return prob != A(0) ? to_acc(p.grad_map.at(b, 0, i, j)) * p.map_scale : A(0);
}

// Rows: Q (and dO). Columns: K (and V). Staging: dS.
template <GradMode kMode, typename T, int kDim>
using DqPlan = Plan<T, kDim, kMode == GradMode::kAttention ? 2 : 1, kMode == GradMode::kAttention ? 2 : 1, true,
                    false>;

template <GradMode kMode, typename T, int kDim>
__global__ void __launch_bounds__(DqPlan<kMode, T, kDim>::kThreads) dq_kernel(const GradArgs<T> p) {
  constexpr bool kAttention = kMode == GradMode::kAttention;
  using A = acc_t<T>;
  using P = DqPlan<kMode, T, kDim>;
  unsigned char* const smem = dynamic_shared_memory();
  const Inputs<T>& in = p.in;
  const Lane lane;
  T* const q_tile = P::row_tile(smem, 0);
  T* const k_tile = P::col_tile(smem, 0);
  T* const stage = P::stage(smem, lane.warp);

  const index_t blocks = ceil_div(in.nq, P::kRows);
  const index_t bh = blockIdx.x / blocks, q0 = (blocks - 1 - blockIdx.x % blocks) * P::kRows;
  const index_t b = bh / in.heads, h = bh % in.heads, hk = h / (in.heads / in.kv_heads);
  const index_t row0 = q0 + lane.warp * 16;
  const A scale2 = in.scale * A(kLog2e);
  const int d16 = round16(in.d), dv16 = round16(in.dv);

  load_tile<P::kRows, kDim, P::kThreads>(q_tile, P::kLd, in.q.at(b, h, q0), in.q.row_stride, in.nq - q0, in.d);
  if constexpr (kAttention)
    load_tile<P::kRows, kDim, P::kThreads>(P::row_tile(smem, 1), P::kLd, p.grad_out.at(b, h, q0),
                                           p.grad_out.row_stride, in.nq - q0, in.dv);
  index_t query[2];
  A lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    query[r] = row0 + lane.g + 8 * r;
    const bool valid = query[r] < in.nq;
    lse2[r] = valid ? p.lse[bh * in.nq + query[r]] * A(kLog2e) : A(-INFINITY);
    delta[r] = valid ? p.delta[bh * in.nq + query[r]] : A(0);
  }

  Frag<A, kDim> dq{};
  const index_t key_end = in.causal ? imin(in.nk, q0 + P::kRows) : in.nk;
  for (index_t k0 = 0; k0 < key_end; k0 += P::kCols) {
    __syncthreads();  // every warp is done with the previous K/V tiles
    load_tile<P::kCols, kDim, P::kThreads>(k_tile, P::kLd, in.k.at(b, hk, k0), in.k.row_stride, in.nk - k0, in.d);
    if constexpr (kAttention)
      load_tile<P::kCols, kDim, P::kThreads>(P::col_tile(smem, 1), P::kLd, in.v.at(b, hk, k0), in.v.row_stride,
                                             in.nk - k0, in.dv);
    __syncthreads();

    Frag<A, P::kCols> ds{}, dp{};
    gemm_nt<P::kCols, kDim>(ds, q_tile + lane.warp * 16 * P::kLd, P::kLd, k_tile, P::kLd, d16, lane);
    if constexpr (kAttention)
      gemm_nt<P::kCols, kDim>(dp, P::row_tile(smem, 1) + lane.warp * 16 * P::kLd, P::kLd, P::col_tile(smem, 1),
                              P::kLd, dv16, lane);
#pragma unroll
    for (int j = 0; j < P::kCols / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const index_t i = query[e >> 1], key = k0 + lane.col(j, e);
        const A prob = prob2(score2(in, ds.x[j][e], scale2, b, h, i, key), lse2[e >> 1]);
        if constexpr (!kAttention) dp.x[j][e] = map_grad(p, prob, b, i, key);
        ds.x[j][e] = prob * (dp.x[j][e] - delta[e >> 1]);
      }
    if (p.grad_bias) {
      const A one[2] = {1, 1};
      store_frag(ds, p.grad_bias + (bh * in.nq + row0) * in.nk + k0, in.nk, in.nq - row0, in.nk - k0, one, lane);
    }
    stage_frag(ds, stage, P::kLdStage, lane);
    __syncwarp();
    gemm_nn<kDim, P::kCols>(dq, stage, P::kLdStage, k_tile, P::kLd, d16, lane);
  }
  // Keys past a causal diagonal were never visited; their bias gradient is 0.
  if (p.grad_bias && key_end < in.nk) {
    const index_t width = in.nk - key_end, rows = imin<index_t>(P::kRows, in.nq - q0);
    T* const dst = p.grad_bias + (bh * in.nq + q0) * in.nk + key_end;
    for (index_t idx = threadIdx.x; idx < rows * width; idx += P::kThreads) dst[idx / width * in.nk + idx % width] = T{};
  }
  const A scale[2] = {in.scale, in.scale};
  store_frag(dq, p.grad_q.at(b, h, row0), p.grad_q.row_stride, in.nq - row0, in.d, scale, lane);
}

// Rows: K (and V). Columns: Q (and dO). Staging: P then dS. Column stats: lse and delta of the queries.
template <GradMode kMode, typename T, int kDim>
using DkvPlan = Plan<T, kDim, kMode == GradMode::kAttention ? 2 : 1, kMode == GradMode::kAttention ? 2 : 1, true,
                     true>;

template <GradMode kMode, typename T, int kDim>
__global__ void __launch_bounds__(DkvPlan<kMode, T, kDim>::kThreads) dkv_kernel(const GradArgs<T> p) {
  constexpr bool kAttention = kMode == GradMode::kAttention;
  using A = acc_t<T>;
  using P = DkvPlan<kMode, T, kDim>;
  unsigned char* const smem = dynamic_shared_memory();
  const Inputs<T>& in = p.in;
  const Lane lane;
  T* const k_tile = P::row_tile(smem, 0);
  T* const q_tile = P::col_tile(smem, 0);
  T* const stage = P::stage(smem, lane.warp);
  A* const lse2 = P::col_stats(smem, 0);
  A* const delta = P::col_stats(smem, 1);

  const index_t blocks = ceil_div(in.nk, P::kRows);
  const index_t bhk = blockIdx.x / blocks, k0 = blockIdx.x % blocks * P::kRows;
  const index_t b = bhk / in.kv_heads, hk = bhk % in.kv_heads, group = in.heads / in.kv_heads;
  const index_t row0 = k0 + lane.warp * 16;
  const index_t key[2] = {row0 + lane.g, row0 + lane.g + 8};
  const A scale2 = in.scale * A(kLog2e);
  const int d16 = round16(in.d), dv16 = round16(in.dv);

  load_tile<P::kRows, kDim, P::kThreads>(k_tile, P::kLd, in.k.at(b, hk, k0), in.k.row_stride, in.nk - k0, in.d);
  if constexpr (kAttention)
    load_tile<P::kRows, kDim, P::kThreads>(P::row_tile(smem, 1), P::kLd, in.v.at(b, hk, k0), in.v.row_stride,
                                           in.nk - k0, in.dv);

  Frag<A, kDim> dk{}, dv{};
  // Under a causal mask, queries before this CTA's first key see none of its keys.
  const index_t q_begin = in.causal ? k0 / P::kCols * P::kCols : 0;
  for (index_t h = hk * group; h < (hk + 1) * group; ++h) {
    const index_t bh = b * in.heads + h;
    for (index_t q0 = q_begin; q0 < in.nq; q0 += P::kCols) {
      __syncthreads();  // every warp is done with the previous Q/dO tiles and column stats
      load_tile<P::kCols, kDim, P::kThreads>(q_tile, P::kLd, in.q.at(b, h, q0), in.q.row_stride, in.nq - q0, in.d);
      if constexpr (kAttention)
        load_tile<P::kCols, kDim, P::kThreads>(P::col_tile(smem, 1), P::kLd, p.grad_out.at(b, h, q0),
                                               p.grad_out.row_stride, in.nq - q0, in.dv);
      for (int c = threadIdx.x; c < P::kCols; c += P::kThreads) {
        const bool valid = q0 + c < in.nq;
        lse2[c] = valid ? p.lse[bh * in.nq + q0 + c] * A(kLog2e) : A(-INFINITY);
        delta[c] = valid ? p.delta[bh * in.nq + q0 + c] : A(0);
      }
      __syncthreads();

      // Transposed probabilities: rows are this warp's keys, columns the tile's queries.
      Frag<A, P::kCols> pt{}, dpt{};
      gemm_nt<P::kCols, kDim>(pt, k_tile + lane.warp * 16 * P::kLd, P::kLd, q_tile, P::kLd, d16, lane);
#pragma unroll
      for (int j = 0; j < P::kCols / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = lane.col(j, e);
          pt.x[j][e] = prob2(score2(in, pt.x[j][e], scale2, b, h, q0 + c, key[e >> 1]), lse2[c]);
        }
      if constexpr (kAttention) {
        stage_frag(pt, stage, P::kLdStage, lane);
        __syncwarp();
        gemm_nn<kDim, P::kCols>(dv, stage, P::kLdStage, P::col_tile(smem, 1), P::kLd, dv16, lane);
        __syncwarp();  // the staging rows are overwritten with dS below
        gemm_nt<P::kCols, kDim>(dpt, P::row_tile(smem, 1) + lane.warp * 16 * P::kLd, P::kLd, P::col_tile(smem, 1),
                                P::kLd, dv16, lane);
      }
#pragma unroll
      for (int j = 0; j < P::kCols / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = lane.col(j, e);
          if constexpr (!kAttention) dpt.x[j][e] = map_grad(p, pt.x[j][e], b, q0 + c, key[e >> 1]);
          pt.x[j][e] *= dpt.x[j][e] - delta[c];
        }
      stage_frag(pt, stage, P::kLdStage, lane);
      __syncwarp();
      gemm_nn<kDim, P::kCols>(dk, stage, P::kLdStage, q_tile, P::kLd, d16, lane);
    }
  }
  const A scale[2] = {in.scale, in.scale}, one[2] = {1, 1};
  store_frag(dk, p.grad_k.at(b, hk, row0), p.grad_k.row_stride, in.nk - row0, in.d, scale, lane);
  if constexpr (kAttention)
    store_frag(dv, p.grad_v.at(b, hk, row0), p.grad_v.row_stride, in.nk - row0, in.dv, one, lane);
}

// Enqueues both passes; p.delta must already hold the row sums. Head dims bucket by the widest operand
// the passes hold (the map backward never reads v).
template <GradMode kMode, typename T>
cudaError_t launch_grad(const GradArgs<T>& p) {
  const Inputs<T>& in = p.in;
  const int64_t dim = kMode == GradMode::kAttention && in.dv > in.d ? in.dv : in.d;
  return dispatch_head_dim(dim, [&](auto tag) {
    constexpr int kDim = decltype(tag)::value;
    using Dq = DqPlan<kMode, T, kDim>;
    using Dkv = DkvPlan<kMode, T, kDim>;
    const cudaError_t err = launch(dq_kernel<kMode, T, kDim>, ceil_div(in.nq, Dq::kRows) * in.batch * in.heads,
                                   Dq::kThreads, Dq::kBytes, in.stream, p);
    if (err != cudaSuccess) return err;
    return launch(dkv_kernel<kMode, T, kDim>, ceil_div(in.nk, Dkv::kRows) * in.batch * in.kv_heads, Dkv::kThreads,
                  Dkv::kBytes, in.stream, p);
  });
}

}  // namespace pk::cuda::attn
