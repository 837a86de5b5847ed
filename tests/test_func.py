"""torch.func, forward-mode AD and vmap through bnkit, and the pure batch_norm_step.

Oracles: torch's own BN under the same transforms (``torch.func.jvp`` / ``jacfwd`` /
``vmap`` of ``torch.nn.functional.batch_norm``, where torch supports them), reverse-mode
Jacobian-vector products, ``gradcheck`` with the forward-AD and batched flags, loops of
single-sample gradients / single models, and the layer's own in-place update.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, stack_module_state, vmap

import bnkit
from bnkit import functional as BF

D = torch.float64


def _data(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=D, generator=g)


def _affine(c, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(c, dtype=D, generator=g) + 0.5, torch.randn(c, dtype=D, generator=g)


def _stats(c, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c, dtype=D, generator=g), torch.rand(c, dtype=D, generator=g) + 0.5


# --------------------------------------------------------------------------- F-style vs torch's F
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_functional_jvp_and_jacfwd_match_torch(training, channels_last):
    x = _data(4, 3, 2, 5)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    t = _data(4, 3, 2, 5, seed=5)
    w, b = _affine(3)
    rm, rv = (None, None) if training else _stats(3)

    def ours(x, w, b):
        return BF.batch_norm(x, rm, rv, w, b, training=training)

    def theirs(x, w, b):
        return F.batch_norm(x, rm, rv, w, b, training=training)

    y, dy = jvp(ours, (x, w, b), (t, w * 0.3, b - 1))
    y_t, dy_t = jvp(theirs, (x, w, b), (t, w * 0.3, b - 1))
    torch.testing.assert_close(y, y_t)
    torch.testing.assert_close(dy, dy_t)
    assert dy.abs().max() > 0.1  # a real tangent (it was silently zero)
    for j, j_t in zip(jacfwd(ours, argnums=(0, 1, 2))(x, w, b), jacfwd(theirs, argnums=(0, 1, 2))(x, w, b)):
        torch.testing.assert_close(j, j_t)
    for j, j_t in zip(jacrev(ours, argnums=(0, 1, 2))(x, w, b), jacrev(theirs, argnums=(0, 1, 2))(x, w, b)):
        torch.testing.assert_close(j, j_t)


@pytest.mark.parametrize("training", [True, False])
def test_forward_ad_dual_level_matches_torch(training):
    x, t = _data(6, 3), _data(6, 3, seed=3)
    rm, rv = _stats(3)
    rm_t, rv_t = rm.clone(), rv.clone()
    with fwAD.dual_level():
        y = BF.batch_norm(fwAD.make_dual(x, t), rm, rv, training=training)
        y_t = F.batch_norm(fwAD.make_dual(x, t), rm_t, rv_t, training=training)
        (p, d), (p_t, d_t) = fwAD.unpack_dual(y), fwAD.unpack_dual(y_t)
    torch.testing.assert_close(p, p_t)
    torch.testing.assert_close(d, d_t)
    torch.testing.assert_close((rm, rv), (rm_t, rv_t))  # the running update, as torch's


@pytest.mark.parametrize("training", [True, False])
def test_vmap_of_functional_matches_torch(training):
    x = _data(5, 4, 3, 6)  # vmapped over dim 1
    w, b = _affine(3)
    rm, rv = (None, None) if training else _stats(3)
    ours = vmap(lambda x: BF.batch_norm(x, rm, rv, w, b, training=training), in_dims=1)(x)
    theirs = vmap(lambda x: F.batch_norm(x, rm, rv, w, b, training=training), in_dims=1)(x)
    torch.testing.assert_close(ours, theirs)
    core = vmap(lambda x: BF.batch_norm_core(x, rm, rv, w, b, training, axis=-1), in_dims=1)(x.movedim(2, -1))
    torch.testing.assert_close(core, theirs.movedim(2, -1))


def test_vmap_training_with_unbatched_buffers_raises_and_changes_nothing():
    x = _data(3, 4, 2)
    bn = bnkit.BatchNorm1d(2).double()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(RuntimeError, match="batch_norm_step"):
        vmap(bn)(x)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(RuntimeError, match="batch_norm_step"):
        vmap(lambda x: BF.batch_norm(x, bn.running_mean, bn.running_var, training=True))(x)


# --------------------------------------------------------------------------- gradcheck with every flag
GRADCHECK = dict(check_forward_ad=True, check_batched_grad=True, check_batched_forward_grad=True)


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_all_flags_functional(training):
    x = _data(4, 3, 2).requires_grad_()
    w, b = (t.requires_grad_() for t in _affine(3))
    rm, rv = (None, None) if training else _stats(3)
    assert torch.autograd.gradcheck(lambda x, w, b: BF.batch_norm(x, rm, rv, w, b, training=training), (x, w, b),
                                    **GRADCHECK)
    xl = _data(4, 2, 3).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w, b: BF.batch_norm_core(x, rm, rv, w, b, training, axis=-1), (xl, w, b), **GRADCHECK
    )


def _layers():
    return {
        "BatchNorm1d": bnkit.BatchNorm1d(3),
        "BatchNorm2d": bnkit.BatchNorm2d(3),
        "BatchNorm(axis=-1)": bnkit.BatchNorm(3, axis=-1),
        "shared affine": bnkit.BatchNorm2d(3, share_affine="all"),
        "BatchRenorm2d": bnkit.BatchRenorm2d(3),
        "GhostBatchNorm2d": bnkit.GhostBatchNorm2d(3, virtual_batch_size=2),
        "FrozenBatchNorm2d": bnkit.FrozenBatchNorm2d(3),
        "SyncBatchNorm": bnkit.SyncBatchNorm(3),
    }


def _layer_input(name, seed=0):
    x = _data(4, 3, 4, seed=seed) if "1d" in name else _data(4, 3, 2, 2, seed=seed)
    return x.movedim(1, -1).contiguous() if "axis=-1" in name else x


@pytest.mark.parametrize("name", list(_layers()))
@pytest.mark.parametrize("training", [True, False])
def test_layers_gradcheck_all_flags(name, training):
    layer = _layers()[name].double().train(training)
    with torch.no_grad():  # non-trivial statistics and affine parameters
        if layer.running_mean is not None:
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)
        for p in layer.parameters():
            p.uniform_(0.5, 1.5)
    x = _layer_input(name).requires_grad_()
    params = {k: v.detach().clone().requires_grad_() for k, v in layer.named_parameters()}
    buffers = {k: v.clone() for k, v in layer.named_buffers()}

    def f(x, *p):
        return functional_call(layer, ({**dict(zip(params, p)), **buffers},), (x,))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.autograd.gradcheck(f, (x, *params.values()), **GRADCHECK)


@pytest.mark.parametrize("name", list(_layers()))
@pytest.mark.parametrize("training", [True, False])
def test_layers_jvp_matches_reverse_mode_and_updates_like_eager(name, training):
    """jvp's tangent equals the reverse-mode J·t, and a training call updates the buffers once, as eagerly."""
    layer = _layers()[name].double().train(training)
    eager, reverse = copy.deepcopy(layer), copy.deepcopy(layer)
    x, t = _layer_input(name), _layer_input(name, seed=9)
    y, dy = jvp(layer, (x,), (t,))
    torch.testing.assert_close(y, eager(x))
    _, dy_ref = torch.autograd.functional.jvp(reverse, x, t)  # the double-vjp trick: reverse mode only
    torch.testing.assert_close(dy, dy_ref)
    assert dy.abs().max() > 0.1
    for (k, v), v_e in zip(layer.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(v, v_e, msg=k)  # (the composite statistics: rounding may differ)


@pytest.mark.parametrize("cls", [bnkit.BatchNorm1d, bnkit.BatchNorm2d, bnkit.BatchNorm3d])
@pytest.mark.parametrize("training", [True, False])
def test_drop_in_layers_forward_ad_match_torch(cls, training):
    dims = {bnkit.BatchNorm1d: (5, 3, 4), bnkit.BatchNorm2d: (5, 3, 2, 2), bnkit.BatchNorm3d: (5, 3, 2, 2, 1)}[cls]
    ours = cls(3).double().train(training)
    theirs = getattr(torch.nn, cls.__name__)(3).double().train(training)
    with torch.no_grad():
        for m in (ours, theirs):
            m.running_mean.copy_(torch.linspace(-1, 1, 3))
            m.running_var.copy_(torch.linspace(0.5, 2, 3))
    x, t = _data(*dims), _data(*dims, seed=4)
    with fwAD.dual_level():
        y = fwAD.unpack_dual(ours(fwAD.make_dual(x, t)))
        y_t = fwAD.unpack_dual(theirs(fwAD.make_dual(x, t)))
    torch.testing.assert_close(y.primal, y_t.primal)
    torch.testing.assert_close(y.tangent, y_t.tangent)
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, msg=k)


