// CUDA execution model on the CPU, for running the torch-free kernel files without a GPU.
//
// Build: the kernel files compile a second time as host C++ with this header force-included, the stub
// headers of csrc/emulation/include (cuda_runtime.h, cuda_fp16.h, cub/...) first on the include path, and
// ThreadSanitizer's *instrumentation* (not its runtime) turned on:
//
//   g++ -std=c++20 -O1 -g -x c++ -fsanitize=thread --param tsan-instrument-func-entry-exit=0
//       -I csrc/emulation/include -I csrc -include csrc/emulation/cuda_emulation.h -c csrc/graph/spmm_kernel.cu
//
// linked with csrc/emulation/cuda_emulation.cpp compiled WITHOUT -fsanitize (and without -fsanitize at the link,
// so libtsan is not pulled in). The CUDA toolkit is not needed.
//
// Model. Kernel launches run synchronously, one block at a time; every thread of the block is a fiber with its
// own small stack (a hand-written context switch on x86-64, ucontext elsewhere), so __syncthreads and the warp
// intrinsics are rendezvous points of a deterministic round-robin scheduler. threadIdx/blockIdx/blockDim/
// gridDim read the running fiber's state. Static __shared__ arrays are function statics (blocks do not
// overlap in time, so one copy is exactly shared memory's scope); dynamic shared memory is an emulator arena
// sized at launch. Inline PTX lives behind csrc/common/ptx.cuh, whose emulated twins gather the 32 lanes at a
// warp rendezvous and compute each lane's registers from the PTX ISA fragment tables.
//
// How accesses are seen. Kernels address shared and global memory with raw pointers, so the checks need every
// load and store: GCC's -fsanitize=thread instrumentation calls __tsan_readN/__tsan_writeN before each one
// (read and write kept apart, no check merging, unlike ASan's), and this emulator defines those entry points
// itself. Each instrumented access made inside a kernel is classified by address:
//   - dynamic shared memory: the arena; bounds are exact (the size is known at launch);
//   - static __shared__: the writable data segment of the kernel's module (kernel code touches no other
//     statics); out-of-bounds is therefore only caught at the segment's ends, not between two arrays;
//   - global memory: allocations made through the emulator (cudaMalloc, pk::emu::device_alloc: exact bounds,
//     redzones, use after free) or registered with pk::emu::register_device_buffer (torch tensors: in bounds
//     of the union of registered ranges only);
//   - anything else (fiber stacks, params, heap the emulator does not know) is ignored.
// Trade-off against the alternatives: TSan's own runtime would see races but not uninitialised shared reads,
// knows nothing of barriers without annotations and is nondeterministic in what it keeps; ASan catches
// global bounds in any heap memory but merges checks (a read-modify-write shows as one read), hiding races;
// page protection faults once per page, not per byte. The callbacks cost a function call per access, which
// is why emulated shapes stay small. The process must not also load the real TSan runtime.
//
// Detectors (each finding names the kernel, block, thread and location; instrumented accesses give a code
// address that pk::emu resolves to file:line with addr2line when the build has -g):
//   - races: shadow state per shared byte (last writer, two last readers, each with its barrier epoch and warp
//     sync sequence); two threads touching a byte between the same pair of __syncthreads, at least one
//     writing, race unless both are lanes of one warp ordered by a later __syncwarp or *_sync rendezvous of
//     both. The same state on global memory catches write-write, read-after-write and write-after-read between
//     threads or blocks of one launch (the engine claims atomic-free determinism; atomics are exempt).
//     Misses: ordering that is only transitive through a third lane's warp sync is reported as a race.
//   - bounds: as classified above.
//   - barriers: a __syncthreads reached while other live threads wait elsewhere or have exited, a *_sync whose
//     mask leaves out the calling lane, names an exited or absent lane, or reads from a lane outside the mask;
//     deadlocks (no fiber can run) are reported at once, and a block that runs past PK_EMU_TIMEOUT_S seconds
//     (default 60; spin-waits) is stopped with the kernel's name.
//   - uninitialised shared reads: dynamic shared memory is poisoned (0xff: NaN in every float type) before
//     each block and every shared byte's shadow is reset, so a read of a byte no thread of the block wrote is
//     reported.
// Launch checks: zero-sized grid or block, block > 1024 threads, gridDim.y/z > 65535, dynamic shared memory
// above 48 KiB without a cudaFuncSetAttribute opt-in or above the arch's limit (PK_EMU_ARCH=80: 163 KiB,
// 90 (default): 227 KiB). A failed launch or a finding sets the error cudaGetLastError returns, and
// cudaGetErrorString gives the full report, so a launcher's usual launch check raises with the kernel's name.
// Static shared memory is not counted against the limit (its size per kernel is unknown here; cudaFuncGetAttributes
// reports 0 bytes of it).
#pragma once
#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "half_types.h"

