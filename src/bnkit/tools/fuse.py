"""Fold BN into adjacent linear layers for inference: :func:`fuse`.

In eval mode a BN layer is the per-channel affine map ``y = x * s + t`` (see
:meth:`bnkit.BatchNorm.inference_affine`). :func:`fuse` removes it:

* **layer -> BN** (exact for any padding, stride, dilation, groups, padding
  mode): ``Conv{1,2,3}d``, ``ConvTranspose{1,2,3}d`` (weight layout
  ``[in, out/groups, ...]``) and ``Linear`` get ``W' = W * s`` along their
  output channels and ``b' = b * s + t``.
* **BN -> layer** (exact when every output position sums over real input
  values only): ``Linear``; ``Conv`` with zero padding (any kernel, stride,
  dilation, groups); ``ConvTranspose`` with kernel 1 and stride 1. The layer
  gets ``W' = W * s`` along its *input* channels (per group) and
  ``b' = b + sum W * t``.
* anything else (e.g. BN after a residual add, BN -> ReLU) with a fixed
  inference form becomes one :class:`Affine` op; BN without one (e.g.
  ``track_running_stats=False``) is left as it is.

BN subclasses (:func:`bnkit.family.bn_form`): a layer followed by children
(timm's ``BatchNormAct2d``: ``drop``, then ``act``) folds into the preceding
layer only, and its place is taken by its children, so the activation stays
after the fused conv (unfused: an :class:`Affine` followed by them). Frozen
layers of other libraries (timm's ``FrozenBatchNormAct2d``, torchvision's
``FrozenBatchNorm2d``) fold the same way. A subclass that overrides
``forward`` in a way bnkit does not know is left as it is, named in the
report and in a warning.

The model is traced with :mod:`torch.fx` (BN-family layers and
:class:`Affine` as leaf modules), so the result of a traced model is a
``torch.fx.GraphModule``. When tracing fails (data-dependent control flow,
...) the children are fused instead: an ``nn.Sequential`` by its adjacent
pairs, any other module child by child (recursively, each child traced on its
own first), and a BN left over becomes an :class:`Affine`.

The passes live in :mod:`bnkit.tools.fuse_fx` and :mod:`bnkit.tools.fuse_sequential`,
their shared helpers and decision in :mod:`bnkit.tools.fuse_common`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from .._warn import warn
from ..family import check_initialized
from .affine import Affine
from .fuse_common import _check_eval, _Ctx, _unknown, is_bn
from .fuse_report import FusedPair, FuseReport, UnfusedBN
from .fuse_sequential import _fuse_any

__all__ = ["Affine", "FuseReport", "FusedPair", "UnfusedBN", "fuse"]


def _input_ranks(model: nn.Module, example_inputs: Any) -> dict[int, set[int]]:
    """Run ``model`` once and record the rank of every BN-family layer's input."""
    ranks: dict[int, set[int]] = {}
    handles = []

    def hook(module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], Tensor):
            ranks.setdefault(id(module), set()).add(args[0].dim())

    for m in model.modules():
        if is_bn(m):
            handles.append(m.register_forward_pre_hook(hook))
    try:
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        model(*args)
    finally:
        for h in handles:
            h.remove()
    return ranks


def fuse(model: nn.Module, inplace: bool = False, *, report: bool = False, example_inputs: Any = None):
    """Fold every BN layer of an eval-mode model into an adjacent Conv/ConvTranspose/Linear where exact.

    Args:
        model: a module whose BN-family layers that learn statistics are in
            eval mode (``model.eval()``); ``ValueError`` otherwise. Frozen
            layers (no ``momentum``) may be in either mode.
        inplace: work on ``model`` itself (its submodules are modified; use the
            returned model) instead of a deep copy.
        report: also return the :class:`FuseReport`.
        example_inputs: optional input (a tensor, or a tuple of positional
            arguments) the model is run on once to learn the rank of every BN
            input. Without it, a ``BatchNorm1d``-style layer (axis 1) next to a
            ``Linear`` is assumed to see 2-D ``(N, C)`` input (noted in the
            report); with it, the fold happens only when that is verified.

    Returns:
        The fused model, or ``(model, report)`` with ``report=True``; the
        report is also the ``fuse_report`` attribute of the returned model.
        A model that can be traced comes back as a ``torch.fx.GraphModule``
        (hooks on it and on traced-through submodules, and its own methods,
        do not carry over; leaf modules keep theirs). Otherwise the model's
        own class is kept and its children are fused.

    BN subclasses: see the module docstring (an activation after the BN
    stays after the fused layer; unknown subclasses are left and warned
    about).

    The fused model computes the eval-mode original up to rounding (folds are
    computed in float64 and cast to each layer's dtype). It is an inference
    model: folded layers have no BN left, so ``train()`` does not bring batch
    statistics back. Modules reachable more than once (shared layers) are
    copied before a fold changes them.
    """
    check_initialized(model, "fuse")
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse: expected an nn.Module, got {type(model).__name__}")
    _check_eval(model)
    unknown = [(n, _unknown(m)) for n, m in model.named_modules() if is_bn(m) and _unknown(m) is not None]
    if not inplace:
        model = copy.deepcopy(model)
    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    shared = {i for i, c in counts.items() if c > 1}
    ctx = _Ctx(FuseReport(), shared, {})
    with torch.no_grad():
        if example_inputs is not None:
            ctx.ranks = _input_ranks(model, example_inputs)
        fused = _fuse_any(model, "", ctx)
    fused.fuse_report = ctx.report
    if unknown:
        shown = "; ".join(f"{n or '<root>'!r} ({why})" for n, why in unknown[:5])
        warn(f"fuse: left {len(unknown)} BN subclass layer(s) as they are (not folded): {shown}")
    return (fused, ctx.report) if report else fused
