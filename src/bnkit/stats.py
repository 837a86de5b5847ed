"""Per-feature statistics: moments, exact merging, and running-average rules.

This module is the single home of the statistics every other part of bnkit
uses (kernels, layers, Ghost BN, SyncBN, PreciseBN).

Moments
    For the values ``x_1..x_n`` of one feature, ``mean = sum(x)/n`` and
    ``M2 = sum((x - mean)^2)``; the biased variance is ``M2/n`` and the
    unbiased one ``M2/(n-1)``. They are computed in two passes (mean first,
    then the centred sum of squares), which is stable where the one-pass
    ``E[x^2] - E[x]^2`` cancels catastrophically (e.g. float32 data with mean
    1e3 and std 0.1). Half-precision inputs are accumulated in float32.

Merging (Chan, Golub & LeVeque 1979)
    Two partial results ``(n_a, mean_a, M2_a)`` and ``(n_b, mean_b, M2_b)``
    combine exactly::

        n     = n_a + n_b
        delta = mean_b - mean_a
        mean  = mean_a + delta * n_b / n
        M2    = M2_a + M2_b + delta^2 * n_a * n_b / n

Running statistics (PyTorch's convention)
    ``running = (1 - momentum) * running + momentum * batch`` with the
    *unbiased* batch variance; with ``momentum=None`` the factor is
    ``1 / num_batches_tracked`` (a cumulative average). Keras writes the same
    rule with ``running = m * running + (1 - m) * batch``, so Keras' 0.99 is
    PyTorch's 0.01.
"""

from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import Tensor

from .errors import InputDtypeError

__all__ = [
    "Moments",
    "accumulation_dtype",
    "moments",
    "merge",
    "merge_stacked",
    "unbiased_variance",
    "running_average_factor",
    "update_running_stats",
    "momentum_from_keras",
    "momentum_to_keras",
]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics of ``dtype`` data are accumulated in (float32 for halves)."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    if not dtype.is_floating_point:
        raise InputDtypeError(f"batch statistics need a floating-point input, got {dtype}")
    return dtype


