"""The per-channel affine map of an inference-form BN layer, as a module: :class:`Affine`."""

from __future__ import annotations

import torch
import torch.fx
from torch import Tensor, nn

from .._layer_support import fx_leaf_call
from ._family import bn_affine, bn_axis

__all__ = ["Affine", "affine_call"]


def affine_call(input: Tensor, scale: Tensor, shift: Tensor, axis: int) -> Tensor:
    """``input * scale + shift`` with the per-channel ``scale``/``shift`` along ``axis``."""
    shape = [1] * input.dim()
    shape[axis] = -1
    return torch.addcmul(shift.reshape(shape), input, scale.reshape(shape))


torch.fx.wrap("affine_call")


class Affine(nn.Module):
    """A per-channel affine map ``y = x * scale + shift`` along ``axis``: a BN layer in inference form.

    ``scale`` and ``shift`` are buffers (constants of the inference model).
    It has ``inference_affine()``, ``axis`` and ``num_features``, so a later
    :func:`fuse` can fold it like a BN layer.
    """

    def __init__(self, scale: Tensor, shift: Tensor, axis: int = 1) -> None:
        super().__init__()
        if scale.dim() != 1 or scale.shape != shift.shape:
            raise ValueError("Affine: scale and shift must be 1-D tensors of the same length")
        self.num_features = scale.numel()
        self.axis = axis
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    @classmethod
    def from_bn(cls, bn: nn.Module) -> "Affine":
        """The inference form of a BN-family layer (``RuntimeError`` if it has none)."""
        scale, shift = bn_affine(bn)
        aff = cls(scale, shift, bn_axis(bn))
        aff.training = bn.training
        return aff

    def inference_affine(self) -> tuple[Tensor, Tensor]:
        return self.scale, self.shift

    def forward(self, input: Tensor) -> Tensor:
        if type(input) is not Tensor and (traced := fx_leaf_call(self, input)) is not None:
            return traced
        return affine_call(input, self.scale, self.shift, self.axis)

    def extra_repr(self) -> str:
        return f"{self.num_features}, axis={self.axis}"
