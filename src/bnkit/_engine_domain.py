"""The engine's per-domain door: domain_module_call (statistics per (domain, channel), DomainBatchNorm).

Why a door of its own rather than :func:`~bnkit.engine.batch_norm_module_call`:
a mixed batch has one set of statistics per domain present, ``[D, C]``
running buffers of which only the present rows change, and per-sample
affine rows; none of this is expressible as one call of the one door
without a copy of the batch per domain. So a call whose samples all belong
to one domain *does* go through the one door unchanged (with that domain's
rows of the buffers and parameters: exactly a plain BN layer), and only a
mixed batch takes this path, which uses the same pieces: the engine's
checks, the canonical view, the per-domain kernels of
:mod:`bnkit.kernels.domain`, and :func:`domain_running_update`: the rule of
:func:`~bnkit.engine.running_update` (the one writer of running statistics,
with its cumulative average, non-finite policy, recompute rule and update
hook) applied to the present domains' rows, vectorized over the rows in
plain eager mode and running_update itself per row wherever a hook or a
transform may take it over (so they see exactly the one writer's calls).

In a captured graph (``torch.compile``, ``torch.export``) which domains a
mixed batch holds is data, not something to branch on: the counts and
statistics of all ``D`` domains come from the portable per-domain forward
(static ``[D]`` / ``[D, C]`` shapes) and :func:`domain_graph_running_update`
writes every row by ``torch.where`` (absent domains keep their values), so
the call is one graph.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import engine, kernels, stats
from ._engine_checks import _check_param, _empty_output, check_input
from ._engine_views import canonical_view
from .engine import CallSpec, _reject_nonfinite, batch_norm_module_call, in_recompute, running_update
from .errors import ChannelMismatchError, InputDtypeError
from .kernels import aten_graph
from .kernels import domain as kdomain

__all__ = ["check_domain", "domain_graph_running_update", "domain_module_call", "domain_running_update"]


def check_domain(spec: CallSpec, input: Tensor, domain: object, num_domains: int) -> int | Tensor:
    """``domain`` checked against ``input``: an int in ``[0, num_domains)`` or an int64 ``(N,)`` tensor.

    An integer 0-d tensor counts as an int. Raises ``TypeError`` (not an int
    or integer tensor; a bool or floating tensor), ``ValueError`` (a tensor
    not of shape ``(N,)`` for a batch of ``N`` samples), ``IndexError`` (a
    domain out of range) or ``RuntimeError`` (another device), before
    anything changes.
    """
    return _checked_domain(spec, input, domain, num_domains)[0]


def _checked_domain(
    spec: CallSpec, input: Tensor, domain: object, num_domains: int, host: bool = True
) -> tuple[int | Tensor, list[int] | None]:
    """:func:`check_domain`, and for a tensor the number of samples of each domain (one host read).

    ``host=False`` (a captured graph): a tensor's values are not read, so the
    samples per domain are ``None`` (the graph counts them on the tensor) and
    the range check is a ``torch._assert_async`` on CPU (a ``RuntimeError``
    when the graph runs, before anything is written); on an accelerator, where
    a device-side assert would end the process's device context, the indexing
    ops themselves fault on an out-of-range domain.
    """
    where = spec.name
    if isinstance(domain, Tensor):
        if domain.dtype == torch.bool or domain.dtype.is_floating_point or domain.dtype.is_complex:
            raise TypeError(f"{where}: domain must be an int or an integer (int64) tensor, got dtype {domain.dtype}")
        if domain.dim() == 0 and not host:  # not read in a captured graph: one domain for every sample
            domain = domain.reshape(1).expand(input.shape[0] if input.dim() else 0)
        if domain.dim() == 0:
            domain = int(domain)
        else:
            n = input.shape[0] if input.dim() else 0
            if domain.dim() != 1 or domain.shape[0] != n:
                raise ValueError(
                    f"{where}: a domain tensor must have shape (N,) = ({n},), one domain per sample of the input "
                    f"of shape {tuple(input.shape)}; got {tuple(domain.shape)}"
                )
            if domain.device != input.device:
                raise RuntimeError(
                    f"{where}: domain is on device {domain.device} but the input is on {input.device}; move it there"
                )
            domain = domain.long()
            if not host:
                if domain.is_cpu:
                    torch._assert_async(
                        ((domain >= 0) & (domain < num_domains)).all(),
                        f"{where}: a domain is out of range [0, {num_domains})",
                    )
                return domain, None
            try:  # the range check and the counts in one op: bincount refuses negatives, lengthens for big ones
                samples = torch.bincount(domain, minlength=num_domains).tolist() if n else [0] * num_domains
            except RuntimeError:
                samples = None
            if samples is None or len(samples) > num_domains:
                bad = int(domain.min()) if samples is None else len(samples) - 1
                raise IndexError(f"{where}: domain {bad} is out of range [0, {num_domains})") from None
            return domain, samples
    if not isinstance(domain, int) or isinstance(domain, bool):
        raise TypeError(
            f"{where}: domain must be an int or an int64 tensor of shape (N,), got {type(domain).__name__}"
        )
    if not 0 <= domain < num_domains:
        raise IndexError(f"{where}: domain {domain} is out of range [0, {num_domains})")
    return domain, []


def _check_tables(
    spec: CallSpec, input: Tensor, num_domains: int, weight: Tensor | None, bias: Tensor | None,
    running_mean: Tensor | None, running_var: Tensor | None, num_batches_tracked: Tensor | None
) -> None:
    """The per-domain tables fit the input: ``[D, C]`` (weight/bias also ``[C]``), the engine's dtype/device rules."""
    channels = input.shape[spec.axis]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is None:
            continue
        shared = name in ("weight", "bias") and t.dim() == 1
        if not isinstance(t, Tensor) or (not shared and tuple(t.shape) != (num_domains, channels)):
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ChannelMismatchError(
                f"{spec.name}: {name} should have shape (num_domains, C) = ({num_domains}, {channels}), got {shape}"
            )
        _check_param(name, t if shared else t[0], input, channels)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{spec.name}: running_mean and running_var must both be given or both be None")
    if num_batches_tracked is not None and tuple(num_batches_tracked.shape) != (num_domains,):
        raise ValueError(f"{spec.name}: num_batches_tracked should have shape ({num_domains},), "
                         f"got {tuple(num_batches_tracked.shape)}")


