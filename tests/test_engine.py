"""The engine's one door: call specs, constants shared with C++, the phases, the family registry.

Oracles: torch.nn.BatchNorm* / F.batch_norm (running statistics, gradients),
the full-batch computation (for the split backward phases), and pickle /
import (for the generated classes).
"""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnkit
from bnkit import engine, family, kernels
from bnkit.kernels import cpp
from _compare import assert_close

needs_cpp = pytest.mark.skipif(not cpp.available(), reason="the C++ extension cannot be built here")


# --------------------------------------------------------------- constants
@needs_cpp
def test_python_reads_the_constants_the_extension_defines():
    handled, nonfinite, not_handled, ranks_from_2, cumulative = torch.ops.bnkit.layer_constants()
    assert engine._constants() == (handled, nonfinite, not_handled, ranks_from_2, cumulative)
    assert len({handled, nonfinite, not_handled}) == 3
    # The F-style spec's rank mask is the extension's "at least (N, C)".
    assert engine.call_spec("f", 1, min_rank=2).rank_mask == ranks_from_2
    assert engine.call_spec("f", 1, momentum=None).fused_momentum == cumulative


@needs_cpp
def test_declined_call_reports_not_handled_and_changes_nothing():
    x = torch.randn(6, 3)
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(0)
    shared_weight = torch.ones(1)  # one-element parameters: the general path's case
    spec = engine.call_spec("t", 1, 3, (2, 3), 1e-5, 0.1, "skip")
    y, status = torch.ops.bnkit.batch_norm_layer(
        x, shared_weight, None, rm, rv, nbt, True, spec.fused_momentum, spec.eps, 1, 3, spec.rank_mask, True
    )
    assert status == engine._constants().not_handled
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3)) and int(nbt) == 0


@needs_cpp
@pytest.mark.parametrize("momentum", [None, 0.3])
def test_running_update_op_follows_torch_rule(momentum):
    """bnkit::running_update_ (factor, update, num_batches_tracked) against torch's BatchNorm1d."""
    theirs = nn.BatchNorm1d(4, momentum=momentum).double()
    rm, rv, nbt = theirs.running_mean.clone(), theirs.running_var.clone(), theirs.num_batches_tracked.clone()
    m = -1.0 if momentum is None else momentum
    for step in range(3):
        x = torch.randn(10, 4, dtype=torch.float64) * (step + 1) + step
        theirs(x)
        mean, var = x.mean(0), x.var(0, unbiased=False)
        assert torch.ops.bnkit.running_update_(rm, rv, nbt, mean, var, m, 10, True)
    assert_close(rm, theirs.running_mean, 1e-12, "running_mean")
    assert_close(rv, theirs.running_var, 1e-12, "running_var")
    assert int(nbt) == int(theirs.num_batches_tracked) == 3
    # An empty batch is counted, not averaged; a non-finite one changes nothing.
    before = (rm.clone(), rv.clone())
    assert torch.ops.bnkit.running_update_(rm, rv, nbt, mean, var, m, 0, True)
    assert int(nbt) == 4 and torch.equal(rm, before[0])
    bad = var.clone()
    bad[1] = float("nan")
    assert not torch.ops.bnkit.running_update_(rm, rv, nbt, mean, bad, m, 10, True)
    assert int(nbt) == 4 and torch.equal(rm, before[0]) and torch.equal(rv, before[1])


# --------------------------------------------------------------- call spec
def test_spec_follows_attribute_changes_like_torch():
    """``bn.momentum = ...`` / ``bn.eps = ...`` after the first call take effect, as in torch."""
    torch.manual_seed(0)
    ours, theirs = bnkit.BatchNorm2d(3), nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    ours(x), theirs(x)
    first = ours.call_spec()
    assert ours.call_spec() is first  # built once, kept
    for m in (ours, theirs):
        m.momentum, m.eps = 0.01, 1e-3
    y_ours, y_theirs = ours(x * 2 + 1), theirs(x * 2 + 1)
    assert ours.call_spec() is not first and ours.call_spec().momentum == 0.01
    assert_close(y_ours, y_theirs, 1e-5, "output")
    assert_close(ours.running_mean, theirs.running_mean, 1e-6, "running_mean")
    ours.momentum = theirs.momentum = None
    ours(x), theirs(x)
    assert_close(ours.running_var, theirs.running_var, 1e-6, "running_var (cumulative)")


def test_spec_rejects_an_unknown_policy():
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        engine.call_spec("x", 1, nonfinite="ignore")


