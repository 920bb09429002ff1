// Scores of a few query rows against keys read row-major where they lie: one dot product per (row, key),
// the keys' rows neither transposed nor padded. For a handful of rows this beats packing k into the
// transposed panels that cpu::gemm reads, which costs as much as the products themselves when each key meets
// one query. Written like cpu_vec.h's tiles: generic vectors, one instantiation per ISA, picked at run time.
#pragma once
#include <cstdint>
#include <utility>

#include "common/cpu_vec.h"

namespace pk::cpu {
namespace tile {

// Sum of v's lanes, folded in place. v travels by reference: by value, its ABI would differ between targets.
template <int kBytes, typename A>
__attribute__((always_inline)) inline A hsum(typename Vec<A, kBytes>::type& v) {
  constexpr int L = kBytes / sizeof(A);
  fold<false, L / 2>(v, std::make_index_sequence<L>{});
  return v[0];
}

// s[r * lds + n] = q[r] . k[n] over D for r < MR, n < NK: MR x NK accumulators over whole vectors of the
// head dim, then each reduced across its lanes and finished with the scalar tail of D.
template <int MR, int NK, int kBytes, typename A>
__attribute__((always_inline)) inline void dot_block(int64_t D, const A* q, int64_t ldq, const A* k, int64_t ldk,
                                                     A* s, int64_t lds) {
  using V = typename Vec<A, kBytes>::type;
  using U = typename Vec<A, kBytes>::unaligned;
  constexpr int64_t L = kBytes / sizeof(A);
  V acc[MR][NK];
  for (int r = 0; r < MR; ++r)
    for (int n = 0; n < NK; ++n) acc[r][n] = V{};
  int64_t c = 0;
  for (; c + L <= D; c += L) {
    V kv[NK];
    for (int n = 0; n < NK; ++n) kv[n] = *reinterpret_cast<const U*>(k + n * ldk + c);
    for (int r = 0; r < MR; ++r) {
      const V qv = *reinterpret_cast<const U*>(q + r * ldq + c);
      for (int n = 0; n < NK; ++n) acc[r][n] += qv * kv[n];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int n = 0; n < NK; ++n) {
      A x = hsum<kBytes, A>(acc[r][n]);
      for (int64_t t = c; t < D; ++t) x += q[r * ldq + t] * k[n * ldk + t];
      s[r * lds + n] = x;
    }
}

// Rows in groups of MR (then one narrower group), keys NK at a time: at most 8 accumulators in flight.
template <int MR, int kBytes, typename A>
__attribute__((always_inline)) inline void row_dots(int64_t M, int64_t N, int64_t D, const A* q, int64_t ldq,
                                                    const A* k, int64_t ldk, A* s, int64_t lds) {
  constexpr int NK = MR >= 3 ? 2 : 4;
  int64_t r = 0;
  for (; r + MR <= M; r += MR) {
    int64_t n = 0;
    for (; n + NK <= N; n += NK)
      dot_block<MR, NK, kBytes>(D, q + r * ldq, ldq, k + n * ldk, ldk, s + r * lds + n, lds);
    for (; n < N; ++n) dot_block<MR, 1, kBytes>(D, q + r * ldq, ldq, k + n * ldk, ldk, s + r * lds + n, lds);
  }
  if constexpr (MR > 1)
    if (r < M) row_dots<MR - 1, kBytes>(M - r, N, D, q + r * ldq, ldq, k, ldk, s + r * lds, lds);
}

#ifdef PK_TILE_X86
template <typename A>
__attribute__((target("avx512f"))) void row_dots_avx512(int64_t M, int64_t N, int64_t D, const A* q, int64_t ldq,
                                                        const A* k, int64_t ldk, A* s, int64_t lds) {
  row_dots<4, 64>(M, N, D, q, ldq, k, ldk, s, lds);
}
template <typename A>
__attribute__((target("avx2,fma"))) void row_dots_avx2(int64_t M, int64_t N, int64_t D, const A* q, int64_t ldq,
                                                       const A* k, int64_t ldk, A* s, int64_t lds) {
  row_dots<4, 32>(M, N, D, q, ldq, k, ldk, s, lds);
}
#endif

}  // namespace tile

// s[r * lds + n] = sum_c q[r * ldq + c] k[n * ldk + c] for r < M, n < N, c < D: any D, any strides.
template <typename A>
inline void row_dots(int64_t M, int64_t N, int64_t D, const A* q, int64_t ldq, const A* k, int64_t ldk, A* s,
                     int64_t lds) {
#ifdef PK_TILE_X86
  switch (tile::isa()) {
    case tile::Isa::kAvx512: return tile::row_dots_avx512(M, N, D, q, ldq, k, ldk, s, lds);
    case tile::Isa::kAvx2: return tile::row_dots_avx2(M, N, D, q, ldq, k, ldk, s, lds);
    case tile::Isa::kBase: break;
  }
#endif
  tile::row_dots<4, 16>(M, N, D, q, ldq, k, ldk, s, lds);
}

}  // namespace pk::cpu