# --------------------------------------------------------------------------- per-sample grads, ensembling
def _net(bn_cls=bnkit.BatchNorm1d):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), bn_cls(3), torch.nn.Tanh(), torch.nn.Linear(3, 1)).double()


def test_per_sample_gradients_eval_match_a_loop():
    net = _net().eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    params = {k: v.detach() for k, v in net.named_parameters()}
    buffers = dict(net.named_buffers())
    x, target = _data(6, 4), _data(6, 1, seed=1)

    def loss(p, xi, ti):
        return (functional_call(net, (p, buffers), (xi.unsqueeze(0),)) - ti).pow(2).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target)
    for i in range(6):
        net.zero_grad()
        (net(x[i : i + 1]) - target[i]).pow(2).sum().backward()
        for k, p in net.named_parameters():
            torch.testing.assert_close(per_sample[k][i], p.grad, msg=k)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_ensembling_with_stacked_state_matches_a_loop(momentum):
    models = [_net() for _ in range(3)]
    for i, m in enumerate(models):
        torch.manual_seed(i)
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.5)
        m[1].momentum = momentum
    loop = copy.deepcopy(models)
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    xs = [_data(3, 5, 4, seed=s) for s in (1, 2)]
    for x in xs:
        y = vmap(lambda p, b, x: functional_call(base, (p, b), (x,)))(params, buffers, x)
        y_loop = torch.stack([m(xi) for m, xi in zip(loop, x)])
        torch.testing.assert_close(y, y_loop)
    for k, v in buffers.items():
        torch.testing.assert_close(v, torch.stack([dict(m.named_buffers())[k] for m in loop]), msg=k)
    assert buffers["1.num_batches_tracked"].tolist() == [2, 2, 2]


