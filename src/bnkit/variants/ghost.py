"""Ghost Batch Normalization (Hoffer, Hubara & Soudry 2017)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import kernels, stats
from .._layer_support import document_bn_arguments, fx_leaf_call
from ..engine import (
    call_spec,
    canonical_mask,
    canonical_view,
    check_mask,
    per_channel,
    refuse_one_valid,
    running_update,
    valid_count,
)
from ..family import specialize
from ..functional import batch_norm_core
from ..kernels import aten_graph
from ..layers import BatchNorm, bn_arguments
from ._common import is_int, no_training_trace

__all__ = [
    "GhostBatchNorm", "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d", "ghost_batch_norm",
    "masked_ghost_batch_norm",
]


def _ghost_axis(where: str, virtual_batch_size: int, input: Tensor, axis: int) -> int:
    """The non-negative feature axis, after checking the arguments both Ghost BN forms share."""
    if not is_int(virtual_batch_size) or virtual_batch_size <= 0:
        raise ValueError(f"{where}: virtual_batch_size must be a positive int, got {virtual_batch_size!r}")
    ndim = input.dim()
    if ndim < 2 or not -ndim <= axis < ndim or axis % ndim == 0:
        raise ValueError(
            f"{where}: Ghost BN splits the batch along dim 0, so it needs a feature axis other than 0 "
            f"(got axis={axis} for a {ndim}-D input)"
        )
    return axis % ndim


def ghost_batch_norm(
    input: Tensor, virtual_batch_size: int, weight: Tensor | None = None, bias: Tensor | None = None,
    eps: float = 1e-5, *, axis: int = 1, where: str = "ghost_batch_norm"
) -> tuple[Tensor, stats.Moments]:
    """Normalize contiguous chunks of ``virtual_batch_size`` samples (dim 0) with their own statistics.

    Returns the output and the exactly merged :class:`~bnkit.stats.Moments`
    of the whole batch (per feature, no graph), for the running averages.
    A final chunk smaller than ``virtual_batch_size`` is normalized on its
    own. The full chunks go through one call of the core, their chunk index
    being folded into the feature axis.
    """
    axis = _ghost_axis(where, virtual_batch_size, input, axis)
    n = input.shape[0]
    c = input.shape[axis]
    x3, restore = canonical_view(input, axis)
    if n == 0 or x3.numel() == 0:
        y = batch_norm_core(input, None, None, weight, bias, True, None, eps, axis=axis, where=where)
        zeros = torch.zeros(c, dtype=stats.accumulation_dtype(input.dtype), device=input.device)
        return y, stats.Moments(0, zeros, zeros.clone())
    if x3.numel() == c:  # the layers' own message, with the input's size (not the canonical view's)
        raise ValueError(f"{where}: Expected more than 1 value per channel when training, got input size {input.size()}")
    rows_per_sample = x3.shape[0] // n  # the batch dim is the outermost of the canonical view
    inner = x3.shape[2]
    v = min(virtual_batch_size, n)
    k = n // v
    rem = n - k * v
    rows = v * rows_per_sample
    if rem and rem * rows_per_sample * inner == 1:
        raise ValueError(
            f"{where}: the last virtual batch has a single value per channel ({n} samples split into "
            f"chunks of {virtual_batch_size}); choose a virtual_batch_size that leaves a larger remainder"
        )
    weight_c = per_channel(weight, c)
    bias_c = per_channel(bias, c)

    main = x3[: k * rows]
    if k == 1:
        y_main = batch_norm_core(main, None, None, weight_c, bias_c, True, None, eps, axis=1, where=where)
    else:
        # (k*rows, C, I) -> (rows, k*C, I): feature (j, c) = channel c of chunk j.
        xk = main.reshape(k, rows, c, inner).transpose(0, 1).reshape(rows, k * c, inner)
        yk = batch_norm_core(
            xk,
            None,
            None,
            None if weight_c is None else weight_c.repeat(k),
            None if bias_c is None else bias_c.repeat(k),
            True,
            None,
            eps,
            axis=1,
            where=where,
        )
        y_main = yk.reshape(rows, k, c, inner).transpose(0, 1).reshape(k * rows, c, inner)
    parts = [y_main]
    if rem:
        parts.append(
            batch_norm_core(x3[k * rows :], None, None, weight_c, bias_c, True, None, eps, axis=1, where=where)
        )
    y3 = torch.cat(parts, dim=0) if rem else y_main.contiguous()

    with torch.no_grad():
        chunk = stats.Moments.of(main.reshape(k, rows, c, inner), (1, 3))  # means/m2s: [k, C]
        counts = [rows * inner] * k
        means, m2s = chunk.mean, chunk.m2
        if rem:
            last = stats.Moments.of(x3[k * rows :], (0, 2))
            counts.append(rem * rows_per_sample * inner)
            means = torch.cat([means, last.mean.unsqueeze(0)])
            m2s = torch.cat([m2s, last.m2.unsqueeze(0)])
        merged = stats.merge_stacked(torch.tensor(counts, device=means.device), means, m2s)
        merged = stats.Moments(n * rows_per_sample * inner, merged.mean, merged.m2)
    return restore(y3), merged


def _single_valid_value(where: str, lo: int, hi: int) -> str:
    return (
        f"{where}: the virtual batch of samples {lo}..{hi - 1} has a single valid value per channel; "
        "choose another virtual_batch_size or mask"
    )


def masked_ghost_batch_norm(
    input: Tensor, mask: Tensor, virtual_batch_size: int, weight: Tensor | None = None, bias: Tensor | None = None,
    eps: float = 1e-5, *, axis: int = 1, where: str = "ghost_batch_norm"
) -> tuple[Tensor, stats.Moments]:
    """:func:`ghost_batch_norm` with a validity ``mask`` (bool, ``input``'s shape without the feature axis).

    Each virtual batch is normalized with the statistics of its own valid
    entries (a virtual batch with none gives ``bias``, as an all-padding
    batch); the returned moments merge the valid entries of all of them.
    """
    axis = _ghost_axis(where, virtual_batch_size, input, axis)
    check_mask(call_spec(where, axis), input, mask)
    c = input.shape[axis]
    acc = stats.accumulation_dtype(input.dtype)
    weight_c = per_channel(weight, c)
    bias_c = per_channel(bias, c)
    n = input.shape[0]
    v = max(1, min(virtual_batch_size, n))
    bounds = [(i, min(i + v, n)) for i in range(0, n, v)]
    views = []
    capturing = aten_graph.capturing()
    for lo, hi in bounds:  # every chunk checked before any is computed
        x3, restore = canonical_view(input[lo:hi], axis)
        m2 = canonical_mask(mask[lo:hi], x3)
        count = valid_count(m2, capturing)  # (a 0-d tensor while a graph is captured: no host synchronisation)
        if capturing:
            refuse_one_valid(count, _single_valid_value(where, lo, hi))
        elif count == 1:
            raise ValueError(_single_valid_value(where, lo, hi))
        views.append((x3, restore, m2, count))
    ys, counts, means, m2s = [], [], [], []
    for x3, restore, m2, count in views:
        y3, mean, var = kernels.masked_train_forward(x3, m2, weight_c, bias_c, eps, count)
        ys.append(restore(y3))
        counts.append(count)
        means.append(mean.to(acc))
        m2s.append(var.to(acc) * count)
    if not ys:  # an empty batch
        zeros = torch.zeros(c, dtype=acc, device=input.device)
        return batch_norm_core(input, None, None, weight, bias, True, None, eps, axis=axis, where=where), \
            stats.Moments(0, zeros, zeros.clone())
    y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=0)
    with torch.no_grad():
        counts_t = torch.stack(counts) if capturing else torch.tensor(counts, device=input.device)
        merged = stats.merge_stacked(counts_t, torch.stack(means), torch.stack(m2s))
    total = merged.count if capturing else sum(counts)
    if capturing and not input.is_cpu:  # (no assert there: a virtual batch of one valid entry writes no statistics)
        total = torch.where((counts_t == 1).any(), 0, total)
    return y, stats.Moments(total, merged.mean, merged.m2)


@document_bn_arguments
class GhostBatchNorm(BatchNorm):
    r"""Ghost Batch Normalization (Hoffer, Hubara & Soudry 2017).

    Training splits the batch (dim 0) into contiguous virtual batches of
    ``virtual_batch_size`` samples (the last may be smaller) and normalizes
    each with its own mean and biased variance:

        y[j] = (x[j] - mu_j) / sqrt(var_j + eps) * gamma + beta   (chunk j)

    The running statistics are updated once per call, from the statistics of
    the whole batch obtained by exactly merging the chunks' moments (Chan's
    formula, `bnkit.stats.merge_stacked`; unbiased variance of the whole
    batch, as BatchNorm). Eval uses the running statistics (or, with
    ``track_running_stats=False``, ghost batches again). With
    ``virtual_batch_size >= N`` it is exactly BatchNorm.

    Args:
        {BatchNorm: num_features}
        virtual_batch_size: the samples per virtual batch (a positive int,
            default 32).
        {BatchNorm: eps, momentum, affine, track_running_stats, device, dtype, bias, axis, share_affine, nonfinite}

    Shape:
        - Input: any rank with the batch on dim 0 and ``C`` features along
          ``axis``; `GhostBatchNorm1d`, `GhostBatchNorm2d` and
          `GhostBatchNorm3d` fix torch's ranks.
        - Output: the shape and memory format of the input.

    Example:
        >>> import torch, bnkit
        >>> bn = bnkit.GhostBatchNorm1d(4, virtual_batch_size=8)
        >>> x = torch.randn(32, 4)
        >>> y = bn(x)                                     # four virtual batches of 8
        >>> torch.allclose(y[:8].mean(0), torch.zeros(4), atol=1e-5)
        True
        >>> torch.allclose(bn.running_mean, 0.1 * x.mean(0), atol=1e-6)   # the whole batch's mean
        True
    """

    def __init__(
        self, num_features: int, virtual_batch_size: int = 32, eps: float = 1e-5, momentum: float | None = 0.1,
        affine: bool = True, track_running_stats: bool = True, device: Any = None, dtype: torch.dtype | None = None,
        *, bias: bool = True, axis: int = 1, share_affine: str = "none", nonfinite: str = "skip"
    ) -> None:
        if not is_int(virtual_batch_size) or virtual_batch_size <= 0:
            raise ValueError(
                f"{type(self).__name__}: virtual_batch_size must be a positive int, got {virtual_batch_size!r}"
            )
        if is_int(axis) and axis == 0:
            raise ValueError(f"{type(self).__name__}: the feature axis cannot be 0, the batch axis ghost batches split")
        self.virtual_batch_size = virtual_batch_size
        super().__init__(**bn_arguments(locals()))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        if type(input) is not Tensor and (traced := fx_leaf_call(self, input, mask)) is not None:
            return traced
        if not self.training and (self.running_mean is not None or self.running_var is not None):
            return super().forward(input, mask)  # the running statistics (one of them None: torch's error)
        no_training_trace(self, input)
        self.check_input(input)
        if input.dim() < 2 or self.axis % input.dim() == 0:
            raise ValueError(
                f"{self.describe()}: the feature axis {self.axis} is the batch axis of a {input.dim()}-D input"
            )
        if mask is not None:
            y, merged = masked_ghost_batch_norm(
                input, mask, self.virtual_batch_size, self.weight, self.bias, self.eps, axis=self.axis,
                where=self.describe(),
            )
        else:
            y, merged = ghost_batch_norm(
                input, self.virtual_batch_size, self.weight, self.bias, self.eps, axis=self.axis,
                where=self.describe(),
            )
        if self.training and self.track_running_stats:
            count = merged.count
            if isinstance(count, Tensor):  # a masked batch in a captured graph: the count stays a tensor
                # (an empty batch's variance is 0 there, not NaN, so that the tensor update counts it as eager does)
                var = merged.m2 / count.clamp_min(1)
            else:
                count, var = int(count), merged.variance(0)
            running_update(
                self.call_spec(), self.running_mean, self.running_var, self.num_batches_tracked, merged.mean, var,
                count,
            )
        return y



GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d = specialize(GhostBatchNorm)
