// Dense attention on the CPU, FlashAttention-style: work is cut into tiles of kBlockQ queries x at most
// kMaxBlockK keys, so no [Nq, Nk] matrix exists except the bias gradient when one is asked for.
//
// k and v are packed once per call into the accumulation type, in the layouts the tile products read
// (row-major, and transposed per key block), padded to whole vectors; each task packs its own query block
// the same way. Every tile product is then one cpu::gemm with its accumulators in registers.
//
// Forward streams key blocks through an online softmax per query row. Backward and the head-mean map's
// backward recompute the probabilities from the lse and run two atomic-free passes: one over query blocks
// (dq and the bias gradient), one over key blocks (dk, dv), the second summing over the query heads that
// share a key/value head. Both passes recompute P and dS with the same code, so they agree bitwise.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "attention/attention_checks.h"
#include "attention/flash_cpu.h"

namespace pk {
namespace {

using flash::acc_buffer;
using flash::kBlockQ;
using flash::Rows;
using flash::Tile;
using flash::zigzag;

// Element-wise strided reads of a bias [B, H, Nq, Nk] (any strides, 0 where broadcast) or of the map
// gradient [B, Nq, Nk] (h ignored). row() is null when there is no tensor.
template <typename T>
struct Strided {
  const T* data = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  Strided() = default;
  explicit Strided(const std::optional<at::Tensor>& t) {
    if (!t) return;
    data = t->data_ptr<T>();
    s0 = t->stride(0), s1 = t->stride(1), s2 = t->stride(2), s3 = t->stride(3);
  }
  static Strided map(const at::Tensor& g) {
    Strided s;
    s.data = g.data_ptr<T>();
    s.s0 = g.stride(0), s.s2 = g.stride(1), s.s3 = g.stride(2);
    return s;
  }
  const T* row(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return data ? data + b * s0 + h * s1 + i * s2 + j * s3 : nullptr;
  }
};

// Block counts and padded widths of one call, for accumulation type A.
struct Plan {
  AttentionDims d;
  bool causal;
  // Score tiles are padded to whole vectors (lanes), head dims to cpu::gemm's narrowest panel (pad_lanes).
  int64_t lanes, dqk_pad, dv_pad, bk, q_blocks, k_blocks;  // bk: keys per tile, a multiple of lanes
  Plan(const AttentionDims& dims, bool is_causal, int64_t vec_lanes, int64_t pad_lanes)
      : d(dims),
        causal(is_causal),
        lanes(vec_lanes),
        dqk_pad(cpu::round_up_lanes(dims.dqk, pad_lanes)),
        dv_pad(cpu::round_up_lanes(dims.dv, pad_lanes)),
        bk(flash::key_block(dims.nk, vec_lanes)),
        q_blocks((dims.nq + kBlockQ - 1) / kBlockQ),
        k_blocks((dims.nk + bk - 1) / bk) {}

