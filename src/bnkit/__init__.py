"""bnkit: Batch Normalization for PyTorch, from the math up.

Layers flow one way: ``stats`` -> ``kernels`` -> ``engine`` / ``functional``
-> ``layers``, ``variants``, ``sync`` -> ``tools`` -> ``experiments`` / ``cli``.
"""

from __future__ import annotations

# integrations: importing it registers TorchScript and torch.ao quantization support.
from . import engine, functional, integrations, kernels, reference, stats  # noqa: F401
from .accelerate import accelerate, accelerate_counts, accelerated, is_accelerated
from .errors import ChannelMismatchError, DtypeMismatchError, InputDtypeError, MissingStatisticsError
from .layers import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from .stats import momentum_from_keras, momentum_to_keras
from .sync import SyncBatchNorm, convert_sync_batchnorm
from .tools import Affine, FuseReport, convert, fuse, recalibrate
from .tools.adapt import AdaptHandle, adapt, bn_parameters, tent
from .tools.calibrate import NotEnoughBatchesError
from .tools.doctor import BNReport, inspect
from .tools.domain_bn import convert_domain_bn, domain, select_domain, set_domain
from .tools.freeze import freeze, unfreeze
from .tools.loops import accumulate_stats, checkpoint_safe, preserve_stats, sync_running_stats
from .variants import (
    BatchRenorm,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    DomainBatchNorm,
    DomainBatchNorm1d,
    DomainBatchNorm2d,
    DomainBatchNorm3d,
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    FrozenSharedBatchNorm,
    GhostBatchNorm,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    SharedBatchNorm,
)

__version__ = "0.1.0"

__all__ = [
    "AdaptHandle",
    "Affine",
    "BNReport",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "ChannelMismatchError",
    "DomainBatchNorm",
    "DomainBatchNorm1d",
    "DomainBatchNorm2d",
    "DomainBatchNorm3d",
    "DtypeMismatchError",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "FrozenSharedBatchNorm",
    "FuseReport",
    "GhostBatchNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "InputDtypeError",
    "MissingStatisticsError",
    "NotEnoughBatchesError",
    "SharedBatchNorm",
    "SyncBatchNorm",
    "accelerate",
    "accelerate_counts",
    "accelerated",
    "accumulate_stats",
    "adapt",
    "bn_parameters",
    "checkpoint_safe",
    "convert",
    "convert_domain_bn",
    "convert_sync_batchnorm",
    "domain",
    "engine",
    "freeze",
    "functional",
    "fuse",
    "inspect",
    "is_accelerated",
    "kernels",
    "momentum_from_keras",
    "momentum_to_keras",
    "preserve_stats",
    "recalibrate",
    "reference",
    "select_domain",
    "set_domain",
    "stats",
    "sync_running_stats",
    "tent",
    "unfreeze",
]
