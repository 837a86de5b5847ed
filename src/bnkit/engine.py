"""The engine: the one door through which every BN layer and the F-style API run.

A call is described by a :class:`CallSpec` (what the layer is: feature axis,
feature count, accepted ranks, eps, momentum, non-finite policy, its name for
messages), built once per layer, and the call's tensors. The route::

    batch_norm_module_call(spec, input, weight, bias, running_mean, running_var,
                           num_batches_tracked, batch_stats)
      -> fused_call: the whole call as one C++ op (eager CPU; it declines,
         changing nothing, whatever it does not handle)
      -> otherwise the general path: check_input, then the phases on the
         canonical (outer, C, inner) view (training forward or inference,
         then running_update); on a GPU, ATen's own batch norm
         (``_engine_device``) computes the normalization and the batch moments

:func:`running_update` is the one place that writes running statistics (both
paths end in the same ``bnkit::running_update_`` op on eager CPU). A per-call
mask would enter at the phases of the general path (and be declined by the
fused op); a hook that redirects the running update (accumulate several
micro-batches, update once under activation checkpointing) belongs in
:func:`running_update` alone.
"""

from __future__ import annotations

import math
import threading
from typing import Callable

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from . import kernels, stats
from ._engine_checks import _check_param, _empty_output, check_input, check_mask
from ._engine_spec import NONFINITE_POLICIES, CallSpec, _constants, call_spec
from ._engine_views import canonical_mask, canonical_view, per_channel
from ._warn import warn
from .errors import InputDtypeError, MissingStatisticsError
from .kernels import aten_graph, fold

__all__ = [
    "NONFINITE_POLICIES",
    "CallSpec",
    "batch_norm_module_call",
    "call_spec",
    "canonical_mask",
    "canonical_view",
    "check_input",
    "check_domain",
    "check_mask",
    "domain_module_call",
    "fold",
    "fused_call",
    "masked_module_call",
    "graph_path",
    "in_recompute",
    "per_channel",
    "refuse_one_valid",
    "running_update",
    "running_update_hook",
    "set_running_update_hook",
    "valid_count",
]

# --------------------------------------------------------------------------- phases
def _reject_nonfinite(where: str, nonfinite: str) -> None:
    """Raise (``"raise"``) or warn (``"skip"``) about a batch whose statistics are not finite."""
    message = f"{where}: the batch statistics are not finite (NaN/Inf in the input)"
    if nonfinite == "raise":
        raise FloatingPointError(message + "; the running statistics are unchanged (nonfinite='raise')")
    warn(message + "; the running statistics were left unchanged", RuntimeWarning)


def _fake(t: Tensor) -> bool:
    """Whether ``t`` is a fake tensor (``FakeTensorMode``): metadata only, no data."""
    return type(t) is not Tensor and isinstance(t, FakeTensor)


def _fused_update_ok(running_mean: Tensor, running_var: Tensor, nbt: Tensor | None, mean: Tensor) -> bool:
    """Whether ``bnkit::running_update_`` applies (eager CPU with the C++ kernels, plain buffers)."""
    if not (
        mean.device.type == "cpu"
        and not _fake(mean)
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and running_mean.is_contiguous()
        and running_var.is_contiguous()
        and running_mean.dtype == running_var.dtype  # the op updates one dtype (a bf16 input may mix in float32)
        and kernels.select(mean) == "cpp"
    ):
        return False
    if nbt is None:
        return True
    # torch's own error for an inference tensor updated outside inference mode comes from add_.
    return (
        nbt.device.type == "cpu"
        and nbt.dtype == torch.long
        and nbt.numel() == 1
        and (not nbt.is_inference() or torch.is_inference_mode_enabled())
    )


# --------------------------------------------------------------------------- update hook
# The running update's one redirect (bnkit.accumulate_stats installs it): called as
# ``hook(spec, running_mean, running_var, num_batches_tracked, mean, var, count)`` with the
# batch's mean and biased variance, only for a batch that passed the layer's non-finite
# policy (running_update rejects the others first); a true result means it took the update
# over (nothing is written here). Its fused route (optional: the hook's ``totals`` method, read when
# it is installed): ``totals(spec, running_mean, running_var, num_batches_tracked)`` returns the float64
# tensor of 2C + 1 values (the C means, the C M2s, the count) into which the fused op merges the batch's
# moments itself (``bnkit::batch_norm_layer_accumulate_``: one op call, no moments returned), or None
# where the hook would not take this update over.
# The hook is per thread, as torch's grad mode and autocast state are: a block in one thread never sees
# another thread's forwards. ``_ANY_HOOK`` is the hot path's one check, true while any thread has a hook
# (the thread's own is then read); a compiled graph guards on it (it never reads the thread-local, which
# Dynamo would take as a constant).
class _ThreadHook(threading.local):
    hook: Callable[..., bool] | None = None
    totals: Callable[..., Tensor | None] | None = None


