// Dense attention on the CPU, FlashAttention-style: work is cut into tiles of kBlockQ queries x at most
// kMaxBlockK keys, so no [Nq, Nk] matrix exists except the bias gradient when one is asked for.
//
// k and v are packed into the accumulation type, in the layouts the tile products read (row-major, and
// transposed per key block), padded to whole vectors; each task packs its own query block the same way.
// Every tile product is then one cpu::gemm with its accumulators in registers. Heads whose packed k and v
// are small are packed by the thread that uses them (KvSource), others once per call.
//
// Forward streams key blocks through an online softmax per query row. A forward with few query rows per kv
// head (decoding), or with few tasks over long keys, instead cuts the keys into chunks, reads k and v in place
// and merges the chunks per row (forward_split; split_keys picks it from the shapes alone). Backward and the
// head-mean map's backward recompute the probabilities from the lse. When the (batch, kv head) pairs keep
// the threads busy, one task per pair does the whole backward in one pass (five tile products per tile).
// Otherwise two atomic-free passes share the work more finely: one over query blocks (dq and the bias
// gradient), one over key blocks (dk, dv), the second summing over the query heads that share a key/value
// head; they recompute P and dS with the same code, so they agree bitwise. Both schemes visit tiles in the
// same order and make the same products, so the choice (which depends on the thread count) does not change a
// bit of the result.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "attention/attention_checks.h"
#include "attention/flash_cpu.h"
#include "attention/row_dots_cpu.h"

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

// dst[c][j] = rows(b, h, j0 + j)[c] for j < n, zero-padded to [cols][block]: one key block transposed.
template <typename T, typename A>
void pack_panel(const Rows<const T>& rows, int64_t b, int64_t h, int64_t j0, int64_t n, int64_t cols, int64_t block,
                A* dst) {
  std::fill(dst, dst + cols * block, A(0));
  for (int64_t j = 0; j < n; ++j) {
    const T* x = rows(b, h, j0 + j);
    for (int64_t c = 0; c < cols; ++c) dst[c * block + j] = cpu::to_acc(x[c]);
  }
}

// k and v of one (batch, kv head) in the layouts the tile products read; a layout not asked for is null.
template <typename A>
struct KvPanels {
  const A* kt = nullptr;  // [k_blocks][dqk][bk]: k transposed per key block, for q k^T
  const A* k = nullptr;   // [nk][dqk_pad]: k row-major, for dS k
  const A* v = nullptr;   // [nk][dv_pad]: v row-major, for P v
  const A* vt = nullptr;  // [k_blocks][dv][bk]: v transposed per key block, for dO v^T
};

enum KvLayout : unsigned { kKt = 1, kKRows = 2, kVRows = 4, kVt = 8 };

// Where the KvPanels of every kv head come from: one buffer for all heads packed once per call, or a
// buffer per thread that its tasks refill when they move to another head. The second skips a call-wide
// buffer whose allocation and first touch cost more than the attention itself when heads are small (2560 x
// 8 heads of 16 tokens); it is taken while one head's panels fit in kThreadPanelBytes, so that repacking a
// head that two threads share stays cheap next to the tile products that read it.
template <typename T, typename A>
class KvSource {
 public:
  static constexpr int64_t kThreadPanelBytes = int64_t(4) << 20;

  KvSource(const Plan& p, const at::Tensor& k, const at::Tensor& v, unsigned layouts)
      : p_(p), k_(k), v_(v) {
    kt_size_ = layouts & kKt ? p.k_blocks * p.d.dqk * p.bk : 0;
    k_size_ = layouts & kKRows ? p.d.nk * p.dqk_pad : 0;
    v_size_ = layouts & kVRows ? p.d.nk * p.dv_pad : 0;
    vt_size_ = layouts & kVt ? p.k_blocks * p.d.dv * p.bk : 0;
  }

  int64_t head_size() const { return kt_size_ + k_size_ + v_size_ + vt_size_; }
  bool fits_thread() const { return head_size() * int64_t(sizeof(A)) <= kThreadPanelBytes; }

  // Packs every head once (on the first call), in parallel over (head, key block); shared() then serves
  // them to any thread.
  void pack_shared(const at::Tensor& like) {
    if (shared_.defined()) return;
    const int64_t heads = p_.d.batch * p_.d.kv_heads, items = heads * p_.k_blocks;
    shared_ = acc_buffer<A>(like, {heads * head_size()});
    A* base = shared_.data_ptr<A>();
    at::parallel_for(0, items, grain_for(items, p_.bk * (p_.dqk_pad + p_.dv_pad)), [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item)
        pack_block_of(item / p_.k_blocks, item % p_.k_blocks, base + item / p_.k_blocks * head_size());
    });
  }

  KvPanels<A> shared(int64_t bkv) const { return panels(shared_.data_ptr<A>() + bkv * head_size()); }

  // One thread's panels, repacked whenever it asks for another head.
  class Cursor {
   public:
    explicit Cursor(const KvSource& src) : src_(src), buffer_(src.head_size()) {}
    const KvPanels<A>& at(int64_t bkv) {
      if (bkv != packed_) {
        for (int64_t kb = 0; kb < src_.p_.k_blocks; ++kb) src_.pack_block_of(bkv, kb, buffer_.data());
        panels_ = src_.panels(buffer_.data());
        packed_ = bkv;
      }
      return panels_;
    }

   private:
    const KvSource& src_;
    std::vector<A> buffer_;
    KvPanels<A> panels_;
    int64_t packed_ = -1;
  };

 private:
  KvPanels<A> panels(const A* head) const {
    KvPanels<A> out;
    if (kt_size_) out.kt = head;
    if (k_size_) out.k = head + kt_size_;
    if (v_size_) out.v = head + kt_size_ + k_size_;
    if (vt_size_) out.vt = head + kt_size_ + k_size_ + v_size_;
    return out;
  }

  // Key block kb of every asked-for layout of kv row bkv, into that head's panels at head.
  void pack_block_of(int64_t bkv, int64_t kb, A* head) const {
    const int64_t b = bkv / p_.d.kv_heads, h = bkv % p_.d.kv_heads, j0 = kb * p_.bk;
    const int64_t n = std::min(p_.bk, p_.d.nk - j0);
    const Rows<const T> k(k_), v(v_);
    if (kt_size_) pack_panel(k, b, h, j0, n, p_.d.dqk, p_.bk, head + kb * p_.d.dqk * p_.bk);
    if (k_size_) pack_block(k, b, h, j0, n, p_.d.dqk, p_.dqk_pad, A(1), head + kt_size_ + j0 * p_.dqk_pad);
    if (v_size_) pack_block(v, b, h, j0, n, p_.d.dv, p_.dv_pad, A(1), head + kt_size_ + k_size_ + j0 * p_.dv_pad);
    if (vt_size_)
      pack_panel(v, b, h, j0, n, p_.d.dv, p_.bk, head + kt_size_ + k_size_ + v_size_ + kb * p_.d.dv * p_.bk);
  }

  const Plan& p_;
  const at::Tensor& k_;
  const at::Tensor& v_;
  int64_t kt_size_, k_size_, v_size_, vt_size_;
  at::Tensor shared_;
};

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
void tile_scores(const Plan& p, const Tile& t, const KvPanels<A>& kv, const A* q_block, A* s) {
  const A* panel = kv.kt + t.k0 / p.bk * p.d.dqk * p.bk;
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

// Runs body(task, panels, scratch) for tasks [0, tasks) in parallel, where panels(bkv) gives the task the
// KvPanels of kv row bkv: from its thread's buffer when per_thread is asked and a head fits one (consecutive
// tasks should then read the same head), else from a buffer packed for all. Each thread makes its scratch
// once with make_scratch().
template <typename T, typename A, typename MakeScratch, typename Body>
void for_each_task(KvSource<T, A>& kv, const at::Tensor& like, int64_t tasks, bool per_thread,
                   const MakeScratch& make_scratch, const Body& body) {
  per_thread = per_thread && kv.fits_thread();
  if (!per_thread) kv.pack_shared(like);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::optional<typename KvSource<T, A>::Cursor> cursor;
    if (per_thread) cursor.emplace(kv);
    const auto panels = [&](int64_t bkv) { return per_thread ? cursor->at(bkv) : kv.shared(bkv); };
    auto scratch = make_scratch();
    for (int64_t task = begin; task < end; ++task) body(task, panels, scratch);
  });
}

