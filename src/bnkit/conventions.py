r"""Statistics conventions: torch's (default) and Keras/Flax's (``convention="keras"``).

Both conventions normalize a training batch identically,
``y = (x - mean_B) / sqrt(var_B + eps) * gamma + beta`` with the biased batch
variance, and evaluate identically with the moving statistics. They differ in
what the moving statistics average (``m`` is bnkit's ``momentum``, i.e.
``1 - keras_momentum``; see :func:`bnkit.stats.momentum_from_keras`):

``"torch"``
    ``running_var <- (1 - m) * running_var + m * var_B * n / (n - 1)``
    (the *unbiased* batch variance); BatchRenorm averages the variance too.
``"keras"``
    Keras 3, tf-keras (non-fused) and Flax average the *biased* batch
    variance, in tf-keras' form ``moving <- moving - (moving - batch) * m``::

        running_mean <- running_mean - (running_mean - mean_B) * m
        running_var  <- running_var  - (running_var  - var_B ) * m

    BatchRenorm follows Keras' ``renorm=True``: it keeps the moving standard
    deviation ``running_std`` (a buffer, starting at 1 as Keras' ``renorm_stddev``
    and ``moving_stddev``), computes the corrections from it::

        sigma = max(running_std, sqrt(eps));  sigma_B = sqrt(var_B + eps)
        r = clip(sigma_B / sigma, 1/r_max, r_max);  d = clip((mean_B - running_mean) / sigma, -d_max, d_max)

    and after the step averages sigma itself, deriving the variance used in
    eval: ``running_std <- running_std - (running_std - sigma_B) * m``,
    ``running_var = max(running_std**2 - eps, 0)``. Averaging sigmas and
    averaging variances differ whenever the batch statistics drift (Jensen's
    gap), not only by Bessel's factor. Keras keeps separate ``renorm_*``
    averages with their own ``renorm_momentum``; with ``renorm_momentum ==
    momentum`` (both 0.99 by default) they equal the moving ones, which is
    what bnkit keeps.

A batch with non-finite statistics follows the layer's ``nonfinite`` policy
as in the torch convention (checked before anything changes). The Keras
convention runs the general (not the fused C++) training path with one extra
moments pass over the input.

Under ``torch.func`` transforms (``grad``, ``jvp``, ``vmap``, through
``functional_call``) and forward-mode AD the moving averages are updated as
the torch convention's running statistics are: once per call, at the
buffers' own level with the statistics' primal values (a ``vmap`` over
samples with unbatched buffers raises, nothing changed; stacked per-model
buffers are updated per model). Under ``torch.compile`` and for stacked
buffers the update is in tensor ops (``torch.where`` for the non-finite
policy, where ``"raise"`` acts as ``"skip"``; ``1 / num_batches_tracked`` on
the tensor for ``momentum=None``).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from . import kernels
from ._engine_graph import at_buffer_level, transform_left
from .engine import in_recompute, may_be_recomputed
from .errors import ChannelMismatchError, InputDtypeError
from .functional import batch_norm_core, canonical_view

__all__ = ["CONVENTIONS", "check_convention", "keras_train_forward", "keras_renorm_train_forward"]

CONVENTIONS = ("torch", "keras")


def check_convention(where: str, convention: str) -> str:
    if convention not in CONVENTIONS:
        raise ValueError(f"{where}: convention must be one of {CONVENTIONS}, got {convention!r}")
    return convention


def _per_channel(t: Tensor | None, channels: int) -> Tensor | None:
    if t is None:
        return None
    t = t.reshape(-1)
    return t.expand(channels) if t.numel() == 1 and channels != 1 else t


def _prepare(layer: nn.Module, input: Tensor) -> tuple[Tensor, int] | None:
    """Checks, then the batch's 3-D view and count; ``None`` for an empty batch (handled by the core)."""
    if isinstance(input, torch.fx.Proxy):
        raise RuntimeError(
            f"{layer._describe()}: torch.fx.symbolic_trace records a convention='keras' layer in eval mode only; "
            "call .eval() before tracing"
        )
    layer._check_input(input)
    if not input.dtype.is_floating_point:
        raise InputDtypeError(f"{layer._describe()}: expected a floating-point input, got {input.dtype}")
    c = layer.num_features
    for name in ("weight", "bias", "running_mean", "running_var", "running_std"):
        t = getattr(layer, name, None)
        if isinstance(t, Tensor) and t.numel() != c and not (t.numel() == 1 and name in ("weight", "bias")):
            raise ChannelMismatchError(
                f"{layer._describe()}: {name} should have {c} elements (one per channel), got shape {tuple(t.shape)}"
            )
    x3, _ = canonical_view(input, layer.axis % input.dim())
    count = x3.shape[0] * x3.shape[2]
    if count == 0:
        return None
    if count == 1:
        raise ValueError(
            f"{layer._describe()}: Expected more than 1 value per channel when training, "
            f"got input size {input.size()}"
        )
    return x3, count


