// 2-D neighbourhood attention on the GPU (NATTEN's semantics; index math in window/neighborhood.h).
// SIMT in every dtype: a query sees kh x kw keys, too few and too irregular to fill mma tiles, so fp16 and
// bf16 are converted and accumulated in float like fp32.
//
// A CTA owns a tile of kTileY x kTileX sub positions of one residue class (one sub-grid of the dilated
// map) of one (b, h); each position belongs to a group of G lanes that hold K of its head-dim entries
// (entry m * G + lane) in registers. The positions a tile talks to ("partners": keys in the forward and
// the dq pass, queries in the dk/dv pass) form one rectangle of sub rows x sub columns; it is streamed
// through shared memory one sub row at a time, in chunks of columns, so neighbouring positions share
// every partner load. All lanes walk the same partner sequence and mask what is outside their own window,
// which keeps the group shuffles and barriers uniform.
//
// Forward: online softmax over the window. Backward, atomic-free: the query pass gives dq, delta = dO . O
// and (for the rpb gradient) dS per window slot; the key pass walks each key's inverse neighbourhood (the
// queries whose windows hold it, a run of rows times a run of columns) for dk and dv; a last kernel sums
// the slots of each rpb entry in a fixed order.
#include "attention/attention_tile.cuh"
#include "common/online_softmax.h"
#include "window/window_cuda.h"

namespace pk::cuda::win {
namespace {

using attn::ceil_div;
using attn::imin;
using attn::launch;

constexpr int kTileX = 8;
// Partner chunks stay within the default 48 KB of shared memory.
constexpr size_t kChunkBytes = 48 * 1024;

// Head dims up to G * K; the tile has kBlockThreads / G positions.
template <int kG, int kK>
struct Shape {
  static constexpr int G = kG, K = kK, kPositions = kBlockThreads / kG, kTileY = kPositions / kTileX;
  static_assert(kTileY >= 1, "a tile row holds kTileX positions");
};

template <typename F>
cudaError_t dispatch_shape(int64_t dim, F&& f) {
  if (dim <= 16) return f(Shape<4, 4>{});
  if (dim <= 32) return f(Shape<8, 4>{});
  if (dim <= 64) return f(Shape<16, 4>{});
  if (dim <= 128) return f(Shape<32, 4>{});
  if (dim <= attn::kMaxHeadDim) return f(Shape<32, 8>{});
  return cudaErrorInvalidValue;
}

// Partner columns per chunk: the widest partner rectangle (a key pass tile sees kTileX + 2 (kw - 1)
// columns of queries) when it fits, so most tiles load each partner row in one piece.
template <typename T>
PK_HOST_DEVICE index_t chunk_cols(const NeighborhoodInputs<T>& in) {
  const index_t per = (in.d + in.dv) * sizeof(T) + 2 * sizeof(acc_t<T>);
  const index_t fit = static_cast<index_t>(kChunkBytes) / per, want = kTileX + 2 * (in.x.kernel - 1);
  return want < fit ? want : fit;
}
template <typename T>
size_t chunk_bytes(const NeighborhoodInputs<T>& in) {
  return chunk_cols(in) * ((in.d + in.dv) * sizeof(T) + 2 * sizeof(acc_t<T>));
}

// This thread's place: its tile (a residue class of (b, h) and a range of sub positions) and its position.
template <typename S>
struct Place {
  index_t b, h, bh, ry, rx, ny, nx;  // class (ry, rx) has ny x nx sub positions
  index_t sy0, sx0, sy1, sx1;        // the tile's first and last sub positions inside the class
  index_t iy, ix;                    // this group's sub position
  bool valid, empty;                 // valid: iy, ix inside the class; empty: the whole tile is outside

