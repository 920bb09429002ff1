// Entry checks for the C++ engines. The Python layer validates first with friendlier messages; these
// keep direct torch.ops.pykernels.* calls from ever reading out of bounds.
#pragma once
#include <ATen/ATen.h>

#define PK_CHECK_INDEX_TENSOR(op, name, t)                                                         \
  TORCH_CHECK((t).scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", (t).scalar_type()); \
  TORCH_CHECK((t).is_contiguous(), op, ": ", name, " must be contiguous")

#define PK_CHECK_FLOAT_TENSOR(op, name, t)                                                         \
  TORCH_CHECK(at::isFloatingType((t).scalar_type()), op, ": ", name, " must be a floating tensor, got ", \
              (t).scalar_type());                                                                  \
  TORCH_CHECK((t).is_contiguous(), op, ": ", name, " must be contiguous")

#define PK_CHECK_DIM(op, name, t, d) \
  TORCH_CHECK((t).dim() == (d), op, ": ", name, " must be ", d, "-D, got shape ", (t).sizes())

#define PK_CHECK_SAME_DEVICE(op, name, t, ref) \
  TORCH_CHECK((t).device() == (ref).device(), op, ": ", name, " is on ", (t).device(), ", expected ", (ref).device())

#define PK_DISPATCH_FLOATS(type, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, name, __VA_ARGS__)

namespace pk {

// Work per parallel_for chunk: enough that scheduling overhead is noise, small enough to balance
// power-law degree distributions across threads.
inline int64_t grain_for(int64_t items, int64_t work_per_item) {
  constexpr int64_t kTargetWork = 32768;
  const int64_t g = kTargetWork / std::max<int64_t>(work_per_item, 1);
  return std::max<int64_t>(1, std::min<int64_t>(g, std::max<int64_t>(items, 1)));
}

}  // namespace pk
