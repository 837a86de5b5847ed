"""Population statistics from the data: :func:`recalibrate` (PreciseBN).

The running averages a BN layer keeps during training lag the weights (each
batch was normalized under older weights, and the EMA forgets slowly or
quickly depending on ``momentum``). The paper's prescription (Ioffe &
Szegedy 2015, Alg. 1 step 10) is to use statistics over the training data
for the *final* weights. :func:`recalibrate` computes them in one pass:

* every BN-family layer with running buffers is put in training mode (so it
  normalizes with the batch's statistics and later layers see exactly what
  they see in training) with ``momentum`` temporarily 0; every other module is
  in eval mode (dropout off); no gradients are recorded;
* a forward pre-hook records, for each layer and batch, the per-channel
  :class:`bnkit.stats.Moments` ``(count, mean, M2)`` of the layer's *input*
  along its feature axis; after the pass the buffers the forward touched are
  restored bit for bit, and the parts are merged exactly with Chan's formula
  (:func:`bnkit.stats.merge`, accumulated in float64);
* ``running_mean`` becomes the mean over all the data and ``running_var`` the
  unbiased variance ``M2 / (N - 1)`` (``estimator="exact"``), or, with
  ``estimator="paper"``, the paper's ``E_B[mean_B]`` and
  ``m/(m-1) * E_B[var_B]`` (average over batches of each batch's unbiased
  variance; ``m`` the per-channel count of a batch).

``num_batches_tracked`` is left as it was: it counts training steps (and
drives ``momentum=None`` cumulative averages and schedules such as Batch
Renorm's), which recalibration does not take. Training flags and momenta are
restored afterwards, and parameters are not touched. Layers that do not
learn statistics (no ``momentum``: ``FrozenBatchNorm``, :class:`Affine`) are
left alone. Layers with per-site statistics (``SharedBatchNorm``, called as
``bn(x, site=i)``) get each site's statistics from that site's inputs.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..stats import Moments, merge
from ._family import bn_axis, has_running_stats, is_bn

__all__ = ["recalibrate", "ESTIMATORS"]

ESTIMATORS = ("exact", "paper")


class _Accumulator:
    """Per-channel statistics of one layer's inputs, batch by batch."""

    def __init__(self, axis: int) -> None:
        self.axis = axis
        self.total: Moments | None = None
        self.sum_means: Tensor | None = None
        self.sum_vars: Tensor | None = None
        self.batches = 0

    def add(self, x: Tensor) -> None:
        axis = self.axis % x.dim()
        dims = [d for d in range(x.dim()) if d != axis]
        m = Moments.of(x.detach(), dims)
        if m.count == 0:
            return
        m = Moments(m.count, m.mean.to(torch.float64), m.m2.to(torch.float64))
        self.total = m if self.total is None else merge(self.total, m)
        unbiased = m.variance(1) if m.count > 1 else m.m2
        self.sum_means = m.mean if self.sum_means is None else self.sum_means + m.mean
        self.sum_vars = unbiased if self.sum_vars is None else self.sum_vars + unbiased
        self.batches += 1

    def result(self, estimator: str) -> tuple[Tensor, Tensor]:
        assert self.total is not None
        if estimator == "paper":
            return self.sum_means / self.batches, self.sum_vars / self.batches
        n = self.total.count
        var = self.total.m2 / (n - 1) if n > 1 else self.total.m2
        return self.total.mean, var


def _model_device(model: nn.Module) -> torch.device | None:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return None


def _input_of(batch: Any) -> Any:
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("recalibrate: got an empty tuple/list as a batch")
        return batch[0]
    return batch


