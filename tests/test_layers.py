"""Layer behaviour beyond the parity matrix: state_dict, bad input, empty batches,
non-finite batches, the generic axis layer, torch.compile and torch.fx."""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch

import bnkit
from _state import assert_state_unchanged, snapshot

PAIRS = [(bnkit.BatchNorm1d, torch.nn.BatchNorm1d), (bnkit.BatchNorm2d, torch.nn.BatchNorm2d), (bnkit.BatchNorm3d, torch.nn.BatchNorm3d)]


@pytest.mark.parametrize("ours,theirs", PAIRS)
def test_constructor_signature_is_torch_compatible(ours, theirs):
    mine = inspect.signature(ours).parameters
    for name, p in inspect.signature(theirs).parameters.items():
        assert name in mine, name
        assert mine[name].kind == p.kind and mine[name].default == p.default, name


@pytest.mark.parametrize("ours,theirs", PAIRS)
@pytest.mark.parametrize("kwargs", [{}, {"affine": False}, {"track_running_stats": False}, {"bias": False}, {"momentum": None}])
def test_state_dict_round_trips_both_directions(ours, theirs, kwargs):
    t = theirs(5, **kwargs)
    with torch.no_grad():
        for name, v in t.state_dict().items():
            if v.is_floating_point():
                v.copy_(torch.randn_like(v).abs() + 0.1)
            else:
                v.fill_(7)
    b = ours(5, **kwargs)
    b.load_state_dict(t.state_dict(), strict=True)
    t2 = theirs(5, **kwargs)
    t2.load_state_dict(b.state_dict(), strict=True)
    for k, v in t.state_dict().items():
        assert torch.equal(b.state_dict()[k], v)
        assert torch.equal(t2.state_dict()[k], v)
    assert [n for n, _ in b.named_parameters()] == [n for n, _ in t.named_parameters()]
    assert [n for n, _ in b.named_buffers()] == [n for n, _ in t.named_buffers()]


def test_old_state_dict_without_num_batches_tracked_loads():
    t = torch.nn.BatchNorm2d(3)
    sd = t.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata = {"": {"version": 1}}
    b = bnkit.BatchNorm2d(3)
    b.num_batches_tracked.fill_(5)
    b.load_state_dict(sd, strict=True)
    # As torch: a checkpoint without the count keeps the layer's current count.
    t.num_batches_tracked.fill_(5)
    t.load_state_dict(sd, strict=True)
    assert int(b.num_batches_tracked) == int(t.num_batches_tracked) == 5


def test_bad_input_raises_clearly_and_changes_nothing():
    bn = bnkit.BatchNorm2d(4)
    bn(torch.randn(3, 4, 2, 2))
    before = snapshot(bn)
    cases = [
        (torch.randn(3, 4, 2), ValueError, "expected 4D input"),
        (torch.randn(3, 5, 2, 2), ValueError, "expected 4 features"),
        (torch.randn(1, 4, 1, 1), ValueError, "more than 1 value per channel"),
        ([1.0, 2.0], TypeError, "torch.Tensor"),
        (torch.randn(3, 4, 2, 2, dtype=torch.float64), TypeError, "dtype"),
        (torch.ones(3, 4, 2, 2, dtype=torch.long), TypeError, "floating-point"),
        (torch.randn(3, 4, 2, 2, device="meta"), RuntimeError, "device"),
    ]
    for x, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            bn(x)
        assert_state_unchanged(bn, before)
    bn.eps = 0.0
    with pytest.raises(ValueError, match="eps must be positive"):
        bn(torch.randn(3, 4, 2, 2))
    assert_state_unchanged(bn, before)


def test_constructor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="eps"):
        bnkit.BatchNorm2d(3, eps=0)
    with pytest.raises(ValueError, match="num_features"):
        bnkit.BatchNorm2d(0)
    with pytest.raises(ValueError, match="momentum"):
        bnkit.BatchNorm2d(3, momentum=1.5)
    with pytest.raises(ValueError, match="nonfinite"):
        bnkit.BatchNorm2d(3, nonfinite="ignore")
    with pytest.raises(ValueError, match="share_affine"):
        bnkit.BatchNorm2d(3, share_affine="some")


