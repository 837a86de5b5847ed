"""Every bnkit layer and variant through torch's deployment and transform tools.

The gaps left by ``test_export.py``, ``test_torchscript.py``, ``test_compile*.py``,
``test_func.py``, ``test_quantization.py`` and ``test_ecosystem_edges.py``: BatchNorm1d
(both ranks) and 3d, the torch arguments (``momentum=None``, ``affine=False``,
``track_running_stats=False``, ``bias=False``), SyncBatchNorm on one process,
BatchNormAct / FrozenBatchNormAct, SharedBatchNorm (per-site and pooled
statistics), FrozenSharedBatchNorm, DomainBatchNorm, ``convention="keras"``,
next to share_affine, ``axis=-1``, Batch Renorm, Ghost BN and frozen BN, through

* ``torch.export.export`` with a dynamic batch (run on other batch sizes, train and eval),
* both ONNX exporters, run in onnxruntime on another batch size,
* ``torch.jit.script`` and ``torch.jit.trace``, each saved and loaded through ``io.BytesIO``,
* ``torch.compile`` with the ``eager`` and ``aot_eager`` backends (inductor: one slow case),
* ``torch.func`` (``functional_call``, ``vmap`` over a stack of batches in eval, ``grad`` in training),
* ``torch.ao.quantization`` (eager fusion + prepare/convert, FX ``prepare_fx``/``convert_fx``).

Oracle: the same model built with torch's layers (nn.BatchNorm*d, nn.SyncBatchNorm, a torch BN
followed by the activation, a torch BN called at every site for pooled shared statistics, a torch BN
in eval for the frozen layers), holding the same parameters and buffers; for the variants torch has
no counterpart of, the same bnkit model run eagerly. Outputs, input and parameter gradients and the
running statistics (``num_batches_tracked`` included) are compared after each step.

Not repeated here, because torch cannot do it either: ``torch.func.grad`` of a training call of
SharedBatchNorm with per-site statistics or of DomainBatchNorm (an in-place update of a row of a
captured buffer, which functorch refuses as it refuses ``buf[i].add_(1)``).
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.ao.quantization as tq
from _compare import assert_close
from torch import nn
from torch.func import functional_call, grad, vmap

import bnkit
from bnkit.variants import BatchNormAct2d, FrozenBatchNormAct2d

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning", "ignore::RuntimeWarning"
)

TOL = 2e-5
SHAPES = {"1d": (6,), "1dseq": (3, 10), "2d": (3, 8, 8), "3d": (3, 5, 6, 6)}


@pytest.fixture(autouse=True)
def _quiet_exporters():
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


# --------------------------------------------------------------------------- models
def _front(kind: str) -> nn.Module:
    return {"1d": lambda: nn.Linear(6, 4), "1dseq": lambda: nn.Conv1d(3, 4, 3),
            "2d": lambda: nn.Conv2d(3, 4, 3), "3d": lambda: nn.Conv3d(3, 4, 3)}[kind]()


class Sites(nn.Module):
    """conv -> bn(site 0) -> ReLU -> conv -> bn(site 1): one BN layer used at two places."""

    def __init__(self, bn: nn.Module, keyword: bool = True) -> None:
        super().__init__()
        self.c1, self.c2, self.bn, self.keyword = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1), bn, keyword

    def _bn(self, x, site):
        return self.bn(x, site=site) if self.keyword else self.bn(x)

    def forward(self, x):
        return self._bn(self.c2(torch.relu(self._bn(self.c1(x), 0))), 1)


class Domain(nn.Module):
    """conv -> DomainBatchNorm(domain=1) -> ReLU."""

    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 4, 3), bn

    def forward(self, x):
        return torch.relu(self.bn(self.c1(x), domain=1))


class ChannelsLast(nn.Module):
    """conv -> (N, H, W, C) -> BN over the last axis -> ReLU."""

    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 4, 3), bn

    def forward(self, x):
        return torch.relu(self.bn(self.c1(x).permute(0, 2, 3, 1)))


def _seq(kind: str, bn: nn.Module, act: nn.Module | None = None) -> nn.Module:
    return nn.Sequential(_front(kind), bn, nn.ReLU() if act is None else act)


@dataclass
class Case:
    make: Callable[[], nn.Module]  # the bnkit model
    oracle: Callable[[], nn.Module] | None = None  # the torch model (same state_dict keys); None: eager bnkit
    kind: str = "2d"
    frozen: bool = False  # the oracle is torch's BN in eval whatever the mode
    scriptable: bool = True
    torch_bn: bool = False  # a BN torch's quantization handles (an exact torch twin)


CASES: dict[str, Case] = {
    "BatchNorm1d(N,C)": Case(lambda: _seq("1d", bnkit.BatchNorm1d(4)), lambda: _seq("1d", nn.BatchNorm1d(4)),
                             "1d", torch_bn=True),
    "BatchNorm1d(N,C,L)": Case(lambda: _seq("1dseq", bnkit.BatchNorm1d(4)),
                               lambda: _seq("1dseq", nn.BatchNorm1d(4)), "1dseq", torch_bn=True),
    "BatchNorm2d": Case(lambda: _seq("2d", bnkit.BatchNorm2d(4)), lambda: _seq("2d", nn.BatchNorm2d(4)),
                        torch_bn=True),
    "BatchNorm3d": Case(lambda: _seq("3d", bnkit.BatchNorm3d(4)), lambda: _seq("3d", nn.BatchNorm3d(4)), "3d",
                        torch_bn=True),
    "momentum=None": Case(lambda: _seq("2d", bnkit.BatchNorm2d(4, momentum=None)),
                          lambda: _seq("2d", nn.BatchNorm2d(4, momentum=None))),
    "affine=False": Case(lambda: _seq("2d", bnkit.BatchNorm2d(4, affine=False)),
                         lambda: _seq("2d", nn.BatchNorm2d(4, affine=False))),
    "track_running_stats=False": Case(lambda: _seq("2d", bnkit.BatchNorm2d(4, track_running_stats=False)),
                                      lambda: _seq("2d", nn.BatchNorm2d(4, track_running_stats=False))),
    "bias=False": Case(lambda: _seq("2d", bnkit.BatchNorm2d(4, bias=False)),
                       lambda: _seq("2d", nn.BatchNorm2d(4, bias=False)), torch_bn=True),
    "SyncBatchNorm": Case(lambda: _seq("2d", bnkit.SyncBatchNorm(4)), lambda: _seq("2d", nn.SyncBatchNorm(4)),
                          scriptable=False),
    "BatchNormAct2d(ReLU)": Case(lambda: nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act=nn.ReLU())),
                                 lambda: _seq("2d", nn.BatchNorm2d(4))),
    "BatchNormAct2d(SiLU)": Case(lambda: nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act=nn.SiLU())),
                                 lambda: _seq("2d", nn.BatchNorm2d(4), nn.SiLU())),
    "FrozenBatchNorm2d": Case(lambda: _seq("2d", bnkit.FrozenBatchNorm2d(4)), lambda: _seq("2d", nn.BatchNorm2d(4)),
                              frozen=True),
    "FrozenBatchNormAct2d(SiLU)": Case(
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNormAct2d(4, act=nn.SiLU())),
        lambda: _seq("2d", nn.BatchNorm2d(4), nn.SiLU()), frozen=True),
    "SharedBatchNorm(share_stats)": Case(lambda: Sites(bnkit.SharedBatchNorm(4, sites=2, share_stats=True)),
                                         lambda: Sites(nn.BatchNorm2d(4), keyword=False), scriptable=False),
    "SharedBatchNorm(per site)": Case(lambda: Sites(bnkit.SharedBatchNorm(4, sites=2)), scriptable=False),
    "FrozenSharedBatchNorm": Case(lambda: Sites(bnkit.FrozenSharedBatchNorm(4, sites=2)), scriptable=False),
    "DomainBatchNorm2d": Case(lambda: Domain(bnkit.DomainBatchNorm2d(4, num_domains=2)), scriptable=False),
    "share_affine=weight": Case(lambda: _seq("2d", bnkit.BatchNorm2d(4, share_affine="weight"))),
    "share_affine=all": Case(lambda: _seq("2d", bnkit.BatchNorm2d(4, share_affine="all"))),
    "axis=-1": Case(lambda: ChannelsLast(bnkit.BatchNorm(4, axis=-1))),
    "BatchRenorm2d": Case(lambda: _seq("2d", bnkit.BatchRenorm2d(4, schedule="fixed", r_max=1.5, d_max=0.5,
                                                                 momentum=0.3)), scriptable=False),
    "GhostBatchNorm2d": Case(lambda: _seq("2d", bnkit.GhostBatchNorm2d(4, virtual_batch_size=2)), scriptable=False),
    "convention=keras": Case(lambda: _seq("2d", bnkit.BatchNorm2d(4, convention="keras")), scriptable=False),
}
NAMES = list(CASES)
TWINNED = [n for n in NAMES if CASES[n].oracle is not None]

def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN parameters and statistics (every tensor named like a BN's, outside conv/linear)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                continue
            for name in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(m, name, None)
                if isinstance(t, torch.Tensor):
                    if name in ("weight", "running_var"):
                        t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                    else:
                        t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    return model


def _pair(name: str) -> tuple[nn.Module, nn.Module]:
    """The bnkit model and its oracle (a torch model with the same state, or a copy of the bnkit model)."""
    case = CASES[name]
    torch.manual_seed(0)
    model = _randomize(case.make())
    if case.oracle is None:
        return model, copy.deepcopy(model)
    oracle = case.oracle()
    oracle.load_state_dict(model.state_dict())
    return model, oracle


def _x(name: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPES[CASES[name].kind], generator=g) * 2 + 1


def _mode(name: str, oracle: nn.Module, train: bool) -> None:
    oracle.train(train and not CASES[name].frozen)


def _check_state(name: str, got: nn.Module, oracle: nn.Module, what: str) -> None:
    ref = oracle.state_dict()
    mine = {k.replace("_orig_mod.", ""): v for k, v in got.state_dict().items()}
    assert set(mine) == set(ref), (what, set(mine) ^ set(ref))
    for k, v in ref.items():
        assert_close(mine[k], v, TOL, f"{what} {k}")


def _grad_scale(params: dict) -> float:
    """The largest parameter gradient: the scale of the rounding in them all (a conv bias before a BN in
    training has an exact gradient of 0, and only rounding of that size)."""
    return max(p.grad.abs().max().item() for p in params.values())


def _steps(name: str, run: Callable, oracle: nn.Module, train: bool, sizes, grads: bool, params=None,
           state_of: nn.Module | None = None) -> None:
    """Runs ``run`` and ``oracle`` on batches of ``sizes``: outputs, (input and parameter) gradients, state."""
    _mode(name, oracle, train)
    for i, n in enumerate(sizes):
        x = _x(name, n, seed=10 + i)
        xa, xb = x.clone().requires_grad_(grads), x.clone().requires_grad_(grads)
        y, y_ref = run(xa), oracle(xb)
        assert_close(y, y_ref, TOL, f"step {i} output")
        if grads:
            r = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(i))
            for p in [*(params or {}).values(), *oracle.parameters()]:
                p.grad = None
            (y * r).sum().backward()
            (y_ref * r).sum().backward()
            assert_close(xa.grad, xb.grad, TOL, f"step {i} input grad")
            if params is not None:
                theirs = dict(oracle.named_parameters())
                scale = _grad_scale(theirs)
                for k, p in params.items():
                    assert_close(p.grad, theirs[k].grad, TOL, f"step {i} grad {k}", scale)
        if state_of is not None:
            _check_state(name, state_of, oracle, f"step {i}")


# --------------------------------------------------------------------------- torch.export
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", NAMES)
def test_export_dynamic_batch_runs_other_batch_sizes(name, train):
    model, oracle = _pair(name)
    model.train(train)
    if name == "GhostBatchNorm2d" and train:
        # The virtual batches are a Python split of the batch: a training program is for one batch size.
        with pytest.raises(Exception, match="batch"):
            torch.export.export(copy.deepcopy(model), (_x(name, 4, 0),),
                                dynamic_shapes=({0: torch.export.Dim("batch", min=2)},))
        program = torch.export.export(copy.deepcopy(model), (_x(name, 4, 0),)).module()
        _steps(name, program, oracle, train, (4, 4, 4), False, state_of=program)
        return
    program = torch.export.export(copy.deepcopy(model), (_x(name, 4, 0),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=2)},)).module()
    _steps(name, program, oracle, train, (3, 5, 6), False, state_of=program)


@pytest.mark.parametrize("name", ["BatchNorm3d", "SharedBatchNorm(per site)", "DomainBatchNorm2d", "BatchRenorm2d",
                                  "convention=keras"])
def test_export_training_program_decomposes_to_aten(name):
    model, oracle = _pair(name)
    program = torch.export.export(copy.deepcopy(model).train(), (_x(name, 4, 0),)).run_decompositions()
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("bnkit" in t for t in targets), targets
    module = program.module()
    _steps(name, module, oracle, True, (4, 4), False, state_of=module)


# --------------------------------------------------------------------------- ONNX
def _ort():
    pytest.importorskip("onnx")
    return pytest.importorskip("onnxruntime")


def _run_onnx(rt, path, x: torch.Tensor) -> torch.Tensor:
    session = rt.InferenceSession(str(path))
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("name", NAMES)
def test_onnx_torchscript_exporter_dynamic_batch_in_onnxruntime(name, tmp_path):
    rt = _ort()
    model, oracle = _pair(name)
    model.eval()
    _mode(name, oracle, False)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (_x(name, 4, 0),), str(path), dynamo=False, opset_version=17, input_names=["x"],
                      dynamic_axes={"x": {0: "n"}})
    x = _x(name, 5, 1)
    with torch.no_grad():
        assert_close(_run_onnx(rt, path, x), oracle(x), TOL, "onnxruntime output")


@pytest.mark.parametrize("name", ["BatchNorm1d(N,C)", "SharedBatchNorm(share_stats)", "DomainBatchNorm2d",
                                  "GhostBatchNorm2d", "BatchNormAct2d(SiLU)", "convention=keras"])
def test_onnx_torchscript_exporter_training_mode(name, tmp_path):
    # (Batch Renorm is not here: that exporter runs the forward once and exports the state it leaves,
    # so an output that reads the running statistics is the next step's; it is so for any such module.)
    rt = _ort()
    model, oracle = _pair(name)
    path = tmp_path / "t.onnx"
    torch.onnx.export(copy.deepcopy(model).train(), (_x(name, 4, 0),), str(path), dynamo=False, opset_version=17,
                      training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False)
    x = _x(name, 4, 1)
    _mode(name, oracle, True)
    with torch.no_grad():
        assert_close(_run_onnx(rt, path, x), oracle(x), TOL, "onnxruntime training output")


class Zoo(nn.Module):
    """Every 2d variant in one network (one dynamo ONNX export for all)."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, 4, 3)] + [nn.Conv2d(4, 4, 1) for _ in range(9)])
        self.shared = bnkit.SharedBatchNorm(4, sites=2)
        self.layers = nn.ModuleList([
            bnkit.BatchNorm2d(4, share_affine="weight"), BatchNormAct2d(4, act=nn.SiLU()),
            bnkit.BatchRenorm2d(4, schedule="fixed", r_max=1.5, d_max=0.5), bnkit.GhostBatchNorm2d(4, virtual_batch_size=2),
            bnkit.FrozenBatchNorm2d(4), FrozenBatchNormAct2d(4, act=nn.ReLU()), bnkit.SyncBatchNorm(4),
        ])
        self.domain = bnkit.DomainBatchNorm2d(4, num_domains=2)

    def forward(self, x):
        x = torch.relu(self.shared(self.convs[0](x), site=0))
        for conv, layer in zip(self.convs[1:], self.layers):
            x = torch.relu(layer(conv(x)))
        x = self.shared(self.convs[8](x), site=1)
        return self.domain(self.convs[9](x), domain=1)


