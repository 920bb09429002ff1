// Shifted-window attention on the CPU. The grid is never rolled, padded or partitioned: each task finds
// its window's tokens with the index math of window/window.h, gathers their rows into packed buffers, and
// runs the FlashAttention tiles of the dense engine (attention/flash_cpu.h) on them. The relative-position
// bias and the shift mask are added to each score row from the table (or dense bias) and the region ids.
//
// Forward: one task per (batch, head, window, query block). Windows of one query block (Swin's 7 x 7, 8 x 8,
// 12 x 12) pack their keys and values inside the task, where they stay in cache; parallel_for gives each
// thread a run of adjacent windows, so scratch is set up once per run. Larger windows (MSW-MSA's 64 x 64)
// pack keys and values once per call and stream key blocks through an online softmax.
//
// Backward recomputes the probabilities from the lse in two atomic-free passes, as the dense engine does:
// one over query blocks (dq and the bias gradient), one over key blocks (dk, dv). Every token lies in one
// window, so each gradient row has one writer. The bias gradient sums over batch and windows: a task sums a
// fixed group of windows (a function of the shapes only) into its own partial, and the partials are added
// in a fixed order, so the result is the same for any number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "attention/flash_cpu.h"
#include "window/window_attention_checks.h"

namespace pk {
namespace {

using flash::acc_buffer;
using flash::kBlockQ;
using flash::Rows;
using flash::Tile;

// Tasks the dq pass aims for when it groups windows for the bias gradient, and the most partial-sum
// elements it may allocate for that.
constexpr int64_t kTargetTasks = 256;
constexpr int64_t kMaxPartial = int64_t(1) << 24;

// Block counts and padded widths of one call, for accumulation type A. Tiles run over window positions,
// pad tokens included: a pad query row is computed with q = 0 and never stored.
struct Plan {
  WindowDims d;
  window::Geometry g;
  int64_t n, windows, lanes, dqk_pad, dv_pad, bk, q_blocks, k_blocks;
  Plan(const WindowDims& dims, int64_t vec_lanes, int64_t pad_lanes)
      : d(dims),
        g(dims.geo),
        n(g.positions()),
        windows(g.windows()),
        lanes(vec_lanes),
        dqk_pad(cpu::round_up_lanes(dims.dqk, pad_lanes)),
        dv_pad(cpu::round_up_lanes(dims.dv, pad_lanes)),
        bk(flash::key_block(n, vec_lanes)),
        q_blocks((n + kBlockQ - 1) / kBlockQ),
        k_blocks((n + bk - 1) / bk) {}

  Tile tile(int64_t qb, int64_t kb) const {
    const int64_t q0 = qb * kBlockQ, k0 = kb * bk, cols = std::min(bk, n - k0);
    return {q0, std::min(kBlockQ, n - q0), k0, cols, cpu::round_up_lanes(cols, lanes)};
  }
  int64_t bhw(int64_t b, int64_t h, int64_t w) const { return (b * d.heads + h) * windows + w; }
  // Per (b, h, window): key panels [k_blocks][Dqk][bk], key rows [n][dqk_pad], value rows and panels.
  int64_t kt_size() const { return k_blocks * d.dqk * bk; }
  int64_t kp_size() const { return n * dqk_pad; }
  int64_t vp_size() const { return n * dv_pad; }
  int64_t vt_size() const { return k_blocks * d.dv * bk; }
};

// The tokens of one window (-1 for pad positions) and, where the shift mask splits it, their regions.
struct WindowView {
  std::vector<int64_t> token, region;
  int64_t loaded = -1;
  bool masked = false;

