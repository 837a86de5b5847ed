"""Gradient accumulation: ``bnkit.accumulate_stats`` updates the running statistics once per step.

Oracles: torch's BN run once on the concatenated micro-batches (same
momentum), hand formulas for the cumulative average, and the same forwards
without the block (outputs and gradients).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint

import bnkit
from bnkit import engine

D = torch.float64


def micro_batches(sizes, c=4, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, c, dtype=D, generator=g) * (1 + i) + shift + i for i, n in enumerate(sizes)]


def assert_buffers(layer, ref, rtol=1e-12, atol=1e-12):
    torch.testing.assert_close(layer.running_mean, ref.running_mean, rtol=rtol, atol=atol)
    torch.testing.assert_close(layer.running_var, ref.running_var, rtol=rtol, atol=atol)
    assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked)


LAYERS = {
    "bnkit": lambda m: bnkit.BatchNorm1d(4, momentum=m, dtype=D),
    "torch": lambda m: nn.BatchNorm1d(4, momentum=m, dtype=D),
    "ghost": lambda m: bnkit.GhostBatchNorm1d(4, virtual_batch_size=3, momentum=m, dtype=D),
    "sync": lambda m: bnkit.SyncBatchNorm(4, momentum=m, dtype=D),
    "renorm": lambda m: bnkit.BatchRenorm1d(4, momentum=m, dtype=D),
}


@pytest.mark.parametrize("momentum", [0.1, 0.7, None])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_one_update_from_the_merged_batch(kind, momentum):
    layer = LAYERS[kind](momentum)
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    ref = nn.BatchNorm1d(4, momentum=momentum, dtype=D)
    ref.load_state_dict(layer.state_dict(), strict=False)
    plain = copy.deepcopy(layer)
    for step in range(2):
        parts = micro_batches([5, 3, 8], seed=step, shift=10.0 * step)
        with bnkit.accumulate_stats(layer):
            for x in parts:
                xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
                ya, yb = layer(xa), plain(xb)
                assert torch.equal(ya, yb)  # each micro-batch normalized with its own statistics
                (ya * yb.detach()).sum().backward()
                (yb * yb.detach()).sum().backward()
                assert torch.equal(xa.grad, xb.grad)
        ref(torch.cat(parts))  # oracle: one forward over the whole step
        assert_buffers(layer, ref)
    assert int(layer.num_batches_tracked) == 2


def test_cumulative_average_by_hand():
    bn = bnkit.BatchNorm1d(4, momentum=None, dtype=D)
    steps = [micro_batches([4, 6], seed=s) for s in range(3)]
    for parts in steps:
        with bnkit.accumulate_stats(bn):
            for x in parts:
                bn(x)
    # momentum=None: the plain average over the 3 steps of each step's mean and unbiased variance.
    means = torch.stack([torch.cat(p).mean(0) for p in steps])
    variances = torch.stack([torch.cat(p).var(0) for p in steps])
    torch.testing.assert_close(bn.running_mean, means.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, variances.mean(0), rtol=1e-12, atol=1e-12)  # the first step's factor is 1
    assert int(bn.num_batches_tracked) == 3


def test_float32_and_2d_layers():
    bn, ref = bnkit.BatchNorm2d(3), nn.BatchNorm2d(3)
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 3, 5, 4, generator=g) + 3 for n in (2, 5, 1)]
    with bnkit.accumulate_stats(bn):
        for x in parts:
            bn(x)
    ref(torch.cat(parts))
    assert_buffers(bn, ref, rtol=1e-6, atol=1e-6)


def test_shared_per_site_buffers():
    bn = bnkit.SharedBatchNorm(4, sites=2, dtype=D)
    refs = [nn.BatchNorm1d(4, dtype=D) for _ in range(2)]
    a, b = micro_batches([5, 7], seed=3), micro_batches([4, 6], seed=4)
    with bnkit.accumulate_stats(bn):
        for xa, xb in zip(a, b):
            bn(xa, site=0)
            bn(xb, site=1)
    refs[0](torch.cat(a))
    refs[1](torch.cat(b))
    for site, ref in enumerate(refs):
        torch.testing.assert_close(bn.running_mean[site], ref.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bn.running_var[site], ref.running_var, rtol=1e-12, atol=1e-12)
        assert int(bn.num_batches_tracked[site]) == 1


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 9).filter(lambda n: n != 1), min_size=1, max_size=5), seed=st.integers(0, 99))
def test_property_merged_equals_concatenated(sizes, seed):
    model = nn.Sequential(bnkit.BatchNorm1d(4, dtype=D), nn.BatchNorm1d(4, dtype=D))
    ref = nn.BatchNorm1d(4, dtype=D)
    parts = micro_batches(sizes, seed=seed)
    with bnkit.accumulate_stats(model):
        for x in parts:
            model[0](x)
            model[1](x)
    whole = torch.cat(parts)
    if whole.shape[0] > 1:
        ref(whole)
    else:  # nothing (or one value) seen: the statistics stay; each layer counts one step
        ref.num_batches_tracked.add_(1)
    for layer in model:
        assert_buffers(layer, ref)


def test_exception_leaves_everything_as_before():
    model = nn.Sequential(bnkit.BatchNorm1d(4, dtype=D), nn.BatchNorm1d(4, momentum=None, dtype=D))
    model(micro_batches([6])[0])
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(KeyError):
        with bnkit.accumulate_stats(model):
            model(micro_batches([6])[0])
            model(micro_batches([5])[0])
            raise KeyError("out of memory in the middle of a step")
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert model[1].momentum is None and not model[1]._forward_hooks
    assert engine.running_update_hook() is None and not engine._ANY_HOOK
    model(micro_batches([6])[0])  # and updates normally again
    assert int(model[0].num_batches_tracked) == 2


def test_nested_blocks_merge_into_the_outer_one():
    model = nn.Sequential(bnkit.BatchNorm1d(4, dtype=D), nn.BatchNorm1d(4, dtype=D))
    ref = nn.BatchNorm1d(4, dtype=D)
    a, b, c, d = micro_batches([5, 6, 7, 4], seed=5)

    def run(x):  # both layers on the same micro-batch
        model[0](x)
        model[1](x)

    with bnkit.accumulate_stats(model):
        run(a)
        with bnkit.accumulate_stats(model):
            run(b)
        assert int(model[0].num_batches_tracked) == 0  # the outer block applies
        with pytest.raises(RuntimeError):
            with bnkit.accumulate_stats(model):
                run(c)  # dropped: its block failed
                raise RuntimeError
    ref(torch.cat([a, b]))
    for layer in model:
        assert_buffers(layer, ref)
    with bnkit.accumulate_stats(model):  # the next block starts afresh (the totals are reused, not their values)
        run(d)
    ref(d)
    for layer in model:
        assert_buffers(layer, ref)


def test_torch_layers_keep_their_forward_hooks_pickling_and_own_forward():
    """Inside a block a torch layer's forward is wrapped: user hooks still run, a copy or a pickle made
    inside is a plain layer, and the attribute is put back at exit (an instance forward included)."""
    import io

    plain, own, saved = (nn.BatchNorm1d(4, dtype=D) for _ in range(3))
    calls = []
    plain.register_forward_hook(lambda m, a, y: calls.append(y.shape))
    own_forward = own.forward
    own.forward = lambda x: own_forward(x)  # a user's instance forward
    ref = nn.BatchNorm1d(4, dtype=D)
    parts = micro_batches([5, 7], seed=3)
    with bnkit.accumulate_stats(nn.ModuleList([plain, own, saved])):
        for x in parts:
            for layer in (plain, own, saved):
                layer(x)
        copied = copy.deepcopy(saved)
        buf = io.BytesIO()
        torch.save(saved, buf)
    assert calls == [(5, 4), (7, 4)]
    assert "forward" not in plain.__dict__ and "forward" not in saved.__dict__
    assert type(own.__dict__["forward"]).__name__ == "function"
    ref(torch.cat(parts))
    for layer in (plain, own, saved):
        assert_buffers(layer, ref)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for clone in (copied, loaded):  # plain layers, updating per forward as usual
        assert isinstance(clone.forward.__self__, nn.BatchNorm1d)
        clone.momentum = 0.1
        before = clone.num_batches_tracked.clone()
        clone(parts[0])
        assert int(clone.num_batches_tracked) == int(before) + 1


def test_torch_layers_many_micro_batches_and_nested_blocks_in_between():
    """Twenty-one micro-batches, empty ones among them, and a nested block opened after another layer of the
    enclosing block has run: the update of the concatenated batch, for each layer."""
    layer, other = nn.BatchNorm1d(4, dtype=D), nn.BatchNorm1d(4, dtype=D)
    sizes = [3, 0, 5, 2, 7, 4, 0, 6, 3, 2, 5, 4, 8, 3, 2, 6, 9, 4, 3, 2, 5]
    parts = micro_batches(sizes, seed=11)
    model = nn.ModuleList([layer, other])
    with bnkit.accumulate_stats(model):
        for i, x in enumerate(parts[:12]):
            layer(x)
            if i == 5:
                other(x)
        with bnkit.accumulate_stats(layer):  # other has a forward pending in the outer block
            for x in parts[12:]:
                layer(x)
    ref = nn.BatchNorm1d(4, dtype=D)
    ref(torch.cat(parts))
    assert_buffers(layer, ref)
    ref_other = nn.BatchNorm1d(4, dtype=D)
    ref_other(parts[5])
    assert_buffers(other, ref_other)


def test_other_models_update_as_usual():
    model, other = bnkit.BatchNorm1d(4, dtype=D), bnkit.BatchNorm1d(4, dtype=D)
    with bnkit.accumulate_stats(model):
        other(micro_batches([5])[0])
        other(micro_batches([5], seed=1)[0])
        model(micro_batches([5])[0])
    assert int(other.num_batches_tracked) == 2 and int(model.num_batches_tracked) == 1


def test_eval_forwards_and_checkpoint_recompute_not_counted():
    model = nn.Sequential(nn.Linear(4, 4, dtype=D), bnkit.BatchNorm1d(4, dtype=D), nn.BatchNorm1d(4, dtype=D))
    bnkit.checkpoint_safe(model)
    ref = nn.BatchNorm1d(4, dtype=D)
    parts = micro_batches([6, 8], seed=7)
    with bnkit.accumulate_stats(model):
        for x in parts:
            checkpoint(model, x.requires_grad_(), use_reentrant=False).sum().backward()
        model.eval()
        model(parts[0])
        model.train()
    with torch.no_grad():
        ref(torch.cat([model[0](x) for x in parts]))
    assert_buffers(model[1], ref)


def test_nonfinite_micro_batch_follows_the_policy():
    bn = bnkit.BatchNorm1d(4, dtype=D)  # nonfinite="skip"
    ref = nn.BatchNorm1d(4, dtype=D)
    good, bad = micro_batches([5, 6], seed=8)
    bad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="not finite"):
        with bnkit.accumulate_stats(bn):
            bn(good)
            bn(bad)
    ref(good)
    assert_buffers(bn, ref)
    strict = bnkit.BatchNorm1d(4, nonfinite="raise", dtype=D)
    with pytest.raises(FloatingPointError):
        with bnkit.accumulate_stats(strict):
            strict(bad)
    assert int(strict.num_batches_tracked) == 0


def test_bad_input_is_refused_before_any_change():
    keras = nn.Sequential(nn.BatchNorm1d(4), bnkit.BatchNorm1d(4, convention="keras"))
    with pytest.raises(NotImplementedError, match="keras"):
        with bnkit.accumulate_stats(keras):
            pass
    assert keras[0].momentum == 0.1 and not keras[0]._forward_hooks and engine.running_update_hook() is None and not engine._ANY_HOOK
    with pytest.raises(TypeError, match="nn.Module"):
        with bnkit.accumulate_stats([keras]):
            pass


# --------------------------------------------------------------------------- the fused op's moments form
@pytest.mark.parametrize(
    "dtype, fmt, tol",
    [(torch.float64, None, 1e-12), (torch.float32, torch.channels_last, 1e-5), (torch.bfloat16, None, 1e-2)],
    ids=["float64", "float32-channels_last", "bfloat16"],
)
def test_every_backend_one_update_from_the_merged_batch(backend, dtype, fmt, tol, monkeypatch):
    """Each backend (the fused C++ op's moments form, or the general path) against torch on the concatenation."""
    general = []
    real = engine._general

    def spy(*args):
        general.append(args[0].name)
        return real(*args)

    monkeypatch.setattr(engine, "_general", spy)
    g = torch.Generator().manual_seed(1)
    parts = [(torch.randn(n, 3, 4, 5, generator=g, dtype=D) * (1 + n) + n).to(dtype) for n in (2, 5, 3)]
    parts = [p.contiguous(memory_format=fmt) if fmt is not None else p for p in parts]
    bn = bnkit.BatchNorm2d(3, momentum=0.3, dtype=torch.float32 if dtype == torch.bfloat16 else dtype)
    plain = copy.deepcopy(bn)
    with bnkit.accumulate_stats(bn):
        for x in parts:
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = bn(xa), plain(xb)
            assert torch.equal(ya, yb)  # the same kernels as outside the block
            ya.sum().backward()
            yb.sum().backward()
            assert torch.equal(xa.grad, xb.grad)
    ref = nn.BatchNorm2d(3, momentum=0.3, dtype=D)
    ref(torch.cat([p.double() for p in parts]))
    assert_buffers(bn, ref.to(bn.running_mean.dtype), rtol=tol, atol=tol)
    assert (general == []) == (backend == "cpp")  # cpp: every call fused (no general path)


@pytest.mark.parametrize("nonfinite", ["skip", "raise", "propagate"])
def test_nonfinite_policy_on_every_backend(backend, nonfinite):
    bn = bnkit.BatchNorm2d(4, nonfinite=nonfinite, dtype=D)
    good, bad = (x.reshape(-1, 4, 1, 1).expand(-1, 4, 2, 3).contiguous() for x in micro_batches([5, 6], seed=8))
    bad[0, 0, 1, 1] = float("inf")
    before = copy.deepcopy(bn.state_dict())
    if nonfinite == "raise":
        with pytest.raises(FloatingPointError):
            with bnkit.accumulate_stats(bn):
                bn(good)
                bn(bad)
        for k, v in before.items():
            assert torch.equal(bn.state_dict()[k], v), k
        return
    with contextlib.ExitStack() as stack:
        if nonfinite == "skip":
            stack.enter_context(pytest.warns(RuntimeWarning, match="not finite"))
        with bnkit.accumulate_stats(bn):
            bn(good)
            bn(bad)
    if nonfinite == "propagate":  # the bad part poisons the merged statistics, as one big batch would
        assert torch.isnan(bn.running_var[0]) and int(bn.num_batches_tracked) == 1
        return
    ref = nn.BatchNorm2d(4, dtype=D)
    ref(good)
    assert_buffers(bn, ref)


def test_layers_outside_the_model_update_exactly_as_without_the_block(backend):
    model, other = bnkit.BatchNorm2d(3, dtype=D), bnkit.BatchNorm2d(3, momentum=None, dtype=D)
    twin = copy.deepcopy(other)
    xs = [torch.randn(4, 3, 2, 2, dtype=D, generator=torch.Generator().manual_seed(s)) + s for s in range(3)]
    with bnkit.accumulate_stats(model):
        for x in xs:
            other(x)
            model(x)
    for x in xs:
        twin(x)
    for k, v in twin.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    assert int(model.num_batches_tracked) == 1


cpp_only = pytest.mark.skipif(not bnkit.kernels.cpp_available(), reason="the C++ extension is not available")


@cpp_only
@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 12), min_size=1, max_size=5),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    unbiased=st.booleans(),
    seed=st.integers(0, 999),
)
def test_merge_moments_op_is_chans_merge(sizes, dtype, unbiased, seed):
    """bnkit::merge_moments_ folded over the parts: stats.merge of the same inputs, and (float64) the concatenation."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(n, 5, generator=g, dtype=D) * 3 + 2 for n in sizes if n > 1 or not unbiased]
    totals = torch.zeros(11, dtype=D)  # [5 means, 5 M2s, count]
    mean, m2 = totals[:5], totals[5:10]
    oracle = bnkit.stats.Moments(0, torch.zeros(5, dtype=D), torch.zeros(5, dtype=D))
    for x in parts:
        n = x.shape[0]
        batch_mean = x.mean(0).to(dtype) if n else torch.zeros(5, dtype=dtype)
        batch_var = x.var(0, correction=int(unbiased)).to(dtype) if n else torch.zeros(5, dtype=dtype)
        torch.ops.bnkit.merge_moments_(totals, batch_mean, batch_var, n, unbiased)
        part_m2 = batch_var.double() * (n - 1 if unbiased else n)
        oracle = bnkit.stats.merge(oracle, bnkit.stats.Moments(n, batch_mean.double(), part_m2))
    count = int(totals[10])
    assert count == oracle.count
    torch.testing.assert_close(mean, oracle.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m2, oracle.m2, rtol=1e-12, atol=1e-10)
    if dtype == D and count:
        whole = torch.cat(parts)
        torch.testing.assert_close(mean, whole.mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m2, whole.var(0, correction=0) * count, rtol=1e-12, atol=1e-10)


@cpp_only
def test_merge_moments_op_refuses_bad_totals():
    with pytest.raises(RuntimeError, match="float64"):
        torch.ops.bnkit.merge_moments_(torch.zeros(7), torch.zeros(3), torch.ones(3), 4, False)
    with pytest.raises(RuntimeError, match="size"):
        torch.ops.bnkit.merge_moments_(torch.zeros(7, dtype=D), torch.zeros(2), torch.ones(2), 4, False)


# --------------------------------------------------------------------------- the fused op merging into the totals
def _layer_args(x, axis, c, rm, rv, nbt, check_finite=True):
    g = torch.Generator().manual_seed(c)
    w, b = torch.randn(c, generator=g, dtype=x.dtype), torch.randn(c, generator=g, dtype=x.dtype)
    return (x, w, b, rm, rv, nbt, 0.1, 1e-5, axis, c, 0, check_finite)


@cpp_only
@pytest.mark.parametrize(
    "shape, axis, dtype, tol",
    [((6, 3, 4, 5), 1, D, 1e-12), ((7, 3), 1, D, 1e-12), ((4, 5, 3), -1, D, 1e-12), ((5, 4, 3, 3), 1, torch.float32, 1e-6)],
)
def test_accumulate_op_is_the_layer_call_then_chans_merge(shape, axis, dtype, tol):
    """batch_norm_layer_accumulate_: batch_norm_layer's training output bit for bit, no buffer moved, the totals
    the float64 merge of the batches (oracle: stats.merge of each batch's float64 moments, and the concatenation)."""
    c = shape[axis]
    rm, rv, nbt = torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype), torch.zeros((), dtype=torch.long)
    totals = torch.zeros(2 * c + 1, dtype=D)
    g = torch.Generator().manual_seed(3)
    parts = [(torch.randn(shape, generator=g, dtype=D) * (i + 1) + i).to(dtype) for i in range(3)]
    dims = [d for d in range(len(shape)) if d != axis % len(shape)]
    oracle = bnkit.stats.Moments(0, torch.zeros(c, dtype=D), torch.zeros(c, dtype=D))
    for x in parts:
        args = _layer_args(x.requires_grad_(), axis, c, rm, rv, nbt)
        y, status = torch.ops.bnkit.batch_norm_layer_accumulate_(*args, totals)
        ref_buffers = (rm.clone(), rv.clone(), nbt.clone())
        y_ref, status_ref = torch.ops.bnkit.batch_norm_layer(*args[:3], *ref_buffers, True, *args[6:])
        assert status == status_ref == engine._constants().handled
        assert torch.equal(y, y_ref) and y.grad_fn is not None
        assert torch.equal(rm, torch.zeros(c, dtype=dtype)) and torch.equal(rv, torch.ones(c, dtype=dtype))
        assert int(nbt) == 0
        xd = x.detach().double()
        n = xd.numel() // c
        oracle = bnkit.stats.merge(oracle, bnkit.stats.Moments(n, xd.mean(dims), xd.var(dims, correction=0) * n))
    assert int(totals[2 * c]) == oracle.count
    torch.testing.assert_close(totals[:c], oracle.mean, rtol=tol, atol=tol)
    torch.testing.assert_close(totals[c : 2 * c], oracle.m2, rtol=tol, atol=tol * oracle.count)
    whole = torch.cat([x.detach().double() for x in parts])
    torch.testing.assert_close(totals[c : 2 * c], whole.var(dims, correction=0) * oracle.count, rtol=tol,
                               atol=tol * oracle.count)


