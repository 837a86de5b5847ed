"""Audit: bnkit frees memory as torch's own BN does (reference counting, nothing kept, nothing growing).

The oracle is always torch's BN (``nn.BatchNorm1d/2d/3d``, ``F.batch_norm``, a torch
model) run the same way on an input of the same shape, layout and ``requires_grad``:
whatever torch frees without the cyclic garbage collector, bnkit must free without
it too. Every measurement runs with ``gc`` disabled (and the heap that existed before
this module frozen with ``gc.freeze()``, so that a collection sees only what a test
made), after one identical warm-up call (first calls load kernels and modules once).

Per call (:func:`lifetime`) it records, with weak references (a tensor that C++ still
holds keeps its Python object, so a weak reference also sees what autograd keeps):

- ``saved_after_backward``: saved tensors still held once ``backward()`` returned
  (every tensor autograd saves goes through a ``saved_tensors_hooks`` pack hook that
  stores it in a weakly referenced box);
- ``output`` / ``input`` / ``saved``: whether the output, the input and the saved
  tensors are still alive once the test dropped its last reference to them;
- ``garbage``: what ``gc.collect()`` finds unreachable afterwards (reference cycles).

Per loop (:func:`growth`): over ``N`` calls, the growth of ``gc.get_objects()``, the
garbage found after the loop, and the sizes of every module-level container of
bnkit (dicts, lists, sets, deques, weak dictionaries, ``lru_cache`` caches, the
spare-tensor pools, thread-local hook state, module-level counters; torch's global
module-hook dicts too) and of every container attribute of the model's modules
(hooks, per-layer memories). Registries must not change; objects and garbage must
not grow beyond torch's twin loop.

Both helpers are checked against planted defects first (a tensor hook capturing its
own tensor, a context holding its output, a registry filled per call, a cycle per
call, a hook added per call), so a clean result means something.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import itertools
import sys
import threading
import types
import weakref
from datetime import timedelta
from typing import Any, Callable, NamedTuple

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from torch import nn
from _compare import BNKIT_BN_BY_RANK, TORCH_BN_BY_RANK
from torch.utils.checkpoint import checkpoint

import bnkit
from bnkit import kernels
from bnkit._engine_spec import cached_call_spec
from bnkit.tools import _spares, accumulate
from bnkit.variants import act as act_module
from bnkit.variants.act import BatchNormAct2d

CL, CL3 = torch.channels_last, torch.channels_last_3d
N = 200  # calls per growth loop of a layer
N_VARIANT = 100  # ... of a variant
N_TOOL = 40  # blocks per growth loop of a tool (each runs a small model a few times)
SLACK = 5  # objects a loop may leave once (a lazily made thread-local, ...); a per-call leak leaves >= N

# name -> (shape, memory format); the "_1x1" and "_C1" inputs are both contiguous and channels-last, which
# the torch backend sends through the hooked autograd.Function of _engine_views._ambiguous_view
INPUTS = {
    "1d_NC": ((8, 3), None),
    "1d_NCL": ((4, 3, 6), None),
    "2d": ((4, 3, 5, 5), None),
    "2d_cl": ((4, 3, 5, 5), CL),
    "2d_cl_1x1": ((4, 3, 1, 1), CL),
    "2d_cl_C1": ((4, 1, 3, 3), CL),
    "3d": ((2, 3, 2, 3, 3), None),
    "3d_cl": ((2, 3, 2, 3, 3), CL3),
    "3d_cl_1x1x1": ((4, 3, 1, 1, 1), CL3),
}
AMBIGUOUS = ("2d_cl_1x1", "2d_cl_C1", "3d_cl_1x1x1")
INPUTS_2D = ("2d", "2d_cl", "2d_cl_1x1")


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def frozen_heap():
    """Everything made before this module (earlier tests' garbage collected first) is frozen: collections and
    ``gc.get_objects()`` then see only what a test makes, and cost microseconds."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()
    gc.collect()


@pytest.fixture(params=["torch_model", "bnkit_model-cpp", "bnkit_model-torch"])
def kind(request):
    """A tool's test on torch's model (bnkit's backend does not matter there) and on bnkit's, on both backends."""
    name, _, backend_name = request.param.partition("-")
    if backend_name == "cpp" and not kernels.cpp_available():
        pytest.skip("the C++ extension is not available here")
    with kernels.use_backend(backend_name or None):
        yield name.split("_")[0]


@pytest.fixture
def backend(model_backend):
    """Each test once per backend a model runs on (conftest's model_backend)."""
    return model_backend


@contextlib.contextmanager
def gc_off():
    """The cyclic collector off inside (what only it would free stays), back on after."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def make_input(name: str, requires_grad: bool = True, seed: int = 0) -> Callable[[], torch.Tensor]:
    shape, fmt = INPUTS[name]

    def make():
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(shape, generator=g)
        if fmt is not None:
            x = x.to(memory_format=fmt)
        return x.requires_grad_(requires_grad)

    return make


def graph_nodes(t: torch.Tensor) -> list[str]:
    """The class names of the autograd nodes behind ``t``."""
    seen, names, todo = set(), [], [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        todo.extend(f for f, _ in node.next_functions)
    return names


# ----------------------------------------------------------------------------- per-call lifetime
class _Box:
    """What the pack hook hands autograd for a saved tensor (a detached alias: no edge back to its graph)."""

    __slots__ = ("t", "__weakref__")

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


class Lifetime(NamedTuple):
    saved_after_backward: int | None  # saved tensors still held after backward() (None: no backward)
    output: bool  # the output alive after the test dropped it
    input: bool  # the input alive after the test dropped it
    saved: int  # saved tensors alive after both were dropped
    garbage: int  # unreachable objects gc.collect() then finds


def _lifetime_once(call, make_x, backward, grad, hooks) -> Lifetime:
    with gc_off():
        boxes = []

        def pack(t):
            box = _Box(t.detach())
            boxes.append(weakref.ref(box))
            return box

        x = make_x()
        x_ref = weakref.ref(x)
        saving = torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t) if hooks else contextlib.nullcontext()
        with saving:
            y = call(x)
        y_ref = weakref.ref(y)
        after_backward = None
        if backward:
            g = torch.ones_like(y) if grad is None else grad(y)
            y.backward(g)
            del g
            after_backward = sum(b() is not None for b in boxes)
        del y
        output = y_ref() is not None
        del x
        return Lifetime(after_backward, output, x_ref() is not None, sum(b() is not None for b in boxes), gc.collect())


def lifetime(call, make_x, backward=True, grad=None, hooks=True) -> Lifetime:
    """One call ``call(x)`` on a fresh input (after a warm-up call), optionally its backward, then every reference
    dropped: what is still alive, and what only the cyclic collector finds."""
    _lifetime_once(call, make_x, backward, grad, hooks)
    return _lifetime_once(call, make_x, backward, grad, hooks)


def assert_keeps_no_more(ours: Lifetime, theirs: Lifetime) -> None:
    """Nothing alive, saved or cyclic for bnkit that is not for torch: whatever torch frees without the collector,
    bnkit frees without it."""
    worse = [f for f in Lifetime._fields if (getattr(ours, f) or 0) > (getattr(theirs, f) or 0)]
    assert not worse and (ours.saved_after_backward is None) == (theirs.saved_after_backward is None), (
        f"bnkit keeps more ({', '.join(worse)}): bnkit {ours}, torch {theirs}")


def assert_same_lifetime(ours: Callable, theirs: Callable, make_x, backward=True, grad=None, hooks=True) -> None:
    assert_keeps_no_more(lifetime(ours, make_x, backward, grad, hooks), lifetime(theirs, make_x, backward, grad, hooks))


# ----------------------------------------------------------------------------- per-loop growth
def _size_of(value: Any) -> int | None:
    if isinstance(value, (type, types.ModuleType, types.FunctionType, types.MethodType, str, bytes)):
        return None
    if hasattr(value, "cache_info"):  # functools.lru_cache
        return value.cache_info().currsize
    if isinstance(value, _spares.SparePool):
        return len(value._entries)
    if isinstance(value, (dict, list, set, collections.deque, weakref.WeakKeyDictionary,
                          weakref.WeakValueDictionary, weakref.WeakSet)):
        return len(value)
    return None


def registry_sizes() -> dict[str, int]:
    """The size of every module-level container of every imported bnkit module (and of torch's global module-hook
    dicts), of the containers in bnkit's thread-local state, and the module-level upper-case counters and flags."""
    mods = [m for n, m in list(sys.modules.items()) if (n == "bnkit" or n.startswith("bnkit.")) and m is not None]
    mods.append(sys.modules["torch.nn.modules.module"])
    sizes = {}
    for mod in mods:
        for name, value in list(vars(mod).items()):
            if name.startswith("__"):
                continue
            key = f"{mod.__name__}.{name}"
            if isinstance(value, threading.local):
                for attr, v in vars(value).items():
                    size = _size_of(v)
                    if size is not None:
                        sizes[f"{key}.{attr}"] = size
                continue
            if isinstance(value, (bool, int)) and name.lstrip("_").isupper():
                sizes[key] = int(value)
                continue
            size = _size_of(value)
            if size is not None:
                sizes[key] = size
    return sizes


def instance_sizes(models) -> dict[str, int]:
    """The size of every container attribute (hook dicts, memories, ...) of every module of ``models``."""
    sizes = {}
    for i, model in enumerate(models):
        for name, m in model.named_modules():
            for attr, v in vars(m).items():
                size = _size_of(v)
                if size is not None:
                    sizes[f"model{i}.{name or '<root>'}.{attr}"] = size
    return sizes


class Growth(NamedTuple):
    objects: int  # growth of len(gc.get_objects()) over the loop
    garbage: int  # what gc.collect() finds after the loop
    changed: dict  # registries and module containers whose size changed: {name: (before, after)}


def _diff(a: dict, b: dict) -> dict:
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def growth(step: Callable[[], Any], n: int = N, models=()) -> Growth:
    """``step()`` ``n`` times (after three warm-up steps) with the collector off."""
    for _ in range(3):
        step()
    with gc_off():
        regs, inst = registry_sizes(), instance_sizes(models)
        before = len(gc.get_objects())
        for _ in range(n):
            step()
        objects = len(gc.get_objects()) - before
        changed = {**_diff(regs, registry_sizes()), **_diff(inst, instance_sizes(models))}
        return Growth(objects, gc.collect(), changed)


def assert_no_growth(ours: Growth, theirs: Growth) -> None:
    assert theirs.changed == {}, f"torch's twin loop changed {theirs.changed}"
    assert ours.changed == {}, f"bnkit's loop changed {ours.changed}"
    assert ours.garbage <= theirs.garbage, f"bnkit left {ours} garbage, torch {theirs}"
    assert ours.objects <= theirs.objects + SLACK, f"bnkit's loop grew the heap: bnkit {ours}, torch {theirs}"


def train_step(layer: Callable, make_x, backward: bool = True) -> Callable[[], None]:
    def step():
        y = layer(make_x())
        if backward:
            y.sum().backward()

    return step


# ----------------------------------------------------------------------------- the helpers catch planted defects
class _OutputOnCtx(torch.autograd.Function):
    """Planted defect: the context keeps its own output as an attribute (a cycle through Python objects)."""

    @staticmethod
    def forward(ctx, x):
        y = x * 2
        ctx.y = y
        return y

    @staticmethod
    def backward(ctx, g):
        return g * 2


_KEPT_CONTEXTS: list = []


class _CtxKeptGlobally(torch.autograd.Function):
    """Planted defect: the context (so its saved tensors) stays in a module-level list."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        _KEPT_CONTEXTS.append(ctx)
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


def test_lifetime_helper_sees_planted_defects():
    """A tensor hook capturing its own tensor (a C++-held cycle: never collected), a context holding its output (a
    Python cycle: garbage) and a context kept in a registry (its saved tensors alive) are all reported."""
    bn = nn.BatchNorm2d(3)
    make_x = make_input("2d")
    clean = Lifetime(0, False, False, 0, 0)
    assert lifetime(bn, make_x) == clean  # the oracle itself frees everything

    def hooked(x):
        y = bn(x)
        y.register_hook(lambda g, y=y: None)
        return y

    hooked_run = lifetime(hooked, make_x)
    assert hooked_run.output and hooked_run.input, hooked_run
    no_backward = lifetime(hooked, make_x, backward=False)
    assert no_backward.output and no_backward.saved > 0, no_backward

    on_ctx = lifetime(lambda x: _OutputOnCtx.apply(bn(x)), make_x)
    assert on_ctx.output and on_ctx.garbage > 0, on_ctx

    kept = lifetime(lambda x: _CtxKeptGlobally.apply(x), make_x, backward=False)
    _KEPT_CONTEXTS.clear()
    assert kept.saved > 0 and kept.input, kept

    def side_graph(x):  # a graph the backward does not run, held by the output: saved until the output dies
        y = bn(x)
        y.side = (x * 3).exp()
        return y

    side = lifetime(side_graph, make_x)
    assert side.saved_after_backward > 0 and side[1:] == (False, False, 0, 0), side


def test_growth_helper_sees_planted_defects(monkeypatch):
    """A bnkit registry filled per call, a reference cycle made per call and a module hook added per call are reported."""
    registry = types.ModuleType("bnkit._planted_registry")
    registry._CACHE = {}
    monkeypatch.setitem(sys.modules, registry.__name__, registry)
    bn = nn.BatchNorm2d(3)
    make_x = make_input("2d")
    base = growth(train_step(bn, make_x), n=50, models=[bn])
    assert base.changed == {} and base.garbage == 0 and base.objects <= SLACK, base

    def fills_registry():
        y = bn(make_x())
        registry._CACHE[len(registry._CACHE)] = y.detach()

    filled = growth(fills_registry, n=50)
    assert filled.changed == {"bnkit._planted_registry._CACHE": (3, 53)}, filled
    assert filled.objects >= 50, filled

    def makes_cycle():
        y = bn(make_x())
        box = [y]
        box.append(box)

    cyclic = growth(makes_cycle, n=50)
    assert cyclic.garbage >= 50 and cyclic.objects >= 50, cyclic

    def adds_hook():
        bn.register_forward_hook(lambda m, a, out: None)
        bn(make_x())

    hooked = growth(adds_hook, n=50, models=[bn])
    assert hooked.changed.get("model0.<root>._forward_hooks") == (3, 53), hooked


# ----------------------------------------------------------------------------- layers, per call
@pytest.mark.parametrize("backward", [True, False], ids=["backward", "forward_only"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("inp", list(INPUTS))
def test_layer_lifetime(backend, inp, mode, backward):
    """bnkit.BatchNorm1d/2d/3d: output, input and saved tensors freed when torch's are, and no garbage, on
    contiguous, channels-last and contiguous-and-channels-last inputs, in train and eval mode."""
    ndim = len(INPUTS[inp][0])
    c = INPUTS[inp][0][1]
    t, b = TORCH_BN_BY_RANK[ndim](c).train(mode == "train"), BNKIT_BN_BY_RANK[ndim](c).train(mode == "train")
    assert_same_lifetime(b, t, make_input(inp), backward)


@pytest.mark.parametrize("grad_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("inp", AMBIGUOUS)
def test_ambiguous_input_goes_through_the_hooked_function_and_frees(inp, mode, grad_format):
    """torch backend, an input both contiguous and channels-last: the call goes through _AmbiguousInput (its
    tensor hook on the output, _GradNote, reads the gradient's layout), and still frees all as torch does, for a
    gradient in either layout (the two branches of the note)."""
    shape, fmt = INPUTS[inp]
    c = shape[1]
    t, b = TORCH_BN_BY_RANK[len(shape)](c).train(mode == "train"), BNKIT_BN_BY_RANK[len(shape)](c).train(mode == "train")
    make_x = make_input(inp)
    grad = (lambda y: torch.ones_like(y)) if grad_format == "contiguous" else (
        lambda y: torch.ones_like(y).to(memory_format=fmt))
    with kernels.use_backend("torch"):
        assert "_AmbiguousInputBackward" in graph_nodes(b(make_x()))
        assert_same_lifetime(b, t, make_x, grad=grad)


# ----------------------------------------------------------------------------- bnkit.functional.batch_norm
@pytest.mark.parametrize("backward", [True, False], ids=["backward", "forward_only"])
@pytest.mark.parametrize("form", ["train_stats", "train_no_stats", "eval"])
@pytest.mark.parametrize("inp", ["1d_NCL", "2d", "2d_cl", "2d_cl_1x1", "3d_cl_1x1x1"])
def test_functional_lifetime(backend, inp, form, backward):
    """bnkit.functional.batch_norm frees as torch.nn.functional.batch_norm does (weight and bias with gradients)."""
    c = INPUTS[inp][0][1]

    def twin(fn):
        rm, rv = (None, None) if form == "train_no_stats" else (torch.zeros(c), torch.ones(c))
        w, bias = torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)
        return lambda x: fn(x, rm, rv, w, bias, form != "eval", 0.1, 1e-5)

    assert_same_lifetime(twin(bnkit.functional.batch_norm), twin(F.batch_norm), make_input(inp), backward)


@pytest.mark.parametrize("argument", ["eps", "momentum"])
def test_functional_tensor_hyperparameter_is_not_kept(backend, argument):
    """A 0-d tensor ``eps``/``momentum`` is dead once the caller drops it after the call, as after torch's F.batch_norm."""
    value = 1e-3 if argument == "eps" else 0.2

    def kept_after_call(fn) -> bool:
        with gc_off():
            hyper = torch.tensor(value)
            ref = weakref.ref(hyper)
            fn(torch.randn(4, 3, 2, 2), torch.zeros(3), torch.ones(3), training=True, **{argument: hyper})
            del hyper
            return ref() is not None

    if kept_after_call(F.batch_norm):  # the oracle (torch accepts a 0-d tensor there and keeps nothing) must hold
        raise RuntimeError("torch's F.batch_norm keeps a tensor eps/momentum: the oracle changed")
    assert not kept_after_call(bnkit.functional.batch_norm)


# ----------------------------------------------------------------------------- variants
def _mask_for(shape) -> torch.Tensor:
    mask = torch.ones((shape[0], *shape[2:]), dtype=torch.bool)
    if mask[0].numel() > 1:
        mask.view(shape[0], -1)[0, 0] = False  # a padded entry (with 1x1 inputs every entry is a sample: all valid)
    return mask


def _variant(name: str, c: int, shape) -> tuple[Callable, Callable]:
    """``(bnkit call, torch twin call)`` for one variant."""
    tbn = nn.BatchNorm2d(c)
    mask, domains = _mask_for(shape), torch.arange(shape[0]) % 2
    if name.startswith("BatchNormAct2d_"):
        act = {"ReLU": nn.ReLU, "ReLU6": nn.ReLU6, "Hardtanh": lambda: nn.Hardtanh(-1.0, 1.0), "SiLU": nn.SiLU,
               "Hardswish": nn.Hardswish, "GELU": nn.GELU}[name.split("_", 1)[1]]
        return BatchNormAct2d(c, act=act()), nn.Sequential(tbn, act())
    if name == "FrozenBatchNormAct2d_ReLU":
        return bnkit.freeze(BatchNormAct2d(c, act=nn.ReLU())), nn.Sequential(tbn, nn.ReLU())
    if name == "LazyBatchNorm2d":
        return bnkit.LazyBatchNorm2d(), nn.LazyBatchNorm2d()
    if name == "axis_last":
        layer = bnkit.BatchNorm(c, axis=-1)
        return (lambda x: layer(x.movedim(1, -1))), tbn
    layers = {
        "BatchRenorm2d": lambda: bnkit.BatchRenorm2d(c),
        "GhostBatchNorm2d": lambda: bnkit.GhostBatchNorm2d(c, virtual_batch_size=2),
        "share_affine_all": lambda: bnkit.BatchNorm2d(c, share_affine="all"),
        "share_affine_weight": lambda: bnkit.BatchNorm2d(c, share_affine="weight"),
        "SharedBatchNorm_site": lambda: bnkit.SharedBatchNorm(c, sites=2),
        "DomainBatchNorm2d_int": lambda: bnkit.DomainBatchNorm2d(c, num_domains=2),
        "DomainBatchNorm2d_tensor": lambda: bnkit.DomainBatchNorm2d(c, num_domains=2),
        "masked_BatchNorm2d": lambda: bnkit.BatchNorm2d(c),
        "masked_BatchRenorm2d": lambda: bnkit.BatchRenorm2d(c),
        "masked_GhostBatchNorm2d": lambda: bnkit.GhostBatchNorm2d(c, virtual_batch_size=2),
        "masked_SharedBatchNorm": lambda: bnkit.SharedBatchNorm(c, sites=2),
        "FrozenBatchNorm2d": lambda: bnkit.FrozenBatchNorm2d(c),
        "freeze_torch_layer": lambda: bnkit.freeze(nn.BatchNorm2d(c)),
        "convention_keras": lambda: bnkit.BatchNorm2d(c, convention="keras"),
        "momentum_None": lambda: bnkit.BatchNorm2d(c, momentum=None),
        "no_running_stats": lambda: bnkit.BatchNorm2d(c, track_running_stats=False),
        "affine_False": lambda: bnkit.BatchNorm2d(c, affine=False),
        "nonfinite_raise": lambda: bnkit.BatchNorm2d(c, nonfinite="raise"),
        "tiny_batch_running": lambda: bnkit.BatchNorm2d(c, tiny_batch="running"),
        "SyncBatchNorm_local": lambda: bnkit.SyncBatchNorm(c),
    }
    layer = layers[name]()
    calls = {
        "SharedBatchNorm_site": lambda x: layer(x, site=1),
        "DomainBatchNorm2d_int": lambda x: layer(x, domain=1),
        "DomainBatchNorm2d_tensor": lambda x: layer(x, domain=domains),
        "masked_SharedBatchNorm": lambda x: layer(x, site=1, mask=mask),
    }
    if name in calls:
        return calls[name], tbn
    if name.startswith("masked_"):
        return (lambda x: layer(x, mask)), tbn
    return layer, tbn


VARIANTS = [
    "BatchRenorm2d", "GhostBatchNorm2d", "share_affine_all", "share_affine_weight", "SharedBatchNorm_site",
    "DomainBatchNorm2d_int", "DomainBatchNorm2d_tensor", "masked_BatchNorm2d", "masked_BatchRenorm2d",
    "masked_GhostBatchNorm2d", "masked_SharedBatchNorm", "FrozenBatchNorm2d", "freeze_torch_layer",
    "BatchNormAct2d_ReLU", "BatchNormAct2d_ReLU6", "BatchNormAct2d_Hardtanh", "BatchNormAct2d_SiLU",
    "BatchNormAct2d_Hardswish", "BatchNormAct2d_GELU", "FrozenBatchNormAct2d_ReLU", "LazyBatchNorm2d",
    "convention_keras", "momentum_None", "no_running_stats", "affine_False", "nonfinite_raise", "tiny_batch_running",
    "SyncBatchNorm_local", "axis_last",
]


def modules_of(call: Callable) -> list[nn.Module]:
    """The module a call is, or the modules in its closure (a call such as ``lambda x: layer(x, mask)``)."""
    if isinstance(call, nn.Module):
        return [call]
    return [cell.cell_contents for cell in call.__closure__ or () if isinstance(cell.cell_contents, nn.Module)]


def _train(mode: str, *calls) -> None:
    for call in calls:
        for m in modules_of(call):
            m.train(mode == "train")


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("inp", INPUTS_2D)
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_lifetime(backend, variant, inp, mode):
    """Every variant (Batch Renorm, Ghost, shared affine, per-site, per-domain with an int or a per-sample domain
    tensor, masked calls, frozen and bnkit.freeze'd layers, fused activations, lazy, Keras convention, local
    SyncBatchNorm, ...) frees as torch's nn.BatchNorm2d (followed by the activation) does, with a backward and
    without one."""
    shape = INPUTS[inp][0]
    ours, theirs = _variant(variant, shape[1], shape)
    _train(mode, ours, theirs)
    for backward in (True, False):
        assert_same_lifetime(ours, theirs, make_input(inp), backward)


# ----------------------------------------------------------------------------- SyncBatchNorm's synchronized path
@pytest.fixture
def world_of_one(tmp_path):
    """A gloo process group of one rank; the test makes its SyncBatchNorm synchronize over it anyway (its
    ``_group`` patched on the instance), so that the synchronized autograd functions and collectives run."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=timedelta(seconds=20))
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backward", [True, False], ids=["backward", "forward_only"])
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
@pytest.mark.parametrize("inp", INPUTS_2D)
def test_sync_batch_norm_synchronized_lifetime(backend, world_of_one, inp, masked, backward):
    """bnkit.SyncBatchNorm on its synchronized path (_SyncBatchNormFunction / _SyncMaskedFunction, whose contexts
    hold the communicator) frees as torch's nn.BatchNorm2d does."""
    shape = INPUTS[inp][0]
    layer = bnkit.SyncBatchNorm(shape[1])
    layer._group = lambda: (world_of_one, 1)
    mask = _mask_for(shape)
    ours = (lambda x: layer(x, mask)) if masked else layer
    make_x = make_input(inp)
    node = "_SyncMaskedFunctionBackward" if masked else "_SyncBatchNormFunctionBackward"
    assert node in graph_nodes(ours(make_x()))
    assert_same_lifetime(ours, nn.BatchNorm2d(shape[1]), make_x, backward)


# ----------------------------------------------------------------------------- bnkit.accelerate on torch's BN
@pytest.mark.parametrize("how", ["accelerated_block", "accelerate_global"])
@pytest.mark.parametrize("backward", [True, False], ids=["backward", "forward_only"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("inp", ["1d_NCL", "2d", "2d_cl", "2d_cl_1x1", "3d_cl"])
def test_accelerated_torch_bn_lifetime(accelerate_off, inp, mode, backward, how):
    """torch's own nn.BatchNorm served by bnkit's kernels (``with bnkit.accelerated():`` or ``bnkit.accelerate()``)
    frees as the same layer on ATen's kernels does."""
    if not kernels.cpp_available():
        pytest.skip("the C++ extension is not available here")
    shape = INPUTS[inp][0]
    layer = TORCH_BN_BY_RANK[len(shape)](shape[1]).train(mode == "train")
    make_x = make_input(inp)
    theirs = lifetime(layer, make_x, backward)
    if how == "accelerate_global":
        bnkit.accelerate(True)
        ours = lifetime(layer, make_x, backward)
        bnkit.accelerate(False)
    else:
        with bnkit.accelerated():
            ours = lifetime(layer, make_x, backward)
    counts = bnkit.accelerate_counts()
    assert counts["forward"] + counts["forward_aten"] > 0  # the override served the calls
    assert_keeps_no_more(ours, theirs)


# ----------------------------------------------------------------------------- activation checkpointing
def small_net(kind: str, bn: str = "BatchNorm2d") -> nn.Module:
    """conv, BN, ReLU, conv, BN, linear head: torch's layers or bnkit's (``bn`` names the bnkit class)."""
    torch.manual_seed(0)
    if kind == "torch":
        norm = lambda c: nn.BatchNorm2d(c)
    else:
        norm = {
            "BatchNorm2d": lambda c: bnkit.BatchNorm2d(c),
            "BatchRenorm2d": lambda c: bnkit.BatchRenorm2d(c),
            "GhostBatchNorm2d": lambda c: bnkit.GhostBatchNorm2d(c, virtual_batch_size=4),
            "BatchNormAct2d": lambda c: BatchNormAct2d(c, act=nn.ReLU()),
        }[bn]
    return nn.Sequential(nn.Conv2d(3, 4, 1), norm(4), nn.ReLU(), nn.Conv2d(4, 4, 1), norm(4), nn.Flatten(),
                         nn.Linear(64, 5))


def net_input(requires_grad: bool = True, seed: int = 0) -> torch.Tensor:
    return torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(seed)).requires_grad_(requires_grad)


@pytest.mark.parametrize("bn", ["BatchNorm2d", "BatchRenorm2d", "GhostBatchNorm2d", "BatchNormAct2d"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpoint_lifetime(backend, reentrant, bn):
    """torch.utils.checkpoint over bnkit layers frees as over torch's layers, and leaves no more garbage (torch's
    checkpoint itself leaves some: its frames' cycles)."""
    ours, theirs = small_net("bnkit", bn), small_net("torch")
    call = lambda net: (lambda x: checkpoint(net, x, use_reentrant=reentrant))
    assert_same_lifetime(call(ours), call(theirs), net_input, hooks=False)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpoint_does_not_grow(backend, reentrant):
    """Checkpointed training steps over bnkit layers (BatchRenorm's remembered corrections included) grow nothing."""
    ours, theirs = small_net("bnkit", "BatchRenorm2d"), small_net("torch")
    step = lambda net: (lambda: checkpoint(net, net_input(), use_reentrant=reentrant).sum().backward())
    assert_no_growth(growth(step(ours), N_TOOL, [ours]), growth(step(theirs), N_TOOL, [theirs]))


def test_batch_renorm_recompute_memory_is_bounded(backend):
    """BatchRenorm remembers the (r, d) of forwards that checkpointing may recompute: none in a plain training
    loop (torch keeps nothing either), at most one per step under checkpointing with backward, and at most
    _RECOMPUTE_MEMORY per-channel entries without a graph where no backward follows (training under no_grad)."""
    from bnkit.variants.renorm import _RECOMPUTE_MEMORY

    layer = bnkit.BatchRenorm2d(3)
    make_x = make_input("2d")
    memory = lambda: layer.__dict__.get("_recompute_memory", ())
    for _ in range(20):
        layer(make_x()).sum().backward()
    assert len(memory()) == 0
    for _ in range(20):
        checkpoint(layer, make_x(), use_reentrant=False).sum().backward()
    assert len(memory()) <= 1
    with torch.no_grad():
        for _ in range(3 * _RECOMPUTE_MEMORY):
            layer(make_x())
    assert len(memory()) == _RECOMPUTE_MEMORY
    for entry in memory():
        for t in entry[:4]:
            assert t.shape == (3,) and t.grad_fn is None and not t.requires_grad


# ----------------------------------------------------------------------------- per-call growth
GROWTH_CASES = ["BatchNorm", "functional", "BatchRenorm2d", "GhostBatchNorm2d", "DomainBatchNorm2d_tensor",
                "masked_BatchNorm2d", "BatchNormAct2d_ReLU", "FrozenBatchNorm2d", "SharedBatchNorm_site",
                "convention_keras", "SyncBatchNorm_local"]


GROWTH_PARAMS = [(case, inp) for case in GROWTH_CASES[:2] for inp in ("1d_NCL", "2d", "2d_cl", "2d_cl_1x1", "3d_cl_1x1x1")]
GROWTH_PARAMS += [(case, inp) for case in GROWTH_CASES[2:] for inp in ("2d_cl", "2d_cl_1x1")]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(("case", "inp"), GROWTH_PARAMS)
def test_calls_do_not_grow(backend, case, inp, mode):
    """N calls (N_VARIANT for the variants; train: with backward; eval: forward of an input that requires grad)
    grow neither bnkit's registries nor the layer's containers nor the heap, and leave no garbage, as torch's twin
    loop."""
    shape = INPUTS[inp][0]
    n = N if case in GROWTH_CASES[:2] else N_VARIANT
    c = shape[1]
    theirs = TORCH_BN_BY_RANK[len(shape)](c)
    if case == "BatchNorm":
        ours = BNKIT_BN_BY_RANK[len(shape)](c)
    elif case == "functional":
        rm, rv, w, b = torch.zeros(c), torch.ones(c), torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)
        ours = lambda x: bnkit.functional.batch_norm(x, rm, rv, w, b, mode == "train")
    else:
        ours, theirs = _variant(case, c, shape)
    _train(mode, ours, theirs)
    make_x = make_input(inp)
    backward = mode == "train"
    assert_no_growth(growth(train_step(ours, make_x, backward), n, modules_of(ours)),
                     growth(train_step(theirs, make_x, backward), n, modules_of(theirs)))


@pytest.mark.parametrize("inp", ["2d", "2d_cl", "2d_cl_1x1"])
def test_accelerated_calls_do_not_grow(accelerate_off, inp):
    """torch's nn.BatchNorm2d under ``bnkit.accelerated()`` grows nothing, as on ATen's kernels."""
    if not kernels.cpp_available():
        pytest.skip("the C++ extension is not available here")
    layer = nn.BatchNorm2d(INPUTS[inp][0][1])
    step = train_step(layer, make_input(inp))
    theirs = growth(step, models=[layer])
    with bnkit.accelerated():
        ours = growth(step, models=[layer])
    assert_no_growth(ours, theirs)


# ----------------------------------------------------------------------------- tools that wrap calls
def pool_sizes() -> tuple[int, ...]:
    """Entries of the loop tools' spare-tensor pools (one per live buffer they served) and of the fused
    activations' hand-over table."""
    return (len(accumulate._TOTALS._entries), len(accumulate._BASES._entries), len(_spares._COPIES._entries),
            len(act_module._PENDING))


def _step(model: nn.Module, seed: int = 0) -> None:
    model(net_input(seed=seed)).sum().backward()


def _step_then_raise(block, model: nn.Module) -> None:
    """A training step inside ``block``, which then raises (and the exception is handled outside)."""
    with contextlib.suppress(KeyError):
        with block:
            _step(model)
            raise KeyError("inside the block")


def _tool_uses() -> dict[str, Callable[[nn.Module], Any]]:
    """tool name -> a use of it on a model (what it returns the caller drops with the model)."""
    batches = [net_input(False, seed=s) for s in range(2)]

    def accumulate_nested(m):
        with bnkit.accumulate_stats(m):
            with bnkit.accumulate_stats(m):
                _step(m)
            with bnkit.preserve_stats(m):
                _step(m, 1)

    def checkpoint_safe(m, reentrant=False):
        with bnkit.checkpoint_safe(m):
            checkpoint(m, net_input(), use_reentrant=reentrant).sum().backward()

    def checkpoint_safe_kept(m):
        handle = bnkit.checkpoint_safe(m)
        checkpoint(m, net_input(), use_reentrant=False).sum().backward()
        return handle

    def adapt(m, mode="reestimate", restore=True, **kw):
        m.eval()
        handle = bnkit.adapt(m, batches, mode=mode, **kw)
        m(batches[0])
        if restore:
            handle.restore()
        return handle

    def adapt_with(m):
        m.eval()
        with bnkit.adapt(m, batches, mode="online", window=2):
            m(batches[0])

    def tent(m, restore=True):
        m.eval()
        _, handle = bnkit.tent(m, batches, steps=2)
        if restore:
            handle.restore()
        return handle

    def preserve(m):
        with bnkit.preserve_stats(m):
            _step(m)

    def accumulate_(m):
        with bnkit.accumulate_stats(m):
            _step(m)
            _step(m, 1)

    def freeze(m):
        frozen = bnkit.freeze(m)
        _step(frozen)
        return frozen

    def freeze_unfreeze(m):
        model = bnkit.unfreeze(bnkit.freeze(m))
        _step(model)
        return model

    def convert(m):
        model = bnkit.convert(m)
        _step(model)
        return model

    return {
        "train_step": _step,
        "preserve_stats": preserve,
        "preserve_stats_raises": lambda m: _step_then_raise(bnkit.preserve_stats(m), m),
        "accumulate_stats": accumulate_,
        "accumulate_stats_nested": accumulate_nested,
        "accumulate_stats_raises": lambda m: _step_then_raise(bnkit.accumulate_stats(m), m),
        "checkpoint_safe": checkpoint_safe,
        "checkpoint_safe_reentrant": lambda m: checkpoint_safe(m, True),
        "checkpoint_safe_handle_kept": checkpoint_safe_kept,
        "adapt_reestimate_restore": adapt,
        "adapt_reestimate_handle_kept": lambda m: adapt(m, restore=False),
        "adapt_prior_restore": lambda m: adapt(m, "prior"),
        "adapt_online_restore": lambda m: adapt(m, "online"),
        "adapt_online_momentum_restore": lambda m: adapt(m, "online", momentum=0.5),
        "adapt_online_with_block": adapt_with,
        "tent_restore": tent,
        "tent_handle_kept": lambda m: tent(m, restore=False),
        "recalibrate": lambda m: bnkit.recalibrate(m, batches),
        "freeze": freeze,
        "freeze_unfreeze": freeze_unfreeze,
        "convert": convert,
    }


# what torch does for the same work without the tool: a training step, or a checkpointed one
_ORACLE_USE = {"checkpoint_safe": "checkpoint", "checkpoint_safe_reentrant": "checkpoint_reentrant",
               "checkpoint_safe_handle_kept": "checkpoint"}
_ORACLES = {
    "train_step": _step,
    "checkpoint": lambda m: checkpoint(m, net_input(), use_reentrant=False).sum().backward(),
    "checkpoint_reentrant": lambda m: checkpoint(m, net_input(), use_reentrant=True).sum().backward(),
}


class ModelLifetime(NamedTuple):
    alive: list  # the model's modules, parameters and buffers still alive after the caller dropped it
    garbage: int
    pools_back: bool  # the spare pools are as they were before the model existed


def _model_lifetime_once(build, use) -> ModelLifetime:
    with gc_off():
        pools = pool_sizes()
        model = build()
        refs = {f"module {n or '<root>'}": weakref.ref(m) for n, m in model.named_modules()}
        refs.update({n: weakref.ref(t) for n, t in itertools.chain(model.named_parameters(), model.named_buffers())})
        kept = use(model)
        del model, kept
        alive = sorted(n for n, r in refs.items() if r() is not None)
        return ModelLifetime(alive, gc.collect(), pool_sizes() == pools)


def model_lifetime(build, use) -> ModelLifetime:
    _model_lifetime_once(build, use)
    return _model_lifetime_once(build, use)


TOOLS = list(_tool_uses())


@pytest.mark.parametrize("tool", TOOLS)
def test_tool_releases_the_model(tool, kind):
    """After a tool has wrapped some calls (and its handle, if any, is dropped with the model), every module,
    parameter and buffer of the model is freed by reference counting, with no more garbage than torch's same work
    without the tool, and the spare pools hold nothing for the dead buffers."""
    use = _tool_uses()[tool]
    oracle = model_lifetime(lambda: small_net("torch"), _ORACLES[_ORACLE_USE.get(tool, "train_step")])
    assert oracle.alive == [] and oracle.pools_back
    ours = model_lifetime(lambda: small_net(kind), use)
    assert ours.alive == [] and ours.pools_back and ours.garbage <= oracle.garbage, (
        f"{tool} on a {kind} model: {ours}, torch without it: {oracle}")


def test_adapt_online_model_dropped_without_restore_is_freed(kind):
    """A model adapted online and then dropped with its handle (never restored: it was to adapt forever) is freed
    by reference counting, as a torch model carrying torch's own forward pre-hook tools (torch.nn.utils.prune) is."""

    def pruned(m):
        prune.l1_unstructured(m[0], "weight", amount=0.5)
        _step(m)

    oracle = model_lifetime(lambda: small_net(kind), pruned)
    if oracle != ModelLifetime([], 0, True):
        raise RuntimeError(f"the oracle changed: {oracle}")
    ours = model_lifetime(lambda: small_net(kind), _adapt_online_kept)
    assert ours == oracle, f"bnkit {ours}, torch {oracle}"


def _adapt_online_kept(m: nn.Module):
    m.eval()
    handle = bnkit.adapt(m, [net_input(False)], mode="online")
    m(net_input(False, seed=1))
    return handle


def test_spare_pools_follow_their_buffers():
    """The loop tools' pools keep one spare per buffer they served while the buffer lives (reused: a second block
    adds none) and nothing once it died."""
    base = pool_sizes()
    for kind in ("torch", "bnkit"):
        with gc_off():
            model = small_net(kind)
            for _ in range(2):
                with bnkit.accumulate_stats(model):
                    _step(model)
                with bnkit.preserve_stats(model):
                    _step(model)
            during = pool_sizes()
            # preserve_stats: a copy per buffer (3 per BN layer); accumulate_stats: the totals per layer
            assert during[2] - base[2] == 6 and during[0] - base[0] == 2, during
            del model
            assert pool_sizes() == base


def test_domain_block_does_not_keep_the_domain_tensor(backend):
    """``with bnkit.domain(model, d):`` with a per-sample domain tensor: once the block is left, the tensor is freed
    when the caller drops it (the layers' previous current_domain is back)."""
    model = bnkit.convert_domain_bn(small_net("bnkit"), num_domains=2)
    with gc_off():
        domains = torch.arange(8) % 2
        ref = weakref.ref(domains)
        with bnkit.domain(model, domains):
            _step(model)
        del domains
        assert ref() is None


def test_freeze_and_convert_release_the_replaced_layers():
    """bnkit.freeze (values copied) and bnkit.convert in place (tensors taken over) leave nothing of the replaced
    layer alive but what the new model uses; a converted copy holds nothing of the original."""
    with gc_off():
        model = small_net("torch")
        old = weakref.ref(model[1])
        old_mean = weakref.ref(model[1].running_mean)
        bnkit.freeze(model)
        assert old() is None and old_mean() is None
        for to in ("bnkit", "torch"):
            model = small_net("torch" if to == "bnkit" else "bnkit")
            old, old_mean = weakref.ref(model[1]), weakref.ref(model[1].running_mean)
            bnkit.convert(model, to, inplace=True)
            assert old() is None and model[1].running_mean is old_mean()  # the layer replaced, its tensors taken over
            copy = bnkit.convert(model, "torch" if to == "bnkit" else "bnkit")  # a converted deep copy ...
            old = weakref.ref(model[1])
            del model  # ... holds nothing of the original
            assert old() is None and old_mean() is None
            del copy


# ----------------------------------------------------------------------------- tools, per block
def _growth_uses() -> dict[str, tuple[Callable, Callable]]:
    """tool -> (setup(model) -> teardown, step(model)): what N_TOOL steps repeat on one model."""
    uses = _tool_uses()
    nothing = lambda m: (lambda: None)

    def online(m, **kw):
        m.eval()
        handle = bnkit.adapt(m, [net_input(False)], mode="online", **kw)
        return handle.restore

    def checkpoint_safe(m):
        return bnkit.checkpoint_safe(m).remove

    eval_forward = lambda m: m(net_input(False))
    return {
        "preserve_stats": (nothing, uses["preserve_stats"]),
        "accumulate_stats": (nothing, uses["accumulate_stats"]),
        "accumulate_stats_nested": (nothing, uses["accumulate_stats_nested"]),
        "accumulate_stats_raises": (nothing, uses["accumulate_stats_raises"]),
        "checkpoint_safe": (checkpoint_safe, _ORACLES["checkpoint"]),
        "adapt_restore_cycle": (nothing, uses["adapt_reestimate_restore"]),
        "adapt_online_cycle": (nothing, uses["adapt_online_restore"]),
        "adapt_online_forwards": (online, eval_forward),
        "adapt_online_window_forwards": (lambda m: online(m, window=3), eval_forward),
        "tent_restore_cycle": (nothing, uses["tent_restore"]),
    }


_GROWTH_ORACLE = {"checkpoint_safe": "checkpoint", "adapt_online_forwards": "eval_forward",
                  "adapt_online_window_forwards": "eval_forward"}


@pytest.mark.parametrize("tool", list(_growth_uses()))
def test_tool_blocks_do_not_grow(tool, kind):
    """Repeated blocks (or forwards under an online adaptation) on one model grow neither bnkit's registries and
    pools nor the model's hook dicts and containers nor the heap, as torch's same work without the tool."""
    setup, step = _growth_uses()[tool]
    oracle_model, model = small_net("torch"), small_net(kind)
    name = _GROWTH_ORACLE.get(tool, "train_step")
    oracle_step = (lambda m: m.eval()(net_input(False))) if name == "eval_forward" else _ORACLES[name]
    theirs = growth(lambda: oracle_step(oracle_model), N_TOOL, [oracle_model])
    teardown = setup(model)
    try:
        ours = growth(lambda: step(model), N_TOOL, [model])
    finally:
        teardown()
    assert_no_growth(ours, theirs)


def test_shared_activation_hand_over_is_bounded(backend):
    """A BN layer fused with a shared ReLU (bnkit.convert(..., fuse_activations=True)) leaves at most one weakly
    referenced hand-over entry per activation module, gone with the module; outputs are freed as torch's are."""

    class Block(nn.Module):
        def __init__(self, bn):
            super().__init__()
            self.conv, self.bn, self.relu = nn.Conv2d(3, 3, 1), bn, nn.ReLU()

        def forward(self, x):
            return self.relu(self.relu(self.bn(self.conv(x))) + x)

    def unhanded(block):  # the block's BN output, never handed to the shared module
        return lambda x: block.bn(block.conv(x))

    base = len(act_module._PENDING)
    fused = bnkit.convert(Block(nn.BatchNorm2d(3)), fuse_activations=True)
    assert isinstance(fused.bn, BatchNormAct2d) and fused.bn.fused_activation() is not None
    twin = Block(nn.BatchNorm2d(3))
    make_x = make_input("2d")
    for mode in ("train", "eval"):
        _train(mode, fused, twin)
        assert_same_lifetime(fused, twin, make_x)
        # the fused layer's output never handed to the shared module: its entry waits, holding a weak reference
        assert_same_lifetime(unhanded(fused), unhanded(twin), make_x)
        assert len(act_module._PENDING) <= base + 1
    assert_no_growth(growth(train_step(fused, make_x), models=[fused]), growth(train_step(twin, make_x), models=[twin]))
    with gc_off():
        unhanded(fused)(make_x())  # an entry is waiting ...
        assert len(act_module._PENDING) == base + 1
        del fused  # ... and goes with the module
        assert len(act_module._PENDING) == base


def test_registry_scan_sees_bnkit_state():
    """The growth audit's registry scan covers the state named in the source: the spare pools, the fused
    activations' table, the call-spec cache and the running-update hook's thread-local state and counters."""
    sizes = registry_sizes()
    for key in ("bnkit.tools.accumulate._TOTALS", "bnkit.tools.accumulate._BASES", "bnkit.tools._spares._COPIES",
                "bnkit.variants.act._PENDING", "bnkit._engine_spec.cached_call_spec", "bnkit.family._FAMILIES",
                "bnkit.engine._HOOKED_THREADS", "bnkit.engine._ANY_HOOK", "bnkit.tools.accumulate._BLOCKS.stack",
                "bnkit.tools.accumulate._BLOCKS.excluded", "torch.nn.modules.module._global_forward_hooks"):
        assert key in sizes, key
    assert cached_call_spec.cache_info().maxsize is not None  # bounded (and keyed by plain numbers only)
