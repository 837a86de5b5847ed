"""Per-domain BN phases on the canonical view: statistics per (domain, channel).

The canonical view ``x3 = (outer, C, inner)`` of an input whose batch axis is
outermost lists ``rows_per_sample`` consecutive outer rows per sample, so
with ``domains`` (int64, ``(N,)``) giving each sample's domain, the view is
``x4 = x3.view(N, rows_per_sample, C, inner)`` and domain ``d``'s values of
channel ``c`` are ``x4[domains == d, :, c, :]``.

:func:`domain_train_forward` normalizes each sample with its domain's batch
mean and biased variance: on CPU one C++ op (``bnkit::domain_train``,
``csrc/domain.cpp``: one read of the input for the statistics of every
domain) with its analytic backward (``bnkit::domain_backward``); elsewhere,
under ``torch.func`` transforms / forward AD, under ``torch.compile`` or a
graph capture, with the ``torch``/``reference`` backends or without the
extension, the same math as differentiable torch ops (``index_add`` over the
per-sample sums), whose autograd gives the backward and every higher
derivative. :func:`domain_infer` applies given per-domain statistics (eval).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..stats import accumulation_dtype
from . import aten_graph, cpp_available, select

__all__ = [
    "domain_cpp_available", "domain_infer", "domain_train_forward", "domain_update_op", "torch_domain_train_forward",
]

_ok: bool | None = None
_update_ok: bool | None = None


def domain_cpp_available() -> bool:
    """Whether the loaded extension has the per-domain kernels (``csrc/domain.cpp``)."""
    global _ok
    if _ok is None:
        _ok = cpp_available() and hasattr(torch.ops.bnkit, "domain_train")  # loaded first: never a stale False
    return _ok


def domain_update_op() -> bool:
    """Whether the extension has ``bnkit::domain_running_update_`` (the running update of all present domains)."""
    global _update_ok
    if _update_ok is None:
        _update_ok = domain_cpp_available() and hasattr(torch.ops.bnkit, "domain_running_update_")
    return _update_ok


def _rows(t: Tensor, domains: Tensor) -> Tensor:
    """A ``[D, C]`` table's rows for each sample, shaped ``(N, 1, C, 1)`` to broadcast over ``x4``."""
    return t.index_select(0, domains).unsqueeze(1).unsqueeze(-1)


