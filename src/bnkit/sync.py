"""Synchronized Batch Normalization over ``torch.distributed`` (gloo on CPU, NCCL on GPU).

In training, every rank computes the partial moments ``(n_r, mean_r, M2_r)``
of its own batch; one collective per layer (an all-gather of ``2C + 3``
float64 values per rank) brings them to every rank, where Chan's merge
(:func:`bnkit.stats.merge_stacked`) gives the exact statistics of the global
batch::

    n = sum n_r,  mean = sum n_r mean_r / n,  M2 = sum M2_r + sum n_r (mean_r - mean)^2

The backward all-reduces the two per-channel sums ``sum dy`` and
``sum dy * xhat`` (one collective of ``2C`` float64 values), so each rank's
input gradient is its slice of the gradient of the global computation; the
weight/bias gradients stay per rank (their sum over ranks is the global
gradient, which is what ``DistributedDataParallel`` averages). Ranks may have
unequal or empty batches. The running statistics are updated identically on
every rank with the global unbiased variance.

Eval mode, a world of one process, and a process without an initialized
default process group do not communicate: the layer is then exactly
:class:`bnkit.BatchNorm`.

Failure behaviour: a collective that fails (a dead rank, or the process
group's ``timeout`` passing because a rank never arrives) raises a
``RuntimeError`` naming the layer. Different channel counts on different
ranks are detected by a one-time handshake (a 1-element all-gather the first
time a layer trains on a given process group) and reported on every rank; the
per-step payload also carries the channel count and a tag of the layer name,
so ranks that reach different layers are reported instead of silently mixed.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._engine_checks import _check_param
from ._layer_support import document_bn_arguments, fx_leaf_call
from .engine import canonical_mask, canonical_view, check_mask, per_channel, running_update
from .errors import InputDtypeError
from .family import bn_form, bn_tail, is_torch_bn, ranked, still_lazy, torch_dims
from .layers import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, bn_arguments
from .surgery import carry_extras, rebuild, replace_modules, snapshot, take_over_tensors
from .sync_autograd import _all_gather_flat, _Comm, _SyncBatchNormFunction, _SyncMaskedFunction, sync_payload_bytes
from .variants.act import BatchNormAct, BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, _WithTail

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "sync_payload_bytes"]


@document_bn_arguments
class SyncBatchNorm(BatchNorm):
    r"""Batch Normalization whose training statistics are those of the global batch of all ranks.

    Same arguments, parameters, buffers and state_dict as `bnkit.BatchNorm`
    (generic feature ``axis``, ``share_affine``, ``nonfinite``), plus
    ``process_group`` (None: the default group, resolved at each call).

    Training with an initialized process group of more than one rank: one
    all-gather of the per-rank ``(count, mean, M2)`` per forward, merged exactly
    (Chan), and one all-reduce of ``(sum dy, sum dy*xhat)`` per backward. Every
    rank must call the layer the same number of times, in the same order, even
    with an empty local batch. Eval mode, a world of one, and no initialized
    process group use the local path of `bnkit.BatchNorm` (no communication).

    Double backward is not supported in the synchronized path.

    Args:
        {BatchNorm: num_features, eps, momentum, affine, track_running_stats}
        process_group: the group to synchronize over (``None``: the default
            group, resolved at each call).
        {BatchNorm: device, dtype, bias, axis, share_affine, nonfinite}

    Shape:
        - Input: any rank with ``C`` features along ``axis`` (the local batch
          may differ between ranks, and may be empty).
        - Output: the shape and memory format of the input.

    Example:
        Without an initialized process group it is `bnkit.BatchNorm`:

        >>> import torch, bnkit
        >>> bn = bnkit.SyncBatchNorm(8)
        >>> bn(torch.randn(4, 8, 3, 3)).shape
        torch.Size([4, 8, 3, 3])

        In a script started by ``torchrun`` (see the SyncBatchNorm page):

            torch.distributed.init_process_group("gloo")
            model = bnkit.convert_sync_batchnorm(model)   # every BN layer
            loss = model(local_batch).sum()               # statistics of the global batch
    """

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
        track_running_stats: bool = True, process_group: Any = None, device: Any = None,
        dtype: torch.dtype | None = None, *, bias: bool = True, axis: int = 1, share_affine: str = "none",
        nonfinite: str = "skip"
    ) -> None:
        super().__init__(**bn_arguments(locals()))
        self.process_group = process_group
        # Name used in error messages (set by convert_sync_batchnorm, or by hand).
        self.layer_name: str | None = None
        # The process groups whose channel counts were checked (not saved or pickled).
        self._checked_groups: set[int] = set()

    def __getstate__(self) -> dict:
        # Copies and unpickled layers check their channel counts again (group ids are per process).
        state = dict(self.__dict__)
        state["_checked_groups"] = set()
        return state

    def describe(self) -> str:
        base = f"{type(self).__name__}({self.num_features})"
        return f"{base} at {self.layer_name!r}" if self.layer_name else base

    def _group(self):
        """``(group, world_size)`` when this call must synchronize, else None."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        world = dist.get_world_size(group)
        if world <= 1:
            return None
        return group, world

    def _handshake(self, group, world: int, device: torch.device) -> None:
        key = id(group)
        if key in self._checked_groups:
            return
        mine = torch.tensor([self.num_features], dtype=torch.long, device=device)
        out = torch.empty(world, dtype=torch.long, device=device)
        comm = _Comm(group, world, self.describe(), 0)
        try:
            _all_gather_flat(out, mine, group)
        except Exception as err:  # noqa: BLE001
            raise comm.fail("channel-count handshake", err) from err
        counts = [int(c) for c in out.cpu()]
        if any(c != self.num_features for c in counts):
            raise RuntimeError(
                f"{self.describe()}: channel count mismatch across ranks: ranks have {counts} channels "
                f"(this rank, {dist.get_rank(group)}, has {self.num_features})"
            )
        self._checked_groups.add(key)

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        if type(input) is not Tensor and (traced := fx_leaf_call(self, input, mask)) is not None:
            return traced
        sync = self._group() if self.training and not isinstance(input, torch.fx.Proxy) else None
        if sync is None:
            return super().forward(input, mask)
        group, world = sync
        self.check_input(input)
        if mask is not None:
            check_mask(self.call_spec(), input, mask)
        if not input.dtype.is_floating_point:
            raise InputDtypeError(f"{self.describe()}: expected a floating-point input, got {input.dtype}")
        self._handshake(group, world, input.device)
        axis = self.axis % input.dim()
        channels = input.shape[axis]
        running_mean, running_var, num_batches_tracked, _ = self.call_buffers()
        if input.numel():  # as the local path: an empty batch is not checked against the parameters (nothing uses them)
            for name, t in (("weight", self.weight), ("bias", self.bias), ("running_mean", running_mean),
                            ("running_var", running_var)):
                _check_param(name, t, input, channels)
        weight_c = per_channel(self.weight, channels)
        bias_c = per_channel(self.bias, channels)
        if not self.eps > 0:
            raise ValueError(f"{self.describe()}: eps must be positive during training, got {self.eps}")
        tag = zlib.crc32(self.layer_name.encode()) if self.layer_name else 0
        comm = _Comm(group, world, self.describe(), tag)
        x3, restore = canonical_view(input, axis)
        if mask is None:
            y3, mean, var, count = _SyncBatchNormFunction.apply(x3, weight_c, bias_c, self.eps, comm)
        else:
            m2 = canonical_mask(mask, x3)
            y3, mean, var, count = _SyncMaskedFunction.apply(
                x3, m2, int(m2.sum()), weight_c, bias_c, self.eps, comm
            )
        if running_mean is not None:
            running_update(self.call_spec(), running_mean, running_var, num_batches_tracked, mean, var, int(count))
        return restore(y3)


