"""TorchScript for bnkit layers: ``torch.jit.script`` and pure-ATen tracing.

``torch.jit.script`` cannot compile bnkit's layers (their forward dispatches
between C++ ops and Python checks). Importing bnkit installs a
``__prepare_scriptable__`` method on :class:`bnkit.BatchNorm` and
:class:`bnkit.FrozenBatchNorm` (``torch.jit.script`` calls it on every
submodule first) that returns a scriptable equivalent written with standard
ATen ops only:

* :class:`ScriptableBatchNorm` for ``BatchNorm`` / ``BatchNorm1d/2d/3d`` and
  subclasses that keep their forward: same parameters and buffers (the very
  tensors, so the scripted model's ``state_dict`` is the eager one's), the
  feature ``axis``, ``share_affine``, ``momentum=None`` (cumulative average),
  the ``nonfinite`` policy (``"skip"`` warns and leaves the buffers,
  ``"raise"`` raises, ``"propagate"`` updates them), float32 statistics for
  half inputs and the layer's input checks with its messages.
* :class:`ScriptableFrozenBatchNorm` for ``FrozenBatchNorm`` / ``1d/2d/3d``.

Layers with other semantics (``GhostBatchNorm``, ``BatchRenorm``,
``SharedBatchNorm``, ``SyncBatchNorm``, ``FrozenSharedBatchNorm``) raise a
``TypeError`` naming the layer instead of being scripted as something else.

A scripted module needs no bnkit at load time (``torch.jit.load`` in a
process or in C++ without bnkit works). Errors raised by scripted code
surface as ``torch.jit.Error`` carrying the eager message, as for torch's
own scripted layers.

:func:`scriptable` applies the same replacement to a copy of a whole model,
for ``torch.jit.trace`` graphs made of ATen ops only (tracing the bnkit
model itself records bnkit's custom ops, which then need ``import bnkit``
to run).
"""

import copy
import warnings

import torch
from torch import Tensor, nn

from ..engine import fold
from ..layers import BatchNorm
from ..variants import FrozenBatchNorm
from ..variants.act import BatchNormAct, FrozenBatchNormAct, _AfterFusedBN, _WithTail, plain_activation

__all__ = ["ScriptableBatchNorm", "ScriptableFrozenBatchNorm", "install", "scriptable", "scriptable_layer"]


def _shape_for(input: Tensor, axis: int) -> list[int]:
    shape = [1] * input.dim()
    shape[axis] = input.shape[axis]
    return shape


def _tuple_str(shape: list[int]) -> str:
    """``str(tuple(shape))`` in TorchScript (the eager messages print shapes as tuples)."""
    if len(shape) == 1:
        return "(" + str(shape[0]) + ",)"
    return "(" + ", ".join([str(d) for d in shape]) + ")"


def _check(where: str, input: Tensor, expected_dims: list[int], axis: int, num_features: int) -> int:
    """``check_feature_input`` in TorchScript: same messages; returns the axis made non-negative."""
    ndim = input.dim()
    if len(expected_dims) > 0 and ndim not in expected_dims:
        expected = " or ".join([str(d) + "D" for d in expected_dims])
        raise ValueError("expected " + expected + " input (got " + str(ndim) + "D input)")
    if axis < -ndim or axis >= ndim:
        raise ValueError(
            where + ": feature axis " + str(axis) + " does not exist in a " + str(ndim) + "-D input of shape "
            + _tuple_str(input.shape)
        )
    if axis < 0:
        axis = axis + ndim
    if input.shape[axis] != num_features:
        raise ValueError(
            where + ": expected " + str(num_features) + " features along axis " + str(axis) + ", got "
            + str(input.shape[axis]) + " (input shape " + _tuple_str(input.shape) + ")"
        )
    if not input.is_floating_point():
        raise TypeError(where + ": expected a floating-point input, got " + str(input.dtype))
    return axis


