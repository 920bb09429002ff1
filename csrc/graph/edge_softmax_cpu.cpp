// Softmax over each target's incoming edges, per head. A row whose scores are all -inf gives zeros.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "common/checks.h"
#include "common/cpu_vec.h"
#include "graph/graph_checks.h"

namespace pk {
namespace {

at::Tensor edge_softmax_cpu(const at::Tensor& rowptr, const at::Tensor& scores) {
  constexpr const char* op = "pykernels.edge_softmax";
  PK_CHECK_INDEX_TENSOR(op, "rowptr", rowptr);
  PK_CHECK_FLOAT_TENSOR(op, "scores", scores);
  PK_CHECK_DIM(op, "scores", scores, 2);
  check_rowptr(op, "rowptr", rowptr, scores.size(0), "scores");
  const int64_t num_rows = rowptr.numel() - 1, heads = scores.size(1);
  auto out = at::empty_like(scores);
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const int64_t avg_deg = std::max<int64_t>(1, num_rows ? scores.size(0) / num_rows : 1);
  PK_DISPATCH_FLOATS(scores.scalar_type(), "edge_softmax_cpu", [&] {
    using A = cpu::acc_t<scalar_t>;
    const scalar_t* s = scores.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, num_rows, grain_for(num_rows, avg_deg * heads), [&](int64_t begin, int64_t end) {
      std::vector<A> mx(heads), sum(heads);
      for (int64_t i = begin; i < end; ++i) {
        std::fill(mx.begin(), mx.end(), -std::numeric_limits<A>::infinity());
        std::fill(sum.begin(), sum.end(), A(0));
        for (int64_t e = rp[i]; e < rp[i + 1]; ++e)
          for (int64_t h = 0; h < heads; ++h) {
            // A NaN score makes the max NaN and with it the target's weights, as torch.softmax does.
            const A x = s[e * heads + h];
            mx[h] = x > mx[h] || x != x ? x : mx[h];
          }
        for (int64_t e = rp[i]; e < rp[i + 1]; ++e)
          for (int64_t h = 0; h < heads; ++h) {
            if (mx[h] != -std::numeric_limits<A>::infinity()) sum[h] += std::exp(A(s[e * heads + h]) - mx[h]);
          }
        for (int64_t h = 0; h < heads; ++h) sum[h] = sum[h] == A(0) ? A(0) : A(1) / sum[h];
        for (int64_t e = rp[i]; e < rp[i + 1]; ++e)
          for (int64_t h = 0; h < heads; ++h)
            o[e * heads + h] = static_cast<scalar_t>(
                (mx[h] == -std::numeric_limits<A>::infinity() ? A(0)
                                                              : std::exp(A(s[e * heads + h]) - mx[h])) * sum[h]);
      }
    });
  });
  return out;
}

// d scores = p * (g - sum_row(p * g)), per head.
at::Tensor edge_softmax_backward_cpu(const at::Tensor& rowptr, const at::Tensor& probs, const at::Tensor& grad) {
  constexpr const char* op = "pykernels.edge_softmax_backward";
  PK_CHECK_INDEX_TENSOR(op, "rowptr", rowptr);
  PK_CHECK_FLOAT_TENSOR(op, "probs", probs);
  PK_CHECK_FLOAT_TENSOR(op, "grad", grad);
  TORCH_CHECK(probs.sizes() == grad.sizes() && probs.dim() == 2, op, ": probs and grad must be [E, H]");
  check_rowptr(op, "rowptr", rowptr, probs.size(0), "probs");
  const int64_t num_rows = rowptr.numel() - 1, heads = probs.size(1);
  auto out = at::empty_like(probs);
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const int64_t avg_deg = std::max<int64_t>(1, num_rows ? probs.size(0) / num_rows : 1);
  PK_DISPATCH_FLOATS(probs.scalar_type(), "edge_softmax_backward_cpu", [&] {
    using A = cpu::acc_t<scalar_t>;
    const scalar_t* p = probs.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, num_rows, grain_for(num_rows, avg_deg * heads), [&](int64_t begin, int64_t end) {
      std::vector<A> dot(heads);
      for (int64_t i = begin; i < end; ++i) {
        std::fill(dot.begin(), dot.end(), A(0));
        for (int64_t e = rp[i]; e < rp[i + 1]; ++e)
          for (int64_t h = 0; h < heads; ++h) dot[h] += A(p[e * heads + h]) * A(g[e * heads + h]);
        for (int64_t e = rp[i]; e < rp[i + 1]; ++e)
          for (int64_t h = 0; h < heads; ++h)
            o[e * heads + h] = static_cast<scalar_t>(A(p[e * heads + h]) * (A(g[e * heads + h]) - dot[h]));
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("edge_softmax", &edge_softmax_cpu);
  m.impl("edge_softmax_backward", &edge_softmax_backward_cpu);
}

}  // namespace pk
