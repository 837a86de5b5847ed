"""The fused layer's backward writes the input gradient over the output gradient when only the autograd
engine holds it (csrc/autograd.cpp, ``reusable_grad``): one input-sized allocation less per backward.

Oracle: torch's own BatchNorm on the same weights and input, and, for every case where a caller can still
see the output gradient (``y.backward(g)``, ``retain_grad()``, a hook that keeps it, one gradient feeding two
branches), that the gradient it holds is unchanged.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnkit
from bnkit import kernels

FORMATS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}


@pytest.fixture(autouse=True)
def _cpp_backend():
    with kernels.use_backend("cpp"):
        yield


def twins(C=6, seed=0):
    torch.manual_seed(seed)
    ours, theirs = bnkit.BatchNorm2d(C), nn.BatchNorm2d(C)
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(w)
            m.bias.copy_(b)
    return ours, theirs


def data(fmt, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(4, 6, 5, 7, generator=g, dtype=dtype) * 2 + 0.5).to(memory_format=FORMATS[fmt])
    t = torch.randn(4, 6, 5, 7, generator=g, dtype=dtype).to(memory_format=FORMATS[fmt])  # dy in x's layout
    return x, t


def grads(bn, x, t):
    """x's and the parameters' gradients of sum(bn(x) * t) (the product's backward hands BN a fresh gradient
    that only the engine holds: the case reuse is for), and how many backwards reused their gradient (the
    ``bnkit::reuse_grad`` profiler event)."""
    x = x.detach().clone().requires_grad_(True)
    loss = (bn(x) * t).sum()
    with torch.profiler.profile() as prof:
        loss.backward()
    reused = sum(e.name == "bnkit::reuse_grad" for e in prof.events())
    return x.grad, bn.weight.grad.clone(), bn.bias.grad.clone(), reused


@pytest.fixture
def knob():
    bnkit.BatchNorm1d(2)(torch.randn(3, 2))  # loads the kernels, so their knob exists
    before = torch.ops.bnkit._tune("reuse_grad", -1)
    yield lambda v: torch.ops.bnkit._tune("reuse_grad", v)
    torch.ops.bnkit._tune("reuse_grad", before)


@pytest.mark.parametrize("fmt", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_input_gradient_reuses_the_output_gradient_and_matches_torch(fmt, dtype, knob):
    ours, theirs = twins()
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    x, t = data(fmt, dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    tx, tw, tb, _ = grads(theirs, x, t)
    got = {}
    for on in (1, 0):
        knob(on)
        ours.weight.grad = ours.bias.grad = None
        got[on] = grads(ours, x, t)
    for on, (gx, gw, gb, reused) in got.items():
        assert reused == on  # on: written over the output gradient's buffer; off: a fresh one
        torch.testing.assert_close(gx, tx, **tol)
        torch.testing.assert_close(gw, tw, **tol)
        torch.testing.assert_close(gb, tb, **tol)
        assert gx.stride() == x.stride()
    assert torch.equal(got[1][0], got[0][0])  # the same arithmetic either way


def test_a_gradient_the_caller_passes_is_never_written():
    ours, theirs = twins()
    x, _ = data("nchw")
    g = torch.randn_like(x)
    keep = g.clone()
    xo, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours(xo).backward(g)
    assert torch.equal(g, keep)
    theirs(xt).backward(g)
    torch.testing.assert_close(xo.grad, xt.grad, rtol=1e-5, atol=1e-5)
    assert xo.grad.data_ptr() != g.data_ptr()


@pytest.mark.parametrize("keep", ["retain_grad", "hook"])
def test_a_gradient_kept_by_retain_grad_or_a_hook_is_never_written(keep):
    ours, theirs = twins()
    x, t = data("cl")
    kept = {}

    def run(bn):
        xi = x.clone().requires_grad_(True)
        out = bn(xi)
        if keep == "retain_grad":
            out.retain_grad()
        else:
            out.register_hook(lambda g: kept.setdefault(id(bn), g))
        (torch.relu(out) * t).sum().backward()  # relu's backward makes the fresh gradient BN receives
        return xi.grad, out.grad if keep == "retain_grad" else kept[id(bn)]

    ox, og = run(ours)
    tx, tg = run(theirs)
    torch.testing.assert_close(og, tg, rtol=1e-5, atol=1e-5)  # the kept dy is still dy, not dx
    torch.testing.assert_close(ox, tx, rtol=1e-5, atol=1e-5)
    assert ox.data_ptr() != og.data_ptr()


def test_one_gradient_feeding_two_branches_gives_both_their_own():
    ours, theirs = twins()
    x, t = data("nchw")

    def run(bn):
        xi = x.clone().requires_grad_(True)
        a = xi * 1.5
        out = bn(a) + a  # the add hands the same gradient tensor to BN and to the shortcut
        (torch.relu(out) * t).sum().backward()
        return xi.grad

    torch.testing.assert_close(run(ours), run(theirs), rtol=1e-5, atol=1e-5)


def test_two_backwards_of_a_retained_graph_agree():
    ours, _ = twins()
    x, t = data("cl")
    xi = x.clone().requires_grad_(True)
    loss = (torch.relu(ours(xi)) * t).sum()
    loss.backward(retain_graph=True)
    first = xi.grad.clone()
    xi.grad = None
    loss.backward()
    assert torch.equal(xi.grad, first)


def test_double_backward_keeps_torchs_values():
    ours, theirs = twins()
    x, t = data("nchw", torch.float64)
    ours, theirs = ours.double(), theirs.double()

    def second(bn):
        xi = x.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad((torch.relu(bn(xi)) * t).sum(), xi, create_graph=True)
        (ggx,) = torch.autograd.grad((gx * gx).sum(), xi)
        return gx.detach(), ggx

    (a, b), (c, d) = second(ours), second(theirs)
    torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(b, d, rtol=1e-8, atol=1e-8)


def test_a_gradient_in_another_layout_gets_a_fresh_input_gradient(knob):
    ours, theirs = twins()
    x, _ = data("cl")
    t = torch.randn(x.shape)  # NCHW: the product's gradient is not in x's channels-last layout
    knob(1)
    gx, gw, gb, reused = grads(ours, x, t)
    tx, tw, tb, _ = grads(theirs, x, t)
    assert reused == 0
    torch.testing.assert_close(gx, tx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, tw, rtol=1e-5, atol=1e-5)
