"""The torch.fx pass of :func:`bnkit.fuse`: trace with BN layers as leaves and fold along the graph (:func:`_fuse_fx`)."""

from __future__ import annotations

import copy

import torch
import torch.fx
from torch import Tensor, nn

from .affine import Affine
from .fold import fold_after, fold_before, foldable_layer
from .fuse_common import _affine, _axis, _Ctx, _decide, _join, _Neighbour, _tail, _then_tail, _unknown, is_bn
from .fuse_report import FusedPair, UnfusedBN


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

    def install(node: torch.fx.Node, module: nn.Module, suffix: str, rename: bool = False) -> None:
        """Make ``node`` call ``module``: at its target, or under a fresh ``{target}_{suffix}{i}``.

        A fresh name when ``rename`` or when other nodes call the target too (they keep the old module).
        """
        target = node.target
        if rename or uses_of(target) != 1:
            i = 0
            while f"{target}_{suffix}{i}" in modules:
                i += 1
            target = node.target = f"{target}_{suffix}{i}"
        gm.add_submodule(target, module)
        modules[target] = module

    def own_layer(node: torch.fx.Node) -> nn.Module:
        """The layer called by ``node``, copied under a new name when other nodes call it too."""
        target = node.target
        if uses_of(target) == 1 and id(modules[target]) not in ctx.shared:
            return modules[target]
        layer = copy.deepcopy(modules[target])
        install(node, layer, "fused", rename=True)
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
            install(node, rest, "tail")
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
        install(node, _then_tail(aff, bn), "affine")
        report.unfused.append(UnfusedBN(name, reason, "Affine"))
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    report.methods.append((prefix, "fx", ""))
    return gm
