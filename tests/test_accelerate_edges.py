"""bnkit.accelerate() on the edges: cases beyond tests/test_accelerate.py.

The oracle is torch with the acceleration off, on the same inputs (for the
inputs torch 2.13's CPU backward gets wrong, torch on a contiguous copy):
outputs, every gradient, the running buffers, num_batches_tracked, version
counters, strides and exception types must agree.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from _compare import assert_close, input_grad_scale, output_scale
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import bnkit
from bnkit.kernels import cpp

if not cpp.available():  # pragma: no cover - depends on the machine
    pytest.skip(f"the C++ extension cannot be built here: {cpp.build_error()}", allow_module_level=True)

TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 4e-3}
SPATIAL = {2: (), 3: (4,), 4: (3, 2), 5: (2, 2, 3)}
LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


pytestmark = pytest.mark.usefixtures("accelerate_off")  # every test starts and ends with it off


def make(shape, dtype=torch.float32, seed=0, loc=0.7, scale=2.5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + loc).to(dtype)


def arrange(t: torch.Tensor, kind: str) -> torch.Tensor:
    """t's values in the memory arrangement `kind` (a view or a copy with those strides)."""
    if kind == "channels_last" and t.dim() in LAST:
        return t.contiguous(memory_format=LAST[t.dim()])
    if kind == "feature_last":  # movedim(1, -1) contiguous, any rank (a transposed 3-D input for rank 3)
        return t.movedim(1, -1).contiguous().movedim(-1, 1)
    if kind == "slice":  # a strided view of a larger tensor
        return torch.cat([t, t], dim=-1)[..., : t.shape[-1]]
    if kind == "expand":  # every sample the same memory (stride 0 on the batch axis)
        return t[:1].expand(t.shape)
    if kind == "odd_size_one":  # contiguous, size-1 axes with an arbitrary stride
        return t.as_strided(t.shape, [7 if n == 1 else s for n, s in zip(t.shape, t.stride())])
    return t


def check_same(a, e, tol, what, scale=1.0):
    """a (accelerated) and e (torch): the same dtype, strides, non-finite pattern and values."""
    if a is None or e is None:
        assert a is None and e is None, what
        return
    assert a.dtype == e.dtype and a.shape == e.shape, f"{what}: {a.dtype} {a.shape} vs {e.dtype} {e.shape}"
    if a.numel() > 1:
        assert a.stride() == e.stride(), f"{what}: strides {a.stride()} vs {e.stride()}"
    assert torch.equal(a.isnan(), e.isnan()) and torch.equal(a.isinf(), e.isinf()), f"{what}: non-finite pattern"
    assert_close(a.nan_to_num(0.0, 0.0, 0.0), e.nan_to_num(0.0, 0.0, 0.0), tol, what, scale)


