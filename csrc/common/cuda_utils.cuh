// Device helpers shared by the CUDA engines: conversions to the accumulation type, vector loads, and
// lane groups. Torch-free, so kernel files build under plain nvcc.
//
// A lane group is G consecutive lanes of one warp (G a power of two up to 32) that own one work item
// (a row, or a (row, head) pair) together. Small feature sizes or low degrees would leave most of a
// warp idle; splitting the warp keeps the lanes busy without changing the kernel's shape.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "common/pk_common.h"

namespace pk::cuda {

constexpr int kWarpSize = 32;
// Eight warps per block. Kernels declare __launch_bounds__(kBlockThreads) so ptxas budgets registers
// for exactly this size (it may trade a few bytes of L1-resident spill for occupancy).
constexpr int kBlockThreads = 256;

// The seams the emulation build (csrc/emulation/cuda_emulation.h, force-included first) replaces: every launch
// is PK_LAUNCH(grid, block, smem, stream, kernel)(args...), and kernels reach dynamic shared memory through
// dynamic_shared_memory(). The kernel comes last because a template-id's commas would split a macro argument.
#if defined(PK_CUDA_EMULATION)
__device__ __forceinline__ unsigned char* dynamic_shared_memory() { return ::pk::emu::dynamic_shared_memory(); }
#else
#define PK_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
__device__ __forceinline__ unsigned char* dynamic_shared_memory() {
  extern __shared__ __align__(16) unsigned char smem[];
  return smem;
}
#endif

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round-to-nearest-even, like the CPU engine's static_cast to c10::Half / c10::BFloat16.
template <typename T, typename A>
__device__ __forceinline__ T from_acc(A v) {
  if constexpr (std::is_same_v<T, __half>)
    return __float2half_rn(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __float2bfloat16_rn(v);
  else
    return static_cast<T>(v);
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

template <int G>
struct LaneGroup {
  static_assert(G >= 1 && G <= kWarpSize && (G & (G - 1)) == 0, "group size must be a power of two <= 32");
  int lane;       // 0 .. G-1
  unsigned mask;  // this group's lanes within the warp, for the *_sync intrinsics

  __device__ __forceinline__ LaneGroup()
      : lane(static_cast<int>(threadIdx.x % G)),
        mask(G == kWarpSize ? 0xffffffffu : ((1u << G) - 1u) << (threadIdx.x % kWarpSize / G * G)) {}

  // Which work item this group owns. Blocks are whole warps, so a group never straddles two warps.
  __device__ __forceinline__ static index_t id() {
    return (static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x) / G;
  }

  template <typename V>
  __device__ __forceinline__ V broadcast(V v, int src) const {
    return __shfl_sync(mask, v, src, G);
  }

  // Butterfly sum: every lane ends with the same bits, because each step adds the same two partials
  // and IEEE addition is commutative. Lanes may therefore branch on the result without diverging.
  template <typename V>
  __device__ __forceinline__ V sum(V v) const {
#pragma unroll
    for (int offset = G / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(mask, v, offset, G);
    return v;
  }
};

// Calls visit(t, col[t], perm ? perm[t] : t) for t in [begin, end), in order. The group loads G edges
// at once (one coalesced load per index array) and broadcasts them, so no feature load waits on its own
// index load. kUnroll > 1 lets the feature loads of several edges be in flight together; it pays only
// where visit is a short unconditional load-and-accumulate, and elsewhere only costs registers.
template <int kUnroll = 1, int G, typename Visit>
__device__ __forceinline__ void for_each_edge(const LaneGroup<G>& group, const int64_t* col, const int64_t* perm,
                                              index_t begin, index_t end, Visit&& visit) {
  for (index_t base = begin; base < end; base += G) {
    const index_t mine = base + group.lane;
    const int64_t c = mine < end ? __ldg(col + mine) : 0;
    const int64_t e = perm && mine < end ? __ldg(perm + mine) : 0;
    const int batch = end - base < G ? static_cast<int>(end - base) : G;
#pragma unroll kUnroll
    for (int k = 0; k < batch; ++k)
      visit(base + k, group.broadcast(c, k), perm ? group.broadcast(e, k) : base + k);
  }
}

// A row vector of length n spread over a lane group: lane l holds elements l, l + G, ..., l + (K-1) G
// in registers, so the group's loads are coalesced and the row is read from memory once. Rows longer
// than G*K stay in memory and are reread per use (L1-hot, since the group reuses them edge after edge).
template <typename T, int G, int K>
struct RowFragment {
  using A = decltype(to_acc(std::declval<T>()));
  A v[K];
  const T* row;
  index_t n;
  bool cached;

  __device__ __forceinline__ RowFragment(const T* row_, index_t n_, int lane) : row(row_), n(n_), cached(n_ <= G * K) {
#pragma unroll
    for (int m = 0; m < K; ++m) {
      const index_t d = m * G + lane;
      v[m] = cached && d < n ? to_acc(row[d]) : A(0);
    }
  }

  // This lane's share of dot(row, other); LaneGroup::sum completes it.
  __device__ __forceinline__ A partial_dot(const T* other, int lane) const {
    A s = 0;
    if (cached) {
#pragma unroll
      for (int m = 0; m < K; ++m) {
        const index_t d = m * G + lane;
        if (d < n) s += v[m] * to_acc(other[d]);
      }
    } else {
      for (index_t d = lane; d < n; d += G) s += to_acc(row[d]) * to_acc(other[d]);
    }
    return s;
  }
};

// Runs f(G, K) (as integral constants) with G lanes of K values each covering min(n, 256) elements:
// head dims up to 256 fit a group's registers in one slice; longer ones are split over slices.
template <typename F>
void dispatch_vector_tile(int64_t n, F&& f) {
  using std::integral_constant;
  if (n <= 8) return f(integral_constant<int, 8>{}, integral_constant<int, 1>{});
  if (n <= 16) return f(integral_constant<int, 16>{}, integral_constant<int, 1>{});
  if (n <= 32) return f(integral_constant<int, 32>{}, integral_constant<int, 1>{});
  if (n <= 64) return f(integral_constant<int, 32>{}, integral_constant<int, 2>{});
  if (n <= 128) return f(integral_constant<int, 32>{}, integral_constant<int, 4>{});
  return f(integral_constant<int, 32>{}, integral_constant<int, 8>{});
}

// Smallest supported group size (4, 8, 16, 32) covering n work units per item.
inline int group_size_for(int64_t n) {
  int g = 4;
  while (g < kWarpSize && g < n) g *= 2;
  return g;
}

// Runs f(std::integral_constant<int, G>{}) for the runtime group size g from group_size_for.
template <typename F>
void dispatch_group_size(int g, F&& f) {
  switch (g) {
    case 4: return f(std::integral_constant<int, 4>{});
    case 8: return f(std::integral_constant<int, 8>{});
    case 16: return f(std::integral_constant<int, 16>{});
    default: return f(std::integral_constant<int, 32>{});
  }
}

inline unsigned blocks_for(int64_t items, int64_t threads_per_item) {
  return static_cast<unsigned>((items * threads_per_item + kBlockThreads - 1) / kBlockThreads);
}

// gridDim.y and gridDim.z are at most 65535: a y extent that may exceed it (feature tiles: H * F / (G * V)
// passes 65535 near 2.1M features) is split over y and z, and the kernel reads its tile from tile_y().
inline dim3 grid_with_y_tiles(unsigned x, int64_t y_tiles) {
  const int64_t y = y_tiles < 65535 ? y_tiles : 65535;
  return dim3(x, static_cast<unsigned>(y), static_cast<unsigned>((y_tiles + y - 1) / y));
}
// The last z slice may hold tiles past the end; their lanes find f >= H * F and stay inactive.
__device__ __forceinline__ int64_t tile_y() {
  return static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y;
}

inline bool is_aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

}  // namespace pk::cuda

// Explicit instantiations of a host entry point `void FN<T>(const PARAMS<T>&)` for every float dtype.
#define PK_CUDA_INSTANTIATE_FLOATS(FN, PARAMS)                          \
  template void FN<float>(const PARAMS<float>&);                        \
  template void FN<double>(const PARAMS<double>&);                      \
  template void FN<__half>(const PARAMS<__half>&);                      \
  template void FN<__nv_bfloat16>(const PARAMS<__nv_bfloat16>&)
