"""BN variants built on bnkit's core: shared BN, Batch Renormalization, Ghost BN, frozen BN.

Every variant reuses the same pieces as :class:`bnkit.BatchNorm`: batch
statistics and exact merging from :mod:`bnkit.stats`, normalization and its
autograd from the engine (:mod:`bnkit.engine`, one door for every layer), the running-average
rule (PyTorch's: unbiased batch variance, ``momentum=None`` = cumulative
average) and the non-finite policy of the core. All of them accept the
feature ``axis``, ``share_affine`` and every rank/memory format the core does.

:class:`SharedBatchNorm`
    One BN applied at several sites of a network (time steps of an RNN,
    repeated blocks): gamma/beta shared by all sites, running statistics per
    site (``[sites, C]``) or pooled (``share_stats=True``). Recurrent BN,
    Cooijmans et al. 2016.
:class:`BatchRenorm`
    ``y = gamma * (((x - mu_B) / sigma_B) * r + d) + beta`` with
    ``r = clip(sigma_B / sigma, 1/r_max, r_max)`` and
    ``d = clip((mu_B - mu) / sigma, -d_max, d_max)`` held constant in the
    backward pass (Ioffe 2017).
:class:`GhostBatchNorm`
    Normalizes contiguous virtual batches of ``virtual_batch_size`` samples
    with their own statistics; the running statistics are updated once per
    call from the exactly merged statistics of the whole batch (Hoffer et al.
    2017).
:class:`BatchNormAct`, :class:`FrozenBatchNormAct`
    BN (or frozen BN) followed by a drop layer and an activation, the bnkit
    form of timm's ``BatchNormAct2d`` / ``FrozenBatchNormAct2d``.
:class:`DomainBatchNorm`
    Statistics (and affine parameters) per domain, called as
    ``bn(x, domain=d)`` with an int or a per-sample int64 tensor (mixed
    batches): each domain normalized with its own batch statistics, running
    statistics per domain (Domain-Specific BN, Chang et al. 2019).
:class:`FrozenBatchNorm`
    The inference affine map with buffers only (no parameters, no statistics
    updates); see :func:`bnkit.freeze` / :func:`bnkit.unfreeze`.
"""

from __future__ import annotations

from .act import (
    BatchNormAct,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    FrozenBatchNormAct,
    FrozenBatchNormAct1d,
    FrozenBatchNormAct2d,
    FrozenBatchNormAct3d,
)
from .domain import DomainBatchNorm, DomainBatchNorm1d, DomainBatchNorm2d, DomainBatchNorm3d
from .frozen import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, FrozenSharedBatchNorm
from .ghost import GhostBatchNorm, GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, ghost_batch_norm
from .renorm import BatchRenorm, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .shared import SharedBatchNorm

__all__ = [
    "BatchNormAct", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d",
    "FrozenBatchNormAct", "FrozenBatchNormAct1d", "FrozenBatchNormAct2d", "FrozenBatchNormAct3d",
    "BatchRenorm", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
    "DomainBatchNorm", "DomainBatchNorm1d", "DomainBatchNorm2d", "DomainBatchNorm3d",
    "FrozenBatchNorm", "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "FrozenSharedBatchNorm",
    "GhostBatchNorm", "GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d",
    "SharedBatchNorm", "ghost_batch_norm",
]
