// 2-D neighbourhood attention on the CPU (index math in neighborhood.h).
//
// Work is cut into strips: up to `strip` consecutive queries of one sub-axis row (one map row, one column
// residue class). All of them have the same kh window rows, and their windows along the row slide by at most
// one key per query, so the union of the strip's windows is kh runs of at most strip + kw - 1 keys. Each run
// is one cpu::gemm against k packed transposed (keys contiguous per map row and column class); keys outside
// a query's own window are masked with -inf, and P V is one gemm per run. The union of a strip's windows is
// one score tile, so the softmax is a single exact pass: the online rescaling of the dense engine would
// only add work. The strip length makes strip + kw - 1 a whole number of half vectors, so interior strips
// compute no padding columns.
//
// Backward recomputes P from the lse in two atomic-free passes. The query pass (task: b, h, map row) gives
// dq, dO . O, and rpb-gradient partials per task, which a last step sums in a fixed order, so the rpb
// gradient does not depend on the thread count. The key pass (task: b, h, key map row) walks strips of
// keys; the queries that see a strip (its inverse neighbourhood) are a run of rows times a run of columns,
// and dk, dv are summed over them with gemms in registers.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "attention/flash_cpu.h"
#include "common/cpu_vec.h"
#include "common/online_softmax.h"
#include "window/neighborhood.h"
#include "window/neighborhood_checks.h"

namespace pk {
namespace {

constexpr const char* kOp = "pykernels.neighborhood_attention_2d";
constexpr const char* kBackwardOp = "pykernels.neighborhood_attention_2d_backward";
// Queries per strip before rounding up to whole half vectors of keys: at least one 4-row register tile of
// the gemm, and a union tile mostly inside each query's window. Measured on AVX-512 (56 x 56, D = 32):
// 4 beat 8 and 16 at kernels 3, 7 and 13 (up to 1.6x at 13) and matched 1.
constexpr int64_t kStrip = 4;
// Keys per key-pass strip: one score row is then a whole number of vectors for float and double.
constexpr int64_t kKeyStrip = 16;

using flash::Rows;

// Block sizes and packed layouts of one call, for accumulation type A.
struct Plan {
  NeighborhoodDims d;
  int64_t lanes, dqk_pad, dv_pad;
  int64_t run;      // score columns per window row in a strip's tile (a multiple of half vectors)
  int64_t strip;    // queries per strip: run - (kw - 1)
  int64_t ld;       // score row stride: kh runs, padded to whole vectors
  int64_t sub_w;    // the longest column sub-axis (residue class 0)
  int64_t panel_w;  // columns of a transposed panel: runs and key strips read from any start stay inside
  int64_t q_cap;    // the most queries of one row that see one key strip

  Plan(const NeighborhoodDims& dims, int64_t vec_lanes, int64_t pad_lanes)
      : d(dims),
        lanes(vec_lanes),
        dqk_pad(cpu::round_up_lanes(dims.dqk, pad_lanes)),
        dv_pad(cpu::round_up_lanes(dims.dv, pad_lanes)),
        run(cpu::round_up_lanes(kStrip + dims.x.kernel - 1, pad_lanes)),
        strip(run - (dims.x.kernel - 1)),
        ld(cpu::round_up_lanes(dims.y.kernel * run, vec_lanes)),
        sub_w(dims.x.class_length(0)),
        panel_w(cpu::round_up_lanes(sub_w + std::max(run, kKeyStrip), vec_lanes)),
        // A key strip [j0, j0 + m) is seen by the queries [j0 - (kw - 1), j0 + m - 1 + kw - 1] at most.
        q_cap(kKeyStrip + 2 * (dims.x.kernel - 1)) {}

