// Streaming softmax state shared by graph attention and the dense attention engines, CPU and CUDA.
#pragma once
#include <cmath>
#include "common/pk_common.h"

namespace pk {

PK_HOST_DEVICE float fast_exp(float x) { return expf(x); }
PK_HOST_DEVICE double fast_exp(double x) { return exp(x); }
PK_HOST_DEVICE float fast_log(float x) { return logf(x); }
PK_HOST_DEVICE double fast_log(double x) { return log(x); }

// Running max and running sum of exp(score - max), in the accumulation type A (float for fp16/bf16/fp32
// inputs, double for fp64). A row that never sees a finite score keeps max = -inf and sum = 0, which
// inv_sum()/lse() turn into a zero output and lse = -inf instead of NaN. A NaN or +inf score makes the sum
// NaN (as torch.softmax's row is NaN then), and inv_sum()/lse() pass that NaN on rather than reading it as
// an empty row.
template <typename A>
struct OnlineSoftmax {
  A max = -INFINITY;
  A sum = 0;

  // Folds one score in. Returns the factor by which previously accumulated outputs must be
  // rescaled and writes the weight of the new score into *weight.
  PK_HOST_DEVICE A update(A score, A* weight) {
    if (score == A(-INFINITY)) {
      *weight = 0;
      return 1;
    }
    if (score > max) {
      const A rescale = fast_exp(max - score);
      // exp(score - max) with max = score: 1, except NaN for +inf (inf - inf), the reference's answer.
      *weight = score == A(INFINITY) ? A(NAN) : A(1);
      sum = sum * rescale + *weight;
      max = score;
      return rescale;
    }
    *weight = fast_exp(score - max);
    sum += *weight;
    return 1;
  }

  PK_HOST_DEVICE A inv_sum() const { return sum == A(0) ? A(0) : A(1) / sum; }
  PK_HOST_DEVICE A lse() const { return sum == A(0) ? A(-INFINITY) : max + fast_log(sum); }
};

// exp(score - lse) with the fully-masked row (lse = -inf) mapped to probability 0.
template <typename A>
PK_HOST_DEVICE A prob_from_lse(A score, A lse) {
  return lse == A(-INFINITY) ? A(0) : fast_exp(score - lse);
}

}  // namespace pk
