// Row-parallel CSR times dense: each thread owns whole target rows, so no two threads write the same
// output and the result does not depend on scheduling. The max/min variants record which CSR edge won
// so backward needs no [E, H, F] tensor.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>


#include "common/checks.h"
#include "common/cpu_vec.h"
#include "graph/graph_checks.h"

namespace pk {
namespace {

// How many edges ahead the gathers prefetch their source rows: enough to cover a memory latency with
// the work of a few rows, few enough that the lines are still cached when used.
constexpr int64_t kPrefetchEdges = 8;

template <typename T>
void spmm_sum_rows(const int64_t* rowptr, const int64_t* col, const T* weight, const T* x, T* out,
                   int64_t num_rows, int64_t heads, int64_t feats, bool mean) {
  using A = cpu::acc_t<T>;
  const int64_t hf = heads * feats;
  const int64_t avg_deg = std::max<int64_t>(1, num_rows ? rowptr[num_rows] / num_rows : 1);
  at::parallel_for(0, num_rows, grain_for(num_rows, avg_deg * hf), [&](int64_t begin, int64_t end) {
    std::vector<A> acc(hf);
    const int64_t last_edge = rowptr[end];
    for (int64_t i = begin; i < end; ++i) {
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t e = rowptr[i]; e < rowptr[i + 1]; ++e) {
        if (e + kPrefetchEdges < last_edge) cpu::prefetch_row(x + col[e + kPrefetchEdges] * hf, hf * sizeof(T));
        const T* xj = x + col[e] * hf;
        for (int64_t h = 0; h < heads; ++h) {
          const A w = weight ? cpu::to_acc(weight[e * heads + h]) : A(1);
          cpu::axpy(acc.data() + h * feats, w, xj + h * feats, feats);
        }
      }
      const int64_t deg = rowptr[i + 1] - rowptr[i];
      const A s = (mean && deg > 0) ? A(1) / A(deg) : A(1);
      cpu::store(out + i * hf, acc.data(), s, hf);
    }
  });
}

// max/min of w * x[j] over a row's edges, with the CSR position of the winner. The running winner is a
// 32-bit offset into the row, the same width as a float lane, so the branch-free update vectorises.
// Ties keep the first edge (strict comparison); a NaN wins once and then sticks, as in torch, because
// every comparison against a NaN best is false.
template <bool IsMax, typename A, typename X>
inline void arg_update_impl(A* __restrict best, int32_t* __restrict arg, const X* __restrict x, A w,
                            int32_t offset, int64_t n) {
  for (int64_t f = 0; f < n; ++f) {
    const A v = w * static_cast<A>(x[f]);
    const bool take = (IsMax ? v > best[f] : v < best[f]) || (v != v && best[f] == best[f]);
    best[f] = take ? v : best[f];
    arg[f] = take ? offset : arg[f];
  }
}
PK_CPU_CLONES void arg_update(float* best, int32_t* arg, const float* x, float w, int32_t offset, int64_t n,
                              bool is_max) {
  is_max ? arg_update_impl<true>(best, arg, x, w, offset, n) : arg_update_impl<false>(best, arg, x, w, offset, n);
}
PK_CPU_CLONES void arg_update(double* best, int32_t* arg, const double* x, double w, int32_t offset, int64_t n,
                              bool is_max) {
  is_max ? arg_update_impl<true>(best, arg, x, w, offset, n) : arg_update_impl<false>(best, arg, x, w, offset, n);
}
template <typename X>
void arg_update(float* best, int32_t* arg, const X* x, float w, int32_t offset, int64_t n, bool is_max) {
  is_max ? arg_update_impl<true>(best, arg, x, w, offset, n) : arg_update_impl<false>(best, arg, x, w, offset, n);
}

template <typename T>
void spmm_arg_rows(const int64_t* rowptr, const int64_t* col, const T* weight, const T* x, T* out, int64_t* arg,
                   int64_t num_rows, int64_t heads, int64_t feats, bool is_max) {
  using A = cpu::acc_t<T>;
  const int64_t hf = heads * feats;
  for (int64_t i = 0; i < num_rows; ++i)
    TORCH_CHECK(rowptr[i + 1] - rowptr[i] < (int64_t(1) << 31), "pykernels.spmm: max/min supports in-degrees below 2^31");
  const int64_t avg_deg = std::max<int64_t>(1, num_rows ? rowptr[num_rows] / num_rows : 1);
  at::parallel_for(0, num_rows, grain_for(num_rows, avg_deg * hf), [&](int64_t begin, int64_t end) {
    std::vector<A> best(hf);
    std::vector<int32_t> local(hf);
    const int64_t last_edge = rowptr[end];
    for (int64_t i = begin; i < end; ++i) {
      int64_t* arg_i = arg + i * hf;
      T* out_i = out + i * hf;
      const int64_t e0 = rowptr[i];
      if (e0 == rowptr[i + 1]) {
        std::fill(arg_i, arg_i + hf, int64_t(-1));
        std::fill(out_i, out_i + hf, T(0));
        continue;
      }
      // The first edge seeds the running best, so a row of -inf messages still reports -inf and its edge.
      const T* x0 = x + col[e0] * hf;
      for (int64_t h = 0; h < heads; ++h) {
        const A w = weight ? cpu::to_acc(weight[e0 * heads + h]) : A(1);
        for (int64_t f = h * feats; f < (h + 1) * feats; ++f) best[f] = w * cpu::to_acc(x0[f]);
      }
      std::fill(local.begin(), local.end(), 0);
      for (int64_t e = e0 + 1; e < rowptr[i + 1]; ++e) {
        if (e + kPrefetchEdges < last_edge) cpu::prefetch_row(x + col[e + kPrefetchEdges] * hf, hf * sizeof(T));
        const T* xj = x + col[e] * hf;
        for (int64_t h = 0; h < heads; ++h) {
          const A w = weight ? cpu::to_acc(weight[e * heads + h]) : A(1);
          arg_update(best.data() + h * feats, local.data() + h * feats, xj + h * feats, w,
                     static_cast<int32_t>(e - e0), feats, is_max);
        }
      }
      for (int64_t f = 0; f < hf; ++f) {
        out_i[f] = static_cast<T>(best[f]);
        arg_i[f] = e0 + local[f];
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> spmm_cpu(const at::Tensor& rowptr, const at::Tensor& col,
                                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                            const std::optional<at::Tensor>& weight, const at::Tensor& x,
                                            c10::string_view reduce_name) {
  constexpr const char* op = "pykernels.spmm";
  const Reduce reduce = parse_reduce(reduce_name);
  check_csr(op, rowptr, col);
  PK_CHECK_FLOAT_TENSOR(op, "x", x);
  PK_CHECK_DIM(op, "x", x, 3);
  const int64_t num_rows = rowptr.numel() - 1, heads = x.size(1), feats = x.size(2);
  if (weight) check_edge_values(op, "edge_weight", *weight, col.numel(), heads, x.scalar_type());
  check_csr_contents(op, rowptr, col, x.size(0), "x's row count");
  auto out = at::empty({num_rows, heads, feats}, x.options());
  const bool with_arg = reduce == Reduce::kMax || reduce == Reduce::kMin;
  auto arg = at::empty({with_arg ? num_rows : 0, heads, feats}, x.options().dtype(at::kLong));
  PK_DISPATCH_FLOATS(x.scalar_type(), "spmm_cpu", [&] {
    const scalar_t* w = weight ? weight->data_ptr<scalar_t>() : nullptr;
    if (with_arg)
      spmm_arg_rows(rowptr.data_ptr<int64_t>(), col.data_ptr<int64_t>(), w, x.data_ptr<scalar_t>(),
                    out.data_ptr<scalar_t>(), arg.data_ptr<int64_t>(), num_rows, heads, feats,
                    reduce == Reduce::kMax);
    else
      spmm_sum_rows(rowptr.data_ptr<int64_t>(), col.data_ptr<int64_t>(), w, x.data_ptr<scalar_t>(),
                    out.data_ptr<scalar_t>(), num_rows, heads, feats, reduce == Reduce::kMean);
  });
  return {out, arg};
}

// acc[0:n] += w * g[0:n] where arg[f] == e: the gradient of the elements edge e won. A select rather than a
// branch, so that it vectorises; a gradient the edge did not win never enters, not even as 0 * inf.
template <typename A, typename G>
inline void won_axpy_impl(A* __restrict acc, const int64_t* __restrict arg, int64_t e, A w, const G* __restrict g,
                          int64_t n) {
  for (int64_t f = 0; f < n; ++f) acc[f] += arg[f] == e ? w * static_cast<A>(g[f]) : A(0);
}
PK_CPU_CLONES void won_axpy(float* acc, const int64_t* arg, int64_t e, float w, const float* g, int64_t n) {
  won_axpy_impl(acc, arg, e, w, g, n);
}
PK_CPU_CLONES void won_axpy(double* acc, const int64_t* arg, int64_t e, double w, const double* g, int64_t n) {
  won_axpy_impl(acc, arg, e, w, g, n);
}
template <typename G>
void won_axpy(float* acc, const int64_t* arg, int64_t e, float w, const G* g, int64_t n) {
  won_axpy_impl(acc, arg, e, w, g, n);
}

// grad_x walks the transpose (source-major) so each thread owns whole source rows: atomic-free and
// deterministic. grad_weight walks target rows, whose edges belong to that row alone.
template <typename T>
void spmm_arg_backward_impl(const int64_t* rowptr, const int64_t* col, const int64_t* rowptr_t,
                            const int64_t* col_t, const int64_t* perm_t, const T* weight, const int64_t* arg,
                            const T* grad, const T* x, T* grad_x, T* grad_w, int64_t num_rows, int64_t num_cols,
                            int64_t heads, int64_t feats) {
  using A = cpu::acc_t<T>;
  const int64_t hf = heads * feats;
  const int64_t avg_deg = std::max<int64_t>(1, num_cols ? rowptr_t[num_cols] / num_cols : 1);
  at::parallel_for(0, num_cols, grain_for(num_cols, avg_deg * hf), [&](int64_t begin, int64_t end) {
    std::vector<A> acc(hf);
    const int64_t last = rowptr_t[end];
    for (int64_t j = begin; j < end; ++j) {
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t t = rowptr_t[j]; t < rowptr_t[j + 1]; ++t) {
        if (t + kPrefetchEdges < last) {
          const int64_t ahead = col_t[t + kPrefetchEdges] * hf;
          cpu::prefetch_row(arg + ahead, hf * sizeof(int64_t));
          cpu::prefetch_row(grad + ahead, hf * sizeof(T));
        }
        const int64_t i = col_t[t], e = perm_t[t];
        const int64_t* arg_i = arg + i * hf;
        const T* g_i = grad + i * hf;
        for (int64_t h = 0; h < heads; ++h) {
          const A w = weight ? cpu::to_acc(weight[e * heads + h]) : A(1);
          won_axpy(acc.data() + h * feats, arg_i + h * feats, e, w, g_i + h * feats, feats);
        }
      }
      cpu::store(grad_x + j * hf, acc.data(), A(1), hf);
    }
  });
  if (!grad_w) return;
  at::parallel_for(0, num_rows, grain_for(num_rows, hf), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t e0 = rowptr[i], deg = rowptr[i + 1] - e0;
      std::vector<A> acc(deg * heads, A(0));
      const int64_t* arg_i = arg + i * hf;
      const T* g_i = grad + i * hf;
      for (int64_t f = 0; f < hf; ++f) {
        const int64_t e = arg_i[f];
        if (e < 0) continue;
        // arg is an input of a public op: an entry that is not one of row i's edges would index out of acc.
        TORCH_CHECK_INDEX(e >= e0 && e < e0 + deg, "pykernels.spmm_arg_backward: arg[", i, ", ", f, "] = ", e,
                          " is out of range: expected -1 or an edge of target row ", i, ", in [", e0, ", ",
                          e0 + deg, ")");
        acc[(e - e0) * heads + f / feats] += cpu::to_acc(g_i[f]) * cpu::to_acc(x[col[e] * hf + f]);
      }
      for (int64_t k = 0; k < deg * heads; ++k) grad_w[e0 * heads + k] = static_cast<T>(acc[k]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> spmm_arg_backward_cpu(const at::Tensor& rowptr, const at::Tensor& col,
                                                         const at::Tensor& rowptr_t, const at::Tensor& col_t,
                                                         const at::Tensor& perm_t,
                                                         const std::optional<at::Tensor>& weight,
                                                         const at::Tensor& arg, const at::Tensor& grad_out,
                                                         const at::Tensor& x, bool weight_grad) {
  // Plain variables, not structured bindings: C++17 lambdas cannot capture the latter.
  constexpr const char* op = "pykernels.spmm_arg_backward";
  const std::pair<int64_t, int64_t> heads_feats =
      check_spmm_arg_backward(op, rowptr, col, rowptr_t, col_t, perm_t, weight, arg, grad_out, x);
  check_csr_contents(op, rowptr, col, x.size(0), "x's row count");
  check_transpose_contents(op, rowptr_t, col_t, perm_t, rowptr.numel() - 1, col.numel());
  const int64_t heads = heads_feats.first, feats = heads_feats.second;
  const int64_t num_rows = rowptr.numel() - 1, num_cols = rowptr_t.numel() - 1;
  auto grad_x = at::empty_like(x);
  auto grad_w = weight_grad ? at::empty({col.numel(), heads}, x.options()) : at::empty({0}, x.options());
  PK_DISPATCH_FLOATS(x.scalar_type(), "spmm_arg_backward_cpu", [&] {
    spmm_arg_backward_impl(rowptr.data_ptr<int64_t>(), col.data_ptr<int64_t>(), rowptr_t.data_ptr<int64_t>(),
                           col_t.data_ptr<int64_t>(), perm_t.data_ptr<int64_t>(),
                           weight ? weight->data_ptr<scalar_t>() : nullptr, arg.data_ptr<int64_t>(),
                           grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(),
                           weight_grad ? grad_w.data_ptr<scalar_t>() : nullptr, num_rows, num_cols, heads, feats);
  });
  return {grad_x, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("spmm", &spmm_cpu);
  m.impl("spmm_arg_backward", &spmm_arg_backward_cpu);
}

}  // namespace pk
