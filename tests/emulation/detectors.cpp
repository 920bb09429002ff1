// Each detector of the emulator against a small deliberately broken kernel it must catch, and a correct twin
// that must pass. Built as an emulated kernel file (see cuda_emulation.h for the flags).
#include <thread>

#include "common/cuda_utils.cuh"
#include "emu_test.h"

using emu_test::check;
using emu_test::DeviceBuffer;
using emu_test::expect_clean;
using emu_test::expect_finding;

std::string where(const std::string& snippet) { return emu_test::where(__FILE__, snippet); }

namespace {

// ------------------------------------------------------------------------------------------ shared races

__global__ void shared_write_race_kernel(int* out) {
  __shared__ int slot;
  slot = threadIdx.x;  // every thread, no barrier between the writes
  __syncthreads();
  out[threadIdx.x] = slot;
}

__global__ void shared_exchange_kernel(int* out) {
  __shared__ int slots[64];
  slots[threadIdx.x] = threadIdx.x;
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = slots[(threadIdx.x + 1) % blockDim.x];
}

__global__ void shared_read_write_race_kernel(int* out) {
  __shared__ int slots[64];
  slots[threadIdx.x] = threadIdx.x;
  __syncthreads();
  const int next = slots[(threadIdx.x + 1) % blockDim.x];
  slots[threadIdx.x] = next;  // thread t - 1 may not have read slots[t] yet
  out[threadIdx.x] = next;
}

// Lanes of one warp exchange through shared memory, ordered by __syncwarp (or not).
template <bool kSyncWarp>
__global__ void warp_exchange_kernel(int* out) {
  __shared__ int slots[32];
  const int lane = threadIdx.x % 32;
  slots[lane] = lane * 10;
  if (kSyncWarp) __syncwarp();
  out[threadIdx.x] = slots[lane ^ 1];
}

EMU_CASE(race_shared_write_write) {
  DeviceBuffer<int> out(64);
  PK_LAUNCH(1, 64, 0, nullptr, shared_write_race_kernel)(out.ptr);
  check(cudaGetLastError() == cudaErrorLaunchFailure, "the launch reports a failure");
  expect_finding("race", {"shared_write_race_kernel", where("slot = threadIdx.x;"), "static __shared__"});
}

EMU_CASE(race_shared_read_write) {
  DeviceBuffer<int> out(64);
  PK_LAUNCH(1, 64, 0, nullptr, shared_read_write_race_kernel)(out.ptr);
  expect_finding("race", {"shared_read_write_race_kernel", where("slots[threadIdx.x] = next;"), "read by thread"});
}

EMU_CASE(race_shared_clean_twin) {
  DeviceBuffer<int> out(128);
  PK_LAUNCH(2, 64, 0, nullptr, shared_exchange_kernel)(out.ptr);
  check(cudaGetLastError() == cudaSuccess, "clean launch");
  expect_clean();
  for (int t = 0; t < 128; ++t) check(out.ptr[t] == (t + 1) % 64, "exchanged values");
}

EMU_CASE(race_warp_without_syncwarp) {
  DeviceBuffer<int> out(32);
  PK_LAUNCH(1, 32, 0, nullptr, warp_exchange_kernel<false>)(out.ptr);
  expect_finding("race", {"warp_exchange_kernel<false>", where("out[threadIdx.x] = slots[lane ^ 1];")});
}

EMU_CASE(race_warp_syncwarp_clean_twin) {
  DeviceBuffer<int> out(32);
  PK_LAUNCH(1, 32, 0, nullptr, warp_exchange_kernel<true>)(out.ptr);
  expect_clean();
  for (int t = 0; t < 32; ++t) check(out.ptr[t] == (t ^ 1) * 10, "exchanged values");
}

// ------------------------------------------------------------------------------------------ global races

__global__ void global_race_kernel(int* out) { out[threadIdx.x % 4] = blockIdx.x; }
__global__ void global_owned_kernel(int* out) { out[blockIdx.x * blockDim.x + threadIdx.x] = blockIdx.x; }
__global__ void global_cross_block_read_kernel(int* data) {
  data[blockIdx.x] = 1;
  if (blockIdx.x > 0) data[blockIdx.x + 8] = data[blockIdx.x - 1];  // another block's output, same launch
}

EMU_CASE(race_global_write_write_across_blocks) {
  DeviceBuffer<int> out(4);
  PK_LAUNCH(3, 4, 0, nullptr, global_race_kernel)(out.ptr);
  expect_finding("race", {"global_race_kernel", "global memory", "of block (0,0,0)"});
}

EMU_CASE(race_global_read_after_write_across_blocks) {
  DeviceBuffer<int> data(16);
  PK_LAUNCH(4, 1, 0, nullptr, global_cross_block_read_kernel)(data.ptr);
  expect_finding("race", {"global_cross_block_read_kernel", where("data[blockIdx.x + 8] = data[blockIdx.x - 1];")});
}

EMU_CASE(race_global_clean_twin) {
  DeviceBuffer<int> out(12);
  PK_LAUNCH(3, 4, 0, nullptr, global_owned_kernel)(out.ptr);
  PK_LAUNCH(3, 4, 0, nullptr, global_owned_kernel)(out.ptr);  // a second launch may rewrite the same outputs
  expect_clean();
  for (int i = 0; i < 12; ++i) check(out.ptr[i] == i / 4, "block ids");
}

// ------------------------------------------------------------------------------------------ bounds

__global__ void dynamic_shared_kernel(int* out, int offset) {
  int* tile = reinterpret_cast<int*>(pk::cuda::dynamic_shared_memory());
  const int i = static_cast<int>(threadIdx.x) + offset;
  tile[i] = i;
  __syncthreads();
  out[threadIdx.x] = tile[i];
}

EMU_CASE(bounds_shared_past_dynamic_size) {
  DeviceBuffer<int> out(64);
  PK_LAUNCH(1, 64, 64 * sizeof(int), nullptr, dynamic_shared_kernel)(out.ptr, 1);
  check(cudaGetLastError() == cudaErrorIllegalAddress, "an illegal address");
  expect_finding("out-of-bounds", {"dynamic_shared_kernel", "dynamic shared memory + 256", "outside the launch's 256"});
}

EMU_CASE(bounds_shared_before_start) {
  DeviceBuffer<int> out(64);
  PK_LAUNCH(1, 64, 64 * sizeof(int), nullptr, dynamic_shared_kernel)(out.ptr, -1);
  expect_finding("out-of-bounds", {"dynamic shared memory + -4"});
}

EMU_CASE(bounds_shared_clean_twin) {
  DeviceBuffer<int> out(64);
  PK_LAUNCH(1, 64, 65 * sizeof(int), nullptr, dynamic_shared_kernel)(out.ptr, 1);
  expect_clean();
  for (int t = 0; t < 64; ++t) check(out.ptr[t] == t + 1, "values through shared memory");
}

__global__ void global_copy_kernel(const float* in, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) out[i] = in[i];  // off by one
}