def _zoo() -> nn.Module:
    torch.manual_seed(0)
    return _randomize(Zoo()).eval()


def test_onnx_dynamo_exporter_dynamic_batch_every_variant(tmp_path):
    rt = _ort()
    pytest.importorskip("onnxscript")
    model = _zoo()
    x = torch.randn(4, 3, 8, 8)
    torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},)).save(
        str(tmp_path / "zoo.onnx"))
    for n in (2, 5):
        x = torch.randn(n, 3, 8, 8) * 2 + 1
        with torch.no_grad():
            assert_close(_run_onnx(rt, tmp_path / "zoo.onnx", x), model(x), TOL, f"batch {n}")


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_onnx_dynamo_exporter_dynamic_batch_each_layer(name, tmp_path):
    rt = _ort()
    pytest.importorskip("onnxscript")
    model, oracle = _pair(name)
    model.eval()
    _mode(name, oracle, False)
    torch.onnx.export(model, (_x(name, 4, 0),), dynamo=True,
                      dynamic_shapes=({0: torch.export.Dim("batch")},)).save(str(tmp_path / "m.onnx"))
    x = _x(name, 5, 1)
    with torch.no_grad():
        assert_close(_run_onnx(rt, tmp_path / "m.onnx", x), oracle(x), TOL, "onnxruntime output")


