"""BN variants built on bnkit's core: shared BN, Batch Renormalization, Ghost BN, frozen BN.

Every variant reuses the same pieces as :class:`bnkit.BatchNorm`: batch
statistics and exact merging from :mod:`bnkit.stats`, normalization and its
autograd from :func:`bnkit.functional.batch_norm_core`, the running-average
rule (PyTorch's: unbiased batch variance, ``momentum=None`` = cumulative
average) and the non-finite policy of the core. All of them accept the
feature ``axis``, ``share_affine`` and every rank/memory format the core does.

:class:`SharedBatchNorm`
    One BN applied at several sites of a network (time steps of an RNN,
    repeated blocks): gamma/beta shared by all sites, running statistics per
    site (``[sites, C]``) or pooled (``share_stats=True``). Recurrent BN,
    Cooijmans et al. 2016.
:class:`BatchRenorm`
    ``y = gamma * (((x - mu_B) / sigma_B) * r + d) + beta`` with
    ``r = clip(sigma_B / sigma, 1/r_max, r_max)`` and
    ``d = clip((mu_B - mu) / sigma, -d_max, d_max)`` held constant in the
    backward pass (Ioffe 2017).
:class:`GhostBatchNorm`
    Normalizes contiguous virtual batches of ``virtual_batch_size`` samples
    with their own statistics; the running statistics are updated once per
    call from the exactly merged statistics of the whole batch (Hoffer et al.
    2017).
:class:`FrozenBatchNorm`
    The inference affine map with buffers only (no parameters, no statistics
    updates); see :func:`bnkit.freeze` / :func:`bnkit.unfreeze`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from . import conventions, kernels, stats
from .functional import _update_running, batch_norm_core, canonical_view, fold
from .layers import BatchNorm, batch_norm_module_call, check_feature_input, check_per_channel_tensors

__all__ = [
    "SharedBatchNorm",
    "BatchRenorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "GhostBatchNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "FrozenSharedBatchNorm",
    "ghost_batch_norm",
]


# fx records calls of the layers' entry point from this module too (as one node each).
torch.fx.wrap("batch_norm_module_call")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _per_channel(t: Tensor | None, channels: int) -> Tensor | None:
    if t is None:
        return None
    t = t.reshape(-1)
    return t.expand(channels) if t.numel() == 1 and channels != 1 else t


def _no_training_trace(layer: nn.Module, input: Any) -> None:
    if isinstance(input, torch.fx.Proxy):
        raise RuntimeError(
            f"{layer._describe()}: torch.fx.symbolic_trace records this layer as one node in eval mode only; "
            "call .eval() before tracing (or trace it as a leaf module)"
        )


# =========================================================================== SharedBatchNorm
class SharedBatchNorm(BatchNorm):
    r"""One BN used at ``sites`` places of a network, called as ``bn(x, site=i)``.

    gamma/beta (``weight``/``bias``, shaped by ``share_affine``) are shared by
    all sites. With ``share_stats=False`` (default) each site keeps its own
    running statistics: ``running_mean``/``running_var`` of shape
    ``[sites, C]`` and ``num_batches_tracked`` of shape ``[sites]``, so that
    in eval site ``i`` is normalized with the statistics seen at site ``i``
    (the per-time-step statistics of Recurrent Batch Normalization, Cooijmans
    et al. 2016; past the last site, reuse the last one:
    ``site=min(t, sites - 1)``). With ``share_stats=True`` a single set of
    shape ``[C]`` pools the statistics of every call, whatever its site.

    Training always normalizes with the statistics of the batch at hand.
    ``site`` may be omitted when ``sites == 1`` or ``share_stats=True``.
    """

    def __init__(
        self,
        num_features: int,
        sites: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        share_stats: bool = False,
        bias: bool = True,
        axis: int = 1,
        share_affine: str = "none",
        nonfinite: str = "skip",
    ) -> None:
        if not _is_int(sites) or sites <= 0:
            raise ValueError(f"SharedBatchNorm: sites must be a positive int, got {sites!r}")
        if not isinstance(share_stats, bool):
            raise TypeError(f"SharedBatchNorm: share_stats must be a bool, got {share_stats!r}")
        self.sites = sites
        self.share_stats = share_stats
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            axis=axis,
            share_affine=share_affine,
            nonfinite=nonfinite,
        )
        if track_running_stats and not share_stats:
            factory = {"device": device, "dtype": dtype}
            self.running_mean = torch.zeros(sites, num_features, **factory)
            self.running_var = torch.ones(sites, num_features, **factory)
            self.num_batches_tracked = torch.zeros(sites, dtype=torch.long, device=device)

    @property
    def per_site_stats(self) -> bool:
        return self.track_running_stats and not self.share_stats

    def _describe(self) -> str:
        return f"{type(self).__name__}({self.num_features}, sites={self.sites})"

    def extra_repr(self) -> str:
        return super().extra_repr() + f", sites={self.sites}, share_stats={self.share_stats}"

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        key = prefix + "num_batches_tracked"
        version = local_metadata.get("version", None)
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            # Keep the current per-site counts, as torch keeps its layer's count.
            nbt = self.num_batches_tracked
            state_dict[key] = nbt if nbt.device.type != "meta" else torch.zeros_like(nbt, device="cpu")
        nn.Module._load_from_state_dict(
            self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _check_site(self, site: Any) -> int:
        if site is None:
            if self.sites == 1 or self.share_stats:
                return 0
            raise TypeError(
                f"{self._describe()}: call it as bn(x, site=i) with 0 <= i < {self.sites} "
                "(each site has its own running statistics)"
            )
        if isinstance(site, Tensor) and site.numel() == 1 and not site.dtype.is_floating_point:
            site = int(site)
        if not _is_int(site):
            raise TypeError(f"{self._describe()}: site must be an int, got {type(site).__name__}")
        if not 0 <= site < self.sites:
            raise IndexError(f"{self._describe()}: site {site} is out of range [0, {self.sites})")
        return site

    def _site_buffers(self, site: int) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        if not self.track_running_stats:
            return None, None, None
        if self.share_stats:
            return self.running_mean, self.running_var, self.num_batches_tracked
        return self.running_mean[site], self.running_var[site], self.num_batches_tracked[site]

    def inference_affine(self, site: int | None = None) -> tuple[Tensor, Tensor]:
        """The eval-mode map at ``site`` as per-channel ``(scale, shift)``.

        Raises ``RuntimeError`` without running statistics, or when the sites
        have separate statistics and no ``site`` is given.
        """
        if not self.track_running_stats:
            raise RuntimeError(f"{self._describe()} has no running statistics, so no fixed inference form")
        if site is None and self.per_site_stats and self.sites > 1:
            raise RuntimeError(
                f"{self._describe()} keeps running statistics per site, so it has one inference form per "
                "site: call inference_affine(site=i)"
            )
        mean, var, _ = self._site_buffers(self._check_site(site))
        c = self.num_features
        return fold(mean, var, _per_channel(self.weight, c), _per_channel(self.bias, c), self.eps)

    def forward(self, input: Tensor, site: int | None = None) -> Tensor:
        site = self._check_site(site)
        if not isinstance(input, torch.fx.Proxy):
            self._check_input(input)
        running_mean, running_var, nbt = self._site_buffers(site)
        track = self.training and self.track_running_stats
        batch_stats = self.training or running_mean is None
        # One wrapped call, so that torch.fx.symbolic_trace records it as a single node.
        return batch_norm_module_call(
            input,
            self.weight,
            self.bias,
            running_mean if (track or not self.training) else None,
            running_var if (track or not self.training) else None,
            nbt if track else None,
            batch_stats,
            self.momentum,
            self.eps,
            self.axis,
            self.nonfinite,
            self._describe(),
        )


# =========================================================================== BatchRenorm
_SCHEDULES = ("linear", "fixed")


class BatchRenorm(BatchNorm):
    r"""Batch Renormalization (Ioffe 2017).

    Training, per feature, with batch statistics ``mu_B``,
    ``sigma_B = sqrt(var_B + eps)`` (biased ``var_B``) and the moving ones
    ``mu``, ``sigma = sqrt(running_var + eps)``::

        r = clip(sigma_B / sigma, 1/r_max, r_max)      (no gradient)
        d = clip((mu_B - mu) / sigma, -d_max, d_max)   (no gradient)
        y = gamma * (((x - mu_B) / sigma_B) * r + d) + beta

    then the moving averages are updated as in :class:`bnkit.BatchNorm`
    (PyTorch's rule: ``running_var`` averages the *unbiased* batch variance).
    The paper and Keras' ``renorm=True`` average ``sigma`` itself instead,
    which is not the same up to Bessel's factor: the average of sigmas and
    the square root of the average of variances part ways whenever the batch
    statistics drift; ``convention="keras"`` follows them (a ``running_std``
    buffer starting at 1, see :mod:`bnkit.conventions`). Eval is plain BN
    with the moving averages, so the layer folds like BatchNorm
    (``inference_affine``).

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
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.01,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        r_max_steps: int = 40000,
        d_max_steps: int = 25000,
        schedule: str = "linear",
        bias: bool = True,
        axis: int = 1,
        share_affine: str = "none",
        nonfinite: str = "skip",
        convention: str = "torch",
        tiny_batch: str = "raise",
    ) -> None:
        name = type(self).__name__
        if not isinstance(r_max, (int, float)) or isinstance(r_max, bool) or not 1.0 <= r_max < math.inf:
            raise ValueError(f"{name}: r_max must be a finite number >= 1, got {r_max!r}")
        if not isinstance(d_max, (int, float)) or isinstance(d_max, bool) or not 0.0 <= d_max < math.inf:
            raise ValueError(f"{name}: d_max must be a finite number >= 0, got {d_max!r}")
        for arg, v in (("warmup_steps", warmup_steps), ("r_max_steps", r_max_steps), ("d_max_steps", d_max_steps)):
            if not _is_int(v) or v < 0:
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
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            axis=axis,
            share_affine=share_affine,
            nonfinite=nonfinite,
            convention=convention,
            tiny_batch=tiny_batch,
        )
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
    def _correction(self, x3: Tensor) -> tuple[Tensor, Tensor]:
        """The per-channel ``(r, d)`` of the batch ``x3`` (constants: computed without a graph)."""
        mean_b, var_b = kernels.moments(x3)
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

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return super().forward(input)
        if self.tiny_batch != "raise":
            y = self._tiny_batch_forward(input)
            if y is not None:
                return y
        if self.convention == "keras":
            return conventions.keras_renorm_train_forward(self, input)
        _no_training_trace(self, input)
        self._check_input(input)
        if not input.dtype.is_floating_point:  # before the moments, with the other layers' error
            raise TypeError(f"{self._describe()}: expected a floating-point input, got {input.dtype}")
        check_per_channel_tensors(self)  # the correction uses them before the engine checks them
        axis = self.axis % input.dim()
        x3, _ = canonical_view(input, axis)
        c = self.num_features
        r, d = self._correction(x3)
        weight = _per_channel(self.weight, c)
        bias = _per_channel(self.bias, c)
        # gamma * (xhat * r + d) + beta == xhat * (gamma * r) + (gamma * d + beta)
        w_eff = r if weight is None else weight * r
        b_eff = d if weight is None else weight * d
        if bias is not None:
            b_eff = b_eff + bias
        return batch_norm_core(
            input,
            self.running_mean,
            self.running_var,
            w_eff,
            b_eff,
            True,
            self.momentum,
            self.eps,
            axis=self.axis,
            num_batches_tracked=self.num_batches_tracked,
            nonfinite=self.nonfinite,
            where=self._describe(),
        )