  int64_t rows_per_task() const { return d.batch * d.heads * d.y.length; }
  // Packed k / v block of (b * heads + h, map row y, column class rx).
  int64_t block(int64_t bh, int64_t y, int64_t rx) const { return (bh * d.y.length + y) * d.x.dilation + rx; }
  int64_t token(int64_t y, int64_t rx, int64_t sub_x) const { return y * d.x.length + d.x.position(rx, sub_x); }
};

template <typename A>
at::Tensor acc_buffer(const at::Tensor& like, at::IntArrayRef sizes) {
  return at::empty(sizes, like.options().dtype(c10::CppTypeToScalarType<A>::value));
}

// ------------------------------------------------------------------------------------------- packing

// Per (b, h, map row, column class): [cols][panel_w], src's features transposed so that the keys of the
// class's sub-axis row are contiguous, zero-padded. The operand layout of scores and of dP.
template <typename T, typename A>
at::Tensor pack_panels(const at::Tensor& src, const Plan& p) {
  const int64_t cols = src.size(3), heads = p.d.heads, dw = p.d.x.dilation;
  at::Tensor dst = acc_buffer<A>(src, {p.rows_per_task() * dw, cols, p.panel_w});
  const Rows<const T> in(src);
  A* out = dst.data_ptr<A>();
  at::parallel_for(0, p.rows_per_task(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bh = row / p.d.y.length, y = row % p.d.y.length;
      for (int64_t rx = 0; rx < dw; ++rx) {
        A* panel = out + p.block(bh, y, rx) * cols * p.panel_w;
        std::fill(panel, panel + cols * p.panel_w, A(0));
        for (int64_t j = 0; j < p.d.x.class_length(rx); ++j) {
          const T* x = in(bh / heads, bh % heads, p.token(y, rx, j));
          for (int64_t c = 0; c < cols; ++c) panel[c * p.panel_w + j] = cpu::to_acc(x[c]);
        }
      }
    }
  });
  return dst;
}

// Per (b, h, map row, column class): [sub_w][ld] rows, zero-padded. The operand layout of P V and dS K.
template <typename T, typename A>
at::Tensor pack_rows(const at::Tensor& src, const Plan& p, int64_t ld) {
  const int64_t cols = src.size(3), heads = p.d.heads, dw = p.d.x.dilation;
  at::Tensor dst = acc_buffer<A>(src, {p.rows_per_task() * dw, p.sub_w, ld});
  const Rows<const T> in(src);
  A* out = dst.data_ptr<A>();
  at::parallel_for(0, p.rows_per_task(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bh = row / p.d.y.length, y = row % p.d.y.length;
      for (int64_t rx = 0; rx < dw; ++rx) {
        A* block = out + p.block(bh, y, rx) * p.sub_w * ld;
        std::fill(block, block + p.sub_w * ld, A(0));
        for (int64_t j = 0; j < p.d.x.class_length(rx); ++j) {
          const T* x = in(bh / heads, bh % heads, p.token(y, rx, j));
          for (int64_t c = 0; c < cols; ++c) block[j * ld + c] = cpu::to_acc(x[c]);
        }
      }
    }
  });
  return dst;
}

// dst[r][0:ld] = mul * src row of token(y, rx, x0 + r), zero-padded, for r < n.
template <typename T, typename A>
void pack_queries(const Plan& p, const Rows<const T>& src, int64_t b, int64_t h, int64_t y, int64_t rx, int64_t x0,
                  int64_t n, int64_t cols, int64_t ld, A mul, A* dst) {
  for (int64_t r = 0; r < n; ++r) {
    const T* x = src(b, h, p.token(y, rx, x0 + r));
    A* out = dst + r * ld;
    for (int64_t c = 0; c < cols; ++c) out[c] = mul * cpu::to_acc(x[c]);
    std::fill(out + cols, out + ld, A(0));
  }
}

// ------------------------------------------------------------------------------------------- strips

// Queries [x0, x0 + n) of sub-axis row (map row y, column class rx) and the union of their windows:
// window rows key_row0 + t (t < kh, sub rows of y's row class) by key columns [c0, c0 + cols).
struct Strip {
  int64_t y, rx, x0, n;
  int64_t sub_y, row_len, col_len;  // y's sub row, and the lengths of the two sub-axes
  int64_t key_row0, c0, cols, width;  // width: cols rounded up to half vectors

