// Launcher-side glue between at::Tensor and the torch-free CUDA kernels: the CUDA type each ATen
// float type is instantiated as, typed device pointers, the current stream, the device guard, the error
// checks and the op registration. Included only by the *_cuda.cpp launchers, which are built against a CUDA
// torch, or, with PK_CUDA_EMULATION, against the emulator (csrc/emulation) for CPU tensors: the seam below
// is the only place where the two builds differ, so the emulated launchers are the real ones.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#ifdef PK_CUDA_EMULATION
#include <c10/util/Exception.h>

#include <unordered_map>
#include <vector>
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <optional>

namespace pk::cuda {

template <typename S>
struct CudaScalar {
  using type = S;
};
template <>
struct CudaScalar<c10::Half> {
  using type = __half;
};
template <>
struct CudaScalar<c10::BFloat16> {
  using type = __nv_bfloat16;
};
template <typename S>
using cuda_scalar_t = typename CudaScalar<S>::type;

static_assert(sizeof(c10::Half) == sizeof(__half) && sizeof(c10::BFloat16) == sizeof(__nv_bfloat16),
              "ATen and CUDA half types must share a layout");

#ifdef PK_CUDA_EMULATION

// The emulator checks global accesses only inside buffers it knows, so each launcher's guard scope registers
// the storage of every tensor whose pointer it hands to a kernel (through data() below) and forgets it at the
// end of the op. Counted, because an op's storages may alias (views, in-place outputs).
class DeviceGuard {
 public:
  explicit DeviceGuard(const c10::Device&) { active_scopes().push_back(this); }
  ~DeviceGuard() {
    active_scopes().pop_back();
    for (const void* base : registered_) {
      auto it = counts().find(base);
      if (--it->second == 0) {
        pk::emu::unregister_device_buffer(base);
        counts().erase(it);
      }
    }
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

  static void note(const at::Tensor& t) {
    if (active_scopes().empty() || !t.defined() || !t.has_storage()) return;
    const void* base = t.storage().data();
    const size_t bytes = t.storage().nbytes();
    if (base == nullptr || bytes == 0) return;
    if (counts()[base]++ == 0) pk::emu::register_device_buffer(base, bytes);
    active_scopes().back()->registered_.push_back(base);
  }

 private:
  static std::vector<DeviceGuard*>& active_scopes() {
    thread_local std::vector<DeviceGuard*> scopes;
    return scopes;
  }
  static std::unordered_map<const void*, int>& counts() {
    thread_local std::unordered_map<const void*, int> registered;
    return registered;
  }
  std::vector<const void*> registered_;
};

inline cudaStream_t current_stream() { return nullptr; }
// The emulated engine takes CPU tensors: their memory is what the emulated kernels address.
inline bool is_device_tensor(const at::Tensor& t) { return t.is_cpu(); }

#define PK_CUDA_CHECK(expr)                                                        \
  do {                                                                             \
    const cudaError_t pk_err_ = (expr);                                            \
    TORCH_CHECK(pk_err_ == cudaSuccess, "CUDA error: ", cudaGetErrorString(pk_err_)); \
  } while (0)
// The emulated op twins pykernels_cuda_emulated::<op>: CPU dispatch key, schemas copied from pykernels::<op>
// by pykernels/_registry.py.
#define PK_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(pykernels_cuda_emulated, CPU, m)

#else

using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
inline bool is_device_tensor(const at::Tensor& t) { return t.is_cuda(); }

#define PK_CUDA_CHECK(expr) C10_CUDA_CHECK(expr)
#define PK_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(pykernels, CUDA, m)

#endif

#define PK_CUDA_KERNEL_LAUNCH_CHECK() PK_CUDA_CHECK(cudaGetLastError())

// data_ptr<S>() checks the dtype, so a mismatched tensor fails with the same error as in the CPU engine
// instead of being reinterpreted.
template <typename S>
cuda_scalar_t<S>* data(const at::Tensor& t) {
#ifdef PK_CUDA_EMULATION
  DeviceGuard::note(t);
#endif
  return reinterpret_cast<cuda_scalar_t<S>*>(t.data_ptr<S>());
}
template <typename S>
cuda_scalar_t<S>* data(const std::optional<at::Tensor>& t) {
  return t ? data<S>(*t) : nullptr;
}

}  // namespace pk::cuda
