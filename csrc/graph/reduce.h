// The SpMM reductions, shared by the CPU engine and the torch-free CUDA kernels.
#pragma once

namespace pk {
enum class Reduce { kSum, kMean, kMax, kMin };
}  // namespace pk