@cpp_only
def test_accumulate_op_merges_nothing_it_does_not_handle_or_check():
    constants = engine._constants()
    c = 3
    rm, rv, nbt = torch.zeros(c, dtype=D), torch.ones(c, dtype=D), torch.zeros((), dtype=torch.long)
    totals = torch.zeros(2 * c + 1, dtype=D)
    bad = torch.randn(6, c, dtype=D)
    bad[2, 1] = float("nan")
    _, status = torch.ops.bnkit.batch_norm_layer_accumulate_(*_layer_args(bad, 1, c, rm, rv, nbt), totals)
    assert status == constants.nonfinite and torch.equal(totals, torch.zeros(2 * c + 1, dtype=D))
    one = torch.randn(1, c, dtype=D)  # one value per channel: the general path's error
    y, status = torch.ops.bnkit.batch_norm_layer_accumulate_(*_layer_args(one, 1, c, rm, rv, nbt), totals)
    assert status == constants.not_handled and y is one and not totals.any()
    # check_finite off (nonfinite="propagate"): the batch is merged, NaN and all
    _, status = torch.ops.bnkit.batch_norm_layer_accumulate_(*_layer_args(bad, 1, c, rm, rv, nbt, False), totals)
    assert status == constants.handled and int(totals[2 * c]) == 6 and totals[1].isnan()
    with pytest.raises(RuntimeError, match="2C"):
        torch.ops.bnkit.batch_norm_layer_accumulate_(
            *_layer_args(torch.randn(6, c, dtype=D), 1, c, rm, rv, nbt), torch.zeros(2 * c, dtype=D)
        )


