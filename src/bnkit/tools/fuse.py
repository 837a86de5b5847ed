"""Fold BN into adjacent linear layers for inference: :func:`fuse`.

In eval mode a BN layer is the per-channel affine map ``y = x * s + t`` (see
:meth:`bnkit.BatchNorm.inference_affine`). :func:`fuse` removes it:

* **layer -> BN** (exact for any padding, stride, dilation, groups, padding
  mode): ``Conv{1,2,3}d``, ``ConvTranspose{1,2,3}d`` (weight layout
  ``[in, out/groups, ...]``) and ``Linear`` get ``W' = W * s`` along their
  output channels and ``b' = b * s + t``.
* **BN -> layer** (exact when every output position sums over real input
  values only): ``Linear``; ``Conv`` with zero padding (any kernel, stride,
  dilation, groups); ``ConvTranspose`` with kernel 1 and stride 1. The layer
  gets ``W' = W * s`` along its *input* channels (per group) and
  ``b' = b + sum W * t``.
* anything else (e.g. BN after a residual add, BN -> ReLU) with a fixed
  inference form becomes one :class:`Affine` op; BN without one (e.g.
  ``track_running_stats=False``) is left as it is.

BN subclasses (:func:`bnkit.family.bn_form`): a layer followed by children
(timm's ``BatchNormAct2d``: ``drop``, then ``act``) folds into the preceding
layer only, and its place is taken by its children, so the activation stays
after the fused conv (unfused: an :class:`Affine` followed by them). Frozen
layers of other libraries (timm's ``FrozenBatchNormAct2d``, torchvision's
``FrozenBatchNorm2d``) fold the same way. A subclass that overrides
``forward`` in a way bnkit does not know is left as it is, named in the
report and in a warning.

The model is traced with :mod:`torch.fx` (BN-family layers and
:class:`Affine` as leaf modules), so the result of a traced model is a
``torch.fx.GraphModule``. When tracing fails (data-dependent control flow,
...) the children are fused instead: an ``nn.Sequential`` by its adjacent
pairs, any other module child by child (recursively, each child traced on its
own first), and a BN left over becomes an :class:`Affine`.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from .._warn import warn
from ..family import bn_form, bn_tail, frozen_affine
from ._family import bn_affine, bn_axis
from ._family import is_bn as _is_bn_layer
from .affine import Affine
from .fold import before_ok, fold_after, fold_before, foldable_layer, out_axis_ok
from .fuse_report import FusedPair, FuseReport, UnfusedBN

__all__ = ["Affine", "FuseReport", "FusedPair", "UnfusedBN", "fuse"]


# --------------------------------------------------------------------------- BN-like layers
def _is_foreign_frozen(m: nn.Module) -> bool:
    """timm's FrozenBatchNormAct2d, torchvision's FrozenBatchNorm2d and registered frozen classes."""
    if _is_bn_layer(m):
        return False
    form = bn_form(m)
    return form is not None and form.kind == "frozen"


def is_bn(m: nn.Module) -> bool:
    """The layers fuse folds (or leaves, naming them): bnkit's and torch's BN family and foreign frozen BN."""
    return _is_bn_layer(m) or _is_foreign_frozen(m)


def _axis(m: nn.Module) -> int:
    return 1 if _is_foreign_frozen(m) else bn_axis(m)


def _affine(m: nn.Module) -> tuple[Tensor, Tensor]:
    """The inference map of the normalization part (a tail of children is not included)."""
    if _is_foreign_frozen(m):
        return frozen_affine(m)
    form = bn_form(m)
    if form is not None and form.kind == "unknown":
        raise RuntimeError(form.reason)
    return bn_affine(m)


def _tail(m: nn.Module) -> list[tuple[str, nn.Module]]:
    """The children applied after the normalization that do something (``nn.Identity`` dropped)."""
    return [(n, c) for n, c in bn_tail(m) if not isinstance(c, nn.Identity)]


def _then_tail(core: nn.Module | None, m: nn.Module) -> nn.Module | None:
    """What replaces ``m``: ``core`` (an Affine, or None once folded) followed by ``m``'s tail, in one module."""
    tail = _tail(m)
    if not tail:
        return core
    return nn.Sequential(OrderedDict(([("bn", core)] if core is not None else []) + tail))