__global__ void global_copy_guarded_kernel(const float* in, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = in[i];
}

EMU_CASE(bounds_global_off_by_one) {
  DeviceBuffer<float> in(100, 1.0f), out(100);
  PK_LAUNCH(2, 64, 0, nullptr, global_copy_kernel)(in.ptr, out.ptr, 100);
  expect_finding("out-of-bounds", {"global_copy_kernel", "0 bytes past the end of a 400-byte allocation",
                                   where("if (i <= n) out[i] = in[i];")});
}

EMU_CASE(bounds_global_clean_twin) {
  DeviceBuffer<float> in(100, 1.0f), out(100);
  PK_LAUNCH(2, 64, 0, nullptr, global_copy_guarded_kernel)(in.ptr, out.ptr, 100);
  expect_clean();
  for (float v : out.host()) check(v == 1.0f, "copied");
}

// ------------------------------------------------------------------------------------------ barriers

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 32) {
    __syncthreads();  // barrier A
  } else {
    __syncthreads();  // barrier B
  }
  out[threadIdx.x] = 1;
}

__global__ void barrier_after_exit_kernel(int* out) {
  if (threadIdx.x >= 40) return;
  __syncthreads();  // barrier after exit
  out[threadIdx.x] = 1;
}

__global__ void uniform_barrier_kernel(int* out) {
  for (int i = 0; i < 3; ++i) __syncthreads();
  out[threadIdx.x] = 1;
}

EMU_CASE(barrier_divergent) {
  DeviceBuffer<int> out(64);
  PK_LAUNCH(1, 64, 0, nullptr, divergent_barrier_kernel)(out.ptr);
  expect_finding("barrier", {"divergent_barrier_kernel", "different __syncthreads", where("barrier A"),
                             where("barrier B")});
}

