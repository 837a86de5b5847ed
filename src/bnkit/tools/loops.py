"""BN statistics inside real training loops: :func:`preserve_stats` and :func:`sync_running_stats`.

:func:`preserve_stats`
    A context manager for forwards that must not count as training steps
    (learning-rate / batch-size finders, warm-ups, probes, EMA evaluation in
    train mode): every buffer of every BN-family layer (torch's or bnkit's,
    ``num_batches_tracked`` included) is bitwise as it was at entry when the
    block exits, normally or by an exception. Nothing else is touched: the
    layers keep their mode, and the forwards inside compute exactly what they
    would outside (batch statistics in train mode). Nesting works (each level
    restores its own entry state). The cost is one copy of the BN buffers at
    entry and one at exit, nothing per forward (the copies are kept for the
    next block: entering allocates nothing).

:func:`sync_running_stats`
    Makes the running statistics identical on every rank of a process group.
    With ``counts`` (how many values per channel each rank's statistics
    summarize, e.g. after a local :func:`bnkit.recalibrate`), the ranks'
    ``(n, mean, M2)`` are merged exactly (Chan), which gives the statistics of
    the union of the ranks' data; without, the buffers are averaged with equal
    weights (running averages of a DDP run, whose ranks saw equally many
    batches). For population statistics computed across ranks in one pass,
    use ``bnkit.recalibrate(..., process_group=...)``.

:func:`accumulate_stats` (:mod:`bnkit.tools.accumulate`) and :func:`checkpoint_safe`
(:mod:`bnkit.tools.checkpointing`) are re-exported from here.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

from ..stats import Moments, merge
from ._family import has_running_stats
from ._spares import BufferSnapshot
from .accumulate import accumulate_stats, excluded_from_blocks
from .checkpointing import _bn_layers, checkpoint_safe

__all__ = ["accumulate_stats", "checkpoint_safe", "preserve_stats", "sync_running_stats"]


@contextlib.contextmanager
def preserve_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Run forwards without changing any BN buffer: restores them bit for bit on exit.

    Args:
        model: any module; its BN-family layers (``torch.nn.BatchNorm*``,
            ``SyncBatchNorm``, every bnkit layer and variant) are covered,
            ``num_batches_tracked`` and per-site buffers included.

    Yields:
        ``model`` itself (mode, parameters and hooks untouched).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), bnkit.BatchNorm1d(4))
        >>> with bnkit.preserve_stats(model):
        ...     _ = model(torch.randn(8, 3))  # e.g. an LR-finder step
        >>> int(model[1].num_batches_tracked)
        0
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"preserve_stats: expected an nn.Module, got {type(model).__name__}")
    bn_layers = [m for _, m in _bn_layers(model)]
    snapshot = BufferSnapshot(bn_layers)
    try:
        with excluded_from_blocks(bn_layers):  # inside an accumulate_stats block too, nothing here counts
            yield model
    finally:
        snapshot.restore()
        snapshot.release()


def _world(group: Any) -> tuple[Any, int, int]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("sync_running_stats: torch.distributed is not initialized")
    group = dist.group.WORLD if group is None else group
    return group, dist.get_world_size(group), dist.get_rank(group)


def _count_of(counts: int | Mapping[str, int] | None, name: str) -> int | None:
    if counts is None:
        return None
    if isinstance(counts, Mapping):
        if name not in counts:
            raise KeyError(f"sync_running_stats: counts has no entry for layer {name or '<root>'!r}")
        n = counts[name]
    else:
        n = counts
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"sync_running_stats: counts must be non-negative ints, got {n!r} for {name or '<root>'!r}")
    return n


def _correction(m: nn.Module) -> int:
    """1 when running_var is the unbiased variance (torch's convention), 0 for ``convention="keras"``."""
    return 0 if getattr(m, "convention", "torch") == "keras" else 1


def _exact_merge(counts: Tensor, means: Tensor, variances: Tensor, correction: int) -> tuple[Tensor, Tensor] | None:
    """Chan's merge of per-rank ``(n_r, mean_r, M2_r = var_r * (n_r - correction))``, in rank order."""
    zeros = torch.zeros_like(means[0])
    total = Moments(0, zeros, zeros.clone())
    for r in range(counts.shape[0]):
        n_r = int(counts[r].item())
        if n_r:
            m2 = variances[r] * (n_r - correction) if n_r > correction else zeros
            total = merge(total, Moments(n_r, means[r], m2))
    if not total.count:
        return None
    n = total.count
    return total.mean, (total.m2 / (n - correction) if n > correction else total.m2)


@torch.no_grad()
def sync_running_stats(
    model: nn.Module,
    process_group: Any = None,
    *,
    counts: int | Mapping[str, int] | None = None,
) -> nn.Module:
    r"""Make every BN layer's running statistics identical across the ranks of ``process_group``.

    Exact merge (``counts`` given): with rank ``r``'s statistics summarizing
    ``n_r`` values per channel, ``M2_r = running_var_r * (n_r - 1)`` (``n_r``
    for ``convention="keras"`` layers, whose variance is biased), merged by
    Chan's formula in rank order in float64::

        N = sum n_r,   mean = sum n_r mean_r / N,
        M2 = sum M2_r + sum n_r (mean_r - mean)^2,   running_var = M2 / (N - 1)

    Ranks with ``n_r = 0`` contribute nothing; a layer with ``N = 0`` keeps
    its values. Average (``counts=None``): every floating-point buffer is the
    plain mean over ranks. ``num_batches_tracked`` becomes the maximum over
    ranks. Every rank gets bitwise identical buffers.

    Args:
        model: the same model structure on every rank (edited in place).
        process_group: the group (``None``: the default group).
        counts: ``None`` (average), one int for every layer, or a mapping
            from layer name (as in ``model.named_modules()``) to int.

    Returns:
        ``model``.
    """
    import torch.distributed as dist

    group, world, _ = _world(process_group)
    layers = [(n, m) for n, m in _bn_layers(model) if has_running_stats(m)]
    if not layers:
        return model
    ns = [_count_of(counts, n) for n, _ in layers]
    # One all_gather of everything: [n, then each float buffer flattened] per layer, in float64.
    parts = []
    for (_, m), n in zip(layers, ns):
        parts.append(torch.tensor([float(n or 0)], dtype=torch.float64, device=m.running_mean.device))
        for b in m._buffers.values():
            if isinstance(b, Tensor) and b.numel():
                parts.append(b.detach().reshape(-1).to(torch.float64))
    flat = torch.cat(parts)
    rows = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(rows, flat, group=group)
    table = torch.stack(rows)
    offset = 0
    for (_, m), n in zip(layers, ns):
        col = table[:, offset]
        offset += 1
        views: dict[str, Tensor] = {}
        for k, b in m._buffers.items():
            if isinstance(b, Tensor) and b.numel():
                views[k] = table[:, offset : offset + b.numel()]
                offset += b.numel()
        new: dict[str, Tensor] = {}
        for k, rows_k in views.items():
            # Average the floating-point buffers, take the largest count (num_batches_tracked).
            new[k] = rows_k.mean(0) if m._buffers[k].dtype.is_floating_point else rows_k.max(0).values
        if n is not None:
            merged = _exact_merge(col, views["running_mean"], views["running_var"], _correction(m))
            if merged is None:  # no rank has data behind its statistics: keep them
                for k in ("running_mean", "running_var", "running_std"):
                    new.pop(k, None)
            else:
                new["running_mean"], new["running_var"] = merged
                if "running_std" in new:  # Keras-convention BatchRenorm: sigma of the merged variance
                    new["running_std"] = torch.sqrt(merged[1] + m.eps)
        for k, value in new.items():
            b = m._buffers[k]
            b.copy_(value.reshape(b.shape).to(b.dtype))
    return model
