"""Edges of BN statistics in training loops: masked BN, accumulate_stats, checkpointing, preserve_stats, tiny batches.

Oracles (never bnkit's own code): torch's BN layers on the gathered valid entries
or on the concatenated micro-batches, float64 formulas written out by hand, the
same step without the tool (a deep copy run plainly), and torch's own
``torch.utils.checkpoint`` behaviour on torch's layers.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import bnkit

D = torch.float64
TIGHT = {"rtol": 1e-10, "atol": 1e-12}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _state(model):
    """Every parameter and buffer: (the tensor object, a copy of its value)."""
    return {k: (v, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()}


def _assert_bitwise(model, state):
    now = model.state_dict(keep_vars=True)
    assert list(now) == list(state)
    for k, (obj, value) in state.items():
        assert now[k] is obj, f"{k}: another tensor object"
        assert now[k].dtype == value.dtype and torch.equal(now[k].detach(), value), f"{k} changed"


def _assert_same_buffers(a, b, **tol):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        if sa[k].dtype.is_floating_point:
            torch.testing.assert_close(sa[k], sb[k], **(tol or TIGHT), msg=k)
        else:
            assert torch.equal(sa[k], sb[k]), k


def _hand_update(running_mean, running_var, data, factor):
    """torch's rule, by hand in float64: data is (n, C), the unbiased variance goes into running_var."""
    data = data.double()
    return (1 - factor) * running_mean.double() + factor * data.mean(0), \
        (1 - factor) * running_var.double() + factor * data.var(0, unbiased=True)


# =========================================================================== masked BN
def _masks(n, length, seed):
    """Masks of every memory layout, each with one all-False row and one row with two valid entries."""
    g = _gen(seed)
    base = torch.rand(n, length, generator=g) > 0.4
    base[0] = False  # a fully padded sequence
    base[1, :2] = True
    expanded_row = torch.rand(1, length, generator=g) > 0.3
    expanded_row[0, :2] = True
    transposed = base.t().contiguous().t()
    wide = torch.zeros(n, 2 * length, dtype=torch.bool)
    wide[:, ::2] = base
    return {
        "contiguous": base,
        "expanded": expanded_row.expand(n, length),  # stride 0 along the batch
        "transposed": transposed,                    # column-major
        "strided": wide[:, ::2],                     # every other column of a wider mask
    }


@pytest.mark.parametrize("mask_kind", ["contiguous", "expanded", "transposed", "strided"])
@pytest.mark.parametrize("layout", ["ncl", "ncl_from_nlc", "ncl_strided"])
def test_masked_any_mask_and_input_layout_matches_torch_on_the_valid_rows(backend, mask_kind, layout):
    n, c, length = 5, 3, 6
    mask = _masks(n, length, seed=1)[mask_kind]
    g = _gen(2)
    if layout == "ncl":
        x = torch.randn(n, c, length, generator=g, dtype=D)
    elif layout == "ncl_from_nlc":  # (N, L, C) memory seen as (N, C, L): channels innermost
        x = torch.randn(n, length, c, generator=g, dtype=D).transpose(1, 2)
    else:
        x = torch.randn(n, c, 2 * length, generator=g, dtype=D)[:, :, ::2]
    ours = bnkit.BatchNorm1d(c, momentum=0.3, dtype=D)
    with torch.no_grad():
        ours.weight.copy_(torch.tensor([0.5, 1.5, -2.0], dtype=D))
        ours.bias.copy_(torch.tensor([0.1, -0.2, 0.3], dtype=D))
    ref = nn.BatchNorm1d(c, momentum=0.3, dtype=D)
    ref.load_state_dict(ours.state_dict())
    xa = x.detach().clone().requires_grad_()
    y = ours(xa, mask)
    gy = torch.randn(y.shape, generator=g, dtype=D)
    y.backward(gy)
    xb = x.detach().clone().requires_grad_()
    rows = xb.transpose(1, 2)[mask]
    y_ref = ref(rows)
    y_ref.backward(gy.transpose(1, 2)[mask])
    torch.testing.assert_close(y.transpose(1, 2)[mask], y_ref, **TIGHT)
    torch.testing.assert_close(xa.grad.transpose(1, 2)[mask], xb.grad.transpose(1, 2)[mask], **TIGHT)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **TIGHT)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, **TIGHT)
    _assert_same_buffers(ours, ref)
    # Padded entries: normalized with the valid statistics, their gradient local (statistics held constant).
    valid = rows.detach()
    std = torch.sqrt(valid.var(0, unbiased=False) + ours.eps)
    mean = valid.mean(0)
    w, b = ours.weight.detach(), ours.bias.detach()
    torch.testing.assert_close(y.transpose(1, 2)[~mask], (x.transpose(1, 2)[~mask] - mean) / std * w + b, **TIGHT)
    torch.testing.assert_close(xa.grad.transpose(1, 2)[~mask], gy.transpose(1, 2)[~mask] * w / std, **TIGHT)