EMU_CASE(barrier_after_exit) {
  DeviceBuffer<int> out(64);
  PK_LAUNCH(1, 64, 0, nullptr, barrier_after_exit_kernel)(out.ptr);
  expect_finding("barrier", {"barrier_after_exit_kernel", "24 thread(s) of the block have exited",
                             where("barrier after exit")});
}

EMU_CASE(barrier_clean_twin) {
  DeviceBuffer<int> out(64);
  PK_LAUNCH(1, 64, 0, nullptr, uniform_barrier_kernel)(out.ptr);
  expect_clean();
}

// ------------------------------------------------------------------------------------------ warp masks

__global__ void shuffle_after_exit_kernel(int* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x), 0);
}

__global__ void shuffle_half_warp_kernel(int* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = __shfl_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 3);
}

__global__ void shuffle_outside_mask_kernel(int* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 16, 32);
}

__global__ void reduce_kernel(int* out) {
  int v = threadIdx.x;
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const unsigned odd = __ballot_sync(0xffffffffu, threadIdx.x & 1);
  if (threadIdx.x % 32 == 0) out[threadIdx.x / 32] = v + (odd == 0xaaaaaaaau ? 1000 : 0);
  out[2 + threadIdx.x] = __shfl_up_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1, 8) +
                         100 * __all_sync(0xffffffffu, threadIdx.x < 64) + 1000 * __any_sync(0xffffffffu, false);
}

EMU_CASE(mask_names_exited_lanes) {
  DeviceBuffer<int> out(32);
  PK_LAUNCH(1, 32, 0, nullptr, shuffle_after_exit_kernel)(out.ptr);
  expect_finding("warp-mask", {"shuffle_after_exit_kernel", "has exited",
                               where("__shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x), 0)")});
}

EMU_CASE(mask_names_absent_lanes) {
  DeviceBuffer<int> out(32);
  PK_LAUNCH(1, 16, 0, nullptr, reduce_kernel)(out.ptr);
  expect_finding("warp-mask", {"reduce_kernel", "names lanes the block does not have"});
}

EMU_CASE(mask_source_outside_mask) {
  DeviceBuffer<int> out(32);
  PK_LAUNCH(1, 32, 0, nullptr, shuffle_outside_mask_kernel)(out.ptr);
  expect_finding("warp-mask", {"shuffle_outside_mask_kernel", "outside the mask"});
}

EMU_CASE(mask_clean_twins) {
  DeviceBuffer<int> out(66);
  PK_LAUNCH(1, 32, 0, nullptr, shuffle_half_warp_kernel)(out.ptr);
  expect_clean();
  for (int t = 0; t < 16; ++t) check(out.ptr[t] == 3, "broadcast within the half warp");
  PK_LAUNCH(1, 64, 0, nullptr, reduce_kernel)(out.ptr);
  expect_clean();
  check(out.ptr[0] == 496 + 1000 && out.ptr[1] == 32 * 32 + 496 + 1000, "warp sums and ballot");
  for (int t = 0; t < 64; ++t) check(out.ptr[2 + t] == (t % 8 == 0 ? t : t - 1) + 100, "shfl_up within width 8");
}

// ------------------------------------------------------------------------------------------ uninitialised reads

template <int kWriters>
__global__ void uninitialised_read_kernel(float* out) {
  __shared__ float tile[64];
  if (threadIdx.x < kWriters) tile[threadIdx.x] = 1.0f;
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = tile[threadIdx.x];
}

__global__ void dynamic_uninitialised_read_kernel(float* out) {
  const float* tile = reinterpret_cast<const float*>(pk::cuda::dynamic_shared_memory());
  out[threadIdx.x] = tile[threadIdx.x];
}

EMU_CASE(uninitialised_static_shared) {
  DeviceBuffer<float> out(64);
  PK_LAUNCH(1, 64, 0, nullptr, uninitialised_read_kernel<32>)(out.ptr);
  expect_finding("uninitialised", {"uninitialised_read_kernel<32>", where("= tile[threadIdx.x];"), "not written"});
}