# ------------------------------------------- 1. F.batch_norm, every layout
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rank=st.sampled_from([2, 3, 4, 5]),
    batch=st.integers(1, 4),
    channels=st.integers(1, 3),
    size_one=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    training=st.booleans(),
    stats=st.booleans(),
    weight=st.booleans(),
    bias=st.booleans(),
    needs=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    momentum=st.sampled_from([0.1, 0.0, 1.0, 1 / 3]),
    eps=st.sampled_from([1e-5, 1e-3, 0.5]),
    x_kind=st.sampled_from(["contiguous", "channels_last", "feature_last", "slice", "expand", "odd_size_one"]),
    g_kind=st.sampled_from(["contiguous", "channels_last", "feature_last", "slice", "expand", "odd_size_one", "x"]),
    seed=st.integers(0, 2**16),
)
def test_functional_any_layout_and_any_gradient_subset_matches_torch(
    rank, batch, channels, size_one, dtype, training, stats, weight, bias, needs, momentum, eps, x_kind, g_kind, seed
):
    spatial = list(SPATIAL[rank])
    if size_one and spatial:
        spatial[seed % len(spatial)] = 1
    shape = (batch, channels, *spatial)
    stats = stats or not training  # F.batch_norm needs the running statistics in eval
    half = dtype in (torch.bfloat16, torch.float16)
    pdtype = torch.float32 if half else dtype  # half inputs with float32 parameters (autocast-style)
    x0 = arrange(make(shape, dtype, seed), x_kind)
    g0 = arrange(make(shape, dtype, seed + 1, 0.0, 1.0), x_kind if g_kind == "x" else g_kind)
    w0 = make((channels,), pdtype, seed + 2, 1.0, 0.3) if weight else None
    b0 = make((channels,), pdtype, seed + 3) if bias else None
    rm0 = make((channels,), pdtype, seed + 4) if stats else None
    rv0 = make((channels,), pdtype, seed + 5).abs() + 0.5 if stats else None
    one_value = training and x0.numel() // channels <= 1

    def run(on):
        x = x0.detach().requires_grad_(needs[0])
        w = w0.clone().requires_grad_(needs[1]) if weight else None
        b = b0.clone().requires_grad_(needs[2]) if bias else None
        rm, rv = (rm0.clone(), rv0.clone()) if stats else (None, None)
        with bnkit.accelerated(on):
            if one_value:
                with pytest.raises(ValueError, match="more than 1 value per channel"):
                    F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
                return None, (), rm, rv, None
            y = F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
            leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
            grads = torch.autograd.grad(y, leaves, g0) if leaves else ()
        return y, grads, rm, rv, (rm._version, rv._version) if stats else None

    y1, g1, rm1, rv1, v1 = run(True)
    y2, g2, rm2, rv2, v2 = run(False)
    assert v1 == v2, "running-statistics version counters"
    tol = TOL[dtype]
    batch_stats = training
    yscale = output_scale(x0.double(), eps) if batch_stats else 4.0
    gscale = input_grad_scale(x0.double(), g0.double(), eps) if batch_stats else 4.0
    if y2 is not None:
        check_same(y1, y2, tol, "output", yscale)
    assert len(g1) == len(g2)
    for i, (a, e) in enumerate(zip(g1, g2)):
        check_same(a, e, tol, f"gradient {i}", gscale)
    if stats:
        check_same(rm1, rm2, tol, "running_mean", yscale)
        check_same(rv1, rv2, tol, "running_var", yscale**2)


def test_expanded_grad_output_of_sum_backward_matches_torch():
    # y.sum().backward() hands the backward a stride-0 gradient of ones
    for fmt, train in itertools.product((torch.contiguous_format, torch.channels_last), (True, False)):
        bn = nn.BatchNorm2d(3).train(train)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.running_var.uniform_(0.5, 1.5)
        ref = copy.deepcopy(bn)
        x = make((4, 3, 5, 6)).contiguous(memory_format=fmt)
        out = {}
        for on, m in ((True, bn), (False, ref)):
            xs = x.detach().requires_grad_(True)
            with bnkit.accelerated(on):
                m(xs).sum().backward()
            out[on] = (xs.grad, m.weight.grad, m.bias.grad)
        assert bnkit.accelerate_counts(reset=True)["backward"] == 1  # served, not handed to ATen
        for a, e in zip(out[True], out[False]):
            check_same(a, e, 1e-5, f"fmt={fmt} train={train}", 10.0)


# ------------------------------------------- 2. modules: modes and state
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("momentum", [None, 0.3])
def test_no_grad_and_inference_mode_update_state_like_torch(context, training, momentum):
    ours = nn.BatchNorm2d(3, momentum=momentum).train(training)
    theirs = copy.deepcopy(ours)
    res = {}
    for on, m in ((True, ours), (False, theirs)):
        with bnkit.accelerated(on), context():
            ys = [m(make((4, 3, 5, 5), seed=i)) for i in range(3)]
        res[on] = (ys, m.running_mean._version, m.running_var._version)
    for a, e in zip(res[True][0], res[False][0]):
        check_same(a, e, 1e-5, "output", 8.0)
    assert res[True][1:] == res[False][1:], "version counters"
    for (n, a), (_, e) in zip(ours.named_buffers(), theirs.named_buffers()):
        check_same(a, e, 1e-5, n, 8.0)


