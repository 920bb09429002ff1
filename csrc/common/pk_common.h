// Definitions shared by every engine. Torch-free, so CUDA kernel files can include it under plain nvcc.
#pragma once
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PK_HOST_DEVICE inline
#endif

namespace pk {
// Every offset is 64-bit: E * H * F passes 2^31 on graphs like ogbn-products.
using index_t = int64_t;
}  // namespace pk