def _row(t: Tensor | None, d: int) -> Tensor | None:
    """Domain ``d``'s row of a ``[D, C]`` table (a ``[C]`` shared one as it is)."""
    return t if t is None or t.dim() == 1 else t[d]


def _table(t: Tensor | None, num_domains: int) -> Tensor | None:
    """A ``[D, C]`` view of a per-domain ``[D, C]`` or shared ``[C]`` parameter."""
    return t if t is None or t.dim() == 2 else t.unsqueeze(0).expand(num_domains, -1)


def _capturing() -> bool:
    """:func:`bnkit.kernels.aten_graph.capturing`, cheap in eager mode (the ONNX exporters' flag only while tracing)."""
    return torch.compiler.is_compiling() or (torch.jit.is_tracing() and torch.onnx.is_in_onnx_export())


def domain_module_call(
    spec: CallSpec, input: Tensor, domain: object, num_domains: int, weight: Tensor | None, bias: Tensor | None,
    running_mean: Tensor | None, running_var: Tensor | None, num_batches_tracked: Tensor | None, batch_stats: bool
) -> Tensor:
    r"""Batch normalization with per-domain statistics: the engine's door for DomainBatchNorm.

    ``domain``: an int (the whole batch) or an int64 ``(N,)`` tensor (the
    domain of each sample along dim 0). ``weight``/``bias``: ``[D, C]`` (per
    domain) or ``[C]`` (shared); ``running_mean``/``running_var``: ``[D, C]``
    and ``num_batches_tracked``: ``[D]`` (or ``None``).

    With ``batch_stats``, sample ``n`` of domain ``d`` becomes
    ``(x - mu_d) / sqrt(var_d + eps) * weight[d] + bias[d]`` with the mean
    and biased variance of domain ``d``'s samples in this batch (per
    channel); the running statistics (and ``num_batches_tracked``) of the
    domains present are updated as a BN layer's from their own statistics,
    those of absent domains are left exactly as they were. Without, each
    sample uses its domain's running statistics. A domain with a single value
    per channel in a training batch is a ``ValueError`` (as torch's BN on that
    domain's slice). A batch of one domain is exactly
    :func:`~bnkit.engine.batch_norm_module_call` on that domain's rows.
    """
    check_input(spec, input)
    where = spec.name
    ndim = input.dim()
    if ndim < 2 or spec.axis % ndim == 0:
        raise ValueError(
            f"{where}: per-domain BN takes the samples along dim 0, so it needs a feature axis other than 0 "
            f"(got axis={spec.axis} for a {ndim}-D input)"
        )
    # In a captured graph (torch.compile, export) which domains a batch holds is data: the statistics are
    # computed for all D domains with static shapes and the update is masked per row, without a host read
    # (a graph break). An update hook or a torch.func transform takes the per-row path of running_update.
    graph = _capturing() and not engine._ANY_HOOK and not kernels.transform_active()
    dom, samples = _checked_domain(spec, input, domain, num_domains, host=not graph)
    present = [] if samples is None else [d for d, k in enumerate(samples) if k]
    if isinstance(dom, Tensor):
        if len(present) == 1:
            dom = present[0]  # one domain after all: the plain path (and its fused op)
    if isinstance(dom, int):
        nbt = None if num_batches_tracked is None else num_batches_tracked[dom]
        return batch_norm_module_call(
            spec, input, _row(weight, dom), _row(bias, dom), _row(running_mean, dom), _row(running_var, dom), nbt,
            batch_stats,
        )
    if not input.dtype.is_floating_point:
        raise InputDtypeError(f"{where}: expected a floating-point input, got {input.dtype}")
    _check_tables(spec, input, num_domains, weight, bias, running_mean, running_var, num_batches_tracked)
    if input.numel() == 0:  # no sample: no domain is present, nothing is counted
        return _empty_output(input, weight, bias)
    axis = spec.axis % ndim
    n, channels = input.shape[0], input.shape[axis]
    per_value = input.numel() // (n * channels)  # values per channel of one sample
    if batch_stats:
        if not spec.eps > 0:
            raise ValueError(f"{where}: eps must be positive during training, got {spec.eps}")
        single = [d for d in present if samples[d] * per_value == 1]
        if single:
            raise ValueError(
                f"{where}: Expected more than 1 value per channel when training, got 1 value per channel for "
                f"domain {single[0]} (input size {tuple(input.size())}); give each domain of a batch at least "
                "2 samples (or call it with that domain alone in eval mode)"
            )
    elif running_mean is None:
        raise ValueError(f"{where}: running_mean and running_var are required when batch_stats=False")
    x3, restore = canonical_view(input, axis)
    rows = x3.shape[0] // n
    w2, b2 = _table(weight, num_domains), _table(bias, num_domains)
    if not batch_stats:
        return restore(kdomain.domain_infer(x3, dom, rows, running_mean, running_var, w2, b2, spec.eps))
    y3, mean, var, count = kdomain.domain_train_forward(x3, dom, rows, num_domains, w2, b2, spec.eps)
    if samples is None and per_value == 1 and input.is_cpu:  # (more values per sample: never one per domain)
        # eager's ValueError above, decided when the graph runs, before anything is written
        torch._assert_async(
            (count != 1).all(),
            f"{where}: Expected more than 1 value per channel when training, got 1 value per channel for a "
            "domain; give each domain of a batch at least 2 samples",
        )
    if running_mean is not None and samples is None:
        domain_graph_running_update(spec, running_mean, running_var, num_batches_tracked, mean, var, count)
    elif running_mean is not None:
        counts = {d: samples[d] * per_value for d in present}
        domain_running_update(spec, running_mean, running_var, num_batches_tracked, mean, var, counts)
    return restore(y3)


