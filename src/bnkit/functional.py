"""The F-style and TF-style API.

``batch_norm`` has the signature and semantics of
``torch.nn.functional.batch_norm`` but is computed by bnkit's own kernels
(the math is in :mod:`bnkit.reference`). :func:`batch_norm_core` adds what
modules need beyond the F-style API: a feature axis, the cumulative average,
and the non-finite policy. Both enter the engine (:mod:`bnkit.engine`)
through its one door, as every layer does.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import stats
from .engine import (
    NONFINITE_POLICIES,
    CallSpec,
    _empty_output,
    batch_norm_module_call,
    cached_call_spec,
    call_spec,
    canonical_view,
    fold,
    masked_module_call,
)

__all__ = [
    "NONFINITE_POLICIES",
    "batch_norm",
    "batch_norm_core",
    "canonical_view",
    "fold",
    "moments",
    "normalize",
]


def _spec(where: str, axis: int, eps: float, momentum: float | None, nonfinite: str, min_rank: int = 0) -> CallSpec:
    if not torch.compiler.is_compiling():  # (dynamo traces through caches: build it there)
        try:
            return cached_call_spec(where, axis, 0, None, eps, momentum, nonfinite, min_rank)
        except TypeError:  # an unhashable argument: the spec is built for this call only
            pass
    return call_spec(where, axis, 0, None, eps, momentum, nonfinite, min_rank)


def batch_norm_core(
    input: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None = None,
    bias: Tensor | None = None, training: bool = False, momentum: float | None = 0.1, eps: float = 1e-5, *,
    axis: int = 1, num_batches_tracked: Tensor | None = None, nonfinite: str = "propagate",
    where: str = "batch_norm", mask: Tensor | None = None
) -> Tensor:
    """Batch normalization of ``input`` along feature ``axis``.

    Training (``training=True``) normalizes with the batch's mean and biased
    variance over all axes but ``axis`` and, when running buffers are given,
    updates them (``momentum=None``: cumulative average counted by
    ``num_batches_tracked``, which is incremented here). Otherwise the running
    statistics are used. ``nonfinite`` decides what a batch with NaN/Inf
    statistics does to the running buffers: ``"skip"`` (warn, leave them),
    ``"raise"`` (``FloatingPointError``), ``"propagate"`` (update, as torch).
    ``where`` names the caller in error messages. ``mask`` (bool,
    ``input``'s shape without ``axis``, True = valid): training statistics
    from the valid entries only (:func:`bnkit.engine.masked_module_call`).
    """
    spec = _spec(where, axis, eps, momentum, nonfinite)
    if mask is not None:
        return masked_module_call(
            spec, input, mask, weight, bias, running_mean, running_var, num_batches_tracked, training
        )
    return batch_norm_module_call(spec, input, weight, bias, running_mean, running_var, num_batches_tracked, training)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    mask: Tensor | None = None,
) -> Tensor:
    """Drop-in for ``torch.nn.functional.batch_norm`` (channels on dim 1), computed by bnkit.

    In training, normalizes with batch statistics and, if running buffers are
    given, updates them in place with ``running = (1-momentum)*running +
    momentum*batch`` (unbiased variance). In eval, uses the running buffers.

    ``mask`` (bool, the input's shape without dim 1, True = valid; e.g.
    ``(N, L)`` for ``(N, C, L)``): the training statistics are those of the
    valid entries (count per channel = number of True entries, unbiased
    running variance with ``n_valid - 1``); padded entries are normalized with
    them and influence nothing else; eval ignores it. See
    :func:`bnkit.engine.masked_module_call`.
    """
    if mask is not None:
        spec = _spec("batch_norm", 1, eps, momentum, "propagate", min_rank=2)
        return masked_module_call(spec, input, mask, weight, bias, running_mean, running_var, None, training)
    if isinstance(input, Tensor) and input.numel() == 0 and input.dtype.is_floating_point:
        return _empty_output(input, weight, bias)  # as torch, 1-D included
    spec = _spec("batch_norm", 1, eps, momentum, "propagate", min_rank=2)
    return batch_norm_module_call(spec, input, weight, bias, running_mean, running_var, None, training)


# --------------------------------------------------------------------------- TF-style API
def moments(
    x: Tensor, axes: int | Sequence[int], *, keepdims: bool = False, correction: int = 0
) -> tuple[Tensor, Tensor]:
    """``(mean, variance)`` of ``x`` over ``axes``, like ``tf.nn.moments``.

    Stable two-pass computation (see :mod:`bnkit.stats`); half-precision inputs
    are accumulated in float32 and the results returned in the input dtype.
    ``correction=1`` gives the unbiased variance.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"moments: expected a torch.Tensor, got {type(x).__name__}")
    m = stats.Moments.of(x, axes)
    mean, var = m.mean, m.variance(correction)
    if keepdims:
        dims = sorted(d % x.dim() for d in ([axes] if isinstance(axes, int) else axes))
        for d in dims:
            mean = mean.unsqueeze(d)
            var = var.unsqueeze(d)
    return mean.to(x.dtype), var.to(x.dtype)


def normalize(
    x: Tensor, mean: Tensor, variance: Tensor, offset: Tensor | None = None, scale: Tensor | None = None,
    variance_epsilon: float = 1e-3
) -> Tensor:
    """``(x - mean) / sqrt(variance + eps) * scale + offset`` with broadcasting, like ``tf.nn.batch_normalization``."""
    if variance_epsilon < 0:
        raise ValueError(f"normalize: variance_epsilon must be >= 0, got {variance_epsilon}")
    inv = torch.rsqrt(variance + variance_epsilon)
    if scale is not None:
        inv = inv * scale
    shift = -mean * inv
    if offset is not None:
        shift = shift + offset
    return x * inv.to(x.dtype) + shift.to(x.dtype)
