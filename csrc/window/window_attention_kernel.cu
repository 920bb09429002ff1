// Shifted-window attention on the GPU: the dense engine's FlashAttention-2 tiles (attention_tile.cuh) run
// inside each window, which is gathered by index arithmetic (window/window.h) instead of being rolled,
// padded and partitioned in memory.
//
// A CTA owns one block of window positions (queries; keys in the dk/dv pass) of one (b, h, window) and
// streams the window's other positions past it in tiles. Before a tile is loaded its slots (token, bias
// offset, shift region per position) are computed once into shared memory, so the gathers and the score
// bias cost a lookup instead of index divisions per element. Pad tokens read pad_kv (zeros for queries
// and grad_out), so pad query rows are computed with q = 0 and never stored, as in timm.
//
// Backward, atomic-free as the dense engine's: the dq pass (CTA per query block) also writes
// delta = dO . O of its rows, which the dk/dv pass (CTA per key block) reads. The bias gradient is dS
// summed over batch and windows: dq CTAs of one group of (b, window) pairs own rows of one partial sum,
// a second kernel adds the groups in order and, for a table, a third folds the dense sum into table rows.
// Every sum has a fixed order, so results do not depend on scheduling.
#include "attention/attention_tile.cuh"
#include "window/window_cuda.h"

namespace pk::cuda::win {
namespace {

using namespace attn;

constexpr index_t kPadToken = -1;    // window::token_at's answer for a cell past the grid
constexpr index_t kPastWindow = -2;  // a tile row past the window's last position

// One position of a tile.
struct Slot {
  index_t token;  // a grid token, kPadToken or kPastWindow
  int rel;        // window::rel_offset with a table, the position with a dense bias
  int region;     // Swin shift region
};

template <typename T>
__device__ __forceinline__ void fill_slots(Slot* slots, int count, int threads, const WindowInputs<T>& in, index_t w,
                                           index_t p0) {
  const window::Geometry& g = in.geo;
  for (int i = threadIdx.x; i < count; i += threads) {
    const index_t pos = p0 + i;
    Slot s{kPastWindow, 0, 0};
    if (pos < g.positions()) {
      s.token = window::token_at(g, w, pos);
      s.rel = static_cast<int>(in.table ? window::rel_offset(g, pos) : pos);
      s.region = in.shift_mask ? static_cast<int>(window::region(g, w, pos)) : 0;
    }
    slots[i] = s;
  }
}

// Copies the rows of `slots` into a [kRows, kDim] tile of row stride ld, columns [0, cols): token rows of
// src at (b, h), `pad` for pad tokens (zeros when null), zeros past the window and past cols. Rows are
// gathered, so alignment is checked per 16-byte chunk.
template <int kRows, int kDim, int kThreads, typename T>
__device__ __forceinline__ void gather_tile(T* dst, int ld, const Slot* slots, const Rows<const T>& src, index_t b,
                                            index_t h, const T* pad, index_t cols) {
  constexpr int kVec = static_cast<int>(16 / sizeof(T)), kChunks = kDim / kVec;
  for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kThreads) {
    const int r = idx / kChunks, c = idx % kChunks * kVec;
    const index_t token = slots[r].token;
    const T* row = token >= 0 ? src.at(b, h, token) : token == kPadToken ? pad : nullptr;
    Vec<T, kVec> v{};
    if (row && c < cols) {
      if (c + kVec <= cols && reinterpret_cast<uintptr_t>(row + c) % 16 == 0) {
        v = load_vec<kVec>(row + c);
      } else {
        for (int e = 0; e < kVec && c + e < cols; ++e) v.v[e] = row[c + e];
      }
    }
    store_vec<kVec>(dst + r * ld + c, v);
  }
}

// What the scores of one (b, h, window) add to q k^T * scale, in log2 units.
template <typename T>
struct ScoreBias {
  const WindowInputs<T>& in;
  index_t h, center;
  bool masked;

  __device__ ScoreBias(const WindowInputs<T>& in_, index_t h_, index_t w)
      : in(in_),
        h(h_),
        center(window::rel_center(in_.geo)),
        masked(in_.shift_mask && !window::single_region(in_.geo, w)) {}

