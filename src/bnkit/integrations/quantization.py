"""bnkit layers in ``torch.ao.quantization`` (eager mode; FX through :func:`bnkit.convert`).

Importing bnkit registers, for torch's eager-mode workflow:

* **Fuser methods**: every ``(Conv/Linear/ConvTranspose, BN[, ReLU])`` and
  ``(BN, ReLU)`` sequence that ``torch.ao.quantization.fuse_modules`` /
  ``fuse_modules_qat`` accept with ``torch.nn.BatchNorm{1,2,3}d`` is accepted
  with bnkit's layer of the same rank in its place, and gives the module torch
  gives (``Conv2d`` with folded weights, ``ConvReLU2d``, ``ConvBn2d``,
  ``ConvBnReLU2d``, ``BNReLU2d``, ...).
* **Quantized-module mappings**: a stand-alone bnkit ``BatchNorm2d``/``3d``
  (and the frozen, renorm and ghost layers of those ranks) becomes
  ``torch.ao.nn.quantized.BatchNorm2d``/``3d`` on ``convert``, as torch's do.

How a bnkit layer enters a fused module (:func:`torch_batchnorm`):

* ``bnkit.BatchNorm1d/2d/3d`` with torch's layout (``axis=1``, per-channel
  ``weight``, with or without ``bias``): a ``torch.nn.BatchNorm{1,2,3}d`` holding the very
  same parameter and buffer tensors, so an optimizer built before fusing still
  trains them and the fused modules equal torch's exactly. For QAT this is
  torch's BN: the training from then on follows torch's rules (NaN/Inf
  batches propagate into the running statistics; bnkit's ``nonfinite``
  policy does not apply inside torch's fused modules).
* Any other bnkit layer with an inference form (``share_affine``, another
  ``axis`` of a channels-first model, frozen, renorm, ghost), in eval mode
  only: a torch BN stand-in computing its inference map ``x * scale + shift``
  (``running_mean = 0``, ``running_var = 1``, ``eps = 0``, ``weight = scale``,
  ``bias = shift``). QAT fusion of these layers raises ``ValueError`` naming
  the layer (torch's fused QAT modules train a plain BN, which would silently
  change what they compute).

FX graph mode (``prepare_qat_fx`` / ``prepare_fx`` / ``convert_fx``): torch's
FX quantizer traces through modules outside ``torch.nn`` and matches torch's
module types, so either

* pass ``prepare_custom_config=fx_prepare_custom_config()`` (bnkit's layers
  become leaf modules) and ``backend_config=fx_backend_config()`` (torch's
  native patterns plus the same patterns with bnkit's layers, fused by the
  fuser methods above) to ``prepare_qat_fx``/``prepare_fx`` and the same
  ``backend_config`` to ``convert_fx``: conv-BN patterns fuse as with torch's
  BN; a bnkit BN outside a pattern stays a float bnkit layer; or
* convert first with ``bnkit.convert(model, to="torch")`` (exact for the layers
  with a torch equivalent): then everything is torch's, stand-alone BNs included.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.ao.nn import quantized as nnq
from torch.ao.quantization import fuser_method_mappings, quantization_mappings

from .. import layers, variants
from ..tools._family import bn_affine
from ..tools.convert import _BNKIT_TO_TORCH, _swap
from ..variants.act import BatchNormAct, plain_activation

__all__ = [
    "BNKIT_BY_TORCH",
    "BN_ACT_BY_TORCH",
    "QuantizedBatchNorm2d",
    "QuantizedBatchNorm3d",
    "fx_backend_config",
    "fx_prepare_custom_config",
    "install",
    "torch_batchnorm",
]

_TORCH_BY_DIMS: dict[tuple[int, ...], type] = {
    (2, 3): nn.BatchNorm1d,
    (4,): nn.BatchNorm2d,
    (5,): nn.BatchNorm3d,
}

# bnkit layers standing where torch's BN of the same rank does in torch's fusion patterns.
BNKIT_BY_TORCH: dict[type, tuple[type, ...]] = {
    nn.BatchNorm1d: (
        layers.BatchNorm1d,
        variants.FrozenBatchNorm1d,
        variants.BatchRenorm1d,
        variants.GhostBatchNorm1d,
    ),
    nn.BatchNorm2d: (
        layers.BatchNorm2d,
        variants.FrozenBatchNorm2d,
        variants.BatchRenorm2d,
        variants.GhostBatchNorm2d,
    ),
    nn.BatchNorm3d: (
        layers.BatchNorm3d,
        variants.FrozenBatchNorm3d,
        variants.BatchRenorm3d,
        variants.GhostBatchNorm3d,
    ),
}


def _describe(bn: nn.Module) -> str:
    describe = getattr(bn, "_describe", None)
    return describe() if callable(describe) else type(bn).__name__


def _torch_class(bn: nn.Module) -> type | None:
    """The torch BN class of ``bn``'s computation: its own counterpart, or (the BN part of a BN+activation layer)
    torch's class of its rank."""
    if isinstance(bn, BatchNormAct):
        return _TORCH_BY_DIMS.get(bn._expected_dims)
    return _BNKIT_TO_TORCH.get(type(bn))


