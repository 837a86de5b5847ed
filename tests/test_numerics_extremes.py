"""Numerical accuracy at the extremes: every backend against the float64 truth, with torch's own BN as the yardstick.

Oracle: ``torch.nn.functional.batch_norm`` run in float64 by autograd on the *same rounded* inputs and parameters
(the truth), and the same call in the input's own dtype (the yardstick: what torch itself achieves). For each
quantity (output, input/weight/bias gradients, running mean and running variance) bnkit's error
``max|a - truth| / max|truth|`` must be at most twice torch's, plus a floor:

* output and running statistics: a few units of rounding of their dtype (8 for the running mean: the rule of
  tests/test_functional_edges.py::test_running_mean_of_a_small_mean_matches_torch);
* gradients, which are sums: a few units times their condition (the size of the terms summed over the size of
  the sum), as in tests/test_functional_edges.py::test_training_accuracy_no_worse_than_twice_torchs.

The cases are the gaps of the existing accuracy tests: std 1e-3 around 1e4 (the spread is one float32 step),
constant channels (variance 0), subnormal inputs, tiny and huge eps, gradients with a large common offset or
almost in the span of {1, xhat} (cancellation in the dx formula), half inputs with float32 and with same-dtype
parameters, the cumulative average (``momentum=None``) over 1000 small batches, reductions of 4M values per
channel, and the running mean of data whose mean is small next to its spread -- NCHW and channels-last throughout.

Not tested (torch cannot do it either): values whose squares overflow float32 (|x| >= ~1e18 over 16k values):
torch's float32 running variance is then inf and its output off by ~80%, as bnkit's fast backends are.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bnkit
import bnkit.functional as BF

from test_functional_edges import BACKENDS, EPS32, _use  # the backends and their switch, defined once


def _acc(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _layout(x, layout):
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x.contiguous()


def _rel(a, truth):
    """max|a - truth| / max|truth| in float64 (NaN when a has NaN/Inf where truth is finite)."""
    a, t = a.detach().double(), truth.detach().double()
    err = float((a - t).abs().max())
    return err / max(float(t.abs().max()), 1e-300)


def _truth(x, w, b, g, eps):
    """float64 autograd of torch's BN on the same (rounded) values: (y, dx, dw, db, running_mean, running_var)."""
    xd = x.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_()
    bd = b.detach().double().requires_grad_()
    rm, rv = torch.zeros(x.shape[1], dtype=torch.float64), torch.ones(x.shape[1], dtype=torch.float64)
    y = F.batch_norm(xd, rm, rv, wd, bd, training=True, momentum=1.0, eps=eps)
    y.backward(g.double())
    return y.detach(), xd.grad, wd.grad, bd.grad, rm, rv


def _run(fn, x, w, b, g, eps, backend=None):
    """One training call with momentum 1 (running stats = batch stats) and its backward."""
    xx, ww, bb = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    rm = torch.zeros(x.shape[1], dtype=w.dtype)
    rv = torch.ones(x.shape[1], dtype=w.dtype)
    with _use(backend) if backend else contextlib.nullcontext():
        y = fn(xx, rm, rv, ww, bb, training=True, momentum=1.0, eps=eps)
        y.backward(g)
    return y.detach(), xx.grad, ww.grad, bb.grad, rm, rv


def _floors(x, w, g, eps, truth):
    """The floor of each quantity's relative error (see the module docstring)."""
    xd, gd, wd = x.double(), g.double(), w.double()
    red = [d for d in range(x.dim()) if d != 1]
    sh = [1, x.shape[1]] + [1] * (x.dim() - 2)
    mean = xd.mean(red, keepdim=True)
    s = 1 / torch.sqrt(xd.var(red, unbiased=False, keepdim=True) + eps)
    xhat = (xd - mean) * s
    dx_terms = (wd.view(sh) * s) * (gd.abs() + gd.mean(red, keepdim=True).abs()
                                    + (xhat * (gd * xhat).mean(red, keepdim=True)).abs())
    u_out = float(torch.finfo(x.dtype).eps)
    u_par = float(torch.finfo(w.dtype).eps)
    size = [max(float(t.abs().max()), 1e-300) for t in truth]
    return (
        4 * u_out,
        4 * u_out * float(dx_terms.max()) / size[1],
        4 * u_par * float((gd * xhat).abs().sum(red).max()) / size[2],
        4 * u_par * float(gd.abs().sum(red).max()) / size[3],
        8 * u_par,
        8 * u_par,
    )


