// Per-edge dot products. One lane group per (target row, head): the group's slice of a[i, h] stays in
// L1 while the row's edges stream past, each dot reduced across the group's lanes.
#include "common/cuda_utils.cuh"
#include "graph/graph_cuda.h"

namespace pk::cuda {
namespace {

template <typename T, int G, int V>
__global__ void __launch_bounds__(kBlockThreads) sddmm_kernel(SddmmParams<T> p) {
  using A = acc_t<T>;
  const LaneGroup<G> group;
  const index_t item = LaneGroup<G>::id();
  if (item >= p.graph.num_rows * p.heads) return;
  const index_t row = item / p.heads, h = item % p.heads;
  const index_t hf = p.heads * p.feats;
  const T* a = p.a + row * hf + h * p.feats;
  for_each_edge(group, p.graph.col, nullptr, p.graph.rowptr[row], p.graph.rowptr[row + 1],
                [&](index_t e, int64_t j, int64_t) {
    const T* b = p.b + j * hf + h * p.feats;
    A partial = 0;
    for (index_t f = group.lane * V; f < p.feats; f += G * V) {
      const Vec<T, V> av = load_vec<V>(a + f), bv = load_vec<V>(b + f);
#pragma unroll
      for (int k = 0; k < V; ++k) partial += to_acc(av.v[k]) * to_acc(bv.v[k]);
    }
    const A dot = group.sum(partial);
    if (group.lane == 0) p.out[e * p.heads + h] = from_acc<T>(dot);
  });
}

template <typename T, int V>
void launch(const SddmmParams<T>& p, int64_t items) {
  dispatch_group_size(group_size_for((p.feats + V - 1) / V), [&](auto g) {
    constexpr int G = decltype(g)::value;
    PK_LAUNCH(blocks_for(items, G), kBlockThreads, 0, p.stream, sddmm_kernel<T, G, V>)(p);
  });
}

}  // namespace

template <typename T>
void sddmm(const SddmmParams<T>& p) {
  // Runs even when feats == 0: every edge then gets a zero.
  const int64_t items = p.graph.num_rows * p.heads;
  if (items == 0) return;
  if (p.feats % 4 == 0 && is_aligned(p.a, 4 * sizeof(T)) && is_aligned(p.b, 4 * sizeof(T)))
    launch<T, 4>(p, items);
  else
    launch<T, 1>(p, items);
}

PK_CUDA_INSTANTIATE_FLOATS(sddmm, SddmmParams);

}  // namespace pk::cuda