def _exact_reason(bn: nn.Module) -> str | None:
    """Why ``bn`` has no torch BN that shares its tensors (None: it has one)."""
    if _torch_class(bn) is None:
        return f"{type(bn).__name__} computes something torch's BatchNorm does not"
    if bn.axis != 1:
        return f"axis={bn.axis} (torch normalizes along axis 1)"
    if bn.share_affine != "none":
        return f"share_affine={bn.share_affine!r} (torch has per-channel weight and bias)"
    return None


def _stand_in(bn: nn.Module) -> nn.Module:
    """A torch BN in eval mode computing ``bn``'s inference map ``x * scale + shift``."""
    torch_cls = _TORCH_BY_DIMS.get(getattr(bn, "_expected_dims", None))
    if torch_cls is None or getattr(bn, "axis", 1) != 1:
        raise ValueError(
            f"bnkit quantization: {_describe(bn)} normalizes axis {getattr(bn, 'axis', '?')} of inputs of any rank; "
            "torch's fused modules need a channels-first BatchNorm1d/2d/3d"
        )
    scale, shift = bn_affine(bn)
    out = torch_cls(bn.num_features, eps=0.0, device=scale.device, dtype=scale.dtype)
    with torch.no_grad():
        out.weight.copy_(scale)
        out.bias.copy_(shift)
    out.eval()
    if hasattr(bn, "qconfig"):
        out.qconfig = bn.qconfig
    return out


def torch_batchnorm(bn: nn.Module, *, training: bool) -> nn.Module:
    """``bn`` as a ``torch.nn.BatchNorm{1,2,3}d`` for torch's quantization modules.

    Args:
        bn: a bnkit BN-family layer.
        training: the result will be trained (QAT fusion). Then only layers
            with an exact torch equivalent are accepted (they share their
            tensors with the result); otherwise an eval-mode layer with an
            inference form gives a stand-in computing that form.

    Raises:
        ValueError: naming the layer, when neither applies.
    """
    reason = _exact_reason(bn)
    if reason is None:
        out = _swap(bn, _torch_class(bn))
        if hasattr(bn, "qconfig"):
            out.qconfig = bn.qconfig
        return out
    if training:
        raise ValueError(
            f"fuse_modules_qat: {_describe(bn)} cannot be fused for quantization-aware training: {reason}. "
            "Fuse it in eval mode (torch.ao.quantization.fuse_modules on model.eval()) or fold it first "
            "with bnkit.fuse(model)"
        )
    if bn.training and not isinstance(bn, variants.FrozenBatchNorm):
        raise ValueError(
            f"fuse_modules: {_describe(bn)} is in training mode; only its eval-mode form can be fused "
            f"({reason}): call model.eval() first"
        )
    return _stand_in(bn)


