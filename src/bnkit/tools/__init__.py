"""Deployment tools: layer conversion, BN folding, population statistics."""

from .calibrate import recalibrate
from .convert import convert
from .freeze import freeze, unfreeze
from .fuse import Affine, FuseReport, fuse
from .loops import accumulate_stats, checkpoint_safe, preserve_stats, sync_running_stats

__all__ = ["Affine", "FuseReport", "convert", "freeze", "fuse", "accumulate_stats", "checkpoint_safe", "preserve_stats", "recalibrate", "sync_running_stats",
           "unfreeze"]
