"""BN followed by child modules (an activation, a drop layer): the bnkit form of timm's ``BatchNormAct2d``.

``y = act(drop(BN(x)))``: the BN part is the layer's base class
(:class:`bnkit.BatchNorm` or :class:`bnkit.FrozenBatchNorm`), the tail is
the children named in ``bn_tail`` (``("drop", "act")``), applied in that
order. The state_dict keys are those of timm's ``BatchNormAct2d``
(``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``, ``act.*``, ``drop.*``), so checkpoints load both
ways. :func:`bnkit.convert`, :func:`bnkit.freeze` and :func:`bnkit.fuse`
make and read these layers; the tools find the tail through ``bn_tail``.

When a module calls one activation module at several places, one of them
right after a BN layer (torchvision's ``BasicBlock``: ``relu(bn1(...))`` and
``relu(out + identity)``), :func:`bnkit.convert` with
``fuse_activations=True`` fuses that BN layer with it and swaps the shared
module for a :class:`ReLUAfterFusedBN`-style subclass of its class: its call
on the fused layer's fresh output returns that output as it is (the
activation is already applied), and every other call computes. Only clamps
(ReLU, ReLU6, Hardtanh) are shared this way, because a clamp applied twice
changes neither values nor gradients: wherever the hand-over does not happen
(``torch.compile``, another thread's call in between, an in-place edit of the
output), computing the activation again is still exact.
"""

from __future__ import annotations

import copy
import math
import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from .._layer_support import fx_leaf_call
from ..family import specialize
from ..layers import BatchNorm
from .frozen import FrozenBatchNorm

__all__ = [
    "BatchNormAct", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d",
    "FrozenBatchNormAct", "FrozenBatchNormAct1d", "FrozenBatchNormAct2d", "FrozenBatchNormAct3d",
    "HardtanhAfterFusedBN", "ReLU6AfterFusedBN", "ReLUAfterFusedBN", "after_fused_bn",
]


def fusable_activation(act: nn.Module) -> tuple[str, float, float] | None:
    """The activation spec (:func:`bnkit.engine.apply_activation`) of a module the kernels can fuse after BN, or ``None``.

    Exactly ``nn.ReLU`` (``("clamp", 0, inf)``), ``nn.ReLU6`` (``("clamp", 0, 6)``),
    ``nn.Hardtanh`` (``("clamp", min_val, max_val)``), ``nn.Hardswish`` or
    ``nn.SiLU`` (or an :func:`after_fused_bn` form), with no hooks of its own
    (other subclasses may compute something else; hooks must see the call).
    """
    kind = type(act)
    if kind not in _FUSABLE or act._forward_hooks or act._forward_pre_hooks or (
        act._backward_hooks or act._backward_pre_hooks
    ):
        return None
    return _FUSABLE[kind](act)


# A fused layer's output waiting for the call of its shared activation module that would apply the activation
# again: {activation module: (weak reference to the output, the output's version counter then)}.
_PENDING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _AfterFusedBN:
    """Mixed in before a clamp class: the call on a fused BN layer's fresh output returns it unchanged."""

    def forward(self, input: Tensor) -> Tensor:
        if not torch.compiler.is_compiling():
            pending = _PENDING.get(self)
            # The very tensor the fused layer returned, not edited in place since: the clamp is applied.
            if pending is not None and pending[0]() is input and (
                pending[1] is None if input.is_inference() else input._version == pending[1]
            ):
                _PENDING.pop(self, None)
                return input
        return super().forward(input)


class ReLUAfterFusedBN(_AfterFusedBN, nn.ReLU):
    """``nn.ReLU`` shared with a BN layer fused with it (:func:`after_fused_bn`); computes like ``nn.ReLU``."""


class ReLU6AfterFusedBN(_AfterFusedBN, nn.ReLU6):
    """``nn.ReLU6`` shared with a BN layer fused with it (:func:`after_fused_bn`); computes like ``nn.ReLU6``."""


class HardtanhAfterFusedBN(_AfterFusedBN, nn.Hardtanh):
    """``nn.Hardtanh`` shared with a BN layer fused with it (:func:`after_fused_bn`); computes like ``nn.Hardtanh``."""


_SHARED_FORM = {nn.ReLU: ReLUAfterFusedBN, nn.ReLU6: ReLU6AfterFusedBN, nn.Hardtanh: HardtanhAfterFusedBN}
_PLAIN_FORM = {v: k for k, v in _SHARED_FORM.items()}


def after_fused_bn(act: nn.Module) -> nn.Module | None:
    """The shared form of a clamp module (``nn.ReLU`` -> :class:`ReLUAfterFusedBN`, also ReLU6, Hardtanh), with
    its settings and ``training`` flag, or ``None`` for any other module (a clamp is the activation that may
    be applied twice)."""
    cls = _SHARED_FORM.get(type(act))
    if cls is None or fusable_activation(act) is None:
        return None
    new = copy.deepcopy(act)  # a clamp holds no tensors: its settings, flags and (empty) hook dictionaries
    new.__class__ = cls
    return new


