"""The engine's checks: a call's input, parameters and mask against its CallSpec (torch's messages where torch has one)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .errors import ChannelMismatchError, DtypeMismatchError

if TYPE_CHECKING:
    from .engine import CallSpec

__all__ = ["check_input", "check_mask"]


def _check_param(name: str, t: Tensor | None, x: Tensor, channels: int) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"batch_norm: {name} must be a Tensor or None, got {type(t).__name__}")
    if t.dtype != x.dtype and not (x.dtype in _HALF_DTYPES and t.dtype == torch.float32):
        raise DtypeMismatchError(  # a TypeError, and a RuntimeError as torch's "mixed dtype"
            f"batch_norm: {name} has dtype {t.dtype} but the input has {x.dtype}; parameters and buffers "
            "must have the input's dtype (float16/bfloat16 inputs may also use float32 ones)"
        )
    if t.device != x.device:
        raise RuntimeError(
            f"batch_norm: {name} is on {t.device} but the input is on {x.device}; move them to one device"
        )
    if (t.numel() != channels and not (t.numel() == 1 and name in ("weight", "bias"))) or (
        t.dim() != 1 and name.startswith("running_")
    ):
        # torch raises RuntimeError here; ChannelMismatchError is one (and a ValueError).
        raise ChannelMismatchError(
            f"batch_norm: {name} should have {channels} elements (one per channel), got shape {tuple(t.shape)}"
        )


_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _empty_output(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """torch's result for an input with no elements: a copy of it, joined to the graph of ``weight``/``bias``.

    torch returns ``input.clone() * weight[0] + bias[0]`` without checking the
    parameters' sizes or dtypes (nothing is computed from them), so an empty
    batch of another float dtype or a 1-D empty input passes; bnkit does the same.
    """
    out = input.clone()
    if isinstance(weight, Tensor) and weight.numel():
        out = out * weight.reshape(-1)[0]
    if isinstance(bias, Tensor) and bias.numel():
        out = out + bias.reshape(-1)[0]
    return out


def check_input(spec: CallSpec, input: Tensor) -> None:
    """The layer-level checks of ``input`` against ``spec`` (torch's messages where torch has one)."""
    where = spec.name
    if not isinstance(input, Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor input, got {type(input).__name__}")
    if input.layout != torch.strided:  # torch's error type (its batch norm has no sparse kernel either)
        raise NotImplementedError(f"{where}: {input.layout} inputs are not supported; use input.to_dense()")
    ndim = input.dim()
    if spec.min_rank and ndim < spec.min_rank:
        raise ValueError(f"{where}: expected an input with at least 2 dimensions (N, C, ...), got {ndim}D")
    if spec.ranks is not None and ndim not in spec.ranks:
        expected = " or ".join(f"{d}D" for d in spec.ranks)
        raise ValueError(f"expected {expected} input (got {ndim}D input)")
    if spec.num_features <= 0:
        return
    axis = spec.axis
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"{where}: feature axis {axis} does not exist in a {ndim}-D input of shape {tuple(input.shape)}"
        )
    if input.shape[axis] != spec.num_features:
        # torch raises RuntimeError for this; ChannelMismatchError is one (and a ValueError).
        raise ChannelMismatchError(
            f"{where}: expected {spec.num_features} features along axis {axis}, "
            f"got {input.shape[axis]} (input shape {tuple(input.shape)})"
        )


def check_mask(spec: CallSpec, input: Tensor, mask: object) -> None:
    """``mask`` fits ``input``: a bool tensor on its device with its shape minus the feature axis.

    Raised before anything changes: ``TypeError`` (not a bool tensor),
    ``ValueError`` (wrong shape), ``RuntimeError`` (another device).
    """
    where = spec.name
    if not isinstance(mask, Tensor):
        raise TypeError(f"{where}: mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{where}: mask must have dtype torch.bool (True = valid entry), got {mask.dtype}")
    ndim = input.dim()
    if ndim < 1 or not -ndim <= spec.axis < ndim:
        raise ValueError(f"{where}: feature axis {spec.axis} is out of range for a {ndim}-D input")
    axis = spec.axis % ndim
    expected = input.shape[:axis] + input.shape[axis + 1 :]
    if mask.shape != expected:
        raise ValueError(
            f"{where}: mask must have the input's shape without the feature axis {spec.axis}, "
            f"{tuple(expected)} for an input of shape {tuple(input.shape)}; got {tuple(mask.shape)}"
        )
    if mask.device != input.device:
        raise RuntimeError(
            f"{where}: mask is on device {mask.device} but the input is on device {input.device}; move it there"
        )