  Tile tile(int64_t qb, int64_t kb) const {
    const int64_t q0 = qb * kBlockQ, k0 = kb * bk, cols = std::min(bk, d.nk - k0);
    return {q0, std::min(kBlockQ, d.nq - q0), k0, cols, cpu::round_up_lanes(cols, lanes)};
  }
  // Key blocks [0, k_end) hold every key that query block qb sees.
  int64_t k_end(int64_t qb) const {
    if (!causal) return k_blocks;
    const int64_t last_query = std::min(d.nq, (qb + 1) * kBlockQ) - 1;
    return std::min(k_blocks, last_query / bk + 1);
  }
  // Query blocks [q_begin, q_blocks) hold every query that sees a key of block kb.
  int64_t q_begin(int64_t kb) const { return causal ? kb * bk / kBlockQ : 0; }
  int64_t kv_row(int64_t b, int64_t h) const { return b * d.kv_heads + h / d.group(); }
};

// ------------------------------------------------------------------------------------------- packing

// dst[r][0:ld] = mul * rows(b, h, i0 + r)[0:cols] for r < n, zero-padded: the row-major operand layout.
template <typename T, typename A>
void pack_block(const Rows<const T>& rows, int64_t b, int64_t h, int64_t i0, int64_t n, int64_t cols, int64_t ld,
                A mul, A* dst) {
  for (int64_t r = 0; r < n; ++r) {
    const T* x = rows(b, h, i0 + r);
    A* y = dst + r * ld;
    for (int64_t c = 0; c < cols; ++c) y[c] = mul * cpu::to_acc(x[c]);
    std::fill(y + cols, y + ld, A(0));
  }
}

// [b * heads + h][i][0:ld] = src[b, h, i, :], zero-padded: k or v in row-major layout.
template <typename T, typename A>
at::Tensor pack_rows(const at::Tensor& src, int64_t ld) {
  const int64_t heads = src.size(1), n = src.size(2);
  at::Tensor dst = acc_buffer<A>(src, {src.size(0) * heads, n, ld});
  const Rows<const T> in(src);
  A* out = dst.data_ptr<A>();
  at::parallel_for(0, src.size(0) * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh)
      pack_block(in, bh / heads, bh % heads, 0, n, src.size(3), ld, A(1), out + bh * n * ld);
  });
  return dst;
}

// [b * heads + h][blk][c][j] = src[b, h, blk * block + j, c], zero-padded to whole blocks: k or v
// transposed, one [cols, block] panel per key block.
template <typename T, typename A>
at::Tensor pack_cols(const at::Tensor& src, int64_t blocks, int64_t block) {
  const int64_t heads = src.size(1), n = src.size(2), cols = src.size(3), total = src.size(0) * heads * blocks;
  at::Tensor dst = acc_buffer<A>(src, {src.size(0) * heads, blocks, cols, block});
  const Rows<const T> in(src);
  A* out = dst.data_ptr<A>();
  at::parallel_for(0, total, grain_for(total, cols * block), [&](int64_t begin, int64_t end) {
    for (int64_t panel = begin; panel < end; ++panel) {
      const int64_t bh = panel / blocks, j0 = panel % blocks * block, valid = std::min(block, n - j0);
      A* y = out + panel * cols * block;
      std::fill(y, y + cols * block, A(0));
      for (int64_t j = 0; j < valid; ++j) {
        const T* x = in(bh / heads, bh % heads, j0 + j);
        for (int64_t c = 0; c < cols; ++c) y[c * block + j] = cpu::to_acc(x[c]);
      }
    }
  });
  return dst;
}

// Adds the bias to the first n scores of a row and masks the rest of its width.
template <typename T, typename A>
void finish_scores(A* s, int64_t n, int64_t width, const T* bias, int64_t stride) {
  if (bias && stride == 1)
    cpu::axpy(s, A(1), bias, n);
  else if (bias)
    for (int64_t j = 0; j < n; ++j) s[j] += cpu::to_acc(bias[j * stride]);
  std::fill(s + n, s + width, A(-INFINITY));
}

// s[r][0:width] = (scale q) k^T for tile t; q_block is the packed query block, row stride bk.
template <typename A>
void tile_scores(const Plan& p, const Tile& t, int64_t bkv, const A* q_block, const A* kt, A* s) {
  const A* panel = kt + (bkv * p.k_blocks + t.k0 / p.bk) * p.d.dqk * p.bk;
  cpu::gemm(t.rows, t.width, p.d.dqk, q_block, p.dqk_pad, 1, panel, p.bk, s, p.bk, false);
}

// ------------------------------------------------------------------------------------------- forward

// Folds one tile of scores into the running softmax of each row and the output accumulator.
template <typename T, typename A>
void forward_tile(const Plan& p, const Tile& t, const Strided<T>& bias, int64_t b, int64_t h, A* s,
                  OnlineSoftmax<A>* state, A* acc, const A* v_rows) {
  for (int64_t r = 0; r < t.rows; ++r) {
    A* sr = s + r * p.bk;
    finish_scores(sr, t.visible(r, p.causal), t.width, bias.row(b, h, t.q0 + r, t.k0), bias.s3);
    flash::fold_row(sr, t.width, state[r], acc + r * p.dv_pad, p.dv_pad);
  }
  cpu::gemm(t.rows, p.dv_pad, t.cols, s, p.bk, 1, v_rows + t.k0 * p.dv_pad, p.dv_pad, acc, p.dv_pad, true);
}

