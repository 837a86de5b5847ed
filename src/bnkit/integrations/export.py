"""Export helpers: ATen decompositions of bnkit's ops, and ONNX export in one call.

Since the engine expresses every call in standard ATen ops while a graph is
captured (:mod:`bnkit.kernels.aten_graph`), ``torch.export.export(model,
...).run_decompositions()`` holds no bnkit op and both ONNX exporters work
on bnkit models directly, with no helper. What remains here serves programs
or traces that already contain bnkit's C++ ops (for example a
``torch.jit.trace`` recorded in eager mode):

* :func:`decompositions` - ``torch.export.default_decompositions()`` plus one
  entry per bnkit op (eval op -> ``aten._native_batch_norm_legit_no_training``,
  training op -> ``aten.var_mean`` and elementwise ops)::

      ep = program_with_bnkit_ops.run_decompositions(decompositions())

* :func:`export_onnx` - ``torch.export`` then the dynamo ONNX exporter, with
  those decompositions applied (a no-op for a freshly exported bnkit model).
* :func:`register_onnx_symbolics` - symbolic functions of the C++ ops for the
  TorchScript-based exporter (``BatchNormalization`` for the eval op).

The decompositions are explicit (passed to ``run_decompositions``) rather
than ``CompositeImplicitAutograd`` kernels on the ops, because such a kernel
would also replace the C++ kernels in eager autograd.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import kernels

__all__ = ["bnkit_ops", "decompositions", "export_onnx", "register_onnx_symbolics"]

aten = torch.ops.aten


def _c(t: Tensor) -> Tensor:
    """A per-channel ``[C]`` tensor broadcast over ``(outer, C, inner)``."""
    return t.view(1, -1, 1)


def _infer(x3: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    return aten._native_batch_norm_legit_no_training.default(x3, weight, bias, mean, var, 0.0, eps)[0]


def _train(x3: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    acc = x3.float() if x3.dtype in (torch.float16, torch.bfloat16) else x3
    var, mean = torch.var_mean(acc, [0, 2], correction=0)
    y = (acc - _c(mean)) * _c(torch.rsqrt(var + eps))
    if weight is not None:
        y = y * _c(weight.to(y.dtype))
    if bias is not None:
        y = y + _c(bias.to(y.dtype))
    return y.to(x3.dtype), mean, var  # statistics in the accumulation dtype, as the C++ op


def _eval(x3: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    return (x3 * _c(scale) + _c(shift)).to(x3.dtype)


def _moments(x3: Tensor):
    acc = x3.float() if x3.dtype in (torch.float16, torch.bfloat16) else x3
    var, mean = torch.var_mean(acc, [0, 2], correction=0)
    return mean, var


def bnkit_ops() -> dict[str, Any]:
    """bnkit's forward ops by name (loading the C++ library if needed; empty when it is unavailable)."""
    if not kernels.cpp_available():
        return {}
    ns = torch.ops.bnkit
    return {
        "batch_norm_infer": ns.batch_norm_infer.default,
        "batch_norm_train": ns.batch_norm_train.default,
        "batch_norm_eval": ns.batch_norm_eval.default,
        "moments": ns.moments.default,
    }


_DECOMPS: dict[str, Callable] = {
    "batch_norm_infer": _infer,
    "batch_norm_train": _train,
    "batch_norm_eval": _eval,
    "moments": _moments,
}


def decompositions(table: dict | None = None) -> dict:
    """``table`` (default: ``torch.export.default_decompositions()``) with bnkit's ops decomposed into ATen."""
    table = torch.export.default_decompositions() if table is None else table
    for name, op in bnkit_ops().items():
        table[op] = _DECOMPS[name]
    return table


def export_onnx(model: torch.nn.Module, args: tuple, f: Any = None, **kwargs: Any):
    """``torch.onnx.export(..., dynamo=True)`` of ``model`` with bnkit's ops decomposed first.

    The model is exported in its current mode (``model.eval()`` first for
    inference). Returns the ``ONNXProgram`` (saved to ``f`` when given).
    """
    ep = torch.export.export(model, tuple(args))
    ep = ep.run_decompositions(decompositions())
    return torch.onnx.export(ep, tuple(args), f, dynamo=True, **kwargs)


_SYMBOLICS_DONE: set[int] = set()


def register_onnx_symbolics(opset_version: int = 17) -> None:
    """Symbolic functions of bnkit's forward ops for the TorchScript-based ONNX exporter (idempotent)."""
    if opset_version in _SYMBOLICS_DONE or not bnkit_ops():
        return
    from torch.onnx import register_custom_op_symbolic, symbolic_helper

    def ones_or(g, t, like, value: float):
        if not symbolic_helper._is_none(t):
            return t
        c = g.op("Shape", like)
        channels = g.op("Gather", c, g.op("Constant", value_t=torch.tensor([1])), axis_i=0)
        return g.op("ConstantOfShape", channels, value_t=torch.tensor([value], dtype=torch.float32))

    @symbolic_helper.parse_args("v", "v", "v", "v", "v", "f")
    def infer(g, x3, mean, var, weight, bias, eps):
        return g.op(
            "BatchNormalization", x3, ones_or(g, weight, x3, 1.0), ones_or(g, bias, x3, 0.0), mean, var,
            epsilon_f=eps,
        )

    @symbolic_helper.parse_args("v", "v", "v", "f")
    def train(g, x3, weight, bias, eps):
        axes = g.op("Constant", value_t=torch.tensor([0, 2]))
        if opset_version >= 18:
            mean = g.op("ReduceMean", x3, axes, keepdims_i=1)
        else:
            mean = g.op("ReduceMean", x3, axes_i=[0, 2], keepdims_i=1)
        centered = g.op("Sub", x3, mean)
        sq = g.op("Mul", centered, centered)
        if opset_version >= 18:
            var = g.op("ReduceMean", sq, axes, keepdims_i=1)
        else:
            var = g.op("ReduceMean", sq, axes_i=[0, 2], keepdims_i=1)
        eps_c = g.op("Constant", value_t=torch.tensor(eps, dtype=torch.float32))
        y = g.op("Div", centered, g.op("Sqrt", g.op("Add", var, eps_c)))
        if not symbolic_helper._is_none(weight):
            y = g.op("Mul", y, g.op("Unsqueeze", weight, g.op("Constant", value_t=torch.tensor([0, 2])))
                     if opset_version >= 13 else g.op("Unsqueeze", weight, axes_i=[0, 2]))
        if not symbolic_helper._is_none(bias):
            y = g.op("Add", y, g.op("Unsqueeze", bias, g.op("Constant", value_t=torch.tensor([0, 2])))
                     if opset_version >= 13 else g.op("Unsqueeze", bias, axes_i=[0, 2]))
        flat = g.op("Constant", value_t=torch.tensor([-1]))
        return y, g.op("Reshape", mean, flat), g.op("Reshape", var, flat)

    register_custom_op_symbolic("bnkit::batch_norm_infer", infer, opset_version)
    register_custom_op_symbolic("bnkit::batch_norm_train", train, opset_version)
    _SYMBOLICS_DONE.add(opset_version)