  template <typename T>
  __device__ explicit Place(const NeighborhoodInputs<T>& in) {
    const neighborhood::Axis &ay = in.y, &ax = in.x;
    const index_t tiles_y = ceil_div(ay.class_length(0), S::kTileY), tiles_x = ceil_div(ax.class_length(0), kTileX);
    index_t i = blockIdx.x;
    const index_t tx = i % tiles_x;
    i /= tiles_x;
    const index_t ty = i % tiles_y;
    i /= tiles_y;
    rx = i % ax.dilation;
    i /= ax.dilation;
    ry = i % ay.dilation;
    bh = i / ay.dilation;
    b = bh / in.heads, h = bh % in.heads;
    ny = ay.class_length(ry), nx = ax.class_length(rx);
    sy0 = ty * S::kTileY, sx0 = tx * kTileX;
    empty = sy0 >= ny || sx0 >= nx;
    sy1 = imin(sy0 + S::kTileY, ny) - 1, sx1 = imin(sx0 + kTileX, nx) - 1;
    const int own = threadIdx.x / S::G;
    iy = sy0 + own / kTileX, ix = sx0 + own % kTileX;
    valid = iy < ny && ix < nx;
  }
  template <typename T>
  __device__ index_t token(const NeighborhoodInputs<T>& in, index_t sy, index_t sx) const {
    return in.y.position(ry, sy) * in.x.length + in.x.position(rx, sx);
  }
};

// The group's K entries (m * G + lane) of a row of n entries, zeros past n or for a null row.
template <int G, int K, typename T, typename A>
__device__ __forceinline__ void load_entries(A (&dst)[K], const T* row, index_t n, int lane) {
#pragma unroll
  for (int m = 0; m < K; ++m) dst[m] = row && m * G + lane < n ? to_acc(row[m * G + lane]) : A(0);
}

template <int G, int K, typename T, typename A>
__device__ __forceinline__ void store_entries(T* row, const A (&src)[K], A mul, index_t n, int lane) {
#pragma unroll
  for (int m = 0; m < K; ++m)
    if (m * G + lane < n) row[m * G + lane] = from_acc<T>(src[m] * mul);
}

// This lane's share of dot(x, row); LaneGroup::sum completes it.
template <int G, int K, typename T, typename A>
__device__ __forceinline__ A partial_dot(const A (&x)[K], const T* row, index_t n, int lane) {
  A s = 0;
#pragma unroll
  for (int m = 0; m < K; ++m)
    if (m * G + lane < n) s += x[m] * to_acc(row[m * G + lane]);
  return s;
}

// Shared memory of one partner chunk: per-partner stats, then [chunk][d] and [chunk][dv] rows.
template <typename T>
struct Chunk {
  acc_t<T>* lse;
  acc_t<T>* delta;
  T* a;
  T* b;
  index_t cols;

