"""torch.compile of masked BN (``layer(x, mask=...)``): one graph, the semantics of eager mode.

Oracles: ``torch._dynamo.explain`` in a fresh process whose first bnkit call is
compiled (graph breaks), eager bnkit on the same batches (outputs, gradients,
buffers), and torch's own ``BatchNorm1d`` on the valid entries alone (what a
masked batch means). The valid count stays a tensor in the graph, so an
all-padding batch, a batch of one valid entry and NaN in the padding are all
decided without a host synchronisation.
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
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bnkit
from bnkit import kernels

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

SRC = str(Path(bnkit.__file__).resolve().parents[1])

# Every case is first called compiled (explain), so the C++ extension must stay unloaded throughout
# (plain BatchNorm2d: tests/test_compile.py).
_FRESH = textwrap.dedent(
    """
    import torch, bnkit
    torch.manual_seed(0)
    x1, m1 = torch.randn(6, 4, 5), torch.rand(6, 5) > 0.3
    x2, m2 = torch.randn(4, 3, 5, 5), torch.rand(4, 5, 5) > 0.5
    cases = {
        "masked_bn1d": (bnkit.BatchNorm1d(4), (x1,), {"mask": m1}),
        "masked_bn1d_cumulative": (bnkit.BatchNorm1d(4, momentum=None), (x1,), {"mask": m1}),
        "masked_bn1d_propagate": (bnkit.BatchNorm1d(4, nonfinite="propagate"), (x1,), {"mask": m1}),
        "masked_bn1d_tiny_running": (bnkit.BatchNorm1d(4, tiny_batch="running"), (x1,), {"mask": m1}),
        "renorm2d": (bnkit.BatchRenorm2d(3), (x2,), {}),
        "ghost2d": (bnkit.GhostBatchNorm2d(3, virtual_batch_size=2), (x2,), {}),
        "shared": (bnkit.SharedBatchNorm(3, sites=2), (x2,), {"site": 1}),
        "shared_masked": (bnkit.SharedBatchNorm(3, sites=2), (x2,), {"site": 0, "mask": m2}),
        "masked_renorm2d": (bnkit.BatchRenorm2d(3), (x2,), {"mask": m2}),
        "masked_renorm1d_fixed": (bnkit.BatchRenorm1d(4, schedule="fixed", momentum=None), (x1,), {"mask": m1}),
        "masked_ghost2d": (bnkit.GhostBatchNorm2d(3, virtual_batch_size=2), (x2,), {"mask": m2}),
        "masked_ghost1d_remainder": (bnkit.GhostBatchNorm1d(4, virtual_batch_size=4), (x1,), {"mask": m1}),
    }
    for name, (layer, args, kwargs) in cases.items():
        for mode in ("train", "eval"):
            getattr(layer, mode)()
            torch._dynamo.reset()
            e = torch._dynamo.explain(layer)(*args, **kwargs)
            print(name, mode, e.graph_count, e.graph_break_count, bool(bnkit.kernels._cpp_ok),
                  [str(r.reason)[:80] for r in e.break_reasons])
    """
)

_FRESH_CASES = (
    "masked_bn1d", "masked_bn1d_cumulative", "masked_bn1d_propagate", "masked_bn1d_tiny_running", "renorm2d", "ghost2d", "shared",
    "shared_masked", "masked_renorm2d", "masked_renorm1d_fixed", "masked_ghost2d", "masked_ghost1d_remainder",
)


def test_one_graph_when_the_first_bnkit_call_of_a_process_is_compiled():
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", _FRESH], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split(" ", 5) for line in out.stdout.strip().splitlines()]
    got = [tuple(r[:5]) for r in rows]
    expected = [(name, mode, "1", "0", "False") for name in _FRESH_CASES for mode in ("train", "eval")]
    assert got == expected, out.stdout


def _masked_batches(n_steps: int = 4, shape: tuple[int, ...] = (6, 4, 5)):
    """``(x, mask)`` pairs: ordinary, NaN in the padding, all padding, Inf in the padding."""
    g = torch.Generator().manual_seed(1)
    out = []
    for step in range(n_steps):
        x = torch.randn(*shape, generator=g) * 3 + 1
        mask = torch.rand(shape[:1] + shape[2:], generator=g) > 0.4
        if step == 2:
            mask = torch.zeros_like(mask)
        pad = ~mask.unsqueeze(1).expand_as(x)
        x[pad] = (0.0, float("nan"), 1e3, float("inf"))[step % 4]
        out.append((x, mask))
    return out


def _layer(momentum, nonfinite="skip"):
    torch.manual_seed(0)
    layer = bnkit.BatchNorm1d(4, momentum=momentum, nonfinite=nonfinite)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2)
        layer.bias.uniform_(-1, 1)
    return layer


def _grad(p):
    return torch.zeros_like(p) if p.grad is None else p.grad


def _step_equals_eager(compiled, layer, eager, x, mask, g):
    """One training step of the compiled layer and its eager copy: outputs, input and parameter gradients."""
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    yc, ye = compiled(xc, mask=mask), eager(xe, mask=mask)
    torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-4, equal_nan=True)
    r = torch.randn(yc.shape, generator=g)
    # (padded outputs may be NaN/Inf: their gradient is dy * scale, to their own input only)
    (yc * r).nan_to_num(0.0, 0.0, 0.0).sum().backward()
    (ye * r).nan_to_num(0.0, 0.0, 0.0).sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(layer.named_parameters(), eager.parameters()):
        torch.testing.assert_close(_grad(p), _grad(q), rtol=1e-4, atol=1e-5, msg=name)
        assert torch.isfinite(_grad(p)).all(), name
        p.grad = q.grad = None


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_compiled_masked_training_equals_eager(backend, momentum):
    layer = _layer(momentum)
    eager = copy.deepcopy(layer)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    g = torch.Generator().manual_seed(5)
    for x, mask in _masked_batches():
        _step_equals_eager(compiled, layer, eager, x, mask, g)
    eager_state = eager.state_dict()
    for k, v in layer.state_dict().items():
        torch.testing.assert_close(v, eager_state[k], rtol=1e-6, atol=1e-6, msg=k)
    assert int(layer.num_batches_tracked) == 4  # the all-padding batch is counted, as an empty batch


_PROPERTY = {}


@settings(max_examples=15, deadline=None)
@given(bits=st.lists(st.booleans(), min_size=15, max_size=15), seed=st.integers(0, 2**16))
def test_compiled_masked_step_equals_eager_for_any_mask(bits, seed):
    # One compiled graph (same shapes) for every mask: any number of valid entries, decided in the graph.
    if not _PROPERTY:
        torch._dynamo.reset()
        _PROPERTY["layer"] = layer = _layer(None)
        _PROPERTY["compiled"] = torch.compile(layer, backend="aot_eager", fullgraph=True)
    layer, compiled = _PROPERTY["layer"], _PROPERTY["compiled"]
    eager = copy.deepcopy(layer)
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(seed)) * 2
    mask = torch.tensor(bits).view(3, 5)
    if int(mask.sum()) == 1:
        with pytest.raises(RuntimeError, match="more than 1 value"):
            compiled(x, mask=mask)
        return
    torch.testing.assert_close(compiled(x, mask=mask), eager(x, mask=mask), rtol=1e-5, atol=1e-4)
    for k, v in eager.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[k], v, rtol=1e-6, atol=1e-6, msg=k)


def test_compiled_masked_training_equals_torch_bn_on_the_valid_entries():
    layer = _layer(None)
    oracle = nn.BatchNorm1d(4, momentum=None)
    oracle.load_state_dict(layer.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    for x, mask in _masked_batches(2):  # (the ones with valid entries)
        y = compiled(x, mask=mask)
        rows = x.permute(0, 2, 1)[mask]  # (n_valid, C)
        torch.testing.assert_close(y.permute(0, 2, 1)[mask], oracle(rows), rtol=1e-5, atol=1e-5)
    for k, v in oracle.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_compiled_all_padding_batch_is_an_empty_batch():
    layer = _layer(0.1)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 4, 5, requires_grad=True)
    y = compiled(x, mask=torch.zeros(3, 5, dtype=torch.bool))
    torch.testing.assert_close(y, layer.bias.detach().view(1, -1, 1).expand_as(y))
    y.sum().backward()
    assert not x.grad.any() and not _grad(layer.weight).any() and not _grad(layer.bias).any()
    for k, v in layer.state_dict().items():
        expected = before[k] + 1 if k == "num_batches_tracked" else before[k]
        assert torch.equal(v, expected), k


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_compiled_nonfinite_valid_entry_keeps_statistics(nonfinite):
    # In a graph "raise" acts as "skip" (no host check): the batch is neither applied nor counted.
    layer = _layer(0.1, nonfinite)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x, mask = torch.randn(3, 4, 5), torch.ones(3, 5, dtype=torch.bool)
    x[0, 2, 1] = float("nan")
    compiled(x, mask=mask)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_compiled_one_valid_entry_raises_and_changes_nothing():
    layer = _layer(0.1)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 4, 5)
    compiled(x, mask=torch.rand(3, 5) > 0.2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    one = torch.zeros(3, 5, dtype=torch.bool)
    one[1, 2] = True
    with pytest.raises(RuntimeError, match="Expected more than 1 value per channel"):
        compiled(x, mask=one)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):  # eager: the same message
        layer(x, mask=one)


@pytest.mark.parametrize(("make", "momentum"), [
    (bnkit.BatchNorm1d, 0.1), (bnkit.BatchNorm1d, None),
    (lambda c, **kw: bnkit.BatchRenorm1d(c, schedule="fixed", **kw), 0.1),  # r and d in use from the first batch
])
def test_compiled_tiny_batch_running_takes_the_running_statistics_for_one_valid_entry(make, momentum):
    """tiny_batch="running" in one graph: a batch of one valid entry gets the running statistics' output and
    changes no buffer, as in eager mode (where the count is read on the host); other batches train."""
    torch.manual_seed(0)
    layer = make(4, momentum=momentum, tiny_batch="running")
    with torch.no_grad():
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
    eager = copy.deepcopy(layer)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    one = torch.zeros(3, 5, dtype=torch.bool)
    one[1, 2] = True
    masks = [torch.rand(3, 5) > 0.3, one, torch.zeros(3, 5, dtype=torch.bool), one, torch.rand(3, 5) > 0.6]
    for step, mask in enumerate(masks):
        x = torch.randn(3, 4, 5) * 2 + 1
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ya, yb = compiled(xa, mask=mask), eager(xb, mask=mask)
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5, msg=f"step {step} output")
        r = torch.randn(ya.shape, generator=torch.Generator().manual_seed(step))
        (ya * r).sum().backward()
        (yb * r).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5, msg=f"step {step} input grad")
        for (name, p), q in zip(layer.named_parameters(), eager.parameters()):
            # an all-padding batch: eager leaves no gradient, the graph a zero one (as without tiny_batch)
            grads = [torch.zeros_like(p) if g is None else g for g in (p.grad, q.grad)]
            torch.testing.assert_close(*grads, rtol=1e-4, atol=1e-5, msg=f"step {step} {name}.grad")
            p.grad = q.grad = None
        for k, v in eager.state_dict().items():
            torch.testing.assert_close(layer.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=f"step {step} {k}")
        if mask is one:  # hand-checked: the running statistics' map, nothing written
            rm, rv = before["running_mean"], before["running_var"]
            expected = (x - rm[:, None]) / torch.sqrt(rv[:, None] + layer.eps) * before["weight"][:, None]
            torch.testing.assert_close(ya, expected + before["bias"][:, None], rtol=1e-5, atol=1e-5)
            for k, v in layer.state_dict().items():
                assert torch.equal(v, before[k]), k


def test_compiled_masked_eval_and_channels_last_equal_eager():
    torch.manual_seed(0)
    layer = bnkit.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    mask = torch.rand(4, 5, 5) > 0.3
    eager = copy.deepcopy(layer)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    for train in (True, False):
        layer.train(train)
        eager.train(train)
        y = compiled(x, mask=mask)
        torch.testing.assert_close(y, eager(x, mask=mask), rtol=1e-5, atol=1e-5)
        assert y.is_contiguous(memory_format=torch.channels_last)
    for k, v in eager.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[k], v, rtol=1e-6, atol=1e-6, msg=k)


def test_compiled_masked_shared_batch_norm_equals_eager():
    # Per-site statistics: the update writes into a row of the [sites, C] buffers, in the graph.
    torch.manual_seed(0)
    layer = bnkit.SharedBatchNorm(4, sites=2, momentum=None)
    eager = copy.deepcopy(layer)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    for step, (x, mask) in enumerate(_masked_batches()):
        torch.testing.assert_close(
            compiled(x, site=step % 2, mask=mask), eager(x, site=step % 2, mask=mask), rtol=1e-5, atol=1e-4,
            equal_nan=True,
        )
    for k, v in eager.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[k], v, rtol=1e-6, atol=1e-6, msg=k)
    assert layer.num_batches_tracked.tolist() == [2, 2]


# Batch Renorm with a schedule that moves during the steps (r and d bounded by the step, num_batches_tracked),
# and with the final bounds from the first step; Ghost BN with equal chunks and with a smaller last one.
_VARIANTS = {
    "renorm2d_ramp": (
        lambda: bnkit.BatchRenorm2d(4, momentum=0.3, warmup_steps=1, r_max_steps=3, d_max_steps=4, r_max=2.0,
                                    d_max=1.0),
        (6, 4, 3, 2),
    ),
    "renorm1d_fixed_cumulative": (
        lambda: bnkit.BatchRenorm1d(4, momentum=None, schedule="fixed", r_max=1.5, d_max=0.5), (6, 4, 5),
    ),
    "ghost2d": (lambda: bnkit.GhostBatchNorm2d(4, virtual_batch_size=3, momentum=0.2), (6, 4, 3, 2)),
    "ghost1d_remainder_cumulative": (lambda: bnkit.GhostBatchNorm1d(4, virtual_batch_size=4, momentum=None),
                                     (6, 4, 5)),
}


def _variant(name):
    make, shape = _VARIANTS[name]
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2)
        layer.bias.uniform_(-1, 1)
        # Moving statistics away from the batches' own, so that Batch Renorm's r and d are not 1 and 0.
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 3)
    return layer, shape


def _variant_batches(shape):
    """Five steps: ordinary, NaN in the padding, all padding, Inf in the padding, then a first virtual
    batch (samples 0..2) with no valid entry (the other chunks still normalized)."""
    batches = _masked_batches(5, shape)
    x, mask = batches[4]
    mask[:3] = False
    x[:3] = float("nan")  # (all padding there)
    return batches


@pytest.mark.parametrize("backend", ["eager", "aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", list(_VARIANTS))
def test_compiled_masked_renorm_and_ghost_training_equal_eager(backend, name):
    layer, shape = _variant(name)
    eager = copy.deepcopy(layer)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    g = torch.Generator().manual_seed(5)
    limits = []
    for x, mask in _variant_batches(shape):
        if name.startswith("renorm"):
            limits.append(eager.limits())
        _step_equals_eager(compiled, layer, eager, x, mask, g)
        eager_state = eager.state_dict()
        for k, v in layer.state_dict().items():  # after every step: the schedule's step is num_batches_tracked
            torch.testing.assert_close(v, eager_state[k], rtol=1e-5, atol=1e-6, msg=k)
    assert int(layer.num_batches_tracked) == 5  # the all-padding batch is counted, as an empty batch
    if name == "renorm2d_ramp":  # the bounds grew during the steps (warm-up, ramp, final)
        assert limits[0] == (1.0, 0.0) and limits[-1] == (2.0, 1.0) and len(set(limits)) >= 4, limits


def test_compiled_masked_renorm_differs_from_plain_batch_norm():
    # The test above compares like with like; this checks that r and d act in the compiled graph at all.
    layer, shape = _variant("renorm1d_fixed_cumulative")
    plain = bnkit.BatchNorm1d(4, momentum=None)
    plain.load_state_dict(layer.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x, mask = _variant_batches(shape)[0]
    y = compiled(x, mask=mask)
    assert not torch.allclose(y, plain(x, mask=mask), atol=1e-3)
    for k, v in plain.state_dict().items():  # the same update: r and d change only the output
        torch.testing.assert_close(layer.state_dict()[k], v, rtol=1e-6, atol=1e-6, msg=k)


def test_compiled_masked_ghost_single_valid_value_raises_and_changes_nothing():
    layer, shape = _variant("ghost1d_remainder_cumulative")
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x, mask = _variant_batches(shape)[0]
    compiled(x, mask=mask)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    mask = mask.clone()
    mask[4:] = False
    mask[5, 2] = True  # the last virtual batch (samples 4..5): one valid entry
    with pytest.raises(RuntimeError, match="single valid value"):
        compiled(x, mask=mask)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="single valid value"):  # eager: the same message
        layer(x, mask=mask)


def test_portable_masked_gradients_ignore_nonfinite_padding():
    # The portable masked forward (the compiled path's, and the "torch" backend's) against the C++ kernels:
    # NaN/Inf in the padding reaches neither the statistics nor any gradient but the padding's own.
    if not kernels.cpp_available():
        pytest.skip("the C++ extension is not available on this machine")
    results = []
    for backend in ("torch", "cpp"):
        layer = _layer(0.1)
        x, mask = _masked_batches(2)[1]  # NaN in the padding
        x.requires_grad_()
        with kernels.use_backend(backend), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = layer(x, mask=mask)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).nan_to_num(0.0, 0.0, 0.0).sum().backward()
        results.append((y, x.grad, layer.weight.grad, layer.bias.grad, layer.running_var))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert all(torch.isfinite(t).all() for t in results[0][1:])


@pytest.mark.slow
def test_inductor_masked_training_equals_eager():
    layer = _layer(None)
    eager = copy.deepcopy(layer)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="inductor", fullgraph=True)
    for x, mask in _masked_batches():
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        yc, ye = compiled(xc, mask=mask), eager(xe, mask=mask)
        torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-4, equal_nan=True)
        yc.nan_to_num(0.0, 0.0, 0.0).square().sum().backward()
        ye.nan_to_num(0.0, 0.0, 0.0).square().sum().backward()
        torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-4, atol=1e-4)
    for k, v in eager.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[k], v, rtol=1e-6, atol=1e-6, msg=k)