// One forward task's buffers: its packed query block (times scale), a score tile, the output accumulator.
template <typename A>
struct ForwardScratch {
  std::vector<A> q, s, acc;
  std::vector<OnlineSoftmax<A>> state;
  explicit ForwardScratch(const Plan& p)
      : q(kBlockQ * p.dqk_pad), s(kBlockQ * p.bk), acc(kBlockQ * p.dv_pad), state(kBlockQ) {}
};

template <typename T, typename A>
void forward_kernel(const Plan& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const std::optional<at::Tensor>& bias_t, A scale, const at::Tensor& out, const at::Tensor& lse) {
  KvSource<T, A> kv(p, k, v, kKt | kVRows);
  const Rows<const T> q_rows(q);
  const Rows<T> out_rows(out);
  const Strided<T> bias(bias_t);
  A* lse_data = lse.data_ptr<A>();
  const int64_t H = p.d.heads, tasks = p.d.batch * H * p.q_blocks;
  const auto make_scratch = [&] { return ForwardScratch<A>(p); };
  for_each_task(kv, q, tasks, true, make_scratch, [&](int64_t task, const auto& kv_panels, ForwardScratch<A>& w) {
    const int64_t bh = task / p.q_blocks, b = bh / H, h = bh % H, qb = zigzag(task % p.q_blocks, p.q_blocks);
    const KvPanels<A> panels = kv_panels(p.kv_row(b, h));
    const Tile rows = p.tile(qb, 0);
    pack_block(q_rows, b, h, rows.q0, rows.rows, p.d.dqk, p.dqk_pad, scale, w.q.data());
    std::fill(w.acc.begin(), w.acc.begin() + rows.rows * p.dv_pad, A(0));
    std::fill(w.state.begin(), w.state.end(), OnlineSoftmax<A>{});
    for (int64_t kb = 0; kb < p.k_end(qb); ++kb) {
      const Tile t = p.tile(qb, kb);
      tile_scores(p, t, panels, w.q.data(), w.s.data());
      forward_tile(p, t, bias, b, h, w.s.data(), w.state.data(), w.acc.data(), panels.v);
    }
    for (int64_t r = 0; r < rows.rows; ++r) {
      cpu::store(out_rows(b, h, rows.q0 + r), w.acc.data() + r * p.dv_pad, w.state[r].inv_sum(), p.d.dv);
      lse_data[bh * p.d.nq + rows.q0 + r] = w.state[r].lse();
    }
  });
}

// --------------------------------------------------------------------- forward split along the keys

// The forward of a few query rows against many keys (decoding, a few queries attending to a long context),
// and of calls with too few (batch, head, query block) tasks to share among threads. The query rows of all
// heads that share a kv head form one set (group x Nq rows, so the group reads k and v once), cut into row
// blocks; the keys those rows see are cut into chunks. Each (row block, chunk) is a task that reads k and v
// where they lie, without packing a whole head, and keeps the chunk's running max, sum and unnormalised
// output per row; a second loop merges each row's chunks in chunk order (flash-decoding). The cuts depend
// on the shapes only, so the result does not depend on the thread count.

// Row blocks of fewer rows take their scores as dot products against k's rows in place (cpu::row_dots, one
// lane reduction per score). Larger ones take them from a gemm, which needs one side transposed: up to dqk
// rows, the gemm runs over the keys as its rows (k in place) against the block's queries transposed into whole
// vectors, and the score tile is transposed back, rows moves per key; beyond dqk rows, each key block is
// transposed for a gemm over the query rows, dqk moves per key. Dots pay from 8 rows on for the gemm's fill.
constexpr int64_t kDotRows = 8;
// Up to this many query rows per kv head (one row block) always take the key split.
constexpr int64_t kFewRows = kBlockQ;
// The chunks aim at this many tasks in all: enough for 32 threads twice over, fixed so that the cut does not
// follow the thread count. A chunk holds at least kMinChunkKeys keys, so that its partial output, merged
// once, stays small next to its products.
constexpr int64_t kSplitTasks = 64;
constexpr int64_t kMinChunkKeys = 256;
// Below this many (batch, head, query block) tasks the packed engine leaves threads idle on long keys.
constexpr int64_t kFewTasks = 16;

int64_t visible_keys(const AttentionDims& d, bool causal) { return causal ? std::min(d.nk, d.nq) : d.nk; }

// Whether the forward takes the key split rather than the packed engine. Measured on 2 threads, fp32, against
// the packed engine and torch's SDPA: with at most kFewRows query rows per kv head the packed engine packs
// every head of k and v for one query block, which costs as much as the attention when a key meets one query,
// and beyond 4 MiB per head it packs all heads into one call-wide buffer whose allocation and first touch cost
// 6x the attention (32 heads, 1 query x 8192 keys, D 128: 141 ms against SDPA's 22; 32 queries: 3x SDPA's
// time), where the split reads k and v in place, once per kv head (1.1-1.6x faster than SDPA there). 64 rows
// of 64 keys (D 40) run as fast either way. Past kFewRows rows, with fewer than kFewTasks tasks over at least
// two chunks of keys, the packed engine runs a single head of 200 queries x 8192 keys on 4 threads at most.
bool split_keys(const AttentionDims& d, bool causal) {
  // Empty calls stay with the packed engine, which returns before cutting anything (KeySplit divides by them).
  if (d.batch == 0 || d.heads == 0 || d.nq == 0 || d.nk == 0) return false;
  if (d.group() * d.nq <= kFewRows) return true;
  const int64_t tasks = d.batch * d.heads * ((d.nq + kBlockQ - 1) / kBlockQ);
  return tasks < kFewTasks && visible_keys(d, causal) >= 2 * kMinChunkKeys;
}

