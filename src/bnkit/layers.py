"""Batch Normalization modules: one generic layer and torch-compatible drop-ins.

:class:`BatchNorm` normalizes over every axis except its feature ``axis``
(Keras-style, negative allowed), so one implementation serves every rank and
layout. :class:`BatchNorm1d`, :class:`BatchNorm2d` and :class:`BatchNorm3d`
are thin specializations with ``torch.nn.BatchNormNd``'s arguments,
parameters, buffers, state_dict keys and input checks; they also derive from
torch's classes, so that code finding BN layers by class finds them (this
module's classes come first in their MRO and define every method torch's do).
The math lives in :mod:`bnkit.functional` / :mod:`bnkit.reference`; the protocol the variants share (constructor
arguments, checks, the tiny-batch policy) in :mod:`bnkit._layer_support`.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter, is_lazy

from . import conventions
from ._layer_support import (
    SHARE_AFFINE_MODES,
    TINY_BATCH_POLICIES,
    bn_arguments,
    check_feature_input,
    check_per_channel_tensors,
    fill_legacy_count,
    fx_leaf_call,
    masked_one_valid,
    masked_tiny_batch,
    registered_tensors,
    tiny_batch_forward,
)
from .engine import (
    NONFINITE_POLICIES,
    CallSpec,
    apply_activation,
    batch_norm_module_call,
    call_spec,
    check_input,
    fold,
    masked_module_call,
)
from .family import specialize

__all__ = ["SHARE_AFFINE_MODES", "TINY_BATCH_POLICIES", "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
           "LazyBatchNorm", "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d",
           "bn_arguments", "check_feature_input", "check_per_channel_tensors", "masked_one_valid", "masked_tiny_batch", "tiny_batch_forward"]

# fx records calls of the engine's entry instead of tracing into it (one node per layer call).
torch.fx.wrap("batch_norm_module_call")

_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
_TENSORS = ("weight", "bias", *_BUFFERS)


class BatchNorm(nn.Module):
    r"""Batch Normalization over every axis except the feature ``axis``.

    Training: ``y = (x - mean_B) / sqrt(var_B + eps) * weight + bias`` with the
    batch mean and biased variance of each feature; the running averages are
    updated with the unbiased variance,
    ``running = (1 - momentum) * running + momentum * batch`` (``momentum=None``:
    the cumulative average over ``num_batches_tracked`` batches). Eval: the
    running statistics replace the batch's (or the batch's are used when
    ``track_running_stats=False``).

    The arguments up to ``dtype`` are torch's (``torch.nn.BatchNorm2d``), with
    the same meaning and defaults; the keyword-only ones are bnkit's, and their
    defaults behave like torch.

    Args:
        num_features: ``C``, the number of features (channels) along ``axis``.
        eps: added to the variance before the square root; must be ``> 0``.
        momentum: the weight of the batch statistics in the running averages,
            in ``[0, 1]``; ``None`` gives the cumulative average.
        affine: learn a per-feature ``weight`` (gamma) and ``bias`` (beta).
        track_running_stats: keep ``running_mean``, ``running_var`` and
            ``num_batches_tracked`` and use them in eval; ``False`` uses the
            batch statistics in eval too.
        device: where the parameters and buffers are created.
        dtype: the dtype of the parameters and buffers.
        bias: with ``affine``, also learn ``bias``; ``False`` keeps ``weight``
            only.
        axis: the feature axis (``1`` for NCHW, ``-1`` for channels-last data
            such as ``(N, H, W, C)``); negative values count from the end.
        share_affine: ``"none"`` (per-channel weight and bias), ``"weight"``
            (one scalar weight for all channels, per-channel bias) or ``"all"``
            (scalar weight and bias). Statistics stay per channel.
        nonfinite: what a batch with NaN/Inf statistics does to the running
            buffers: ``"skip"`` (default: leave them, warn), ``"raise"``
            (``FloatingPointError``, nothing changes) or ``"propagate"``
            (update them anyway, as torch does). On non-CPU devices and under
            ``torch.compile`` the skip happens without the warning (no host
            synchronisation).
        convention: ``"torch"`` (default: ``running_var`` averages the
            unbiased batch variance) or ``"keras"`` (it averages the biased
            one, as Keras 3, tf-keras and Flax do; see `bnkit.conventions`).
            Outputs are the same; only the moving statistics differ.
        tiny_batch: a training batch with one value per channel (e.g. a last
            batch of one sample on ``(N, C)`` data): ``"raise"`` (default, as
            torch: ``ValueError``) or ``"running"`` (normalize it with the
            running statistics, as in eval, without updating them or
            ``num_batches_tracked``; one ``RuntimeWarning`` per such batch).

    Raises:
        ValueError: an argument out of range or an unknown option name.

    Shape:
        - Input: any rank with ``C`` features along ``axis``, e.g. ``(N, C, *)``
          or ``(N, *, C)``; `BatchNorm1d`, `BatchNorm2d` and `BatchNorm3d`
          fix ``axis=1`` and torch's ranks.
        - Output: the shape and memory format of the input.

    Example:
        >>> import torch, bnkit
        >>> bn = bnkit.BatchNorm(16, axis=-1)            # channels-last features
        >>> bn(torch.randn(8, 32, 32, 16)).shape
        torch.Size([8, 32, 32, 16])
        >>> bn.running_mean.shape, int(bn.num_batches_tracked)
        (torch.Size([16]), 1)
        >>> shared = bnkit.BatchNorm(16, share_affine="weight", momentum=None)
        >>> shared.weight.shape, shared.bias.shape
        (torch.Size([1]), torch.Size([16]))
    """

    _version = 2
    __constants__ = ["track_running_stats", "momentum", "eps", "num_features", "affine", "axis"]
    #: Input ranks the layer accepts (``None``: any rank that has the feature axis); the
    #: 1d/2d/3d classes set it, and an instance may override it (``convert_sync_batchnorm``).
    expected_dims: tuple[int, ...] | None = None

    def __init__(
        self,
        num_features: int,
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
        convention: str = "torch",
        tiny_batch: str = "raise",
    ) -> None:
        # nn.Module's directly: the 1d/2d/3d classes also derive from torch's (which would come next in the MRO),
        # and nothing of torch's _NormBase is built or run; this class defines the whole interface.
        nn.Module.__init__(self)
        name = type(self).__name__
        conventions.check_convention(name, convention)
        if tiny_batch not in TINY_BATCH_POLICIES:
            raise ValueError(f"{name}: tiny_batch must be one of {TINY_BATCH_POLICIES}, got {tiny_batch!r}")
        if tiny_batch == "running" and not track_running_stats:
            raise ValueError(f"{name}: tiny_batch='running' needs running statistics (track_running_stats=True)")
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features <= 0:
            raise ValueError(f"{name}: num_features must be a positive int, got {num_features!r}")
        if not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"{name}: eps must be a positive number, got {eps!r}")
        if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (numbers.Real, Tensor))):
            raise TypeError(f"{name}: momentum must be a number in [0, 1] or None, got {momentum!r}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"{name}: momentum must be in [0, 1] or None, got {momentum!r}")
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(f"{name}: axis must be an int (negative: counted from the end), got {axis!r}")
        if share_affine not in SHARE_AFFINE_MODES:
            raise ValueError(f"{name}: share_affine must be one of {SHARE_AFFINE_MODES}, got {share_affine!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"{name}: nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.axis = axis
        self.share_affine = share_affine
        self.nonfinite = nonfinite
        self.convention = convention
        self.tiny_batch = tiny_batch
        if affine:
            weight_size = 1 if share_affine in ("weight", "all") else num_features
            bias_size = 1 if share_affine == "all" else num_features
            self.weight = nn.Parameter(torch.empty(weight_size, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(bias_size, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    # -- torch's _NormBase interface -------------------------------------------------
    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        s = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}"
        )
        if self.axis != 1 or self.expected_dims is None:
            s += f", axis={self.axis}"
        if self.share_affine != "none":
            n_params = sum(p.numel() for p in (self.weight, self.bias) if p is not None)
            s += f", share_affine={self.share_affine!r} ({n_params} affine parameters)"
        if self.nonfinite != "skip":
            s += f", nonfinite={self.nonfinite!r}"
        if getattr(self, "convention", "torch") != "torch":
            s += f", convention={self.convention!r}"
        if getattr(self, "tiny_batch", "raise") != "raise":
            s += f", tiny_batch={self.tiny_batch!r}"
        return s

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        if self.track_running_stats:
            # Version 2 added num_batches_tracked. A dict without it (an old checkpoint, or a
            # plain dict without metadata) keeps the layer's current count, as torch does.
            fill_legacy_count(state_dict, prefix, local_metadata, self.num_batches_tracked)
        nn.Module._load_from_state_dict(
            self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def inference_affine(self) -> tuple[Tensor, Tensor]:
        """The eval-mode layer as per-channel ``(scale, shift)``: ``y = x * scale + shift`` along ``axis``.

        Raises ``RuntimeError`` when the layer has no fixed inference form
        (``track_running_stats=False`` normalizes with batch statistics).
        """
        if self.running_mean is None or self.running_var is None:
            raise RuntimeError(f"{self.describe()} has no running statistics, so no fixed inference form")
        c = self.num_features
        weight = None if self.weight is None else self.weight.reshape(-1).expand(c)
        bias = None if self.bias is None else self.bias.reshape(-1).expand(c)
        return fold(self.running_mean, self.running_var, weight, bias, self.eps)

    # -- the engine's protocol ----------------------------------------------------------
    _call_spec: CallSpec | None = None  # built by call_spec(), dropped by __setattr__

    def __setattr__(self, name: str, value: Any) -> None:
        nn.Module.__setattr__(self, name, value)
        self.__dict__["_call_spec"] = None  # made of plain attributes: rebuilt on the next call

    @property
    def _expected_dims(self) -> tuple[int, ...] | None:  # the former name of expected_dims
        return self.expected_dims

    @_expected_dims.setter
    def _expected_dims(self, value: tuple[int, ...] | None) -> None:
        self.expected_dims = value

    def describe(self) -> str:
        """The layer's name in messages, e.g. ``BatchNorm2d(64)``."""
        return f"{type(self).__name__}({self.num_features})"

    def _describe(self) -> str:  # the former name of describe
        return self.describe()

    def call_spec(self) -> CallSpec:
        """The :class:`~bnkit.engine.CallSpec` of this layer's calls.

        Built once and kept; setting any attribute (``bn.momentum = 0.01``
        works as in torch) drops it, and the next call builds it again.
        """
        spec = self._call_spec
        if spec is None:
            spec = call_spec(
                self.describe(), self.axis, self.num_features, self.expected_dims, self.eps, self.momentum,
                self.nonfinite,
            )
            if not torch.compiler.is_compiling():
                self.__dict__["_call_spec"] = spec
        return spec

    def call_buffers(
        self, running_mean: Tensor | None = None, running_var: Tensor | None = None, num_batches_tracked: Tensor | None = None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, bool]:
        """torch's rules for one call: ``(running_mean, running_var, num_batches_tracked, batch_stats)``.

        Training updates the running buffers when they are tracked (with both
        set to ``None`` the batch is still counted; with ``num_batches_tracked``
        set to ``None`` a cumulative average leaves them as they are: torch's
        factor is 0 then); eval uses them, or the batch's statistics when both
        are ``None``. The buffers default to the layer's own (a variant may pass
        others, e.g. one site's).
        """
        if running_mean is None and running_var is None:
            running_mean, running_var, num_batches_tracked = registered_tensors(self, _BUFFERS)
        if self.training:
            if not self.track_running_stats:
                return None, None, None, True
            if num_batches_tracked is not None and running_mean is None and running_var is None:
                num_batches_tracked.add_(1)  # as torch: the batch is counted though there is nothing to update
            elif num_batches_tracked is None and self.momentum is None and (running_mean is None) == (running_var is None):
                return None, None, None, True  # torch's factor is then 0: batch statistics, running ones unchanged
            return running_mean, running_var, num_batches_tracked, True
        return running_mean, running_var, None, running_mean is None and running_var is None

    def check_input(self, input: Tensor) -> None:
        """The layer's input checks (rank, feature axis and count), as the engine makes them."""
        check_input(self.call_spec(), input)

    def _check_input(self, input: Tensor) -> None:  # the former name of check_input
        self.check_input(input)

    def _check_input_dim(self, input: Tensor) -> None:  # torch's name, which code written for torch's layers calls
        self.check_input(input)

    def masked_forward(self, input: Tensor, mask: Tensor) -> Tensor:
        """``forward(input, mask)``: BN whose training statistics use the entries where ``mask`` is True.

        ``mask``: bool, ``input``'s shape without the feature axis (``(N, L)``
        for ``(N, C, L)`` with ``axis=1`` or ``(N, L, C)`` with ``axis=-1``).
        See :func:`bnkit.engine.masked_module_call` for the semantics.
        """
        y = masked_tiny_batch(self, input, mask)
        if y is not None:
            return y
        if self.training and self.track_running_stats and getattr(self, "convention", "torch") == "keras":
            raise NotImplementedError(
                f"{self._describe()}: mask= is not supported with convention='keras' yet (use convention='torch')"
            )
        running_mean, running_var, num_batches_tracked, batch_stats = self.call_buffers()
        return masked_module_call(
            self.call_spec(), input, mask, self.weight, self.bias, running_mean, running_var, num_batches_tracked,
            batch_stats, masked_one_valid(self),
        )

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        if type(input) is not Tensor and (traced := fx_leaf_call(self, input, mask)) is not None:
            return traced
        if mask is not None:
            return self.masked_forward(input, mask)
        return self._forward(input, None)

    def activated_forward(self, input: Tensor, activation: tuple[str, float, float]) -> Tensor:
        """BN, then an activation (``(kind, lo, hi)``: :func:`bnkit.engine.apply_activation`), as one layer call.

        Equal to ``engine.apply_activation(BatchNorm.forward(self, input), activation)``
        (outputs, gradients, running statistics); where the fused op applies the
        activation is part of the kernels' passes (:func:`bnkit.engine.batch_norm_module_call`).
        :class:`bnkit.variants.BatchNormAct` calls it for ReLU, ReLU6, Hardtanh, Hardswish and SiLU.
        """
        return self._forward(input, activation)

    def _forward(self, input: Tensor, activation: tuple[str, float, float] | None) -> Tensor:
        """The unmasked call, followed by ``activation`` where given (fused into the engine's call where it can be)."""
        if activation is not None and self.training and getattr(self, "tiny_batch", "raise") != "raise":
            return apply_activation(self._forward(input, None), activation)  # a tiny_batch policy: not fused
        y = None
        if self.training and getattr(self, "tiny_batch", "raise") != "raise":
            y = tiny_batch_forward(self, input)
        if y is None and self.training and self.track_running_stats and getattr(self, "convention", "torch") == "keras":
            y = conventions.keras_train_forward(self, input)  # another update rule: not the fused op
        if y is not None:
            return y if activation is None else apply_activation(y, activation)
        weight, bias, *buffers = registered_tensors(self, _TENSORS)
        running_mean, running_var, num_batches_tracked, batch_stats = self.call_buffers(*buffers)
        return batch_norm_module_call(
            self._call_spec or self.call_spec(), input, weight, bias, running_mean, running_var, num_batches_tracked,
            batch_stats, activation,
        )


