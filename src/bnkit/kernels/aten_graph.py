"""Batch normalization in standard ATen ops, for graph capture (``torch.export``, ``torch.compile``, ONNX).

bnkit's C++ ops are opaque to graph compilers: ``torch.export`` keeps them
after ``run_decompositions()`` (so ONNX, ExecuTorch and AOTInductor without
bnkit's library cannot run the program) and inductor cannot fuse them with
the ReLU/add around them. While a graph is being captured
(:func:`capturing`), the engine and the kernel phases therefore express a
call in ATen ops that every backend knows:

* eval with running statistics: ``F.batch_norm(training=False)``, which
  decomposes to ``aten._native_batch_norm_legit_no_training`` (ONNX:
  ``BatchNormalization``, foldable into a preceding ``Conv``; inductor: its
  own BN lowering), exactly the graph of ``torch.nn.BatchNorm*d``;
* batch statistics (training, or eval without running statistics): the
  composite ``var_mean`` + elementwise form that inductor's own BN
  decomposition produces, with the statistics in float32 for half inputs;
  the running update is :func:`bnkit.engine.running_update`'s tensor-op
  form (non-finite policy by ``torch.where``, cumulative average by tensor
  ops, no host synchronisation).

The feature axis is handled by broadcasting per-channel tensors along it (or
``movedim`` for ``F.batch_norm``), which keeps the input's memory format.
Nothing here needs the C++ extension, so a process whose first bnkit call is
compiled never loads it inside the traced region. Eager calls never come here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["affine", "batch_norm_stats", "capturing", "infer", "infer_nd", "moments", "train_forward", "train_nd"]

_HALF = (torch.float16, torch.bfloat16)


def capturing() -> bool:
    """Whether a graph is being captured: dynamo (``torch.compile``, ``torch.export``) or the ONNX exporters."""
    return torch.compiler.is_compiling() or _onnx_exporting()


_ONNX_FLAGS: tuple | None = None


def _onnx_exporting() -> bool:
    """``torch.onnx.is_in_onnx_export()``, with its two flags' modules imported once.

    The public function imports them on every call (about 3 us, on every engine
    call that asks whether a graph is captured); where they are not where torch
    2.13 keeps them, the public function is used.
    """
    global _ONNX_FLAGS
    if _ONNX_FLAGS is None:
        try:
            from torch.onnx._internal.exporter import _flags
            from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

            _ONNX_FLAGS = (_flags, GLOBALS)
            _ONNX_FLAGS[0]._is_onnx_exporting, _ONNX_FLAGS[1].in_onnx_export  # noqa: B018 (both exist)
        except (ImportError, AttributeError):
            _ONNX_FLAGS = ()
    if not _ONNX_FLAGS:
        return torch.onnx.is_in_onnx_export()
    return _ONNX_FLAGS[1].in_onnx_export or _ONNX_FLAGS[0]._is_onnx_exporting


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype


def _along(t: Tensor, ndim: int, axis: int) -> Tensor:
    """A ``[C]`` tensor shaped to broadcast along ``axis`` of an ``ndim``-D tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def batch_norm_stats(x: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    """Per-channel ``(mean, biased var)`` over every dim but ``axis``, in the accumulation dtype."""
    dims = [d for d in range(x.dim()) if d != axis]
    var, mean = torch.var_mean(x.to(_acc(x.dtype)), dims, correction=0)
    return mean, var


def train_nd(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, axis: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Training BN of ``x`` along ``axis``: ``(y, mean, biased var)``, differentiable through the statistics.

    ``y = (x - mean) * rsqrt(var + eps) * weight + bias``, computed in the
    accumulation dtype (float32 for halves) and returned in ``x``'s dtype.
    """
    mean, var = batch_norm_stats(x, axis)
    n = x.dim()
    xa = x.to(mean.dtype)
    y = (xa - _along(mean, n, axis)) * _along(torch.rsqrt(var + eps), n, axis)
    if weight is not None:
        y = y * _along(weight.to(y.dtype), n, axis)
    if bias is not None:
        y = y + _along(bias.to(y.dtype), n, axis)
    return y.to(x.dtype), mean, var


def _aten_dtypes_ok(x: Tensor, *params: Tensor | None) -> bool:
    """Whether ``F.batch_norm`` takes these dtypes (all the input's, or all float32 for a half input)."""
    dtypes = {p.dtype for p in params if p is not None}
    return not dtypes or dtypes == {x.dtype} or (x.dtype in _HALF and dtypes == {torch.float32})


def infer_nd(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, axis: int
) -> Tensor:
    """Inference BN of ``x`` along ``axis`` with given statistics (torch's eval BN where it applies)."""
    n = x.dim()
    if n >= 2 and _aten_dtypes_ok(x, mean, var, weight, bias):
        moved = x if axis == 1 else x.movedim(axis, 1)
        y = F.batch_norm(moved, mean, var, weight, bias, False, 0.0, eps)
        return y if axis == 1 else y.movedim(1, axis)
    # Mixed parameter dtypes (or a 1-D input): the folded affine map, in the accumulation dtype.
    acc = _acc(x.dtype)
    scale = torch.rsqrt(var.to(acc) + eps)
    if weight is not None:
        scale = scale * weight.to(acc)
    shift = -mean.to(acc) * scale
    if bias is not None:
        shift = shift + bias.to(acc)
    return (x.to(acc) * _along(scale, n, axis) + _along(shift, n, axis)).to(x.dtype)


# The kernel phases on the canonical (outer, C, inner) view, for the variants that call them directly.
def moments(x3: Tensor) -> tuple[Tensor, Tensor]:
    return batch_norm_stats(x3, 1)


def train_forward(x3: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return train_nd(x3, weight, bias, eps, 1)


def infer(x3: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    return infer_nd(x3, mean, var, weight, bias, eps, 1)


def affine(x3: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    return (x3 * scale.view(1, -1, 1) + shift.view(1, -1, 1)).to(x3.dtype)
