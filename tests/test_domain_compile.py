"""DomainBatchNorm under torch.compile, torch.export and torch.fx: the same outputs, gradients and buffers as eager.

Oracle: the eager model (a deep copy, same inputs), itself checked against separate BN layers per
domain in tests/test_domain.py. Each case runs several training steps (or eval calls) with int
domains (the whole batch from one domain, switching between calls) and with per-sample int64 domain
tensors (mixed batches, a domain absent from one of them), comparing every output, the gradients of
the input and of every parameter, and every buffer (running statistics, per-domain counts) after
each call. Backends ``eager`` and ``aot_eager`` (dynamo + AOT autograd + functionalization, the graph
inductor gets); inductor and part of aot_eager are marked slow. Every case compiles with
``fullgraph=True``: in a captured graph a mixed batch's statistics are computed for all ``D`` domains
with static shapes and the running update is masked per domain (no host read of which domains are
present), so the mixed batches include a domain absent from the batch, a domain with a single sample
(allowed where a sample has several values per channel) and a batch of one domain given as a tensor
(which eager sends through the one door). A fresh process whose first bnkit call is compiled checks
the graph count with ``torch._dynamo.explain`` (1 graph, 0 breaks). What eager refuses on the host
(a domain out of range, a domain with one value per channel) the graph refuses when it runs
(``RuntimeError`` on CPU), with the state unchanged; an update hook keeps eager's per-domain calls.
An fx trace, like every bnkit layer's, records the training mode it was made in (the traced
``batch_stats`` is a constant), so each case traces in its own mode.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.fx
from torch import Tensor, nn

import bnkit

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

D = 3  # domains


class Net(nn.Module):
    """conv - DomainBN (own affine per domain) - ReLU - conv - DomainBN (shared affine), domain passed through."""

    def __init__(self, momentum: float | None = 0.1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = bnkit.DomainBatchNorm2d(4, num_domains=D, momentum=momentum)
        self.conv2 = nn.Conv2d(4, 4, 1, bias=False)  # a bias before BN in training has only rounding noise as gradient
        self.bn2 = bnkit.DomainBatchNorm2d(4, num_domains=D, momentum=momentum, shared_affine=True)

    def forward(self, x, domain):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x), domain=domain))), domain=domain)


def _net(momentum: float | None = 0.1) -> Net:
    torch.manual_seed(0)
    net = Net(momentum)
    with torch.no_grad():  # distinct per-domain affine and statistics, so that a wrong row shows
        net.bn1.weight.copy_(torch.rand(D, 4) + 0.5)
        net.bn1.bias.copy_(torch.randn(D, 4))
        for bn in (net.bn1, net.bn2):
            bn.running_mean.copy_(torch.randn(D, 4))
            bn.running_var.copy_(torch.rand(D, 4) + 0.5)
    return net


INT_DOMAINS = [0, 2, 0, 1]
MIXED_DOMAINS = [
    torch.tensor([0, 1, 2, 0, 1, 2]),
    torch.tensor([2, 2, 0, 0, 0, 2]),  # domain 1 absent
    torch.tensor([1, 0, 1, 0, 1, 1]),  # domain 2 absent
    torch.tensor([0, 0, 0, 0, 0, 2]),  # domain 2 a single sample (25 values per channel), domain 1 absent
    torch.tensor([1, 1, 1, 1, 1, 1]),  # one domain: eager takes the one door, the graph the per-domain path
]


def _inputs(domains):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(6, 3, 5, 5, generator=g) * 2 + 1, d) for d in domains]


def _compare(run, model: nn.Module, oracle: nn.Module, domains, train: bool, module: nn.Module | None = None) -> None:
    """``run(x, d)`` (the compiled / traced ``model``) against ``oracle(x, d)`` (eager), call after call.

    ``model`` holds the parameters and buffers ``run`` uses; ``module``, the original layers (default ``model``).
    """
    module = model if module is None else module
    model.train(train)
    oracle.train(train)
    for x, d in _inputs(domains):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, y_ref = run(xa, d), oracle(xb, d)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        if train:
            r = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
            (y * r).sum().backward()
            (y_ref * r).sum().backward()
            torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
            for (name, p), (_, q) in zip(model.named_parameters(), oracle.named_parameters()):
                # float32 sums of ~150 terms of gradients up to ~100: rounding at 1e-5 of the largest entry
                atol = 1e-5 * max(1.0, q.grad.abs().max().item())
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=atol, msg=f"grad of {name}")
                p.grad = q.grad = None
        ours = dict(model.named_buffers())  # compiled or traced (the layers are fx leaves): all the buffers
        assert ours.keys() == dict(oracle.named_buffers()).keys()
        for name, c in oracle.named_buffers():
            if name in ours:
                torch.testing.assert_close(ours[name], c, rtol=1e-5, atol=1e-6, msg=f"buffer {name}")
    for name, c in oracle.named_buffers():  # the model's own buffers, compiled or traced, whatever the mode
        torch.testing.assert_close(dict(module.named_buffers())[name], c, rtol=1e-5, atol=1e-6, msg=f"buffer {name}")


CASES = [
    pytest.param(train, kind, id=f"{'train' if train else 'eval'}-{kind}")
    for train in (True, False) for kind in ("int", "mixed")
]
# Compiles are slow on a loaded CPU: eager for every case, aot_eager for training on mixed batches (the
# autograd graph through the per-domain kernels is what it adds; an int domain is the one door, which
# tests/test_compile.py covers); the rest is marked slow.
COMPILED = [
    pytest.param(backend, train, kind, id=f"{backend}-{'train' if train else 'eval'}-{kind}",
                 marks=() if backend == "eager" or (train and kind == "mixed") else pytest.mark.slow)
    for backend in ("eager", "aot_eager") for train in (True, False) for kind in ("int", "mixed")
]
SLOW_AOT = [pytest.param("eager"), pytest.param("aot_eager", marks=pytest.mark.slow)]


@pytest.mark.parametrize(("backend", "train", "kind"), COMPILED)
def test_compiled_domain_bn_equals_eager(backend, train, kind):
    model = _net()
    oracle = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    _compare(compiled, model, oracle, INT_DOMAINS if kind == "int" else MIXED_DOMAINS, train)


@pytest.mark.parametrize("train", [True, False])
def test_compiled_zero_dim_tensor_domain_is_not_read_on_the_host(train):
    """A 0-d tensor domain: eager reads it (an int), the graph takes it as every sample's domain (fullgraph)."""
    model = _net()
    oracle = copy.deepcopy(model)
    explained = torch._dynamo.explain(copy.deepcopy(model).train(train))(torch.randn(6, 3, 5, 5), torch.tensor(1))
    assert explained.graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    tensors = [torch.tensor(d) for d in INT_DOMAINS]
    _compare(lambda x, d: compiled(x, tensors[INT_DOMAINS.index(d)]), model, oracle, INT_DOMAINS, train)