BatchNorm1d, BatchNorm2d, BatchNorm3d = specialize(
    BatchNorm,
    torch_classes=True,
    docs={
        "1d": """Drop-in for ``torch.nn.BatchNorm1d``: `BatchNorm` with ``axis=1`` over ``(N, C)`` or ``(N, C, L)``.

        It takes `BatchNorm`'s arguments (torch's, then bnkit's keyword-only ones).

        Shape:
            - Input: ``(N, C)`` or ``(N, C, L)``.
            - Output: the shape of the input.

        Example:
            >>> import torch, bnkit
            >>> bn = bnkit.BatchNorm1d(100)
            >>> bn(torch.randn(20, 100)).shape
            torch.Size([20, 100])
            >>> bnkit.BatchNorm1d(100, affine=False)(torch.randn(20, 100, 7)).shape
            torch.Size([20, 100, 7])
        """,
        "2d": """Drop-in for ``torch.nn.BatchNorm2d``: `BatchNorm` with ``axis=1`` over ``(N, C, H, W)``.

        It takes `BatchNorm`'s arguments (torch's, then bnkit's keyword-only ones).

        Shape:
            - Input: ``(N, C, H, W)``, any memory format (``channels_last`` too).
            - Output: the shape and memory format of the input.

        Example:
            >>> import torch, bnkit
            >>> bn = bnkit.BatchNorm2d(16)
            >>> x = torch.randn(8, 16, 32, 32).to(memory_format=torch.channels_last)
            >>> y = bn(x)
            >>> y.shape, y.is_contiguous(memory_format=torch.channels_last)
            (torch.Size([8, 16, 32, 32]), True)
        """,
        "3d": """Drop-in for ``torch.nn.BatchNorm3d``: `BatchNorm` with ``axis=1`` over ``(N, C, D, H, W)``.

        It takes `BatchNorm`'s arguments (torch's, then bnkit's keyword-only ones).

        Shape:
            - Input: ``(N, C, D, H, W)``, any memory format.
            - Output: the shape and memory format of the input.

        Example:
            >>> import torch, bnkit
            >>> bn = bnkit.BatchNorm3d(4, momentum=None)     # cumulative average
            >>> bn(torch.randn(2, 4, 3, 5, 5)).shape
            torch.Size([2, 4, 3, 5, 5])
        """,
    },
)


