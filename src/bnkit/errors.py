"""Exception types shared by every layer of bnkit (imports nothing from bnkit).

A drop-in must raise what the layer it replaces raises, so that code which
catches torch's exception catches bnkit's. torch reports a parameter or buffer
of the wrong size (and an input with the wrong number of channels) as a
``RuntimeError``; bnkit raises :class:`ChannelMismatchError`, which *is* a
``RuntimeError`` and, for code written against earlier bnkit releases, also a
``ValueError``. Likewise a parameter or buffer whose dtype does not fit the
input is a :class:`DtypeMismatchError`: a ``TypeError`` (bnkit's earlier type)
and a ``RuntimeError`` (torch's "mixed dtype"). Normalizing in eval mode without
running statistics is a :class:`MissingStatisticsError`, a ``RuntimeError`` (torch's
"running_mean must be defined in evaluation mode") and a ``ValueError`` (bnkit's earlier type).
An input that is not floating point is an :class:`InputDtypeError`: a ``TypeError`` (bnkit's
earlier type) and a ``NotImplementedError`` (torch's "batch_norm not implemented for 'Int'").
"""

from __future__ import annotations

__all__ = ["ChannelMismatchError", "DtypeMismatchError", "InputDtypeError", "MissingStatisticsError"]


class ChannelMismatchError(RuntimeError, ValueError):
    """A per-channel tensor (or the input) does not have the expected number of channels."""


class DtypeMismatchError(TypeError, RuntimeError):
    """A parameter or buffer has a dtype that cannot be used with the input's."""


class MissingStatisticsError(RuntimeError, ValueError):
    """Eval-mode normalization was asked for without the running statistics it normalizes with."""


class InputDtypeError(TypeError, NotImplementedError):
    """The input is not floating point (an integer, bool or complex tensor)."""
