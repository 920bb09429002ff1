// The head-averaged attention map and its gradient.
//
// map: one CTA per (query block, key block, b) loops over the H heads, recomputing each head's
// probabilities exp(S - lse) for its tile and summing them in registers, so the [B, H, Nq, Nk]
// probabilities are never stored. Causal tiles above the diagonal are written as zeros without a product.
//
// map_backward: with G = dL/d map, each head's P_h receives dL/dP_h = G / H, so
// dS_h = P_h * (G / H - rowsum(P_h * G / H)). A pre-pass computes those row sums (it needs every key of
// the row before any dS is known); the dq and dk passes of attention_grad.cuh then run in map mode.
#include "attention/attention_grad.cuh"

namespace pk::cuda::attn {
namespace {

// Q rows; K columns.
template <typename T, int kDim>
using MapPlan = Plan<T, kDim, 1, 1, false, false>;

// Loads this CTA's Q tile of head h and returns, per fragment row, the query index and its lse in log2 units.
template <typename P, typename T, typename A>
__device__ __forceinline__ void load_query_block(const Inputs<T>& in, const A* lse, unsigned char* smem, index_t b,
                                                 index_t h, index_t q0, const Lane& lane, index_t (&query)[2],
                                                 A (&lse2)[2]) {
  load_tile<P::kRows, P::kHeadDim, P::kThreads>(P::row_tile(smem, 0), P::kLd, in.q.at(b, h, q0),
                                                     in.q.row_stride, in.nq - q0, in.d);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    query[r] = q0 + lane.warp * 16 + lane.g + 8 * r;
    lse2[r] = query[r] < in.nq ? lse[(b * in.heads + h) * in.nq + query[r]] * A(kLog2e) : A(-INFINITY);
  }
}

template <typename T, int kDim>
__global__ void __launch_bounds__(MapPlan<T, kDim>::kThreads) map_kernel(const MapParams<T> p) {
  using A = acc_t<T>;
  using P = MapPlan<T, kDim>;
  unsigned char* const smem = dynamic_shared_memory();
  const Inputs<T>& in = p.in;
  const Lane lane;
  T* const k_tile = P::col_tile(smem, 0);

  const index_t q_blocks = ceil_div(in.nq, P::kRows), k_blocks = ceil_div(in.nk, P::kCols);
  const index_t b = blockIdx.x / (q_blocks * k_blocks), tile = blockIdx.x % (q_blocks * k_blocks);
  const index_t q0 = tile / k_blocks * P::kRows, k0 = tile % k_blocks * P::kCols;
  // heads == kv_heads == 0 is a valid (empty) problem: its map is all zeros.
  const index_t row0 = q0 + lane.warp * 16, group = in.kv_heads > 0 ? in.heads / in.kv_heads : 1;
  const A scale2 = in.scale * A(kLog2e);
  const int d16 = round16(in.d);

  Frag<A, P::kCols> sum{};
  if (!in.causal || k0 < q0 + P::kRows) {
    for (index_t h = 0; h < in.heads; ++h) {
      const index_t hk = h / group;
      __syncthreads();  // every warp is done with the previous head's tiles
      index_t query[2];
      A lse2[2];
      load_query_block<P>(in, p.lse, smem, b, h, q0, lane, query, lse2);
      if (h % group == 0)
        load_tile<P::kCols, kDim, P::kThreads>(k_tile, P::kLd, in.k.at(b, hk, k0), in.k.row_stride, in.nk - k0,
                                               in.d);
      __syncthreads();

      Frag<A, P::kCols> s{};
      gemm_nt<P::kCols, kDim>(s, P::row_tile(smem, 0) + lane.warp * 16 * P::kLd, P::kLd, k_tile, P::kLd, d16, lane);
#pragma unroll
      for (int j = 0; j < P::kCols / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          sum.x[j][e] += prob2(score2(in, s.x[j][e], scale2, b, h, query[e >> 1], k0 + lane.col(j, e)), lse2[e >> 1]);
    }
  }
  const A inv_heads = A(1) / A(in.heads > 0 ? in.heads : 1), row_scale[2] = {inv_heads, inv_heads};
  store_frag(sum, p.map + (b * in.nq + row0) * in.nk + k0, in.nk, in.nq - row0, in.nk - k0, row_scale, lane);
}

// row_dot[b, h, i] = sum_j P_h[i, j] * G[b, i, j] / H; one CTA per (query block, b * h) over the keys.
template <typename T, int kDim>
__global__ void __launch_bounds__(MapPlan<T, kDim>::kThreads) row_dot_kernel(const MapBackwardParams<T> p) {
  using A = acc_t<T>;
  using P = MapPlan<T, kDim>;
  unsigned char* const smem = dynamic_shared_memory();
  const Inputs<T>& in = p.in;
  const Lane lane;
  T* const k_tile = P::col_tile(smem, 0);

  const index_t blocks = ceil_div(in.nq, P::kRows);
  const index_t bh = blockIdx.x / blocks, q0 = (blocks - 1 - blockIdx.x % blocks) * P::kRows;
  const index_t b = bh / in.heads, h = bh % in.heads, hk = h / (in.heads / in.kv_heads);
  const A scale2 = in.scale * A(kLog2e);
  const int d16 = round16(in.d);
  index_t query[2];
  A lse2[2];
  load_query_block<P>(in, p.lse, smem, b, h, q0, lane, query, lse2);

  A dot[2] = {0, 0};
  const index_t key_end = in.causal ? imin(in.nk, q0 + P::kRows) : in.nk;
  for (index_t k0 = 0; k0 < key_end; k0 += P::kCols) {
    __syncthreads();  // every warp is done with the previous K tile
    load_tile<P::kCols, kDim, P::kThreads>(k_tile, P::kLd, in.k.at(b, hk, k0), in.k.row_stride, in.nk - k0, in.d);
    __syncthreads();
    Frag<A, P::kCols> s{};
    gemm_nt<P::kCols, kDim>(s, P::row_tile(smem, 0) + lane.warp * 16 * P::kLd, P::kLd, k_tile, P::kLd, d16, lane);
#pragma unroll
    for (int j = 0; j < P::kCols / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const index_t i = query[e >> 1], key = k0 + lane.col(j, e);
        const A prob = prob2(score2(in, s.x[j][e], scale2, b, h, i, key), lse2[e >> 1]);
        if (prob != A(0)) dot[e >> 1] += prob * to_acc(p.grad_map.at(b, 0, i, key));
      }
  }
  const A inv_heads = A(1) / A(in.heads);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    dot[r] = quad_sum(dot[r]);
    if (lane.t == 0 && query[r] < in.nq) p.row_dot[bh * in.nq + query[r]] = dot[r] * inv_heads;
  }
}

}  // namespace

