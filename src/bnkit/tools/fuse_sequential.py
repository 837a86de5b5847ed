"""The fallback pass of :func:`bnkit.fuse` for untraceable models: ``nn.Sequential`` by adjacent pairs, other modules child by child (:func:`_fuse_any`)."""

from __future__ import annotations

import copy

from torch import nn

from .affine import Affine
from .fold import fold_after, fold_before, foldable_layer
from .fuse_common import (
    _affine,
    _as_affine,
    _Ctx,
    _decide,
    _join,
    _Neighbour,
    _tail,
    _then_tail,
    _try_affine,
    _unknown,
    is_bn,
)
from .fuse_fx import _fuse_fx, _trace
from .fuse_report import FusedPair, UnfusedBN


# --------------------------------------------------------------------------- fallback
def _fuse_sequential(seq: nn.Sequential, prefix: str, ctx: _Ctx) -> None:
    report = ctx.report

    def own(name: str) -> nn.Module:
        m = seq._modules[name]
        if id(m) in ctx.shared:
            m = copy.deepcopy(m)
            seq._modules[name] = m
        return m

    names = list(seq._modules.keys())
    i = 0
    removed: set[str] = set()
    while i < len(names):
        name = names[i]
        m = seq._modules[name]
        if name in removed or m is None:
            i += 1
            continue
        if is_bn(m):
            full = _join(prefix, name)
            why = _unknown(m)
            if why is not None:
                report.unfused.append(UnfusedBN(full, why, None))
                i += 1
                continue
            try:
                scale, shift = _affine(m)
            except RuntimeError as e:
                report.unfused.append(UnfusedBN(full, str(e), None))
                i += 1
                continue
            prev_name = next((n for n in reversed(names[:i]) if n not in removed), None)
            nxt_name = names[i + 1] if i + 1 < len(names) else None

            def neighbour(other: str | None, where: str) -> _Neighbour:
                layer = seq._modules[other] if other is not None else None
                if layer is None or not foldable_layer(layer):
                    return _Neighbour(None, f"the {where} child is not a Conv/ConvTranspose/Linear")
                return _Neighbour(layer)

            tail = _tail(m)
            nxt = neighbour(nxt_name, "next")
            if tail:
                nxt = _Neighbour(None, f"the layer applies {'/'.join(n for n, _ in tail)} after the normalization")
            side, note = _decide(m, scale, neighbour(prev_name, "previous"), nxt, ctx)
            if side is None:
                if not isinstance(m, Affine):
                    seq._modules[name] = _then_tail(_as_affine(m), m)
                report.unfused.append(UnfusedBN(full, note, "Affine"))
            else:
                other = prev_name if side == "after" else nxt_name
                (fold_after if side == "after" else fold_before)(own(other), scale, shift)
                rest = _then_tail(None, m)
                if rest is None:
                    del seq._modules[name]
                    removed.add(name)
                else:  # the activation (and drop) stay, right after the fused layer
                    seq._modules[name] = rest
                report.fused.append(FusedPair(full, _join(prefix, other), side, note))
        else:
            seq._modules[name] = _fuse_any(m, _join(prefix, name), ctx)
        i += 1


def _fuse_any(module: nn.Module, prefix: str, ctx: _Ctx) -> nn.Module:
    """Fuse ``module``: fx when it traces, otherwise its children."""
    report = ctx.report
    if is_bn(module):
        why_unknown = _unknown(module)
        if why_unknown is not None:
            report.unfused.append(UnfusedBN(prefix, why_unknown, None))
            return module
        aff, why = _try_affine(module)
        reason = "a lone BN module (no adjacent layer visible)"
        report.unfused.append(UnfusedBN(prefix, reason if aff is not None else why, "Affine" if aff is not None else None))
        return aff if aff is not None else module
    if not any(is_bn(m) for m in module.modules()):
        return module
    try:
        gm = _trace(module)
    except Exception as e:  # noqa: BLE001 - any tracing failure sends us to the fallback
        note = f"fx tracing failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    else:
        return _fuse_fx(gm, prefix, ctx)
    if isinstance(module, nn.Sequential):
        report.methods.append((prefix, "sequential", note))
        _fuse_sequential(module, prefix, ctx)
        return module
    report.methods.append((prefix, "children", note))
    for name, child in list(module._modules.items()):
        if child is not None:
            module._modules[name] = _fuse_any(child, _join(prefix, name), ctx)
    return module
