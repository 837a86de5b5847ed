"""bnkit: Batch Normalization for PyTorch, from the math up.

Layers flow one way: ``stats`` -> ``kernels`` -> ``engine`` / ``functional``
-> ``layers``, ``variants``, ``sync`` -> ``tools`` -> ``experiments`` / ``cli``.
"""

from __future__ import annotations

from . import engine, functional, kernels, reference, stats
from .layers import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from .stats import momentum_from_keras, momentum_to_keras
from .sync import SyncBatchNorm, convert_sync_batchnorm
from .tools import Affine, FuseReport, convert, fuse, recalibrate
from .tools.freeze import freeze, unfreeze
from .variants import (
    BatchRenorm,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
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
    "Affine",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
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
    "SharedBatchNorm",
    "SyncBatchNorm",
    "convert",
    "convert_sync_batchnorm",
    "engine",
    "freeze",
    "functional",
    "fuse",
    "kernels",
    "momentum_from_keras",
    "momentum_to_keras",
    "recalibrate",
    "reference",
    "stats",
    "unfreeze",
]
from .errors import ChannelMismatchError, DtypeMismatchError  # noqa: E402  (drop-in exception types)
from .tools.calibrate import NotEnoughBatchesError  # noqa: E402
from .tools.loops import accumulate_stats, checkpoint_safe, preserve_stats, sync_running_stats  # noqa: E402  (BN inside training loops)

__all__ += ["ChannelMismatchError", "DtypeMismatchError", "NotEnoughBatchesError", "accumulate_stats", "checkpoint_safe", "preserve_stats", "sync_running_stats"]
from . import integrations  # noqa: E402,F401  (registers TorchScript and quantization support)