  // (dot * scale + bias + mask) * log2 e of query slot i and key slot j, or -inf past the window.
  template <typename A>
  __device__ __forceinline__ A score2(A dot, A scale2, const Slot& i, const Slot& j) const {
    if (i.token == kPastWindow || j.token == kPastWindow) return A(-INFINITY);
    A s = dot * scale2;
    if (in.table)
      s += to_acc(in.table[(center + i.rel - j.rel) * in.heads + h]) * A(kLog2e);
    else if (in.dense)
      s += to_acc(in.dense[h * in.dense_stride[0] + i.rel * in.dense_stride[1] + j.rel * in.dense_stride[2]]) *
           A(kLog2e);
    if (masked && i.region != j.region) s += A(window::kShiftMaskValue * kLog2e);
    return s;
  }
};

// dst row token[r / 8] [c] = f[r, c] * row_scale[r / 8] for the fragment's grid rows and columns c < cols.
template <typename T, typename A, int kN>
__device__ __forceinline__ void scatter_frag(const Frag<A, kN>& f, const Rows<T>& dst, index_t b, index_t h,
                                             const index_t (&token)[2], index_t cols, const A (&row_scale)[2],
                                             const Lane& lane) {
#pragma unroll
  for (int j = 0; j < kN / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const index_t t = token[e >> 1];
      const int c = lane.col(j, e);
      if (t >= 0 && c < cols) dst.at(b, h, t)[c] = from_acc<T>(f.x[j][e] * row_scale[e >> 1]);
    }
}

// ------------------------------------------------------------------------------------------- forward

// Q rows; K and V columns; per-warp probability staging.
template <typename T, int kDim>
using ForwardPlan = Plan<T, kDim, 1, 2, true, false>;

template <typename T, int kDim>
__global__ void __launch_bounds__(ForwardPlan<T, kDim>::kThreads) forward_kernel(const WindowForwardParams<T> p) {
  using A = acc_t<T>;
  using P = ForwardPlan<T, kDim>;
  unsigned char* const smem = dynamic_shared_memory();
  __shared__ Slot q_slots[P::kRows], k_slots[P::kCols];
  const WindowInputs<T>& in = p.in;
  const Lane lane;
  const T* const no_pad = nullptr;  // pad queries read as zeros
  T* const q_tile = P::row_tile(smem, 0);
  T* const k_tile = P::col_tile(smem, 0);
  T* const v_tile = P::col_tile(smem, 1);
  T* const stage = P::stage(smem, lane.warp);

  const index_t n = in.geo.positions(), windows = in.geo.windows(), blocks = ceil_div(n, P::kRows);
  const index_t task = blockIdx.x / blocks, q0 = blockIdx.x % blocks * P::kRows;
  const index_t bh = task / windows, w = task % windows, b = bh / in.heads, h = bh % in.heads;
  const ScoreBias<T> bias(in, h, w);
  const T* const pad_k = in.pad_kv ? in.pad_kv + h * in.d : nullptr;
  const T* const pad_v = in.pad_kv ? in.pad_kv + (in.heads + h) * in.d : nullptr;
  const A scale2 = in.scale * A(kLog2e);
  const int d16 = round16(in.d), dv16 = round16(in.dv);

  fill_slots(q_slots, P::kRows, P::kThreads, in, w, q0);
  __syncthreads();
  gather_tile<P::kRows, kDim, P::kThreads>(q_tile, P::kLd, q_slots, in.q, b, h, no_pad, in.d);
  const Slot query[2] = {q_slots[lane.warp * 16 + lane.g], q_slots[lane.warp * 16 + lane.g + 8]};
  const T* const q_warp = q_tile + lane.warp * 16 * P::kLd;

  A row_max[2] = {A(-INFINITY), A(-INFINITY)};
  A row_sum[2] = {0, 0};  // this thread's share; the group's four shares are added at the end
  Frag<A, kDim> out{};
  for (index_t k0 = 0; k0 < n; k0 += P::kCols) {
    __syncthreads();  // every warp is done with the previous K/V tiles and their slots
    fill_slots(k_slots, P::kCols, P::kThreads, in, w, k0);
    __syncthreads();
    gather_tile<P::kCols, kDim, P::kThreads>(k_tile, P::kLd, k_slots, in.k, b, h, pad_k, in.d);
    gather_tile<P::kCols, kDim, P::kThreads>(v_tile, P::kLd, k_slots, in.v, b, h, pad_v, in.dv);
    __syncthreads();

    Frag<A, P::kCols> s{};
    gemm_nt<P::kCols, kDim>(s, q_warp, P::kLd, k_tile, P::kLd, d16, lane);
    A tile_max[2] = {A(-INFINITY), A(-INFINITY)};
#pragma unroll
    for (int j = 0; j < P::kCols / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s.x[j][e] = bias.score2(s.x[j][e], scale2, query[e >> 1], k_slots[lane.col(j, e)]);
        tile_max[e >> 1] = fmax(tile_max[e >> 1], s.x[j][e]);
      }
    // Rows past the window see only -inf; exponents are then taken against 0 (weight 0, not NaN).
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
  const index_t token[2] = {query[0].token, query[1].token};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] = quad_sum(row_sum[r]);
    inv_sum[r] = row_sum[r] == A(0) ? A(0) : A(1) / row_sum[r];
  }
  scatter_frag(out, p.out, b, h, token, in.dv, inv_sum, lane);
  if (lane.t == 0)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (token[r] >= 0)
        p.lse[bh * in.tokens + token[r]] =
            row_sum[r] == A(0) ? A(-INFINITY) : (row_max[r] + log2_acc(row_sum[r])) * A(kLn2);
}

