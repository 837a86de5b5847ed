"""Gradient accumulation of BN statistics: :func:`accumulate_stats` (one running update per optimizer step)."""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor, nn

from .. import kernels
from ..engine import in_recompute, running_update, set_running_update_hook
from ..family import is_torch_bn
from ..stats import Moments, merge, update_running_stats
from ._family import has_running_stats
from ._spares import BufferSnapshot, SparePool
from .checkpointing import _bn_layers

__all__ = ["accumulate_stats"]


# A layer's totals, kept per running_mean buffer from one block to the next (see _spares).
_TOTALS = SparePool()
# A torch layer's buffers as its first forward in a block found them (_CollectingForward.capture), likewise.
_BASES = SparePool()


class _Layer:
    """What one layer saw inside an :func:`accumulate_stats` block: its buffers and the merged moments so far.

    ``totals`` is one float64 tensor of ``2C + 1`` values, the C means, the C
    M2s and the count: each batch is merged into it in place at once (by the
    fused op itself, ``bnkit::batch_norm_layer_accumulate_``, or :meth:`add`),
    and the batch's tensors are not kept. ``spare_key``: the buffer under
    which the totals go back to the pool at the block's end (``None``: not
    pooled, for a per-site view, which is made anew every call).
    """

    __slots__ = ("spec", "module", "running_mean", "running_var", "nbt", "channels", "totals", "spare_key", "seen")

    def __init__(self, spec: Any, module: nn.Module | None, running_mean: Tensor, running_var: Tensor,
                 nbt: Tensor | None, spare_key: Tensor | None) -> None:
        self.spec, self.module = spec, module
        self.running_mean, self.running_var, self.nbt = running_mean, running_var, nbt
        self.channels = c = running_mean.numel()
        shape = (2 * c + 1,)
        self.spare_key = spare_key
        if spare_key is None:
            self.totals = torch.zeros(shape, dtype=torch.float64, device=running_mean.device)
        else:
            self.totals = _TOTALS.take(spare_key, shape, torch.float64).zero_()
        # A counted training call that reached the hook (an empty batch counts, a skipped non-finite one
        # not); batches the fused op merges show in the count.
        self.seen = False

    @property
    def count(self) -> int:
        return int(self.totals[2 * self.channels])

    def total(self) -> Moments:
        c = self.channels
        return Moments(self.count, self.totals[:c], self.totals[c : 2 * c])

    def set_total(self, total: Moments) -> None:
        c = self.channels
        self.totals[:c].copy_(total.mean)
        self.totals[c : 2 * c].copy_(total.m2)
        self.totals[2 * c] = total.count

    def add(self, count: int, mean: Tensor, var: Tensor, unbiased: bool = False) -> None:
        """Chan's merge, in float64, of a batch of ``count`` values (``var`` biased, or unbiased: torch's buffers)."""
        if not count:
            return
        if mean.is_cpu and kernels.cpp_available() and not torch.jit.is_tracing():
            torch.ops.bnkit.merge_moments_(self.totals, mean, var, count, unbiased)
        else:
            m2 = var.detach().double() * (count - 1 if unbiased else count)
            self.set_total(merge(self.total(), Moments(count, mean.detach().double(), m2)))

    def release(self) -> None:
        if self.spare_key is not None:
            _TOTALS.give_back(self.spare_key, self.totals)
            self.spare_key = None


