"""Recognising BN-family layers without importing them.

A layer is "BN-family" when it is a ``torch.nn.modules.batchnorm._BatchNorm``
(torch's BatchNorm1d/2d/3d, SyncBatchNorm, lazy variants) or any module with
``inference_affine()``, ``axis`` and ``num_features`` (every bnkit
normalization layer: :class:`bnkit.BatchNorm` and its variants). The tools
only rely on that interface, so variants added later work unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..engine import fold
from ..family import is_torch_bn
from ..surgery import CALL_HOOK_DICTS, STATE_HOOK_DICTS

__all__ = ["CALL_HOOK_DICTS", "STATE_HOOK_DICTS", "bn_affine", "bn_axis", "has_running_stats", "is_bn"]

def is_bn(module: nn.Module) -> bool:
    """True for torch BN layers and any module exposing ``inference_affine``, ``axis`` and ``num_features``."""
    if is_torch_bn(module):
        return True
    return callable(getattr(module, "inference_affine", None)) and hasattr(module, "axis") and hasattr(
        module, "num_features"
    )


def bn_axis(module: nn.Module) -> int:
    """The feature axis of a BN-family layer (torch's layers: 1)."""
    if is_torch_bn(module):
        return 1
    return int(module.axis)


def has_running_stats(module: nn.Module) -> bool:
    """Whether the layer has ``running_mean``/``running_var`` tensors to (re)calibrate."""
    return isinstance(getattr(module, "running_mean", None), Tensor) and isinstance(
        getattr(module, "running_var", None), Tensor
    )


@torch.no_grad()
def bn_affine(module: nn.Module) -> tuple[Tensor, Tensor]:
    """The eval-mode map of a BN-family layer as per-channel ``(scale, shift)`` along its axis.

    Raises ``RuntimeError`` when the layer has no fixed inference form (e.g.
    ``track_running_stats=False``).
    """
    if is_torch_bn(module):
        if not has_running_stats(module):
            raise RuntimeError(
                f"{type(module).__name__}({module.num_features}) has no running statistics "
                "(track_running_stats=False), so no fixed inference form"
            )
        return fold(module.running_mean, module.running_var, module.weight, module.bias, module.eps)
    scale, shift = module.inference_affine()
    c = int(module.num_features)
    return scale.detach().reshape(-1).expand(c), shift.detach().reshape(-1).expand(c)
