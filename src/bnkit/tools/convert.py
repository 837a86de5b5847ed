"""Swap BN layers between torch and bnkit: :func:`convert`.

``torch.nn.BatchNorm1d/2d/3d`` <-> ``bnkit.BatchNorm1d/2d/3d``. The new layer
takes over the old layer's parameter and buffer *objects* (so
``requires_grad``, device, dtype, ``num_batches_tracked`` and, with
``inplace=True``, an optimizer's references are kept), its ``training`` flag,
its hook dictionaries (hooks registered on the layer keep firing and their
handles still remove them) and its ``momentum``/``eps``. Parent modules are
edited with ``setattr``, so hooks on them are untouched. Outputs and
``state_dict`` (keys, values and the version metadata) are equal.

Subclasses are converted only where the result computes the same
(:func:`bnkit.family.bn_form`): a torch subclass that keeps torch's
``forward`` becomes the bnkit class of its rank; timm's ``BatchNormAct2d``
(BN, then ``drop``, then ``act``) becomes :class:`bnkit.variants.BatchNormAct2d`
holding the same ``drop``/``act`` modules. Both remember the class they came
from, so ``to="torch"`` gives it back. Everything else (SyncBatchNorm, frozen and parametrized
layers, subclasses that override ``forward``, bnkit's variants going to
torch) is left as it is, and named with the reason in the
:class:`ConvertReport` (and a warning unless ``report=True``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from .. import layers
from .._warn import warn
from ..family import TORCH_BATCHNORM, BNForm, bn_form, bn_tail, is_torch_bn, ranked, still_lazy, torch_dims
from ..surgery import (
    CALL_HOOK_DICTS,
    STATE_HOOK_DICTS,
    carry_extras,
    copy_model,
    rebuild,
    replace_modules,
    snapshot,
    take_over_tensors,
)
from ..variants.act import (
    BatchNormAct,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    after_fused_bn,
    plain_activation,
)
from .act_pairs import fusion_sites

__all__ = ["ConvertReport", "convert"]

_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# Where a bnkit layer made by convert() keeps the torch subclass it came from (for to="torch").
_ORIGIN = "_bnkit_torch_origin"
_ACT_CLASSES = (BatchNormAct1d, BatchNormAct2d, BatchNormAct3d)
# Marks a BatchNormAct that convert(fuse_activations=True) made from a BN layer and the activation after it:
# True in an nn.Sequential (whose next slot became an nn.Identity), else ("identity" | "shared", the key of the
# activation's slot beside it in the parent). to="torch" puts the activation back.
_FUSED = "_bnkit_fused_activation"

_TORCH_TO_BNKIT: dict[type, type] = {torch_cls: ranked(layers.BatchNorm, dims) for dims, (torch_cls, _) in TORCH_BATCHNORM.items()}
_BNKIT_TO_TORCH: dict[type, type] = {v: k for k, v in _TORCH_TO_BNKIT.items()}
# Lazy layers that have not seen an input yet (num_features 0) become the other library's lazy class.
_LAZY_TO_BNKIT: dict[type, type] = {
    torch_lazy: getattr(layers, "Lazy" + ranked(layers.BatchNorm, dims).__name__)
    for dims, (_, torch_lazy) in TORCH_BATCHNORM.items()
}
_LAZY_TO_TORCH: dict[type, type] = {v: k for k, v in _LAZY_TO_BNKIT.items()}


def _check_torch_compatible(bn: layers.BatchNorm, name: str) -> None:
    problems = []
    if bn.axis != 1:
        problems.append(f"axis={bn.axis} (torch normalizes along axis 1)")
    if bn.share_affine != "none":
        problems.append(f"share_affine={bn.share_affine!r} (torch has per-channel weight and bias)")
    if getattr(bn, "convention", "torch") != "torch":
        problems.append(f"convention={bn.convention!r} (torch averages the unbiased batch variance)")
    if problems:
        raise ValueError(f"convert(to='torch'): {name or 'the model'} ({bn.describe()}) has no torch equivalent: " + "; ".join(problems))


def _swap(old: nn.Module, new_cls: type) -> nn.Module:
    """A ``new_cls`` layer that takes over ``old``'s tensors and flags (hooks: :func:`replace_modules`)."""
    ref = old.running_mean if old.running_mean is not None else old.weight
    dtype = None if ref is None else ref.dtype
    if issubclass(new_cls, LazyModuleMixin):  # no num_features yet: the lazy constructor, on the tensors' device
        new = new_cls(affine=old.affine, track_running_stats=old.track_running_stats,
                      device=None if ref is None else ref.device, dtype=dtype)
        # The old layer's own first-call and load hooks stay behind (replace_modules moves only the user's);
        # the new layer's are registered again after the move (_arm_lazy).
        for hook in ("_initialize_hook", "_load_hook"):
            if hasattr(old, hook):
                getattr(old, hook).remove()
    else:  # built on the meta device: the real tensors are taken over from ``old`` below
        new = new_cls(old.num_features, affine=old.affine, track_running_stats=old.track_running_stats,
                      device="meta", dtype=dtype)
    # eps and momentum are assigned after construction, as a torch layer may hold values bnkit's constructor
    # refuses (eps=0, momentum=1.5): they behave as torch's there (eps=0 fails in training, as torch's does).
    new.eps, new.momentum = old.eps, old.momentum
    take_over_tensors(new, old, _TENSORS)
    new.train(old.training)
    return new