class BatchRenorm1d(BatchRenorm):
    """:class:`BatchRenorm` for ``(N, C)`` or ``(N, C, L)`` inputs."""

    _expected_dims = (2, 3)


class BatchRenorm2d(BatchRenorm):
    """:class:`BatchRenorm` for ``(N, C, H, W)`` inputs, any memory format."""

    _expected_dims = (4,)


class BatchRenorm3d(BatchRenorm):
    """:class:`BatchRenorm` for ``(N, C, D, H, W)`` inputs, any memory format."""

    _expected_dims = (5,)


# =========================================================================== Ghost BN
def ghost_batch_norm(
    input: Tensor,
    virtual_batch_size: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    axis: int = 1,
    where: str = "ghost_batch_norm",
) -> tuple[Tensor, stats.Moments]:
    """Normalize contiguous chunks of ``virtual_batch_size`` samples (dim 0) with their own statistics.

    Returns the output and the exactly merged :class:`~bnkit.stats.Moments`
    of the whole batch (per feature, no graph), for the running averages.
    A final chunk smaller than ``virtual_batch_size`` is normalized on its
    own. The full chunks go through one call of the core, their chunk index
    being folded into the feature axis.
    """
    if not _is_int(virtual_batch_size) or virtual_batch_size <= 0:
        raise ValueError(f"{where}: virtual_batch_size must be a positive int, got {virtual_batch_size!r}")
    ndim = input.dim()
    if ndim < 2 or not -ndim <= axis < ndim or axis % ndim == 0:
        raise ValueError(
            f"{where}: Ghost BN splits the batch along dim 0, so it needs a feature axis other than 0 "
            f"(got axis={axis} for a {ndim}-D input)"
        )
    axis = axis % ndim
    n = input.shape[0]
    c = input.shape[axis]
    x3, restore = canonical_view(input, axis)
    if n == 0 or x3.numel() == 0:
        y = batch_norm_core(input, None, None, weight, bias, True, None, eps, axis=axis, where=where)
        zeros = torch.zeros(c, dtype=stats.accumulation_dtype(input.dtype), device=input.device)
        return y, stats.Moments(0, zeros, zeros.clone())
    rows_per_sample = x3.shape[0] // n  # the batch dim is the outermost of the canonical view
    inner = x3.shape[2]
    v = min(virtual_batch_size, n)
    k = n // v
    rem = n - k * v
    rows = v * rows_per_sample
    if rem and rem * rows_per_sample * inner == 1:
        raise ValueError(
            f"{where}: the last virtual batch has a single value per channel ({n} samples split into "
            f"chunks of {virtual_batch_size}); choose a virtual_batch_size that leaves a larger remainder"
        )
    weight_c = _per_channel(weight, c)
    bias_c = _per_channel(bias, c)

    main = x3[: k * rows]
    if k == 1:
        y_main = batch_norm_core(main, None, None, weight_c, bias_c, True, None, eps, axis=1, where=where)
    else:
        # (k*rows, C, I) -> (rows, k*C, I): feature (j, c) = channel c of chunk j.
        xk = main.reshape(k, rows, c, inner).transpose(0, 1).reshape(rows, k * c, inner)
        yk = batch_norm_core(
            xk,
            None,
            None,
            None if weight_c is None else weight_c.repeat(k),
            None if bias_c is None else bias_c.repeat(k),
            True,
            None,
            eps,
            axis=1,
            where=where,
        )
        y_main = yk.reshape(rows, k, c, inner).transpose(0, 1).reshape(k * rows, c, inner)
    parts = [y_main]
    if rem:
        parts.append(
            batch_norm_core(x3[k * rows :], None, None, weight_c, bias_c, True, None, eps, axis=1, where=where)
        )
    y3 = torch.cat(parts, dim=0) if rem else y_main.contiguous()

    with torch.no_grad():
        chunk = stats.Moments.of(main.reshape(k, rows, c, inner), (1, 3))  # means/m2s: [k, C]
        counts = [rows * inner] * k
        means, m2s = chunk.mean, chunk.m2
        if rem:
            last = stats.Moments.of(x3[k * rows :], (0, 2))
            counts.append(rem * rows_per_sample * inner)
            means = torch.cat([means, last.mean.unsqueeze(0)])
            m2s = torch.cat([m2s, last.m2.unsqueeze(0)])
        merged = stats.merge_stacked(torch.tensor(counts, device=means.device), means, m2s)
        merged = stats.Moments(n * rows_per_sample * inner, merged.mean, merged.m2)
    return restore(y3), merged


