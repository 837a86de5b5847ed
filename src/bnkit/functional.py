"""The F-style and TF-style API.

``batch_norm`` has the signature and semantics of
``torch.nn.functional.batch_norm`` but is computed by bnkit's own kernels
(the math is in :mod:`bnkit.reference`). :func:`batch_norm_core` adds what
modules need beyond the F-style API: a feature axis, the cumulative average,
and the non-finite policy. Both enter the engine (:mod:`bnkit.engine`)
through its one door, as every layer does.
"""

from __future__ import annotations

import numbers
from typing import Mapping, Sequence

import torch
from torch import Tensor

from . import kernels, stats
from ._engine_spec import cached_call_spec
from .engine import (
    NONFINITE_POLICIES,
    CallSpec,
    _check_param,
    _empty_output,
    batch_norm_module_call,
    call_spec,
    canonical_view,
    check_input,
    fold,
    masked_module_call,
    per_channel,
)
from .kernels import torch_ops

__all__ = [
    "NONFINITE_POLICIES",
    "batch_norm",
    "batch_norm_core",
    "batch_norm_step",
    "bn_state",
    "canonical_view",
    "fold",
    "load_bn_state",
    "moments",
    "normalize",
]


def _spec(where: str, axis: int, eps: float, momentum: float | None, nonfinite: str, min_rank: int = 0) -> CallSpec:
    # Cached for plain numbers only: dynamo traces through caches (built there), an unhashable argument cannot
    # be a key, and a tensor (torch takes a 0-d one) would be a key by identity that the cache keeps alive
    if type(eps) in _NUMBERS and type(momentum) in _NUMBERS and not torch.compiler.is_compiling():
        try:
            return cached_call_spec(where, axis, 0, None, eps, momentum, nonfinite, min_rank)
        except TypeError:  # (an unhashable axis or policy: the spec's own error, or built for this call only)
            pass
    return call_spec(where, axis, 0, None, eps, momentum, nonfinite, min_rank)


_NUMBERS = (float, int, type(None))


def _check_training(where: str, training: object) -> None:
    if not isinstance(training, bool):  # torch's argument parser takes a bool only
        raise TypeError(f"{where}: training must be a bool, not {type(training).__name__}")


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
    _check_training(where, training)
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
    _check_training("batch_norm", training)
    if mask is not None:
        spec = _spec("batch_norm", 1, eps, momentum, "propagate", min_rank=2)
        return masked_module_call(spec, input, mask, weight, bias, running_mean, running_var, None, training)
    if isinstance(input, Tensor) and input.numel() == 0 and input.dtype.is_floating_point:
        if training and isinstance(eps, (int, float)) and not eps > 0:
            raise ValueError(f"batch_norm: eps must be positive during training, got {eps}")
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
    if isinstance(variance_epsilon, bool) or not isinstance(variance_epsilon, numbers.Real):
        raise TypeError(f"normalize: variance_epsilon must be a float, got {variance_epsilon!r}")
    if variance_epsilon < 0:
        raise ValueError(f"normalize: variance_epsilon must be >= 0, got {variance_epsilon}")
    inv = torch.rsqrt(variance + variance_epsilon)
    if scale is not None:
        inv = inv * scale
    shift = -mean * inv
    if offset is not None:
        shift = shift + offset
    return x * inv.to(x.dtype) + shift.to(x.dtype)


# --------------------------------------------------------------------------- pure step
_STATE_KEYS = ("running_mean", "running_var", "num_batches_tracked")


