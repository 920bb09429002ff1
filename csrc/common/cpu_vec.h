// Inner loops of the CPU engines. They are written as plain loops over contiguous memory and compiled
// once per ISA (function multi-versioning), so one wheel runs on any x86-64 and uses AVX2/AVX-512 where
// the CPU has them; the loader picks the clone at startup.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PK_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PK_CPU_CLONES
#endif

namespace pk::cpu {

// fp16/bf16 are accumulated in float, like ATen's opmath_type.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
inline acc_t<T> to_acc(T v) {
  return static_cast<acc_t<T>>(v);
}

// acc[0:n] += w * x[0:n]
PK_CPU_CLONES inline void axpy(float* __restrict acc, float w, const float* __restrict x, int64_t n) {
  for (int64_t f = 0; f < n; ++f) acc[f] += w * x[f];
}
PK_CPU_CLONES inline void axpy(double* __restrict acc, double w, const double* __restrict x, int64_t n) {
  for (int64_t f = 0; f < n; ++f) acc[f] += w * x[f];
}
template <typename T>
inline void axpy(float* __restrict acc, float w, const T* __restrict x, int64_t n) {
  for (int64_t f = 0; f < n; ++f) acc[f] += w * static_cast<float>(x[f]);
}

// acc[0:n] *= s
PK_CPU_CLONES inline void scale(float* __restrict acc, float s, int64_t n) {
  for (int64_t f = 0; f < n; ++f) acc[f] *= s;
}
PK_CPU_CLONES inline void scale(double* __restrict acc, double s, int64_t n) {
  for (int64_t f = 0; f < n; ++f) acc[f] *= s;
}

// sum a[0:n] * b[0:n]
// Sixteen independent partial sums: a single running sum is a loop-carried dependency that the
// compiler may not reassociate, so it would stay scalar.
template <typename A>
inline A dot_lanes(const A* __restrict a, const A* __restrict b, int64_t n) {
  constexpr int64_t kLanes = 16;
  A lanes[kLanes] = {};
  int64_t f = 0;
  for (; f + kLanes <= n; f += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[f + l] * b[f + l];
  A s = 0;
  for (; f < n; ++f) s += a[f] * b[f];
  for (int64_t l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}
PK_CPU_CLONES inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  return dot_lanes(a, b, n);
}
PK_CPU_CLONES inline double dot(const double* __restrict a, const double* __restrict b, int64_t n) {
  return dot_lanes(a, b, n);
}
template <typename T>
inline float dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  float s = 0.f;
  for (int64_t f = 0; f < n; ++f) s += static_cast<float>(a[f]) * static_cast<float>(b[f]);
  return s;
}
template <typename T>
inline float dot(const float* __restrict a, const T* __restrict b, int64_t n) {
  float s = 0.f;
  for (int64_t f = 0; f < n; ++f) s += a[f] * static_cast<float>(b[f]);
  return s;
}

template <typename T, typename A>
inline void store(T* __restrict out, const A* __restrict acc, A s, int64_t n) {
  for (int64_t f = 0; f < n; ++f) out[f] = static_cast<T>(acc[f] * s);
}

}  // namespace pk::cpu

