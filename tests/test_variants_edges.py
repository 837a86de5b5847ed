"""The batch-norm variants on the edges, against independent float64 references (docs/variants.md).

Each reference is written from the formulas, not from bnkit's code: Batch Renorm (Ioffe 2017) with
``r``/``d`` constants in the backward, Ghost BN as BN on each virtual batch, SharedBatchNorm with
per-site statistics, DomainBatchNorm as separate BN layers per domain slice, BatchNormAct as the
activation after BN, and the generic ``BatchNorm(C, axis=...)``. Several training steps are run so that
the running averages, ``num_batches_tracked`` and (for Batch Renorm) the schedule are exercised.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint

import bnkit
from bnkit.variants import BatchNormAct2d

D = torch.float64
EPS = 1e-5
HYP = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------------------------
# independent references


def _moments(x: torch.Tensor, axis: int = 1) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-feature mean, biased variance and count along every dim but ``axis``."""
    a = axis % x.dim()
    dims = [i for i in range(x.dim()) if i != a]
    return x.mean(dims), x.var(dims, unbiased=False), x.numel() // x.shape[a]


def _bc(t: torch.Tensor, x: torch.Tensor, axis: int = 1) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return t.reshape(shape)


def _bn(x: torch.Tensor, axis: int = 1) -> torch.Tensor:
    m, v, _ = _moments(x, axis)
    return (x - _bc(m, x, axis)) / torch.sqrt(_bc(v, x, axis) + EPS)


class _Running:
    """PyTorch's running-average rule with the unbiased variance (``momentum=None``: cumulative)."""

    def __init__(self, c: int, momentum: float | None) -> None:
        self.mean = torch.zeros(c, dtype=D)
        self.var = torch.ones(c, dtype=D)
        self.count = 0
        self.momentum = momentum

    def update(self, m: torch.Tensor, v: torch.Tensor, n: int) -> None:
        self.count += 1
        f = 1.0 / self.count if self.momentum is None else self.momentum
        self.mean = (1 - f) * self.mean + f * m
        self.var = (1 - f) * self.var + f * v * n / (n - 1)


def _affine(y: torch.Tensor, layer: nn.Module, axis: int = 1) -> torch.Tensor:
    c = y.shape[axis % y.dim()]
    if layer.weight is not None:
        y = y * _bc(layer.weight.detach().expand(c), y, axis)
    if layer.bias is not None:
        y = y + _bc(layer.bias.detach().expand(c), y, axis)
    return y


def _ramp(step: int, warm: int, end: int) -> float:
    if end <= warm:
        return float(step >= warm)
    return min(max((step - warm) / (end - warm), 0.0), 1.0)


def _renorm_reference(layer, x, ref: _Running, axis: int = 1) -> torch.Tensor:
    """One training step of Batch Renorm (Ioffe 2017, with torch's unbiased running variance)."""
    m, v, n = _moments(x, axis)
    if layer.schedule == "fixed":
        fr = fd = 1.0
    else:
        fr = _ramp(ref.count, layer.warmup_steps, layer.r_max_steps)
        fd = _ramp(ref.count, layer.warmup_steps, layer.d_max_steps)
    r_max = 1 + (layer.r_max - 1) * fr
    d_max = layer.d_max * fd
    sigma_b = torch.sqrt(v + EPS)
    sigma = torch.sqrt(ref.var + EPS)
    r = torch.clamp(sigma_b / sigma, 1 / r_max, r_max)
    d = torch.clamp((m - ref.mean) / sigma, -d_max, d_max)
    y = (x - _bc(m, x, axis)) / _bc(sigma_b, x, axis) * _bc(r, x, axis) + _bc(d, x, axis)
    ref.update(m, v, n)
    return _affine(y, layer, axis)


def _assert_running_and_eval(layer: nn.Module, ref: _Running, shape, axis: int, steps: int) -> None:
    """The running statistics equal the reference's after ``steps`` steps, and eval normalizes with them."""
    torch.testing.assert_close(layer.running_mean, ref.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_var, ref.var, rtol=1e-12, atol=1e-12)
    assert int(layer.num_batches_tracked) == steps
    layer.eval()
    x = torch.randn(shape, dtype=D)
    expected = _affine((x - _bc(ref.mean, x, axis)) / torch.sqrt(_bc(ref.var, x, axis) + EPS), layer, axis)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    assert int(layer.num_batches_tracked) == steps


