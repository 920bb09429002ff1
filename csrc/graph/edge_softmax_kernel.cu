// Softmax over each target's incoming edges, per head, and its backward. One lane group per
// (target row, head), lanes striding over the row's edges; groups of one row sit side by side, so a
// warp's loads of scores[e, h] for consecutive h share cache lines. The group size follows the average
// degree: a whole warp on a degree-3 row would leave most lanes idle.
#include "common/cuda_utils.cuh"
#include "common/online_softmax.h"
#include "graph/graph_cuda.h"

namespace pk::cuda {
namespace {

// A NaN score makes the max NaN, and with it the row's weights, as torch.softmax (and the CPU engine) do;
// a NaN partial stays NaN whichever side it comes from, so combining partials in any order agrees.
template <typename A>
__device__ __forceinline__ A max_keeping_nan(A m, A s) {
  return m < s || s != s ? s : m;
}

template <int G, typename A>
__device__ __forceinline__ A group_max(const LaneGroup<G>& group, A m) {
#pragma unroll
  for (int offset = G / 2; offset > 0; offset /= 2)
    m = max_keeping_nan(m, __shfl_xor_sync(group.mask, m, offset, G));
  return m;
}

template <typename T, int G>
__global__ void __launch_bounds__(kBlockThreads) edge_softmax_kernel(EdgeSoftmaxParams<T> p) {
  using A = acc_t<T>;
  const LaneGroup<G> group;
  const index_t item = LaneGroup<G>::id();
  if (item >= p.num_rows * p.heads) return;
  const index_t row = item / p.heads, h = item % p.heads, H = p.heads;
  const index_t begin = p.rowptr[row], end = p.rowptr[row + 1];
  A m = -INFINITY;
  for (index_t e = begin + group.lane; e < end; e += G) m = max_keeping_nan(m, to_acc(p.scores[e * H + h]));
  m = group_max(group, m);
  // A row whose scores are all -inf (or empty) gives zeros, not NaN.
  const bool masked = m == A(-INFINITY);
  A sum = 0;
  if (!masked)
    for (index_t e = begin + group.lane; e < end; e += G) sum += fast_exp(to_acc(p.scores[e * H + h]) - m);
  sum = group.sum(sum);
  const A inv = sum == A(0) ? A(0) : A(1) / sum;
  for (index_t e = begin + group.lane; e < end; e += G)
    p.out[e * H + h] = from_acc<T>((masked ? A(0) : fast_exp(to_acc(p.scores[e * H + h]) - m)) * inv);
}

// d scores = p * (g - sum_row(p * g)), per head.
template <typename T, int G>
__global__ void __launch_bounds__(kBlockThreads) edge_softmax_backward_kernel(EdgeSoftmaxBackwardParams<T> p) {
  using A = acc_t<T>;
  const LaneGroup<G> group;
  const index_t item = LaneGroup<G>::id();
  if (item >= p.num_rows * p.heads) return;
  const index_t row = item / p.heads, h = item % p.heads, H = p.heads;
  const index_t begin = p.rowptr[row], end = p.rowptr[row + 1];
  A dot = 0;
  for (index_t e = begin + group.lane; e < end; e += G) dot += to_acc(p.probs[e * H + h]) * to_acc(p.grad[e * H + h]);
  dot = group.sum(dot);
  for (index_t e = begin + group.lane; e < end; e += G)
    p.out[e * H + h] = from_acc<T>(to_acc(p.probs[e * H + h]) * (to_acc(p.grad[e * H + h]) - dot));
}

}  // namespace

template <typename T>
void edge_softmax(const EdgeSoftmaxParams<T>& p) {
  const int64_t items = p.num_rows * p.heads;
  if (items == 0) return;
  dispatch_group_size(group_size_for(p.num_edges / p.num_rows), [&](auto g) {
    constexpr int G = decltype(g)::value;
    PK_LAUNCH(blocks_for(items, G), kBlockThreads, 0, p.stream, edge_softmax_kernel<T, G>)(p);
  });
}

template <typename T>
void edge_softmax_backward(const EdgeSoftmaxBackwardParams<T>& p) {
  const int64_t items = p.num_rows * p.heads;
  if (items == 0) return;
  dispatch_group_size(group_size_for(p.num_edges / p.num_rows), [&](auto g) {
    constexpr int G = decltype(g)::value;
    PK_LAUNCH(blocks_for(items, G), kBlockThreads, 0, p.stream, edge_softmax_backward_kernel<T, G>)(p);
  });
}

PK_CUDA_INSTANTIATE_FLOATS(edge_softmax, EdgeSoftmaxParams);
PK_CUDA_INSTANTIATE_FLOATS(edge_softmax_backward, EdgeSoftmaxBackwardParams);

}  // namespace pk::cuda
