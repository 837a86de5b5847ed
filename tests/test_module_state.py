"""nn.Module machinery and state of bnkit's layers and variants, against torch's own BN (the oracle).

Every trainable variant has a configuration that computes torch's ``BatchNorm2d`` (Ghost BN with one
virtual batch, Batch Renorm in its warm-up, Shared BN at one site, Domain BN of one domain, BN+ReLU,
SyncBatchNorm on one process): the same tool (meta construction, dtype moves, checkpoints, copies,
hooks, parametrize, attribute changes, fusion) is run on it and on a torch twin, and the results must
agree. The frozen layers are compared with what torch's BN gives for their state. The plain drop-ins
(``bnkit.BatchNorm1d/2d/3d``) are covered by test_dropin*.py and test_layers.py; they appear here only
as the first row of each table.
"""

from __future__ import annotations

import copy
import io
import pickle
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

import bnkit
from bnkit.variants import BatchNormAct2d, FrozenBatchNormAct2d

D = torch.float64
C = 3


class TorchBNReLU(nn.BatchNorm2d):
    """The oracle of ``BatchNormAct2d(act=nn.ReLU())``: torch's BN, then ReLU, as one module (hooks see both)."""

    def forward(self, x):
        return torch.relu(super().forward(x))


@dataclass
class Spec:
    make: Callable[..., nn.Module]  # (**factory/flags) -> the bnkit layer
    oracle: Callable[..., nn.Module]  # (**the same) -> the torch twin
    call: Callable = staticmethod(lambda m, x: m(x))
    row: int | None = None  # per-site / per-domain layers: the row of their tensors the twin stands for
    torch_shaped: bool = True  # state_dict keys and shapes are the torch twin's


EQ = {
    "bn": Spec(lambda **k: bnkit.BatchNorm2d(C, **k), lambda **k: nn.BatchNorm2d(C, **k)),
    "generic": Spec(lambda **k: bnkit.BatchNorm(C, **k), lambda **k: nn.BatchNorm2d(C, **k)),
    "ghost": Spec(lambda **k: bnkit.GhostBatchNorm2d(C, 64, **k), lambda **k: nn.BatchNorm2d(C, **k)),
    "renorm": Spec(
        lambda momentum=0.1, **k: bnkit.BatchRenorm2d(C, momentum=momentum, warmup_steps=10**6, r_max_steps=10**6,
                                                      d_max_steps=10**6, **k),
        lambda **k: nn.BatchNorm2d(C, **k)),
    "shared_pooled": Spec(lambda **k: bnkit.SharedBatchNorm(C, 2, share_stats=True, **k),
                          lambda **k: nn.BatchNorm2d(C, **k), call=lambda m, x: m(x, site=1)),
    "shared_per_site": Spec(lambda **k: bnkit.SharedBatchNorm(C, 2, **k), lambda **k: nn.BatchNorm2d(C, **k),
                            call=lambda m, x: m(x, site=1), row=1, torch_shaped=False),
    "domain": Spec(lambda **k: bnkit.DomainBatchNorm2d(C, 2, **k), lambda **k: nn.BatchNorm2d(C, **k),
                   call=lambda m, x: m(x, domain=1), row=1, torch_shaped=False),
    "act": Spec(lambda **k: BatchNormAct2d(C, act=nn.ReLU(), **k), lambda **k: TorchBNReLU(C, **k)),
    "sync": Spec(lambda **k: bnkit.SyncBatchNorm(C, **k), lambda **k: nn.SyncBatchNorm(C, **k)),
}
TORCH_SHAPED = [k for k, s in EQ.items() if s.torch_shaped]
FROZEN = {
    "frozen": lambda **k: bnkit.FrozenBatchNorm2d(C, **k),
    "frozen_act": lambda **k: FrozenBatchNormAct2d(C, act=nn.ReLU(), **k),
}