def _set_affine(layer: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g, dtype=layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g, dtype=layer.bias.dtype))


def _state(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.state_dict().items()}


def _assert_state(layer: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = layer.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


# ----------------------------------------------------------------------------------------------------------------
# Batch Renorm


@HYP
@given(
    seed=st.integers(0, 2**16),
    momentum=st.sampled_from([0.3, 0.9, None]),
    schedule=st.sampled_from(["linear", "fixed"]),
    warm=st.integers(0, 2),
    r_extra=st.integers(0, 3),
    d_extra=st.integers(0, 3),
    share=st.sampled_from(["none", "weight", "all"]),
    affine=st.booleans(),
    layout=st.sampled_from(["1d", "2d_cl", "axis-1"]),
)
def test_batch_renorm_multi_step_matches_float64_reference(
    seed, momentum, schedule, warm, r_extra, d_extra, share, affine, layout
):
    torch.manual_seed(seed)
    c = 3
    kw = dict(
        momentum=momentum, r_max=1.7, d_max=0.6, warmup_steps=warm, r_max_steps=warm + r_extra,
        d_max_steps=warm + d_extra, schedule=schedule, affine=affine, share_affine=share, dtype=D,
    )
    axis = 1
    if layout == "1d":
        layer = bnkit.BatchRenorm1d(c, **kw)
        shape = (5, c, 3)
    elif layout == "2d_cl":
        layer = bnkit.BatchRenorm2d(c, **kw)
        shape = (4, c, 2, 3)
    else:
        axis = -1
        layer = bnkit.BatchRenorm(c, axis=-1, **kw)
        shape = (4, 3, c)
    if affine:
        _set_affine(layer, seed)
    ref = _Running(c, momentum)
    for step in range(6):
        x = torch.randn(shape, dtype=D) * (1 + step) + 0.7 * step  # drifting statistics: r and d get clipped
        if layout == "2d_cl":
            x = x.to(memory_format=torch.channels_last)
        expected = _renorm_reference(layer, x, ref, axis)
        y = layer(x)
        torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
        if layout == "2d_cl":
            assert y.is_contiguous(memory_format=torch.channels_last)
    _assert_running_and_eval(layer, ref, shape, axis, 6)


@pytest.mark.parametrize("share", ["none", "weight", "all"])
def test_batch_renorm_gradients_treat_r_and_d_as_constants(share):
    torch.manual_seed(3)
    c = 3
    layer = bnkit.BatchRenorm1d(c, momentum=0.2, schedule="fixed", r_max=1.4, d_max=0.3, share_affine=share, dtype=D)
    _set_affine(layer, 1)
    layer.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0], dtype=D))
    layer.running_var.copy_(torch.tensor([0.2, 5.0, 1.0], dtype=D))
    x = (torch.randn(6, c, 2, dtype=D) * 1.5).requires_grad_()
    g = torch.randn(6, c, 2, dtype=D)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    mu, var = layer.running_mean.clone(), layer.running_var.clone()
    (layer(x) * g).sum().backward()

    xr = x.detach().clone().requires_grad_()
    wr, br = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    m, v = xr.mean((0, 2)), xr.var((0, 2), unbiased=False)
    sigma = torch.sqrt(var + EPS)
    r = torch.clamp(torch.sqrt(v + EPS) / sigma, 1 / 1.4, 1.4).detach()
    d = torch.clamp((m - mu) / sigma, -0.3, 0.3).detach()
    y = ((xr - _bc(m, xr)) / torch.sqrt(_bc(v, xr) + EPS) * _bc(r, xr) + _bc(d, xr)) * _bc(wr.expand(c), xr)
    y = y + _bc(br.expand(c), xr)
    (y * g).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.weight.grad, wr.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.bias.grad, br.grad, rtol=1e-10, atol=1e-10)


