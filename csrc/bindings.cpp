// The pybind11 module. Kernels are reached through torch.ops.pykernels (registered by static
// initialisers in this same library); the module itself reports how it was built.
#include <torch/extension.h>

#ifndef PK_CUDA_STATUS
#define PK_CUDA_STATUS ""
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["cuda"] = static_cast<bool>(PK_WITH_CUDA);
  info["cuda_status"] = PK_CUDA_STATUS;
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  info["cpu_dispatch"] = "avx512f, avx2, default (function multi-versioning)";
#else
  info["cpu_dispatch"] = "default";
#endif
  info["torch_built_with"] = PK_TORCH_VERSION;
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  return info;
}

// The cheapest possible call through pybind11, used to measure binding overhead against torch.ops.
at::Tensor identity(const at::Tensor& t) { return t; }

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pykernels C++/CUDA engines";
  m.def("build_info", &build_info, "How this extension was built");
  m.def("identity", &identity, "Returns its argument (binding-overhead probe)");
}
