"""A layer's call as the engine sees it: :class:`CallSpec`, built once per layer by :func:`call_spec`, and the
constants the fused C++ op shares with Python (status codes, the rank-mask encoding, the cumulative-momentum
sentinel), defined once in ``csrc/bnkit_kernels.h`` and read here from the extension."""

from __future__ import annotations

import numbers
from functools import lru_cache
from typing import NamedTuple

import torch

from . import kernels

NONFINITE_POLICIES = ("skip", "raise", "propagate")


class CallSpec(NamedTuple):
    """What a BN layer is, for the engine: immutable, built once per layer (:func:`call_spec`).

    ``ranks``: the accepted input ranks (``None``: any rank with the feature
    axis); ``min_rank``: the F-style API's "at least ``(N, C)``" (2) or 0;
    ``num_features`` 0: any. ``rank_mask``, ``fused_momentum`` and
    ``check_finite`` are the same facts as the fused op takes them (the
    first two ``None`` without the C++ extension, or for a negative momentum,
    which the op would read as its cumulative-average sentinel: the fused op
    is not called then).
    """

    name: str
    axis: int
    num_features: int
    ranks: tuple[int, ...] | None
    min_rank: int
    eps: float
    momentum: float | None
    nonfinite: str
    rank_mask: int | None
    fused_momentum: float | None
    check_finite: bool


def call_spec(
    name: str,
    axis: int,
    num_features: int = 0,
    ranks: tuple[int, ...] | None = None,
    eps: float = 1e-5,
    momentum: float | None = 0.1,
    nonfinite: str = "propagate",
    min_rank: int = 0,
) -> CallSpec:
    """A :class:`CallSpec`, with the fused op's encodings (rank bit mask, cumulative-momentum sentinel) derived."""
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"{name}: nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    if not _is_scalar(eps):  # torch's type: its argument parser's TypeError
        raise TypeError(f"{name}: eps must be a float, not {type(eps).__name__}")
    if momentum is not None and not _is_scalar(momentum):
        raise TypeError(f"{name}: momentum must be a float or None, not {type(momentum).__name__}")
    # Under dynamo (compile, export) the encodings are not needed (no fused op runs, and such a spec
    # is never cached): the extension is never loaded inside the traced region (its loader's lock
    # would break the graph).
    constants = _CONSTANTS if torch.compiler.is_compiling() else _constants()
    if constants is None:  # no fused op: the encodings are never sent anywhere
        mask, fused_momentum = None, None
    else:
        if ranks is not None:
            mask = sum(1 << d for d in ranks)  # bit d: a d-D input is accepted
        elif min_rank not in (0, 2):
            raise ValueError(f"{name}: min_rank must be 0 or 2, got {min_rank}")
        else:
            mask = constants.ranks_from_2 if min_rank else 0
        fused_momentum = constants.cumulative_momentum if momentum is None else momentum
        if momentum is not None and not momentum >= 0:  # (set after construction, as torch allows) the op reads
            mask, fused_momentum = None, None  # a negative momentum as its sentinel: the Python rule then
    return CallSpec(
        name, axis, num_features, ranks, min_rank, eps, momentum, nonfinite, mask, fused_momentum,
        nonfinite != "propagate",
    )


def _is_scalar(v: object) -> bool:
    return isinstance(v, numbers.Real) or (isinstance(v, torch.Tensor) and v.dim() == 0)


cached_call_spec = lru_cache(maxsize=256)(call_spec)


class _Constants(NamedTuple):
    handled: int
    nonfinite: int
    not_handled: int
    ranks_from_2: int
    cumulative_momentum: float


_CONSTANTS: _Constants | None = None


def _constants() -> _Constants | None:
    """The values shared with ``layer.cpp``, read once from the extension (defined there only; None without it)."""
    global _CONSTANTS
    if _CONSTANTS is None and kernels.cpp_available():
        # Read outside torch.jit.trace (the first bnkit call of a process may be traced): the tracer cannot
        # record an op that returns plain ints, and these values are not part of any model.
        tracing_state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            _CONSTANTS = _Constants(*torch.ops.bnkit.layer_constants())
        finally:
            torch._C._set_tracing_state(tracing_state)
    return _CONSTANTS
