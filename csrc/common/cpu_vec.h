// Inner loops of the CPU engines. They are written as plain loops over contiguous memory and compiled
// once per ISA (function multi-versioning), so one wheel runs on any x86-64 and uses AVX2/AVX-512 where
// the CPU has them; the loader picks the clone at startup.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

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
