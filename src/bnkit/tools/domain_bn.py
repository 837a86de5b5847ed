"""Per-domain BN in a model: :func:`convert_domain_bn`, :func:`set_domain` / :func:`domain`, :func:`select_domain`.

How a domain reaches the layers: a model whose ``forward`` passes
``domain=`` to its :class:`~bnkit.DomainBatchNorm` layers needs nothing
else; any other model (a torchvision/timm network after
:func:`convert_domain_bn`) sets the *current domain* of all its per-domain
layers, which they use when called without ``domain``::

    bnkit.set_domain(model, d)          # until changed (d: an int or an int64 (N,) tensor)
    with bnkit.domain(model, d):        # for a block, then the previous domains come back
        y = model(x)

A per-sample tensor must match each call's batch size (a model that
reshapes its batch needs ints, or its own ``domain=`` plumbing).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator

import torch
from torch import nn

from .. import layers
from ..family import TORCH_BATCHNORM, check_initialized, ranked
from ..surgery import replace_modules
from ..variants.domain import DomainBatchNorm

__all__ = ["convert_domain_bn", "domain", "domain_layers", "select_domain", "set_domain"]

_TORCH_CLASSES = {torch_cls: dims for dims, (torch_cls, _) in TORCH_BATCHNORM.items()}
_BNKIT_CLASSES = {ranked(layers.BatchNorm, dims): dims for dims in TORCH_BATCHNORM} | {layers.BatchNorm: None}


def domain_layers(model: nn.Module) -> list[DomainBatchNorm]:
    """The :class:`~bnkit.DomainBatchNorm` layers of ``model`` (each once)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    seen: dict[int, DomainBatchNorm] = {}
    for m in model.modules():
        if isinstance(m, DomainBatchNorm):
            seen.setdefault(id(m), m)
    return list(seen.values())


def set_domain(model: nn.Module, domain: Any) -> nn.Module:
    """Set the current domain of every :class:`~bnkit.DomainBatchNorm` in ``model``; returns ``model``.

    ``domain``: an int, an int64 ``(N,)`` tensor (per sample) or ``None``
    (clear: calls without ``domain=`` then raise, unless a layer has one
    domain). Checked against every layer before any is set (an out-of-range
    domain changes nothing). ``ValueError`` when the model has no such layer.
    """
    found = domain_layers(model)
    if not found:
        raise ValueError("set_domain: the model has no DomainBatchNorm layer (see bnkit.convert_domain_bn)")
    previous = [m.current_domain for m in found]
    try:
        for m in found:
            m.set_domain(domain)
    except Exception:
        for m, p in zip(found, previous):
            m.__dict__["current_domain"] = p
        raise
    return model


@contextlib.contextmanager
def domain(model: nn.Module, domain: Any) -> Iterator[nn.Module]:
    """``with bnkit.domain(model, d):`` the model's per-domain layers use domain ``d``; the previous ones come back after."""
    found = domain_layers(model)
    previous = [m.current_domain for m in found]
    set_domain(model, domain)
    try:
        yield model
    finally:
        for m, p in zip(found, previous):
            m.__dict__["current_domain"] = p


def _check_convertible(m: nn.Module, name: str) -> None:
    where = f"convert_domain_bn: {name or 'the model'} ({type(m).__name__})"
    if isinstance(m, layers.BatchNorm):
        problems = []
        if m.share_affine != "none":
            problems.append(f"share_affine={m.share_affine!r}")
        if getattr(m, "convention", "torch") != "torch":
            problems.append(f"convention={m.convention!r}")
        if getattr(m, "tiny_batch", "raise") != "raise":
            problems.append(f"tiny_batch={m.tiny_batch!r}")
        if problems:
            raise ValueError(f"{where} has options DomainBatchNorm does not take: {', '.join(problems)}; nothing was changed")


def _is_plain_bn(m: nn.Module) -> bool:
    return type(m) in _TORCH_CLASSES or type(m) in _BNKIT_CLASSES


