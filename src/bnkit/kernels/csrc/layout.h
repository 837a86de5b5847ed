// bnkit: how a layer's input maps to the kernels' contiguous (outer, C, inner)
// view without a copy where its memory allows (the C++ twin of
// functional.canonical_view).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/core/grad_mode.h>

namespace bnkit {

enum Layout : int64_t {
  kContiguous = 0, // a view: (prod(shape[:axis]), C, prod(shape[axis+1:]))
  kFeatureLast = 1, // channels-last-like: movedim(axis, -1) is contiguous; (rest, C, 1)
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
  return kCopied;
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
