"""The fused layer call (torch.ops.bnkit.batch_norm_layer) behind bnkit's layers.

Oracles: torch.nn.BatchNormNd, and bnkit's own general Python path (the fused
call disabled by patching ``bnkit.engine.fused_call`` to return None).  Skipped when the C++
extension cannot be built on this machine.
"""

from __future__ import annotations

import contextlib
import warnings
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bnkit
import bnkit.engine
from bnkit import kernels
from bnkit.kernels import cpp
from _compare import assert_close, input_grad_scale, output_scale
from _state import assert_state_unchanged, snapshot

if not cpp.available():  # pragma: no cover - depends on the machine
    pytest.skip(f"the C++ extension cannot be built here: {cpp.build_error()}", allow_module_level=True)

ops = torch.ops.bnkit
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
# rank -> (bnkit class, torch class, spatial dims)
CLASSES = {2: (bnkit.BatchNorm1d, nn.BatchNorm1d, ()), 3: (bnkit.BatchNorm1d, nn.BatchNorm1d, (5,)),
           4: (bnkit.BatchNorm2d, nn.BatchNorm2d, (3, 4)), 5: (bnkit.BatchNorm3d, nn.BatchNorm3d, (2, 3, 2))}
FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


@pytest.fixture(autouse=True)
def _cpp_backend():
    with kernels.use_backend("cpp"):
        yield


@contextlib.contextmanager
def general_path():
    """bnkit's general Python path: the fused call declines everything."""
    off = lambda *a, **k: None  # noqa: E731
    with mock.patch.object(bnkit.engine, "fused_call", off):
        yield


@contextlib.contextmanager
def fused_spy():
    """Counts the layer calls that the fused op handled (so a 'fused' run really was fused)."""
    handled = []
    real = bnkit.engine.fused_call

    def spy(*args, **kwargs):
        y = real(*args, **kwargs)
        handled.append(y is not None)
        return y

    with mock.patch.object(bnkit.engine, "fused_call", spy):
        yield handled


def make(shape, dtype=torch.float64, fmt=None, seed=0, loc=0.7, scale=2.5):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + loc).to(dtype)
    return x.contiguous(memory_format=fmt) if fmt is not None else x