def _rows_fast_ok(num_batches_tracked: Tensor | None, mean: Tensor) -> bool:
    """Whether the rows can be written in one step here (plain eager mode: nothing redirects the update)."""
    return (
        not engine._ANY_HOOK
        and not kernels.transform_active()
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not aten_graph.capturing()
        and (num_batches_tracked is None or num_batches_tracked.dtype == torch.long)
        and mean.device.type == "cpu"
    )


def domain_running_update(
    spec: CallSpec, running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor | None, mean: Tensor,
    var: Tensor, counts: dict[int, int]
) -> None:
    """The running update of the rows ``counts`` names (domain -> values per channel), from ``[D, C]`` batch moments.

    Each row gets exactly :func:`~bnkit.engine.running_update`'s rule (the
    unbiased variance, ``momentum`` or the cumulative ``1/num_batches_tracked[d]``,
    the non-finite policy per domain, nothing during a checkpointing
    recompute); other rows are not touched. In plain eager CPU mode the rows
    are written in one vectorized step (``"raise"``: checked for every domain
    before any is written); wherever something may redirect or trace the
    update (an update hook, transforms, tracing, other devices) it is
    :func:`~bnkit.engine.running_update` on each row, the one writer's own
    path. (A captured graph without a hook or transform takes
    :func:`domain_graph_running_update` instead.)
    """
    if not counts or in_recompute():
        return
    if not _rows_fast_ok(num_batches_tracked, mean):
        for d, count in counts.items():
            nbt = None if num_batches_tracked is None else num_batches_tracked[d]
            running_update(spec, running_mean[d], running_var[d], nbt, mean[d], var[d], count)
        return
    if spec.momentum is None and num_batches_tracked is None:
        raise ValueError(f"{spec.name}: momentum=None (cumulative average) needs num_batches_tracked")
    if (
        kernels.select(mean) == "cpp" and kdomain.domain_update_op()
        and running_mean.is_contiguous() and running_var.is_contiguous()
        and (num_batches_tracked is None or not num_batches_tracked.is_inference() or torch.is_inference_mode_enabled())
    ):
        # One call of bnkit::running_update_'s C++ rule on every present row (csrc/domain.cpp).
        mode = {"propagate": 0, "skip": 1, "raise": 2}[spec.nonfinite]
        per_domain = [counts.get(d, 0) for d in range(running_mean.shape[0])]
        if torch.ops.bnkit.domain_running_update_(
            running_mean, running_var, num_batches_tracked, mean, var, per_domain, spec.fused_momentum, mode
        ):
            _reject_nonfinite(spec.name, spec.nonfinite)
        return
    update = list(counts)
    rows = torch.tensor(update, device=mean.device)
    batch_var = var.index_select(0, rows)
    if spec.check_finite:
        finite = torch.isfinite(batch_var).all(1).tolist()
        if not all(finite):
            _reject_nonfinite(spec.name, spec.nonfinite)  # "raise" raises here, before any change
            update = [d for d, ok in zip(update, finite) if ok]
            if not update:
                return
            rows = torch.tensor(update, device=mean.device)
            batch_var = var.index_select(0, rows)
    n = torch.tensor([counts[d] for d in update], dtype=torch.float64, device=mean.device)
    bessel = torch.where(n > 1, n / (n - 1).clamp_min(1), torch.ones_like(n)).unsqueeze(1)
    new_mean = mean.index_select(0, rows).detach().to(running_mean.dtype)
    new_var = (batch_var.detach().double() * bessel).to(running_var.dtype)
    if num_batches_tracked is not None:
        num_batches_tracked.index_add_(0, rows, torch.ones_like(rows, dtype=num_batches_tracked.dtype))
    if spec.momentum is None:
        factor = (1.0 / num_batches_tracked.index_select(0, rows).double()).unsqueeze(1)
        factor_m, factor_v = factor.to(running_mean.dtype), factor.to(running_var.dtype)
    else:
        factor_m = factor_v = float(spec.momentum)
    running_mean.index_copy_(0, rows, torch.lerp(running_mean.index_select(0, rows), new_mean, factor_m))
    running_var.index_copy_(0, rows, torch.lerp(running_var.index_select(0, rows), new_var, factor_v))


