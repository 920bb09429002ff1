// Attention restricted to graph edges. Forward streams each target's edges through an online softmax,
// so neither [E, H] scores nor [E, H, D] messages are materialised; it keeps the log-sum-exp per
// (target, head) for backward. Backward is two atomic-free passes: target rows (dq, d bias, and the
// [E, H] probabilities and score gradients), then source rows over the transpose (dk, dv).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cpu_vec.h"
#include "common/online_softmax.h"
#include "graph/graph_checks.h"

namespace pk {
namespace {

template <typename T, typename A = cpu::acc_t<T>>
void forward_rows(const int64_t* rp, const int64_t* cl, const T* q, const T* k, const T* v, const T* bias, T* out,
                  A* lse, const AttnShapes& s, A scale) {
  const int64_t avg_deg = std::max<int64_t>(1, s.num_rows ? rp[s.num_rows] / s.num_rows : 1);
  at::parallel_for(0, s.num_rows, grain_for(s.num_rows, avg_deg * s.heads * (s.dqk + s.dv)),
                   [&](int64_t begin, int64_t end) {
    std::vector<A> acc(s.dv);
    for (int64_t i = begin; i < end; ++i)
      for (int64_t h = 0; h < s.heads; ++h) {
        const T* qi = q + (i * s.heads + h) * s.dqk;
        OnlineSoftmax<A> state;
        std::fill(acc.begin(), acc.end(), A(0));
        for (int64_t e = rp[i]; e < rp[i + 1]; ++e) {
          const int64_t j = cl[e];
          A score = scale * cpu::dot(qi, k + (j * s.heads + h) * s.dqk, s.dqk);
          if (bias) score += cpu::to_acc(bias[e * s.heads + h]);
          A weight;
          const A rescale = state.update(score, &weight);
          if (rescale != A(1)) cpu::scale(acc.data(), rescale, s.dv);
          if (weight != A(0)) cpu::axpy(acc.data(), weight, v + (j * s.heads + h) * s.dv, s.dv);
        }
        cpu::store(out + (i * s.heads + h) * s.dv, acc.data(), state.inv_sum(), s.dv);
        lse[i * s.heads + h] = state.lse();
      }
  });
}

std::tuple<at::Tensor, at::Tensor> graph_attention_cpu(const at::Tensor& rowptr, const at::Tensor& col,
                                                       const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                                       const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& v, const std::optional<at::Tensor>& bias,
                                                       double scale) {
  const AttnShapes s = check_attention("pykernels.graph_attention", rowptr, col, q, k, v, bias);
  check_csr_contents("pykernels.graph_attention", rowptr, col, s.num_cols, "k's row count");
  auto out = at::empty({s.num_rows, s.heads, s.dv}, q.options());
  auto lse = at::empty({s.num_rows, s.heads}, q.options().dtype(lse_dtype(q.scalar_type())));
  PK_DISPATCH_FLOATS(q.scalar_type(), "graph_attention_cpu", [&] {
    using A = cpu::acc_t<scalar_t>;
    forward_rows(rowptr.data_ptr<int64_t>(), col.data_ptr<int64_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                 v.data_ptr<scalar_t>(), bias ? bias->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
                 lse.data_ptr<A>(), s, static_cast<A>(scale));
  });
  return {out, lse};
}

template <typename T, typename A = cpu::acc_t<T>>
void backward_impl(const int64_t* rp, const int64_t* cl, const int64_t* rp_t, const int64_t* cl_t,
                   const int64_t* perm_t, const T* q, const T* k, const T* v, const T* bias, const T* out,
                   const A* lse, const T* dout, T* dq, T* dk, T* dv, A* probs, A* dscore, T* dbias,
                   const AttnShapes& s, A scale) {
  const int64_t H = s.heads;
  const int64_t avg_deg = std::max<int64_t>(1, s.num_rows ? rp[s.num_rows] / s.num_rows : 1);
  at::parallel_for(0, s.num_rows, grain_for(s.num_rows, avg_deg * H * (s.dqk + s.dv)), [&](int64_t begin, int64_t end) {
    std::vector<A> acc(s.dqk);
    for (int64_t i = begin; i < end; ++i)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t ih = i * H + h;
        const T* qi = q + ih * s.dqk;
        const T* doi = dout + ih * s.dv;
        const A delta = cpu::dot(doi, out + ih * s.dv, s.dv);
        std::fill(acc.begin(), acc.end(), A(0));
        for (int64_t e = rp[i]; e < rp[i + 1]; ++e) {
          const int64_t jh = cl[e] * H + h;
          A score = scale * cpu::dot(qi, k + jh * s.dqk, s.dqk);
          if (bias) score += cpu::to_acc(bias[e * H + h]);
          const A p = prob_from_lse(score, lse[ih]);
          const A ds = p * (cpu::dot(doi, v + jh * s.dv, s.dv) - delta);
          probs[e * H + h] = p;
          dscore[e * H + h] = ds;
          if (dbias) dbias[e * H + h] = static_cast<T>(ds);
          if (ds != A(0)) cpu::axpy(acc.data(), scale * ds, k + jh * s.dqk, s.dqk);
        }
        cpu::store(dq + ih * s.dqk, acc.data(), A(1), s.dqk);
      }
  });
  const int64_t avg_deg_t = std::max<int64_t>(1, s.num_cols ? rp_t[s.num_cols] / s.num_cols : 1);
  at::parallel_for(0, s.num_cols, grain_for(s.num_cols, avg_deg_t * H * (s.dqk + s.dv)), [&](int64_t begin, int64_t end) {
    std::vector<A> acc_k(s.dqk), acc_v(s.dv);
    for (int64_t j = begin; j < end; ++j)
      for (int64_t h = 0; h < H; ++h) {
        std::fill(acc_k.begin(), acc_k.end(), A(0));
        std::fill(acc_v.begin(), acc_v.end(), A(0));
        for (int64_t t = rp_t[j]; t < rp_t[j + 1]; ++t) {
          const int64_t ih = cl_t[t] * H + h, eh = perm_t[t] * H + h;
          if (probs[eh] != A(0)) cpu::axpy(acc_v.data(), probs[eh], dout + ih * s.dv, s.dv);
          if (dscore[eh] != A(0)) cpu::axpy(acc_k.data(), scale * dscore[eh], q + ih * s.dqk, s.dqk);
        }
        const int64_t jh = j * H + h;
        cpu::store(dk + jh * s.dqk, acc_k.data(), A(1), s.dqk);
        cpu::store(dv + jh * s.dv, acc_v.data(), A(1), s.dv);
      }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> graph_attention_backward_cpu(
    const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& rowptr_t, const at::Tensor& col_t,
    const at::Tensor& perm_t, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& bias, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& grad_out,
    double scale, bool bias_grad) {
  constexpr const char* op = "pykernels.graph_attention_backward";
  const AttnShapes s =
      check_attention_backward(op, rowptr, col, rowptr_t, col_t, perm_t, q, k, v, bias, out, lse, grad_out);
  check_csr_contents(op, rowptr, col, s.num_cols, "k's row count");
  check_transpose_contents(op, rowptr_t, col_t, perm_t, s.num_rows, col.numel());
  const int64_t num_edges = col.numel();
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  auto dbias = bias_grad ? at::empty({num_edges, s.heads}, q.options()) : at::empty({0}, q.options());
  auto probs = at::empty({num_edges, s.heads}, q.options().dtype(lse_dtype(q.scalar_type())));
  auto dscore = at::empty_like(probs);
  PK_DISPATCH_FLOATS(q.scalar_type(), "graph_attention_backward_cpu", [&] {
    using A = cpu::acc_t<scalar_t>;
    backward_impl(rowptr.data_ptr<int64_t>(), col.data_ptr<int64_t>(), rowptr_t.data_ptr<int64_t>(),
                  col_t.data_ptr<int64_t>(), perm_t.data_ptr<int64_t>(), q.data_ptr<scalar_t>(),
                  k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), bias ? bias->data_ptr<scalar_t>() : nullptr,
                  out.data_ptr<scalar_t>(), lse.data_ptr<A>(), grad_out.data_ptr<scalar_t>(),
                  dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), probs.data_ptr<A>(),
                  dscore.data_ptr<A>(), bias_grad ? dbias.data_ptr<scalar_t>() : nullptr, s, static_cast<A>(scale));
  });
  return {dq, dk, dv, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("graph_attention", &graph_attention_cpu);
  m.impl("graph_attention_backward", &graph_attention_backward_cpu);
}

}  // namespace pk