NAMES = ("y", "dx", "dw", "db", "running_mean", "running_var")


def _compare(x, w, b, g, eps, backend):
    """The quantities where bnkit's error exceeds 2x torch's plus the floor, as messages."""
    truth = _truth(x, w, b, g, eps)
    theirs = _run(F.batch_norm, x, w, b, g, eps)
    ours = _run(BF.batch_norm, x, w, b, g, eps, backend)
    bad = []
    for name, o, t, tr, floor in zip(NAMES, ours, theirs, truth, _floors(x, w, g, eps, truth)):
        assert o.dtype == t.dtype, f"{name}: dtype {o.dtype} != torch's {t.dtype}"
        e_ours, e_theirs = _rel(o, tr), _rel(t, tr)
        if not e_ours <= 2 * e_theirs + floor:
            bad.append(f"{name}: bnkit {e_ours:.2e} vs torch {e_theirs:.2e} (floor {floor:.1e})")
    return bad


# --------------------------------------------------------------------------- float32 training at the extremes
def _xhat64(x):
    xd = x.double()
    red = [d for d in range(x.dim()) if d != 1]
    return (xd - xd.mean(red, keepdim=True)) / xd.var(red, unbiased=False, keepdim=True).sqrt()


def _case(name):
    """(x, g, eps) in float32, NCHW (64, 3, 16, 16); the mean is never small next to the spread here."""
    gen = torch.Generator().manual_seed(21)
    r = lambda: torch.randn(64, 3, 16, 16, generator=gen)  # noqa: E731
    per_channel = lambda *v: torch.tensor(v).view(1, 3, 1, 1)  # noqa: E731
    g = r()
    if name == "mean 1e4, std 1e-3 (one float32 step)":
        return r() * 1e-3 + per_channel(1e4, -2e4, 3e4), g, 1e-5
    if name == "mean 1e6, std 1e-1":
        return r() * 1e-1 + per_channel(1e6, -1e6, 4e6), g, 1e-5
    if name == "values 1e15 (squares 1e30, no overflow)":
        return (r() + 2) * 1e15, g, 1e-5
    if name == "a constant channel (variance 0)":
        x = r() * 2 + 3
        x[:, 1] = 3.0
        return x, g, 1e-5
    if name == "std 1e-20 around 5 (constant in float32)":
        return r() * 1e-20 + per_channel(5.0, -5.0, 1.0), g, 1e-5
    if name == "std 1e-20 around 3e-20, eps 1e-5":
        return (r() + 3) * 1e-20, g, 1e-5
    if name == "subnormal values, eps 1e-5":
        return (r() + 3) * 1e-40, g, 1e-5
    if name == "subnormal values, eps 1e-30":
        return (r() + 3) * 1e-40, g, 1e-30
    if name == "std 1e-5, eps 1e-12":
        return (r() + 3) * 1e-5, g, 1e-12
    if name == "eps 1e3":
        return r() * 3 + 1, g, 1e3
    if name == "eps 1e3, std 1e-2":
        return r() * 1e-2 + 1, g, 1e3
    if name == "gradient with offset 1e4":
        return r() * 2 + 1, g + 1e4, 1e-5
    if name == "gradient ~ 1e3 * xhat + 1e3 (dx cancels)":
        x = r() * 2 + 1
        return x, (1e3 * _xhat64(x) + 1e3 + 1e-2 * g.double()).float(), 1e-5
    if name == "gradient orthogonal to xhat, offset 1e3":
        x = r() * 2 + 1
        gd, xh = g.double(), _xhat64(x)
        gd = gd - (gd * xh).mean((0, 2, 3), keepdim=True) * xh  # sum(g * xhat) = 0 exactly in float64
        return x, (gd + 1e3).float(), 1e-5
    raise KeyError(name)


