// Per-edge dot products, row-parallel: the target row a[i] stays in cache while its edges stream.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cpu_vec.h"
#include "graph/graph_checks.h"

namespace pk {
namespace {

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
        for (int64_t e = rp[i]; e < rp[i + 1]; ++e)
          for (int64_t h = 0; h < heads; ++h)
            po[e * heads + h] =
                static_cast<scalar_t>(cpu::dot(pa + i * hf + h * feats, pb + cl[e] * hf + h * feats, feats));
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CPU, m) { m.impl("sddmm", &sddmm_cpu); }

}  // namespace pk