@dataclass
class ConvertReport:
    """What :func:`convert` did: ``converted`` ``(name, old class, new class)`` and ``left`` ``(name, class, why)``."""

    to: str
    converted: list[tuple[str, str, str]] = field(default_factory=list)
    left: list[tuple[str, str, str]] = field(default_factory=list)
    #: ``(BN layer, activation)`` names fused by ``fuse_activations=True`` (or split again by ``to="torch"``)
    fused: list[tuple[str, str]] = field(default_factory=list)

    def summary(self, limit: int | None = None) -> str:
        n, k = len(self.converted), len(self.left)
        text = f"convert(to={self.to!r}): converted {n} of {n + k} BN layers"
        if self.fused:
            text += f"; {'fused' if self.to == 'bnkit' else 'split'} {len(self.fused)} BN + activation pairs"
        if k:
            shown = self.left if limit is None else self.left[:limit]
            text += f"; left {k}: " + "; ".join(f"{name or '<root>'!r} ({cls}): {why}" for name, cls, why in shown)
            if len(shown) < k:
                text += f"; ... ({k - len(shown)} more; pass report=True for the full list)"
        return text

    def __str__(self) -> str:
        return self.summary()


def _qualname(m: nn.Module) -> str:
    cls = type(m)
    return cls.__qualname__ if cls.__module__.startswith(("torch.", "bnkit.")) else f"{cls.__module__}.{cls.__qualname__}"


def _is_bnkit(m: nn.Module) -> bool:
    return not is_torch_bn(m) and callable(getattr(m, "inference_affine", None))


_PARAMETRIZED = "a parametrized layer (torch.nn.utils.parametrize): convert the model before registering the parametrizations"


def _plan_bnkit(m: nn.Module, form: BNForm) -> tuple[type | None, str]:
    """``(bnkit class, "")`` for a torch-side layer that converts exactly, else ``(None, why not)``."""
    if form.kind == "unknown":
        return None, form.reason
    if form.kind == "frozen":
        return None, "a frozen layer (a fixed affine map): convert swaps trainable BN layers (bnkit.unfreeze makes it one)"
    if isinstance(m, nn.SyncBatchNorm):
        return None, "a SyncBatchNorm: use bnkit.convert_sync_batchnorm"
    if parametrize.is_parametrized(m):  # its tensors live in m.parametrizations, behind properties of its class
        return None, _PARAMETRIZED
    if still_lazy(m):
        if type(m) in _LAZY_TO_BNKIT:
            return _LAZY_TO_BNKIT[type(m)], ""
        return None, "a lazy layer that has not seen an input yet (a subclass of torch's lazy classes)"
    dims = torch_dims(m)
    if dims is None:
        return None, "no fixed input rank (not a BatchNorm1d/2d/3d)"
    return ranked(BatchNormAct if form.tail else layers.BatchNorm, dims), ""


