"""Shared BN: one layer used at several sites of a network (Recurrent BN, Cooijmans et al. 2016)."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from .._layer_support import document_bn_arguments, fill_legacy_count, fx_leaf_call
from ..engine import batch_norm_module_call, fold, masked_module_call, per_channel
from ..layers import BatchNorm, bn_arguments
from ._common import is_int

__all__ = ["SharedBatchNorm", "check_site"]

# fx records calls of the engine's entry from this module too (as one node each).
torch.fx.wrap("batch_norm_module_call")


def check_site(layer: nn.Module, site: Any) -> int:
    """The site index of a call of a shared layer (``layer.sites``, ``layer.share_stats``), checked."""
    if site is None:
        if layer.sites == 1 or layer.share_stats:
            return 0
        raise TypeError(
            f"{layer.describe()}: call it as bn(x, site=i) with 0 <= i < {layer.sites} "
            "(each site has its own running statistics)"
        )
    if isinstance(site, Tensor) and site.numel() == 1 and not site.dtype.is_floating_point and site.dtype != torch.bool:
        site = int(site)  # (a bool tensor stays a TypeError, as a bool does)
    if not is_int(site):
        raise TypeError(f"{layer.describe()}: site must be an int, got {type(site).__name__}")
    if not 0 <= site < layer.sites:
        raise IndexError(f"{layer.describe()}: site {site} is out of range [0, {layer.sites})")
    return site


@document_bn_arguments
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

    Args:
        {BatchNorm: num_features}
        sites: the number of places the layer is used at (``>= 1``).
        {BatchNorm: eps, momentum, affine, track_running_stats, device, dtype}
        share_stats: one set of running statistics for all sites instead of
            one per site.
        {BatchNorm: bias, axis, share_affine, nonfinite}

    Shape:
        - Input: any rank with ``C`` features along ``axis``, as `bnkit.BatchNorm`;
          ``site`` an int in ``[0, sites)``.
        - Output: the shape of the input.

    Example:
        >>> import torch, bnkit
        >>> bn = bnkit.SharedBatchNorm(8, sites=3)
        >>> ys = [bn(torch.randn(16, 8), site=t) for t in range(3)]
        >>> bn.running_mean.shape, bn.num_batches_tracked.tolist()
        (torch.Size([3, 8]), [1, 1, 1])
        >>> bn.eval()(torch.randn(4, 8), site=2).shape
        torch.Size([4, 8])
    """

    def __init__(
        self, num_features: int, sites: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
        track_running_stats: bool = True, device: Any = None, dtype: torch.dtype | None = None, *,
        share_stats: bool = False, bias: bool = True, axis: int = 1, share_affine: str = "none",
        nonfinite: str = "skip"
    ) -> None:
        if not is_int(sites) or sites <= 0:
            raise ValueError(f"SharedBatchNorm: sites must be a positive int, got {sites!r}")
        if not isinstance(share_stats, bool):
            raise TypeError(f"SharedBatchNorm: share_stats must be a bool, got {share_stats!r}")
        self.sites = sites
        self.share_stats = share_stats
        super().__init__(**bn_arguments(locals()))
        if track_running_stats and not share_stats:
            factory = {"device": device, "dtype": dtype}
            self.running_mean = torch.zeros(sites, num_features, **factory)
            self.running_var = torch.ones(sites, num_features, **factory)
            self.num_batches_tracked = torch.zeros(sites, dtype=torch.long, device=device)

    @property
    def per_site_stats(self) -> bool:
        return self.track_running_stats and not self.share_stats

    def describe(self) -> str:
        return f"{type(self).__name__}({self.num_features}, sites={self.sites})"

    def extra_repr(self) -> str:
        return super().extra_repr() + f", sites={self.sites}, share_stats={self.share_stats}"

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        if self.track_running_stats:  # the current per-site counts are kept, as torch keeps its layer's count
            fill_legacy_count(state_dict, prefix, local_metadata, self.num_batches_tracked)
        nn.Module._load_from_state_dict(
            self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def check_site(self, site: Any) -> int:
        """``site`` as a valid int index (``None`` allowed where there is one set of statistics)."""
        return check_site(self, site)

    def _check_site(self, site: Any) -> int:  # the former name of check_site
        return check_site(self, site)

    def _site_buffers(self, site: int) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The running buffers of ``site`` (``None`` where the layer has none; ``call_buffers`` applies
        torch's rules to them, ``track_running_stats`` included)."""
        buffers = (self.running_mean, self.running_var, self.num_batches_tracked)
        if self.share_stats:
            return buffers
        return tuple(None if t is None else t[site] for t in buffers)

    def inference_affine(self, site: int | None = None) -> tuple[Tensor, Tensor]:
        """The eval-mode map at ``site`` as per-channel ``(scale, shift)``.

        Raises ``RuntimeError`` without running statistics, or when the sites
        have separate statistics and no ``site`` is given.
        """
        if self.running_mean is None or self.running_var is None:
            raise RuntimeError(f"{self.describe()} has no running statistics, so no fixed inference form")
        if site is None and self.per_site_stats and self.sites > 1:
            raise RuntimeError(
                f"{self.describe()} keeps running statistics per site, so it has one inference form per "
                "site: call inference_affine(site=i)"
            )
        mean, var, _ = self._site_buffers(self.check_site(site))
        c = self.num_features
        return fold(mean, var, per_channel(self.weight, c), per_channel(self.bias, c), self.eps)

    def forward(self, input: Tensor, site: int | None = None, mask: Tensor | None = None) -> Tensor:
        """``bn(x, site=i)``; ``mask`` (bool, ``x``'s shape without the feature axis) as :meth:`BatchNorm.masked_forward`."""
        if type(input) is not Tensor and (traced := fx_leaf_call(self, input, site, mask)) is not None:
            return traced
        running_mean, running_var, nbt, batch_stats = self.call_buffers(*self._site_buffers(self.check_site(site)))
        if mask is not None:
            return masked_module_call(
                self.call_spec(), input, mask, self.weight, self.bias, running_mean, running_var, nbt, batch_stats
            )
        return batch_norm_module_call(
            self.call_spec(), input, self.weight, self.bias, running_mean, running_var, nbt, batch_stats
        )
