"""Warnings attributed to the user's code, whatever the depth of bnkit's call stack."""

from __future__ import annotations

import os
import sys
import warnings

import torch

# Frames in these folders are not the user's: bnkit itself, and torch (nn.Module.__call__ and friends).
_SKIP = (os.path.dirname(os.path.abspath(__file__)) + os.sep, os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` pointing at the first caller outside bnkit and torch."""
    if sys.version_info >= (3, 12):
        warnings.warn(message, category, skip_file_prefixes=_SKIP)
        return
    level, frame = 2, sys._getframe(1)  # level 1 is this function
    while frame is not None and frame.f_code.co_filename.startswith(_SKIP):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
