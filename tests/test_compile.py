"""torch.compile of bnkit models: no graph break, outputs and buffers equal to eager and to torch BN.

Oracles: the torch-BN version of the same model (compiled and eager),
eager bnkit, and ``torch._dynamo.explain`` for the graph breaks, also in a
fresh process whose first bnkit call is inside the compiled region.
The fast tests use the ``aot_eager`` backend (dynamo + AOT autograd +
functionalization, the graph inductor receives, without its slow C++
codegen); the inductor ones are marked slow.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import bnkit

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

SRC = str(Path(bnkit.__file__).resolve().parents[1])


def small_net(momentum: float | None = 0.1, **bn) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4, momentum=momentum, **bn), nn.ReLU(),
        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, momentum=momentum, **bn),
    )


def _batches(n: int = 3, channels_last: bool = False):
    g = torch.Generator().manual_seed(3)
    out = [torch.randn(4, 3, 6, 6, generator=g) * 2 + 1 for _ in range(n)]
    return [x.to(memory_format=torch.channels_last) for x in out] if channels_last else out


def _compare_compiled(model: nn.Module, oracle: nn.Module, backend: str, train: bool, channels_last: bool) -> None:
    """Several steps of ``compile(model, fullgraph=True)`` against ``oracle`` (eager): outputs, grads, buffers."""
    model.train(train)
    oracle.train(train)
    if channels_last:
        model, oracle = model.to(memory_format=torch.channels_last), oracle.to(memory_format=torch.channels_last)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    for x in _batches(3, channels_last):
        y, y_ref = compiled(x.requires_grad_()), oracle(x.detach().requires_grad_())
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        if channels_last:
            assert y.is_contiguous(memory_format=torch.channels_last)
        if train:  # (not y.square().sum(): that is nearly constant after BN, its gradient noise)
            r = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
            (y * r).sum().backward()
            (y_ref * r).sum().backward()
    for (k, p), (_, q) in zip(model.named_parameters(), oracle.named_parameters()):
        if train:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=k)
    ref_state = oracle.state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ref_state[k], rtol=1e-5, atol=1e-6, msg=k)


_FAST = {(True, False, None), (True, True, 0.1), (False, True, None)}  # the rest: slow (compiles are)


@pytest.mark.parametrize(
    "train,channels_last,momentum",
    [
        pytest.param(t, c, m, marks=() if (t, c, m) in _FAST else pytest.mark.slow)
        for t in (True, False) for c in (False, True) for m in (0.1, None)
    ],
)
def test_compiled_equals_torch_bn_and_eager(train, channels_last, momentum):
    torch_model = small_net(momentum)
    _compare_compiled(bnkit.convert(torch_model), copy.deepcopy(torch_model), "aot_eager", train, channels_last)


def test_compiled_variants_equal_eager():
    # Axis, shared affine, renorm, ghost: bnkit semantics kept in the graph (eager bnkit is the oracle).
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), bnkit.BatchNorm2d(4, share_affine="weight"), nn.ReLU(),
        nn.Conv2d(4, 4, 1), bnkit.BatchRenorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 1), bnkit.GhostBatchNorm2d(4, virtual_batch_size=2),
    )
    for train in (True, False):
        _compare_compiled(copy.deepcopy(model), copy.deepcopy(model), "aot_eager", train, False)
    last_axis = bnkit.BatchNorm1d(6, axis=-1, momentum=None)
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(last_axis), backend="aot_eager", fullgraph=True)
    for x in (torch.randn(5, 3, 6), torch.randn(5, 3, 6) + 2):
        torch.testing.assert_close(compiled(x), last_axis(x), rtol=1e-5, atol=1e-5)
    for k, v in last_axis.state_dict().items():
        torch.testing.assert_close(compiled._orig_mod.state_dict()[k], v, msg=k)


def test_compiled_nonfinite_skip_keeps_statistics_without_host_sync():
    layer = bnkit.BatchNorm2d(3, momentum=None)  # nonfinite="skip"
    eager = copy.deepcopy(layer)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # fullgraph: no .item() in the graph
    x = torch.randn(4, 3, 5, 5)
    bad = x.clone()
    bad[1, 2, 0, 0] = float("inf")
    for batch in (x, bad, x * 2):
        compiled(batch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            eager(batch)
    for k, v in eager.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[k], v, msg=k)
    assert int(layer.num_batches_tracked) == 2


def test_functional_batch_norm_compiles_without_graph_break():
    rm, rv = torch.zeros(4), torch.ones(4)
    rm_ref, rv_ref = rm.clone(), rv.clone()

    def f(x, rm, rv):
        return torch.relu(bnkit.functional.batch_norm(x, rm, rv, training=True, momentum=0.2))

    x = torch.randn(6, 4, 3)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(f)(x, rm, rv)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    rm.zero_(), rv.fill_(1)
    y = torch.compile(f, backend="aot_eager", fullgraph=True)(x, rm, rv)
    y_ref = torch.relu(torch.nn.functional.batch_norm(x, rm_ref, rv_ref, training=True, momentum=0.2))
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(rm, rm_ref)
    torch.testing.assert_close(rv, rv_ref)


_FRESH = textwrap.dedent(
    """
    import sys, torch
    import bnkit
    from torch import nn
    assert not bnkit.kernels._cpp_ok, "the kernels were loaded before the first call"
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), bnkit.BatchNorm2d(4, momentum=None), nn.ReLU(), bnkit.BatchNorm2d(4))
    x = torch.randn(2, 3, 6, 6)
    for mode in ("train", "eval"):
        getattr(net, mode)()
        e = torch._dynamo.explain(net)(x)
        print(mode, e.graph_count, e.graph_break_count, [str(r.reason)[:80] for r in e.break_reasons])
    """
)


def test_no_graph_break_when_the_first_bnkit_call_of_a_process_is_compiled():
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-c", _FRESH], capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line.split(" ", 3) for line in out.stdout.strip().splitlines()]
    assert [(m, g, b) for m, g, b, _ in lines] == [("train", "1", "0"), ("eval", "1", "0")], out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True])
def test_inductor_equals_torch_bn(channels_last):
    torch_model = small_net(None)
    for train in (True, False):
        _compare_compiled(bnkit.convert(torch_model), copy.deepcopy(torch_model), "inductor", train, channels_last)


@pytest.mark.slow
def test_inductor_fuses_bn_like_torch():
    # The same number of generated kernels as for torch's own BN model: BN fused with its neighbours.
    from torch._inductor.utils import run_and_get_code

    torch_model = small_net().eval()
    model = bnkit.convert(torch_model).eval()
    x = torch.randn(2, 3, 6, 6)
    counts = []
    for m in (torch_model, model):
        torch._dynamo.reset()
        _, code = run_and_get_code(torch.compile(m), x)
        counts.append(sum(c.count("def kernel") + c.count("extern \"C\"") for c in code))
    assert counts[0] == counts[1], counts