template <typename T, typename A>
void forward_kernel(const Plan& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const std::optional<at::Tensor>& bias_t, A scale, const at::Tensor& out, const at::Tensor& lse) {
  const at::Tensor kt = pack_cols<T, A>(k, p.k_blocks, p.bk), vp = pack_rows<T, A>(v, p.dv_pad);
  const Rows<const T> q_rows(q);
  const Rows<T> out_rows(out);
  const Strided<T> bias(bias_t);
  A* lse_data = lse.data_ptr<A>();
  const int64_t H = p.d.heads, tasks = p.d.batch * H * p.q_blocks;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> qs(kBlockQ * p.dqk_pad), s(kBlockQ * p.bk), acc(kBlockQ * p.dv_pad);
    std::vector<OnlineSoftmax<A>> state(kBlockQ);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / p.q_blocks, b = bh / H, h = bh % H, qb = zigzag(task % p.q_blocks, p.q_blocks);
      const Tile rows = p.tile(qb, 0);
      pack_block(q_rows, b, h, rows.q0, rows.rows, p.d.dqk, p.dqk_pad, scale, qs.data());
      std::fill(acc.begin(), acc.end(), A(0));
      std::fill(state.begin(), state.end(), OnlineSoftmax<A>{});
      const A* v_rows = vp.data_ptr<A>() + p.kv_row(b, h) * p.d.nk * p.dv_pad;
      for (int64_t kb = 0; kb < p.k_end(qb); ++kb) {
        const Tile t = p.tile(qb, kb);
        tile_scores(p, t, p.kv_row(b, h), qs.data(), kt.data_ptr<A>(), s.data());
        forward_tile(p, t, bias, b, h, s.data(), state.data(), acc.data(), v_rows);
      }
      for (int64_t r = 0; r < rows.rows; ++r) {
        cpu::store(out_rows(b, h, rows.q0 + r), acc.data() + r * p.dv_pad, state[r].inv_sum(), p.d.dv);
        lse_data[bh * p.d.nq + rows.q0 + r] = state[r].lse();
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const std::optional<at::Tensor>& bias, bool causal, double scale) {
  const AttentionDims d = check_attention("pykernels.attention", q, k, v, bias);
  at::Tensor out = at::empty({d.batch, d.heads, d.nq, d.dv}, q.options());
  at::Tensor lse = at::empty({d.batch, d.heads, d.nq}, q.options().dtype(attention_lse_dtype(q.scalar_type())));
  PK_DISPATCH_FLOATS(q.scalar_type(), "attention_cpu", [&] {
    using A = cpu::acc_t<scalar_t>;
    const Plan p(d, causal, cpu::kLanes<A>, cpu::kHalfLanes<A>);
    forward_kernel<scalar_t, A>(p, q, k, v, bias, static_cast<A>(scale), out, lse);
  });
  return {out, lse};
}

// ----------------------------------------------------------------------------- probabilities from the lse

// One task's buffers: its packed query block (times scale) and grad_out block, and two score tiles.
template <typename A>
struct Scratch {
  std::vector<A> q, dout, s, x;
  explicit Scratch(const Plan& p)
      : q(kBlockQ * p.dqk_pad), dout(kBlockQ * p.dv_pad), s(kBlockQ * p.bk), x(kBlockQ * p.bk) {}
};

// What the map and both backward passes share: k packed both ways, the lse, and one correction term per
// query row (dO . O for attention, sum_j P G / H for the map).
template <typename T, typename A>
struct Recompute {
  const Plan& p;
  Rows<const T> q;
  A scale;
  Strided<T> bias;
  const A* kt;   // [B*Hkv][k_blocks][Dqk][bk]
  const A* k;    // [B*Hkv][Nk][dqk_pad]
  const A* lse;  // [B*H][Nq]
  A* corr;       // [B*H][Nq]

  void load_queries(int64_t b, int64_t h, const Tile& t, A* dst) const {
    pack_block(q, b, h, t.q0, t.rows, p.d.dqk, p.dqk_pad, scale, dst);
  }
  const A* k_block(int64_t bkv, int64_t k0) const { return k + (bkv * p.d.nk + k0) * p.dqk_pad; }

  // s[r][0:width] = P of tile t for head h of batch b; row stride bk.
  void probs(const Tile& t, int64_t b, int64_t h, const A* q_block, A* s) const {
    const int64_t bh = b * p.d.heads + h;
    tile_scores(p, t, p.kv_row(b, h), q_block, kt, s);
    for (int64_t r = 0; r < t.rows; ++r) {
      A* sr = s + r * p.bk;
      const A m = lse[bh * p.d.nq + t.q0 + r];
      if (m == A(-INFINITY)) {
        std::fill(sr, sr + t.width, A(0));
        continue;
      }
      finish_scores(sr, t.visible(r, p.causal), t.width, bias.row(b, h, t.q0 + r, t.k0), bias.s3);
      cpu::exp_sum(sr, m, t.width);
    }
  }

  // x = dS = P (x - corr), given x = dP.
  void score_grads(const Tile& t, int64_t bh, const A* s, A* x) const {
    for (int64_t r = 0; r < t.rows; ++r)
      cpu::softmax_grad(x + r * p.bk, s + r * p.bk, corr[bh * p.d.nq + t.q0 + r], t.width);
  }

  // Scratch s = P and x = dS of tile t, the grad policy providing dP.
  template <typename Grad>
  void tile_grads(const Grad& grad, const Tile& t, int64_t b, int64_t h, Scratch<A>& w) const {
    probs(t, b, h, w.q.data(), w.s.data());
    grad.fill(t, b, h, w, w.x.data());
    score_grads(t, b * p.d.heads + h, w.s.data(), w.x.data());
  }
};

// dP of attention: dO V^T, with delta = dO . O as correction.
template <typename T, typename A>
struct OutGrad {
  static constexpr bool kValues = true;
  const Plan& p;
  Rows<const T> dout, out;
  const A* vt;  // [B*Hkv][k_blocks][Dv][bk]

  void load(int64_t b, int64_t h, const Tile& t, Scratch<A>& w) const {
    pack_block(dout, b, h, t.q0, t.rows, p.d.dv, p.dv_pad, A(1), w.dout.data());
  }
  void fill(const Tile& t, int64_t b, int64_t h, const Scratch<A>& w, A* x) const {
    const A* panel = vt + (p.kv_row(b, h) * p.k_blocks + t.k0 / p.bk) * p.d.dv * p.bk;
    cpu::gemm(t.rows, t.width, p.d.dv, w.dout.data(), p.dv_pad, 1, panel, p.bk, x, p.bk, false);
  }
  void correction(const Recompute<T, A>&, int64_t b, int64_t h, int64_t qb, A* corr, Scratch<A>& w) const {
    const Tile rows = p.tile(qb, 0);
    for (int64_t r = 0; r < rows.rows; ++r)
      corr[r] = cpu::dot(w.dout.data() + r * p.dv_pad, out(b, h, rows.q0 + r), p.d.dv);
  }
};

// dP of the head-mean map: G / H, with sum_j P G / H as correction.
template <typename T, typename A>
struct MapGrad {
  static constexpr bool kValues = false;
  const Plan& p;
  Strided<T> grad;
  A inv_heads;

  void load(int64_t, int64_t, const Tile&, Scratch<A>&) const {}
  void fill(const Tile& t, int64_t b, int64_t, const Scratch<A>&, A* x) const {
    for (int64_t r = 0; r < t.rows; ++r) {
      const T* g = grad.row(b, 0, t.q0 + r, t.k0);
      A* xr = x + r * p.bk;
      for (int64_t j = 0; j < t.cols; ++j) xr[j] = inv_heads * cpu::to_acc(g[j * grad.s3]);
      std::fill(xr + t.cols, xr + t.width, A(0));
    }
  }
  void correction(const Recompute<T, A>& c, int64_t b, int64_t h, int64_t qb, A* corr, Scratch<A>& w) const {
    std::fill(corr, corr + p.tile(qb, 0).rows, A(0));
    for (int64_t kb = 0; kb < p.k_end(qb); ++kb) {
      const Tile t = p.tile(qb, kb);
      c.probs(t, b, h, w.q.data(), w.s.data());
      fill(t, b, h, w, w.x.data());
      for (int64_t r = 0; r < t.rows; ++r) corr[r] += cpu::dot(w.s.data() + r * p.bk, w.x.data() + r * p.bk, t.width);
    }
  }
};

// ------------------------------------------------------------------------------------ the two passes

// Pass over (b, h, query block): dq = scale dS K and the bias gradient dS; stores the correction terms.
template <typename T, typename A, typename Grad>
void dq_pass(const Recompute<T, A>& c, const Grad& grad, const Rows<T>& dq, T* dbias) {
  const Plan& p = c.p;
  const int64_t H = p.d.heads, tasks = p.d.batch * H * p.q_blocks;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    Scratch<A> w(p);
    std::vector<A> acc(kBlockQ * p.dqk_pad);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / p.q_blocks, b = bh / H, h = bh % H, qb = zigzag(task % p.q_blocks, p.q_blocks);
      const Tile rows = p.tile(qb, 0);
      c.load_queries(b, h, rows, w.q.data());
      grad.load(b, h, rows, w);
      grad.correction(c, b, h, qb, c.corr + bh * p.d.nq + rows.q0, w);
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t kb = 0; kb < p.k_end(qb); ++kb) {
        const Tile t = p.tile(qb, kb);
        c.tile_grads(grad, t, b, h, w);
        cpu::gemm(t.rows, p.dqk_pad, t.cols, w.x.data(), p.bk, 1, c.k_block(p.kv_row(b, h), t.k0), p.dqk_pad,
                  acc.data(), p.dqk_pad, true);
        if (dbias)
          for (int64_t r = 0; r < t.rows; ++r)
            cpu::store(dbias + (bh * p.d.nq + t.q0 + r) * p.d.nk + t.k0, w.x.data() + r * p.bk, A(1), t.cols);
      }
      for (int64_t r = 0; r < rows.rows; ++r)
        cpu::store(dq(b, h, rows.q0 + r), acc.data() + r * p.dqk_pad, c.scale, p.d.dqk);
    }
  });
}

