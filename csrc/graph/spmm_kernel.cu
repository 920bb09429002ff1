// CSR times dense. One lane group owns (target row, slice of G*V features) and each lane V adjacent
// features of one head, so x rows are read in coalesced (and, when feats % 4 == 0, vector) loads. A row
// is reduced by one group in edge order: no atomics, the result does not depend on scheduling, and
// max/min ties and NaNs resolve exactly as in the CPU engine.
#include "common/cuda_utils.cuh"
#include "graph/graph_cuda.h"

namespace pk::cuda {
namespace {

template <typename T, int G, int V>
__global__ void __launch_bounds__(kBlockThreads) spmm_sum_kernel(SpmmParams<T> p, bool mean) {
  using A = acc_t<T>;
  const LaneGroup<G> group;
  const index_t row = LaneGroup<G>::id();
  if (row >= p.graph.num_rows) return;
  const index_t hf = p.heads * p.feats;
  const index_t f = (static_cast<index_t>(tile_y()) * G + group.lane) * V;
  const bool active = f < hf;
  const index_t h = f / p.feats;
  const index_t begin = p.graph.rowptr[row], end = p.graph.rowptr[row + 1];
  A acc[V] = {};
  for_each_edge<4>(group, p.graph.col, nullptr, begin, end, [&](index_t e, int64_t j, int64_t) {
    if (!active) return;
    const A w = p.weight ? to_acc(__ldg(p.weight + e * p.heads + h)) : A(1);
    const Vec<T, V> xj = load_vec<V>(p.x + j * hf + f);
#pragma unroll
    for (int k = 0; k < V; ++k) acc[k] += w * to_acc(xj.v[k]);
  });
  if (!active) return;
  const index_t deg = end - begin;
  const A s = (mean && deg > 0) ? A(1) / A(deg) : A(1);
  Vec<T, V> o;
#pragma unroll
  for (int k = 0; k < V; ++k) o.v[k] = from_acc<T>(acc[k] * s);
  store_vec<V>(p.out + row * hf + f, o);
}

template <typename T, int G, int V>
__global__ void __launch_bounds__(kBlockThreads) spmm_arg_kernel(SpmmParams<T> p, bool is_max) {
  using A = acc_t<T>;
  const LaneGroup<G> group;
  const index_t row = LaneGroup<G>::id();
  if (row >= p.graph.num_rows) return;
  const index_t hf = p.heads * p.feats;
  const index_t f = (static_cast<index_t>(tile_y()) * G + group.lane) * V;
  const bool active = f < hf;
  const index_t h = f / p.feats;
  A best[V];
  Vec<int64_t, V> arg;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    best[k] = is_max ? A(-INFINITY) : A(INFINITY);
    arg.v[k] = -1;
  }
  for_each_edge<4>(group, p.graph.col, nullptr, p.graph.rowptr[row], p.graph.rowptr[row + 1],
                [&](index_t e, int64_t j, int64_t) {
    if (!active) return;
    const A w = p.weight ? to_acc(__ldg(p.weight + e * p.heads + h)) : A(1);
    const Vec<T, V> xj = load_vec<V>(p.x + j * hf + f);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const A v = w * to_acc(xj.v[k]);
      // Strict comparison keeps the first edge on ties; a NaN wins once and then sticks, as in torch.
      if (isnan(best[k])) continue;
      const bool better = is_max ? v > best[k] : v < best[k];
      if (arg.v[k] < 0 || better || isnan(v)) {
        best[k] = v;
        arg.v[k] = e;
      }
    }
  });
  if (!active) return;
  Vec<T, V> o;
#pragma unroll
  for (int k = 0; k < V; ++k) o.v[k] = from_acc<T>(arg.v[k] < 0 ? A(0) : best[k]);
  store_vec<V>(p.out + row * hf + f, o);
  store_vec<V>(p.arg + row * hf + f, arg);
}

template <typename T, int V>
void launch(const SpmmParams<T>& p, int64_t hf) {
  dispatch_group_size(group_size_for((hf + V - 1) / V), [&](auto g) {
    constexpr int G = decltype(g)::value;
    const dim3 grid = grid_with_y_tiles(blocks_for(p.graph.num_rows, G), (hf + G * V - 1) / (G * V));
    if (p.reduce == Reduce::kMax || p.reduce == Reduce::kMin)
      PK_LAUNCH(grid, kBlockThreads, 0, p.stream, spmm_arg_kernel<T, G, V>)(p, p.reduce == Reduce::kMax);
    else
      PK_LAUNCH(grid, kBlockThreads, 0, p.stream, spmm_sum_kernel<T, G, V>)(p, p.reduce == Reduce::kMean);
  });
}

}  // namespace

template <typename T>
void spmm(const SpmmParams<T>& p) {
  const int64_t hf = p.heads * p.feats;
  if (p.graph.num_rows == 0 || hf == 0) return;
  const bool with_arg = p.reduce == Reduce::kMax || p.reduce == Reduce::kMin;
  const bool vectorise = p.feats % 4 == 0 && is_aligned(p.x, 4 * sizeof(T)) && is_aligned(p.out, 4 * sizeof(T)) &&
                         (!with_arg || is_aligned(p.arg, 4 * sizeof(int64_t)));
  if (vectorise)
    launch<T, 4>(p, hf);
  else
    launch<T, 1>(p, hf);
}

PK_CUDA_INSTANTIATE_FLOATS(spmm, SpmmParams);

}  // namespace pk::cuda
