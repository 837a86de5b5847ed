"""The engine's views: a call's input as the kernels' canonical (outer, C, inner) view, its mask and per-channel parameters."""

from __future__ import annotations

import math
from typing import Callable

from torch import Tensor

__all__ = ["canonical_mask", "canonical_view", "per_channel"]


def canonical_view(x: Tensor, axis: int) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """``x`` as the kernels' contiguous ``(outer, C, inner)`` view, and the inverse map.

    No copy is made when ``x`` is contiguous, or when the feature axis is its
    innermost dense dimension (``torch.channels_last`` / ``channels_last_3d``
    and any channels-last layout): the latter becomes ``(N*H*W, C, 1)``, and
    the inverse restores the original memory format, so outputs and input
    gradients keep it.
    """
    shape = x.shape
    channels = shape[axis]  # (an axis out of range: IndexError here)
    if axis < 0:  # counted from the end, as the layers take it
        axis += len(shape)
    if x.is_contiguous():
        outer = math.prod(shape[:axis])
        inner = math.prod(shape[axis + 1 :])
        return x.view(outer, channels, inner), lambda y3: y3.view(shape)
    moved = x.movedim(axis, -1)
    if moved.is_contiguous():
        moved_shape = moved.shape
        return moved.view(-1, channels, 1), lambda y3: y3.view(moved_shape).movedim(len(moved_shape) - 1, axis)
    xc = x.contiguous()
    outer = math.prod(shape[:axis])
    inner = math.prod(shape[axis + 1 :])
    return xc.view(outer, channels, inner), lambda y3: y3.view(shape)


def per_channel(t: Tensor | None, channels: int) -> Tensor | None:
    """A ``[C]`` view of a per-channel or shared (one-element) parameter."""
    if t is None or (t.dim() == 1 and t.shape[0] == channels):
        return t
    t = t.reshape(-1)
    return t.expand(channels) if t.numel() == 1 and channels != 1 else t


def canonical_mask(mask: Tensor, x3: Tensor) -> Tensor:
    """``mask`` as the ``(outer, inner)`` bool mask of :func:`canonical_view`'s ``x3``.

    Both views list the non-feature positions in the input's own order (the
    channels-last view's rows too), so this is a reshape.
    """
    return mask.reshape(x3.shape[0], x3.shape[2])
