"""Edges of the F-style API (bnkit.functional) and the numerics of the engine and its kernel backends.

Oracles, never bnkit's own code: ``torch.nn.functional.batch_norm`` on the same arguments (outputs, every
gradient, the in-place update of the running buffers, exception types), ``torch.autograd.gradcheck`` /
``gradgradcheck`` in float64, and a float64 NumPy reference written here from the formulas (the accuracy
yardstick: bnkit's error against it is compared with torch's own float32 error). Every backend the engine
can select (``cpp``, ``torch``, ``reference``) is probed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import grad, jacfwd, jacrev, jvp, vmap

import bnkit.functional as BF
from bnkit import kernels

BACKENDS = ["cpp", "torch", "reference"]
EPS32 = float(torch.finfo(torch.float32).eps)


def _use(backend):
    if backend == "cpp" and not kernels.cpp_available():
        pytest.skip("the C++ extension is not available here")
    return kernels.use_backend(backend)


# --------------------------------------------------------------------------- float64 NumPy reference (written here)
def np_train(x, w=None, b=None, eps=1e-5):
    """(y, mean, biased var) of BN in training, features on axis 1, in float64."""
    x = np.asarray(x, dtype=np.float64)
    red = tuple(d for d in range(x.ndim) if d != 1)
    shape = [1] * x.ndim
    shape[1] = x.shape[1]
    mean = x.mean(axis=red)
    var = ((x - mean.reshape(shape)) ** 2).mean(axis=red)
    y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    if w is not None:
        y = y * np.asarray(w, dtype=np.float64).reshape(shape)
    if b is not None:
        y = y + np.asarray(b, dtype=np.float64).reshape(shape)
    return y, mean, var


def np_backward(g, x, w=None, eps=1e-5):
    """(dx, dw, db): d/dx of sum(g * y) through the batch statistics (chain rule by hand)."""
    g = np.asarray(g, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    red = tuple(d for d in range(x.ndim) if d != 1)
    shape = [1] * x.ndim
    shape[1] = x.shape[1]
    m = x.size // x.shape[1]
    mean = x.mean(axis=red).reshape(shape)
    var = ((x - mean) ** 2).mean(axis=red).reshape(shape)
    s = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean) * s
    db = g.sum(axis=red)
    dw = (g * xhat).sum(axis=red)
    gamma = np.ones(shape) if w is None else np.asarray(w, dtype=np.float64).reshape(shape)
    dx = gamma * s * (g - db.reshape(shape) / m - xhat * dw.reshape(shape) / m)
    return dx, dw, db


def np_running(rm, rv, mean, var, count, momentum):
    """torch's rule: (1 - m) * running + m * batch, with the unbiased batch variance."""
    unbiased = var * count / (count - 1)
    return (1 - momentum) * np.asarray(rm, np.float64) + momentum * mean, (1 - momentum) * np.asarray(
        rv, np.float64
    ) + momentum * unbiased


def _rel(a, truth):
    a = np.asarray(a.detach().double().numpy() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    return float(np.abs(a - truth).max() / max(np.abs(truth).max(), 1e-300))


def _run(fn, x, w, b, g, eps, momentum, backend=None):
    """One training call + backward: (y, dx, dw, db, running_mean, running_var)."""
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    xx, ww, bb = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    rm, rv = torch.zeros(x.shape[1], dtype=acc), torch.ones(x.shape[1], dtype=acc)
    ctx = _use(backend) if backend else torch.enable_grad()
    with ctx:
        y = fn(xx, rm, rv, ww, bb, training=True, momentum=momentum, eps=eps)
        y.backward(g)
    return y.detach(), xx.grad, ww.grad, bb.grad, rm, rv


# --------------------------------------------------------------------------- exception types and state after errors
def _x():
    return torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(0))


# (name, call(fn, x, rm, rv)); torch raises for each. bnkit must raise a subclass of torch's type
# (so `except TorchType` keeps working) and leave the running buffers as they were.
RAISING = {
    "running_mean of the wrong length": lambda f, x, rm, rv: f(x, torch.zeros(4), rv, training=True),
    "running_var of the wrong length (eval)": lambda f, x, rm, rv: f(x, rm, torch.ones(4), training=False),
    "weight of the wrong length": lambda f, x, rm, rv: f(x, rm, rv, torch.ones(4), training=True),
    "bias of the wrong length": lambda f, x, rm, rv: f(x, rm, rv, None, torch.ones(2), training=True),
    "one value per channel": lambda f, x, rm, rv: f(torch.randn(1, 3), rm, rv, training=True),
    "one value per channel, 3-D": lambda f, x, rm, rv: f(torch.randn(1, 3, 1), rm, rv, training=True),
    "float64 stats, float32 input": lambda f, x, rm, rv: f(x, rm.double(), rv.double(), training=True),
    "float64 stats, float32 input (eval)": lambda f, x, rm, rv: f(x, rm.double(), rv.double(), training=False),
    "float32 stats, float64 input": lambda f, x, rm, rv: f(x.double(), rm, rv, training=True),
    "float16 stats, float32 input": lambda f, x, rm, rv: f(x, rm.half(), rv.half(), training=True),
    "bfloat16 stats, float16 input": lambda f, x, rm, rv: f(x.half(), rm.bfloat16(), rv.bfloat16(), training=True),
    "running_mean without running_var": lambda f, x, rm, rv: f(x, rm, None, training=True),
    "running_var without running_mean": lambda f, x, rm, rv: f(x, None, rv, training=True),
    "running_mean without running_var (eval)": lambda f, x, rm, rv: f(x, rm, None, training=False),
    "eval without running stats": lambda f, x, rm, rv: f(x, None, None, training=False),
    "eps=0 in training": lambda f, x, rm, rv: f(x, rm, rv, training=True, eps=0.0),
    "negative eps in training": lambda f, x, rm, rv: f(x, rm, rv, training=True, eps=-1e-5),
    "negative eps in eval": lambda f, x, rm, rv: f(x, rm, rv, training=False, eps=-1e-5),
    "integer input": lambda f, x, rm, rv: f(torch.ones(4, 3, dtype=torch.long), rm, rv, training=True),
    "complex input": lambda f, x, rm, rv: f(torch.ones(4, 3, dtype=torch.complex64), rm, rv, training=True),
    "running_mean requiring grad (training)": lambda f, x, rm, rv: f(
        x, torch.zeros(3, requires_grad=True), rv, training=True
    ),
    "weight on another device": lambda f, x, rm, rv: f(x, rm, rv, torch.ones(3, device="meta"), training=True),
    "momentum=None without num_batches_tracked": lambda f, x, rm, rv: f(x, rm, rv, training=True, momentum=None),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(RAISING))