def test_inference_tensors_as_input_and_buffers_match_torch():
    with torch.inference_mode():
        x = make((4, 3, 5))
        rm0, rv0 = torch.zeros(3), torch.ones(3)
    res = {}
    for on in (True, False):
        rm, rv = rm0.clone(), rv0.clone()
        with bnkit.accelerated(on), torch.inference_mode():
            y = F.batch_norm(x, rm, rv, training=True, momentum=0.5)
        res[on] = (y, rm, rv)
    assert bnkit.accelerate_counts()["forward"] == 1
    for a, e in zip(res[True], res[False]):
        check_same(a, e, 1e-5, "inference-mode tensors", 4.0)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_empty_batch_in_training_matches_torch(fmt):
    ours = nn.BatchNorm2d(3, momentum=None)
    theirs = copy.deepcopy(ours)
    res = {}
    for on, m in ((True, ours), (False, theirs)):
        x = torch.randn(0, 3, 4, 4).contiguous(memory_format=fmt).requires_grad_(True)
        with bnkit.accelerated(on):
            y = m(x)
            y.sum().backward()
        res[on] = (y, x.grad, m.weight.grad, m.bias.grad, *m.buffers())
    for a, e in zip(res[True], res[False]):
        check_same(a, e, 0.0, "empty batch")


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1), (1, 3, 1, 1, 1)])
def test_one_value_per_channel_raises_and_changes_the_state_as_torch_does(shape):
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)]
    ours, theirs = cls(3), cls(3)
    for on, m in ((True, ours), (False, theirs)):
        with bnkit.accelerated(on), pytest.raises(ValueError, match="more than 1 value per channel"):
            m(torch.randn(shape))
    for (n, a), (_, e) in zip(ours.named_buffers(), theirs.named_buffers()):
        assert torch.equal(a, e), n  # torch counts the batch before it raises: so must we
    for on in (True, False):  # in eval one value per channel is fine
        with bnkit.accelerated(on):
            out = copy.deepcopy(ours).eval()(torch.ones(shape))
        check_same(out, theirs.eval()(torch.ones(shape)), 1e-6, "eval one value")


@pytest.mark.parametrize(
    "call",
    [
        lambda: nn.BatchNorm2d(3)(torch.randn(4, 4, 2, 2)),
        lambda: nn.BatchNorm1d(3)(torch.randn(4, 2)),
        lambda: nn.BatchNorm2d(3, track_running_stats=False)(torch.randn(4, 4, 2, 2)),
        lambda: F.batch_norm(torch.randn(4, 3, 2), None, None, torch.ones(4), None, True),
        lambda: F.batch_norm(torch.randn(4, 3, 2), None, None, None, torch.ones(2), True),
        lambda: F.batch_norm(torch.randn(4, 3, 2), torch.zeros(3), torch.ones(3), torch.ones(3).double(), None, True),
        lambda: F.batch_norm(torch.randn(4, 3, 2).bfloat16(), torch.zeros(3), torch.ones(3), torch.ones(3).bfloat16()),
        lambda: F.batch_norm(torch.randn(4, 3, 2), torch.zeros(3), torch.ones(3).double(), None, None, True),
        lambda: F.batch_norm(torch.randn(4, 3, 2), torch.zeros(3, 1), torch.ones(3, 1), None, None, True),
        lambda: F.batch_norm(torch.randn(4, 3, 2), torch.zeros(3), None, None, None, True),
    ],
    ids=["channels", "rank", "no-stats channels", "weight size", "bias size", "weight dtype", "half params",
         "stats dtypes", "2-D stats", "one stat"],
)
def test_bad_calls_raise_torchs_exception(call):
    errors = {}
    for on in (True, False):
        with bnkit.accelerated(on):
            try:
                call()
            except Exception as e:  # noqa: BLE001 - the type is what is compared
                errors[on] = (type(e), str(e).split("\n")[0])
            else:
                errors[on] = None
    assert errors[False] is not None
    assert errors[True] == errors[False]


# ------------------------------------------- 3. values that are not finite
@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_non_finite_input_gradients_match_torch(value, training, fmt):
    x = make((4, 3, 5, 5)).contiguous(memory_format=fmt)
    x[1, 1, 2, 2] = value
    g = make((4, 3, 5, 5), seed=1, loc=0.0, scale=1.0)
    res = {}
    for on in (True, False):
        xs = x.clone().requires_grad_(True)
        w, b = torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True)
        rm, rv = torch.zeros(3), torch.ones(3)
        with bnkit.accelerated(on):
            y = F.batch_norm(xs, rm, rv, w, b, training)
            res[on] = (y, *torch.autograd.grad(y, (xs, w, b), g), rm, rv)
    for i, (a, e) in enumerate(zip(res[True], res[False])):
        check_same(a, e, 1e-5, f"result {i}", 20.0)


