"""The engine's accelerator path: on a GPU, the normalization itself runs in ATen's batch norm (cuDNN / MIOpen).

On CUDA (and ROCm, which PyTorch also calls ``cuda``) no portable kernel beats the vendor's fused BN,
so a layer's call there is handed to ``torch.nn.functional.batch_norm`` whenever the feature axis is
dim 1 and ATen accepts the dtypes; another axis, a ``torch.func`` transform or a dtype mix ATen refuses
stays on the portable path. bnkit's own semantics are kept by keeping the running statistics out of
ATen's hands: ATen writes the batch mean and unbiased variance into scratch ``[C]`` buffers (momentum
1 makes its update ``0 * scratch + batch``, exact), and :func:`bnkit.engine.running_update` then
applies bnkit's rule to the real buffers, as on every other path: the non-finite policy (``"skip"``
without a host synchronisation), the cumulative average, the running-update hooks (gradient
accumulation, checkpointing) and the ``num_batches_tracked`` count.

:data:`ATEN_DEVICES` names the device types routed this way; tests route ``"cpu"`` too
(:func:`aten_devices`) to check the path against torch on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from . import engine, kernels

__all__ = ["ATEN_DEVICES", "aten_devices", "applies", "call"]

ATEN_DEVICES: frozenset[str] = frozenset({"cuda"})
_HALF = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def aten_devices(*types: str) -> Iterator[None]:
    """Route calls on these device types through ATen while the block runs (for tests and benchmarks)."""
    global ATEN_DEVICES
    before = ATEN_DEVICES
    ATEN_DEVICES = frozenset(types)
    try:
        yield
    finally:
        ATEN_DEVICES = before


def _dtypes_ok(input: Tensor, *tensors: Tensor | None) -> bool:
    """ATen's rule: every parameter and buffer has the input's dtype, or all are float32 for a half input."""
    given = [t.dtype for t in tensors if t is not None]
    return all(d == input.dtype for d in given) or (input.dtype in _HALF and all(d == torch.float32 for d in given))


def applies(
    spec: engine.CallSpec, input: Tensor, weight: Tensor | None, bias: Tensor | None,
    running_mean: Tensor | None, running_var: Tensor | None, axis: int
) -> bool:
    """Whether ATen's batch norm can compute this (already checked) call."""
    return (
        input.device.type in ATEN_DEVICES
        and axis == 1
        and input.dim() >= 2
        and not kernels.transform_active()
        and _dtypes_ok(input, weight, bias, running_mean, running_var)
    )


def call(
    spec: engine.CallSpec, input: Tensor, weight: Tensor | None, bias: Tensor | None,
    running_mean: Tensor | None, running_var: Tensor | None, num_batches_tracked: Tensor | None,
    batch_stats: bool, count: int
) -> Tensor:
    """A checked call (``weight``/``bias`` already ``[C]``) through ``F.batch_norm``."""
    # a shared scalar affine arrives expanded to [C] with stride 0; ATen's kernels want a dense vector
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    if not batch_stats or running_mean is None:
        return F.batch_norm(input, running_mean, running_var, weight, bias, batch_stats, 0.0, spec.eps)
    batch_mean, batch_var = torch.zeros_like(running_mean), torch.zeros_like(running_var)
    y = F.batch_norm(input, batch_mean, batch_var, weight, bias, True, 1.0, spec.eps)
    # ATen stores the unbiased variance; running_update takes the biased one (count > 1: checked)
    engine.running_update(spec, running_mean, running_var, num_batches_tracked, batch_mean,
                          batch_var * ((count - 1) / count), count)
    return y