def test_batch_renorm_masked_matches_reference_of_the_valid_entries():
    torch.manual_seed(5)
    layer = bnkit.BatchRenorm1d(2, momentum=0.3, schedule="fixed", r_max=1.5, d_max=0.5, affine=False, dtype=D)
    layer.running_mean.fill_(0.2)
    layer.running_var.fill_(2.0)
    x = torch.randn(4, 2, 5, dtype=D)
    mask = torch.rand(4, 5) > 0.4
    y = layer(x, mask=mask)
    valid = x.permute(0, 2, 1)[mask]
    m, v, n = valid.mean(0), valid.var(0, unbiased=False), valid.shape[0]
    sigma = (2.0 + EPS) ** 0.5
    sigma_b = torch.sqrt(v + EPS)
    r = torch.clamp(sigma_b / sigma, 1 / 1.5, 1.5)
    d = torch.clamp((m - 0.2) / sigma, -0.5, 0.5)
    expected = (x - m[:, None]) / sigma_b[:, None] * r[:, None] + d[:, None]
    torch.testing.assert_close(y.permute(0, 2, 1)[mask], expected.permute(0, 2, 1)[mask])
    torch.testing.assert_close(layer.running_mean, 0.7 * 0.2 + 0.3 * m)
    torch.testing.assert_close(layer.running_var, 0.7 * 2.0 + 0.3 * v * n / (n - 1))


def _renorm_for_checkpoint() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    layer = bnkit.BatchRenorm1d(3, momentum=0.5, schedule="fixed", dtype=D)
    layer.running_mean.fill_(1.0)
    layer.running_var.fill_(4.0)
    return layer, torch.randn(6, 3, dtype=D) * 3 + 2, torch.randn(6, 3, dtype=D)


def test_batch_renorm_checkpointing_the_same_batch_twice_gives_the_plain_gradients():
    grads = []
    for use_checkpoint in (False, True):
        layer, x, g = _renorm_for_checkpoint()
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        if use_checkpoint:
            ya, yb = checkpoint(layer, xa, use_reentrant=False), checkpoint(layer, xb, use_reentrant=False)
        else:
            ya, yb = layer(xa), layer(xb)
        ((ya + 2 * yb) * g).sum().backward()
        grads.append((xa.grad, xb.grad, layer.weight.grad))
    for plain, ckpt in zip(*grads):
        torch.testing.assert_close(ckpt, plain, rtol=1e-10, atol=1e-10)