CASES = [
    "mean 1e4, std 1e-3 (one float32 step)", "mean 1e6, std 1e-1", "values 1e15 (squares 1e30, no overflow)",
    "a constant channel (variance 0)", "std 1e-20 around 5 (constant in float32)", "std 1e-20 around 3e-20, eps 1e-5",
    "subnormal values, eps 1e-5", "subnormal values, eps 1e-30", "std 1e-5, eps 1e-12", "eps 1e3", "eps 1e3, std 1e-2",
    "gradient with offset 1e4", "gradient ~ 1e3 * xhat + 1e3 (dx cancels)", "gradient orthogonal to xhat, offset 1e3",
]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_training_extremes_within_twice_torchs_error(backend, case, layout):
    x, g, eps = _case(case)
    x, g = _layout(x, layout), _layout(g, layout)
    gen = torch.Generator().manual_seed(22)
    w, b = torch.rand(3, generator=gen) + 0.5, torch.randn(3, generator=gen)
    bad = _compare(x, w, b, g, eps, backend)
    assert not bad, bad


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_channel_gives_the_bias_zero_weight_gradient_and_finite_input_gradient(backend, layout):
    """var = 0: y = bias (xhat = 0 exactly), dw = 0, dx = w / sqrt(eps) * (g - mean(g)), all finite; torch alike."""
    gen = torch.Generator().manual_seed(23)
    x = _layout(torch.full((32, 2, 8, 8), -7.25), layout)
    g = _layout(torch.randn(32, 2, 8, 8, generator=gen), layout)
    w, b = torch.tensor([1.5, 0.5]), torch.tensor([0.25, -3.0])
    truth = _truth(x, w, b, g, 1e-5)
    theirs = _run(F.batch_norm, x, w, b, g, 1e-5)
    ours = _run(BF.batch_norm, x, w, b, g, 1e-5, backend)
    for name, o, t, tr in zip(NAMES, ours, theirs, truth):
        assert torch.isfinite(o).all(), name
        assert torch.isfinite(t).all(), name  # the oracle behaves the same way
        floor = 4 * EPS32 * max(float(tr.abs().max()), 1.0)
        err_o, err_t = float((o.double() - tr).abs().max()), float((t.double() - tr).abs().max())
        assert err_o <= 2 * err_t + floor, (name, err_o, err_t)
    y, dx, dw, db, rm, rv = ours
    assert (y.double() - b.double().view(1, 2, 1, 1)).abs().max() <= 4 * EPS32 * 3.0
    assert dw.abs().max() <= 4 * EPS32 * float(g.abs().sum((0, 2, 3)).max())
    assert float(rv.abs().max()) == 0.0


