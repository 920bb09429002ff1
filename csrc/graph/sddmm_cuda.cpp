// CUDA launcher for sddmm: the CPU engine's entry checks (sddmm_cpu.cpp), plus device checks.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_launch.h"
#include "graph/graph_checks.h"
#include "graph/graph_cuda.h"

namespace pk {
namespace {

at::Tensor sddmm_cuda(const at::Tensor& rowptr, const at::Tensor& col, const std::optional<at::Tensor>&,
                      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor& a,
                      const at::Tensor& b) {
  constexpr const char* op = "pykernels.sddmm";
  check_csr(op, rowptr, col);
  PK_CHECK_FLOAT_TENSOR(op, "a", a);
  PK_CHECK_FLOAT_TENSOR(op, "b", b);
  PK_CHECK_DIM(op, "a", a, 3);
  PK_CHECK_DIM(op, "b", b, 3);
  PK_CHECK_SAME_DEVICE(op, "a", a, rowptr);
  PK_CHECK_SAME_DEVICE(op, "b", b, rowptr);
  TORCH_CHECK(a.size(0) == rowptr.numel() - 1, op, ": a has ", a.size(0), " rows, graph has ",
              rowptr.numel() - 1, " targets");
  TORCH_CHECK(a.size(1) == b.size(1) && a.size(2) == b.size(2) && a.scalar_type() == b.scalar_type(), op,
              ": a and b must agree in heads, features and dtype");
  const int64_t num_rows = a.size(0), heads = a.size(1), feats = a.size(2);
  const cuda::DeviceGuard guard(a.device());
  auto out = at::empty({col.numel(), heads}, a.options());
  PK_DISPATCH_FLOATS(a.scalar_type(), "sddmm_cuda", [&] {
    cuda::sddmm(cuda::SddmmParams<cuda::cuda_scalar_t<scalar_t>>{
        {cuda::data<int64_t>(rowptr), cuda::data<int64_t>(col), num_rows}, cuda::data<scalar_t>(a),
        cuda::data<scalar_t>(b), cuda::data<scalar_t>(out), heads, feats, cuda::current_stream()});
    PK_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

PK_CUDA_LIBRARY_IMPL(m) { m.impl("sddmm", &sddmm_cuda); }

}  // namespace pk