@pytest.mark.parametrize("dims", [2, 3])
def test_masked_channels_last_matches_torch_on_the_valid_rows(backend, dims):
    g = _gen(3)
    if dims == 2:
        x = torch.randn(3, 4, 3, 5, generator=g, dtype=D).to(memory_format=torch.channels_last)
        mask = torch.rand(3, 3, 5, generator=g) > 0.5
        ours, to_rows = bnkit.BatchNorm2d(4, dtype=D), (lambda t: t.permute(0, 2, 3, 1))
    else:
        x = torch.randn(2, 4, 2, 3, 2, generator=g, dtype=D).to(memory_format=torch.channels_last_3d)
        mask = torch.rand(2, 2, 3, 2, generator=g) > 0.5
        ours, to_rows = bnkit.BatchNorm3d(4, dtype=D), (lambda t: t.permute(0, 2, 3, 4, 1))
    mask.view(-1)[:2] = True
    ref = nn.BatchNorm1d(4, dtype=D)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = ours(xa, mask)
    gy = torch.randn(y.shape, generator=g, dtype=D)
    y.backward(gy)
    y_ref = ref(to_rows(xb)[mask])
    y_ref.backward(to_rows(gy)[mask])
    torch.testing.assert_close(to_rows(y)[mask], y_ref, **TIGHT)
    torch.testing.assert_close(to_rows(xa.grad)[mask], to_rows(xb.grad)[mask], **TIGHT)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **TIGHT)
    _assert_same_buffers(ours, ref)
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    assert y.is_contiguous(memory_format=fmt)


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 5), length=st.integers(1, 6), c=st.integers(1, 4), channels_last=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_masked_property_valid_outputs_and_running_stats_are_torch_on_valid_rows(n, length, c, channels_last, seed):
    g = _gen(seed)
    mask = torch.rand(n, length, generator=g) > 0.5
    if int(mask.sum()) < 2:
        mask.view(-1)[: min(2, mask.numel())] = True
    if int(mask.sum()) < 2:
        return  # one position in all: no batch statistics (another test)
    x = torch.randn(n, length, c, generator=g, dtype=D) * 3 + 1
    x = x.transpose(1, 2) if channels_last else x.transpose(1, 2).contiguous()
    ours, ref = bnkit.BatchNorm1d(c, momentum=None, dtype=D), nn.BatchNorm1d(c, momentum=None, dtype=D)
    for _ in range(2):
        y = ours(x, mask)
        y_ref = ref(x.transpose(1, 2)[mask])
    torch.testing.assert_close(y.transpose(1, 2)[mask], y_ref, **TIGHT)
    _assert_same_buffers(ours, ref)


def test_masked_generic_axis_layers_match_torch_on_the_valid_rows():
    g = _gen(4)
    cases = [
        (bnkit.BatchNorm(3, axis=-1, dtype=D), torch.randn(2, 3, 4, 3, generator=g, dtype=D), lambda t: t),
        (bnkit.BatchNorm(3, axis=0, dtype=D), torch.randn(3, 5, 2, generator=g, dtype=D), lambda t: t.permute(1, 2, 0)),
        (bnkit.BatchNorm(3, axis=-1, dtype=D), torch.randn(7, 3, generator=g, dtype=D), lambda t: t),
    ]
    for ours, x, to_rows in cases:
        mask_shape = to_rows(x).shape[:-1]
        mask = torch.rand(mask_shape, generator=g) > 0.4
        mask.view(-1)[:2] = True
        ref = nn.BatchNorm1d(3, dtype=D)
        y = ours(x, mask)
        torch.testing.assert_close(to_rows(y)[mask], ref(to_rows(x)[mask]), **TIGHT)
        _assert_same_buffers(ours, ref)


def test_masked_sequence_with_empty_batches_and_cumulative_average_as_torch():
    """All-padding batches count in num_batches_tracked (torch counts an empty batch), so the average shifts."""
    g = _gen(5)
    ours, ref = bnkit.BatchNorm1d(3, momentum=None, dtype=D), nn.BatchNorm1d(3, momentum=None, dtype=D)
    for step in range(4):
        x = torch.randn(3, 3, 4, generator=g, dtype=D) * (step + 1)
        mask = torch.zeros(3, 4, dtype=torch.bool) if step in (0, 2) else torch.rand(3, 4, generator=g) > 0.3
        if step not in (0, 2):
            mask[0, :2] = True
        ours(x, mask)
        ref(x.transpose(1, 2)[mask])
    _assert_same_buffers(ours, ref)
    assert int(ours.num_batches_tracked) == 4


def test_masked_all_padding_gives_bias_and_no_gradient_to_the_input():
    bn = bnkit.BatchNorm1d(3, dtype=D)
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([1.0, 2.0, 3.0], dtype=D))
        bn.weight.fill_(2.0)
    x = torch.randn(2, 3, 4, dtype=D, requires_grad=True)
    y = bn(x, torch.zeros(2, 4, dtype=torch.bool))
    torch.testing.assert_close(y, bn.bias.detach().view(1, 3, 1).expand(2, 3, 4), rtol=0, atol=0)
    y.sum().backward()
    assert x.grad is None or torch.count_nonzero(x.grad) == 0
    assert torch.equal(bn.running_mean, torch.zeros(3, dtype=D)) and int(bn.num_batches_tracked) == 1


def test_masked_without_running_stats_in_training_is_torch_on_valid_rows():
    g = _gen(6)
    x = torch.randn(4, 3, 5, generator=g, dtype=D)
    mask = torch.rand(4, 5, generator=g) > 0.4
    mask[0, :2] = True
    ours = bnkit.BatchNorm1d(3, track_running_stats=False, dtype=D)
    ref = nn.BatchNorm1d(3, track_running_stats=False, dtype=D)
    for mode in ("train", "eval"):
        getattr(ours, mode)()
        torch.testing.assert_close(ours(x, mask).transpose(1, 2)[mask], ref(x.transpose(1, 2)[mask]), **TIGHT)


def test_masked_one_valid_entry_per_channel_raises_like_torch_and_changes_nothing():
    x = torch.randn(2, 3, 2, 2, dtype=D)
    mask = torch.zeros(2, 2, 2, dtype=torch.bool)
    mask[1, 0, 1] = True
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nn.BatchNorm1d(3, dtype=D)(x.permute(0, 2, 3, 1)[mask])  # the oracle: torch raises a ValueError
    for momentum in (0.1, None):
        bn = bnkit.BatchNorm2d(3, momentum=momentum, dtype=D)
        state = _state(bn)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            bn(x, mask)
        _assert_bitwise(bn, state)