// ---------------------------------------------------------------------------------------------------
// Dense tiles (the attention engines), written with GCC/Clang vector extensions so that the register
// blocking is explicit. GCC compiles generic vectors wider than the target's registers into stack round
// trips, so these are not target_clones: each ISA gets its own instantiation with the vector width its
// registers hold (64 bytes with AVX-512, 32 with AVX2 + FMA, 16 otherwise), picked once per process.
namespace pk::cpu {

template <typename A, int kBytes>
struct Vec {
  typedef A type __attribute__((vector_size(kBytes)));
  typedef A unaligned __attribute__((vector_size(kBytes), aligned(sizeof(A)), may_alias));
};

// Requests the first bytes of a row that a loop reads a few iterations later (up to 1 KiB, in cache lines).
// Gathers of rows named by an index array wait on memory; the hardware prefetchers follow sequential
// streams only, and once a row has started they fetch the rest of it themselves.
inline void prefetch_row(const void* row, int64_t bytes) {
  constexpr int64_t kLine = 64, kMaxBytes = 1024;
  const char* p = static_cast<const char*>(row);
  for (int64_t offset = 0; offset < bytes && offset < kMaxBytes; offset += kLine) __builtin_prefetch(p + offset);
}

// Score tiles are padded to the widest vector, gemm widths (head dims) to 32 bytes, so 40 floats pad
// to 48 and not to 64.
template <typename A>
constexpr int64_t kLanes = 64 / sizeof(A);
template <typename A>
constexpr int64_t kHalfLanes = 32 / sizeof(A);

inline int64_t round_up_lanes(int64_t n, int64_t lanes) { return (n + lanes - 1) / lanes * lanes; }

namespace tile {

// 4 rows x 2 vectors: 8 independent accumulators hide the FMA latency, and with the two B vectors and
// the broadcast they fit in 16 registers.
constexpr int kRows = 4;

// C[0:MR, 0:NV*lanes] (+)= A[0:MR, 0:K] B[0:K, 0:NV*lanes], the accumulators held in registers.
template <int MR, int NV, int kBytes, typename A>
__attribute__((always_inline)) inline void gemm_tile(int64_t K, const A* a, int64_t ars, int64_t aks, const A* b,
                                                     int64_t ldb, A* c, int64_t ldc, bool accumulate) {
  using V = typename Vec<A, kBytes>::type;
  using U = typename Vec<A, kBytes>::unaligned;
  constexpr int64_t L = kBytes / sizeof(A);
  V acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? V(*reinterpret_cast<const U*>(c + r * ldc + v * L)) : V{};
  for (int64_t k = 0; k < K; ++k) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = *reinterpret_cast<const U*>(b + k * ldb + v * L);
    for (int r = 0; r < MR; ++r) {
      const A x = a[r * ars + k * aks];
      for (int v = 0; v < NV; ++v) acc[r][v] += x * bv[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) *reinterpret_cast<U*>(c + r * ldc + v * L) = acc[r][v];
}

// All M rows of one column panel: full MR-row tiles, then one narrower tile for the remainder.
template <int MR, int NV, int kBytes, typename A>
__attribute__((always_inline)) inline void gemm_panel(int64_t M, int64_t K, const A* a, int64_t ars, int64_t aks,
                                                      const A* b, int64_t ldb, A* c, int64_t ldc, bool accumulate) {
  int64_t r = 0;
  for (; r + MR <= M; r += MR)
    gemm_tile<MR, NV, kBytes>(K, a + r * ars, ars, aks, b, ldb, c + r * ldc, ldc, accumulate);
  if constexpr (MR > 1)
    if (r < M) gemm_panel<MR - 1, NV, kBytes>(M - r, K, a + r * ars, ars, aks, b, ldb, c + r * ldc, ldc, accumulate);
}

// Column panels of two vectors, then at most one of one vector, then (64-byte vectors only) one of 32
// bytes, which takes twice the rows to keep eight accumulators in flight.
template <int kBytes, typename A>
__attribute__((always_inline)) inline void gemm(int64_t M, int64_t N, int64_t K, const A* a, int64_t ars, int64_t aks,
                                                const A* b, int64_t ldb, A* c, int64_t ldc, bool accumulate) {
  constexpr int64_t L = kBytes / sizeof(A);
  int64_t j = 0;
  for (; j + 2 * L <= N; j += 2 * L)
    gemm_panel<kRows, 2, kBytes>(M, K, a, ars, aks, b + j, ldb, c + j, ldc, accumulate);
  if (j + L <= N) {
    gemm_panel<kRows, 1, kBytes>(M, K, a, ars, aks, b + j, ldb, c + j, ldc, accumulate);
    j += L;
  }
  if constexpr (kBytes > 32)
    if (j < N) gemm_panel<2 * kRows, 1, 32>(M, K, a, ars, aks, b + j, ldb, c + j, ldc, accumulate);
}

// v = v + w or max(v, w). Vectors travel by reference: by value, their ABI would differ between targets.
template <bool kMax, typename V>
__attribute__((always_inline)) inline void combine(V& v, const V& w) {
  if constexpr (kMax)
    v = v > w ? v : w;
  else
    v += w;
}

// Horizontal sum or max: fold the vector onto itself rotated by half, a quarter... of its lanes, so lane 0
// ends with the result after log2(lanes) steps rather than one dependent chain over the lanes.
template <bool kMax, int kShift, typename V, size_t... I>
__attribute__((always_inline)) inline void fold(V& v, std::index_sequence<I...> lanes) {
  if constexpr (kShift > 0) {
    combine<kMax>(v, V(__builtin_shufflevector(v, v, ((I + kShift) % sizeof...(I))...)));
    fold<kMax, kShift / 2>(v, lanes);
  }
}
template <bool kMax, typename V>
__attribute__((always_inline)) inline float reduce(V& v) {
  constexpr int L = sizeof(V) / sizeof(float);
  fold<kMax, L / 2>(v, std::make_index_sequence<L>{});
  return v[0];
}

// Compare-and-select lanes, because a max reduction is not vectorised without -ffast-math.
template <int kBytes>
__attribute__((always_inline)) inline float max(const float* x, int64_t n) {
  using V = typename Vec<float, kBytes>::type;
  using U = typename Vec<float, kBytes>::unaligned;
  V m = V{} - INFINITY;
  for (int64_t j = 0; j < n; j += kBytes / 4) combine<true>(m, V(*reinterpret_cast<const U*>(x + j)));
  return reduce<true>(m);
}

// x = exp(x) lane by lane: Cephes' expf polynomial after reducing by round(x / ln 2), within 2 ulp. -inf
// (and anything below log(FLT_MIN)) gives 0 and NaN stays NaN, which is what softmax needs.
template <typename V>
__attribute__((always_inline)) inline void exp_vec(V& x) {
  const V x0 = x;
  using I = decltype(x0 < x0);
  // Adding 1.5 * 2^23 rounds to an integer that lands in the low mantissa bits, whose pattern is then
  // 0x4B400000 + k; 127 - 0x4B400000 turns that into the biased exponent of 2^k.
  const V magic = V{} + 12582912.f, lowest = V{} - 87.3365448f;
  const int32_t to_exponent = 127 - 0x4B400000;
  const V xc = x0 < lowest ? lowest : x0;
  const V t = xc * 1.44269504f + magic;
  const V k = t - magic;
  const V r = (xc - k * 0.693359375f) - k * -2.12194440e-4f;
  V p = 1.9875691500e-4f * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  const I e = (__builtin_bit_cast(I, t) + to_exponent) << 23;
  x = x0 < lowest ? V{} : p * __builtin_bit_cast(V, e);
}

// x[0:n] = exp(x[0:n] - shift), returning the sum; n a multiple of the vector's lanes.
template <int kBytes>
__attribute__((always_inline)) inline float exp_sum(float* x, float shift, int64_t n) {
  using V = typename Vec<float, kBytes>::type;
  using U = typename Vec<float, kBytes>::unaligned;
  V sum{};
  for (int64_t j = 0; j < n; j += kBytes / 4) {
    V y = V(*reinterpret_cast<const U*>(x + j)) - shift;
    exp_vec(y);
    *reinterpret_cast<U*>(x + j) = y;
    sum += y;
  }
  return reduce<false>(sum);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PK_TILE_X86 1
// The instantiations per ISA; the AVX2 one asks for FMA too, which the plain "avx2" target lacks.
#define PK_TILE_ISA(suffix, flags, bytes)                                                                     \
  template <typename A>                                                                                       \
  __attribute__((target(flags))) void gemm_##suffix(int64_t M, int64_t N, int64_t K, const A* a, int64_t ars, \
                                                    int64_t aks, const A* b, int64_t ldb, A* c, int64_t ldc,  \
                                                    bool accumulate) {                                        \
    gemm<bytes>(M, N, K, a, ars, aks, b, ldb, c, ldc, accumulate);                                            \
  }                                                                                                           \
  __attribute__((target(flags))) inline float max_##suffix(const float* x, int64_t n) {                       \
    return max<bytes>(x, n);                                                                                  \
  }                                                                                                           \
  __attribute__((target(flags))) inline float exp_sum_##suffix(float* x, float shift, int64_t n) {            \
    return exp_sum<bytes>(x, shift, n);                                                                       \
  }
PK_TILE_ISA(avx512, "avx512f", 64)
PK_TILE_ISA(avx2, "avx2,fma", 32)
#undef PK_TILE_ISA

enum class Isa { kAvx512, kAvx2, kBase };
inline Isa isa() {
  static const Isa found = __builtin_cpu_supports("avx512f")                                 ? Isa::kAvx512
                           : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? Isa::kAvx2
                                                                                             : Isa::kBase;
  return found;
}
#endif

}  // namespace tile