def test_batch_renorm_no_grad_forward_then_checkpoint_gives_the_plain_gradients():
    grads = []
    for use_checkpoint in (False, True):
        layer, x, g = _renorm_for_checkpoint()
        with torch.no_grad():
            layer(x)  # a training-mode forward without gradients (a statistics pass, a teacher pass, ...)
        step = []
        for _ in range(3):  # training on the same batch again: off by one step every time
            xx = x.clone().requires_grad_()
            y = checkpoint(layer, xx, use_reentrant=False) if use_checkpoint else layer(xx)
            (y * g).sum().backward()
            step.append(xx.grad)
        grads.append(step)
    for plain, ckpt in zip(*grads):
        torch.testing.assert_close(ckpt, plain, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_batch_renorm_masked_under_checkpoint_gives_the_plain_gradients(use_reentrant):
    grads = []
    for use_checkpoint in (False, True):
        layer, _, _ = _renorm_for_checkpoint()
        torch.manual_seed(1)
        x = (torch.randn(4, 3, 5, dtype=D) * 3 + 2).requires_grad_()
        mask = torch.rand(4, 5) > 0.3
        g = torch.randn(4, 3, 5, dtype=D)

        def f(t, m, layer=layer):
            return layer(t, mask=m)

        y = checkpoint(f, x, mask, use_reentrant=use_reentrant) if use_checkpoint else f(x, mask)
        (y * g).sum().backward()
        grads.append((x.grad, layer.weight.grad, layer.running_mean.clone()))
    for plain, ckpt in zip(*grads):
        torch.testing.assert_close(ckpt, plain, rtol=1e-10, atol=1e-10)


def test_batch_renorm_single_checkpoint_matches_plain_and_reference():
    # (the documented, supported case: each checkpointed batch is recomputed once, in reverse order)
    results = []
    for mode in ("plain", "reentrant", "non-reentrant"):
        layer, x, g = _renorm_for_checkpoint()
        ref = _Running(3, 0.5)
        ref.mean.fill_(1.0)
        ref.var.fill_(4.0)
        xs = [x, x * 0.5 - 1]
        out = []
        for xi in xs:
            xi = xi.clone().requires_grad_()
            y = layer(xi) if mode == "plain" else checkpoint(layer, xi, use_reentrant=mode == "reentrant")
            (y * g).sum().backward()
            out.append(xi.grad)
        results.append((out, layer.running_mean.clone(), layer.running_var.clone()))
        for xi in xs:
            _renorm_reference(layer, xi, ref)
        torch.testing.assert_close(layer.running_mean, ref.mean)
        torch.testing.assert_close(layer.running_var, ref.var)
    for other in results[1:]:
        for a, b in zip(results[0][0], other[0]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Ghost BN


@HYP
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(2, 11),
    vbs=st.integers(1, 12),
    momentum=st.sampled_from([0.25, None]),
    share=st.sampled_from(["none", "weight", "all"]),
    layout=st.sampled_from(["1d", "2d_cl", "3d", "axis-1"]),
)
def test_ghost_bn_multi_step_matches_per_chunk_reference(seed, n, vbs, momentum, share, layout):
    torch.manual_seed(seed)
    c = 2
    axis = 1
    kw = dict(virtual_batch_size=vbs, momentum=momentum, share_affine=share, dtype=D)
    if layout == "1d":
        layer, shape = bnkit.GhostBatchNorm1d(c, **kw), (n, c, 2)
    elif layout == "2d_cl":
        layer, shape = bnkit.GhostBatchNorm2d(c, **kw), (n, c, 2, 2)
    elif layout == "3d":
        layer, shape = bnkit.GhostBatchNorm3d(c, **kw), (n, c, 1, 2, 1)
    else:
        axis = -1
        layer, shape = bnkit.GhostBatchNorm(c, axis=-1, **kw), (n, 2, c)
    _set_affine(layer, seed)
    ref = _Running(c, momentum)
    for step in range(3):
        x = torch.randn(shape, dtype=D) * (step + 1) + step
        if layout == "2d_cl":
            x = x.to(memory_format=torch.channels_last)
        y = layer(x)
        expected = torch.cat([_affine(_bn(x[i:i + vbs], axis), layer, axis) for i in range(0, n, vbs)])
        torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
        if layout == "2d_cl":
            assert y.is_contiguous(memory_format=torch.channels_last)
        ref.update(*_moments(x, axis))
    _assert_running_and_eval(layer, ref, shape, axis, 3)


def test_ghost_bn_gradcheck_with_a_smaller_last_chunk():
    layer = bnkit.GhostBatchNorm1d(2, virtual_batch_size=3, track_running_stats=False, dtype=D)
    _set_affine(layer, 0)
    x = torch.randn(7, 2, 2, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, w, b: layer(t), (x, layer.weight, layer.bias))


def test_ghost_bn_without_running_stats_and_affine_false():
    layer = bnkit.GhostBatchNorm2d(3, virtual_batch_size=2, affine=False, track_running_stats=False, dtype=D)
    x = torch.randn(5, 3, 2, 2, dtype=D)
    expected = torch.cat([_bn(x[i:i + 2]) for i in range(0, 5, 2)])
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.eval()(x), expected)
    assert layer.running_mean is None and layer.weight is None


def test_ghost_bn_masked_matches_per_chunk_reference_of_the_valid_entries():
    torch.manual_seed(2)
    layer = bnkit.GhostBatchNorm1d(2, virtual_batch_size=2, momentum=0.3, affine=False, dtype=D)
    x = torch.randn(5, 2, 4, dtype=D)
    mask = torch.rand(5, 4) > 0.3
    mask[:, 0] = True
    y = layer(x, mask=mask)
    for lo in range(0, 5, 2):
        xc, mc = x[lo:lo + 2].permute(0, 2, 1), mask[lo:lo + 2]
        valid = xc[mc]
        expected = (valid - valid.mean(0)) / torch.sqrt(valid.var(0, unbiased=False) + EPS)
        torch.testing.assert_close(y[lo:lo + 2].permute(0, 2, 1)[mc], expected)
    valid = x.permute(0, 2, 1)[mask]
    torch.testing.assert_close(layer.running_mean, 0.3 * valid.mean(0))
    torch.testing.assert_close(layer.running_var, 0.7 + 0.3 * valid.var(0))


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_ghost_bn_nonfinite_leaves_the_running_statistics(nonfinite):
    layer = bnkit.GhostBatchNorm1d(2, virtual_batch_size=2, nonfinite=nonfinite, dtype=D)
    before = _state(layer)
    x = torch.randn(6, 2, dtype=D)
    x[0, 0] = float("nan")
    if nonfinite == "raise":
        with pytest.raises(FloatingPointError):
            layer(x)
    else:
        with pytest.warns(RuntimeWarning):
            y = layer(x)
        assert torch.isfinite(y[2:]).all()  # the other virtual batches are untouched by the NaN
    _assert_state(layer, before)


