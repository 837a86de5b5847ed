"""DomainBatchNorm2d under torch.compile and torch.fx: the same outputs, gradients and buffers as eager.

Oracle: the eager model (a deep copy, same inputs), itself checked against separate BN layers per
domain in tests/test_domain.py. Each case runs several training steps (or eval calls) with int
domains (the whole batch from one domain, switching between calls) and with per-sample int64 domain
tensors (mixed batches, a domain absent from one of them), comparing every output, the gradients of
the input and of every parameter, and every buffer (running statistics, per-domain counts) after
each call. Backends ``eager`` and ``aot_eager`` (dynamo + AOT autograd + functionalization, the graph
inductor gets); inductor and part of aot_eager are marked slow. A mixed batch's counts per domain are
read on the host (which domains are present decides the computation), so dynamo breaks the graph
there (``fullgraph=True`` refuses mixed batches); int domains compile into one graph.
An fx trace, like every bnkit layer's, records the training mode it was made in (the traced
``batch_stats`` is a constant), so each case traces in its own mode.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx
from torch import nn

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
MIXED_DOMAINS = [torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([2, 2, 0, 0, 0, 2]), torch.tensor([1, 0, 1, 0, 1, 1])]


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
        ours = dict(model.named_buffers())  # an eval-mode fx trace holds only the buffers its graph reads
        assert ours.keys() <= dict(oracle.named_buffers()).keys() and "bn1.running_mean" in ours
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
    compiled = torch.compile(model, backend=backend, fullgraph=kind == "int")
    _compare(compiled, model, oracle, INT_DOMAINS if kind == "int" else MIXED_DOMAINS, train)


@pytest.mark.parametrize("backend", SLOW_AOT)
def test_compiled_cumulative_momentum_counts_per_domain(backend):
    model = _net(momentum=None)  # the cumulative average reads num_batches_tracked[d] of each domain
    oracle = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    _compare(compiled, model, oracle, MIXED_DOMAINS + INT_DOMAINS, train=True)
    assert oracle.bn1.num_batches_tracked.tolist() == [5, 3, 3]  # mixed: {0,1,2}, {0,2}, {0,1}; then int 0, 2, 0, 1


@pytest.mark.parametrize("backend", SLOW_AOT)
def test_compiled_follows_the_current_domain(backend):
    """A model whose forward does not pass domain=: the current domain set between calls must be honoured."""
    torch.manual_seed(0)
    model = bnkit.convert_domain_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), num_domains=D).eval()
    with torch.no_grad():
        model[1].running_mean.copy_(torch.randn(D, 4))
    oracle = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(2, 3, 5, 5)
    for d in (0, 2, torch.tensor([1, 0]), 1, torch.tensor([2, 2])):
        bnkit.set_domain(model, d)
        bnkit.set_domain(oracle, d)
        torch.testing.assert_close(compiled(x), oracle(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("train", "kind"), CASES)
def test_fx_traced_domain_bn_equals_eager(train, kind):
    model = _net().train(train)  # a trace records the mode it was made in, as for every bnkit layer
    oracle = copy.deepcopy(model)
    traced = torch.fx.symbolic_trace(model)
    calls = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert sum(getattr(t, "__name__", "") == "domain_module_call" for t in calls) == 2  # one node per layer
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
    compiled = torch.compile(model, backend="inductor")
    _compare(compiled, model, oracle, INT_DOMAINS if kind == "int" else MIXED_DOMAINS, train)
