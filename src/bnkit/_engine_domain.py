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
:mod:`bnkit.kernels.domain`, and :func:`~bnkit.engine.running_update` once
per present domain (the one writer of running statistics, with its
cumulative average, non-finite policy, recompute rule and update hook).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._engine_checks import _empty_output, check_input
from ._engine_views import canonical_view
from .engine import CallSpec, _reject_nonfinite, batch_norm_module_call, running_update
from .kernels import domain as kdomain

__all__ = ["check_domain", "domain_module_call"]


def check_domain(spec: CallSpec, input: Tensor, domain: object, num_domains: int) -> int | Tensor:
    """``domain`` checked against ``input``: an int in ``[0, num_domains)`` or an int64 ``(N,)`` tensor.

    An integer 0-d tensor counts as an int. Raises ``TypeError`` (not an int
    or integer tensor; a bool or floating tensor), ``ValueError`` (a tensor
    not of shape ``(N,)`` for a batch of ``N`` samples), ``IndexError`` (a
    domain out of range) or ``RuntimeError`` (another device), before
    anything changes.
    """
    where = spec.name
    if isinstance(domain, Tensor):
        if domain.dtype == torch.bool or domain.dtype.is_floating_point or domain.dtype.is_complex:
            raise TypeError(f"{where}: domain must be an int or an integer (int64) tensor, got dtype {domain.dtype}")
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
            if n:
                lo, hi = int(domain.min()), int(domain.max())
                if lo < 0 or hi >= num_domains:
                    bad = lo if lo < 0 else hi
                    raise IndexError(f"{where}: domain {bad} is out of range [0, {num_domains})")
            return domain.long()
    if not isinstance(domain, int) or isinstance(domain, bool):
        raise TypeError(
            f"{where}: domain must be an int or an int64 tensor of shape (N,), got {type(domain).__name__}"
        )
    if not 0 <= domain < num_domains:
        raise IndexError(f"{where}: domain {domain} is out of range [0, {num_domains})")
    return domain


def _row(t: Tensor | None, d: int) -> Tensor | None:
    """Domain ``d``'s row of a ``[D, C]`` table (a ``[C]`` shared one as it is)."""
    return t if t is None or t.dim() == 1 else t[d]


def _table(t: Tensor | None, num_domains: int) -> Tensor | None:
    """A ``[D, C]`` view of a per-domain ``[D, C]`` or shared ``[C]`` parameter."""
    return t if t is None or t.dim() == 2 else t.unsqueeze(0).expand(num_domains, -1)


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
    dom = check_domain(spec, input, domain, num_domains)
    if isinstance(dom, Tensor) and dom.numel() and bool((dom == dom[0]).all()):
        dom = int(dom[0])  # one domain after all: the plain path (and its fused op)
    if isinstance(dom, int):
        nbt = None if num_batches_tracked is None else num_batches_tracked[dom]
        return batch_norm_module_call(
            spec, input, _row(weight, dom), _row(bias, dom), _row(running_mean, dom), _row(running_var, dom), nbt,
            batch_stats,
        )
    if not input.dtype.is_floating_point:
        raise TypeError(f"{where}: expected a floating-point input, got {input.dtype}")
    if input.numel() == 0:  # no sample: no domain is present, nothing is counted
        return _empty_output(input, weight, bias)
    axis = spec.axis % ndim
    n, channels = input.shape[0], input.shape[axis]
    per_value = input.numel() // (n * channels)  # values per channel of one sample
    samples = torch.bincount(dom, minlength=num_domains).tolist()
    present = [d for d, k in enumerate(samples) if k]
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
    y3, mean, var, _ = kdomain.domain_train_forward(x3, dom, rows, num_domains, w2, b2, spec.eps)
    if running_mean is not None:
        if spec.nonfinite == "raise" and not torch.compiler.is_compiling():
            # Checked for every domain before any is written: a "raise" leaves all of them unchanged.
            if not all(math.isfinite(v) for v in var[present].amax(1).tolist()):
                _reject_nonfinite(where, "raise")
        for d in present:
            nbt = None if num_batches_tracked is None else num_batches_tracked[d]
            running_update(spec, running_mean[d], running_var[d], nbt, mean[d], var[d], samples[d] * per_value)
    return restore(y3)