# ----------------------------------------------------------------------------------------------------------------
# SharedBatchNorm


@HYP
@given(
    seed=st.integers(0, 2**16),
    sites=st.lists(st.integers(0, 2), min_size=1, max_size=7),
    momentum=st.sampled_from([0.3, None]),
    share_stats=st.booleans(),
    share=st.sampled_from(["none", "weight", "all"]),
)
def test_shared_bn_per_site_statistics_match_reference(seed, sites, momentum, share_stats, share):
    torch.manual_seed(seed)
    c, s = 3, 3
    layer = bnkit.SharedBatchNorm(c, sites=s, momentum=momentum, share_stats=share_stats, share_affine=share, dtype=D)
    _set_affine(layer, seed)
    refs = [_Running(c, momentum)] if share_stats else [_Running(c, momentum) for _ in range(s)]
    for site in sites:
        x = torch.randn(4, c, 2, dtype=D) * (site + 1) + site
        torch.testing.assert_close(layer(x, site=site), _affine(_bn(x), layer), rtol=1e-10, atol=1e-10)
        refs[0 if share_stats else site].update(*_moments(x))
    if share_stats:
        torch.testing.assert_close(layer.running_mean, refs[0].mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.running_var, refs[0].var, rtol=1e-12, atol=1e-12)
        assert int(layer.num_batches_tracked) == len(sites)
    else:
        torch.testing.assert_close(layer.running_mean, torch.stack([r.mean for r in refs]), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.running_var, torch.stack([r.var for r in refs]), rtol=1e-12, atol=1e-12)
        assert layer.num_batches_tracked.tolist() == [r.count for r in refs]
    layer.eval()
    x = torch.randn(4, c, 2, dtype=D)
    for site in range(s):
        r = refs[0 if share_stats else site]
        expected = _affine((x - _bc(r.mean, x)) / torch.sqrt(_bc(r.var, x) + EPS), layer)
        torch.testing.assert_close(layer(x, site=site), expected, rtol=1e-10, atol=1e-10)
        scale, shift = layer.inference_affine(site=site)
        torch.testing.assert_close(x * _bc(scale, x) + _bc(shift, x), expected, rtol=1e-10, atol=1e-10)


def test_shared_bn_without_running_stats_normalizes_with_the_batch_in_eval():
    layer = bnkit.SharedBatchNorm(3, sites=2, track_running_stats=False, affine=False, dtype=D).eval()
    x = torch.randn(4, 3, dtype=D)
    torch.testing.assert_close(layer(x, site=1), _bn(x))


def test_shared_bn_refuses_a_bool_tensor_site_as_it_refuses_a_bool():
    layer = bnkit.SharedBatchNorm(2, sites=3, dtype=D)
    before = _state(layer)
    x = torch.randn(4, 2, dtype=D)
    with pytest.raises(TypeError):
        layer(x, site=True)
    with pytest.raises(TypeError):
        layer(x, site=torch.tensor(True))
    _assert_state(layer, before)


# ----------------------------------------------------------------------------------------------------------------
# DomainBatchNorm