// The cuts of one call: row blocks of the group's query rows, and chunks of whole key blocks.
struct KeySplit {
  const Plan& p;
  int64_t rows, row_blocks, block_rows;  // rows: query rows per (batch, kv head), group x nq
  int64_t nk, bk, chunk_keys, chunks;    // nk: keys any row sees; bk: keys per score strip
  explicit KeySplit(const Plan& plan) : p(plan) {
    const AttentionDims& d = p.d;
    rows = d.group() * d.nq;
    row_blocks = (rows + kBlockQ - 1) / kBlockQ;
    block_rows = (rows + row_blocks - 1) / row_blocks;
    nk = visible_keys(d, p.causal);
    bk = std::min(flash::kMaxBlockK, cpu::round_up_lanes(nk, p.lanes));
    const int64_t wanted = (kSplitTasks + units() - 1) / units();
    const int64_t most = std::max<int64_t>(1, nk / kMinChunkKeys);
    chunk_keys = cpu::round_up_lanes((nk + std::min(wanted, most) - 1) / std::min(wanted, most), bk);
    chunks = (nk + chunk_keys - 1) / chunk_keys;
  }
  int64_t units() const { return p.d.batch * p.d.kv_heads * row_blocks; }

  struct RowBlock {
    int64_t b, hkv, x0, n;
  };
  RowBlock row_block(int64_t unit) const {
    const int64_t bkv = unit / row_blocks, x0 = unit % row_blocks * block_rows;
    return {bkv / p.d.kv_heads, bkv % p.d.kv_heads, x0, std::min(block_rows, rows - x0)};
  }
  // Head and query of row r of a block.
  std::pair<int64_t, int64_t> row(const RowBlock& rb, int64_t r) const {
    const int64_t x = rb.x0 + r;
    return {rb.hkv * p.d.group() + x / p.d.nq, x % p.d.nq};
  }
};

// One split task's buffers: its query rows (times scale), a score strip (and its transpose), a key block
// (converted, or transposed) and a value block (converted or padded), and the accumulators of an unmerged
// call.
template <typename A>
struct SplitScratch {
  std::vector<A> q, s, st, k, v, acc;
  std::vector<OnlineSoftmax<A>> state;
  explicit SplitScratch(const KeySplit& ks)
      : q(ks.p.dqk_pad * cpu::round_up_lanes(ks.block_rows, cpu::kHalfLanes<A>)),
        s(ks.block_rows * ks.bk),
        st(ks.bk * cpu::round_up_lanes(ks.block_rows, cpu::kHalfLanes<A>)),
        k(ks.bk * ks.p.dqk_pad),
        v(ks.bk * ks.p.dv_pad),
        acc(ks.block_rows * ks.p.dv_pad),
        state(ks.block_rows) {}
};

// How a row block of a call takes its scores (see kDotRows).
enum class ScoreKernel { kDots, kKeyRows, kQueryRows };
ScoreKernel score_kernel(const Plan& p, int64_t rows) {
  return rows < kDotRows ? ScoreKernel::kDots : rows <= p.d.dqk ? ScoreKernel::kKeyRows : ScoreKernel::kQueryRows;
}

// w.q = the block's query rows times scale: transposed ([dqk][rows rounded up to kHalfLanes], zero-padded)
// when the keys are the gemm's rows, else row-major ([rows][dqk_pad]). Returns the last query.
template <typename T, typename A>
int64_t split_queries(const KeySplit& ks, const Rows<const T>& q, const KeySplit::RowBlock& rb, A scale,
                      SplitScratch<A>& w) {
  const Plan& p = ks.p;
  const bool transposed = score_kernel(p, rb.n) == ScoreKernel::kKeyRows;
  const int64_t ld = cpu::round_up_lanes(rb.n, cpu::kHalfLanes<A>);
  if (transposed) std::fill(w.q.begin(), w.q.begin() + p.d.dqk * ld, A(0));
  int64_t last = 0;
  for (int64_t r = 0; r < rb.n; ++r) {
    const auto [h, i] = ks.row(rb, r);
    const T* x = q(rb.b, h, i);
    if (transposed)
      for (int64_t c = 0; c < p.d.dqk; ++c) w.q[c * ld + r] = scale * cpu::to_acc(x[c]);
    else
      pack_block(q, rb.b, h, i, 1, p.d.dqk, p.dqk_pad, scale, w.q.data() + r * p.dqk_pad);
    last = std::max(last, i);
  }
  return last;
}

// s[r][0:width] = scores of the block's rows against keys [j0, j0 + n) of kv head (b, hkv), the columns from
// n on to be masked; row stride bk. k is read in place when it is the accumulation type, else converted a
// block at a time.
template <typename T, typename A>
void split_scores(const KeySplit& ks, const Rows<const T>& k, int64_t b, int64_t hkv, int64_t rows, int64_t j0,
                  int64_t n, int64_t width, SplitScratch<A>& w) {
  const Plan& p = ks.p;
  const ScoreKernel kernel = score_kernel(p, rows);
  if (kernel == ScoreKernel::kQueryRows) {
    pack_panel(k, b, hkv, j0, n, p.d.dqk, width, w.k.data());
    cpu::gemm(rows, width, p.d.dqk, w.q.data(), p.dqk_pad, 1, w.k.data(), width, w.s.data(), ks.bk, false);
    return;
  }
  const A* keys = w.k.data();
  int64_t ld = p.dqk_pad;
  if constexpr (std::is_same_v<T, A>) {
    keys = k(b, hkv, j0);
    ld = k.s2;
  } else {
    pack_block(k, b, hkv, j0, n, p.d.dqk, p.dqk_pad, A(1), w.k.data());
  }
  if (kernel == ScoreKernel::kDots) {
    cpu::row_dots(rows, n, p.d.dqk, w.q.data(), p.dqk_pad, keys, ld, w.s.data(), ks.bk);
    return;
  }
  const int64_t cols = cpu::round_up_lanes(rows, cpu::kHalfLanes<A>);
  cpu::gemm(n, cols, p.d.dqk, keys, ld, 1, w.q.data(), cols, w.st.data(), cols, false);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) w.s[r * ks.bk + j] = w.st[j * cols + r];
}

