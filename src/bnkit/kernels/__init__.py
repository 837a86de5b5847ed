"""Kernel backends and the one place where a backend is chosen.

Backends, all implementing the same contract on the canonical 3-D view
``x3 = (outer, C, inner)``:

``cpp``
    fused C++ CPU kernels registered as ``torch.ops.bnkit.*`` (CPU tensors);
``torch``
    portable torch tensor ops (:mod:`bnkit.kernels.torch_ops`), any device;
``reference``
    the NumPy float64 oracle (:mod:`bnkit.reference`), for debugging;
``composite``
    not a choice but a state: while a ``torch.func`` transform (``vmap``,
    ``grad``, ``jvp``, ``jacfwd``, ...) or forward-mode AD
    (``torch.autograd.forward_ad``) is active, every phase is made of the
    portable torch ops *without* a custom ``autograd.Function``, so torch's own
    jvp and batching rules apply (:func:`transform_active`).

Phases (the same set on every backend, chosen per tensor by :func:`select`;
SyncBN, Ghost BN and Batch Renorm are compositions of them): :func:`moments`,
:func:`affine` (normalize with a folded ``(scale, shift)``), :func:`infer`,
:func:`train_forward` (whose backward is the backend's one BN training
backward), :func:`backward_reduce` (``sum dy``, ``sum dy * xhat``),
:func:`backward_apply`, and the running update
(:func:`bnkit.engine.running_update`).

By default CPU tensors use ``cpp`` when the extension is available, and every
other device uses ``torch``. ``BNKIT_BACKEND=cpp|torch|reference`` (read at
import) or :func:`set_backend` / :func:`use_backend` force one.
"""

from __future__ import annotations

import contextlib
import os
from types import ModuleType
from typing import Iterator

import numpy as np
import torch
import torch.autograd.forward_ad as _fwad
from torch import Tensor
from torch._C import _functorch

from .. import reference as _reference
from ..stats import accumulation_dtype
from . import aten_graph, torch_ops

__all__ = [
    "BACKENDS",
    "affine",
    "backward_apply",
    "backward_reduce",
    "cpp_available",
    "fold",
    "get_backend",
    "infer",
    "masked_backward_apply",
    "masked_backward_reduce",
    "masked_moments",
    "masked_train_forward",
    "moments",
    "raw",
    "select",
    "set_backend",
    "train_forward",
    "transform_active",
    "use_backend",
]

BACKENDS = ("cpp", "torch", "reference")


def _validated(name: str | None) -> str | None:
    if name in (None, "", "auto"):
        return None
    if name not in BACKENDS:
        raise ValueError(f"unknown bnkit backend {name!r}; choose one of {BACKENDS} (or 'auto')")
    return name


_forced: str | None = _validated(os.environ.get("BNKIT_BACKEND"))


def get_backend() -> str | None:
    """The forced backend, or None for automatic selection."""
    return _forced


def set_backend(name: str | None) -> None:
    """Force a backend for all later calls (None or 'auto': choose per device)."""
    global _forced
    _forced = _validated(name)


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Temporarily force a backend."""
    global _forced
    previous = _forced
    set_backend(name)
    try:
        yield
    finally:
        _forced = previous


_cpp_ok: bool | None = None  # the loader's answer, cached: select() runs on every call


def cpp_available() -> bool:
    """Whether the C++ extension is loaded; builds or loads it on the first call."""
    global _cpp_ok
    if _cpp_ok is None:
        try:
            from . import cpp
        except ImportError:
            _cpp_ok = False
        else:
            _cpp_ok = cpp.available()
    return _cpp_ok


def transform_active() -> bool:
    """Whether a ``torch.func`` transform or a forward-AD dual level is active (eager mode).

    The C++ ops and the Python ``autograd.Function`` of the ``torch`` backend
    have no forward-mode or batching rules, so the phases then run as plain
    differentiable torch ops (the ``composite`` backend). A global check (two
    reads, no per-tensor inspection): a call inside a transform on tensors
    it does not touch takes the composite route too, which is correct, only
    slower. Under ``torch.compile`` the compiled path decides instead.
    """
    return (_maybe_level() is not None or _fwad._current_level >= 0) and not torch.compiler.is_compiling()


_maybe_level = _functorch.maybe_current_level  # (bound once: select() runs on every call)


def select(x: Tensor) -> str:
    """The backend for a tensor: ``composite`` under transforms, else the forced one, else ``cpp`` on CPU when available, else ``torch``."""
    if (_maybe_level() is not None or _fwad._current_level >= 0) and not torch.compiler.is_compiling():
        return "composite"  # transform_active(), inlined
    forced = _forced
    if forced == "reference" or forced == "torch":
        return forced
    if x.is_cpu:
        if _cpp_ok or cpp_available():
            return "cpp"
        if forced == "cpp":
            raise RuntimeError(
                "BNKIT_BACKEND=cpp but the C++ extension is not available; run `bnkit build` to see why"
            )
    return "torch"


def moments(x3: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``(mean, biased variance)`` of ``x3`` on the selected backend."""
    if aten_graph.capturing():  # standard ATen ops while a graph is captured (export, compile, ONNX)
        return aten_graph.moments(x3)
    backend = select(x3)
    if backend == "cpp":
        return torch.ops.bnkit.moments(x3)
    return raw(backend).moments(x3)