@pytest.mark.parametrize("training", [True, False])
def test_masked_bad_masks_raise_the_documented_types_before_any_change(training):
    bn = bnkit.BatchNorm1d(3, momentum=None, dtype=D).train(training)
    bn(torch.randn(6, 3, 4, dtype=D), torch.ones(6, 4, dtype=torch.bool)) if training else None
    x = torch.randn(5, 3, 4, dtype=D)
    good = torch.ones(5, 4, dtype=torch.bool)
    bad = [
        (good.long(), TypeError, "torch.bool"),
        (good.float(), TypeError, "torch.bool"),
        (good.to(torch.uint8), TypeError, "torch.bool"),
        (good.tolist(), TypeError, "mask"),
        (torch.ones(5, 1, dtype=torch.bool), ValueError, r"\(5, 4\)"),
        (torch.ones(5, 3, 4, dtype=torch.bool), ValueError, r"\(5, 4\)"),
        (torch.ones(4, 5, dtype=torch.bool), ValueError, r"\(5, 4\)"),
        (torch.ones(5, 4, dtype=torch.bool, device="meta"), RuntimeError, "device"),
    ]
    for mask, error, match in bad:
        state = _state(bn)
        with pytest.raises(error, match=match):
            bn(x, mask)
        _assert_bitwise(bn, state)


# =========================================================================== accumulate_stats
class TwoKinds(nn.Module):
    """bnkit and torch BN layers on channels-last 4-D data and on 2-D data (float64)."""

    def __init__(self, momentum):
        super().__init__()
        self.ours2d = bnkit.BatchNorm2d(3, momentum=momentum, dtype=D)
        self.theirs2d = nn.BatchNorm2d(3, momentum=momentum, dtype=D)
        self.ours1d = bnkit.BatchNorm1d(3, momentum=momentum, dtype=D)
        self.theirs1d = nn.BatchNorm1d(3, momentum=momentum, dtype=D)

    def forward(self, x):
        a = self.theirs2d(self.ours2d(x) * 2 + 1)
        return self.theirs1d(self.ours1d(a.mean((2, 3))) * 3 - 1)


def _seen_inputs(model, parts):
    """What each layer saw, computed with plain torch ops from the layers' (untouched) parameters: (n, C) rows."""
    model = copy.deepcopy(model)  # batch statistics only: BN in training normalizes with its batch
    seen = {name: [] for name in ("ours2d", "theirs2d", "ours1d", "theirs1d")}

    def bn(t, layer):
        dims = [0] + list(range(2, t.dim()))
        shape = [1, -1] + [1] * (t.dim() - 2)
        mean, var = t.mean(dims, keepdim=True), t.var(dims, unbiased=False, keepdim=True)
        return (t - mean) / torch.sqrt(var + layer.eps) * layer.weight.view(shape) + layer.bias.view(shape)

    with torch.no_grad():
        for x in parts:
            seen["ours2d"].append(x.permute(0, 2, 3, 1).reshape(-1, 3))
            a = bn(x, model.ours2d) * 2 + 1
            seen["theirs2d"].append(a.permute(0, 2, 3, 1).reshape(-1, 3))
            b = bn(a, model.theirs2d).mean((2, 3))
            seen["ours1d"].append(b)
            seen["theirs1d"].append(bn(b, model.ours1d) * 3 - 1)
    return {k: torch.cat(v) for k, v in seen.items()}


@pytest.mark.parametrize("momentum", [0.3, None])
def test_accumulate_unequal_channels_last_micro_batches_one_update_by_hand(momentum):
    torch.manual_seed(0)
    model = TwoKinds(momentum)
    with torch.no_grad():
        model(torch.randn(4, 3, 2, 2, dtype=D).to(memory_format=torch.channels_last))  # nbt 1, stats moved
    plain = copy.deepcopy(model)
    g = _gen(7)
    parts = [(torch.randn(n, 3, 2, 3, generator=g, dtype=D) * (i + 1) + i).to(memory_format=torch.channels_last)
             for i, n in enumerate((2, 5, 3))]
    entry = {k: (v.running_mean.clone(), v.running_var.clone()) for k, v in model.named_children()}
    seen = _seen_inputs(model, parts)
    with bnkit.accumulate_stats(model):
        for x in parts:
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = model(xa), plain(xb)
            torch.testing.assert_close(ya, yb, rtol=0, atol=0)  # normalized as without the block
            ya.square().sum().backward()
            yb.square().sum().backward()
            torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=0)
    factor = 0.3 if momentum is not None else 1 / 2
    for name, layer in model.named_children():
        mean, var = _hand_update(*entry[name], seen[name], factor)
        torch.testing.assert_close(layer.running_mean, mean, **TIGHT, msg=name)
        torch.testing.assert_close(layer.running_var, var, **TIGHT, msg=name)
        assert int(layer.num_batches_tracked) == 2, name
        assert layer.momentum == momentum and "forward" not in layer.__dict__


def test_accumulate_eval_layers_and_untracked_layers_inside_a_training_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        bnkit.BatchNorm1d(3, dtype=D), nn.BatchNorm1d(3, dtype=D),          # eval inside a training model
        bnkit.BatchNorm1d(3, track_running_stats=False, dtype=D), nn.BatchNorm1d(3, track_running_stats=False, dtype=D),
        bnkit.BatchNorm1d(3, momentum=None, dtype=D), nn.BatchNorm1d(3, momentum=None, dtype=D),
    )
    model[0].eval()
    model[1].eval()
    plain = copy.deepcopy(model)
    state = _state(model)
    parts = [torch.randn(n, 3, generator=_gen(n), dtype=D) for n in (4, 2, 7)]
    with bnkit.accumulate_stats(model):
        for x in parts:
            torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    for i in range(4):  # eval and untracked layers: not a bit changed
        for k in ("running_mean", "running_var", "num_batches_tracked"):
            key = f"{i}.{k}"
            if key in state:
                assert torch.equal(model.state_dict()[key], state[key][1]), key
    for i in (4, 5):  # momentum=None: the first step's factor 1/1, the whole step's statistics
        with torch.no_grad():
            seen = torch.cat([copy.deepcopy(model[:i])(x) for x in parts])
        torch.testing.assert_close(model[i].running_mean, seen.mean(0), **TIGHT)
        torch.testing.assert_close(model[i].running_var, seen.var(0), **TIGHT)
        assert int(model[i].num_batches_tracked) == 1


