"""BN-family layer queries and batch iteration shared by :func:`adapt`, :func:`tent` and :func:`inspect`."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from ._family import bn_axis as feature_axis
from ._family import has_running_stats as has_stats
from ._family import is_bn as is_bn_layer

__all__ = ["bn_layers", "feature_axis", "has_stats", "is_bn_layer", "learns_stats"]


def learns_stats(m: nn.Module) -> bool:
    """Layers with a ``momentum`` learn statistics in training mode; frozen ones (no momentum) never do."""
    return hasattr(m, "momentum")


def bn_layers(model: nn.Module, *, with_stats: bool = True) -> list[tuple[str, nn.Module]]:
    """The BN-family layers of ``model`` (each once, in registration order)."""
    out, seen = [], set()
    for name, m in model.named_modules():
        if id(m) in seen or not is_bn_layer(m) or (with_stats and not has_stats(m)):
            continue
        seen.add(id(m))
        out.append((name, m))
    return out


def _batches(data: Any, num_batches: int | None) -> Iterable[Any]:
    if isinstance(data, Tensor):
        data = [data]
    it = iter(data)
    return it if num_batches is None else itertools.islice(it, num_batches)


def _check_num_batches(where: str, num_batches: Any) -> None:
    if num_batches is not None and (not isinstance(num_batches, int) or isinstance(num_batches, bool) or num_batches < 1):
        raise ValueError(f"{where}: num_batches must be a positive int or None, got {num_batches!r}")