// ------------------------------------------------------------------------------------------- backward

// Rows: Q and dO. Columns: K and V. Staging: dS.
template <typename T, int kDim>
using DqPlan = Plan<T, kDim, 2, 2, true, false>;

template <typename T, int kDim>
__global__ void __launch_bounds__(DqPlan<T, kDim>::kThreads) dq_kernel(const WindowBackwardParams<T> p) {
  using A = acc_t<T>;
  using P = DqPlan<T, kDim>;
  unsigned char* const smem = dynamic_shared_memory();
  __shared__ Slot q_slots[P::kRows], k_slots[P::kCols];
  const WindowInputs<T>& in = p.in;
  const Lane lane;
  const T* const no_pad = nullptr;  // pad queries and their grad_out read as zeros
  const LaneGroup<kWarpSize> warp;
  T* const q_tile = P::row_tile(smem, 0);
  T* const do_tile = P::row_tile(smem, 1);
  T* const k_tile = P::col_tile(smem, 0);
  T* const v_tile = P::col_tile(smem, 1);
  T* const stage = P::stage(smem, lane.warp);

  const index_t n = in.geo.positions(), windows = in.geo.windows(), blocks = ceil_div(n, P::kRows);
  const index_t items = in.batch * windows;
  const index_t group = blockIdx.x / (in.heads * blocks), h = blockIdx.x / blocks % in.heads;
  const index_t q0 = blockIdx.x % blocks * P::kRows;
  const T* const pad_k = in.pad_kv ? in.pad_kv + h * in.d : nullptr;
  const T* const pad_v = in.pad_kv ? in.pad_kv + (in.heads + h) * in.d : nullptr;
  const A scale2 = in.scale * A(kLog2e);
  const int d16 = round16(in.d), dv16 = round16(in.dv);
  const int row0 = lane.warp * 16;
  // This CTA owns rows [q0, q0 + kRows) of its group's partial: plain read-modify-writes, no atomics.
  A* const partial = p.grad_bias ? p.partial + ((group * in.heads + h) * n + q0 + row0) * n : nullptr;

  for (index_t item = group * items / p.groups; item < (group + 1) * items / p.groups; ++item) {
    const index_t b = item / windows, w = item % windows, bh = b * in.heads + h;
    const ScoreBias<T> bias(in, h, w);
    __syncthreads();  // every warp is done with the previous window's tiles and slots
    fill_slots(q_slots, P::kRows, P::kThreads, in, w, q0);
    __syncthreads();
    gather_tile<P::kRows, kDim, P::kThreads>(q_tile, P::kLd, q_slots, in.q, b, h, no_pad, in.d);
    gather_tile<P::kRows, kDim, P::kThreads>(do_tile, P::kLd, q_slots, p.grad_out, b, h, no_pad, in.dv);
    __syncthreads();

    // delta = dO . O of the warp's 16 rows (0 for pad rows, whose dO is 0), kept by the lanes that own
    // the row in the fragment layout and published for the dk/dv pass.
    A delta[2] = {0, 0}, lse2[2];
    for (int rr = 0; rr < 16; ++rr) {
      const index_t t = q_slots[row0 + rr].token;
      A dot = 0;
      if (t >= 0) {
        const T* const o = p.out.at(b, h, t);
        for (index_t c = warp.lane; c < in.dv; c += kWarpSize) dot += to_acc(do_tile[(row0 + rr) * P::kLd + c]) * to_acc(o[c]);
      }
      dot = warp.sum(dot);
      if (rr == lane.g) delta[0] = dot;
      if (rr == lane.g + 8) delta[1] = dot;
      if (warp.lane == 0 && t >= 0) p.delta[bh * in.tokens + t] = dot;
    }
    const Slot query[2] = {q_slots[row0 + lane.g], q_slots[row0 + lane.g + 8]};
    const index_t token[2] = {query[0].token, query[1].token};
#pragma unroll
    for (int r = 0; r < 2; ++r) lse2[r] = token[r] >= 0 ? p.lse[bh * in.tokens + token[r]] * A(kLog2e) : A(-INFINITY);

    Frag<A, kDim> dq{};
    for (index_t k0 = 0; k0 < n; k0 += P::kCols) {
      __syncthreads();  // every warp is done with the previous K/V tiles and their slots
      fill_slots(k_slots, P::kCols, P::kThreads, in, w, k0);
      __syncthreads();
      gather_tile<P::kCols, kDim, P::kThreads>(k_tile, P::kLd, k_slots, in.k, b, h, pad_k, in.d);
      gather_tile<P::kCols, kDim, P::kThreads>(v_tile, P::kLd, k_slots, in.v, b, h, pad_v, in.dv);
      __syncthreads();

      Frag<A, P::kCols> ds{}, dp{};
      gemm_nt<P::kCols, kDim>(ds, q_tile + row0 * P::kLd, P::kLd, k_tile, P::kLd, d16, lane);
      gemm_nt<P::kCols, kDim>(dp, do_tile + row0 * P::kLd, P::kLd, v_tile, P::kLd, dv16, lane);
#pragma unroll
      for (int j = 0; j < P::kCols / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const A prob = prob2(bias.score2(ds.x[j][e], scale2, query[e >> 1], k_slots[lane.col(j, e)]), lse2[e >> 1]);
          ds.x[j][e] = prob * (dp.x[j][e] - delta[e >> 1]);
        }
      if (partial)
#pragma unroll
        for (int j = 0; j < P::kCols / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = lane.row(e), c = lane.col(j, e);
            if (q0 + row0 + r < n && k0 + c < n) partial[r * n + k0 + c] += ds.x[j][e];
          }
      stage_frag(ds, stage, P::kLdStage, lane);
      __syncwarp();
      gemm_nn<kDim, P::kCols>(dq, stage, P::kLdStage, k_tile, P::kLd, d16, lane);
    }
    const A scale[2] = {in.scale, in.scale};
    scatter_frag(dq, p.grad_q, b, h, token, in.d, scale, lane);
  }
}