// acc[r][0:dv_pad] += s[r][0:n] v[j0:j0 + n]: v's rows in place when they are the accumulation type and
// whole gemm panels wide, else converted and padded.
template <typename T, typename A>
void split_values(const KeySplit& ks, const Rows<const T>& v, int64_t b, int64_t hkv, int64_t rows, int64_t j0,
                  int64_t n, SplitScratch<A>& w, A* acc) {
  const Plan& p = ks.p;
  const A* values = w.v.data();
  int64_t ld = p.dv_pad;
  if (std::is_same_v<T, A> && p.d.dv == p.dv_pad) {
    values = reinterpret_cast<const A*>(v(b, hkv, j0));
    ld = v.s2;
  } else {
    pack_block(v, b, hkv, j0, n, p.d.dv, p.dv_pad, A(1), w.v.data());
  }
  cpu::gemm(rows, p.dv_pad, n, w.s.data(), ks.bk, 1, values, ld, acc, p.dv_pad, true);
}

template <typename T, typename A>
void forward_split(const Plan& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const std::optional<at::Tensor>& bias_t, A scale, const at::Tensor& out, const at::Tensor& lse) {
  const KeySplit ks(p);
  const Rows<const T> q_rows(q), k_rows(k), v_rows(v);
  const Rows<T> out_rows(out);
  const Strided<T> bias(bias_t);
  A* lse_data = lse.data_ptr<A>();
  const int64_t H = p.d.heads, units = ks.units(), tasks = units * ks.chunks, block = ks.block_rows;
  // With one chunk a task owns its rows and stores them; with more, each task leaves its chunk's state and
  // output in the partial buffers, merged below.
  const bool merge = ks.chunks > 1;
  at::Tensor partial = merge ? acc_buffer<A>(q, {tasks * block * p.dv_pad}) : at::Tensor();
  std::vector<OnlineSoftmax<A>> partial_state(merge ? tasks * block : 0);
  const auto store_row = [&](int64_t b, int64_t h, int64_t i, const A* acc, const OnlineSoftmax<A>& st) {
    cpu::store(out_rows(b, h, i), acc, st.inv_sum(), p.d.dv);
    lse_data[(b * H + h) * p.d.nq + i] = st.lse();
  };
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    SplitScratch<A> w(ks);
    for (int64_t task = begin; task < end; ++task) {
      const auto rb = ks.row_block(task / ks.chunks);
      const int64_t b = rb.b;
      const int64_t last_query = split_queries(ks, q_rows, rb, scale, w);
      const int64_t k_begin = task % ks.chunks * ks.chunk_keys;
      int64_t k_end = std::min(ks.nk, k_begin + ks.chunk_keys);
      if (p.causal) k_end = std::min(k_end, last_query + 1);
      A* acc = merge ? partial.data_ptr<A>() + task * block * p.dv_pad : w.acc.data();
      OnlineSoftmax<A>* state = merge ? partial_state.data() + task * block : w.state.data();
      std::fill(acc, acc + rb.n * p.dv_pad, A(0));
      std::fill(state, state + rb.n, OnlineSoftmax<A>{});
      for (int64_t j0 = k_begin; j0 < k_end; j0 += ks.bk) {
        const int64_t n = std::min(ks.bk, k_end - j0), width = cpu::round_up_lanes(n, p.lanes);
        split_scores(ks, k_rows, b, rb.hkv, rb.n, j0, n, width, w);
        for (int64_t r = 0; r < rb.n; ++r) {
          const auto [h, i] = ks.row(rb, r);
          A* sr = w.s.data() + r * ks.bk;
          const int64_t visible = p.causal ? std::clamp<int64_t>(i - j0 + 1, 0, n) : n;
          finish_scores(sr, visible, width, bias.row(b, h, i, j0), bias.s3);
          flash::fold_row(sr, width, state[r], acc + r * p.dv_pad, p.dv_pad);
        }
        split_values(ks, v_rows, b, rb.hkv, rb.n, j0, n, w, acc);
      }
      if (merge) continue;
      for (int64_t r = 0; r < rb.n; ++r) {
        const auto [h, i] = ks.row(rb, r);
        store_row(b, h, i, acc + r * p.dv_pad, state[r]);
      }
    }
  });
  if (!merge) return;
  // Each row's chunks in chunk order: the largest max (a NaN one sticks), then every chunk's sum and output
  // rescaled to it; an empty or fully masked chunk (max -inf) weighs 0.
  at::parallel_for(0, units, grain_for(units, ks.chunks * block * p.dv_pad), [&](int64_t begin, int64_t end) {
    std::vector<A> sum(p.dv_pad);
    for (int64_t unit = begin; unit < end; ++unit) {
      const auto rb = ks.row_block(unit);
      for (int64_t r = 0; r < rb.n; ++r) {
        const auto state = [&](int64_t c) { return partial_state[(unit * ks.chunks + c) * block + r]; };
        OnlineSoftmax<A> total;
        for (int64_t c = 0; c < ks.chunks; ++c)
          if (state(c).max > total.max || std::isnan(state(c).max)) total.max = state(c).max;
        std::fill(sum.begin(), sum.end(), A(0));
        for (int64_t c = 0; c < ks.chunks; ++c) {
          const OnlineSoftmax<A> st = state(c);
          const A weight = st.max == A(-INFINITY) ? A(0) : std::exp(st.max - total.max);
          total.sum += weight * st.sum;
          cpu::axpy(sum.data(), weight, partial.data_ptr<A>() + ((unit * ks.chunks + c) * block + r) * p.dv_pad,
                    p.dv_pad);
        }
        const auto [h, i] = ks.row(rb, r);
        store_row(rb.b, h, i, sum.data(), total);
      }
    }
  });
}

// The forward of attention and of attention_with_map beyond its strips: the key split or the packed engine.
template <typename T, typename A>
void forward(const Plan& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
             const std::optional<at::Tensor>& bias, A scale, const at::Tensor& out, const at::Tensor& lse) {
  if (split_keys(p.d, p.causal))
    forward_split<T, A>(p, q, k, v, bias, scale, out, lse);
  else
    forward_kernel<T, A>(p, q, k, v, bias, scale, out, lse);
}

std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const std::optional<at::Tensor>& bias, bool causal, double scale) {
  const AttentionDims d = check_attention("pykernels.attention", q, k, v, bias);
  at::Tensor out = at::empty({d.batch, d.heads, d.nq, d.dv}, q.options());
  at::Tensor lse = at::empty({d.batch, d.heads, d.nq}, q.options().dtype(attention_lse_dtype(q.scalar_type())));
  PK_DISPATCH_FLOATS(q.scalar_type(), "attention_cpu", [&] {
    using A = cpu::acc_t<scalar_t>;
    const Plan p(d, causal, cpu::kLanes<A>, cpu::kHalfLanes<A>);
    forward<scalar_t, A>(p, q, k, v, bias, static_cast<A>(scale), out, lse);
  });
  return {out, lse};
}

// ----------------------------------------------------------------------------- probabilities from the lse

// One task's buffers: its packed query block (times scale) and grad_out block, two score tiles, the
// correction terms of its query rows, and its dq accumulator.
template <typename A>
struct Scratch {
  std::vector<A> q, dout, s, x, corr, dq;
  explicit Scratch(const Plan& p)
      : q(kBlockQ * p.dqk_pad), dout(kBlockQ * p.dv_pad), s(kBlockQ * p.bk), x(kBlockQ * p.bk), corr(kBlockQ),
        dq(kBlockQ * p.dqk_pad) {}
};