def _unknown(m: nn.Module) -> str | None:
    form = bn_form(m)
    return form.reason if form is not None and form.kind == "unknown" else None


# --------------------------------------------------------------------------- walking
def _check_eval(model: nn.Module) -> None:
    # Layers that learn statistics (they have a momentum) compute something else in training mode;
    # frozen ones (FrozenBatchNorm, Affine) are the same in both modes.
    training = [
        name or "<root>" for name, m in model.named_modules() if is_bn(m) and m.training and hasattr(m, "momentum")
    ]
    if training:
        shown = ", ".join(training[:5]) + (" ..." if len(training) > 5 else "")
        raise ValueError(
            f"fuse: BN layers must be in eval mode (inference form), but {len(training)} are training: {shown}. "
            "Call model.eval() first."
        )


def _try_affine(bn: nn.Module) -> tuple[nn.Module | None, str]:
    if isinstance(bn, Affine):
        return bn, ""
    try:
        aff = _as_affine(bn)
    except RuntimeError as e:
        return None, str(e)
    return _then_tail(aff, bn), ""


def _as_affine(bn: nn.Module) -> Affine:
    aff = Affine(*_affine(bn), _axis(bn))
    aff.training = bn.training
    return aff


@dataclass
class _Neighbour:
    """A layer next to a BN, as the walker sees it: foldable (``layer``) or not (``why_not``)."""

    layer: nn.Module | None
    why_not: str = ""
    #: a reason found by the walker that holds even when the fold algebra agrees (e.g. other users)
    obstacle: str | None = None


def _decide(bn: nn.Module, scale: Tensor, before: _Neighbour, after: _Neighbour, ctx: "_Ctx") -> tuple[str | None, str]:
    """The one decision of both walkers: ``("after" | "before", note)`` or ``(None, why not)``.

    Folding into the preceding layer (``layer -> BN``) is preferred; the
    following layer (``BN -> layer``) is tried next.
    """
    axis, n, ranks = _axis(bn), scale.numel(), ctx.ranks.get(id(bn))
    reasons = []
    for side, nb, check in (("after", before, out_axis_ok), ("before", after, before_ok)):
        if nb.layer is None:
            reasons.append(nb.why_not)
            continue
        reason, note = check(nb.layer, axis, n, ranks)
        if reason is None and nb.obstacle is not None:
            reason = nb.obstacle
        if reason is None:
            return side, note
        reasons.append(reason)
    return None, _why(*reasons)


# --------------------------------------------------------------------------- fx path
def _node_affine(bn: nn.Module, node: torch.fx.Node) -> tuple[Tensor, Tensor]:
    """The inference map of one call of ``bn``; extra constant arguments (e.g. ``site=i``) go to ``inference_affine``."""
    if not node.args or not isinstance(node.args[0], torch.fx.Node):
        raise RuntimeError("the BN call has no traced input")
    extra, kwargs = node.args[1:], dict(node.kwargs)
    if not extra and not kwargs:
        return _affine(bn)
    if any(isinstance(a, torch.fx.Node) for a in (*extra, *kwargs.values())):
        raise RuntimeError("the BN call has non-constant extra arguments")
    if not callable(getattr(bn, "inference_affine", None)):
        raise RuntimeError("the BN call has extra arguments")
    scale, shift = bn.inference_affine(*extra, **kwargs)
    c = int(bn.num_features)
    return scale.detach().reshape(-1).expand(c), shift.detach().reshape(-1).expand(c)