# --------------------------------------------------------------------------- conversion
class SyncBatchNormAct(_WithTail, SyncBatchNorm):
    """:class:`SyncBatchNorm` followed by ``drop`` and ``act`` (what timm's ``BatchNormAct2d`` becomes)."""

    def fused_activation(self) -> tuple[str, float, float] | None:
        # A synchronized call is BN over the global batch, then the children: the fused op is the local path.
        if self.training and self._group() is not None:
            return None
        return super().fused_activation()


_BNKIT_CLASSES = (
    BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct, BatchNormAct1d, BatchNormAct2d, BatchNormAct3d,
)
_TORCH_EXACT = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _copy_state(dst: nn.Module, src: nn.Module) -> nn.Module:
    """Make ``dst`` use ``src``'s very parameter, buffer and child objects and its own training flag."""
    take_over_tensors(dst, src, _TENSORS)
    carry_extras(dst, src, _TENSORS)
    dst.training = src.training  # the layer's own flag: the children keep theirs (as torch's converter)
    if hasattr(src, "qconfig"):
        dst.qconfig = src.qconfig
    return dst


def _convertible(module: nn.Module) -> bool:
    return isinstance(module, SyncBatchNorm) or is_torch_bn(module) or type(module) in _BNKIT_CLASSES or (
        isinstance(module, BatchNorm) and still_lazy(module)  # bnkit's lazy layers: refused as torch's are
    )