def test_accumulate_model_switched_to_eval_midway_counts_only_training_forwards():
    model = nn.Sequential(bnkit.BatchNorm1d(3, dtype=D), nn.BatchNorm1d(3, dtype=D))
    parts = [torch.randn(n, 3, generator=_gen(10 + n), dtype=D) for n in (5, 3, 6)]
    with torch.no_grad():
        seen0 = torch.cat([parts[0], parts[2]])
        scratch = copy.deepcopy(model[0])  # train-mode output: batch statistics
        seen1 = torch.cat([scratch(p) for p in (parts[0], parts[2])])
    with bnkit.accumulate_stats(model):
        model(parts[0])
        model.eval()
        model(parts[1])
        model.train()
        model(parts[2])
    for layer, seen in zip(model, (seen0, seen1)):
        mean, var = _hand_update(torch.zeros(3), torch.ones(3), seen, 0.1)
        torch.testing.assert_close(layer.running_mean, mean, **TIGHT)
        torch.testing.assert_close(layer.running_var, var, **TIGHT)
        assert int(layer.num_batches_tracked) == 1


def test_accumulate_masked_micro_batches_with_an_all_padding_one_is_one_update_over_the_valid_rows():
    g = _gen(8)
    parts = [torch.randn(n, 3, length, generator=g, dtype=D) for n, length in ((2, 5), (3, 4), (2, 6))]
    masks = [torch.rand(p.shape[0], p.shape[2], generator=g) > 0.4 for p in parts]
    for m in masks[:2]:
        m[0, :2] = True
    masks[2][:] = False
    for momentum in (0.2, None):
        bn = bnkit.BatchNorm1d(3, momentum=momentum, dtype=D)
        bn(torch.randn(4, 3, dtype=D))
        rm, rv = bn.running_mean.clone(), bn.running_var.clone()
        with bnkit.accumulate_stats(bn):
            for x, m in zip(parts, masks):
                bn(x, m)
        valid = torch.cat([x.transpose(1, 2)[m] for x, m in zip(parts, masks)])
        mean, var = _hand_update(rm, rv, valid, 0.2 if momentum is not None else 1 / 2)
        torch.testing.assert_close(bn.running_mean, mean, **TIGHT)
        torch.testing.assert_close(bn.running_var, var, **TIGHT)
        assert int(bn.num_batches_tracked) == 2
    bn = bnkit.BatchNorm1d(3, dtype=D)  # only padding in the whole step: an empty step, counted once
    with bnkit.accumulate_stats(bn):
        for x in parts:
            bn(x, torch.zeros(x.shape[0], x.shape[2], dtype=torch.bool))
    assert torch.equal(bn.running_mean, torch.zeros(3, dtype=D)) and torch.equal(bn.running_var, torch.ones(3, dtype=D))
    assert int(bn.num_batches_tracked) == 1


def test_accumulate_variants_are_one_update_over_the_step_by_hand():
    g = _gen(9)
    parts = [torch.randn(n, 3, generator=g, dtype=D) * 2 + 1 for n in (6, 4, 6)]
    zeros, ones = torch.zeros(3, dtype=D), torch.ones(3, dtype=D)
    ghost = bnkit.GhostBatchNorm1d(3, virtual_batch_size=2, dtype=D)
    with bnkit.accumulate_stats(ghost):
        for x in parts:
            ghost(x)
    mean, var = _hand_update(zeros, ones, torch.cat(parts), 0.1)
    torch.testing.assert_close(ghost.running_mean, mean, **TIGHT)
    torch.testing.assert_close(ghost.running_var, var, **TIGHT)
    assert int(ghost.num_batches_tracked) == 1

    shared = bnkit.SharedBatchNorm(3, sites=2, dtype=D)
    with bnkit.accumulate_stats(shared):
        shared(parts[0], site=0)
        shared(parts[1], site=1)
        shared(parts[2], site=0)
    for site, data in ((0, torch.cat([parts[0], parts[2]])), (1, parts[1])):
        mean, var = _hand_update(zeros, ones, data, 0.1)
        torch.testing.assert_close(shared.running_mean[site], mean, **TIGHT)
        torch.testing.assert_close(shared.running_var[site], var, **TIGHT)
    assert shared.num_batches_tracked.tolist() == [1, 1]

    domain_bn = bnkit.DomainBatchNorm1d(3, num_domains=2, dtype=D)
    labels = [torch.tensor([0, 1, 0, 1, 1, 0]), torch.tensor([0, 0, 1, 1]), torch.tensor([1, 1, 0, 0, 0, 1])]
    with bnkit.accumulate_stats(domain_bn):
        for x, d in zip(parts, labels):
            domain_bn(x, domain=d)
    every, every_label = torch.cat(parts), torch.cat(labels)
    for d in (0, 1):
        mean, var = _hand_update(zeros, ones, every[every_label == d], 0.1)
        torch.testing.assert_close(domain_bn.running_mean[d], mean, **TIGHT)
        torch.testing.assert_close(domain_bn.running_var[d], var, **TIGHT)