def test_nonfinite_warning_points_at_the_caller():
    bn = bnkit.BatchNorm1d(3)
    bad = torch.randn(6, 3)
    bad[0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bn(bad)
    assert [w.filename for w in caught] == [__file__]


# --------------------------------------------------------------- phases
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_backward_phases_split_over_parts_give_the_full_batch_gradient(backend):
    """reduce on each part, sum, apply with the total count == the full batch's dx (SyncBN's identity)."""
    if backend == "cpp" and not cpp.available():
        pytest.skip("no C++ extension")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 4, 6, generator=g, dtype=torch.float64) * 3 + 1
    gy = torch.randn(10, 4, 6, generator=g, dtype=torch.float64)
    w = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    eps = 1e-5
    xr = x.clone().requires_grad_()
    F.batch_norm(xr, None, None, w, None, True, 0.0, eps).backward(gy)  # the oracle
    mean, var = x.mean((0, 2)), x.var((0, 2), unbiased=False)
    parts = [(x[:3], gy[:3]), (x[3:], gy[3:])]
    with kernels.use_backend(backend):
        sums = [kernels.backward_reduce(gp, xp, mean, var, eps) for xp, gp in parts]
        sum_dy = sums[0][0] + sums[1][0]
        sum_dy_xhat = sums[0][1] + sums[1][1]
        dx = torch.cat(
            [kernels.backward_apply(gp, xp, mean, var, w, sum_dy, sum_dy_xhat, 60, eps) for xp, gp in parts]
        )
    assert_close(dx, xr.grad, 1e-10, "dx from the phases")
    assert_close(sum_dy, gy.sum((0, 2)), 1e-10, "sum dy")


# --------------------------------------------------------------- family registry
@pytest.mark.parametrize(
    "name, base, dims",
    [
        ("BatchNorm2d", bnkit.BatchNorm, (4,)),
        ("BatchRenorm1d", bnkit.BatchRenorm, (2, 3)),
        ("GhostBatchNorm3d", bnkit.GhostBatchNorm, (5,)),
        ("FrozenBatchNorm2d", bnkit.FrozenBatchNorm, (4,)),
    ],
)
def test_generated_classes_are_real_picklable_classes(name, base, dims):
    cls = getattr(bnkit, name)
    assert cls.__name__ == cls.__qualname__ == name and issubclass(cls, base) and cls.expected_dims == dims
    module = __import__(cls.__module__, fromlist=[name])
    assert getattr(module, name) is cls
    assert cls.__doc__ and cls.__doc__ != base.__doc__
    assert family.ranked(base, dims) is cls and family.ranked(base, None) is base
    layer = cls(3)
    clone = pickle.loads(pickle.dumps(layer))
    assert type(clone) is cls and torch.equal(clone.running_var, layer.running_var)


def test_torch_dims_of_torch_layers():
    assert family.torch_dims(nn.BatchNorm1d(2)) == (2, 3)
    assert family.torch_dims(nn.BatchNorm3d(2)) == (5,)
    assert family.torch_dims(nn.SyncBatchNorm(2)) is None


# --------------------------------------------------------------- every family through the fast path
@needs_cpp
@pytest.mark.parametrize(
    "make, call",
    [
        (lambda: bnkit.SharedBatchNorm(3, sites=2), lambda m, x: m(x, site=1)),
        (lambda: bnkit.BatchRenorm2d(3, schedule="fixed"), lambda m, x: m(x)),
        (lambda: bnkit.GhostBatchNorm2d(3, virtual_batch_size=8), lambda m, x: m(x)),
        (lambda: bnkit.freeze(bnkit.BatchNorm2d(3)), lambda m, x: m(x)),
    ],
    ids=["shared", "renorm", "ghost", "frozen"],
)
def test_every_family_takes_the_fused_op_and_matches_the_general_path(make, call, monkeypatch):
    """The fused op handles the family's calls, with the general path's results (its oracle)."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64) * 2 + 1
    fused_layer, general_layer = make().double(), make().double()
    general_layer.load_state_dict(fused_layer.state_dict())
    handled = []
    real = engine.fused_call

    def spy(*args):
        y = real(*args)
        handled.append(y is not None)
        return y

    with kernels.use_backend("cpp"):
        monkeypatch.setattr(engine, "fused_call", spy)
        xf = x.clone().requires_grad_()
        yf = call(fused_layer, xf)
        yf.sum().backward()
        monkeypatch.setattr(engine, "fused_call", lambda *args: None)
        xg = x.clone().requires_grad_()
        yg = call(general_layer, xg)
        yg.sum().backward()
    assert handled and all(handled)
    assert_close(yf, yg, 1e-12, "output")
    assert_close(xf.grad, xg.grad, 1e-10, "input gradient")
    for (name, a), (_, b) in zip(fused_layer.state_dict().items(), general_layer.state_dict().items()):
        assert_close(a, b, 1e-12, name)