def _wrap(fuser: Callable, positions: tuple[int, ...]) -> Callable:
    def fuse_bnkit(is_qat: bool, *mods: nn.Module):
        mods = list(mods)
        for i in positions:
            # QAT-fused modules train their BN later (prepare_qat): only an exact torch form will do.
            mods[i] = torch_batchnorm(mods[i], training=is_qat)
        return fuser(is_qat, *mods)

    fuse_bnkit.__name__ = f"bnkit_{getattr(fuser, '__name__', 'fuser')}"
    fuse_bnkit.__wrapped__ = fuser
    return fuse_bnkit


# bnkit's BN+activation layers (convert(fuse_activations=True), timm's BatchNormAct2d converted) by torch's BN rank.
BN_ACT_BY_TORCH: dict[type, tuple[type, ...]] = {
    nn.BatchNorm1d: (variants.BatchNormAct1d, variants.FrozenBatchNormAct1d),
    nn.BatchNorm2d: (variants.BatchNormAct2d, variants.FrozenBatchNormAct2d),
    nn.BatchNorm3d: (variants.BatchNormAct3d, variants.FrozenBatchNormAct3d),
}


def _split_bn_act(layer: nn.Module, is_qat: bool) -> tuple[nn.Module, nn.ReLU]:
    """A BN+ReLU layer as torch's ``(BatchNorm, ReLU)`` pair for torch's ``(X, BN, ReLU)`` fuser methods.

    The BN part enters as :func:`torch_batchnorm` makes it (a plain BN
    sharing its tensors, or the inference map of a frozen one in eval mode).
    Torch fuses a convolution or linear layer with BN and ReLU only, so any
    other tail is a ``ValueError``.
    """
    drop, act = layer._modules.get("drop"), layer._modules.get("act")
    if type(drop) is not nn.Identity or type(plain_activation(act)) is not nn.ReLU:
        raise ValueError(
            f"fuse_modules: {_describe(layer)} applies {type(act).__name__} (after {type(drop).__name__}); torch fuses "
            "a convolution or linear layer with BN and ReLU only. Convert it back first with "
            "bnkit.convert(model, to='torch') and fuse the (conv, BN) pair"
        )
    return torch_batchnorm(layer, training=is_qat), nn.ReLU()


def _wrap_bn_act(fuser: Callable) -> Callable:
    """torch's ``(X, BN, ReLU)`` fuser for the pair ``(X, BN+ReLU layer)``."""

    def fuse_bnkit_bn_act(is_qat: bool, first: nn.Module, layer: nn.Module):
        bn, relu = _split_bn_act(layer, is_qat)
        relu.train(bn.training)  # torch's fusers want the three in one mode
        return fuser(is_qat, first, bn, relu)

    fuse_bnkit_bn_act.__wrapped__ = fuser
    return fuse_bnkit_bn_act


def _bn_relu_patterns(table: dict) -> dict[tuple, Callable]:
    """``(X, BN+activation layer)`` for each ``(X, torch BN, ReLU)`` entry of a fuser table."""
    out: dict[tuple, Callable] = {}
    for key, fuser in table.items():
        if len(key) == 3 and key[1] in BN_ACT_BY_TORCH and key[2] is nn.ReLU and callable(fuser):
            for cls in BN_ACT_BY_TORCH[key[1]]:
                out[(key[0], cls)] = _wrap_bn_act(fuser)
    return out


def _fuser_entries() -> dict[tuple, Callable]:
    """torch's fuser-method table with bnkit's layers in place of torch's BN (every combination)."""
    entries: dict[tuple, Callable] = {}
    for key, fuser in list(fuser_method_mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD.items()):
        positions = tuple(i for i, t in enumerate(key) if t in BNKIT_BY_TORCH)
        if not positions or not callable(fuser):
            continue
        choices = [BNKIT_BY_TORCH[t] if i in positions else (t,) for i, t in enumerate(key)]
        for combo in itertools.product(*choices):
            entries[combo] = _wrap(fuser, positions)
    entries.update(_bn_relu_patterns(fuser_method_mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD))
    return entries


