"""What the BN-family layers share besides `bnkit.BatchNorm` itself: the constructor-argument protocol, the
input and per-channel checks made before the engine's, and the ``tiny_batch="running"`` policy.

Variants (Batch Renorm, Ghost, Shared, Sync) import these from :mod:`bnkit.layers`, which re-exports them.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ._warn import warn
from .engine import batch_norm_module_call, call_spec, check_input, check_mask, masked_module_call
from .errors import ChannelMismatchError

__all__ = ["SHARE_AFFINE_MODES", "TINY_BATCH_POLICIES", "bn_arguments", "check_feature_input",
           "check_per_channel_tensors", "masked_tiny_batch", "tiny_batch_forward"]

SHARE_AFFINE_MODES = ("none", "weight", "all")
TINY_BATCH_POLICIES = ("raise", "running")

# The arguments of BatchNorm.__init__, which every subclass passes on unchanged.
_BN_ARGUMENTS = (
    "num_features", "eps", "momentum", "affine", "track_running_stats", "device", "dtype", "bias", "axis",
    "share_affine", "nonfinite", "convention", "tiny_batch",
)


def bn_arguments(namespace: dict[str, Any]) -> dict[str, Any]:
    """:class:`BatchNorm`'s constructor arguments picked from a subclass constructor's ``locals()``."""
    # Subclasses without convention/tiny_batch (Ghost, Shared, Sync) get BatchNorm's defaults.
    return {name: namespace[name] for name in _BN_ARGUMENTS if name in namespace}



def check_feature_input(
    where: str, input: Tensor, expected_dims: tuple[int, ...] | None, axis: int, num_features: int
) -> None:
    """The checks every BN-family layer makes on its input, with torch's messages where torch has one."""
    check_input(call_spec(where, axis, num_features, expected_dims), input)


def check_per_channel_tensors(layer: nn.Module) -> None:
    """A layer's weight, bias and running buffers have one value per channel (weight/bias: or one shared value).

    For layers that use them before the engine's own checks (Batch Renorm's correction): the same
    ``ChannelMismatchError`` (a ``RuntimeError``, as torch's) and message as the engine.
    """
    c = layer.num_features
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(layer, name, None)
        if isinstance(t, Tensor) and t.numel() != c and not (t.numel() == 1 and name in ("weight", "bias")):
            raise ChannelMismatchError(
                f"{layer.describe()}: {name} should have {c} elements (one per channel), got shape {tuple(t.shape)}"
            )




def tiny_batch_forward(layer: nn.Module, input: Tensor) -> Tensor | None:
    """The eval-mode output for a one-value-per-channel training batch under ``tiny_batch="running"``."""
    if not (isinstance(input, Tensor) and input.dim() >= 1 and -input.dim() <= layer.axis < input.dim()):
        return None
    if input.numel() == 0 or input.numel() != input.shape[layer.axis]:
        return None
    layer.check_input(input)
    warn(
        f"{layer.describe()}: a training batch with one value per channel (input size {tuple(input.shape)}) "
        "was normalized with the running statistics, which were not updated (tiny_batch='running')",
        RuntimeWarning,
    )
    return batch_norm_module_call(
        layer.call_spec(), input, layer.weight, layer.bias, layer.running_mean, layer.running_var, None, False
    )


def masked_tiny_batch(layer: nn.Module, input: Tensor, mask: Tensor) -> Tensor | None:
    """Under ``tiny_batch="running"``, the eval-mode output of a training batch with one valid entry."""
    if not layer.training or getattr(layer, "tiny_batch", "raise") == "raise":
        return None
    spec = layer.call_spec()
    check_input(spec, input)
    check_mask(spec, input, mask)
    if int(mask.sum()) != 1:
        return None
    warn(
        f"{layer.describe()}: a training batch with one valid entry per channel was normalized with the "
        "running statistics, which were not updated (tiny_batch='running')",
        RuntimeWarning,
    )
    return masked_module_call(spec, input, mask, layer.weight, layer.bias, layer.running_mean, layer.running_var,
                              None, False)