_THREAD_HOOK = _ThreadHook()
_HOOKED_THREADS = 0
_HOOK_LOCK = threading.Lock()
_ANY_HOOK = False


def set_running_update_hook(hook: Callable[..., bool] | None) -> Callable[..., bool] | None:
    """Install ``hook`` as this thread's running-update redirect (``None``: none); returns the previous one."""
    global _ANY_HOOK, _HOOKED_THREADS
    state = _THREAD_HOOK
    previous = state.hook
    state.hook, state.totals = hook, getattr(hook, "totals", None)
    with _HOOK_LOCK:
        _HOOKED_THREADS += (hook is not None) - (previous is not None)
        _ANY_HOOK = _HOOKED_THREADS > 0
    return previous


def running_update_hook() -> Callable[..., bool] | None:
    """This thread's running-update hook (``None``: none installed)."""
    return _THREAD_HOOK.hook


def in_recompute() -> bool:
    """Whether this forward runs inside a backward: activation checkpointing's recompute.

    ``torch.utils.checkpoint`` runs the checkpointed forward again during the
    backward (reentrant: in ``CheckpointFunction.backward``; non-reentrant: in
    the unpack hook of a saved tensor), where the autograd engine has a
    current graph task; an ordinary forward never does. The recompute must
    not update the running statistics a second time (its batch statistics
    are those of the original forward: same input, same kernels).
    """
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def may_be_recomputed() -> bool:
    """Whether this training forward may run inside ``torch.utils.checkpoint`` (so again in the backward).

    Reentrant checkpointing runs its forward without gradients (so does any
    forward under ``torch.no_grad``: a layer that remembers something for a
    recompute keeps it bounded); the non-reentrant one under its own
    saved-tensors hook.
    """
    if not torch.is_grad_enabled():
        return True
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return hooks is not None and "_checkpoint_hook" in getattr(hooks[0], "__qualname__", "")


def running_update(
    spec: CallSpec,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: int | Tensor,
    *,
    checked: bool = False,
    skip_one: bool = False,
) -> None:
    """The running-statistics phase: the rule of :mod:`bnkit.stats` under ``spec``'s non-finite policy.

    ``mean``/``var`` are the batch's mean and *biased* variance over
    ``count`` values. The cumulative average (``momentum=None``) and the
    ``num_batches_tracked`` increment (also for an empty batch) happen here.
    A batch's statistics are finite exactly when its variance is (any NaN or
    Inf in the input makes it NaN). In eager CPU mode the check decides on the
    host (so "skip" can warn and "raise" can raise); elsewhere (accelerators,
    ``torch.compile``) a ``torch.where`` keeps the old values without a host
    synchronisation. A checkpointing recompute (:func:`in_recompute`) writes
    nothing; an installed hook (:func:`set_running_update_hook`) may take the
    update over. ``checked``: the caller (the fused op) has applied the
    non-finite policy to these statistics already. A 0-d ``count`` tensor
    (a masked batch's valid count in a captured graph) takes the tensor form;
    ``skip_one`` leaves a count of 1 uncounted there (``tiny_batch="running"``).
    """
    if in_recompute() or (_ANY_HOOK and (
        _offer_to_hook_eagerly if torch.compiler.is_compiling() else _offer_to_hook
    )(spec, running_mean, running_var, num_batches_tracked, mean, var, count, checked)):
        return
    nbt, momentum, nonfinite = num_batches_tracked, spec.momentum, spec.nonfinite
    if not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled() and any(
        isinstance(t, Tensor) and t.is_inference() for t in (running_mean, running_var, nbt)
    ):
        # torch's rule (its add_ raises it), checked first so that no buffer is written before the error
        # (eager only: a compiled graph has no inference tensors, and the check would break it)
        raise RuntimeError(
            f"{spec.name}: Inplace update to inference tensor outside InferenceMode is not allowed: the running "
            "buffers were made under torch.inference_mode; clone them (or call under inference_mode)"
        )
    if kernels.transform_active():
        _transformed_running_update(spec, running_mean, running_var, nbt, mean, var, count)
        return
    if _empty_batch(spec, nbt, count):
        return
    # A spec made under torch.compile carries no fused encodings (see call_spec): the Python rule then.
    if spec.fused_momentum is not None and _fused_update_ok(running_mean, running_var, nbt, mean):
        if not torch.ops.bnkit.running_update_(
            running_mean, running_var, nbt, mean, var, spec.fused_momentum, count, spec.check_finite
        ):
            _reject_nonfinite(spec.name, nonfinite)
        return
    check = spec.check_finite
    # Fake tensors (FakeTensorMode: shapes only, as for counting flops) have no values to read on the host.
    tracing = torch.jit.is_tracing() or aten_graph.capturing() or _fake(mean)
    if tracing or (check and nonfinite == "skip" and mean.device.type != "cpu") or isinstance(count, Tensor):
        # A trace or a captured graph records tensor ops only: "raise" acts as "skip" there (no host check).
        tensor_running_update(spec, running_mean, running_var, nbt, mean, var, count, skip_one)
        return
    if check and var.numel() and not math.isfinite(var.max().item()):
        _reject_nonfinite(spec.name, nonfinite)
        return
    if nbt is not None:
        nbt.add_(1)
    n = int(nbt) if momentum is None else 0
    stats.update_running_stats(running_mean, running_var, mean, var, count, stats.running_average_factor(momentum, n))


