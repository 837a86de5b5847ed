"""Portable BN kernels written with plain torch tensor ops (any device).

All functions take the canonical 3-D view ``x3`` of shape ``(outer, C, inner)``
and reduce over dims (0, 2); the math is given once, in :mod:`bnkit.reference`.
Statistics and parameters are float32 for half-precision inputs.

Every function here is differentiable by autograd, which is what makes the
double backward of :mod:`bnkit.functional` work: the gradient of
:func:`backward` is taken through these same ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..stats import Moments, accumulation_dtype

__all__ = [
    "moments", "forward_train", "forward_eval", "backward", "backward_reduce", "backward_apply", "masked_moments",
    "masked_forward_train", "masked_backward_reduce", "masked_backward_apply",
]

_DIMS = (0, 2)


def _per_channel(t: Tensor) -> Tensor:
    return t.view(1, -1, 1)


def moments(x3: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``(mean, biased variance)`` of ``x3``, two-pass."""
    m = Moments.of(x3, _DIMS)
    return m.mean, m.variance(0)


def forward_train(
    x3: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y3, mean, biased_var)`` normalizing with the batch statistics."""
    mean, var = moments(x3)
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    # Centre before scaling: the folded x*scale - mean*scale cancels catastrophically
    # when |mean| >> std (float32 data around 1e3 with std 0.1 loses ~1e-3).
    centred = x3.to(scale.dtype) - _per_channel(mean)
    y3 = centred * _per_channel(scale)
    if bias is not None:
        y3 = y3 + _per_channel(bias.to(y3.dtype))
    return y3.to(x3.dtype), mean, var


def forward_eval(x3: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``y3 = x3 * scale[c] + shift[c]`` in the accumulation dtype, cast back to ``x3``'s dtype."""
    acc = accumulation_dtype(x3.dtype)
    y = torch.addcmul(_per_channel(shift.to(acc)), x3.to(acc), _per_channel(scale.to(acc)))
    return y.to(x3.dtype)


def backward(
    grad3: Tensor,
    x3: Tensor,
    weight: Tensor | None,
    eps: float,
    mean: Tensor | None = None,
    invstd: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx3, dweight, dbias)`` of the training forward: :func:`backward_reduce` then :func:`backward_apply`.

    ``mean``/``invstd`` saved by the forward may be passed to skip recomputing
    them; leave them out when the result must itself be differentiable with
    respect to ``x3`` (double backward), so that they are recomputed on the
    autograd graph.
    """
    acc = accumulation_dtype(x3.dtype)
    xa = x3.to(acc)
    g = grad3.to(acc)
    if mean is None or invstd is None:
        mean, var = moments(xa)
        invstd = torch.rsqrt(var + eps)
    xhat = (xa - _per_channel(mean)) * _per_channel(invstd)
    dbias, dweight = _reduce(g, xhat)
    count = x3.shape[0] * x3.shape[2]
    return _apply(g, xhat, x3, invstd, weight, dbias, dweight, count), dweight, dbias


def backward_reduce(grad3: Tensor, x3: Tensor, mean: Tensor, var: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The backward's reduce phase: per-channel ``(sum dy, sum dy * xhat)`` with the given statistics."""
    acc = accumulation_dtype(x3.dtype)
    invstd = torch.rsqrt(var.to(acc) + eps)
    xhat = (x3.to(acc) - _per_channel(mean.to(acc))) * _per_channel(invstd)
    return _reduce(grad3.to(acc), xhat)


def backward_apply(
    grad3: Tensor,
    x3: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    count: int,
    eps: float,
) -> Tensor:
    """The backward's apply phase: ``dx3`` from the (possibly all-reduced) sums over ``count`` values."""
    acc = accumulation_dtype(x3.dtype)
    invstd = torch.rsqrt(var.to(acc) + eps)
    xhat = (x3.to(acc) - _per_channel(mean.to(acc))) * _per_channel(invstd)
    return _apply(grad3.to(acc), xhat, x3, invstd, weight, sum_dy.to(acc), sum_dy_xhat.to(acc), count)


def _reduce(g: Tensor, xhat: Tensor) -> tuple[Tensor, Tensor]:
    return g.sum(dim=_DIMS), (g * xhat).sum(dim=_DIMS)


def _apply(g, xhat, x3, invstd, weight, sum_dy, sum_dy_xhat, count: int) -> Tensor:
    # dx = w * invstd * (dy - sum(dy) / N - xhat * sum(dy * xhat) / N)
    if count == 0 or x3.numel() == 0:
        return torch.zeros_like(x3)
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    dx = _per_channel(scale) * (g - _per_channel(sum_dy / count) - xhat * _per_channel(sum_dy_xhat / count))
    return dx.to(x3.dtype)


# --------------------------------------------------------------------------- masked phases
# ``m2`` is a bool ``(outer, inner)`` mask of the canonical view (True = valid);
# statistics are over the valid entries only, ``count`` = their number. Padded
# entries are selected away (``where``), not multiplied by 0, so that NaN/Inf
# in the padding cannot reach the statistics.
def _valid(t: Tensor, m2: Tensor) -> Tensor:
    return torch.where(m2.unsqueeze(1), t, torch.zeros((), dtype=t.dtype, device=t.device))