@pytest.mark.parametrize("backend", SLOW_AOT)
def test_compiled_cumulative_momentum_counts_per_domain(backend):
    model = _net(momentum=None)  # the cumulative average reads num_batches_tracked[d] of each domain
    oracle = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    _compare(compiled, model, oracle, MIXED_DOMAINS + INT_DOMAINS, train=True)
    # mixed: {0,1,2}, {0,2}, {0,1}, {0,2}, {1}; then int 0, 2, 0, 1
    assert oracle.bn1.num_batches_tracked.tolist() == [6, 4, 4]


@pytest.mark.parametrize("backend", SLOW_AOT)
def test_compiled_follows_the_current_domain(backend):
    """A model whose forward does not pass domain=: the current domain set between calls must be honoured."""
    torch.manual_seed(0)
    model = bnkit.convert_domain_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), num_domains=D).eval()
    with torch.no_grad():
        model[1].running_mean.copy_(torch.randn(D, 4))
    oracle = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = torch.randn(2, 3, 5, 5)
    for d in (0, 2, torch.tensor([1, 0]), 1, torch.tensor([2, 2])):
        bnkit.set_domain(model, d)
        bnkit.set_domain(oracle, d)
        torch.testing.assert_close(compiled(x), oracle(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("train", "kind"), CASES)
def test_fx_traced_domain_bn_equals_eager(train, kind):
    model = _net().train(not train)  # a leaf, as torch's BN is: the mode it runs in is the layer's, live
    oracle = copy.deepcopy(model)
    traced = torch.fx.symbolic_trace(model)
    calls = [n.target for n in traced.graph.nodes if n.op == "call_module"]
    assert calls.count("bn1") == calls.count("bn2") == 1  # one node per layer
    _compare(traced, traced, oracle, INT_DOMAINS if kind == "int" else MIXED_DOMAINS, train, module=model)
    # The traced module holds the layers' own buffers and parameters (not copies made at trace time).
    assert traced.bn1.running_mean is model.bn1.running_mean
    assert traced.bn1.weight is model.bn1.weight


@pytest.mark.slow
@pytest.mark.parametrize(("train", "kind"), CASES)
def test_inductor_domain_bn_equals_eager(train, kind):
    model = _net()
    oracle = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    _compare(compiled, model, oracle, INT_DOMAINS if kind == "int" else MIXED_DOMAINS, train)


SRC = str(Path(bnkit.__file__).resolve().parents[1])

# Every case is first called compiled (explain), so the C++ extension stays unloaded throughout: the graph
# must not depend on it (nor ask for it).
_FRESH = textwrap.dedent(
    """
    import torch, bnkit
    torch.manual_seed(0)
    dom = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    cases = {
        "domain1d": (bnkit.DomainBatchNorm1d(4, 3), torch.randn(8, 4)),
        "domain1d_seq": (bnkit.DomainBatchNorm1d(4, 3), torch.randn(8, 4, 5)),
        "domain2d": (bnkit.DomainBatchNorm2d(3, 3), torch.randn(8, 3, 4, 4)),
        "domain2d_cumulative_shared": (bnkit.DomainBatchNorm2d(3, 3, momentum=None, shared_affine=True),
                                       torch.randn(8, 3, 4, 4)),
        "domain2d_propagate": (bnkit.DomainBatchNorm2d(3, 3, nonfinite="propagate"), torch.randn(8, 3, 4, 4)),
        "domain3d": (bnkit.DomainBatchNorm3d(3, 3), torch.randn(8, 3, 2, 3, 3)),
    }
    for name, (layer, x) in cases.items():
        for mode in ("train", "eval"):
            getattr(layer, mode)()
            torch._dynamo.reset()
            e = torch._dynamo.explain(layer)(x, domain=dom)
            print(name, mode, e.graph_count, e.graph_break_count, bool(bnkit.kernels._cpp_ok),
                  [str(r.reason)[:80] for r in e.break_reasons])
    """
)
_FRESH_CASES = ("domain1d", "domain1d_seq", "domain2d", "domain2d_cumulative_shared", "domain2d_propagate", "domain3d")


def test_mixed_batch_is_one_graph_when_the_first_bnkit_call_of_a_process_is_compiled():
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", _FRESH], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    got = [tuple(line.split(" ", 5)[:5]) for line in out.stdout.strip().splitlines()]
    expected = [(name, mode, "1", "0", "False") for name in _FRESH_CASES for mode in ("train", "eval")]
    assert got == expected, out.stdout


def _layer_steps(layer: nn.Module, shape: tuple[int, ...], domains: list[Tensor], backend: str) -> None:
    """Training steps of ``layer`` compiled (fullgraph) against an eager deep copy: outputs, gradients, buffers."""
    oracle = copy.deepcopy(layer)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    g = torch.Generator().manual_seed(7)
    for dom in domains:
        x = torch.randn((dom.shape[0], *shape), generator=g) * 3 - 1
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, y_ref = compiled(xa, domain=dom), oracle(xb, domain=dom)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        r = torch.randn(y.shape, generator=g)
        (y * r).sum().backward()
        (y_ref * r).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
        for (name, p), (_, q) in zip(layer.named_parameters(), oracle.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=f"grad of {name}")
            p.grad = q.grad = None
        for (name, b), (_, c) in zip(layer.named_buffers(), oracle.named_buffers()):
            torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=f"buffer {name}")


