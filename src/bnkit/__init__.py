"""bnkit: Batch Normalization for PyTorch, from the math up.

Layers flow one way: ``stats`` -> ``kernels`` -> ``functional`` -> ``layers``
-> ``tools`` -> ``experiments`` / ``cli``.
"""

from __future__ import annotations

from . import functional, kernels, reference, stats
from .layers import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from .stats import momentum_from_keras, momentum_to_keras

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "functional",
    "kernels",
    "reference",
    "stats",
    "momentum_from_keras",
    "momentum_to_keras",
]

# ---- exports of later parts (each part adds its own lines below) ----
from .sync import SyncBatchNorm, convert_sync_batchnorm  # noqa: E402  (SyncBN, issue 5)

__all__ += ["SyncBatchNorm", "convert_sync_batchnorm"]
from .tools import Affine, FuseReport, convert, fuse, recalibrate  # noqa: E402  (deployment tools, issue 6)

__all__ += ["convert", "fuse", "recalibrate", "Affine", "FuseReport"]
from .variants import (  # noqa: E402  (BN variants, issue 4)
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
from .tools.freeze import freeze, unfreeze  # noqa: E402  (issue 4)

__all__ += [
    "SharedBatchNorm",
    "BatchRenorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "GhostBatchNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "FrozenSharedBatchNorm",
    "freeze",
    "unfreeze",
]
from .tools.adapt import AdaptHandle, adapt, bn_parameters, tent  # noqa: E402  (test-time adaptation)

__all__ += ["adapt", "tent", "bn_parameters", "AdaptHandle"]
from .tools.doctor import BNReport, inspect  # noqa: E402  (the BN doctor)

__all__ += ["inspect", "BNReport"]