# --------------------------------------------------------------------------- batch_norm_step
def _step_layer(momentum, nonfinite="skip"):
    layer = bnkit.BatchNorm2d(3, momentum=momentum, nonfinite=nonfinite).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    return layer


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("channels_last", [False, True])
def test_step_equals_layer_in_place_update_bitwise(momentum, channels_last):
    layer = _step_layer(momentum)
    state = {k: v.clone() for k, v in BF.bn_state(layer).items()}
    params = {"weight": layer.weight, "bias": layer.bias}
    for i in range(3):
        x = _data(4, 3, 2, 3, seed=i) * (i + 1) + i
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        previous, frozen = state, {k: v.clone() for k, v in state.items()}
        y, state = BF.batch_norm_step(x, params, previous, training=True, momentum=momentum, eps=layer.eps,
                                      nonfinite="skip")
        for k in frozen:  # the input state is not mutated
            assert torch.equal(previous[k], frozen[k]), k
        y_layer = layer(x)
        assert torch.equal(y, y_layer)
        for k, v in BF.bn_state(layer).items():
            assert torch.equal(state[k], v), k
    layer.eval()
    y, same = BF.batch_norm_step(x, params, state, training=False, momentum=momentum, eps=layer.eps)
    assert torch.equal(y, layer(x))
    assert all(same[k] is state[k] for k in state)


def test_step_mutates_nothing():
    layer = _step_layer(0.1)
    state = BF.bn_state(layer)
    saved = {k: v.clone() for k, v in state.items()}
    y, new = BF.batch_norm_step(_data(4, 3, 2, 2), {"weight": layer.weight, "bias": layer.bias}, state, training=True)
    for k in saved:
        assert torch.equal(state[k], saved[k]), k
        assert new[k] is not state[k]
    assert int(new["num_batches_tracked"]) == 1


@pytest.mark.parametrize("momentum", [0.1, 0.5])
def test_step_composite_path_matches_layer(momentum):
    """A tensor momentum takes the composite route (plain torch ops, as under transforms): the layer's values."""
    layer = _step_layer(momentum)
    state = {k: v.clone() for k, v in BF.bn_state(layer).items()}
    for i in range(3):
        x = _data(5, 3, 2, 2, seed=i) + i
        y, state = BF.batch_norm_step(x, {"weight": layer.weight, "bias": layer.bias}, state, training=True,
                                      momentum=torch.tensor(momentum, dtype=D), eps=layer.eps, nonfinite="skip")
        torch.testing.assert_close(y, layer(x))
        for k, v in BF.bn_state(layer).items():
            torch.testing.assert_close(state[k], v, msg=k)


def test_step_under_vmap_gives_per_sample_state():
    """vmap over independent batches with one unbatched state: one new state per batch, as a loop."""
    xs = _data(3, 4, 2, 5)
    w, b = _affine(2)
    state = {"running_mean": torch.zeros(2, dtype=D), "running_var": torch.ones(2, dtype=D),
             "num_batches_tracked": torch.tensor(0)}

    def step(x):
        return BF.batch_norm_step(x, {"weight": w, "bias": b}, state, training=True, momentum=None)

    ys, new = vmap(step)(xs)
    for i in range(3):
        y_i, new_i = step(xs[i])
        torch.testing.assert_close(ys[i], y_i)
        for k in new_i:
            torch.testing.assert_close(new[k][i], new_i[k], msg=k)
    torch.testing.assert_close(ys, torch.stack([F.batch_norm(x, None, None, w, b, training=True) for x in xs]))


