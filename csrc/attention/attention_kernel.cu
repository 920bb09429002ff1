// Dense attention forward, FlashAttention-2 style: one CTA per (query block, batch * head) keeps its Q
// tile in shared memory and streams K/V tiles past it. Each warp owns 16 query rows with their running
// max and sum (online softmax in log2 units), rescales its output accumulator when the max grows, and
// stages the tile's probabilities through shared memory as the A operand of P V. Causal CTAs stop at the
// diagonal. The lse it writes is what the backward and the attention map recompute probabilities from.
#include "attention/attention_tile.cuh"

namespace pk::cuda::attn {
namespace {

// Q rows; K and V columns; per-warp probability staging.
template <typename T, int kDim>
using ForwardPlan = Plan<T, kDim, 1, 2, true, false>;

template <typename T, int kDim>
__global__ void __launch_bounds__(ForwardPlan<T, kDim>::kThreads) forward_kernel(const ForwardParams<T> p) {
  using A = acc_t<T>;
  using P = ForwardPlan<T, kDim>;
  unsigned char* const smem = dynamic_shared_memory();
  const Inputs<T>& in = p.in;
  const Lane lane;
  T* const q_tile = P::row_tile(smem, 0);
  T* const k_tile = P::col_tile(smem, 0);
  T* const v_tile = P::col_tile(smem, 1);
  T* const stage = P::stage(smem, lane.warp);

  // Highest query blocks first: under a causal mask they have the most keys to visit.
  const index_t blocks = ceil_div(in.nq, P::kRows);
  const index_t bh = blockIdx.x / blocks, q0 = (blocks - 1 - blockIdx.x % blocks) * P::kRows;
  const index_t b = bh / in.heads, h = bh % in.heads, hk = h / (in.heads / in.kv_heads);
  const index_t row0 = q0 + lane.warp * 16;
  const index_t query[2] = {row0 + lane.g, row0 + lane.g + 8};
  const A scale2 = in.scale * A(kLog2e);
  const int d16 = round16(in.d), dv16 = round16(in.dv);

  load_tile<P::kRows, kDim, P::kThreads>(q_tile, P::kLd, in.q.at(b, h, q0), in.q.row_stride, in.nq - q0, in.d);
  const T* const q_warp = q_tile + lane.warp * 16 * P::kLd;

  A row_max[2] = {A(-INFINITY), A(-INFINITY)};
  A row_sum[2] = {0, 0};  // this thread's share; the group's four shares are added at the end
  Frag<A, kDim> out{};
  const index_t key_end = in.causal ? imin(in.nk, q0 + P::kRows) : in.nk;
  for (index_t k0 = 0; k0 < key_end; k0 += P::kCols) {
    __syncthreads();  // every warp is done with the previous K/V tiles
    load_tile<P::kCols, kDim, P::kThreads>(k_tile, P::kLd, in.k.at(b, hk, k0), in.k.row_stride, in.nk - k0, in.d);
    load_tile<P::kCols, kDim, P::kThreads>(v_tile, P::kLd, in.v.at(b, hk, k0), in.v.row_stride, in.nk - k0, in.dv);
    __syncthreads();

    Frag<A, P::kCols> s{};
    gemm_nt<P::kCols, kDim>(s, q_warp, P::kLd, k_tile, P::kLd, d16, lane);
    A tile_max[2] = {A(-INFINITY), A(-INFINITY)};
#pragma unroll
    for (int j = 0; j < P::kCols / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s.x[j][e] = score2(in, s.x[j][e], scale2, b, h, query[e >> 1], k0 + lane.col(j, e));
        tile_max[e >> 1] = fmax(tile_max[e >> 1], s.x[j][e]);
      }
    // While a row has seen only hidden keys its max stays -inf; exponents are then taken against 0, which
    // gives the hidden keys weight 0 instead of exp(-inf + inf) = NaN.
    A base[2], rescale[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const A new_max = fmax(row_max[r], quad_max(tile_max[r]));
      base[r] = new_max == A(-INFINITY) ? A(0) : new_max;
      rescale[r] = exp2_acc(row_max[r] - base[r]);
      row_max[r] = new_max;
      row_sum[r] *= rescale[r];
    }
#pragma unroll
    for (int j = 0; j < P::kCols / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s.x[j][e] = exp2_acc(s.x[j][e] - base[e >> 1]);
        row_sum[e >> 1] += s.x[j][e];
      }
#pragma unroll
    for (int j = 0; j < kDim / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) out.x[j][e] *= rescale[e >> 1];
    stage_frag(s, stage, P::kLdStage, lane);
    __syncwarp();
    gemm_nn<kDim, P::kCols>(out, stage, P::kLdStage, v_tile, P::kLd, dv16, lane);
  }

  A inv_sum[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] = quad_sum(row_sum[r]);
    inv_sum[r] = row_sum[r] == A(0) ? A(0) : A(1) / row_sum[r];
  }
  store_frag(out, p.out.at(b, h, row0), p.out.row_stride, in.nq - row0, in.dv, inv_sum, lane);
  if (lane.t == 0)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (query[r] < in.nq)
        p.lse[bh * in.nq + query[r]] =
            row_sum[r] == A(0) ? A(-INFINITY) : (row_max[r] + log2_acc(row_sum[r])) * A(kLn2);
}

}  // namespace

template <typename T>
cudaError_t forward(const ForwardParams<T>& p) {
  const Inputs<T>& in = p.in;
  return dispatch_head_dim(in.d > in.dv ? in.d : in.dv, [&](auto dim) {
    constexpr int kDim = decltype(dim)::value;
    using P = ForwardPlan<T, kDim>;
    return launch(forward_kernel<T, kDim>, ceil_div(in.nq, P::kRows) * in.batch * in.heads, P::kThreads,
                  P::kBytes, in.stream, p);
  });
}

PK_ATTN_INSTANTIATE(forward, ForwardParams);

}  // namespace pk::cuda::attn