def x_of(i, dtype=D, n=4):
    g = torch.Generator().manual_seed(i)
    return (torch.randn(n, C, 2, 2, generator=g, dtype=D) * 2 + 1).to(dtype)


def view(spec, m):
    """``m``'s state in the twin's terms: the row ``spec.row`` of per-site/per-domain tensors."""
    out = {}
    for k, v in m.state_dict().items():
        if spec.row is not None and k != "num_batches_tracked" and v.dim() == 2:
            v = v[spec.row]
        elif spec.row is not None and k == "num_batches_tracked":
            v = v[spec.row]
        out[k] = v
    return out


def assert_like_twin(spec, m, t, **tol):
    ours, theirs = view(spec, m), t.state_dict()
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype, k
        torch.testing.assert_close(ours[k], v, msg=lambda s, k=k: f"{k}: {s}", **tol)


def randomize(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in m.state_dict().values():
            if v.is_floating_point():
                v.copy_(torch.rand(v.shape, generator=g, dtype=D).to(v.dtype) + 0.5)
            else:
                v.fill_(7)
    return m


def outcome(fn):
    try:
        return "ok", fn()
    except Exception as e:  # noqa: BLE001 - the type is compared
        return "raised", e


# =========================================================================== construction and dtype


@pytest.mark.parametrize("kind", list(EQ) + list(FROZEN) + ["renorm_keras", "frozen_shared"])
def test_meta_construction_then_to_empty_and_reset_is_a_fresh_layer(kind):
    """torch: ``BN(device="meta").to_empty(device="cpu").reset_parameters()`` is a freshly built layer;
    the variants' reset is ``reset_parameters`` where they have one (the frozen layers, like torchvision's
    FrozenBatchNorm2d, have none: they get their state from a checkpoint, tested below)."""
    make = {"renorm_keras": lambda **k: bnkit.BatchRenorm2d(C, convention="keras", **k),
            "frozen_shared": lambda **k: bnkit.FrozenSharedBatchNorm(C, 2, **k)}.get(kind)
    make = make or FROZEN.get(kind) or EQ[kind].make
    t = nn.BatchNorm2d(C, device="meta", dtype=D).to_empty(device="cpu")
    t.reset_parameters()
    assert all(torch.equal(a, b) for a, b in zip(t.state_dict().values(), nn.BatchNorm2d(C, dtype=D).state_dict().values()))
    m = make(device="meta", dtype=D)
    assert all(v.device.type == "meta" for v in m.state_dict().values())
    m.to_empty(device="cpu")
    if not hasattr(m, "reset_parameters"):  # a frozen layer: filled from a checkpoint
        m.load_state_dict(make(dtype=D).state_dict())
    else:
        m.reset_parameters()
    fresh = make(dtype=D)
    assert list(m.state_dict()) == list(fresh.state_dict())
    for k, v in fresh.state_dict().items():
        got = m.state_dict()[k]
        assert got.device.type == "cpu" and got.dtype == v.dtype and torch.equal(got, v), k
    if kind in EQ:
        assert_like_twin(EQ[kind], m, t)
        x = x_of(0)
        torch.testing.assert_close(EQ[kind].call(m, x), EQ[kind].call(fresh, x))


_MOVES = {
    "dtype=": lambda make: make(dtype=D),
    "double()": lambda make: make().double(),
    "to(float64)": lambda make: make().to(torch.float64),
    "half()": lambda make: make().half(),
    "bfloat16()": lambda make: make().bfloat16(),
    "double().float()": lambda make: make().double().float(),
}


@pytest.mark.parametrize("move", list(_MOVES))
@pytest.mark.parametrize("kind", list(EQ) + list(FROZEN) + ["renorm_keras"])
def test_factory_kwargs_and_dtype_moves_give_torchs_dtypes(kind, move):
    """Floating tensors take the dtype, ``num_batches_tracked`` stays int64 and parameters stay trainable
    Parameters, as torch's BN under the same move; the twins then compute the same."""
    make = FROZEN.get(kind) or (lambda **k: bnkit.BatchRenorm2d(C, convention="keras", **k)
                                if kind == "renorm_keras" else EQ[kind].make(**k))
    m, t = _MOVES[move](make), _MOVES[move](lambda **k: nn.BatchNorm2d(C, **k))
    theirs = {k: v.dtype for k, v in t.state_dict().items()}
    for k, v in m.state_dict().items():
        assert v.dtype == theirs.get(k, theirs["running_mean"]), (k, v.dtype)
    assert [(n, type(p), p.requires_grad) for n, p in m.named_parameters()] == (
        [] if kind in FROZEN else [(n, type(p), p.requires_grad) for n, p in t.named_parameters()])
    if kind in EQ:
        spec = EQ[kind]
        t = _MOVES[move](spec.oracle)
        dtype = t.weight.dtype
        tol = {"atol": 5e-2, "rtol": 5e-2} if dtype in (torch.float16, torch.bfloat16) else {}
        for training in (True, False):
            m.train(training)
            t.train(training)
            a, b = spec.call(m, x_of(0, dtype)), t(x_of(0, dtype))
            assert a.dtype == b.dtype == dtype
            torch.testing.assert_close(a, b, **tol)
        assert_like_twin(spec, m, t, **tol)


_FLAGS = [{"affine": False}, {"track_running_stats": False}, {"bias": False}, {"affine": False, "track_running_stats": False}]


@pytest.mark.parametrize("flags", _FLAGS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
@pytest.mark.parametrize("kind", list(EQ) + list(FROZEN))
def test_flag_combinations_register_parameters_and_buffers_like_torch(kind, flags):
    """``affine=False`` / ``track_running_stats=False`` / ``bias=False``: the same names registered (as None
    where torch registers None), the same state_dict keys, named_parameters and named_buffers."""
    if kind == "renorm" and not flags.get("track_running_stats", True):
        pytest.skip("Batch Renorm refuses track_running_stats=False (documented: it would be plain BN)")
    if kind in FROZEN and "track_running_stats" in flags:
        pytest.skip("a frozen layer always has running statistics")
    t = nn.BatchNorm2d(C, **flags)
    if kind in FROZEN:
        m = FROZEN[kind](**flags)
        # the frozen map keeps weight/bias as buffers: what torch registers as parameters is buffers there
        assert list(m.state_dict()) == list(t.state_dict())
        assert {n for n, _ in m.named_buffers()} == {n for n, _ in t.named_buffers()} | {
            n for n, _ in t.named_parameters()}
        assert [n for n, v in m._buffers.items() if v is None] == [n for n, v in {**t._parameters, **t._buffers}.items()
                                                                   if v is None]
        return
    m = EQ[kind].make(**flags)
    assert {k: v is None for k, v in m._parameters.items()} == {k: v is None for k, v in t._parameters.items()}
    assert {k: v is None for k, v in m._buffers.items()} == {k: v is None for k, v in t._buffers.items()}
    assert list(m.state_dict()) == list(t.state_dict())
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in t.named_parameters()]
    assert [n for n, _ in m.named_buffers()] == [n for n, _ in t.named_buffers()]
    assert m.state_dict()._metadata[""]["version"] == t.state_dict()._metadata[""]["version"]


# =========================================================================== checkpoints


@pytest.mark.parametrize("kind", TORCH_SHAPED + list(FROZEN))
def test_torch_checkpoint_loads_strictly_both_ways(kind):
    src = randomize(nn.BatchNorm2d(C, dtype=D), seed=1)
    m = (FROZEN.get(kind) or EQ[kind].make)(dtype=D)
    assert tuple(map(list, m.load_state_dict(src.state_dict(), strict=True))) == ([], [])
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    back = nn.BatchNorm2d(C, dtype=D)
    assert tuple(map(list, back.load_state_dict(randomize(m, seed=2).state_dict(), strict=True))) == ([], [])
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    m.eval()
    back.eval()
    x = x_of(3)
    expected = torch.relu(back(x)) if kind in ("act", "frozen_act") else back(x)
    call = EQ[kind].call if kind in EQ else (lambda layer, x: layer(x))
    torch.testing.assert_close(call(m, x), expected)


@pytest.mark.parametrize("versioned", [True, False], ids=["version-1", "plain-dict"])
@pytest.mark.parametrize("kind", list(EQ) + list(FROZEN))
def test_legacy_checkpoint_without_num_batches_tracked_keeps_the_count_like_torch(kind, versioned):
    """torch's BN (version < 2, or a dict without metadata) keeps the layer's count when the checkpoint has
    none, strictly; per-site/per-domain counts are kept the same way."""
    make = FROZEN.get(kind) or EQ[kind].make
    src = randomize(make(dtype=D), seed=1)
    results = []
    for layer in (make(dtype=D), nn.BatchNorm2d(C, dtype=D)):
        layer.num_batches_tracked.fill_(5)
        sd = src.state_dict() if layer.__module__.startswith("bnkit") else randomize(nn.BatchNorm2d(C, dtype=D)).state_dict()
        del sd["num_batches_tracked"]
        if versioned:
            sd._metadata[""]["version"] = 1
        else:
            sd = dict(sd)
        r = layer.load_state_dict(sd, strict=True)
        results.append((r.missing_keys, r.unexpected_keys, layer.num_batches_tracked.unique().tolist()))
        if layer.__module__.startswith("bnkit"):
            for k, v in sd.items():
                assert torch.equal(layer.state_dict()[k], v), k
    assert results[0] == results[1] == ([], [], [5])


@pytest.mark.parametrize("kind", list(EQ) + list(FROZEN) + ["frozen_shared"])
def test_legacy_checkpoint_into_a_meta_layer_with_assign_leaves_nothing_on_meta(kind):
    """torch: a checkpoint without num_batches_tracked loaded with ``assign=True`` into a layer built on
    the meta device gets ``tensor(0)`` on the CPU for the count (a meta count cannot be read or moved)."""
    make = {"frozen_shared": lambda **k: bnkit.FrozenSharedBatchNorm(C, 2, **k)}.get(kind) or FROZEN.get(kind) \
        or EQ[kind].make
    loaded = []
    for build in (make, lambda **k: nn.BatchNorm2d(C, **k)):
        sd = randomize(build(dtype=D), seed=1).state_dict()
        del sd["num_batches_tracked"]
        layer = build(device="meta", dtype=D)
        layer.load_state_dict(dict(sd), assign=True)
        loaded.append(layer)
    m, t = loaded
    assert t.num_batches_tracked.device.type == "cpu" and int(t.num_batches_tracked) == 0
    assert {k: v.device.type for k, v in m.state_dict().items()} == {k: "cpu" for k in m.state_dict()}
    assert m.num_batches_tracked.unique().tolist() == [0]
    m.to(torch.float32).to("cpu")  # moves as torch's layer does
    t.to(torch.float32).to("cpu")


@pytest.mark.parametrize("kind", TORCH_SHAPED + list(FROZEN))
def test_size_mismatch_raises_torchs_error_and_changes_nothing(kind):
    m = (FROZEN.get(kind) or EQ[kind].make)(dtype=D)
    t = nn.BatchNorm2d(C, dtype=D)
    errors = []
    for layer in (m, t):
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        sd = randomize(copy.deepcopy(layer), seed=3).state_dict()
        sd["running_var"] = torch.ones(C + 1, dtype=D)
        with pytest.raises(RuntimeError) as e:
            layer.load_state_dict(sd)
        errors.append(e)
        # (torch copies the tensors that fit before it raises: the mismatched one is what must stay)
        assert torch.equal(layer.running_var, before["running_var"])
    ours, theirs = (str(e.value).split("\n", 1) for e in errors)
    assert type(errors[0].value) is type(errors[1].value)
    assert ours[0] == theirs[0].replace("BatchNorm2d", type(m).__name__)
    assert ours[1] == theirs[1]


@pytest.mark.parametrize("kind", TORCH_SHAPED + list(FROZEN))
def test_non_strict_load_reports_missing_and_unexpected_keys_like_torch(kind):
    m = (FROZEN.get(kind) or EQ[kind].make)(dtype=D)
    t = nn.BatchNorm2d(C, dtype=D)
    src = randomize(nn.BatchNorm2d(C, dtype=D), seed=4).state_dict()
    src.pop("running_var")
    src["extra"] = torch.zeros(1)
    src["running_mean_typo"] = torch.zeros(C)
    r_m, r_t = m.load_state_dict(copy.copy(src), strict=False), t.load_state_dict(copy.copy(src), strict=False)
    assert (r_m.missing_keys, r_m.unexpected_keys) == (r_t.missing_keys, r_t.unexpected_keys)
    for k, v in t.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    for layer in (m, t):
        with pytest.raises(RuntimeError, match='Missing key\\(s\\) in state_dict: "running_var"'):
            layer.load_state_dict(copy.copy(src), strict=True)


def _train_steps(spec, m, t, start, steps=2):
    for i in range(start, start + steps):
        torch.testing.assert_close(spec.call(m, x_of(i)), t(x_of(i)))


@pytest.mark.parametrize("kind", list(EQ) + ["renorm_keras"])
def test_state_dict_saved_and_loaded_with_weights_only_continues_like_never_saved(kind):
    """``torch.load(weights_only=True)`` works on every layer's state_dict (only tensors in it); a layer
    loaded from it trains on exactly like its torch twin (and like the layer that was never saved)."""
    if kind == "renorm_keras":
        spec = Spec(lambda **k: bnkit.BatchRenorm2d(C, convention="keras", schedule="fixed", **k),
                    lambda **k: nn.BatchNorm2d(C, **k), torch_shaped=False)
    else:
        spec = EQ[kind]
    m, t = spec.make(dtype=D, momentum=None), spec.oracle(dtype=D, momentum=None)
    straight = copy.deepcopy(m)
    for i in range(2):
        spec.call(m, x_of(i))
        spec.call(straight, x_of(i))
        t(x_of(i))
    states = []
    for layer in (m, t):
        buf = io.BytesIO()
        torch.save(layer.state_dict(), buf)
        buf.seek(0)
        states.append(torch.load(buf, weights_only=True))
    m2, t2 = spec.make(dtype=D, momentum=None), spec.oracle(dtype=D, momentum=None)
    m2.load_state_dict(states[0], strict=True)
    t2.load_state_dict(states[1], strict=True)
    for i in range(2, 4):
        y = spec.call(m2, x_of(i))
        torch.testing.assert_close(y, spec.call(straight, x_of(i)), rtol=0, atol=0)
        if kind != "renorm_keras":
            torch.testing.assert_close(y, t2(x_of(i)))
    for k, v in straight.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v), k
    if kind != "renorm_keras":
        assert_like_twin(spec, m2, t2)


