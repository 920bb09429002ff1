// Real kernel files run through the emulator on small graphs against plain C++ references: SDDMM, SpMM (every
// reduction, vector and scalar feature paths, several lane-group sizes) and COO -> CSR (cub twins included).
// Any finding of the detectors fails the case. Linked with the emulated objects of sddmm_kernel.cu,
// spmm_kernel.cu and csr_kernel.cu.
#include <cmath>
#include <random>

#include "emu_test.h"
#include "graph/graph_cuda.h"

using emu_test::check;
using emu_test::DeviceBuffer;
using emu_test::expect_clean;

namespace {

struct Graph {
  int64_t rows, sources;
  std::vector<int64_t> rowptr, col;
};

// Degrees 0..9 (row 0 and every seventh row empty), random sources with repeats.
Graph random_graph(int64_t rows, int64_t sources, unsigned seed) {
  std::mt19937 rng(seed);
  Graph g{rows, sources, {0}, {}};
  for (int64_t r = 0; r < rows; ++r) {
    const int deg = r % 7 == 0 ? 0 : static_cast<int>(rng() % 10);
    for (int k = 0; k < deg; ++k) g.col.push_back(static_cast<int64_t>(rng() % sources));
    g.rowptr.push_back(static_cast<int64_t>(g.col.size()));
  }
  return g;
}

template <typename T>
std::vector<T> random_values(size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<T> v(n);
  for (auto& x : v) x = T(dist(rng));
  return v;
}

template <typename T>
double tolerance() {
  return std::is_same_v<T, float> ? 1e-5 : std::is_same_v<T, double> ? 1e-12 : 1e-2;
}

template <typename T>
double to_double(T v) {
  if constexpr (std::is_same_v<T, double>)
    return v;
  else
    return static_cast<double>(static_cast<float>(v));
}

template <typename T>
void check_close(T got, double want, const std::string& what) {
  const double g = to_double(got);
  check(std::fabs(g - want) <= tolerance<T>() * (1 + std::fabs(want)),
        what + ": " + std::to_string(g) + " vs " + std::to_string(want));
}

template <typename T>
void check_sddmm(int64_t heads, int64_t feats) {
  const Graph g = random_graph(41, 29, 1);
  const int64_t hf = heads * feats, edges = static_cast<int64_t>(g.col.size());
  DeviceBuffer<int64_t> rowptr(g.rowptr), col(g.col);
  DeviceBuffer<T> a(random_values<T>(g.rows * hf, 2)), b(random_values<T>(g.sources * hf, 3)), out(edges * heads);
  const pk::cuda::Csr csr{rowptr.ptr, col.ptr, g.rows};
  pk::cuda::sddmm(pk::cuda::SddmmParams<T>{csr, a.ptr, b.ptr, out.ptr, heads, feats, nullptr});
  check(cudaGetLastError() == cudaSuccess, "sddmm launch");
  expect_clean();
  for (int64_t r = 0; r < g.rows; ++r)
    for (int64_t e = g.rowptr[r]; e < g.rowptr[r + 1]; ++e)
      for (int64_t h = 0; h < heads; ++h) {
        double dot = 0;
        for (int64_t f = 0; f < feats; ++f)
          dot += to_double(a.ptr[r * hf + h * feats + f]) * to_double(b.ptr[g.col[e] * hf + h * feats + f]);
        check_close(out.ptr[e * heads + h], dot, "sddmm edge " + std::to_string(e));
      }
}

EMU_CASE(sddmm_float_vector_path) { check_sddmm<float>(2, 8); }
EMU_CASE(sddmm_float_scalar_path) { check_sddmm<float>(3, 5); }
EMU_CASE(sddmm_half_wide_rows) { check_sddmm<__half>(1, 72); }
EMU_CASE(sddmm_bf16) { check_sddmm<__nv_bfloat16>(2, 4); }
EMU_CASE(sddmm_double) { check_sddmm<double>(2, 3); }

template <typename T>
void check_spmm(pk::Reduce reduce, int64_t heads, int64_t feats, bool weighted) {
  using A = pk::cuda::acc_t<T>;
  const Graph g = random_graph(45, 31, 4);
  const int64_t hf = heads * feats, edges = static_cast<int64_t>(g.col.size());
  DeviceBuffer<int64_t> rowptr(g.rowptr), col(g.col), arg(g.rows * hf);
  DeviceBuffer<T> x(random_values<T>(g.sources * hf, 5)), w(random_values<T>(edges * heads, 6)), out(g.rows * hf);
  const bool with_arg = reduce == pk::Reduce::kMax || reduce == pk::Reduce::kMin;
  pk::cuda::spmm(pk::cuda::SpmmParams<T>{{rowptr.ptr, col.ptr, g.rows}, weighted ? w.ptr : nullptr, x.ptr, out.ptr,
                                         with_arg ? arg.ptr : nullptr, heads, feats, reduce, nullptr});
  check(cudaGetLastError() == cudaSuccess, "spmm launch");
  expect_clean();
  for (int64_t r = 0; r < g.rows; ++r)
    for (int64_t f = 0; f < hf; ++f) {
      const int64_t h = f / feats, begin = g.rowptr[r], end = g.rowptr[r + 1];
      const std::string what = "spmm row " + std::to_string(r) + " feature " + std::to_string(f);
      if (!with_arg) {
        double sum = 0;
        for (int64_t e = begin; e < end; ++e)
          sum += (weighted ? to_double(w.ptr[e * heads + h]) : 1.0) * to_double(x.ptr[g.col[e] * hf + f]);
        if (reduce == pk::Reduce::kMean && end > begin) sum /= double(end - begin);
        check_close(out.ptr[r * hf + f], sum, what);
        continue;
      }
      int64_t best_e = -1;
      A best = 0;
      for (int64_t e = begin; e < end; ++e) {
        const A weight = weighted ? A(to_double(w.ptr[e * heads + h])) : A(1);
        const A v = weight * A(to_double(x.ptr[g.col[e] * hf + f]));
        if (best_e < 0 || (reduce == pk::Reduce::kMax ? v > best : v < best)) {
          best = v;
          best_e = e;
        }
      }
      check(arg.ptr[r * hf + f] == best_e, what + ": arg " + std::to_string(arg.ptr[r * hf + f]) + " vs " +
                                               std::to_string(best_e));
      check_close(out.ptr[r * hf + f], best_e < 0 ? 0.0 : double(best), what);
    }
}

EMU_CASE(spmm_sum_float_vector) { check_spmm<float>(pk::Reduce::kSum, 2, 8, false); }
EMU_CASE(spmm_sum_weighted_scalar) { check_spmm<float>(pk::Reduce::kSum, 3, 3, true); }
EMU_CASE(spmm_mean_half) { check_spmm<__half>(pk::Reduce::kMean, 1, 36, false); }
EMU_CASE(spmm_max_weighted_float) { check_spmm<float>(pk::Reduce::kMax, 2, 4, true); }
EMU_CASE(spmm_min_bf16_scalar) { check_spmm<__nv_bfloat16>(pk::Reduce::kMin, 1, 5, false); }
EMU_CASE(spmm_max_double_wide) { check_spmm<double>(pk::Reduce::kMax, 1, 140, false); }

template <typename I>
void check_coo_to_csr() {
  const int64_t rows = 19, cols = 13, edges = 90;
  std::mt19937 rng(8);
  std::vector<I> row(edges), col(edges);
  for (int64_t e = 0; e < edges; ++e) {
    row[e] = static_cast<I>(rng() % rows);
    col[e] = static_cast<I>(rng() % cols);
  }
  DeviceBuffer<I> d_row(row), d_col(col);
  DeviceBuffer<int64_t> rowptr(rows + 1), col_out(edges), perm(edges);
  DeviceBuffer<pk::cuda::CooStatus> status(1);
  DeviceBuffer<unsigned char> workspace(pk::cuda::coo_to_csr_workspace_bytes<I>(edges, rows));
  const pk::cuda::CooToCsrParams<I> p{d_row.ptr,   d_col.ptr, edges,      rows,          cols, rowptr.ptr,
                                      col_out.ptr, perm.ptr,  status.ptr, workspace.ptr, nullptr};
  check(pk::cuda::coo_to_csr_count(p) == cudaSuccess, "count");
  expect_clean();
  check(status.ptr->position == -1, "every index in range");
  check(pk::cuda::coo_to_csr_fill(p) == cudaSuccess, "fill");
  expect_clean();
  std::vector<int64_t> want_rowptr(rows + 1, 0), want_perm;
  for (I r : row) ++want_rowptr[r + 1];
  for (int64_t r = 0; r < rows; ++r) want_rowptr[r + 1] += want_rowptr[r];
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t e = 0; e < edges; ++e)
      if (row[e] == r) want_perm.push_back(e);
  check(rowptr.host() == want_rowptr, "rowptr");
  check(perm.host() == want_perm, "perm is the stable order");
  for (int64_t k = 0; k < edges; ++k) check(col_out.ptr[k] == col[want_perm[k]], "col gathered through perm");

  d_row.ptr[57] = static_cast<I>(rows);  // out of range: the first bad edge is reported with its indices
  d_col.ptr[80] = static_cast<I>(-1);
  check(pk::cuda::coo_to_csr_count(p) == cudaSuccess, "count with bad edges");
  expect_clean();
  check(status.ptr->position == 57 && status.ptr->row == rows, "first bad edge");
}

EMU_CASE(coo_to_csr_int64) { check_coo_to_csr<int64_t>(); }
EMU_CASE(coo_to_csr_int32) { check_coo_to_csr<int32_t>(); }

}  // namespace

EMU_MAIN()