// C[0:M, 0:N] (+)= A[0:M, 0:K] B[0:K, 0:N] with A(r, k) = a[r * ars + k * aks] (either orientation),
// B and C row-major, N a multiple of kHalfLanes.
template <typename A>
inline void gemm(int64_t M, int64_t N, int64_t K, const A* a, int64_t ars, int64_t aks, const A* b, int64_t ldb,
                 A* c, int64_t ldc, bool accumulate) {
#ifdef PK_TILE_X86
  switch (tile::isa()) {
    case tile::Isa::kAvx512: return tile::gemm_avx512(M, N, K, a, ars, aks, b, ldb, c, ldc, accumulate);
    case tile::Isa::kAvx2: return tile::gemm_avx2(M, N, K, a, ars, aks, b, ldb, c, ldc, accumulate);
    case tile::Isa::kBase: break;
  }
#endif
  tile::gemm<16>(M, N, K, a, ars, aks, b, ldb, c, ldc, accumulate);
}

// max of x[0:n], n a multiple of kLanes.
inline float max_lanes(const float* x, int64_t n) {
#ifdef PK_TILE_X86
  switch (tile::isa()) {
    case tile::Isa::kAvx512: return tile::max_avx512(x, n);
    case tile::Isa::kAvx2: return tile::max_avx2(x, n);
    case tile::Isa::kBase: break;
  }
#endif
  return tile::max<16>(x, n);
}
inline double max_lanes(const double* x, int64_t n) {
  double s = -INFINITY;
  for (int64_t j = 0; j < n; ++j) s = x[j] > s ? x[j] : s;
  return s;
}

// x[0:n] = exp(x[0:n] - shift), returning the sum; n a multiple of kLanes. double keeps libm's exp so
// that float64 results match the reference to rounding.
inline float exp_sum(float* x, float shift, int64_t n) {
#ifdef PK_TILE_X86
  switch (tile::isa()) {
    case tile::Isa::kAvx512: return tile::exp_sum_avx512(x, shift, n);
    case tile::Isa::kAvx2: return tile::exp_sum_avx2(x, shift, n);
    case tile::Isa::kBase: break;
  }
#endif
  return tile::exp_sum<16>(x, shift, n);
}
inline double exp_sum(double* x, double shift, int64_t n) {
  double s = 0;
  for (int64_t j = 0; j < n; ++j) s += (x[j] = std::exp(x[j] - shift));
  return s;
}

// x[0:n] = p[0:n] * (x[0:n] - c): the softmax backward of one row given its correction term c.
PK_CPU_CLONES inline void softmax_grad(float* __restrict x, const float* __restrict p, float c, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = p[j] * (x[j] - c);
}
PK_CPU_CLONES inline void softmax_grad(double* __restrict x, const double* __restrict p, double c, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = p[j] * (x[j] - c);
}

}  // namespace pk::cpu