def test_empty_batch_behaves_like_torch():
    ours, theirs = bnkit.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    x1 = torch.randn(0, 3, 4, 4, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = ours(x1), theirs(x2)
    assert y1.shape == y2.shape == (0, 3, 4, 4)
    y1.sum().backward()
    y2.sum().backward()
    assert x1.grad.shape == x2.grad.shape
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k


def test_nonfinite_batch_policies():
    good = torch.randn(8, 3)
    bad = good.clone()
    bad[2, 1] = float("nan")

    bn = bnkit.BatchNorm1d(3)
    bn(good)
    before = snapshot(bn)
    with pytest.warns(RuntimeWarning, match="not finite"):
        bn(bad)
    assert_state_unchanged(bn, before)

    bn = bnkit.BatchNorm1d(3, nonfinite="raise")
    bn(good)
    before = snapshot(bn)
    with pytest.raises(FloatingPointError):
        bn(bad)
    assert_state_unchanged(bn, before)

    ours, theirs = bnkit.BatchNorm1d(3, nonfinite="propagate"), torch.nn.BatchNorm1d(3)
    inf = good.clone()
    inf[0, 0] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(inf)
    theirs(inf)
    # "propagate" updates like torch: the same entries become non-finite, the others agree.
    for k, v in theirs.state_dict().items():
        mine = ours.state_dict()[k]
        if v.is_floating_point():
            assert torch.equal(torch.isfinite(mine), torch.isfinite(v)), k
            torch.testing.assert_close(mine[torch.isfinite(v)], v[torch.isfinite(v)])
        else:
            assert torch.equal(mine, v)


def test_nonfinite_skip_without_host_sync_path_matches(monkeypatch):
    """The compiled/accelerator path (torch.where) skips exactly like the eager path."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    bn = bnkit.BatchNorm1d(3, momentum=None)
    bn(torch.randn(6, 3))
    before = snapshot(bn)
    bad = torch.randn(6, 3)
    bad[0, 0] = float("nan")
    bn(bad)
    assert_state_unchanged(bn, before)
    x = torch.randn(6, 3)
    bn(x)
    assert int(bn.num_batches_tracked) == 2


def test_generic_axis_matches_torch_on_permuted_data(backend):
    torch.manual_seed(0)
    x = torch.randn(4, 5, 6, 3, dtype=torch.float64)  # (N, H, W, C)
    ours = bnkit.BatchNorm(3, axis=-1, dtype=torch.float64)
    theirs = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    with torch.no_grad():
        ours.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        theirs.weight.copy_(ours.weight)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().permute(0, 3, 1, 2).requires_grad_(True)
    y1 = ours(x1)
    y2 = theirs(x2).permute(0, 2, 3, 1)
    torch.testing.assert_close(y1, y2, rtol=0, atol=1e-12)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad.permute(0, 2, 3, 1), rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=0, atol=1e-12)
    # Any rank: a 1-D feature axis in the middle of a 5-D tensor.
    z = torch.randn(2, 3, 4, 2, 2, dtype=torch.float64)
    mid = bnkit.BatchNorm(4, axis=2, dtype=torch.float64)
    ref = torch.nn.BatchNorm3d(4, dtype=torch.float64)
    torch.testing.assert_close(mid(z), ref(z.transpose(1, 2)).transpose(1, 2), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="axis"):
        mid(torch.randn(4, 4))


def test_shared_affine_parameter_shapes_and_repr():
    bn = bnkit.BatchNorm2d(6, share_affine="all")
    assert bn.weight.shape == (1,) and bn.bias.shape == (1,)
    assert "2 affine parameters" in repr(bn)
    assert bnkit.BatchNorm2d(6, share_affine="weight").bias.shape == (6,)


def test_half_parameters_and_buffers_like_torch():
    ours, theirs = bnkit.BatchNorm2d(3).bfloat16(), torch.nn.BatchNorm2d(3).bfloat16()
    x = torch.randn(4, 3, 5, 5).bfloat16()
    torch.testing.assert_close(ours(x), theirs(x), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-2, atol=1e-2)


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bnkit.BatchNorm2d(4), torch.nn.ReLU())
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(4, 3, 8, 8)
    for _ in range(2):
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[1].running_mean, eager[1].running_mean)
    assert int(model[1].num_batches_tracked) == int(eager[1].num_batches_tracked) == 2
    model.eval()
    eager.eval()
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)


def test_fx_symbolic_trace_of_a_model_with_bnkit_layers():
    """A leaf, as torch's BN is: the graph of the bnkit model is the torch model's, node for node, and the
    traced module calls the layer itself (its mode and state live)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), bnkit.BatchNorm1d(6), torch.nn.ReLU())
    ref = bnkit.convert(copy.deepcopy(model), to="torch")
    gm, gm_ref = torch.fx.symbolic_trace(model), torch.fx.symbolic_trace(ref)
    shape = lambda g: [(n.op, n.target, len(n.args)) for n in g.graph.nodes]  # noqa: E731
    assert shape(gm) == shape(gm_ref)
    assert gm.get_submodule("1") is model[1] and gm.state_dict().keys() == gm_ref.state_dict().keys()
    x = torch.randn(5, 4)
    for train in (True, False):  # traced in training mode, run in both, as torch's traced model runs
        gm.train(train)
        gm_ref.train(train)
        torch.testing.assert_close(gm(x), gm_ref(x))
        torch.testing.assert_close(model[1].running_mean, ref[1].running_mean)


def test_fx_layer_with_hooks_applies_them_once_as_a_traced_into_module():
    """docs/differences.md: a layer with forward hooks is traced as fx traces any module outside torch.nn:
    its hooks run once while tracing (on the Proxy) and what they compute is in the graph, which calls the
    layer's forward; so an output-changing hook applies once (oracle: the eager model)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), bnkit.BatchNorm1d(6)).eval()
    seen = []
    model[1].register_forward_hook(lambda m, args, out: seen.append(type(out).__name__) or out + 1)
    gm = torch.fx.symbolic_trace(model)
    assert seen == ["Proxy"]
    x = torch.randn(5, 4)
    torch.testing.assert_close(gm(x), model(x))
    assert seen == ["Proxy", "Tensor"]  # the eager call's
    assert [n.op for n in gm.graph.nodes if n.op in ("get_attr", "call_method")] == ["get_attr", "call_method"]