  Strip(const Plan& p, int64_t y_, int64_t rx_, int64_t x0_, int64_t half_lanes) : y(y_), rx(rx_), x0(x0_) {
    const neighborhood::Axis& ay = p.d.y;
    const neighborhood::Axis& ax = p.d.x;
    col_len = ax.class_length(rx);
    n = std::min(p.strip, col_len - x0);
    sub_y = y / ay.dilation;
    row_len = ay.class_length(y % ay.dilation);
    key_row0 = ay.window_start(sub_y, row_len);
    c0 = ax.window_start(x0, col_len);
    cols = ax.window_start(x0 + n - 1, col_len) + ax.kernel - c0;
    width = cpu::round_up_lanes(cols, half_lanes);
  }
  int64_t key_row(const Plan& p, int64_t t) const {
    return p.d.y.position(y % p.d.y.dilation, key_row0 + t);
  }
  // First column of query r's window within each run.
  int64_t offset(const Plan& p, int64_t r) const { return p.d.x.window_start(x0 + r, col_len) - c0; }
  // Offset in rpb[h] of the bias of query r's first key in window row t.
  int64_t bias_at(const Plan& p, int64_t r, int64_t t) const {
    const int64_t row = p.d.y.bias_index(sub_y, key_row0 + t);
    const int64_t col = p.d.x.bias_index(x0 + r, c0 + offset(p, r));
    return row * (2 * p.d.x.kernel - 1) + col;
  }
};

// s[r][0:ld] = scores of the strip's union tile for query r (q_block holds scale * q), with rpb added inside
// query r's window and -inf outside it.
template <typename T, typename A>
void strip_scores(const Plan& p, const Strip& st, int64_t bh, const A* q_block, const A* kt, const T* rpb, A* s) {
  const int64_t kh = p.d.y.kernel, kw = p.d.x.kernel, h = bh % p.d.heads;
  for (int64_t t = 0; t < kh; ++t) {
    const A* panel = kt + p.block(bh, st.key_row(p, t), st.rx) * p.d.dqk * p.panel_w;
    cpu::gemm(st.n, st.width, p.d.dqk, q_block, p.dqk_pad, 1, panel + st.c0, p.panel_w, s + t * p.run, p.ld, false);
  }
  const T* bias = rpb ? rpb + h * p.d.bias_entries() : nullptr;
  for (int64_t r = 0; r < st.n; ++r) {
    A* row = s + r * p.ld;
    const int64_t a = st.offset(p, r);
    for (int64_t t = 0; t < kh; ++t) {
      A* seg = row + t * p.run;
      std::fill(seg, seg + a, A(-INFINITY));
      std::fill(seg + a + kw, seg + p.run, A(-INFINITY));
      if (bias) {
        const T* b = bias + st.bias_at(p, r, t);
        for (int64_t j = 0; j < kw; ++j) seg[a + j] += cpu::to_acc(b[j]);
      }
    }
    std::fill(row + kh * p.run, row + p.ld, A(-INFINITY));
  }
}

// Calls f(strip) for every strip of map row y.
template <typename F>
void for_strips(const Plan& p, int64_t y, int64_t half_lanes, F&& f) {
  for (int64_t rx = 0; rx < p.d.x.dilation; ++rx)
    for (int64_t x0 = 0; x0 < p.d.x.class_length(rx); x0 += p.strip) f(Strip(p, y, rx, x0, half_lanes));
}

// ------------------------------------------------------------------------------------------- forward