class GhostBatchNorm(BatchNorm):
    r"""Ghost Batch Normalization (Hoffer, Hubara & Soudry 2017).

    Training splits the batch (dim 0) into contiguous virtual batches of
    ``virtual_batch_size`` samples (the last may be smaller) and normalizes
    each with its own mean and biased variance::

        y[j] = (x[j] - mu_j) / sqrt(var_j + eps) * gamma + beta   (chunk j)

    The running statistics are updated once per call, from the statistics of
    the whole batch obtained by exactly merging the chunks' moments (Chan's
    formula, :func:`bnkit.stats.merge_stacked`; unbiased variance of the whole
    batch, as BatchNorm). Eval uses the running statistics (or, with
    ``track_running_stats=False``, ghost batches again). With
    ``virtual_batch_size >= N`` it is exactly BatchNorm. ``virtual_batch_size``
    defaults to 32.
    """

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int = 32,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        axis: int = 1,
        share_affine: str = "none",
        nonfinite: str = "skip",
    ) -> None:
        if not _is_int(virtual_batch_size) or virtual_batch_size <= 0:
            raise ValueError(
                f"{type(self).__name__}: virtual_batch_size must be a positive int, got {virtual_batch_size!r}"
            )
        if _is_int(axis) and axis == 0:
            raise ValueError(f"{type(self).__name__}: the feature axis cannot be 0, the batch axis ghost batches split")
        self.virtual_batch_size = virtual_batch_size
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            bias=bias,
            axis=axis,
            share_affine=share_affine,
            nonfinite=nonfinite,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"

    def forward(self, input: Tensor) -> Tensor:
        if not self.training and self.running_mean is not None:
            return super().forward(input)
        _no_training_trace(self, input)
        self._check_input(input)
        if input.dim() < 2 or self.axis % input.dim() == 0:
            raise ValueError(
                f"{self._describe()}: the feature axis {self.axis} is the batch axis of a {input.dim()}-D input"
            )
        y, merged = ghost_batch_norm(
            input, self.virtual_batch_size, self.weight, self.bias, self.eps, axis=self.axis, where=self._describe()
        )
        if self.training and self.track_running_stats:
            _update_running(
                self.running_mean,
                self.running_var,
                self.num_batches_tracked,
                merged.mean,
                merged.variance(0),
                int(merged.count),
                self.momentum,
                self.nonfinite,
                self._describe(),
            )
        return y


