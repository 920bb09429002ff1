// Per-edge dot products, row-parallel: the target row a[i] stays in cache while its edges stream.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cpu_vec.h"
#include "graph/graph_checks.h"

namespace pk {
namespace {

// out[e][h] = a[h] . b[cols[e]][h] for the n edges of one target row (a is that row). Heads are often
// short (2 to 32 features), so each dot keeps 8 partial sums, whole when there are 8 features or more,
// instead of calling a wide reduction per (edge, head); the next sources are prefetched, since the gathers
// of b rows are what the loop waits on.
template <typename T, typename A>
inline void row_dots_impl(const T* __restrict a, const T* __restrict b, const int64_t* __restrict cols, int64_t n,
                          int64_t heads, int64_t feats, T* __restrict out) {
  constexpr int64_t kLanes = 8, kPrefetch = 4;
  const int64_t hf = heads * feats;
  for (int64_t e = 0; e < n; ++e) {
    if (e + kPrefetch < n) cpu::prefetch_row(b + cols[e + kPrefetch] * hf, hf * sizeof(T));
    const T* bj = b + cols[e] * hf;
    for (int64_t h = 0; h < heads; ++h) {
      const T* x = a + h * feats;
      const T* y = bj + h * feats;
      A lanes[kLanes] = {};
      int64_t f = 0;
      for (; f + kLanes <= feats; f += kLanes)
        for (int64_t l = 0; l < kLanes; ++l) lanes[l] += cpu::to_acc(x[f + l]) * cpu::to_acc(y[f + l]);
      A s = 0;
      for (; f < feats; ++f) s += cpu::to_acc(x[f]) * cpu::to_acc(y[f]);
      const A sum = (lanes[0] + lanes[4]) + (lanes[1] + lanes[5]) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
      out[e * heads + h] = static_cast<T>(s + sum);
    }
  }
}

PK_CPU_CLONES void row_dots(const float* a, const float* b, const int64_t* cols, int64_t n, int64_t heads,
                            int64_t feats, float* out) {
  row_dots_impl<float, float>(a, b, cols, n, heads, feats, out);
}
PK_CPU_CLONES void row_dots(const double* a, const double* b, const int64_t* cols, int64_t n, int64_t heads,
                            int64_t feats, double* out) {
  row_dots_impl<double, double>(a, b, cols, n, heads, feats, out);
}
template <typename T>
void row_dots(const T* a, const T* b, const int64_t* cols, int64_t n, int64_t heads, int64_t feats, T* out) {
  row_dots_impl<T, float>(a, b, cols, n, heads, feats, out);
}

at::Tensor sddmm_cpu(const at::Tensor& rowptr, const at::Tensor& col, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                     const at::Tensor& a, const at::Tensor& b) {
  constexpr const char* op = "pykernels.sddmm";
  check_csr(op, rowptr, col);
  PK_CHECK_FLOAT_TENSOR(op, "a", a);
  PK_CHECK_FLOAT_TENSOR(op, "b", b);
  PK_CHECK_DIM(op, "a", a, 3);
  PK_CHECK_DIM(op, "b", b, 3);
  TORCH_CHECK(a.size(0) == rowptr.numel() - 1, op, ": a has ", a.size(0), " rows, graph has ",
              rowptr.numel() - 1, " targets");
  TORCH_CHECK(a.size(1) == b.size(1) && a.size(2) == b.size(2) && a.scalar_type() == b.scalar_type(), op,
              ": a and b must agree in heads, features and dtype");
  check_csr_contents(op, rowptr, col, b.size(0), "b's row count");
  const int64_t num_rows = a.size(0), heads = a.size(1), feats = a.size(2), hf = heads * feats;
  auto out = at::empty({col.numel(), heads}, a.options());
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const int64_t* cl = col.data_ptr<int64_t>();
  const int64_t avg_deg = std::max<int64_t>(1, num_rows ? col.numel() / num_rows : 1);
  PK_DISPATCH_FLOATS(a.scalar_type(), "sddmm_cpu", [&] {
    const scalar_t* pa = a.data_ptr<scalar_t>();
    const scalar_t* pb = b.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, num_rows, grain_for(num_rows, avg_deg * hf), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        row_dots(pa + i * hf, pb, cl + rp[i], rp[i + 1] - rp[i], heads, feats, po + rp[i] * heads);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CPU, m) { m.impl("sddmm", &sddmm_cpu); }

}  // namespace pk