def domain_graph_running_update(
    spec: CallSpec, running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor | None, mean: Tensor,
    var: Tensor, count: Tensor
) -> None:
    """:func:`domain_running_update` in tensor ops for a captured graph: every row at once, no host read.

    ``count``: ``[D]``, the values per channel of each domain in the batch.
    Row ``d`` is written, and ``num_batches_tracked[d]`` incremented, exactly
    where the eager update would: the domain is present with more than one
    value per channel (eager raises for one: on CPU the graph asserts that
    before this) and, under a checking policy, its variance is finite
    (``"raise"`` acts as ``"skip"``, as in :func:`bnkit.engine.running_update`'s
    tensor form); the other rows keep their values by ``torch.where``. The
    rule per row is the eager one, :func:`bnkit.stats.update_running_stats`
    with Bessel's ``n / (n - 1)`` (in float64) applied per row and the factor
    ``momentum`` or ``1 / num_batches_tracked[d]`` after the increment.
    """
    if spec.momentum is None and num_batches_tracked is None:
        raise ValueError(f"{spec.name}: momentum=None (cumulative average) needs num_batches_tracked")
    keep = count > 1
    if spec.check_finite:  # a domain's statistics are finite exactly when its variance is (never -inf)
        keep = keep & (var.amax(1) < math.inf)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(keep.to(num_batches_tracked.dtype))
    n = count.double().unsqueeze(1)
    unbiased = (var.detach().double() * (n / (n - 1).clamp_min(1))).to(running_var.dtype)  # Bessel per row
    # momentum=None: rows not kept may divide by 0 here, and the where discards them
    factor = spec.momentum if spec.momentum is not None else (1.0 / num_batches_tracked.double()).unsqueeze(1)
    stats.update_running_stats(running_mean, running_var, mean, unbiased, 1, factor, keep.unsqueeze(1))