def _step_state(state: Mapping[str, Tensor | None] | None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    if state is None:
        return None, None, None
    unknown = set(state) - set(_STATE_KEYS)
    if unknown:
        raise KeyError(f"batch_norm_step: unknown state keys {sorted(unknown)}; expected {list(_STATE_KEYS)}")
    return state.get("running_mean"), state.get("running_var"), state.get("num_batches_tracked")


def batch_norm_step(
    x: Tensor, params: Mapping[str, Tensor | None] | None, state: Mapping[str, Tensor | None] | None, *,
    training: bool, momentum: float | Tensor | None = 0.1, eps: float = 1e-5, axis: int = 1,
    nonfinite: str = "propagate"
) -> tuple[Tensor, dict[str, Tensor | None]]:
    r"""One BN call as a pure function: ``(y, new_state)``; nothing is mutated.

    The computation of a BN layer's forward, with the state passed in and out
    instead of updated in place, so it composes with ``torch.func`` transforms
    (``vmap`` over models or samples, ``grad``, ``jvp``), ``torch.compile``
    and CUDA graphs. Training (or no running statistics) normalizes with the
    batch's mean and biased variance over every axis but ``axis``::

        y = (x - mean_B) / sqrt(var_B + eps) * weight + bias
        running_mean' = (1 - f) * running_mean + f * mean_B
        running_var'  = (1 - f) * running_var  + f * var_B * n / (n - 1)
        num_batches_tracked' = num_batches_tracked + 1

    with ``f = momentum``, or ``f = 1 / num_batches_tracked'`` (cumulative
    average) when ``momentum`` is None; eval uses the running statistics and
    returns the state unchanged. The state's new tensors carry no gradient
    (running statistics are state, as in torch).

    Args:
        x: the input, features along ``axis``.
        params: ``{"weight": ..., "bias": ...}``; either may be None or absent
            (one shared value per tensor is accepted, as by the layers).
        state: ``{"running_mean", "running_var", "num_batches_tracked"}``
            (see :func:`bn_state`), or None / ``{}`` without running statistics.
        training: use (and fold into the state) the batch statistics.
        momentum: a float, a 0-d tensor (changes without recompiling), or None.
        eps: added to the variance.
        axis: the feature axis.
        nonfinite: ``"propagate"`` (default, as torch), ``"skip"`` or
            ``"raise"`` for a batch with NaN/Inf statistics (under transforms,
            ``torch.compile`` or a tensor momentum ``"raise"`` acts as
            ``"skip"``: no host synchronisation there).

    In eager mode on plain tensors it runs the layers' own route on copies of
    the state (so the results equal a layer's in-place update bit for bit);
    otherwise (transforms, ``torch.compile``, tensor momentum) plain
    differentiable torch ops without any ``.item()``.

    Shape: ``x``: any shape with the feature axis, ``C`` features; ``y``: as ``x``.

    Example::

        >>> bn = bnkit.BatchNorm2d(3)
        >>> y, new = batch_norm_step(x, {"weight": bn.weight, "bias": bn.bias}, bn_state(bn), training=True)
    """
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"batch_norm_step: nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    params = {} if params is None else params
    unknown = set(params) - {"weight", "bias"}
    if unknown:
        raise KeyError(f"batch_norm_step: unknown params keys {sorted(unknown)}; expected ['weight', 'bias']")
    weight, bias = params.get("weight"), params.get("bias")
    running_mean, running_var, nbt = _step_state(state)
    if (running_mean is None) != (running_var is None):
        raise ValueError("batch_norm_step: running_mean and running_var must both be given or both be None")
    if running_mean is not None and momentum is None and nbt is None:
        raise ValueError("batch_norm_step: momentum=None (cumulative average) needs num_batches_tracked")
    batch_stats = training or running_mean is None
    update = training and running_mean is not None
    tensor_momentum = isinstance(momentum, Tensor)
    if not (tensor_momentum or kernels.transform_active() or torch.compiler.is_compiling()):
        # The layers' route, on copies: the same kernels and the same update, bit for bit.
        copies = [None if t is None else t.clone() for t in (running_mean, running_var, nbt)] if update else [None] * 3
        spec = _spec("batch_norm_step", axis, eps, momentum, nonfinite)
        if update:
            y = batch_norm_module_call(spec, x, weight, bias, *copies, True)
        else:
            y = batch_norm_module_call(spec, x, weight, bias, running_mean, running_var, None, batch_stats)
        return y, _new_state(state, running_mean, running_var, nbt, copies if update else None)
    return _composite_step(x, weight, bias, running_mean, running_var, nbt, batch_stats, update, momentum, eps, axis,
                           nonfinite, state)


def _new_state(state, running_mean, running_var, nbt, new) -> dict[str, Tensor | None]:
    if state is None:
        return {}
    out = dict(state)
    if new is not None:
        for key, old, t in zip(_STATE_KEYS, (running_mean, running_var, nbt), new):
            if old is not None or key in out:
                out[key] = t
    return out


def _composite_step(x, weight, bias, running_mean, running_var, nbt, batch_stats, update, momentum, eps, axis,
                    nonfinite, state):
    """:func:`batch_norm_step` as plain torch ops (no custom Function, no host synchronisation)."""
    spec = call_spec("batch_norm_step", axis, 0, None, eps, None, nonfinite)
    check_input(spec, x)
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"batch_norm_step: expected a floating-point tensor input, got {getattr(x, 'dtype', type(x))}")
    ndim = x.dim()
    if ndim < 1 or not -ndim <= axis < ndim:
        raise ValueError(f"batch_norm_step: feature axis {axis} is out of range for a {ndim}-D input")
    axis = axis % ndim
    channels = x.shape[axis]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        _check_param(name, t, x, channels)
    if x.numel() == 0:
        new = None
        if update:
            new = (running_mean, running_var, None if nbt is None else nbt + 1)  # counted, as torch
        return _empty_output(x, weight, bias), _new_state(state, running_mean, running_var, nbt, new)
    weight_c, bias_c = per_channel(weight, channels), per_channel(bias, channels)
    x3, restore = canonical_view(x, axis)
    if not batch_stats:
        scale, shift = fold(running_mean, running_var, weight_c, bias_c, eps)
        return restore(torch_ops.forward_eval(x3, scale, shift)), _new_state(state, running_mean, running_var, nbt, None)
    if not eps > 0:
        raise ValueError(f"batch_norm_step: eps must be positive during training, got {eps}")
    count = x3.shape[0] * x3.shape[2]
    if count == 1:
        raise ValueError(
            f"batch_norm_step: Expected more than 1 value per channel when training, got input size {x.size()}"
        )
    y3, mean, var = torch_ops.forward_train(x3, weight_c, bias_c, eps)
    y = restore(y3)
    if not update:
        return y, _new_state(state, running_mean, running_var, nbt, None)
    mean = mean.detach().to(running_mean.dtype)
    var = stats.unbiased_variance(var.detach(), count).to(running_var.dtype)
    valid = torch.isfinite(var.amax()) if nonfinite != "propagate" else None
    new_nbt = None
    if nbt is not None:
        new_nbt = nbt + 1 if valid is None else nbt + valid.to(nbt.dtype)
    if momentum is None:
        factor = (1.0 / new_nbt.clamp_min(1).double()).to(running_mean.dtype)
    elif isinstance(momentum, Tensor):
        factor = momentum.to(running_mean.dtype)
    else:
        factor = float(momentum)
    new_mean = torch.lerp(running_mean, mean, factor)
    new_var = torch.lerp(running_var, var, factor)
    if valid is not None:
        new_mean = torch.where(valid, new_mean, running_mean)
        new_var = torch.where(valid, new_var, running_var)
    return y, _new_state(state, running_mean, running_var, nbt, (new_mean, new_var, new_nbt))