EMU_CASE(uninitialised_dynamic_shared_poisoned) {
  DeviceBuffer<float> out(32);
  PK_LAUNCH(1, 32, 32 * sizeof(float), nullptr, dynamic_uninitialised_read_kernel)(out.ptr);
  expect_finding("uninitialised", {"dynamic_uninitialised_read_kernel", "dynamic shared memory + 0"});
  check(std::isnan(out.ptr[0]), "poisoned shared memory reads as NaN");
}

EMU_CASE(uninitialised_clean_twin) {
  DeviceBuffer<float> out(128);
  PK_LAUNCH(2, 64, 0, nullptr, uninitialised_read_kernel<64>)(out.ptr);  // the second block starts poisoned again
  expect_clean();
}

// ------------------------------------------------------------------------------------------ deadlocks

__global__ void syncwarp_against_barrier_kernel(int* out) {
  if (threadIdx.x < 16)
    __syncwarp();
  else
    __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void spin_kernel(int* out) {
  __shared__ volatile int flag;
  if (threadIdx.x == 0) flag = 0;
  __syncthreads();
  if (threadIdx.x == 0)
    while (flag == 0) {
    }
  out[threadIdx.x] = 1;
}

EMU_CASE(deadlock_detected) {
  DeviceBuffer<int> out(32);
  PK_LAUNCH(1, 32, 0, nullptr, syncwarp_against_barrier_kernel)(out.ptr);
  expect_finding("deadlock", {"syncwarp_against_barrier_kernel", "16 thread(s) from (0,0,0) wait at __syncwarp",
                              "16 thread(s) from (16,0,0) wait at __syncthreads"});
}

EMU_CASE(deadlock_spin_times_out) {
  DeviceBuffer<int> out(32);
  PK_LAUNCH(1, 32, 0, nullptr, spin_kernel)(out.ptr);
  check(cudaGetLastError() == cudaErrorLaunchTimeout, "a launch timeout");
  expect_finding("timeout", {"spin_kernel", "PK_EMU_TIMEOUT_S"});
}

// No access the emulator sees (a local that does not escape is not instrumented), so the loop never reaches
// check_timeout; volatile keeps the compiler from deleting it.
__global__ void register_loop_kernel(int*) {
  volatile unsigned x = threadIdx.x;
  for (;;) x = x * 3 + 1;
}

EMU_CASE_ALONE(watchdog_ends_an_access_free_loop) {
  DeviceBuffer<int> out(32);
  PK_LAUNCH(1, 32, 0, nullptr, register_loop_kernel)(out.ptr);
  check(false, "the launch returned; the watchdog should have ended the process");
}

// ------------------------------------------------------------------------------------------ launch checks

__global__ void touch_kernel(int* out) {
  if (threadIdx.x == 0 && blockIdx.x == 0 && blockIdx.y == 0) out[0] = gridDim.y;
}

EMU_CASE(launch_zero_sized) {
  DeviceBuffer<int> out(1);
  PK_LAUNCH(0, 32, 0, nullptr, touch_kernel)(out.ptr);
  check(cudaGetLastError() == cudaErrorInvalidConfiguration, "invalid configuration");
  expect_finding("launch", {"touch_kernel", "zero-sized launch"});
  PK_LAUNCH(1, 0, 0, nullptr, touch_kernel)(out.ptr);
  check(cudaGetLastError() == cudaErrorInvalidConfiguration, "invalid configuration");
}

EMU_CASE(launch_grid_y_limit) {
  DeviceBuffer<int> out(1);
  PK_LAUNCH(dim3(1, 65536), 32, 0, nullptr, touch_kernel)(out.ptr);
  check(cudaGetLastError() == cudaErrorInvalidConfiguration, "invalid configuration");
  expect_finding("launch", {"touch_kernel", "y and z <= 65535"});
  PK_LAUNCH(dim3(1, 65535), 1, 0, nullptr, touch_kernel)(out.ptr);
  check(cudaGetLastError() == cudaSuccess && out.ptr[0] == 65535, "65535 is allowed");
}

EMU_CASE(launch_block_too_large) {
  DeviceBuffer<int> out(1);
  PK_LAUNCH(1, 1025, 0, nullptr, touch_kernel)(out.ptr);
  check(cudaGetLastError() == cudaErrorInvalidConfiguration, "invalid configuration");
  expect_finding("launch", {"exceeds 1024 threads"});
}

template <int kCase>
__global__ void big_shared_kernel(int* out) {
  unsigned char* smem = pk::cuda::dynamic_shared_memory();
  smem[threadIdx.x] = 1;
  out[0] = 1;
}

EMU_CASE(launch_shared_memory_opt_in) {
  DeviceBuffer<int> out(1);
  const size_t bytes = 100 * 1024;
  PK_LAUNCH(1, 1, bytes, nullptr, big_shared_kernel<0>)(out.ptr);
  check(cudaGetLastError() == cudaErrorInvalidValue, "over 48 KiB without opt-in");
  expect_finding("launch", {"big_shared_kernel<0>", "without an opt-in"});
  check(cudaFuncSetAttribute(big_shared_kernel<0>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) == cudaSuccess,
        "opt-in");
  PK_LAUNCH(1, 1, bytes, nullptr, big_shared_kernel<0>)(out.ptr);
  check(cudaGetLastError() == cudaSuccess, "launch after the opt-in");
  expect_clean();
}

EMU_CASE(launch_shared_memory_arch_limits) {
  DeviceBuffer<int> out(1);
  const int bytes = 200 * 1024;
  pk::emu::set_arch(80);
  int limit = 0;
  cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0);
  check(limit == 163 * 1024, "sm_80 opt-in limit");
  check(cudaFuncSetAttribute(big_shared_kernel<1>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) ==
            cudaErrorInvalidValue,
        "200 KiB is above sm_80's limit");
  PK_LAUNCH(1, 1, bytes, nullptr, big_shared_kernel<1>)(out.ptr);
  check(cudaGetLastError() == cudaErrorInvalidValue, "launch above sm_80's limit");
  expect_finding("launch", {"sm_80's 166912"});
  pk::emu::set_arch(90);
  check(cudaFuncSetAttribute(big_shared_kernel<1>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) == cudaSuccess,
        "200 KiB fits sm_90");
  PK_LAUNCH(1, 1, bytes, nullptr, big_shared_kernel<1>)(out.ptr);
  check(cudaGetLastError() == cudaSuccess, "launch on sm_90");
  expect_clean();
}