def _finite(layer: nn.Module, *stats: Tensor) -> bool:
    """Whether to update: the ``nonfinite`` policy, decided before anything changes."""
    if layer.nonfinite == "propagate" or all(bool(torch.isfinite(s).all()) for s in stats):
        return True
    message = f"{layer._describe()}: the batch statistics are not finite (NaN/Inf in the input)"
    if layer.nonfinite == "raise":
        raise FloatingPointError(message + "; the running statistics are unchanged (nonfinite='raise')")
    warnings.warn(message + "; the running statistics were left unchanged", RuntimeWarning, stacklevel=4)
    return False


def _factor(layer: nn.Module) -> float:
    layer.num_batches_tracked.add_(1)
    return layer.momentum if layer.momentum is not None else 1.0 / int(layer.num_batches_tracked)


def _keras_average_(moving: Tensor, value: Tensor, factor: float) -> None:
    """tf-keras' ``_assign_moving_average``: ``moving -= (moving - value) * (1 - keras_momentum)``."""
    moving.sub_((moving - value.to(moving.dtype)) * factor)


def _deferred(layer: nn.Module) -> bool:
    """Whether the non-finite decision waits for the update (transforms, graph capture: no host check here)."""
    return kernels.transform_active() or torch.compiler.is_compiling()


def _update(layer: nn.Module, averages: dict[str, Tensor], finite: bool | None) -> None:
    """The moving averages ``buffer <- buffer - (buffer - value) * factor`` for each ``buffer name: batch value``.

    ``finite``: the eager non-finite decision, or ``None`` where it was
    deferred (:func:`_deferred`), to be taken on the values here. After them,
    a renorm layer's ``running_var`` is derived from its ``running_std``.
    """
    if finite is False or in_recompute():  # (checkpointing's recompute: updated once already)
        return
    if finite is None and kernels.transform_active():
        buffers = [layer.num_batches_tracked, layer.running_var, *(getattr(layer, n) for n in averages)]
        with at_buffer_level(layer._describe(), buffers, tuple(averages.values())) as values:
            values = dict(zip(averages, values))
            if transform_left():  # stacked per-model buffers: per model, in tensor ops
                _tensor_update(layer, values)
            elif _finite(layer, *values.values()):
                _update(layer, values, True)
        return
    if finite is None:  # a captured graph
        _tensor_update(layer, averages)
        return
    with torch.no_grad():
        factor = _factor(layer)
        for name, value in averages.items():
            _keras_average_(getattr(layer, name), value, factor)
        if "running_std" in averages:
            layer.running_var.copy_(_renorm_variance(layer))


def _renorm_variance(layer: nn.Module) -> Tensor:
    """The variance a Keras renorm layer evaluates with: ``max(running_std**2 - eps, 0)``."""
    std = layer.running_std
    return torch.relu(std * std - layer.eps)


def _tensor_update(layer: nn.Module, averages: dict[str, Tensor]) -> None:
    """:func:`_update` without a host synchronisation: the policy by one ``torch.where`` per buffer, a tensor factor."""
    # The values are detached batch statistics and the buffers need no grad, so no torch.no_grad() here:
    # an exported training graph whose no_grad region only writes buffers fails torch.export.load
    # (its node has no value, torch 2.13).
    finite = None
    if layer.nonfinite != "propagate":  # ("raise" acts as "skip": no host check)
        finite = torch.stack([torch.isfinite(v).all() for v in averages.values()]).all()
    nbt = layer.num_batches_tracked
    nbt.add_(1 if finite is None else finite)
    factor = layer.momentum if layer.momentum is not None else 1.0 / nbt.double()
    targets = [(getattr(layer, name), value) for name, value in averages.items()]
    if "running_std" in averages:
        targets.append((layer.running_var, None))
    for moving, value in targets:
        if value is None:  # (after running_std's update)
            new = _renorm_variance(layer)
        else:
            f = factor.to(moving.dtype) if isinstance(factor, Tensor) else factor
            new = moving - (moving - value.to(moving.dtype)) * f
        moving.copy_(new if finite is None else torch.where(finite, new, moving))