@HYP
@given(
    seed=st.integers(0, 2**16),
    momentum=st.sampled_from([0.3, None]),
    shared_affine=st.booleans(),
    affine=st.booleans(),
    channels_last=st.booleans(),
    steps=st.lists(st.lists(st.integers(0, 2), min_size=2, max_size=7), min_size=1, max_size=4),
)
def test_domain_bn_equals_separate_bn_layers_per_domain_slice(
    seed, momentum, shared_affine, affine, channels_last, steps
):
    torch.manual_seed(seed)
    c, nd = 2, 3
    layer = bnkit.DomainBatchNorm2d(c, nd, momentum=momentum, shared_affine=shared_affine, affine=affine, dtype=D)
    if affine:
        _set_affine(layer, seed)
    refs = [_Running(c, momentum) for _ in range(nd)]

    def domain_affine(y, d):
        if not affine:
            return y
        w, b = layer.domain_parameters(d)
        return y * _bc(w.detach(), y) + _bc(b.detach(), y)

    for assignment in steps:
        domains = torch.tensor(assignment)
        x = torch.randn(len(assignment), c, 2, 1, dtype=D) * 2 + 1
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        y = layer(x, domain=domains)
        for d in range(nd):
            sel = domains == d
            if sel.any():
                torch.testing.assert_close(y[sel], domain_affine(_bn(x[sel]), d), rtol=1e-10, atol=1e-10)
                refs[d].update(*_moments(x[sel]))
    torch.testing.assert_close(layer.running_mean, torch.stack([r.mean for r in refs]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_var, torch.stack([r.var for r in refs]), rtol=1e-12, atol=1e-12)
    assert layer.num_batches_tracked.tolist() == [r.count for r in refs]  # absent domains unchanged
    layer.eval()
    x = torch.randn(5, c, 2, 1, dtype=D)
    domains = torch.tensor([2, 0, 1, 0, 2])
    y = layer(x, domain=domains)
    for i, d in enumerate(domains.tolist()):
        xi = x[i:i + 1]
        expected = domain_affine((xi - _bc(refs[d].mean, xi)) / torch.sqrt(_bc(refs[d].var, xi) + EPS), d)
        torch.testing.assert_close(y[i:i + 1], expected, rtol=1e-10, atol=1e-10)


def test_domain_bn_one_sample_domain_raises_and_changes_nothing_mixed_and_int():
    # docs: a domain with a single value per channel in a training batch raises ValueError (as torch's BN)
    layer = bnkit.DomainBatchNorm1d(2, 3, momentum=None, dtype=D)
    layer(torch.randn(4, 2, dtype=D), domain=torch.tensor([0, 0, 1, 1]))
    before = _state(layer)
    with pytest.raises(ValueError, match="domain 2"):
        layer(torch.randn(5, 2, dtype=D), domain=torch.tensor([0, 0, 1, 1, 2]))
    with pytest.raises(ValueError):
        layer(torch.randn(1, 2, dtype=D), domain=1)
    _assert_state(layer, before)
    # one sample with several values per channel ((N, C, L) data) is fine
    layer(torch.randn(3, 2, 4, dtype=D), domain=torch.tensor([0, 0, 2]))
    assert layer.num_batches_tracked.tolist() == [2, 1, 1]


def test_domain_bn_without_running_stats_uses_each_domains_batch_in_eval():
    layer = bnkit.DomainBatchNorm1d(2, 2, track_running_stats=False, affine=False, dtype=D).eval()
    x = torch.randn(5, 2, 3, dtype=D)
    domains = torch.tensor([0, 1, 0, 1, 1])
    y = layer(x, domain=domains)
    for d in range(2):
        torch.testing.assert_close(y[domains == d], _bn(x[domains == d]))


# ----------------------------------------------------------------------------------------------------------------
# the generic axis layer and BatchNormAct


@pytest.mark.parametrize("axis,shape", [(2, (3, 4, 5)), (-1, (3, 2, 4)), (-2, (2, 4, 2, 3)), (0, (4, 3))])
@pytest.mark.parametrize("momentum", [0.2, None])
def test_generic_axis_layer_is_torch_bn_on_the_permuted_input(axis, shape, momentum):
    torch.manual_seed(0)
    c = shape[axis]
    layer = bnkit.BatchNorm(c, axis=axis, momentum=momentum, dtype=D)
    _set_affine(layer, 0)
    torch_bn = nn.BatchNorm1d(c, momentum=momentum, dtype=D)
    torch_bn.load_state_dict(layer.state_dict())
    a = axis % len(shape)

    def permuted(x):  # features to dim 1, everything else flattened into (N, C, L)
        return x.movedim(a, 0).reshape(c, -1).t().unsqueeze(-1)

    for step in range(3):
        x = torch.randn(shape, dtype=D) * (step + 1) + step
        y = layer(x)
        yt = torch_bn(permuted(x))
        torch.testing.assert_close(permuted(y), yt)
    for k, v in torch_bn.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[k], v)
    layer.eval()
    torch_bn.eval()
    x = torch.randn(shape, dtype=D)
    torch.testing.assert_close(permuted(layer(x)), torch_bn(permuted(x)))