def _normalize_dims(ndim: int, dims: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(dims, int):
        dims = (dims,)
    out = []
    for d in dims:
        try:
            d = operator.index(d)
        except TypeError:
            raise TypeError(f"axes must be ints, got {d!r} in {dims!r}") from None
        if not -ndim <= d < ndim:
            raise ValueError(f"axis {d} is out of range for a {ndim}-D input")
        out.append(d % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"repeated axis in {tuple(dims)}")
    return tuple(sorted(out))


@dataclass(frozen=True)
class Moments:
    """Partial statistics of one or more features: sample count, mean and M2.

    ``count`` is a Python int (the same for every feature) or a tensor
    broadcastable against ``mean``.
    """

    count: int | Tensor
    mean: Tensor
    m2: Tensor

    @classmethod
    def of(cls, x: Tensor, dims: int | Sequence[int]) -> "Moments":
        """Two-pass moments of ``x`` over ``dims`` (kept dims are the features)."""
        dims_t = _normalize_dims(x.dim(), dims)
        acc = accumulation_dtype(x.dtype)
        count = 1
        for d in dims_t:
            count *= x.shape[d]
        if count == 0:
            shape = [s for i, s in enumerate(x.shape) if i not in dims_t]
            zeros = torch.zeros(shape, dtype=acc, device=x.device)
            return cls(0, zeros, zeros.clone())
        xa = x.to(acc)
        if not dims_t:  # over no axes: each value is its own mean (torch would read dim=() as every dim)
            return cls(1, xa, torch.zeros_like(xa))
        # Shifted data: subtracting one sample per feature first makes the sums
        # small, so the mean keeps its precision when |mean| >> std.
        shift = xa
        for d in dims_t:
            shift = shift.narrow(d, 0, 1)
        centred = xa - shift
        mean_c = _accurate_mean(centred, dims_t, count)
        m2 = (centred - mean_c).square().sum(dim=dims_t)
        mean = mean_c + shift
        return cls(count, mean.squeeze(dims_t), m2)

    @classmethod
    def per_feature(cls, x: Tensor, axis: int, mask: Tensor | None = None) -> "Moments":
        """Moments per feature along ``axis`` (``axis % x.dim()``) over every other dim; with ``mask`` (bool,
        ``x``'s shape without ``axis``) over the entries it marks valid only, as :meth:`of` gives them for
        those entries alone."""
        axis = axis % x.dim()
        if mask is not None:
            return cls.of(x.movedim(axis, -1)[mask], 0)
        return cls.of(x, [d for d in range(x.dim()) if d != axis])

    def variance(self, correction: int = 0) -> Tensor:
        """``M2 / (count - correction)``; NaN where that denominator is not positive."""
        denom = self.count - correction
        if isinstance(denom, Tensor):
            return torch.where(denom > 0, self.m2 / denom.clamp_min(1), torch.full_like(self.m2, float("nan")))
        if denom <= 0:
            return torch.full_like(self.m2, float("nan"))
        return self.m2 / denom

    def merge(self, other: "Moments") -> "Moments":
        return merge(self, other)


def _accurate_mean(c: Tensor, dims: tuple[int, ...], count: int) -> Tensor:
    """The mean of ``c`` over ``dims`` (kept), for float32 as accurate as ATen's CPU kernels, which sum in double.

    A float32 ``mean`` over several dims loses ~sqrt(n) ulps of the spread, which is all of a small mean's
    precision (spread 100, mean 1). Here the innermost reduced dim (the trailing reduced dims as one, where
    their strides merge) is summed in float32 (torch's cascaded sum is accurate along one dim) and the
    partial sums in float64, which costs on CPU what one ``mean(dims)``
    costs (benchmarks/README.md). MPS has no float64: the plain mean there.
    """
    if c.dtype != torch.float32 or c.device.type == "mps":
        return c.mean(dim=dims, keepdim=True)
    kept = [1 if d in dims else n for d, n in enumerate(c.shape)]
    start = c.dim()
    while start - 1 in dims:
        start -= 1
    if c.dim() - start > 1 and all(
        c.stride(d) == c.stride(d + 1) * c.shape[d + 1] for d in range(start, c.dim() - 1)
    ):
        # Reduced trailing dims (H, W over (0, 2, 3)) as one, a view in NCHW and channels_last alike: a float32
        # sum along a short dim (W = 28) is slow, one along H * W as fast and as accurate as the 3-D view's
        c = c.flatten(start)
        dims = tuple(d for d in dims if d < start) + (start,)
    longer = [d for d in dims if c.shape[d] > 1]  # (dims are sorted)
    inner = longer[-1] if longer else dims[-1]  # the innermost dim with more than one value
    partial = c.sum(dim=inner, keepdim=True)
    rest = tuple(d for d in dims if d != inner)
    total = partial.sum(dim=rest, keepdim=True, dtype=torch.float64) if rest else partial.double()
    return (total / count).to(c.dtype).view(kept)


def moments(x: Tensor, dims: int | Sequence[int], correction: int = 0) -> tuple[Tensor, Tensor]:
    """Stable ``(mean, variance)`` of ``x`` over ``dims``; ``correction=1`` gives the unbiased variance."""
    m = Moments.of(x, dims)
    return m.mean, m.variance(correction)


def merge(a: Moments, b: Moments) -> Moments:
    """Exact combination of two partial moments by Chan's formula (empty parts allowed)."""
    n_a, n_b = a.count, b.count
    n = n_a + n_b
    if isinstance(n, int):
        if n_b == 0:
            return a
        if n_a == 0:
            return b
        delta = b.mean - a.mean
        mean = a.mean + delta * (n_b / n)
        m2 = a.m2 + b.m2 + delta.square() * (n_a * n_b / n)
        return Moments(n, mean, m2)
    n_t = torch.as_tensor(n, dtype=a.mean.dtype, device=a.mean.device)
    na_t = torch.as_tensor(n_a, dtype=a.mean.dtype, device=a.mean.device)
    nb_t = torch.as_tensor(n_b, dtype=a.mean.dtype, device=a.mean.device)
    safe = n_t.clamp_min(1)
    delta = b.mean - a.mean
    mean = a.mean + delta * (nb_t / safe)
    m2 = a.m2 + b.m2 + delta.square() * (na_t * nb_t / safe)
    return Moments(n, mean, m2)


def merge_stacked(counts: Tensor, means: Tensor, m2s: Tensor) -> Moments:
    """Merge K partial moments stacked along dim 0 (``counts``: [K], ``means``/``m2s``: [K, ...]).

    Equivalent to folding :func:`merge` over the K parts, but vectorized: the
    global mean is the count-weighted mean, and
    ``M2 = sum_k M2_k + sum_k n_k (mean_k - mean)^2``. Parts with a zero count
    contribute nothing.
    """
    if counts.dim() != 1 or means.shape[0] != counts.shape[0] or m2s.shape != means.shape:
        raise ValueError("merge_stacked expects counts [K] and means/m2s of shape [K, ...]")
    w = counts.to(means.dtype).reshape((-1,) + (1,) * (means.dim() - 1))
    total = w.sum(dim=0)
    safe = total.clamp_min(1)
    mean = (w * means).sum(dim=0) / safe
    m2 = m2s.sum(dim=0) + (w * (means - mean).square()).sum(dim=0)
    n = counts.sum()
    return Moments(n, mean, m2)


def merge_all(parts: Iterable[Moments]) -> Moments:
    """Fold :func:`merge` over an iterable of partial moments."""
    result: Moments | None = None
    for p in parts:
        result = p if result is None else merge(result, p)
    if result is None:
        raise ValueError("merge_all needs at least one part")
    return result


def unbiased_variance(biased_var: Tensor, count: int) -> Tensor:
    """Bessel's correction ``var * n / (n - 1)`` (``n = 1`` leaves the value as is, like torch)."""
    if count > 1:
        return biased_var * (count / (count - 1))
    return biased_var


def running_average_factor(momentum: float | None, num_batches_tracked: int) -> float:
    """The weight of the new batch: ``momentum``, or ``1/num_batches_tracked`` when ``momentum`` is None."""
    if momentum is None:
        if num_batches_tracked <= 0:
            raise ValueError("a cumulative average (momentum=None) needs num_batches_tracked >= 1")
        return 1.0 / num_batches_tracked
    return float(momentum)


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    batch_mean: Tensor,
    batch_var: Tensor,
    count: int,
    factor: float | Tensor,
    valid: Tensor | None = None,
) -> None:
    """In place: ``running = (1 - factor) * running + factor * batch``.

    ``batch_var`` is the *biased* batch variance; the unbiased one enters the
    average. Nothing is written when ``count`` is zero (an empty batch has no
    statistics). ``valid`` (a boolean 0-d tensor) keeps the old values where
    it is False, without a host synchronisation.
    """
    if count == 0:
        return
    # The buffers must never join an autograd graph (this is a per-step hot path,
    # so detach instead of entering a no_grad context).
    new_mean = batch_mean.detach()
    new_var = unbiased_variance(batch_var.detach(), count)
    if new_mean.dtype != running_mean.dtype:
        new_mean = new_mean.to(running_mean.dtype)
    if new_var.dtype != running_var.dtype:
        new_var = new_var.to(running_var.dtype)
    if valid is None and not isinstance(factor, Tensor):
        try:
            torch._foreach_lerp_((running_mean, running_var), (new_mean, new_var), float(factor))
        except RuntimeError:
            # vmap over stacked per-model buffers: _foreach_lerp_ has no batching rule (it refuses before writing)
            running_mean.copy_(running_mean.lerp(new_mean, float(factor)))  # (lerp_ runs vmap's slow fallback)
            running_var.copy_(running_var.lerp(new_var, float(factor)))
        return
    if isinstance(factor, Tensor):
        factor = factor.to(running_mean.dtype)
    for running, new in ((running_mean, new_mean), (running_var, new_var)):
        updated = torch.lerp(running, new, factor)
        running.copy_(updated if valid is None else torch.where(valid, updated, running))


def _check_momentum_value(m: object) -> None:
    if isinstance(m, bool) or not isinstance(m, numbers.Real):
        raise TypeError(f"momentum must be a number in [0, 1], got {m!r}")
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {m}")


def momentum_from_keras(keras_momentum: float) -> float:
    """Keras' ``BatchNormalization(momentum=m)`` as a PyTorch momentum (``1 - m``)."""
    _check_momentum_value(keras_momentum)
    return 1.0 - keras_momentum


def momentum_to_keras(torch_momentum: float) -> float:
    """A PyTorch BN momentum as Keras' (``1 - m``): 0.01 becomes 0.99."""
    _check_momentum_value(torch_momentum)
    return 1.0 - torch_momentum
