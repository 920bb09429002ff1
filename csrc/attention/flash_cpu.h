// FlashAttention building blocks of the CPU engines (dense and windowed attention): tile sizes, row
// access through strides, and the online-softmax update of one row of a score tile.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>

#include "common/cpu_vec.h"
#include "common/online_softmax.h"

namespace pk::flash {

constexpr int64_t kBlockQ = 64;
constexpr int64_t kMaxBlockK = 128;

// Row [b, h, i, :] of a 4-D tensor with a contiguous last dimension.
template <typename P>
struct Rows {
  P* data;
  int64_t s0, s1, s2;
  explicit Rows(const at::Tensor& t)
      : data(static_cast<P*>(t.data_ptr())), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)) {}
  P* operator()(int64_t b, int64_t h, int64_t i) const { return data + b * s0 + h * s1 + i * s2; }
};

// Queries [q0, q0 + rows) x keys [k0, k0 + cols); width is cols rounded up to whole vectors.
struct Tile {
  int64_t q0, rows, k0, cols, width;
  // Keys of the tile that query q0 + r sees: causal hides key j > i.
  int64_t visible(int64_t r, bool causal) const {
    return causal ? std::clamp<int64_t>(q0 + r - k0 + 1, 0, cols) : cols;
  }
};

// Equal blocks of at most kMaxBlockK keys, whole vectors each: 77 keys make one tile of 80, not 64 + 13.
inline int64_t key_block(int64_t nk, int64_t lanes) {
  const int64_t blocks = std::max<int64_t>(1, (nk + kMaxBlockK - 1) / kMaxBlockK);
  return std::max(lanes, cpu::round_up_lanes((nk + blocks - 1) / blocks, lanes));
}

// Task order within one head: first, last, second, second-to-last block... so that a static split of
// causal work (whose cost grows or shrinks along the blocks) gives every thread a balanced share.
inline int64_t zigzag(int64_t t, int64_t n) { return t % 2 == 0 ? t / 2 : n - 1 - t / 2; }

template <typename A>
at::Tensor acc_buffer(const at::Tensor& like, at::IntArrayRef sizes) {
  return at::empty(sizes, like.options().dtype(c10::CppTypeToScalarType<A>::value));
}

// Folds one row of scores s[0:width] (masked entries -inf) into its running softmax: rescales the row's
// output accumulator acc[0:acc_width] when the max grows and leaves exp(s - max) in s, or zeros when the
// row has seen no finite score yet. A NaN score makes the row NaN, as in torch.softmax: with a finite or
// +inf max, exp(NaN - max) carries it into the sum and the output; the max scan skips NaN, so a tile that
// looks fully masked is checked for NaN, off the hot path.
template <typename A>
inline void fold_row(A* s, int64_t width, OnlineSoftmax<A>& st, A* acc, int64_t acc_width) {
  const A max = std::max(st.max, cpu::max_lanes(s, width));
  if (max == A(-INFINITY)) {
    const bool nan = std::any_of(s, s + width, [](A x) { return x != x; });
    if (nan) st.sum = A(NAN);
    std::fill(s, s + width, nan ? A(NAN) : A(0));
    return;
  }
  if (max > st.max) {
    const A rescale = std::exp(st.max - max);
    st.sum *= rescale;
    cpu::scale(acc, rescale, acc_width);
    st.max = max;
  }
  st.sum += cpu::exp_sum(s, max, width);
}

}  // namespace pk::flash
