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
// inv_sum()/lse() turn into a zero output and lse = -inf instead of NaN.
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
      sum = sum * rescale + 1;
      max = score;
      *weight = 1;
      return rescale;
    }
    *weight = fast_exp(score - max);
    sum += *weight;
    return 1;
  }

  PK_HOST_DEVICE A inv_sum() const { return sum > A(0) ? A(1) / sum : A(0); }
  PK_HOST_DEVICE A lse() const { return sum > A(0) ? max + fast_log(sum) : A(-INFINITY); }
};

// exp(score - lse) with the fully-masked row (lse = -inf) mapped to probability 0.
template <typename A>
PK_HOST_DEVICE A prob_from_lse(A score, A lse) {
  return lse == A(-INFINITY) ? A(0) : fast_exp(score - lse);
}

}  // namespace pk