@torch.no_grad()
def recalibrate(
    model: nn.Module,
    data: Iterable[Any] | Tensor,
    *,
    num_batches: int | None = None,
    estimator: str = "exact",
) -> nn.Module:
    """PreciseBN: set every BN layer's running statistics to those of ``data`` under the current weights.

    Args:
        model: any module containing torch or bnkit BN-family layers; edited in place.
        data: an iterable of batches: tensors, or tuples/lists whose first
            element is the input (as a ``DataLoader`` yields). A single tensor
            is one batch. Inputs are moved to the model's device.
        num_batches: use at most this many batches (default: all).
        estimator: ``"exact"`` (mean and unbiased variance over all the data,
            by Chan's merge) or ``"paper"`` (average of per-batch means, and of
            per-batch variances times ``m/(m-1)``).

    Returns:
        ``model``. Its training flags, momenta, parameters and
        ``num_batches_tracked`` are as before; only ``running_mean`` and
        ``running_var`` of layers that saw data change. Layers without running
        buffers (``track_running_stats=False``) are skipped.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"recalibrate: estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"recalibrate: num_batches must be a positive int or None, got {num_batches!r}")
    if isinstance(data, Tensor):
        data = [data]

    bns: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    for name, m in model.named_modules():
        # Layers without ``momentum`` (FrozenBatchNorm, Affine) do not learn statistics: left alone.
        if id(m) not in seen and is_bn(m) and has_running_stats(m) and hasattr(m, "momentum"):
            seen.add(id(m))
            bns.append((name, m))
    if not bns:
        warnings.warn("recalibrate: the model has no BN layer with running statistics", RuntimeWarning, stacklevel=2)
        return model

    flags = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for _, m in bns if hasattr(m, "momentum")]
    saved = [
        (m, {k: (b, b.clone()) for k, b in m._buffers.items() if b is not None}) for _, m in bns
    ]
    # One accumulator per (layer, site): layers such as SharedBatchNorm keep running
    # statistics per call site (running_mean of shape [sites, C], called as bn(x, site=i)).
    accs: dict[tuple[int, int | None], _Accumulator] = {}
    handles = []

    def make_hook(m: nn.Module):
        per_site = m.running_mean.dim() == 2 and callable(getattr(m, "_check_site", None))

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not args or not isinstance(args[0], Tensor):
                return
            site = None
            if per_site:
                site = module._check_site(kwargs.get("site", args[1] if len(args) > 1 else None))
            key = (id(module), site)
            if key not in accs:
                accs[key] = _Accumulator(bn_axis(module))
            accs[key].add(args[0])

        return hook

    device = _model_device(model)
    batches = 0
    try:
        model.eval()
        for _, m in bns:
            m.train()
            if hasattr(m, "momentum"):
                m.momentum = 0.0
            handles.append(m.register_forward_pre_hook(make_hook(m), with_kwargs=True))
        iterator = iter(data) if num_batches is None else itertools.islice(data, num_batches)
        for batch in iterator:
            x = _input_of(batch)
            if isinstance(x, Tensor) and device is not None and x.device != device:
                x = x.to(device)
            model(x)
            batches += 1
    finally:
        for h in handles:
            h.remove()
        for m, bufs in saved:
            for k, (orig, copy_) in bufs.items():
                orig.copy_(copy_)
                m._buffers[k] = orig
        for m, mom in momenta:
            m.momentum = mom
        for m, training in flags:
            m.training = training
    if batches == 0:
        warnings.warn("recalibrate: data yielded no batch; nothing changed", RuntimeWarning, stacklevel=2)
        return model

    unseen = []
    for name, m in bns:
        keys = [k for k in accs if k[0] == id(m) and accs[k].total is not None]
        if not keys:
            unseen.append(name or "<root>")
            continue
        for key in keys:
            mean, var = accs[key].result(estimator)
            site = key[1]
            rm = m.running_mean if site is None else m.running_mean[site]
            rv = m.running_var if site is None else m.running_var[site]
            rm.copy_(mean.to(rm.dtype))
            rv.copy_(var.to(rv.dtype))
    if unseen:
        warnings.warn(
            f"recalibrate: {len(unseen)} BN layer(s) received no input and keep their statistics: "
            + ", ".join(unseen[:5]),
            RuntimeWarning,
            stacklevel=2,
        )
    return model