// Pass over (b, kv head, key block): dk = dS^T (scale q) and dv = P^T dO, summed over the query heads of
// the group, so every gradient row has one writer.
template <typename T, typename A, typename Grad>
void dkv_pass(const Recompute<T, A>& c, const Grad& grad, const Rows<T>& dk, const Rows<T>* dv) {
  const Plan& p = c.p;
  const int64_t tasks = p.d.batch * p.d.kv_heads * p.k_blocks, group = p.d.group();
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    Scratch<A> w(p);
    std::vector<A> dk_acc(p.bk * p.dqk_pad), dv_acc(Grad::kValues ? p.bk * p.dv_pad : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bkv = task / p.k_blocks, b = bkv / p.d.kv_heads, hkv = bkv % p.d.kv_heads;
      const int64_t kb = zigzag(task % p.k_blocks, p.k_blocks);
      std::fill(dk_acc.begin(), dk_acc.end(), A(0));
      std::fill(dv_acc.begin(), dv_acc.end(), A(0));
      for (int64_t h = hkv * group; h < (hkv + 1) * group; ++h)
        for (int64_t qb = p.q_begin(kb); qb < p.q_blocks; ++qb) {
          const Tile t = p.tile(qb, kb);
          c.load_queries(b, h, t, w.q.data());
          grad.load(b, h, t, w);
          c.tile_grads(grad, t, b, h, w);
          if constexpr (Grad::kValues)
            cpu::gemm(t.cols, p.dv_pad, t.rows, w.s.data(), 1, p.bk, w.dout.data(), p.dv_pad, dv_acc.data(), p.dv_pad,
                      true);
          cpu::gemm(t.cols, p.dqk_pad, t.rows, w.x.data(), 1, p.bk, w.q.data(), p.dqk_pad, dk_acc.data(), p.dqk_pad,
                    true);
        }
      const Tile keys = p.tile(0, kb);
      for (int64_t j = 0; j < keys.cols; ++j) {
        cpu::store(dk(b, hkv, keys.k0 + j), dk_acc.data() + j * p.dqk_pad, A(1), p.d.dqk);
        if constexpr (Grad::kValues)
          cpu::store((*dv)(b, hkv, keys.k0 + j), dv_acc.data() + j * p.dv_pad, A(1), p.d.dv);
      }
    }
  });
}