def bn_state(module: torch.nn.Module) -> dict[str, Tensor | None]:
    """A BN layer's running statistics as a :func:`batch_norm_step` state (the module's own tensors, not copies).

    ``{"running_mean", "running_var", "num_batches_tracked"}``; the values are
    None for a layer without running statistics.
    """
    return {key: getattr(module, key, None) for key in _STATE_KEYS}


@torch.no_grad()
def load_bn_state(module: torch.nn.Module, state: Mapping[str, Tensor | None]) -> None:
    """Write a :func:`batch_norm_step` state into a BN layer's buffers (in place; checked before anything changes)."""
    unknown = set(state) - set(_STATE_KEYS)
    if unknown:
        raise KeyError(f"load_bn_state: unknown state keys {sorted(unknown)}; expected {list(_STATE_KEYS)}")
    pairs = []
    for key in _STATE_KEYS:
        target, value = getattr(module, key, None), state.get(key)
        if target is None and value is None:
            continue
        if target is None or value is None:
            raise ValueError(
                f"load_bn_state: {key} is {'absent from the module' if target is None else 'missing from the state'}"
            )
        if not isinstance(value, Tensor) or value.shape != target.shape:
            raise ValueError(
                f"load_bn_state: {key} must be a tensor of shape {tuple(target.shape)}, "
                f"got {tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}"
            )
        pairs.append((target, value))
    for target, value in pairs:
        target.copy_(value)
