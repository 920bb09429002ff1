// Every piece of inline PTX the CUDA engine uses, as named device functions. The emulation build
// (csrc/emulation) gives each a twin computed from the PTX ISA's fragment tables, so nothing outside this
// header may contain asm.
#pragma once
#include <cstdint>

namespace pk::cuda::ptx {

#if defined(PK_CUDA_EMULATION)

__device__ __forceinline__ void mma_m16n8k16_f16(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  ::pk::emu::mma_m16n8k16(::pk::emu::MmaType::kF16, acc, a, b0, b1, __FILE__, __LINE__);
}

__device__ __forceinline__ void mma_m16n8k16_bf16(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  ::pk::emu::mma_m16n8k16(::pk::emu::MmaType::kBf16, acc, a, b0, b1, __FILE__, __LINE__);
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_ptr) {
  struct alignas(16) Row {
    uint32_t w[4];
  };
  const Row row = *static_cast<const Row*>(smem_ptr);
  ::pk::emu::ldmatrix_x4_trans_exchange(r, &row, smem_ptr, __FILE__, __LINE__);
}

#else

// acc = A * B + acc for one warp: A 16 x 16 (row-major fragment a), B 16 x 8 (column-major fragment b0, b1),
// fp16 inputs, fp32 accumulation.
__device__ __forceinline__ void mma_m16n8k16_f16(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The same with bf16 inputs.
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8x8 b16 matrices from shared memory, transposed; lane 8j + i gives the address of row i of matrix j.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_ptr) {
  const auto addr = static_cast<unsigned>(__cvta_generic_to_shared(smem_ptr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

#endif

}  // namespace pk::cuda::ptx