def _to_bnkit(old: nn.Module, cls: type, form: BNForm) -> nn.Module:
    new = _swap(old, cls)
    if issubclass(cls, BatchNormAct):
        new._modules.clear()
        new._modules.update(bn_tail(old, form))  # the very modules: their parameters and hooks stay
        new.bn_tail = form.tail
    carry_extras(new, old, _TENSORS)  # a subclass's own children and tensors: in the state_dict, and back with to="torch"
    if type(old) not in _TORCH_TO_BNKIT and type(old) not in _LAZY_TO_BNKIT:
        new.__dict__[_ORIGIN] = snapshot(old)
    return new


def _to_torch(old: nn.Module) -> nn.Module:
    origin = old.__dict__.get(_ORIGIN)
    if origin is None:
        return _swap(old, _BNKIT_TO_TORCH.get(type(old)) or _LAZY_TO_TORCH[type(old)])
    # Rebuilt as the subclass it came from: its own attributes, the current values and children.
    new = rebuild(origin, old, (*old._parameters, *old._buffers), old._modules)
    new.eps, new.momentum = old.eps, old.momentum
    new.training = old.training  # the layer's own flag: its children keep theirs
    return new


def _plan(model: nn.Module, to: str) -> tuple[dict[int, Any], ConvertReport]:
    """``{id(layer): target}`` (a bnkit class, or ``"torch"``) and the report, raising on layers that cannot go to torch."""
    targets: dict[int, Any] = {}
    rep = ConvertReport(to)
    for name, m in model.named_modules():
        form = bn_form(m)
        if form is None:
            continue
        if to == "bnkit":
            if _is_bnkit(m):
                continue
            cls, why = _plan_bnkit(m, form)
            if cls is None:
                rep.left.append((name, _qualname(m), why))
            else:
                targets[id(m)] = cls
                rep.converted.append((name, _qualname(m), cls.__name__))
            continue
        if not _is_bnkit(m):
            continue
        if type(m) in _BNKIT_TO_TORCH or type(m) in _ACT_CLASSES or type(m) in _LAZY_TO_TORCH:
            _check_torch_compatible(m, name)
            origin = m.__dict__.get(_ORIGIN)
            if _FUSED in m.__dict__:
                act_slot = _fused_slot(model, name, m)
                torch_cls = _BNKIT_TO_TORCH[ranked(layers.BatchNorm, m.expected_dims)]
                targets[id(m)] = (torch_cls, act_slot)
                rep.converted.append((name, _qualname(m), torch_cls.__name__))
                rep.fused.append((name, act_slot))
                continue
            if origin is None and type(m) in _ACT_CLASSES:
                raise ValueError(
                    f"convert(to='torch'): layer {name or '<root>'!r} ({m.describe()}) has no torch equivalent: "
                    "torch has no BN layer with an activation (it was not converted from one, e.g. timm's BatchNormAct2d)"
                )
            targets[id(m)] = "torch"
            torch_cls = _BNKIT_TO_TORCH.get(type(m)) or _LAZY_TO_TORCH.get(type(m))
            new_name = (torch_cls if origin is None else origin["cls"]).__name__
            rep.converted.append((name, _qualname(m), new_name))
        elif type(m) in (layers.BatchNorm, layers.LazyBatchNorm):
            # Not skipped silently: the generic layer accepts any rank (and any axis),
            # while each torch class accepts fixed ranks with channels on axis 1.
            raise ValueError(
                f"convert(to='torch'): layer {name or '<root>'!r} ({m._describe()}, axis={m.axis}) is the generic "
                "bnkit.BatchNorm, which has no torch equivalent (torch's BatchNorm1d/2d/3d take fixed ranks with "
                "the features on axis 1); use bnkit.BatchNorm1d/2d/3d for layers that should convert"
            )
        elif parametrize.is_parametrized(m):
            rep.left.append((name, _qualname(m), _PARAMETRIZED))
        else:
            rep.left.append((name, _qualname(m), "a bnkit layer with no torch class (a variant, or frozen)"))
    return targets, rep


