"""BN variants against independent computations.

Oracles: torch's own BN (``F.batch_norm`` / ``nn.BatchNormNd``) with gamma/beta
tied by hand, per-chunk torch BN, and a NumPy implementation of Batch
Renormalization's Algorithm 1 (Ioffe 2017) written here.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import bnkit
from _state import assert_state_unchanged, snapshot
from bnkit import BatchNorm, BatchRenorm, BatchRenorm2d, GhostBatchNorm, GhostBatchNorm2d, SharedBatchNorm

F64 = torch.float64


def randomize_affine(bn, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=g, dtype=F64).to(bn.weight.dtype) + 0.5)
        if bn.bias is not None:
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=g, dtype=F64).to(bn.bias.dtype))


def torch_bn(x, w, b, axis, *, training=True, rm=None, rv=None, momentum=0.1, eps=1e-5):
    """torch BN along ``axis`` with affine=False, then ``* w + b`` broadcast along ``axis`` (tied by hand)."""
    xm = x.movedim(axis, 1)
    y = F.batch_norm(xm, rm, rv, None, None, training, momentum, eps).movedim(1, axis)
    shape = [1] * x.dim()
    shape[axis] = -1
    if w is not None:
        y = y * w.reshape(shape)
    if b is not None:
        y = y + b.reshape(shape)
    return y


def assert_matches_tied_torch_bn(bn, shape, axis, eval_shape):
    """Three training steps, then eval, against :func:`torch_bn` with ``bn``'s gamma/beta tied by hand:
    outputs, input and parameter gradients, running statistics. Returns ``(w_ref, b_ref)``."""
    c = shape[axis]
    w_ref = bn.weight.detach().clone().requires_grad_()
    b_ref = bn.bias.detach().clone().requires_grad_()
    rm, rv = torch.zeros(c, dtype=F64), torch.ones(c, dtype=F64)
    for step in range(3):
        x = (torch.randn(shape, dtype=F64) * (step + 1) + step).requires_grad_()
        xr = x.detach().clone().requires_grad_()
        y = bn(x)
        y_ref = torch_bn(xr, w_ref, b_ref, axis % len(shape), rm=rm, rv=rv)
        torch.testing.assert_close(y, y_ref)
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(bn.weight.grad, w_ref.grad)
    torch.testing.assert_close(bn.bias.grad, b_ref.grad)
    torch.testing.assert_close(bn.running_mean, rm)
    torch.testing.assert_close(bn.running_var, rv)
    bn.eval()
    x = torch.randn(eval_shape, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(bn(x), torch_bn(x, w_ref, b_ref, axis % len(shape), training=False, rm=rm, rv=rv))
    return w_ref, b_ref


# =========================================================================== 1. affine sharing
@pytest.mark.parametrize("mode", ["none", "weight", "all"])
@pytest.mark.parametrize("shape,axis", [((6, 4), 1), ((5, 4, 3), 1), ((3, 4, 3, 2), 1), ((5, 3, 4), -1)])
def test_share_affine_matches_torch_bn_with_tied_parameters(mode, shape, axis):
    torch.manual_seed(0)
    c = shape[axis]
    bn = BatchNorm(c, axis=axis, share_affine=mode, dtype=F64)
    randomize_affine(bn)
    w_ref, b_ref = assert_matches_tied_torch_bn(bn, shape, axis, shape)
    assert tuple(w_ref.shape) == ((1,) if mode != "none" else (c,))
    assert tuple(b_ref.shape) == ((1,) if mode == "all" else (c,))


def test_share_affine_parameters_state_dict_and_repr():
    bn = BatchNorm(8, share_affine="weight")
    assert [(n, tuple(p.shape)) for n, p in bn.named_parameters()] == [("weight", (1,)), ("bias", (8,))]
    assert "9 affine parameters" in repr(bn)
    bn_all = bnkit.BatchNorm2d(8, share_affine="all")
    assert sum(p.numel() for p in bn_all.parameters()) == 2 and "2 affine parameters" in repr(bn_all)
    randomize_affine(bn_all, 3)
    other = bnkit.BatchNorm2d(8, share_affine="all")
    other.load_state_dict(bn_all.state_dict())
    assert set(other.state_dict()) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    for k, v in bn_all.state_dict().items():
        assert torch.equal(other.state_dict()[k], v)
    with pytest.raises(RuntimeError):  # a per-channel checkpoint does not fit a shared layer
        other.load_state_dict(bnkit.BatchNorm2d(8).state_dict())
    with pytest.raises(ValueError, match="share_affine"):
        BatchNorm(8, share_affine="channels")


# =========================================================================== 2. SharedBatchNorm
def tied_torch_bns(sites, c, weight, bias, **kw):
    bns = [torch.nn.BatchNorm1d(c, dtype=F64, **kw) for _ in range(sites)]
    for m in bns:  # tie gamma/beta by hand: every site uses the same Parameter objects
        m.weight = weight
        m.bias = bias
    return bns


@pytest.mark.parametrize("momentum", [0.1, None])
def test_shared_bn_per_site_matches_separate_torch_bns_with_tied_parameters(momentum):
    torch.manual_seed(1)
    sites, c = 3, 4
    bn = SharedBatchNorm(c, sites, momentum=momentum, dtype=F64)
    randomize_affine(bn)
    w = torch.nn.Parameter(bn.weight.detach().clone())
    b = torch.nn.Parameter(bn.bias.detach().clone())
    refs = tied_torch_bns(sites, c, w, b, momentum=momentum)
    assert tuple(bn.running_mean.shape) == (sites, c) and tuple(bn.num_batches_tracked.shape) == (sites,)
    order = [0, 1, 2, 2, 0, 2, 1, 2]
    for i, site in enumerate(order):
        x = (torch.randn(6, c, 5, dtype=F64) * (site + 1) + 2 * site).requires_grad_()
        xr = x.detach().clone().requires_grad_()
        y, y_ref = bn(x, site=site), refs[site](xr)
        torch.testing.assert_close(y, y_ref)
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(bn.weight.grad, w.grad)
    torch.testing.assert_close(bn.bias.grad, b.grad)
    for s in range(sites):
        torch.testing.assert_close(bn.running_mean[s], refs[s].running_mean)
        torch.testing.assert_close(bn.running_var[s], refs[s].running_var)
        assert int(bn.num_batches_tracked[s]) == int(refs[s].num_batches_tracked) == order.count(s)
    bn.eval()
    x = torch.randn(6, c, 5, dtype=F64)
    with torch.no_grad():
        for s in range(sites):
            refs[s].eval()
            torch.testing.assert_close(bn(x, site=s), refs[s](x))
            scale, shift = bn.inference_affine(site=s)
            torch.testing.assert_close(x * scale.view(1, -1, 1) + shift.view(1, -1, 1), refs[s](x))
    with pytest.raises(RuntimeError, match="site"):
        bn.inference_affine()


def test_shared_bn_share_stats_matches_one_torch_bn_seeing_all_calls():
    torch.manual_seed(2)
    bn = SharedBatchNorm(3, 4, share_stats=True, share_affine="all", axis=-1, dtype=F64)
    randomize_affine(bn)
    ref = torch.nn.BatchNorm1d(3, affine=False, dtype=F64)
    assert tuple(bn.running_mean.shape) == (3,) and bn.num_batches_tracked.dim() == 0
    for site in [3, 0, 1, 3]:
        x = torch.randn(5, 7, 3, dtype=F64) + site
        y = bn(x, site=site)
        y_ref = ref(x.movedim(-1, 1)).movedim(1, -1) * bn.weight.detach() + bn.bias.detach()
        torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    assert int(bn.num_batches_tracked) == 4
    bn.eval()
    ref.eval()
    x = torch.randn(2, 7, 3, dtype=F64)
    with torch.no_grad():
        y_ref = ref(x.movedim(-1, 1)).movedim(1, -1) * bn.weight + bn.bias
        torch.testing.assert_close(bn(x, site=2), y_ref)
        torch.testing.assert_close(bn(x), y_ref)  # pooled statistics: the site may be omitted
        scale, shift = bn.inference_affine()
        torch.testing.assert_close(x * scale + shift, y_ref)


def test_shared_bn_bad_arguments_and_no_state_change():
    with pytest.raises(ValueError, match="sites"):
        SharedBatchNorm(3, 0)
    with pytest.raises(ValueError, match="sites"):
        SharedBatchNorm(3, 2.5)
    bn = SharedBatchNorm(3, 2)
    bn(torch.randn(4, 3), site=1)
    before = snapshot(bn)
    x = torch.randn(4, 3)
    with pytest.raises(IndexError, match="out of range"):
        bn(x, site=2)
    with pytest.raises(IndexError, match="out of range"):
        bn(x, site=-1)
    with pytest.raises(TypeError, match="site"):
        bn(x)
    with pytest.raises(TypeError, match="site"):
        bn(x, site=1.0)
    with pytest.raises(ValueError, match="features"):
        bn(torch.randn(4, 5), site=0)
    with pytest.raises(ValueError, match="more than 1 value"):
        bn(torch.randn(1, 3), site=0)
    assert_state_unchanged(bn, before)
    assert "sites=2" in repr(bn)
    # state_dict round trip keeps the per-site statistics
    other = SharedBatchNorm(3, 2)
    other.load_state_dict(bn.state_dict())
    for k, v in bn.state_dict().items():
        assert torch.equal(other.state_dict()[k], v)
    with pytest.raises(RuntimeError):  # per-site statistics do not fit a pooled layer
        SharedBatchNorm(3, 2, share_stats=True).load_state_dict(bn.state_dict())


# =========================================================================== 3. Batch Renormalization
class NumpyRenorm:
    """Algorithm 1 of Ioffe (2017), with bnkit's running-variance convention.

    The paper keeps a moving average of sigma; bnkit (like torch) keeps one of
    the unbiased variance and uses ``sigma = sqrt(running_var + eps)``.
    """

    def __init__(self, c, r_max, d_max, warmup, r_steps, d_steps, momentum, eps=1e-5, fixed=False):
        self.mu = np.zeros(c)
        self.var = np.ones(c)
        self.step = 0
        self.r_max, self.d_max, self.warmup = r_max, d_max, warmup
        self.r_steps, self.d_steps = r_steps, d_steps
        self.momentum, self.eps, self.fixed = momentum, eps, fixed

    def limits(self):
        if self.fixed:
            return self.r_max, self.d_max
        t = self.step
        # r_max = 1 and d_max = 0 until warmup, then linear to the final values at r_steps / d_steps.
        fr = 1.0 if t >= self.r_steps else max(0.0, (t - self.warmup) / (self.r_steps - self.warmup))
        fd = 1.0 if t >= self.d_steps else max(0.0, (t - self.warmup) / (self.d_steps - self.warmup))
        return 1 + (self.r_max - 1) * fr, self.d_max * fd

    def train_step(self, x, gamma, beta, g, axis):
        red = tuple(i for i in range(x.ndim) if i != axis)
        shp = [1] * x.ndim
        shp[axis] = -1
        m = x.size // x.shape[axis]
        mu_b = x.mean(axis=red)
        var_b = ((x - mu_b.reshape(shp)) ** 2).mean(axis=red)
        sigma_b = np.sqrt(var_b + self.eps)
        sigma = np.sqrt(self.var + self.eps)
        r_max, d_max = self.limits()
        r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
        d = np.clip((mu_b - self.mu) / sigma, -d_max, d_max)
        xh = (x - mu_b.reshape(shp)) / sigma_b.reshape(shp)
        y = gamma.reshape(shp) * (xh * r.reshape(shp) + d.reshape(shp)) + beta.reshape(shp)
        # backward with r, d constants
        dbeta = g.sum(axis=red)
        dgamma = (g * (xh * r.reshape(shp) + d.reshape(shp))).sum(axis=red)
        gm = g.mean(axis=red).reshape(shp)
        gxm = (g * xh).mean(axis=red).reshape(shp)
        dx = (gamma * r / sigma_b).reshape(shp) * (g - gm - xh * gxm)
        self.mu += self.momentum * (mu_b - self.mu)
        self.var += self.momentum * (var_b * m / (m - 1) - self.var)
        self.step += 1
        return y, dx, dgamma, dbeta, r, d

    def eval(self, x, gamma, beta, axis):
        shp = [1] * x.ndim
        shp[axis] = -1
        return (x - self.mu.reshape(shp)) / np.sqrt(self.var + self.eps).reshape(shp) * gamma.reshape(shp) + beta.reshape(shp)


@pytest.mark.parametrize("shape,axis,fixed", [((8, 3, 4), 1, False), ((6, 5, 3), -1, False), ((7, 3), 1, True)])
def test_batch_renorm_matches_numpy_algorithm_with_schedule(shape, axis, fixed):
    torch.manual_seed(3)
    ax = axis % len(shape)
    c = shape[ax]
    kw = dict(r_max=2.0, d_max=0.5, warmup_steps=2, r_max_steps=6, d_max_steps=4, momentum=0.2)
    bn = BatchRenorm(c, axis=axis, dtype=F64, schedule="fixed" if fixed else "linear", **kw)
    randomize_affine(bn)
    ref = NumpyRenorm(c, 2.0, 0.5, 2, 6, 4, 0.2, fixed=fixed)
    gamma, beta = bn.weight.detach().numpy().copy(), bn.bias.detach().numpy().copy()
    gw, gb = np.zeros(c), np.zeros(c)
    clipped_r = clipped_d = False
    for step in range(9):
        assert bn.limits() == pytest.approx(ref.limits())
        # a drifting distribution, so that r and d differ from 1 and 0 and get clipped
        x = torch.randn(shape, dtype=F64) * (0.3 + 0.6 * step) + 0.4 * step
        x.requires_grad_()
        g = torch.randn(shape, dtype=F64)
        y = bn(x)
        y.backward(g)
        y_ref, dx_ref, dg_ref, db_ref, r, d = ref.train_step(x.detach().numpy(), gamma, beta, g.numpy(), ax)
        gw += dg_ref
        gb += db_ref
        clipped_r |= bool(np.any(np.abs(r - 1) > 1e-3))
        clipped_d |= bool(np.any(np.abs(d) > 1e-3))
        np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(x.grad.numpy(), dx_ref, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(bn.running_mean.numpy(), ref.mu, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(bn.running_var.numpy(), ref.var, rtol=1e-12, atol=1e-12)
    assert clipped_r and clipped_d
    np.testing.assert_allclose(bn.weight.grad.numpy(), gw, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(bn.bias.grad.numpy(), gb, rtol=1e-9, atol=1e-9)
    assert int(bn.num_batches_tracked) == 9
    bn.eval()
    x = torch.randn(shape, dtype=F64)
    with torch.no_grad():
        np.testing.assert_allclose(bn(x).numpy(), ref.eval(x.numpy(), gamma, beta, ax), rtol=1e-9, atol=1e-9)


def test_batch_renorm_schedule_values():
    bn = BatchRenorm(2, r_max=3.0, d_max=5.0)  # the paper's: 5k warm-up, r_max 3 at 40k, d_max 5 at 25k
    for step, (r, d) in {0: (1, 0), 5000: (1, 0), 22500: (2, 4.375), 25000: (2 + 1 / 7, 5), 40000: (3, 5), 10**6: (3, 5)}.items():
        bn.num_batches_tracked.fill_(step)
        assert bn.limits() == pytest.approx((r, d))
    assert BatchRenorm(2, schedule="fixed", r_max=1.5, d_max=0.1).limits() == pytest.approx((1.5, 0.1))
    jump = BatchRenorm(2, warmup_steps=3, r_max_steps=3, d_max_steps=3)
    assert jump.limits() == (1.0, 0.0)
    jump.num_batches_tracked.fill_(3)
    assert jump.limits() == pytest.approx((3.0, 5.0))


@pytest.mark.parametrize("share_affine", ["none", "all"])
def test_batch_renorm_with_unit_limits_is_plain_bn(share_affine):
    torch.manual_seed(4)
    bn = BatchRenorm2d(3, r_max=1.0, d_max=0.0, schedule="fixed", momentum=0.1, share_affine=share_affine, dtype=F64)
    randomize_affine(bn)
    assert_matches_tied_torch_bn(bn, (4, 3, 3, 2), 1, (2, 3, 3, 2))
    x = torch.randn(2, 3, 3, 2, dtype=F64)
    with torch.no_grad():
        scale, shift = bn.inference_affine()
        torch.testing.assert_close(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), bn(x))


def test_batch_renorm_bad_arguments_and_no_state_change():
    for kw, msg in [
        ({"r_max": 0.5}, "r_max"),
        ({"d_max": -1.0}, "d_max"),
        ({"r_max": float("nan")}, "r_max"),
        ({"r_max": float("inf")}, "r_max"),
        ({"d_max": float("inf")}, "d_max"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 10, "r_max_steps": 5}, "r_max_steps"),
        ({"schedule": "cosine"}, "schedule"),
        ({"track_running_stats": False}, "running statistics"),
    ]:
        with pytest.raises(ValueError, match=msg):
            BatchRenorm(3, **kw)
    bn = BatchRenorm(3, nonfinite="raise")
    bn(torch.randn(5, 3))
    before = snapshot(bn)
    with pytest.raises(ValueError, match="features"):
        bn(torch.randn(5, 4))
    with pytest.raises(ValueError, match="more than 1 value"):
        bn(torch.randn(1, 3))
    with pytest.raises(FloatingPointError):
        bn(torch.tensor([[1.0, 2.0, float("nan")], [0.0, 1.0, 2.0]]))
    assert_state_unchanged(bn, before)


# =========================================================================== 4. Ghost BN
def ghost_oracle(x, vbs, w, b, axis, eps=1e-5):
    """Per-chunk torch BN (tied gamma/beta broadcast along ``axis``)."""
    return torch.cat([torch_bn(chunk, w, b, axis, eps=eps) for chunk in x.split(vbs, dim=0)], dim=0)


def whole_batch_running(x, axis, momentum=0.1):
    xm = x.detach().movedim(axis, 1).to(F64)
    red = [0] + list(range(2, xm.dim()))
    mean = xm.mean(dim=red)
    var = xm.var(dim=red, unbiased=True)
    return momentum * mean, (1 - momentum) + momentum * var


@pytest.mark.parametrize(
    "shape,vbs,axis,share",
    [((10, 3, 4), 4, 1, "none"), ((12, 3), 4, 1, "weight"), ((9, 2, 3, 3), 2, 1, "all"), ((7, 5, 3), 3, -1, "none")],
)
def test_ghost_bn_matches_per_chunk_torch_bn(shape, vbs, axis, share):
    torch.manual_seed(5)
    ax = axis % len(shape)
    c = shape[ax]
    bn = GhostBatchNorm(c, vbs, axis=axis, share_affine=share, dtype=F64)
    randomize_affine(bn)
    w = bn.weight.detach().clone().requires_grad_()
    b = bn.bias.detach().clone().requires_grad_()
    # chunks with different distributions: ghost BN differs from BN
    x = (torch.randn(shape, dtype=F64) * torch.arange(1, shape[0] + 1, dtype=F64).view(-1, *[1] * (len(shape) - 1))).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    y, y_ref = bn(x), ghost_oracle(xr, vbs, w, b, ax)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(bn.weight.grad, w.grad)
    torch.testing.assert_close(bn.bias.grad, b.grad)
    rm, rv = whole_batch_running(x, ax)
    torch.testing.assert_close(bn.running_mean, rm)
    torch.testing.assert_close(bn.running_var, rv)
    assert int(bn.num_batches_tracked) == 1
    bn.eval()
    with torch.no_grad():
        y_eval = torch_bn(x.detach(), w.detach(), b.detach(), ax, training=False, rm=rm, rv=rv)
        torch.testing.assert_close(bn(x), y_eval)
        scale, shift = bn.inference_affine()
        shp = [1] * x.dim()
        shp[ax] = -1
        torch.testing.assert_close(x * scale.reshape(shp) + shift.reshape(shp), y_eval)


@pytest.mark.parametrize("vbs", [8, 100])
def test_ghost_bn_with_the_whole_batch_is_bn(vbs):
    torch.manual_seed(6)
    ghost = GhostBatchNorm2d(3, vbs, momentum=None, dtype=F64)
    ref = torch.nn.BatchNorm2d(3, momentum=None, dtype=F64)
    randomize_affine(ghost)
    ref.load_state_dict(ghost.state_dict())
    for step in range(3):
        x = torch.randn(8, 3, 2, 2, dtype=F64) + step
        torch.testing.assert_close(ghost(x), ref(x))
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(ghost.state_dict()[k], v)


def test_ghost_bn_without_running_stats_uses_ghost_batches_in_eval():
    bn = GhostBatchNorm(2, 3, track_running_stats=False, dtype=F64).eval()
    x = torch.randn(8, 2, dtype=F64)
    torch.testing.assert_close(bn(x), ghost_oracle(x, 3, None, None, 1))


def test_ghost_bn_bad_arguments_and_no_state_change():
    for v in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="virtual_batch_size"):
            GhostBatchNorm(3, v)
    with pytest.raises(ValueError, match="axis"):
        GhostBatchNorm(3, 2, axis=0)
    bn = GhostBatchNorm(3, 4, nonfinite="raise")
    bn(torch.randn(8, 3))
    before = snapshot(bn)
    with pytest.raises(ValueError, match="single value"):
        bn(torch.randn(9, 3))  # chunks 4, 4, 1
    with pytest.raises(ValueError, match="features"):
        bn(torch.randn(8, 2))
    x = torch.randn(8, 3)
    x[5, 1] = float("inf")
    with pytest.raises(FloatingPointError):
        bn(x)
    assert_state_unchanged(bn, before)
    assert "virtual_batch_size=4" in repr(bn)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 11),
    vbs=st.integers(1, 12),
    c=st.integers(1, 4),
    length=st.integers(2, 4),
    channels_last=st.booleans(),
    share=st.sampled_from(["none", "weight", "all"]),
    seed=st.integers(0, 2**16),
)
def test_ghost_bn_property_matches_oracle(n, vbs, c, length, channels_last, share, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, c, generator=g, dtype=F64) * 2 + 1 if channels_last else torch.randn(n, c, length, generator=g, dtype=F64)
    axis = -1 if channels_last else 1
    bn = GhostBatchNorm(c, vbs, axis=axis, share_affine=share, dtype=F64)
    randomize_affine(bn, seed)
    y = bn(x)
    torch.testing.assert_close(y, ghost_oracle(x, vbs, bn.weight.detach(), bn.bias.detach(), axis % 3))
    rm, rv = whole_batch_running(x, axis % 3)
    torch.testing.assert_close(bn.running_mean, rm)
    torch.testing.assert_close(bn.running_var, rv)


# =========================================================================== every variant: layouts, dtypes, compile, gradcheck
LAYOUTS = {
    "2d": ((6, 3), 1, None),
    "3d": ((6, 3, 5), 1, None),
    "3d-axis-last": ((6, 5, 3), -1, None),
    "4d-channels-last": ((4, 3, 3, 2), 1, torch.channels_last),
    "5d-channels-last": ((4, 3, 2, 2, 2), 1, torch.channels_last_3d),
    "4d-strided": ((4, 3, 2, 3), 1, "strided"),
}
VARIANTS = ["shared", "renorm", "ghost", "frozen"]


def make_input(shape, fmt, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if fmt == "strided":  # a non-contiguous view that is not channels-last either
        x = torch.randn(shape[0], shape[2], shape[1], shape[3], generator=g, dtype=F64).transpose(1, 2)
    else:
        x = torch.randn(shape, generator=g, dtype=F64)
    x = (x * 1.5 + 0.5).to(dtype)
    return x.contiguous(memory_format=fmt) if isinstance(fmt, torch.memory_format) else x


def make_variant(kind, c, axis, pdtype):
    if kind == "shared":
        bn = SharedBatchNorm(c, 2, axis=axis, dtype=pdtype)
    elif kind == "renorm":
        bn = BatchRenorm(c, axis=axis, r_max=1.5, d_max=0.3, schedule="fixed", momentum=0.1, dtype=pdtype)
        with torch.no_grad():
            bn.running_mean.fill_(0.2)
            bn.running_var.fill_(4.0)
    elif kind == "ghost":
        bn = GhostBatchNorm(c, 2, axis=axis, dtype=pdtype)
    else:
        bn = bnkit.FrozenBatchNorm(c, axis=axis, dtype=pdtype)
        with torch.no_grad():
            bn.running_mean.copy_(torch.linspace(-1, 1, c))
            bn.running_var.copy_(torch.linspace(0.5, 2, c))
            bn.weight.copy_(torch.linspace(0.5, 1.5, c))
            bn.bias.copy_(torch.linspace(-0.3, 0.3, c))
        return bn
    randomize_affine(bn)
    return bn


def oracle_train_then_eval(kind, bn, x64, axis, x_eval64):
    """(train output, eval output) of the variant computed independently in float64."""
    w = None if bn.weight is None else bn.weight.detach().to(F64)
    b = None if bn.bias is None else bn.bias.detach().to(F64)
    c = x64.shape[axis]
    if kind == "frozen":
        shp = [1] * x64.dim()
        shp[axis] = -1
        mean, var = bn.running_mean.to(F64).reshape(shp), bn.running_var.to(F64).reshape(shp)
        f = lambda z: (z - mean) / torch.sqrt(var + bn.eps) * w.reshape(shp) + b.reshape(shp)  # noqa: E731
        return f(x64), f(x_eval64)
    if kind == "renorm":
        ref = NumpyRenorm(c, 1.5, 0.3, 0, 0, 0, 0.1, fixed=True)
        ref.mu[:] = 0.2
        ref.var[:] = 4.0
        y = ref.train_step(x64.numpy(), w.numpy(), b.numpy(), np.zeros(x64.shape), axis)[0]
        return torch.from_numpy(y), torch.from_numpy(ref.eval(x_eval64.numpy(), w.numpy(), b.numpy(), axis))
    rm, rv = torch.zeros(c, dtype=F64), torch.ones(c, dtype=F64)
    if kind == "shared":
        y = torch_bn(x64, w, b, axis, rm=rm, rv=rv)
    else:
        y = ghost_oracle(x64, 2, w, b, axis)
        rm, rv = whole_batch_running(x64, axis)
    return y, torch_bn(x_eval64, w, b, axis, training=False, rm=rm, rv=rv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", VARIANTS)
def test_every_variant_every_layout_and_dtype_matches_oracle(kind, layout, dtype):
    shape, axis, fmt = LAYOUTS[layout]
    ax = axis % len(shape)
    pdtype = F64 if dtype == F64 else torch.float32
    bn = make_variant(kind, shape[ax], axis, pdtype)
    x = make_input(shape, fmt, dtype)
    x_eval = make_input(shape, fmt, dtype, seed=1)
    kw = {"site": 1} if kind == "shared" else {}
    y_ref, y_eval_ref = oracle_train_then_eval(kind, bn, x.to(F64), ax, x_eval.to(F64))
    y = bn(x, **kw)
    bn.eval()
    y_eval = bn(x_eval, **kw)
    tol = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 4e-2)}[dtype]
    for out, ref, inp in ((y, y_ref, x), (y_eval, y_eval_ref, x_eval)):
        assert out.dtype == dtype and out.shape == inp.shape
        if isinstance(fmt, torch.memory_format):
            assert out.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(out.to(F64), ref, rtol=tol[0], atol=tol[1])


@pytest.mark.parametrize("kind", VARIANTS)
def test_every_variant_state_dict_round_trips(kind):
    bn = make_variant(kind, 3, 1, torch.float32)
    kw = {"site": 0} if kind == "shared" else {}
    bn(torch.randn(6, 3, 2), **kw)
    other = make_variant(kind, 3, 1, torch.float32)
    if kind != "frozen":
        other.reset_parameters()
    other.load_state_dict(copy.deepcopy(bn.state_dict()), strict=True)
    assert list(other.state_dict()) == list(bn.state_dict())
    for k, v in bn.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    bn.eval()
    other.eval()
    x = torch.randn(4, 3, 2)
    torch.testing.assert_close(other(x, **kw), bn(x, **kw), rtol=0, atol=0)


def test_every_variant_under_torch_compile_matches_eager():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)
            self.shared = SharedBatchNorm(3, 2, share_affine="weight")
            self.renorm = BatchRenorm(3, warmup_steps=1, r_max_steps=3, d_max_steps=2)
            self.ghost = GhostBatchNorm(3, 3)
            self.frozen = bnkit.FrozenBatchNorm(3)

        def forward(self, x):
            h = self.lin(x)
            h = self.shared(h, site=0) + self.shared(h * 2, site=1)
            return self.frozen(self.ghost(self.renorm(h)))

    torch.manual_seed(0)
    model = Net()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    for step in range(3):
        x = torch.randn(8, 4) * (step + 1)
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    for k, v in eager.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    model.eval()
    eager.eval()
    x = torch.randn(5, 4)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", VARIANTS)
def test_every_variant_gradcheck_float64(kind):
    torch.manual_seed(7)
    c = 3
    if kind == "renorm":
        # Running statistics far from the batch's keep r and d clipped (locally constant), so the
        # layer's true derivative is the stop-gradient one gradcheck can verify; momentum=0 keeps them.
        bn = BatchRenorm(c, r_max=2.0, d_max=0.5, schedule="fixed", momentum=0.0, dtype=F64)
        with torch.no_grad():
            bn.running_var.fill_(100.0)
            bn.running_mean.fill_(20.0)
    else:
        bn = make_variant(kind, c, 1, F64)
    if kind == "ghost":
        bn.virtual_batch_size = 3
    kw = {"site": 1} if kind == "shared" else {}
    x = torch.randn(7, c, 2, dtype=F64, requires_grad=True)
    if kind == "frozen":
        assert torch.autograd.gradcheck(lambda x: bn(x), (x,))
        return
    w = bn.weight.detach().clone().requires_grad_()
    b = bn.bias.detach().clone().requires_grad_()

    def f(x, w, b):
        return torch.func.functional_call(bn, {"weight": w, "bias": b}, (x,), kw)

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_ghost_bn_default_virtual_batch_size():
    bn = bnkit.GhostBatchNorm1d(3)
    assert bn.virtual_batch_size == 32
    x = torch.randn(70, 3, dtype=torch.float32)
    torch.testing.assert_close(bn(x), ghost_oracle(x, 32, None, None, 1), rtol=1e-5, atol=1e-5)


def test_fx_symbolic_trace_records_each_variant_as_one_node():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = SharedBatchNorm(3, 2)
            self.renorm = BatchRenorm(3)
            self.ghost = GhostBatchNorm(3, 2)
            self.frozen = bnkit.FrozenBatchNorm(3)

        def forward(self, x):
            return self.frozen(self.ghost(self.renorm(self.shared(x, site=1))))

    net = Net()
    for _ in range(2):
        net(torch.randn(6, 3))
    for train in (True, False):  # a leaf each, as torch's BN is: traced in either mode, run in either
        gm = torch.fx.symbolic_trace(net.train(train))
        calls = [n for n in gm.graph.nodes if n.op == "call_module"]
        assert [n.target for n in calls] == ["shared", "renorm", "ghost", "frozen"]
        assert calls[0].args[1:] == (1,)  # the site, recorded
        for run_train in (True, False):
            x = torch.randn(6, 3)
            twin = copy.deepcopy(net)
            gm.train(run_train)
            torch.testing.assert_close(gm(x), twin.train(run_train)(x))
            torch.testing.assert_close(net.renorm.running_mean, twin.renorm.running_mean)
    with pytest.raises(RuntimeError, match="eval mode"):  # the root is traced into, not a leaf
        torch.fx.symbolic_trace(BatchRenorm(3))


def test_shared_argument_docs_expand_to_an_entry_per_constructor_argument():
    import inspect
    import re

    from bnkit._layer_support import document_bn_arguments
    from bnkit.sync import SyncBatchNorm

    @document_bn_arguments
    class Doc:
        """Text.

        Args:
            {BatchNorm: eps, momentum}
            own: not from BatchNorm.
        """

    # hand-written: what the table says, a continuation line four spaces deeper
    assert Doc.__doc__ == (
        "Text.\n\n        Args:\n"
        "            eps: added to the variance before the square root (``> 0``).\n"
        "            momentum: the weight of the batch statistics in the running averages\n"
        "                (``None``: the cumulative average).\n"
        "            own: not from BatchNorm.\n        ")
    with pytest.raises(KeyError, match="epsilon"):
        document_bn_arguments(type("Bad", (), {"__doc__": "    {BatchNorm: epsilon}"}))
    # every documented layer: one Args entry per constructor argument, in the signature's order
    for cls in (GhostBatchNorm, SharedBatchNorm, SyncBatchNorm):
        args = cls.__doc__.split("Args:\n")[1].split("\n\n")[0]
        assert "{BatchNorm" not in cls.__doc__
        names = re.findall(r"^        (\w+):", args, re.MULTILINE)
        assert names == list(inspect.signature(cls).parameters), cls