@pytest.mark.parametrize("act", [nn.ReLU(), nn.SiLU(), nn.Hardtanh(-0.5, 0.7), nn.GELU(), nn.LeakyReLU(0.1)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnormact_is_the_activation_after_bn_over_several_steps(act, momentum):
    torch.manual_seed(1)
    layer = BatchNormAct2d(3, act=copy.deepcopy(act), momentum=momentum, dtype=D)
    _set_affine(layer, 2)
    ref = _Running(3, momentum)
    for step in range(3):
        x = (torch.randn(4, 3, 2, 2, dtype=D) * (step + 1)).to(memory_format=torch.channels_last).requires_grad_()
        y = layer(x)
        xr = x.detach().clone().requires_grad_()
        yr = act(_affine(_bn(xr), layer))
        torch.testing.assert_close(y, yr)
        g = torch.randn_like(y)
        torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(yr, xr, g)[0])
        ref.update(*_moments(x.detach()))
    torch.testing.assert_close(layer.running_mean, ref.mean)
    torch.testing.assert_close(layer.running_var, ref.var)
    assert int(layer.num_batches_tracked) == 3
    layer.eval()
    x = torch.randn(4, 3, 2, 2, dtype=D)
    torch.testing.assert_close(layer(x), act(_affine((x - _bc(ref.mean, x)) / torch.sqrt(_bc(ref.var, x) + EPS), layer)))


# ----------------------------------------------------------------------------------------------------------------
# state: state_dict round trips and deepcopy, continued training


def _make(kind: str) -> nn.Module:
    if kind == "renorm":
        return bnkit.BatchRenorm1d(3, momentum=0.2, warmup_steps=1, r_max_steps=3, d_max_steps=2, r_max=2.0,
                                   d_max=1.0, dtype=D)
    if kind == "renorm_cumulative":
        return bnkit.BatchRenorm1d(3, momentum=None, warmup_steps=1, r_max_steps=3, d_max_steps=2, dtype=D)
    if kind == "renorm_keras":
        return bnkit.BatchRenorm1d(3, momentum=0.2, schedule="fixed", convention="keras", dtype=D)
    if kind == "ghost":
        return bnkit.GhostBatchNorm1d(3, virtual_batch_size=3, momentum=None, dtype=D)
    if kind == "shared":
        return bnkit.SharedBatchNorm(3, sites=2, momentum=None, share_affine="weight", dtype=D)
    if kind == "domain":
        return bnkit.DomainBatchNorm1d(3, 2, momentum=None, dtype=D)
    if kind == "axis":
        return bnkit.BatchNorm(3, axis=-1, momentum=None, share_affine="all", dtype=D)
    return BatchNormAct2d(3, act=nn.SiLU(), momentum=None, dtype=D)


def _call(layer: nn.Module, x: torch.Tensor, i: int) -> torch.Tensor:
    if isinstance(layer, bnkit.SharedBatchNorm):
        return layer(x, site=i % 2)
    if isinstance(layer, bnkit.DomainBatchNorm):
        return layer(x, domain=torch.tensor([0, 1, 0, 1, 0, 1, 1]) if i % 2 else 1)
    if isinstance(layer, BatchNormAct2d):
        return layer(x.unsqueeze(-1))
    if layer.axis == -1:
        return layer(x.transpose(1, 2))
    return layer(x)


def _train(layer: nn.Module, xs, start: int) -> list[torch.Tensor]:
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    ys = []
    for i, x in enumerate(xs, start):
        y = _call(layer, x, i)
        (y ** 3).sum().backward()
        opt.step()
        opt.zero_grad()
        ys.append(y.detach())
    return ys


@pytest.mark.parametrize(
    "kind", ["renorm", "renorm_cumulative", "renorm_keras", "ghost", "shared", "domain", "axis", "act"]
)
def test_save_load_and_deepcopy_then_continue_training_is_identical_to_never_saving(kind):
    torch.manual_seed(1)
    xs = [torch.randn(7, 3, 2, dtype=D) * (i + 1) + i for i in range(6)]
    straight = _make(kind)
    ys = _train(straight, xs, 0)
    saved = _make(kind)
    _train(saved, xs[:3], 0)
    buf = io.BytesIO()
    torch.save(saved.state_dict(), buf)
    buf.seek(0)
    loaded = _make(kind)
    loaded.load_state_dict(torch.load(buf))
    copied = copy.deepcopy(saved)
    for layer in (loaded, copied):
        for y, expected in zip(_train(layer, xs[3:], 3), ys[3:]):
            torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
        for k, v in straight.state_dict().items():
            torch.testing.assert_close(layer.state_dict()[k], v, rtol=1e-12, atol=1e-12)
    if kind.startswith("renorm"):
        assert loaded.limits() == straight.limits()


# ----------------------------------------------------------------------------------------------------------------
# bad inputs: a clear error, the state unchanged


@pytest.mark.parametrize(
    "kind,call,error",
    [
        ("renorm", lambda m: m(torch.randn(1, 2, dtype=D)), ValueError),
        ("renorm", lambda m: m(torch.randn(4, 3, dtype=D)), ValueError),
        ("renorm", lambda m: m(torch.ones(4, 2, dtype=torch.long)), TypeError),
        ("renorm", lambda m: m(torch.randn(4, 2)), TypeError),
        ("ghost", lambda m: m(torch.randn(5, 2, dtype=D)), ValueError),  # last virtual batch: one value
        ("ghost", lambda m: m(torch.randn(4, 3, dtype=D)), ValueError),
        ("shared", lambda m: m(torch.randn(4, 2, dtype=D), site=3), IndexError),
        ("shared", lambda m: m(torch.randn(4, 2, dtype=D)), TypeError),
        ("shared", lambda m: m(torch.randn(1, 2, dtype=D), site=1), ValueError),
        ("domain", lambda m: m(torch.randn(4, 2, dtype=D), domain=torch.tensor([0.0, 1, 0, 1])), TypeError),
        ("domain", lambda m: m(torch.randn(4, 2, dtype=D), domain=torch.tensor([0, 1, 0])), ValueError),
        ("domain", lambda m: m(torch.randn(4, 2, dtype=D), domain=torch.tensor([0, 1, 0, 3])), IndexError),
        ("axis", lambda m: m(torch.randn(4, 3, 3, dtype=D)), ValueError),
    ],
)
def test_bad_inputs_raise_and_leave_the_state_unchanged(kind, call, error):
    layer = {
        "renorm": lambda: bnkit.BatchRenorm1d(2, schedule="fixed", dtype=D),
        "ghost": lambda: bnkit.GhostBatchNorm1d(2, virtual_batch_size=2, dtype=D),
        "shared": lambda: bnkit.SharedBatchNorm(2, sites=3, dtype=D),
        "domain": lambda: bnkit.DomainBatchNorm1d(2, 3, dtype=D),
        "axis": lambda: bnkit.BatchNorm(2, axis=-1, dtype=D),
    }[kind]()
    before = _state(layer)
    with pytest.raises(error):
        call(layer)
    _assert_state(layer, before)


@pytest.mark.parametrize("shape", [(1, 2), (1, 2, 1)])
def test_ghost_one_value_per_channel_reports_the_input_size_as_the_layers_do(shape):
    x = torch.randn(shape)
    with pytest.raises(ValueError, match="more than 1 value per channel") as torch_error:
        torch.nn.BatchNorm1d(2)(x)
    layer = bnkit.GhostBatchNorm1d(2, virtual_batch_size=2)
    before = copy.deepcopy(layer.state_dict())
    with pytest.raises(ValueError, match=r"GhostBatchNorm1d\(2\): Expected more than 1 value per channel") as e:
        layer(x)
    assert str(torch_error.value).endswith(str(x.size())) and str(e.value).endswith(str(x.size()))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