# --------------------------------------------------------------------------- TorchScript
def _round_trip(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


@pytest.mark.parametrize("name", [
    n for n in NAMES if CASES[n].scriptable
])
def test_script_saved_and_loaded_trains_and_evaluates_like_the_oracle(name):
    model, oracle = _pair(name)
    loaded = _round_trip(torch.jit.script(copy.deepcopy(model)))
    params = dict(loaded.named_parameters())
    for train, sizes in ((True, (6, 4)), (False, (5,))):
        loaded.train(train)
        _steps(name, loaded, oracle, train, sizes, True, params, state_of=loaded)


@pytest.mark.parametrize("name", ["SharedBatchNorm(per site)", "FrozenSharedBatchNorm", "DomainBatchNorm2d"])
def test_script_refuses_the_variants_without_a_torchscript_form(name):
    model, _ = _pair(name)
    layer = model.bn
    with pytest.raises(TypeError, match=type(layer).__name__):
        torch.jit.script(model)


@pytest.mark.parametrize("kw", [dict(tiny_batch="running"), dict(convention="keras")])
def test_script_refuses_training_rules_its_twin_lacks_and_freeze_is_the_way(kw):
    """The scripted twin trains by torch's rules: a layer with other rules is refused (a silently different
    training step otherwise); its eval map scripts once frozen."""
    layer = _randomize(bnkit.BatchNorm1d(3, **kw))
    with pytest.raises(TypeError, match="no TorchScript form"):
        torch.jit.script(copy.deepcopy(layer))
    scripted = torch.jit.script(bnkit.freeze(copy.deepcopy(layer)))
    x = torch.randn(5, 3)
    assert_close(scripted(x), layer.eval()(x), TOL, "eval map")


def _check_state_plain(a: nn.Module, b: nn.Module) -> None:
    for k, v in b.state_dict().items():
        assert_close(a.state_dict()[k], v, TOL, k)


def _trace(model: nn.Module, x: torch.Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x, check_trace=False)
    return traced


@pytest.mark.parametrize("name,train", [
    pytest.param(n, t, id=f"{n}-{'train' if t else 'eval'}")
    for n in NAMES for t in (True, False)
])
def test_trace_saved_and_loaded_matches_the_oracle(name, train):
    model, oracle = _pair(name)
    model.train(train)
    traced = _trace(copy.deepcopy(model), _x(name, 4, 0))
    traced.load_state_dict(model.state_dict())  # undo the trace's own step
    loaded = _round_trip(traced)
    # Ghost BN's virtual batches are a Python split: a trace is for the batch size it was made with.
    sizes = (4, 4) if name == "GhostBatchNorm2d" else (3, 5)
    _steps(name, loaded, oracle, train, sizes, True, dict(loaded.named_parameters()), state_of=loaded)


# --------------------------------------------------------------------------- torch.compile
_COMPILE_FAST = {"BatchNorm1d(N,C)", "BatchNorm3d", "SyncBatchNorm", "BatchNormAct2d(SiLU)",
                 "FrozenBatchNormAct2d(SiLU)", "SharedBatchNorm(share_stats)", "SharedBatchNorm(per site)",
                 "FrozenSharedBatchNorm", "convention=keras", "affine=False"}


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("name", [n if n in _COMPILE_FAST else pytest.param(n, marks=pytest.mark.slow) for n in NAMES])
def test_compile_trains_and_evaluates_like_the_oracle(name, backend):
    model, oracle = _pair(name)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    params = dict(model.named_parameters())
    for train, sizes in ((True, (4, 4)), (False, (4,))):
        model.train(train)
        _steps(name, compiled, oracle, train, sizes, True, params, state_of=model)


@pytest.mark.slow
def test_inductor_shared_batch_norm_trains_like_torch_bn_at_two_sites():
    name = "SharedBatchNorm(share_stats)"
    model, oracle = _pair(name)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="inductor")
    for train in (True, False):
        model.train(train)
        _steps(name, compiled, oracle, train, (4, 4), True, dict(model.named_parameters()), state_of=model)