T = torch.tensor
RANKS = [
    # (N, C): one value per sample, so each present domain needs two samples (eager raises otherwise)
    pytest.param(bnkit.DomainBatchNorm1d, (4,), [T([0, 1, 0, 1, 2, 2]), T([2, 2, 0, 0, 2, 0]), T([1, 1, 1, 1])],
                 id="1d"),
    pytest.param(bnkit.DomainBatchNorm1d, (4, 3), [T([0, 1, 2, 0, 1]), T([2, 0, 0, 0, 0])], id="1d-seq"),
    pytest.param(bnkit.DomainBatchNorm3d, (4, 2, 3, 3), [T([0, 1, 2, 0]), T([1, 1, 0, 1])], id="3d"),
]


@pytest.mark.parametrize(("cls", "shape", "domains"), RANKS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_compiled_ranks_equal_eager(cls, shape, domains, momentum):
    torch.manual_seed(1)
    layer = cls(4, num_domains=D, momentum=momentum)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(D, 4) + 0.5)
        layer.bias.copy_(torch.randn(D, 4))
        layer.num_batches_tracked.copy_(torch.tensor([0, 3, 1]))
    _layer_steps(layer, shape, domains, "eager")


@pytest.mark.slow
@pytest.mark.parametrize(("cls", "shape", "domains"), RANKS)
def test_aot_eager_ranks_equal_eager(cls, shape, domains):
    _layer_steps(cls(4, num_domains=D, momentum=None), shape, domains, "aot_eager")