def _normalize(layer: nn.Module, input: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    # Batch statistics only (no buffers): the core's normalization, autograd and kernels.
    return batch_norm_core(input, None, None, weight, bias, True, layer.momentum, layer.eps, axis=layer.axis,
                           nonfinite="propagate", where=layer._describe())


def keras_train_forward(layer: nn.Module, input: Tensor) -> Tensor:
    """Training forward of a ``convention="keras"`` BatchNorm (see the module docstring)."""
    prepared = _prepare(layer, input)
    if prepared is None:
        return batch_norm_core(input, layer.running_mean, layer.running_var, layer.weight, layer.bias, True,
                               layer.momentum, layer.eps, axis=layer.axis,
                               num_batches_tracked=layer.num_batches_tracked, where=layer._describe())
    x3, _ = prepared
    with torch.no_grad():
        mean_b, var_b = (t.detach() for t in kernels.moments(x3))  # biased variance; (detach: no forward-AD tangent)
        finite = None if _deferred(layer) else _finite(layer, mean_b, var_b)
    c = layer.num_features
    y = _normalize(layer, input, _per_channel(layer.weight, c), _per_channel(layer.bias, c))
    _update(layer, {"running_mean": mean_b, "running_var": var_b}, finite)
    return y


def keras_renorm_train_forward(layer: nn.Module, input: Tensor) -> Tensor:
    """Training forward of a ``convention="keras"`` BatchRenorm (Keras' ``renorm=True`` rules)."""
    prepared = _prepare(layer, input)
    if prepared is None:
        return keras_train_forward(layer, input)
    x3, _ = prepared
    if layer.running_std is None:  # e.g. rebuilt by unfreeze, which keeps mean and variance only
        layer.running_std = torch.sqrt(layer.running_var + layer.eps)
    remember = not torch.compiler.is_compiling() and may_be_recomputed()  # (read before no_grad, which it tests)
    with torch.no_grad():  # r and d are constants (Keras' stop_gradient), for forward-mode AD too: detach
        mean_b, var_b = (t.detach() for t in kernels.moments(x3))
        acc = mean_b.dtype
        sigma_b = torch.sqrt(var_b + layer.eps)
        # A checkpoint's recompute takes back the original forward's (r, d): the statistics have moved since.
        recalled = layer._recall_correction(mean_b, var_b)
        if recalled is not None:
            r, d = recalled
        else:
            sigma = torch.clamp_min(layer.running_std.to(acc), math.sqrt(layer.eps))
            mu = layer.running_mean.to(acc)
            r_max, d_max = layer._limit_tensors()
            r_max_t = torch.as_tensor(r_max, dtype=acc, device=x3.device)
            d_max_t = torch.as_tensor(d_max, dtype=acc, device=x3.device)
            r = torch.clamp(sigma_b / sigma, min=1.0 / r_max_t, max=r_max_t)
            d = torch.clamp((mean_b - mu) / sigma, min=-d_max_t, max=d_max_t)
            if remember:
                layer._remember_correction(mean_b, var_b, r, d)
        finite = None if _deferred(layer) else _finite(layer, mean_b, var_b)
    c = layer.num_features
    weight, bias = _per_channel(layer.weight, c), _per_channel(layer.bias, c)
    # gamma * (xhat * r + d) + beta == xhat * (gamma * r) + (gamma * d + beta)
    w_eff = r if weight is None else weight * r
    b_eff = d if weight is None else weight * d
    if bias is not None:
        b_eff = b_eff + bias
    y = _normalize(layer, input, w_eff, b_eff)
    # (sigma_B is finite exactly when var_B is: the same decision on the averaged values)
    _update(layer, {"running_mean": mean_b, "running_std": sigma_b}, finite)
    return y
