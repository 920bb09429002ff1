// The PTX twins against plain matrix products: once with fragments filled straight from the PTX ISA tables
// (independently of the twin's code), once through attention_tile.cuh's gemm_nt/gemm_nn as the kernels call
// them; and the fp16/bf16 conversions against the compiler's _Float16 and a float64 reference.
#include <cmath>
#include <random>

#include "attention/attention_tile.cuh"
#include "emu_test.h"

using emu_test::check;
using emu_test::DeviceBuffer;
using emu_test::expect_clean;

namespace {

using pk::cuda::attn::Frag;
using pk::cuda::attn::Lane;

template <typename T>
uint16_t bits(T v) {
  uint16_t b;
  std::memcpy(&b, &v, 2);
  return b;
}

template <typename T>
uint32_t pack(T lo, T hi) {
  return uint32_t(bits(lo)) | (uint32_t(bits(hi)) << 16);
}

// One warp: D[16 x 8] = A[16 x 16] B[16 x 8] + C, A and B row-major in global memory. Fragments per "Matrix
// Fragments for mma.m16n8k16 with floating point type": a_i at (g + 8 [i in {2,3,6,7}], 2t + (i & 1) + 8 [i >= 4]),
// b_i at (2t + (i & 1) + 8 [i >= 2], g), c_i at (g + 8 [i >= 2], 2t + (i & 1)).
template <typename T>
__global__ void mma_from_table_kernel(const T* a, const T* b, const float* c, float* d) {
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  uint32_t af[4];
  for (int r = 0; r < 4; ++r) {
    const int row = g + ((r & 1) ? 8 : 0), col = 2 * t + (r >= 2 ? 8 : 0);
    af[r] = pack(a[row * 16 + col], a[row * 16 + col + 1]);
  }
  uint32_t bf[2];
  for (int r = 0; r < 2; ++r) {
    const int k = 2 * t + (r ? 8 : 0);
    bf[r] = pack(b[k * 8 + g], b[(k + 1) * 8 + g]);
  }
  float acc[4];
  for (int i = 0; i < 4; ++i) acc[i] = c[(g + (i >= 2 ? 8 : 0)) * 8 + 2 * t + (i & 1)];
  if constexpr (std::is_same_v<T, __half>)
    pk::cuda::ptx::mma_m16n8k16_f16(acc, af, bf[0], bf[1]);
  else
    pk::cuda::ptx::mma_m16n8k16_bf16(acc, af, bf[0], bf[1]);
  for (int i = 0; i < 4; ++i) d[(g + (i >= 2 ? 8 : 0)) * 8 + 2 * t + (i & 1)] = acc[i];
}

// Lane l gives row l % 8 of matrix l / 8; the four 8 x 8 matrices sit side by side in a [8, 32] b16 tile
// with a padded row stride. Every lane writes its four registers.
__global__ void ldmatrix_kernel(const __half* src, uint32_t* regs) {
  constexpr int kLd = 40;
  __shared__ __align__(16) __half tile[8 * kLd];
  for (int i = threadIdx.x; i < 8 * 32; i += 32) tile[i / 32 * kLd + i % 32] = src[i];
  __syncwarp();
  const int lane = threadIdx.x;
  uint32_t r[4];
  pk::cuda::ptx::ldmatrix_x4_trans(r, tile + (lane % 8) * kLd + (lane / 8) * 8);
  for (int j = 0; j < 4; ++j) regs[lane * 4 + j] = r[j];
}

template <typename T>
std::vector<T> random_values(size_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
  std::vector<T> v(n);
  for (auto& x : v) x = T(dist(rng));
  return v;
}

template <typename T>
void check_mma_from_table() {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 5; ++trial) {
    DeviceBuffer<T> a(random_values<T>(256, rng)), b(random_values<T>(128, rng));
    DeviceBuffer<float> c(random_values<float>(128, rng)), d(128);
    PK_LAUNCH(1, 32, 0, nullptr, mma_from_table_kernel<T>)(a.ptr, b.ptr, c.ptr, d.ptr);
    expect_clean();
    for (int i = 0; i < 16; ++i)
      for (int n = 0; n < 8; ++n) {
        double ref = c.ptr[i * 8 + n];
        for (int k = 0; k < 16; ++k) ref += double(float(a.ptr[i * 16 + k])) * double(float(b.ptr[k * 8 + n]));
        check(std::fabs(d.ptr[i * 8 + n] - ref) <= 1e-6 * (1 + std::fabs(ref)),
              "D[" + std::to_string(i) + "][" + std::to_string(n) + "] = " + std::to_string(d.ptr[i * 8 + n]) +
                  ", plain product " + std::to_string(ref));
      }
  }
}