class _Accumulator:
    """One block's collection; while it is the innermost block, the engine's running-update hook.

    As the hook it is called with every batch's moments (``__call__``) and,
    on the fused route, asked for the totals the op merges a batch into
    (:meth:`totals`); what its model does not own goes to the enclosing block.
    """

    def __init__(self, layers: list[tuple[str, nn.Module]], parent: "_Accumulator | None") -> None:
        self.parent = parent
        self.layers: dict[tuple, _Layer] = {}
        # id of a running_mean the engine is given as it is (a module's own buffer) -> its layer, which keeps
        # that tensor alive (so the id stays its own): the fused route's one lookup per call.
        self.by_buffer: dict[int, _Layer] = {}
        self.wrapped: set[int] = set()  # the torch layers whose forward this block wrapped
        # The buffers this block collects for: the bnkit layers' running_mean tensors (per-site views share them).
        own = [m for _, m in layers if has_running_stats(m) and not is_torch_bn(m)]
        self.owned = {id(m.running_mean) for m in own}
        # Each layer's own buffers get their entry now, not at the first batch: a forward inside the block
        # then costs one dictionary lookup more than outside (its spec is the one its calls pass).
        for m in own:
            self._layer(None, m.running_mean, m.running_var, getattr(m, "num_batches_tracked", None))

    def _layer(self, spec: Any, running_mean: Tensor, running_var: Tensor, nbt: Tensor | None) -> _Layer | None:
        """The layer collecting ``running_mean``'s batches (made at its first batch), or ``None``: not this block's."""
        layer = self.by_buffer.get(id(running_mean))
        if layer is not None:
            return layer
        own = running_mean._base is None
        base = running_mean if own else running_mean._base
        if id(base) not in self.owned:
            return None
        # With the size: a whole buffer made at entry and one site's view at offset 0 are different layers.
        key = (id(base), running_mean.storage_offset(), running_mean.numel())
        layer = self.layers.get(key)
        if layer is None:
            layer = self.layers[key] = _Layer(spec, None, running_mean, running_var, nbt, running_mean if own else None)
        if layer.running_mean is running_mean:
            self.by_buffer[id(running_mean)] = layer
        return layer

    def totals(self, spec: Any, running_mean: Tensor, running_var: Tensor, nbt: Tensor | None) -> Tensor | None:
        """The fused route's question: the totals to merge this layer's batch into (``None``: no block collects it)."""
        if _BLOCKS.excluded and _excluded_buffer(running_mean):
            return None
        layer = self.by_buffer.get(id(running_mean))
        if layer is None:
            layer = self._layer(spec, running_mean, running_var, nbt)
        if layer is not None:
            layer.spec = spec
            return layer.totals
        return self.parent.totals(spec, running_mean, running_var, nbt) if self.parent else None

    def __call__(self, spec: Any, running_mean: Tensor, running_var: Tensor, nbt: Tensor | None, mean: Tensor,
                 var: Tensor, count: int) -> bool:
        """The running-update hook: the batch's moments merged into the layer's totals (False: not collected)."""
        if _BLOCKS.excluded and _excluded_buffer(running_mean):
            return False
        layer = self._layer(spec, running_mean, running_var, nbt)
        if layer is None:
            return self.parent(spec, running_mean, running_var, nbt, mean, var, count) if self.parent else False
        layer.spec = spec
        layer.seen = True  # the engine has applied the non-finite policy: a skipped batch never gets here
        layer.add(count, mean, var)
        return True

    def torch_layer(self, module: nn.Module) -> _Layer:
        """The entry of a torch BN layer (made at the block's entry, when its forward is wrapped)."""
        layer = self.layers.get(("torch", id(module)))
        if layer is None:
            layer = self.layers[("torch", id(module))] = _Layer(
                None, module, module.running_mean, module.running_var, module.num_batches_tracked, module.running_mean
            )
        return layer

    def merge_into(self, other: "_Accumulator") -> None:
        """Hand everything to the enclosing block: merged into its layers, or theirs from now on."""
        for key, layer in self.layers.items():
            mine = other.layers.get(key)
            if mine is None:
                other.layers[key] = layer
            else:
                mine.set_total(merge(mine.total(), layer.total()))
                mine.seen = mine.seen or layer.seen
                if mine.spec is None:  # made at the enclosing block's entry, and not called since
                    mine.spec = layer.spec
                layer.release()
        self.layers, self.by_buffer = {}, {}

    @torch.no_grad()
    def apply(self) -> None:
        """The one running update per layer, from the merged moments of everything seen."""
        for layer in self.layers.values():
            total = layer.total()
            n = total.count
            if not (layer.seen or n):
                continue
            if layer.module is None:
                rm = layer.running_mean
                mean = total.mean.to(rm.dtype if rm.dtype.is_floating_point else torch.float64)
                var = (total.m2 / n if n else total.m2).to(mean.dtype)
                running_update(layer.spec, rm, layer.running_var, layer.nbt, mean, var, n)
                continue
            m = layer.module  # torch's rule, as its forward would have applied it to the merged batch
            if m.num_batches_tracked is not None:
                m.num_batches_tracked.add_(1)
            if n == 0:
                continue
            momentum = m.momentum
            if momentum is None and m.num_batches_tracked is None:
                continue  # torch's factor is then 0: the running statistics stay
            factor = momentum if momentum is not None else 1.0 / int(m.num_batches_tracked)
            update_running_stats(m.running_mean, m.running_var, total.mean, total.m2 / n, n, factor)

    def release(self) -> None:
        """Give the totals back to the pool (the block is over)."""
        for layer in self.layers.values():
            layer.release()