def _check_convertible(module: nn.Module, name: str) -> None:
    if still_lazy(module):
        raise ValueError(f"convert_sync_batchnorm: {type(module).__name__} is not initialized yet")
    form = bn_form(module)
    if form is not None and form.kind == "unknown":
        cls = type(module)
        raise ValueError(
            f"convert_sync_batchnorm: layer {name or '<root>'!r} ({cls.__module__}.{cls.__qualname__}) cannot be "
            f"synchronized without changing what it computes: {form.reason}. Nothing was changed."
        )
    if type(module) in _BNKIT_CLASSES and (
        getattr(module, "convention", "torch") != "torch" or getattr(module, "tiny_batch", "raise") != "raise"
    ):
        # SyncBatchNorm has torch's update rule and raises on tiny batches: not dropped silently.
        raise ValueError(
            f"convert_sync_batchnorm: {module._describe()} uses convention={module.convention!r}, "
            f"tiny_batch={module.tiny_batch!r}; SyncBatchNorm supports convention='torch', tiny_batch='raise' only. "
            "Nothing was changed."
        )


def _revert_class(module: SyncBatchNorm) -> type:
    return getattr(module, "_sync_original", None) or ranked(BatchNorm, module.expected_dims)


def _check_revertible(module: SyncBatchNorm, name: str) -> None:
    cls = _revert_class(module)
    if not issubclass(cls, BatchNorm) and (module.share_affine != "none" or module.axis != 1):
        raise ValueError(
            f"convert_sync_batchnorm(revert=True): {module.describe()} cannot become {cls.__name__} "
            "(it has a feature axis other than 1 or shared affine parameters)"
        )


def _to_sync(module: nn.Module, process_group: Any) -> SyncBatchNorm | None:
    tail = bn_tail(module)
    if isinstance(module, SyncBatchNorm):
        if process_group is not None:
            module.process_group = process_group
        return module
    if is_torch_bn(module):
        if process_group is None:
            process_group = getattr(module, "process_group", None)
        extra: dict[str, Any] = {}
        dims = torch_dims(module)
    elif type(module) in _BNKIT_CLASSES:
        extra = {"axis": module.axis, "share_affine": module.share_affine, "nonfinite": module.nonfinite}
        dims = module.expected_dims
    else:
        return None
    weight = module.weight
    out = (SyncBatchNormAct if tail else SyncBatchNorm)(
        module.num_features,
        module.eps,
        module.momentum,
        module.affine,
        module.track_running_stats,
        process_group,
        device=weight.device if weight is not None else None,
        dtype=weight.dtype if weight is not None else None,
        bias=module.bias is not None or not module.affine,
        **extra,
    )
    if dims is not None:  # None: SyncBatchNorm's own default (any rank)
        out.expected_dims = dims
    if tail:  # BN followed by children (timm's BatchNormAct2d): the very same children
        out._modules.clear()
        out._modules.update(tail)
        out.bn_tail = tuple(n for n, _ in tail)
    out._sync_original = type(module)
    if type(module) not in _TORCH_EXACT + _BNKIT_CLASSES:
        out._sync_snapshot = snapshot(module)  # a subclass: revert rebuilds it without calling its __init__
    return _copy_state(out, module)