def _save_whole(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


_ROUND_TRIPS = {"deepcopy": copy.deepcopy, "pickle": lambda m: pickle.loads(pickle.dumps(m)), "torch.save": _save_whole}


@pytest.mark.parametrize("round_trip", list(_ROUND_TRIPS))
@pytest.mark.parametrize("kind", list(EQ))
def test_copies_of_a_whole_model_keep_training_like_torch(kind, round_trip):
    spec = EQ[kind]
    m, t = spec.make(dtype=D, momentum=None), spec.oracle(dtype=D, momentum=None)
    _train_steps(spec, m, t, 0)
    m, t = _ROUND_TRIPS[round_trip](m), _ROUND_TRIPS[round_trip](t)
    assert type(m) is type(spec.make())
    _train_steps(spec, m, t, 2)
    assert_like_twin(spec, m, t)
    m.momentum = t.momentum = 0.3
    _train_steps(spec, m, t, 4)
    assert_like_twin(spec, m, t)
    m.eval()
    t.eval()
    torch.testing.assert_close(spec.call(m, x_of(9)), t(x_of(9)))


# =========================================================================== module tools: hooks, parametrize, grads


@pytest.mark.parametrize("kind", list(EQ))
def test_forward_and_full_backward_hooks_see_what_torch_shows(kind):
    spec = EQ[kind]
    records = []
    for layer, call in ((spec.make(dtype=D), spec.call), (spec.oracle(dtype=D), lambda t, x: t(x))):
        rec = []
        layer.register_forward_pre_hook(lambda mod, args: (args[0] * 2, *args[1:]))
        layer.register_forward_hook(lambda mod, args, out: out + 1)
        layer.register_full_backward_pre_hook(lambda mod, go, rec=rec: rec.append(("pre", go[0].clone())))
        layer.register_full_backward_hook(lambda mod, gi, go, rec=rec: rec.append(("post", gi[0].clone())))
        x = x_of(0).requires_grad_()
        y = call(layer, x)
        y.pow(2).sum().backward()
        records.append((y.detach(), rec, x.grad, layer.weight.grad, layer))
    (y1, r1, gx1, gw1, m), (y2, r2, gx2, gw2, t) = records
    torch.testing.assert_close(y1, y2)
    assert [k for k, _ in r1] == [k for k, _ in r2] == ["pre", "post"]
    for (_, a), (_, b) in zip(r1, r2):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(gx1, gx2)
    torch.testing.assert_close(gw1 if spec.row is None or gw1.dim() == 1 else gw1[spec.row], gw2)
    assert_like_twin(spec, m, t)


class _Positive(nn.Module):
    def forward(self, w):
        return nn.functional.softplus(w)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kind", list(EQ))
def test_parametrized_weight_and_bias_like_torch(kind, training):
    spec = EQ[kind]
    outs = []
    m, t = randomize(spec.make(dtype=D), seed=5), spec.oracle(dtype=D)
    t.load_state_dict(view(spec, m))
    for layer, call in ((m, spec.call), (t, lambda t, x: t(x))):
        parametrize.register_parametrization(layer, "weight", _Positive())
        parametrize.register_parametrization(layer, "bias", _Positive())
        layer.train(training)
        x = x_of(1).requires_grad_()
        y = call(layer, x)
        (y ** 3).sum().backward()
        pw = layer.parametrizations.weight.original
        outs.append((y, x.grad, pw.grad, layer))
    (y1, g1, w1, m), (y2, g2, w2, t) = outs
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(w1[spec.row] if spec.row is not None and w1.dim() == 2 else w1, w2)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(view(spec, m)[name], t.state_dict()[name])
    assert list(m.state_dict()) == list(t.state_dict())  # parametrizations.weight.original, ... as torch


@pytest.mark.parametrize("kind", list(EQ))
def test_requires_grad_false_freezes_parameters_like_torch(kind):
    spec = EQ[kind]
    res = []
    for layer, call in ((spec.make(dtype=D), spec.call), (spec.oracle(dtype=D), lambda t, x: t(x))):
        layer.requires_grad_(False)
        x = x_of(2).requires_grad_()
        y = call(layer, x)
        (y ** 2).sum().backward()
        res.append((y, x.grad, [p.grad for p in layer.parameters()], [p.requires_grad for p in layer.parameters()]))
    torch.testing.assert_close(res[0][0], res[1][0])
    torch.testing.assert_close(res[0][1], res[1][1])
    assert res[0][2] == res[1][2] == [None, None]
    assert res[0][3] == res[1][3] == [False, False]


# =========================================================================== attributes after construction


_SCHEDULE = [(0.1, 1e-5), (None, 1e-5), (None, 0.5), (0.7, 0.5), (0.0, 1e-3), (None, 1e-3)]


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("kind", list(EQ))
def test_momentum_and_eps_set_after_construction_take_effect_like_torch(kind, momentum):
    spec = EQ[kind]
    m, t = spec.make(dtype=D, momentum=momentum), spec.oracle(dtype=D, momentum=momentum)
    for i in range(3):  # momentum as constructed (None: the cumulative average over several steps)
        torch.testing.assert_close(spec.call(m, x_of(i)), t(x_of(i)))
        assert_like_twin(spec, m, t)
    for i, (mom, eps) in enumerate(_SCHEDULE, 3):
        for layer in (m, t):
            layer.momentum, layer.eps = mom, eps
        torch.testing.assert_close(spec.call(m, x_of(i)), t(x_of(i)))
        assert_like_twin(spec, m, t)
        m.eval()
        t.eval()
        torch.testing.assert_close(spec.call(m, x_of(20 + i)), t(x_of(20 + i)))  # the eval map reads eps too
        m.train()
        t.train()


@pytest.mark.parametrize("kind", [k for k in EQ if k != "renorm"])
def test_track_running_stats_turned_off_after_training_as_torch(kind):
    """torch: training then uses batch statistics without updating; eval still uses the registered
    running statistics (renorm refuses track_running_stats=False, documented)."""
    spec = EQ[kind]
    m, t = spec.make(dtype=D), spec.oracle(dtype=D)
    _train_steps(spec, m, t, 0)
    for layer in (m, t):
        layer.track_running_stats = False
    _train_steps(spec, m, t, 2)
    assert_like_twin(spec, m, t)
    m.eval()
    t.eval()
    torch.testing.assert_close(spec.call(m, x_of(9)), t(x_of(9)))
    assert_like_twin(spec, m, t)


@pytest.mark.parametrize("kind,which", [(k, w) for k in EQ for w in ("running_mean", "running_var")])
def test_eval_with_one_running_buffer_set_to_none_raises_like_torch(kind, which):
    spec = EQ[kind]
    m, t = spec.make(dtype=D).eval(), spec.oracle(dtype=D).eval()
    for layer in (m, t):
        setattr(layer, which, None)
    with pytest.raises(RuntimeError, match=f"{which} must be defined in evaluation mode"):
        t(x_of(0))
    with pytest.raises(RuntimeError, match=f"{which} must be defined in evaluation mode"):
        spec.call(m, x_of(0))


def test_pooled_shared_layer_with_num_batches_tracked_none_loads_a_legacy_checkpoint_like_torch():
    results = []
    for layer in (bnkit.SharedBatchNorm(C, 2, share_stats=True), nn.BatchNorm2d(C)):
        layer.num_batches_tracked = None
        sd = randomize(nn.BatchNorm2d(C)).state_dict()
        del sd["num_batches_tracked"]
        sd._metadata[""]["version"] = 1
        r = layer.load_state_dict(sd, strict=False)
        results.append((r.missing_keys, r.unexpected_keys, layer.running_mean.clone()))
    assert results[0][:2] == results[1][:2]
    torch.testing.assert_close(results[0][2], results[1][2])


# =========================================================================== fusion


def _expanded_twin(bn):
    """torch's BatchNorm2d with ``bn``'s eval map (one-element weight/bias of share_affine expanded)."""
    t = nn.BatchNorm2d(C, dtype=D, affine=bn.weight is not None)
    with torch.no_grad():
        t.running_mean.copy_(bn.running_mean)
        t.running_var.copy_(bn.running_var)
        if bn.weight is not None:
            t.weight.copy_(bn.weight.expand(C))
            t.bias.copy_(bn.bias.expand(C) if bn.bias is not None else torch.zeros(C))
    t.eps = bn.eps
    return t.eval()


_FUSABLE = {
    **{k: EQ[k].make for k in ("bn", "generic", "ghost", "renorm", "shared_pooled", "sync")},
    "share_weight": lambda **k: bnkit.BatchNorm2d(C, share_affine="weight", **k),
    "share_all": lambda **k: bnkit.BatchNorm2d(C, share_affine="all", **k),
    "no_bias": lambda **k: bnkit.BatchNorm2d(C, bias=False, **k),
    "no_affine": lambda **k: bnkit.BatchNorm2d(C, affine=False, **k),
    "frozen": FROZEN["frozen"],
}


@pytest.mark.parametrize("kind", list(_FUSABLE))
def test_fuse_conv_bn_eval_with_a_bnkit_layer_equals_torchs_fusion(kind):
    bn = randomize(_FUSABLE[kind](dtype=D), seed=6).eval()
    bn.eps = 1e-3
    conv = nn.Conv2d(2, C, 3, dtype=D).eval()
    twin = _expanded_twin(bn)
    ours, theirs = fuse_conv_bn_eval(conv, bn), fuse_conv_bn_eval(copy.deepcopy(conv), twin)
    torch.testing.assert_close(ours.weight, theirs.weight)
    torch.testing.assert_close(ours.bias, theirs.bias)
    x = torch.randn(2, 2, 5, 5, dtype=D)
    call = EQ["shared_pooled"].call if kind == "shared_pooled" else (lambda layer, x: layer(x))
    torch.testing.assert_close(ours(x), call(bn, conv(x)))


@pytest.mark.parametrize("make", [bnkit.BatchNorm1d, bnkit.GhostBatchNorm1d, bnkit.BatchRenorm1d, bnkit.FrozenBatchNorm1d,
                                  lambda c, **k: bnkit.BatchNorm1d(c, share_affine="weight", **k)],
                         ids=["bn", "ghost", "renorm", "frozen", "share_weight"])
def test_fuse_linear_bn_eval_with_a_bnkit_layer_equals_torchs_fusion(make):
    bn = randomize(make(C, dtype=D), seed=7).eval()
    lin = nn.Linear(4, C, dtype=D).eval()
    twin = nn.BatchNorm1d(C, dtype=D).eval()
    twin.load_state_dict({k: v.expand(C) if v.dim() == 1 else v for k, v in bn.state_dict().items()})
    ours, theirs = fuse_linear_bn_eval(lin, bn), fuse_linear_bn_eval(copy.deepcopy(lin), twin)
    torch.testing.assert_close(ours.weight, theirs.weight)
    torch.testing.assert_close(ours.bias, theirs.bias)
    x = torch.randn(5, 4, dtype=D)
    torch.testing.assert_close(ours(x), bn(lin(x)))


@pytest.mark.parametrize("make", [lambda: bnkit.DomainBatchNorm2d(C, 2), lambda: bnkit.SharedBatchNorm(C, 2, share_stats=True),
                                  lambda: bnkit.BatchNorm2d(C)], ids=["domain", "shared_pooled", "plain"])
def test_a_layer_without_a_count_loads_a_checkpoint_without_one_like_torch(make):
    """torch: a dict without num_batches_tracked into a layer whose count is None reports the filled-in key as
    unexpected (strict=False), and the layer's other buffers load."""
    results = []
    for layer in (make(), nn.BatchNorm2d(C)):
        sd = {k: v.clone().fill_(0.5) for k, v in layer.state_dict().items() if k != "num_batches_tracked"}
        layer.num_batches_tracked = None
        r = layer.load_state_dict(sd, strict=False)
        results.append((r.missing_keys, r.unexpected_keys))
        assert layer.num_batches_tracked is None and torch.all(layer.running_var == 0.5)
    assert results[0] == results[1] == ([], ["num_batches_tracked"])
