// fp16 and bf16 for the emulation build: the layout of cuda_fp16.h / cuda_bf16.h (one 16-bit payload, so
// c10::Half and c10::BFloat16 reinterpret to them) and the conversions the kernels call, rounding to nearest
// even with subnormals, infinities and NaN handled as the hardware does. Own types rather than the toolkit's
// host code keep the emulator buildable on a machine without CUDA.
#pragma once
#include <cstdint>
#include <cstring>

namespace pk::emu {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t float_to_half_rn(float f) {
  const uint32_t u = float_bits(f), sign = (u >> 16) & 0x8000u, mag = u & 0x7fffffffu;
  if (mag >= 0x7f800000u) return static_cast<uint16_t>(sign | (mag > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (mag >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds past 65504
  if (mag < 0x38800000u) {  // below 2^-14: a subnormal half, or zero
    const uint32_t shift = 126 - (mag >> 23);  // value = mantissa * 2^(exp - 150), half step 2^-24
    if (shift > 24) return static_cast<uint16_t>(sign);
    const uint32_t m = (mag & 0x7fffffu) | 0x800000u;
    const uint32_t q = m >> shift, rest = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    return static_cast<uint16_t>(sign | (q + (rest > half || (rest == half && (q & 1)))));
  }
  const uint32_t rebased = mag - 0x38000000u;  // exponent bias 127 -> 15
  const uint32_t q = rebased >> 13, rest = rebased & 0x1fffu;
  return static_cast<uint16_t>(sign | (q + (rest > 0x1000u || (rest == 0x1000u && (q & 1)))));
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (man << 13));
  if (exp != 0) return bits_float(sign | ((exp + 112) << 23) | (man << 13));
  const float sub = static_cast<float>(man) * 5.9604644775390625e-8f;  // man * 2^-24, exact
  return sign ? -sub : sub;
}

inline uint16_t float_to_bf16_rn(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float bf16_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

}  // namespace pk::emu

struct alignas(2) __half {
  uint16_t __x;
  __half() = default;
  __half(float f) : __x(pk::emu::float_to_half_rn(f)) {}
  operator float() const { return pk::emu::half_to_float(__x); }
};

struct alignas(2) __nv_bfloat16 {
  uint16_t __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : __x(pk::emu::float_to_bf16_rn(f)) {}
  operator float() const { return pk::emu::bf16_to_float(__x); }
};

struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__half(lo), __half(hi)}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return static_cast<float>(b); }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) { return {__nv_bfloat16(lo), __nv_bfloat16(hi)}; }