def _from_sync(module: SyncBatchNorm) -> nn.Module:
    cls = _revert_class(module)
    snap = getattr(module, "_sync_snapshot", None)
    if snap is not None and snap["cls"] is cls:
        out = rebuild(snap, module, (*module._parameters, *module._buffers), module._modules)
        out.eps, out.momentum = module.eps, module.momentum
        if module.process_group is not None and isinstance(out, nn.SyncBatchNorm):
            out.process_group = module.process_group
        out.training = module.training
        return out
    weight = module.weight
    factory = {
        "device": weight.device if weight is not None else None,
        "dtype": weight.dtype if weight is not None else None,
    }
    if issubclass(cls, BatchNorm):
        out = cls(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            bias=module.bias is not None or not module.affine,
            axis=module.axis,
            share_affine=module.share_affine,
            nonfinite=module.nonfinite,
            **factory,
        )
        if issubclass(cls, BatchNormAct):
            out._modules.clear()
            out._modules.update(module._modules)
            out.bn_tail = getattr(module, "bn_tail", ("drop", "act"))
    else:
        out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                  bias=module.bias is not None or not module.affine, **factory)
        if cls is nn.SyncBatchNorm and module.process_group is not None:
            out.process_group = module.process_group
    return _copy_state(out, module)


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None, revert: bool = False) -> nn.Module:
    """Convert every BN layer of ``module`` to `SyncBatchNorm` (or back with ``revert=True``).

    Converted: ``torch.nn.BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm`` and
    bnkit's ``BatchNorm``/``BatchNorm1d/2d/3d`` (bnkit's variants with other
    semantics are left alone). torch subclasses that keep torch's
    ``forward`` are converted; timm's ``BatchNormAct2d``/``SyncBatchNormAct``
    and bnkit's ``BatchNormAct`` become :class:`SyncBatchNormAct` holding the
    same ``drop``/``act`` modules; ``revert=True`` rebuilds the original
    class. A subclass that overrides ``forward`` in a way bnkit does not know
    raises ``ValueError`` naming it (see :func:`bnkit.family.bn_form`). The new layers use the
    *same* parameter and buffer tensors (so an optimizer built before still
    works), keep the training flag, and are named after their path in
    ``module`` for error messages. ``revert=True`` turns every SyncBatchNorm
    back into the class it was converted from (a bnkit layer of matching rank
    when it was created directly). Returns the converted module (``module``
    itself unless it is a BN layer). Every layer is checked before any is
    converted; shared layers stay shared, and hooks on a layer move to its
    replacement.

    Args:
        module: the model (or a single BN layer).
        process_group: the group the new layers synchronize over (``None``:
            the default group, resolved at each call).
        revert: turn `SyncBatchNorm` layers back instead.

    Returns:
        The converted module.

    Example:
        >>> import torch, bnkit
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> synced = bnkit.convert_sync_batchnorm(model)
        >>> type(synced[1]).__name__, synced[1].weight is model[1].weight
        ('SyncBatchNorm', True)
        >>> type(bnkit.convert_sync_batchnorm(synced, revert=True)[1]).__name__
        'BatchNorm2d'
    """

    if revert:
        return replace_modules(
            module, lambda m: isinstance(m, SyncBatchNorm), lambda m, _: _from_sync(m), _check_revertible
        )

    def build(m: nn.Module, name: str) -> SyncBatchNorm:
        out = _to_sync(m, process_group)
        out.layer_name = name or type(m).__name__
        return out

    return replace_modules(module, _convertible, build, _check_convertible)