@cpp_only
def test_one_op_call_per_micro_batch():
    """Inside the block a fused forward is one op call: the merge happens inside it (no moments op, no merge op)."""
    model = nn.Sequential(bnkit.BatchNorm2d(3), nn.ReLU(), bnkit.BatchNorm2d(3))
    parts = [torch.randn(4, 3, 5, 5) for _ in range(3)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with bnkit.accumulate_stats(model):
            for x in parts:
                model(x)
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("bnkit::batch_norm_layer_accumulate_") == 2 * len(parts)
    assert "bnkit::batch_norm_layer_moments" not in calls and "bnkit::merge_moments_" not in calls
    ref = nn.BatchNorm2d(3)
    ref(torch.cat(parts))
    assert_buffers(model[0], ref, rtol=1e-5, atol=1e-6)



@cpp_only
@pytest.mark.parametrize(
    "case", ["plain", "nonfinite", "meta", "num_features", "ranks", "one-element-weight", "one-value", "no-nbt",
             "half-weight"],
)
def test_training_variants_decline_exactly_what_the_layer_call_declines(case):
    """The hook's two routes (moments, accumulate) against batch_norm_layer: same status, same output, no buffer moved."""
    g = torch.Generator().manual_seed(2)
    shape = (1, 3, 1, 1) if case == "one-value" else (4, 3, 2, 2)
    x, w = torch.randn(shape, generator=g, dtype=D), torch.randn(3, generator=g, dtype=D)
    rm, rv, nbt = torch.zeros(3, dtype=D), torch.ones(3, dtype=D), torch.zeros((), dtype=torch.long)
    momentum, num_features, ranks = 0.1, 3, 0
    if case == "nonfinite":
        x[1, 2, 0, 1] = float("nan")
    elif case == "meta":
        x, w, rm, rv, nbt = (t.to("meta") for t in (x, w, rm, rv, nbt))
    elif case == "num_features":
        num_features = 5
    elif case == "ranks":
        ranks = (1 << 2) | (1 << 3)
    elif case == "one-element-weight":
        w = w[:1]
    elif case == "no-nbt":  # the cumulative average needs num_batches_tracked
        momentum, nbt = engine._constants().cumulative_momentum, None
    elif case == "half-weight":
        w = w.half()
    common = (x, w, None, rm, rv, nbt, momentum, 1e-5, 1, num_features, ranks, True)
    fresh = [t.clone() if t is not None else None for t in (rm, rv, nbt)]
    y_ref, status = torch.ops.bnkit.batch_norm_layer(x, w, None, *fresh, True, *common[6:])
    totals = torch.zeros(7, dtype=D, device=x.device)
    y_acc, status_acc = torch.ops.bnkit.batch_norm_layer_accumulate_(*common, totals)
    y_mom, mean, var, status_mom = torch.ops.bnkit.batch_norm_layer_moments(*common)
    assert status_acc == status_mom == status
    if status == engine._constants().not_handled:
        assert y_acc is x and y_mom is x and (case == "meta" or not totals.any())
    elif case != "meta":
        for y in (y_acc, y_mom):  # bit for bit (NaN where the batch has one)
            torch.testing.assert_close(y, y_ref, rtol=0, atol=0, equal_nan=True)
        assert int(totals[6]) == (16 if status == engine._constants().handled else 0)
    if case != "meta":
        assert torch.equal(rm, torch.zeros(3, dtype=D)) and torch.equal(rv, torch.ones(3, dtype=D))


@pytest.mark.parametrize("kind", ["bnkit", "torch", "sync"])
def test_the_merge_without_the_cpp_op_gives_the_same_update(kind, monkeypatch):
    """Where bnkit::merge_moments_ does not apply (accelerators, traces) the totals are merged in Python (stats.merge)."""
    monkeypatch.setattr(bnkit.tools.accumulate.kernels, "cpp_available", lambda: False)
    layer, ref = LAYERS[kind](0.3), nn.BatchNorm1d(4, momentum=0.3, dtype=D)
    for step in range(2):
        parts = micro_batches([5, 3, 8], seed=step, shift=3.0 * step)
        with bnkit.kernels.use_backend("torch"), bnkit.accumulate_stats(layer):
            for x in parts:
                layer(x)
        ref(torch.cat(parts))
        assert_buffers(layer, ref)


@pytest.mark.parametrize("kind", ["bnkit", "torch"])
def test_compiled_model_accumulates_once_per_block_without_recompiling(kind):
    """A compiled model's forwards inside blocks: one update per block from the merged batch (the merge
    runs outside the graph), the same compiled code for every block, and plain updates outside."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = bnkit.BatchNorm1d(4, dtype=D) if kind == "bnkit" else nn.BatchNorm1d(4, dtype=D)
    model = nn.Sequential(nn.Linear(4, 4, dtype=D), layer)
    ref = nn.BatchNorm1d(4, dtype=D)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    after_first = None
    for step in range(3):
        parts = micro_batches([6, 5, 7], seed=20 + step, shift=step)
        with bnkit.accumulate_stats(model):
            for x in parts:
                x = x.requires_grad_()
                compiled(x).square().sum().backward()
        with torch.no_grad():
            ref(torch.cat([model[0](x) for x in parts]))
        assert_buffers(layer, ref, rtol=1e-10, atol=1e-12)
        if step == 0:
            after_first = counter.frame_count
    assert counter.frame_count == after_first  # later blocks reuse the compiled code
    x = micro_batches([6], seed=30)[0]
    compiled(x)
    with torch.no_grad():
        ref(model[0](x))
    assert_buffers(layer, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_buffers_written_inside_the_block_before_the_first_forward_are_the_base(compiled):
    """What DDP's broadcast_buffers does at each forward (rank 0's buffers copied into every rank's): the
    block's one update starts from the buffers as the layer's first forward in the block found them,
    for torch's layers as for bnkit's (whose buffers are live); writes after the first forward are the
    forwards' business (DDP's later copies hold rank 0's micro-batch statistics) and change nothing."""
    torch._dynamo.reset()
    results = {}
    for kind in ("bnkit", "torch"):
        torch.manual_seed(0)
        layer = bnkit.BatchNorm1d(4, dtype=D) if kind == "bnkit" else nn.BatchNorm1d(4, dtype=D)
        model = nn.Sequential(nn.Linear(4, 4, dtype=D), layer)
        run = torch.compile(model, backend="aot_eager") if compiled else model
        parts = micro_batches([6, 5, 7], seed=3, shift=1.0)
        with bnkit.accumulate_stats(model):
            with torch.no_grad():
                layer.running_mean.fill_(2.0)  # the "broadcast" before the first forward
                layer.running_var.fill_(3.0)
            for x in parts:
                run(x).square().sum().backward()
        results[kind] = layer
        ref = nn.BatchNorm1d(4, dtype=D)
        with torch.no_grad():
            ref.running_mean.fill_(2.0)
            ref.running_var.fill_(3.0)
            ref(torch.cat([model[0](x) for x in parts]))
        assert_buffers(layer, ref, rtol=1e-10, atol=1e-12)
    assert_buffers(results["bnkit"], results["torch"], rtol=1e-10, atol=1e-12)