EMU_CASE(mma_f16_from_ptx_table) { check_mma_from_table<__half>(); }
EMU_CASE(mma_bf16_from_ptx_table) { check_mma_from_table<__nv_bfloat16>(); }

EMU_CASE(ldmatrix_x4_trans_from_ptx_table) {
  std::mt19937 rng(3);
  DeviceBuffer<__half> src(random_values<__half>(256, rng));
  DeviceBuffer<uint32_t> regs(128);
  PK_LAUNCH(1, 32, 0, nullptr, ldmatrix_kernel)(src.ptr, regs.ptr);
  expect_clean();
  // With .trans, lane l's register j holds elements [2 (l % 4)][l / 4] and [2 (l % 4) + 1][l / 4] of matrix j.
  for (int lane = 0; lane < 32; ++lane)
    for (int j = 0; j < 4; ++j) {
      const int row = 2 * (lane % 4), col = j * 8 + lane / 4;
      const uint32_t want = pack(src.ptr[row * 32 + col], src.ptr[(row + 1) * 32 + col]);
      check(regs.ptr[lane * 4 + j] == want, "lane " + std::to_string(lane) + " register " + std::to_string(j));
    }
}

// attention_tile.cuh's products as the kernels use them: S = Q K^T (gemm_nt) then O = S V (gemm_nn, through
// ldmatrix), one warp, tiles in shared memory with the kernels' padded strides.
template <typename T, int kN, int kK>
__global__ void tile_products_kernel(const T* q, const T* k, const T* v, float* s_out, float* o_out) {
  constexpr int kLd = kK + 8, kLdN = kN + 8;
  __shared__ __align__(16) T q_tile[16 * kLd];
  __shared__ __align__(16) T k_tile[kN * kLd];
  __shared__ __align__(16) T v_tile[kN * kLdN];
  __shared__ __align__(16) T s_tile[16 * kLdN];
  for (int i = threadIdx.x; i < 16 * kK; i += 32) q_tile[i / kK * kLd + i % kK] = q[i];
  for (int i = threadIdx.x; i < kN * kK; i += 32) k_tile[i / kK * kLd + i % kK] = k[i];
  for (int i = threadIdx.x; i < kN * kN; i += 32) v_tile[i / kN * kLdN + i % kN] = v[i];
  __syncwarp();
  const Lane lane;
  Frag<float, kN> s{};
  pk::cuda::attn::gemm_nt<kN, kK>(s, q_tile, kLd, k_tile, kLd, kK, lane);
  for (int j = 0; j < kN / 8; ++j)
    for (int e = 0; e < 4; ++e) s_out[lane.row(e) * kN + lane.col(j, e)] = s.x[j][e];
  pk::cuda::attn::stage_frag(s, s_tile, kLdN, lane);
  __syncwarp();
  Frag<float, kN> o{};
  pk::cuda::attn::gemm_nn<kN, kN>(o, s_tile, kLdN, v_tile, kLdN, kN, lane);
  for (int j = 0; j < kN / 8; ++j)
    for (int e = 0; e < 4; ++e) o_out[lane.row(e) * kN + lane.col(j, e)] = o.x[j][e];
}

