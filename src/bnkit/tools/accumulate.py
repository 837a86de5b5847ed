"""Gradient accumulation of BN statistics: :func:`accumulate_stats` (one running update per optimizer step)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import kernels
from ..engine import in_recompute, running_update, set_running_update_hook
from ..stats import Moments, merge, update_running_stats
from ._family import has_running_stats
from .checkpointing import _bn_layers, _torch_bn_layers

__all__ = ["accumulate_stats"]


class _Layer:
    """What one layer saw inside an :func:`accumulate_stats` block: its buffers and the merged moments so far.

    The totals ``(count, mean, m2)`` are float64 tensors of the layer's own;
    each batch is merged into them at once (:meth:`add`), and the batch's
    tensors are not kept.
    """

    __slots__ = ("spec", "module", "running_mean", "running_var", "nbt", "count", "mean", "m2", "seen")

    def __init__(self, spec: Any, module: nn.Module | None, running_mean: Tensor, running_var: Tensor,
                 nbt: Tensor | None) -> None:
        self.spec, self.module = spec, module
        self.running_mean, self.running_var, self.nbt = running_mean, running_var, nbt
        self.count = 0
        self.mean = torch.zeros(running_mean.shape, dtype=torch.float64, device=running_mean.device)
        self.m2 = torch.zeros_like(self.mean)
        self.seen = False  # a counted training call (an empty batch counts, a skipped non-finite one not)

    def add(self, count: int, mean: Tensor, var: Tensor, unbiased: bool = False) -> None:
        """Chan's merge, in float64, of a batch of ``count`` values (``var`` biased, or unbiased: torch's buffers)."""
        if not count:
            return
        if mean.is_cpu and kernels.cpp_available() and not torch.jit.is_tracing():
            torch.ops.bnkit.merge_moments_(self.mean, self.m2, self.count, mean, var, count, unbiased)
        else:
            m2 = var.detach().double() * (count - 1 if unbiased else count)
            total = merge(self.total(), Moments(count, mean.detach().double(), m2))
            self.mean.copy_(total.mean)
            self.m2.copy_(total.m2)
        self.count += count

    def total(self) -> Moments:
        return Moments(self.count, self.mean, self.m2)


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
        layer.seen = True  # the engine has applied the non-finite policy: a skipped batch never gets here
        layer.add(count, mean, var)
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
        if n > 1:  # torch raises for one value per channel
            layer.add(n, module.running_mean, module.running_var, unbiased=True)

    def merge_into(self, other: "_Accumulator") -> None:
        for key, layer in self.layers.items():
            mine = other.layers.get(key)
            if mine is None:
                other.layers[key] = layer
            else:
                total = merge(mine.total(), layer.total())
                mine.count, mine.mean, mine.m2 = total.count, total.mean, total.m2
                mine.seen = mine.seen or layer.seen

    @torch.no_grad()
    def apply(self) -> None:
        """The one running update per layer, from the merged moments of everything seen."""
        for layer in self.layers.values():
            if not layer.seen:
                continue
            total = layer.total()
            n = total.count
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
    same kernels as outside the block, in one pass, which report the batch
    moments; each is merged at once into float64 totals, nothing per
    micro-batch is kept). torch's
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