template <typename T, typename A>
void forward_kernel(const Plan& p, int64_t half_lanes, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const T* rpb, A scale, const at::Tensor& out, const at::Tensor& lse) {
  const at::Tensor kt = pack_panels<T, A>(k, p), vp = pack_rows<T, A>(v, p, p.dv_pad);
  const Rows<const T> q_rows(q);
  const Rows<T> out_rows(out);
  A* lse_data = lse.data_ptr<A>();
  const int64_t H = p.d.heads, N = p.d.tokens;
  at::parallel_for(0, p.rows_per_task(), 1, [&](int64_t begin, int64_t end) {
    std::vector<A> qs(p.strip * p.dqk_pad), s(p.strip * p.ld), acc(p.strip * p.dv_pad);
    std::vector<OnlineSoftmax<A>> stats(p.strip);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / p.d.y.length, b = bh / H, h = bh % H, y = task % p.d.y.length;
      for_strips(p, y, half_lanes, [&](const Strip& st) {
        pack_queries(p, q_rows, b, h, y, st.rx, st.x0, st.n, p.d.dqk, p.dqk_pad, scale, qs.data());
        strip_scores(p, st, bh, qs.data(), kt.data_ptr<A>(), rpb, s.data());
        for (int64_t r = 0; r < st.n; ++r) {
          A* row = s.data() + r * p.ld;
          stats[r] = {};
          flash::fold_row(row, p.ld, stats[r], static_cast<A*>(nullptr), 0);
        }
        for (int64_t t = 0; t < p.d.y.kernel; ++t) {
          const A* values = vp.data_ptr<A>() + (p.block(bh, st.key_row(p, t), st.rx) * p.sub_w + st.c0) * p.dv_pad;
          cpu::gemm(st.n, p.dv_pad, st.cols, s.data() + t * p.run, p.ld, 1, values, p.dv_pad, acc.data(), p.dv_pad,
                    t > 0);
        }
        for (int64_t r = 0; r < st.n; ++r) {
          const int64_t tok = p.token(y, st.rx, st.x0 + r);
          cpu::store(out_rows(b, h, tok), acc.data() + r * p.dv_pad, stats[r].inv_sum(), p.d.dv);
          lse_data[bh * N + tok] = stats[r].lse();
        }
      });
    }
  });
}

// rpb as a contiguous [heads, 2 kh - 1, 2 kw - 1] tensor, or undefined.
at::Tensor rpb_rows(const std::optional<at::Tensor>& rpb) { return rpb ? rpb->contiguous() : at::Tensor(); }

template <typename T>
const T* rpb_data(const at::Tensor& rpb) {
  return rpb.defined() ? rpb.data_ptr<T>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor> neighborhood_attention_2d_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& v, at::IntArrayRef spatial_shape,
                                                                 at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                                                                 const std::optional<at::Tensor>& rpb, double scale) {
  const NeighborhoodDims d = check_neighborhood(kOp, q, k, v, spatial_shape, kernel_size, dilation, rpb);
  at::Tensor out = at::empty({d.batch, d.heads, d.tokens, d.dv}, q.options());
  at::Tensor lse = at::empty({d.batch, d.heads, d.tokens}, q.options().dtype(attention_lse_dtype(q.scalar_type())));
  const at::Tensor bias = rpb_rows(rpb);
  PK_DISPATCH_FLOATS(q.scalar_type(), "neighborhood_attention_2d_cpu", [&] {
    using A = cpu::acc_t<scalar_t>;
    const Plan p(d, cpu::kLanes<A>, cpu::kHalfLanes<A>);
    forward_kernel<scalar_t, A>(p, cpu::kHalfLanes<A>, q, k, v, rpb_data<scalar_t>(bias), static_cast<A>(scale), out,
                                lse);
  });
  return {out, lse};
}

// ------------------------------------------------------------------------------------------- backward

template <typename T, typename A>
struct Backward {
  const Plan& p;
  int64_t half_lanes;
  Rows<const T> q, out, dout;
  const T* rpb;
  A scale;
  const A* kt;     // k panels (scores)
  const A* kp;     // k rows (dq)
  const A* vt;     // v panels (dP)
  const A* lse;    // [B * heads][tokens]
  A* delta;        // [B * heads][tokens]: dO . O, written by the query pass
  A* rpb_partial;  // [B * heads * H][bias entries], or null