class _Blocks(threading.local):
    """This thread's open blocks, innermost last, and the layers excluded from them (as the engine's hook,
    they are per thread: two threads' blocks never see each other's forwards)."""

    def __init__(self) -> None:
        self.stack: list[_Accumulator] = []
        # Layers (their ids, and their running_mean buffers') whose forwards no block collects:
        # bnkit.preserve_stats'.
        self.excluded: dict[int, int] = {}


_BLOCKS = _Blocks()
_NONE = object()


def _storage_owner(t: Tensor) -> Tensor:
    """The tensor a buffer's memory belongs to (a per-site layer's buffers are views of one)."""
    return t if t._base is None else t._base


def _excluded_buffer(running_mean: Tensor) -> bool:
    return id(_storage_owner(running_mean)) in _BLOCKS.excluded


@contextlib.contextmanager
def excluded_from_blocks(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Inside, no open :func:`accumulate_stats` block collects the forwards of ``modules``.

    Their buffers then update as outside a block (torch's layers at the block's momentum 1), for the
    caller to put back: :func:`bnkit.preserve_stats`' forwards do not count, in a block or not.
    """
    if not _BLOCKS.stack:
        yield
        return
    excluded = _BLOCKS.excluded
    keys = []
    for m in modules:
        keys.append(id(m))
        rm = getattr(m, "running_mean", None)
        if isinstance(rm, Tensor):
            keys.append(id(_storage_owner(rm)))
    for k in keys:
        excluded[k] = excluded.get(k, 0) + 1
    try:
        yield
    finally:
        for k in keys:
            left = excluded[k] - 1
            if left:
                excluded[k] = left
            else:
                del excluded[k]


class _CollectingForward:
    """A torch BN layer's forward inside a block: its own, at momentum 1 (its running buffers then hold the
    batch's statistics), and those merged at once into the innermost block's totals for the layer.

    Set as the module's ``forward`` attribute rather than as a forward hook, so that the module keeps
    ``nn.Module.__call__``'s fast path; right after a large forward every interpreter step runs from
    a cold cache, so the steps are few. For torch's own ``BatchNorm{1,2,3}d`` it calls
    ``torch.batch_norm`` itself, with the arguments ``F.batch_norm`` passes, and leaves
    ``num_batches_tracked`` alone (the block restores it and counts the step once): the same op
    count as torch's forward, whose second op is that counter's ``add_``. Pickled or copied, it is
    the layer's plain forward.

    Before its first collected forward it copies the running buffers (``base``): the values the
    block's one update starts from, as a bnkit layer's live buffers are. They are the entry's unless
    something wrote them in between: DDP with ``broadcast_buffers=True`` copies rank 0's buffers
    into every rank's at the start of each forward.
    """

    __slots__ = ("module", "forward", "buffers", "block", "layer", "merge", "lean", "base")

    def __init__(self, module: nn.Module, forward: Any, block: _Accumulator) -> None:
        self.module, self.forward, self.buffers = module, forward, module._buffers
        # The block that wrapped it and its entry: the one a forward reaches unless a nested block is open.
        self.block, self.layer = block, block.torch_layer(module)
        direct = module.running_mean.is_cpu and kernels.cpp_available()
        self.merge = torch.ops.bnkit.merge_moments_.default if direct else None  # what _Layer.add calls
        # torch's own classes, with their own forward: their forward is known, the rest is called as it is.
        self.lean = type(module) in _TORCH_CLASSES and "forward" not in module.__dict__
        self.base: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # the two buffers, then their copies

    def __call__(self, input: Tensor, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        n = input.numel() // input.shape[1] if input.dim() > 1 else 0  # values per channel
        if torch.compiler.is_compiling():
            if module.training and module.track_running_stats:  # outside the graph: see _forward_eagerly
                return _forward_eagerly(self, input, args, kwargs, n)
            return self.forward(input, *args, **kwargs)
        blocks = _BLOCKS
        if not (module.training and module.track_running_stats and blocks.stack) or in_recompute() \
                or torch._C._is_tracing() or id(module) in blocks.excluded:
            return self.forward(input, *args, **kwargs)
        if self.base is None:
            self.capture()
        if self.lean and not args and not kwargs and type(input) is Tensor:
            module._check_input_dim(input)
            if n == 1:
                raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
            y = torch.batch_norm(
                input, module.weight, module.bias, self.buffers["running_mean"], self.buffers["running_var"], True,
                1.0, module.eps, torch.backends.cudnn.enabled,
            )
        else:
            y = self.forward(input, *args, **kwargs)
        self._take(blocks.stack[-1], n)
        return y

    @torch.no_grad()
    def capture(self) -> None:
        """Copy the running buffers as they are before the block's first collected forward (``base``)."""
        rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
        self.base = (rm, rv, _BASES.take(rm, rm.shape, rm.dtype).copy_(rm), _BASES.take(rv, rv.shape, rv.dtype).copy_(rv))

    @torch.no_grad()
    def put_base_back(self) -> None:
        """The buffers from ``base`` (if a forward captured it), for the block's update to start from."""
        if self.base is not None:
            self.buffers["running_mean"].copy_(self.base[2])
            self.buffers["running_var"].copy_(self.base[3])

    def release(self) -> None:
        if self.base is not None:
            rm, rv, rm_copy, rv_copy = self.base
            _BASES.give_back(rm, rm_copy)
            _BASES.give_back(rv, rv_copy)
            self.base = None

    def forward_collected(self, input: Tensor, args: tuple, kwargs: dict, n: int) -> Any:
        """The forward and its merge, both run eagerly (under torch.compile)."""
        blocks = _BLOCKS
        collected = blocks.stack and not in_recompute() and id(self.module) not in blocks.excluded
        if collected and self.base is None:
            self.capture()
        y = self.forward(input, *args, **kwargs)
        if collected:
            self._take(blocks.stack[-1], n)
        return y

    def _take(self, block: _Accumulator, n: int) -> None:
        """The buffers' batch statistics (of ``n`` values per channel) merged into ``block``'s entry."""
        layer = self.layer if block is self.block else block.torch_layer(self.module)
        layer.seen = True
        if n > 1:  # torch raises for one value per channel
            rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
            if self.merge is not None:
                self.merge(layer.totals, rm, rv, n, True)
            else:
                layer.add(n, rm, rv, unbiased=True)

    def __reduce__(self) -> Any:
        return (_same, (self.forward,))


class _StateAtEntry:
    """A wrapped torch layer's ``__getstate__`` inside a block: a copy or pickle made there is the layer as it was
    at the block's entry (its momentum, running buffers and forward), as a bnkit layer's is, not the block's
    working state (momentum 1, the last micro-batch's statistics)."""

    __slots__ = ("module", "momentum", "buffers", "forward")

    def __init__(self, module: nn.Module, buffers: dict[str, Tensor]) -> None:
        self.module, self.momentum, self.buffers = module, module.momentum, buffers
        self.forward = module.__dict__.get("forward", _NONE)  # the layer's own forward attribute, if any

    def __call__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.module.__dict__.items() if k not in ("__getstate__", "forward")}
        if self.forward is not _NONE:
            state["forward"] = self.forward
        state["momentum"] = self.momentum
        state["_buffers"] = {k: self.buffers.get(k, b) for k, b in self.module._buffers.items()}
        return state


