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
    entry and one at exit, nothing per forward.

:func:`sync_running_stats`
    Makes the running statistics identical on every rank of a process group.
    With ``counts`` (how many values per channel each rank's statistics
    summarize, e.g. after a local :func:`bnkit.recalibrate`), the ranks'
    ``(n, mean, M2)`` are merged exactly (Chan), which gives the statistics of
    the union of the ranks' data; without, the buffers are averaged with equal
    weights (running averages of a DDP run, whose ranks saw equally many
    batches). For population statistics computed across ranks in one pass,
    use ``bnkit.recalibrate(..., process_group=...)``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..engine import _reject_nonfinite, in_recompute, running_update, set_running_update_hook
from ..stats import Moments, merge, update_running_stats
from ._family import has_running_stats, is_bn

__all__ = ["accumulate_stats", "checkpoint_safe", "preserve_stats", "sync_running_stats"]


def _bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every distinct BN-family module of ``model`` (and any module with running statistics), in order."""
    out, seen = [], set()
    for name, m in model.named_modules():
        if id(m) not in seen and (is_bn(m) or has_running_stats(m)):
            seen.add(id(m))
            out.append((name, m))
    return out


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
    saved = []
    with torch.no_grad():
        for _, m in _bn_layers(model):
            saved.append((m, {k: (b, b.clone()) for k, b in m._buffers.items() if isinstance(b, Tensor)}))
    try:
        yield model
    finally:
        with torch.no_grad():
            for m, bufs in saved:
                for k, (orig, copy_) in bufs.items():
                    # The original tensor objects, with their values: references (an optimizer's,
                    # a DDP bucket's) stay valid even if the forward rebound the attribute.
                    orig.copy_(copy_)
                    m._buffers[k] = orig


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


# --------------------------------------------------------------------------- activation checkpointing
def _torch_bn_layers(model: nn.Module) -> list[nn.Module]:
    """torch's own BN layers of ``model`` (bnkit's layers handle checkpointing and accumulation in the engine)."""
    return [m for _, m in _bn_layers(model) if isinstance(m, _BatchNorm)]


class _HookHandles:
    """Module hooks that a ``with`` block or ``remove()`` takes off again."""

    def __init__(self, handles: list) -> None:
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "_HookHandles":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _restore_after_recompute_pre(module: nn.Module, args: tuple) -> None:
    if module.training and in_recompute():
        # The recompute updates copies (which autograd may save); the layer's own buffers stay as they are.
        originals = {k: b for k, b in module._buffers.items() if isinstance(b, Tensor)}
        for k, b in originals.items():
            module._buffers[k] = b.clone()
        module.__dict__.setdefault("_bnkit_recompute_saved", []).append(originals)


def _restore_after_recompute_post(module: nn.Module, args: tuple, output: Any) -> None:
    stack = module.__dict__.get("_bnkit_recompute_saved")
    if stack and module.training and in_recompute():
        module._buffers.update(stack.pop())


def checkpoint_safe(model: nn.Module) -> _HookHandles:
    """Make torch's own BN layers of ``model`` update their statistics once under activation checkpointing.

    ``torch.utils.checkpoint`` runs a checkpointed forward again during the
    backward, and torch's BN layers then update ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` a second time. This registers
    a forward pre-hook and a forward hook on each of them that, only during
    that recompute (a forward inside a backward), let the layer update copies
    of its buffers and put the originals back after. The recompute normalizes with the
    batch statistics of the same input, so outputs and gradients are those of
    the step without checkpointing. bnkit's layers need nothing: the engine
    skips the second update itself.

    Args:
        model: any module.

    Returns:
        A handle: ``handle.remove()`` takes the hooks off; it is also a
        context manager that removes them on exit.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> handle = bnkit.checkpoint_safe(model)
        >>> x = torch.randn(8, 3, requires_grad=True)
        >>> torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False).sum().backward()
        >>> int(model[1].num_batches_tracked)
        1
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"checkpoint_safe: expected an nn.Module, got {type(model).__name__}")
    handles = []
    for m in _torch_bn_layers(model):
        handles.append(m.register_forward_pre_hook(_restore_after_recompute_pre))
        # always_call: early-stopping recompute raises inside the layer, after it saved its tensors.
        handles.append(m.register_forward_hook(_restore_after_recompute_post, always_call=True))
    return _HookHandles(handles)