class _LeafBNTracer(torch.fx.Tracer):
    """A tracer that keeps BN-family layers (and :class:`Affine`) as single ``call_module`` nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_bn(m) or isinstance(m, Affine):
            return True
        return super().is_leaf_module(m, module_qualified_name)


@dataclass
class _Ctx:
    report: FuseReport
    #: ids of modules reachable more than once in the model (copied before folding).
    shared: set[int]
    #: id(BN layer) -> ranks of its inputs on example_inputs (empty without them).
    ranks: dict[int, set[int]]


def _why(reason_prev: str, reason_next: str) -> str:
    return f"preceding layer: {reason_prev}; following layer: {reason_next}"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    tracer = _LeafBNTracer()
    graph = tracer.trace(model)
    gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.training = model.training  # the flag only: submodules keep their own
    return gm


def _fuse_fx(gm: torch.fx.GraphModule, prefix: str, ctx: _Ctx) -> nn.Module:
    report = ctx.report
    modules = dict(gm.named_modules())

    def uses_of(target: str) -> int:
        return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == target)

    def own_layer(node: torch.fx.Node) -> nn.Module:
        """The layer called by ``node``, copied under a new name when other nodes call it too."""
        target = node.target
        if uses_of(target) == 1 and id(modules[target]) not in ctx.shared:
            return modules[target]
        layer = copy.deepcopy(modules[target])
        i = 0
        while f"{target}_fused{i}" in modules:
            i += 1
        new_target = f"{target}_fused{i}"
        gm.add_submodule(new_target, layer)
        modules[new_target] = layer
        node.target = new_target
        return layer

    def is_bn_node(n: torch.fx.Node) -> bool:
        return n.op == "call_module" and is_bn(modules[n.target])

    def single_input_call(n: torch.fx.Node, src: torch.fx.Node) -> bool:
        return len(n.args) == 1 and n.args[0] is src and not n.kwargs

    unfused: dict[torch.fx.Node, tuple[str, Tensor, Tensor]] = {}
    for node in list(gm.graph.nodes):
        if not is_bn_node(node):
            continue
        bn = modules[node.target]
        name = _join(prefix, node.target)
        why = _unknown(bn)
        if why is not None:
            report.unfused.append(UnfusedBN(name, why, None))
            continue
        try:
            scale, shift = _node_affine(bn, node)
        except (RuntimeError, TypeError, ValueError, IndexError) as e:
            report.unfused.append(UnfusedBN(name, str(e), None))
            continue
        # From here on the call is the per-channel map of its first argument.
        node.args, node.kwargs = node.args[:1], {}
        prev = node.args[0]
        before = _Neighbour(None, "the BN input is not the output of a Conv/ConvTranspose/Linear module")
        if isinstance(prev, torch.fx.Node) and prev.op == "call_module" and foldable_layer(modules[prev.target]):
            other_users = f"the output of {_join(prefix, prev.target)} has other users"
            before = _Neighbour(modules[prev.target], obstacle=other_users if len(prev.users) != 1 else None)
        users = list(node.users)
        after = _Neighbour(None, "the BN output does not go only to a Conv/ConvTranspose/Linear module")
        tail = _tail(bn)
        if tail:
            after = _Neighbour(None, f"the layer applies {'/'.join(n for n, _ in tail)} after the normalization")
        elif len(users) > 1:
            after = _Neighbour(None, "the BN output has several users")
        elif users and users[0].op == "call_module" and foldable_layer(modules[users[0].target]):
            if single_input_call(users[0], node):
                after = _Neighbour(modules[users[0].target])
        side, note = _decide(bn, scale, before, after, ctx)
        if side is None:
            unfused[node] = (note, scale, shift)
            continue
        other = prev if side == "after" else users[0]
        layer_name = _join(prefix, other.target)  # before own_layer may rename a shared layer's copy
        (fold_after if side == "after" else fold_before)(own_layer(other), scale, shift)
        rest = _then_tail(None, bn)
        if rest is None:
            node.replace_all_uses_with(prev)
            gm.graph.erase_node(node)
        else:  # the activation (and drop) stay, now right after the fused layer
            target = node.target
            if uses_of(target) != 1:
                i = 0
                while f"{target}_tail{i}" in modules:
                    i += 1
                target = f"{target}_tail{i}"
                node.target = target
            gm.add_submodule(target, rest)
            modules[target] = rest
        report.fused.append(FusedPair(name, layer_name, side, note))

    # What is left becomes one Affine op per call site.
    for node, (reason, scale, shift) in unfused.items():
        bn = modules[node.target]
        name = _join(prefix, node.target)
        if isinstance(bn, Affine):
            report.unfused.append(UnfusedBN(name, reason, "Affine"))
            continue
        aff = Affine(scale, shift, _axis(bn))
        aff.training = bn.training
        aff = _then_tail(aff, bn)
        target = node.target
        if uses_of(target) != 1:
            i = 0
            while f"{target}_affine{i}" in modules:
                i += 1
            target = f"{target}_affine{i}"
            node.target = target
        gm.add_submodule(target, aff)
        modules[target] = aff
        report.unfused.append(UnfusedBN(name, reason, "Affine"))
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    report.methods.append((prefix, "fx", ""))
    return gm


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


def _input_ranks(model: nn.Module, example_inputs: Any) -> dict[int, set[int]]:
    """Run ``model`` once and record the rank of every BN-family layer's input."""
    ranks: dict[int, set[int]] = {}
    handles = []

    def hook(module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], Tensor):
            ranks.setdefault(id(module), set()).add(args[0].dim())

    for m in model.modules():
        if is_bn(m):
            handles.append(m.register_forward_pre_hook(hook))
    try:
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        model(*args)
    finally:
        for h in handles:
            h.remove()
    return ranks


