// Attention restricted to graph edges, forward and backward, mirroring graph_attention_cpu.cpp.
//
// One lane group per (row, head) with lanes over the head dims: each edge's score is one group-wide
// dot product, after which every lane holds the same score and runs the same OnlineSoftmax update, so
// the softmax state never needs a broadcast. Forward streams a target's edges through that state and
// keeps only the lse. Backward is two atomic-free passes: target rows recompute p from the lse and write
// dq, d bias and the per-edge p and d score; source rows walk the transpose and write dk and dv.
//
// Each block's y index picks a slice of G*K output dims. Dims up to 256 take one slice; longer heads
// get several, each recomputing the scores (correct, merely redundant), which keeps every accumulator
// in registers whatever the head size.
#include "common/cuda_utils.cuh"
#include "common/online_softmax.h"
#include "graph/graph_cuda.h"

namespace pk::cuda {
namespace {

template <typename T, int G, int K, typename P>
__device__ __forceinline__ acc_t<T> edge_score(const P& p, const LaneGroup<G>& group, const RowFragment<T, G, K>& q,
                                               index_t e, index_t jh, index_t h) {
  acc_t<T> score = p.scale * group.sum(q.partial_dot(p.k + jh * p.dqk, group.lane));
  if (p.bias) score += to_acc(__ldg(p.bias + e * p.heads + h));
  return score;
}

template <typename T, int G, int K>
__global__ void __launch_bounds__(kBlockThreads) forward_kernel(GraphAttentionParams<T> p) {
  using A = acc_t<T>;
  const LaneGroup<G> group;
  const index_t item = LaneGroup<G>::id();  // row * heads + h
  if (item >= p.graph.num_rows * p.heads) return;
  const index_t row = item / p.heads, h = item % p.heads;
  const index_t d0 = static_cast<index_t>(blockIdx.y) * G * K + group.lane;
  const RowFragment<T, G, K> q(p.q + item * p.dqk, p.dqk, group.lane);
  OnlineSoftmax<A> state;
  A acc[K] = {};
  for_each_edge(group, p.graph.col, nullptr, p.graph.rowptr[row], p.graph.rowptr[row + 1],
                [&](index_t e, int64_t j, int64_t) {
    const index_t jh = j * p.heads + h;
    A weight;
    const A rescale = state.update(edge_score(p, group, q, e, jh, h), &weight);
    const T* vj = p.v + jh * p.dv;
#pragma unroll
    for (int m = 0; m < K; ++m) {
      const index_t d = d0 + m * G;
      if (d < p.dv) {
        if (rescale != A(1)) acc[m] *= rescale;
        if (weight != A(0)) acc[m] += weight * to_acc(vj[d]);
      }
    }
  });
  const A inv_sum = state.inv_sum();
#pragma unroll
  for (int m = 0; m < K; ++m) {
    const index_t d = d0 + m * G;
    if (d < p.dv) p.out[item * p.dv + d] = from_acc<T>(acc[m] * inv_sum);
  }
  if (blockIdx.y == 0 && group.lane == 0) p.lse[item] = state.lse();
}

// Target pass: slices of dq, plus (slice 0 only) the per-edge p, d score and d bias.
template <typename T, int G, int K>
__global__ void __launch_bounds__(kBlockThreads) target_pass_kernel(GraphAttentionBackwardParams<T> p) {
  using A = acc_t<T>;
  const LaneGroup<G> group;
  const index_t item = LaneGroup<G>::id();
  if (item >= p.graph.num_rows * p.heads) return;
  const index_t row = item / p.heads, h = item % p.heads;
  const index_t d0 = static_cast<index_t>(blockIdx.y) * G * K + group.lane;
  const bool writes_edges = blockIdx.y == 0 && group.lane == 0;
  const RowFragment<T, G, K> q(p.q + item * p.dqk, p.dqk, group.lane);
  const RowFragment<T, G, K> dout(p.grad_out + item * p.dv, p.dv, group.lane);
  const A delta = group.sum(dout.partial_dot(p.out + item * p.dv, group.lane));
  const A lse = p.lse[item];
  A acc[K] = {};
  for_each_edge(group, p.graph.col, nullptr, p.graph.rowptr[row], p.graph.rowptr[row + 1],
                [&](index_t e, int64_t j, int64_t) {
    const index_t jh = j * p.heads + h, eh = e * p.heads + h;
    const A prob = prob_from_lse(edge_score(p, group, q, e, jh, h), lse);
    const A ds = prob * (group.sum(dout.partial_dot(p.v + jh * p.dv, group.lane)) - delta);
    if (writes_edges) {
      p.probs[eh] = prob;
      p.dscore[eh] = ds;
      if (p.grad_bias) p.grad_bias[eh] = from_acc<T>(ds);
    }
    if (ds == A(0)) return;
    const A w = p.scale * ds;
    const T* kj = p.k + jh * p.dqk;
#pragma unroll
    for (int m = 0; m < K; ++m) {
      const index_t d = d0 + m * G;
      if (d < p.dqk) acc[m] += w * to_acc(kj[d]);
    }
  });
#pragma unroll
  for (int m = 0; m < K; ++m) {
    const index_t d = d0 + m * G;
    if (d < p.dqk) p.grad_q[item * p.dqk + d] = from_acc<T>(acc[m]);
  }
}

// Source pass over the transpose: slices of dk and dv from the target pass's p and d score.
template <typename T, int G, int K>
__global__ void __launch_bounds__(kBlockThreads) source_pass_kernel(GraphAttentionBackwardParams<T> p) {
  using A = acc_t<T>;
  const LaneGroup<G> group;
  const index_t item = LaneGroup<G>::id();  // source * heads + h
  if (item >= p.transpose.num_rows * p.heads) return;
  const index_t src = item / p.heads, h = item % p.heads;
  const index_t d0 = static_cast<index_t>(blockIdx.y) * G * K + group.lane;
  A acc_k[K] = {}, acc_v[K] = {};
  for_each_edge(group, p.transpose.col, p.perm_t, p.transpose.rowptr[src], p.transpose.rowptr[src + 1],
                [&](index_t, int64_t i, int64_t e) {
    const index_t ih = i * p.heads + h, eh = e * p.heads + h;
    const A prob = __ldg(p.probs + eh), ds = __ldg(p.dscore + eh);
    if (prob != A(0)) {
      const T* dout = p.grad_out + ih * p.dv;
#pragma unroll
      for (int m = 0; m < K; ++m) {
        const index_t d = d0 + m * G;
        if (d < p.dv) acc_v[m] += prob * to_acc(dout[d]);
      }
    }
    if (ds != A(0)) {
      const A w = p.scale * ds;
      const T* qi = p.q + ih * p.dqk;
#pragma unroll
      for (int m = 0; m < K; ++m) {
        const index_t d = d0 + m * G;
        if (d < p.dqk) acc_k[m] += w * to_acc(qi[d]);
      }
    }
  });
#pragma unroll
  for (int m = 0; m < K; ++m) {
    const index_t d = d0 + m * G;
    if (d < p.dqk) p.grad_k[item * p.dqk + d] = from_acc<T>(acc_k[m]);
    if (d < p.dv) p.grad_v[item * p.dv + d] = from_acc<T>(acc_v[m]);
  }
}

unsigned slices(int64_t dims, int64_t per_slice) { return static_cast<unsigned>((dims + per_slice - 1) / per_slice); }

}  // namespace

template <typename T>
void graph_attention(const GraphAttentionParams<T>& p) {
  const int64_t items = p.graph.num_rows * p.heads;
  if (items == 0) return;
  dispatch_vector_tile(p.dqk > p.dv ? p.dqk : p.dv, [&](auto g, auto k) {
    constexpr int G = decltype(g)::value, K = decltype(k)::value;
    // At least one slice even when dv == 0: the lse is still written.
    const dim3 grid(blocks_for(items, G), p.dv > 0 ? slices(p.dv, G * K) : 1);
    PK_LAUNCH(grid, kBlockThreads, 0, p.stream, forward_kernel<T, G, K>)(p);
  });
}

template <typename T>
void graph_attention_backward(const GraphAttentionBackwardParams<T>& p) {
  const int64_t target_items = p.graph.num_rows * p.heads, source_items = p.transpose.num_rows * p.heads;
  const int64_t widest = p.dqk > p.dv ? p.dqk : p.dv;
  dispatch_vector_tile(widest, [&](auto g, auto k) {
    constexpr int G = decltype(g)::value, K = decltype(k)::value;
    // At least one slice even when dqk == 0: the per-edge p and d score are still written.
    if (target_items > 0) {
      const dim3 grid(blocks_for(target_items, G), p.dqk > 0 ? slices(p.dqk, G * K) : 1);
      PK_LAUNCH(grid, kBlockThreads, 0, p.stream, target_pass_kernel<T, G, K>)(p);
    }
    if (source_items > 0 && widest > 0) {
      const dim3 grid(blocks_for(source_items, G), slices(widest, G * K));
      PK_LAUNCH(grid, kBlockThreads, 0, p.stream, source_pass_kernel<T, G, K>)(p);
    }
  });
}

PK_CUDA_INSTANTIATE_FLOATS(graph_attention, GraphAttentionParams);
PK_CUDA_INSTANTIATE_FLOATS(graph_attention_backward, GraphAttentionBackwardParams);

}  // namespace pk::cuda
