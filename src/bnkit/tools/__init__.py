"""Deployment tools: layer conversion, BN folding, population statistics."""

from .calibrate import recalibrate
from .convert import convert
from .fuse import Affine, FuseReport, fuse
from .freeze import freeze, unfreeze
from .loops import preserve_stats, sync_running_stats