def torch_domain_train_forward(
    x3: Tensor, domains: Tensor, rows_per_sample: int, num_domains: int, weight: Tensor | None,
    bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The portable form of :func:`domain_train_forward`: differentiable torch ops (two-pass statistics)."""
    n = domains.shape[0]
    _, c, inner = x3.shape
    acc = accumulation_dtype(x3.dtype)
    x4 = x3.reshape(n, rows_per_sample, c, inner).to(acc)
    # (not bincount: its length depends on the values, which a captured graph cannot know; domains are in range)
    count = torch.zeros(num_domains, dtype=torch.long, device=domains.device).index_add(
        0, domains, torch.ones_like(domains)
    ) * (rows_per_sample * inner)
    denom = count.clamp_min(1).to(acc).unsqueeze(1)
    zeros = torch.zeros(num_domains, c, dtype=acc, device=x3.device)
    mean = zeros.index_add(0, domains, x4.sum((1, 3))) / denom
    centred = x4 - _rows(mean, domains)
    var = zeros.index_add(0, domains, (centred * centred).sum((1, 3))) / denom
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(acc)
    y4 = centred * _rows(scale, domains)
    if bias is not None:
        y4 = y4 + _rows(bias.to(acc), domains)
    return y4.reshape(x3.shape).to(x3.dtype), mean.detach(), var.detach(), count


class _DomainTrain(torch.autograd.Function):
    """Per-domain training BN by the C++ kernels; a double backward differentiates the torch ops."""

    @staticmethod
    def forward(ctx, x3, domains, rows_per_sample, num_domains, weight, bias, eps):
        y3, mean, var, count = torch.ops.bnkit.domain_train(x3, domains, rows_per_sample, num_domains, weight, bias,
                                                            eps)
        ctx.eps, ctx.rows, ctx.num_domains = eps, rows_per_sample, num_domains
        ctx.save_for_backward(x3, domains, weight, bias, mean, var)
        ctx.mark_non_differentiable(mean, var, count)
        return y3, mean, var, count

    @staticmethod
    def backward(ctx, grad_y3, _gm, _gv, _gc):
        x3, domains, weight, bias, mean, var = ctx.saved_tensors
        need_x, _, _, _, need_w, need_b = ctx.needs_input_grad[:6]
        if torch.is_grad_enabled():  # a graph of the backward: differentiate the torch ops
            wrt = [t for t in (x3, weight, bias) if t is not None and t.requires_grad]
            with torch.enable_grad():
                y3, _, _, _ = torch_domain_train_forward(x3, domains, ctx.rows, ctx.num_domains, weight, bias,
                                                         ctx.eps)
                grads = iter(torch.autograd.grad(y3, wrt, grad_y3, create_graph=True, allow_unused=True))
            gx, gw, gb = ((next(grads) if t is not None and t.requires_grad else None) for t in (x3, weight, bias))
        else:
            gx, sum_dy_xhat, sum_dy = torch.ops.bnkit.domain_backward(
                grad_y3, x3, domains, ctx.rows, mean, var, weight, ctx.eps
            )
            gw = None if weight is None else sum_dy_xhat.to(weight.dtype)
            gb = None if bias is None else sum_dy.to(bias.dtype)
        return (gx if need_x else None, None, None, None, gw if need_w else None, gb if need_b else None, None)


def domain_train_forward(
    x3: Tensor, domains: Tensor, rows_per_sample: int, num_domains: int, weight: Tensor | None,
    bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""The per-domain training forward: ``(y3, mean [D, C], biased var [D, C], count [D])``.

    For sample ``n`` of domain ``d = domains[n]``:
    ``y = (x - mean[d]) / sqrt(var[d] + eps) * weight[d] + bias[d]`` with the
    mean and biased variance of domain ``d``'s ``count[d]`` values per
    channel. ``weight``/``bias``: ``[D, C]`` or ``None``. Differentiable in
    ``x3``, ``weight`` and ``bias``; a domain without samples gets statistics
    that are never used (0 from the C++ op, 0/NaN-free from the torch ops).
    """
    if (
        not aten_graph.capturing()
        and not torch.compiler.is_compiling()
        and select(x3) == "cpp"
        and domain_cpp_available()
    ):
        return _DomainTrain.apply(x3, domains, rows_per_sample, num_domains, weight, bias, eps)
    return torch_domain_train_forward(x3, domains, rows_per_sample, num_domains, weight, bias, eps)


def domain_infer(
    x3: Tensor, domains: Tensor, rows_per_sample: int, mean: Tensor, var: Tensor, weight: Tensor | None,
    bias: Tensor | None, eps: float
) -> Tensor:
    """Each sample normalized with its domain's given statistics (``[D, C]``), differentiable in all inputs.

    ``y = x * scale[d] + shift[d]`` with ``scale = weight / sqrt(var + eps)``
    and ``shift = bias - mean * scale`` folded per domain (one multiply-add
    per value; the per-domain tables are gathered per sample, not per value).
    """
    from . import fold

    n = domains.shape[0]
    _, c, inner = x3.shape
    acc = accumulation_dtype(x3.dtype)
    scale, shift = fold(mean.to(acc), var.to(acc), weight, bias, eps)
    x4 = x3.reshape(n, rows_per_sample, c, inner).to(acc)
    y4 = torch.addcmul(_rows(shift, domains), x4, _rows(scale, domains))
    return y4.reshape(x3.shape).to(x3.dtype)