  // Query pass over map row y of (b, h): dq, delta and this row's rpb-gradient partial.
  void query_row(int64_t bh, int64_t y, const Rows<T>& dq, std::vector<A>& qs, std::vector<A>& ds,
                 std::vector<A>& s, std::vector<A>& x, std::vector<A>& acc) const {
    const int64_t H = p.d.heads, b = bh / H, h = bh % H, kh = p.d.y.kernel, kw = p.d.x.kernel;
    A* partial = rpb_partial ? rpb_partial + (bh * p.d.y.length + y) * p.d.bias_entries() : nullptr;
    if (partial) std::fill(partial, partial + p.d.bias_entries(), A(0));
    for_strips(p, y, half_lanes, [&](const Strip& st) {
      pack_queries(p, q, b, h, y, st.rx, st.x0, st.n, p.d.dqk, p.dqk_pad, scale, qs.data());
      pack_queries(p, dout, b, h, y, st.rx, st.x0, st.n, p.d.dv, p.dv_pad, A(1), ds.data());
      strip_scores(p, st, bh, qs.data(), kt, rpb, s.data());
      for (int64_t t = 0; t < kh; ++t) {
        const A* panel = vt + p.block(bh, st.key_row(p, t), st.rx) * p.d.dv * p.panel_w;
        cpu::gemm(st.n, st.width, p.d.dv, ds.data(), p.dv_pad, 1, panel + st.c0, p.panel_w, x.data() + t * p.run,
                  p.ld, false);
      }
      for (int64_t r = 0; r < st.n; ++r) {
        const int64_t tok = p.token(y, st.rx, st.x0 + r), a = st.offset(p, r);
        const A dd = cpu::dot(ds.data() + r * p.dv_pad, out(b, h, tok), p.d.dv);
        delta[bh * p.d.tokens + tok] = dd;
        A* pr = s.data() + r * p.ld;
        cpu::exp_sum(pr, lse[bh * p.d.tokens + tok], p.ld);
        // dS = P (dP - delta) inside the window and exactly 0 outside, where dP holds unused columns.
        A* xr = x.data() + r * p.ld;
        for (int64_t t = 0; t < kh; ++t) {
          A* seg = xr + t * p.run;
          const A* ps = pr + t * p.run;
          std::fill(seg, seg + a, A(0));
          for (int64_t j = a; j < a + kw; ++j) seg[j] = ps[j] * (seg[j] - dd);
          std::fill(seg + a + kw, seg + p.run, A(0));
          if (partial) cpu::axpy(partial + st.bias_at(p, r, t), A(1), seg + a, kw);
        }
      }
      for (int64_t t = 0; t < kh; ++t) {
        const A* keys = kp + (p.block(bh, st.key_row(p, t), st.rx) * p.sub_w + st.c0) * p.dqk_pad;
        cpu::gemm(st.n, p.dqk_pad, st.cols, x.data() + t * p.run, p.ld, 1, keys, p.dqk_pad, acc.data(), p.dqk_pad,
                  t > 0);
      }
      for (int64_t r = 0; r < st.n; ++r)
        cpu::store(dq(b, h, p.token(y, st.rx, st.x0 + r)), acc.data() + r * p.dqk_pad, scale, p.d.dqk);
    });
  }