template <typename T>
void check_tile_products() {
  constexpr int kN = 32, kK = 48;
  std::mt19937 rng(11);
  DeviceBuffer<T> q(random_values<T>(16 * kK, rng)), k(random_values<T>(kN * kK, rng)),
      v(random_values<T>(kN * kN, rng));
  DeviceBuffer<float> s(16 * kN), o(16 * kN);
  PK_LAUNCH(1, 32, 0, nullptr, tile_products_kernel<T, kN, kK>)(q.ptr, k.ptr, v.ptr, s.ptr, o.ptr);
  expect_clean();
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < kN; ++j) {
      double ref = 0;
      for (int c = 0; c < kK; ++c) ref += double(float(q.ptr[i * kK + c])) * double(float(k.ptr[j * kK + c]));
      check(std::fabs(s.ptr[i * kN + j] - ref) <= 1e-5 * (1 + std::fabs(ref)), "S = Q K^T");
    }
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < kN; ++j) {
      double ref = 0;  // S enters the second product rounded to T, as the kernels stage it
      for (int c = 0; c < kN; ++c) ref += double(float(T(s.ptr[i * kN + c]))) * double(float(v.ptr[c * kN + j]));
      check(std::fabs(o.ptr[i * kN + j] - ref) <= 1e-5 * (1 + std::fabs(ref)), "O = S V");
    }
}

EMU_CASE(tile_products_f16) { check_tile_products<__half>(); }
EMU_CASE(tile_products_bf16) { check_tile_products<__nv_bfloat16>(); }

// ------------------------------------------------------------------------------------------ conversions

float bf16_reference(float f) {
  if (std::isnan(f)) return f;
  // Round to nearest even at 8 significant bits (or to a multiple of 2^-133 below 2^-126, bf16's subnormal
  // step), in double, exact for every float.
  if (std::fabs(f) < std::ldexp(1.0f, -126))
    return std::copysign(static_cast<float>(std::ldexp(std::nearbyint(std::ldexp(double(f), 133)), -133)), f);
  int e;
  const double m = std::frexp(static_cast<double>(f), &e);
  return static_cast<float>(std::ldexp(std::nearbyint(std::ldexp(m, 8)), e - 8));
}

EMU_CASE(half_conversions_round_to_nearest_even) {
  std::mt19937 rng(5);
  std::vector<float> values = {0.0f, -0.0f, 1.0f, 65504.0f, 65519.0f, 65520.0f, 1e-8f, 2.98e-8f, 2.99e-8f,
                               5.96e-8f, 6.1e-5f, INFINITY, -INFINITY, 1.0009765625f, 1.00048828125f, 3.4e38f};
  std::uniform_int_distribution<uint32_t> any_bits;
  for (int i = 0; i < 200000; ++i) values.push_back(pk::emu::bits_float(any_bits(rng)));
  for (float f : values) {
    if (std::isnan(f)) {
      check(std::isnan(float(__half(f))) && std::isnan(float(__nv_bfloat16(f))), "NaN stays NaN");
      continue;
    }
    const _Float16 want = static_cast<_Float16>(f);
    check(float(__half(f)) == static_cast<float>(want) && std::signbit(float(__half(f))) == std::signbit(f),
          "fp16 of " + std::to_string(f));
    const float bf_want = bf16_reference(f);
    check(float(__nv_bfloat16(f)) == bf_want || (std::isinf(bf_want) && std::isinf(float(__nv_bfloat16(f)))),
          "bf16 of " + std::to_string(f));
  }
  for (uint32_t h = 0; h < 65536; ++h) {
    _Float16 x;
    const uint16_t b = static_cast<uint16_t>(h);
    std::memcpy(&x, &b, 2);
    const float want = static_cast<float>(x), got = pk::emu::half_to_float(b);
    check((std::isnan(want) && std::isnan(got)) || std::memcmp(&want, &got, 4) == 0, "fp16 -> float");
  }
}

}  // namespace

EMU_MAIN()