def _arm_lazy(m: nn.Module) -> None:
    """A lazy layer made by convert gets its own first-call hook (first among the pre-hooks, as when it is
    constructed) and load hook; the hook dictionaries it has are those moved over from the layer it replaced."""
    for hook in ("_initialize_hook", "_load_hook"):
        getattr(m, hook).remove()
    m._initialize_hook = m.register_forward_pre_hook(m._infer_parameters, with_kwargs=True, prepend=True)
    m._load_hook = m._register_load_state_dict_pre_hook(m._lazy_load_hook)


def _fused_slot(model: nn.Module, name: str, layer: nn.Module) -> str:
    """The name of the slot where the activation of the fused layer ``name`` goes back (the ``nn.Identity`` after
    it in its ``nn.Sequential``, the ``nn.Identity`` beside it, or the shared activation it hands its output to),
    or ``ValueError``."""
    how = layer.__dict__[_FUSED]
    parent_name, _, key = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    keys = list(parent._modules)
    if how is True:
        nxt = keys.index(key) + 1 if isinstance(parent, nn.Sequential) and key in keys else len(keys)
        slot, what = (keys[nxt] if nxt < len(keys) else None), "the nn.Identity that took the activation's place"
    else:
        slot = how[1]
        what = (f"the nn.Identity that took the activation's place ({slot!r})" if how[0] == "identity"
                else f"the shared activation {slot!r} beside it")
    present = parent._modules.get(slot) if slot is not None else None
    ok = present is layer.act if how is not True and how[0] == "shared" else type(present) is nn.Identity
    if not ok:
        raise ValueError(
            f"convert(to='torch'): layer {name!r} was fused with its activation by convert(fuse_activations=True), "
            f"but {what} is gone"
        )
    return f"{parent_name}.{slot}" if parent_name else slot