# --------------------------------------------------------------------------- torch.func
@pytest.mark.parametrize("name", NAMES)
def test_vmap_of_functional_call_in_eval_over_a_stack_of_batches(name):
    model, oracle = _pair(name)
    model.eval()
    _mode(name, oracle, False)
    xs = torch.stack([_x(name, 3, seed=s) for s in range(4)])
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    ys = vmap(lambda x: functional_call(model, (params, buffers), (x,)))(xs)
    with torch.no_grad():
        assert_close(ys, torch.stack([oracle(x) for x in xs]), TOL, "vmapped output")


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("SharedBatchNorm(per site)", "DomainBatchNorm2d")])
def test_grad_of_functional_call_in_training_matches_autograd_and_updates_once(name):
    model, oracle = _pair(name)
    model.train()
    _mode(name, oracle, True)
    x = _x(name, 4, 3)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    with torch.no_grad():
        r = torch.randn(copy.deepcopy(oracle)(x).shape, generator=torch.Generator().manual_seed(4))

    def loss(p):
        return (functional_call(model, (p, buffers), (x,)) * r).sum()

    grads = grad(loss)(params)
    (oracle(x) * r).sum().backward()
    theirs = dict(oracle.named_parameters())
    for k, g in grads.items():
        assert_close(g, theirs[k].grad, TOL, f"grad {k}", _grad_scale(theirs))
    holder = copy.deepcopy(model)
    holder.load_state_dict({**holder.state_dict(), **buffers})
    _check_state(name, holder, oracle, "buffers after one call")