def _check_dtype(where: str, name: str, t: Tensor | None, input: Tensor) -> None:
    """The eager layer's dtype rule (its DtypeMismatchError is a RuntimeError, as torch's "mixed dtype")."""
    if t is not None and t.dtype != input.dtype:
        if not ((input.dtype == torch.float16 or input.dtype == torch.bfloat16) and t.dtype == torch.float32):
            raise RuntimeError(
                where + ": " + name + " has dtype " + str(t.dtype) + " but the input has " + str(input.dtype)
                + "; parameters and buffers must have the input's dtype (float16/bfloat16 inputs may also use "
                "float32 ones)"
            )


def _check_dtypes(where: str, input: Tensor, weight: Tensor | None, bias: Tensor | None,
                  running_mean: Tensor | None, running_var: Tensor | None) -> None:
    _check_dtype(where, "weight", weight, input)
    _check_dtype(where, "bias", bias, input)
    _check_dtype(where, "running_mean", running_mean, input)
    _check_dtype(where, "running_var", running_var, input)


def _expand(t: Tensor | None, c: int) -> Tensor | None:
    if t is None:
        return None
    t = t.reshape(-1)
    if t.numel() == 1 and c != 1:
        t = t.expand(c)
    return t


def _compute_dtype(x: Tensor) -> torch.dtype:
    # Half inputs are normalized with float32 statistics, as bnkit's kernels do.
    if x.dtype == torch.float16 or x.dtype == torch.bfloat16:
        return torch.float32
    return x.dtype


