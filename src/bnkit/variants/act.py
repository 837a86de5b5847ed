"""BN followed by child modules (an activation, a drop layer): the bnkit form of timm's ``BatchNormAct2d``.

``y = act(drop(BN(x)))``: the BN part is the layer's base class
(:class:`bnkit.BatchNorm` or :class:`bnkit.FrozenBatchNorm`), the tail is
the children named in ``bn_tail`` (``("drop", "act")``), applied in that
order. The state_dict keys are those of timm's ``BatchNormAct2d``
(``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``, ``act.*``, ``drop.*``), so checkpoints load both
ways. :func:`bnkit.convert`, :func:`bnkit.freeze` and :func:`bnkit.fuse`
make and read these layers; the tools find the tail through ``bn_tail``.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn
from torch.nn.modules import module as _module

from ..family import specialize
from ..layers import BatchNorm
from .frozen import FrozenBatchNorm

__all__ = [
    "BatchNormAct", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d",
    "FrozenBatchNormAct", "FrozenBatchNormAct1d", "FrozenBatchNormAct2d", "FrozenBatchNormAct3d",
]


def fusable_activation(act: nn.Module) -> tuple[str, float, float] | None:
    """The activation spec (:func:`bnkit.engine.apply_activation`) of a module the kernels can fuse after BN, or ``None``.

    Exactly ``nn.ReLU`` (``("clamp", 0, inf)``), ``nn.ReLU6`` (``("clamp", 0, 6)``),
    ``nn.Hardtanh`` (``("clamp", min_val, max_val)``), ``nn.Hardswish`` or
    ``nn.SiLU``, with no hooks of its own (subclasses may compute something
    else; hooks must see the call).
    """
    kind = type(act)
    if kind not in _FUSABLE or act._forward_hooks or act._forward_pre_hooks or (
        act._backward_hooks or act._backward_pre_hooks
    ):
        return None
    return _FUSABLE[kind](act)


_FUSABLE = {
    nn.ReLU: lambda m: ("clamp", 0.0, math.inf),
    nn.ReLU6: lambda m: ("clamp", float(m.min_val), float(m.max_val)),
    nn.Hardtanh: lambda m: ("clamp", float(m.min_val), float(m.max_val)),
    nn.Hardswish: lambda m: ("hardswish", 0.0, 0.0),
    nn.SiLU: lambda m: ("silu", 0.0, 0.0),
}


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

    def forward(self, input: Tensor) -> Tensor:
        activation = self.fused_activation()
        if activation is not None:
            return self.activated_forward(input, activation)
        y = super().forward(input)
        for name in self.bn_tail:
            child = self._modules.get(name)
            if child is not None:
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
