"""The engine's views: a call's input as the kernels' canonical (outer, C, inner) view, its mask and per-channel parameters."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .kernels import transform_active

__all__ = ["canonical_mask", "canonical_view", "per_channel", "suggested_format"]

_CONTIGUOUS = torch.contiguous_format
# The order in which ATen's is_channels_last_strides_2d_s4 / _3d_s5 walk the dims (innermost first), and the format
_CL_ORDER = {4: ((1, 3, 2, 0), torch.channels_last), 5: ((1, 4, 3, 2, 0), torch.channels_last_3d)}


def suggested_format(t: Tensor) -> torch.memory_format:
    """ATen's ``t.suggest_memory_format()``: the layout torch's BN gives its results.

    (Python has only a private mirror, ``torch._prims_common.suggest_memory_format``, which the tests compare
    this with; bnkit does not depend on it.)

    Channels-last (3d) when the strides of a 4-D (5-D) tensor are ordered as
    that format's, dense or not; otherwise contiguous, as are the ambiguous
    cases ATen resolves to it.
    """
    entry = _CL_ORDER.get(t.dim())
    if entry is None:
        return _CONTIGUOUS
    order, fmt = entry
    sizes, strides = t.shape, t.stride()
    if strides[1] == 0:
        return _CONTIGUOUS
    low = 0
    for d in order:
        size, stride = sizes[d], strides[d]
        if size == 0 or stride < low or (d == 0 and low == strides[1]):
            return _CONTIGUOUS
        low = stride * size if size > 1 else stride
    return fmt


def canonical_view(x: Tensor, axis: int) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """``x`` as the kernels' contiguous ``(outer, C, inner)`` view, and the inverse map.

    No copy is made when ``x`` is contiguous, or when the feature axis is its
    innermost dense dimension (``torch.channels_last`` / ``channels_last_3d``
    and any channels-last layout): the latter becomes ``(N*H*W, C, 1)``, and
    the inverse restores the original memory format, so outputs and input
    gradients keep it. Another input (axis 1) is copied into its suggested
    format, as torch's BN allocates its results: a channels-last tensor that
    is not dense (a slice of one) stays channels-last.

    The inverse map goes through a flat view: the gradient reaching the
    kernels is then always in the canonical view's standard layout (one in
    another layout is copied), as the input's gradient must be; an
    ``(outer, C, inner)`` reshape could keep it as a strided view, which the
    kernels' elementwise ops would follow. A contiguous input gets the
    standard strides in its output, also on size-1 dims it had others on.
    """
    shape = x.shape
    channels = shape[axis]  # (an axis out of range: IndexError here)
    if axis < 0:  # counted from the end, as the layers take it
        axis += len(shape)
    if x.is_contiguous():
        outer = math.prod(shape[:axis])
        inner = math.prod(shape[axis + 1 :])
        if (inner == 1 or channels == 1) and axis == 1 and len(shape) in (4, 5):
            fmt = suggested_format(x)
            if fmt is not _CONTIGUOUS:  # both contiguous and channels-last: torch's layouts depend on the gradient's
                return _ambiguous_view(x, (outer, channels, inner), fmt)
        return x.view(outer, channels, inner), lambda y3: y3.reshape(-1).view(shape)
    moved = x.movedim(axis, -1)
    if not moved.is_contiguous():
        fmt = suggested_format(x) if axis == 1 else _CONTIGUOUS
        if fmt is _CONTIGUOUS:
            outer = math.prod(shape[:axis])
            inner = math.prod(shape[axis + 1 :])
            return x.contiguous().view(outer, channels, inner), lambda y3: y3.reshape(-1).view(shape)
        moved = x.contiguous(memory_format=fmt).movedim(1, -1)
    moved_shape = moved.shape
    return moved.view(-1, channels, 1), lambda y3: y3.reshape(-1).view(moved_shape).movedim(-1, axis)


class _GradNote:
    """What the output's gradient says about the input gradient's layout (read by :class:`_AmbiguousInput`)."""

    __slots__ = ("fmt", "standard")

    def __init__(self, fmt: torch.memory_format) -> None:
        self.fmt = fmt
        self.standard = False  # torch's answer for a standard-layout gradient: the input's suggested format

    def __call__(self, grad: Tensor | None) -> None:
        if grad is None:  # an undefined gradient (autograd.grad's allow_unused paths, gradcheck): the default
            self.standard = False
            return
        # ATen's batch_norm_backward_cpu_template: an input and a gradient both dense in one suggested format take
        # its contiguous kernel, which allocates the input gradient contiguous (the input is); otherwise the
        # input's suggested format
        self.standard = (grad.is_contiguous() or grad.is_contiguous(memory_format=self.fmt)) and (
            suggested_format(grad) is self.fmt
        )


class _AmbiguousInput(torch.autograd.Function):
    """The canonical view of an input that is both contiguous and channels-last, the input gradient in torch's layout.

    Its forward is a view; its backward makes the (standard) gradient view
    either contiguous or channels-last, as the note of the output's gradient
    says: the memory order of both is the same for such a shape.
    """

    @staticmethod
    def forward(ctx, x: Tensor, shape3: tuple[int, int, int], note: _GradNote) -> Tensor:
        ctx.shape, ctx.note = x.shape, note
        return x.view(-1).view(shape3)

    @staticmethod
    def backward(ctx, grad3: Tensor):
        flat = grad3.reshape(-1)
        if ctx.note.standard:
            return flat.view(ctx.shape), None, None
        shape = ctx.shape
        return flat.view(shape[0], *shape[2:], shape[1]).movedim(-1, 1), None, None


def _ambiguous_view(
    x: Tensor, shape3: tuple[int, int, int], fmt: torch.memory_format
) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """:func:`canonical_view` of a contiguous input torch takes for channels-last (C=1 or every spatial size 1).

    torch's output is contiguous; its input gradient is channels-last, but
    contiguous where the output's gradient is dense channels-last too. Where
    no gradient is recorded, or the call is traced or transformed (no hook or
    ``autograd.Function`` there), the view through the channels-last order
    gives the common answer: a channels-last gradient.
    """
    shape = x.shape
    if (
        x.requires_grad
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not transform_active()
    ):
        note = _GradNote(fmt)

        def restore(y3: Tensor) -> Tensor:
            y = y3.reshape(-1).view(shape)
            if y.requires_grad:
                y.register_hook(note)
            return y

        return _AmbiguousInput.apply(x, shape3, note), restore
    return x.movedim(1, -1).reshape(shape3), lambda y3: y3.reshape(-1).view(shape)


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