# --------------------------------------------------------------------------- gradient accumulation
class _Layer:
    """What one layer saw inside an :func:`accumulate_stats` block: its buffers and the micro-batches' moments."""

    __slots__ = ("spec", "module", "running_mean", "running_var", "nbt", "parts", "seen")

    def __init__(self, spec: Any, module: nn.Module | None, running_mean: Tensor, running_var: Tensor,
                 nbt: Tensor | None) -> None:
        self.spec, self.module = spec, module
        self.running_mean, self.running_var, self.nbt = running_mean, running_var, nbt
        self.parts: list[tuple[int, Tensor, Tensor]] = []  # (count, mean, M2 or biased var), see _kind
        self.seen = False  # a counted training call (an empty batch counts, a skipped non-finite one not)

    def merged(self) -> Moments:
        """Chan's merge, in float64, of every part (bnkit parts: ``(n, mean, biased var)``)."""
        total = Moments(0, torch.zeros_like(self.running_mean, dtype=torch.float64),
                        torch.zeros_like(self.running_var, dtype=torch.float64))
        for n, mean, second in self.parts:
            m2 = second.double() * n if self.module is None else second.double()
            total = merge(total, Moments(n, mean.double(), m2))
        return total


class _Accumulator:
    def __init__(self, model: nn.Module, parent: "_Accumulator | None") -> None:
        self.parent = parent
        self.layers: dict[tuple, _Layer] = {}
        self.hooked: set[int] = set()  # the torch layers whose forward hook this block registered
        # The buffers this block collects for: the bnkit layers' running_mean tensors (per-site views share them).
        self.owned = {id(m.running_mean) for _, m in _bn_layers(model)
                      if has_running_stats(m) and not isinstance(m, _BatchNorm)}

    def take(self, spec: Any, running_mean: Tensor, running_var: Tensor, nbt: Tensor | None, mean: Tensor,
             var: Tensor, count: int) -> bool:
        base = running_mean if running_mean._base is None else running_mean._base
        if id(base) not in self.owned:
            return self.parent.take(spec, running_mean, running_var, nbt, mean, var, count) if self.parent else False
        key = (id(base), running_mean.storage_offset())
        layer = self.layers.get(key)
        if layer is None:
            layer = self.layers[key] = _Layer(spec, None, running_mean, running_var, nbt)
        if count and spec.check_finite and var.numel() and not math.isfinite(var.max().item()):
            _reject_nonfinite(spec.name, spec.nonfinite)  # raises ("raise") or warns ("skip"): the part is left out
            return True
        layer.seen = True
        if count:
            layer.parts.append((count, mean.detach(), var.detach()))
        return True

    def take_torch(self, module: nn.Module, input: Tensor) -> None:
        """A torch BN layer's training forward, run with momentum 1: its buffers hold the batch's statistics."""
        layer = self.layers.get(("torch", id(module)))
        if layer is None:
            layer = self.layers[("torch", id(module))] = _Layer(
                None, module, module.running_mean, module.running_var, module.num_batches_tracked
            )
        layer.seen = True
        n = input.numel() // input.shape[1] if input.dim() > 1 else 0
        if n > 1:  # torch raises for one value per channel; running_var is unbiased: M2 = var * (n - 1)
            layer.parts.append((n, module.running_mean.detach().clone(), module.running_var.detach() * (n - 1)))

    def merge_into(self, other: "_Accumulator") -> None:
        for key, layer in self.layers.items():
            mine = other.layers.get(key)
            if mine is None:
                other.layers[key] = layer
            else:
                mine.parts.extend(layer.parts)
                mine.seen = mine.seen or layer.seen

    @torch.no_grad()
    def apply(self) -> None:
        """The one running update per layer, from the merged moments of everything seen."""
        for layer in self.layers.values():
            if not layer.seen:
                continue
            total = layer.merged()
            n = int(total.count)
            if layer.module is None:
                rm = layer.running_mean
                mean = total.mean.to(rm.dtype if rm.dtype.is_floating_point else torch.float64)
                var = (total.m2 / n if n else total.m2).to(mean.dtype)
                running_update(layer.spec, rm, layer.running_var, layer.nbt, mean, var, n)
                continue
            m = layer.module  # torch's rule, as its forward would have applied it to the merged batch
            if m.num_batches_tracked is not None:
                m.num_batches_tracked.add_(1)
            if n == 0:
                continue
            momentum = m.momentum
            factor = momentum if momentum is not None else 1.0 / int(m.num_batches_tracked)
            update_running_stats(m.running_mean, m.running_var, total.mean, total.m2 / n, n, factor)


_ACCUMULATORS: list[_Accumulator] = []


def _engine_take(spec: Any, running_mean: Tensor, running_var: Tensor, nbt: Tensor | None, mean: Tensor,
                 var: Tensor, count: int) -> bool:
    return bool(_ACCUMULATORS) and _ACCUMULATORS[-1].take(spec, running_mean, running_var, nbt, mean, var, count)


def _torch_bn_hook(module: nn.Module, args: tuple, output: Any) -> None:
    if module.training and module.running_mean is not None and _ACCUMULATORS and not in_recompute():
        _ACCUMULATORS[-1].take_torch(module, args[0])


