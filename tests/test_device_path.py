"""The accelerator path (bnkit._engine_device): on a GPU the normalization runs in ATen's batch norm and
bnkit's running-update rule is applied to the batch moments ATen returns.

No GPU is needed: the path is routed for CPU tensors too (``aten_devices("cpu")``, with the portable
backend so the fused CPU op does not take the call first), and checked against torch's own BN and
against bnkit's portable path. tests/test_cuda.py runs the same layers on a real GPU.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bnkit
from _compare import twin_layers
from bnkit import _engine_device, kernels


@pytest.fixture
def routed(monkeypatch):
    """Calls that took the ATen path, while it is routed for CPU tensors."""
    calls = []
    real = _engine_device.call

    def spy(*args, **kwargs):
        calls.append(args[1].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(_engine_device, "call", spy)
    with kernels.use_backend("torch"), _engine_device.aten_devices("cpu"):
        yield calls


def _pair(cls_t, cls_b, *args, **kw):
    return twin_layers(cls_t, cls_b, *args, **kw)


CASES = [
    (torch.nn.BatchNorm1d, bnkit.BatchNorm1d, (6, 5)),
    (torch.nn.BatchNorm1d, bnkit.BatchNorm1d, (6, 5, 7)),
    (torch.nn.BatchNorm2d, bnkit.BatchNorm2d, (4, 5, 3, 3)),
    (torch.nn.BatchNorm3d, bnkit.BatchNorm3d, (2, 5, 2, 3, 2)),
]


@pytest.mark.parametrize("cls_t,cls_b,shape", CASES)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)])
def test_matches_torch(routed, cls_t, cls_b, shape, momentum, affine, track):
    t, b = _pair(cls_t, cls_b, shape[1], momentum=momentum, affine=affine, track_running_stats=track)
    for step in range(3):
        x = torch.randn(shape) * (1 + step) + step
        xt, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        yt, yb = t(xt), b(xb)
        torch.testing.assert_close(yb, yt)
        g = torch.randn_like(yt)
        yt.backward(g)
        yb.backward(g)
        torch.testing.assert_close(xb.grad, xt.grad)
        if affine:
            torch.testing.assert_close(b.weight.grad, t.weight.grad)
            torch.testing.assert_close(b.bias.grad, t.bias.grad)
    if track:
        torch.testing.assert_close(b.running_mean, t.running_mean)
        torch.testing.assert_close(b.running_var, t.running_var)
        assert int(b.num_batches_tracked) == int(t.num_batches_tracked) == 3
    t.eval()
    b.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(b(x), t(x))
    assert len(routed) == 4


def test_channels_last(routed):
    t, b = _pair(torch.nn.BatchNorm2d, bnkit.BatchNorm2d, 5)
    x = torch.randn(4, 5, 3, 3).to(memory_format=torch.channels_last)
    yb = b(x)
    torch.testing.assert_close(yb, t(x))
    assert yb.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(b.running_var, t.running_var)
    assert routed


def _run(layer, xs):
    ys = [layer(x) for x in xs]
    return ys, {k: v.clone() for k, v in layer.state_dict().items()}


@pytest.mark.parametrize("make", [
    lambda: bnkit.BatchNorm2d(4, share_affine="weight"),
    lambda: bnkit.BatchNorm2d(4, share_affine="all"),
    lambda: bnkit.BatchNorm2d(4, nonfinite="propagate", momentum=None),
    lambda: bnkit.BatchNorm2d(4, convention="keras"),
    lambda: bnkit.GhostBatchNorm2d(4, virtual_batch_size=2),
    lambda: bnkit.BatchRenorm2d(4),
    lambda: bnkit.SharedBatchNorm(4, sites=2),
], ids=["share-weight", "share-all", "cumulative", "keras", "ghost", "renorm", "shared-sites"])
def test_variants_equal_portable_path(make, monkeypatch):
    """Every layer gives what bnkit's portable path gives, whether or not ATen serves its calls."""
    torch.manual_seed(1)
    xs = [torch.randn(4, 4, 3, 3) * 2 + 1 for _ in range(3)]
    kwargs = [{"site": i % 2} for i in range(3)] if "Shared" in type(make()).__name__ else [{}] * 3
    results = []
    for routed in (False, True):
        torch.manual_seed(2)
        layer = make()
        with kernels.use_backend("torch"), (_engine_device.aten_devices("cpu") if routed
                                            else contextlib.nullcontext()):
            ys = [layer(x, **kw) for x, kw in zip(xs, kwargs)]
            layer.eval()
            ys.append(layer(xs[0], **kwargs[0]))
        results.append((ys, {k: v.clone() for k, v in layer.state_dict().items()}))
    (ya, sa), (yb, sb) = results
    for a, b in zip(ya, yb):
        torch.testing.assert_close(b, a)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], msg=k)