  // Key pass over key map row ky of (b, h): dk and dv of its keys, from the queries that see them.
  void key_row(int64_t bh, int64_t ky, const Rows<T>& dk, const Rows<T>& dv, std::vector<A>& qs, std::vector<A>& ds,
               std::vector<A>& s, std::vector<A>& x, std::vector<A>& dk_acc, std::vector<A>& dv_acc) const {
    const neighborhood::Axis& ay = p.d.y;
    const neighborhood::Axis& ax = p.d.x;
    const int64_t H = p.d.heads, b = bh / H, h = bh % H, N = p.d.tokens;
    const int64_t ry = ky % ay.dilation, jy = ky / ay.dilation, row_len = ay.class_length(ry);
    const T* bias = rpb ? rpb + h * p.d.bias_entries() : nullptr;
    for (int64_t rx = 0; rx < ax.dilation; ++rx) {
      const int64_t col_len = ax.class_length(rx);
      const A* k_panel = kt + p.block(bh, ky, rx) * p.d.dqk * p.panel_w;
      const A* v_panel = vt + p.block(bh, ky, rx) * p.d.dv * p.panel_w;
      for (int64_t j0 = 0; j0 < col_len; j0 += kKeyStrip) {
        const int64_t m = std::min(kKeyStrip, col_len - j0);
        const int64_t qa = ax.first_query(j0), nq = ax.last_query(j0 + m - 1, col_len) - qa + 1;
        std::fill(dk_acc.begin(), dk_acc.end(), A(0));
        std::fill(dv_acc.begin(), dv_acc.end(), A(0));
        for (int64_t iy = ay.first_query(jy); iy <= ay.last_query(jy, row_len); ++iy) {
          const int64_t y = ay.position(ry, iy);
          const int64_t bias_row = ay.bias_index(iy, jy) * (2 * ax.kernel - 1);
          pack_queries(p, q, b, h, y, rx, qa, nq, p.d.dqk, p.dqk_pad, scale, qs.data());
          pack_queries(p, dout, b, h, y, rx, qa, nq, p.d.dv, p.dv_pad, A(1), ds.data());
          cpu::gemm(nq, kKeyStrip, p.d.dqk, qs.data(), p.dqk_pad, 1, k_panel + j0, p.panel_w, s.data(), kKeyStrip,
                    false);
          cpu::gemm(nq, kKeyStrip, p.d.dv, ds.data(), p.dv_pad, 1, v_panel + j0, p.panel_w, x.data(), kKeyStrip,
                    false);
          for (int64_t r = 0; r < nq; ++r) {
            const int64_t qx = qa + r, tok = p.token(y, rx, qx), start = ax.window_start(qx, col_len);
            const int64_t lo = std::clamp<int64_t>(start - j0, 0, m), hi = std::clamp<int64_t>(start + ax.kernel - j0, lo, m);
            A* sr = s.data() + r * kKeyStrip;
            std::fill(sr, sr + lo, A(-INFINITY));
            std::fill(sr + hi, sr + kKeyStrip, A(-INFINITY));
            if (bias)
              for (int64_t c = lo; c < hi; ++c) sr[c] += cpu::to_acc(bias[bias_row + ax.bias_index(qx, j0 + c)]);
            cpu::exp_sum(sr, lse[bh * N + tok], kKeyStrip);
            cpu::softmax_grad(x.data() + r * kKeyStrip, sr, delta[bh * N + tok], kKeyStrip);
          }
          cpu::gemm(m, p.dv_pad, nq, s.data(), 1, kKeyStrip, ds.data(), p.dv_pad, dv_acc.data(), p.dv_pad, true);
          cpu::gemm(m, p.dqk_pad, nq, x.data(), 1, kKeyStrip, qs.data(), p.dqk_pad, dk_acc.data(), p.dqk_pad, true);
        }
        for (int64_t j = 0; j < m; ++j) {
          const int64_t tok = p.token(ky, rx, j0 + j);
          cpu::store(dk(b, h, tok), dk_acc.data() + j * p.dqk_pad, A(1), p.d.dqk);
          cpu::store(dv(b, h, tok), dv_acc.data() + j * p.dv_pad, A(1), p.d.dv);
        }
      }
    }
  }
};

