"""Where :func:`bnkit.convert` can fuse a BN layer with the activation after it (``fuse_activations=True``).

Two places are found. In an ``nn.Sequential``, a BN layer followed by an
activation module. In any other module, whose ``forward`` is traced once with
``torch.fx`` (every child a leaf), a BN child whose output goes to one place
only, a call of an activation child on it alone (``self.relu(self.bn1(x))``;
``nn.Identity`` children called in between, timm's ``drop_block`` placeholders,
are looked through):

* an activation called only there becomes an ``nn.Identity`` (it moves into
  the fused layer), like the ``nn.Sequential`` slot;
* a clamp (ReLU, ReLU6, Hardtanh) called at other places too (torchvision's
  ``BasicBlock`` calls its one ``relu`` after ``bn1`` and after the residual
  sum) becomes its :func:`~bnkit.variants.act.after_fused_bn` form, which the
  fused layer hands its output to.

A ``forward`` that does not trace (data-dependent control flow), functional
activations (``F.relu(self.bn(x))``) and a BN output that also goes
elsewhere are left unfused, and so is a BN layer with forward or backward
hooks (they would see the activated output): the layer is converted all
the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx
from torch import nn

from ..variants.act import fusable_activation

__all__ = ["FusionSite", "fusion_sites"]


@dataclass(frozen=True)
class FusionSite:
    """One BN layer to fuse: the activation module, its name, and what its slot in the parent becomes."""

    act: nn.Module
    act_name: str  # qualified name in the model
    act_key: str  # its key in the parent (``bn`` and the activation are siblings)
    #: "sequential" (the next module of an nn.Sequential), "identity" (a child called only after this BN layer)
    #: or "shared" (a clamp child called at other places too)
    slot: str


def _qualified(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key


def _sequential_sites(parent_name: str, seq: nn.Sequential, wanted, sites: dict[int, FusionSite]) -> None:
    items = list(seq._modules.items())
    for (_, bn), (key, act) in zip(items, items[1:]):
        if bn is None or act is None or not wanted(bn) or id(bn) in sites:
            continue
        if fusable_activation(act) is not None:
            sites[id(bn)] = FusionSite(act, _qualified(parent_name, key), key, "sequential")


class _ChildrenAsLeaves(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _sole_call(node: torch.fx.Node, children) -> torch.fx.Node | None:
    """The one user of ``node`` when it is a call of a child module on ``node`` alone, else ``None``."""
    users = list(node.users)
    if len(users) != 1:
        return None
    (call,) = users
    if call.op != "call_module" or call.target not in children or call.args != (node,) or call.kwargs:
        return None
    return call


def _is_bare_identity(m: nn.Module) -> bool:
    return type(m) is nn.Identity and not (m._forward_hooks or m._forward_pre_hooks)


def _traced_sites(parent_name: str, parent: nn.Module, wanted, counts: dict[int, int],
                  sites: dict[int, FusionSite]) -> None:
    children = parent._modules
    if not any(m is not None and wanted(m) for m in children.values()):
        return
    if not any(m is not None and fusable_activation(m) is not None for m in children.values()):
        return
    try:
        graph = _ChildrenAsLeaves().trace(parent)
    except Exception:  # a forward fx cannot trace: nothing is fused there, the layers still convert
        return
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in children:
            continue
        bn = children[node.target]
        if bn is None or not wanted(bn) or id(bn) in sites or calls[node.target] != 1 or counts[id(bn)] != 1:
            continue
        call = _sole_call(node, children)
        # nn.Identity placeholders between them (timm's drop_block=None) pass the activated output on unchanged
        while call is not None and _is_bare_identity(children[call.target]):
            call = _sole_call(call, children)
        if call is None:
            continue
        act = children[call.target]
        spec = fusable_activation(act)
        if spec is None or counts[id(act)] != 1:
            continue
        if calls[call.target] == 1:
            slot = "identity"
        elif spec[0] == "clamp":
            slot = "shared"
        else:  # SiLU or Hardswish applied twice would compute something else where the hand-over is missed
            continue
        sites[id(bn)] = FusionSite(act, _qualified(parent_name, call.target), call.target, slot)


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._backward_hooks or m._backward_pre_hooks)


def fusion_sites(model: nn.Module, wanted) -> dict[int, FusionSite]:
    """``{id(bn): FusionSite}`` for each BN layer ``wanted(bn)`` accepts that can be fused with its activation.

    A layer with forward or backward hooks is not fused: they would see the activated output and its gradient.
    """
    accepts = wanted
    wanted = lambda m: accepts(m) and not _hooked(m)  # noqa: E731
    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    sites: dict[int, FusionSite] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Sequential):
            _sequential_sites(name, m, wanted, sites)
        else:
            _traced_sites(name, m, wanted, counts, sites)
    return sites
