"""Freeze every BN layer of a model to its inference map, and back: :func:`freeze`, :func:`unfreeze`.

``freeze(model)`` replaces each BN layer (torch's ``BatchNorm1d/2d/3d``,
``SyncBatchNorm``, lazy layers once initialized; bnkit's :class:`BatchNorm`
family and its variants) by a :class:`bnkit.FrozenBatchNorm` holding the same
values as buffers: outputs equal the replaced layer's eval outputs, in train
mode too, and no gradient reaches gamma/beta. The standard recipe for
fine-tuning with small batches. :class:`bnkit.SharedBatchNorm` becomes a
:class:`bnkit.FrozenSharedBatchNorm` (still called with ``site=``).

Each frozen layer remembers the layer it replaced (its class and every
non-tensor attribute: constructor arguments such as ``momentum``, ``axis``,
``share_affine``, ``virtual_batch_size``, ``r_max`` ...; and each parameter's
``requires_grad``), so ``unfreeze(model)`` rebuilds layers of the original
classes whose parameters are fresh ``nn.Parameter`` objects holding the
frozen values (an optimizer built before ``freeze`` must be rebuilt). A
frozen layer made directly (or loaded from a state_dict) unfreezes to the
matching :class:`bnkit.BatchNorm` class.

Parents are edited in their ``_modules`` only, so their hooks and every
other module are untouched; hooks registered on a BN layer itself move to its
replacement (and back). A layer used at several places stays one shared layer.
Nothing is changed when an error is raised (the whole model is checked
before any replacement).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from .. import layers
from ..family import bn_form, bn_tail, is_torch_bn, ranked, still_lazy, torch_dims
from ..surgery import CALL_HOOK_DICTS, replace_modules
from ..variants import FrozenBatchNorm, FrozenSharedBatchNorm, SharedBatchNorm
from ..variants.act import BatchNormAct, FrozenBatchNormAct

__all__ = ["freeze", "unfreeze", "frozen_copy", "unfrozen_copy", "is_freezable"]

# Hooks registered on a layer's calls follow it.
_HOOK_DICTS = CALL_HOOK_DICTS
# Attributes of nn.Module's own machinery that are not part of the remembered layer.
_TENSOR_DICTS = ("_parameters", "_buffers", "_modules")

_REMEMBERED = "_bnkit_unfrozen_form"


def is_freezable(module: nn.Module) -> bool:
    """True for the layers :func:`freeze` converts: torch's ``_BatchNorm`` and bnkit's ``BatchNorm`` family."""
    return (is_torch_bn(module) or isinstance(module, layers.BatchNorm)) and not isinstance(module, FrozenBatchNorm)


def _expected_dims(bn: nn.Module) -> tuple[int, ...] | None:
    if isinstance(bn, layers.BatchNorm):
        return bn.expected_dims
    return torch_dims(bn)  # SyncBatchNorm and other subclasses: None, any rank


def _qualname(m: nn.Module) -> str:
    cls = type(m)
    return cls.__qualname__ if cls.__module__.startswith(("torch.", "bnkit.")) else f"{cls.__module__}.{cls.__qualname__}"


def _check_freezable(bn: nn.Module, name: str) -> None:
    where = f"freeze: {name or 'the model'} ({type(bn).__name__})"
    form = bn_form(bn)
    if form is not None and form.kind == "unknown":
        raise ValueError(
            f"freeze: layer {name or '<root>'!r} ({_qualname(bn)}) cannot be frozen without changing what it "
            f"computes: {form.reason}. Nothing was changed."
        )
    if still_lazy(bn):
        raise ValueError(f"{where} is a lazy layer that has not seen an input yet, so it has no values to freeze")
    if not isinstance(getattr(bn, "running_mean", None), Tensor) or not isinstance(
        getattr(bn, "running_var", None), Tensor
    ):
        raise ValueError(
            f"{where} has no running statistics (track_running_stats=False): its eval output uses batch "
            "statistics, so it has no frozen form"
        )


def _remember(bn: nn.Module) -> dict[str, Any]:
    """Everything needed to rebuild ``bn`` except its tensors (values come from the frozen layer)."""
    attrs = {
        k: copy.copy(v) for k, v in bn.__dict__.items() if k not in _TENSOR_DICTS and k not in _HOOK_DICTS
    }
    return {
        "cls": type(bn),
        "attrs": attrs,
        "params": {k: (None if p is None else p.requires_grad) for k, p in bn._parameters.items()},
        "buffers": list(bn._buffers),
        "modules": dict(bn._modules),
    }


@torch.no_grad()
def frozen_copy(bn: nn.Module) -> FrozenBatchNorm:
    """The frozen form of one BN layer (values copied, hooks not moved)."""
    _check_freezable(bn, "")
    c = int(bn.num_features)
    axis = int(getattr(bn, "axis", 1))
    weight = getattr(bn, "weight", None)
    bias = getattr(bn, "bias", None)
    device, dtype = bn.running_mean.device, bn.running_mean.dtype
    tail = bn_tail(bn)
    if tail:
        # BN followed by children (timm's BatchNormAct2d): the frozen map, then the same children.
        frozen = ranked(FrozenBatchNormAct, _expected_dims(bn))(c, bn.eps, device=device, dtype=dtype, axis=axis)
        frozen._modules.clear()
        frozen._modules.update(tail)
        frozen.bn_tail = tuple(n for n, _ in tail)
    elif isinstance(bn, SharedBatchNorm):
        frozen: FrozenBatchNorm = FrozenSharedBatchNorm(
            c, bn.sites, bn.eps, device=device, dtype=dtype, share_stats=bn.share_stats, axis=axis
        )
    else:
        cls = ranked(FrozenBatchNorm, _expected_dims(bn))
        frozen = cls(c, bn.eps, device=device, dtype=dtype, axis=axis)
    frozen._buffers["weight"] = None if weight is None else weight.detach().clone()
    frozen._buffers["bias"] = None if bias is None else bias.detach().clone()
    frozen._buffers["running_mean"] = bn.running_mean.detach().clone()
    frozen._buffers["running_var"] = bn.running_var.detach().clone()
    nbt = getattr(bn, "num_batches_tracked", None)
    frozen._buffers["num_batches_tracked"] = None if nbt is None else nbt.detach().clone()
    for name, b in bn._buffers.items():  # a variant's own state (Keras-convention Batch Renorm's running_std):
        if name not in frozen._buffers and b is not None:  # carried, so the state_dict keys stay the same
            frozen._buffers[name] = b.detach().clone()
    frozen.train(bn.training)
    frozen.__dict__[_REMEMBERED] = _remember(bn)
    return frozen


def _default_form(frozen: nn.Module) -> dict[str, Any]:
    """A bnkit layer matching a frozen layer that has no remembered original (bnkit's, or timm's/torchvision's)."""
    weight, bias = frozen.weight, frozen.bias
    c = int(getattr(frozen, "num_features", None) or frozen.running_mean.shape[-1])
    share = "none"
    if weight is not None and weight.numel() == 1 and c != 1:
        share = "all" if bias is not None and bias.numel() == 1 else "weight"
    kwargs: dict[str, Any] = dict(
        eps=frozen.eps,
        affine=weight is not None,
        bias=bias is not None or weight is None,
        axis=getattr(frozen, "axis", 1),
        share_affine=share,
        device=frozen.running_mean.device,
        dtype=frozen.running_mean.dtype,
    )
    if isinstance(frozen, FrozenSharedBatchNorm):
        return {"cls": SharedBatchNorm, "args": (c, frozen.sites), "kwargs": dict(kwargs, share_stats=frozen.share_stats)}
    if isinstance(frozen, FrozenBatchNorm):
        dims = frozen.expected_dims
    else:  # timm's FrozenBatchNormAct2d, torchvision's FrozenBatchNorm2d
        dims = bn_form(frozen).dims
    base = BatchNormAct if bn_tail(frozen) else layers.BatchNorm
    return {"cls": ranked(base, dims), "args": (c,), "kwargs": kwargs}


@torch.no_grad()
def unfrozen_copy(frozen: nn.Module) -> nn.Module:
    """The trainable layer a frozen one came from, holding the frozen values (hooks not moved)."""
    form = frozen.__dict__.get(_REMEMBERED)
    tail = bn_tail(frozen)
    values = {
        "weight": frozen.weight,
        "bias": frozen.bias,
        "running_mean": frozen.running_mean,
        "running_var": frozen.running_var,
        "num_batches_tracked": getattr(frozen, "num_batches_tracked", None),
    }
    values.update({k: b for k, b in frozen._buffers.items() if k not in values and b is not None})  # frozen_copy's extras
    if form is None:
        spec = _default_form(frozen)
        bn = spec["cls"](*spec["args"], **spec["kwargs"])
        for name, p in bn._parameters.items():
            if p is not None and values.get(name) is not None:
                bn._parameters[name] = nn.Parameter(values[name].detach().clone())
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            if bn._buffers.get(name) is not None and values[name] is not None:
                bn._buffers[name] = values[name].detach().clone()
        if tail:
            bn._modules.clear()
            bn._modules.update(tail)
            bn.bn_tail = tuple(n for n, _ in tail)
        bn.train(frozen.training)
        return bn
    cls = form["cls"]
    bn = cls.__new__(cls)
    bn.__dict__.update({k: copy.copy(v) for k, v in form["attrs"].items()})
    bn.__dict__["_modules"] = dict(form["modules"], **dict(tail))  # the frozen layer's current children
    bn.__dict__["_parameters"] = {
        k: None if rg is None or values.get(k) is None else nn.Parameter(values[k].detach().clone(), requires_grad=rg)
        for k, rg in form["params"].items()
    }
    bn.__dict__["_buffers"] = {
        k: None if values.get(k) is None else values[k].detach().clone() for k in form["buffers"]
    }
    fresh = nn.Module().__dict__
    for k in _HOOK_DICTS:
        if k in fresh and k not in bn.__dict__:
            bn.__dict__[k] = fresh[k]
    bn.train(frozen.training)
    return bn


def freeze(model: nn.Module) -> nn.Module:
    """Replace every torch/bnkit BN layer of ``model`` by a :class:`~bnkit.FrozenBatchNorm` with the same values.

    The model is edited in place and returned (when ``model`` is itself a BN
    layer, its frozen form is returned). Raises ``ValueError``, changing
    nothing, when a BN layer has no running statistics, is an uninitialized
    lazy layer, or is a subclass that overrides ``forward`` in a way bnkit
    does not know (see :func:`bnkit.family.bn_form`). A layer followed by
    children (timm's ``BatchNormAct2d``: ``drop``, ``act``) becomes a
    :class:`bnkit.variants.FrozenBatchNormAct` holding the same children.
    Already frozen layers are left as they are.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"freeze: expected an nn.Module, got {type(model).__name__}")
    return replace_modules(model, is_freezable, lambda m, _: frozen_copy(m), _check_freezable)


def unfreeze(model: nn.Module) -> nn.Module:
    """Convert every :class:`~bnkit.FrozenBatchNorm` of ``model`` back to a trainable layer.

    Layers made by :func:`freeze` get back their original class and
    attributes, with ``nn.Parameter`` gamma/beta holding the current frozen
    values (and their original ``requires_grad``); others (including timm's
    ``FrozenBatchNormAct2d`` and torchvision's ``FrozenBatchNorm2d``) become
    the matching :class:`bnkit.BatchNorm` class (:class:`bnkit.variants.BatchNormAct2d`
    with the same ``drop``/``act`` when there is a tail), equal in eval mode.
    Edited in place and returned.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"unfreeze: expected an nn.Module, got {type(model).__name__}")
    return replace_modules(model, _is_unfreezable, lambda m, _: unfrozen_copy(m))


def _is_unfreezable(module: nn.Module) -> bool:
    if isinstance(module, FrozenBatchNorm):
        return True
    form = bn_form(module)  # timm's FrozenBatchNormAct2d, torchvision's FrozenBatchNorm2d, registered classes
    return form is not None and form.kind == "frozen"
