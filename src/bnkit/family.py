"""The family registry: which classes exist per rank, and how bnkit, torch and frozen classes correspond.

Every BN family (``BatchNorm``, ``BatchRenorm``, ``GhostBatchNorm``,
``FrozenBatchNorm``) has a generic class (any rank, generic feature axis)
and three specializations that only fix the accepted ranks
(``expected_dims``): ``1d`` = ``(N, C)`` or ``(N, C, L)``, ``2d`` =
``(N, C, H, W)``, ``3d`` = ``(N, C, D, H, W)``. :func:`specialize` makes
them (real module-level classes: importable, picklable, with their own
``__module__``/``__qualname__`` and docstring); :func:`ranked` finds the
member of a family for a rank set; :func:`torch_dims` gives the ranks of
torch's layers. The tools and SyncBN read these tables only.

:func:`bn_form` says what a BN-like layer computes (torch's or bnkit's BN,
a frozen map, either followed by child modules such as an activation, or
unknown: a subclass overriding ``forward``), so that the tools never swap a
subclass for a layer that computes something else;
:func:`register_bn_subclass` declares more classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

__all__ = [
    "RANKS", "SHAPES", "TORCH_BATCHNORM", "BNForm", "bn_form", "bn_tail", "check_initialized", "family_of",
    "frozen_affine", "is_torch_bn", "ranked", "register_bn_subclass", "specialize", "still_lazy", "torch_dims",
]

#: suffix -> accepted input ranks
RANKS: dict[str, tuple[int, ...]] = {"1d": (2, 3), "2d": (4,), "3d": (5,)}
#: suffix -> the inputs it takes, for docstrings
SHAPES: dict[str, str] = {
    "1d": "``(N, C)`` or ``(N, C, L)`` inputs",
    "2d": "``(N, C, H, W)`` inputs, any memory format",
    "3d": "``(N, C, D, H, W)`` inputs, any memory format",
}
#: accepted ranks -> torch's class (and the lazy one)
TORCH_BATCHNORM: dict[tuple[int, ...], tuple[type, type]] = {
    (2, 3): (nn.BatchNorm1d, nn.LazyBatchNorm1d),
    (4,): (nn.BatchNorm2d, nn.LazyBatchNorm2d),
    (5,): (nn.BatchNorm3d, nn.LazyBatchNorm3d),
}

# generic class -> {accepted ranks (None: the generic class itself) -> class}
_FAMILIES: dict[type, dict[tuple[int, ...] | None, type]] = {}


def specialize(
    base: type, docs: dict[str, str] | None = None, torch_classes: bool = False
) -> tuple[type, type, type]:
    """The ``1d``, ``2d`` and ``3d`` classes of the family of ``base``, registered.

    Each is ``class <base>Nd(base)`` with ``expected_dims`` set and, unless
    ``docs`` gives one for its suffix, a docstring made from ``SHAPES`` (what
    it takes, its Shape and an Example). Assign the result to module-level names
    of the same spelling (``BatchRenorm1d, BatchRenorm2d, BatchRenorm3d =
    specialize(BatchRenorm)``) so that pickle finds them.

    ``torch_classes=True`` also derives each from torch's class of its rank
    (``class BatchNorm2d(base, torch.nn.BatchNorm2d)``), so that code finding
    BN layers by torch's class finds it; ``base`` comes first in the method
    resolution order, so every method it defines is the one that runs.
    """
    members: dict[tuple[int, ...] | None, type] = {None: base}
    made = []
    for suffix, dims in RANKS.items():
        name = base.__name__ + suffix
        # The default docstring (markdown for mkdocstrings): what the class is, its Shape and an Example.
        example = ", ".join(["8", "3"] + ["4"] * (dims[0] - 2))
        doc = (docs or {}).get(suffix) or (
            f"`{base.__name__}` for {SHAPES[suffix]}: ``axis=1`` and these ranks only.\n\n"
            f"It takes `{base.__name__}`'s arguments.\n\n"
            f"Shape:\n    - Input: {SHAPES[suffix]}.\n    - Output: the shape and memory format of the input.\n\n"
            f"Example:\n    >>> import torch, bnkit\n    >>> bn = bnkit.{name}(3)\n"
            f"    >>> bn(torch.randn({example})).shape\n    torch.Size([{example}])\n"
        )
        bases = (base, TORCH_BATCHNORM[dims][0]) if torch_classes else (base,)
        cls = type(base)(
            name,
            bases,
            {"__module__": base.__module__, "__qualname__": name, "__doc__": doc, "expected_dims": dims},
        )
        members[dims] = cls
        made.append(cls)
    _FAMILIES[base] = members
    return made[0], made[1], made[2]


def family_of(cls: type) -> type | None:
    """The generic class of the family ``cls`` belongs to (``None``: not a registered family member)."""
    for base, members in _FAMILIES.items():
        if cls in members.values():
            return base
    return None


def ranked(base: type, dims: tuple[int, ...] | None) -> type:
    """The member of ``base``'s family that accepts ``dims`` (the generic class for other rank sets)."""
    return _FAMILIES.get(base, {}).get(dims, base)