EMU_CASE(launch_error_string_names_kernel) {
  DeviceBuffer<int> out(64);
  PK_LAUNCH(1, 64, 0, nullptr, shared_write_race_kernel)(out.ptr);
  const cudaError_t err = cudaGetLastError();
  const std::string text = cudaGetErrorString(err);
  check(text.find("cudaErrorLaunchFailure") != std::string::npos &&
            text.find("shared_write_race_kernel") != std::string::npos,
        "the error string carries the report: " + text);
  check(cudaGetLastError() == cudaSuccess, "reading the error clears it");
  pk::emu::take_findings();
}

// ------------------------------------------------------------------------------------------ error state

EMU_CASE(launch_error_is_this_launchs) {
  // An out-of-bounds launch, then a racy one: the second is a launch failure, not an illegal address carried over
  // from the first's finding.
  DeviceBuffer<float> in(100, 1.0f), copy(100);
  PK_LAUNCH(2, 64, 0, nullptr, global_copy_kernel)(in.ptr, copy.ptr, 100);
  check(cudaGetLastError() == cudaErrorIllegalAddress, "the first launch reports an illegal address");
  DeviceBuffer<int> out(64);
  PK_LAUNCH(1, 64, 0, nullptr, shared_write_race_kernel)(out.ptr);
  check(cudaGetLastError() == cudaErrorLaunchFailure, "the second launch reports its own failure");
}

EMU_CASE(last_error_is_per_host_thread) {
  // CUDA keeps the last error per host thread: a failed launch on one thread is not another's error.
  DeviceBuffer<int> out(1);
  cudaError_t seen_by_other = cudaErrorLaunchFailure, seen_by_launcher = cudaSuccess;
  std::thread launcher([&] {
    PK_LAUNCH(0, 32, 0, nullptr, touch_kernel)(out.ptr);
    std::thread other([&] { seen_by_other = cudaGetLastError(); });
    other.join();
    seen_by_launcher = cudaGetLastError();
  });
  launcher.join();
  check(seen_by_other == cudaSuccess, "another thread sees no error");
  check(seen_by_launcher == cudaErrorInvalidConfiguration, "the launching thread sees its error");
  check(cudaGetLastError() == cudaSuccess, "the main thread sees no error");
  pk::emu::take_findings();
}

}  // namespace

EMU_MAIN()
