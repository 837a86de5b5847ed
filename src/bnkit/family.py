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
"""

from __future__ import annotations

from torch import nn

__all__ = ["RANKS", "SHAPES", "TORCH_BATCHNORM", "specialize", "ranked", "torch_dims", "family_of"]

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


def specialize(base: type, docs: dict[str, str] | None = None) -> tuple[type, type, type]:
    """The ``1d``, ``2d`` and ``3d`` classes of the family of ``base``, registered.

    Each is ``class <base>Nd(base)`` with ``expected_dims`` set and, unless
    ``docs`` gives one for its suffix, a docstring made from ``SHAPES`` (what
    it takes, its Shape and an Example). Assign the result to module-level names
    of the same spelling (``BatchRenorm1d, BatchRenorm2d, BatchRenorm3d =
    specialize(BatchRenorm)``) so that pickle finds them.
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
        cls = type(base)(
            name,
            (base,),
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


def torch_dims(module: nn.Module) -> tuple[int, ...] | None:
    """The input ranks of a torch BN layer (``None`` for SyncBatchNorm and other subclasses: any rank)."""
    for dims, classes in TORCH_BATCHNORM.items():
        if isinstance(module, classes):
            return dims
    return None