def _empty_batch(spec: CallSpec, nbt: Tensor | None, count: int | Tensor) -> bool:
    """The running update's start: whether the batch is empty (``count == 0``), which torch still counts.

    An empty batch has no statistics (nothing else happens); otherwise a
    cumulative average (``momentum=None``) needs ``num_batches_tracked``. A
    count tensor (a masked batch in a captured graph) is never taken as
    empty here: the tensor form leaves its update out by ``torch.where``.
    """
    if not isinstance(count, Tensor) and count == 0:
        if nbt is not None:
            nbt.add_(1)
        return True
    if spec.momentum is None and nbt is None:
        raise ValueError(f"{spec.name}: momentum=None (cumulative average) needs num_batches_tracked")
    return False


def _offer_to_hook(
    spec: CallSpec, running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor | None, mean: Tensor,
    var: Tensor, count: int, checked: bool
) -> bool:
    """The hook's turn; a batch the non-finite policy rejects is rejected here (raise or warn) and never reaches it."""
    hook = _THREAD_HOOK.hook
    if hook is None:  # another thread's block: this update is this thread's own
        return False
    if not checked and count and spec.check_finite and var.numel() and not math.isfinite(var.max().item()):
        _reject_nonfinite(spec.name, spec.nonfinite)
        return True
    return hook(spec, running_mean, running_var, num_batches_tracked, mean, var, count)


# Under torch.compile the hook runs outside the graph, on every call of the compiled code with the real
# moments (a graph break): it is Python that merges into tensors the graph does not own, and the hook
# object changes from one block to the next (read here at run time, it never enters a guard).
_offer_to_hook_eagerly = torch.compiler.disable(_offer_to_hook, recursive=True)


# --------------------------------------------------------------------------- the door
def _fusable(input: Tensor) -> bool:
    """Whether the fused op may see ``input``: a plain non-empty CPU tensor in eager mode, with the C++ kernels
    selected (an empty batch takes the general path, whose output is torch's: the input's copy, its layout kept)."""
    # is_compiling first: under dynamo any tensor query before it would leave a dead node on the input (a second
    # user of a conv output keeps inductor from fusing the conv with what follows).
    return (
        not torch.compiler.is_compiling()
        and type(input) is Tensor
        and input.is_cpu
        and input.numel() > 0
        and not torch._C._is_tracing()  # torch.jit.is_tracing() without its two Python frames
        and kernels.select(input) == "cpp"
    )


def fused_call(
    spec: CallSpec, input: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
    running_var: Tensor | None, num_batches_tracked: Tensor | None, batch_stats: bool,
    activation: tuple[str, float, float] | None = None,
) -> Tensor | None:
    """The whole call as one C++ op (``bnkit::batch_norm_layer``), or ``None`` where it does not apply.

    It applies in eager mode to plain CPU tensors with the C++ kernels; it
    declines (``None``, nothing changed) anything else, including bad input,
    so that the general path raises the error. On a small input the general
    path's separate steps cost as much as the kernels. With ``activation``,
    ``bnkit::batch_norm_act_layer``: the output is ``act(BN(x))``
    (see :func:`batch_norm_module_call`).
    """
    if spec.fused_momentum is None or not _fusable(input):  # (None: no encoding the op can read)
        return None
    args = (input, weight, bias, running_mean, running_var, num_batches_tracked, batch_stats,
            spec.fused_momentum, spec.eps, spec.axis, spec.num_features, spec.rank_mask, spec.check_finite)
    try:
        if activation is None:
            y, status = torch.ops.bnkit.batch_norm_layer.default(*args)
        else:
            kind, lo, hi = activation
            y, status = torch.ops.bnkit.batch_norm_act_layer.default(*args, ACTIVATION_KINDS.index(kind), lo, hi)
    except RuntimeError:
        if all(t is None or isinstance(t, Tensor) for t in (weight, bias, running_mean, running_var, num_batches_tracked)):
            raise
        return None  # a non-tensor argument failed the op's schema (nothing ran): the general path raises TypeError
    constants = _constants()  # not None: the op exists
    if status == constants.handled:
        return y
    if status == constants.not_handled:
        return None
    _reject_nonfinite(spec.name, spec.nonfinite)
    return y


