"""Activation checkpointing for torch's BN layers: :func:`checkpoint_safe` (and the BN-layer walk the loop tools share)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..engine import in_recompute
from ..family import is_torch_bn
from ._family import has_running_stats, is_bn

__all__ = ["checkpoint_safe"]


def _bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every distinct BN-family module of ``model`` (and any module with running statistics), in order."""
    out, seen = [], set()
    for name, m in model.named_modules():
        if id(m) not in seen and (is_bn(m) or has_running_stats(m)):
            seen.add(id(m))
            out.append((name, m))
    return out


def _torch_bn_layers(model: nn.Module) -> list[nn.Module]:
    """torch's own BN layers of ``model`` (bnkit's layers handle checkpointing and accumulation in the engine)."""
    return [m for _, m in _bn_layers(model) if is_torch_bn(m)]


class _HookHandles:
    """Module hooks that a ``with`` block or ``remove()`` takes off again."""

    def __init__(self, handles: list) -> None:
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "_HookHandles":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _restore_after_recompute_pre(module: nn.Module, args: tuple) -> None:
    if module.training and in_recompute():
        # The recompute updates copies (which autograd may save); the layer's own buffers stay as they are.
        originals = {k: b for k, b in module._buffers.items() if isinstance(b, Tensor)}
        for k, b in originals.items():
            module._buffers[k] = b.clone()
        module.__dict__.setdefault("_bnkit_recompute_saved", []).append(originals)


def _restore_after_recompute_post(module: nn.Module, args: tuple, output: Any) -> None:
    stack = module.__dict__.get("_bnkit_recompute_saved")
    if stack and module.training and in_recompute():
        module._buffers.update(stack.pop())


def checkpoint_safe(model: nn.Module) -> _HookHandles:
    """Make torch's own BN layers of ``model`` update their statistics once under activation checkpointing.

    ``torch.utils.checkpoint`` runs a checkpointed forward again during the
    backward, and torch's BN layers then update ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` a second time. This registers
    a forward pre-hook and a forward hook on each of them that, only during
    that recompute (a forward inside a backward), let the layer update copies
    of its buffers and put the originals back after. The recompute normalizes with the
    batch statistics of the same input, so outputs and gradients are those of
    the step without checkpointing. bnkit's layers need nothing: the engine
    skips the second update itself.

    Args:
        model: any module.

    Returns:
        A handle: ``handle.remove()`` takes the hooks off; it is also a
        context manager that removes them on exit.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> handle = bnkit.checkpoint_safe(model)
        >>> x = torch.randn(8, 3, requires_grad=True)
        >>> torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False).sum().backward()
        >>> int(model[1].num_batches_tracked)
        1
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"checkpoint_safe: expected an nn.Module, got {type(model).__name__}")
    handles = []
    for m in _torch_bn_layers(model):
        handles.append(m.register_forward_pre_hook(_restore_after_recompute_pre))
        # always_call: early-stopping recompute raises inside the layer, after it saved its tensors.
        handles.append(m.register_forward_hook(_restore_after_recompute_post, always_call=True))
    return _HookHandles(handles)