// What the map and the backward passes share: the queries, the bias and the lse.
template <typename T, typename A>
struct Recompute {
  const Plan& p;
  Rows<const T> q;
  A scale;
  Strided<T> bias;
  const A* lse;  // [B*H][Nq]

  void load_queries(int64_t b, int64_t h, const Tile& t, A* dst) const {
    pack_block(q, b, h, t.q0, t.rows, p.d.dqk, p.dqk_pad, scale, dst);
  }

  // s[r][0:width] = P of tile t for head h of batch b; row stride bk.
  void probs(const Tile& t, const KvPanels<A>& kv, int64_t b, int64_t h, const A* q_block, A* s) const {
    const int64_t bh = b * p.d.heads + h;
    tile_scores(p, t, kv, q_block, s);
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

  // Scratch s = P and x = dS = P (dP - corr) of tile t, the grad policy providing dP; corr holds the
  // correction terms of the tile's query rows.
  template <typename Grad>
  void tile_grads(const Grad& grad, const Tile& t, const KvPanels<A>& kv, int64_t b, int64_t h, const A* corr,
                  Scratch<A>& w) const {
    probs(t, kv, b, h, w.q.data(), w.s.data());
    grad.fill(t, kv, b, h, w, w.x.data());
    for (int64_t r = 0; r < t.rows; ++r)
      cpu::softmax_grad(w.x.data() + r * p.bk, w.s.data() + r * p.bk, corr[r], t.width);
  }
};

// dP of attention: dO V^T, with delta = dO . O as correction.
template <typename T, typename A>
struct OutGrad {
  static constexpr bool kValues = true;
  const Plan& p;
  Rows<const T> dout, out;

  void load(int64_t b, int64_t h, const Tile& t, Scratch<A>& w) const {
    pack_block(dout, b, h, t.q0, t.rows, p.d.dv, p.dv_pad, A(1), w.dout.data());
  }
  void fill(const Tile& t, const KvPanels<A>& kv, int64_t, int64_t, const Scratch<A>& w, A* x) const {
    const A* panel = kv.vt + t.k0 / p.bk * p.d.dv * p.bk;
    cpu::gemm(t.rows, t.width, p.d.dv, w.dout.data(), p.dv_pad, 1, panel, p.bk, x, p.bk, false);
  }
  void correction(const Recompute<T, A>&, const KvPanels<A>&, int64_t b, int64_t h, int64_t qb, A* corr,
                  Scratch<A>& w) const {
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
  void fill(const Tile& t, const KvPanels<A>&, int64_t b, int64_t, const Scratch<A>&, A* x) const {
    put(t, b, x, false);
  }
  // x = G / H over tile t (zero past its keys), or x += G / H.
  void put(const Tile& t, int64_t b, A* x, bool add) const {
    for (int64_t r = 0; r < t.rows; ++r) {
      const T* g = grad.row(b, 0, t.q0 + r, t.k0);
      A* xr = x + r * p.bk;
      if (add) {
        for (int64_t j = 0; j < t.cols; ++j) xr[j] += inv_heads * cpu::to_acc(g[j * grad.s3]);
        continue;
      }
      for (int64_t j = 0; j < t.cols; ++j) xr[j] = inv_heads * cpu::to_acc(g[j * grad.s3]);
      std::fill(xr + t.cols, xr + t.width, A(0));
    }
  }
  void correction(const Recompute<T, A>& c, const KvPanels<A>& kv, int64_t b, int64_t h, int64_t qb, A* corr,
                  Scratch<A>& w) const {
    std::fill(corr, corr + p.tile(qb, 0).rows, A(0));
    for (int64_t kb = 0; kb < p.k_end(qb); ++kb) {
      const Tile t = p.tile(qb, kb);
      c.probs(t, kv, b, h, w.q.data(), w.s.data());
      fill(t, kv, b, h, w, w.x.data());
      for (int64_t r = 0; r < t.rows; ++r) corr[r] += cpu::dot(w.s.data() + r * p.bk, w.x.data() + r * p.bk, t.width);
    }
  }
};

// dP of attention and its map together, dO V^T + G / H, with dO . O + sum_j P G / H as correction: when
// both outputs get a gradient, one backward serves them.
template <typename T, typename A>
struct OutAndMapGrad {
  static constexpr bool kValues = true;
  OutGrad<T, A> out;
  MapGrad<T, A> map;