# --------------------------------------------------------------------------- quantization
def _quant_pair(kind: str, bias: bool = True):
    torch.manual_seed(0)
    bn = {"1d": nn.BatchNorm1d, "1dseq": nn.BatchNorm1d, "2d": nn.BatchNorm2d, "3d": nn.BatchNorm3d}[kind]
    ref = nn.Sequential(_front(kind), bn(4, bias=bias), nn.ReLU())
    ref.train()
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        ref(torch.randn(8, *SHAPES[kind], generator=g) * 2 + 1)
    ref.eval()
    model = bnkit.convert(copy.deepcopy(ref)).eval()
    assert type(model[1]).__module__.startswith("bnkit")
    return ref, model


@pytest.mark.parametrize("kind,bias", [("1d", True), ("1dseq", True), ("2d", False), ("3d", True)])
def test_fx_post_training_quantization_equals_torch(kind, bias):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from bnkit.integrations.quantization import fx_backend_config, fx_prepare_custom_config

    ref, model = _quant_pair(kind, bias)
    x = torch.randn(5, *SHAPES[kind])
    calib = torch.randn(8, *SHAPES[kind]) * 2 + 1
    mapping = get_default_qconfig_mapping("x86")
    backend = fx_backend_config()
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = "x86"
    try:
        pt = prepare_fx(copy.deepcopy(ref), mapping, (x,))
        pb = prepare_fx(copy.deepcopy(model), mapping, (x,), prepare_custom_config=fx_prepare_custom_config(),
                        backend_config=backend)
        assert [type(m) for m in list(pb.modules())[1:]] == [type(m) for m in list(pt.modules())[1:]]
        pt(calib)
        pb(calib)
        qt, qb = convert_fx(pt), convert_fx(pb, backend_config=backend)
        assert torch.equal(qb(x), qt(x))
    finally:
        torch.backends.quantized.engine = old


