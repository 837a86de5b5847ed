"""Batch Renormalization (Ioffe 2017)."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch
from torch import Tensor

from .. import conventions, kernels
from .._layer_support import fx_leaf_call
from ..engine import (
    batch_norm_module_call,
    canonical_mask,
    canonical_view,
    check_mask,
    in_recompute,
    masked_module_call,
    may_be_recomputed,
    per_channel,
    valid_count,
)
from ..errors import InputDtypeError
from ..family import specialize
from ..layers import (
    BatchNorm,
    bn_arguments,
    check_per_channel_tensors,
    masked_one_valid,
    masked_tiny_batch,
    tiny_batch_forward,
)
from ._common import is_int, no_training_trace

__all__ = ["BatchRenorm", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d"]


_SCHEDULES = ("linear", "fixed")

# How many corrections of forwards that may be recomputed a layer remembers (see _correction).
_RECOMPUTE_MEMORY = 64


class BatchRenorm(BatchNorm):
    r"""Batch Renormalization (Ioffe 2017).

    Training, per feature, with batch statistics ``mu_B``,
    ``sigma_B = sqrt(var_B + eps)`` (biased ``var_B``) and the moving ones
    ``mu``, ``sigma = sqrt(running_var + eps)``:

        r = clip(sigma_B / sigma, 1/r_max, r_max)      (no gradient)
        d = clip((mu_B - mu) / sigma, -d_max, d_max)   (no gradient)
        y = gamma * (((x - mu_B) / sigma_B) * r + d) + beta

    then the moving averages are updated as in `bnkit.BatchNorm` (PyTorch's
    rule: ``running_var`` averages the *unbiased* batch variance). The paper
    and Keras' ``renorm=True`` average ``sigma`` itself (``convention="keras"``,
    with a ``running_std`` buffer). That is more than Bessel's factor: an
    average of sigmas is not the square root of an average of variances
    whenever the batch statistics drift (Jensen's gap), as early in training,
    so ``r``, ``d`` and the moving statistics differ between the conventions.
    Eval is plain BN with the moving averages, so the layer folds like
    BatchNorm (``inference_affine``).

    Because ``r`` and ``d`` are constants, training is the core's BN with the
    per-channel affine ``(gamma * r, gamma * d + beta)``.

    Schedule (``schedule="linear"``, the paper's): ``r_max`` stays 1 and
    ``d_max`` 0 (plain BN) for the first ``warmup_steps`` training steps, then
    grow linearly to their final values, reached at step ``r_max_steps`` and
    ``d_max_steps``. The step is ``num_batches_tracked`` (training batches
    seen, so the schedule survives a state_dict round-trip). With
    ``schedule="fixed"`` the final values are used from the first step.
    ``momentum`` defaults to 0.01 (Keras' ``renorm_momentum=0.99``): ``r``
    and ``d`` are only useful with moving averages that keep up.

    Args:
        num_features: ``C``, the number of features along ``axis``.
        eps: added to the variance before the square root (``> 0``).
        momentum: the weight of the batch statistics in the moving averages
            (default 0.01; ``None``: the cumulative average).
        affine: learn a per-feature ``weight`` and ``bias``.
        track_running_stats: must be ``True`` (without moving statistics the
            layer would be plain BatchNorm).
        device: where the parameters and buffers are created.
        dtype: the dtype of the parameters and buffers.
        r_max: the final bound of ``r`` (``>= 1``).
        d_max: the final bound of ``d`` (``>= 0``).
        warmup_steps: training steps of plain BN before the bounds grow.
        r_max_steps: the step at which ``r_max`` is reached (``>= warmup_steps``).
        d_max_steps: the step at which ``d_max`` is reached (``>= warmup_steps``).
        schedule: ``"linear"`` (the paper's warm-up) or ``"fixed"`` (the final
            bounds from the first step, as Keras).
        bias: with ``affine``, also learn ``bias``.
        axis: the feature axis (``-1`` for channels-last data).
        share_affine: ``"none"``, ``"weight"`` or ``"all"``, as in `bnkit.BatchNorm`.
        nonfinite: ``"skip"``, ``"raise"`` or ``"propagate"``, as in `bnkit.BatchNorm`.
        convention: ``"torch"`` (default) or ``"keras"`` (average ``sigma``
            itself, in a ``running_std`` buffer; see `bnkit.conventions`).
        tiny_batch: ``"raise"`` or ``"running"``, as in `bnkit.BatchNorm`.

    Shape:
        - Input: any rank with ``C`` features along ``axis``, as `bnkit.BatchNorm`;
          `BatchRenorm1d`, `BatchRenorm2d` and `BatchRenorm3d` fix torch's ranks.
        - Output: the shape and memory format of the input.

    Example:
        >>> import torch, bnkit
        >>> bn = bnkit.BatchRenorm2d(8, schedule="fixed", r_max=3.0, d_max=5.0)
        >>> bn(torch.randn(4, 8, 5, 5)).shape
        torch.Size([4, 8, 5, 5])
        >>> bn.limits()
        (3.0, 5.0)
        >>> warm = bnkit.BatchRenorm1d(8, warmup_steps=10, r_max_steps=20, d_max_steps=20)
        >>> warm.limits()                                 # plain BN while warming up
        (1.0, 0.0)
    """

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.01, affine: bool = True,
        track_running_stats: bool = True, device: Any = None, dtype: torch.dtype | None = None, *, r_max: float = 3.0,
        d_max: float = 5.0, warmup_steps: int = 5000, r_max_steps: int = 40000, d_max_steps: int = 25000,
        schedule: str = "linear", bias: bool = True, axis: int = 1, share_affine: str = "none",
        nonfinite: str = "skip", convention: str = "torch", tiny_batch: str = "raise"
    ) -> None:
        name = type(self).__name__
        if not isinstance(r_max, (int, float)) or isinstance(r_max, bool) or not 1.0 <= r_max < math.inf:
            raise ValueError(f"{name}: r_max must be a finite number >= 1, got {r_max!r}")
        if not isinstance(d_max, (int, float)) or isinstance(d_max, bool) or not 0.0 <= d_max < math.inf:
            raise ValueError(f"{name}: d_max must be a finite number >= 0, got {d_max!r}")
        for arg, v in (("warmup_steps", warmup_steps), ("r_max_steps", r_max_steps), ("d_max_steps", d_max_steps)):
            if not is_int(v) or v < 0:
                raise ValueError(f"{name}: {arg} must be a non-negative int, got {v!r}")
        if schedule not in _SCHEDULES:
            raise ValueError(f"{name}: schedule must be one of {_SCHEDULES}, got {schedule!r}")
        if schedule == "linear":
            for arg, v in (("r_max_steps", r_max_steps), ("d_max_steps", d_max_steps)):
                if v < warmup_steps:
                    raise ValueError(f"{name}: {arg} ({v}) must be >= warmup_steps ({warmup_steps})")
        if not track_running_stats:
            raise ValueError(
                f"{name}: Batch Renormalization needs running statistics (track_running_stats=True); "
                "without them it is plain BatchNorm"
            )
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.warmup_steps = warmup_steps
        self.r_max_steps = r_max_steps
        self.d_max_steps = d_max_steps
        self.schedule = schedule
        super().__init__(**bn_arguments(locals()))
        if convention == "keras":
            # Keras' renorm=True averages the standard deviation; it starts at 1 (as Keras' moving_stddev).
            self.register_buffer("running_std", torch.ones(num_features, device=device, dtype=dtype))

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if getattr(self, "running_std", None) is not None:
            self.running_std.fill_(1)

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}, schedule={self.schedule!r}"
        if self.schedule == "linear":
            s += f", warmup_steps={self.warmup_steps}, r_max_steps={self.r_max_steps}, d_max_steps={self.d_max_steps}"
        return s

    def _ramp(self, step: Tensor, end: int) -> Tensor | float:
        """Fraction of the way from (1, 0) to the final (r_max, d_max) at ``step`` (a float64 tensor)."""
        if self.schedule == "fixed":
            return 1.0
        start = self.warmup_steps
        if end <= start:
            return (step >= start).to(step.dtype)
        return ((step - start) / (end - start)).clamp(0.0, 1.0)

    def _limit_tensors(self) -> tuple[Tensor | float, Tensor | float]:
        step = self.num_batches_tracked.to(torch.float64)
        r_max = 1.0 + (self.r_max - 1.0) * self._ramp(step, self.r_max_steps)
        d_max = self.d_max * self._ramp(step, self.d_max_steps)
        return r_max, d_max

    def limits(self) -> tuple[float, float]:
        """``(r_max, d_max)`` the next training step will use."""
        r_max, d_max = self._limit_tensors()
        return float(r_max), float(d_max)

    @torch.no_grad()
    def _correction(
        self, x3: Tensor, remember: bool = False, m2: Tensor | None = None, count: int | Tensor = 0
    ) -> tuple[Tensor, Tensor]:
        """The per-channel ``(r, d)`` of the batch ``x3`` (constants: computed without a graph).

        With a canonical mask ``m2``, of its ``count`` valid entries. Under
        activation checkpointing the recompute must use the ``(r, d)`` of the
        original forward, whose running statistics (and schedule step) the
        original forward's update has since moved: a checkpointed forward
        remembers its correction under its batch moments, and the recompute
        (same input, bitwise the same moments) takes it back.
        """
        mean_b, var_b = kernels.moments(x3) if m2 is None else kernels.masked_moments(x3, m2, count)
        recalled = self._recall_correction(mean_b, var_b)
        if recalled is not None:
            return recalled
        # detached as well as computed under no_grad: torch.jit.trace does not record no_grad, and a traced
        # r and d would carry gradients
        r, d = (t.detach() for t in self._correction_of(mean_b, var_b, x3))
        if torch.compiler.is_compiling():
            # AOT autograd's min-cut partitioner may recompute r and d in the backward from the running
            # statistics, which the forward's running update has overwritten by then: silently wrong
            # gradients (torch 2.13; a partitioner fix is proposed in pytorch/pytorch#197039). stack/cat is
            # outside its recompute allowlist, so r and d stacked into one tensor are saved as computed.
            r, d = torch.stack((r, d)).unbind(0)
        if remember:
            self._remember_correction(mean_b, var_b, r, d)
        return r, d

    def _remember_correction(self, mean_b: Tensor, var_b: Tensor, r: Tensor, d: Tensor) -> None:
        """Keeps the ``(r, d)`` of a forward that checkpointing may run again, under its batch moments."""
        if not in_recompute():
            memory = self.__dict__.setdefault("_recompute_memory", deque(maxlen=_RECOMPUTE_MEMORY))
            if any(entry[4] for entry in memory):
                # A new forward: the entries a backward has recomputed are spent (a retained graph's second
                # backward comes before the next step's forwards), so memory holds the pending ones only.
                kept = [entry for entry in memory if not entry[4]]
                memory.clear()
                memory.extend(kept)
            memory.append((mean_b, var_b, r, d, set()))  # the last: the backward passes it has served

    def _recall_correction(self, mean_b: Tensor, var_b: Tensor) -> tuple[Tensor, Tensor] | None:
        """In a recompute, the remembered ``(r, d)`` of the forward with these batch moments, or ``None``.

        Of the forwards with these moments, the newest that this backward pass
        (autograd's graph task) has not recomputed yet: a backward recomputes
        the checkpointed forwards in reverse order, so of two calls on the same
        batch the later one comes first, and a second backward through a
        retained graph recomputes them all again.
        """
        if not in_recompute():
            return None
        task = torch._C._current_graph_task_id()
        memory = self.__dict__.get("_recompute_memory") or ()
        for entry in reversed(memory):
            if task not in entry[4] and torch.equal(entry[0], mean_b) and torch.equal(entry[1], var_b):
                entry[4].add(task)
                return entry[2], entry[3]
        return None

    def _correction_of(self, mean_b: Tensor, var_b: Tensor, x3: Tensor) -> tuple[Tensor, Tensor]:
        acc = mean_b.dtype
        mu = self.running_mean.to(acc)
        sigma = torch.sqrt(self.running_var.to(acc) + self.eps)
        sigma_b = torch.sqrt(var_b + self.eps)
        r_max, d_max = self._limit_tensors()
        r_max_t = torch.as_tensor(r_max, dtype=acc, device=x3.device)
        d_max_t = torch.as_tensor(d_max, dtype=acc, device=x3.device)
        r = torch.clamp(sigma_b / sigma, min=1.0 / r_max_t, max=r_max_t)
        d = torch.clamp((mean_b - mu) / sigma, min=-d_max_t, max=d_max_t)
        return r, d

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        if type(input) is not Tensor and (traced := fx_leaf_call(self, input, mask)) is not None:
            return traced
        if not self.training:
            return super().forward(input, mask)
        if mask is not None:
            return self._masked_train_forward(input, mask)
        if self.tiny_batch != "raise":
            y = tiny_batch_forward(self, input)
            if y is not None:
                return y
        if self.convention == "keras":
            return conventions.keras_renorm_train_forward(self, input)
        no_training_trace(self, input)
        self.check_input(input)
        if not input.dtype.is_floating_point:  # before the moments, with the other layers' error
            raise InputDtypeError(f"{self._describe()}: expected a floating-point input, got {input.dtype}")
        check_per_channel_tensors(self)  # the correction uses them before the engine checks them
        x3, _ = canonical_view(input, self.axis % input.dim())
        c = self.num_features
        r, d = self._correction(x3, not torch.compiler.is_compiling() and may_be_recomputed())
        weight = per_channel(self.weight, c)
        bias = per_channel(self.bias, c)
        # gamma * (xhat * r + d) + beta == xhat * (gamma * r) + (gamma * d + beta)
        w_eff = r if weight is None else weight * r
        b_eff = d if weight is None else weight * d
        if bias is not None:
            b_eff = b_eff + bias
        return batch_norm_module_call(
            self.call_spec(), input, w_eff, b_eff, self.running_mean, self.running_var, self.num_batches_tracked, True
        )

    def _masked_train_forward(self, input: Tensor, mask: Tensor) -> Tensor:
        """Training with a validity mask: ``r``, ``d`` and the batch statistics from the valid entries."""
        y = masked_tiny_batch(self, input, mask)
        if y is not None:
            return y
        if self.convention == "keras":
            raise NotImplementedError(
                f"{self._describe()}: mask= is not supported with convention='keras' yet (use convention='torch')"
            )
        no_training_trace(self, input)
        spec = self.call_spec()
        self.check_input(input)
        check_mask(spec, input, mask)
        if not input.dtype.is_floating_point:
            raise InputDtypeError(f"{self._describe()}: expected a floating-point input, got {input.dtype}")
        check_per_channel_tensors(self)
        x3, _ = canonical_view(input, self.axis % input.dim())
        m2 = canonical_mask(mask, x3)
        count = valid_count(m2)  # (a 0-d tensor while a graph is captured: no host synchronisation)
        c = self.num_features
        weight = per_channel(self.weight, c)
        bias = per_channel(self.bias, c)
        if isinstance(count, Tensor) or count > 1:
            remember = not isinstance(count, Tensor) and not torch.compiler.is_compiling() and may_be_recomputed()
            r, d = self._correction(x3, remember, m2, count)
            if isinstance(count, Tensor):  # a graph cannot branch on the count: r = 1, d = 0 where eager skips
                several = count > 1
                r, d = torch.where(several, r, 1.0), torch.where(several, d, 0.0)
            w_eff = r if weight is None else weight * r
            b_eff = d if weight is None else weight * d
            if bias is not None:
                b_eff = b_eff + bias
        else:  # no statistics (the engine raises for one valid entry; none: an empty batch)
            w_eff, b_eff = weight, bias
        return masked_module_call(
            spec, input, mask, w_eff, b_eff, self.running_mean, self.running_var, self.num_batches_tracked, True,
            masked_one_valid(self),
        )


BatchRenorm1d, BatchRenorm2d, BatchRenorm3d = specialize(BatchRenorm)
