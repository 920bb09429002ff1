// The dense attention forward kernel (attention_kernel.cu: mma.sync path for fp16/bf16, SIMT for fp32) through
// the emulator on small shapes with partial tiles, GQA and the causal mask, against a float64 reference.
#include <cmath>
#include <random>

#include "attention/attention_cuda.h"
#include "emu_test.h"

using emu_test::check;
using emu_test::DeviceBuffer;
using emu_test::expect_clean;

namespace {

namespace attn = pk::cuda::attn;

template <typename T>
void check_forward(int64_t nq, int64_t nk, int64_t d, bool causal) {
  const int64_t batch = 1, heads = 2, kv_heads = 1, dv = d;
  std::mt19937 rng(9);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  auto values = [&](size_t n) {
    std::vector<T> v(n);
    for (auto& x : v) x = T(dist(rng));
    return v;
  };
  DeviceBuffer<T> q(values(heads * nq * d)), k(values(kv_heads * nk * d)), v(values(kv_heads * nk * dv)),
      out(heads * nq * dv);
  DeviceBuffer<attn::acc_t<T>> lse(heads * nq);
  const double scale = 1.0 / std::sqrt(double(d));
  const attn::Inputs<T> in{{q.ptr, heads * nq * d, nq * d, d},
                           {k.ptr, kv_heads * nk * d, nk * d, d},
                           {v.ptr, kv_heads * nk * dv, nk * dv, dv},
                           {nullptr, 0, 0, 0, 0},
                           batch, heads, kv_heads, nq, nk, d, dv,
                           static_cast<attn::acc_t<T>>(scale), causal, nullptr};
  check(attn::forward(attn::ForwardParams<T>{in, {out.ptr, heads * nq * dv, nq * dv, dv}, lse.ptr}) == cudaSuccess,
        "forward launch");
  expect_clean();
  const double tol = std::is_same_v<T, float> ? 1e-5 : 2e-2;
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < nq; ++i) {
      std::vector<double> s(nk, -INFINITY);
      double mx = -INFINITY;
      for (int64_t j = 0; j < nk && (!causal || j <= i); ++j) {
        double dot = 0;
        for (int64_t c = 0; c < d; ++c)
          dot += double(float(q.ptr[(h * nq + i) * d + c])) * double(float(k.ptr[j * d + c]));
        s[j] = dot * scale;
        mx = std::max(mx, s[j]);
      }
      double sum = 0;
      for (double x : s) sum += std::isinf(x) ? 0 : std::exp(x - mx);
      for (int64_t c = 0; c < dv; ++c) {
        double o = 0;
        for (int64_t j = 0; j < nk; ++j)
          if (!std::isinf(s[j])) o += std::exp(s[j] - mx) / sum * double(float(v.ptr[j * dv + c]));
        const double got = float(out.ptr[(h * nq + i) * dv + c]);
        check(std::fabs(got - o) <= tol, "out[" + std::to_string(h) + "][" + std::to_string(i) + "][" +
                                             std::to_string(c) + "] = " + std::to_string(got) + ", reference " +
                                             std::to_string(o));
      }
      check(std::fabs(lse.ptr[h * nq + i] - (mx + std::log(sum))) <= 1e-4, "lse");
    }
}

EMU_CASE(forward_half_partial_tiles) { check_forward<__half>(37, 45, 40, false); }
EMU_CASE(forward_bf16_causal) { check_forward<__nv_bfloat16>(70, 70, 24, true); }
EMU_CASE(forward_float_simt_causal) { check_forward<float>(21, 50, 16, true); }

}  // namespace

EMU_MAIN()
