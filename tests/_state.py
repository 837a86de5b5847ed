"""Helpers for tests that check a module's state is untouched by a failing call."""

from __future__ import annotations


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_state_unchanged(module, before):
    after = module.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert k in after and after[k].equal(before[k]), f"{k} changed"


def state_equal(module, before) -> bool:
    """Whether ``module``'s state_dict is bit for bit the ``snapshot`` taken before."""
    after = module.state_dict()
    return after.keys() == before.keys() and all(after[k].equal(before[k]) for k in before)


def with_running_stats(model, x, steps=3):
    """``model`` in eval mode after a few training-mode forwards on slices of ``x``: BN layers with
    non-default running statistics."""
    import torch

    model.train()
    with torch.no_grad():
        for i in range(steps):
            model(x[i::steps])
    return model.eval()
