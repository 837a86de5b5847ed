"""bnkit.adapt / bnkit.tent / bnkit.bn_parameters against hand-computed oracles.

Oracles: the exact (float64 NumPy) mean and unbiased variance of the data for a first layer;
bnkit.recalibrate (PreciseBN, exact estimator) for deeper layers; Schneider et al.'s mixture and their
per-layer forward written out by hand; an entropy-minimization step written out by hand for TENT.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bnkit
from _state import snapshot, state_equal, with_running_stats

torch.set_default_dtype(torch.float32)


def _flags(model):
    return [m.training for m in model.modules()]


def _np_stats(x: torch.Tensor, axis: int = 1):
    a = np.moveaxis(x.detach().double().numpy(), axis, -1).reshape(-1, x.shape[axis])
    return a.mean(0), a.var(0, ddof=1)


def _cnn(bn=nn.BatchNorm2d, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), bn(4), nn.ReLU(), nn.Dropout(0.5),
        nn.Conv2d(4, 3, 3), bn(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5),
    )


SOURCE = torch.randn(60, 2, 6, 6)
TARGET = torch.randn(40, 2, 6, 6) * 2.5 + 1.5


# ------------------------------------------------------------------ reestimate
FIRST_LAYERS = {
    "torch2d": lambda: (nn.BatchNorm2d(3), (0, 2, 3), 1),
    "bnkit2d": lambda: (bnkit.BatchNorm2d(3), (0, 2, 3), 1),
    "bnkit-channels-last": lambda: (bnkit.BatchNorm(3, axis=-1), (0, 1, 2), -1),
    "frozen2d": lambda: (bnkit.FrozenBatchNorm2d(3), (0, 2, 3), 1),
    "torch1d": lambda: (nn.BatchNorm1d(3), (0,), 1),
    "ghost": lambda: (bnkit.GhostBatchNorm2d(3, virtual_batch_size=4), (0, 2, 3), 1),
}


@pytest.mark.parametrize("kind", sorted(FIRST_LAYERS))
@settings(max_examples=10, deadline=None)
@given(sizes=st.lists(st.integers(1, 7), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_reestimate_is_the_exact_statistics_of_the_data(kind, sizes, seed):
    bn, _, axis = FIRST_LAYERS[kind]()
    g = torch.Generator().manual_seed(seed)
    shape = {1: lambda n: (n, 3, 2, 3), -1: lambda n: (n, 2, 3, 3)}[axis]
    if kind == "torch1d":
        shape = lambda n: (n, 3)
    batches = [torch.randn(shape(n), generator=g) * 3 + 2 for n in sizes]
    x = torch.cat(batches)
    if x.numel() // 3 < 2:
        return
    with torch.no_grad():
        bn.running_mean.fill_(0.3)
        bn.running_var.fill_(0.7)
    before = snapshot(bn)
    h = bnkit.adapt(bn.eval(), batches)
    mean, var = _np_stats(x, axis)
    np.testing.assert_allclose(bn.running_mean.double().numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.running_var.double().numpy(), var, rtol=1e-5, atol=1e-6)
    assert torch.equal(bn.num_batches_tracked, before["num_batches_tracked"])
    assert not bn.training
    h.restore()
    assert state_equal(bn, before)


@pytest.mark.parametrize("bn", [nn.BatchNorm2d, bnkit.BatchNorm2d])
def test_reestimate_matches_recalibrate_on_a_deep_model(bn):
    model = with_running_stats(_cnn(bn), SOURCE)
    oracle = bnkit.recalibrate(copy.deepcopy(model), [TARGET[:16], TARGET[16:30], TARGET[30:]])
    params = {k: v.clone() for k, v in model.named_parameters()}
    model.train()  # the pass itself runs in eval mode (dropout off); the flags come back
    flags = _flags(model)
    bnkit.adapt(model, [TARGET[:16], TARGET[16:30], TARGET[30:]])
    assert _flags(model) == flags
    for i in (1, 5):
        torch.testing.assert_close(model[i].running_mean, oracle[i].running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model[i].running_var, oracle[i].running_var, rtol=1e-5, atol=1e-6)
        assert torch.equal(model[i].num_batches_tracked, oracle[i].num_batches_tracked)
    assert all(torch.equal(p, params[k]) for k, p in model.named_parameters())


@pytest.mark.parametrize("mode", ["reestimate", "prior", "online"])
def test_adapting_records_no_autograd_graph(mode):
    """The passes over the data only measure: no graph is recorded (the outputs carry no grad_fn)."""
    model = nn.Sequential(nn.Linear(3, 4), bnkit.BatchNorm1d(4), nn.Linear(4, 2))
    seen = []
    model[2].register_forward_hook(lambda m, args, out: seen.append((torch.is_grad_enabled(), out.grad_fn)))
    handle = bnkit.adapt(model, [torch.randn(8, 3) for _ in range(2)], mode=mode)
    handle.restore()
    assert seen == [(False, None), (False, None)]


def test_reestimate_adapts_frozen_layers_like_trainable_ones():
    model = with_running_stats(_cnn(), SOURCE)
    frozen = bnkit.freeze(copy.deepcopy(model))
    assert isinstance(frozen[5], bnkit.FrozenBatchNorm)
    data = [TARGET[:25], TARGET[25:]]
    bnkit.recalibrate(model, data)
    h = bnkit.adapt(frozen, data)
    for i in (1, 5):
        torch.testing.assert_close(frozen[i].running_mean, model[i].running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(frozen[i].running_var, model[i].running_var, rtol=1e-5, atol=1e-6)
    assert h.layers == ["1", "5"]


def test_handle_restores_exactly_and_works_as_a_context_manager():
    model = with_running_stats(_cnn(), SOURCE)
    state, flags = snapshot(model), _flags(model)
    clean = model(SOURCE)
    with bnkit.adapt(model, TARGET, mode="reestimate") as h:
        assert h.active and not state_equal(model, state)
        assert h.samples == len(TARGET)
    assert not h.active and state_equal(model, state) and _flags(model) == flags
    assert torch.equal(model(SOURCE), clean)
    h.restore()  # a second restore does nothing
    assert state_equal(model, state)


def test_restore_after_moving_the_model():
    model = with_running_stats(_cnn(), SOURCE)
    state = snapshot(model)
    h = bnkit.adapt(model, TARGET)
    model.to(torch.float64)
    h.restore()
    model.to(torch.float32)
    assert state_equal(model, state)


def test_adapt_leaves_dropout_and_weights_alone():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Dropout(0.9), nn.BatchNorm1d(4)).train()
    x = torch.randn(50, 4) + 3
    bnkit.adapt(model, x)
    mean, var = _np_stats(x)
    np.testing.assert_allclose(model[1].running_mean.double().numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(model[1].running_var.double().numpy(), var, rtol=1e-5)
    assert model.training and model[0].training


# ------------------------------------------------------------------ prior (Schneider et al. 2020)
def _schneider_forward(model, x, N, n):
    """The authors' per-layer procedure on one batch, by hand: returns each BN's mixed statistics."""
    mixed = {}
    h = x
    for i, m in enumerate(model):
        if isinstance(m, nn.BatchNorm2d):
            axes = (0, 2, 3)
            mu_t = h.double().mean(axes)
            var_t = h.double().var(axes, unbiased=True)
            w = n / (N + n)
            mu = (1 - w) * m.running_mean.double() + w * mu_t
            var = (1 - w) * m.running_var.double() + w * var_t
            mixed[i] = (mu, var)
            h = F.batch_norm(h, mu.float(), var.float(), m.weight, m.bias, False, 0.0, m.eps)
        elif isinstance(m, nn.Dropout):
            continue
        else:
            h = m(h)
    return mixed, h


@pytest.mark.parametrize("N", [0, 1, 8, 100])
def test_prior_is_schneiders_mixture_on_one_batch(N):
    model = with_running_stats(_cnn(), SOURCE)
    x = TARGET[:8]
    with torch.no_grad():
        mixed, out = _schneider_forward(model, x, N, 8)
    h = bnkit.adapt(model, x, mode="prior", prior=N)
    for i, (mu, var) in mixed.items():
        torch.testing.assert_close(model[i].running_mean.double(), mu, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model[i].running_var.double(), var, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)
    assert h.samples == 8


def test_prior_over_several_batches_mixes_with_all_samples_seen():
    bn = with_running_stats(nn.BatchNorm2d(2), SOURCE)
    src_mean, src_var = bn.running_mean.double().clone(), bn.running_var.double().clone()
    batches = [TARGET[:5], TARGET[5:17], TARGET[17:20]]
    bnkit.adapt(bn, batches, mode="prior", prior=16)
    mean_t, var_t = _np_stats(torch.cat(batches))
    w = 20 / (16 + 20)
    np.testing.assert_allclose(bn.running_mean.double().numpy(), (1 - w) * src_mean.numpy() + w * mean_t, rtol=1e-5)
    np.testing.assert_allclose(bn.running_var.double().numpy(), (1 - w) * src_var.numpy() + w * var_t, rtol=1e-5)


def test_prior_zero_is_reestimate_for_the_first_layer():
    a = with_running_stats(_cnn(), SOURCE)
    b = copy.deepcopy(a)
    bnkit.adapt(a, TARGET, mode="prior", prior=0)
    bnkit.adapt(b, TARGET, mode="reestimate")
    torch.testing.assert_close(a[1].running_mean, b[1].running_mean)
    torch.testing.assert_close(a[1].running_var, b[1].running_var)


# ------------------------------------------------------------------ online
def _online_oracle(src_mean, src_var, seen, N=None, momentum=None):
    if momentum is not None:
        mean, var = src_mean.copy(), src_var.copy()
        for b in seen:
            mu, v = _np_stats(b)
            mean = (1 - momentum) * mean + momentum * mu
            var = (1 - momentum) * var + momentum * v
        return mean, var
    mu, v = _np_stats(torch.cat(seen))
    n = sum(len(b) for b in seen)
    w = n / (N + n)
    return (1 - w) * src_mean + w * mu, (1 - w) * src_var + w * v


@pytest.mark.parametrize("kind", ["cumulative", "window", "momentum"])
def test_online_statistics_follow_the_stream(kind):
    bn = with_running_stats(bnkit.BatchNorm2d(2), SOURCE)
    src_mean, src_var = bn.running_mean.double().numpy().copy(), bn.running_var.double().numpy().copy()
    state = snapshot(bn)
    kw = {"cumulative": {}, "window": {"window": 2}, "momentum": {"momentum": 0.3}}[kind]
    h = bnkit.adapt(bn, mode="online", prior=6, **kw)
    stream = [TARGET[i:i + 6] for i in range(0, 30, 6)]
    for k, b in enumerate(stream, 1):
        y = bn(b)
        seen = stream[max(0, k - 2):k] if kind == "window" else stream[:k]
        mean, var = _online_oracle(src_mean, src_var, seen, N=6, momentum=kw.get("momentum"))
        np.testing.assert_allclose(bn.running_mean.double().numpy(), mean, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(bn.running_var.double().numpy(), var, rtol=1e-5, atol=1e-7)
        # the batch is normalized with the statistics that include it
        ref = F.batch_norm(b, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        torch.testing.assert_close(y, ref)
    assert h.samples == 30
    h.restore()
    assert state_equal(bn, state)
    bn(TARGET)  # hooks removed: an eval-mode call changes nothing any more
    assert state_equal(bn, state)


def test_online_warm_up_data_and_training_mode_calls():
    bn = with_running_stats(nn.BatchNorm2d(2), SOURCE)
    h = bnkit.adapt(bn, [TARGET[:10]], mode="online", prior=0)
    mean, _ = _np_stats(TARGET[:10])
    np.testing.assert_allclose(bn.running_mean.double().numpy(), mean, rtol=1e-5)
    assert h.samples == 10
    bn.train()  # training-mode calls are the layer's own business
    bn(TARGET[10:20])
    assert h.samples == 10
    h.restore()


# ------------------------------------------------------------------ per-site layers
def test_per_site_layers_adapt_each_site():
    bn = bnkit.SharedBatchNorm(2, sites=3).eval()
    a = TARGET[:10]
    b = a * 2 - 1

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bn

        def forward(self, x):
            return self.bn(x, site=0) + self.bn(x * 2 - 1, site=2)

    net = Net().eval()
    bnkit.adapt(net, a)
    for site, x in ((0, a), (2, b)):
        mean, var = _np_stats(x)
        np.testing.assert_allclose(bn.running_mean[site].double().numpy(), mean, rtol=1e-5)
        np.testing.assert_allclose(bn.running_var[site].double().numpy(), var, rtol=1e-5)
    assert torch.equal(bn.running_mean[1], torch.zeros(2)) and torch.equal(bn.running_var[1], torch.ones(2))


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "adabn"}, "mode must be one of"),
        ({"prior": -1}, "prior must be"),
        ({"prior": float("nan")}, "prior must be"),
        ({"mode": "prior", "momentum": 0.1}, "apply to mode=.online. only"),
        ({"mode": "online", "momentum": 0.1, "window": 2}, "not both"),
        ({"mode": "online", "momentum": 0.0}, "momentum must be in"),
        ({"mode": "online", "window": 0}, "window must be"),
        ({"num_batches": 0}, "num_batches"),
    ],
)
def test_bad_arguments_raise_and_change_nothing(kwargs, match):
    model = with_running_stats(_cnn(), SOURCE)
    state, flags = snapshot(model), _flags(model)
    with pytest.raises(ValueError, match=match):
        bnkit.adapt(model, TARGET, **kwargs)
    assert state_equal(model, state) and _flags(model) == flags


def test_bad_data_and_models():
    model = with_running_stats(_cnn(), SOURCE)
    state = snapshot(model)
    with pytest.raises(ValueError, match="needs data"):
        bnkit.adapt(model)
    with pytest.raises(ValueError, match="no batch"):
        bnkit.adapt(model, [])
    with pytest.raises(RuntimeError):  # a batch the model cannot take, after a good one
        bnkit.adapt(model, [TARGET, torch.randn(4, 7, 6, 6)])
    assert state_equal(model, state) and not model.training
    with pytest.raises(ValueError, match="no BN layer"):
        bnkit.adapt(nn.Linear(3, 3), torch.randn(4, 3))
    with pytest.raises(TypeError):
        bnkit.adapt("model", TARGET)


# ------------------------------------------------------------------ bn_parameters
def test_bn_parameters_lists_the_affine_parameters_once():
    shared = bnkit.BatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), shared, nn.BatchNorm2d(4, affine=False), shared,
                          bnkit.FrozenBatchNorm2d(4), bnkit.BatchNorm2d(4, share_affine="all"))
    names = [n for n, _ in bnkit.bn_parameters(model, named=True)]
    assert names == ["1.weight", "1.bias", "5.weight", "5.bias"]
    params = bnkit.bn_parameters(model)
    assert [id(p) for p in params] == [id(shared.weight), id(shared.bias), id(model[5].weight), id(model[5].bias)]
    with pytest.raises(TypeError):
        bnkit.bn_parameters(3)


# ------------------------------------------------------------------ TENT
def _entropy(logits):
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()


def _hand_tent_step(model, x, lr):
    """One entropy-minimization step on the BN affine parameters, written out: batch statistics, dropout off."""
    model.eval()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.train()
        m.momentum = 0.0
    params = [p for m in bns for p in (m.weight, m.bias) if p is not None and p.requires_grad]
    grads = torch.autograd.grad(_entropy(model(x)), params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= lr * g
    model.eval()


def _plain_sgd(params, lr):
    return torch.optim.SGD(params, lr=lr)


def test_tent_is_an_entropy_minimization_step():
    model = with_running_stats(_cnn(), SOURCE)
    oracle = copy.deepcopy(model)
    state = snapshot(model)
    others = {k: v.clone() for k, v in model.named_parameters() if k not in ("1.weight", "1.bias", "5.weight", "5.bias")}
    batches = [TARGET[:20], TARGET[20:]]
    for b in batches:
        _hand_tent_step(oracle, b, lr=0.5)
    out, h = bnkit.tent(model, batches, lr=0.5, optimizer=_plain_sgd, stats="source")
    assert out is model
    for i in (1, 5):
        torch.testing.assert_close(model[i].weight, oracle[i].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model[i].bias, oracle[i].bias, rtol=1e-5, atol=1e-6)
        assert not torch.equal(model[i].weight, state[f"{i}.weight"])
        # stats="source": buffers (num_batches_tracked included) untouched
        for k in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(model[i], k), state[f"{i}.{k}"])
        assert model[i].momentum == 0.1
    assert all(torch.equal(p, others[k]) for k, p in model.named_parameters() if k in others)
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    assert not model.training
    h.restore()
    assert state_equal(model, state)


def test_tent_reduces_entropy_and_reestimates_statistics():
    model = with_running_stats(_cnn(), SOURCE)
    state = snapshot(model)
    baseline = copy.deepcopy(model)
    batches = [TARGET[i:i + 10] for i in range(0, 40, 10)]
    _, h = bnkit.tent(model, iter(batches), steps=5, lr=1e-2)  # a one-shot iterator is read once
    oracle = bnkit.recalibrate(copy.deepcopy(model).eval(), batches)
    for i in (1, 5):
        torch.testing.assert_close(model[i].running_mean, oracle[i].running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model[i].running_var, oracle[i].running_var, rtol=1e-5, atol=1e-6)
    bnkit.adapt(baseline, batches)  # the same statistics, the source affine parameters
    with torch.no_grad():
        assert _entropy(model(TARGET)).item() < _entropy(baseline(TARGET)).item()
    h.restore()
    assert state_equal(model, state)


def test_tent_normalizes_frozen_layers_with_batch_statistics():
    model = with_running_stats(_cnn(), SOURCE)
    oracle = copy.deepcopy(model)
    model[5] = bnkit.freeze(model[5])  # no parameters: not adapted, but normalizes with the batch
    oracle[5].weight.requires_grad_(False)
    oracle[5].bias.requires_grad_(False)
    _hand_tent_step(oracle, TARGET, lr=0.5)
    bnkit.tent(model, TARGET, lr=0.5, optimizer=_plain_sgd, stats="source")
    torch.testing.assert_close(model[1].weight, oracle[1].weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].bias, oracle[1].bias, rtol=1e-5, atol=1e-6)
    assert len(model[5]._forward_hooks) == 0


def test_tent_bad_input_changes_nothing():
    model = with_running_stats(_cnn(), SOURCE)
    state = snapshot(model)
    for kw, exc in (({"steps": 0}, ValueError), ({"lr": -1}, ValueError), ({"optimizer": "lbfgs"}, ValueError),
                    ({"stats": "batch"}, ValueError), ({"optimizer": lambda p, lr: 3}, TypeError)):
        with pytest.raises(exc):
            bnkit.tent(model, TARGET, **kw)
        assert state_equal(model, state)
    with pytest.raises(ValueError, match="no batch"):
        bnkit.tent(model, [])
    with pytest.raises(ValueError, match="no BN affine"):
        bnkit.tent(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, affine=False)), torch.randn(4, 3))
    assert state_equal(model, state)
    assert all(p.requires_grad for p in model.parameters())



def test_reestimate_adapts_the_current_domain_of_domain_batchnorm():
    """DomainBatchNorm: adapt writes the row of the domain the calls use, exactly as a plain BN layer's
    re-estimate on the same data (oracle: the mean and unbiased variance of the data), and no other row."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), bnkit.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 36, 4))
    for _ in range(3):
        net(torch.randn(16, 1, 8, 8))
    dom = bnkit.convert_domain_bn(net, 3).eval()
    layer = dom[1]
    before = (layer.running_mean.clone(), layer.running_var.clone())
    data = [torch.randn(20, 1, 8, 8) * 2 + 1 for _ in range(3)]
    with torch.no_grad():
        h = torch.cat([dom[0](x) for x in data])
    want_mean = h.mean(dim=(0, 2, 3))
    want_var = h.var(dim=(0, 2, 3), unbiased=True)
    with bnkit.domain(dom, 2):
        handle = bnkit.adapt(dom, data, mode="reestimate")
    torch.testing.assert_close(layer.running_mean[2], want_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.running_var[2], want_var, rtol=1e-5, atol=1e-6)
    assert torch.equal(layer.running_mean[:2], before[0][:2]) and torch.equal(layer.running_var[:2], before[1][:2])
    handle.restore()
    assert torch.equal(layer.running_mean, before[0]) and torch.equal(layer.running_var, before[1])


def test_adapt_refuses_mixed_domain_batches():
    dom = bnkit.convert_domain_bn(nn.Sequential(nn.Linear(4, 3), bnkit.BatchNorm1d(3)), 2).eval()
    before = dom[1].running_mean.clone()
    with bnkit.domain(dom, torch.tensor([0, 1, 0, 1])):
        with pytest.raises(ValueError, match="several domains"):
            bnkit.adapt(dom, [torch.randn(4, 4)])
    assert torch.equal(dom[1].running_mean, before)
