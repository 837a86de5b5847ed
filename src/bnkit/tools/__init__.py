"""Deployment tools: layer conversion, BN folding, population statistics."""

from .adapt import AdaptHandle, adapt, bn_parameters, tent
from .calibrate import recalibrate
from .convert import convert
from .doctor import BNReport, inspect
from .freeze import freeze, unfreeze
from .fuse import Affine, FuseReport, fuse
from .loops import accumulate_stats, checkpoint_safe, preserve_stats, sync_running_stats

__all__ = [
    "AdaptHandle",
    "Affine",
    "BNReport",
    "FuseReport",
    "accumulate_stats",
    "adapt",
    "bn_parameters",
    "checkpoint_safe",
    "convert",
    "freeze",
    "fuse",
    "inspect",
    "preserve_stats",
    "recalibrate",
    "sync_running_stats",
    "tent",
    "unfreeze",
]