def convert(
    model: nn.Module, to: str = "bnkit", inplace: bool = False, *, report: bool = False,
    fuse_activations: bool = False,
):
    """Replace every torch BN layer by its bnkit counterpart (``to="bnkit"``), or back (``to="torch"``).

    Args:
        model: any module (a BN layer itself is converted too).
        to: ``"bnkit"`` (``torch.nn.BatchNorm{1,2,3}d`` -> ``bnkit.BatchNorm{1,2,3}d``) or
            ``"torch"`` (the reverse).
        inplace: edit ``model`` itself; otherwise a deep copy is converted.
        report: also return the :class:`ConvertReport` (converted and left
            layers, with the reasons). Without it, layers that are left are
            named in a ``UserWarning``.
        fuse_activations: (``to="bnkit"``) where a converted BN layer's
            output goes only to ``nn.ReLU``, ``nn.ReLU6``, ``nn.Hardtanh``,
            ``nn.Hardswish`` or ``nn.SiLU`` (the next module of an
            ``nn.Sequential``, or a sibling module called on it alone in the
            parent's ``forward``, found by tracing that ``forward`` with
            ``torch.fx``), the BN layer becomes a
            :class:`bnkit.variants.BatchNormAct` holding that activation and
            the activation's slot an ``nn.Identity``; a clamp the parent also
            calls elsewhere (torchvision's ``BasicBlock.relu``) stays in its
            slot as :func:`bnkit.variants.act.after_fused_bn` form, which
            passes the fused layer's output through. The same outputs,
            gradients and ``state_dict`` keys, with the activation computed
            inside the BN kernels' passes (a training step of a
            MobileNetV2-like CNN on CPU spends about a sixth of its time in
            the separate activations). Layers with forward or backward hooks,
            functional activations and forwards that do not trace stay
            unfused (see :mod:`bnkit.tools.act_pairs`). ``to="torch"`` puts
            the activations back.

    Returns:
        The converted model (``model`` itself when ``inplace`` and the root is
        not a BN layer), or ``(model, report)`` with ``report=True``.

    The converted layers keep parameters (the same ``Parameter`` objects),
    buffers including ``num_batches_tracked``, ``training`` flags, hooks,
    ``eps`` and ``momentum``, so outputs and ``state_dict`` are equal. bnkit
    layers get their default ``nonfinite="skip"`` policy (torch propagates
    NaN/Inf into the running statistics; on finite data both agree); going
    back to torch drops that policy (and ``tiny_batch``). A bnkit layer with no torch equivalent
    (``axis != 1``, ``share_affine``, ``bias=False``, ``convention="keras"``,
    the generic rank-free :class:`bnkit.BatchNorm` of any axis, or a
    ``BatchNormAct`` not converted from torch) raises ``ValueError`` before
    anything is changed.

    Subclasses: one that keeps torch's ``forward`` becomes the bnkit class of
    its rank; timm's ``BatchNormAct2d`` becomes
    :class:`bnkit.variants.BatchNormAct2d` with the same ``drop``/``act``
    modules; ``to="torch"`` restores the original class. SyncBatchNorm,
    frozen layers and subclasses that override ``forward`` (unless declared
    with :func:`bnkit.family.register_bn_subclass`) are left as they are and
    reported.
    """
    if to not in ("bnkit", "torch"):
        raise ValueError(f"convert: to must be 'bnkit' or 'torch', got {to!r}")
    if fuse_activations and to != "bnkit":
        raise ValueError("convert: fuse_activations=True needs to='bnkit' (to='torch' splits fused layers by itself)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(model).__name__}")
    _plan(model, to)  # raises before anything is copied or changed
    if not inplace:
        model = copy_model(model)
    targets, rep = _plan(model, to)
    sites = fusion_sites(model, lambda m: targets.get(id(m)) in _BNKIT_TO_TORCH) if fuse_activations else {}
    # One replacement per activation module that several fused layers share (its after_fused_bn form, or
    # going to torch its plain class again): id(activation) -> the replacement.
    replaced: dict[int, nn.Module] = {}
    restore: list[tuple[str, nn.Module]] = []

    def replacement(act: nn.Module, make) -> nn.Module:
        if id(act) not in replaced:
            replaced[id(act)] = make(act)
        return replaced[id(act)]

    def build(m: nn.Module, name: str) -> nn.Module:
        if to == "torch":
            target = targets[id(m)]
            if isinstance(target, tuple):  # a fused layer: torch's BN, and its activation back in its slot
                torch_cls, act_slot = target
                restore.append((act_slot, replacement(m.act, plain_activation)))
                return _swap(m, torch_cls)
            return _to_torch(m)
        site = sites.get(id(m))
        if site is not None:
            new = _swap(m, ranked(BatchNormAct, torch_dims(m)))
            if site.slot == "shared":
                act = replacement(site.act, after_fused_bn)
                new.act = act
                new.__dict__[_FUSED] = ("shared", site.act_key)
                restore.append((site.act_name, act))
            else:
                new.act = site.act
                new.__dict__[_FUSED] = True if site.slot == "sequential" else ("identity", site.act_key)
                restore.append((site.act_name, nn.Identity()))
            rep.fused.append((name, site.act_name))
            return new
        return _to_bnkit(m, targets[id(m)], bn_form(m))

    before = {id(m) for m in model.modules()}
    out = replace_modules(
        model,
        lambda m: id(m) in targets,
        build,
        hook_dicts=CALL_HOOK_DICTS + STATE_HOOK_DICTS,
    )
    for slot, module in restore:
        parent_name, _, key = slot.rpartition(".")
        setattr(out.get_submodule(parent_name) if parent_name else out, key, module)
    for m in out.modules():
        if id(m) not in before and isinstance(m, LazyModuleMixin):
            _arm_lazy(m)
    if report:
        return out, rep
    if rep.left:
        warn(rep.summary(limit=5))
    return out
