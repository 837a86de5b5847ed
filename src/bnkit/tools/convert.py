"""Swap BN layers between torch and bnkit: :func:`convert`.

``torch.nn.BatchNorm1d/2d/3d`` <-> ``bnkit.BatchNorm1d/2d/3d``. The new layer
takes over the old layer's parameter and buffer *objects* (so
``requires_grad``, device, dtype, ``num_batches_tracked`` and, with
``inplace=True``, an optimizer's references are kept), its ``training`` flag,
its hook dictionaries (hooks registered on the layer keep firing and their
handles still remove them) and its ``momentum``/``eps``. Parent modules are
edited with ``setattr``, so hooks on them are untouched. Outputs and
``state_dict`` (keys, values and the version metadata) are equal.

Only the exact classes are converted: subclasses (SyncBatchNorm, bnkit's
variants, user subclasses) are left as they are.
"""

from __future__ import annotations

import copy

from torch import nn

from .. import layers
from ..family import TORCH_BATCHNORM, ranked
from ..surgery import CALL_HOOK_DICTS, STATE_HOOK_DICTS, replace_modules, take_over_tensors

__all__ = ["convert"]

_TORCH_TO_BNKIT: dict[type, type] = {torch_cls: ranked(layers.BatchNorm, dims) for dims, (torch_cls, _) in TORCH_BATCHNORM.items()}
_BNKIT_TO_TORCH: dict[type, type] = {v: k for k, v in _TORCH_TO_BNKIT.items()}


def _check_torch_compatible(bn: layers.BatchNorm, name: str) -> None:
    problems = []
    if bn.axis != 1:
        problems.append(f"axis={bn.axis} (torch normalizes along axis 1)")
    if bn.share_affine != "none":
        problems.append(f"share_affine={bn.share_affine!r} (torch has per-channel weight and bias)")
    if getattr(bn, "convention", "torch") != "torch":
        problems.append(f"convention={bn.convention!r} (torch averages the unbiased batch variance)")
    if bn.affine and bn.bias is None:
        problems.append("bias=False (torch's affine layers always have a bias)")
    if problems:
        raise ValueError(f"convert(to='torch'): {name or 'the model'} ({bn.describe()}) has no torch equivalent: " + "; ".join(problems))


def _swap(old: nn.Module, new_cls: type) -> nn.Module:
    """A ``new_cls`` layer that takes over ``old``'s tensors and flags (hooks: :func:`replace_modules`)."""
    c = old.num_features
    ref = old.running_mean if old.running_mean is not None else old.weight
    # Built on the meta device: the real tensors are taken over from ``old`` below.
    new = new_cls(
        c,
        eps=old.eps,
        momentum=old.momentum,
        affine=old.affine,
        track_running_stats=old.track_running_stats,
        device="meta",
        dtype=None if ref is None else ref.dtype,
    )
    take_over_tensors(new, old, ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"))
    new.train(old.training)
    return new


def convert(model: nn.Module, to: str = "bnkit", inplace: bool = False) -> nn.Module:
    """Replace every torch BN layer by its bnkit counterpart (``to="bnkit"``), or back (``to="torch"``).

    Args:
        model: any module (a BN layer itself is converted too).
        to: ``"bnkit"`` (``torch.nn.BatchNorm{1,2,3}d`` -> ``bnkit.BatchNorm{1,2,3}d``) or
            ``"torch"`` (the reverse).
        inplace: edit ``model`` itself; otherwise a deep copy is converted.

    Returns:
        The converted model (``model`` itself when ``inplace`` and the root is not a BN layer).

    The converted layers keep parameters (the same ``Parameter`` objects),
    buffers including ``num_batches_tracked``, ``training`` flags, hooks,
    ``eps`` and ``momentum``, so outputs and ``state_dict`` are equal. bnkit
    layers get their default ``nonfinite="skip"`` policy (torch propagates
    NaN/Inf into the running statistics; on finite data both agree); going
    back to torch drops that policy (and ``tiny_batch``). A bnkit layer with no torch equivalent
    (``axis != 1``, ``share_affine``, ``bias=False``, ``convention="keras"``,
    or the generic rank-free :class:`bnkit.BatchNorm` of any axis) raises
    ``ValueError`` before anything is changed. Subclasses of either family
    (variants, SyncBatchNorm) are left alone.
    """
    if to not in ("bnkit", "torch"):
        raise ValueError(f"convert: to must be 'bnkit' or 'torch', got {to!r}")
    table = _TORCH_TO_BNKIT if to == "bnkit" else _BNKIT_TO_TORCH
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(model).__name__}")
    if to == "torch":
        for name, m in model.named_modules():
            if type(m) in table:
                _check_torch_compatible(m, name)
            elif type(m) is layers.BatchNorm:
                # Not skipped silently: the generic layer accepts any rank (and any axis),
                # while each torch class accepts fixed ranks with channels on axis 1.
                raise ValueError(
                    f"convert(to='torch'): layer {name or '<root>'!r} ({m._describe()}, axis={m.axis}) is the generic "
                    "bnkit.BatchNorm, which has no torch equivalent (torch's BatchNorm1d/2d/3d take fixed ranks with "
                    "the features on axis 1); use bnkit.BatchNorm1d/2d/3d for layers that should convert"
                )
    if not inplace:
        model = copy.deepcopy(model)
    return replace_modules(
        model,
        lambda m: type(m) in table,
        lambda m, name: _swap(m, table[type(m)]),
        hook_dicts=CALL_HOOK_DICTS + STATE_HOOK_DICTS,
    )
