"""What :func:`bnkit.fuse` did: :class:`FuseReport` of :class:`FusedPair` and :class:`UnfusedBN` entries."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["FuseReport", "FusedPair", "UnfusedBN"]


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