# The activations the fused op computes after BN, in the order of its act_kind (csrc/rowkernels.h: ActKind).
ACTIVATION_KINDS = ("clamp", "hardswish", "silu")


def apply_activation(y: Tensor, activation: tuple[str, float, float]) -> Tensor:
    """``act(y)`` for an activation spec ``(kind, lo, hi)``, as the torch function it stands for.

    ``("clamp", 0, inf)``: ``F.relu``; ``("clamp", lo, hi)``: ``F.hardtanh``
    (ReLU6: ``(0, 6)``; their gradients differ from ``torch.clamp``'s at the
    bounds, where they pass none); ``("hardswish", ...)``: ``F.hardswish``;
    ``("silu", ...)``: ``F.silu`` (the bounds unused).
    """
    kind, lo, hi = activation
    if kind == "silu":
        return torch.nn.functional.silu(y)
    if kind == "hardswish":
        return torch.nn.functional.hardswish(y)
    if lo == 0.0 and hi == math.inf:
        return torch.relu(y)
    return torch.nn.functional.hardtanh(y, lo, hi)


def batch_norm_module_call(
    spec: CallSpec, input: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
    running_var: Tensor | None, num_batches_tracked: Tensor | None, batch_stats: bool,
    activation: tuple[str, float, float] | None = None,
) -> Tensor:
    """Batch normalization of ``input`` as ``spec`` describes: the engine's one entry.

    ``batch_stats=True`` normalizes with the batch's mean and biased variance
    over all axes but ``spec.axis`` and, when running buffers are given,
    updates them (:func:`running_update`); otherwise the running statistics
    are used. Layers decide which buffers a call gets (torch's rules);
    ``torch.fx.symbolic_trace`` records this function as one node.

    ``activation=(kind, lo, hi)`` returns ``apply_activation(BN(input),
    activation)``: ReLU, ReLU6 or Hardtanh (``"clamp"``), Hardswish or SiLU,
    with their gradients. Where the fused op applies (eager CPU, in training
    and in inference, with or without a graph) the activation is part of the
    kernels' passes: its own read and write of the output and its backward
    pass are saved; elsewhere (the op declines the same calls with and
    without an activation) BN is followed by the activation.
    """
    if batch_stats and running_mean is not None:
        if in_recompute():  # checkpointing's recompute: the same batch statistics, no second update
            running_mean = running_var = num_batches_tracked = None
        elif _ANY_HOOK and (torch.compiler.is_compiling() or _THREAD_HOOK.hook is not None):
            y = _hooked_call(spec, input, weight, bias, running_mean, running_var, num_batches_tracked)
            return y if activation is None else apply_activation(y, activation)
    y = fused_call(
        spec, input, weight, bias, running_mean, running_var, num_batches_tracked, batch_stats, activation
    )
    if y is not None:
        return y
    check_input(spec, input)
    y = _general(spec, input, weight, bias, running_mean, running_var, num_batches_tracked, batch_stats)
    return y if activation is None else apply_activation(y, activation)


