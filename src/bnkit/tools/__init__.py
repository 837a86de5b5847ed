"""Deployment tools: layer conversion, BN folding, population statistics."""

from .calibrate import recalibrate
from .convert import convert
from .freeze import freeze, unfreeze
from .fuse import Affine, FuseReport, fuse

__all__ = ["Affine", "FuseReport", "convert", "freeze", "fuse", "recalibrate", "unfreeze"]
