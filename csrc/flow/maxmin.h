// Math of the (max, min) products shared by the CPU and CUDA engines. Torch-free.
//
// Soft product at temperature t (x = a[i, k], y = b[k, j], h = hard product at [i, j]):
//   smin_k      = -t log(exp(-x / t) + exp(-y / t))
//   out         = t log sum_k exp(smin_k / t) = h + t log(sum),
//   sum         = sum_k term_k,  term_k = exp((smin_k - h) / t) = 1 / (e_x + e_y),
//   e_x         = exp((h - x) / t), e_y = exp((h - y) / t).
// Since h = max_k min(x, y), every term is <= 1 and the maximising k gives at least 1/2, so sum lies in
// [1/2, k]: no running maximum and no rescaling are needed while streaming over k, and each term costs two
// exponentials and a reciprocal (no logarithm). Gradients, with p_k = term_k / sum the softmax weight of k:
//   d out / d x = p_k * d smin_k / d x = p_k * e_x * term_k = e_x * term_k^2 / sum,   likewise for y.
#pragma once
#include "common/pk_common.h"

namespace pk::flow {

// Exponents are clamped at this value. A clamped term's true value is below exp(-clamp), negligible next to
// sum >= 1/2 in the type's precision; the clamp keeps e_x + e_y finite, so e_x * term never forms inf * 0.
template <typename A>
struct SoftExp {
  static constexpr A clamp = sizeof(A) == 8 ? A(700) : A(80);
};

// The exponent (h - x) / t, clamped; the caller supplies the exponential (vectorised on CPU, __expf on GPU).
// Written so that a NaN exponent stays NaN (NaN inputs must reach the output). x = h gives 0 even when h is
// infinite, where h - x would be NaN: a pair (+inf, +inf) then weighs like any maximising pair and the
// product is +inf, and a hard product of -inf gives -inf, as the reference's log-sum-exps do.
template <typename A>
PK_HOST_DEVICE A soft_exponent(A hard, A x, A inv_t) {
  const A e = hard == x ? A(0) : (hard - x) * inv_t;
  return SoftExp<A>::clamp < e ? SoftExp<A>::clamp : e;
}

// min with the tie going to a: the backward sends the gradient to a when a <= b.
template <typename A>
PK_HOST_DEVICE bool a_is_min(A a, A b) {
  return a <= b;
}

// Where the hard backward sends the gradient of out[i, j], given the pair at its arg-max k*: to a when
// a <= b, to b when a > b, and to both when the pair holds a NaN (as autograd of the broadcast formula does).
template <typename A>
PK_HOST_DEVICE bool grad_to_a(A a, A b) {
  return !(a > b);
}
template <typename A>
PK_HOST_DEVICE bool grad_to_b(A a, A b) {
  return !(a <= b);
}

}  // namespace pk::flow