def fuse(model: nn.Module, inplace: bool = False, *, report: bool = False, example_inputs: Any = None):
    """Fold every BN layer of an eval-mode model into an adjacent Conv/ConvTranspose/Linear where exact.

    Args:
        model: a module whose BN-family layers that learn statistics are in
            eval mode (``model.eval()``); ``ValueError`` otherwise. Frozen
            layers (no ``momentum``) may be in either mode.
        inplace: work on ``model`` itself (its submodules are modified; use the
            returned model) instead of a deep copy.
        report: also return the :class:`FuseReport`.
        example_inputs: optional input (a tensor, or a tuple of positional
            arguments) the model is run on once to learn the rank of every BN
            input. Without it, a ``BatchNorm1d``-style layer (axis 1) next to a
            ``Linear`` is assumed to see 2-D ``(N, C)`` input (noted in the
            report); with it, the fold happens only when that is verified.

    Returns:
        The fused model, or ``(model, report)`` with ``report=True``; the
        report is also the ``fuse_report`` attribute of the returned model.
        A model that can be traced comes back as a ``torch.fx.GraphModule``
        (hooks on it and on traced-through submodules, and its own methods,
        do not carry over; leaf modules keep theirs). Otherwise the model's
        own class is kept and its children are fused.

    BN subclasses: see the module docstring (an activation after the BN
    stays after the fused layer; unknown subclasses are left and warned
    about).

    The fused model computes the eval-mode original up to rounding (folds are
    computed in float64 and cast to each layer's dtype). It is an inference
    model: folded layers have no BN left, so ``train()`` does not bring batch
    statistics back. Modules reachable more than once (shared layers) are
    copied before a fold changes them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse: expected an nn.Module, got {type(model).__name__}")
    _check_eval(model)
    unknown = [(n, _unknown(m)) for n, m in model.named_modules() if is_bn(m) and _unknown(m) is not None]
    if not inplace:
        model = copy.deepcopy(model)
    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    shared = {i for i, c in counts.items() if c > 1}
    ctx = _Ctx(FuseReport(), shared, {})
    with torch.no_grad():
        if example_inputs is not None:
            ctx.ranks = _input_ranks(model, example_inputs)
        fused = _fuse_any(model, "", ctx)
    fused.fuse_report = ctx.report
    if unknown:
        shown = "; ".join(f"{n or '<root>'!r} ({why})" for n, why in unknown[:5])
        warn(f"fuse: left {len(unknown)} BN subclass layer(s) as they are (not folded): {shown}")
    return (fused, ctx.report) if report else fused
