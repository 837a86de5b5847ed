"""The engine's masked door: masked_module_call and its training path (statistics over the valid entries only)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernels
from ._engine_checks import _check_param, check_input, check_mask
from ._engine_graph import masked_graph_path
from ._engine_views import canonical_mask, canonical_view, per_channel
from .engine import CallSpec, _general, running_update
from .errors import InputDtypeError
from .kernels import aten_graph

__all__ = ["masked_module_call", "valid_count"]


def valid_count(m2: Tensor, capturing: bool | None = None) -> int | Tensor:
    """The number of valid entries of a canonical mask ``m2`` (one channel's count: every channel's).

    Eagerly a host ``int`` (the C++ kernels and the host checks take it);
    while a graph is captured a 0-d tensor, as ``int()`` would be a host
    synchronisation there (a graph break under ``torch.compile``): the masked
    phases (:mod:`bnkit.kernels`), :func:`bnkit.engine.running_update` and
    :func:`bnkit._engine_graph.refuse_one_valid` take it as it is.
    ``capturing``: :func:`bnkit.kernels.aten_graph.capturing`, when the caller
    has it already (one answer for many masks).
    """
    count = m2.sum()
    if aten_graph.capturing() if capturing is None else capturing:
        return count
    # Under vmap with one mask per mapped batch the count is per batch: no host int (the graph's form).
    return count if kernels.transform_active() and torch._C._functorch.is_batchedtensor(count) else int(count)


def masked_module_call(
    spec: CallSpec, input: Tensor, mask: Tensor, weight: Tensor | None, bias: Tensor | None,
    running_mean: Tensor | None, running_var: Tensor | None, num_batches_tracked: Tensor | None, batch_stats: bool,
    one_valid: str = "raise"
) -> Tensor:
    r"""Batch normalization with a validity ``mask`` (True = valid): the engine's door for masked calls.

    Training (``batch_stats``): per channel, over the ``n`` valid entries,
    ``mean = sum(m x) / n`` and ``var = sum(m (x - mean)^2) / n`` (biased);
    every entry, padded ones included, becomes ``(x - mean) / sqrt(var + eps)
    * weight + bias``, but padded entries never influence anything else
    (statistics, valid outputs, gradients of valid inputs and of weight and
    bias). The running update uses ``n`` (unbiased variance ``n/(n-1)``). A
    batch with no valid entry is an empty batch: no update (but
    ``num_batches_tracked`` counts it, as torch counts an empty batch), and
    the output is ``bias`` (0 without) with no gradient. Inference uses the
    running statistics and ignores the mask (it is still checked); a call
    with batch statistics is masked whatever the mode.
    The fused op is not used (it declines masks by not being called).

    A training batch with one valid entry per channel raises (``ValueError``;
    a ``RuntimeError`` where a captured graph runs). ``one_valid="running"``
    (a layer's ``tiny_batch="running"`` in a captured graph, where the count
    is not read on the host): such a batch gets the running statistics'
    output and changes no buffer, chosen by ``torch.where`` on the count.
    """
    check_input(spec, input)
    check_mask(spec, input, mask)
    if not batch_stats or input.numel() == 0:
        return _general(spec, input, weight, bias, running_mean, running_var, num_batches_tracked, batch_stats)
    return _masked_general(spec, input, mask, weight, bias, running_mean, running_var, num_batches_tracked, one_valid)


def _masked_general(
    spec: CallSpec, input: Tensor, mask: Tensor, weight: Tensor | None, bias: Tensor | None,
    running_mean: Tensor | None, running_var: Tensor | None, num_batches_tracked: Tensor | None,
    one_valid: str = "raise"
) -> Tensor:
    """The masked training path: the general path's checks, masked moments and forward, then running_update."""
    where, eps = spec.name, spec.eps
    if not input.dtype.is_floating_point:
        raise InputDtypeError(f"{where}: expected a floating-point input, got {input.dtype}")
    axis = spec.axis % input.dim()
    channels = input.shape[axis]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        _check_param(name, t, input, channels)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{where}: running_mean and running_var must both be given or both be None")
    if not eps > 0:
        raise ValueError(f"{where}: eps must be positive during training, got {eps}")
    x3, restore = canonical_view(input, axis)
    m2 = canonical_mask(mask, x3)
    weight_c, bias_c = per_channel(weight, channels), per_channel(bias, channels)
    count = valid_count(m2)
    if isinstance(count, Tensor):  # a captured graph
        running = one_valid == "running" and running_mean is not None
        # The running statistics' output, from copies: the update below writes the buffers in place.
        y_running = _general(
            spec, input, weight, bias, running_mean.clone(), running_var.clone(), None, False
        ) if running else None
        y = restore(masked_graph_path(
            spec, x3, m2, count, weight_c, bias_c, running_mean, running_var, num_batches_tracked,
            "running" if running else "raise",
        ))
        return y if y_running is None else torch.where(count == 1, y_running, y)
    if count == 1:
        raise ValueError(
            f"{where}: Expected more than 1 value per channel when training, got 1 valid entry "
            f"(input size {input.size()})"
        )
    y3, mean, var = kernels.masked_train_forward(x3, m2, weight_c, bias_c, eps, count)
    if running_mean is not None:
        running_update(spec, running_mean, running_var, num_batches_tracked, mean, var, count)
    return restore(y3)