#define PK_CUDA_EMULATION 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
#define __restrict__ __restrict
// Emulator code inlined into kernels that must not be seen as the kernel's own memory accesses.
#define PK_EMU_UNINSTRUMENTED __attribute__((no_sanitize_thread, noinline))

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------------- runtime API

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchTimeout = 702,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchFailure = 719,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxGridDimY = 6,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice,
                      cudaMemcpyDefault };

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t err);
const char* cudaGetErrorName(cudaError_t err);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaMalloc(void** ptr, size_t bytes);
cudaError_t cudaFree(void* ptr);
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream = nullptr);
cudaError_t cudaMemset(void* ptr, int value, size_t bytes);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream = nullptr);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaDeviceSynchronize();

namespace pk::emu {

cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value);

}  // namespace pk::emu

template <typename F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  return pk::emu::func_set_attribute(reinterpret_cast<const void*>(kernel), attr, value);
}

struct cudaFuncAttributes {
  size_t sharedSizeBytes;
};

// A kernel's static __shared__ arrays are function statics here, sized only once it runs: the twin reports none,
// so launchers' shared-memory checks count the dynamic plan alone when emulated.
template <typename F>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, F*) {
  *attr = cudaFuncAttributes{0};
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------- emulator core

namespace pk::emu {

struct Coordinates {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
// The running fiber's coordinates; they live on the heap, which the access checks ignore.
const Coordinates& coordinates();
unsigned char* dynamic_shared_memory();

void syncthreads(const char* file, int line);
void syncwarp(const char* file, int line, unsigned mask = 0xffffffffu);

// One warp rendezvous: each lane of `mask` deposits `in_bytes` and receives `out_bytes`; the last lane to
// arrive runs compute(ins, outs, mask, arg) over the 32 lane slots (lanes outside the mask: zero-filled in,
// out ignored). `op` names the intrinsic: lanes of one rendezvous must all be at the same one.
using WarpCompute = void (*)(const unsigned char* ins, unsigned char* outs, unsigned mask, const void* arg);
void warp_collective(const char* op, unsigned mask, const void* in, size_t in_bytes, void* out, size_t out_bytes,
                     WarpCompute compute, const void* arg, const char* file, int line);
// A lane reading lane `src` of a rendezvous, for the checks that src was in the mask and is alive.
void check_warp_source(const char* op, unsigned mask, int lane, int src);

// An atomic on global or shared memory: bounds-checked, exempt from the race checks.
void note_atomic(const void* addr, size_t bytes);

// Launches. The kernel's name (for reports) comes from its symbol when the module has one, else from the
// source text at the launch site.
struct LaunchConfig {
  const void* kernel;
  const char* source_name;
  const char* file;
  int line;
  dim3 grid, block;
  size_t dynamic_smem;
  cudaStream_t stream;
};
// Runs body(ctx) once per thread of every block (or reports why the launch is invalid); returns the launch's
// error code, also kept for cudaGetLastError.
cudaError_t run_launch(const LaunchConfig& config, void (*body)(void*), void* ctx);

template <typename... Params>
class Launcher {
 public:
  Launcher(void (*kernel)(Params...), LaunchConfig config) : kernel_(kernel), config_(config) {
    config_.kernel = reinterpret_cast<const void*>(kernel);
  }

  template <typename... Args>
  void operator()(Args&&... args) {
    State state{kernel_, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
    run_launch(config_, &State::run, &state);
  }

 private:
  struct State {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> params;
    // Each thread gets its own copy of the arguments, as each CUDA thread reads the parameter space.
    static void run(void* ctx) {
      auto* s = static_cast<State*>(ctx);
      std::apply(s->kernel, std::tuple<std::decay_t<Params>...>(s->params));
    }
  };
  void (*kernel_)(Params...);
  LaunchConfig config_;
};

template <typename... Params>
Launcher<Params...> make_launcher(void (*kernel)(Params...), const char* name, const char* file, int line, dim3 grid,
                                  dim3 block, size_t smem, cudaStream_t stream) {
  return Launcher<Params...>(kernel, LaunchConfig{nullptr, name, file, line, grid, block, smem, stream});
}

// Device memory the checks know: allocations from the emulator's arena have exact bounds and redzones.
void* device_alloc(size_t bytes);
void device_free(void* ptr);
// Memory allocated elsewhere (a CPU tensor) that kernels may read and write: tracked for races; bounds are
// only those of the union of registered ranges.
void register_device_buffer(const void* ptr, size_t bytes);
void unregister_device_buffer(const void* ptr);

// The emulated architecture (80 or 90); PK_EMU_ARCH sets the initial value.
void set_arch(int sm);
int arch();
// Launches so far per kernel, by mangled name (the names cuobjdump lists for the real build's kernels).
std::map<std::string, uint64_t> launch_counts();

struct Finding {
  std::string kind;  // "race", "out-of-bounds", "barrier", "warp-mask", "uninitialised", "deadlock", "timeout",
                     // "launch"
  std::string kernel;
  std::string message;  // the full report, kernel, block, thread and location included
};
// Findings since the last call, oldest first (also printed to stderr when PK_EMU_VERBOSE is set).
std::vector<Finding> take_findings();

}  // namespace pk::emu

#define threadIdx (::pk::emu::coordinates().thread_idx)
#define blockIdx (::pk::emu::coordinates().block_idx)
#define blockDim (::pk::emu::coordinates().block_dim)
#define gridDim (::pk::emu::coordinates().grid_dim)

#define __syncthreads() ::pk::emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::pk::emu::syncwarp(__FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)

#define PK_LAUNCH(grid, block, smem, stream, ...) \
  ::pk::emu::make_launcher(__VA_ARGS__, #__VA_ARGS__, __FILE__, __LINE__, grid, block, smem, stream)

// ---------------------------------------------------------------------------------------------- warp intrinsics

namespace pk::emu {

enum class ShuffleKind { kIndex, kUp, kDown, kXor };

// Source lane of a shuffle as the CUDA programming guide defines it (warp shuffle functions): lanes are split
// into segments of `width`; idx wraps within the segment, up/down/xor leaving it return the caller's value.
inline int shuffle_source(ShuffleKind kind, int lane, int arg, int width) {
  const int base = lane & ~(width - 1);
  switch (kind) {
    case ShuffleKind::kIndex: return base + (arg & (width - 1));
    case ShuffleKind::kUp: return (lane - base) >= arg ? lane - arg : lane;
    case ShuffleKind::kDown: return (lane - base) + arg < width ? lane + arg : lane;
    default: {
      const int src = lane ^ arg;
      return src < base + width ? src : lane;
    }
  }
}

template <typename T>
struct ShuffleIn {
  T value;
  int arg, width;
};

template <typename T, ShuffleKind kKind>
void shuffle_compute(const unsigned char* ins, unsigned char* outs, unsigned mask, const void* op) {
  for (int lane = 0; lane < 32; ++lane) {
    if (!(mask >> lane & 1u)) continue;
    ShuffleIn<T> in;
    std::memcpy(&in, ins + lane * sizeof(ShuffleIn<T>), sizeof in);
    const int src = shuffle_source(kKind, lane, in.arg, in.width);
    check_warp_source(static_cast<const char*>(op), mask, lane, src);
    std::memcpy(outs + lane * sizeof(T), ins + src * sizeof(ShuffleIn<T>), sizeof(T));
  }
}

template <ShuffleKind kKind, typename T>
T shuffle(const char* op, unsigned mask, T value, int arg, int width, const char* file, int line) {
  static_assert(std::is_trivially_copyable_v<T>, "shuffled values are copied bytewise");
  const ShuffleIn<T> in{value, arg, width};
  T out;
  warp_collective(op, mask, &in, sizeof in, &out, sizeof out, &shuffle_compute<T, kKind>, op, file, line);
  return out;
}

enum class VoteKind { kBallot, kAny, kAll };

template <VoteKind kKind>
void vote_compute(const unsigned char* ins, unsigned char* outs, unsigned mask, const void*) {
  unsigned ballot = 0;
  for (int lane = 0; lane < 32; ++lane)
    if ((mask >> lane & 1u) && ins[lane * sizeof(int)] | ins[lane * sizeof(int) + 1] |
                                   ins[lane * sizeof(int) + 2] | ins[lane * sizeof(int) + 3])
      ballot |= 1u << lane;
  const unsigned result = kKind == VoteKind::kBallot ? ballot
                          : kKind == VoteKind::kAny  ? unsigned(ballot != 0)
                                                     : unsigned(ballot == mask);
  for (int lane = 0; lane < 32; ++lane) std::memcpy(outs + lane * sizeof(unsigned), &result, sizeof result);
}

template <VoteKind kKind>
unsigned vote(const char* op, unsigned mask, int predicate, const char* file, int line) {
  unsigned out;
  warp_collective(op, mask, &predicate, sizeof predicate, &out, sizeof out, &vote_compute<kKind>, nullptr, file,
                  line);
  return out;
}

}  // namespace pk::emu

#define __shfl_sync(mask, value, src, ...)                                                                 \
  ::pk::emu::shuffle<::pk::emu::ShuffleKind::kIndex>("__shfl_sync", mask, value, src,                      \
                                                     ::pk::emu::width_or_warp(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_up_sync(mask, value, delta, ...)                                                            \
  ::pk::emu::shuffle<::pk::emu::ShuffleKind::kUp>("__shfl_up_sync", mask, value, delta,                   \
                                                  ::pk::emu::width_or_warp(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_down_sync(mask, value, delta, ...)                                                          \
  ::pk::emu::shuffle<::pk::emu::ShuffleKind::kDown>("__shfl_down_sync", mask, value, delta,               \
                                                    ::pk::emu::width_or_warp(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_xor_sync(mask, value, lane_mask, ...)                                                       \
  ::pk::emu::shuffle<::pk::emu::ShuffleKind::kXor>("__shfl_xor_sync", mask, value, lane_mask,             \
                                                   ::pk::emu::width_or_warp(__VA_ARGS__), __FILE__, __LINE__)
#define __ballot_sync(mask, pred) \
  ::pk::emu::vote<::pk::emu::VoteKind::kBallot>("__ballot_sync", mask, (pred) ? 1 : 0, __FILE__, __LINE__)
#define __any_sync(mask, pred) \
  static_cast<int>(::pk::emu::vote<::pk::emu::VoteKind::kAny>("__any_sync", mask, (pred) ? 1 : 0, __FILE__, __LINE__))
#define __all_sync(mask, pred) \
  static_cast<int>(::pk::emu::vote<::pk::emu::VoteKind::kAll>("__all_sync", mask, (pred) ? 1 : 0, __FILE__, __LINE__))

namespace pk::emu {
constexpr int width_or_warp() { return 32; }
constexpr int width_or_warp(int width) { return width; }
}  // namespace pk::emu

// ---------------------------------------------------------------------------------------------- PTX twins

namespace pk::emu {

enum class MmaType { kF16, kBf16 };
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 with C = D = acc, for the calling lane.
void mma_m16n8k16(MmaType type, float (&acc)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, const char* file,
                  int line);
// ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16, given the 16 bytes this lane's address points to (read by the
// caller, so the access checks see the lane that supplied the address).
void ldmatrix_x4_trans_exchange(uint32_t (&r)[4], const void* row_bytes, const void* row_address, const char* file,
                                int line);

}  // namespace pk::emu

// ---------------------------------------------------------------------------------------------- device functions

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : x > 1.0f ? 1.0f : x; }

// Blocks run one at a time and fibers switch only at rendezvous, so a plain read-modify-write is atomic.
template <typename T, typename Op>
PK_EMU_UNINSTRUMENTED T atomic_update(T* address, Op op) {
  pk::emu::note_atomic(address, sizeof(T));
  const T old = *address;
  *address = op(old);
  return old;
}

template <typename T, typename V>
T atomicAdd(T* address, V value) {
  return atomic_update(address, [&](T old) { return static_cast<T>(old + value); });
}
template <typename T, typename V>
T atomicSub(T* address, V value) {
  return atomic_update(address, [&](T old) { return static_cast<T>(old - value); });
}
template <typename T, typename V>
T atomicMin(T* address, V value) {
  return atomic_update(address, [&](T old) { return static_cast<T>(value) < old ? static_cast<T>(value) : old; });
}
template <typename T, typename V>
T atomicMax(T* address, V value) {
  return atomic_update(address, [&](T old) { return old < static_cast<T>(value) ? static_cast<T>(value) : old; });
}
template <typename T, typename V>
T atomicExch(T* address, V value) {
  return atomic_update(address, [&](T) { return static_cast<T>(value); });
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
  return atomic_update(address, [&](T old) { return old == compare ? value : old; });
}

#include "cub_twins.h"
