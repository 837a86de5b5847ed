"""What the BN-family layers share besides `bnkit.BatchNorm` itself: the constructor-argument protocol, the
input and per-channel checks made before the engine's, the ``tiny_batch="running"`` policy, and the wording of
the BatchNorm arguments in their docstrings (:func:`document_bn_arguments`).

Variants (Batch Renorm, Ghost, Shared, Sync) import these from :mod:`bnkit.layers`, which re-exports them
(``document_bn_arguments``, which layers.py does not use, they import from here).
"""

from __future__ import annotations

import re
from operator import itemgetter
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_hooks

from ._warn import warn
from .engine import batch_norm_module_call, call_spec, check_input, check_mask, masked_module_call
from .errors import ChannelMismatchError
from .kernels import aten_graph

__all__ = ["SHARE_AFFINE_MODES", "TINY_BATCH_POLICIES", "bn_arguments", "check_feature_input",
           "check_per_channel_tensors", "document_bn_arguments", "fill_legacy_count", "fx_leaf_call", "masked_one_valid", "masked_tiny_batch", "registered_tensors",
           "tiny_batch_forward"]

SHARE_AFFINE_MODES = ("none", "weight", "all")
TINY_BATCH_POLICIES = ("raise", "running")

# The arguments of BatchNorm.__init__, which every subclass passes on unchanged.
_BN_ARGUMENTS = (
    "num_features", "eps", "momentum", "affine", "track_running_stats", "device", "dtype", "bias", "axis",
    "share_affine", "nonfinite", "convention", "tiny_batch",
)


def fx_leaf_call(module: nn.Module, input: Any, *args: Any) -> Any:
    """Under ``torch.fx.symbolic_trace``: the layer's call recorded as one node; else ``None``.

    fx keeps modules from ``torch.nn`` as leaves and traces into all others; a bnkit layer makes itself a
    leaf, as torch's BN is (one ``call_module`` node), so that the traced module holds the layer itself:
    its mode, momentum and eps stay live, its ``state_dict`` is the layer's, and a graph rewritten by
    ``fx.Transformer`` traces again. The node is made inside the layer's call, after its forward
    pre-hooks and before its forward hooks have run on the proxies (fx records what they compute); for a
    layer with hooks the node calls the layer's ``forward`` (``get_attr`` + ``call_method``), so that
    they apply once, as fx applies those of any module it traces into. The root of a trace is traced into
    (``None``: the layer's own forward). Each forward calls this first with its positional arguments,
    which the node records (trailing ``None`` left out).
    """
    if type(input) is Tensor or not isinstance(input, torch.fx.Proxy):
        return None
    tracer = input.tracer
    if module is getattr(tracer, "root", None):
        return None
    args = list(args)
    while args and args[-1] is None:  # defaults left out, as a call of torch's layer records them
        args.pop()
    path = tracer.path_of_module(module)
    pre_hooks = len(module._forward_pre_hooks)
    lazy = module.__dict__.get("_initialize_hook")  # a lazy layer's own first-call hook: it stays a leaf
    if lazy is not None and lazy.id in module._forward_pre_hooks:
        pre_hooks -= 1
    if module._forward_hooks or pre_hooks or _module_hooks._global_forward_hooks \
            or _module_hooks._global_forward_pre_hooks:
        layer = tracer.create_proxy("get_attr", path, (), {})
        return tracer.create_proxy("call_method", "forward", (layer, input, *args), {})
    return tracer.create_proxy("call_module", path, (input, *args), {})


def fill_legacy_count(state_dict: dict, prefix: str, local_metadata: dict, count: Tensor | None, *,
                      versioned: bool = True) -> None:
    """torch's rule for a checkpoint without ``num_batches_tracked`` (version < 2, or any with ``versioned=False``):
    the layer keeps its ``count`` (a count on the meta device, or none, loads as zeros; a ``None`` count then
    reports the key as unexpected, as torch does)."""
    key = prefix + "num_batches_tracked"
    version = local_metadata.get("version", None)
    if key in state_dict or (versioned and version is not None and version >= 2):
        return
    if count is not None and count.device.type != "meta":
        state_dict[key] = count
    else:
        state_dict[key] = torch.zeros(() if count is None else count.shape, dtype=torch.long)


def registered_tensors(module: nn.Module, names: tuple[str, ...]) -> tuple[Tensor | None, ...]:
    """``tuple(getattr(module, name) for name in names)`` for parameters and buffers, read from their dicts.

    Reading one as an attribute is a Python call (``nn.Module.__getattr__``): a few microseconds per
    layer call on a small input. A name moved out of the dicts (``torch.nn.utils.parametrize`` makes it
    a property) is read as an attribute.
    """
    try:  # (no Python frame per name: a layer call on a small input is dominated by such costs)
        found = itemgetter(*names)({**module._parameters, **module._buffers})
    except KeyError:
        return tuple(getattr(module, n) for n in names)
    return found if len(names) > 1 else (found,)