@pytest.mark.parametrize("backend", ["eager", pytest.param("aot_eager", marks=pytest.mark.slow)])
def test_compiled_nonfinite_skip_is_per_domain(backend):
    """NaN in one domain's samples: that domain's row and count stay, the others are updated, as eager."""
    layer = bnkit.DomainBatchNorm1d(3, num_domains=D)
    oracle = copy.deepcopy(layer)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    x = torch.randn(6, 3)
    x[5, 1] = float("nan")
    dom = T([0, 0, 0, 1, 1, 1])
    with torch.no_grad():
        compiled(x, domain=dom)
        with pytest.warns(RuntimeWarning, match="not finite"):
            oracle(x, domain=dom)
    assert layer.num_batches_tracked.tolist() == oracle.num_batches_tracked.tolist() == [1, 0, 0]
    for (name, b), (_, c) in zip(layer.named_buffers(), oracle.named_buffers()):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=f"buffer {name}")
    torch.testing.assert_close(layer.running_mean[0], 0.1 * x[:3].mean(0))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_bad_domain_raises_when_run_and_changes_nothing(backend):
    """What eager refuses on the host (ValueError / IndexError) the graph refuses when it runs (RuntimeError on CPU)."""
    layer = bnkit.DomainBatchNorm1d(3, num_domains=D)
    state = copy.deepcopy(layer.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    x = torch.randn(6, 3)
    with pytest.raises(ValueError, match="domain 2"):  # eager: a single (N, C) sample of domain 2
        copy.deepcopy(layer)(x, domain=T([0, 0, 1, 1, 0, 2]))
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        compiled(x, domain=T([0, 0, 1, 1, 0, 2]))
    with pytest.raises(RuntimeError, match="out of range"):
        compiled(x, domain=T([0, 0, 1, 1, 3, 3]))
    with pytest.raises(RuntimeError, match="out of range"):
        compiled(x, domain=T([0, 0, 1, 1, -1, -1]))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k
    compiled(x, domain=T([0, 0, 1, 1, 2, 2]))  # and the same graph still works
    assert layer.num_batches_tracked.tolist() == [1, 1, 1]


class _Domained(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = bnkit.DomainBatchNorm2d(3, num_domains=D, momentum=None)

    def forward(self, x, domain):
        return self.bn(x, domain=domain)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_torch_export_of_a_mixed_batch_equals_eager(train):
    """torch.export captures the same graph (no data-dependent shape): the program's outputs and buffers are eager's."""
    torch.manual_seed(2)
    model = _Domained().train(train)
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.randn(D, 3))
        model.bn.num_batches_tracked.copy_(torch.tensor([2, 0, 5]))
    oracle = copy.deepcopy(model)
    x, dom = torch.randn(6, 3, 4, 4), T([0, 2, 0, 2, 2, 0])
    program = torch.export.export(model, (x, dom)).module()
    for step in range(2):
        torch.testing.assert_close(program(x + step, dom), oracle(x + step, dom), rtol=1e-5, atol=1e-5)
    ours = dict(program.named_buffers())
    for name, c in oracle.named_buffers():
        torch.testing.assert_close(ours[name], c, rtol=1e-5, atol=1e-6, msg=f"buffer {name}")
    assert oracle.bn.num_batches_tracked.tolist() == ([4, 0, 7] if train else [2, 0, 5])


def test_compiled_update_hook_sees_one_call_per_present_domain():
    """With a running-update hook installed the compiled call keeps the per-domain path: the hook gets each present
    domain's row through engine.running_update (outside the graph), and declining leaves eager's update."""
    torch.manual_seed(11)
    x, dom = torch.randn(8, 3, 2), T([0, 2, 0, 2, 2, 0, 0, 2])
    plain = bnkit.DomainBatchNorm1d(3, num_domains=D, momentum=None)
    hooked = copy.deepcopy(plain)
    plain(x, domain=dom)
    seen = []

    def hook(spec, rm, rv, nbt, mean, var, count):
        seen.append(count)
        return False  # declined: the ordinary update runs

    previous = bnkit.engine.set_running_update_hook(hook)
    try:
        torch._dynamo.reset()
        torch.compile(hooked, backend="eager")(x, domain=dom)
    finally:
        bnkit.engine.set_running_update_hook(previous)
    assert seen == [8, 8]  # domains 0 and 2, 4 samples of 2 values each
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(hooked.state_dict()[k], v, rtol=1e-6, atol=1e-6, msg=k)