def _hooked_call(
    spec: CallSpec, input: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor,
    running_var: Tensor, num_batches_tracked: Tensor | None
) -> Tensor:
    """A training call while a running-update hook is installed: the hook gets the batch moments.

    The fused op's training variants (the same accept predicate, kernels and
    autograd node as the call without the hook, applying no update and the
    non-finite check in C++): where the hook names totals for the layer
    (its ``totals`` method), ``bnkit::batch_norm_layer_accumulate_`` merges
    the batch moments into them in place; otherwise
    ``bnkit::batch_norm_layer_moments`` returns them for
    :func:`running_update` (and so the hook). Where the op declines, the
    general path reports them itself.
    """
    if spec.fused_momentum is not None and _fusable(input):
        hook_totals = _THREAD_HOOK.totals
        totals = None if hook_totals is None else hook_totals(spec, running_mean, running_var, num_batches_tracked)
        args = (input, weight, bias, running_mean, running_var, num_batches_tracked, spec.fused_momentum, spec.eps,
                spec.axis, spec.num_features, spec.rank_mask, spec.check_finite)
        if totals is not None:
            y, status = torch.ops.bnkit.batch_norm_layer_accumulate_(*args, totals)
            if status == _constants().handled:  # the common case, first (not None: the op exists)
                return y
        else:
            y, mean, var, status = torch.ops.bnkit.batch_norm_layer_moments(*args)
        constants = _constants()  # not None: the op exists
        if status == constants.nonfinite:  # the batch is left out, as the running update would leave it
            _reject_nonfinite(spec.name, spec.nonfinite)
            return y
        if status != constants.not_handled:
            if totals is None:
                count = input.numel() // input.shape[spec.axis]  # > 1: the op declines empty and one-value batches
                running_update(spec, running_mean, running_var, num_batches_tracked, mean, var, count, checked=True)
            return y
    check_input(spec, input)
    return _general(spec, input, weight, bias, running_mean, running_var, num_batches_tracked, True)


def _general(
    spec: CallSpec, input: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
    running_var: Tensor | None, num_batches_tracked: Tensor | None, batch_stats: bool
) -> Tensor:
    """The general path: every check and error message, then the phases on the canonical view."""
    where, eps = spec.name, spec.eps
    if not isinstance(input, Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor input, got {type(input).__name__}")
    if not input.dtype.is_floating_point:
        raise InputDtypeError(f"{where}: expected a floating-point input, got {input.dtype}")
    ndim = input.dim()
    if ndim < 1 or not -ndim <= spec.axis < ndim:
        raise ValueError(f"{where}: feature axis {spec.axis} is out of range for a {ndim}-D input")
    axis = spec.axis % ndim
    if input.numel() == 0:
        # As torch: an empty batch is counted (training) and returns an empty output, whatever the buffers' dtype.
        if batch_stats and not eps > 0:
            raise ValueError(f"{where}: eps must be positive during training, got {eps}")
        if batch_stats and isinstance(num_batches_tracked, Tensor):
            if running_mean is not None:
                running_update(spec, running_mean, running_var, num_batches_tracked, input, input, 0)
            elif running_var is not None and not in_recompute():  # torch counts it with one buffer too
                num_batches_tracked.add_(1)
        return _empty_output(input, weight, bias)
    channels = input.shape[axis]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        _check_param(name, t, input, channels)
    if (running_mean is None) != (running_var is None):
        if not batch_stats:  # as torch: a RuntimeError in eval (MissingStatisticsError is a ValueError too)
            missing = "running_mean" if running_mean is None else "running_var"
            raise MissingStatisticsError(f"{where}: {missing} must be defined in evaluation mode")
        raise ValueError(f"{where}: running_mean and running_var must both be given or both be None")
    weight_c = per_channel(weight, channels)
    bias_c = per_channel(bias, channels)

    count = input.numel() // channels
    if batch_stats:
        if not eps > 0:
            raise ValueError(f"{where}: eps must be positive during training, got {eps}")
        if count == 1:
            raise ValueError(
                f"{where}: Expected more than 1 value per channel when training, got input size {input.size()}"
            )
    elif running_mean is None:
        raise MissingStatisticsError(f"{where}: running_mean and running_var are required when training=False")
    elif not eps >= 0:
        raise ValueError(f"{where}: eps must be non-negative, got {eps}")
    if aten_graph.capturing():
        return graph_path(spec, input, weight_c, bias_c, running_mean, running_var, num_batches_tracked, batch_stats,
                          axis, count)
    if _engine_device.applies(spec, input, weight_c, bias_c, running_mean, running_var, axis):
        return _engine_device.call(spec, input, weight_c, bias_c, running_mean, running_var, num_batches_tracked,
                                   batch_stats, count)
    x3, restore = canonical_view(input, axis)
    if batch_stats:
        y3, mean, var = kernels.train_forward(x3, weight_c, bias_c, eps)
        if running_mean is not None:
            running_update(spec, running_mean, running_var, num_batches_tracked, mean, var, count)
        return restore(y3)
    return restore(kernels.infer(x3, running_mean, running_var, weight_c, bias_c, eps))


# The masked and per-domain doors and the capture/transform paths call back into this module (running_update, _general):
# imported last, once everything they take from here is defined.
from . import _engine_device  # noqa: E402
from ._engine_domain import check_domain, domain_module_call  # noqa: E402
from ._engine_graph import _transformed_running_update, graph_path, refuse_one_valid, tensor_running_update  # noqa: E402
from ._engine_masked import masked_module_call, valid_count  # noqa: E402
