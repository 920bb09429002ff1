// CUDA launcher for coo_to_csr. Validation costs one device-to-host copy, and so one stream sync: the
// error must name the first out-of-range edge, exactly as the CPU engine does, and the fill must never
// see out-of-range rows. It is the only sync in the graph CUDA engine, paid once per graph.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_launch.h"
#include "graph/graph_checks.h"
#include "graph/graph_cuda.h"

namespace pk {
namespace {

static_assert(sizeof(cuda::CooStatus) == 3 * sizeof(int64_t), "CooStatus is read back as three int64");

template <typename I>
void build_csr(const at::Tensor& row, const at::Tensor& col, int64_t num_rows, int64_t num_cols,
               const std::string& ctx, at::Tensor& rowptr, at::Tensor& col_out, at::Tensor& perm) {
  auto status = at::empty({3}, row.options().dtype(at::kLong));
  cuda::CooToCsrParams<I> p{cuda::data<I>(row), cuda::data<I>(col), row.numel(), num_rows, num_cols,
                            cuda::data<int64_t>(rowptr), cuda::data<int64_t>(col_out), cuda::data<int64_t>(perm),
                            reinterpret_cast<cuda::CooStatus*>(cuda::data<int64_t>(status)), nullptr,
                            cuda::current_stream()};
  PK_CUDA_CHECK(cuda::coo_to_csr_count(p));
  const auto found = status.cpu();  // the sync
  const int64_t pos = found.data_ptr<int64_t>()[0], bad_row = found.data_ptr<int64_t>()[1],
                bad_col = found.data_ptr<int64_t>()[2];
  if (pos >= 0) {
    TORCH_CHECK_INDEX(bad_row >= 0 && bad_row < num_rows, ctx, " holds target index ", bad_row, " at position ", pos,
                      ", out of range for ", num_rows, " target nodes");
    TORCH_CHECK_INDEX(false, ctx, " holds source index ", bad_col, " at position ", pos, ", out of range for ",
                      num_cols, " source nodes");
  }
  const auto bytes = static_cast<int64_t>(cuda::coo_to_csr_workspace_bytes<I>(p.num_edges, num_rows));
  auto workspace = at::empty({bytes}, row.options().dtype(at::kByte));
  p.workspace = cuda::data<uint8_t>(workspace);
  PK_CUDA_CHECK(cuda::coo_to_csr_fill(p));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> coo_to_csr_cuda(const at::Tensor& row, const at::Tensor& col,
                                                               int64_t num_rows, int64_t num_cols,
                                                               c10::string_view context) {
  const std::string ctx(context);
  check_coo(ctx, row, col, num_rows, num_cols);
  const cuda::DeviceGuard guard(row.device());
  const auto r = row.contiguous(), c = col.contiguous();
  auto opts = r.options().dtype(at::kLong);
  auto rowptr = at::empty({num_rows + 1}, opts);
  auto col_out = at::empty({r.numel()}, opts);
  auto perm = at::empty({r.numel()}, opts);
  AT_DISPATCH_INDEX_TYPES(r.scalar_type(), "coo_to_csr_cuda",
                          [&] { build_csr<index_t>(r, c, num_rows, num_cols, ctx, rowptr, col_out, perm); });
  return {rowptr, col_out, perm};
}

// Device memory is cached by the allocator, so plain ATen ops serve here. at::where evaluates both branches, so
// the gather runs for every position: one outside [-1, E) would be a device-side assert that poisons the
// context, hence the range check (one sync, as the CPU engine's IndexError), and with no edges at all (scatter
// of an empty index into dim_size > 0 groups) every position is -1 and there is no col to gather from.
void arg_to_source_cuda(at::Tensor& arg, const at::Tensor& col, int64_t empty) {
  constexpr const char* op = "pykernels.arg_to_source_";
  check_arg_to_source(op, arg, col);
  const cuda::DeviceGuard guard(arg.device());
  const at::Tensor flat = arg.view({-1});
  const int64_t num_edges = col.numel();
  const at::Tensor out_of_range = at::logical_or(flat < -1, flat >= num_edges);
  if (out_of_range.any().item<bool>()) {
    const int64_t pos = out_of_range.nonzero()[0][0].item<int64_t>();
    TORCH_CHECK_INDEX(false, op, ": arg holds ", flat[pos].item<int64_t>(), " at flat position ", pos,
                      ", out of range for ", num_edges, " CSR positions");
  }
  if (num_edges == 0) {
    flat.fill_(empty);
    return;
  }
  flat.copy_(at::where(flat >= 0, col.index_select(0, flat.clamp_min(0)), empty));
}

}  // namespace

PK_CUDA_LIBRARY_IMPL(m) {
  m.impl("coo_to_csr", &coo_to_csr_cuda);
  m.impl("arg_to_source_", &arg_to_source_cuda);
}

}  // namespace pk