@pytest.mark.parametrize("stats", [(0.0, float("inf")), (0.0, 0.0), (float("nan"), 1.0), (0.0, -1.0), (1.0, float("nan"))])
def test_eval_with_odd_running_statistics_matches_torch(stats):
    x = make((4, 3, 5))
    g = make((4, 3, 5), seed=1, loc=0.0, scale=1.0)
    res = {}
    for on in (True, False):
        xs = x.clone().requires_grad_(True)
        w, b = torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True)
        with bnkit.accelerated(on):
            y = F.batch_norm(xs, torch.full((3,), stats[0]), torch.full((3,), stats[1]), w, b, False)
            res[on] = (y, *torch.autograd.grad(y, (xs, w, b), g))
    for i, (a, e) in enumerate(zip(res[True], res[False])):
        check_same(a, e, 1e-5, f"result {i}", 1e3)


@pytest.mark.parametrize("mean", [float("inf"), -float("inf")])
def test_eval_weight_gradient_with_an_infinite_running_mean(mean):
    x = make((4, 3, 5))
    grads = {}
    for on in (True, False):
        w = torch.ones(3, requires_grad=True)
        with bnkit.accelerated(on):
            y = F.batch_norm(x, torch.full((3,), mean), torch.ones(3), w, None, False)
            (grads[on],) = torch.autograd.grad(y, w, torch.ones_like(y))
    assert torch.equal(grads[False], torch.full((3,), -mean))  # sum((x - inf) / sqrt(1 + eps)) = -inf
    assert torch.equal(grads[True], grads[False])


# ------------------------------------------- 4. autograd
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_gradcheck_and_gradgradcheck_with_running_statistics(training, fmt):
    x = make((3, 2, 3, 2), torch.float64).contiguous(memory_format=fmt).requires_grad_(True)
    w = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64) + 0.5

    def fn(x, w, b):
        return F.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-3)

    with bnkit.accelerated():
        assert torch.autograd.gradcheck(fn, (x, w, b))
        assert torch.autograd.gradgradcheck(fn, (x, w, b))
        assert torch.autograd.gradcheck(lambda x: fn(x, w.detach(), None), (x,))  # input only, no bias
    c = bnkit.accelerate_counts()
    assert c["forward"] > 0 and c["backward"] > 0, c


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_double_backward_with_running_statistics_matches_torch(training, fmt, dtype):
    x = make((4, 3, 3, 3), dtype).contiguous(memory_format=fmt)
    w, b = torch.rand(3, dtype=dtype) + 0.5, torch.randn(3, dtype=dtype)
    g = make((4, 3, 3, 3), dtype, seed=1, loc=0.0, scale=1.0)
    res = {}
    for on in (True, False):
        xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
        rm, rv = torch.zeros(3, dtype=dtype) + 0.3, torch.ones(3, dtype=dtype) * 1.7
        with bnkit.accelerated(on):
            y = F.batch_norm(xs, rm, rv, ws, bs, training)
            gx, gw = torch.autograd.grad((y.pow(3) * g).sum(), (xs, ws), create_graph=True)
            res[on] = torch.autograd.grad(gx.square().sum() + gw.sum(), (xs, ws, bs), allow_unused=True)
    for a, e in zip(res[True], res[False]):
        if e is None:
            assert a is None
        else:
            assert_close(a, e, 1e-4 if dtype == torch.float32 else 1e-9, "second derivative", 10.0)


def _odd_channels_last(shape):
    """Channels-last tensors of `shape` whose size-1 axes carry every non-canonical stride in {1, 5}."""
    base = make(shape, torch.float64).contiguous(memory_format=LAST[len(shape)])
    options = [[s] + ([1, 5] if n == 1 else []) for n, s in zip(shape, base.stride())]
    for strides in itertools.product(*options):
        yield base.as_strided(shape, strides)