  explicit WindowView(const Plan& p) : token(p.n), region(p.n) {}
  void load(const Plan& p, int64_t w, bool shift_mask) {
    if (w == loaded) return;
    loaded = w;
    for (int64_t pos = 0; pos < p.n; ++pos) token[pos] = window::token_at(p.g, w, pos);
    masked = shift_mask && !window::single_region(p.g, w);
    if (masked)
      for (int64_t pos = 0; pos < p.n; ++pos) region[pos] = window::region(p.g, w, pos);
  }
};

// q, k or v of one head, with the row that pad positions read (null: zeros).
template <typename T>
struct Source {
  Rows<const T> rows;
  const T* pad;
  const T* row(int64_t b, int64_t h, int64_t token) const { return token >= 0 ? rows(b, h, token) : pad; }
};

// q, k, v and the keys and values of pad tokens (pad_kv [2][heads][D], null for zeros).
template <typename T>
struct Inputs {
  Rows<const T> q, k, v;
  const T* pad_kv;
  int64_t heads, dqk;
  Inputs(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const std::optional<at::Tensor>& pad)
      : q(q_), k(k_), v(v_), pad_kv(pad ? pad->data_ptr<T>() : nullptr), heads(q_.size(1)), dqk(q_.size(3)) {}
  Source<T> queries() const { return {q, nullptr}; }
  Source<T> keys(int64_t h) const { return {k, pad_kv ? pad_kv + h * dqk : nullptr}; }
  Source<T> values(int64_t h) const { return {v, pad_kv ? pad_kv + (heads + h) * dqk : nullptr}; }
};

// dst[r][0:ld] = mul * row of position p0 + r, zero-padded, for r < count: the row-major operand layout.
template <typename T, typename A>
void gather_rows(const Source<T>& src, int64_t b, int64_t h, const int64_t* token, int64_t count, int64_t cols,
                 int64_t ld, A mul, A* dst) {
  for (int64_t r = 0; r < count; ++r) {
    const T* x = src.row(b, h, token[r]);
    A* y = dst + r * ld;
    if (x)
      for (int64_t c = 0; c < cols; ++c) y[c] = mul * cpu::to_acc(x[c]);
    else
      std::fill(y, y + cols, A(0));
    std::fill(y + cols, y + ld, A(0));
  }
}

// dst[blk][c][j] = row of position blk * block + j, column c, zero past n: one transposed panel per key block.
template <typename T, typename A>
void gather_panels(const Source<T>& src, int64_t b, int64_t h, const int64_t* token, int64_t n, int64_t cols,
                   int64_t block, A* dst) {
  const int64_t blocks = (n + block - 1) / block;
  std::fill(dst, dst + blocks * cols * block, A(0));
  for (int64_t pos = 0; pos < n; ++pos) {
    const T* x = src.row(b, h, token[pos]);
    if (!x) continue;
    A* y = dst + pos / block * cols * block + pos % block;
    for (int64_t c = 0; c < cols; ++c) y[c * block] = cpu::to_acc(x[c]);
  }
}

// The relative-position bias (table or dense) and the shift mask, added row by row to score tiles.
template <typename T, typename A>
struct ScoreBias {
  const A* table = nullptr;  // [heads][table_rows] in A, transposed from Swin's [table_rows, heads]
  int64_t table_rows = 0, center = 0;
  std::vector<int64_t> offset;  // window::rel_offset of every position
  const T* dense = nullptr;     // [heads, n, n] through its strides
  int64_t ds0 = 0, ds1 = 0, ds2 = 0;

  ScoreBias(const Plan& p, const at::Tensor& table_acc, const std::optional<at::Tensor>& dense_bias) {
    if (table_acc.defined()) {
      table = table_acc.data_ptr<A>();
      table_rows = window::table_rows(p.g);
      center = window::rel_center(p.g);
      offset.resize(p.n);
      for (int64_t pos = 0; pos < p.n; ++pos) offset[pos] = window::rel_offset(p.g, pos);
    }
    if (dense_bias) {
      dense = dense_bias->data_ptr<T>();
      ds0 = dense_bias->stride(0), ds1 = dense_bias->stride(1), ds2 = dense_bias->stride(2);
    }
  }

