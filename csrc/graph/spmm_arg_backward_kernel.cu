// Backward of spmm max/min. grad_x walks the transpose so each group owns a slice of one source row,
// and grad_weight walks target rows, whose edges belong to that row alone: both are atomic-free and
// deterministic, like the CPU engine.
#include "common/cuda_utils.cuh"
#include "graph/graph_cuda.h"

namespace pk::cuda {
namespace {

template <int V>
__device__ __forceinline__ bool any_equal(const Vec<int64_t, V>& won, int64_t e) {
  bool any = false;
#pragma unroll
  for (int k = 0; k < V; ++k) any |= won.v[k] == e;
  return any;
}

// One group per (source row, slice of G*V features): sums w * grad_out over the edges that won.
template <typename T, int G, int V>
__global__ void __launch_bounds__(kBlockThreads) grad_x_kernel(SpmmArgBackwardParams<T> p) {
  using A = acc_t<T>;
  const LaneGroup<G> group;
  const index_t src = LaneGroup<G>::id();
  if (src >= p.transpose.num_rows) return;
  const index_t hf = p.heads * p.feats;
  const index_t f = (static_cast<index_t>(tile_y()) * G + group.lane) * V;
  const bool active = f < hf;
  const index_t h = f / p.feats;
  A acc[V] = {};
  for_each_edge(group, p.transpose.col, p.perm_t, p.transpose.rowptr[src], p.transpose.rowptr[src + 1],
                [&](index_t, int64_t i, int64_t e) {
    if (!active) return;
    const Vec<int64_t, V> won = load_vec<V>(p.arg + i * hf + f);
    // Most edges lose every feature; skip their gradient and weight loads.
    if (!any_equal(won, e)) return;
    const A w = p.weight ? to_acc(__ldg(p.weight + e * p.heads + h)) : A(1);
    const Vec<T, V> g = load_vec<V>(p.grad_out + i * hf + f);
#pragma unroll
    for (int k = 0; k < V; ++k)
      if (won.v[k] == e) acc[k] += w * to_acc(g.v[k]);
  });
  if (!active) return;
  Vec<T, V> o;
#pragma unroll
  for (int k = 0; k < V; ++k) o.v[k] = from_acc<T>(acc[k]);
  store_vec<V>(p.grad_x + src * hf + f, o);
}

// One group per (target row, head), lanes over features: for each edge of the row, sums
// grad_out * x over the features that edge won and writes grad_weight[e, h].
template <typename T, int G, int V>
__global__ void __launch_bounds__(kBlockThreads) grad_weight_kernel(SpmmArgBackwardParams<T> p) {
  using A = acc_t<T>;
  const LaneGroup<G> group;
  const index_t item = LaneGroup<G>::id();
  if (item >= p.graph.num_rows * p.heads) return;
  const index_t row = item / p.heads, h = item % p.heads;
  const index_t hf = p.heads * p.feats, head_offset = h * p.feats;
  const int64_t* arg = p.arg + row * hf + head_offset;
  const T* grad = p.grad_out + row * hf + head_offset;
  for_each_edge(group, p.graph.col, nullptr, p.graph.rowptr[row], p.graph.rowptr[row + 1],
                [&](index_t e, int64_t j, int64_t) {
    A partial = 0;
    for (index_t f = group.lane * V; f < p.feats; f += G * V) {
      const Vec<int64_t, V> won = load_vec<V>(arg + f);
      if (!any_equal(won, e)) continue;
      const Vec<T, V> g = load_vec<V>(grad + f);
      const Vec<T, V> xj = load_vec<V>(p.x + j * hf + head_offset + f);
#pragma unroll
      for (int k = 0; k < V; ++k)
        if (won.v[k] == e) partial += to_acc(g.v[k]) * to_acc(xj.v[k]);
    }
    const A total = group.sum(partial);
    if (group.lane == 0) p.grad_weight[e * p.heads + h] = from_acc<T>(total);
  });
}

template <typename T, int V>
void launch(const SpmmArgBackwardParams<T>& p) {
  const int64_t hf = p.heads * p.feats;
  if (p.transpose.num_rows > 0 && hf > 0)
    dispatch_group_size(group_size_for((hf + V - 1) / V), [&](auto g) {
      constexpr int G = decltype(g)::value;
      const dim3 grid = grid_with_y_tiles(blocks_for(p.transpose.num_rows, G), (hf + G * V - 1) / (G * V));
      PK_LAUNCH(grid, kBlockThreads, 0, p.stream, grad_x_kernel<T, G, V>)(p);
    });
  // Runs even when feats == 0: every edge then gets a zero weight gradient.
  if (p.grad_weight && p.graph.num_rows * p.heads > 0)
    dispatch_group_size(group_size_for((p.feats + V - 1) / V), [&](auto g) {
      constexpr int G = decltype(g)::value;
      PK_LAUNCH(blocks_for(p.graph.num_rows * p.heads, G), kBlockThreads, 0, p.stream, grad_weight_kernel<T, G, V>)(p);
    });
}

}  // namespace

template <typename T>
void spmm_arg_backward(const SpmmArgBackwardParams<T>& p) {
  const bool vectorise = p.feats % 4 == 0 && is_aligned(p.x, 4 * sizeof(T)) &&
                         is_aligned(p.grad_out, 4 * sizeof(T)) && is_aligned(p.grad_x, 4 * sizeof(T)) &&
                         is_aligned(p.arg, 4 * sizeof(int64_t));
  if (vectorise)
    launch<T, 4>(p);
  else
    launch<T, 1>(p);
}

PK_CUDA_INSTANTIATE_FLOATS(spmm_arg_backward, SpmmArgBackwardParams);

}  // namespace pk::cuda
