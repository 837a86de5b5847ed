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

The model is traced with :mod:`torch.fx` (BN-family layers and
:class:`Affine` as leaf modules), so the result of a traced model is a
``torch.fx.GraphModule``. When tracing fails (data-dependent control flow,
...) the children are fused instead: an ``nn.Sequential`` by its adjacent
pairs, any other module child by child (recursively, each child traced on its
own first), and a BN left over becomes an :class:`Affine`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from ._family import bn_affine, bn_axis, is_bn

__all__ = ["Affine", "FuseReport", "FusedPair", "UnfusedBN", "fuse"]


# --------------------------------------------------------------------------- Affine
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
        return affine_call(input, self.scale, self.shift, self.axis)

    def extra_repr(self) -> str:
        return f"{self.num_features}, axis={self.axis}"


# --------------------------------------------------------------------------- report
@dataclass
class FusedPair:
    """One BN folded into a layer: ``position`` is ``"after"`` (layer -> BN) or ``"before"`` (BN -> layer)."""

    bn: str
    layer: str
    position: str
    note: str = ""

    def __str__(self) -> str:
        s = f"{self.layer} -> {self.bn}" if self.position == "after" else f"{self.bn} -> {self.layer}"
        return s + (f" ({self.note})" if self.note else "")


@dataclass
class UnfusedBN:
    """A BN that was not folded: ``replaced_by`` is ``"Affine"`` or ``None`` (kept as it is)."""

    bn: str
    reason: str
    replaced_by: str | None

    def __str__(self) -> str:
        kept = f"replaced by {self.replaced_by}" if self.replaced_by else "kept"
        return f"{self.bn}: {kept} ({self.reason})"


@dataclass
class FuseReport:
    """What :func:`fuse` did: folded pairs, BN layers not folded (with reasons), how each part was walked."""

    fused: list[FusedPair] = field(default_factory=list)
    unfused: list[UnfusedBN] = field(default_factory=list)
    #: (module name, "fx" | "sequential" | "children", note) for each part of the model.
    methods: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def num_fused(self) -> int:
        return len(self.fused)

    def __str__(self) -> str:
        lines = [f"fused {len(self.fused)} BN layer(s), {len(self.unfused)} not fused"]
        lines += [f"  fused    {p}" for p in self.fused]
        lines += [f"  unfused  {u}" for u in self.unfused]
        for name, method, note in self.methods:
            lines.append(f"  {name or '<root>'}: {method}" + (f" ({note})" if note else ""))
        return "\n".join(lines)


# --------------------------------------------------------------------------- folding math
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


def _out_axis_ok(layer: nn.Module, axis: int, num_features: int, ranks: set[int] | None) -> tuple[str | None, str]:
    """``(why not, note)``: whether a BN after ``layer`` normalizes the layer's output channels."""
    if _channels(layer, "out") != num_features:
        return f"{num_features} features but the layer has {_channels(layer, 'out')} output channels", ""
    return _axis_check(layer, axis, ranks)


def _fold_after(layer: nn.Module, scale: Tensor, shift: Tensor) -> None:
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


def _fold_before(layer: nn.Module, scale: Tensor, shift: Tensor) -> None:
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


def _before_ok(layer: nn.Module, axis: int, num_features: int, ranks: set[int] | None) -> tuple[str | None, str]:
    """``(why not, note)``: whether a BN with feature ``axis`` folds into the following ``layer``."""
    if _channels(layer, "in") != num_features:
        return f"{num_features} features but the layer has {_channels(layer, 'in')} input channels", ""
    why, note = _axis_check(layer, axis, ranks)
    if why is not None or isinstance(layer, nn.Linear):
        return why, note
    if isinstance(layer, _CONV_TRANSPOSES):
        if any(k != 1 for k in layer.kernel_size) or any(s != 1 for s in layer.stride):
            return "a transposed convolution reads its input with varying multiplicity unless kernel=1 and stride=1", ""
        return None, ""
    pad = layer.padding
    if isinstance(pad, str):
        if pad == "valid" or all(d * (k - 1) == 0 for d, k in zip(layer.dilation, layer.kernel_size)):
            return None, ""
        return "padding='same' pads the BN output with values that are not shifted", ""
    if any(p != 0 for p in pad):
        return f"padding={tuple(pad)}: padded positions would not carry the BN shift", ""
    return None, ""


def _foldable_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear,) + _CONVS + _CONV_TRANSPOSES) and type(m).forward in (
        nn.Linear.forward,
        *(c.forward for c in _CONVS + _CONV_TRANSPOSES),
    )


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


def _try_affine(bn: nn.Module) -> tuple[Affine | None, str]:
    if isinstance(bn, Affine):
        return bn, ""
    try:
        return Affine.from_bn(bn), ""
    except RuntimeError as e:
        return None, str(e)


