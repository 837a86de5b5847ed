"""SyncBatchNorm's communication: the payload, the collectives and the autograd functions of the synchronized path."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import kernels, stats

_COMM_DTYPE = torch.float64
# Header of the forward payload: [count, channels, layer tag].
_HEADER = 3


def sync_payload_bytes(num_features: int, world_size: int) -> dict[str, int]:
    """Bytes one SyncBatchNorm layer sends and receives per training step (independent of the batch size).

    ``forward_send``: this rank's all-gather contribution; ``forward_gathered``:
    the gathered tensor; ``backward_allreduce``: the all-reduced gradient sums.
    """
    item = torch.empty((), dtype=_COMM_DTYPE).element_size()
    per_rank = (2 * num_features + _HEADER) * item
    return {
        "forward_send": per_rank,
        "forward_gathered": per_rank * world_size,
        "backward_allreduce": 2 * num_features * item,
    }


def _all_gather_flat(out: Tensor, inp: Tensor, group) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, inp, group=group)


def _gather_moments(
    comm: "_Comm", x3: Tensor, n_local: int, local: tuple[Tensor, Tensor] | None
) -> tuple[Tensor, Tensor]:
    """All-gather every rank's ``(count, channels, tag, mean, M2)`` and check the header agrees.

    ``local`` is this rank's ``(mean, biased var)`` over ``n_local`` values (``None`` when it has none).
    Returns the gathered ``[world, 2C + header]`` payloads and their headers (on the CPU).
    """
    channels = x3.shape[1]
    payload = torch.zeros(2 * channels + _HEADER, dtype=_COMM_DTYPE, device=x3.device)
    payload[0] = n_local
    payload[1] = channels
    payload[2] = comm.tag
    if local is not None:
        mean_l, var_l = local
        payload[_HEADER : _HEADER + channels] = mean_l
        payload[_HEADER + channels :] = var_l.to(_COMM_DTYPE) * n_local  # M2
    gathered = torch.empty(comm.world_size * payload.numel(), dtype=_COMM_DTYPE, device=x3.device)
    try:
        _all_gather_flat(gathered, payload, comm.group)
    except Exception as err:  # noqa: BLE001 - every backend error becomes one clear message
        raise comm.fail("forward all-gather of the batch statistics", err) from err
    gathered = gathered.view(comm.world_size, -1)
    header = gathered[:, :_HEADER].cpu()
    if bool((header[:, 1] != channels).any()):
        raise RuntimeError(
            f"{comm.describe}: channel count mismatch across ranks: ranks have "
            f"{[int(c) for c in header[:, 1]]} channels"
        )
    if bool((header[:, 2] != comm.tag).any()):
        raise RuntimeError(
            f"{comm.describe}: ranks reached different SyncBatchNorm layers in the same collective "
            "(layer tags differ); every rank must call the same layers in the same order"
        )
    return gathered, header


class _Comm:
    """What the autograd function needs to communicate and to name its layer in errors."""

    __slots__ = ("group", "world_size", "describe", "tag")

    def __init__(self, group, world_size: int, describe: str, tag: int) -> None:
        self.group = group
        self.world_size = world_size
        self.describe = describe
        self.tag = tag

    def fail(self, what: str, err: BaseException) -> RuntimeError:
        return RuntimeError(
            f"{self.describe}: collective failed in the {what} ({type(err).__name__}: {err}). "
            "A rank may have died, stalled past the process group's timeout, or run a different "
            "model / number of SyncBatchNorm calls."
        )


def _global_statistics(
    comm: _Comm, x3: Tensor, n_local: int, local: tuple[Tensor, Tensor] | None, what: str, empty_var: float
) -> tuple[Tensor, Tensor, int]:
    """The global batch's ``(mean, biased var, count)`` from every rank's moments.

    A global batch of one value per channel raises torch's error (``what``
    names the values counted); an empty one (none on any rank) has ``var``
    filled with ``empty_var``.
    """
    acc = stats.accumulation_dtype(x3.dtype)
    channels = x3.shape[1]
    gathered, header = _gather_moments(comm, x3, n_local, local)
    total = int(header[:, 0].sum())
    if total == 1:
        raise ValueError(
            f"{comm.describe}: Expected more than 1 value per channel when training, "
            f"got a global batch of 1 {what} per channel"
        )
    merged = stats.merge_stacked(
        gathered[:, 0], gathered[:, _HEADER : _HEADER + channels], gathered[:, _HEADER + channels :]
    )
    mean = merged.mean.to(acc)
    if total > 0:
        var = (merged.m2 / total).to(acc)
    else:
        var = torch.full_like(mean, empty_var)
    return mean, var, total


def _normalize(
    ctx, x3: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, comm: _Comm, mean: Tensor, var: Tensor,
    total: int, saved: tuple
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``y3 = (x3 - mean) / sqrt(var + eps) * weight + bias`` with the global statistics, and ``ctx`` for the backward.

    An empty global batch normalizes to the bias (scale 0). ``saved`` goes to
    ``ctx.save_for_backward``. Returns ``(y3, mean, var, count)``.
    """
    acc = mean.dtype
    if total > 0:
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight.to(acc)
        shift = -mean * scale
    else:
        scale = torch.zeros_like(mean)
        shift = torch.zeros_like(mean)
    if bias is not None:
        shift = shift + bias.to(acc)
    y3 = kernels.affine(x3, scale, shift)
    ctx.comm = comm
    ctx.total = total
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.eps = eps
    ctx.save_for_backward(*saved)
    count_t = torch.tensor(total, dtype=torch.long)
    ctx.mark_non_differentiable(mean, var, count_t)
    return y3, mean, var, count_t