@pytest.mark.parametrize("shape", [(2, 3, 1, 4), (2, 3, 4, 1), (1, 3, 2, 2), (2, 3, 1, 1), (3, 2, 1, 1, 2), (2, 3, 1, 2, 1)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_odd_size_one_strides_with_any_gradient_layout_give_the_right_gradients(shape, training):
    # torch 2.13 is wrong for some of these (docs/differences.md): the truth is torch on a contiguous copy
    C = shape[1]
    w = torch.rand(C, dtype=torch.float64) + 0.5
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    for x in _odd_channels_last(shape):
        for g_fmt in (torch.contiguous_format, LAST[len(shape)]):
            g = make(shape, torch.float64, seed=1, loc=0.0, scale=1.0).contiguous(memory_format=g_fmt)
            res = {}
            for on, xx in ((True, x), (False, x.contiguous())):
                with bnkit.accelerated(on):
                    y, m, s = torch.ops.aten.native_batch_norm(xx, w, None, rm.clone(), rv.clone(), training, 0.1, 1e-5)
                    res[on] = (y, *torch.ops.aten.native_batch_norm_backward(
                        g, xx, w, rm, rv, m, s, training, 1e-5, [True, True, True]))
            for i, (a, e) in enumerate(zip(res[True], res[False])):
                assert_close(a, e, 1e-10, f"{x.stride()} grad {g.stride()}: result {i}")


def test_one_channel_channels_last_input_gradient_differs_from_atens_only_in_size_one_strides():
    # the output of a 1-channel conv in a channels-last model: strides (16, 1, 4, 1), contiguous and channels-last
    # at once. ATen's gradient takes the input's or the contiguous strides depending on the gradient's layout;
    # bnkit's is contiguous (docs/acceleration.md): the same memory order, other strides on the size-1 axis only.
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 1, 3, padding=1).to(memory_format=torch.channels_last)
    x = conv(make((2, 3, 4, 4)).contiguous(memory_format=torch.channels_last)).detach().requires_grad_(True)
    bn = nn.BatchNorm2d(1)
    g = make(tuple(x.shape), seed=1)
    grads = {}
    for on in (True, False):
        with bnkit.accelerated(on):
            (grads[on],) = torch.autograd.grad(bn(x), x, g)
    assert_close(grads[True], grads[False], 1e-5, "values", input_grad_scale(x, g, 1e-5))  # the values agree
    assert grads[True].is_contiguous() and grads[False].is_contiguous()
    assert [s for n, s in zip(x.shape, grads[True].stride()) if n != 1] == [
        s for n, s in zip(x.shape, grads[False].stride()) if n != 1]


# ------------------------------------------- 5. models: autocast, larger shapes, threads
def test_autocast_bfloat16_model_training_matches_torch():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
    net = net.to(memory_format=torch.channels_last)
    ref = copy.deepcopy(net)
    x = make((4, 3, 6, 6)).contiguous(memory_format=torch.channels_last)
    outs = {}
    for on, m in ((True, net), (False, ref)):
        with bnkit.accelerated(on), torch.autocast("cpu", dtype=torch.bfloat16):
            outs[on] = m(x)
        outs[on].float().square().mean().backward()
    assert bnkit.accelerate_counts()["forward"] == 2
    check_same(outs[True], outs[False], 2e-2, "output", 8.0)
    for (n, a), (_, e) in zip(net.named_parameters(), ref.named_parameters()):
        check_same(a.grad, e.grad, 5e-2, f"{n} grad", 8.0)
    for (n, a), (_, e) in zip(net.named_buffers(), ref.named_buffers()):
        check_same(a, e, 2e-2, n, 8.0)


@pytest.mark.parametrize("threads", [1, 3])
def test_larger_shapes_and_thread_counts_match_torch(threads):
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for i, (shape, fmt) in enumerate([((9, 33, 7, 5), torch.channels_last), ((5, 17, 37), None),
                                          ((3, 65, 3, 5, 3), torch.channels_last_3d), ((257, 31), None)]):
            for training in (True, False):
                x = make(shape, seed=i)
                x = x.contiguous(memory_format=fmt) if fmt is not None else x
                g = make(shape, seed=i + 10, loc=0.0, scale=1.0)
                C = shape[1]
                w, b = torch.rand(C) + 0.5, torch.randn(C)
                res = {}
                for on in (True, False):
                    xs, ws, bs = x.detach().requires_grad_(True), w.clone().requires_grad_(True), b.clone().requires_grad_(True)
                    rm, rv = torch.zeros(C), torch.ones(C)
                    with bnkit.accelerated(on):
                        y = F.batch_norm(xs, rm, rv, ws, bs, training, 0.2)
                        res[on] = (y, *torch.autograd.grad(y, (xs, ws, bs), g), rm, rv)
                ysc, gsc = output_scale(x, 1e-5), input_grad_scale(x, g, 1e-5)
                for j, (a, e) in enumerate(zip(res[True], res[False])):
                    check_same(a, e, 1e-5, f"{shape} train={training} result {j}", [ysc, gsc, gsc, gsc, ysc, ysc**2][j])
    finally:
        torch.set_num_threads(prev)
