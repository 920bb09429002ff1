// Index math of 2-D neighbourhood attention with NATTEN's semantics, one axis at a time. Torch-free, so the
// CPU, CUDA and Triton engines share one definition of which keys a query sees.
//
// With dilation d an axis of `length` positions splits into d interleaved sub-axes, one per residue class
// r = p mod d (positions r, r + d, r + 2d, ...). A query only sees keys of its own class, and inside its
// sub-axis it sees `kernel` consecutive positions centred on it, shifted inwards (never wrapped) where the
// sub-axis ends. This is NATTEN's get_window_start / get_pb_start (natten_cpu_commons.h) restated on the
// sub-axis: their piecewise border cases are the clamp below, the sub-axes of the last length mod d classes
// being one position longer. Engines work in sub-axis coordinates ("sub positions") and map back with
// position(). Requires kernel odd and kernel * dilation <= length, so every sub-axis holds a whole window.
#pragma once
#include "common/pk_common.h"

namespace pk::neighborhood {

struct Axis {
  index_t length, kernel, dilation;

  PK_HOST_DEVICE index_t half() const { return kernel / 2; }
  // Sub positions of residue class r: the p < length with p mod dilation == r.
  PK_HOST_DEVICE index_t class_length(index_t r) const { return (length - r + dilation - 1) / dilation; }
  PK_HOST_DEVICE index_t position(index_t r, index_t sub) const { return r + sub * dilation; }

  // First sub position of the window of sub position i on a sub-axis of n positions.
  PK_HOST_DEVICE index_t window_start(index_t i, index_t n) const {
    const index_t s = i - half();
    return s < 0 ? 0 : (s > n - kernel ? n - kernel : s);
  }
  // The sub positions whose windows contain sub position j: [first_query, last_query]. Windows only move
  // when the centre does, so the set is a run; at the ends of the sub-axis the clamped windows pile up and
  // it holds more than `kernel` queries.
  PK_HOST_DEVICE index_t first_query(index_t j) const { return j < kernel ? 0 : j - half(); }
  PK_HOST_DEVICE index_t last_query(index_t j, index_t n) const { return j >= n - kernel ? n - 1 : j + half(); }

  // Index into the relative position bias (2 kernel - 1 entries along this axis) of key sub position j for
  // query sub position i: the offset counted in dilated steps, as NATTEN's pb_start + window offset.
  PK_HOST_DEVICE index_t bias_index(index_t i, index_t j) const { return j - i + kernel - 1; }
};

}  // namespace pk::neighborhood