@pytest.mark.parametrize("kind", ["1dseq", "3d"])
def test_eager_fuse_prepare_convert_equals_torch(kind):
    ref, model = _quant_pair(kind)
    x = torch.randn(5, *SHAPES[kind])
    calib = torch.randn(8, *SHAPES[kind]) * 2 + 1
    outs, types = [], []
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = "x86"
    try:
        for m in (ref, model):
            fused = tq.fuse_modules(copy.deepcopy(m), [["0", "1", "2"]])
            types.append([type(s) for s in fused.modules()])
            wrapped = nn.Sequential(tq.QuantStub(), fused, tq.DeQuantStub()).eval()
            wrapped.qconfig = tq.get_default_qconfig("x86")
            prepared = tq.prepare(wrapped)
            prepared(calib)
            outs.append(tq.convert(prepared)(x))
    finally:
        torch.backends.quantized.engine = old
    assert types[0] == types[1]
    assert torch.equal(outs[1], outs[0])


def test_eager_linear_bn1d_fusion_equals_torch():
    ref, model = _quant_pair("1d")
    ft = tq.fuse_modules(copy.deepcopy(ref), [["0", "1"]])
    fb = tq.fuse_modules(copy.deepcopy(model), [["0", "1"]])
    assert type(fb[0]) is type(ft[0]) is nn.Linear and type(fb[1]) is nn.Identity
    x = torch.randn(5, 6)
    assert_close(fb(x), ft(x), 1e-6, "fused output")
    assert_close(fb(x), ref(x), 1e-5, "fused vs unfused")