@torch.no_grad()
def _domain_copy(bn: nn.Module, num_domains: int, shared_affine: bool) -> DomainBatchNorm:
    dims = _TORCH_CLASSES.get(type(bn), _BNKIT_CLASSES.get(type(bn)))
    axis = getattr(bn, "axis", 1) if isinstance(bn, layers.BatchNorm) else 1
    ref = bn.running_mean if bn.running_mean is not None else bn.weight
    factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    new = ranked(DomainBatchNorm, dims)(
        bn.num_features, num_domains, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
        shared_affine=shared_affine, bias=bn.affine and bn.bias is not None, axis=axis,
        nonfinite=getattr(bn, "nonfinite", "skip"), **factory,
    )
    if bn.affine:
        for name in ("weight", "bias"):
            src, dst = getattr(bn, name), getattr(new, name)
            if src is not None:
                dst.copy_(src.reshape(-1).expand(bn.num_features) if shared_affine else src.reshape(1, -1).expand_as(dst))
                dst.requires_grad_(src.requires_grad)
    if bn.track_running_stats:
        new.running_mean.copy_(bn.running_mean.unsqueeze(0).expand_as(new.running_mean))
        new.running_var.copy_(bn.running_var.unsqueeze(0).expand_as(new.running_var))
        new.num_batches_tracked.fill_(int(bn.num_batches_tracked))
    new.train(bn.training)
    return new


def convert_domain_bn(
    model: nn.Module, num_domains: int, *, shared_affine: bool = False, inplace: bool = False
) -> nn.Module:
    """Replace every plain BN layer of ``model`` by a :class:`~bnkit.DomainBatchNorm` with its values in every domain.

    ``torch.nn.BatchNorm1d/2d/3d`` and ``bnkit.BatchNorm`` / ``BatchNorm1d/2d/3d``
    become ``DomainBatchNorm`` of the same rank (and feature axis) whose
    ``D`` domains all start from the layer's running statistics,
    ``num_batches_tracked`` and affine parameters (one shared ``[C]`` copy
    with ``shared_affine=True``), with its ``eps``, ``momentum``, training
    flag and hooks. So in eval the converted model computes the original for
    every domain, until training makes the domains differ. Other layers
    (subclasses, variants, SyncBatchNorm, frozen layers) are left as they
    are. The new parameters are new tensors: build the optimizer after
    converting. Returns the converted model (a deep copy unless ``inplace``).
    """
    check_initialized(model, "convert_domain_bn")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_domain_bn: expected an nn.Module, got {type(model).__name__}")
    if isinstance(num_domains, bool) or not isinstance(num_domains, int) or num_domains <= 0:
        raise ValueError(f"convert_domain_bn: num_domains must be a positive int, got {num_domains!r}")
    if not isinstance(shared_affine, bool):
        raise TypeError(f"convert_domain_bn: shared_affine must be a bool, got {shared_affine!r}")
    if not inplace:
        model = copy.deepcopy(model)
    return replace_modules(
        model, _is_plain_bn, lambda m, _name: _domain_copy(m, num_domains, shared_affine), _check_convertible
    )


@torch.no_grad()
def _plain_copy(m: DomainBatchNorm, d: int) -> layers.BatchNorm:
    ref = m.running_mean if m.running_mean is not None else m.weight
    factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    new = ranked(layers.BatchNorm, m.expected_dims)(
        m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, bias=m.bias is not None,
        axis=m.axis, nonfinite=m.nonfinite, **factory,
    )
    weight, bias = m.domain_parameters(d)
    for name, src in (("weight", weight), ("bias", bias)):
        if src is not None:
            getattr(new, name).copy_(src)
    if m.track_running_stats:
        new.running_mean.copy_(m.running_mean[d])
        new.running_var.copy_(m.running_var[d])
        new.num_batches_tracked.fill_(int(m.num_batches_tracked[d]))
    new.train(m.training)
    return new


def select_domain(model: nn.Module, domain: int) -> nn.Module:
    """A copy of ``model`` whose :class:`~bnkit.DomainBatchNorm` layers are plain bnkit BN layers of ``domain``.

    Each becomes ``bnkit.BatchNorm`` of the same rank and axis holding domain
    ``domain``'s running statistics, count and affine parameters (copies), so
    in eval it computes what the per-domain model computes on data of that
    domain, and :func:`bnkit.fuse` / ``inference_affine`` work on it as on any
    BN model. ``model`` itself is not changed.
    """
    if isinstance(domain, bool) or not isinstance(domain, int):
        raise TypeError(f"select_domain: domain must be an int, got {type(domain).__name__}")
    found = domain_layers(model)
    if not found:
        raise ValueError("select_domain: the model has no DomainBatchNorm layer")
    bad = [m for m in found if not 0 <= domain < m.num_domains]
    if bad:
        raise IndexError(f"select_domain: domain {domain} is out of range for {bad[0].describe()}")
    model = copy.deepcopy(model)
    return replace_modules(model, lambda m: isinstance(m, DomainBatchNorm), lambda m, _name: _plain_copy(m, domain))