  void load(int64_t b, int64_t h, const Tile& t, Scratch<A>& w) const { out.load(b, h, t, w); }
  void fill(const Tile& t, const KvPanels<A>& kv, int64_t b, int64_t h, const Scratch<A>& w, A* x) const {
    out.fill(t, kv, b, h, w, x);
    map.put(t, b, x, true);
  }
  // The map's correction walks the keys with s and x as scratch; w.dout, loaded before, stays intact.
  void correction(const Recompute<T, A>& c, const KvPanels<A>& kv, int64_t b, int64_t h, int64_t qb, A* corr,
                  Scratch<A>& w) const {
    map.correction(c, kv, b, h, qb, corr, w);
    const Tile rows = out.p.tile(qb, 0);
    for (int64_t r = 0; r < rows.rows; ++r)
      corr[r] += cpu::dot(w.dout.data() + r * out.p.dv_pad, out.out(b, h, rows.q0 + r), out.p.d.dv);
  }
};

// ------------------------------------------------------------------------------------------- backward

// Where a backward writes: dq, dk, dv (null for the map) and the bias gradient (null when not asked).
template <typename T>
struct Grads {
  Rows<T> dq, dk;
  const Rows<T>* dv;
  T* dbias;
};

// Everything one query block of head h contributes to dq (stored), the bias gradient (stored) and, through
// dk_acc / dv_acc ([nk][dqk_pad] / [nk][dv_pad], or null), to dk and dv. corr receives the block's
// correction terms. The one-pass scheme calls it with whole-head accumulators; the two-pass scheme's dq pass
// with none.
template <typename T, typename A, typename Grad>
void query_block_grads(const Recompute<T, A>& c, const Grad& grad, const KvPanels<A>& kv, const Grads<T>& out,
                       int64_t b, int64_t h, int64_t qb, A* corr, A* dk_acc, A* dv_acc, Scratch<A>& w) {
  const Plan& p = c.p;
  const int64_t bh = b * p.d.heads + h;
  const Tile rows = p.tile(qb, 0);
  c.load_queries(b, h, rows, w.q.data());
  grad.load(b, h, rows, w);
  grad.correction(c, kv, b, h, qb, corr, w);
  std::fill(w.dq.begin(), w.dq.end(), A(0));
  for (int64_t kb = 0; kb < p.k_end(qb); ++kb) {
    const Tile t = p.tile(qb, kb);
    c.tile_grads(grad, t, kv, b, h, corr, w);
    cpu::gemm(t.rows, p.dqk_pad, t.cols, w.x.data(), p.bk, 1, kv.k + t.k0 * p.dqk_pad, p.dqk_pad, w.dq.data(),
              p.dqk_pad, true);
    if (out.dbias)
      for (int64_t r = 0; r < t.rows; ++r)
        cpu::store(out.dbias + (bh * p.d.nq + t.q0 + r) * p.d.nk + t.k0, w.x.data() + r * p.bk, A(1), t.cols);
    if (dv_acc)
      cpu::gemm(t.cols, p.dv_pad, t.rows, w.s.data(), 1, p.bk, w.dout.data(), p.dv_pad, dv_acc + t.k0 * p.dv_pad,
                p.dv_pad, true);
    if (dk_acc)
      cpu::gemm(t.cols, p.dqk_pad, t.rows, w.x.data(), 1, p.bk, w.q.data(), p.dqk_pad, dk_acc + t.k0 * p.dqk_pad,
                p.dqk_pad, true);
  }
  for (int64_t r = 0; r < rows.rows; ++r)
    cpu::store(out.dq(b, h, rows.q0 + r), w.dq.data() + r * p.dqk_pad, c.scale, p.d.dqk);
}

// Stores keys [k0, k0 + n) of kv head (b, hkv) from accumulators whose row 0 is key k0.
template <typename T, typename A>
void store_kv_grads(const Plan& p, const Grads<T>& out, int64_t b, int64_t hkv, int64_t k0, int64_t n,
                    const A* dk_acc, const A* dv_acc) {
  for (int64_t j = 0; j < n; ++j) {
    cpu::store(out.dk(b, hkv, k0 + j), dk_acc + j * p.dqk_pad, A(1), p.d.dqk);
    if (out.dv) cpu::store((*out.dv)(b, hkv, k0 + j), dv_acc + j * p.dv_pad, A(1), p.d.dv);
  }
}

// Tasks that each own a whole (batch, kv head) do the backward in one pass, with 5 tile products per tile
// (4 for the map) instead of the two-pass scheme's 7 (5), but only keep every thread busy when there are
// enough of them: taken while the threads stay at least 3/4 busy and a task's dk and dv accumulators
// are small.
template <typename A>
bool one_pass(const Plan& p) {
  constexpr int64_t kTaskAccumulatorBytes = int64_t(16) << 20;
  const int64_t units = p.d.batch * p.d.kv_heads, threads = at::get_num_threads();
  const int64_t rounds = (units + threads - 1) / threads;
  const int64_t bytes = p.d.nk * (p.dqk_pad + p.dv_pad) * int64_t(sizeof(A));
  return 4 * units >= 3 * threads * rounds && bytes <= kTaskAccumulatorBytes;
}

// One pass: a task per (b, kv head), accumulating dk and dv of the whole head over its query heads.
template <typename T, typename A, typename Grad>
void backward_one_pass(const Recompute<T, A>& c, const Grad& grad, KvSource<T, A>& kv, const Grads<T>& out,
                       const at::Tensor& like) {
  const Plan& p = c.p;
  const int64_t group = p.d.group();
  struct Task {
    Scratch<A> w;
    std::vector<A> dk, dv;
  };
  const auto make_scratch = [&] {
    return Task{Scratch<A>(p), std::vector<A>(p.d.nk * p.dqk_pad), std::vector<A>(out.dv ? p.d.nk * p.dv_pad : 0)};
  };
  for_each_task(kv, like, p.d.batch * p.d.kv_heads, true, make_scratch,
                [&](int64_t bkv, const auto& kv_panels, Task& task) {
    const int64_t b = bkv / p.d.kv_heads, hkv = bkv % p.d.kv_heads;
    const KvPanels<A> panels = kv_panels(bkv);
    std::fill(task.dk.begin(), task.dk.end(), A(0));
    std::fill(task.dv.begin(), task.dv.end(), A(0));
    for (int64_t h = hkv * group; h < (hkv + 1) * group; ++h)
      for (int64_t qb = 0; qb < p.q_blocks; ++qb)
        query_block_grads(c, grad, panels, out, b, h, qb, task.w.corr.data(), task.dk.data(),
                          out.dv ? task.dv.data() : nullptr, task.w);
    store_kv_grads(p, out, b, hkv, 0, p.d.nk, task.dk.data(), task.dv.data());
  });
}

// Two passes, for when there are too few (batch, kv head) pairs to keep the threads busy. The dq pass runs
// over (b, h, query block) and stores each row's correction term in corr ([B*H][Nq]) for the dk/dv pass,
// which runs over (b, kv head, key block) and sums over the query heads of the group, so every gradient row
// has one writer.
template <typename T, typename A, typename Grad>
void backward_two_pass(const Recompute<T, A>& c, const Grad& grad, KvSource<T, A>& kv, const Grads<T>& out,
                       const at::Tensor& like) {
  const Plan& p = c.p;
  const int64_t H = p.d.heads, group = p.d.group();
  at::Tensor corr_buffer = acc_buffer<A>(like, {p.d.batch * H * p.d.nq});
  A* corr = corr_buffer.data_ptr<A>();
  const auto make_scratch = [&] { return Scratch<A>(p); };
  for_each_task(kv, like, p.d.batch * H * p.q_blocks, true, make_scratch,
                [&](int64_t task, const auto& kv_panels, Scratch<A>& w) {
    const int64_t bh = task / p.q_blocks, b = bh / H, h = bh % H, qb = zigzag(task % p.q_blocks, p.q_blocks);
    query_block_grads(c, grad, kv_panels(p.kv_row(b, h)), out, b, h, qb, corr + bh * p.d.nq + qb * kBlockQ,
                      static_cast<A*>(nullptr), static_cast<A*>(nullptr), w);
  });

  struct Task {
    Scratch<A> w;
    std::vector<A> dk, dv;
  };
  const auto make_task = [&] {
    return Task{Scratch<A>(p), std::vector<A>(p.bk * p.dqk_pad), std::vector<A>(out.dv ? p.bk * p.dv_pad : 0)};
  };
  for_each_task(kv, like, p.d.batch * p.d.kv_heads * p.k_blocks, true, make_task,
                [&](int64_t task, const auto& kv_panels, Task& acc) {
    const int64_t bkv = task / p.k_blocks, b = bkv / p.d.kv_heads, hkv = bkv % p.d.kv_heads;
    const int64_t kb = zigzag(task % p.k_blocks, p.k_blocks);
    const KvPanels<A> panels = kv_panels(bkv);
    Scratch<A>& w = acc.w;
    std::fill(acc.dk.begin(), acc.dk.end(), A(0));
    std::fill(acc.dv.begin(), acc.dv.end(), A(0));
    for (int64_t h = hkv * group; h < (hkv + 1) * group; ++h)
      for (int64_t qb = p.q_begin(kb); qb < p.q_blocks; ++qb) {
        const Tile t = p.tile(qb, kb);
        c.load_queries(b, h, t, w.q.data());
        grad.load(b, h, t, w);
        c.tile_grads(grad, t, panels, b, h, corr + (b * H + h) * p.d.nq + t.q0, w);
        if (out.dv)
          cpu::gemm(t.cols, p.dv_pad, t.rows, w.s.data(), 1, p.bk, w.dout.data(), p.dv_pad, acc.dv.data(), p.dv_pad,
                    true);
        cpu::gemm(t.cols, p.dqk_pad, t.rows, w.x.data(), 1, p.bk, w.q.data(), p.dqk_pad, acc.dk.data(), p.dqk_pad,
                  true);
      }
    const Tile keys = p.tile(0, kb);
    store_kv_grads(p, out, b, hkv, keys.k0, keys.cols, acc.dk.data(), acc.dv.data());
  });
}

template <typename T, typename A, typename Grad>
void backward(const Recompute<T, A>& c, const Grad& grad, KvSource<T, A>& kv, const Grads<T>& out,
              const at::Tensor& like) {
  if (one_pass<A>(c.p))
    backward_one_pass(c, grad, kv, out, like);
  else
    backward_two_pass(c, grad, kv, out, like);
}

at::Tensor bias_grad_buffer(const at::Tensor& q, const AttentionDims& d, bool causal, bool bias_grad) {
  if (!bias_grad) return at::empty({0}, q.options());
  // Causal passes skip the tiles above the diagonal, whose gradient is 0.
  const std::array<int64_t, 4> shape{d.batch, d.heads, d.nq, d.nk};
  return causal ? at::zeros(shape, q.options()) : at::empty(shape, q.options());
}

// Gradients of the output, and of the head-mean map as well when grad_map is given (one backward for both).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> output_backward(
    const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& bias, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& grad_out,
    const at::Tensor* grad_map, bool causal, double scale, bool bias_grad) {
  const AttentionDims d = check_attention_backward(op, q, k, v, bias, out, lse, grad_out);
  if (grad_map) check_attention_map_backward(op, q, k, bias, lse, *grad_map);
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  at::Tensor dbias = bias_grad_buffer(q, d, causal, bias_grad);
  const at::Tensor lse_rows = lse.contiguous();
  PK_DISPATCH_FLOATS(q.scalar_type(), "attention_backward_cpu", [&] {
    using T = scalar_t;
    using A = cpu::acc_t<T>;
    const Plan p(d, causal, cpu::kLanes<A>, cpu::kHalfLanes<A>);
    KvSource<T, A> kv(p, k, v, kKt | kKRows | kVt);
    const Recompute<T, A> c{p, Rows<const T>(q), static_cast<A>(scale), Strided<T>(bias), lse_rows.data_ptr<A>()};
    const OutGrad<T, A> out_grad{p, Rows<const T>(grad_out), Rows<const T>(out)};
    const Rows<T> dv_rows(dv);
    const Grads<T> grads{Rows<T>(dq), Rows<T>(dk), &dv_rows, bias_grad ? dbias.data_ptr<T>() : nullptr};
    if (grad_map) {
      const MapGrad<T, A> map_grad{p, Strided<T>::map(*grad_map), A(1) / A(std::max<int64_t>(d.heads, 1))};
      backward(c, OutAndMapGrad<T, A>{out_grad, map_grad}, kv, grads, q);
    } else {
      backward(c, out_grad, kv, grads, q);
    }
  });
  return {dq, dk, dv, dbias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& bias,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& grad_out, bool causal, double scale,
    bool bias_grad) {
  return output_backward("pykernels.attention_backward", q, k, v, bias, out, lse, grad_out, nullptr, causal, scale,
                         bias_grad);
}

// ---------------------------------------------------------------------------------------- head-mean map

// Parallel over (b, query block): each tile of the map sums P over the heads in place.
template <typename T, typename A>
void map_kernel(const Recompute<T, A>& c, KvSource<T, A>& kv, const at::Tensor& like, T* map) {
  const Plan& p = c.p;
  const int64_t H = p.d.heads, tasks = p.d.batch * p.q_blocks;
  const A inv_heads = A(1) / A(std::max<int64_t>(H, 1));
  // A task reads every kv head of its batch, one after the other only when there is one key block; per-thread
  // panels then serve each head to the one task that needs it.
  const bool per_thread = p.q_blocks == 1 && p.k_blocks == 1;
  struct MapScratch {
    std::vector<A> q, s, acc;
  };
  const auto make_scratch = [&] {
    return MapScratch{std::vector<A>(H * kBlockQ * p.dqk_pad), std::vector<A>(kBlockQ * p.bk),
                      std::vector<A>(kBlockQ * p.bk)};
  };
  for_each_task(kv, like, tasks, per_thread, make_scratch, [&](int64_t task, const auto& kv_panels, MapScratch& w) {
    const int64_t b = task / p.q_blocks, qb = zigzag(task % p.q_blocks, p.q_blocks);
    for (int64_t h = 0; h < H; ++h) c.load_queries(b, h, p.tile(qb, 0), w.q.data() + h * kBlockQ * p.dqk_pad);
    for (int64_t kb = 0; kb < p.k_blocks; ++kb) {
      const Tile t = p.tile(qb, kb);
      std::fill(w.acc.begin(), w.acc.end(), A(0));
      for (int64_t h = 0; kb < p.k_end(qb) && h < H; ++h) {
        c.probs(t, kv_panels(p.kv_row(b, h)), b, h, w.q.data() + h * kBlockQ * p.dqk_pad, w.s.data());
        for (int64_t r = 0; r < t.rows; ++r) cpu::axpy(w.acc.data() + r * p.bk, A(1), w.s.data() + r * p.bk, t.width);
      }
      for (int64_t r = 0; r < t.rows; ++r)
        cpu::store(map + (b * p.d.nq + t.q0 + r) * p.d.nk + t.k0, w.acc.data() + r * p.bk, inv_heads, t.cols);
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
    KvSource<T, A> kv(p, k, k, kKt);
    const Recompute<T, A> c{p, Rows<const T>(q), static_cast<A>(scale), Strided<T>(bias), lse_rows.data_ptr<A>()};
    map_kernel(c, kv, q, map.data_ptr<T>());
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
    KvSource<T, A> kv(p, k, k, kKt | kKRows);
    const Recompute<T, A> c{p, Rows<const T>(q), static_cast<A>(scale), Strided<T>(bias), lse_rows.data_ptr<A>()};
    const MapGrad<T, A> grad{p, Strided<T>::map(grad_map), A(1) / A(std::max<int64_t>(d.heads, 1))};
    backward(c, grad, kv, Grads<T>{Rows<T>(dq), Rows<T>(dk), nullptr, bias_grad ? dbias.data_ptr<T>() : nullptr}, q);
  });
  return {dq, dk, dbias};
}

// ----------------------------------------------------------------------------------- attention with map

// Output and head-mean map in one pass: a task (b, query block) computes, head by head, the scores of its
// queries against every key they see as one strip of kBlockQ x Nk, takes the softmax over whole rows, and
// sums those probabilities into the map, instead of a second kernel recomputing q k^T from the lse (one
// tile product and one exponential per score fewer). The strips, scores and map, take kBlockQ x Nk values
// each per thread, so this path serves key counts up to kMaxStripBytes; longer ones go through the flash
// forward and the map kernel.
constexpr int64_t kMaxStripBytes = int64_t(4) << 20;

template <typename A>
bool strip_fits(const Plan& p) {
  return p.k_blocks >= 1 && kBlockQ * p.k_blocks * p.bk * int64_t(sizeof(A)) <= kMaxStripBytes;
}

template <typename T, typename A>
void forward_with_map_kernel(const Plan& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const std::optional<at::Tensor>& bias_t, A scale, const at::Tensor& out,
                             const at::Tensor& lse, T* map) {
  KvSource<T, A> kv(p, k, v, kKt | kVRows);
  const Rows<const T> q_rows(q);
  const Rows<T> out_rows(out);
  const Strided<T> bias(bias_t);
  A* lse_data = lse.data_ptr<A>();
  const int64_t H = p.d.heads, strip = p.k_blocks * p.bk;  // strip: row stride of the score and map strips
  const A inv_heads = A(1) / A(std::max<int64_t>(H, 1));
  struct Strips {
    std::vector<A> q, s, acc, inv_sum, map;
  };
  const auto make_scratch = [&] {
    return Strips{std::vector<A>(kBlockQ * p.dqk_pad), std::vector<A>(kBlockQ * strip),
                  std::vector<A>(kBlockQ * p.dv_pad), std::vector<A>(kBlockQ), std::vector<A>(kBlockQ * strip)};
  };
  // With one query block a task is the only reader of its heads, so per-thread panels serve them.
  for_each_task(kv, q, p.d.batch * p.q_blocks, p.q_blocks == 1, make_scratch,
                [&](int64_t task, const auto& kv_panels, Strips& w) {
    const int64_t b = task / p.q_blocks, qb = zigzag(task % p.q_blocks, p.q_blocks);
    const Tile rows = p.tile(qb, 0), last = p.tile(qb, p.k_end(qb) - 1);
    const int64_t width = last.k0 + last.width;  // strip columns holding scores; the rest stay out
    std::fill(w.map.begin(), w.map.end(), A(0));
    for (int64_t h = 0; h < H; ++h) {
      const KvPanels<A> kvh = kv_panels(p.kv_row(b, h));
      pack_block(q_rows, b, h, rows.q0, rows.rows, p.d.dqk, p.dqk_pad, scale, w.q.data());
      for (int64_t kb = 0; kb < p.k_end(qb); ++kb) {
        const Tile t = p.tile(qb, kb);
        cpu::gemm(t.rows, t.width, p.d.dqk, w.q.data(), p.dqk_pad, 1, kvh.kt + kb * p.d.dqk * p.bk, p.bk,
                  w.s.data() + t.k0, strip, false);
        for (int64_t r = 0; r < t.rows; ++r)
          finish_scores(w.s.data() + r * strip + t.k0, t.visible(r, p.causal), t.width,
                        bias.row(b, h, t.q0 + r, t.k0), bias.s3);
      }
      std::fill(w.acc.begin(), w.acc.end(), A(0));
      for (int64_t r = 0; r < rows.rows; ++r) {
        OnlineSoftmax<A> row_softmax;
        flash::fold_row(w.s.data() + r * strip, width, row_softmax, w.acc.data() + r * p.dv_pad, p.dv_pad);
        lse_data[(b * H + h) * p.d.nq + rows.q0 + r] = row_softmax.lse();
        w.inv_sum[r] = row_softmax.inv_sum();
      }
      for (int64_t kb = 0; kb < p.k_end(qb); ++kb) {
        const Tile t = p.tile(qb, kb);
        cpu::gemm(t.rows, p.dv_pad, t.cols, w.s.data() + t.k0, strip, 1, kvh.v + t.k0 * p.dv_pad, p.dv_pad,
                  w.acc.data(), p.dv_pad, true);
      }
      for (int64_t r = 0; r < rows.rows; ++r) {
        cpu::store(out_rows(b, h, rows.q0 + r), w.acc.data() + r * p.dv_pad, w.inv_sum[r], p.d.dv);
        cpu::axpy(w.map.data() + r * strip, w.inv_sum[r], w.s.data() + r * strip, width);
      }
    }
    for (int64_t r = 0; r < rows.rows; ++r)
      cpu::store(map + (b * p.d.nq + rows.q0 + r) * p.d.nk, w.map.data() + r * strip, inv_heads, p.d.nk);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_with_map_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                      const at::Tensor& v,
                                                                      const std::optional<at::Tensor>& bias,
                                                                      bool causal, double scale) {
  const AttentionDims d = check_attention("pykernels.attention_with_map", q, k, v, bias);
  at::Tensor out = at::empty({d.batch, d.heads, d.nq, d.dv}, q.options());
  at::Tensor lse = at::empty({d.batch, d.heads, d.nq}, q.options().dtype(attention_lse_dtype(q.scalar_type())));
  at::Tensor map = at::empty({d.batch, d.nq, d.nk}, q.options());
  PK_DISPATCH_FLOATS(q.scalar_type(), "attention_with_map_cpu", [&] {
    using T = scalar_t;
    using A = cpu::acc_t<T>;
    const Plan p(d, causal, cpu::kLanes<A>, cpu::kHalfLanes<A>);
    if (strip_fits<A>(p)) {
      forward_with_map_kernel<T, A>(p, q, k, v, bias, static_cast<A>(scale), out, lse, map.data_ptr<T>());
      return;
    }
    forward<T, A>(p, q, k, v, bias, static_cast<A>(scale), out, lse);
    KvSource<T, A> kv(p, k, k, kKt);
    const Recompute<T, A> c{p, Rows<const T>(q), static_cast<A>(scale), Strided<T>(bias), lse.data_ptr<A>()};
    map_kernel(c, kv, q, map.data_ptr<T>());
  });
  return {out, lse, map};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_with_map_backward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& bias,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& grad_out, const at::Tensor& grad_map, bool causal,
    double scale, bool bias_grad) {
  return output_backward("pykernels.attention_with_map_backward", q, k, v, bias, out, lse, grad_out, &grad_map,
                         causal, scale, bias_grad);
}

}  // namespace
}  // namespace pk

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("attention", &pk::attention_cpu);
  m.impl("attention_backward", &pk::attention_backward_cpu);
  m.impl("attention_map", &pk::attention_map_cpu);
  m.impl("attention_map_backward", &pk::attention_map_backward_cpu);
  m.impl("attention_with_map", &pk::attention_with_map_cpu);
  m.impl("attention_with_map_backward", &pk::attention_with_map_backward_cpu);
}