template <typename T>
cudaError_t map(const MapParams<T>& p) {
  const Inputs<T>& in = p.in;
  return dispatch_head_dim(in.d, [&](auto dim) {
    constexpr int kDim = decltype(dim)::value;
    using P = MapPlan<T, kDim>;
    return launch(map_kernel<T, kDim>, ceil_div(in.nq, P::kRows) * ceil_div(in.nk, P::kCols) * in.batch, P::kThreads,
                  P::kBytes, in.stream, p);
  });
}

template <typename T>
cudaError_t map_backward(const MapBackwardParams<T>& p) {
  const Inputs<T>& in = p.in;
  const cudaError_t err = dispatch_head_dim(in.d, [&](auto dim) {
    constexpr int kDim = decltype(dim)::value;
    using P = MapPlan<T, kDim>;
    return launch(row_dot_kernel<T, kDim>, ceil_div(in.nq, P::kRows) * in.batch * in.heads, P::kThreads, P::kBytes,
                  in.stream, p);
  });
  if (err != cudaSuccess) return err;
  const acc_t<T> inv_heads = acc_t<T>(1) / acc_t<T>(in.heads > 0 ? in.heads : 1);
  return launch_grad<GradMode::kMap>(GradArgs<T>{in, p.lse, p.row_dot, Rows<const T>{}, p.grad_map, inv_heads,
                                                 p.grad_q, p.grad_k, Rows<T>{}, p.grad_bias});
}

PK_ATTN_INSTANTIATE(map, MapParams);
PK_ATTN_INSTANTIATE(map_backward, MapBackwardParams);

}  // namespace pk::cuda::attn