// Sums the partials of every (b, map row) into rpb's gradient, in a fixed order.
template <typename T, typename A>
void reduce_rpb_grad(const Plan& p, const A* partial, T* grad) {
  const int64_t entries = p.d.bias_entries(), H = p.d.heads, rows = p.d.y.length;
  at::parallel_for(0, H * entries, grain_for(H * entries, p.d.batch * rows), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t h = i / entries, e = i % entries;
      A sum = 0;
      for (int64_t b = 0; b < p.d.batch; ++b)
        for (int64_t y = 0; y < rows; ++y) sum += partial[((b * H + h) * rows + y) * entries + e];
      grad[i] = static_cast<T>(sum);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> neighborhood_attention_2d_backward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::IntArrayRef spatial_shape,
    at::IntArrayRef kernel_size, at::IntArrayRef dilation, const std::optional<at::Tensor>& rpb, double scale,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& grad_out, bool rpb_grad) {
  const NeighborhoodDims d = check_neighborhood_backward(kBackwardOp, q, k, v, spatial_shape, kernel_size, dilation,
                                                         rpb, out, lse, grad_out, rpb_grad);
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  at::Tensor drpb = rpb_grad ? at::empty({d.heads, 2 * d.y.kernel - 1, 2 * d.x.kernel - 1}, q.options())
                             : at::empty({0}, q.options());
  const at::Tensor bias = rpb_rows(rpb), lse_rows = lse.contiguous();
  PK_DISPATCH_FLOATS(q.scalar_type(), "neighborhood_attention_2d_backward_cpu", [&] {
    using T = scalar_t;
    using A = cpu::acc_t<T>;
    const int64_t half_lanes = cpu::kHalfLanes<A>;
    const Plan p(d, cpu::kLanes<A>, half_lanes);
    const at::Tensor kt = pack_panels<T, A>(k, p), kp = pack_rows<T, A>(k, p, p.dqk_pad);
    const at::Tensor vt = pack_panels<T, A>(v, p);
    at::Tensor delta = acc_buffer<A>(q, {d.batch * d.heads * d.tokens});
    at::Tensor partial = rpb_grad ? acc_buffer<A>(q, {p.rows_per_task(), d.bias_entries()}) : at::Tensor();
    const Backward<T, A> bw{p, half_lanes, Rows<const T>(q), Rows<const T>(out), Rows<const T>(grad_out),
                            rpb_data<T>(bias), static_cast<A>(scale), kt.data_ptr<A>(), kp.data_ptr<A>(),
                            vt.data_ptr<A>(), lse_rows.data_ptr<A>(), delta.data_ptr<A>(),
                            rpb_grad ? partial.data_ptr<A>() : nullptr};
    const Rows<T> dq_rows(dq), dk_rows(dk), dv_rows(dv);
    at::parallel_for(0, p.rows_per_task(), 1, [&](int64_t begin, int64_t end) {
      std::vector<A> qs(p.strip * p.dqk_pad), ds(p.strip * p.dv_pad), s(p.strip * p.ld), x(p.strip * p.ld),
          acc(p.strip * p.dqk_pad);
      for (int64_t task = begin; task < end; ++task)
        bw.query_row(task / d.y.length, task % d.y.length, dq_rows, qs, ds, s, x, acc);
    });
    at::parallel_for(0, p.rows_per_task(), 1, [&](int64_t begin, int64_t end) {
      std::vector<A> qs(p.q_cap * p.dqk_pad), ds(p.q_cap * p.dv_pad), s(p.q_cap * kKeyStrip), x(p.q_cap * kKeyStrip),
          dk_acc(kKeyStrip * p.dqk_pad), dv_acc(kKeyStrip * p.dv_pad);
      for (int64_t task = begin; task < end; ++task)
        bw.key_row(task / d.y.length, task % d.y.length, dk_rows, dv_rows, qs, ds, s, x, dk_acc, dv_acc);
    });
    if (rpb_grad) reduce_rpb_grad<T, A>(p, partial.data_ptr<A>(), drpb.data_ptr<T>());
  });
  return {dq, dk, dv, drpb};
}

}  // namespace
}  // namespace pk

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("neighborhood_attention_2d", &pk::neighborhood_attention_2d_cpu);
  m.impl("neighborhood_attention_2d_backward", &pk::neighborhood_attention_2d_backward_cpu);
}