def test_bad_calls_raise_a_subclass_of_torchs_type_and_change_nothing(case, backend):
    call = RAISING[case]
    x = _x()
    with pytest.raises(Exception) as theirs:
        call(F.batch_norm, x, torch.zeros(3), torch.ones(3))
    expected = theirs.type
    if case == "momentum=None without num_batches_tracked":
        expected = ValueError  # documented: TypeError in torch, ValueError in bnkit (docs/differences.md)
    rm, rv = torch.zeros(3), torch.ones(3)
    with _use(backend), pytest.raises(expected):
        call(BF.batch_norm, x, rm, rv)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


NON_TENSOR_REASON = (
    "BUG: with the cpp backend (the CPU default) a non-tensor weight/bias/running buffer reaches "
    "torch.ops.bnkit.batch_norm_layer and fails its schema with a RuntimeError; torch (and bnkit's other "
    "backends) raise TypeError"
)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"weight": [1.0, 1.0, 1.0]},
        {"weight": 2.0},
        {"bias": np.zeros(3, dtype=np.float32)},
        {"running_mean": [0.0, 0.0, 0.0], "running_var": [1.0, 1.0, 1.0]},
    ],
    ids=["weight-list", "weight-float", "bias-ndarray", "stats-list"],
)
def test_non_tensor_arguments_raise_type_error(kwargs, training, backend):
    args = {"running_mean": torch.zeros(3), "running_var": torch.ones(3), **kwargs}
    with pytest.raises(TypeError):
        F.batch_norm(_x()[:, :, 0], training=training, **args)
    with _use(backend), pytest.raises(TypeError):
        BF.batch_norm(_x()[:, :, 0], training=training, **args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_dimensional_running_buffers_are_rejected_as_by_torch(backend):
    x = _x()
    with pytest.raises(RuntimeError):
        F.batch_norm(x, torch.zeros(3, 1), torch.ones(3, 1), training=True)
    rm, rv = torch.zeros(3, 1), torch.ones(3, 1)
    with _use(backend), pytest.raises(RuntimeError):
        BF.batch_norm(x, rm, rv, training=True)
    assert torch.equal(rm, torch.zeros(3, 1)) and torch.equal(rv, torch.ones(3, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_input_with_mixed_buffer_dtypes_is_handled_alike_by_every_backend(backend):
    """The dtype rule (docs/differences.md) lets each buffer of a bf16 input be bf16 or float32: the backends
    must agree on what this mix does (the torch and reference backends accept it and update both buffers)."""
    x = torch.randn(8, 3, 4, generator=torch.Generator().manual_seed(1)).bfloat16()
    rm, rv = torch.zeros(3).bfloat16(), torch.ones(3)
    with _use(backend):
        y = BF.batch_norm(x, rm, rv, training=True, momentum=0.5)
    rm_t, rv_t = torch.zeros(3), torch.ones(3)
    y_t = F.batch_norm(x, rm_t, rv_t, training=True, momentum=0.5)  # all-float32 buffers: accepted by torch
    torch.testing.assert_close(y, y_t)
    torch.testing.assert_close(rm.float(), rm_t, rtol=1.6e-2, atol=1e-5)
    torch.testing.assert_close(rv, rv_t)


def test_expanded_running_buffers_raise_cleanly():
    """Undocumented difference: torch writes the three channels' averages into one memory location (the
    result is one of them); bnkit refuses the write with a RuntimeError before anything changes."""
    x = _x()
    base_m, base_v = torch.zeros(1), torch.ones(1)
    for backend in BACKENDS:
        with _use(backend), pytest.raises(RuntimeError):
            BF.batch_norm(x, base_m.expand(3), base_v.expand(3), training=True)
        assert base_m.item() == 0.0 and base_v.item() == 1.0


# --------------------------------------------------------------------------- accepted calls: values and state vs torch
def _compare_call(backend, x, make_stats, **kw):
    rm_t, rv_t = make_stats()
    y_t = F.batch_norm(x, rm_t, rv_t, **kw)
    rm, rv = make_stats()
    with _use(backend):
        y = BF.batch_norm(x, rm, rv, **kw)
    torch.testing.assert_close(y, y_t, equal_nan=True)
    if rm is not None:
        for ours, theirs in ((rm, rm_t), (rv, rv_t)):
            # docs/differences.md (propagate): the same entries become non-finite, though an Inf may become a NaN
            assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
            assert torch.isnan(ours[torch.isnan(theirs)]).all()
            inf = torch.isinf(theirs)
            assert (torch.isnan(ours[inf]) | (ours[inf] == theirs[inf])).all()
            fin = torch.isfinite(theirs)
            torch.testing.assert_close(ours[fin], theirs[fin])
        assert rm.shape == rm_t.shape and rm.stride() == rm_t.stride()


def _plain():
    return torch.zeros(3), torch.ones(3)


ACCEPTED = {
    "momentum 0": (dict(training=True, momentum=0.0), _plain),
    "momentum 1": (dict(training=True, momentum=1.0), _plain),
    "momentum int 1": (dict(training=True, momentum=1), _plain),
    "momentum -0.5": (dict(training=True, momentum=-0.5), _plain),
    "momentum 2": (dict(training=True, momentum=2.0), _plain),
    "momentum nan": (dict(training=True, momentum=float("nan")), _plain),
    "momentum 0-d tensor": (dict(training=True, momentum=torch.tensor(0.3)), _plain),
    "eps inf": (dict(training=True, eps=float("inf")), _plain),
    "eval eps 0": (dict(training=False, eps=0.0), _plain),
    "eval eps 0, zero var": (dict(training=False, eps=0.0), lambda: (torch.zeros(3), torch.zeros(3))),
    "strided buffers": (dict(training=True), lambda: (torch.zeros(6)[::2], torch.ones(6)[::2])),
    "strided buffers (eval)": (
        dict(training=False),
        lambda: (torch.arange(6.0)[::2] / 7, torch.arange(1.0, 7.0)[::2] / 3),
    ),
    "inf running_mean, momentum 1": (
        dict(training=True, momentum=1.0),
        lambda: (torch.full((3,), float("inf")), torch.ones(3)),
    ),
    "inf running_var, momentum 0": (
        dict(training=True, momentum=0.0),
        lambda: (torch.zeros(3), torch.full((3,), float("inf"))),
    ),
    "nan running_mean, momentum 0.5": (
        dict(training=True, momentum=0.5),
        lambda: (torch.full((3,), float("nan")), torch.ones(3)),
    ),
    "no running stats": (dict(training=True), lambda: (None, None)),
    "weight (3, 1)": (dict(training=True, weight=torch.arange(1.0, 4.0).view(3, 1)), _plain),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(ACCEPTED))
def test_accepted_calls_match_torch_output_and_buffers(case, backend):
    kw, make_stats = ACCEPTED[case]
    torch.manual_seed(0)
    _compare_call(backend, _x(), make_stats, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_value_per_channel_in_eval_and_singleton_shapes(backend):
    for shape in ((1, 3), (1, 3, 1), (1, 1, 1)):
        x = torch.randn(shape)
        c = shape[1]
        _compare_call(backend, x, lambda c=c: (torch.randn(c, generator=torch.Generator().manual_seed(2)),
                                               torch.rand(c, generator=torch.Generator().manual_seed(3)) + 0.5),
                      training=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_empty_batches_match_torch(backend, training):
    for shape in ((0, 3, 2), (0, 3), (4, 0, 2)):
        x = torch.randn(shape, requires_grad=True)
        w = torch.rand(shape[1] or 1, requires_grad=True)
        b = torch.rand(shape[1] or 1, requires_grad=True)
        rm, rv = torch.zeros(shape[1]), torch.ones(shape[1])
        with _use(backend):
            y = BF.batch_norm(x, rm, rv, w, b, training=training)
        y_t = F.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training)
        assert y.shape == y_t.shape and y.dtype == y_t.dtype
        assert torch.equal(rm, torch.zeros(shape[1])) and torch.equal(rv, torch.ones(shape[1]))
        if y.numel() == 0:
            gw, gb = torch.autograd.grad(y.sum(), (w, b), allow_unused=True)
            gw_t, gb_t = torch.autograd.grad(y_t.sum(), (w, b), allow_unused=True)
            for a, t in ((gw, gw_t), (gb, gb_t)):
                assert (a is None) == (t is None)
                if a is not None:
                    torch.testing.assert_close(a, t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_running_buffers_in_an_inference_mode_call(backend):
    x = _x()
    rm, rv = torch.zeros(3), torch.ones(3)
    rm_t, rv_t = torch.zeros(3), torch.ones(3)
    with torch.inference_mode():
        with _use(backend):
            y = BF.batch_norm(x, rm, rv, training=True)
        y_t = F.batch_norm(x, rm_t, rv_t, training=True)
    torch.testing.assert_close(y, y_t)
    torch.testing.assert_close(rm, rm_t)
    torch.testing.assert_close(rv, rv_t)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["both", "running_var"])
def test_inference_tensor_buffers_outside_inference_mode(backend, which):
    """torch accepts the call (its kernel writes the buffers). bnkit may refuse it (torch's rule for inference
    tensors), but then it must refuse before anything is written: either torch's result, or an error and
    untouched buffers."""
    x = _x()
    with torch.inference_mode():
        made = torch.zeros(3), torch.ones(3)
    rm, rv = (made[0], made[1]) if which == "both" else (torch.zeros(3), made[1])
    rm_t, rv_t = torch.zeros(3), torch.ones(3)
    with torch.inference_mode():
        t_m, t_v = torch.zeros(3), torch.ones(3)
    F.batch_norm(x, t_m if which == "both" else rm_t, t_v, training=True)  # torch accepts inference buffers
    F.batch_norm(x, rm_t, rv_t, training=True)
    try:
        with _use(backend):
            BF.batch_norm(x, rm, rv, training=True)
    except RuntimeError:
        assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3)), (rm, rv)
    else:
        torch.testing.assert_close(rm, rm_t)
        torch.testing.assert_close(rv, rv_t)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_requires_grad_of_the_output_follows_torch(backend, training):
    for xg in (False, True):
        for wg in (False, True):
            for grad_mode in (True, False):
                x = _x().requires_grad_(xg)
                w = torch.rand(3).requires_grad_(wg)
                with torch.set_grad_enabled(grad_mode):
                    y_t = F.batch_norm(x, torch.zeros(3), torch.ones(3), w, None, training=training)
                    with _use(backend):
                        y = BF.batch_norm(x, torch.zeros(3), torch.ones(3), w, None, training=training)
                assert y.requires_grad == y_t.requires_grad, (xg, wg, grad_mode)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "transposed-3d", "expanded"])
