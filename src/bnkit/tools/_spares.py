"""Scratch tensors that the loop tools' blocks reuse from one block to the next: nothing is allocated at entry.

A block that allocates small tensors at entry and keeps them alive to its end (the copies of the BN
buffers that :func:`~bnkit.preserve_stats` puts back, :func:`~bnkit.accumulate_stats`' totals) has
glibc carve them out of the hole the last large activation left; every large output of the block
then comes from fresh pages at the top of the heap, faulted in on every forward
(``benchmarks/README.md``, "accumulate_stats per forward"). Taken from a pool kept per buffer,
the same tensors serve every block after the first, and the forwards inside see the heap as
they see it outside.
"""

from __future__ import annotations

import functools
import weakref
from typing import Callable, Iterable

import torch
from torch import Tensor, nn


class SparePool:
    """Free tensors, one per tensor they serve (a buffer, held weakly): taken at a block's entry, given back at its exit.

    An entry, ``id(key) -> [weak reference to key, spare, taken]``, stays while its key lives (the
    reference's callback removes it), so that a block's take and give-back are two dictionary lookups.
    """

    def __init__(self) -> None:
        self._entries: dict[int, list] = {}

    def take(self, key: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """A tensor of ``shape`` and ``dtype`` on ``key``'s device, uninitialized: the spare of ``key`` or a new one."""
        entry = self._entries.get(id(key))
        if entry is not None and not entry[2] and entry[0]() is key:
            t = entry[1]
            if (t.shape == shape and t.dtype == dtype and t.device == key.device
                    and (not t.is_inference() or torch.is_inference_mode_enabled())):
                entry[2] = True
                return t
        return torch.empty(shape, dtype=dtype, device=key.device)

    def give_back(self, key: Tensor, t: Tensor) -> None:
        """Keep ``t`` for the next :meth:`take` for ``key`` (plain tensors only; as long as ``key`` lives)."""
        if type(key) is not Tensor or type(t) is not Tensor:
            return
        entry = self._entries.get(id(key))
        if entry is not None and entry[0]() is key:
            entry[1], entry[2] = t, False
            return
        forget = functools.partial(_forget, entries=self._entries, k=id(key))
        self._entries[id(key)] = [weakref.ref(key, forget), t, False]


def _forget(ref: weakref.ref, entries: dict[int, list], k: int) -> None:
    entry = entries.get(k)
    if entry is not None and entry[0] is ref:  # the entry of the key that died (not of a later tensor with its id)
        del entries[k]


_COPIES = SparePool()


class BufferSnapshot:
    """The buffers of ``modules`` as they are now, to be put back bit for bit (:meth:`restore`).

    The copies come from a pool kept per buffer and go back to it (:meth:`release`); a buffer of a
    tensor subclass is cloned, as it is.
    """

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        with torch.no_grad():
            self._saved = [
                (m, [(k, b, _copy_of(b)) for k, b in m._buffers.items() if isinstance(b, Tensor)]) for m in modules
            ]

    @torch.no_grad()
    def restore(self, which: Callable[[nn.Module], bool] | None = None) -> None:
        """Put the values back (the modules ``which`` selects; all by default) into the original tensors."""
        for m, bufs in self._saved:
            if which is None or which(m):
                for k, orig, copy in bufs:
                    # The original tensor objects, with their values: references (an optimizer's,
                    # a DDP bucket's) stay valid even if the forward rebound the attribute.
                    orig.copy_(copy)
                    m._buffers[k] = orig

    def saved(self, module: nn.Module) -> dict[str, Tensor]:
        """``{name: copy}`` of ``module``'s buffers as they were at the snapshot (empty if not taken)."""
        for m, bufs in self._saved:
            if m is module:
                return {k: copy for k, _, copy in bufs}
        return {}

    def release(self) -> None:
        """Give the copies back to the pool (the snapshot is spent)."""
        for _, bufs in self._saved:
            for _, orig, copy in bufs:
                _COPIES.give_back(orig, copy)
        self._saved = []


def _copy_of(b: Tensor) -> Tensor:
    if type(b) is not Tensor:
        return b.clone()
    copy = _COPIES.take(b, b.shape, b.dtype)
    copy.copy_(b)
    return copy