at::Tensor bias_grad_buffer(const at::Tensor& q, const AttentionDims& d, bool causal, bool bias_grad) {
  if (!bias_grad) return at::empty({0}, q.options());
  // Causal passes skip the tiles above the diagonal, whose gradient is 0.
  const std::array<int64_t, 4> shape{d.batch, d.heads, d.nq, d.nk};
  return causal ? at::zeros(shape, q.options()) : at::empty(shape, q.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& bias,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& grad_out, bool causal, double scale,
    bool bias_grad) {
  const AttentionDims d = check_attention_backward("pykernels.attention_backward", q, k, v, bias, out, lse, grad_out);
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  at::Tensor dbias = bias_grad_buffer(q, d, causal, bias_grad);
  const at::Tensor lse_rows = lse.contiguous();
  PK_DISPATCH_FLOATS(q.scalar_type(), "attention_backward_cpu", [&] {
    using T = scalar_t;
    using A = cpu::acc_t<T>;
    const Plan p(d, causal, cpu::kLanes<A>, cpu::kHalfLanes<A>);
    const at::Tensor kp = pack_rows<T, A>(k, p.dqk_pad), kt = pack_cols<T, A>(k, p.k_blocks, p.bk);
    const at::Tensor vt = pack_cols<T, A>(v, p.k_blocks, p.bk);
    at::Tensor corr = acc_buffer<A>(q, {d.batch * d.heads * d.nq});
    const Recompute<T, A> c{p, Rows<const T>(q), static_cast<A>(scale), Strided<T>(bias), kt.data_ptr<A>(),
                            kp.data_ptr<A>(), lse_rows.data_ptr<A>(), corr.data_ptr<A>()};
    const OutGrad<T, A> grad{p, Rows<const T>(grad_out), Rows<const T>(out), vt.data_ptr<A>()};
    const Rows<T> dv_rows(dv);
    dq_pass(c, grad, Rows<T>(dq), bias_grad ? dbias.data_ptr<T>() : nullptr);
    dkv_pass(c, grad, Rows<T>(dk), &dv_rows);
  });
  return {dq, dk, dv, dbias};
}

// ---------------------------------------------------------------------------------------- head-mean map

// Parallel over (b, query block): each tile of the map sums P over the heads in place.
template <typename T, typename A>
void map_kernel(const Recompute<T, A>& c, T* map) {
  const Plan& p = c.p;
  const int64_t H = p.d.heads, tasks = p.d.batch * p.q_blocks;
  const A inv_heads = A(1) / A(std::max<int64_t>(H, 1));
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> qs(H * kBlockQ * p.dqk_pad), s(kBlockQ * p.bk), acc(kBlockQ * p.bk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p.q_blocks, qb = zigzag(task % p.q_blocks, p.q_blocks);
      for (int64_t h = 0; h < H; ++h) c.load_queries(b, h, p.tile(qb, 0), qs.data() + h * kBlockQ * p.dqk_pad);
      for (int64_t kb = 0; kb < p.k_blocks; ++kb) {
        const Tile t = p.tile(qb, kb);
        std::fill(acc.begin(), acc.end(), A(0));
        for (int64_t h = 0; kb < p.k_end(qb) && h < H; ++h) {
          c.probs(t, b, h, qs.data() + h * kBlockQ * p.dqk_pad, s.data());
          for (int64_t r = 0; r < t.rows; ++r) cpu::axpy(acc.data() + r * p.bk, A(1), s.data() + r * p.bk, t.width);
        }
        for (int64_t r = 0; r < t.rows; ++r)
          cpu::store(map + (b * p.d.nq + t.q0 + r) * p.d.nk + t.k0, acc.data() + r * p.bk, inv_heads, t.cols);
      }
    }
  });
}

