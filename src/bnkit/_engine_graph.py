"""The engine's capture and transform paths: graph_path (export, compile, ONNX) and the running update under torch.func transforms."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor
from torch._C import _functorch
from torch._functorch import pyfunctorch as _pyfunctorch

from . import kernels, stats
from .engine import CallSpec, _empty_batch, running_update
from .kernels import aten_graph, torch_ops

__all__ = [
    "at_buffer_level", "graph_path", "masked_graph_path", "refuse_one_valid", "tensor_running_update", "transform_left",
]


def graph_path(
    spec: CallSpec, input: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
    running_var: Tensor | None, num_batches_tracked: Tensor | None, batch_stats: bool, axis: int, count: int
) -> Tensor:
    """The general path while a graph is captured (``torch.export``, ``torch.compile``, ONNX export).

    A checked call (``weight``/``bias`` already ``[C]``, ``axis`` non-negative)
    in standard ATen ops (:mod:`bnkit.kernels.aten_graph`), so that exported
    programs hold no bnkit op and inductor fuses BN with its neighbours:
    eval is torch's own eval BN (``F.batch_norm``); batch statistics are
    ``var_mean`` + elementwise ops, and :func:`running_update` writes the
    running statistics with tensor ops (non-finite policy by ``torch.where``;
    ``"raise"`` acts as ``"skip"``, as no host check is possible).
    """
    if not batch_stats:
        return aten_graph.infer_nd(input, running_mean, running_var, weight, bias, spec.eps, axis)
    y, mean, var = aten_graph.train_nd(input, weight, bias, spec.eps, axis)
    if running_mean is not None:
        running_update(spec, running_mean, running_var, num_batches_tracked, mean, var, count)
    return y


def _transformed_running_update(
    spec: CallSpec,
    running_mean: Tensor,
    running_var: Tensor,
    nbt: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: int,
) -> None:
    """:func:`running_update` under ``torch.func`` transforms or forward-mode AD.

    Running statistics are state, not part of what is differentiated or
    mapped: the update happens at the buffers' own transform level, with the
    statistics' primal values.

    - ``grad``/``jvp``/``jacfwd`` levels above the buffers (buffers captured
      from outside, as a module's own are): the statistics are unwrapped to
      their primal values and the level is left for the update (torch
      refuses to mutate a captured tensor there; eager semantics are kept
      instead: one update per call).
    - ``vmap`` levels above the buffers: allowed where the statistics are the
      same for every mapped sample (e.g. ``jacfwd``'s vmap over tangents);
      batch statistics that differ per sample cannot go into one unbatched
      buffer, so that raises (nothing changed) and names the ways out.
    - Buffers batched at the statistics' vmap level (stacked per-model
      buffers through ``torch.func.functional_call``, model ensembling):
      updated in place per model, with tensor factors (no host
      synchronisation: ``momentum=None`` divides by the count tensor,
      ``nonfinite="skip"``/``"raise"`` keep the old values by ``torch.where``).

    When no transform is left once at the buffers' level, the ordinary eager
    update runs (the same op as outside transforms, so the same bits).
    """
    buffers = [t for t in (running_mean, running_var, nbt) if t is not None]
    with at_buffer_level(spec.name, buffers, (mean, var)) as (mean, var):
        if not transform_left():
            running_update(spec, running_mean, running_var, nbt, mean, var, count)
        elif not _empty_batch(spec, nbt, count):
            tensor_running_update(spec, running_mean, running_var, nbt, mean, var, count)


def transform_left() -> bool:
    """Whether a ``torch.func`` transform or a forward-AD level is still active (inside :func:`at_buffer_level`)."""
    return _functorch.peek_interpreter_stack() is not None or kernels.transform_active()


@contextlib.contextmanager
def at_buffer_level(where: str, buffers: list[Tensor], values: tuple[Tensor, ...]) -> Iterator[tuple[Tensor, ...]]:
    """Leave the ``torch.func`` levels above ``buffers``' own for their in-place update; yields ``values``' primal values.

    ``grad``/``jvp`` levels: ``values`` are unwrapped to their primal values
    (detached: forward AD's tangent is dropped too). ``vmap`` levels: allowed
    only where no value is batched there (the same for every mapped sample);
    otherwise a ``RuntimeError`` names the ways out, before anything is
    written. The levels are re-entered on exit. Inside, :func:`transform_left`
    says whether the ordinary eager update may run (nothing left) or a
    tensor form is needed (buffers batched at their own vmap level: stacked
    per-model buffers).
    """
    level = max(_functorch.maybe_get_level(t) for t in buffers)
    with contextlib.ExitStack() as outer:
        while (interpreter := _functorch.peek_interpreter_stack()) is not None and interpreter.level() > level:
            top, key = interpreter.level(), interpreter.key()
            if key not in (_functorch.TransformType.Vmap, _functorch.TransformType.Grad, _functorch.TransformType.Jvp):
                break  # (functionalize: the mutation is its business)
            if key == _functorch.TransformType.Vmap:
                if any(_functorch.maybe_get_level(v) >= top for v in values):
                    raise RuntimeError(
                        f"{where}: under torch.func.vmap in training mode, the batch statistics differ per "
                        "mapped sample but the running statistics are unbatched buffers updated in place. Use "
                        "bnkit.functional.batch_norm_step (pure: returns the new state), stack per-model buffers "
                        "with torch.func.stack_module_state + functional_call, set track_running_stats=False, "
                        "or use eval mode; the running statistics are unchanged"
                    )
            else:  # a grad or jvp level: keep the primal values
                values = tuple(_functorch._unwrap_for_grad(v, top) for v in values)
            outer.enter_context(_pyfunctorch.temporarily_pop_interpreter_stack())
        yield tuple(v.detach() for v in values)  # (forward AD: detach drops the tangent)


def tensor_running_update(
    spec: CallSpec, running_mean: Tensor, running_var: Tensor, nbt: Tensor | None, mean: Tensor, var: Tensor,
    count: int | Tensor, skip_one: bool = False
) -> None:
    """:func:`running_update`'s tensor-op form: no host synchronisation, so no graph break.

    Used by traces, captured graphs, ``"skip"`` on accelerators and
    ``torch.func`` transforms, after :func:`bnkit.engine._empty_batch` (an
    ``int`` count is not 0 here). The non-finite policy is one flag computed
    once, ``finite = max(var) < inf`` (a batch's statistics are finite exactly
    when its variance is, and a variance is never ``-inf``, so this is
    ``isfinite`` in two ops): it gates the ``num_batches_tracked`` increment
    and, by one ``torch.where`` per buffer, the update (``"raise"`` acts as
    ``"skip"``). ``momentum=None``: the factor is ``1 / num_batches_tracked``
    on the tensor, after the increment (where the increment was skipped, the
    where discards whatever it gives).

    A 0-d ``count`` tensor (a masked batch's valid count): a batch of 0 or 1
    valid entries writes no statistics (0 is counted, as an empty batch;
    eager mode raises for 1), and Bessel's factor ``n / (n - 1)`` is computed
    on the tensor, in float64 then cast, as :func:`bnkit.stats.unbiased_variance`'s. ``skip_one``: a count of
    1 is not counted either (``tiny_batch="running"`` normalized that batch with the running statistics).
    """
    finite = var.max() < math.inf if spec.check_finite else None
    counted = finite
    if skip_one and isinstance(count, Tensor):
        counted = count != 1 if finite is None else finite & (count != 1)
    if nbt is not None:
        nbt.add_(1 if counted is None else counted)
    keep = counted
    if isinstance(count, Tensor):
        several = count > 1
        keep = several if keep is None else keep & several
        var = var.detach() * (count.double() / (count - 1).double()).to(var.dtype)
        count = 1  # the variance is unbiased already (Bessel's factor for one value is 1)
    factor = spec.momentum if spec.momentum is not None else 1.0 / nbt.double()
    stats.update_running_stats(running_mean, running_var, mean, var, count, factor, keep)


def refuse_one_valid(count: Tensor, message: str) -> None:
    """In a captured graph, a valid count of 1 (no variance) raises a ``RuntimeError`` with ``message`` on CPU.

    ``torch._assert_async`` on the 0-d count tensor: no host synchronisation
    in the graph, and on CPU it raises where it runs, so a caller that
    calls it before any write changes nothing. On an accelerator, where a
    device-side assert would end the process's device context, nothing is
    checked: the caller writes no statistics for such a batch instead (the
    tensor running update keeps the old values for a count below 2). Under vmap (a count per mapped
    batch) nothing is checked either: the assert has no batching rule.
    """
    if count.is_cpu and not _functorch.is_batchedtensor(count):
        torch._assert_async(count != 1, message)


def masked_graph_path(
    spec: CallSpec, x3: Tensor, m2: Tensor, count: Tensor, weight: Tensor | None, bias: Tensor | None,
    running_mean: Tensor | None, running_var: Tensor | None, num_batches_tracked: Tensor | None,
    one_valid: str = "raise"
) -> Tensor:
    """The masked training phases while a graph is captured, on the canonical view: ``y3``.

    The valid ``count`` stays a 0-d tensor (``int(mask.sum())`` would be a host
    synchronisation, a graph break under ``torch.compile``): the portable
    masked forward (:func:`bnkit.kernels.torch_ops.masked_forward_train`,
    the same arithmetic as eager) and :func:`running_update`'s tensor form
    take it as it is. An all-padding batch is an empty batch (``bias``
    everywhere, counted, no update). One valid entry raises a
    ``RuntimeError`` on CPU (:func:`refuse_one_valid`, before anything is
    written); on an accelerator it writes no statistics instead. ``one_valid="running"``
    (``tiny_batch="running"``): such a batch is not refused, and neither updates nor counts (the caller
    gives it the running statistics' output).
    """
    if one_valid == "raise":
        refuse_one_valid(count, f"{spec.name}: Expected more than 1 value per channel when training, got 1 valid entry")
    y3, mean, var = torch_ops.masked_forward_train(x3, m2, weight, bias, spec.eps, count)
    if running_mean is not None:
        running_update(spec, running_mean, running_var, num_batches_tracked, mean, var, count,
                       skip_one=one_valid == "running")
    return y3
