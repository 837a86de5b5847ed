"""tiny_batch: a training batch with one value per channel raises (torch) or uses the running statistics.

Oracle: torch's layer (the error; and in eval mode, the output and gradients
for the same state) and the layer's own state before the call.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import bnkit

from _state import assert_state_unchanged, snapshot

CASES = [
    (bnkit.BatchNorm1d, nn.BatchNorm1d, (1, 4), {}),
    (bnkit.BatchNorm1d, nn.BatchNorm1d, (1, 4, 1), {}),
    (bnkit.BatchNorm2d, nn.BatchNorm2d, (1, 4, 1, 1), {}),
    (bnkit.BatchRenorm1d, nn.BatchNorm1d, (1, 4), {}),
]


def _warmed(cls, torch_cls, kw):
    torch.manual_seed(0)
    ours, theirs = cls(4, **kw), torch_cls(4)
    with torch.no_grad():
        for p in (ours.weight, theirs.weight):
            p.copy_(torch.linspace(0.5, 2.0, 4))
    x = torch.randn(16, 4) * 3 + 1
    ours(x if cls is not bnkit.BatchNorm2d else x[..., None, None])
    with torch.no_grad():
        theirs.running_mean.copy_(ours.running_mean)
        theirs.running_var.copy_(ours.running_var)
    return ours, theirs


@pytest.mark.parametrize("cls,torch_cls,shape,kw", CASES)
def test_default_raises_like_torch(cls, torch_cls, shape, kw):
    ours, theirs = _warmed(cls, torch_cls, kw)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        theirs(torch.randn(shape))
    before = snapshot(ours)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ours(torch.randn(shape))
    assert_state_unchanged(ours, before)


@pytest.mark.parametrize("cls,torch_cls,shape,kw", CASES)
def test_running_policy_normalizes_with_running_statistics_without_updating(cls, torch_cls, shape, kw):
    ours, theirs = _warmed(cls, torch_cls, dict(kw, tiny_batch="running"))
    assert "tiny_batch='running'" in repr(ours)
    before = snapshot(ours)
    x = torch.randn(shape, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = ours(x)
    assert len([w for w in caught if "one value per channel" in str(w.message)]) == 1
    assert ours.training
    assert_state_unchanged(ours, before)
    expected = theirs.eval()(x2)
    torch.testing.assert_close(y, expected)
    y.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)


def test_running_policy_leaves_normal_batches_alone():
    ours = bnkit.BatchNorm1d(4, tiny_batch="running")
    ref = bnkit.BatchNorm1d(4)
    x = torch.randn(2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(ours(x), ref(x))
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    renorm, renorm_ref = bnkit.BatchRenorm1d(4, tiny_batch="running"), bnkit.BatchRenorm1d(4)
    for _ in range(3):
        x = torch.randn(5, 4) * 2 + 1
        torch.testing.assert_close(renorm(x), renorm_ref(x))
    assert torch.equal(renorm.running_var, renorm_ref.running_var)


def test_running_policy_channels_last_generic_layer():
    ours = bnkit.BatchNorm(4, axis=-1, tiny_batch="running")
    ours(torch.randn(8, 3, 4))
    before = snapshot(ours)
    with pytest.warns(RuntimeWarning, match="one value per channel"):
        y = ours(torch.randn(1, 1, 4))
    x = torch.randn(1, 1, 4)
    with pytest.warns(RuntimeWarning, match="one value per channel"):
        y_train = ours.train()(x)
    torch.testing.assert_close(y_train, ours.eval()(x))
    assert y.shape == (1, 1, 4)
    assert_state_unchanged(ours, before)


def test_bad_policy_values():
    with pytest.raises(ValueError, match="tiny_batch must be one of"):
        bnkit.BatchNorm1d(4, tiny_batch="skip")
    with pytest.raises(ValueError, match="needs running statistics"):
        bnkit.BatchNorm1d(4, tiny_batch="running", track_running_stats=False)