// Rows: K and V. Columns: Q and dO. Staging: P then dS. Column stats: lse and delta of the queries.
template <typename T, int kDim>
using DkvPlan = Plan<T, kDim, 2, 2, true, true>;

template <typename T, int kDim>
__global__ void __launch_bounds__(DkvPlan<T, kDim>::kThreads) dkv_kernel(const WindowBackwardParams<T> p) {
  using A = acc_t<T>;
  using P = DkvPlan<T, kDim>;
  unsigned char* const smem = dynamic_shared_memory();
  __shared__ Slot k_slots[P::kRows], q_slots[P::kCols];
  const WindowInputs<T>& in = p.in;
  const Lane lane;
  const T* const no_pad = nullptr;  // pad queries and their grad_out read as zeros
  T* const k_tile = P::row_tile(smem, 0);
  T* const v_tile = P::row_tile(smem, 1);
  T* const q_tile = P::col_tile(smem, 0);
  T* const do_tile = P::col_tile(smem, 1);
  T* const stage = P::stage(smem, lane.warp);
  A* const lse2 = P::col_stats(smem, 0);
  A* const delta = P::col_stats(smem, 1);

  const index_t n = in.geo.positions(), windows = in.geo.windows(), blocks = ceil_div(n, P::kRows);
  const index_t task = blockIdx.x / blocks, k0 = blockIdx.x % blocks * P::kRows;
  const index_t bh = task / windows, w = task % windows, b = bh / in.heads, h = bh % in.heads;
  const ScoreBias<T> bias(in, h, w);
  const A scale2 = in.scale * A(kLog2e);
  const int d16 = round16(in.d), dv16 = round16(in.dv);
  const int row0 = lane.warp * 16;

  fill_slots(k_slots, P::kRows, P::kThreads, in, w, k0);
  __syncthreads();
  gather_tile<P::kRows, kDim, P::kThreads>(k_tile, P::kLd, k_slots, in.k, b, h,
                                           in.pad_kv ? in.pad_kv + h * in.d : nullptr, in.d);
  gather_tile<P::kRows, kDim, P::kThreads>(v_tile, P::kLd, k_slots, in.v, b, h,
                                           in.pad_kv ? in.pad_kv + (in.heads + h) * in.d : nullptr, in.dv);
  const Slot key[2] = {k_slots[row0 + lane.g], k_slots[row0 + lane.g + 8]};

  Frag<A, kDim> dk{}, dv{};
  for (index_t q0 = 0; q0 < n; q0 += P::kCols) {
    __syncthreads();  // every warp is done with the previous Q/dO tiles, slots and column stats
    fill_slots(q_slots, P::kCols, P::kThreads, in, w, q0);
    __syncthreads();
    gather_tile<P::kCols, kDim, P::kThreads>(q_tile, P::kLd, q_slots, in.q, b, h, no_pad, in.d);
    gather_tile<P::kCols, kDim, P::kThreads>(do_tile, P::kLd, q_slots, p.grad_out, b, h, no_pad, in.dv);
    // Pad and past-window queries get lse = -inf: probability 0, so they add nothing to dk and dv.
    for (int c = threadIdx.x; c < P::kCols; c += P::kThreads) {
      const index_t t = q_slots[c].token;
      lse2[c] = t >= 0 ? p.lse[bh * in.tokens + t] * A(kLog2e) : A(-INFINITY);
      delta[c] = t >= 0 ? p.delta[bh * in.tokens + t] : A(0);
    }
    __syncthreads();

    // Transposed probabilities: rows are this warp's keys, columns the tile's queries.
    Frag<A, P::kCols> pt{}, dpt{};
    gemm_nt<P::kCols, kDim>(pt, k_tile + row0 * P::kLd, P::kLd, q_tile, P::kLd, d16, lane);
#pragma unroll
    for (int j = 0; j < P::kCols / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = lane.col(j, e);
        pt.x[j][e] = prob2(bias.score2(pt.x[j][e], scale2, q_slots[c], key[e >> 1]), lse2[c]);
      }
    stage_frag(pt, stage, P::kLdStage, lane);
    __syncwarp();
    gemm_nn<kDim, P::kCols>(dv, stage, P::kLdStage, do_tile, P::kLd, dv16, lane);
    __syncwarp();  // the staging rows are overwritten with dS below
    gemm_nt<P::kCols, kDim>(dpt, v_tile + row0 * P::kLd, P::kLd, do_tile, P::kLd, dv16, lane);
#pragma unroll
    for (int j = 0; j < P::kCols / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = lane.col(j, e);
        pt.x[j][e] *= dpt.x[j][e] - delta[c];
      }
    stage_frag(pt, stage, P::kLdStage, lane);
    __syncwarp();
    gemm_nn<kDim, P::kCols>(dk, stage, P::kLdStage, q_tile, P::kLd, d16, lane);
  }
  const index_t token[2] = {key[0].token, key[1].token};
  const A scale[2] = {in.scale, in.scale}, one[2] = {1, 1};
  scatter_frag(dk, p.grad_k, b, h, token, in.d, scale, lane);
  scatter_frag(dv, p.grad_v, b, h, token, in.dv, one, lane);
}

