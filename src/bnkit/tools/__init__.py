"""Deployment tools: layer conversion, BN folding, population statistics."""

from .calibrate import recalibrate
from .convert import convert
from .freeze import freeze, unfreeze
from .fuse import Affine, FuseReport, fuse
from .loops import preserve_stats, sync_running_stats
from .adapt import AdaptHandle, adapt, bn_parameters, tent
from .doctor import BNReport, inspect

__all__ = ["Affine", "FuseReport", "convert", "freeze", "fuse", "preserve_stats", "recalibrate", "sync_running_stats",
           "unfreeze", "AdaptHandle", "adapt", "bn_parameters", "tent", "BNReport", "inspect"]