@pytest.mark.parametrize("cls", [bnkit.BatchNorm1d, nn.BatchNorm1d])
def test_accumulate_inner_block_that_raises_drops_only_its_micro_batches(cls):
    parts = [torch.randn(n, 3, generator=_gen(20 + n), dtype=D) for n in (5, 4, 6)]
    layer = cls(3, dtype=D)
    with bnkit.accumulate_stats(layer):
        layer(parts[0])
        with pytest.raises(KeyError):
            with bnkit.accumulate_stats(layer):
                layer(parts[1])
                raise KeyError("skip this micro-batch")
        layer(parts[2])
    mean, var = _hand_update(torch.zeros(3), torch.ones(3), torch.cat([parts[0], parts[2]]), 0.1)
    torch.testing.assert_close(layer.running_mean, mean, **TIGHT)
    torch.testing.assert_close(layer.running_var, var, **TIGHT)
    assert int(layer.num_batches_tracked) == 1 and layer.momentum == 0.1 and "forward" not in layer.__dict__


@pytest.mark.parametrize("cls", [bnkit.BatchNorm1d, nn.BatchNorm1d])
def test_accumulate_exception_leaves_every_buffer_and_attribute_as_at_entry(cls):
    layer = cls(3, momentum=None, dtype=D)
    layer(torch.randn(5, 3, dtype=D))
    state = _state(layer)
    with pytest.raises(RuntimeError, match="midway"):
        with bnkit.accumulate_stats(layer):
            layer(torch.randn(6, 3, dtype=D))
            layer(torch.randn(4, 3, dtype=D) * 5)
            raise RuntimeError("midway")
    _assert_bitwise(layer, state)
    assert layer.momentum is None and "forward" not in layer.__dict__
    # and the layer updates as usual afterwards (a torch twin as the oracle)
    twin = nn.BatchNorm1d(3, momentum=None, dtype=D)
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(7, 3, dtype=D)
    layer(x)
    twin(x)
    _assert_same_buffers(layer, twin)


def test_accumulate_torch_layer_cumulative_average_without_num_batches_tracked():
    layer = nn.BatchNorm1d(3, momentum=None, dtype=D)
    layer.num_batches_tracked = None  # torch's factor is then 0: the running statistics never move
    oracle = copy.deepcopy(layer)
    parts = [torch.randn(n, 3, generator=_gen(n), dtype=D) for n in (4, 6)]
    for x in parts:
        oracle(x)
    with bnkit.accumulate_stats(layer):
        for x in parts:
            layer(x)
    _assert_same_buffers(layer, oracle)
    assert layer.momentum is None


def test_accumulate_copy_made_inside_the_block_is_the_layer_as_outside():
    model = nn.Sequential(nn.Linear(3, 3, dtype=D), nn.BatchNorm1d(3, dtype=D), bnkit.BatchNorm1d(3, dtype=D))
    model(torch.randn(8, 3, dtype=D))
    outside = copy.deepcopy(model)  # the oracle: the copy an EMA / checkpoint would take between steps
    with bnkit.accumulate_stats(model):
        model(torch.randn(8, 3, dtype=D))
        inside = copy.deepcopy(model)  # e.g. AveragedModel(model) created at the first step
    for i in (1, 2):
        assert inside[i].momentum == outside[i].momentum
        assert "forward" not in inside[i].__dict__
    _assert_same_buffers(inside, outside, rtol=0, atol=0)


# =========================================================================== activation checkpointing
def _ckpt_model(momentum):
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(4, 5, dtype=D), nn.BatchNorm1d(5, momentum=momentum, dtype=D), nn.ReLU(),
        nn.Linear(5, 5, dtype=D), bnkit.BatchNorm1d(5, momentum=momentum, dtype=D), nn.Tanh(),
        nn.Linear(5, 3, dtype=D), nn.BatchNorm1d(3, momentum=momentum, dtype=D),
    )


def _run(model, variant, x):
    if variant == "plain":
        return model(x)
    if variant in ("reentrant", "non-reentrant"):
        return checkpoint(model, x, use_reentrant=variant == "reentrant")
    if variant == "nested":
        def outer(t):
            return checkpoint(model[3:], model[:3](t), use_reentrant=False)
        return checkpoint(outer, x, use_reentrant=False)
    if variant == "nested-mixed":
        def outer(t):
            return checkpoint(model[3:], model[:3](t), use_reentrant=True)
        return checkpoint(outer, x, use_reentrant=False)
    if variant == "sequential":
        return checkpoint_sequential(model, 3, x, use_reentrant=False)
    raise AssertionError(variant)


def test_torch_checkpoint_double_update_is_what_checkpoint_safe_undoes():
    """The oracle for what goes wrong: torch's layers count a checkpointed step twice without the hooks."""
    for use_reentrant in (True, False):
        layer = nn.BatchNorm1d(3, dtype=D)
        x = torch.randn(6, 3, dtype=D, requires_grad=True)
        checkpoint(layer, x, use_reentrant=use_reentrant).sum().backward()
        assert int(layer.num_batches_tracked) == 2
        guarded = nn.BatchNorm1d(3, dtype=D)
        with bnkit.checkpoint_safe(guarded):
            checkpoint(guarded, x, use_reentrant=use_reentrant).sum().backward()
        once = nn.BatchNorm1d(3, dtype=D)
        once(x)
        _assert_same_buffers(guarded, once, rtol=0, atol=0)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("variant", ["reentrant", "non-reentrant", "nested", "nested-mixed", "sequential"])
def test_checkpointed_mixed_model_step_equals_the_plain_step(variant, momentum):
    plain, ours = _ckpt_model(momentum), _ckpt_model(momentum)
    handles = [bnkit.checkpoint_safe(ours), bnkit.checkpoint_safe(ours)]  # registered twice: still one update
    g = _gen(30)
    for _ in range(3):
        x = torch.randn(8, 4, generator=g, dtype=D)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = _run(plain, "plain", xa), _run(ours, variant, xb)
        gy = torch.randn(ya.shape, generator=g, dtype=D)
        ya.backward(gy)
        yb.backward(gy)
        torch.testing.assert_close(yb, ya, rtol=0, atol=0)
        torch.testing.assert_close(xb.grad, xa.grad, rtol=0, atol=0)
    for p, q in zip(ours.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    _assert_same_buffers(ours, plain, rtol=0, atol=0)
    assert [int(ours[i].num_batches_tracked) for i in (1, 4, 7)] == [3, 3, 3]
    for h in handles:
        h.remove()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in ours.modules())