def _check_accumulable(model: nn.Module) -> None:
    import torch.distributed as dist

    for name, m in _bn_layers(model):
        if getattr(m, "convention", "torch") == "keras":
            raise NotImplementedError(
                f"accumulate_stats: layer {name or '<root>'!r} uses convention='keras', whose update "
                "is not the engine's; use convention='torch' or update per micro-batch"
            )
        if (isinstance(m, nn.SyncBatchNorm) and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            raise NotImplementedError(
                f"accumulate_stats: torch.nn.SyncBatchNorm at {name or '<root>'!r} under torch.distributed "
                "is not supported (its counts over ranks are not visible); use bnkit.SyncBatchNorm "
                "(bnkit.convert_sync_batchnorm)"
            )


@contextlib.contextmanager
def accumulate_stats(model: nn.Module) -> Iterator[nn.Module]:
    r"""Update the running statistics once for the k micro-batches of one optimizer step.

    Inside the block every training forward normalizes its micro-batch with
    the micro-batch's own statistics, exactly as without the block, but no
    running statistic moves. At a normal exit each BN layer of ``model`` that
    ran in training mode applies one update from the exact (Chan) merge, in
    float64, of the per-channel ``(n_i, mean_i, M2_i)`` of everything it saw::

        N = sum n_i,   mean = sum n_i mean_i / N,   M2 = sum M2_i + sum n_i (mean_i - mean)^2
        running_mean <- (1 - m) * running_mean + m * mean
        running_var  <- (1 - m) * running_var  + m * M2 / (N - 1)
        num_batches_tracked += 1

    (``momentum=None``: ``m = 1 / num_batches_tracked``, so the cumulative
    average counts the step once.) That is the update of one forward over the
    concatenated micro-batches. With :class:`bnkit.SyncBatchNorm` each part
    is already the merge over the ranks, so the update is that of the global
    batch of the step. Normalization stays per micro-batch: a step of k
    micro-batches behaves like Ghost BN with the micro-batch as the virtual
    batch (noisier batch statistics than one large batch; the running
    statistics are those of the large batch).

    bnkit layers are covered through the engine's running-update hook (the
    same kernels as outside the block, which report the batch moments). torch's
    BN layers run with momentum 1 inside the block, so that their buffers
    hold each forward's batch statistics, which a forward hook collects; their
    buffers and momentum are restored at exit. Nested blocks merge into the
    enclosing one (the outermost applies). On an exception nothing is
    applied and every BN buffer is as it was at entry. Forwards recomputed by
    activation checkpointing are not counted; eval-mode forwards are
    untouched. Non-finite micro-batches follow each layer's ``nonfinite``
    policy at the forward (``"skip"``: left out, with a warning).

    Args:
        model: any module (DDP-wrapped works: use it with ``no_sync()``).

    Yields:
        ``model``.

    Raises:
        NotImplementedError: for ``convention="keras"`` layers and for
            ``torch.nn.SyncBatchNorm`` under ``torch.distributed``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), bnkit.BatchNorm1d(4))
        >>> with bnkit.accumulate_stats(model):
        ...     for x in torch.randn(4, 8, 3):  # 4 micro-batches of 8
        ...         model(x).square().mean().backward()
        >>> int(model[1].num_batches_tracked)
        1
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"accumulate_stats: expected an nn.Module, got {type(model).__name__}")
    _check_accumulable(model)
    parent = _ACCUMULATORS[-1] if _ACCUMULATORS else None
    acc = _Accumulator(model, parent)
    hooked = set().union(*(a.hooked for a in _ACCUMULATORS)) if _ACCUMULATORS else set()
    torch_layers = [m for m in _torch_bn_layers(model) if id(m) not in hooked and has_running_stats(m)]
    with torch.no_grad():
        saved = [(m, {k: (b, b.clone()) for k, b in m._buffers.items() if isinstance(b, Tensor)})
                 for _, m in _bn_layers(model)]
    momenta = [(m, m.momentum) for m in torch_layers]
    handles = []
    previous = set_running_update_hook(_engine_take)
    _ACCUMULATORS.append(acc)
    ok = False
    try:
        for m in torch_layers:
            handles.append(m.register_forward_hook(_torch_bn_hook))
            acc.hooked.add(id(m))
            m.momentum = 1.0
        yield model
        ok = True
    finally:
        _ACCUMULATORS.pop()
        set_running_update_hook(previous)
        for h in handles:
            h.remove()
        for m, momentum in momenta:
            m.momentum = momentum
        with torch.no_grad():
            for m, bufs in saved:
                if ok and not isinstance(m, _BatchNorm):
                    continue  # bnkit buffers never moved inside; torch's hold the last batch's statistics
                for k, (orig, copy_) in bufs.items():
                    orig.copy_(copy_)
                    m._buffers[k] = orig
        if ok:
            if parent is not None:
                acc.merge_into(parent)
            else:
                acc.apply()