def _affine_forward(
    input: Tensor, axis: int, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """Inference BN along ``axis``: the engine's own ``fold`` (TorchScript compiles it as it is)."""
    shape = _shape_for(input, axis)
    x = input.to(_compute_dtype(input))
    scale, shift = fold(mean.to(x.dtype), var.to(x.dtype), weight, bias, eps)
    return (x * scale.reshape(shape) + shift.reshape(shape)).to(input.dtype)


class _Twin(nn.Module):
    """What both twins take from their layer: its :class:`~bnkit.engine.CallSpec` and its very tensors.

    The spec (name for messages, axis, feature count, accepted ranks, eps) is
    the one the engine checks the layer's calls with, so the twin's checks
    and messages follow the layer's. ``__init__`` is plain Python (TorchScript
    compiles ``forward`` and what it calls only).
    """

    def __init__(self, layer: nn.Module, parameters: tuple[str, ...], buffers: tuple[str, ...]) -> None:
        super().__init__()
        spec = layer.call_spec()
        self.where = spec.name
        self.axis = int(spec.axis)
        self.num_features = int(spec.num_features)
        self.eps = float(spec.eps)
        self.expected_dims = [] if spec.ranks is None else list(spec.ranks)
        for name in parameters:
            self.register_parameter(name, layer._parameters.get(name))
        for name in buffers:
            self.register_buffer(name, layer._buffers.get(name))
        self.train(layer.training)


class ScriptableBatchNorm(_Twin):
    """TorchScript-compatible twin of a :class:`bnkit.BatchNorm` layer (ATen ops only).

    Built from the layer (``ScriptableBatchNorm(layer)``, or :meth:`from_layer`);
    it holds the layer's own parameter and buffer tensors. Same math as the layer: training normalizes with the
    batch mean and biased variance over every axis but ``axis`` and updates
    the running averages with the unbiased variance (``momentum=None``:
    cumulative average); eval uses the running statistics (or the batch's
    with ``track_running_stats=False``).
    """

    __constants__ = ["num_features", "eps", "momentum", "axis", "nonfinite", "track_running_stats", "where"]
    expected_dims: list[int]
    momentum: float | None

    def __init__(self, layer: BatchNorm) -> None:
        super().__init__(layer, ("weight", "bias"), ("running_mean", "running_var", "num_batches_tracked"))
        spec = layer.call_spec()
        self.momentum = None if spec.momentum is None else float(spec.momentum)
        self.nonfinite = spec.nonfinite
        self.track_running_stats = bool(layer.track_running_stats)

    @classmethod
    def from_layer(cls, layer: BatchNorm) -> "ScriptableBatchNorm":
        return cls(layer)

    def extra_repr(self) -> str:
        return f"{self.where}, axis={self.axis}, nonfinite={self.nonfinite!r}"

    def _update(self, x: Tensor, dims: list[int], mean: Tensor, var: Tensor, count: int) -> None:
        running_mean = self.running_mean
        running_var = self.running_var
        nbt = self.num_batches_tracked
        if running_mean is None or running_var is None or nbt is None:
            return
        if count == 0:  # an empty batch has no statistics; torch still counts it
            nbt.add_(1)
            return
        if torch.jit.is_tracing():
            # A trace records tensor ops only: the check becomes a torch.where ("raise" acts as "skip"),
            # and the unbiased variance is reduced again (a Python count would be baked into the trace).
            unbiased = torch.var(x.detach(), dims, correction=1)
            self._update_traced(running_mean, running_var, nbt, mean.detach(), unbiased)
            return
        unbiased = var.detach() * (float(count) / float(count - 1))
        if self.nonfinite != "propagate" and var.numel() > 0:
            if not bool(torch.isfinite(var.max())):
                message = self.where + ": the batch statistics are not finite (NaN/Inf in the input)"
                if self.nonfinite == "raise":
                    raise FloatingPointError(
                        message + "; the running statistics are unchanged (nonfinite='raise')"
                    )
                warnings.warn(message + "; the running statistics were left unchanged", stacklevel=2)
                return
        nbt.add_(1)
        momentum = self.momentum
        if momentum is None:
            factor = 1.0 / float(nbt.item())
        else:
            factor = momentum
        with torch.no_grad():
            running_mean.lerp_(mean.detach().to(running_mean.dtype), factor)
            running_var.lerp_(unbiased.to(running_var.dtype), factor)

    def _update_traced(
        self, running_mean: Tensor, running_var: Tensor, nbt: Tensor, mean: Tensor, unbiased: Tensor
    ) -> None:
        valid: Tensor | None = None
        if self.nonfinite != "propagate":
            valid = torch.isfinite(unbiased.max())
            nbt.add_(valid.to(nbt.dtype))
        else:
            nbt.add_(1)
        momentum = self.momentum
        if momentum is None:
            factor = 1.0 / nbt.clamp_min(1).double()
        else:
            factor = torch.full((), momentum, dtype=torch.float64)
        with torch.no_grad():
            for running, new in ((running_mean, mean), (running_var, unbiased)):
                updated = torch.lerp(running, new.to(running.dtype), factor.to(running.dtype))
                if valid is not None:
                    updated = torch.where(valid, updated, running)
                running.copy_(updated)

    def forward(self, input: Tensor) -> Tensor:
        return self._bn(input)

    def _bn(self, input: Tensor) -> Tensor:
        axis = _check(self.where, input, self.expected_dims, self.axis, self.num_features)
        c = self.num_features
        weight = _expand(self.weight, c)
        bias = _expand(self.bias, c)
        running_mean = self.running_mean
        running_var = self.running_var
        _check_dtypes(self.where, input, weight, bias, running_mean, running_var)  # before any update
        if not self.training and running_mean is not None and running_var is not None:
            return _affine_forward(input, axis, running_mean, running_var, weight, bias, self.eps)
        shape = _shape_for(input, axis)
        x = input.to(_compute_dtype(input))
        count = input.numel() // c
        if count == 1:  # batch statistics of one value (eager raises in eval without running stats too)
            raise ValueError(
                self.where + ": Expected more than 1 value per channel when training, got input size torch.Size("
                + str(input.shape) + ")"
            )
        dims: list[int] = []
        for d in range(input.dim()):
            if d != axis:
                dims.append(d)
        var, mean = torch.var_mean(x, dims, correction=0)
        scale = torch.rsqrt(var + self.eps)
        if weight is not None:
            scale = scale * weight.to(scale.dtype)
        y = (x - mean.reshape(shape)) * scale.reshape(shape)
        if bias is not None:
            y = y + bias.to(y.dtype).reshape(shape)
        if self.training and self.track_running_stats:
            self._update(x, dims, mean, var, count)
        return y.to(input.dtype)


class ScriptableFrozenBatchNorm(_Twin):
    """TorchScript-compatible twin of a :class:`bnkit.FrozenBatchNorm` layer: the fixed affine map.

    Built from the layer (``ScriptableFrozenBatchNorm(layer)``, or :meth:`from_layer`).
    """

    __constants__ = ["num_features", "eps", "axis", "where"]
    expected_dims: list[int]

    def __init__(self, layer: FrozenBatchNorm) -> None:
        super().__init__(layer, (), ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"))

    @classmethod
    def from_layer(cls, layer: FrozenBatchNorm) -> "ScriptableFrozenBatchNorm":
        return cls(layer)

    def extra_repr(self) -> str:
        return f"{self.where}, axis={self.axis}"

    def forward(self, input: Tensor) -> Tensor:
        return self._bn(input)

    def _bn(self, input: Tensor) -> Tensor:
        axis = _check(self.where, input, self.expected_dims, self.axis, self.num_features)
        c = self.num_features
        _check_dtypes(self.where, input, self.weight, self.bias, self.running_mean, self.running_var)
        return _affine_forward(
            input, axis, self.running_mean, self.running_var, _expand(self.weight, c), _expand(self.bias, c), self.eps
        )


def _tail(twin: nn.Module, layer: nn.Module) -> None:
    """Gives a twin the ``drop`` and ``act`` children of a BN+activation layer, under the same names.

    A shared activation (``ReLUAfterFusedBN`` and the others) is its parent's
    to call, so the twin applies an ``nn.Identity`` in its place, and the
    parent's call computes it (its scripted form is the torch class).
    """
    for name in ("drop", "act"):
        child = layer._modules.get(name)
        if child is None or isinstance(child, _AfterFusedBN):
            child = nn.Identity()
        twin.add_module(name, child)


class ScriptableBatchNormAct(ScriptableBatchNorm):
    """TorchScript-compatible twin of a :class:`bnkit.variants.BatchNormAct` layer: the BN twin, then ``drop`` and
    ``act`` (the layer's own modules)."""

    def __init__(self, layer: BatchNormAct) -> None:
        super().__init__(layer)
        _tail(self, layer)

    def forward(self, input: Tensor) -> Tensor:
        return self.act(self.drop(self._bn(input)))


class ScriptableFrozenBatchNormAct(ScriptableFrozenBatchNorm):
    """TorchScript-compatible twin of a :class:`bnkit.variants.FrozenBatchNormAct` layer."""

    def __init__(self, layer: FrozenBatchNormAct) -> None:
        super().__init__(layer)
        _tail(self, layer)

    def forward(self, input: Tensor) -> Tensor:
        return self.act(self.drop(self._bn(input)))


def _way_out(layer: nn.Module) -> str:
    """What makes a model with ``layer`` scriptable (for inference), by the layer's kind."""
    from ..sync import SyncBatchNorm
    from ..variants import DomainBatchNorm, FrozenSharedBatchNorm, SharedBatchNorm

    if isinstance(layer, SyncBatchNorm):
        return "a SyncBatchNorm goes back with bnkit.convert_sync_batchnorm(model, revert=True)"
    if isinstance(layer, DomainBatchNorm):
        return "bnkit.select_domain(model, d) gives the plain BN model of domain d"
    if isinstance(layer, (SharedBatchNorm, FrozenSharedBatchNorm)):
        # freezing keeps the site argument, which has no scripted form either
        return ("bnkit.fuse(model) folds it into the preceding convolution where there is one; otherwise "
                "torch.jit.trace (the site of each call is recorded) or torch.export")
    return "bnkit.freeze(model) or bnkit.fuse(model) first turns it into scriptable layers"


def _unsupported(layer: nn.Module) -> TypeError:
    return TypeError(
        f"torch.jit.script: {layer._describe()} ({type(layer).__module__}.{type(layer).__qualname__}) has no "
        "TorchScript form: only BatchNorm, BatchNorm1d/2d/3d, FrozenBatchNorm and FrozenBatchNorm1d/2d/3d "
        "(and subclasses keeping their forward, with convention='torch' and tiny_batch='raise'), and their "
        "BN+activation forms (BatchNormAct, FrozenBatchNormAct, with the default drop/act tail) can be scripted. "
        f"For inference, {_way_out(layer)}"
    )


def _twin_computes_it(layer: nn.Module) -> bool:
    """Whether the twin's training rules are the layer's: torch's statistics convention, no tiny-batch policy."""
    return getattr(layer, "convention", "torch") == "torch" and getattr(layer, "tiny_batch", "raise") == "raise"


# The module hooks torch.jit.script compiles with a module (forward and pre-forward hooks; it refuses the
# others, for torch's layers too): the twin takes them over, so a scripted model runs them as torch's does.
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_forward_pre_hooks_with_kwargs",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def scriptable_layer(layer: nn.Module) -> nn.Module:
    """The scriptable twin of one bnkit layer, with its forward hooks (``TypeError`` for layers without one)."""
    twin = _twin_of(layer)
    for name in _HOOK_DICTS:
        hooks = getattr(layer, name, None)
        if hooks:
            setattr(twin, name, type(hooks)(hooks))
    return twin


def _twin_of(layer: nn.Module) -> nn.Module:
    if isinstance(layer, _AfterFusedBN):  # an activation shared with a fused BN layer: the torch class
        return plain_activation(layer)
    if isinstance(layer, BatchNorm) and not _twin_computes_it(layer):
        raise _unsupported(layer)  # a scripted training step would silently follow torch's rules
    if isinstance(layer, (BatchNormAct, FrozenBatchNormAct)):
        if type(layer).forward is not _WithTail.forward or layer.bn_tail != ("drop", "act"):
            raise _unsupported(layer)
        if isinstance(layer, BatchNormAct):
            if type(layer)._forward is not BatchNorm._forward:
                raise _unsupported(layer)
            return ScriptableBatchNormAct(layer)
        if type(layer)._stats is not FrozenBatchNorm._stats:
            raise _unsupported(layer)
        return ScriptableFrozenBatchNormAct(layer)
    if isinstance(layer, BatchNorm):
        if type(layer).forward is not BatchNorm.forward:
            raise _unsupported(layer)
        return ScriptableBatchNorm.from_layer(layer)
    if isinstance(layer, FrozenBatchNorm):
        if type(layer).forward is not FrozenBatchNorm.forward or type(layer)._stats is not FrozenBatchNorm._stats:
            raise _unsupported(layer)
        return ScriptableFrozenBatchNorm.from_layer(layer)
    raise TypeError(f"scriptable_layer: expected a bnkit BN layer, got {type(layer).__name__}")


_REPLACED = (BatchNorm, FrozenBatchNorm, _AfterFusedBN)  # what scriptable() swaps for its twin or torch class


def scriptable(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every bnkit BN layer replaced by its scriptable twin.

    Useful for ``torch.jit.trace`` graphs without bnkit ops (``torch.jit.script``
    makes the replacement itself). Raises ``TypeError`` naming the first layer
    that has no TorchScript form, before anything is built.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"scriptable: expected an nn.Module, got {type(model).__name__}")
    for m in model.modules():
        if isinstance(m, _REPLACED):
            scriptable_layer(m)  # check every layer first
    model = copy.deepcopy(model)
    if isinstance(model, _REPLACED):
        return scriptable_layer(model)
    done: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, _REPLACED):
                if id(child) not in done:
                    done[id(child)] = scriptable_layer(child)
                setattr(parent, name, done[id(child)])
    return model


def _prepare_scriptable(self: nn.Module) -> nn.Module:
    """Called by ``torch.jit.script``: this layer as standard ATen ops (:mod:`bnkit.integrations.torchscript`)."""
    return scriptable_layer(self)


def install() -> None:
    """Give bnkit's layer bases their ``__prepare_scriptable__`` (done on ``import bnkit``)."""
    for cls in (BatchNorm, FrozenBatchNorm, _AfterFusedBN):
        if "__prepare_scriptable__" not in cls.__dict__:
            cls.__prepare_scriptable__ = _prepare_scriptable