# --------------------------------------------------------------------------- half inputs
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("params", ["float32", "same"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_inputs_with_float32_or_same_dtype_parameters(backend, dtype, params, layout):
    """Output, gradient and buffer dtypes as torch's; every error within 2x torch's (floors in units of each
    quantity's own dtype), against float64 on the same rounded inputs and parameters."""
    gen = torch.Generator().manual_seed(24)
    x = _layout((torch.randn(32, 3, 8, 8, generator=gen) * 2 + 3).to(dtype), layout)
    g = _layout(torch.randn(32, 3, 8, 8, generator=gen).to(dtype), layout)
    pdt = torch.float32 if params == "float32" else dtype
    w, b = (torch.rand(3, generator=gen) + 0.5).to(pdt), torch.randn(3, generator=gen).to(pdt)
    bad = _compare(x, w, b, g, 1e-5, backend)
    assert not bad, bad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_input_with_large_offset_and_float32_parameters(backend, dtype):
    """Half data around 100 with spread 0.5 (a few half steps): statistics in float32 as torch's."""
    gen = torch.Generator().manual_seed(25)
    x = (torch.randn(64, 3, 8, 8, generator=gen) * 0.5 + 100).to(dtype)
    g = (torch.randn(64, 3, 8, 8, generator=gen) + 10).to(dtype)
    w, b = torch.rand(3, generator=gen) + 0.5, torch.randn(3, generator=gen)
    bad = _compare(x, w, b, g, 1e-5, backend)
    assert not bad, bad


# --------------------------------------------------------------------------- cumulative average
@pytest.mark.parametrize("layer", ["1d", "2d channels_last"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cumulative_average_over_1000_batches_drifts_no_more_than_torch(backend, layer):
    """momentum=None: running = mean of the batch statistics over 1000 batches of 8 values per channel; the
    running mean/var's distance to the exact float64 average at most 2x torch's (floor 8 float32 ulps)."""
    gen = torch.Generator().manual_seed(26)
    loc = torch.tensor([1e3, 1.0, 3e-2, -50.0])
    if layer == "1d":
        xs = torch.randn(1000, 8, 4, generator=gen) * 2 + loc
        red = (1,)
        mods = torch.nn.BatchNorm1d(4, momentum=None), bnkit.BatchNorm1d(4, momentum=None)
    else:
        xs = torch.randn(1000, 2, 4, 2, 2, generator=gen) * 2 + loc.view(4, 1, 1)
        red = (1, 3, 4)
        mods = torch.nn.BatchNorm2d(4, momentum=None), bnkit.BatchNorm2d(4, momentum=None)
    mean64 = xs.double().mean(red).mean(0)
    var64 = xs.double().var(red, unbiased=True).mean(0)
    fmt = torch.channels_last if layer != "1d" else torch.contiguous_format
    theirs, ours = mods
    with torch.no_grad():
        for x in xs:
            theirs(x.contiguous(memory_format=fmt))
        with _use(backend):
            for x in xs:
                ours(x.contiguous(memory_format=fmt))
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 1000
    for name, truth in (("running_mean", mean64), ("running_var", var64)):
        o, t = getattr(ours, name), getattr(theirs, name)
        assert o.dtype == t.dtype
        e_ours, e_theirs = _rel(o, truth), _rel(t, truth)
        assert e_ours <= 2 * e_theirs + 8 * EPS32, (name, e_ours, e_theirs)
        # per channel too: the small-mean channel must not drift where torch's does not
        per_o = ((o.double() - truth).abs() / truth.abs()).max().item()
        per_t = ((t.double() - truth).abs() / truth.abs()).max().item()
        assert per_o <= 2 * per_t + 8 * EPS32, (name, per_o, per_t)


# --------------------------------------------------------------------------- huge reductions
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_four_million_values_per_channel_with_a_large_offset(backend, layout):
    """(1024, 2, 64, 64): 4M values per channel, mean 1e3 / -3e2, std 1e-2 (cancellation and long sums)."""
    gen = torch.Generator().manual_seed(27)
    x = torch.randn(1024, 2, 64, 64, generator=gen) * 1e-2 + torch.tensor([1e3, -3e2]).view(1, 2, 1, 1)
    g = torch.randn(1024, 2, 64, 64, generator=gen)
    x, g = _layout(x, layout), _layout(g, layout)
    bad = _compare(x, torch.tensor([1.25, 0.75]), torch.tensor([0.1, -0.4]), g, 1e-5, backend)
    assert not bad, bad


# --------------------------------------------------------------------------- the running mean when |mean| << spread
_SMALL_MEAN_BUG = {
    "cpp": "BUG: csrc/rowkernels_impl.h:k_moments (via kernels.cpp:moments_impl) sums x - K in float32 along each "
           "row before flushing to double: the mean's error is ~eps32*spread, not ATen's ~eps32*|mean|",
    "torch": "BUG: stats.py:Moments.of/_accurate_mean shift by one sample x[0] (~1 std off), sum rows of x - x[0] "
             "in float32 and round mean_c (size ~spread) to float32: the mean's error is ~eps32*spread, not ~eps32*|mean|",
}


def _small_mean_params():
    out = []
    for backend in BACKENDS:
        for shape in [(64, 3, 16, 16), (128, 3, 32, 32), (16, 3, 64, 64)]:
            marks = [pytest.mark.xfail(strict=False, reason=_SMALL_MEAN_BUG[backend])] if backend in _SMALL_MEAN_BUG else []
            out.append(pytest.param(backend, shape, marks=marks, id=f"{backend}-{'x'.join(map(str, shape))}"))
    return out


@pytest.mark.parametrize("backend, shape", _small_mean_params())
def test_running_mean_of_a_mean_small_next_to_its_spread_in_nchw(backend, shape):
    """randn + 1e-3 per channel (mean / std ~ 1e-3; rows of 256-4096 values), NCHW, where ATen sums in double: bnkit's running mean must
    be within 2x torch's error of the float64 truth, floor 8 float32 ulps (the rule of
    test_functional_edges.py::test_running_mean_of_a_small_mean_matches_torch, on other shapes and data).
    (Channels-last and (N, C) are left out: torch's own float32 error there is already ~eps32 * spread.)"""
    gen = torch.Generator().manual_seed(28)
    x = torch.randn(shape, generator=gen) + torch.tensor([1e-3, -2e-3, 1.5e-3]).view([1, 3] + [1] * (len(shape) - 2))
    red = [d for d in range(x.dim()) if d != 1]
    mean64 = x.double().mean(red)
    rm_t, rv_t = torch.zeros(3), torch.ones(3)
    F.batch_norm(x, rm_t, rv_t, training=True, momentum=1.0)
    rm, rv = torch.zeros(3), torch.ones(3)
    with _use(backend):
        BF.batch_norm(x, rm, rv, training=True, momentum=1.0)
    per = lambda a: float(((a.double() - mean64).abs() / mean64.abs()).max())  # noqa: E731
    e_ours, e_theirs = per(rm), per(rm_t)
    assert e_theirs <= 8 * EPS32  # the yardstick: torch's mean is accurate to a few ulps of itself here
    assert e_ours <= 2 * e_theirs + 8 * EPS32, (e_ours, e_theirs)


def test_the_yardstick_itself_float64_truth_is_the_reference_backend():
    """The float64 truth used above agrees with NumPy's (so the yardstick is not torch grading itself)."""
    gen = torch.Generator().manual_seed(29)
    x = torch.randn(16, 3, 4, 4, generator=gen) * 1e-3 + 1e4
    g = torch.randn(16, 3, 4, 4, generator=gen)
    w, b = torch.rand(3, generator=gen) + 0.5, torch.randn(3, generator=gen)
    y, dx, dw, db, rm, rv = _truth(x, w, b, g, 1e-5)
    xn, gn = x.double().numpy(), g.double().numpy()
    mean = xn.mean((0, 2, 3), keepdims=True)
    var = ((xn - mean) ** 2).mean((0, 2, 3), keepdims=True)
    s = 1 / np.sqrt(var + 1e-5)
    xhat = (xn - mean) * s
    wn = w.double().numpy().reshape(1, 3, 1, 1)
    np.testing.assert_allclose(y.numpy(), xhat * wn + b.double().numpy().reshape(1, 3, 1, 1), rtol=1e-9, atol=1e-9)
    dx_n = wn * s * (gn - gn.mean((0, 2, 3), keepdims=True) - xhat * (gn * xhat).mean((0, 2, 3), keepdims=True))
    np.testing.assert_allclose(dx.numpy(), dx_n, rtol=1e-7, atol=1e-9 * np.abs(dx_n).max())
    np.testing.assert_allclose(dw.numpy(), (gn * xhat).sum((0, 2, 3)), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(db.numpy(), gn.sum((0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(rm.numpy(), mean.ravel(), rtol=1e-14)
    np.testing.assert_allclose(rv.numpy(), var.ravel() * 256 / 255, rtol=1e-9)