def plain_activation(act: nn.Module) -> nn.Module:
    """The torch class again for a module made by :func:`after_fused_bn` (its settings kept); others as they are."""
    cls = _PLAIN_FORM.get(type(act))
    if cls is None:
        return act
    new = copy.deepcopy(act)
    new.__class__ = cls
    return new


_FUSABLE = {
    nn.ReLU: lambda m: ("clamp", 0.0, math.inf),
    nn.ReLU6: lambda m: ("clamp", float(m.min_val), float(m.max_val)),
    nn.Hardtanh: lambda m: ("clamp", float(m.min_val), float(m.max_val)),
    nn.Hardswish: lambda m: ("hardswish", 0.0, 0.0),
    nn.SiLU: lambda m: ("silu", 0.0, 0.0),
}
for _shared, _plain in _PLAIN_FORM.items():
    _FUSABLE[_shared] = _FUSABLE[_plain]


def _global_hooks() -> bool:
    """Whether module hooks for every module are registered (they must see the activation's call)."""
    return bool(
        _module._global_forward_hooks or _module._global_forward_pre_hooks or _module._global_backward_hooks
        or _module._global_backward_pre_hooks
    )


class _WithTail:
    """Mixed in before a BN class: its ``drop`` and ``act`` children applied, in that order, after the
    normalization (``y = act(drop(BN(x)))``; ``None``: ``nn.Identity``). The tools find them through
    ``bn_tail``."""

    def __init__(self, num_features: int, *args: Any, act: nn.Module | None = None, drop: nn.Module | None = None,
                 **kwargs: Any) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.drop = nn.Identity() if drop is None else drop
        self.act = nn.Identity() if act is None else act
        #: the children applied after the normalization, in order
        self.bn_tail = ("drop", "act")

    def fused_activation(self) -> tuple[str, float, float] | None:
        """The activation that :meth:`forward` fuses into the BN call, or ``None`` (BN, then the children).

        Fused: a trainable BN base (``activated_forward``), the default tail
        with ``drop`` an ``nn.Identity`` and ``act`` a :func:`fusable_activation`
        module, and no hooks on either (nor global module hooks).
        """
        if not hasattr(self, "activated_forward") or self.bn_tail != ("drop", "act"):
            return None
        drop, act = self._modules.get("drop"), self._modules.get("act")
        if type(drop) is not nn.Identity or drop._forward_hooks or drop._forward_pre_hooks or act is None:
            return None
        activation = fusable_activation(act)
        return None if activation is None or _global_hooks() else activation

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """``act(drop(BN(x)))``; ``mask`` (bool, ``x``'s shape without the feature axis) as the BN base's."""
        if type(input) is not Tensor and (traced := fx_leaf_call(self, input, mask)) is not None:
            return traced
        activation = None if mask is not None else self.fused_activation()
        shared = isinstance(self._modules.get("act"), _AfterFusedBN)
        if shared and activation is not None and (
            torch.compiler.is_compiling() or (torch.is_inference_mode_enabled() and self._forward_hooks)
        ):
            # A shared activation (after_fused_bn) is its parent's to call: the layer applies it only where it
            # can hand its output over (not compiled; an inference tensor has no version counter to show a
            # hook's in-place edit), and elsewhere leaves it to the parent's call, as in torch.
            activation = None
        if activation is not None:
            y = self.activated_forward(input, activation)
            if shared:
                _PENDING[self.act] = (weakref.ref(y), None if y.is_inference() else y._version)
            return y
        y = super().forward(input) if mask is None else super().forward(input, mask)
        for name in self.bn_tail:
            child = self._modules.get(name)
            if child is not None and not isinstance(child, _AfterFusedBN):
                y = child(y)
        return y


class BatchNormAct(_WithTail, BatchNorm):
    r""":class:`bnkit.BatchNorm` followed by ``drop`` and ``act``: ``y = act(drop(BN(x)))``.

    Args:
        num_features, *args, **kwargs: those of :class:`bnkit.BatchNorm`.
        act: the activation module (``None``: ``nn.Identity``).
        drop: the drop module applied before it (``None``: ``nn.Identity``).

    Example:
        >>> layer = BatchNormAct2d(8, act=nn.SiLU())
        >>> layer(torch.randn(4, 8, 5, 5)).shape
        torch.Size([4, 8, 5, 5])
    """


BatchNormAct1d, BatchNormAct2d, BatchNormAct3d = specialize(BatchNormAct)


class FrozenBatchNormAct(_WithTail, FrozenBatchNorm):
    r""":class:`bnkit.FrozenBatchNorm` followed by ``drop`` and ``act`` (timm's ``FrozenBatchNormAct2d``).

    Args:
        num_features, *args, **kwargs: those of :class:`bnkit.FrozenBatchNorm`.
        act, drop: as for :class:`BatchNormAct`.
    """


FrozenBatchNormAct1d, FrozenBatchNormAct2d, FrozenBatchNormAct3d = specialize(FrozenBatchNormAct)
