"""bnkit: Batch Normalization for PyTorch, from the math up.

Layers flow one way: ``stats`` -> ``kernels`` -> ``engine`` / ``functional``
-> ``layers``, ``variants``, ``sync`` -> ``tools`` -> ``experiments`` / ``cli``.
"""

from __future__ import annotations

# ruff: noqa: E402 - the Ctrl-C guard of the command's startup must run before the (slow) imports below


def _guard_cli_startup():
    """The SIGINT handler this import installs when it is the start of the ``bnkit`` command (``python -m
    bnkit.cli`` or the console script), else None. Importing torch below takes seconds, before the CLI's
    own Ctrl-C handling exists; this handler makes Ctrl-C then one line and exit 130, not a traceback. The
    CLI's ``main()`` puts Python's handler back; a plain ``import bnkit`` changes no signal handling."""
    import os
    import sys

    argv, orig = sys.argv, getattr(sys, "orig_argv", [])
    if argv[:1] == ["-m"]:  # runpy is importing the parent package of the module it will run
        at = next((i for i, a in enumerate(orig) if a.startswith("-m")), None)
        target = None if at is None else (orig[at][2:] or (orig[at + 1] if at + 1 < len(orig) else None))
        if target != "bnkit.cli":
            return None
    elif os.path.basename(argv[0] if argv else "") not in ("bnkit", "bnkit.exe"):
        return None
    import signal

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:  # ignored (nohup, &) or already replaced
        return None

    def interrupted(signum, frame):
        sys.stderr.write("\nbnkit: interrupted\n")
        sys.stderr.flush()
        os._exit(130)  # mid-import: unwinding a half-imported torch could only add noise

    signal.signal(signal.SIGINT, interrupted)
    return interrupted


_cli_startup_sigint = _guard_cli_startup()

# integrations: importing it registers TorchScript and torch.ao quantization support.
from . import engine, functional, integrations, kernels, reference, stats  # noqa: F401
from .accelerate import accelerate, accelerate_counts, accelerated, is_accelerated
from .errors import ChannelMismatchError, DtypeMismatchError, InputDtypeError, MissingStatisticsError
from .layers import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LazyBatchNorm,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
)
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
    "LazyBatchNorm",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
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