at::Tensor attention_map_cpu(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& bias,
                             const at::Tensor& lse, bool causal, double scale) {
  const AttentionDims d = check_attention_map("pykernels.attention_map", q, k, bias, lse);
  at::Tensor map = at::empty({d.batch, d.nq, d.nk}, q.options());
  const at::Tensor lse_rows = lse.contiguous();
  PK_DISPATCH_FLOATS(q.scalar_type(), "attention_map_cpu", [&] {
    using T = scalar_t;
    using A = cpu::acc_t<T>;
    const Plan p(d, causal, cpu::kLanes<A>, cpu::kHalfLanes<A>);
    const at::Tensor kt = pack_cols<T, A>(k, p.k_blocks, p.bk);
    const Recompute<T, A> c{p, Rows<const T>(q), static_cast<A>(scale), Strided<T>(bias), kt.data_ptr<A>(), nullptr,
                            lse_rows.data_ptr<A>(), nullptr};
    map_kernel(c, map.data_ptr<T>());
  });
  return map;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_map_backward_cpu(
    const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& bias, const at::Tensor& lse,
    const at::Tensor& grad_map, bool causal, double scale, bool bias_grad) {
  const AttentionDims d = check_attention_map_backward("pykernels.attention_map_backward", q, k, bias, lse, grad_map);
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k);
  at::Tensor dbias = bias_grad_buffer(q, d, causal, bias_grad);
  const at::Tensor lse_rows = lse.contiguous();
  PK_DISPATCH_FLOATS(q.scalar_type(), "attention_map_backward_cpu", [&] {
    using T = scalar_t;
    using A = cpu::acc_t<T>;
    const Plan p(d, causal, cpu::kLanes<A>, cpu::kHalfLanes<A>);
    const at::Tensor kp = pack_rows<T, A>(k, p.dqk_pad), kt = pack_cols<T, A>(k, p.k_blocks, p.bk);
    at::Tensor corr = acc_buffer<A>(q, {d.batch * d.heads * d.nq});
    const Recompute<T, A> c{p, Rows<const T>(q), static_cast<A>(scale), Strided<T>(bias), kt.data_ptr<A>(),
                            kp.data_ptr<A>(), lse_rows.data_ptr<A>(), corr.data_ptr<A>()};
    const MapGrad<T, A> grad{p, Strided<T>::map(grad_map), A(1) / A(std::max<int64_t>(d.heads, 1))};
    dq_pass(c, grad, Rows<T>(dq), bias_grad ? dbias.data_ptr<T>() : nullptr);
    dkv_pass(c, grad, Rows<T>(dk), static_cast<const Rows<T>*>(nullptr));
  });
  return {dq, dk, dbias};
}

}  // namespace
}  // namespace pk

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("attention", &pk::attention_cpu);
  m.impl("attention_backward", &pk::attention_backward_cpu);
  m.impl("attention_map", &pk::attention_map_cpu);
  m.impl("attention_map_backward", &pk::attention_map_backward_cpu);
}
