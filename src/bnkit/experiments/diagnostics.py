"""Diagnostics: the distribution of a layer's nonlinearity input over training (BN paper, Figure 1 b,c).

* :class:`InputRecorder` -- a forward hook that keeps the input of a module (e.g. the last hidden sigmoid).
* :func:`probe_percentiles` -- runs a fixed probe batch through the model and returns the 15/50/85th
  percentiles of every unit's input to the hooked module. The forward runs in *training* mode, so a BN
  layer normalizes with the probe's own batch statistics (the sigmoid input is gamma * x_hat + beta),
  and every buffer (running mean/var, counters) is restored afterwards: probing never changes training.
* :func:`typical_unit` -- the rule for the "typical" unit whose curves are plotted: the unit whose drift
  (range over the run of its 50th percentile) is the median over all units of the layer. It is chosen
  separately for each run by the same rule, and does not depend on how the other run behaved.
* :func:`drift` -- the drift of one unit: ``range`` = max - min of its 50th percentile over the run, and
  ``relative`` = range / mean(85th - 15th percentile), i.e. how far the median moved in units of the
  unit's typical spread.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["QUANTILES", "InputRecorder", "percentiles", "probe_percentiles", "typical_unit", "drift",
           "all_unit_drifts"]

QUANTILES = (0.15, 0.50, 0.85)


class InputRecorder:
    """Context manager/handle: records ``input[0]`` of ``module`` on every forward (detached)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.inputs: List[torch.Tensor] = []
        self._h = module.register_forward_hook(self._hook)

    def _hook(self, mod, inputs, output):
        self.inputs.append(inputs[0].detach().clone())

    @property
    def last(self) -> torch.Tensor:
        return self.inputs[-1]

    def remove(self):
        if self._h is not None:
            self._h.remove()
            self._h = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def percentiles(x: torch.Tensor, qs: Sequence[float] = QUANTILES) -> torch.Tensor:
    """Per-unit quantiles over the batch: (N, C[, ...]) -> (len(qs), C) (spatial positions pooled with the
    batch for conv maps). Linear interpolation, the same as ``numpy.percentile``'s default."""
    x = x.detach().double()
    if x.dim() > 2:
        x = x.transpose(0, 1).flatten(1).t()
    return torch.quantile(x, torch.tensor(list(qs), dtype=torch.float64), dim=0)


@torch.no_grad()
def probe_percentiles(model: nn.Module, module: nn.Module, probe_x: torch.Tensor,
                      qs: Sequence[float] = QUANTILES) -> torch.Tensor:
    """Percentiles (len(qs), units) of the input to ``module`` on ``probe_x``, with the batch statistics of
    the probe itself; the model's buffers and train/eval mode are left exactly as they were."""
    was_training = model.training
    saved = {k: v.clone() for k, v in model.named_buffers()}
    try:
        model.train()
        with InputRecorder(module) as rec:
            model(probe_x)
        return percentiles(rec.last, qs)
    finally:
        bufs = dict(model.named_buffers())
        for k, v in saved.items():
            bufs[k].copy_(v)
        model.train(was_training)


def drift(p15: Sequence[float], p50: Sequence[float], p85: Sequence[float]) -> Dict[str, float]:
    p15, p50, p85 = (np.asarray(a, dtype=np.float64) for a in (p15, p50, p85))
    rng = float(p50.max() - p50.min()) if len(p50) else 0.0
    spread = float(np.mean(p85 - p15)) if len(p50) else 0.0
    return {"range": rng, "spread": spread, "relative": rng / spread if spread > 0 else float("inf")}


def all_unit_drifts(series: np.ndarray) -> np.ndarray:
    """series: (T, 3, units) percentiles over time -> (units,) 50th-percentile ranges."""
    s = np.asarray(series)
    return s[:, 1, :].max(0) - s[:, 1, :].min(0)


def typical_unit(series: np.ndarray) -> int:
    """The unit whose 50th-percentile range is the median over units (lower median for even counts;
    ties broken by the lower index)."""
    r = all_unit_drifts(series)
    order = np.argsort(r, kind="stable")
    return int(order[(len(order) - 1) // 2])
