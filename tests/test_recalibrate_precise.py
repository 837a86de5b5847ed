"""bnkit.recalibrate (PreciseBN): precision, non-finite batches, batch counts.

Oracles: the float64 statistics of the layer inputs computed here with torch
ops, and recalibration on the same data without the bad batch.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import bnkit
from bnkit.stats import Moments, merge

from _state import assert_state_unchanged, snapshot


def _batches(k=40, n=64, c=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, c, generator=g, dtype=torch.float64).to(dtype) for _ in range(k)]


def _ulps(actual: torch.Tensor, exact64: torch.Tensor) -> torch.Tensor:
    """|actual - exact| in units of the float32 spacing at the exact value."""
    rounded = exact64.to(torch.float32)
    spacing = (torch.nextafter(rounded.abs(), torch.tensor(float("inf"))) - rounded.abs()).double()
    return (actual.double() - exact64).abs() / spacing


@pytest.mark.parametrize("layer", [bnkit.BatchNorm1d, nn.BatchNorm1d])
def test_float32_mean_and_variance_within_one_ulp_of_the_float64_statistics(layer):
    data = _batches()
    model = nn.Sequential(layer(16))
    bnkit.recalibrate(model, data)
    x64 = torch.cat(data).double()
    var64, mean64 = torch.var_mean(x64, dim=0, correction=1)
    assert _ulps(model[0].running_mean, mean64).max() <= 1.0
    assert _ulps(model[0].running_var, var64).max() <= 1.0
    # The check can fail: float32 per-batch moments merged in float64 (the former accumulation) miss it.
    total = Moments(0, torch.zeros(16, dtype=torch.float64), torch.zeros(16, dtype=torch.float64))
    for x in data:
        m = Moments.of(x, [0])
        total = merge(total, Moments(m.count, m.mean.double(), m.m2.double()))
    assert _ulps(total.mean.float(), mean64).max() > 1.0


def _model(nonfinite=None):
    kw = {} if nonfinite is None else {"nonfinite": nonfinite}
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 5), bnkit.BatchNorm1d(5, **kw), nn.ReLU(), nn.Linear(5, 3),
                         nn.BatchNorm1d(3), bnkit.BatchRenorm1d(3, **kw))


def _data_with_bad_batch(bad_value):
    data = _batches(k=5, n=12, c=4, seed=1, dtype=torch.float32)
    bad = data[2].clone()
    bad[3, 1] = bad_value
    return data[:2] + [bad] + data[3:], data[:2] + data[3:]


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_nonfinite_batch_is_left_out_with_one_warning_under_skip(bad_value):
    data, clean = _data_with_bad_batch(bad_value)
    model, oracle = _model(), _model()
    bnkit.recalibrate(oracle, clean)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bnkit.recalibrate(model, data)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "non-finite" in messages[0] and "batch(es) [2]" in messages[0], messages
    for name, m in model.named_modules():
        if hasattr(m, "running_mean") and m.running_mean is not None:
            ref = oracle.get_submodule(name)
            assert torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all()
            assert torch.equal(m.running_mean, ref.running_mean), name
            assert torch.equal(m.running_var, ref.running_var), name


def test_nonfinite_batch_raises_under_raise_and_changes_nothing():
    data, _ = _data_with_bad_batch(float("nan"))
    model = _model("raise")
    bnkit.recalibrate(model, data[:2])  # something non-default in the buffers
    model.train()
    before = snapshot(model)
    with pytest.raises(FloatingPointError, match="batch 2 gives non-finite statistics"):
        bnkit.recalibrate(model, data)
    assert_state_unchanged(model, before)
    assert all(m.training for m in model.modules())
    assert model[1].nonfinite == "raise" and model[1].momentum == 0.1


def test_nonfinite_batch_propagates_under_propagate():
    data, _ = _data_with_bad_batch(float("nan"))
    model = _model("propagate")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bnkit.recalibrate(model, data)
    warned = [str(w.message) for w in caught if "finite" in str(w.message)]
    # Only the torch layer (no policy: counted as "skip") leaves the batch out.
    assert len(warned) == 1 and "1 layer(s) under nonfinite='skip': 4: batch(es) [2]" in warned[0], warned
    assert torch.isnan(model[1].running_mean).any() and torch.isnan(model[5].running_mean).any()
    assert torch.isfinite(model[4].running_mean).all()


def test_fewer_batches_than_num_batches_raises_and_says_how_many():
    data = _batches(k=3, n=8, c=4)
    model = nn.Sequential(bnkit.BatchNorm1d(4), nn.BatchNorm1d(4))
    before = snapshot(model)
    with pytest.raises(bnkit.NotEnoughBatchesError, match=r"num_batches=5 but the data yielded only 3 batch"):
        bnkit.recalibrate(model, iter(data), num_batches=5)
    assert_state_unchanged(model, before)
    with pytest.raises(ValueError):  # NotEnoughBatchesError is a ValueError
        bnkit.recalibrate(model, data, num_batches=4)


def test_num_batches_none_uses_every_batch_and_k_uses_the_first_k():
    data = _batches(k=6, n=8, c=4)
    all_, first = nn.Sequential(bnkit.BatchNorm1d(4)), nn.Sequential(bnkit.BatchNorm1d(4))
    bnkit.recalibrate(all_, iter(data), num_batches=None)
    bnkit.recalibrate(first, iter(data), num_batches=4)
    for m, part in ((all_, data), (first, data[:4])):
        var, mean = torch.var_mean(torch.cat(part).double(), dim=0, correction=1)
        assert _ulps(m[0].running_mean, mean).max() <= 1.0
        assert _ulps(m[0].running_var, var).max() <= 1.0
    exact = copy.deepcopy(all_)
    bnkit.recalibrate(exact, data, num_batches=6)
    assert torch.equal(exact[0].running_mean, all_[0].running_mean)
