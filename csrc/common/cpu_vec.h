// Inner loops of the CPU engines. They are written as plain loops over contiguous memory and compiled
// once per ISA (function multi-versioning), so one wheel runs on any x86-64 and uses AVX2/AVX-512 where
// the CPU has them; the loader picks the clone at startup.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

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
// blocking is explicit in every clone.
namespace pk::cpu {

// kBytes-wide vectors of A: 64 bytes (one zmm register, two ymm in the AVX2 clone) or 32.
template <typename A, int kBytes = 64>
struct Vec {
  typedef A type __attribute__((vector_size(kBytes)));
  typedef A unaligned __attribute__((vector_size(kBytes), aligned(sizeof(A)), may_alias));
};

// Elements per 64-byte vector: score tiles are padded to multiples of it.
template <typename A>
constexpr int64_t kLanes = 64 / sizeof(A);
// Elements per 32-byte vector: gemm widths (head dims) are padded to multiples of it, so 40 pads to 48
// and not to 64.
template <typename A>
constexpr int64_t kHalfLanes = 32 / sizeof(A);

inline int64_t round_up_lanes(int64_t n, int64_t lanes) { return (n + lanes - 1) / lanes * lanes; }

// 4 rows x 2 vectors: 8 independent accumulators hide the FMA latency, and with the two B vectors and
// the broadcast they fit AVX-512's registers (the AVX2 clone spills a few).
constexpr int kTileRows = 4;

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

// Column panels of two 64-byte vectors, then at most one of one vector and one of a 32-byte vector.
// The narrow panel takes twice the rows to keep eight accumulators in flight.
template <typename A>
__attribute__((always_inline)) inline void gemm_impl(int64_t M, int64_t N, int64_t K, const A* a, int64_t ars,
                                                     int64_t aks, const A* b, int64_t ldb, A* c, int64_t ldc,
                                                     bool accumulate) {
  constexpr int64_t L = kLanes<A>;
  int64_t j = 0;
  for (; j + 2 * L <= N; j += 2 * L)
    gemm_panel<kTileRows, 2, 64>(M, K, a, ars, aks, b + j, ldb, c + j, ldc, accumulate);
  if (j + L <= N) {
    gemm_panel<kTileRows, 1, 64>(M, K, a, ars, aks, b + j, ldb, c + j, ldc, accumulate);
    j += L;
  }
  if (j < N) gemm_panel<2 * kTileRows, 1, 32>(M, K, a, ars, aks, b + j, ldb, c + j, ldc, accumulate);
}

// C[0:M, 0:N] (+)= A[0:M, 0:K] B[0:K, 0:N] with A(r, k) = a[r * ars + k * aks] (either orientation),
// B and C row-major, N a multiple of kHalfLanes.
PK_CPU_CLONES inline void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t ars, int64_t aks,
                               const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  gemm_impl(M, N, K, a, ars, aks, b, ldb, c, ldc, accumulate);
}
PK_CPU_CLONES inline void gemm(int64_t M, int64_t N, int64_t K, const double* a, int64_t ars, int64_t aks,
                               const double* b, int64_t ldb, double* c, int64_t ldc, bool accumulate) {
  gemm_impl(M, N, K, a, ars, aks, b, ldb, c, ldc, accumulate);
}

// v = v + w or max(v, w). Vectors travel by reference: passing or returning them by value would give the
// default and the AVX-512 clones different ABIs.
template <bool kMax>
__attribute__((always_inline)) inline void combine(Vec<float>::type& v, const Vec<float>::type& w) {
  if constexpr (kMax)
    v = v > w ? v : w;
  else
    v += w;
}

// Horizontal sum or max of 16 floats in four halving steps rather than sixteen dependent scalar ones.
template <bool kMax>
__attribute__((always_inline)) inline float reduce16(Vec<float>::type& v) {
  combine<kMax>(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  combine<kMax>(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  combine<kMax>(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  combine<kMax>(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
  return v[0];
}

// max of x[0:n], n a multiple of kLanes. Compare-and-select lanes, because a max reduction is not
// vectorised without -ffast-math.
PK_CPU_CLONES inline float max_lanes(const float* x, int64_t n) {
  using V = Vec<float>::type;
  using U = Vec<float>::unaligned;
  V m = V{} - INFINITY;
  for (int64_t j = 0; j < n; j += kLanes<float>) combine<true>(m, *reinterpret_cast<const U*>(x + j));
  return reduce16<true>(m);
}
inline double max_lanes(const double* x, int64_t n) {
  double s = -INFINITY;
  for (int64_t j = 0; j < n; ++j) s = x[j] > s ? x[j] : s;
  return s;
}

// x[0:n] = exp(x[0:n] - shift), returning the sum; n a multiple of kLanes. float: Cephes' expf polynomial
// after reducing by round(x / ln 2), within 2 ulp; -inf (and anything below log(FLT_MIN)) gives 0, NaN stays
// NaN. double keeps libm's exp so that float64 results match the reference to rounding.
PK_CPU_CLONES inline float exp_sum(float* x, float shift, int64_t n) {
  using V = Vec<float>::type;
  using U = Vec<float>::unaligned;
  using I = Vec<int32_t>::type;
  // Adding 1.5 * 2^23 rounds to an integer that lands in the low mantissa bits, whose pattern is then
  // 0x4B400000 + k; 127 - 0x4B400000 turns that into the biased exponent of 2^k.
  const V magic = V{} + 12582912.f, lowest = V{} - 87.3365448f;
  const int32_t to_exponent = 127 - 0x4B400000;
  V sum{};
  for (int64_t j = 0; j < n; j += kLanes<float>) {
    const V x0 = *reinterpret_cast<const U*>(x + j) - shift;
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
    const V y = x0 < lowest ? V{} : p * __builtin_bit_cast(V, e);
    *reinterpret_cast<U*>(x + j) = y;
    sum += y;
  }
  return reduce16<false>(sum);
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