class GhostBatchNorm1d(GhostBatchNorm):
    """:class:`GhostBatchNorm` for ``(N, C)`` or ``(N, C, L)`` inputs."""

    _expected_dims = (2, 3)


class GhostBatchNorm2d(GhostBatchNorm):
    """:class:`GhostBatchNorm` for ``(N, C, H, W)`` inputs, any memory format."""

    _expected_dims = (4,)


class GhostBatchNorm3d(GhostBatchNorm):
    """:class:`GhostBatchNorm` for ``(N, C, D, H, W)`` inputs, any memory format."""

    _expected_dims = (5,)


# =========================================================================== Frozen BN
class FrozenBatchNorm(nn.Module):
    r"""BN reduced to its inference map, with buffers only: ``y = (x - mean) / sqrt(var + eps) * weight + bias``.

    ``weight``, ``bias``, ``running_mean``, ``running_var`` (and
    ``num_batches_tracked``, kept so that state_dicts of the layer it replaced
    load unchanged) are buffers: no gradient reaches them, no call changes
    them, and training mode is ignored. The input still gets its gradient.
    ``weight``/``bias`` may be one-element (a layer with ``share_affine``) or
    ``None`` (``affine=False``). This is the usual recipe for fine-tuning with
    small batches (detection backbones); :func:`bnkit.freeze` converts a whole
    model and :func:`bnkit.unfreeze` converts it back.
    """

    _expected_dims: tuple[int, ...] | None = None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        axis: int = 1,
        affine: bool = True,
        bias: bool = True,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if not _is_int(num_features) or num_features <= 0:
            raise ValueError(f"{name}: num_features must be a positive int, got {num_features!r}")
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
            raise ValueError(f"{name}: eps must be a non-negative number, got {eps!r}")
        if not _is_int(axis):
            raise TypeError(f"{name}: axis must be an int, got {axis!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.axis = axis
        self.register_buffer("weight", torch.ones(num_features, **factory) if affine else None)
        self.register_buffer("bias", torch.zeros(num_features, **factory) if affine and bias else None)
        self._register_stats(factory)
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def _register_stats(self, factory: dict) -> None:
        self.register_buffer("running_mean", torch.zeros(self.num_features, **factory))
        self.register_buffer("running_var", torch.ones(self.num_features, **factory))

    def _describe(self) -> str:
        return f"{type(self).__name__}({self.num_features})"

    def extra_repr(self) -> str:
        s = f"{self.num_features}, eps={self.eps}"
        if self.axis != 1 or self._expected_dims is None:
            s += f", axis={self.axis}"
        if self.weight is None:
            s += ", affine=False"
        elif self.weight.numel() == 1 and self.num_features != 1:
            s += ", shared weight" + (" and bias" if self.bias is not None and self.bias.numel() == 1 else "")
        return s

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # Checkpoints of layers without num_batches_tracked (old torch, torchvision's frozen BN) load too.
        key = prefix + "num_batches_tracked"
        if key not in state_dict and self.num_batches_tracked is not None:
            state_dict[key] = self.num_batches_tracked.detach().clone()
        # A shared (one-element) or per-channel weight/bias loads into either shape.
        for name in ("weight", "bias"):
            t = self._buffers.get(name)
            v = state_dict.get(prefix + name)
            if isinstance(t, Tensor) and isinstance(v, Tensor) and v.dim() == 1 and v.numel() in (1, self.num_features):
                if v.shape != t.shape:
                    self._buffers[name] = torch.empty(v.shape, dtype=t.dtype, device=t.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _check_input(self, input: Tensor) -> None:
        check_feature_input(self._describe(), input, self._expected_dims, self.axis, self.num_features)

    def _stats(self, site: int | None) -> tuple[Tensor, Tensor]:
        return self.running_mean, self.running_var

    def inference_affine(self) -> tuple[Tensor, Tensor]:
        """Per-channel ``(scale, shift)`` with ``y = x * scale + shift`` along ``axis``."""
        return self._affine(None)

    def _affine(self, site: int | None) -> tuple[Tensor, Tensor]:
        mean, var = self._stats(site)
        c = self.num_features
        return fold(mean, var, _per_channel(self.weight, c), _per_channel(self.bias, c), self.eps)

    def _forward(self, input: Tensor, site: int | None) -> Tensor:
        if not isinstance(input, torch.fx.Proxy):
            self._check_input(input)
        mean, var = self._stats(site)
        return batch_norm_module_call(
            input, self.weight, self.bias, mean, var, None, False, None, self.eps, self.axis, "propagate",
            self._describe(),
        )

    def forward(self, input: Tensor) -> Tensor:
        return self._forward(input, None)


class FrozenBatchNorm1d(FrozenBatchNorm):
    """:class:`FrozenBatchNorm` for ``(N, C)`` or ``(N, C, L)`` inputs."""

    _expected_dims = (2, 3)


class FrozenBatchNorm2d(FrozenBatchNorm):
    """:class:`FrozenBatchNorm` for ``(N, C, H, W)`` inputs, any memory format."""

    _expected_dims = (4,)


class FrozenBatchNorm3d(FrozenBatchNorm):
    """:class:`FrozenBatchNorm` for ``(N, C, D, H, W)`` inputs, any memory format."""

    _expected_dims = (5,)


class FrozenSharedBatchNorm(FrozenBatchNorm):
    """The frozen form of :class:`SharedBatchNorm`: called as ``bn(x, site=i)``.

    With per-site statistics (``share_stats=False``) ``running_mean`` and
    ``running_var`` have shape ``[sites, C]`` and site ``i`` uses row ``i``.
    """

    def __init__(
        self,
        num_features: int,
        sites: int,
        eps: float = 1e-5,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        share_stats: bool = False,
        axis: int = 1,
        affine: bool = True,
        bias: bool = True,
    ) -> None:
        if not _is_int(sites) or sites <= 0:
            raise ValueError(f"FrozenSharedBatchNorm: sites must be a positive int, got {sites!r}")
        self.sites = sites
        self.share_stats = bool(share_stats)
        super().__init__(num_features, eps, device, dtype, axis=axis, affine=affine, bias=bias)
        if not self.share_stats:
            self.num_batches_tracked = torch.zeros(sites, dtype=torch.long, device=device)

    def _register_stats(self, factory: dict) -> None:
        shape = (self.num_features,) if self.share_stats else (self.sites, self.num_features)
        self.register_buffer("running_mean", torch.zeros(shape, **factory))
        self.register_buffer("running_var", torch.ones(shape, **factory))

    def _describe(self) -> str:
        return f"{type(self).__name__}({self.num_features}, sites={self.sites})"

    def extra_repr(self) -> str:
        return super().extra_repr() + f", sites={self.sites}, share_stats={self.share_stats}"

    _check_site = SharedBatchNorm._check_site

    def _stats(self, site: int | None) -> tuple[Tensor, Tensor]:
        if self.share_stats:
            return self.running_mean, self.running_var
        return self.running_mean[site], self.running_var[site]

    def inference_affine(self, site: int | None = None) -> tuple[Tensor, Tensor]:
        """Per-channel ``(scale, shift)`` at ``site`` (required with per-site statistics and several sites)."""
        if site is None and not self.share_stats and self.sites > 1:
            raise RuntimeError(
                f"{self._describe()} keeps running statistics per site, so it has one inference form per "
                "site: call inference_affine(site=i)"
            )
        return self._affine(self._check_site(site))

    def forward(self, input: Tensor, site: int | None = None) -> Tensor:
        return self._forward(input, self._check_site(site))
