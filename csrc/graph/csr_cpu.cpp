// Counting sort of (row, col) pairs into CSR. Stable, so edges of one row keep their input order and
// every reduction that walks a row is deterministic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>

#include "graph/graph_checks.h"

namespace pk {
namespace {

template <typename I>
void count_rows(const I* row, const I* col, int64_t num_edges, int64_t num_rows, int64_t num_cols,
                int64_t* counts, const std::string& context) {
  for (int64_t e = 0; e < num_edges; ++e) {
    const int64_t r = row[e], c = col[e];
    TORCH_CHECK_INDEX(r >= 0 && r < num_rows, context, " holds target index ", r, " at position ", e,
                      ", out of range for ", num_rows, " target nodes");
    TORCH_CHECK_INDEX(c >= 0 && c < num_cols, context, " holds source index ", c, " at position ", e,
                      ", out of range for ", num_cols, " source nodes");
    ++counts[r + 1];
  }
}

template <typename I>
void fill(const I* row, const I* col, int64_t num_edges, int64_t* cursor, int64_t* col_out, int64_t* perm) {
  for (int64_t e = 0; e < num_edges; ++e) {
    const int64_t pos = cursor[row[e]]++;
    col_out[pos] = col[e];
    perm[pos] = e;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> coo_to_csr_cpu(const at::Tensor& row, const at::Tensor& col,
                                                              int64_t num_rows, int64_t num_cols,
                                                              c10::string_view context) {
  const std::string ctx(context);
  check_coo(ctx, row, col, num_rows, num_cols);
  const auto r = row.contiguous(), c = col.contiguous();
  const int64_t num_edges = r.numel();
  auto opts = r.options().dtype(at::kLong);
  auto rowptr = at::zeros({num_rows + 1}, opts);
  auto col_out = at::empty({num_edges}, opts);
  auto perm = at::empty({num_edges}, opts);
  int64_t* rp = rowptr.data_ptr<int64_t>();
  AT_DISPATCH_INDEX_TYPES(r.scalar_type(), "coo_to_csr", [&] {
    count_rows(r.data_ptr<index_t>(), c.data_ptr<index_t>(), num_edges, num_rows, num_cols, rp, ctx);
    for (int64_t i = 0; i < num_rows; ++i) rp[i + 1] += rp[i];
    std::vector<int64_t> cursor(rp, rp + num_rows);
    fill(r.data_ptr<index_t>(), c.data_ptr<index_t>(), num_edges, cursor.data(), col_out.data_ptr<int64_t>(),
         perm.data_ptr<int64_t>());
  });
  return {rowptr, col_out, perm};
}

void arg_to_source_cpu(at::Tensor& arg, const at::Tensor& col, int64_t empty) {
  constexpr const char* op = "pykernels.arg_to_source_";
  check_arg_to_source(op, arg, col);
  int64_t* a = arg.data_ptr<int64_t>();
  const int64_t* c = col.data_ptr<int64_t>();
  const int64_t n = arg.numel(), num_edges = col.numel();
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t f = begin; f < end; ++f) {
      const int64_t e = a[f];
      if (e < -1 || e >= num_edges) {
        bad.store(f);
        continue;
      }
      a[f] = e < 0 ? empty : c[e];
    }
  });
  TORCH_CHECK_INDEX(bad.load() < 0, op, ": arg holds ", bad.load() < 0 ? 0 : a[bad.load()], " at flat position ",
                    bad.load(), ", out of range for ", num_edges, " CSR positions");
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("coo_to_csr", &coo_to_csr_cpu);
  m.impl("arg_to_source_", &arg_to_source_cpu);
}

}  // namespace pk
