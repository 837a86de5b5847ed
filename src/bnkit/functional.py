"""The functional core: autograd functions and the public F-style API.

``batch_norm`` has the signature and semantics of
``torch.nn.functional.batch_norm`` but is computed by bnkit's own kernels
(the math is in :mod:`bnkit.reference`). Every layer of bnkit goes through
:func:`batch_norm_core`, which adds what modules need beyond the F-style
API: a feature axis, the cumulative average, and the non-finite policy.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import kernels, stats
from .kernels import torch_ops

__all__ = [
    "batch_norm",
    "batch_norm_core",
    "moments",
    "normalize",
    "fold",
    "canonical_view",
    "NONFINITE_POLICIES",
]

NONFINITE_POLICIES = ("skip", "raise", "propagate")


# --------------------------------------------------------------------------- views
def canonical_view(x: Tensor, axis: int) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """``x`` as the kernels' contiguous ``(outer, C, inner)`` view, and the inverse map.

    No copy is made when ``x`` is contiguous, or when the feature axis is its
    innermost dense dimension (``torch.channels_last`` / ``channels_last_3d``
    and any channels-last layout): the latter becomes ``(N*H*W, C, 1)``, and
    the inverse restores the original memory format, so outputs and input
    gradients keep it.
    """
    shape = x.shape
    channels = shape[axis]
    if x.is_contiguous():
        outer = math.prod(shape[:axis])
        inner = math.prod(shape[axis + 1 :])
        return x.view(outer, channels, inner), lambda y3: y3.view(shape)
    moved = x.movedim(axis, -1)
    if moved.is_contiguous():
        moved_shape = moved.shape
        return moved.view(-1, channels, 1), lambda y3: y3.view(moved_shape).movedim(-1, axis)
    xc = x.contiguous()
    outer = math.prod(shape[:axis])
    inner = math.prod(shape[axis + 1 :])
    return xc.view(outer, channels, inner), lambda y3: y3.view(shape)


# --------------------------------------------------------------------------- autograd
class _BatchNormTrain(torch.autograd.Function):
    """Training BN on the 3-D view with the analytic backward (torch/reference backends).

    Outputs ``(y3, mean, biased_var)``; the statistics are not differentiable
    (they feed the running averages only). The backward is computed by the
    raw kernels; when a graph of the backward is requested (double backward),
    it is computed by differentiable torch ops that recompute the statistics
    from the saved input, so the second derivative is exact.
    """

    @staticmethod
    def forward(ctx, x3: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, backend: str):
        y3, mean, var = kernels.raw(backend).forward_train(x3, weight, bias, eps)
        invstd = torch.rsqrt(var + eps)
        ctx.eps = eps
        ctx.backend = backend
        ctx.save_for_backward(x3, weight, bias, mean, invstd)
        ctx.mark_non_differentiable(mean, var)
        return y3, mean, var

    @staticmethod
    def backward(ctx, grad_y3: Tensor, _grad_mean: Tensor, _grad_var: Tensor):
        x3, weight, bias, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            dx, dw, db = torch_ops.backward(grad_y3, x3, weight, ctx.eps)
        else:
            dx, dw, db = kernels.raw(ctx.backend).backward(grad_y3, x3, weight, ctx.eps, mean, invstd)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        return (
            dx if need_x else None,
            dw.to(weight.dtype) if need_w else None,
            db.to(bias.dtype) if need_b else None,
            None,
            None,
        )


def _train_forward(x3: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    backend = kernels.select(x3)
    if backend == "cpp":
        return torch.ops.bnkit.batch_norm_train(x3, weight, bias, eps)
    return _BatchNormTrain.apply(x3, weight, bias, eps, backend)


def _eval_forward(
    x3: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    if kernels.select(x3) == "cpp":
        # The fold into (scale, shift) happens inside the fused op (one call).
        return torch.ops.bnkit.batch_norm_infer(x3, mean, var, weight, bias, eps)
    # The affine map is differentiable as torch ops on every backend.
    scale, shift = fold(mean, var, weight, bias, eps)
    return torch_ops.forward_eval(x3, scale, shift)


# --------------------------------------------------------------------------- checks
def _check_param(name: str, t: Tensor | None, x: Tensor, channels: int) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"batch_norm: {name} must be a Tensor or None, got {type(t).__name__}")
    if t.dtype != x.dtype and not (x.dtype in _HALF_DTYPES and t.dtype == torch.float32):
        raise TypeError(
            f"batch_norm: {name} has dtype {t.dtype} but the input has {x.dtype}; parameters and buffers "
            "must have the input's dtype (float16/bfloat16 inputs may also use float32 ones)"
        )
    if t.device != x.device:
        raise RuntimeError(
            f"batch_norm: {name} is on {t.device} but the input is on {x.device}; move them to one device"
        )
    if t.numel() != channels and not (t.numel() == 1 and name in ("weight", "bias")):
        raise ValueError(
            f"batch_norm: {name} should have {channels} elements (one per channel), got shape {tuple(t.shape)}"
        )


_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _per_channel(t: Tensor | None, channels: int) -> Tensor | None:
    """A ``[C]`` view of a per-channel or shared (one-element) parameter."""
    if t is None or (t.dim() == 1 and t.shape[0] == channels):
        return t
    t = t.reshape(-1)
    return t.expand(channels) if t.numel() == 1 and channels != 1 else t


def _reject_nonfinite(where: str, nonfinite: str, stacklevel: int = 5) -> None:
    """Raise (``"raise"``) or warn (``"skip"``) about a batch whose statistics are not finite."""
    message = f"{where}: the batch statistics are not finite (NaN/Inf in the input)"
    if nonfinite == "raise":
        raise FloatingPointError(message + "; the running statistics are unchanged (nonfinite='raise')")
    warnings.warn(message + "; the running statistics were left unchanged", RuntimeWarning, stacklevel=stacklevel)


def _update_running(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float | None,
    nonfinite: str,
    where: str,
) -> None:
    """Apply the running-average rule of :mod:`bnkit.stats` under the non-finite policy.

    A batch's statistics are finite exactly when its variance is: any NaN or
    Inf in the input (or an overflowing mean) makes the variance NaN, and the
    maximum propagates NaN without overflowing. The check is one reduction;
    in eager CPU mode it decides in Python (so "skip" can warn and "raise"
    can raise), elsewhere (accelerators,
    ``torch.compile``) a ``torch.where`` keeps the old values without a host
    synchronisation.
    """
    if count == 0:
        # An empty batch has no statistics; torch still counts it.
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return
    if momentum is None and num_batches_tracked is None:
        raise ValueError(f"{where}: momentum=None (cumulative average) needs num_batches_tracked")
    check = nonfinite != "propagate"
    tracing = torch.jit.is_tracing()
    if (
        mean.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not tracing
        and running_mean.is_contiguous()
        and running_var.is_contiguous()
        and kernels.select(mean) == "cpp"
    ):
        # Eager CPU with the C++ kernels: the finiteness check and both running
        # averages in one fused call (per-step overhead matters for small inputs).
        nbt = int(num_batches_tracked) + 1 if momentum is None else 0
        factor = stats.running_average_factor(momentum, nbt)
        if not torch.ops.bnkit.update_running_stats_(running_mean, running_var, mean, var, factor, count, check):
            _reject_nonfinite(where, nonfinite)
            return
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return
    if tracing or (check and nonfinite == "skip" and (torch.compiler.is_compiling() or mean.device.type != "cpu")):
        # A torch.jit.trace records tensor ops only: "raise" acts as "skip" there (no host check).
        valid = torch.isfinite(var.max()) if check else None
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1 if valid is None else valid.to(num_batches_tracked.dtype))
        factor = momentum if momentum is not None else 1.0 / num_batches_tracked.clamp_min(1).double()
        stats.update_running_stats(running_mean, running_var, mean, var, count, factor, valid)
        return
    if check and var.numel() and not math.isfinite(var.max().item()):
        _reject_nonfinite(where, nonfinite)
        return
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    nbt = int(num_batches_tracked) if momentum is None else 0
    stats.update_running_stats(
        running_mean, running_var, mean, var, count, stats.running_average_factor(momentum, nbt)
    )


# --------------------------------------------------------------------------- fused call
_rank_masks: dict[tuple[int, ...] | None, int] = {}


def rank_mask(ranks: tuple[int, ...] | None) -> int:
    """``ranks`` as the bit mask of ``bnkit::batch_norm_layer`` (bit d: d-D accepted; 0: any rank)."""
    mask = _rank_masks.get(ranks)
    if mask is None:
        mask = _rank_masks[ranks] = 0 if ranks is None else sum(1 << d for d in ranks)
    return mask


_RANKS_FROM_2 = -4  # bits 2, 3, ...: the F-style API's "at least (N, C)"
_NOT_HANDLED, _NONFINITE = 2, 1


def fused_call(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    axis: int,
    nonfinite: str,
    where: str,
    num_features: int,
    ranks: int,
) -> Tensor | None:
    """A layer's whole call as one C++ op (``bnkit::batch_norm_layer``), or ``None`` where it does not apply.

    Same semantics as :func:`batch_norm_core`, with the arguments in the order
    of ``layers.batch_norm_module_call``, plus the layer's ``num_features``
    and accepted ``ranks`` as a :func:`rank_mask`.
    It applies in eager mode to plain CPU tensors with the C++ kernels; it
    declines (``None``, nothing changed) anything else, including bad input,
    so that the general path raises the error. On a small input the general
    path's separate steps cost as much as the kernels.
    """
    if (
        type(input) is not Tensor
        or not input.is_cpu
        or kernels.select(input) != "cpp"
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
    ):
        return None
    y, status = torch.ops.bnkit.batch_norm_layer(
        input,
        weight,
        bias,
        running_mean,
        running_var,
        num_batches_tracked,
        training,
        -1.0 if momentum is None else momentum,
        eps,
        axis,
        num_features,
        ranks,
        nonfinite != "propagate",
    )
    if status == _NOT_HANDLED:
        return None
    if status == _NONFINITE:
        _reject_nonfinite(where, nonfinite, stacklevel=4)
    return y


# --------------------------------------------------------------------------- core
def batch_norm_core(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    axis: int = 1,
    num_batches_tracked: Tensor | None = None,
    nonfinite: str = "propagate",
    where: str = "batch_norm",
) -> Tensor:
    """Batch normalization of ``input`` along feature ``axis``; the engine of every layer.

    Training (``training=True``) normalizes with the batch's mean and biased
    variance over all axes but ``axis`` and, when running buffers are given,
    updates them (``momentum=None``: cumulative average counted by
    ``num_batches_tracked``, which is incremented here). Otherwise the running
    statistics are used. ``nonfinite`` decides what a batch with NaN/Inf
    statistics does to the running buffers: ``"skip"`` (warn, leave them),
    ``"raise"`` (``FloatingPointError``), ``"propagate"`` (update, as torch).
    ``where`` names the caller in error messages.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor input, got {type(input).__name__}")
    if not input.dtype.is_floating_point:
        raise TypeError(f"{where}: expected a floating-point input, got {input.dtype}")
    ndim = input.dim()
    if ndim < 1 or not -ndim <= axis < ndim:
        raise ValueError(f"{where}: feature axis {axis} is out of range for a {ndim}-D input")
    axis = axis % ndim
    channels = input.shape[axis]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        _check_param(name, t, input, channels)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{where}: running_mean and running_var must both be given or both be None")
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"{where}: nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    weight_c = _per_channel(weight, channels)
    bias_c = _per_channel(bias, channels)

    x3, restore = canonical_view(input, axis)
    if training:
        if not eps > 0:
            raise ValueError(f"{where}: eps must be positive during training, got {eps}")
        count = x3.shape[0] * x3.shape[2]
        if count == 1:
            raise ValueError(
                f"{where}: Expected more than 1 value per channel when training, got input size {input.size()}"
            )
        y3, mean, var = _train_forward(x3, weight_c, bias_c, eps)
        if running_mean is not None:
            _update_running(
                running_mean, running_var, num_batches_tracked, mean, var, count, momentum, nonfinite, where
            )
        return restore(y3)
    if running_mean is None:
        raise ValueError(f"{where}: running_mean and running_var are required when training=False")
    return restore(_eval_forward(x3, running_mean, running_var, weight_c, bias_c, eps))


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Drop-in for ``torch.nn.functional.batch_norm`` (channels on dim 1), computed by bnkit.

    In training, normalizes with batch statistics and, if running buffers are
    given, updates them in place with ``running = (1-momentum)*running +
    momentum*batch`` (unbiased variance). In eval, uses the running buffers.
    """
    y = fused_call(
        input, weight, bias, running_mean, running_var, None, training, momentum, eps, 1, "propagate", "batch_norm",
        num_features=0, ranks=_RANKS_FROM_2,
    )
    if y is not None:
        return y
    if isinstance(input, Tensor) and input.dim() < 2:
        raise ValueError(f"batch_norm: expected an input with at least 2 dimensions (N, C, ...), got {input.dim()}D")
    return batch_norm_core(
        input, running_mean, running_var, weight, bias, training, momentum, eps, axis=1, where="batch_norm"
    )


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
    x: Tensor,
    mean: Tensor,
    variance: Tensor,
    offset: Tensor | None = None,
    scale: Tensor | None = None,
    variance_epsilon: float = 1e-3,
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


def fold(
    mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """Inference BN as an affine map: ``(scale, shift)`` with ``y = x * scale + shift``.

    ``scale = weight / sqrt(var + eps)`` and ``shift = bias - mean * scale``
    (``weight`` = 1 and ``bias`` = 0 when absent). Differentiable in all inputs.
    """
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(shift.dtype)
    return scale, shift