  __device__ Chunk(unsigned char* smem, const NeighborhoodInputs<T>& in) : cols(chunk_cols(in)) {
    lse = reinterpret_cast<acc_t<T>*>(smem);
    delta = lse + cols;
    a = reinterpret_cast<T*>(delta + cols);
    b = a + cols * in.d;
  }
};

// Loads partners (sub row u, sub columns [c0, c0 + count)) of the tile's class: rows of ra (d entries) and
// rb (dv entries) into the chunk.
template <typename S, typename T>
__device__ __forceinline__ void load_chunk(const Chunk<T>& ch, const NeighborhoodInputs<T>& in, const Place<S>& pl,
                                           const Rows<const T>& ra, const Rows<const T>& rb, index_t u, index_t c0,
                                           index_t count) {
  for (index_t idx = threadIdx.x; idx < count * in.d; idx += kBlockThreads) {
    const index_t c = idx / in.d, e = idx % in.d;
    ch.a[idx] = ra.at(pl.b, pl.h, pl.token(in, u, c0 + c))[e];
  }
  for (index_t idx = threadIdx.x; idx < count * in.dv; idx += kBlockThreads) {
    const index_t c = idx / in.dv, e = idx % in.dv;
    ch.b[idx] = rb.at(pl.b, pl.h, pl.token(in, u, c0 + c))[e];
  }
}

template <typename T>
__device__ __forceinline__ const T* rpb_row(const NeighborhoodInputs<T>& in, index_t h, index_t by) {
  return in.rpb ? in.rpb + (h * (2 * in.y.kernel - 1) + by) * (2 * in.x.kernel - 1) : nullptr;
}

// ------------------------------------------------------------------------------------------- forward

template <typename T, typename S>
__global__ void __launch_bounds__(kBlockThreads) forward_kernel(const NeighborhoodForwardParams<T> p) {
  using A = acc_t<T>;
  constexpr int G = S::G, K = S::K;
  unsigned char* const smem = dynamic_shared_memory();
  const NeighborhoodInputs<T>& in = p.in;
  const Place<S> pl(in);
  if (pl.empty) return;
  const LaneGroup<G> group;
  const Chunk<T> ch(smem, in);
  const neighborhood::Axis &ay = in.y, &ax = in.x;

  const index_t token = pl.token(in, imin(pl.iy, pl.ny - 1), imin(pl.ix, pl.nx - 1));
  A q[K], acc[K] = {};
  load_entries<G, K>(q, pl.valid ? in.q.at(pl.b, pl.h, token) : nullptr, in.d, group.lane);
  const index_t start_y = ay.window_start(pl.iy, pl.ny), start_x = ax.window_start(pl.ix, pl.nx);
  OnlineSoftmax<A> state;

  const index_t u0 = ay.window_start(pl.sy0, pl.ny), u1 = ay.window_start(pl.sy1, pl.ny) + ay.kernel;
  const index_t w0 = ax.window_start(pl.sx0, pl.nx), w1 = ax.window_start(pl.sx1, pl.nx) + ax.kernel;
  for (index_t u = u0; u < u1; ++u) {
    const bool row_in = pl.valid && u >= start_y && u < start_y + ay.kernel;
    const T* const bias = row_in ? rpb_row(in, pl.h, ay.bias_index(pl.iy, u)) : nullptr;
    for (index_t c0 = w0; c0 < w1; c0 += ch.cols) {
      __syncthreads();  // every group is done with the previous chunk
      load_chunk(ch, in, pl, in.k, in.v, u, c0, imin(ch.cols, w1 - c0));
      __syncthreads();
      for (index_t j = 0; j < ax.kernel; ++j) {
        const index_t col = start_x + j - c0;
        const bool in_chunk = row_in && col >= 0 && col < ch.cols;
        const A dot = group.sum(in_chunk ? partial_dot<G, K>(q, ch.a + col * in.d, in.d, group.lane) : A(0));
        if (!in_chunk) continue;
        A score = dot * in.scale;
        if (bias) score += to_acc(bias[ax.bias_index(pl.ix, start_x + j)]);
        A weight;
        const A rescale = state.update(score, &weight);
        const T* const v = ch.b + col * in.dv;
#pragma unroll
        for (int m = 0; m < K; ++m)
          acc[m] = acc[m] * rescale + (m * G + group.lane < in.dv ? weight * to_acc(v[m * G + group.lane]) : A(0));
      }
    }
  }
  if (!pl.valid) return;
  store_entries<G, K>(p.out.at(pl.b, pl.h, token), acc, state.inv_sum(), in.dv, group.lane);
  if (group.lane == 0) p.lse[pl.bh * ay.length * ax.length + token] = state.lse();
}

// ------------------------------------------------------------------------------------------- backward

// Query pass: dq = scale * sum dS k over the window, delta, and dS per window slot for the rpb gradient.
template <typename T, typename S>
__global__ void __launch_bounds__(kBlockThreads) query_kernel(const NeighborhoodBackwardParams<T> p) {
  using A = acc_t<T>;
  constexpr int G = S::G, K = S::K;
  unsigned char* const smem = dynamic_shared_memory();
  const NeighborhoodInputs<T>& in = p.in;
  const Place<S> pl(in);
  if (pl.empty) return;
  const LaneGroup<G> group;
  const Chunk<T> ch(smem, in);
  const neighborhood::Axis &ay = in.y, &ax = in.x;
  const index_t tokens = ay.length * ax.length;

  const index_t token = pl.token(in, imin(pl.iy, pl.ny - 1), imin(pl.ix, pl.nx - 1));
  const index_t row = pl.bh * tokens + token;
  A q[K], dout[K], dq[K] = {};
  load_entries<G, K>(q, pl.valid ? in.q.at(pl.b, pl.h, token) : nullptr, in.d, group.lane);
  load_entries<G, K>(dout, pl.valid ? p.grad_out.at(pl.b, pl.h, token) : nullptr, in.dv, group.lane);
  const A delta = group.sum(pl.valid ? partial_dot<G, K>(dout, p.out.at(pl.b, pl.h, token), in.dv, group.lane) : A(0));
  const A lse = pl.valid ? p.lse[row] : A(-INFINITY);
  if (pl.valid && group.lane == 0) p.delta[row] = delta;
  A* const ds_row = p.ds && pl.valid ? p.ds + row * ay.kernel * ax.kernel : nullptr;
  const index_t start_y = ay.window_start(pl.iy, pl.ny), start_x = ax.window_start(pl.ix, pl.nx);

  const index_t u0 = ay.window_start(pl.sy0, pl.ny), u1 = ay.window_start(pl.sy1, pl.ny) + ay.kernel;
  const index_t w0 = ax.window_start(pl.sx0, pl.nx), w1 = ax.window_start(pl.sx1, pl.nx) + ax.kernel;
  for (index_t u = u0; u < u1; ++u) {
    const bool row_in = pl.valid && u >= start_y && u < start_y + ay.kernel;
    const T* const bias = row_in ? rpb_row(in, pl.h, ay.bias_index(pl.iy, u)) : nullptr;
    for (index_t c0 = w0; c0 < w1; c0 += ch.cols) {
      __syncthreads();  // every group is done with the previous chunk
      load_chunk(ch, in, pl, in.k, in.v, u, c0, imin(ch.cols, w1 - c0));
      __syncthreads();
      for (index_t j = 0; j < ax.kernel; ++j) {
        const index_t col = start_x + j - c0;
        const bool in_chunk = row_in && col >= 0 && col < ch.cols;
        const T* const k = ch.a + col * in.d;
        const A dot = group.sum(in_chunk ? partial_dot<G, K>(q, k, in.d, group.lane) : A(0));
        const A dp = group.sum(in_chunk ? partial_dot<G, K>(dout, ch.b + col * in.dv, in.dv, group.lane) : A(0));
        if (!in_chunk) continue;
        A score = dot * in.scale;
        if (bias) score += to_acc(bias[ax.bias_index(pl.ix, start_x + j)]);
        const A ds = prob_from_lse(score, lse) * (dp - delta);
#pragma unroll
        for (int m = 0; m < K; ++m)
          if (m * G + group.lane < in.d) dq[m] += ds * to_acc(k[m * G + group.lane]);
        if (ds_row && group.lane == 0) ds_row[(u - start_y) * ax.kernel + j] = ds;
      }
    }
  }
  if (pl.valid) store_entries<G, K>(p.grad_q.at(pl.b, pl.h, token), dq, in.scale, in.d, group.lane);
}

// Key pass: dk = scale * sum dS q and dv = sum P dO over the queries whose windows hold the key.
template <typename T, typename S>
__global__ void __launch_bounds__(kBlockThreads) key_kernel(const NeighborhoodBackwardParams<T> p) {
  using A = acc_t<T>;
  constexpr int G = S::G, K = S::K;
  unsigned char* const smem = dynamic_shared_memory();
  const NeighborhoodInputs<T>& in = p.in;
  const Place<S> pl(in);
  if (pl.empty) return;
  const LaneGroup<G> group;
  const Chunk<T> ch(smem, in);
  const neighborhood::Axis &ay = in.y, &ax = in.x;
  const index_t tokens = ay.length * ax.length;

  const index_t token = pl.token(in, imin(pl.iy, pl.ny - 1), imin(pl.ix, pl.nx - 1));
  A k[K], v[K], dk[K] = {}, dv[K] = {};
  load_entries<G, K>(k, pl.valid ? in.k.at(pl.b, pl.h, token) : nullptr, in.d, group.lane);
  load_entries<G, K>(v, pl.valid ? in.v.at(pl.b, pl.h, token) : nullptr, in.dv, group.lane);
  const index_t first_y = ay.first_query(pl.iy), last_y = ay.last_query(pl.iy, pl.ny);
  const index_t first_x = ax.first_query(pl.ix), last_x = ax.last_query(pl.ix, pl.nx);

  const index_t u0 = ay.first_query(pl.sy0), u1 = ay.last_query(pl.sy1, pl.ny) + 1;
  const index_t w0 = ax.first_query(pl.sx0), w1 = ax.last_query(pl.sx1, pl.nx) + 1;
  for (index_t u = u0; u < u1; ++u) {
    const bool row_in = pl.valid && u >= first_y && u <= last_y;
    const T* const bias = row_in ? rpb_row(in, pl.h, ay.bias_index(u, pl.iy)) : nullptr;
    for (index_t c0 = w0; c0 < w1; c0 += ch.cols) {
      const index_t count = imin(ch.cols, w1 - c0);
      __syncthreads();  // every group is done with the previous chunk
      load_chunk(ch, in, pl, in.q, p.grad_out, u, c0, count);
      for (index_t c = threadIdx.x; c < count; c += kBlockThreads) {
        const index_t row = pl.bh * tokens + pl.token(in, u, c0 + c);
        ch.lse[c] = p.lse[row];
        ch.delta[c] = p.delta[row];
      }
      __syncthreads();
      // At most 2 kw - 1 queries of a row see one key (more than kw only where clamped windows pile up).
      for (index_t j = 0; j < 2 * ax.kernel - 1; ++j) {
        const index_t qx = first_x + j, col = qx - c0;
        const bool in_chunk = row_in && qx <= last_x && col >= 0 && col < ch.cols;
        const T* const q = ch.a + col * in.d;
        const T* const dout = ch.b + col * in.dv;
        const A dot = group.sum(in_chunk ? partial_dot<G, K>(k, q, in.d, group.lane) : A(0));
        const A dp = group.sum(in_chunk ? partial_dot<G, K>(v, dout, in.dv, group.lane) : A(0));
        if (!in_chunk) continue;
        A score = dot * in.scale;
        if (bias) score += to_acc(bias[ax.bias_index(qx, pl.ix)]);
        const A prob = prob_from_lse(score, ch.lse[col]);
        const A ds = prob * (dp - ch.delta[col]);
#pragma unroll
        for (int m = 0; m < K; ++m) {
          const index_t e = m * G + group.lane;
          if (e < in.d) dk[m] += ds * to_acc(q[e]);
          if (e < in.dv) dv[m] += prob * to_acc(dout[e]);
        }
      }
    }
  }
  if (!pl.valid) return;
  store_entries<G, K>(p.grad_k.at(pl.b, pl.h, token), dk, in.scale, in.d, group.lane);
  store_entries<G, K>(p.grad_v.at(pl.b, pl.h, token), dv, A(1), in.dv, group.lane);
}

// grad_rpb[h, by, bx] = sum of dS over the (query, window slot) pairs that read that entry. One CTA per
// entry; each thread sums a fixed stride of queries in order, then a fixed tree adds the threads.
template <typename T>
__global__ void __launch_bounds__(kBlockThreads) rpb_grad_kernel(const NeighborhoodBackwardParams<T> p) {
  using A = acc_t<T>;
  __shared__ A sums[kBlockThreads];
  const NeighborhoodInputs<T>& in = p.in;
  const neighborhood::Axis &ay = in.y, &ax = in.x;
  const index_t ey = 2 * ay.kernel - 1, ex = 2 * ax.kernel - 1, tokens = ay.length * ax.length;
  const index_t h = blockIdx.x / (ey * ex), by = blockIdx.x / ex % ey, bx = blockIdx.x % ex;
  A sum = 0;
  for (index_t i = threadIdx.x; i < in.batch * tokens; i += kBlockThreads) {
    const index_t b = i / tokens, t = i % tokens, y = t / ax.length, x = t % ax.length;
    // bias_index(i, j) = j - i + kernel - 1 inverted for the key's sub position, then its window slot.
    const index_t iy = y / ay.dilation, ny = ay.class_length(y % ay.dilation);
    const index_t ix = x / ax.dilation, nx = ax.class_length(x % ax.dilation);
    const index_t sy = iy + by - (ay.kernel - 1) - ay.window_start(iy, ny);
    const index_t sx = ix + bx - (ax.kernel - 1) - ax.window_start(ix, nx);
    if (sy < 0 || sy >= ay.kernel || sx < 0 || sx >= ax.kernel) continue;
    sum += p.ds[((b * in.heads + h) * tokens + t) * ay.kernel * ax.kernel + sy * ax.kernel + sx];
  }
  sums[threadIdx.x] = sum;
  for (int half = kBlockThreads / 2; half > 0; half /= 2) {
    __syncthreads();
    if (threadIdx.x < half) sums[threadIdx.x] += sums[threadIdx.x + half];
  }
  if (threadIdx.x == 0) p.grad_rpb[blockIdx.x] = from_acc<T>(sums[0]);
}

template <typename T>
index_t tile_blocks(const NeighborhoodInputs<T>& in, int tile_y) {
  return in.batch * in.heads * in.y.dilation * in.x.dilation * ceil_div(in.y.class_length(0), tile_y) *
         ceil_div(in.x.class_length(0), kTileX);
}

}  // namespace

template <typename T>
cudaError_t neighborhood_forward(const NeighborhoodForwardParams<T>& p) {
  const NeighborhoodInputs<T>& in = p.in;
  return dispatch_shape(in.d > in.dv ? in.d : in.dv, [&](auto shape) {
    using S = decltype(shape);
    return launch(forward_kernel<T, S>, tile_blocks(in, S::kTileY), kBlockThreads, chunk_bytes(in), in.stream, p);
  });
}

template <typename T>
cudaError_t neighborhood_backward(const NeighborhoodBackwardParams<T>& p) {
  const NeighborhoodInputs<T>& in = p.in;
  const cudaError_t err = dispatch_shape(in.d > in.dv ? in.d : in.dv, [&](auto shape) {
    using S = decltype(shape);
    const index_t blocks = tile_blocks(in, S::kTileY);
    const cudaError_t e = launch(query_kernel<T, S>, blocks, kBlockThreads, chunk_bytes(in), in.stream, p);
    if (e != cudaSuccess) return e;
    return launch(key_kernel<T, S>, blocks, kBlockThreads, chunk_bytes(in), in.stream, p);
  });
  if (err != cudaSuccess || !p.grad_rpb) return err;
  return launch(rpb_grad_kernel<T>, in.heads * (2 * in.y.kernel - 1) * (2 * in.x.kernel - 1), kBlockThreads, 0,
                in.stream, p);
}

PK_ATTN_INSTANTIATE(neighborhood_forward, NeighborhoodForwardParams);
PK_ATTN_INSTANTIATE(neighborhood_backward, NeighborhoodBackwardParams);

}  // namespace pk::cuda::win
