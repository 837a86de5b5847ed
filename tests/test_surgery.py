"""The one module-surgery helper (bnkit.surgery.replace_modules) as convert, freeze and convert_sync_batchnorm use it.

Oracles: the model before the change (its outputs, its tensors, its hooks),
and torch's own layers.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnkit
from bnkit.surgery import replace_modules


def _model_with_shared_bn():
    bn = nn.BatchNorm1d(4)
    return nn.Sequential(nn.Linear(3, 4), bn, nn.ReLU(), nn.Linear(4, 4), bn), bn


@pytest.mark.parametrize("tool", ["convert", "freeze", "sync"])
def test_shared_layer_stays_shared_and_hooks_follow(tool):
    model, bn = _model_with_shared_bn()
    model(torch.randn(8, 3))  # running statistics to freeze
    model.eval()
    calls = []
    handle = bn.register_forward_hook(lambda m, i, o: calls.append(type(m)))
    x = torch.randn(5, 3)
    expected = model(x)
    calls.clear()
    if tool == "convert":
        out = bnkit.convert(model, inplace=True)
    elif tool == "freeze":
        out = bnkit.freeze(model)
    else:
        out = bnkit.convert_sync_batchnorm(model)
    assert out is model and out[1] is out[4] and out[1] is not bn  # replaced once, still shared
    torch.testing.assert_close(out(x), expected)
    assert calls == [type(out[1])] * 2  # the hook moved to the replacement
    handle.remove()  # ... and its handle still removes it
    out(x)
    assert len(calls) == 2


def test_convert_sync_batchnorm_checks_everything_before_changing_anything():
    good = nn.BatchNorm2d(3)
    model = nn.Sequential(good, nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match="not initialized"):
        bnkit.convert_sync_batchnorm(model)
    assert model[0] is good and type(model[0]) is nn.BatchNorm2d


def test_replace_modules_root_and_build_returning_the_module():
    relu = nn.ReLU()
    assert replace_modules(relu, lambda m: isinstance(m, nn.ReLU), lambda m, name: nn.Tanh()).__class__ is nn.Tanh
    seen = []
    model = nn.Sequential(nn.ReLU(), nn.Sequential(nn.ReLU()))
    same = replace_modules(model, lambda m: isinstance(m, nn.ReLU), lambda m, name: seen.append(name) or m)
    assert same is model and seen == ["0", "1.0"] and isinstance(model[1][0], nn.ReLU)