  // Scores of query position i against the tile's keys: adds bias and mask to s[0:cols], masks [cols, width).
  void finish(A* s, int64_t h, int64_t i, const Tile& t, const WindowView& view) const {
    if (table) {
      const A* row = table + h * table_rows + center + offset[i];
      const int64_t* off = offset.data() + t.k0;
      for (int64_t j = 0; j < t.cols; ++j) s[j] += row[-off[j]];
    } else if (dense) {
      const T* row = dense + h * ds0 + i * ds1 + t.k0 * ds2;
      for (int64_t j = 0; j < t.cols; ++j) s[j] += cpu::to_acc(row[j * ds2]);
    }
    if (view.masked) {
      const int64_t ri = view.region[i];
      const int64_t* rj = view.region.data() + t.k0;
      for (int64_t j = 0; j < t.cols; ++j) s[j] += rj[j] != ri ? A(window::kShiftMaskValue) : A(0);
    }
    std::fill(s + t.cols, s + t.width, A(-INFINITY));
  }

  // Adds the dense gradient rows [q0, q0 + rows) x [0, n) to the table entries they were gathered from.
  void fold_into_table(const A* dense_rows, int64_t q0, int64_t rows, int64_t n, A* table_grad) const {
    for (int64_t r = 0; r < rows; ++r) {
      A* row = table_grad + center + offset[q0 + r];
      for (int64_t j = 0; j < n; ++j) row[-offset[j]] += dense_rows[r * n + j];
    }
  }
};

template <typename A>
at::Tensor table_in_acc(const std::optional<at::Tensor>& bias_table) {
  if (!bias_table) return at::Tensor();
  return bias_table->t().to(c10::CppTypeToScalarType<A>::value).contiguous();
}

// s[r][0:width] = (scale q) k^T of tile t, q_block being the packed query block and kt the window's panels.
template <typename A>
void tile_scores(const Plan& p, const Tile& t, const A* q_block, const A* kt, A* s) {
  cpu::gemm(t.rows, t.width, p.d.dqk, q_block, p.dqk_pad, 1, kt + t.k0 / p.bk * p.d.dqk * p.bk, p.bk, s, p.bk, false);
}

// ------------------------------------------------------------------------------------------- forward

// The forward's view of one window's keys and values: key panels and value rows.
template <typename T, typename A>
void pack_forward(const Plan& p, const Inputs<T>& in, int64_t b, int64_t h, const WindowView& view, A* kt, A* vp) {
  gather_panels(in.keys(h), b, h, view.token.data(), p.n, p.d.dqk, p.bk, kt);
  gather_rows(in.values(h), b, h, view.token.data(), p.n, p.d.dv, p.dv_pad, A(1), vp);
}

template <typename T, typename A>
void forward_kernel(const Plan& p, const Inputs<T>& in, const ScoreBias<T, A>& bias, bool shift_mask, A scale,
                    const at::Tensor& out, const at::Tensor& lse) {
  const int64_t H = p.d.heads, bhw_count = p.d.batch * H * p.windows;
  // Windows of one query block read their keys once: packing them inside the task keeps them in cache.
  const bool local = p.q_blocks == 1;
  at::Tensor kt_all, vp_all;
  if (!local) {
    kt_all = acc_buffer<A>(out, {bhw_count, p.kt_size()});
    vp_all = acc_buffer<A>(out, {bhw_count, p.vp_size()});
    at::parallel_for(0, bhw_count, 1, [&](int64_t begin, int64_t end) {
      WindowView view(p);
      for (int64_t i = begin; i < end; ++i) {
        view.load(p, i % p.windows, false);
        pack_forward(p, in, i / (H * p.windows), i / p.windows % H, view, kt_all.data_ptr<A>() + i * p.kt_size(),
                     vp_all.data_ptr<A>() + i * p.vp_size());
      }
    });
  }
  const Rows<T> out_rows(out);
  A* lse_data = lse.data_ptr<A>();
  at::parallel_for(0, bhw_count * p.q_blocks, 1, [&](int64_t begin, int64_t end) {
    WindowView view(p);
    std::vector<A> qs(kBlockQ * p.dqk_pad), s(kBlockQ * p.bk), acc(kBlockQ * p.dv_pad);
    std::vector<A> kt_local(local ? p.kt_size() : 0), vp_local(local ? p.vp_size() : 0);
    std::vector<OnlineSoftmax<A>> state(kBlockQ);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / p.q_blocks, qb = task % p.q_blocks;
      const int64_t b = i / (H * p.windows), h = i / p.windows % H, w = i % p.windows;
      view.load(p, w, shift_mask);
      const A *kt = local ? kt_local.data() : kt_all.data_ptr<A>() + i * p.kt_size(),
              *vp = local ? vp_local.data() : vp_all.data_ptr<A>() + i * p.vp_size();
      if (local) pack_forward(p, in, b, h, view, kt_local.data(), vp_local.data());
      const Tile rows = p.tile(qb, 0);
      const int64_t* token = view.token.data() + rows.q0;
      gather_rows(in.queries(), b, h, token, rows.rows, p.d.dqk, p.dqk_pad, scale, qs.data());
      std::fill(acc.begin(), acc.end(), A(0));
      std::fill(state.begin(), state.end(), OnlineSoftmax<A>{});
      for (int64_t kb = 0; kb < p.k_blocks; ++kb) {
        const Tile t = p.tile(qb, kb);
        tile_scores(p, t, qs.data(), kt, s.data());
        for (int64_t r = 0; r < t.rows; ++r) {
          A* sr = s.data() + r * p.bk;
          bias.finish(sr, h, t.q0 + r, t, view);
          flash::fold_row(sr, t.width, state[r], acc.data() + r * p.dv_pad, p.dv_pad);
        }
        cpu::gemm(t.rows, p.dv_pad, t.cols, s.data(), p.bk, 1, vp + t.k0 * p.dv_pad, p.dv_pad, acc.data(), p.dv_pad,
                  true);
      }
      for (int64_t r = 0; r < rows.rows; ++r) {
        if (token[r] < 0) continue;
        cpu::store(out_rows(b, h, token[r]), acc.data() + r * p.dv_pad, state[r].inv_sum(), p.d.dv);
        lse_data[(b * H + h) * p.d.tokens + token[r]] = state[r].lse();
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> window_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v, at::IntArrayRef spatial_shape,
                                                        at::IntArrayRef window, at::IntArrayRef shift,
                                                        const std::optional<at::Tensor>& bias_table,
                                                        const std::optional<at::Tensor>& dense_bias,
                                                        const std::optional<at::Tensor>& pad_kv, bool shift_mask,
                                                        double scale) {
  const WindowDims d = check_window_attention("pykernels.window_attention", q, k, v, spatial_shape, window, shift,
                                              bias_table, dense_bias, pad_kv);
  at::Tensor out = at::empty({d.batch, d.heads, d.tokens, d.dv}, q.options());
  at::Tensor lse = at::empty({d.batch, d.heads, d.tokens}, q.options().dtype(attention_lse_dtype(q.scalar_type())));
  PK_DISPATCH_FLOATS(q.scalar_type(), "window_attention_cpu", [&] {
    using A = cpu::acc_t<scalar_t>;
    const Plan p(d, cpu::kLanes<A>, cpu::kHalfLanes<A>);
    const at::Tensor table = table_in_acc<A>(bias_table);
    const ScoreBias<scalar_t, A> bias(p, table, dense_bias);
    forward_kernel<scalar_t, A>(p, Inputs<scalar_t>(q, k, v, pad_kv), bias, shift_mask, static_cast<A>(scale), out,
                                lse);
  });
  return {out, lse};
}

// ------------------------------------------------------------------------------------------- backward

// One task's buffers: a packed query block (times scale), its grad_out block, lse and correction per row,
// the P and dS tiles, and the window's packed keys and values when the task packs them itself.
template <typename A>
struct Scratch {
  std::vector<A> q, dout, lse, corr, s, x, kt, kp, vt;
  Scratch(const Plan& p, bool packs)
      : q(kBlockQ * p.dqk_pad), dout(kBlockQ * p.dv_pad), lse(kBlockQ), corr(kBlockQ), s(kBlockQ * p.bk),
        x(kBlockQ * p.bk), kt(packs ? p.kt_size() : 0), kp(packs ? p.kp_size() : 0), vt(packs ? p.vt_size() : 0) {}
};

// One window's keys and values as the backward reads them: key panels, key rows, value panels.
template <typename A>
struct Packs {
  const A *kt, *kp, *vt;
};

// What both passes share: the inputs, and P and dS of a tile recomputed from the lse.
template <typename T, typename A>
struct Recompute {
  const Plan& p;
  Inputs<T> in;
  Rows<const T> dout;
  A scale;
  const ScoreBias<T, A>& bias;
  bool shift_mask;
  const A* lse;   // [B * H][tokens]
  const A* corr;  // [B * H][tokens]: dO . O

  void pack(int64_t b, int64_t h, const WindowView& view, A* kt, A* kp, A* vt) const {
    gather_panels(in.keys(h), b, h, view.token.data(), p.n, p.d.dqk, p.bk, kt);
    gather_rows(in.keys(h), b, h, view.token.data(), p.n, p.d.dqk, p.dqk_pad, A(1), kp);
    gather_panels(in.values(h), b, h, view.token.data(), p.n, p.d.dv, p.bk, vt);
  }

  // The query block of tile `rows`: pad positions get q = dO = 0 and lse = -inf, so P = dS = 0 there.
  void load(int64_t b, int64_t h, const WindowView& view, const Tile& rows, Scratch<A>& w) const {
    const int64_t* token = view.token.data() + rows.q0;
    gather_rows(in.queries(), b, h, token, rows.rows, p.d.dqk, p.dqk_pad, scale, w.q.data());
    gather_rows(Source<T>{dout, nullptr}, b, h, token, rows.rows, p.d.dv, p.dv_pad, A(1), w.dout.data());
    const int64_t base = (b * p.d.heads + h) * p.d.tokens;
    for (int64_t r = 0; r < rows.rows; ++r) {
      w.lse[r] = token[r] >= 0 ? lse[base + token[r]] : A(-INFINITY);
      w.corr[r] = token[r] >= 0 ? corr[base + token[r]] : A(0);
    }
  }

  // w.s = P and w.x = dS = P (dO V^T - corr) of tile t.
  void tile_grads(const Tile& t, int64_t h, const Packs<A>& kv, const WindowView& view, Scratch<A>& w) const {
    tile_scores(p, t, w.q.data(), kv.kt, w.s.data());
    for (int64_t r = 0; r < t.rows; ++r) {
      A* sr = w.s.data() + r * p.bk;
      if (w.lse[r] == A(-INFINITY)) {
        std::fill(sr, sr + t.width, A(0));
        continue;
      }
      bias.finish(sr, h, t.q0 + r, t, view);
      cpu::exp_sum(sr, w.lse[r], t.width);
    }
    const A* panel = kv.vt + t.k0 / p.bk * p.d.dv * p.bk;
    cpu::gemm(t.rows, t.width, p.d.dv, w.dout.data(), p.dv_pad, 1, panel, p.bk, w.x.data(), p.bk, false);
    for (int64_t r = 0; r < t.rows; ++r)
      cpu::softmax_grad(w.x.data() + r * p.bk, w.s.data() + r * p.bk, w.corr[r], t.width);
  }

  // dk += dS^T (scale q) and dv += P^T dO for the keys of tile t.
  void key_grads(const Tile& t, const Scratch<A>& w, A* dk_acc, A* dv_acc) const {
    cpu::gemm(t.cols, p.dv_pad, t.rows, w.s.data(), 1, p.bk, w.dout.data(), p.dv_pad, dv_acc, p.dv_pad, true);
    cpu::gemm(t.cols, p.dqk_pad, t.rows, w.x.data(), 1, p.bk, w.q.data(), p.dqk_pad, dk_acc, p.dqk_pad, true);
  }

  void store_key_grads(int64_t b, int64_t h, const WindowView& view, const Tile& keys, const A* dk_acc,
                       const A* dv_acc, const Rows<T>& dk, const Rows<T>& dv) const {
    for (int64_t j = 0; j < keys.cols; ++j) {
      const int64_t token = view.token[keys.k0 + j];
      if (token < 0) continue;
      cpu::store(dk(b, h, token), dk_acc + j * p.dqk_pad, A(1), p.d.dqk);
      cpu::store(dv(b, h, token), dv_acc + j * p.dv_pad, A(1), p.d.dv);
    }
  }
};

// Groups of windows (b, window) per dq task. Without a bias gradient every window is its own group; with
// one, groups are few enough that the partial sums stay bounded and many enough for the threads.
int64_t bias_groups(const Plan& p, int64_t partial_per_group) {
  const int64_t items = p.d.batch * p.windows;
  if (partial_per_group == 0 || items == 0) return items;
  const int64_t by_tasks = (kTargetTasks + p.d.heads * p.q_blocks - 1) / std::max<int64_t>(1, p.d.heads * p.q_blocks);
  const int64_t by_memory = kMaxPartial / partial_per_group;
  return std::min(items, std::max<int64_t>(1, std::min(by_tasks, by_memory)));
}

// Pass over (group, head, query block): dq = scale dS K, and the task's bias-gradient partial: dense rows
// [G][H][n][n], or a table [G][H][q_blocks][table_rows]. Either way dS is summed over the group's windows
// as dense rows, whose sum is gathered into table entries once per task. Windows of one query block (whose keys fit one
// tile) are done here completely: the task owns all of the window's gradient rows, so it also writes dk and
// dv from the same P and dS, packing the window itself; `global` is then null. Otherwise the keys and values
// come packed per window in `global` and dkv_pass does dk and dv.
template <typename T, typename A>
void dq_pass(const Recompute<T, A>& c, const A* global, const Rows<T>& dq, const Rows<T>& dk, const Rows<T>& dv,
             int64_t groups, A* dense_partial, A* table_partial) {
  const Plan& p = c.p;
  const int64_t H = p.d.heads, items = p.d.batch * p.windows, per_window = p.kt_size() + p.kp_size() + p.vt_size();
  const bool fused = global == nullptr;
  at::parallel_for(0, groups * H * p.q_blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch<A> w(p, fused);
    WindowView view(p);
    std::vector<A> acc(kBlockQ * p.dqk_pad), dense(dense_partial || table_partial ? kBlockQ * p.n : 0),
        table(table_partial ? c.bias.table_rows : 0), dk_acc(fused ? p.bk * p.dqk_pad : 0),
        dv_acc(fused ? p.bk * p.dv_pad : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / (H * p.q_blocks), h = task / p.q_blocks % H, qb = task % p.q_blocks;
      const Tile rows = p.tile(qb, 0);
      std::fill(dense.begin(), dense.end(), A(0));
      for (int64_t item = g * items / groups; item < (g + 1) * items / groups; ++item) {
        const int64_t b = item / p.windows, win = item % p.windows;
        view.load(p, win, c.shift_mask);
        Packs<A> kv{w.kt.data(), w.kp.data(), w.vt.data()};
        if (fused) {
          c.pack(b, h, view, w.kt.data(), w.kp.data(), w.vt.data());
        } else {
          const A* base = global + p.bhw(b, h, win) * per_window;
          kv = {base, base + p.kt_size(), base + p.kt_size() + p.kp_size()};
        }
        c.load(b, h, view, rows, w);
        std::fill(acc.begin(), acc.end(), A(0));
        for (int64_t kb = 0; kb < p.k_blocks; ++kb) {
          const Tile t = p.tile(qb, kb);
          c.tile_grads(t, h, kv, view, w);
          cpu::gemm(t.rows, p.dqk_pad, t.cols, w.x.data(), p.bk, 1, kv.kp + t.k0 * p.dqk_pad, p.dqk_pad, acc.data(),
                    p.dqk_pad, true);
          if (dense_partial || table_partial)
            for (int64_t r = 0; r < t.rows; ++r)
              cpu::axpy(dense.data() + r * p.n + t.k0, A(1), w.x.data() + r * p.bk, t.cols);
          if (fused) {
            std::fill(dk_acc.begin(), dk_acc.end(), A(0));
            std::fill(dv_acc.begin(), dv_acc.end(), A(0));
            c.key_grads(t, w, dk_acc.data(), dv_acc.data());
            c.store_key_grads(b, h, view, t, dk_acc.data(), dv_acc.data(), dk, dv);
          }
        }
        const int64_t* token = view.token.data() + rows.q0;
        for (int64_t r = 0; r < rows.rows; ++r)
          if (token[r] >= 0) cpu::store(dq(b, h, token[r]), acc.data() + r * p.dqk_pad, c.scale, p.d.dqk);
      }
      if (dense_partial)
        std::copy(dense.begin(), dense.begin() + rows.rows * p.n,
                  dense_partial + ((g * H + h) * p.n + rows.q0) * p.n);
      if (table_partial) {
        std::fill(table.begin(), table.end(), A(0));
        c.bias.fold_into_table(dense.data(), rows.q0, rows.rows, p.n, table.data());
        std::copy(table.begin(), table.end(), table_partial + ((g * H + h) * p.q_blocks + qb) * c.bias.table_rows);
      }
    }
  });
}

// Pass over (b, h, window, key block) of windows with several query blocks: dk = dS^T (scale q) and
// dv = P^T dO over the window's query blocks.
template <typename T, typename A>
void dkv_pass(const Recompute<T, A>& c, const A* global, const Rows<T>& dk, const Rows<T>& dv) {
  const Plan& p = c.p;
  const int64_t H = p.d.heads, per_window = p.kt_size() + p.kp_size() + p.vt_size();
  at::parallel_for(0, p.d.batch * H * p.windows * p.k_blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch<A> w(p, false);
    WindowView view(p);
    std::vector<A> dk_acc(p.bk * p.dqk_pad), dv_acc(p.bk * p.dv_pad);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / p.k_blocks, kb = task % p.k_blocks;
      const int64_t b = i / (H * p.windows), h = i / p.windows % H;
      view.load(p, i % p.windows, c.shift_mask);
      const A* base = global + i * per_window;
      const Packs<A> kv{base, base + p.kt_size(), base + p.kt_size() + p.kp_size()};
      std::fill(dk_acc.begin(), dk_acc.end(), A(0));
      std::fill(dv_acc.begin(), dv_acc.end(), A(0));
      for (int64_t qb = 0; qb < p.q_blocks; ++qb) {
        const Tile t = p.tile(qb, kb);
        c.load(b, h, view, p.tile(qb, 0), w);
        c.tile_grads(t, h, kv, view, w);
        c.key_grads(t, w, dk_acc.data(), dv_acc.data());
      }
      c.store_key_grads(b, h, view, p.tile(0, kb), dk_acc.data(), dv_acc.data(), dk, dv);
    }
  });
}

// dense_bias grad [H, n, n] = sum over groups of the partials, in group order.
template <typename T, typename A>
void reduce_dense(const Plan& p, const A* partial, int64_t groups, T* out) {
  const int64_t H = p.d.heads, row = p.n, rows = H * p.n;
  at::parallel_for(0, rows, grain_for(rows, groups * row), [&](int64_t begin, int64_t end) {
    std::vector<A> acc(row);
    for (int64_t hr = begin; hr < end; ++hr) {
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t g = 0; g < groups; ++g) cpu::axpy(acc.data(), A(1), partial + (g * rows + hr) * row, row);
      cpu::store(out + hr * row, acc.data(), A(1), row);
    }
  });
}

// bias_table grad [table_rows, H] = sum over groups and query blocks of the partials, in that order.
template <typename T, typename A>
void reduce_table(const Plan& p, const A* partial, int64_t groups, int64_t table_rows, T* out) {
  const int64_t H = p.d.heads;
  at::parallel_for(0, H, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> acc(table_rows);
    for (int64_t h = begin; h < end; ++h) {
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t qb = 0; qb < p.q_blocks; ++qb)
          cpu::axpy(acc.data(), A(1), partial + ((g * H + h) * p.q_blocks + qb) * table_rows, table_rows);
      for (int64_t t = 0; t < table_rows; ++t) out[t * H + h] = static_cast<T>(acc[t]);
    }
  });
}