def bn_arguments(namespace: dict[str, Any]) -> dict[str, Any]:
    """:class:`BatchNorm`'s constructor arguments picked from a subclass constructor's ``locals()``."""
    # Subclasses without convention/tiny_batch (Ghost, Shared, Sync) get BatchNorm's defaults.
    return {name: namespace[name] for name in _BN_ARGUMENTS if name in namespace}



# How the subclasses describe the BatchNorm arguments they take unchanged (BatchNorm's own docstring says more);
# a continuation line is indented by four more spaces in the docstring.
_BN_ARGUMENT_DOCS = {
    "num_features": "``C``, the number of features along ``axis``.",
    "eps": "added to the variance before the square root (``> 0``).",
    "momentum": "the weight of the batch statistics in the running averages\n(``None``: the cumulative average).",
    "affine": "learn a per-feature ``weight`` and ``bias``.",
    "track_running_stats": "keep running statistics and use them in eval.",
    "device": "where the parameters and buffers are created.",
    "dtype": "the dtype of the parameters and buffers.",
    "bias": "with ``affine``, also learn ``bias``.",
    "axis": "the feature axis (``-1`` for channels-last data).",
    "share_affine": "``\"none\"``, ``\"weight\"`` or ``\"all\"``, as in `bnkit.BatchNorm`.",
    "nonfinite": "``\"skip\"``, ``\"raise\"`` or ``\"propagate\"``, as in `bnkit.BatchNorm`.",
}
_BN_ARGUMENTS_LINE = re.compile(r"^( *)\{BatchNorm: ([a-z_, ]+)\}$", re.MULTILINE)


def document_bn_arguments(cls: type) -> type:
    """Class decorator: each docstring line ``{BatchNorm: eps, momentum, ...}`` becomes the ``Args:`` entries
    of those arguments, worded as every subclass words them (an unknown name raises ``KeyError``)."""

    def entries(line: re.Match) -> str:
        indent, out = line.group(1), []
        for name in (n.strip() for n in line.group(2).split(",")):
            first, *more = _BN_ARGUMENT_DOCS[name].split("\n")
            out += [f"{indent}{name}: {first}"] + [f"{indent}    {text}" for text in more]
        return "\n".join(out)

    cls.__doc__ = _BN_ARGUMENTS_LINE.sub(entries, cls.__doc__ or "")
    return cls


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




def _running_policy(layer: nn.Module) -> bool:
    """Whether ``tiny_batch="running"`` applies to this layer's training call (the value checked again, as it may
    have been set after construction; without running statistics the batch's are used, and torch's error raised)."""
    policy = getattr(layer, "tiny_batch", "raise")
    if policy not in TINY_BATCH_POLICIES:
        raise ValueError(f"{layer.describe()}: tiny_batch must be one of {TINY_BATCH_POLICIES}, got {policy!r}")
    return (policy == "running" and layer.track_running_stats and isinstance(layer.running_mean, Tensor)
            and isinstance(layer.running_var, Tensor))


def tiny_batch_forward(layer: nn.Module, input: Tensor) -> Tensor | None:
    """The eval-mode output for a one-value-per-channel training batch under ``tiny_batch="running"``."""
    if not _running_policy(layer):
        return None
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


def masked_one_valid(layer: nn.Module) -> str:
    """The engine's ``one_valid`` for a layer's masked training call (:func:`bnkit.engine.masked_module_call`).

    ``"running"`` under ``tiny_batch="running"`` with running statistics: in a captured graph the engine gives
    a batch of one valid entry the running statistics' output by ``torch.where`` on the count (no warning
    there); eagerly :func:`masked_tiny_batch` has taken such a batch already. ``"raise"`` otherwise.
    """
    return "running" if layer.training and _running_policy(layer) else "raise"


def masked_tiny_batch(layer: nn.Module, input: Tensor, mask: Tensor) -> Tensor | None:
    """Under ``tiny_batch="running"``, the eval-mode output of a training batch with one valid entry."""
    if not (layer.training and _running_policy(layer)):
        return None
    spec = layer.call_spec()
    check_input(spec, input)
    check_mask(spec, input, mask)
    if aten_graph.capturing():  # the count is not read on the host in a graph: see masked_one_valid
        return None
    if int(mask.sum()) != 1:
        return None
    warn(
        f"{layer.describe()}: a training batch with one valid entry per channel was normalized with the "
        "running statistics, which were not updated (tiny_batch='running')",
        RuntimeWarning,
    )
    return masked_module_call(spec, input, mask, layer.weight, layer.bias, layer.running_mean, layer.running_var,
                              None, False)

