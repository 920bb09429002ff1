// Entry checks of window_attention and its backward, shared by the CPU and CUDA engines. The Python layer
// validates first with friendlier messages; these keep direct torch.ops.pykernels.* calls in bounds.
#pragma once
#include <optional>

#include "attention/attention_checks.h"
#include "window/window.h"

namespace pk {

struct WindowDims {
  int64_t batch, heads, tokens, dqk, dv;
  window::Geometry geo;
};

namespace window_detail {

inline void check_pair(const char* op, const char* name, at::IntArrayRef pair, int64_t min) {
  TORCH_CHECK(pair.size() == 2, op, ": ", name, " must have 2 entries, got ", pair);
  TORCH_CHECK(pair[0] >= min && pair[1] >= min, op, ": ", name, " entries must be >= ", min, ", got ", pair);
}

inline void check_param(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q,
                        at::IntArrayRef expected) {
  attention_detail::check_floating(op, name, t, q);
  attention_detail::check_shape(op, name, t, expected);
}

}  // namespace window_detail

inline WindowDims check_window_attention(const char* op, const at::Tensor& q, const at::Tensor& k,
                                         const at::Tensor& v, at::IntArrayRef spatial_shape, at::IntArrayRef window,
                                         at::IntArrayRef shift, const std::optional<at::Tensor>& bias_table,
                                         const std::optional<at::Tensor>& dense_bias,
                                         const std::optional<at::Tensor>& pad_kv) {
  using namespace attention_detail;
  using namespace window_detail;
  check_rows(op, "q", q, q);
  check_rows(op, "k", k, q);
  check_rows(op, "v", v, q);
  check_shape(op, "k", k, q.sizes());
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == q.size(2), op,
              ": v must be [B, heads, tokens, Dv] like q ", q.sizes(), ", got ", v.sizes());
  TORCH_CHECK(q.size(3) >= 1, op, ": the head dim must be positive");
  check_pair(op, "spatial_shape", spatial_shape, 1);
  check_pair(op, "window", window, 1);
  check_pair(op, "shift", shift, 0);
  int64_t cells = 0;
  TORCH_CHECK(!__builtin_mul_overflow(spatial_shape[0], spatial_shape[1], &cells), op, ": spatial_shape ",
              spatial_shape, " has more cells than int64 counts");
  TORCH_CHECK(cells == q.size(2), op, ": spatial_shape ", spatial_shape, " has ", cells, " cells but q has ", q.size(2),
              " tokens");
  // The Python layer clamps the window to the grid, as timm does; bounded by the grid, every window product
  // (positions, padded extents, table rows) is bounded by the token count and cannot overflow.
  TORCH_CHECK(window[0] <= spatial_shape[0] && window[1] <= spatial_shape[1], op, ": window ", window,
              " must not exceed spatial_shape ", spatial_shape);
  TORCH_CHECK(shift[0] < window[0] && shift[1] < window[1], op, ": shift ", shift, " must be smaller than window ",
              window);
  const WindowDims d{q.size(0), q.size(1), q.size(2), q.size(3), v.size(3),
                     window::make_geometry(spatial_shape[0], spatial_shape[1], window[0], window[1], shift[0],
                                           shift[1])};
  TORCH_CHECK(!(bias_table && dense_bias), op, ": pass bias_table or dense_bias, not both");
  if (bias_table) {
    check_param(op, "bias_table", *bias_table, q, {window::table_rows(d.geo), d.heads});
    TORCH_CHECK(bias_table->is_contiguous(), op, ": bias_table must be contiguous");
  }
  if (dense_bias) {
    const int64_t n = d.geo.positions();
    check_param(op, "dense_bias", *dense_bias, q, {d.heads, n, n});
  }
  if (pad_kv) {
    TORCH_CHECK(d.dv == d.dqk, op, ": pad_kv needs v's head dim (", d.dv, ") equal to q's (", d.dqk, ")");
    check_param(op, "pad_kv", *pad_kv, q, {2, d.heads, d.dqk});
    TORCH_CHECK(pad_kv->is_contiguous(), op, ": pad_kv must be contiguous");
  }
  return d;
}

inline void check_window_attention_backward(const char* op, const at::Tensor& q, const WindowDims& d,
                                            const at::Tensor& out, const at::Tensor& lse,
                                            const at::Tensor& grad_out) {
  using namespace attention_detail;
  check_lse(op, lse, q, AttentionDims{d.batch, d.heads, d.heads, d.tokens, d.tokens, d.dqk, d.dv});
  const std::array<int64_t, 4> out_shape{d.batch, d.heads, d.tokens, d.dv};
  check_rows(op, "out", out, q);
  check_shape(op, "out", out, out_shape);
  check_rows(op, "grad_out", grad_out, q);
  check_shape(op, "grad_out", grad_out, out_shape);
}

}  // namespace pk