def test_step_gradcheck_all_flags():
    x = _data(4, 3, 2).requires_grad_()
    w, b = (t.requires_grad_() for t in _affine(3))
    state = {"running_mean": torch.zeros(3, dtype=D), "running_var": torch.ones(3, dtype=D),
             "num_batches_tracked": torch.tensor(0)}
    for training in (True, False):
        def f(x, w, b, training=training):
            return BF.batch_norm_step(x, {"weight": w, "bias": b}, state, training=training)[0]
        assert torch.autograd.gradcheck(f, (x, w, b), **GRADCHECK)


def test_step_nonfinite_skip_keeps_state():
    state = {"running_mean": torch.zeros(2, dtype=D), "running_var": torch.ones(2, dtype=D),
             "num_batches_tracked": torch.tensor(3)}
    x = _data(4, 2)
    x[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, eager = BF.batch_norm_step(x, None, state, training=True, nonfinite="skip")
    _, composite = BF.batch_norm_step(x, None, state, training=True, nonfinite="skip", momentum=torch.tensor(0.1))
    for new in (eager, composite):
        for k in state:
            assert torch.equal(new[k], state[k]), k
    _, propagated = BF.batch_norm_step(x, None, state, training=True, momentum=torch.tensor(0.1))
    assert propagated["running_mean"].isnan().any() and int(propagated["num_batches_tracked"]) == 4


def test_step_compile_fullgraph_momentum_none():
    layer = _step_layer(None)
    params = {"weight": layer.weight.detach(), "bias": layer.bias.detach()}

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, state):
        return BF.batch_norm_step(x, params, state, training=True, momentum=None)

    state = {k: v.clone() for k, v in BF.bn_state(layer).items()}
    for i in range(3):
        x = _data(4, 3, 2, 2, seed=i) * 2 + i
        y, state = step(x, state)
        torch.testing.assert_close(y, layer(x).detach())
        for k, v in BF.bn_state(layer).items():
            torch.testing.assert_close(state[k], v, msg=k)


def test_bn_state_round_trip_and_checks():
    src, dst = _step_layer(0.1), _step_layer(0.1)
    src(_data(4, 3, 2, 2))
    state = BF.bn_state(src)
    assert state["running_mean"] is src.running_mean
    BF.load_bn_state(dst, state)
    for k in state:
        assert torch.equal(BF.bn_state(dst)[k], state[k])
    before = {k: v.clone() for k, v in BF.bn_state(dst).items()}
    bad = dict(state, running_var=torch.ones(4, dtype=D))
    with pytest.raises(ValueError, match="running_var"):
        BF.load_bn_state(dst, bad)
    with pytest.raises(KeyError):
        BF.load_bn_state(dst, dict(state, extra=torch.zeros(1)))
    for k, v in BF.bn_state(dst).items():
        assert torch.equal(v, before[k]), k  # checked before anything changed
    untracked = bnkit.BatchNorm2d(3, track_running_stats=False)
    assert BF.bn_state(untracked) == {"running_mean": None, "running_var": None, "num_batches_tracked": None}
    BF.load_bn_state(untracked, BF.bn_state(untracked))


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(2, 5), c=st.integers(1, 4), inner=st.integers(1, 3), momentum=st.sampled_from([0.0, 0.3, 1.0, None]),
    steps=st.integers(1, 3),
)
def test_step_routes_agree(n, c, inner, momentum, steps):
    """The eager route (the layers' kernels) and the composite route (plain torch ops, as under transforms) agree."""
    state_a = state_b = {"running_mean": torch.zeros(c, dtype=D), "running_var": torch.ones(c, dtype=D),
                         "num_batches_tracked": torch.tensor(0)}
    w, b = _affine(c)
    tm = None if momentum is None else torch.tensor(momentum, dtype=D)
    for s in range(steps):
        x = _data(n, c, inner, seed=s) * 3 + 1
        y_a, state_a = BF.batch_norm_step(x, {"weight": w, "bias": b}, state_a, training=True, momentum=momentum)
        # The composite route: a tensor momentum, or (momentum=None) a trivial vmap over one batch.
        if tm is None:
            y_b, state_b = vmap(lambda x, s=state_b: BF.batch_norm_step(x, {"weight": w, "bias": b}, s, training=True,
                                                              momentum=None))(x.unsqueeze(0))
            y_b, state_b = y_b[0], {k: v[0] for k, v in state_b.items()}
        else:
            y_b, state_b = BF.batch_norm_step(x, {"weight": w, "bias": b}, state_b, training=True, momentum=tm)
        torch.testing.assert_close(y_a, y_b)
        for k in state_a:
            torch.testing.assert_close(state_a[k], state_b[k], msg=k)
