// COO -> CSR on the device: validate and count per row, scan the counts, then a stable radix sort of
// the row keys carrying edge ids. The sort hands back perm directly and keeps each row's edges in input
// order, which is exactly the CPU engine's counting sort, so both engines build identical CSRs.
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include "common/cuda_utils.cuh"
#include "graph/graph_cuda.h"

namespace pk::cuda {
namespace {

template <typename I>
__global__ void __launch_bounds__(kBlockThreads) count_rows_kernel(CooToCsrParams<I> p) {
  const index_t e = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= p.num_edges) return;
  const int64_t r = p.row[e], c = p.col[e];
  if (r >= 0 && r < p.num_rows && c >= 0 && c < p.num_cols)
    atomicAdd(reinterpret_cast<unsigned long long*>(p.rowptr + 1 + r), 1ull);
  else  // status->position starts as all ones, the largest unsigned value
    atomicMin(reinterpret_cast<unsigned long long*>(&p.status->position), static_cast<unsigned long long>(e));
}

// The count kernel only knows the first bad position once it has finished; this records the indices
// found there, so the host reads the whole error with one copy.
template <typename I>
__global__ void record_bad_edge_kernel(CooToCsrParams<I> p) {
  const int64_t pos = p.status->position;
  if (pos < 0) return;
  p.status->row = p.row[pos];
  p.status->col = p.col[pos];
}

__global__ void __launch_bounds__(kBlockThreads) iota_kernel(int64_t* out, int64_t n) {
  const index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = i;
}

template <typename I>
__global__ void __launch_bounds__(kBlockThreads) gather_col_kernel(CooToCsrParams<I> p) {
  const index_t pos = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pos < p.num_edges) p.col_out[pos] = p.col[p.perm[pos]];
}

// Rows are validated to lie in [0, num_rows), so only the low bits take part in the sort.
template <typename I>
int row_key_bits(int64_t num_rows) {
  int bits = 1;
  while (bits < static_cast<int>(sizeof(I)) * 8 - 1 && (int64_t(1) << bits) < num_rows) ++bits;
  return bits;
}

constexpr size_t kAlign = 256;
size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Workspace: sorted keys (discarded), edge ids 0..E-1 (the sort's values), then cub's scratch.
template <typename I>
struct Workspace {
  I* sorted_rows;
  int64_t* edge_ids;
  void* scratch;
  size_t scratch_bytes;
};

template <typename I>
size_t cub_scratch_bytes(int64_t num_edges, int64_t num_rows) {
  size_t scan = 0, sort = 0;
  // A size query cannot fail for valid sizes; if it ever did, the real call in fill reports it.
  (void)cub::DeviceScan::InclusiveSum(nullptr, scan, static_cast<int64_t*>(nullptr),
                                      static_cast<int64_t*>(nullptr), num_rows);
  (void)cub::DeviceRadixSort::SortPairs(nullptr, sort, static_cast<const I*>(nullptr), static_cast<I*>(nullptr),
                                        static_cast<const int64_t*>(nullptr), static_cast<int64_t*>(nullptr),
                                        num_edges, 0, row_key_bits<I>(num_rows));
  return scan > sort ? scan : sort;
}

template <typename I>
Workspace<I> carve(const CooToCsrParams<I>& p) {
  char* base = static_cast<char*>(p.workspace);
  const size_t keys = align_up(p.num_edges * sizeof(I)), ids = align_up(p.num_edges * sizeof(int64_t));
  return {reinterpret_cast<I*>(base), reinterpret_cast<int64_t*>(base + keys), base + keys + ids,
          cub_scratch_bytes<I>(p.num_edges, p.num_rows)};
}

}  // namespace

template <typename I>
size_t coo_to_csr_workspace_bytes(int64_t num_edges, int64_t num_rows) {
  return align_up(num_edges * sizeof(I)) + align_up(num_edges * sizeof(int64_t)) +
         cub_scratch_bytes<I>(num_edges, num_rows);
}

template <typename I>
cudaError_t coo_to_csr_count(const CooToCsrParams<I>& p) {
  cudaError_t err = cudaMemsetAsync(p.status, 0xff, sizeof(CooStatus), p.stream);
  if (err == cudaSuccess) err = cudaMemsetAsync(p.rowptr, 0, (p.num_rows + 1) * sizeof(int64_t), p.stream);
  if (err != cudaSuccess || p.num_edges == 0) return err;
  PK_LAUNCH(blocks_for(p.num_edges, 1), kBlockThreads, 0, p.stream, count_rows_kernel<I>)(p);
  PK_LAUNCH(1, 1, 0, p.stream, record_bad_edge_kernel<I>)(p);
  return cudaGetLastError();
}

template <typename I>
cudaError_t coo_to_csr_fill(const CooToCsrParams<I>& p) {
  Workspace<I> ws = carve(p);
  cudaError_t err = cudaSuccess;
  if (p.num_rows > 0)
    err = cub::DeviceScan::InclusiveSum(ws.scratch, ws.scratch_bytes, p.rowptr + 1, p.rowptr + 1, p.num_rows,
                                        p.stream);
  if (err != cudaSuccess || p.num_edges == 0) return err;
  PK_LAUNCH(blocks_for(p.num_edges, 1), kBlockThreads, 0, p.stream, iota_kernel)(ws.edge_ids, p.num_edges);
  err = cub::DeviceRadixSort::SortPairs(ws.scratch, ws.scratch_bytes, p.row, ws.sorted_rows, ws.edge_ids, p.perm,
                                        p.num_edges, 0, row_key_bits<I>(p.num_rows), p.stream);
  if (err != cudaSuccess) return err;
  PK_LAUNCH(blocks_for(p.num_edges, 1), kBlockThreads, 0, p.stream, gather_col_kernel<I>)(p);
  return cudaGetLastError();
}

#define PK_INSTANTIATE_COO_TO_CSR(I)                                                 \
  template size_t coo_to_csr_workspace_bytes<I>(int64_t, int64_t);                  \
  template cudaError_t coo_to_csr_count<I>(const CooToCsrParams<I>&);               \
  template cudaError_t coo_to_csr_fill<I>(const CooToCsrParams<I>&)

PK_INSTANTIATE_COO_TO_CSR(int32_t);
PK_INSTANTIATE_COO_TO_CSR(int64_t);

}  // namespace pk::cuda
