"""Frozen BN: a BN layer reduced to its inference map, with buffers only."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from .._layer_support import fill_legacy_count, fx_leaf_call, registered_tensors
from ..engine import CallSpec, batch_norm_module_call, call_spec, check_input, check_mask, fold, per_channel
from ..family import specialize
from ._common import is_int
from .shared import check_site

__all__ = ["FrozenBatchNorm", "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "FrozenSharedBatchNorm"]

# fx records calls of the engine's entry from this module too (as one node each).
torch.fx.wrap("batch_norm_module_call")

_STATS = ("running_mean", "running_var")
_AFFINE = ("weight", "bias")


class FrozenBatchNorm(nn.Module):
    r"""BN reduced to its inference map, with buffers only: ``y = (x - mean) / sqrt(var + eps) * weight + bias``.

    ``weight``, ``bias``, ``running_mean``, ``running_var`` (and
    ``num_batches_tracked``, kept so that state_dicts of the layer it replaced
    load unchanged) are buffers: no gradient reaches them, no call changes
    them, and training mode is ignored. The input still gets its gradient.
    ``weight``/``bias`` may be one-element (a layer with ``share_affine``) or
    ``None`` (``affine=False``). This is the usual recipe for fine-tuning with
    small batches (detection backbones); `bnkit.freeze` converts a whole
    model and `bnkit.unfreeze` converts it back.

    Args:
        num_features: ``C``, the number of features along ``axis``.
        eps: added to the variance before the square root (``>= 0``: the
            statistics are stored, so 0 is allowed).
        device: where the buffers are created.
        dtype: the dtype of the buffers.
        axis: the feature axis.
        affine: keep ``weight`` and ``bias`` buffers (initially 1 and 0).
        bias: with ``affine``, keep the ``bias`` buffer too.

    Shape:
        - Input: any rank with ``C`` features along ``axis``;
          `FrozenBatchNorm1d`, `FrozenBatchNorm2d` and `FrozenBatchNorm3d` fix
          torch's ranks.
        - Output: the shape of the input.

    Example:
        >>> import torch, bnkit
        >>> bn = bnkit.FrozenBatchNorm2d(3)
        >>> bn.running_var.fill_(4.0)
        tensor([4., 4., 4.])
        >>> x = torch.randn(2, 3, 5, 5)
        >>> torch.allclose(bn(x), x / (4.0 + bn.eps) ** 0.5)   # training mode is ignored
        True
        >>> list(bn.parameters())
        []
    """

    #: Input ranks accepted (``None``: any rank that has the feature axis); set by the 1d/2d/3d classes.
    expected_dims: tuple[int, ...] | None = None

    @property
    def _expected_dims(self) -> tuple[int, ...] | None:  # the former name of expected_dims
        return self.expected_dims

    def __init__(
        self, num_features: int, eps: float = 1e-5, device: Any = None, dtype: torch.dtype | None = None, *,
        axis: int = 1, affine: bool = True, bias: bool = True
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if not is_int(num_features) or num_features <= 0:
            raise ValueError(f"{name}: num_features must be a positive int, got {num_features!r}")
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
            raise ValueError(f"{name}: eps must be a non-negative number, got {eps!r}")
        if not is_int(axis):
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

    def describe(self) -> str:
        """The layer's name in messages."""
        return f"{type(self).__name__}({self.num_features})"

    def _describe(self) -> str:  # the former name of describe
        return self.describe()

    _call_spec: CallSpec | None = None  # built by call_spec(), dropped by __setattr__

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        self.__dict__["_call_spec"] = None

    def call_spec(self) -> CallSpec:
        """The engine's description of this layer's calls (inference only: no momentum, no policy)."""
        spec = self._call_spec
        if spec is None:
            spec = call_spec(self.describe(), self.axis, self.num_features, self.expected_dims, self.eps, None)
            if not torch.compiler.is_compiling():
                self.__dict__["_call_spec"] = spec
        return spec

    def extra_repr(self) -> str:
        s = f"{self.num_features}, eps={self.eps}"
        if self.axis != 1 or self.expected_dims is None:
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
        if self.num_batches_tracked is not None:
            fill_legacy_count(state_dict, prefix, local_metadata, self.num_batches_tracked.detach().clone(),
                              versioned=False)
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

    def check_input(self, input: Tensor) -> None:
        """The layer's input checks (rank, feature axis and count)."""
        check_input(self.call_spec(), input)

    def _stats(self, site: int | None) -> tuple[Tensor, Tensor]:
        return registered_tensors(self, _STATS)

    def inference_affine(self) -> tuple[Tensor, Tensor]:
        """Per-channel ``(scale, shift)`` with ``y = x * scale + shift`` along ``axis``."""
        return self._affine(None)

    def _affine(self, site: int | None) -> tuple[Tensor, Tensor]:
        mean, var = self._stats(site)
        c = self.num_features
        return fold(mean, var, per_channel(self.weight, c), per_channel(self.bias, c), self.eps)

    def _forward(
        self, input: Tensor, site: int | None, activation: tuple[str, float, float] | None = None
    ) -> Tensor:
        mean, var = self._stats(site)
        weight, bias = registered_tensors(self, _AFFINE)
        return batch_norm_module_call(
            self._call_spec or self.call_spec(), input, weight, bias, mean, var, None, False, activation
        )

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        if type(input) is not Tensor and (traced := fx_leaf_call(self, input, mask)) is not None:
            return traced
        if mask is not None:  # frozen statistics: a mask is checked, then ignored (as in eval)
            check_mask(self.call_spec(), input, mask)
        return self._forward(input, None)

    def activated_forward(self, input: Tensor, activation: tuple[str, float, float]) -> Tensor:
        """The frozen map, then an activation (:func:`bnkit.engine.apply_activation`), as one layer call.

        :class:`bnkit.variants.FrozenBatchNormAct` calls it for the activations the kernels fuse.
        """
        return self._forward(input, None, activation)


FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d = specialize(FrozenBatchNorm)


class FrozenSharedBatchNorm(FrozenBatchNorm):
    """The frozen form of `SharedBatchNorm`: called as ``bn(x, site=i)``.

    With per-site statistics (``share_stats=False``) ``running_mean`` and
    ``running_var`` have shape ``[sites, C]`` and site ``i`` uses row ``i``.
    """

    def __init__(
        self, num_features: int, sites: int, eps: float = 1e-5, device: Any = None, dtype: torch.dtype | None = None,
        *, share_stats: bool = False, axis: int = 1, affine: bool = True, bias: bool = True
    ) -> None:
        if not is_int(sites) or sites <= 0:
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

    def describe(self) -> str:
        return f"{type(self).__name__}({self.num_features}, sites={self.sites})"

    def extra_repr(self) -> str:
        return super().extra_repr() + f", sites={self.sites}, share_stats={self.share_stats}"

    def check_site(self, site: Any) -> int:
        """``site`` as a valid int index (``None`` allowed where there is one set of statistics)."""
        return check_site(self, site)

    _check_site = check_site  # the former name

    def _stats(self, site: int | None) -> tuple[Tensor, Tensor]:
        if self.share_stats:
            return self.running_mean, self.running_var
        return self.running_mean[site], self.running_var[site]

    def inference_affine(self, site: int | None = None) -> tuple[Tensor, Tensor]:
        """Per-channel ``(scale, shift)`` at ``site`` (required with per-site statistics and several sites)."""
        if site is None and not self.share_stats and self.sites > 1:
            raise RuntimeError(
                f"{self.describe()} keeps running statistics per site, so it has one inference form per "
                "site: call inference_affine(site=i)"
            )
        return self._affine(self.check_site(site))

    def forward(self, input: Tensor, site: int | None = None, mask: Tensor | None = None) -> Tensor:
        if type(input) is not Tensor and (traced := fx_leaf_call(self, input, site, mask)) is not None:
            return traced
        if mask is not None:
            check_mask(self.call_spec(), input, mask)
        return self._forward(input, self.check_site(site))