def test_checkpoint_safe_with_eval_and_untracked_torch_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(3, dtype=D), nn.BatchNorm1d(3, track_running_stats=False, dtype=D),
                          bnkit.BatchNorm1d(3, dtype=D), nn.BatchNorm1d(3, momentum=None, dtype=D))
    model[0].eval()
    plain = copy.deepcopy(model)
    with bnkit.checkpoint_safe(model):
        for use_reentrant in (True, False):
            x = torch.randn(6, 3, dtype=D)
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            checkpoint(model, xa, use_reentrant=use_reentrant).pow(3).sum().backward()
            plain(xb).pow(3).sum().backward()
            torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=0)
    _assert_same_buffers(model, plain, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [bnkit.BatchNorm1d, nn.BatchNorm1d])
def test_checkpoint_double_backward_gradient_penalty_updates_once(cls):
    """Non-reentrant checkpointing with create_graph=True (a gradient penalty): second-order grads as without it."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 6, dtype=D), cls(6, dtype=D), nn.Tanh(), nn.Linear(6, 1, dtype=D))
    plain = copy.deepcopy(net)
    x = torch.randn(8, 4, dtype=D)

    def penalty(model, checkpointed):
        xx = x.clone().requires_grad_()
        out = checkpoint(model, xx, use_reentrant=False) if checkpointed else model(xx)
        (g,) = torch.autograd.grad(out.sum(), xx, create_graph=True)
        g.square().sum().backward()
        return [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]

    with bnkit.checkpoint_safe(net):
        ours = penalty(net, True)
    theirs = penalty(plain, False)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TIGHT)
    _assert_same_buffers(net, plain, rtol=0, atol=0)
    assert int(net[1].num_batches_tracked) == 1


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpoint_masked_calls_update_once_with_the_same_gradients(use_reentrant):
    g = _gen(31)
    x = torch.randn(4, 3, 5, generator=g, dtype=D)
    mask = torch.rand(4, 5, generator=g) > 0.4
    mask[0, :2] = True
    for layer in (bnkit.BatchNorm1d(3, momentum=None, dtype=D),
                  bnkit.BatchRenorm1d(3, warmup_steps=0, r_max_steps=1, d_max_steps=1, momentum=0.5, dtype=D)):
        with torch.no_grad():
            layer(torch.randn(6, 3, 4, generator=g, dtype=D) * 3 + 2)
        plain = copy.deepcopy(layer)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = checkpoint(layer, xa, mask, use_reentrant=use_reentrant)
        ya.pow(3).sum().backward()
        yb = plain(xb, mask)
        yb.pow(3).sum().backward()
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=0)
        torch.testing.assert_close(layer.weight.grad, plain.weight.grad, rtol=0, atol=0)
        _assert_same_buffers(layer, plain, rtol=0, atol=0)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpoint_retain_graph_two_backwards_plain_bn(use_reentrant):
    """A second backward through a retained graph recomputes again: still one update, gradients doubled."""
    x = torch.randn(6, 3, dtype=D) * 3 + 2
    weights = torch.arange(18, dtype=D).view(6, 3)
    for cls in (bnkit.BatchNorm1d, nn.BatchNorm1d):
        layer, plain = cls(3, dtype=D), cls(3, dtype=D)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        with bnkit.checkpoint_safe(layer):
            loss = (checkpoint(layer, xa, use_reentrant=use_reentrant) * weights).pow(2).sum()
            loss.backward(retain_graph=True)
            loss.backward()
        loss = (plain(xb) * weights).pow(2).sum()
        loss.backward(retain_graph=True)
        loss.backward()
        torch.testing.assert_close(xa.grad, xb.grad, **TIGHT)
        _assert_same_buffers(layer, plain, rtol=0, atol=0)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpoint_retain_graph_two_backwards_batch_renorm(use_reentrant):
    x = torch.randn(6, 3, generator=_gen(32), dtype=D) * 3 + 2
    weights = torch.arange(18, dtype=D).view(6, 3)
    layer = bnkit.BatchRenorm1d(3, momentum=0.5, schedule="fixed", dtype=D)
    with torch.no_grad():
        layer.running_mean.fill_(1.0)
        layer.running_var.fill_(4.0)
    plain = copy.deepcopy(layer)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss = (checkpoint(layer, xa, use_reentrant=use_reentrant) * weights).sum()
    loss.backward(retain_graph=True)
    loss.backward()
    loss = (plain(xb) * weights).sum()
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(xa.grad, xb.grad, **TIGHT)
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad, **TIGHT)


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("hooks", [True, False])
def test_accumulate_with_checkpointing_mixed_model_one_update_per_block(use_reentrant, hooks):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 3, dtype=D), bnkit.BatchNorm1d(3, dtype=D), nn.Tanh(),
                          nn.Linear(3, 3, dtype=D), nn.BatchNorm1d(3, momentum=None, dtype=D))
    parts = [torch.randn(n, 4, generator=_gen(40 + n), dtype=D) for n in (5, 3, 6)]
    with torch.no_grad():
        seen1 = torch.cat([model[0](x) for x in parts])
        seen4 = torch.cat([copy.deepcopy(model[:4])(x) for x in parts])  # a copy: its BN runs in training
    handle = bnkit.checkpoint_safe(model) if hooks else None
    with bnkit.accumulate_stats(model):
        for x in parts:
            checkpoint(model, x.clone().requires_grad_(), use_reentrant=use_reentrant).sum().backward()
    if handle is not None:
        handle.remove()
    mean, var = _hand_update(torch.zeros(3), torch.ones(3), seen1, 0.1)
    torch.testing.assert_close(model[1].running_mean, mean, **TIGHT)
    torch.testing.assert_close(model[1].running_var, var, **TIGHT)
    torch.testing.assert_close(model[4].running_mean, seen4.mean(0), **TIGHT)
    torch.testing.assert_close(model[4].running_var, seen4.var(0), **TIGHT)
    assert int(model[1].num_batches_tracked) == int(model[4].num_batches_tracked) == 1
    assert model[4].momentum is None


# =========================================================================== preserve_stats
class Everything(nn.Module):
    """torch and bnkit layers of many kinds, momentum=None, masked calls, an eval layer and an untracked one."""

    def __init__(self):
        super().__init__()
        self.t1 = nn.BatchNorm1d(3, momentum=None, dtype=D)
        self.b1 = bnkit.BatchNorm1d(3, momentum=None, dtype=D)
        self.renorm = bnkit.BatchRenorm1d(3, warmup_steps=0, r_max_steps=2, d_max_steps=2, dtype=D)
        self.ghost = bnkit.GhostBatchNorm1d(3, virtual_batch_size=2, dtype=D)
        self.domain = bnkit.DomainBatchNorm1d(3, num_domains=2, dtype=D)
        self.frozen_eval = bnkit.BatchNorm1d(3, dtype=D).eval()
        self.untracked = nn.BatchNorm1d(3, track_running_stats=False, dtype=D)
        self.lin = nn.Linear(3, 1, dtype=D)

    def forward(self, x, mask):
        x = self.b1(self.t1(x), mask)
        x = self.ghost(self.renorm(x, mask), mask)
        x = self.domain(x, domain=torch.arange(x.shape[0]) % 2)
        x = self.untracked(self.frozen_eval(x))
        return self.lin(x.mean(2))


def _batches(k, seed):
    g = _gen(seed)
    out = []
    for i in range(k):
        x = torch.randn(4, 3, 5, generator=g, dtype=D) * (i + 1) + i
        m = torch.rand(4, 5, generator=g) > 0.3
        m[:, :2] = True
        out.append((x, m))
    return out


def _warm_everything():
    model = Everything()
    for x, m in _batches(2, seed=50):
        model(x, m).sum().backward()
    model.zero_grad(set_to_none=True)
    return model


def test_lr_finder_loop_that_raises_midway_leaves_every_buffer_and_parameter_bitwise():
    model = _warm_everything()
    twin = copy.deepcopy(model)
    state = _state(model)
    batches = _batches(4, seed=51)
    with pytest.raises(FloatingPointError, match="diverged"):
        with bnkit.preserve_stats(model):
            for i, (x, m) in enumerate(batches):
                xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
                ya, yb = model(xa, m), twin(xb, m)  # the same as outside the block
                torch.testing.assert_close(ya, yb, rtol=0, atol=0)
                ya.square().mean().backward()
                yb.square().mean().backward()
                torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=0)
                if i == 2:
                    raise FloatingPointError("loss diverged")
    _assert_bitwise(model, state)
    assert model.training and not model.frozen_eval.training
    # the next real step is the step of a model that never ran the finder
    fresh = copy.deepcopy(model)
    x, m = _batches(1, seed=52)[0]
    torch.testing.assert_close(model(x, m), fresh(x, m), rtol=0, atol=0)
    _assert_same_buffers(model, fresh, rtol=0, atol=0)


def test_preserve_nested_inner_exception_restores_inner_entry_then_outer_entry():
    model = _warm_everything()
    outer_state = _state(model)
    (x0, m0), (x1, m1), (x2, m2) = _batches(3, seed=53)
    with bnkit.preserve_stats(model):
        model(x0, m0)
        mid = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError):
            with bnkit.preserve_stats(model):
                model(x1, m1)
                raise ValueError("probe failed")
        for k, v in model.state_dict().items():
            assert torch.equal(v, mid[k]), k
        model(x2, m2)
    _assert_bitwise(model, outer_state)


def test_preserve_around_accumulate_restores_the_update_of_the_inner_block():
    model = _warm_everything()
    state = _state(model)
    with bnkit.preserve_stats(model):
        with bnkit.accumulate_stats(nn.ModuleList([model.t1, model.b1])):
            for x, m in _batches(2, seed=54):
                model.b1(model.t1(x), m)
        assert int(model.t1.num_batches_tracked) == 3  # the block applied its one update ...
    _assert_bitwise(model, state)                       # ... and preserve_stats undid it


def test_preserve_puts_back_buffers_the_block_rebound_or_removed():
    bn, theirs = bnkit.BatchNorm1d(3, dtype=D), nn.BatchNorm1d(3, dtype=D)
    model = nn.Sequential(bn, theirs)
    model(torch.randn(5, 3, dtype=D))
    state = _state(model)
    with bnkit.preserve_stats(model):
        bn.running_mean = torch.full((3,), 7.0, dtype=D)
        theirs.running_var = None
        theirs.running_mean = None
        bn.reset_running_stats()
        model(torch.randn(5, 3, dtype=D))
    _assert_bitwise(model, state)


def test_preserve_inside_accumulate_probe_does_not_count():
    parts = [torch.randn(n, 3, generator=_gen(60 + n), dtype=D) for n in (5, 4)]
    probe = torch.randn(7, 3, generator=_gen(69), dtype=D) * 10 + 5
    model = nn.Sequential(bnkit.BatchNorm1d(3, dtype=D), nn.BatchNorm1d(3, dtype=D))
    with bnkit.accumulate_stats(model):
        model(parts[0])
        with bnkit.preserve_stats(model):
            model(probe)  # e.g. an EMA evaluation in train mode between micro-batches
        model(parts[1])
    mean, var = _hand_update(torch.zeros(3), torch.ones(3), torch.cat(parts), 0.1)
    torch.testing.assert_close(model[0].running_mean, mean, **TIGHT)
    torch.testing.assert_close(model[0].running_var, var, **TIGHT)


# =========================================================================== tiny batches
@pytest.mark.parametrize("cls,shape", [
    (bnkit.BatchNorm1d, (1, 3)), (bnkit.BatchNorm1d, (1, 3, 1)), (bnkit.BatchNorm2d, (1, 3, 1, 1)),
    (bnkit.BatchNorm3d, (1, 3, 1, 1, 1)), (bnkit.BatchRenorm2d, (1, 3, 1, 1)),
])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_tiny_batch_running_is_the_eval_formula_by_hand(cls, shape, momentum):
    layer = cls(3, tiny_batch="running", momentum=momentum, dtype=D)
    layer(torch.randn((4,) + shape[1:], dtype=D) * 2 + 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 2.0, -1.0], dtype=D))
        layer.bias.copy_(torch.tensor([0.1, 0.2, 0.3], dtype=D))
    state = _state(layer)
    x = torch.randn(shape, dtype=D, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="one value per channel"):
        y = layer(x)
    view = (1, 3) + (1,) * (len(shape) - 2)
    rm, rv = layer.running_mean.view(view), layer.running_var.view(view)
    expected = (x.detach() - rm) / torch.sqrt(rv + layer.eps) * layer.weight.detach().view(view) + layer.bias.detach().view(view)
    torch.testing.assert_close(y, expected, **TIGHT)
    y.sum().backward()
    torch.testing.assert_close(x.grad, (layer.weight.detach().view(view) / torch.sqrt(rv + layer.eps)).expand(shape), **TIGHT)
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(layer.state_dict()[k], state[k][1]), k


def test_tiny_batch_default_raises_like_torch_and_batches_of_two_are_normal():
    for shape in ((1, 3, 1, 1), (1, 3, 1, 2), (2, 3, 1, 1)):
        x = torch.randn(shape, dtype=D)
        ours, theirs = bnkit.BatchNorm2d(3, dtype=D), nn.BatchNorm2d(3, dtype=D)
        running = bnkit.BatchNorm2d(3, tiny_batch="running", dtype=D)
        if shape == (1, 3, 1, 1):
            with pytest.raises(ValueError, match="more than 1 value per channel"):
                theirs(x)
            with pytest.raises(ValueError, match="more than 1 value per channel"):
                ours(x)
            assert int(ours.num_batches_tracked) == 0
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                torch.testing.assert_close(running(x), theirs(x), **TIGHT)
            _assert_same_buffers(running, theirs)


def test_tiny_batch_policy_set_after_construction_is_validated():
    with pytest.raises(ValueError):
        bnkit.BatchNorm1d(3, tiny_batch="skip")
    bn = bnkit.BatchNorm1d(3)
    bn.tiny_batch = "skip"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # today: the 'running' policy's warning
        with pytest.raises(ValueError, match="tiny_batch"):
            bn(torch.randn(1, 3))


def test_tiny_batch_running_without_running_buffers_raises_torchs_error():
    theirs = nn.BatchNorm1d(3)
    theirs.running_mean = theirs.running_var = None
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        theirs(torch.randn(1, 3))
    ours = bnkit.BatchNorm1d(3, tiny_batch="running")
    ours.running_mean = ours.running_var = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            ours(torch.randn(1, 3))


def test_tiny_batch_masked_one_valid_entry_uses_running_statistics_inside_accumulate():
    bn = bnkit.BatchNorm1d(3, tiny_batch="running", dtype=D)
    bn(torch.randn(6, 3, dtype=D) * 2 + 1)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    x = torch.randn(2, 3, 4, dtype=D)
    one = torch.zeros(2, 4, dtype=torch.bool)
    one[1, 2] = True
    normal = torch.randn(5, 3, dtype=D)
    with bnkit.accumulate_stats(bn):
        with pytest.warns(RuntimeWarning, match="one valid entry"):
            y = bn(x, one)
        bn(normal)
    expected = (x - rm.view(1, 3, 1)) / torch.sqrt(rv.view(1, 3, 1) + bn.eps) * bn.weight.detach().view(1, 3, 1) \
        + bn.bias.detach().view(1, 3, 1)
    torch.testing.assert_close(y, expected, **TIGHT)
    mean, var = _hand_update(rm, rv, normal, 0.1)  # the tiny micro-batch is not counted
    torch.testing.assert_close(bn.running_mean, mean, **TIGHT)
    torch.testing.assert_close(bn.running_var, var, **TIGHT)
    assert int(bn.num_batches_tracked) == 2


# =========================================================================== torch.compile (cheap backend)
@pytest.mark.slow
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_compiled_model_that_checkpoints_masked_and_torch_layers_updates_once(use_reentrant):
    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bnkit.BatchNorm1d(3)
            self.conv = nn.Conv1d(3, 3, 1)
            self.tbn = nn.BatchNorm1d(3)

        def body(self, x, mask):
            return self.tbn(self.conv(self.bn(x, mask)))

        def forward(self, x, mask):
            return checkpoint(self.body, x, mask, use_reentrant=use_reentrant)

    torch.manual_seed(0)
    model = Body()
    plain = copy.deepcopy(model)
    x = torch.randn(4, 3, 5)
    mask = torch.rand(4, 5) > 0.4
    mask[0, :2] = True
    with bnkit.checkpoint_safe(model):
        compiled = torch.compile(model, backend="aot_eager")
        xa = x.clone().requires_grad_()
        compiled(xa, mask).sum().backward()
    xb = x.clone().requires_grad_()
    plain.body(xb, mask).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    _assert_same_buffers(model, plain, rtol=1.3e-6, atol=1e-5)
    assert int(model.bn.num_batches_tracked) == int(model.tbn.num_batches_tracked) == 1