def still_lazy(module: nn.Module) -> bool:
    """A lazy layer (torch's or bnkit's) that has not seen an input yet: uninitialized tensors, or tensors
    loaded from a ``state_dict`` but no ``num_features`` until its first call."""
    return isinstance(module, LazyModuleMixin) and (
        module.has_uninitialized_params() or getattr(module, "num_features", None) == 0
    )


def check_initialized(model: nn.Module, tool: str) -> None:
    """``ValueError`` naming the first lazy layer of ``model`` that has not seen an input yet (``tool`` needs values)."""
    if not isinstance(model, nn.Module):  # the tool's own type check says what is wrong
        return
    for name, m in model.named_modules():
        if still_lazy(m):
            raise ValueError(
                f"{tool}: layer {name or '<root>'!r} ({type(m).__name__}) is a lazy layer that has not seen an input "
                "yet; call the model once on a batch first. Nothing was changed."
            )


def is_torch_bn(module: nn.Module) -> bool:
    """A layer of torch's BN classes or a subclass of them that is not a bnkit layer (bnkit's ``BatchNorm1d/2d/3d``
    also derive from torch's classes, so that code finding BN layers by torch's class finds them, but they run
    bnkit's engine)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and not _is_bnkit_layer(module)


def torch_dims(module: nn.Module) -> tuple[int, ...] | None:
    """The input ranks of a torch BN layer (``None`` for SyncBatchNorm and other subclasses: any rank)."""
    if not is_torch_bn(module):
        return None
    for dims, classes in TORCH_BATCHNORM.items():
        if isinstance(module, classes):
            return dims
    return None


# --------------------------------------------------------------------------- BN subclasses
# What a BN-like class computes, for the tools that replace layers (convert, freeze, fuse, SyncBN).
# A subclass that overrides ``forward`` may compute anything: the tools handle only the forms
# declared here (or registered by the user) and refuse or leave the others, naming them.


@dataclass(frozen=True)
class BNForm:
    """What a BN-like layer computes, in the terms bnkit's tools use.

    ``kind``: ``"bn"`` (the computation of torch's or bnkit's BN layer it
    derives from), ``"frozen"`` (the fixed map ``x * scale + shift`` from the
    buffers ``weight``, ``bias``, ``running_mean``, ``running_var`` and
    ``eps``, like torchvision's ``FrozenBatchNorm2d``) or ``"unknown"``
    (``reason`` says why). ``tail``: names of children applied in this order
    to the normalized output (missing or ``None`` children are skipped).
    """

    kind: str
    tail: tuple[str, ...] = ()
    reason: str = ""
    #: input ranks of a foreign class (None: unknown or any)
    dims: tuple[int, ...] | None = None


# Foreign classes known by their qualified name (so that nothing is imported to recognise them).
_KNOWN: dict[str, BNForm] = {
    "timm.layers.norm_act.BatchNormAct2d": BNForm("bn", ("drop", "act")),
    "timm.layers.norm_act.SyncBatchNormAct": BNForm("bn", ("drop", "act")),
    "timm.layers.norm_act.FrozenBatchNormAct2d": BNForm("frozen", ("drop", "act"), dims=(4,)),
    "torchvision.ops.misc.FrozenBatchNorm2d": BNForm("frozen", dims=(4,)),
}
_REGISTERED: dict[type, BNForm] = {}
_TORCH_FORWARDS = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)


def register_bn_subclass(cls: type, tail: tuple[str, ...] | list[str] = (), *, frozen: bool = False) -> None:
    """Declare what a BN subclass that overrides ``forward`` computes, so that the tools handle it exactly.

    Args:
        cls: a subclass of a torch BN class (``frozen=False``), or a module
            class with buffers ``weight``, ``bias``, ``running_mean``,
            ``running_var`` and an ``eps`` attribute computing the frozen map
            (``frozen=True``).
        tail: names of the children its ``forward`` applies, in order, to
            the BN output (timm's ``BatchNormAct2d``: ``("drop", "act")``).

    Example:
        >>> class BNReLU(torch.nn.BatchNorm2d):
        ...     def __init__(self, c):
        ...         super().__init__(c)
        ...         self.act = torch.nn.ReLU()
        ...     def forward(self, x):
        ...         return self.act(super().forward(x))
        >>> register_bn_subclass(BNReLU, ("act",))
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register_bn_subclass: expected an nn.Module class, got {cls!r}")
    if not frozen and not issubclass(cls, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"register_bn_subclass: {cls.__qualname__} is not a torch BN subclass (use frozen=True "
                        "for a module computing the frozen map)")
    tail = tuple(tail)
    if not all(isinstance(n, str) and n for n in tail):
        raise TypeError(f"register_bn_subclass: tail must be child names, got {tail!r}")
    _REGISTERED[cls] = BNForm("frozen" if frozen else "bn", tail)


def _declared(c: type) -> BNForm | None:
    form = _REGISTERED.get(c)
    return form if form is not None else _KNOWN.get(f"{c.__module__}.{c.__qualname__}")


def _is_bnkit_layer(module: nn.Module) -> bool:
    return callable(getattr(module, "inference_affine", None)) and hasattr(module, "axis") and hasattr(
        module, "num_features"
    )


def _has_running_stats(module: nn.Module) -> bool:
    return isinstance(getattr(module, "running_mean", None), torch.Tensor) and isinstance(
        getattr(module, "running_var", None), torch.Tensor
    )


def bn_form(module: nn.Module) -> BNForm | None:
    """What ``module`` computes as a BN layer (:class:`BNForm`), or ``None`` when it is not BN-like.

    torch's BN classes and their subclasses that keep torch's ``forward`` and
    ``_check_input_dim`` are ``"bn"``; subclasses that override them are
    ``"bn"``/``"frozen"`` when declared (timm's ``BatchNormAct2d``,
    ``SyncBatchNormAct``, ``FrozenBatchNormAct2d``, torchvision's
    ``FrozenBatchNorm2d``, or :func:`register_bn_subclass`), ``"unknown"``
    otherwise. bnkit's layers are ``"bn"`` with their ``bn_tail``. Other
    modules holding ``running_mean``/``running_var`` tensors (e.g. one
    calling ``F.batch_norm`` itself) are ``"unknown"``.
    """
    cls = type(module)
    for c in cls.__mro__:
        form = _declared(c)
        if form is not None:
            return form
        if "forward" in c.__dict__:
            break  # the forward that runs is c's, and c is not declared
    name = f"{cls.__module__}.{cls.__qualname__}"
    if is_torch_bn(module):
        owner = next(c for c in cls.__mro__ if "forward" in c.__dict__)
        if owner not in _TORCH_FORWARDS:
            return BNForm("unknown", reason=f"{name} overrides forward ({owner.__qualname__}.forward), so bnkit "
                          "cannot tell what it computes; declare it with bnkit.register_bn_subclass(cls, tail=...) "
                          "if it is BN followed by child modules")
        check = next((c for c in cls.__mro__ if "_check_input_dim" in c.__dict__), None)
        if check is not None and check.__module__ != nn.modules.batchnorm.__name__:
            return BNForm("unknown", reason=f"{name} overrides _check_input_dim (accepts other input ranks than "
                          "torch's class)")
        return BNForm("bn")
    if _is_bnkit_layer(module):
        owner = next(c for c in cls.__mro__ if "forward" in c.__dict__)
        if not owner.__module__.startswith("bnkit."):
            return BNForm("unknown", reason=f"{name} overrides forward ({owner.__qualname__}.forward) of a bnkit "
                          "layer, so bnkit cannot tell what it computes")
        return BNForm("bn", tuple(getattr(module, "bn_tail", ())))
    if _has_running_stats(module):
        return BNForm("unknown", reason=f"{name} is not a BN class bnkit knows but holds running statistics (a "
                      "module calling F.batch_norm itself?)")
    return None


def bn_tail(module: nn.Module, form: BNForm | None = None) -> list[tuple[str, nn.Module]]:
    """The ``(name, child)`` pairs ``module`` applies after its normalization, in order."""
    form = bn_form(module) if form is None else form
    names = () if form is None else form.tail
    return [(n, module._modules[n]) for n in names if module._modules.get(n) is not None]


def frozen_affine(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` of a ``"frozen"`` layer: ``scale = weight / sqrt(running_var + eps)``, ``shift = bias - running_mean * scale``."""
    w, b = module.weight, module.bias
    rm, rv = module.running_mean, module.running_var
    scale = (rv + module.eps).rsqrt() if w is None else w * (rv + module.eps).rsqrt()
    shift = -rm * scale if b is None else b - rm * scale
    return scale.detach(), shift.detach()
