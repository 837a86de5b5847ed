"""bnkit.preserve_stats: forwards inside leave every BN buffer bitwise as it was.

Oracle: an untouched deep copy of the model doing the same forwards outside
the context manager (same outputs inside; same state and next step after).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bnkit


class Mixed(nn.Module):
    """torch and bnkit BN layers of every kind, so that every buffer layout is covered."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64)
        self.t2d = nn.BatchNorm2d(4, dtype=torch.float64)
        self.b2d = bnkit.BatchNorm2d(4, momentum=None, dtype=torch.float64)
        self.renorm = bnkit.BatchRenorm2d(4, warmup_steps=0, r_max_steps=2, d_max_steps=2, dtype=torch.float64)
        self.ghost = bnkit.GhostBatchNorm2d(4, virtual_batch_size=2, dtype=torch.float64)
        self.shared = bnkit.SharedBatchNorm(4, sites=2, dtype=torch.float64)
        self.frozen = bnkit.FrozenBatchNorm2d(4, dtype=torch.float64)
        self.t1d = nn.BatchNorm1d(4, momentum=None, dtype=torch.float64)

    def forward(self, x):
        x = self.conv(x)
        x = self.frozen(self.ghost(self.renorm(self.b2d(self.t2d(x)))))
        x = self.shared(x, site=0) + self.shared(x, site=1)
        return self.t1d(x.mean((2, 3)))


def _state(model):
    return {k: (v, v.clone()) for k, v in model.state_dict(keep_vars=True).items()}


def _assert_bitwise(model, state):
    now = model.state_dict(keep_vars=True)
    assert list(now) == list(state)
    for k, (obj, value) in state.items():
        assert now[k] is obj, f"{k} is another tensor object"
        assert now[k].dtype == value.dtype and torch.equal(now[k], value), f"{k} changed"


def _inputs(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) * (1 + i) for i in range(k)]


def _warm(model):
    model.train()
    with torch.no_grad():
        for x in _inputs(3, seed=7):
            model(x)
    return model


def test_every_buffer_bitwise_unchanged_and_outputs_as_without_it():
    torch.manual_seed(0)
    model = _warm(Mixed())
    twin = copy.deepcopy(model)
    untouched = copy.deepcopy(model)
    state = _state(model)
    modes = [m.training for m in model.modules()]
    with torch.no_grad():
        with bnkit.preserve_stats(model) as same:
            assert same is model
            inside = [model(x) for x in _inputs(3)]
        outside = [twin(x) for x in _inputs(3)]  # the oracle: the same forwards, buffers updated
    for a, b in zip(inside, outside):
        assert torch.equal(a, b)
    assert [m.training for m in model.modules()] == modes
    _assert_bitwise(model, state)
    assert int(twin.t2d.num_batches_tracked) == 6 and int(model.t2d.num_batches_tracked) == 3  # the check can fail
    # The next training step is the one the model would have taken without the block.
    x = _inputs(1, seed=11)[0]
    with torch.no_grad():
        assert torch.equal(model(x), untouched(x))
    for k, v in untouched.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_gradients_inside_are_those_of_a_normal_training_step():
    torch.manual_seed(1)
    model = _warm(Mixed())
    twin = copy.deepcopy(model)
    x = _inputs(1, seed=3)[0]
    with bnkit.preserve_stats(model):
        model(x).square().sum().backward()
    twin(x).square().sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(p.grad, q.grad), n


def test_restores_on_exception():
    model = _warm(Mixed())
    state = _state(model)
    with pytest.raises(ZeroDivisionError):
        with bnkit.preserve_stats(model):
            model(_inputs(1)[0])
            raise ZeroDivisionError("inside the block")
    _assert_bitwise(model, state)


def test_nested_levels_restore_their_own_entry_state():
    model = _warm(Mixed())
    outer_state = _state(model)
    xs = _inputs(3)
    with torch.no_grad(), bnkit.preserve_stats(model):
        model(xs[0])
        inner_state = {k: (o, v.clone()) for k, (o, v) in _state(model).items()}
        assert not torch.equal(model.t2d.running_mean, outer_state["t2d.running_mean"][1])
        with bnkit.preserve_stats(model):
            model(xs[1])
            model(xs[2])
        _assert_bitwise(model, inner_state)
    _assert_bitwise(model, outer_state)


def test_eval_mode_and_torch_only_models():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)).eval()
    state = _state(model)
    with bnkit.preserve_stats(model):
        model.train()  # a probe may switch modes inside; the buffers still come back
        model(torch.randn(8, 3))
        model.eval()
    _assert_bitwise(model, state)
    with pytest.raises(TypeError, match="nn.Module"):
        with bnkit.preserve_stats([model]):
            pass


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(min_value=2, max_value=6), min_size=1, max_size=4), st.booleans())
def test_any_sequence_of_training_forwards_is_undone(batch_sizes, channels_last):
    torch.manual_seed(2)
    model = nn.Sequential(nn.BatchNorm2d(3), bnkit.BatchNorm2d(3), bnkit.BatchRenorm2d(3, schedule="fixed"))
    state = _state(model)
    g = torch.Generator().manual_seed(sum(batch_sizes))
    with torch.no_grad(), bnkit.preserve_stats(model):
        for n in batch_sizes:
            x = torch.randn(n, 3, 2, 2, generator=g)
            model(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    _assert_bitwise(model, state)


def test_each_block_restores_its_own_entry_state_with_reused_copies():
    """A block keeps its copies for the next one (no allocation at entry): they hold the next block's entry values."""
    model = _warm(Mixed())
    xs = _inputs(4, seed=3)
    for i in range(3):
        with torch.no_grad():
            model(xs[i])  # a real step between the blocks moves the buffers
        state = _state(model)
        with torch.no_grad(), bnkit.preserve_stats(model):
            model(xs[3])
        _assert_bitwise(model, state)


def test_a_block_under_inference_mode_then_one_outside():
    model = nn.Sequential(nn.BatchNorm2d(3), bnkit.BatchNorm2d(3))
    xs = _inputs(2, seed=4)
    state = _state(model)
    with torch.inference_mode(), bnkit.preserve_stats(model):
        model(xs[0].float()[:, :3])
    _assert_bitwise(model, state)
    with torch.no_grad(), bnkit.preserve_stats(model):  # the inference-mode copies are not reused here
        model(xs[1].float()[:, :3])
    _assert_bitwise(model, state)


def test_the_kept_copies_go_with_their_model():
    """The copies kept for the next block are held per buffer, weakly: a model that is gone leaves none behind."""
    import gc

    from bnkit.tools import _spares

    gc.collect()  # earlier tests' dead models give their entries back now, not during this test
    before = len(_spares._COPIES._entries)
    model = nn.Sequential(nn.BatchNorm2d(3), bnkit.BatchNorm2d(3))
    with bnkit.preserve_stats(model):
        model(torch.randn(4, 3, 2, 2))
    assert len(_spares._COPIES._entries) == before + 6  # running_mean, running_var, num_batches_tracked of each
    del model
    gc.collect()
    assert len(_spares._COPIES._entries) == before