# --------------------------------------------------------------------------- fx path
def _node_affine(bn: nn.Module, node: torch.fx.Node) -> tuple[Tensor, Tensor]:
    """The inference map of one call of ``bn``; extra constant arguments (e.g. ``site=i``) go to ``inference_affine``."""
    if not node.args or not isinstance(node.args[0], torch.fx.Node):
        raise RuntimeError("the BN call has no traced input")
    extra, kwargs = node.args[1:], dict(node.kwargs)
    if not extra and not kwargs:
        return bn_affine(bn)
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
        try:
            scale, shift = _node_affine(bn, node)
        except (RuntimeError, TypeError, ValueError, IndexError) as e:
            report.unfused.append(UnfusedBN(name, str(e), None))
            continue
        axis = bn_axis(bn)
        # From here on the call is the per-channel map of its first argument.
        node.args, node.kwargs = node.args[:1], {}
        # layer -> BN
        prev = node.args[0]
        reason_prev = "the BN input is not the output of a Conv/ConvTranspose/Linear module"
        if isinstance(prev, torch.fx.Node) and prev.op == "call_module" and _foldable_layer(modules[prev.target]):
            reason_prev, note = _out_axis_ok(modules[prev.target], axis, scale.numel(), ctx.ranks.get(id(bn)))
            if reason_prev is None and len(prev.users) != 1:
                reason_prev = f"the output of {_join(prefix, prev.target)} has other users"
            if reason_prev is None:
                layer_name = _join(prefix, prev.target)
                _fold_after(own_layer(prev), scale, shift)
                node.replace_all_uses_with(prev)
                gm.graph.erase_node(node)
                report.fused.append(FusedPair(name, layer_name, "after", note))
                continue
        # BN -> layer
        users = list(node.users)
        reason_next = "the BN output does not go only to a Conv/ConvTranspose/Linear module"
        if len(users) == 1:
            nxt = users[0]
            if nxt.op == "call_module" and _foldable_layer(modules[nxt.target]) and single_input_call(nxt, node):
                reason_next, note = _before_ok(modules[nxt.target], axis, scale.numel(), ctx.ranks.get(id(bn)))
                if reason_next is None:
                    layer_name = _join(prefix, nxt.target)
                    _fold_before(own_layer(nxt), scale, shift)
                    node.replace_all_uses_with(prev)
                    gm.graph.erase_node(node)
                    report.fused.append(FusedPair(name, layer_name, "before", note))
                    continue
        elif len(users) > 1:
            reason_next = "the BN output has several users"
        unfused[node] = (_why(reason_prev, reason_next), scale, shift)

    # What is left becomes one Affine op per call site.
    for node, (reason, scale, shift) in unfused.items():
        bn = modules[node.target]
        name = _join(prefix, node.target)
        if isinstance(bn, Affine):
            report.unfused.append(UnfusedBN(name, reason, "Affine"))
            continue
        aff = Affine(scale, shift, bn_axis(bn))
        aff.training = bn.training
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
            try:
                scale, shift = bn_affine(m)
            except RuntimeError as e:
                report.unfused.append(UnfusedBN(full, str(e), None))
                i += 1
                continue
            axis = bn_axis(m)
            prev_name = next((n for n in reversed(names[:i]) if n not in removed), None)
            nxt_name = names[i + 1] if i + 1 < len(names) else None
            reasons = []
            # Fold into the previous layer's output channels, else into the next layer's inputs.
            for side, other, check, fold_into, where in (
                ("after", prev_name, _out_axis_ok, _fold_after, "previous"),
                ("before", nxt_name, _before_ok, _fold_before, "next"),
            ):
                layer = seq._modules[other] if other is not None else None
                if layer is None or not _foldable_layer(layer):
                    reasons.append(f"the {where} child is not a Conv/ConvTranspose/Linear")
                    continue
                reason, note = check(layer, axis, scale.numel(), ctx.ranks.get(id(m)))
                reasons.append(reason)
                if reason is None:
                    fold_into(own(other), scale, shift)
                    del seq._modules[name]
                    removed.add(name)
                    report.fused.append(FusedPair(full, _join(prefix, other), side, note))
                    break
            else:
                if not isinstance(m, Affine):
                    seq._modules[name] = Affine.from_bn(m)
                report.unfused.append(UnfusedBN(full, _why(*reasons), "Affine"))
        else:
            seq._modules[name] = _fuse_any(m, _join(prefix, name), ctx)
        i += 1


def _fuse_any(module: nn.Module, prefix: str, ctx: _Ctx) -> nn.Module:
    """Fuse ``module``: fx when it traces, otherwise its children."""
    report = ctx.report
    if is_bn(module):
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

    The fused model computes the eval-mode original up to rounding (folds are
    computed in float64 and cast to each layer's dtype). It is an inference
    model: folded layers have no BN left, so ``train()`` does not bring batch
    statistics back. Modules reachable more than once (shared layers) are
    copied before a fold changes them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse: expected an nn.Module, got {type(model).__name__}")
    _check_eval(model)
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
    return (fused, ctx.report) if report else fused
