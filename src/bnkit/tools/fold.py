"""The fold algebra: when and how a per-channel affine map merges into a Conv/ConvTranspose/Linear.

Pure functions of the layers and the map (no graph walking): ``out_axis_ok``
/ ``fold_after`` for ``layer -> BN`` (the map on the layer's output
channels), ``before_ok`` / ``fold_before`` for ``BN -> layer`` (on its input
channels). Checks return ``(why not, note)``: ``why not`` is ``None`` when
the fold is exact. Folds are computed in float64 and cast to the layer's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["before_ok", "fold_after", "fold_before", "foldable_layer", "out_axis_ok"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _channels(layer: nn.Module, side: str) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features if side == "out" else layer.in_features
    return layer.out_channels if side == "out" else layer.in_channels


def _axis_check(layer: nn.Module, axis: int, ranks: set[int] | None) -> tuple[str | None, str]:
    """``(why not, note)``: whether the BN's feature ``axis`` is ``layer``'s channel axis.

    ``ranks`` are the BN input ranks seen on ``example_inputs`` (None: unknown).
    """
    if isinstance(layer, nn.Linear):
        # Linear's features are the last axis.
        if ranks:
            if all(axis % r == r - 1 for r in ranks):
                return None, ""
            return f"feature axis {axis} is not the Linear's (last) feature axis of the {sorted(ranks)}-D input", ""
        if axis == -1:
            return None, ""
        if axis == 1:  # BatchNorm1d after/before a Linear on (N, C): the common case
            return None, "assumes a 2-D (N, C) input; pass example_inputs to check"
        return f"feature axis {axis} is not the Linear's feature axis", ""
    nd = layer.weight.dim()  # conv rank + 2 = batched input rank
    if ranks and any(r != nd for r in ranks):
        return f"the convolution's input is not batched ({sorted(ranks)}-D)", ""
    if axis % nd != 1:
        return f"feature axis {axis} is not the convolution's channel axis", ""
    return None, ""


def out_axis_ok(layer: nn.Module, axis: int, num_features: int, ranks: set[int] | None) -> tuple[str | None, str]:
    """``(why not, note)``: whether a BN after ``layer`` normalizes the layer's output channels."""
    if _channels(layer, "out") != num_features:
        return f"{num_features} features but the layer has {_channels(layer, 'out')} output channels", ""
    return _axis_check(layer, axis, ranks)


def fold_after(layer: nn.Module, scale: Tensor, shift: Tensor) -> None:
    """In place: ``layer`` followed by ``x * scale + shift`` along its output channels."""
    w = layer.weight
    s = scale.to(torch.float64)
    t = shift.to(torch.float64)
    w64 = w.detach().to(torch.float64)
    if isinstance(layer, _CONV_TRANSPOSES):
        g = layer.groups
        shape = w64.shape  # [in, out/g, k...]
        w_new = (w64.reshape(g, shape[0] // g, shape[1], *shape[2:]) * s.reshape(g, 1, shape[1], *([1] * (w64.dim() - 2)))).reshape(shape)
    else:
        w_new = w64 * s.reshape(-1, *([1] * (w64.dim() - 1)))
    b64 = torch.zeros_like(s) if layer.bias is None else layer.bias.detach().to(torch.float64)
    b_new = b64 * s + t
    _set_params(layer, w_new, b_new)


def fold_before(layer: nn.Module, scale: Tensor, shift: Tensor) -> None:
    """In place: ``x * scale + shift`` along ``layer``'s input channels, followed by ``layer``."""
    w64 = layer.weight.detach().to(torch.float64)
    s = scale.to(torch.float64)
    t = shift.to(torch.float64)
    spatial = [1] * (w64.dim() - 2)
    if isinstance(layer, nn.Linear):
        w_new = w64 * s
        extra = w64 @ t
    elif isinstance(layer, _CONV_TRANSPOSES):
        # weight [in, out/g, k...]: rows are the input channels.
        w_new = w64 * s.reshape(-1, 1, *spatial)
        g = layer.groups
        c_in, c_out_g = w64.shape[0], w64.shape[1]
        # output channel (group j, o) gets sum_i W[j*cin_g + i, o] * t[j*cin_g + i] (k = 1).
        per = (w64 * t.reshape(-1, 1, *spatial)).sum(dim=tuple(range(2, w64.dim())))  # [in, out/g]
        extra = per.reshape(g, c_in // g, c_out_g).sum(dim=1).reshape(-1)
    else:
        # weight [out, in/g, k...]: output channel o of group j reads input channels j*cin_g .. j*cin_g+cin_g-1.
        g = layer.groups
        c_out, cin_g = w64.shape[0], w64.shape[1]
        s_in = s.reshape(g, 1, cin_g).expand(g, c_out // g, cin_g).reshape(c_out, cin_g, *spatial)
        t_in = t.reshape(g, 1, cin_g).expand(g, c_out // g, cin_g).reshape(c_out, cin_g, *spatial)
        w_new = w64 * s_in
        extra = (w64 * t_in).sum(dim=tuple(range(1, w64.dim())))
    b64 = torch.zeros_like(extra) if layer.bias is None else layer.bias.detach().to(torch.float64)
    _set_params(layer, w_new, b64 + extra)


def _set_params(layer: nn.Module, w_new: Tensor, b_new: Tensor) -> None:
    w = layer.weight
    layer.weight = nn.Parameter(w_new.to(w.dtype), requires_grad=w.requires_grad)
    layer.bias = nn.Parameter(b_new.to(device=w.device, dtype=w.dtype), requires_grad=w.requires_grad)


def before_ok(layer: nn.Module, axis: int, num_features: int, ranks: set[int] | None) -> tuple[str | None, str]:
    """``(why not, note)``: whether a BN with feature ``axis`` folds into the following ``layer``."""
    if _channels(layer, "in") != num_features:
        return f"{num_features} features but the layer has {_channels(layer, 'in')} input channels", ""
    why, note = _axis_check(layer, axis, ranks)
    if why is not None or isinstance(layer, nn.Linear):
        return why, note
    if isinstance(layer, _CONV_TRANSPOSES):
        if any(k != 1 for k in layer.kernel_size) or any(s != 1 for s in layer.stride):
            return "a transposed convolution reads its input with varying multiplicity unless kernel=1 and stride=1", ""
        if any(p != 0 for p in layer.output_padding):
            return f"output_padding={tuple(layer.output_padding)}: the added positions read no input, so no BN shift", ""
        return None, ""
    pad = layer.padding
    if isinstance(pad, str):
        if pad == "valid" or all(d * (k - 1) == 0 for d, k in zip(layer.dilation, layer.kernel_size)):
            return None, ""
        return "padding='same' pads the BN output with values that are not shifted", ""
    if any(p != 0 for p in pad):
        return f"padding={tuple(pad)}: padded positions would not carry the BN shift", ""
    return None, ""


def foldable_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear,) + _CONVS + _CONV_TRANSPOSES) and type(m).forward in (
        nn.Linear.forward,
        *(c.forward for c in _CONVS + _CONV_TRANSPOSES),
    )
