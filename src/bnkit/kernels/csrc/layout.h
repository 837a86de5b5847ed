// bnkit: how a layer's input maps to the kernels' contiguous (outer, C, inner)
// view without a copy where its memory allows (the C++ twin of
// functional.canonical_view).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/MemoryFormat.h>
#include <c10/util/strides.h>

namespace bnkit {

enum Layout : int64_t {
  kContiguous = 0, // a view: (prod(shape[:axis]), C, prod(shape[axis+1:]))
  kFeatureLast = 1, // channels-last-like: movedim(axis, -1) is contiguous (or, not dense, copied so); (rest, C, 1)
  kCopied = 2, // neither: a contiguous copy
};

// Whether t.movedim(axis, -1) is contiguous, read from the strides (as
// is_contiguous reads them: size-1 axes may have any stride), without making
// the moved view: a layer call on a small input costs a few microseconds per
// tensor op around its kernels.
inline bool feature_last_contiguous(const at::Tensor& t, int64_t axis) {
  const auto sizes = t.sizes();
  const auto strides = t.strides();
  if (t.numel() == 0) return true;
  if (sizes[axis] != 1 && strides[axis] != 1) return false;
  int64_t expected = sizes[axis];
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    if (d == axis || sizes[d] == 1) continue;
    if (strides[d] != expected) return false;
    expected *= sizes[d];
  }
  return true;
}

inline Layout layout_of(const at::Tensor& x, int64_t axis) {
  if (x.is_contiguous()) return kContiguous;
  if (feature_last_contiguous(x, axis)) return kFeatureLast;
  // Not dense in either order.  Torch's BN (feature axis 1, 4-D / 5-D) gives
  // such an input's output and gradient x's suggested format, channels-last
  // for a slice of channels-last memory: copied in that order, x then has the
  // feature-last layout (view3 copies it; empty_in_layout's Preserve gives a
  // non-dense x's suggested format).  Asked only here, off the dense paths.
  if (axis == 1) {
    const auto fmt = x.suggest_memory_format(); // contiguous for other ranks
    if (fmt == at::MemoryFormat::ChannelsLast || fmt == at::MemoryFormat::ChannelsLast3d) return kFeatureLast;
  }
  return kCopied;
}

// Whether x's sizes make it both contiguous and channels-last(_3d) for
// feature axis 1 (C = 1, or all spatial sizes 1): then the two orders are one
// memory order, only the strides of the size-1 axes tell the formats apart,
// and layout_of says kContiguous.  From the sizes alone: cheap on every call.
inline bool ambiguous_channels_last(const at::Tensor& x, int64_t axis) {
  const auto sizes = x.sizes();
  const size_t nd = sizes.size();
  if (axis != 1 || (nd != 4 && nd != 5)) return false;
  if (sizes[1] == 1) return true;
  for (size_t d = 2; d < nd; ++d)
    if (sizes[d] != 1) return false;
  return true;
}

inline bool dense_in_a_format(const at::Tensor& t) {
  return t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast) ||
      t.is_contiguous(at::MemoryFormat::ChannelsLast3d);
}

// The memory format of ATen's BN input gradient (batch_norm_backward_cpu_template)
// for an input x with ambiguous_channels_last sizes and the output gradient gy:
// the standard one on its fast path (x and gy dense, one suggested format; x
// is contiguous), else x's suggested format (channels-last when x's size-1
// axes have channels-last strides, as .to(memory_format=...) gives them).
inline at::MemoryFormat ambiguous_grad_format(const at::Tensor& x, const at::Tensor& gy) {
  const auto fx = x.suggest_memory_format();
  if (fx == at::MemoryFormat::Contiguous) return fx;
  return dense_in_a_format(gy) && gy.suggest_memory_format() == fx ? at::MemoryFormat::Contiguous : fx;
}

// The strides at::empty gives x's sizes in format fmt.
inline c10::DimVector strides_in_format(c10::IntArrayRef sizes, at::MemoryFormat fmt) {
  if (fmt == at::MemoryFormat::ChannelsLast) {
    const auto s = c10::get_channels_last_strides_2d(sizes);
    return c10::DimVector(s.begin(), s.end());
  }
  if (fmt == at::MemoryFormat::ChannelsLast3d) {
    const auto s = c10::get_channels_last_strides_3d(sizes);
    return c10::DimVector(s.begin(), s.end());
  }
  return c10::contiguous_strides(sizes);
}

// t (x's shape) as the 3-D view in x's layout; copies only when t's memory
// order differs.  Differentiable (plain ATen view ops) when grad mode is on.
inline at::Tensor view3(const at::Tensor& t, int64_t axis, Layout layout) {
  const auto sizes = t.sizes();
  const int64_t C = sizes[axis];
  if (layout == kFeatureLast) {
    // One view op where no graph is recorded (the moved view's chain is three; as_strided's backward is slow).
    if (!(at::GradMode::is_enabled() && t.requires_grad()) && feature_last_contiguous(t, axis))
      return t.as_strided({C == 0 ? 0 : t.numel() / C, C, 1}, {C, 1, 1});
    return t.movedim(axis, -1).contiguous().view({-1, C, 1});
  }
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < axis; ++d) outer *= sizes[d];
  for (int64_t d = axis + 1; d < static_cast<int64_t>(sizes.size()); ++d) inner *= sizes[d];
  return t.contiguous().view({outer, C, inner});
}

// A fresh tensor of x's shape whose memory is in x's layout order (so that
// view3 of it is a view, and the kernels can write into it).
inline at::Tensor empty_in_layout(const at::Tensor& x, Layout layout) {
  if (layout == kFeatureLast) return at::empty_like(x, at::MemoryFormat::Preserve); // dense: strides kept
  return at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
}

// The inverse of view3 for a 3-D result.
inline at::Tensor unview3(const at::Tensor& t3, const at::Tensor& like, int64_t axis, Layout layout) {
  if (layout == kFeatureLast) return t3.view(like.movedim(axis, -1).sizes()).movedim(-1, axis);
  return t3.view(like.sizes());
}

} // namespace bnkit