# Under torch.compile: the layer's training forward and its merge run on each call of the compiled code,
# outside the graph (one graph break), with the real buffers: the base is copied before the forward and
# the batch's statistics read after it; the blocks read here change from one step to the next and so
# never enter a guard.
_forward_eagerly = torch.compiler.disable(_CollectingForward.forward_collected, recursive=True)


_TORCH_CLASSES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _same(value: Any) -> Any:
    return value


def _check_accumulable(layers: list[tuple[str, nn.Module]]) -> None:
    import torch.distributed as dist

    for name, m in layers:
        if getattr(m, "convention", "torch") == "keras":
            raise NotImplementedError(
                f"accumulate_stats: layer {name or '<root>'!r} uses convention='keras', whose update "
                "is not the engine's; use convention='torch' or update per micro-batch"
            )
        if (isinstance(m, nn.SyncBatchNorm) and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            raise NotImplementedError(
                f"accumulate_stats: torch.nn.SyncBatchNorm at {name or '<root>'!r} under torch.distributed "
                "is not supported (its counts over ranks are not visible); use bnkit.SyncBatchNorm "
                "(bnkit.convert_sync_batchnorm)"
            )


@contextlib.contextmanager
def accumulate_stats(model: nn.Module) -> Iterator[nn.Module]:
    r"""Update the running statistics once for the k micro-batches of one optimizer step.

    Inside the block every training forward normalizes its micro-batch with
    the micro-batch's own statistics, exactly as without the block, but no
    running statistic moves. At a normal exit each BN layer of ``model`` that
    ran in training mode applies one update from the exact (Chan) merge, in
    float64, of the per-channel ``(n_i, mean_i, M2_i)`` of everything it saw::

        N = sum n_i,   mean = sum n_i mean_i / N,   M2 = sum M2_i + sum n_i (mean_i - mean)^2
        running_mean <- (1 - m) * running_mean + m * mean
        running_var  <- (1 - m) * running_var  + m * M2 / (N - 1)
        num_batches_tracked += 1

    (``momentum=None``: ``m = 1 / num_batches_tracked``, so the cumulative
    average counts the step once.) That is the update of one forward over the
    concatenated micro-batches. With :class:`bnkit.SyncBatchNorm` each part
    is already the merge over the ranks, so the update is that of the global
    batch of the step. Normalization stays per micro-batch: a step of k
    micro-batches behaves like Ghost BN with the micro-batch as the virtual
    batch (noisier batch statistics than one large batch; the running
    statistics are those of the large batch).

    bnkit layers are covered through the engine's running-update hook (the
    same kernels as outside the block, in one pass and one op call, which
    merge the batch moments into the layer's float64 totals; nothing per
    micro-batch is kept, and the totals are reused by the next block). torch's
    BN layers run with momentum 1 inside the block, so that their buffers
    hold each forward's batch statistics, which their forward (wrapped for the
    block) merges into the totals; their buffers, momentum and forward are
    restored at exit. Nested blocks merge into the
    enclosing one (the outermost applies). Blocks are per thread, as torch's
    grad mode is: threads training their own copies each accumulate their
    own forwards, whatever the order their blocks open and close in. On an exception nothing is
    applied and every BN buffer is as it was at entry. Forwards recomputed by
    activation checkpointing are not counted; eval-mode forwards are
    untouched. Non-finite micro-batches follow each layer's ``nonfinite``
    policy at the forward (``"skip"``: left out, with a warning).

    Args:
        model: any module (DDP-wrapped works: use it with ``no_sync()``).

    Yields:
        ``model``.

    Raises:
        NotImplementedError: for ``convention="keras"`` layers and for
            ``torch.nn.SyncBatchNorm`` under ``torch.distributed``.
        RuntimeError: for a model whose torch BN layers are in another
            thread's open block.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), bnkit.BatchNorm1d(4))
        >>> with bnkit.accumulate_stats(model):
        ...     for x in torch.randn(4, 8, 3):  # 4 micro-batches of 8
        ...         model(x).square().mean().backward()
        >>> int(model[1].num_batches_tracked)
        1
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"accumulate_stats: expected an nn.Module, got {type(model).__name__}")
    layers = _bn_layers(model)  # walked once: the checks, the buffers collected, the snapshot
    _check_accumulable(layers)
    stack = _BLOCKS.stack
    wrapped = set().union(*(a.wrapped for a in stack)) if stack else set()
    torch_layers = []
    for name, m in layers:
        if is_torch_bn(m) and id(m) not in wrapped and has_running_stats(m):
            if isinstance(m.__dict__.get("forward"), _CollectingForward):
                raise RuntimeError(
                    f"accumulate_stats: the torch BN layer {name or '<root>'!r} is in another thread's open "
                    "block; a model accumulates in one thread at a time (give each thread its own copy)"
                )
            torch_layers.append(m)
    parent = stack[-1] if stack else None
    acc = _Accumulator(layers, parent)
    snapshot = BufferSnapshot(m for _, m in layers)
    momenta = [(m, m.momentum) for m in torch_layers]
    forwards: list[tuple[nn.Module, Any]] = []  # each wrapped torch layer and its own forward attribute, if any
    wrappers: list[_CollectingForward] = []
    previous = set_running_update_hook(acc)
    stack.append(acc)
    ok = False
    try:
        for m in torch_layers:
            forwards.append((m, m.__dict__.get("forward", _NONE)))
            m.__getstate__ = _StateAtEntry(m, snapshot.saved(m))
            m.forward = wrapper = _CollectingForward(m, m.forward, acc)
            wrappers.append(wrapper)
            acc.wrapped.add(id(m))
            m.momentum = 1.0
        yield model
        ok = True
    finally:
        stack.pop()
        set_running_update_hook(previous)
        for m, forward in forwards:
            m.__dict__.pop("__getstate__", None)
            if forward is _NONE:
                del m.forward
            else:
                m.forward = forward
        for m, momentum in momenta:
            m.momentum = momentum
        # bnkit buffers never moved inside; torch's hold the last batch's statistics. On an exception, all go back.
        snapshot.restore(None if not ok else is_torch_bn)
        snapshot.release()
        for wrapper in wrappers:
            if ok:  # the one update starts from what the first forward found (DDP's broadcast, say)
                wrapper.put_base_back()
            wrapper.release()
        try:
            if ok:
                if parent is not None:
                    acc.merge_into(parent)
                else:
                    acc.apply()
        finally:
            acc.release()
