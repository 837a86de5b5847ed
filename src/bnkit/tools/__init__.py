"""Deployment tools: layer conversion, BN folding, population statistics."""

from .calibrate import recalibrate
from .convert import convert
from .fuse import Affine, FuseReport, fuse
from .freeze import freeze, unfreeze
from .adapt import AdaptHandle, adapt, bn_parameters, tent
from .doctor import BNReport, inspect