def test_nonfinite_skip_keeps_bnkit_rule(routed):
    """The running statistics stay bnkit's: a batch with a NaN is skipped (torch would propagate it)."""
    b = bnkit.BatchNorm2d(3)  # nonfinite="skip"
    b(torch.randn(4, 3, 2, 2))
    before = {k: v.clone() for k, v in b.state_dict().items()}
    x = torch.randn(4, 3, 2, 2)
    x[0, 1, 0, 0] = float("nan")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        b(x)
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(b.state_dict()[k], before[k], msg=k)
    r = bnkit.BatchNorm2d(3, nonfinite="raise")
    with pytest.raises(FloatingPointError):
        r(x)
    assert int(r.num_batches_tracked) == 0 and torch.equal(r.running_var, torch.ones(3))
    assert len(routed) == 3


def test_accumulate_stats_sees_the_moments(routed):
    """The running-update hook (gradient accumulation) works on the routed path: k micro-batches update
    the statistics once, as the whole batch would."""
    x = torch.randn(8, 3, 2, 2) * 3 + 1
    whole, acc = bnkit.BatchNorm2d(3), bnkit.BatchNorm2d(3)
    whole(x)
    with bnkit.accumulate_stats(acc):
        for part in x.chunk(4):
            acc(part)
    torch.testing.assert_close(acc.running_mean, whole.running_mean)
    torch.testing.assert_close(acc.running_var, whole.running_var)
    assert int(acc.num_batches_tracked) == 1
    assert len(routed) == 5


def test_not_routed_where_aten_cannot(routed):
    """Another feature axis and mixed parameter dtypes ATen refuses stay on the portable path."""
    t = torch.nn.BatchNorm2d(3)
    b = bnkit.BatchNorm(3, axis=-1)
    x = torch.randn(4, 2, 2, 3)
    torch.testing.assert_close(b(x), t(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
    h = bnkit.BatchNorm2d(3).to(torch.bfloat16)
    h.running_mean = h.running_mean.float()  # a bf16 weight with float32 buffers: not ATen's rule
    h(torch.randn(4, 3, 2, 2, dtype=torch.bfloat16))
    assert routed == []


def test_half_input_with_float32_parameters_is_routed(routed):
    t, b = _pair(torch.nn.BatchNorm2d, bnkit.BatchNorm2d, 3)
    x = torch.randn(4, 3, 2, 2, dtype=torch.bfloat16)
    torch.testing.assert_close(b(x), t(x))
    torch.testing.assert_close(b.running_var, t.running_var)
    assert len(routed) == 1


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 6), c=st.integers(1, 5), hw=st.integers(1, 3), momentum=st.sampled_from([0.0, 0.3, 1.0, None]),
       scale=st.floats(0.1, 10.0), shift=st.floats(-5.0, 5.0))
def test_property_matches_torch(n, c, hw, momentum, scale, shift):
    t, b = _pair(torch.nn.BatchNorm2d, bnkit.BatchNorm2d, c, momentum=momentum)
    with kernels.use_backend("torch"), _engine_device.aten_devices("cpu"):
        for _ in range(2):
            x = torch.randn(n, c, hw, hw) * scale + shift
            torch.testing.assert_close(b(x), t(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(b.running_mean, t.running_mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(b.running_var, t.running_var, rtol=1e-4, atol=1e-4)