class _LazyBatchNorm(LazyModuleMixin):
    """The lazy form of a bnkit BN class: ``num_features`` comes from the first input.

    Until its first call the layer holds ``UninitializedParameter``/``UninitializedBuffer`` objects (a
    ``num_batches_tracked`` counter exists from the start, as in torch); the first call checks the input
    (rank, feature axis), materializes weight, bias and the running statistics with ``C = input.shape[axis]``,
    initializes them as ``reset_parameters`` does, and turns the layer into ``cls_to_become``. Loading a
    ``state_dict`` into an uninitialized layer materializes it from the loaded shapes (torch's lazy rule).
    """

    cls_to_become: type

    def __init__(
        self,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        **options: Any,
    ) -> None:
        # Built with one feature on the meta device (so that the arguments are checked as the layer's own), then
        # every per-feature tensor is replaced by an uninitialized one.
        super().__init__(1, eps, momentum, affine, track_running_stats, "meta", dtype, **options)
        factory = {"device": device, "dtype": dtype}
        self.num_features = 0
        if self.weight is not None:
            self.weight = UninitializedParameter(**factory)
        if self.bias is not None:
            self.bias = UninitializedParameter(**factory)
        if track_running_stats:
            self.running_mean = UninitializedBuffer(**factory)
            self.running_var = UninitializedBuffer(**factory)
            self.num_batches_tracked = torch.tensor(0, dtype=torch.long, device=device)

    def reset_parameters(self) -> None:
        if not self.has_uninitialized_params() and self.num_features != 0:
            super().reset_parameters()

    def _infer_parameters(self, module: nn.Module, args: tuple, kwargs: dict | None = None) -> None:
        # Under torch.fx.symbolic_trace the layer stays lazy (a leaf, as torch's lazy BN is): its first
        # real call, in the traced module, materializes it.
        if args and isinstance(args[0], torch.fx.Proxy):
            return
        super()._infer_parameters(module, args, kwargs)

    def initialize_parameters(self, input: Tensor, mask: Tensor | None = None) -> None:
        if self.num_features == 0:
            self.check_input(input)  # before anything is materialized: a wrong first input leaves the layer lazy
            self.num_features = input.shape[self.axis]
        if self.has_uninitialized_params():
            c = self.num_features
            with torch.no_grad():
                if is_lazy(self.weight):
                    self.weight.materialize((1 if self.share_affine in ("weight", "all") else c,))
                if is_lazy(self.bias):
                    self.bias.materialize((1 if self.share_affine == "all" else c,))
                for name in ("running_mean", "running_var"):
                    if is_lazy(self._buffers.get(name)):
                        self._buffers[name].materialize((c,))
            self.reset_parameters()

    def check_input(self, input: Tensor) -> None:
        if self.num_features == 0:  # no channel count yet: the rank and the feature axis only
            if not isinstance(input, Tensor):
                raise TypeError(f"{type(self).__name__}: expected a torch.Tensor input, got {type(input).__name__}")
            rank_ok = input.dim() in self.expected_dims if self.expected_dims is not None else input.dim() >= 1
            if self.expected_dims is not None and not rank_ok:  # torch's message
                want = " or ".join(f"{d}D" for d in self.expected_dims)
                raise ValueError(f"{type(self).__name__}: expected {want} input (got {input.dim()}D input)")
            if not rank_ok or not -input.dim() <= self.axis < input.dim():
                raise ValueError(f"{type(self).__name__}: axis {self.axis} is out of range for a {input.dim()}-D input")
            return
        super().check_input(input)


def _lazy(cls: type) -> type:
    name = "Lazy" + cls.__name__
    dropin = f"Drop-in for ``torch.nn.{name}``: " if cls.expected_dims is not None else ""
    doc = (
        f"{dropin}`{cls.__name__}` whose ``num_features`` is inferred from the first input; it becomes a "
        f"`{cls.__name__}` after that call.\n\n"
        f"It takes `{cls.__name__}`'s arguments without ``num_features``.\n\n"
        f"Example:\n    >>> import torch, bnkit\n    >>> bn = bnkit.{name}()\n"
        f"    >>> y = bn(torch.randn({', '.join(['8', '3'] + ['4'] * ((cls.expected_dims or (4,))[0] - 2))}))\n"
        f"    >>> type(bn).__name__, bn.num_features\n    ('{cls.__name__}', 3)\n"
    )
    return type(name, (_LazyBatchNorm, cls), {
        "__module__": cls.__module__, "__qualname__": name, "__doc__": doc, "cls_to_become": cls,
    })


LazyBatchNorm, LazyBatchNorm1d, LazyBatchNorm2d, LazyBatchNorm3d = (
    _lazy(BatchNorm), _lazy(BatchNorm1d), _lazy(BatchNorm2d), _lazy(BatchNorm3d)
)