def _sync_gradients(
    ctx, weight: Tensor | None, sum_dy: Tensor, sum_dy_xhat: Tensor, need: tuple[bool, bool, bool], apply
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The backward after this rank's sums: all-reduce them, ``dx = apply(sum_dy, sum_dy_xhat)``, ``dweight``, ``dbias``.

    ``need``: whether the input, weight and bias need their gradient; the
    parameter gradients are this rank's own sums (DDP reduces them).
    """
    need_x, need_w, need_b = need
    channels = sum_dy.shape[0]
    dx = None
    if need_x:
        sums = torch.cat([sum_dy, sum_dy_xhat]).to(_COMM_DTYPE)
        try:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.comm.group)
        except Exception as err:  # noqa: BLE001
            raise ctx.comm.fail("backward all-reduce of the gradient sums", err) from err
        dx = apply(sums[:channels], sums[channels:])
    dw = sum_dy_xhat.to(weight.dtype) if (need_w and weight is not None) else None
    db = sum_dy.to(ctx.bias_dtype) if (need_b and ctx.bias_dtype is not None) else None
    return dx, dw, db


class _SyncBatchNormFunction(torch.autograd.Function):
    """Training SyncBN on the canonical ``(outer, C, inner)`` view.

    Returns ``(y3, mean, biased_var, count)`` where the statistics are those of
    the global batch (not differentiable) and ``count`` is its size (a 0-d
    int64 tensor).
    """

    @staticmethod
    def forward(ctx, x3: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, comm: _Comm):
        n_local = x3.shape[0] * x3.shape[2]
        local = kernels.moments(x3) if n_local > 0 else None
        mean, var, total = _global_statistics(comm, x3, n_local, local, "value", float("nan"))
        return _normalize(ctx, x3, weight, bias, eps, comm, mean, var, total, (x3, weight, mean, var))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y3: Tensor, _gm, _gv, _gc):
        x3, weight, mean, var = ctx.saved_tensors
        # The BN backward's phases: this rank's sums (centred on the global statistics),
        # all-reduced, then applied with the global count.
        sum_dy, sum_dy_xhat = kernels.backward_reduce(grad_y3, x3, mean, var, ctx.eps)
        dx, dw, db = _sync_gradients(
            ctx, weight, sum_dy, sum_dy_xhat, ctx.needs_input_grad[:3],
            lambda s_dy, s_dy_xhat: kernels.backward_apply(
                grad_y3, x3, mean, var, weight, s_dy, s_dy_xhat, ctx.total, ctx.eps
            ),
        )
        return dx, dw, db, None, None


class _SyncMaskedFunction(torch.autograd.Function):
    """Masked training SyncBN on the canonical view: the valid entries' moments, all-gathered, merged.

    ``m2`` is the canonical ``(outer, inner)`` bool mask and ``n_local`` its
    number of valid entries; the payload is :class:`_SyncBatchNormFunction`'s
    with the valid count. Returns ``(y3, mean, biased_var, count)`` of the
    global valid entries. Padded entries are normalized with the global
    statistics and never reach the sums of the backward.
    """

    @staticmethod
    def forward(ctx, x3: Tensor, m2: Tensor, n_local: int, weight: Tensor | None, bias: Tensor | None, eps: float,
                comm: _Comm):
        local = kernels.masked_moments(x3, m2, n_local) if n_local > 0 else None
        mean, var, total = _global_statistics(comm, x3, n_local, local, "valid value", 0.0)
        return _normalize(ctx, x3, weight, bias, eps, comm, mean, var, total, (x3, m2, weight, mean, var))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y3: Tensor, _gm, _gv, _gc):
        x3, m2, weight, mean, var = ctx.saved_tensors
        sum_dy, sum_dy_xhat = kernels.masked_backward_reduce(grad_y3, x3, m2, mean, var, ctx.eps)
        if ctx.total == 0:
            sum_dy, sum_dy_xhat = torch.zeros_like(sum_dy), torch.zeros_like(sum_dy_xhat)
        needs = ctx.needs_input_grad
        dx, dw, db = _sync_gradients(
            ctx, weight, sum_dy, sum_dy_xhat, (needs[0], needs[3], needs[4]),
            lambda s_dy, s_dy_xhat: kernels.masked_backward_apply(
                grad_y3, x3, m2, mean, var, weight, s_dy, s_dy_xhat, ctx.total, ctx.eps
            ),
        )
        return dx, None, None, dw, db, None, None
