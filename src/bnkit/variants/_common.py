"""Small helpers shared by the variant families."""

from __future__ import annotations

from typing import Any

import torch.fx
from torch import nn


def is_int(v: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def no_training_trace(layer: nn.Module, input: Any) -> None:
    """Refuse ``torch.fx.symbolic_trace`` of a training call (its steps are not one engine call)."""
    if isinstance(input, torch.fx.Proxy):
        raise RuntimeError(
            f"{layer.describe()}: torch.fx.symbolic_trace records this layer as one node in eval mode only; "
            "call .eval() before tracing (or trace it as a leaf module)"
        )