class _QuantizedFromBnkit:
    """``from_float`` for bnkit layers: torch's, applied to the layer's torch form."""

    @classmethod
    def from_float(cls, mod: nn.Module, use_precomputed_fake_quant: bool = False) -> Any:
        torch_bn = torch_batchnorm(mod, training=False)
        torch_bn.activation_post_process = mod.activation_post_process
        return super().from_float(torch_bn, use_precomputed_fake_quant=use_precomputed_fake_quant)


class QuantizedBatchNorm2d(_QuantizedFromBnkit, nnq.BatchNorm2d):
    """``torch.ao.nn.quantized.BatchNorm2d`` made from a bnkit layer by ``convert``."""


class QuantizedBatchNorm3d(_QuantizedFromBnkit, nnq.BatchNorm3d):
    """``torch.ao.nn.quantized.BatchNorm3d`` made from a bnkit layer by ``convert``."""


_QUANTIZED_BY_TORCH = {nn.BatchNorm2d: QuantizedBatchNorm2d, nn.BatchNorm3d: QuantizedBatchNorm3d}


def install() -> None:
    """Register bnkit's layers with torch's eager quantization tables (done on ``import bnkit``)."""
    table = fuser_method_mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD
    for key, fuser in _fuser_entries().items():
        table.setdefault(key, fuser)
    static = quantization_mappings.DEFAULT_STATIC_QUANT_MODULE_MAPPINGS
    for torch_cls, qcls in _QUANTIZED_BY_TORCH.items():
        for cls in BNKIT_BY_TORCH[torch_cls]:
            static.setdefault(cls, qcls)


# --------------------------------------------------------------------------- FX graph mode
def _bnkit_classes() -> list[type]:
    return [cls for table in (BNKIT_BY_TORCH, BN_ACT_BY_TORCH) for classes in table.values() for cls in classes]


def fx_prepare_custom_config(config: Any = None) -> Any:
    """A ``PrepareCustomConfig`` (``config`` or a new one) under which FX keeps bnkit's layers as leaf modules."""
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig

    config = PrepareCustomConfig() if config is None else config
    return config.set_non_traceable_module_classes(list(config.non_traceable_module_classes) + _bnkit_classes())


def fx_backend_config(base: Any = None) -> Any:
    """``base`` (default: torch's native backend config) plus its BN fusion patterns with bnkit's layers.

    Every pattern of ``base`` that has a torch BN *and* a fuser method (conv-BN,
    conv-BN-ReLU, linear-BN, BN-ReLU, ...) is added once per combination of
    bnkit layers of the same rank, fused by :func:`torch_batchnorm` and then
    torch's own fuser method, so the fused modules are torch's.
    """
    from torch.ao.quantization.backend_config import (
        BackendConfig,
        BackendPatternConfig,
        get_native_backend_config,
    )

    base = get_native_backend_config() if base is None else base
    extra = []
    for cfg in base.configs:
        spec = cfg.to_dict()
        pattern, fuser = spec.get("pattern"), spec.get("fuser_method")
        if not isinstance(pattern, tuple) or fuser is None:
            continue
        positions = tuple(i for i, t in enumerate(pattern) if t in BNKIT_BY_TORCH)
        if not positions:
            continue
        choices = [BNKIT_BY_TORCH[t] if i in positions else (t,) for i, t in enumerate(pattern)]
        for combo in itertools.product(*choices):
            extra.append(BackendPatternConfig.from_dict({**spec, "pattern": combo, "fuser_method": _wrap(fuser, positions)}))
        if len(pattern) == 3 and pattern[1] in BN_ACT_BY_TORCH and pattern[2] is nn.ReLU:
            for cls in BN_ACT_BY_TORCH[pattern[1]]:  # (X, BN+ReLU layer): fused as (X, BN, ReLU)
                extra.append(BackendPatternConfig.from_dict(
                    {**spec, "pattern": (pattern[0], cls), "fuser_method": _wrap_bn_act(fuser)}))
    out = BackendConfig(f"{base.name}+bnkit")
    return out.set_backend_pattern_configs(list(base.configs) + extra)