def test_odd_layouts_and_in_place_use_of_the_output(backend, layout):
    """A view of a leaf in an odd layout; the output is edited in place (ReLU(inplace=True)) before the
    backward. Output, gradients of the leaf, weight and bias as torch's."""
    g0 = torch.Generator().manual_seed(4)
    source, view = {
        "contiguous": (torch.randn(4, 3, 2, 2, generator=g0), lambda t: t),
        "channels_last": (torch.randn(4, 3, 2, 2, generator=g0).to(memory_format=torch.channels_last), lambda t: t),
        "sliced": (torch.randn(4, 3, 6, 2, generator=g0), lambda t: t[:, :, ::2]),
        "transposed-3d": (torch.randn(4, 5, 3, generator=g0), lambda t: t.transpose(1, 2)),
        "expanded": (torch.randn(1, 3, 1, 2, generator=g0), lambda t: t.expand(4, 3, 3, 2)),
    }[layout]
    w, b = torch.rand(3, generator=g0) + 0.5, torch.randn(3, generator=g0)
    results = []
    for fn, be in ((F.batch_norm, None), (BF.batch_norm, backend)):
        leaf = source.clone(memory_format=torch.preserve_format).requires_grad_()
        ww, bb = w.clone().requires_grad_(), b.clone().requires_grad_()
        with _use(be) if be else torch.enable_grad():
            y = fn(view(leaf), None, None, ww, bb, training=True, eps=0.1)
            y.relu_()  # in place on the output, as nn.ReLU(inplace=True)
            y.backward(torch.linspace(-1, 1, y.numel()).view(y.shape))
        results.append((y.detach(), leaf.grad, ww.grad, bb.grad))
    for ours, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(ours, theirs)
    if layout == "channels_last":
        assert results[1][0].is_contiguous(memory_format=torch.channels_last)
        assert results[1][1].is_contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------- gradients: gradcheck in float64