def tied(ours_cls, theirs_cls, C, seed=0, **kw):
    ours, theirs = ours_cls(C, **kw), theirs_cls(C, **kw)
    if ours.weight is not None:
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed + 99)
            ours.weight.copy_(torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
            ours.bias.copy_(torch.randn(C, generator=g, dtype=torch.float64))
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def step(module, x, g):
    """Forward + backward on a fresh leaf copy of x; (output, input grad, param grads, buffers)."""
    x1 = x.clone().requires_grad_(True)
    y = module(x1)
    y.backward(g)
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad(set_to_none=True)
    return y, x1.grad, grads, {n: b.clone() for n, b in module.named_buffers()}


def compare(r1, r2, tol, what, gscale, yscale=1.0):
    (y1, gx1, pg1, b1), (y2, gx2, pg2, b2) = r1, r2
    assert_close(y1, y2, tol, f"{what} output", yscale)
    assert_close(gx1, gx2, tol, f"{what} input grad", gscale)
    assert pg1.keys() == pg2.keys() and b1.keys() == b2.keys()
    for n in pg1:
        assert_close(pg1[n], pg2[n], tol, f"{what} {n} grad")
    for n in b1:
        if n == "num_batches_tracked":
            assert int(b1[n]) == int(b2[n]), what
        else:
            assert_close(b1[n], b2[n], tol, f"{what} {n}")


# ---------------------------------------------------------------- 1. parity
@settings(max_examples=25, deadline=None)
@given(
    rank=st.sampled_from([2, 3, 4, 5]),
    channels=st.integers(1, 5),
    batch=st.integers(2, 5),
    channels_last=st.booleans(),
    affine=st.booleans(),
    track=st.booleans(),
    momentum=st.sampled_from([0.1, None]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_fused_matches_general_path_and_torch(rank, channels, batch, channels_last, affine, track, momentum, dtype, seed):
    ours_cls, theirs_cls, spatial = CLASSES[rank]
    shape = (batch, channels) + spatial
    fmt = FORMATS.get(rank) if channels_last else None
    kw = dict(momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype)
    fused, theirs = tied(ours_cls, theirs_cls, channels, seed, **kw)
    general = ours_cls(channels, **kw)
    general.load_state_dict(fused.state_dict())
    tol = TOL[dtype]
    for i in range(4):  # three training steps, then eval
        if i == 3:
            for m in (fused, general, theirs):
                m.eval()
        x = make(shape, dtype, fmt, seed + i)
        g = make(shape, dtype, fmt, seed + 1000 + i, loc=0.0, scale=1.0)
        assert kernels.select(x) == "cpp"
        with fused_spy() as handled:
            r_fused = step(fused, x, g)
        assert handled == [True], "the fused op declined a plain case"
        with general_path():
            r_general = step(general, x, g)
        r_torch = step(theirs, x, g)
        batch_stats = i < 3 or not track  # ill-conditioned when a channel's values nearly coincide:
        gscale = input_grad_scale(x, g, 1e-5) if batch_stats else 1.0  # errors scale with 1/std
        yscale = output_scale(x, 1e-5) if batch_stats else 1.0
        compare(r_fused, r_general, tol, f"step {i} fused vs general", gscale, yscale)
        compare(r_fused, r_torch, tol, f"step {i} fused vs torch", gscale, yscale)
        if fmt is not None:
            assert r_fused[0].is_contiguous(memory_format=fmt) and r_fused[1].is_contiguous(memory_format=fmt)


# ------------------------------------------------- 2. not a view; memory format
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_output_is_fresh_and_inplace_relu_trains_like_torch(fmt):
    C = 4
    ours = nn.Sequential(bnkit.BatchNorm2d(C, dtype=torch.float64), nn.ReLU(inplace=True))
    theirs = nn.Sequential(nn.BatchNorm2d(C, dtype=torch.float64), nn.ReLU(inplace=True))
    x = make((5, C, 3, 4), fmt=fmt)
    for y in (ours[0](x), ours[0](x.clone().requires_grad_(True))):  # without and with autograd
        assert y._base is None and y.is_contiguous(memory_format=fmt)
    ours.load_state_dict(theirs.state_dict())
    for i in range(3):
        x = make((5, C, 3, 4), fmt=fmt, seed=i)
        g = make((5, C, 3, 4), fmt=fmt, seed=50 + i, loc=0.0, scale=1.0)
        r1, r2 = step(ours, x, g), step(theirs, x, g)
        compare(r1, r2, 1e-10, f"step {i}", input_grad_scale(x, g, 1e-5))
        assert r1[1].is_contiguous(memory_format=fmt), "input grad lost the memory format"
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        assert_close(ours(x), theirs(x), 1e-10, "eval output")
    r1, r2 = step(ours, x, g), step(theirs, x, g)  # eval layer inside a trained graph, in-place ReLU
    compare(r1, r2, 1e-10, "eval with grad", 1.0)
    assert r1[1].is_contiguous(memory_format=fmt)


# ------------------------------------------- 3. strided input; 4. eval with grad
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["transposed", "contiguous", "channels_last"])
def test_strided_and_eval_inputs_match_torch(training, layout):
    ours, theirs = tied(bnkit.BatchNorm2d, nn.BatchNorm2d, 3, dtype=torch.float64)
    with torch.no_grad():  # non-trivial running statistics for eval
        for m in (ours, theirs):
            m.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
            m.running_var.copy_(torch.tensor([0.7, 2.0, 1.5]))
    ours.train(training)
    theirs.train(training)
    x = make((4, 3, 5, 6))
    g = make((4, 3, 6, 5), seed=1, loc=0.0, scale=1.0)
    x = {"transposed": x.transpose(2, 3), "contiguous": x.reshape(4, 3, 6, 5),
         "channels_last": x.reshape(4, 3, 6, 5).contiguous(memory_format=torch.channels_last)}[layout]
    if layout == "transposed":
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    with fused_spy() as handled:
        r1 = step(ours, x, g)
    assert handled == [True]
    compare(r1, step(theirs, x, g), 1e-10, f"{layout} training={training}", input_grad_scale(x, g, 1e-5))


@settings(max_examples=40, deadline=None)
@given(
    rank=st.sampled_from([3, 4, 5]),
    sizes=st.lists(st.integers(1, 3), min_size=5, max_size=5),
    order=st.permutations(range(5)),
    training=st.booleans(),
    grad=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_memory_order_with_size_one_axes_matches_torch(rank, sizes, order, training, grad, seed):
    """Inputs in every memory order, with size-1 axes (whose strides are arbitrary) among them.

    The op reads a layout from the strides (contiguous, features innermost, or neither: a copy) and then
    views the memory as (outer, C, inner); a wrong reading normalizes the wrong values. The oracle is
    torch's layer on a contiguous copy: torch 2.13's own CPU backward is wrong for some of these inputs
    (a channels-last input whose size-1 axis has a non-canonical stride, with a contiguous gradient;
    docs/differences.md, "Numerics").
    """
    ours_cls, theirs_cls, _ = CLASSES[rank]
    shape = [max(2, sizes[0])] + sizes[1:rank]
    shape[1] = max(shape[1], 1)
    perm = [d for d in order if d < rank]
    x = make(tuple(shape[d] for d in perm), seed=seed).permute([perm.index(d) for d in range(rank)])
    assert tuple(x.shape) == tuple(shape)
    ours, theirs = tied(ours_cls, theirs_cls, shape[1], seed=seed, dtype=torch.float64)
    with torch.no_grad():
        for m in (ours, theirs):
            m.running_mean.uniform_(-1, 1, generator=torch.Generator().manual_seed(seed))
            m.running_var.uniform_(0.5, 2, generator=torch.Generator().manual_seed(seed + 1))
    ours.train(training)
    theirs.train(training)
    if torch.Size(shape).numel() // shape[1] <= 1 and training:
        return  # one value per channel: torch's error, the general path's
    if grad:
        g = make(tuple(shape), seed=seed + 2, loc=0.0, scale=1.0)
        with fused_spy() as handled:
            r1 = step(ours, x, g)
        compare(r1, step(theirs, x.contiguous(), g), 1e-10, f"order {perm}", input_grad_scale(x, g, 1e-5))
    else:
        with torch.no_grad(), fused_spy() as handled:
            y1 = ours(x)
        with torch.no_grad():
            assert_close(y1, theirs(x.contiguous()), 1e-10, f"order {perm} output")
        for name, buf in ours.named_buffers():
            assert_close(buf.double(), getattr(theirs, name).double(), 1e-10, name)
    assert handled == [True]


# ------------------------------------------------------- 5. double backward
def test_double_backward_matches_torch():
    ours, theirs = tied(bnkit.BatchNorm2d, nn.BatchNorm2d, 3, dtype=torch.float64)
    x = make((4, 3, 2, 3), fmt=torch.channels_last)
    g = make((4, 3, 2, 3), seed=3, loc=0.0, scale=1.0)
    results = []
    for m in (ours, theirs):
        x1 = x.clone().requires_grad_(True)
        y = m(x1)
        gx, gw, gb = torch.autograd.grad((y * g).sum(), (x1, m.weight, m.bias), create_graph=True)
        loss = (gx**2).sum() + (gw * torch.arange(3.0, dtype=torch.float64)).sum() + (gx * x1).sum()
        results.append(torch.autograd.grad(loss, (x1, m.weight)))
    for a, b, name in zip(results[0], results[1], ("d2/dx", "d2/dweight")):
        assert_close(a, b, 1e-9, name)


def test_gradgradcheck_through_the_layer():
    bn = bnkit.BatchNorm2d(2, track_running_stats=False, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.3, 0.6]))
        bn.bias.copy_(torch.tensor([0.2, -0.4]))
    x = make((3, 2, 2, 2), scale=1.0).requires_grad_(True)

    def f(inp, w, b):
        return torch.func.functional_call(bn, {"weight": w, "bias": b}, (inp,))

    w, b = bn.weight.detach().clone().requires_grad_(True), bn.bias.detach().clone().requires_grad_(True)
    with fused_spy() as handled:
        f(x, w, b)
    assert handled == [True]
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


# -------------------------------------------------------- 6. declined cases
def test_shared_weight_layer_equals_general_path():
    x = make((4, 3, 2, 2), fmt=torch.channels_last)
    g = make((4, 3, 2, 2), seed=2, loc=0.0, scale=1.0)
    a = bnkit.BatchNorm2d(3, share_affine="weight", dtype=torch.float64)
    with torch.no_grad():
        a.weight.fill_(1.7)
        a.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    b = bnkit.BatchNorm2d(3, share_affine="weight", dtype=torch.float64)
    b.load_state_dict(a.state_dict())
    r1 = step(a, x, g)
    with general_path():
        r2 = step(b, x, g)
    compare(r1, r2, 1e-12, "share_affine='weight'", input_grad_scale(x, g, 1e-5))


def _error_of(module, x):
    with pytest.raises(Exception) as info:
        module(x)
    return type(info.value), str(info.value)


BAD = {"channels": (bnkit.BatchNorm2d, (3, 5, 2, 2)), "rank-2d": (bnkit.BatchNorm2d, (3, 4, 2)),
       "rank-1d": (bnkit.BatchNorm1d, (3, 4, 2, 2)), "rank-3d": (bnkit.BatchNorm3d, (3, 4, 2, 2)),
       "one-value": (bnkit.BatchNorm2d, (1, 4, 1, 1))}


@pytest.mark.parametrize("cls,shape", BAD.values(), ids=BAD.keys())
def test_bad_input_raises_the_general_paths_error(cls, shape):
    bn, x = cls(4), make(shape, torch.float32)
    before = snapshot(bn)
    fused_err = _error_of(bn, x)
    with general_path():
        assert fused_err == _error_of(bn, x)
    assert issubclass(fused_err[0], ValueError)  # channel mismatches: ChannelMismatchError (RuntimeError too)
    assert_state_unchanged(bn, before)


@pytest.mark.parametrize("nonfinite", ["skip", "raise", "propagate"])
def test_nan_batch_follows_the_nonfinite_policy(nonfinite):
    bn, theirs = bnkit.BatchNorm2d(3, nonfinite=nonfinite), nn.BatchNorm2d(3)
    warm = make((4, 3, 2, 2), dtype=torch.float32, seed=9)
    bn(warm), theirs(warm)
    before = snapshot(bn)
    x = make((4, 3, 2, 2), dtype=torch.float32)
    x[1, 2, 0, 1] = float("nan")
    with fused_spy() as handled:
        if nonfinite == "skip":
            with pytest.warns(RuntimeWarning, match="not finite"):
                bn(x)
        elif nonfinite == "raise":
            with pytest.raises(FloatingPointError, match="not finite"):
                bn(x)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                y1 = bn(x)
    assert handled in ([True], [])  # 'raise' raises inside the fused call
    if nonfinite != "propagate":
        assert_state_unchanged(bn, before)
        return
    y2 = theirs(x)
    assert torch.equal(y1.isnan(), y2.isnan()) and bn.running_var.isnan()[2]
    assert_close(y1.nan_to_num(), y2.nan_to_num(), 1e-5, "output")
    for name in ("running_mean", "running_var"):
        a, b = getattr(bn, name), getattr(theirs, name)
        assert torch.equal(a.isnan(), b.isnan())
        assert_close(a.nan_to_num(), b.nan_to_num(), 1e-5, name)
    assert int(bn.num_batches_tracked) == int(theirs.num_batches_tracked) == 2


# --------------------------------------------------------------- 7. raw op
def _layer_op(x, w=None, b=None, state=(None, None, None), num_features=0, ranks=0, check_finite=True):
    return ops.batch_norm_layer(x, w, b, *state, True, 0.1, 1e-5, 1, num_features, ranks, check_finite)


def _state3(mean=0.0, var=1.0, nbt=0):
    return torch.full((3,), mean, dtype=torch.float64), torch.full((3,), var, dtype=torch.float64), torch.tensor(nbt)


@pytest.mark.parametrize("case", ["meta", "num_features", "ranks", "one-element-weight"])
def test_raw_op_declines_and_returns_the_input_itself(case):
    x, state, kw = make((4, 3, 2, 2)), _state3(), {}
    if case == "meta":
        x, state = x.to("meta"), tuple(t.to("meta") for t in state)
    elif case == "num_features":
        kw["num_features"] = 5
    elif case == "ranks":
        kw["ranks"] = (1 << 2) | (1 << 3) | (1 << 5)  # everything but 4-D
    else:
        kw["w"] = torch.tensor([1.5], dtype=torch.float64)
    y, status = _layer_op(x, state=state, **kw)
    assert status == 2 and y is x
    if case != "meta":
        assert all(torch.equal(a, b) for a, b in zip(state, _state3()))


def test_raw_op_plain_case_matches_torch():
    x = make((4, 3, 2, 2))
    w, b = torch.tensor([1.5, 0.5, 1.0], dtype=torch.float64), torch.tensor([0.1, 0.0, -0.3], dtype=torch.float64)
    state, (rm2, rv2, _) = _state3(), _state3()
    y, status = _layer_op(x, w, b, state, num_features=3, ranks=1 << 4)
    assert status == 0 and y is not x and y._base is None
    assert_close(y, torch.nn.functional.batch_norm(x, rm2, rv2, w, b, True, 0.1, 1e-5), 1e-10, "output")
    assert_close(state[0], rm2, 1e-12, "running_mean")
    assert_close(state[1], rv2, 1e-12, "running_var")
    assert int(state[2]) == 1


def test_raw_op_nonfinite_batch_keeps_running_stats():
    x = make((4, 3, 2, 2))
    x[0, 1, 1, 1] = float("nan")
    state = _state3(0.25, 2.0, 4)
    y, status = _layer_op(x, state=state, check_finite=True)
    assert status == 1 and y is not x and y[:, 1].isnan().all() and not y[:, 0].isnan().any()
    assert all(torch.equal(a, b) for a, b in zip(state, _state3(0.25, 2.0, 4)))


# ------------------------------------------------- 8. cumulative average
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cumulative_average_over_three_batches_matches_torch(dtype):
    ours, theirs = tied(bnkit.BatchNorm1d, nn.BatchNorm1d, 4, momentum=None, dtype=dtype)
    for i in range(3):
        x = make((6, 4, 3), dtype, seed=20 + i, loc=float(i))
        with fused_spy() as handled:
            y1 = ours(x)
        assert handled == [True]
        assert_close(y1, theirs(x), TOL[dtype], f"output {i}")
        assert_close(ours.running_mean, theirs.running_mean, TOL[dtype], f"running_mean {i}")
        assert_close(ours.running_var, theirs.running_var, TOL[dtype], f"running_var {i}")
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == i + 1
    # the F-style API takes the fused path too and agrees with torch's
    rm1, rv1 = ours.running_mean.clone(), ours.running_var.clone()
    rm2, rv2 = rm1.clone(), rv1.clone()
    x = make((6, 4, 3), dtype, seed=30)
    assert_close(bnkit.functional.batch_norm(x, rm1, rv1, training=True, momentum=0.2),
          torch.nn.functional.batch_norm(x, rm2, rv2, training=True, momentum=0.2), TOL[dtype], "F output")
    assert_close(rm1, rm2, TOL[dtype], "F running_mean")
    assert_close(rv1, rv2, TOL[dtype], "F running_var")


# --------------------------------------------------------------- inference mode
def test_inference_mode_and_buffers_made_under_it():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4)
    ours, theirs = bnkit.BatchNorm2d(3), nn.BatchNorm2d(3)
    with torch.inference_mode():  # training steps inside inference mode update the buffers
        y1, y2 = ours(x), theirs(x)
    assert_close(y1, y2, 1e-5, "output")
    assert_close(ours.running_var, theirs.running_var, 1e-6, "running_var")
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 1
    with torch.inference_mode():
        made_inside, torch_inside = bnkit.BatchNorm2d(3), nn.BatchNorm2d(3)
    # Outside inference mode, updating inference-tensor buffers is torch's error, not a silent write.
    with pytest.raises(RuntimeError) as theirs_err:
        torch_inside(x)
    with pytest.raises(RuntimeError) as ours_err:
        made_inside(x)
    assert "inference" in str(ours_err.value).lower() and "inference" in str(theirs_err.value).lower()
    assert int(made_inside.num_batches_tracked) == 0