def affine(x3: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``x3 * scale[c] + shift[c]``, differentiable in all three, on the selected backend."""
    if aten_graph.capturing():
        return aten_graph.affine(x3, scale, shift)
    if x3.numel() and select(x3) == "cpp":
        return torch.ops.bnkit.batch_norm_eval(x3, scale, shift)
    return torch_ops.forward_eval(x3, scale, shift)


def backward_reduce(grad3: Tensor, x3: Tensor, mean: Tensor, var: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The backward's reduce phase: per-channel ``(sum dy, sum dy * xhat)`` for the given statistics."""
    if select(x3) == "cpp":
        # The fused backward's (dw, db) are exactly these sums (its dx, for this tensor's count, is not used).
        _, sum_dy_xhat, sum_dy = torch.ops.bnkit.batch_norm_backward(grad3, x3, mean, var, None, eps)
        return sum_dy, sum_dy_xhat
    return torch_ops.backward_reduce(grad3, x3, mean, var, eps)


def backward_apply(
    grad3: Tensor, x3: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, sum_dy: Tensor,
    sum_dy_xhat: Tensor, count: int, eps: float
) -> Tensor:
    """The backward's apply phase: ``dx3`` from sums over ``count`` values (e.g. all-reduced across ranks)."""
    if select(x3) == "cpp":
        return torch.ops.bnkit.batch_norm_backward_apply(grad3, x3, mean, var, weight, sum_dy, sum_dy_xhat, count, eps)
    return torch_ops.backward_apply(grad3, x3, mean, var, weight, sum_dy, sum_dy_xhat, count, eps)


def fold(
    mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """Inference BN as an affine map: ``(scale, shift)`` with ``y = x * scale + shift``.

    ``scale = weight / sqrt(var + eps)`` and ``shift = bias - mean * scale``
    (``weight`` = 1 and ``bias`` = 0 when absent). Differentiable in all inputs.
    """
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(shift.dtype)
    return scale, shift


def _is_batched(t: Tensor) -> bool:
    """Whether ``t`` is vmapped: by ``torch.func.vmap`` or by autograd's batched backward (the legacy vmap)."""
    return torch._C._functorch.is_batchedtensor(t) or torch._C._functorch.is_legacy_batchedtensor(t)


class _BatchNormTrain(torch.autograd.Function):
    """Training BN on the 3-D view with the analytic backward (torch/reference backends).

    Outputs ``(y3, mean, biased_var)``; the statistics are not differentiable
    (they feed the running averages only). The backward is computed by the
    raw kernels; when a graph of the backward is requested (double backward),
    it is computed by differentiable torch ops that recompute the statistics
    from the saved input, so the second derivative is exact.
    """

    @staticmethod
    def forward(ctx, x3: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, backend: str):
        y3, mean, var = raw(backend).forward_train(x3, weight, bias, eps)
        invstd = torch.rsqrt(var + eps)
        ctx.eps = eps
        ctx.backend = backend
        ctx.save_for_backward(x3, weight, bias, mean, invstd)
        ctx.mark_non_differentiable(mean, var)
        return y3, mean, var

    @staticmethod
    def backward(ctx, grad_y3: Tensor, _grad_mean: Tensor, _grad_var: Tensor):
        x3, weight, bias, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            dx, dw, db = torch_ops.backward(grad_y3, x3, weight, ctx.eps)
        elif ctx.backend == "reference" and _is_batched(grad_y3):
            # a batched backward (autograd.grad(is_grads_batched=True)): NumPy cannot take vmapped tensors, so
            # the same formulas as torch ops, in the oracle's float64
            wide = torch.float64
            dx, dw, db = torch_ops.backward(
                grad_y3.to(wide), x3.to(wide), None if weight is None else weight.to(wide), ctx.eps
            )
            dx = dx.to(x3.dtype)
        else:
            dx, dw, db = raw(ctx.backend).backward(grad_y3, x3, weight, ctx.eps, mean, invstd)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        return (
            dx if need_x else None,
            dw.to(weight.dtype) if need_w else None,
            db.to(bias.dtype) if need_b else None,
            None,
            None,
        )


def train_forward(x3: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """The training forward phase: ``(y3, mean, biased var)``, differentiable in ``x3``, weight and bias."""
    if aten_graph.capturing():
        return aten_graph.train_forward(x3, weight, bias, eps)
    backend = select(x3)
    if backend == "cpp":
        return torch.ops.bnkit.batch_norm_train(x3, weight, bias, eps)
    if backend == "composite":  # torch's own jvp/vmap rules apply to these ops
        return torch_ops.forward_train(x3, weight, bias, eps)
    return _BatchNormTrain.apply(x3, weight, bias, eps, backend)


def infer(x3: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """The inference phase: ``x3`` normalized with given statistics, differentiable in all inputs."""
    if aten_graph.capturing():
        return aten_graph.infer(x3, mean, var, weight, bias, eps)
    backend = select(x3)
    if backend == "cpp":
        # The fold into (scale, shift) happens inside the fused op (one call).
        return torch.ops.bnkit.batch_norm_infer(x3, mean, var, weight, bias, eps)
    if backend == "reference":
        # The oracle's precision: the map in float64 (differentiable torch ops), rounded once to x3's dtype.
        wide = torch.float64
        scale, shift = fold(mean.to(wide), var.to(wide), weight, bias, eps)
        return torch_ops.forward_eval(x3.to(wide), scale, shift).to(x3.dtype)
    # The affine map is differentiable as torch ops on every backend.
    scale, shift = fold(mean, var, weight, bias, eps)
    return torch_ops.forward_eval(x3, scale, shift)


# --------------------------------------------------------------------------- masked phases
# ``m2``: the bool ``(outer, inner)`` mask of the canonical view (True = valid),
# ``count``: its number of True entries (the per-channel count of every channel); while a graph is
# captured, a 0-d tensor (the portable ops then, in the graph: the extension is never loaded there).
def masked_moments(x3: Tensor, m2: Tensor, count: int | Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``(mean, biased variance)`` over the valid entries of ``x3``."""
    if aten_graph.capturing():
        return torch_ops.masked_moments(x3, m2, count)
    if select(x3) == "cpp" and _masked_cpp():
        return torch.ops.bnkit.masked_moments(x3, m2)
    return torch_ops.masked_moments(x3, m2, count)


def masked_train_forward(
    x3: Tensor, m2: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, count: int | Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The masked training forward phase: ``(y3, mean, biased var)`` of the valid entries.

    Padded entries are normalized with the same statistics and never reach
    anything else (statistics, valid outputs, gradients of valid inputs and of
    weight/bias); differentiable in ``x3``, weight and bias.
    """
    if aten_graph.capturing():
        return torch_ops.masked_forward_train(x3, m2, weight, bias, eps, count)
    if count > 0 and select(x3) == "cpp" and _masked_cpp():
        return _MaskedTrain.apply(x3, m2, weight, bias, eps, count)
    return torch_ops.masked_forward_train(x3, m2, weight, bias, eps, count)


def masked_backward_reduce(
    grad3: Tensor, x3: Tensor, m2: Tensor, mean: Tensor, var: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Per-channel ``(sum dy, sum dy * xhat)`` over the valid entries."""
    return torch_ops.masked_backward_reduce(grad3, x3, m2, mean, var, eps)


def masked_backward_apply(
    grad3: Tensor, x3: Tensor, m2: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, sum_dy: Tensor,
    sum_dy_xhat: Tensor, count: int, eps: float
) -> Tensor:
    """``dx3`` of the masked forward from sums over ``count`` valid values (e.g. all-reduced across ranks)."""
    return torch_ops.masked_backward_apply(grad3, x3, m2, mean, var, weight, sum_dy, sum_dy_xhat, count, eps)


_masked_ok: bool | None = None


def _masked_cpp() -> bool:
    """Whether the loaded extension has the masked kernels (``csrc/masked.cpp``)."""
    global _masked_ok
    if _masked_ok is None:
        _masked_ok = hasattr(torch.ops.bnkit, "masked_train")
    return _masked_ok


class _MaskedTrain(torch.autograd.Function):
    """Masked training BN by the C++ kernels; the double backward goes through the torch ops."""

    @staticmethod
    def forward(ctx, x3, m2, weight, bias, eps, count):
        y3, mean, var = torch.ops.bnkit.masked_train(x3, m2, weight, bias, eps)
        ctx.eps, ctx.count = eps, count
        ctx.save_for_backward(x3, m2, weight, bias, mean, var)
        ctx.mark_non_differentiable(mean, var)
        return y3, mean, var

    @staticmethod
    def backward(ctx, grad_y3, _gm, _gv):
        x3, m2, weight, bias, mean, var = ctx.saved_tensors
        need_x, _, need_w, need_b = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():  # a graph of the backward: differentiate the torch ops
            wrt = [t for t in (x3, weight, bias) if t is not None and t.requires_grad]
            with torch.enable_grad():
                y3, _, _ = torch_ops.masked_forward_train(x3, m2, weight, bias, ctx.eps, ctx.count)
                grads = iter(torch.autograd.grad(y3, wrt, grad_y3, create_graph=True, allow_unused=True))
            gx, gw, gb = ((next(grads) if t is not None and t.requires_grad else None) for t in (x3, weight, bias))
        else:
            gx, sum_dy_xhat, sum_dy = torch.ops.bnkit.masked_backward(grad_y3, x3, m2, mean, var, weight, ctx.eps)
            gw = None if weight is None else sum_dy_xhat.to(weight.dtype)
            gb = None if bias is None else sum_dy.to(bias.dtype)
        return (gx if need_x else None, None, gw if need_w else None, gb if need_b else None, None, None)


class _ReferenceKernels:
    """The NumPy oracle behind the raw-kernel contract (values only: not differentiable)."""

    @staticmethod
    def _np(t: Tensor) -> np.ndarray:
        return t.detach().to("cpu", torch.float64).numpy()

    @classmethod
    def moments(cls, x3: Tensor) -> tuple[Tensor, Tensor]:
        y, mean, var = _reference.forward_train(cls._np(x3), axis=1)
        acc = accumulation_dtype(x3.dtype)
        return (torch.from_numpy(mean).to(x3.device, acc), torch.from_numpy(var).to(x3.device, acc))

    @classmethod
    def forward_train(cls, x3: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        y, mean, var = _reference.forward_train(
            cls._np(x3),
            None if weight is None else cls._np(weight),
            None if bias is None else cls._np(bias),
            eps,
            axis=1,
        )
        acc = accumulation_dtype(x3.dtype)
        return (
            torch.from_numpy(y).to(x3.device, x3.dtype),
            torch.from_numpy(mean).to(x3.device, acc),
            torch.from_numpy(var).to(x3.device, acc),
        )

    @classmethod
    def forward_eval(cls, x3: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        y = cls._np(x3) * cls._np(scale).reshape(1, -1, 1) + cls._np(shift).reshape(1, -1, 1)
        return torch.from_numpy(y).to(x3.device, x3.dtype)

    @classmethod
    def backward(cls, grad3, x3, weight, eps, mean=None, invstd=None):
        dx, dw, db = _reference.backward(
            cls._np(grad3), cls._np(x3), None if weight is None else cls._np(weight), eps, axis=1
        )
        acc = accumulation_dtype(x3.dtype)
        return (
            torch.from_numpy(dx).to(x3.device, x3.dtype),
            torch.from_numpy(dw).to(x3.device, acc),
            torch.from_numpy(db).to(x3.device, acc),
        )


def raw(name: str) -> ModuleType | type:
    """The raw (non-autograd) kernels of the ``torch``, ``composite`` or ``reference`` backend."""
    if name in ("torch", "composite"):
        return torch_ops
    if name == "reference":
        return _ReferenceKernels
    raise ValueError(f"backend {name!r} has no raw kernels here (the cpp backend is used as torch.ops.bnkit)")
