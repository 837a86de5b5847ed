"""bnkit.stats against direct NumPy float64 computations and torch's running-average rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bnkit
from bnkit import stats
from bnkit.functional import canonical_view


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 9), min_size=1, max_size=6),
    channels=st.integers(1, 4),
    offset=st.sampled_from([0.0, 1e3, -50.0]),
    seed=st.integers(0, 10_000),
)
def test_chan_merge_equals_whole_data_moments(sizes, channels, offset, seed):
    rng = np.random.default_rng(seed)
    parts = [rng.normal(offset, 2.0, size=(n, channels)) for n in sizes]
    whole = np.concatenate(parts, axis=0)
    merged = stats.merge_all(stats.Moments.of(torch.from_numpy(p), 0) for p in parts)
    stacked = stats.merge_stacked(
        torch.tensor([p.shape[0] for p in parts]),
        torch.stack([stats.Moments.of(torch.from_numpy(p), 0).mean for p in parts]),
        torch.stack([stats.Moments.of(torch.from_numpy(p), 0).m2 for p in parts]),
    )
    assert int(merged.count) == whole.shape[0] == int(stacked.count)
    if whole.shape[0] == 0:
        return
    np.testing.assert_allclose(merged.mean.numpy(), whole.mean(0), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(stacked.mean.numpy(), whole.mean(0), rtol=1e-12, atol=1e-9)
    m2 = ((whole - whole.mean(0)) ** 2).sum(0)
    np.testing.assert_allclose(merged.m2.numpy(), m2, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(stacked.m2.numpy(), m2, rtol=1e-9, atol=1e-9)
    if whole.shape[0] > 1:
        np.testing.assert_allclose(merged.variance(1).numpy(), whole.var(0, ddof=1), rtol=1e-9)


def test_moments_over_any_axes_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4, 5, 2))
    for axes in [(0,), (0, 2, 3), (1, 3), (-1,), 2]:
        mean, var = stats.moments(torch.from_numpy(x), axes, correction=1)
        np.testing.assert_allclose(mean.numpy(), x.mean(axis=axes), rtol=1e-12)
        np.testing.assert_allclose(var.numpy(), x.var(axis=axes, ddof=1), rtol=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=2, max_size=5).filter(lambda s: s[0] > 1),
    layout=st.sampled_from(["contiguous", "channels_last", "permuted", "sliced"]),
    data=st.data(),
)
def test_float32_moments_in_any_layout_match_float64(shape, layout, data):
    """The float32 mean sums trailing reduced dims as one where their strides merge (NCHW and channels_last);
    permuted and sliced inputs, whose strides do not merge, take the per-dim path. Both against float64."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))) * 100 + 1
    if layout == "channels_last" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "permuted":
        x = x.permute(*reversed(range(x.dim())))
    elif layout == "sliced":
        x = torch.cat([x, x], dim=-1)[..., ::2]
    bn_axes = [0, *range(2, x.dim())]  # the layers' reduction, drawn half the time
    axes = data.draw(st.one_of(st.just(bn_axes), st.sets(st.integers(0, x.dim() - 1), min_size=1).map(sorted)))
    mean, var = stats.moments(x, axes)
    x64 = x.double().numpy()
    assert mean.shape == x.double().mean(dim=axes).shape
    spread = np.abs(x64).max()
    np.testing.assert_allclose(mean.double().numpy(), x64.mean(axis=tuple(axes)), rtol=0, atol=1e-5 * spread)
    np.testing.assert_allclose(var.double().numpy(), x64.var(axis=tuple(axes)), rtol=1e-4, atol=1e-5 * spread)


def test_half_inputs_accumulate_in_float32():
    x = torch.full((4096, 2), 1.0, dtype=torch.bfloat16)
    x[::2] = 3.0
    mean, var = stats.moments(x, 0)
    assert mean.dtype == torch.float32
    torch.testing.assert_close(mean, torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(var, torch.tensor([1.0, 1.0]))


def test_two_pass_is_stable_where_one_pass_fails():
    """float32 data with mean 1e3 and std 0.1: the E[x^2]-E[x]^2 formula loses the variance."""
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(256, 8, 16, 16, generator=g, dtype=torch.float64) * 0.1 + 1e3
    x32 = x64.float()
    ref_y, ref_mean, ref_var = bnkit.reference.forward_train(x32.double().numpy(), eps=1e-5)

    # One pass in float32: catastrophic cancellation.
    dims = (0, 2, 3)
    naive_var = (x32 * x32).mean(dims) - x32.mean(dims) ** 2
    naive_y = (x32 - x32.mean(dims, keepdim=True)) / torch.sqrt(naive_var.view(1, -1, 1, 1).clamp_min(0) + 1e-5)
    naive_err = np.abs(naive_y.double().numpy() - ref_y).max()
    assert naive_err > 1e-2, f"the one-pass formula unexpectedly held up ({naive_err})"

    y = bnkit.functional.batch_norm(x32, None, None, training=True)
    err = np.abs(y.double().numpy() - ref_y).max()
    assert err <= 1e-3, err
    m = stats.Moments.of(x32, dims)
    np.testing.assert_allclose(m.variance(0).double().numpy(), ref_var, rtol=1e-3)


def test_running_update_matches_torch_rule():
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    mean = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    var = torch.tensor([4.0, 5.0, 6.0], dtype=torch.float64)
    stats.update_running_stats(rm, rv, mean, var, count=5, factor=0.25)
    exp_m, exp_v = bnkit.reference.running_update(np.zeros(3), np.ones(3), mean.numpy(), var.numpy(), 5, 0.25)
    np.testing.assert_allclose(rm.numpy(), exp_m, rtol=1e-14)
    np.testing.assert_allclose(rv.numpy(), exp_v, rtol=1e-14)
    # Hand-derived: 0.75*1 + 0.25*4*5/4
    assert rv[0].item() == pytest.approx(0.75 + 0.25 * 5.0)


def test_cumulative_average_is_the_plain_mean_of_batches():
    bn = bnkit.BatchNorm1d(3, momentum=None)
    batches = [torch.randn(7, 3, dtype=torch.float32) * (i + 1) + i for i in range(5)]
    for b in batches:
        bn(b)
    means = torch.stack([b.mean(0) for b in batches]).mean(0)
    vars_ = torch.stack([b.var(0, unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean, means, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, vars_, rtol=1e-5, atol=1e-5)
    assert int(bn.num_batches_tracked) == 5
    assert stats.running_average_factor(None, 4) == 0.25
    with pytest.raises(ValueError):
        stats.running_average_factor(None, 0)


def test_keras_momentum_conversion():
    assert stats.momentum_from_keras(0.99) == pytest.approx(0.01)
    assert stats.momentum_to_keras(0.01) == pytest.approx(0.99)
    assert bnkit.momentum_to_keras(bnkit.momentum_from_keras(0.9)) == pytest.approx(0.9)
    with pytest.raises(ValueError):
        stats.momentum_from_keras(1.5)


def test_canonical_view_shares_memory_and_restores_layout():
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    x3, restore = canonical_view(x, 1)
    assert x3.shape == (40, 3, 1) and x3.data_ptr() == x.data_ptr()
    assert restore(x3).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(restore(x3), x)
    y = torch.randn(2, 3, 4)
    y3, restore = canonical_view(y, 1)
    assert y3.shape == (2, 3, 4) and y3.data_ptr() == y.data_ptr()
    z = torch.randn(4, 2, 3).transpose(0, 2)  # neither contiguous nor channels-last in axis 1
    z3, restore = canonical_view(z, 1)
    torch.testing.assert_close(restore(z3), z)