BIAS_ONLY_REASON = (
    "BUG: cpp backend, weight=None with a bias: the backward raises 'RuntimeError: Index out of range' "
    "(csrc/autograd.cpp: needs_input_grad(2)/(4) counts only defined inputs); torch's backward works"
)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_bias_without_weight_backward_matches_torch(backend, training):
    x = torch.randn(5, 3, 2, generator=torch.Generator().manual_seed(5), requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    g = torch.randn(5, 3, 2)
    y_t = F.batch_norm(x, rm.clone(), rv.clone(), None, b, training=training)
    gx_t, gb_t = torch.autograd.grad(y_t, (x, b), g)
    with _use(backend):
        y = BF.batch_norm(x, rm.clone(), rv.clone(), None, b, training=training)
        gx, gb = torch.autograd.grad(y, (x, b), g)
    torch.testing.assert_close(y, y_t)
    torch.testing.assert_close(gx, gx_t)
    torch.testing.assert_close(gb, gb_t)


def _gradcheck_params():
    out = []
    for backend in BACKENDS:
        for mode in ("train", "train+stats", "eval"):
            for weight in (None, "C", "one"):
                for bias in (False, True):
                    marks = []
                    out.append(pytest.param(backend, mode, weight, bias, marks=marks,
                                            id=f"{backend}-{mode}-w{weight}-b{int(bias)}"))
    return out


@pytest.mark.parametrize("backend,mode,weight,bias", _gradcheck_params())
def test_gradcheck_and_gradgradcheck_every_argument_combination(backend, mode, weight, bias):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, 3, dtype=torch.float64, generator=gen).requires_grad_()
    inputs = [x]
    w = None
    if weight == "C":
        w = (torch.rand(3, dtype=torch.float64, generator=gen) + 0.5).requires_grad_()
    elif weight == "one":
        w = torch.tensor([1.7], dtype=torch.float64).requires_grad_()
    if w is not None:
        inputs.append(w)
    b = torch.randn(3, dtype=torch.float64, generator=gen).requires_grad_() if bias else None
    if b is not None:
        inputs.append(b)
    training = mode != "eval"
    rm = torch.randn(3, dtype=torch.float64, generator=gen) if mode != "train" else None
    rv = torch.rand(3, dtype=torch.float64, generator=gen) + 0.5 if mode != "train" else None

    def f(*args):
        it = iter(args)
        xx = next(it)
        ww = next(it) if w is not None else None
        bb = next(it) if b is not None else None
        r1 = None if rm is None else rm.clone()
        r2 = None if rv is None else rv.clone()
        return BF.batch_norm(xx, r1, r2, ww, bb, training=training, momentum=0.1, eps=1e-3)

    with _use(backend):
        assert torch.autograd.gradcheck(f, tuple(inputs))
        assert torch.autograd.gradgradcheck(f, tuple(inputs))
    # and the first derivatives equal torch's
    gy = torch.randn(4, 3, 3, dtype=torch.float64, generator=gen)
    if weight != "one":
        with _use(backend):
            ours = torch.autograd.grad(f(*inputs), inputs, gy)
        y_t = F.batch_norm(x, None if rm is None else rm.clone(), None if rv is None else rv.clone(), w, b,
                           training=training, momentum=0.1, eps=1e-3)
        for a, t in zip(ours, torch.autograd.grad(y_t, inputs, gy)):
            torch.testing.assert_close(a, t, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_gradcheck_forward_ad_and_batched_as_documented(backend, training):
    """docs/functional.md: gradcheck(check_forward_ad, check_batched_grad, check_batched_forward_grad) passes."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64, generator=gen).to(memory_format=torch.channels_last)
    x.requires_grad_()
    w = (torch.rand(3, dtype=torch.float64, generator=gen) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, generator=gen).requires_grad_()
    rm, rv = torch.randn(3, dtype=torch.float64, generator=gen), torch.rand(3, dtype=torch.float64, generator=gen) + 1

    def f(x, w, b):
        return BF.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training, eps=1e-3)

    with _use(backend):
        assert torch.autograd.gradcheck(f, (x, w, b), check_forward_ad=True, check_batched_grad=True,
                                        check_batched_forward_grad=True)
        assert torch.autograd.gradgradcheck(f, (x, w, b), check_fwd_over_rev=True, check_batched_grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_input_gradients_match_torch(backend):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(6, 3, 2, dtype=torch.float64, generator=gen).requires_grad_()
    w = torch.rand(3, dtype=torch.float64, generator=gen).requires_grad_()
    v = torch.randn(4, 6, 3, 2, dtype=torch.float64, generator=gen)
    y_t = F.batch_norm(x, None, None, w, None, training=True)
    theirs = torch.autograd.grad(y_t, (x, w), v, is_grads_batched=True)
    with _use(backend):
        y = BF.batch_norm(x, None, None, w, None, training=True)
        ours = torch.autograd.grad(y, (x, w), v, is_grads_batched=True)
    for a, t in zip(ours, theirs):
        torch.testing.assert_close(a, t)


# --------------------------------------------------------------------------- torch.func
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_jacobians_and_per_sample_gradients_match_torch(backend, training):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(5, 3, 2, dtype=torch.float64, generator=gen)
    xs = torch.randn(4, 5, 3, 2, dtype=torch.float64, generator=gen)
    w = torch.rand(3, dtype=torch.float64, generator=gen) + 0.5
    rm, rv = torch.randn(3, dtype=torch.float64, generator=gen), torch.rand(3, dtype=torch.float64, generator=gen) + 1
    stats = (None, None) if training else (rm, rv)

    def ours(xx):
        return BF.batch_norm(xx, *stats, w, None, training=training)

    def theirs(xx):
        return F.batch_norm(xx, *stats, w, None, training=training)

    with _use(backend):
        j_rev, j_fwd = jacrev(ours)(x), jacfwd(ours)(x)
        per_sample = vmap(grad(lambda xx: ours(xx).sin().sum()))(xs)
        mapped = vmap(ours)(xs)
    j_t = jacrev(theirs)(x)
    torch.testing.assert_close(j_rev, j_t)
    torch.testing.assert_close(j_fwd, j_t)
    torch.testing.assert_close(per_sample, vmap(grad(lambda xx: theirs(xx).sin().sum()))(xs))
    torch.testing.assert_close(mapped, vmap(theirs)(xs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_and_jvp_update_the_buffers_once_as_an_eager_call(backend):
    x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    rm_e, rv_e = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    F.batch_norm(x, rm_e, rv_e, training=True)
    for transform in ("grad", "jvp"):
        rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)

        def f(xx, rm=rm, rv=rv):
            return BF.batch_norm(xx, rm, rv, training=True)

        with _use(backend):
            if transform == "grad":
                grad(lambda xx: f(xx).sin().sum())(x)
            else:
                jvp(f, (x,), (torch.ones_like(x),))
        torch.testing.assert_close(rm, rm_e, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(rv, rv_e, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_with_one_unbatched_buffer_raises_and_changes_nothing(backend):
    rm, rv = torch.zeros(3), torch.ones(3)
    xs = torch.randn(4, 6, 3, 2)
    with pytest.raises(RuntimeError):
        vmap(lambda xx: F.batch_norm(xx, rm, rv, training=True))(xs)
    with _use(backend), pytest.raises(RuntimeError, match="batch_norm_step"):
        vmap(lambda xx: BF.batch_norm(xx, rm, rv, training=True))(xs)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_over_stacked_buffers_updates_each_models_buffers_as_torch(backend):
    xs = torch.randn(4, 6, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    rms_t, rvs_t = torch.zeros(4, 3, dtype=torch.float64), torch.ones(4, 3, dtype=torch.float64)
    ys_t = vmap(lambda xx, a, c: F.batch_norm(xx, a, c, training=True, momentum=0.3))(xs, rms_t, rvs_t)
    rms, rvs = torch.zeros(4, 3, dtype=torch.float64), torch.ones(4, 3, dtype=torch.float64)
    with _use(backend):
        ys = vmap(lambda xx, a, c: BF.batch_norm(xx, a, c, training=True, momentum=0.3))(xs, rms, rvs)
    torch.testing.assert_close(ys, ys_t)
    torch.testing.assert_close(rms, rms_t)
    torch.testing.assert_close(rvs, rvs_t)


# --------------------------------------------------------------------------- accuracy against the float64 truth
def _hard(name):
    g = torch.Generator().manual_seed(12)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        "offset 1e4, std 1e-2": lambda: r(64, 4, 8, 8) * 1e-2 + 1e4,
        "offset 1e5, std 1e-2": lambda: r(64, 4, 8, 8) * 1e-2 + 1e5,
        "offset 1e6, std 1e-2": lambda: r(64, 4, 8, 8) * 1e-2 + 1e6,
        "offset -1e4, channels_last": lambda: (r(64, 4, 8, 8) * 1e-2 - 1e4).to(memory_format=torch.channels_last),
        "offset 1e3, (N, C)": lambda: r(512, 4) + 1e3,
        "variance 1e-8 vs eps 1e-5": lambda: r(64, 4, 8, 8) * 1e-4,
        "variance 1e-12 vs eps 1e-5": lambda: r(64, 4, 8, 8) * 1e-6,
        "mixed signs and scales": lambda: r(64, 4, 8, 8) * torch.tensor([1, 1e3, 1e-3, 10.0]).view(1, 4, 1, 1)
        * torch.sign(r(64, 4, 8, 8)),
        "bfloat16": lambda: (r(64, 4, 8, 8) * 2 + 3).bfloat16(),
        "bfloat16 offset 100": lambda: (r(64, 4, 8, 8) * 0.5 + 100).bfloat16(),
        "bfloat16 channels_last": lambda: (r(64, 4, 8, 8) * 2 + 3).bfloat16().to(memory_format=torch.channels_last),
        "float16": lambda: (r(64, 4, 8, 8) * 2 + 3).half(),
        "long reduction 1M per channel": lambda: r(16, 2, 256, 256) * 3 + 5,
    }[name]()


HARD = [
    "offset 1e4, std 1e-2", "offset 1e5, std 1e-2", "offset 1e6, std 1e-2", "offset -1e4, channels_last",
    "offset 1e3, (N, C)", "variance 1e-8 vs eps 1e-5", "variance 1e-12 vs eps 1e-5", "mixed signs and scales",
    "bfloat16", "bfloat16 offset 100", "bfloat16 channels_last", "float16", "long reduction 1M per channel",
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", HARD)
def test_training_accuracy_no_worse_than_twice_torchs(case, backend):
    """y, dx, dw, db and running_var against the float64 truth of the same (rounded) input.

    Each error is max|a - truth| / max|truth|. Bound: twice torch's own error, plus a floor of 4 units of
    rounding of the quantity's dtype times its condition (the size of the terms it sums, over its size):
    sum|g| for db, sum|g * xhat| for dw, |w| invstd (|g| + |mean g| + |xhat mean(g xhat)|) for dx.
    """
    x = _hard(case)
    c = x.shape[1]
    g = torch.Generator().manual_seed(13)
    w, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    gy = torch.randn(x.shape, generator=g).to(x.dtype)
    xn, gn, wn = x.double().numpy(), gy.double().numpy(), w.double().numpy()
    y_n, mean_n, var_n = np_train(xn, wn, b.double().numpy(), 1e-5)
    dx_n, dw_n, db_n = np_backward(gn, xn, wn, 1e-5)
    count = x.numel() // c
    _, rv_n = np_running(np.zeros(c), np.ones(c), mean_n, var_n, count, 0.5)
    red = tuple(d for d in range(x.dim()) if d != 1)
    shape = [1, c] + [1] * (x.dim() - 2)
    s = 1 / np.sqrt(var_n + 1e-5)
    xhat = (xn - mean_n.reshape(shape)) * s.reshape(shape)
    dx_terms = (wn * s).reshape(shape) * (
        np.abs(gn) + np.abs(gn.mean(axis=red)).reshape(shape) + np.abs(xhat * (gn * xhat).mean(axis=red).reshape(shape))
    )
    cond = (np.abs(y_n).max(), dx_terms.max(), np.abs(gn * xhat).sum(axis=red).max(), np.abs(gn).sum(axis=red).max(),
            np.abs(rv_n).max())
    truth = (y_n, dx_n, dw_n, db_n, rv_n)
    theirs = _run(F.batch_norm, x, w, b, gy, 1e-5, 0.5)
    ours = _run(BF.batch_norm, x, w, b, gy, 1e-5, 0.5, backend)
    out_eps = float(torch.finfo(x.dtype).eps)
    units = (out_eps, out_eps, EPS32, EPS32, EPS32)
    names = ("y", "dx", "dw", "db", "running_var")
    picks = (0, 1, 2, 3, 5)
    bad = []
    for name, i, t, unit, k in zip(names, picks, truth, units, cond):
        e_ours, e_theirs = _rel(ours[i], t), _rel(theirs[i], t)
        floor = 4 * unit * k / max(np.abs(t).max(), 1e-300)
        if not e_ours <= 2 * e_theirs + floor:
            bad.append(f"{name}: bnkit {e_ours:.2e} vs torch {e_theirs:.2e} (floor {floor:.1e})")
    assert not bad, bad


@pytest.mark.parametrize("backend", BACKENDS)
def test_running_mean_of_a_small_mean_matches_torch(backend):
    """randn * 100 + 1: mean 1, spread 100. The running mean must agree with F.batch_norm's (the drop-in claim,
    torch's own float32 tolerances) and be within 2x torch's error of the float64 truth (floor: 8 ulps)."""
    x = torch.randn(256, 3, 16, generator=torch.Generator().manual_seed(14)) * 100 + 1
    mean_n = x.double().numpy().mean(axis=(0, 2))
    rm_t, rv_t = torch.zeros(3), torch.ones(3)
    F.batch_norm(x, rm_t, rv_t, training=True, momentum=1.0)
    rm, rv = torch.zeros(3), torch.ones(3)
    with _use(backend):
        BF.batch_norm(x, rm, rv, training=True, momentum=1.0)
    torch.testing.assert_close(rm, rm_t)
    e_ours = float(np.abs(rm.double().numpy() - mean_n).max() / np.abs(mean_n).max())
    e_theirs = float(np.abs(rm_t.double().numpy() - mean_n).max() / np.abs(mean_n).max())
    assert e_ours <= 2 * e_theirs + 8 * EPS32, (e_ours, e_theirs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1024, 4), (64, 4, 16), (16, 4, 8, 8)])
def test_eval_accuracy_with_a_large_offset_is_within_the_folds_rounding(backend, shape):
    """Eval mode on data around 1e4 with spread 1e-2: y = x * scale + shift cancels. bnkit's error must stay
    within the rounding of that fold (a few ulps of |x * scale| + |shift|), as torch's does."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(15)) * 1e-2 + 1e4
    dims = (0,) + tuple(range(2, x.dim()))
    rm, rv = x.double().mean(dims).float(), x.double().var(dims).float()
    w, b = torch.rand(4, generator=torch.Generator().manual_seed(16)) + 0.5, torch.randn(4)
    sh = [1, 4] + [1] * (x.dim() - 2)
    scale = (w.double() / torch.sqrt(rv.double() + 1e-5)).view(sh)
    truth = (x.double() - rm.double().view(sh)) * scale + b.double().view(sh)
    bound = 8 * EPS32 * ((x.double() * scale).abs() + (rm.double().view(sh) * scale).abs() + b.double().abs().view(sh))
    theirs = F.batch_norm(x, rm, rv, w, b, training=False)
    assert ((theirs.double() - truth).abs() <= bound).all()  # the yardstick holds for torch
    with _use(backend):
        ours = BF.batch_norm(x, rm, rv, w, b, training=False)
    assert ((ours.double() - truth).abs() <= bound).all()


def test_reference_backend_eval_is_the_float64_result():
    x = torch.randn(1024, 4, generator=torch.Generator().manual_seed(17)) * 1e-2 + 1e4
    rm, rv = x.double().mean(0).float(), x.double().var(0).float()
    truth = (x.double() - rm.double()) / torch.sqrt(rv.double() + 1e-5)
    with _use("reference"):
        y = BF.batch_norm(x, rm, rv, training=False)
    # the float64 result rounded once to float32 is within half an ulp of |y|
    torch.testing.assert_close(y.double(), truth, rtol=2 * EPS32, atol=4 * EPS32)


# --------------------------------------------------------------------------- non-finite inputs
NONFINITE = {
    "nan in channel 0": lambda x: x.__setitem__((2, 0, 1), float("nan")),
    "inf in channel 1": lambda x: x.__setitem__((2, 1, 1), float("inf")),
    "inf as the first value of channel 1": lambda x: x.__setitem__((0, 1, 0), float("inf")),
    "+inf and -inf in channel 1": lambda x: (x.__setitem__((0, 1, 0), float("inf")),
                                            x.__setitem__((3, 1, 2), -float("inf"))),
    "channel 2 all inf": lambda x: x[:, 2].fill_(float("inf")),
    "nan everywhere in channel 0 but one": lambda x: x[1:, 0].fill_(float("nan")),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(NONFINITE))
@pytest.mark.parametrize("layout", ["ncl", "channels_last"])
def test_non_finite_inputs_stay_in_their_channel_as_in_torch(case, backend, layout):
    """docs/differences.md: F-style batch_norm propagates as torch's does (an Inf may become a NaN)."""
    x = torch.randn(8, 3, 5, generator=torch.Generator().manual_seed(18))
    NONFINITE[case](x)
    if layout == "channels_last":
        x = x.unsqueeze(-1).to(memory_format=torch.channels_last)
    g = torch.linspace(-1, 1, x.numel()).view(x.shape)
    outs = []
    for fn, be in ((F.batch_norm, None), (BF.batch_norm, backend)):
        xx = x.clone().requires_grad_()
        rm, rv = torch.zeros(3), torch.ones(3)
        with _use(be) if be else torch.enable_grad():
            y = fn(xx, rm, rv, torch.rand(3, generator=torch.Generator().manual_seed(1)) + 0.5, None, training=True)
            y.backward(g)
        outs.append((y.detach(), xx.grad, rm, rv))
    for ours, theirs in zip(outs[1], outs[0]):
        assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
        fin = torch.isfinite(theirs)
        torch.testing.assert_close(ours[fin], theirs[fin])


# --------------------------------------------------------------------------- property: random shapes, every backend
@settings(max_examples=12, deadline=None)
@given(
    rank=st.sampled_from([2, 3, 4, 5]),
    channels=st.sampled_from([1, 2, 7, 15, 16, 17, 33, 65]),
    batch=st.integers(2, 5),
    spatial=st.integers(1, 4),
    channels_last=st.booleans(),
    affine=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    loc=st.sampled_from([0.0, 3.0, -50.0]),
    seed=st.integers(0, 2**16),
)
def test_property_every_backend_matches_torch(rank, channels, batch, spatial, channels_last, affine, dtype, loc, seed):
    gen = torch.Generator().manual_seed(seed)
    # With 2-3 values per channel the float32 input gradient is rounding noise (it is 0 exactly for 2 values).
    batch = max(batch, -(-4 // spatial ** (rank - 2)))
    shape = (batch, channels) + (spatial,) * (rank - 2)
    x = torch.randn(shape, generator=gen, dtype=dtype) * 2 + loc
    if channels_last and rank in (4, 5):
        x = x.to(memory_format=torch.channels_last if rank == 4 else torch.channels_last_3d)
    w = torch.rand(channels, generator=gen, dtype=dtype) + 0.5 if affine else None
    b = torch.randn(channels, generator=gen, dtype=dtype) if affine else None
    gy = torch.randn(shape, generator=gen, dtype=dtype)

    def call(fn, training, rm, rv, cast=None):
        xx = (x if cast is None else x.to(cast)).clone().requires_grad_()
        params = [t.to(xx.dtype).clone().requires_grad_() for t in (w, b)] if affine else [None, None]
        y = fn(xx, rm, rv, *params, training=training, momentum=0.3, eps=1e-4)
        y.backward(gy.to(xx.dtype))
        return [y.detach(), xx.grad] + ([p.grad for p in params] if affine else []) + [rm, rv]

    for training in (True, False):
        init = (torch.randn(channels, generator=gen, dtype=dtype), torch.rand(channels, generator=gen, dtype=dtype) + 1)
        theirs = call(F.batch_norm, training, *(t.clone() for t in init))
        # The oracle: torch in float64 on the same values. float32 tolerance: assert_close's defaults, widened to
        # twice torch's own float32 error, or to 8 units of rounding of the sizes of the terms summed (the
        # quantity's condition), where those are larger.
        truth = call(F.batch_norm, training, *(t.double().clone() for t in init), cast=torch.float64)
        scales = _condition_scales(x, gy, w, b, *init, training, 1e-4, 0.3)
        for backend in BACKENDS:
            with _use(backend):
                ours = call(BF.batch_norm, training, *(t.clone() for t in init))
            for a, t, t64, scale in zip(ours, theirs, truth, scales):
                assert a.dtype == t.dtype and a.shape == t.shape
                if dtype == torch.float64:
                    torch.testing.assert_close(a, t, rtol=1e-10, atol=1e-12)
                else:
                    slack = max(2 * (t.double() - t64).abs().max().item(), 8 * EPS32 * scale)
                    torch.testing.assert_close(a.double(), t64, rtol=1.3e-6, atol=max(1e-5, slack))


def _condition_scales(x, g, w, b, rm, rv, training, eps, momentum):
    """The sizes of the terms each output sums, in float64: [y, dx, (dw, db,) running_mean, running_var]."""
    xn, gn = x.double().numpy(), g.double().numpy()
    c = x.shape[1]
    red = tuple(d for d in range(x.dim()) if d != 1)
    shape = [1, c] + [1] * (x.dim() - 2)
    if training:
        mean, var = xn.mean(axis=red), xn.var(axis=red)
    else:
        mean, var = rm.double().numpy(), rv.double().numpy()
    s = (1 / np.sqrt(var + eps)).reshape(shape)
    wn = np.ones(shape) if w is None else w.double().numpy().reshape(shape)
    bn = np.zeros(shape) if b is None else b.double().numpy().reshape(shape)
    xhat = (xn - mean.reshape(shape)) * s
    y = np.abs(xhat * wn) + np.abs(bn)
    if training:
        dx = np.abs(wn) * s * (np.abs(gn) + np.abs(gn.mean(axis=red)).reshape(shape)
                               + np.abs(xhat) * np.abs(gn * xhat).mean(axis=red).reshape(shape))
    else:
        dx = np.abs(wn) * s * np.abs(gn)
    out = [y.max(), dx.max()]
    if w is not None:
        out += [np.abs(gn * xhat).sum(axis=red).max(),
                np.abs(gn).sum(axis=red).max()]
    rm_scale = np.abs(rm.double().numpy()).max() + momentum * np.abs(xn).mean(axis=red).max()
    rv_scale = np.abs(rv.double().numpy()).max() + momentum * (xn ** 2).mean(axis=red).max() * 2
    return out + [rm_scale, rv_scale]


# --------------------------------------------------------------------------- TF-style helpers and the pure step
def test_moments_over_no_axes_is_elementwise():
    x = torch.randn(3, 4, dtype=torch.float64)
    mean, var = BF.moments(x, [])
    assert mean.shape == x.shape and var.shape == x.shape
    torch.testing.assert_close(mean, x)
    torch.testing.assert_close(var, torch.zeros_like(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_moments_and_normalize_against_float64(dtype):
    x = (torch.randn(6, 5, 7, generator=torch.Generator().manual_seed(19), dtype=torch.float64) * 3 + 40).to(dtype)
    xn = x.double().numpy()
    tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 2e-6, torch.float64: 1e-12}[dtype]
    for axes, keep in (([0, 2], True), ((-1, 0), False), (1, True)):
        mean, var = BF.moments(x, axes, keepdims=keep, correction=1)
        ax = (axes,) if isinstance(axes, int) else tuple(a % 3 for a in axes)
        m_n = xn.mean(axis=ax, keepdims=keep)
        v_n = xn.var(axis=ax, ddof=1, keepdims=keep)
        assert mean.dtype == dtype and mean.shape == m_n.shape and var.shape == v_n.shape
        np.testing.assert_allclose(mean.double().numpy(), m_n, rtol=tol)
        np.testing.assert_allclose(var.double().numpy(), v_n, rtol=max(tol, 4 * EPS32) * 4)
    mean, var = BF.moments(x, [0, 2], keepdims=True)
    off, sc = torch.randn(1, 5, 1, dtype=torch.float64), torch.rand(1, 5, 1, dtype=torch.float64) + 0.5
    y = BF.normalize(x, mean, var, off.to(mean.dtype), sc.to(mean.dtype), variance_epsilon=1e-3)
    assert y.dtype == dtype
    m64, v64 = xn.mean(axis=(0, 2), keepdims=True), xn.var(axis=(0, 2), keepdims=True)
    expected = (xn - m64) / np.sqrt(v64 + 1e-3) * sc.numpy() + off.numpy()
    np.testing.assert_allclose(y.double().numpy(), expected, atol=max(tol, 1e-9) * 40 * 10)


def test_fold_gradcheck_and_values():
    gen = torch.Generator().manual_seed(20)
    args = (torch.randn(3, dtype=torch.float64, generator=gen), torch.rand(3, dtype=torch.float64, generator=gen) + 1,
            torch.randn(3, dtype=torch.float64, generator=gen), torch.randn(3, dtype=torch.float64, generator=gen))
    args = tuple(a.requires_grad_() for a in args)
    assert torch.autograd.gradcheck(lambda m, v, w, b: BF.fold(m, v, w, b, 1e-3), args)
    m, v, w, b = (a.detach().numpy() for a in args)
    scale, shift = BF.fold(*args, 1e-3)
    np.testing.assert_allclose(scale.detach().numpy(), w / np.sqrt(v + 1e-3), rtol=1e-14)
    np.testing.assert_allclose(shift.detach().numpy(), b - m * w / np.sqrt(v + 1e-3), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, 0.0, 1.0, "tensor", None])
def test_batch_norm_step_equals_torchs_update_and_mutates_nothing(backend, momentum):
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(6, 3, 4, generator=gen)
    w, b = torch.rand(3, generator=gen) + 0.5, torch.randn(3, generator=gen)
    state = {"running_mean": torch.randn(3, generator=gen), "running_var": torch.rand(3, generator=gen) + 0.5,
             "num_batches_tracked": torch.tensor(3)}
    before = {k: v.clone() for k, v in state.items()}
    m = torch.tensor(0.25) if momentum == "tensor" else momentum
    with _use(backend):
        y, new = BF.batch_norm_step(x, {"weight": w, "bias": b}, state, training=True, momentum=m)
    rm_t, rv_t = before["running_mean"].clone(), before["running_var"].clone()
    factor = 1 / 4 if momentum is None else (0.25 if momentum == "tensor" else momentum)
    y_t = F.batch_norm(x, rm_t, rv_t, w, b, training=True, momentum=factor)
    torch.testing.assert_close(y, y_t)
    torch.testing.assert_close(new["running_mean"], rm_t)
    torch.testing.assert_close(new["running_var"], rv_t)
    assert int(new["num_batches_tracked"]) == 4
    for k, v in state.items():
        assert torch.equal(v, before[k]), k


# --------------------------------------------------------------------------- backend selection
def test_backend_selection_by_environment_and_context():
    code = textwrap.dedent(
        """
        import importlib, os
        import torch, torch.nn.functional as F
        import bnkit.functional as BF
        from bnkit import kernels
        assert kernels.get_backend() == "torch"
        x = torch.randn(6, 3, 2)
        assert kernels.select(x) == "torch"
        torch.testing.assert_close(BF.batch_norm(x, None, None, training=True), F.batch_norm(x, None, None, training=True))
        os.environ["BNKIT_BACKEND"] = "numpy"
        try:
            importlib.reload(kernels)
        except ValueError as e:
            assert "unknown bnkit backend" in str(e)
            print("ok")
        """
    )
    env = dict(os.environ, BNKIT_BACKEND="torch")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]

    previous = kernels.get_backend()
    with pytest.raises(ValueError, match="unknown bnkit backend"):
        with kernels.use_backend("numpy"):
            pass
    assert kernels.get_backend() == previous
    x = torch.randn(4, 3)
    for name in BACKENDS:
        with _use(name):
            assert kernels.select(x) == name
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                BF.batch_norm(x, None, None, training=True)
        assert kernels.get_backend() == previous
