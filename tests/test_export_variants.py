"""Every bnkit layer and variant through the ecosystem's graph tools, in one small CNN.

Oracles: the same model with torch's BN (``bnkit.convert(model, to="torch")``) run through the same tool where
torch has the layer, and the same bnkit model in eager mode otherwise (the variants: Batch Renorm, Ghost BN,
per-domain and shared-across-sites BN). Each tool is checked on a batch size other than the one it saw
(torch.export with a dynamic batch dimension), and in training where the tool trains (outputs, gradients and
every buffer after two steps).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.export import Dim
from torch.func import functional_call, vmap

import bnkit
import bnkit.variants as V
from _compare import randomize_bn

TOL = dict(rtol=1e-5, atol=1e-5)


class _Called(nn.Module):
    """A layer called with a fixed keyword (``site=`` / ``domain=``), so that it fits an ``nn.Sequential``."""

    def __init__(self, layer: nn.Module, **kw):
        super().__init__()
        self.layer, self.kw = layer, kw

    def forward(self, x):
        return self.layer(x, **self.kw)


LAYERS = {
    "BatchNorm2d": lambda: bnkit.BatchNorm2d(4),
    "BatchNorm2d-no-affine": lambda: bnkit.BatchNorm2d(4, affine=False),
    "BatchNorm2d-momentum-None": lambda: bnkit.BatchNorm2d(4, momentum=None),
    "BatchNorm-generic": lambda: bnkit.BatchNorm(4),
    "BatchNormAct2d-relu": lambda: V.BatchNormAct2d(4, act=nn.ReLU()),
    "BatchNormAct2d-silu": lambda: V.BatchNormAct2d(4, act=nn.SiLU()),
    "FrozenBatchNorm2d": lambda: V.FrozenBatchNorm2d(4),
    "FrozenBatchNormAct2d": lambda: V.FrozenBatchNormAct2d(4, act=nn.ReLU()),
    "BatchRenorm2d": lambda: V.BatchRenorm2d(4, warmup_steps=0, r_max_steps=1, d_max_steps=1),
    "GhostBatchNorm2d": lambda: V.GhostBatchNorm2d(4, virtual_batch_size=2),
    "DomainBatchNorm2d": lambda: _Called(V.DomainBatchNorm2d(4, num_domains=2), domain=1),
    "SharedBatchNorm": lambda: _Called(V.SharedBatchNorm(4, sites=2), site=1),
    "SyncBatchNorm-one-process": lambda: bnkit.SyncBatchNorm(4),
}
# The layers torch has (the oracle is the converted torch model); the others are compared with eager bnkit.
TORCH_HAS = {"BatchNorm2d", "BatchNorm2d-no-affine", "BatchNorm2d-momentum-None", "BatchNormAct2d-relu",
             "BatchNormAct2d-silu"}
# The layers torch.jit.script takes as they are (the others: after bnkit.freeze, or SyncBN reverted).
SCRIPTABLE = TORCH_HAS | {"BatchNorm-generic", "FrozenBatchNorm2d", "FrozenBatchNormAct2d"}
# Layers whose training forward normalizes with batch statistics (the frozen ones are their eval map).
TRAINS = [k for k in LAYERS if not k.startswith("Frozen")]


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), LAYERS[name](), nn.ReLU())
    return randomize_bn(m)


def _oracle(name: str, model: nn.Module) -> nn.Module:
    if name.startswith("BatchNormAct"):  # torch's BN followed by the layer's activation
        conv, layer, relu = copy.deepcopy(model)
        bn = nn.BatchNorm2d(4)
        bn.load_state_dict(layer.state_dict())
        bn.train(layer.training)
        return nn.Sequential(conv, bn, layer.act, relu)
    return bnkit.convert(model, to="torch") if name in TORCH_HAS else copy.deepcopy(model)


def _x(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def _buffers(m: nn.Module) -> dict:
    return {k: v.clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}


def _assert_same_buffers(a: nn.Module, b: nn.Module) -> None:
    sa, sb = _buffers(a), _buffers(b)
    shared = [k for k in sa if k in sb]
    assert shared, (list(sa), list(sb))
    for k in shared:
        torch.testing.assert_close(sa[k].double(), sb[k].double(), **TOL, msg=k)


def test_the_table_holds_every_layer_and_variant():
    """A new variant must be added here: every class bnkit exports that is a BN layer is built by LAYERS."""
    built = {type(m) for f in LAYERS.values() for m in f().modules()}
    names = {c.__name__ for c in built}
    for family in ("BatchRenorm", "GhostBatchNorm", "DomainBatchNorm", "SharedBatchNorm", "FrozenBatchNorm",
                   "BatchNormAct", "FrozenBatchNormAct", "SyncBatchNorm"):
        assert any(n.startswith(family) for n in names), family


# --------------------------------------------------------------------------- torch.export
@pytest.mark.parametrize("name", list(LAYERS))
def test_export_eval_with_a_dynamic_batch(name):
    model = _model(name).eval()
    oracle = _oracle(name, model).eval()
    ep = torch.export.export(model, (_x(4),), dynamic_shapes=({0: Dim("batch", min=2, max=64)},))
    with torch.no_grad():
        x = _x(7, seed=2)
        torch.testing.assert_close(ep.module()(x), oracle(x), **TOL)
    assert not any("bnkit" in str(n.target) for n in ep.graph.nodes), "a bnkit op left in the program"


@pytest.mark.parametrize("name", TRAINS)
def test_export_training_program_updates_its_buffers_as_eager(name):
    model = _model(name).train()
    oracle = _oracle(name, model).train()
    ep = torch.export.export(model, (_x(8),))
    exported = ep.module()
    for seed in (2, 3):
        x = _x(8, seed=seed)
        torch.testing.assert_close(exported(x), oracle(x), **TOL)
    _assert_same_buffers(exported, oracle)


# --------------------------------------------------------------------------- TorchScript
@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_torchscript_eval_survives_save_and_load(name, how):
    model = _model(name).eval()
    oracle = _oracle(name, model).eval()
    if how == "script" and name not in SCRIPTABLE:
        # documented: no TorchScript form; the error names the way out, which is what is scripted then
        with pytest.raises(TypeError, match="no TorchScript form") as refused:
            torch.jit.script(model)
        if name.startswith("Sync"):
            assert "convert_sync_batchnorm(model, revert=True)" in str(refused.value)
            model = bnkit.convert_sync_batchnorm(model, revert=True)
        elif name.startswith("Domain"):
            assert "select_domain" in str(refused.value)
            model = bnkit.select_domain(nn.Sequential(model[0], model[1].layer, model[2]), 1)
        elif name.startswith("Shared"):
            assert "torch.jit.trace" in str(refused.value)
            return  # (its trace is checked below, with how="trace")
        else:
            assert "bnkit.freeze(model)" in str(refused.value)
            model = bnkit.freeze(model)
    with torch.no_grad():
        jitted = torch.jit.script(model) if how == "script" else torch.jit.trace(model, (_x(4),))
    buf = io.BytesIO()
    torch.jit.save(jitted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    with torch.no_grad():
        x = _x(4 if how == "trace" else 5, seed=2)
        torch.testing.assert_close(loaded(x), oracle(x), **TOL)


@pytest.mark.parametrize("name", [n for n in TRAINS if n in TORCH_HAS])
def test_scripted_training_updates_buffers_as_torch(name):
    model = _model(name).train()
    oracle = torch.jit.script(_oracle(name, model).train())
    scripted = torch.jit.script(model)
    for seed in (2, 3):
        x = _x(6, seed=seed)
        torch.testing.assert_close(scripted(x), oracle(x), **TOL)
    _assert_same_buffers(scripted, oracle)


# --------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("name", TRAINS)
def test_compiled_training_steps_equal_the_oracles(name, backend):
    torch._dynamo.reset()
    model = _model(name).train()
    oracle = _oracle(name, model).train()
    compiled = torch.compile(model, backend=backend, fullgraph=name not in ("GhostBatchNorm2d",))
    for seed in (2, 3):
        x = _x(8, seed=seed)
        y, y_ref = compiled(x), oracle(x)
        torch.testing.assert_close(y, y_ref, **TOL)
        y.square().sum().backward()
        y_ref.square().sum().backward()
    # the conv's bias gets a gradient of 0 in exact arithmetic (BN removes it): float32 noise of the largest
    scale = max(q.grad.abs().max().item() for q in oracle.parameters())
    for (k, p), q in zip(model.named_parameters(), oracle.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6 * scale, msg=k)
    _assert_same_buffers(model, oracle)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["BatchNorm2d", "BatchNormAct2d-silu", "BatchRenorm2d"])
def test_inductor_eval_and_training_equal_the_oracles(name):
    torch._dynamo.reset()
    model = _model(name)
    oracle = _oracle(name, model)
    compiled = torch.compile(model)
    x = _x(8, seed=2)
    torch.testing.assert_close(compiled.train()(x), oracle.train()(x), **TOL)
    _assert_same_buffers(model, oracle)
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), oracle.eval()(x), **TOL)


# --------------------------------------------------------------------------- torch.func
@pytest.mark.parametrize("name", list(LAYERS))
def test_functional_call_and_vmap_in_eval(name):
    model = _model(name).eval()
    oracle = _oracle(name, model).eval()
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    xs = torch.stack([_x(3, seed=s) for s in (2, 3, 4)])
    with torch.no_grad():
        got = vmap(lambda x: functional_call(model, state, (x,)))(xs)
        want = torch.stack([oracle(x) for x in xs])
    torch.testing.assert_close(got, want, **TOL)
