"""Shared pieces of both fuse passes: the BN-like layer helpers, the walker context and the one fold decision (:func:`_decide`)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from torch import Tensor, nn

from ..family import bn_form, bn_tail, frozen_affine
from ._family import bn_affine, bn_axis
from ._family import is_bn as _is_bn_layer
from .affine import Affine
from .fold import before_ok, out_axis_ok
from .fuse_report import FuseReport


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