// corr[b, h, token] = dO . O, the softmax backward's correction term of every query.
template <typename T, typename A>
at::Tensor corrections(const at::Tensor& q, const at::Tensor& out, const at::Tensor& grad_out) {
  const int64_t B = out.size(0), H = out.size(1), N = out.size(2), dv = out.size(3);
  at::Tensor corr = acc_buffer<A>(q, {B * H * N});
  const Rows<const T> o(out), g(grad_out);
  A* data = corr.data_ptr<A>();
  at::parallel_for(0, B * H * N, grain_for(B * H * N, dv), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (H * N), h = r / N % H, i = r % N;
      data[r] = static_cast<A>(cpu::dot(g(b, h, i), o(b, h, i), dv));
    }
  });
  return corr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_attention_backward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::IntArrayRef spatial_shape,
    at::IntArrayRef window, at::IntArrayRef shift, const std::optional<at::Tensor>& bias_table,
    const std::optional<at::Tensor>& dense_bias, const std::optional<at::Tensor>& pad_kv, bool shift_mask,
    double scale, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& grad_out, bool bias_grad) {
  const char* op = "pykernels.window_attention_backward";
  const WindowDims d =
      check_window_attention(op, q, k, v, spatial_shape, window, shift, bias_table, dense_bias, pad_kv);
  check_window_attention_backward(op, q, d, out, lse, grad_out);
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  const bool dense_grad = bias_grad && dense_bias.has_value(), table_grad = bias_grad && bias_table.has_value();
  at::Tensor dbias = dense_grad   ? at::empty(dense_bias->sizes(), q.options())
                     : table_grad ? at::empty(bias_table->sizes(), q.options())
                                  : at::empty({0}, q.options());
  const at::Tensor lse_rows = lse.contiguous();
  PK_DISPATCH_FLOATS(q.scalar_type(), "window_attention_backward_cpu", [&] {
    using T = scalar_t;
    using A = cpu::acc_t<T>;
    const Plan p(d, cpu::kLanes<A>, cpu::kHalfLanes<A>);
    const at::Tensor table = table_in_acc<A>(bias_table);
    const ScoreBias<T, A> bias(p, table, dense_bias);
    const at::Tensor corr = corrections<T, A>(q, out, grad_out);
    const Recompute<T, A> c{p,
                            Inputs<T>(q, k, v, pad_kv),
                            Rows<const T>(grad_out),
                            static_cast<A>(scale),
                            bias,
                            shift_mask,
                            lse_rows.data_ptr<A>(),
                            corr.data_ptr<A>()};
    const int64_t H = d.heads, bhw_count = d.batch * H * p.windows;
    // Windows with several query blocks are read by many tasks: their keys and values are packed once.
    at::Tensor packed;
    if (p.q_blocks > 1) {
      const int64_t per_window = p.kt_size() + p.kp_size() + p.vt_size();
      packed = acc_buffer<A>(q, {bhw_count, per_window});
      at::parallel_for(0, bhw_count, 1, [&](int64_t begin, int64_t end) {
        WindowView view(p);
        for (int64_t i = begin; i < end; ++i) {
          view.load(p, i % p.windows, false);
          A* base = packed.data_ptr<A>() + i * per_window;
          c.pack(i / (H * p.windows), i / p.windows % H, view, base, base + p.kt_size(),
                 base + p.kt_size() + p.kp_size());
        }
      });
    }
    const A* global = packed.defined() ? packed.data_ptr<A>() : nullptr;
    const int64_t table_rows = window::table_rows(p.g);
    const int64_t per_group = dense_grad ? H * p.n * p.n : table_grad ? H * p.q_blocks * table_rows : 0;
    const int64_t groups = bias_groups(p, per_group);
    at::Tensor partial = acc_buffer<A>(q, {groups * per_group});
    const Rows<T> dk_rows(dk), dv_rows(dv);
    dq_pass(c, global, Rows<T>(dq), dk_rows, dv_rows, groups, dense_grad ? partial.data_ptr<A>() : nullptr,
            table_grad ? partial.data_ptr<A>() : nullptr);
    if (global) dkv_pass(c, global, dk_rows, dv_rows);
    if (dense_grad) reduce_dense(p, partial.data_ptr<A>(), groups, dbias.data_ptr<T>());
    if (table_grad) reduce_table(p, partial.data_ptr<A>(), groups, table_rows, dbias.data_ptr<T>());
  });
  return {dq, dk, dv, dbias};
}

}  // namespace
}  // namespace pk

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("window_attention", &pk::window_attention_cpu);
  m.impl("window_attention_backward", &pk::window_attention_backward_cpu);
}
