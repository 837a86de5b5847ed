"""Per-domain BN (Domain-Specific BN, AdvProp's auxiliary BN, multi-dataset training): :class:`DomainBatchNorm`."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from .. import family
from .._layer_support import fill_legacy_count, fx_leaf_call
from ..engine import check_domain, domain_module_call, fold, per_channel
from ..family import specialize
from ..layers import BatchNorm, bn_arguments
from ._common import is_int

__all__ = ["DomainBatchNorm", "DomainBatchNorm1d", "DomainBatchNorm2d", "DomainBatchNorm3d"]

# fx records a call of the per-domain door as one node (as the one door's).
torch.fx.wrap("domain_module_call")


class DomainBatchNorm(BatchNorm):
    r"""BN with one set of statistics (and, by default, of affine parameters) per domain.

    Called as ``bn(x, domain=d)``: ``d`` is an int (the whole batch comes
    from domain ``d``) or an int64 tensor of shape ``(N,)`` (the domain of
    each sample along dim 0: mixed batches). Without ``domain`` the layer
    uses its :attr:`current_domain` (set by `bnkit.set_domain` or the
    `bnkit.domain` context manager, so that models whose ``forward`` does
    not pass ``domain`` work unchanged).

    Training: sample ``n`` of domain ``d`` is normalized with the statistics
    of domain ``d``'s samples in the batch,

        y_n = (x_n - mu_d) / sqrt(var_d + eps) * gamma_d + beta_d,

    with ``mu_d``, ``var_d`` the per-channel mean and biased variance over
    those samples (all computed in one pass over the batch by the C++ kernel
    on CPU). Each present domain's running statistics are updated from its
    own batch statistics, as a BN layer's (unbiased variance; ``momentum=None``
    averages cumulatively over that domain's ``num_batches_tracked[d]``);
    the running statistics and counts of absent domains are unchanged. A
    domain with a single value per channel in a training batch (one sample
    of ``(N, C)`` data) raises ``ValueError``, as torch's BN on that slice.
    Eval: each sample uses its domain's running statistics (or, with
    ``track_running_stats=False``, its domain's batch statistics). It
    equals separate BN layers applied to each domain's samples.

    Args:
        num_features: ``C``, the number of features along ``axis``.
        num_domains: ``D``, the number of domains (``>= 1``).
        eps: added to the variance before the square root (``> 0``).
        momentum: the weight of the batch statistics in the running averages
            (``None``: the cumulative average, per domain).
        affine: learn ``weight`` and ``bias``.
        track_running_stats: keep running statistics per domain and use them in eval.
        device: where the parameters and buffers are created.
        dtype: the dtype of the parameters and buffers.
        shared_affine: one ``weight``/``bias`` of shape ``[C]`` for all
            domains instead of ``[D, C]`` (statistics stay per domain).
        bias: with ``affine``, also learn ``bias``.
        axis: the feature axis (``-1`` for channels-last data); not 0, the batch axis.
        nonfinite: ``"skip"``, ``"raise"`` or ``"propagate"``, as in `bnkit.BatchNorm`,
            per domain (``"raise"``: no domain is updated).

    Shape:
        - Input: ``(N, ...)`` with ``C`` features along ``axis``;
          `DomainBatchNorm1d`, `DomainBatchNorm2d` and `DomainBatchNorm3d` fix
          torch's ranks. ``domain``: an int or an int64 ``(N,)`` tensor.
        - Output: the shape and memory format of the input.
        - Buffers: ``running_mean``, ``running_var`` ``[D, C]``,
          ``num_batches_tracked`` ``[D]``; parameters ``[D, C]`` (``[C]`` with
          ``shared_affine``).

    Example:
        >>> import torch, bnkit
        >>> bn = bnkit.DomainBatchNorm2d(3, num_domains=2)
        >>> x = torch.randn(8, 3, 4, 4)
        >>> y = bn(x, domain=torch.tensor([0, 1] * 4))     # a mixed batch
        >>> bn.num_batches_tracked.tolist()
        [1, 1]
        >>> y = bn(x, domain=1)                            # a batch of domain 1
        >>> bn.num_batches_tracked.tolist()
        [1, 2]
    """

    def __init__(
        self, num_features: int, num_domains: int, eps: float = 1e-5, momentum: float | None = 0.1,
        affine: bool = True, track_running_stats: bool = True, device: Any = None, dtype: torch.dtype | None = None,
        *, shared_affine: bool = False, bias: bool = True, axis: int = 1, nonfinite: str = "skip"
    ) -> None:
        name = type(self).__name__
        if not is_int(num_domains) or num_domains <= 0:
            raise ValueError(f"{name}: num_domains must be a positive int, got {num_domains!r}")
        if not isinstance(shared_affine, bool):
            raise TypeError(f"{name}: shared_affine must be a bool, got {shared_affine!r}")
        if is_int(axis) and axis == 0:
            raise ValueError(f"{name}: the feature axis cannot be 0, the batch axis whose samples have domains")
        self.num_domains = num_domains
        self.shared_affine = shared_affine
        super().__init__(**bn_arguments(locals()))
        self.__dict__["current_domain"] = None
        factory = {"device": device, "dtype": dtype}
        shape = (num_features,) if shared_affine else (num_domains, num_features)
        if affine:
            self.weight = nn.Parameter(torch.ones(shape, **factory))
            if bias:
                self.bias = nn.Parameter(torch.zeros(shape, **factory))
        if track_running_stats:
            self.running_mean = torch.zeros(num_domains, num_features, **factory)
            self.running_var = torch.ones(num_domains, num_features, **factory)
            self.num_batches_tracked = torch.zeros(num_domains, dtype=torch.long, device=device)

    #: The domain of calls without ``domain=`` (an int, an int64 ``(N,)`` tensor, or ``None``).
    current_domain: Any

    def describe(self) -> str:
        return f"{type(self).__name__}({self.num_features}, num_domains={self.num_domains})"

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", num_domains={self.num_domains}"
        return s + (", shared_affine=True" if self.shared_affine else "")

    def set_domain(self, domain: Any) -> None:
        """Set :attr:`current_domain` (checked: an int in range, an integer tensor, or ``None``)."""
        if domain is not None:
            if isinstance(domain, Tensor) and domain.dim() == 1:
                check_domain(self.call_spec(), torch.empty(domain.shape[0], 0), domain.cpu(), self.num_domains)
            else:
                domain = check_domain(self.call_spec(), torch.empty(0), domain, self.num_domains)
        self.__dict__["current_domain"] = domain  # not through __setattr__: the call spec stays

    def _domain(self, domain: Any) -> Any:
        if domain is None:
            domain = self.__dict__.get("current_domain")
        if domain is None:
            if self.num_domains == 1:
                return 0
            raise TypeError(
                f"{self.describe()}: call it as bn(x, domain=d) (an int or an int64 tensor of shape (N,)), or set "
                "the domain of a model's layers with bnkit.set_domain(model, d) / `with bnkit.domain(model, d):`"
            )
        return domain

    def _check_site(self, domain: Any) -> int:
        """The int domain of one call (``None``: the current domain), for tools that collect statistics per site.

        ``bnkit.recalibrate`` duck-types per-site layers by this method (as
        `SharedBatchNorm`'s ``site``), so it re-estimates the rows of the
        domains it sees; a per-sample domain tensor cannot be split there.
        """
        d = self._domain(domain)
        if isinstance(d, Tensor) and d.dim() == 1:
            raise TypeError(
                f"{self.describe()}: statistics per domain are collected for one int domain per call (use "
                "`with bnkit.domain(model, d):` for each domain's data), not a per-sample domain tensor"
            )
        return int(check_domain(self.call_spec(), torch.empty(0), d, self.num_domains))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # A checkpoint of another number of domains (or of a plain BN layer) is one clear error, and this
        # layer is left as it was.
        for key, ours in (("running_mean", self.running_mean), ("weight", self.weight)):
            theirs = state_dict.get(prefix + key)
            if isinstance(theirs, Tensor) and isinstance(ours, Tensor) and theirs.shape != ours.shape:
                error_msgs.append(
                    f"{self.describe()} at {prefix[:-1] or '<root>'!r}: the checkpoint's {key} has shape "
                    f"{tuple(theirs.shape)}, this layer's {tuple(ours.shape)} (num_domains={self.num_domains}, "
                    f"shared_affine={self.shared_affine}); build the layer with the checkpoint's number of domains, "
                    "or load a plain BN checkpoint into a plain model and call bnkit.convert_domain_bn"
                )
                return
        if self.track_running_stats:  # the per-domain counts are kept, as torch keeps its layer's count
            fill_legacy_count(state_dict, prefix, local_metadata, self.num_batches_tracked)
        nn.Module._load_from_state_dict(
            self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def domain_parameters(self, domain: int) -> tuple[Tensor | None, Tensor | None]:
        """``(weight, bias)`` of ``domain`` as ``[C]`` tensors (views: gradients reach the layer's parameters)."""
        d = check_domain(self.call_spec(), torch.empty(0), domain, self.num_domains)
        return tuple(None if p is None else (p if p.dim() == 1 else p[d]) for p in (self.weight, self.bias))

    def inference_affine(self, domain: int | None = None) -> tuple[Tensor, Tensor]:
        """The eval-mode map of ``domain`` as per-channel ``(scale, shift)``.

        ``domain`` defaults to :attr:`current_domain` (an int), or 0 with one
        domain. Raises ``RuntimeError`` without running statistics or without
        a domain (each domain has its own inference form).
        """
        if not self.track_running_stats:
            raise RuntimeError(f"{self.describe()} has no running statistics, so no fixed inference form")
        if domain is None:
            domain = self.__dict__.get("current_domain")
            if domain is None and self.num_domains == 1:
                domain = 0
            if not (is_int(domain) or (isinstance(domain, Tensor) and domain.dim() == 0)):
                raise RuntimeError(
                    f"{self.describe()} has one inference form per domain: call inference_affine(domain=d), or use "
                    "bnkit.select_domain(model, d) to get a plain BN model of domain d (which bnkit.fuse folds)"
                )
        d = check_domain(self.call_spec(), torch.empty(0), domain, self.num_domains)
        weight, bias = self.domain_parameters(d)
        c = self.num_features
        return fold(self.running_mean[d], self.running_var[d], per_channel(weight, c), per_channel(bias, c), self.eps)

    def forward(self, input: Tensor, domain: Any = None) -> Tensor:
        """``bn(x, domain=d)``: ``d`` an int or an int64 ``(N,)`` tensor (default: :attr:`current_domain`)."""
        if type(input) is not Tensor and (traced := fx_leaf_call(self, input, domain)) is not None:
            return traced
        running_mean, running_var, nbt, batch_stats = self.call_buffers()
        return domain_module_call(
            self.call_spec(), input, self._domain(domain), self.num_domains, self.weight, self.bias, running_mean,
            running_var, nbt, batch_stats,
        )


def _docs(suffix: str, dims: str, example: str) -> str:
    return (
        f"`DomainBatchNorm` for {family.SHAPES[suffix]}: ``axis=1`` and these ranks only.\n\n"
        "It takes `DomainBatchNorm`'s arguments.\n\n"
        f"Shape:\n    - Input: {dims}; ``domain`` an int or an int64 ``(N,)`` tensor.\n"
        "    - Output: the shape and memory format of the input.\n\n"
        f"Example:\n    >>> import torch, bnkit\n    >>> bn = bnkit.DomainBatchNorm{suffix}(3, num_domains=2)\n"
        f"    >>> bn(torch.randn({example}), domain=torch.tensor([0, 1, 0, 1])).shape\n"
        f"    torch.Size([{example}])\n"
    )


DomainBatchNorm1d, DomainBatchNorm2d, DomainBatchNorm3d = specialize(
    DomainBatchNorm,
    {
        "1d": _docs("1d", "``(N, C)`` or ``(N, C, L)``", "4, 3, 5"),
        "2d": _docs("2d", "``(N, C, H, W)``, any memory format", "4, 3, 5, 5"),
        "3d": _docs("3d", "``(N, C, D, H, W)``, any memory format", "4, 3, 2, 5, 5"),
    },
)

# The tools that replace or fold a BN layer by its one inference form (freeze, fuse, convert) would
# lose the per-domain statistics: they leave this family as it is, saying why.
family._KNOWN[f"{__name__}.DomainBatchNorm"] = family.BNForm(
    "unknown",
    reason=f"{__name__}.DomainBatchNorm keeps statistics per domain, so it has one inference form per domain; "
    "use bnkit.select_domain(model, d) for the plain BN model of domain d",
)