// dense_grad[h, i, j] = sum over groups, in order, of partial[g, h, i, j]; straight into grad_bias (as T)
// for a dense bias.
template <typename T>
__global__ void __launch_bounds__(kBlockThreads) reduce_groups_kernel(const WindowBackwardParams<T> p) {
  using A = acc_t<T>;
  const index_t n = p.in.geo.positions(), size = p.in.heads * n * n;
  const index_t idx = static_cast<index_t>(blockIdx.x) * kBlockThreads + threadIdx.x;
  if (idx >= size) return;
  A sum = 0;
  for (index_t g = 0; g < p.groups; ++g) sum += p.partial[g * size + idx];
  if (p.in.table)
    p.dense_grad[idx] = sum;
  else
    p.grad_bias[idx] = from_acc<T>(sum);
}

// grad_bias[r, h] = sum of dense_grad[h, i, j] over the pairs with window::rel_index(i, j) == r, i in order:
// j is found from i by inverting rel_offset (rows of 2 ww - 1 entries, of which the first ww are offsets).
template <typename T>
__global__ void __launch_bounds__(kBlockThreads) fold_table_kernel(const WindowBackwardParams<T> p) {
  using A = acc_t<T>;
  const window::Geometry& g = p.in.geo;
  const index_t n = g.positions(), heads = p.in.heads, row_len = 2 * g.win_w - 1;
  const index_t idx = static_cast<index_t>(blockIdx.x) * kBlockThreads + threadIdx.x;
  if (idx >= window::table_rows(g) * heads) return;
  const index_t r = idx / heads, h = idx % heads;
  A sum = 0;
  for (index_t i = 0; i < n; ++i) {
    const index_t off = window::rel_center(g) + window::rel_offset(g, i) - r;
    if (off < 0 || off % row_len >= g.win_w || off / row_len >= g.win_h) continue;
    sum += p.dense_grad[(h * n + i) * n + off / row_len * g.win_w + off % row_len];
  }
  p.grad_bias[idx] = from_acc<T>(sum);
}

}  // namespace