def masked_moments(x3: Tensor, m2: Tensor, count: int | Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``(mean, biased variance)`` over the valid entries, two-pass (0 for ``count == 0``).

    ``count`` may be a 0-d integer tensor (a captured graph's valid count).
    """
    xa = x3.to(accumulation_dtype(x3.dtype))
    denom = count.clamp_min(1) if isinstance(count, Tensor) else max(count, 1)
    mean = _valid(xa, m2).sum(dim=_DIMS) / denom
    return mean, _valid(xa - _per_channel(mean), m2).square().sum(dim=_DIMS) / denom


def _fill(bias: Tensor | None, channels: int, acc: torch.dtype, device: torch.device) -> Tensor:
    """An all-padding batch's output per channel: ``bias`` (0 without), held constant."""
    return torch.zeros(channels, dtype=acc, device=device) if bias is None else bias.detach().to(acc)


def masked_forward_train(
    x3: Tensor, m2: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, count: int | Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Masked training BN as differentiable torch ops: ``(y3, mean, biased_var)``.

    Valid entries: BN over the valid entries. Padded entries: the same affine
    map with the statistics, weight and bias held constant, so their output
    gradients reach their own input only (``dx = dy * weight * invstd``). An
    all-padding batch (``count == 0``) gives ``bias`` (0 without) everywhere,
    zero statistics and a zero gradient. Autograd through these ops is the
    exact (double) backward.

    ``count`` may be a 0-d integer tensor (the valid count kept on the device,
    as in a captured graph, which cannot branch on it): the same arithmetic,
    the empty batch chosen by ``torch.where`` instead of a branch.
    """
    acc = accumulation_dtype(x3.dtype)
    xa = x3.to(acc)
    valid = m2.unsqueeze(1)
    empty = None
    if isinstance(count, Tensor):
        empty, count = count == 0, count.clamp_min(1)  # (an empty batch: sums of nothing over 1, i.e. 0)
    elif count == 0:
        zeros = torch.zeros(x3.shape[1], dtype=acc, device=x3.device)
        # where() keeps the graph (a zero gradient) without computing anything from the padding.
        y = torch.where(valid, xa, _per_channel(_fill(bias, x3.shape[1], acc, x3.device)))
        return y.to(x3.dtype), zeros, zeros.clone()
    mean = _valid(xa, m2).sum(dim=_DIMS) / count
    # The padding is selected away before it meets the statistics' graph: a NaN/Inf there times a zero
    # gradient would otherwise reach the gradients of the statistics, weight and every valid input.
    centred = _valid(xa - _per_channel(mean), m2)
    var = centred.square().sum(dim=_DIMS) / count
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(acc)
    y_valid = centred * _per_channel(scale)
    y_pad = (xa - _per_channel(mean.detach())) * _per_channel(scale.detach())
    if bias is not None:
        b = _per_channel(bias.to(acc))
        y_valid = y_valid + b
        y_pad = y_pad + b.detach()
    if empty is not None:  # every entry is padding: bias, held constant (no gradient to the input)
        y_pad = torch.where(empty, _per_channel(_fill(bias, x3.shape[1], acc, x3.device)), y_pad)
    y = torch.where(valid, y_valid, y_pad)
    return y.to(x3.dtype), mean.detach(), var.detach()


def masked_backward_reduce(
    grad3: Tensor, x3: Tensor, m2: Tensor, mean: Tensor, var: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Per-channel ``(sum dy, sum dy * xhat)`` over the valid entries."""
    acc = accumulation_dtype(x3.dtype)
    invstd = torch.rsqrt(var.to(acc) + eps)
    xhat = (x3.to(acc) - _per_channel(mean.to(acc))) * _per_channel(invstd)
    g = _valid(grad3.to(acc), m2)
    return g.sum(dim=_DIMS), _valid(g * xhat, m2).sum(dim=_DIMS)


def masked_backward_apply(
    grad3: Tensor, x3: Tensor, m2: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, sum_dy: Tensor,
    sum_dy_xhat: Tensor, count: int, eps: float
) -> Tensor:
    """``dx3``: valid entries as BN's backward from sums over ``count`` values, padded ones ``dy * scale``."""
    if count == 0:
        return torch.zeros_like(x3)
    acc = accumulation_dtype(x3.dtype)
    invstd = torch.rsqrt(var.to(acc) + eps)
    scale = invstd if weight is None else invstd * weight.to(acc)
    xhat = (x3.to(acc) - _per_channel(mean.to(acc))) * _per_channel(invstd)
    correction = _per_channel(sum_dy.to(acc) / count) + xhat * _per_channel(sum_dy_xhat.to(acc) / count)
    g = grad3.to(acc)
    dx = _per_channel(scale) * torch.where(m2.unsqueeze(1), g - correction, g)
    return dx.to(x3.dtype)
