"""The drop-in layers on the edges, against torch.nn.BatchNormNd (the oracle): state rules after
attribute changes (momentum, eps, buffers set to None), load_state_dict edge cases, serialization,
hooks, torch.func, dtype moves, and bnkit.convert on a parametrized layer.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.utils.parametrize as parametrize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.func import functional_call, stack_module_state, vmap

import bnkit
from bnkit import kernels

PAIRS = {
    1: (bnkit.BatchNorm1d, torch.nn.BatchNorm1d),
    2: (bnkit.BatchNorm2d, torch.nn.BatchNorm2d),
    3: (bnkit.BatchNorm3d, torch.nn.BatchNorm3d),
}
SPATIAL = {1: (), 2: (2, 2), 3: (1, 2, 2)}


def make_pair(rank=1, c=3, dtype=torch.float64, **kwargs):
    ours, theirs = PAIRS[rank]
    return ours(c, **kwargs).to(dtype), theirs(c, **kwargs).to(dtype)


def inputs(n, rank=1, c=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, c, *SPATIAL[rank])
    return torch.randn(shape, generator=g, dtype=torch.float64).mul(2.0).add(0.5).to(dtype)


def assert_same_state(ours, theirs, **tol):
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        torch.testing.assert_close(a[k], b[k], equal_nan=True, msg=lambda m, k=k: f"{k}: {m}", **tol)


def outcome(fn):
    """``("ok", result)`` or ``("raised", exception type)``."""
    try:
        return "ok", fn()
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return "raised", type(e)


# --------------------------------------------------------------------------- attribute changes


_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("train"), st.integers(0, 4)),
        st.tuples(st.just("eval"), st.integers(1, 4)),
        st.tuples(st.just("momentum"), st.sampled_from([None, 0.0, 0.1, 0.5, 1.0])),
        st.tuples(st.just("eps"), st.sampled_from([1e-5, 1e-3, 0.5])),
        st.tuples(st.just("track_running_stats"), st.booleans()),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=_OPS, rank=st.sampled_from([1, 2, 3]), affine=st.booleans(), momentum=st.sampled_from([None, 0.1]),
       seed=st.integers(0, 2**16))
def test_attribute_changes_between_calls_follow_torch(ops, rank, affine, momentum, seed):
    """torch reads momentum, eps and track_running_stats at every call; so does bnkit."""
    ours, theirs = make_pair(rank, momentum=momentum, affine=affine)
    for step, (op, value) in enumerate(ops):
        if op in ("train", "eval"):
            ours.train(op == "train")
            theirs.train(op == "train")
            x = inputs(value, rank, seed=seed + step)
            if op == "train" and x.numel() == 3:  # one value per channel: bnkit raises first (documented)
                continue
            torch.testing.assert_close(ours(x), theirs(x))
        else:
            setattr(ours, op, value)
            setattr(theirs, op, value)
        assert_same_state(ours, theirs)


def test_track_running_stats_turned_off_after_construction_still_uses_the_buffers_in_eval():
    ours, theirs = make_pair(2)
    x = inputs(4, 2)
    ours(x)
    theirs(x)
    for layer in (ours, theirs):
        layer.track_running_stats = False
    y = inputs(5, 2, seed=1)
    torch.testing.assert_close(ours(y), theirs(y))  # training: batch statistics, no update
    assert_same_state(ours, theirs)
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(ours(y), theirs(y))  # eval: torch still uses the registered buffers
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 1


@pytest.mark.parametrize("value", [torch.tensor([3]), torch.tensor(3, dtype=torch.int32), torch.tensor(3.0)])
def test_cumulative_average_with_an_assigned_num_batches_tracked(value):
    ours, theirs = make_pair(1, momentum=None)
    ours.num_batches_tracked = value.clone()
    theirs.num_batches_tracked = value.clone()
    for i in range(3):
        x = inputs(6, seed=i)
        torch.testing.assert_close(ours(x), theirs(x))
    assert_same_state(ours, theirs)


# --------------------------------------------------------------------------- state_dict


def trained_pair(**kwargs):
    ours, theirs = make_pair(1, **kwargs)
    for i in range(2):
        x = inputs(6, seed=i)
        ours(x)
        theirs(x)
    return ours, theirs


@pytest.mark.parametrize("nbt", [torch.tensor([7]), torch.tensor(7, dtype=torch.int32), torch.tensor(7.0)])
def test_load_num_batches_tracked_of_another_shape_or_dtype(nbt):
    ours, theirs = trained_pair()
    for layer in (ours, theirs):
        sd = layer.state_dict()
        sd["num_batches_tracked"] = nbt.clone()
        layer.load_state_dict(sd)
    assert_same_state(ours, theirs)
    assert ours.num_batches_tracked.shape == () and ours.num_batches_tracked.dtype == torch.long


def test_load_state_dict_results_and_errors_as_torch():
    ours, theirs = trained_pair()
    cases = [
        ("unexpected", lambda sd: sd.__setitem__("extra", torch.zeros(1)), False),
        ("unexpected", lambda sd: sd.__setitem__("extra", torch.zeros(1)), True),
        ("missing", lambda sd: sd.pop("running_var"), False),
        ("missing", lambda sd: sd.pop("running_var"), True),
        ("shape", lambda sd: sd.__setitem__("running_mean", torch.zeros(4, dtype=torch.float64)), False),
        ("shape", lambda sd: sd.__setitem__("running_mean", torch.zeros(4, dtype=torch.float64)), True),
    ]
    for what, edit, strict in cases:
        results = []
        for layer in (ours, theirs):
            sd = layer.state_dict()
            edit(sd)
            results.append(outcome(lambda layer=layer, sd=sd, strict=strict: tuple(map(list, layer.load_state_dict(sd, strict=strict)))))
        assert results[0] == results[1], (what, strict, results)
        assert_same_state(ours, theirs)


def test_version_one_checkpoint_into_a_meta_layer_with_assign():
    ours, theirs = trained_pair()
    loaded = []
    for src, cls in ((ours, bnkit.BatchNorm1d), (theirs, torch.nn.BatchNorm1d)):
        sd = src.state_dict()
        del sd["num_batches_tracked"]
        sd._metadata[""]["version"] = 1
        layer = cls(3, device="meta", dtype=torch.float64)
        layer.load_state_dict(sd, assign=True)
        loaded.append(layer)
    assert_same_state(*loaded)
    x = inputs(5)
    torch.testing.assert_close(loaded[0](x), loaded[1](x))
    assert_same_state(*loaded)


def test_version_one_checkpoint_keeps_an_int32_count():
    ours, theirs = trained_pair()
    for layer in (ours, theirs):
        sd = layer.state_dict()
        del sd["num_batches_tracked"]
        sd._metadata[""]["version"] = 1
        layer.num_batches_tracked = torch.tensor(5, dtype=torch.int32)
        layer.load_state_dict(sd)
    assert_same_state(ours, theirs)


def test_tracked_layer_from_an_untracked_state_dict_non_strict():
    for version in (1, 2):
        results = []
        for ours_cls in (bnkit.BatchNorm1d, torch.nn.BatchNorm1d):
            sd = ours_cls(3, track_running_stats=False).state_dict()
            sd._metadata[""]["version"] = version
            layer = ours_cls(3)
            r = layer.load_state_dict(sd, strict=False)
            results.append((r.missing_keys, r.unexpected_keys, int(layer.num_batches_tracked)))
        assert results[0] == results[1], version


# --------------------------------------------------------------------------- copies and serialization


def _round_trips():
    def save_whole(model):
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)

    return [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m)), save_whole]


@pytest.mark.parametrize("round_trip", _round_trips(), ids=["deepcopy", "pickle", "torch.save"])
def test_copies_keep_training_like_torch(round_trip):
    ours, theirs = (torch.nn.Sequential(layer) for layer in make_pair(2, momentum=None))
    x = inputs(4, 2)
    ours(x)
    theirs(x)
    ours, theirs = round_trip(ours), round_trip(theirs)
    y = inputs(4, 2, seed=1)
    torch.testing.assert_close(ours(y), theirs(y))
    assert_same_state(ours, theirs)
    ours[0].momentum = theirs[0].momentum = 0.3
    torch.testing.assert_close(ours(y), theirs(y))
    assert_same_state(ours, theirs)


@pytest.mark.parametrize("convert", ["double", "half", "bfloat16", "float"])
@pytest.mark.parametrize("training", [True, False])
def test_dtype_moves_then_forward(convert, training):
    ours, theirs = (getattr(layer, convert)() for layer in make_pair(2, dtype=torch.float32))
    ours.train(training)
    theirs.train(training)
    dtype = ours.weight.dtype
    x = inputs(4, 2, dtype=dtype)
    a, b = ours(x), theirs(x)
    assert a.dtype == b.dtype == dtype
    tol = {"atol": 5e-2, "rtol": 5e-2} if dtype in (torch.float16, torch.bfloat16) else {}
    torch.testing.assert_close(a, b, **tol)
    assert_same_state(ours, theirs, **tol)
    assert ours.num_batches_tracked.dtype == torch.long


# --------------------------------------------------------------------------- hooks, reset, apply


def test_forward_and_backward_hooks_see_the_same_as_torch():
    records = []
    for layer in make_pair(2):
        rec = []
        layer.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
        layer.register_forward_hook(lambda m, args, out: out + 1)
        layer.register_full_backward_pre_hook(lambda m, go, rec=rec: rec.append([g.clone() for g in go]))
        layer.register_full_backward_hook(lambda m, gi, go, rec=rec: rec.append([g.clone() for g in gi]))
        x = inputs(3, 2).requires_grad_()
        layer(x).pow(2).sum().backward()
        records.append((rec, x.grad, layer.weight.grad, layer.state_dict()))
    (r1, gx1, gw1, s1), (r2, gx2, gw2, s2) = records
    assert len(r1) == len(r2) == 2
    for a, b in zip(r1, r2):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(gx1, gx2)
    torch.testing.assert_close(gw1, gw2)
    torch.testing.assert_close(dict(s1), dict(s2))


def test_reset_and_apply_as_torch():
    ours, theirs = make_pair(2)
    x = inputs(4, 2)
    ours(x)
    theirs(x)

    def init(m):
        if hasattr(m, "running_mean"):
            with torch.no_grad():
                m.weight.fill_(2.0)
                m.bias.fill_(-1.0)

    for layer in (ours, theirs):
        torch.nn.Sequential(layer).apply(init)
        layer.reset_running_stats()
    assert_same_state(ours, theirs)
    torch.testing.assert_close(ours.weight, theirs.weight)
    for layer in (ours, theirs):
        layer.reset_parameters()
    assert_same_state(ours, theirs)
    torch.testing.assert_close(ours(x), theirs(x))


# --------------------------------------------------------------------------- torch.func, inference mode


@pytest.mark.parametrize("training", [True, False])
def test_functional_call_with_replaced_buffers_updates_them_not_the_module(training):
    results = []
    for layer in make_pair(2):
        layer.train(training)
        buffers = {"running_mean": torch.full((3,), 0.5, dtype=torch.float64),
                   "running_var": torch.full((3,), 2.0, dtype=torch.float64),
                   "num_batches_tracked": torch.tensor(4)}
        params = {"weight": torch.full((3,), 3.0, dtype=torch.float64)}
        y = functional_call(layer, {**params, **buffers}, (inputs(4, 2),))
        results.append((y, buffers, layer.state_dict()))
    (y1, b1, s1), (y2, b2, s2) = results
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(b1, b2)
    torch.testing.assert_close(dict(s1), dict(s2))


@pytest.mark.parametrize("training", [True, False])
def test_vmap_over_stacked_models_as_torch(training):
    results = []
    for cls in PAIRS[2]:
        torch.manual_seed(0)
        models = [cls(3).double().train(training) for _ in range(3)]
        for m in models:
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
        params, buffers = stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")
        xs = torch.stack([inputs(4, 2, seed=i) for i in range(3)])
        ys = vmap(lambda p, b, x, base=base: functional_call(base, (p, b), (x,)))(params, buffers, xs)
        results.append((ys, buffers))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_training_under_inference_mode_and_a_layer_made_there():
    ours, theirs = make_pair(2)
    x = inputs(4, 2)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), theirs(x))
    assert_same_state(ours, theirs)
    with torch.inference_mode():
        made = make_pair(2)
    outs = [outcome(lambda m=m: m(x)) for m in made]
    assert outs[0][0] == outs[1][0]
    if outs[0][0] == "ok":
        torch.testing.assert_close(outs[0][1], outs[1][1])
    else:
        assert issubclass(outs[0][1], outs[1][1])


# --------------------------------------------------------------------------- attributes set after construction


def test_negative_momentum_set_after_construction_updates_like_torch():
    if not kernels.cpp_available():
        pytest.skip("the C++ extension is not available")
    with kernels.use_backend("cpp"):
        ours, theirs = make_pair(1, dtype=torch.float32)
        ours.momentum = theirs.momentum = -0.5  # accepted by both after construction
        x = inputs(6, dtype=torch.float32)
        ours(x)
        theirs(x)
        assert_same_state(ours, theirs)


def test_negative_eps_in_eval_raises_value_error_like_torch(backend):
    ours, theirs = make_pair(2, dtype=torch.float32)
    for layer in (ours, theirs):
        layer.eval()
        layer.eps = -1e-3
    x = inputs(4, 2, dtype=torch.float32)
    with pytest.raises(ValueError):
        theirs(x)
    with pytest.raises(ValueError):
        ours(x)


@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_eval_with_one_running_buffer_none_raises_runtime_error_like_torch(name):
    ours, theirs = make_pair(1)
    for layer in (ours, theirs):
        setattr(layer, name, None)
        layer.eval()
    x = inputs(4)
    with pytest.raises(RuntimeError, match=f"{name} must be defined in evaluation mode"):
        theirs(x)
    with pytest.raises(bnkit.MissingStatisticsError, match=f"{name} must be defined in evaluation mode") as e:
        ours(x)
    assert isinstance(e.value, RuntimeError) and isinstance(e.value, ValueError)  # torch's type and bnkit's earlier one


def test_training_without_running_buffers_still_counts_batches_like_torch():
    ours, theirs = make_pair(1)
    for layer in (ours, theirs):
        layer.running_mean = None
        layer.running_var = None
    for i in range(2):
        x = inputs(4, seed=i)
        torch.testing.assert_close(ours(x), theirs(x))
    assert int(theirs.num_batches_tracked) == 2
    assert int(ours.num_batches_tracked) == 2


def test_cumulative_average_without_num_batches_tracked_as_torch():
    ours, theirs = make_pair(1, momentum=None)
    x = inputs(6)
    ours(x)
    theirs(x)
    for layer in (ours, theirs):
        layer.num_batches_tracked = None
    y = inputs(6, seed=1)
    torch.testing.assert_close(ours(y), theirs(y))
    assert_same_state(ours, theirs)


def test_convert_leaves_a_layer_with_a_parametrized_weight_and_says_why():
    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3).double())
    parametrize.register_parametrization(model[0], "weight", Double())
    keys = list(model.state_dict())
    x = inputs(4, 2)
    expected = model(x)
    converted, rep = bnkit.convert(model, report=True)
    assert rep.converted == [] and [(name, why.split(":")[0]) for name, _, why in rep.left] == [
        ("0", "a parametrized layer (torch.nn.utils.parametrize)")]
    assert parametrize.is_parametrized(converted[0], "weight")  # left as it is: still the parametrized torch layer
    torch.testing.assert_close(converted(x), expected)
    assert list(converted.state_dict()) == keys
    with pytest.warns(UserWarning, match="parametrized"):  # without report=True the layer left is a warning
        bnkit.convert(model)


@pytest.mark.parametrize("kwargs", [{"eps": 0.0}, {"momentum": 1.5}, {"momentum": -0.5}, {"momentum": None}])
def test_convert_carries_values_bnkits_constructor_refuses(kwargs):
    """A torch layer may hold an eps or momentum bnkit's constructor rejects; the converted layer keeps it
    and behaves as the torch layer does: the same outputs and state, or the same error (after which bnkit's
    state is unchanged, where torch has counted the batch: docs/differences.md)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3, **kwargs).double())
    ref = copy.deepcopy(model)
    converted = bnkit.convert(model)
    assert isinstance(converted[0], bnkit.BatchNorm2d)
    for step in range(3):
        training = step < 2
        converted.train(training)
        ref.train(training)
        x = inputs(4, 2, seed=step)
        before = copy.deepcopy(converted[0].state_dict())
        results = [outcome(lambda m=m, x=x: m(x)) for m in (converted, ref)]
        if results[1][0] == "ok":
            assert results[0][0] == "ok"
            torch.testing.assert_close(results[0][1], results[1][1], equal_nan=True)
            assert_same_state(converted[0], ref[0])
        else:
            assert results[0][0] == "raised" and issubclass(results[0][1], results[1][1])
            for k, v in converted[0].state_dict().items():
                assert torch.equal(v, before[k]), k
            ref[0].load_state_dict(before)