template <typename T>
cudaError_t window_forward(const WindowForwardParams<T>& p) {
  const WindowInputs<T>& in = p.in;
  return dispatch_head_dim(in.d > in.dv ? in.d : in.dv, [&](auto dim) {
    constexpr int kDim = decltype(dim)::value;
    using P = ForwardPlan<T, kDim>;
    const index_t blocks = ceil_div(in.geo.positions(), P::kRows) * in.geo.windows() * in.batch * in.heads;
    return launch(forward_kernel<T, kDim>, blocks, P::kThreads, P::kBytes, in.stream, p);
  });
}

template <typename T>
cudaError_t window_backward(const WindowBackwardParams<T>& p) {
  const WindowInputs<T>& in = p.in;
  const index_t n = in.geo.positions();
  const cudaError_t err = dispatch_head_dim(in.d > in.dv ? in.d : in.dv, [&](auto dim) {
    constexpr int kDim = decltype(dim)::value;
    using Dq = DqPlan<T, kDim>;
    using Dkv = DkvPlan<T, kDim>;
    cudaError_t e = launch(dq_kernel<T, kDim>, p.groups * in.heads * ceil_div(n, Dq::kRows), Dq::kThreads, Dq::kBytes,
                           in.stream, p);
    if (e != cudaSuccess) return e;
    return launch(dkv_kernel<T, kDim>, ceil_div(n, Dkv::kRows) * in.geo.windows() * in.batch * in.heads,
                  Dkv::kThreads, Dkv::kBytes, in.stream, p);
  });
  if (err != cudaSuccess || !p.grad_bias) return err;
  const cudaError_t e = launch(reduce_groups_kernel<T>, ceil_div(in.heads * n * n, kBlockThreads), kBlockThreads, 0,
                               in.stream, p);
  if (e != cudaSuccess || !in.table) return e;
  return launch(fold_table_kernel<T>, ceil_div(window::table_rows(in.geo) * in.heads, kBlockThreads), kBlockThreads,
                0, in.stream, p);
}

PK_ATTN_INSTANTIATE(window_forward, WindowForwardParams);
PK_ATTN_INSTANTIATE(window_backward, WindowBackwardParams);

}  // namespace pk::cuda::win
