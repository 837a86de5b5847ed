"""bnkit.tent's options against hand-written oracles: EATA's / SAR's reliable-sample filter and weights,
SAR's sharpness-aware step, the AdaBN-then-TENT statistics (``step_stats="reestimate"``), DeYO's
patch-shuffle filter and MEMO's marginal entropy over augmented views (the mean softmax of the views in
float64 NumPy and a hand-written step; one view of an identity augmentation must be plain TENT bit for bit).

Oracles: the entropies computed in float64 NumPy (which samples pass the filter, the weights, the
loss), the TENT step written out by hand (batch statistics, dropout off, plain SGD), SAM's two
passes written out by hand, and plain TENT itself (``max_entropy=inf`` must equal it bit for bit).
"""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bnkit
from _state import snapshot, state_equal, with_running_stats

tent_mod = importlib.import_module("bnkit.tools.tent")
reliable_entropy = tent_mod.reliable_entropy


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), bnkit.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
        nn.Conv2d(4, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5),
    )


g = torch.Generator().manual_seed(0)
SOURCE = torch.randn(60, 2, 6, 6, generator=g)
TARGET = torch.randn(40, 2, 6, 6, generator=g) * 2.5 + 1.5


def _model():
    model = with_running_stats(_cnn(), SOURCE)
    with torch.no_grad():  # sharper logits, so that some samples pass a 0.4 ln C filter and some do not
        model[8].weight.mul_(6.0)
    return model


def _np_entropy(logits):
    z = logits.detach().double().numpy()
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return -(np.exp(logp) * logp).sum(1)


def _plain_sgd(params, lr):
    return torch.optim.SGD(params, lr=lr)


def _bn_train_mode(model):
    model.eval()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) or isinstance(m, bnkit.BatchNorm)]
    for m in bns:
        m.train()
        m.momentum = 0.0
    return [p for m in bns for p in (m.weight, m.bias)]


def _hand_loss(logits, frac, weighted, within=None):
    """The filtered (weighted) mean entropy, with the selection and weights from float64 NumPy."""
    h64 = _np_entropy(logits)
    e0 = frac * math.log(logits.shape[1])
    keep = h64 < e0
    if within is not None:
        keep &= within
    h = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
    w = torch.from_numpy(np.exp(e0 - h64)).float() if weighted else torch.ones_like(h)
    idx = torch.from_numpy(np.flatnonzero(keep))
    return (h * w)[idx].sum() / len(idx), keep


# ------------------------------------------------------------------ the loss
@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([0.1, 0.4, 0.7]), st.booleans(), st.integers(2, 12))
def test_reliable_entropy_matches_a_float64_hand_computation(seed, frac, weighted, classes):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(16, classes, generator=gen) * torch.rand(16, 1, generator=gen) * 8
    h64 = _np_entropy(logits)
    e0 = frac * math.log(classes)
    if np.any(np.abs(h64 - e0) < 1e-5):  # float32 and float64 may disagree right at the threshold
        return
    loss, mask = reliable_entropy(logits, frac, weighted)
    assert mask.tolist() == (h64 < e0).tolist()
    if not mask.any():
        assert loss is None
        return
    w = np.exp(e0 - h64) if weighted else np.ones_like(h64)
    want = (w * h64)[h64 < e0].mean()
    assert loss.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_reliable_entropy_weights_are_constants_and_none_keeps_everything():
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.2, 0.1, 0.0], [5.0, -1.0, 0.0]], requires_grad=True)
    loss, mask = reliable_entropy(logits, 0.4, weighted=True)
    assert mask.tolist() == [True, False, True]
    loss.backward()
    # d/dz of mean(w_i H_i) with w_i held constant: w_i / |S| * dH_i/dz
    ref = logits.detach().clone().requires_grad_()
    h = -(ref.softmax(1) * ref.log_softmax(1)).sum(1)
    w = torch.exp(0.4 * math.log(3) - h.detach())
    ((h * w)[[0, 2]].sum() / 2).backward()
    torch.testing.assert_close(logits.grad, ref.grad)
    assert logits.grad[1].abs().sum() == 0
    plain, every = reliable_entropy(logits.detach(), None)
    assert every.all() and plain.item() == pytest.approx(h.mean().item())


# ------------------------------------------------------------------ tent with the filter
def test_threshold_at_infinity_is_plain_tent_bit_for_bit():
    a, b = _model(), _model()
    batches = [TARGET[:20], TARGET[20:]]
    bnkit.tent(a, batches, steps=2, lr=1e-2)
    _, h = bnkit.tent(b, batches, steps=2, lr=1e-2, max_entropy=math.inf)
    sa, sb = snapshot(a), snapshot(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert h.samples_used == h.samples_seen == 80 and h.steps_taken == 4


def test_filtered_tent_is_a_step_on_the_hand_computed_loss():
    for weighted in (False, True):
        model, oracle = _model(), _model()
        batches = [TARGET[:20], TARGET[20:]]
        params = _bn_train_mode(oracle)
        used = 0
        for x in batches:
            loss, keep = _hand_loss(oracle(x), 0.4, weighted)
            assert 0 < keep.sum() < len(x)  # the filter does select here
            used += int(keep.sum())
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, gr in zip(params, grads):
                    p -= 0.5 * gr
        _, h = bnkit.tent(model, batches, lr=0.5, optimizer=_plain_sgd, stats="source", max_entropy=0.4,
                          weighted=weighted)
        for i in (1, 5):
            torch.testing.assert_close(model[i].weight, oracle[i].weight, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(model[i].bias, oracle[i].bias, rtol=1e-5, atol=1e-6)
        assert h.samples_used == used and h.samples_seen == 40 and h.steps_taken == 2


def test_no_reliable_sample_means_no_step():
    model = _model()
    state = snapshot(model)
    _, h = bnkit.tent(model, TARGET, lr=0.5, stats="source", max_entropy=1e-9)
    assert h.steps_taken == 0 and h.samples_used == 0 and h.samples_seen == 40
    assert state_equal(model, state)  # no step, source statistics kept: nothing changed
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------ SAR's sharpness-aware step
def test_sharpness_aware_step_by_hand():
    rho, lr, frac = 0.05, 0.5, 0.4
    model, oracle = _model(), _model()
    params = _bn_train_mode(oracle)
    loss, keep = _hand_loss(oracle(TARGET), frac, False)
    g1 = torch.autograd.grad(loss, params)
    norm = torch.sqrt(sum((gr ** 2).sum() for gr in g1))
    with torch.no_grad():
        eps = [rho * gr / (norm + 1e-12) for gr in g1]
        for p, e in zip(params, eps):
            p += e
    loss2, _ = _hand_loss(oracle(TARGET), frac, False, within=keep)  # SAR's second filter
    g2 = torch.autograd.grad(loss2, params)
    with torch.no_grad():
        for p, e, gr in zip(params, eps, g2):
            p -= e
            p -= lr * gr
    bnkit.tent(model, TARGET, lr=lr, optimizer=_plain_sgd, stats="source", max_entropy=frac, sharpness=rho)
    for i in (1, 5):
        torch.testing.assert_close(model[i].weight, oracle[i].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model[i].bias, oracle[i].bias, rtol=1e-5, atol=1e-6)
    # and it is not the plain step
    plain = _model()
    bnkit.tent(plain, TARGET, lr=lr, optimizer=_plain_sgd, stats="source", max_entropy=frac)
    assert not torch.allclose(plain[1].weight, model[1].weight)


# ------------------------------------------------------------------ AdaBN, then TENT
def test_step_stats_reestimate_steps_with_the_reestimated_statistics():
    model, oracle = _model(), _model()
    batches = [TARGET[:20], TARGET[20:]]
    bnkit.adapt(oracle, batches, mode="reestimate")
    oracle.eval()  # every BN layer normalizes with the re-estimated statistics, fixed
    params = bnkit.bn_parameters(oracle)
    for x in batches:
        h = -(oracle(x).softmax(1) * oracle(x).log_softmax(1)).sum(1).mean()
        grads = torch.autograd.grad(h, params)
        with torch.no_grad():
            for p, gr in zip(params, grads):
                p -= 0.5 * gr
    state = snapshot(_model())
    _, handle = bnkit.tent(model, batches, lr=0.5, optimizer=_plain_sgd, stats="source", step_stats="reestimate")
    for i in (1, 5):
        torch.testing.assert_close(model[i].weight, oracle[i].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model[i].bias, oracle[i].bias, rtol=1e-5, atol=1e-6)
        for k in ("running_mean", "running_var", "num_batches_tracked"):  # stats="source": back to the source's
            assert torch.equal(getattr(model[i], k), state[f"{i}.{k}"])
    handle.restore()
    assert state_equal(model, state)


def test_options_restore_bit_for_bit_and_bad_options_change_nothing():
    model = _model()
    state = snapshot(model)
    flags = [m.training for m in model.modules()]
    _, h = bnkit.tent(model, TARGET.split(10), max_entropy=0.4, weighted=True, sharpness=0.05,
                      step_stats="reestimate")
    assert not state_equal(model, state)
    h.restore()
    assert state_equal(model, state) and [m.training for m in model.modules()] == flags
    bad = [({"max_entropy": 0}, ValueError), ({"max_entropy": -1.0}, ValueError), ({"max_entropy": "eata"}, ValueError),
           ({"weighted": True}, ValueError), ({"weighted": True, "max_entropy": math.inf}, ValueError),
           ({"weighted": "yes"}, TypeError), ({"weighted": 1}, ValueError), ({"sharpness": 0.0}, ValueError), ({"sharpness": math.inf}, ValueError),
           ({"step_stats": "running"}, ValueError)]
    for kw, exc in bad:
        with pytest.raises(exc):
            bnkit.tent(model, TARGET, **kw)
        assert state_equal(model, state)
    assert all(p.requires_grad for p in model.parameters())



# ------------------------------------------------------------------ DeYO's patch-shuffle filter
patch_shuffle = tent_mod.patch_shuffle


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(4, 9), st.integers(4, 9), st.integers(0, 1000))
def test_patch_shuffle_permutes_each_images_tiles(patches, height, width, seed):
    if height < patches or width < patches:
        return
    x = torch.randn(3, 2, height, width, generator=torch.Generator().manual_seed(seed))
    y = patch_shuffle(x, patches, torch.Generator().manual_seed(seed))
    ph, pw = height // patches, width // patches
    torch.testing.assert_close(y[:, :, patches * ph:], x[:, :, patches * ph:], rtol=0, atol=0)  # the border stays
    torch.testing.assert_close(y[:, :, :, patches * pw:], x[:, :, :, patches * pw:], rtol=0, atol=0)
    for n in range(3):
        tiles = {(i, j): x[n, :, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw] for i in range(patches) for j in range(patches)}
        used = []
        for i in range(patches):
            for j in range(patches):
                out = y[n, :, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw]
                src = [k for k, t in tiles.items() if torch.equal(t, out)]
                assert src, "every output tile is an input tile of the same image"
                used.append(src[0])
        assert sorted(used) == sorted(tiles)  # each exactly once (random data: tiles are distinct)
    assert torch.equal(patch_shuffle(x, patches, torch.Generator().manual_seed(seed)), y)  # the generator decides


def test_patch_shuffle_bad_input():
    with pytest.raises(TypeError):
        patch_shuffle(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="do not fit"):
        patch_shuffle(torch.randn(1, 1, 3, 3), 4)


def _hand_deyo(model, params, x, frac, wfrac, tau, patches, gen, lr):
    """One DeYO step written out: entropy filter, PLPD of the shuffled view (float64), weights, plain SGD."""
    logits = model(x)
    c = logits.shape[1]
    h64 = _np_entropy(logits)
    keep1 = np.flatnonzero(h64 < frac * math.log(c))
    with torch.no_grad():
        ps = model(patch_shuffle(x[torch.from_numpy(keep1)], patches, gen)).double().softmax(1).numpy()
    p = logits.detach().double().softmax(1).numpy()[keep1]
    cls = p.argmax(1)
    plpd = p[np.arange(len(cls)), cls] - ps[np.arange(len(cls)), cls]
    ok = plpd > tau
    idx = torch.from_numpy(keep1[ok])
    h = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)[idx]
    w = torch.from_numpy(np.exp(wfrac * math.log(c) - h64[keep1[ok]]) + np.exp(plpd[ok])).float()
    grads = torch.autograd.grad((h * w).sum() / len(idx), params)
    with torch.no_grad():
        for p_, gr in zip(params, grads):
            p_ -= lr * gr
    return len(keep1), int(ok.sum()), plpd


def test_deyo_step_by_hand():
    frac, wfrac, patches, lr = 0.5, 0.4, 3, 0.5
    probe = _model()
    _, _, plpd = _hand_deyo(probe, _bn_train_mode(probe), TARGET, frac, wfrac, -2.0, patches,
                            torch.Generator().manual_seed(0), lr)
    tau = float(np.median(plpd))  # a threshold that keeps some of the reliable samples and not the others
    model, oracle = _model(), _model()
    params = _bn_train_mode(oracle)
    reliable, kept, _ = _hand_deyo(oracle, params, TARGET, frac, wfrac, tau, patches,
                                   torch.Generator().manual_seed(0), lr)
    assert 0 < kept < reliable < len(TARGET)
    _, h = bnkit.tent(model, TARGET, lr=lr, optimizer=_plain_sgd, stats="source", max_entropy=frac, weighted=wfrac,
                      min_plpd=tau, patches=patches)  # generator=None: seeded with 0, as the oracle's
    for i in (1, 5):
        torch.testing.assert_close(model[i].weight, oracle[i].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model[i].bias, oracle[i].bias, rtol=1e-5, atol=1e-6)
    assert h.samples_used == kept and h.steps_taken == 1


def test_deyo_options_are_checked():
    model = _model()
    state = snapshot(model)
    for kw, exc in (({"min_plpd": 1.5}, ValueError), ({"min_plpd": 0.2, "patches": 0}, ValueError),
                    ({"weighted": 0.4}, ValueError), ({"min_plpd": 0.2, "sharpness": 0.05}, ValueError),
                    ({"min_plpd": 0.2, "generator": 3}, TypeError), ({"weighted": -0.4, "min_plpd": 0.2}, ValueError)):
        with pytest.raises(exc):
            bnkit.tent(model, TARGET, **kw)
        assert state_equal(model, state)
    with pytest.raises(TypeError, match="image batches"):
        bnkit.tent(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)), torch.randn(8, 3), min_plpd=0.2)


# ------------------------------------------------------------------ MEMO's marginal entropy over views
marginal_logits = tent_mod.marginal_logits
image_jitter = tent_mod.image_jitter


def _np_marginal_entropy(view_logits, views):
    """The entropy of the mean softmax over the views, in float64 NumPy (view k of sample i: row k N + i)."""
    z = view_logits.detach().double().numpy()
    z = z - z.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    pm = p.reshape(views, -1, p.shape[1]).mean(0)
    return -(pm * np.log(pm)).sum(1)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 6), st.integers(2, 12), st.sampled_from([None, 0.4, 0.8]), st.booleans())
def test_marginal_entropy_matches_a_float64_hand_computation(seed, views, classes, frac, weighted):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(views * 7, classes, generator=gen) * torch.rand(views * 7, 1, generator=gen) * 8
    h64 = _np_marginal_entropy(z, views)
    m = marginal_logits(z, views)
    assert m.shape == (7, classes)
    np.testing.assert_allclose(m.double().softmax(1).numpy(),
                               np.exp(z.double().numpy() - np.log(np.exp(z.double().numpy()).sum(1, keepdims=True)))
                               .reshape(views, 7, classes).mean(0), rtol=1e-5, atol=1e-7)
    if frac is None:
        loss, mask = reliable_entropy(m)
        assert mask.all() and loss.item() == pytest.approx(h64.mean(), rel=1e-5, abs=1e-6)
        return
    e0 = frac * math.log(classes)
    if np.any(np.abs(h64 - e0) < 1e-5):
        return
    loss, mask = reliable_entropy(m, frac, weighted)
    assert mask.tolist() == (h64 < e0).tolist()
    if mask.any():
        w = np.exp(e0 - h64) if weighted else np.ones_like(h64)
        assert loss.item() == pytest.approx((w * h64)[h64 < e0].mean(), rel=1e-5, abs=1e-6)


def test_marginal_logits_one_view_is_the_view_and_bad_views_are_refused():
    z = torch.randn(6, 4)
    assert marginal_logits(z, 1) is z
    with pytest.raises(ValueError, match="views"):
        marginal_logits(z, 4)
    with pytest.raises(ValueError, match="positive int"):
        marginal_logits(z, 0)


def _hand_memo(model, params, x, augment, views, lr, frac=None, weighted=False, rho=None):
    """One MEMO step written out: views from a generator seeded with 0, one forward of all of them (batch
    statistics), the mean softmax in torch, its entropy (the filter and weights from float64 NumPy), plain
    SGD; with ``rho``, SAM's second pass on the same views."""
    gen = torch.Generator().manual_seed(0)
    xv = torch.cat([augment(x, gen) for _ in range(views)])

    def loss_of(within=None):
        z = model(xv)
        pm = z.softmax(1).reshape(views, len(x), -1).mean(0)
        h = -(pm * pm.log()).sum(1)
        h64 = _np_marginal_entropy(z, views)
        e0 = math.inf if frac is None else frac * math.log(z.shape[1])
        keep = h64 < e0
        if within is not None:
            keep &= within
        w = torch.from_numpy(np.exp(e0 - h64)).float() if weighted else torch.ones_like(h)
        idx = torch.from_numpy(np.flatnonzero(keep))
        return (h * w)[idx].sum() / len(idx), keep

    loss, keep = loss_of()
    grads = torch.autograd.grad(loss, params)
    if rho is not None:
        norm = torch.sqrt(sum((gr ** 2).sum() for gr in grads))
        eps = [rho * gr / (norm + 1e-12) for gr in grads]
        with torch.no_grad():
            for p, e in zip(params, eps):
                p += e
        grads = torch.autograd.grad(loss_of(keep)[0], params)
        with torch.no_grad():
            for p, e in zip(params, eps):
                p -= e
    with torch.no_grad():
        for p, gr in zip(params, grads):
            p -= lr * gr
    return int(keep.sum())


@pytest.mark.parametrize("kw", [{}, {"frac": 0.8, "weighted": True}, {"frac": 0.8, "rho": 0.05}])
def test_memo_step_by_hand(kw):
    views, lr = 3, 0.5
    model, oracle = _model(), _model()
    used = _hand_memo(oracle, _bn_train_mode(oracle), TARGET, image_jitter, views, lr, **kw)
    if "frac" in kw:
        assert 0 < used < len(TARGET)  # the filter on the marginal entropy does select here
    opts = {"max_entropy": kw.get("frac"), "weighted": kw.get("weighted", False), "sharpness": kw.get("rho")}
    _, h = bnkit.tent(model, TARGET, lr=lr, optimizer=_plain_sgd, stats="source", augment=image_jitter, views=views,
                      **opts)  # generator=None: seeded with 0, as the oracle's
    for i in (1, 5):
        torch.testing.assert_close(model[i].weight, oracle[i].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model[i].bias, oracle[i].bias, rtol=1e-5, atol=1e-6)
    assert h.samples_used == used and h.samples_seen == len(TARGET) and h.steps_taken == 1
    plain = _model()  # and it is not TENT's step
    bnkit.tent(plain, TARGET, lr=lr, optimizer=_plain_sgd, stats="source", max_entropy=opts["max_entropy"],
               weighted=opts["weighted"], sharpness=opts["sharpness"])
    assert not torch.allclose(plain[1].weight, model[1].weight)


def test_one_view_of_an_identity_augmentation_is_plain_tent_bit_for_bit():
    for kw in ({}, {"max_entropy": 0.4, "weighted": True}, {"max_entropy": 0.4, "sharpness": 0.05},
               {"step_stats": "reestimate"}):
        a, b = _model(), _model()
        batches = [TARGET[:20], TARGET[20:]]
        _, ha = bnkit.tent(a, batches, steps=2, lr=1e-2, **kw)
        _, hb = bnkit.tent(b, batches, steps=2, lr=1e-2, augment=lambda x, g: x, views=1, **kw)
        sa, sb = snapshot(a), snapshot(b)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert (ha.samples_used, ha.samples_seen, ha.steps_taken) == (hb.samples_used, hb.samples_seen, hb.steps_taken)


def test_memo_restores_the_original_logits_exactly_and_bad_options_change_nothing():
    model = _model()
    state = snapshot(model)
    flags = [m.training for m in model.modules()]
    with torch.no_grad():
        clean = model(TARGET)
    _, h = bnkit.tent(model, TARGET.split(10), steps=2, augment=image_jitter, views=4, max_entropy=0.9)
    with torch.no_grad():
        assert not torch.equal(model(TARGET), clean)
    h.restore()
    with torch.no_grad():
        assert torch.equal(model(TARGET), clean)
    assert state_equal(model, state) and [m.training for m in model.modules()] == flags
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    bad = [({"views": 0}, ValueError), ({"views": 2}, ValueError), ({"views": True, "augment": image_jitter}, ValueError),
           ({"augment": "jitter"}, TypeError), ({"augment": image_jitter, "min_plpd": 0.2}, ValueError),
           ({"augment": lambda x, g: x[:, :1], "views": 2}, TypeError),  # the wrong shape: refused mid-way, undone
           ({"augment": lambda x, g: x.numpy()}, TypeError)]
    for kw, exc in bad:
        with pytest.raises(exc):
            bnkit.tent(model, TARGET.split(10), **kw)
        assert state_equal(model, state) and [m.training for m in model.modules()] == flags
    assert all(p.requires_grad for p in model.parameters())


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 1000), st.integers(0, 3), st.integers(5, 9))
def test_image_jitter_translates_each_image_with_replicated_borders(seed, t, size):
    x = torch.randn(4, 2, size, size + 1, generator=torch.Generator().manual_seed(seed))
    y = image_jitter(x, torch.Generator().manual_seed(seed), brightness=0, contrast=0, translate=t)
    padded = nn.functional.pad(x, (t,) * 4, mode="replicate")
    for n in range(4):
        shifts = [(dy, dx) for dy in range(2 * t + 1) for dx in range(2 * t + 1)
                  if torch.allclose(y[n], padded[n, :, dy:dy + size, dx:dx + size + 1], rtol=0, atol=1e-5)]
        assert shifts, "every image is its input moved by at most t pixels"
    torch.testing.assert_close(image_jitter(x, torch.Generator().manual_seed(seed), brightness=0, contrast=0, translate=t),
                               y, rtol=0, atol=0)  # the generator decides


@pytest.mark.parametrize("unit", ["pixels", "levels"])
def test_image_jitter_scales_contrast_around_each_mean_and_shifts_the_level(unit):
    x = torch.rand(16, 3, 6, 6, generator=torch.Generator().manual_seed(1)) * torch.arange(1.0, 4.0).reshape(1, 3, 1, 1)
    y = image_jitter(x, torch.Generator().manual_seed(2), brightness=0.7, contrast=0.5, translate=0,
                     brightness_unit=unit)
    x64, y64 = x.double().numpy(), y.double().numpy()
    mu, mv = x64.mean((2, 3), keepdims=True), y64.mean((2, 3), keepdims=True)
    s = mu.std(0, ddof=1, keepdims=True) if unit == "levels" else x64.std((0, 2, 3), ddof=1, keepdims=True)
    # one contrast factor per image (all its channels), in [2^-0.5, 2^0.5]: least squares, then the residual
    a = ((y64 - mv) * (x64 - mu)).sum((1, 2, 3), keepdims=True) / ((x64 - mu) ** 2).sum((1, 2, 3), keepdims=True)
    np.testing.assert_allclose(y64 - mv, a * (x64 - mu), rtol=0, atol=1e-5)
    assert np.all((a >= 2 ** -0.5 - 1e-6) & (a <= 2 ** 0.5 + 1e-6)) and a.std() > 0.05
    b = (mv - mu) / s  # one level shift per image, in batch units, within +-0.7
    assert np.allclose(b, b[:, :1], rtol=1e-4, atol=1e-5)
    assert np.all(np.abs(b) <= 0.7 + 1e-5) and b[:, 0].std() > 0.05


def test_image_jitter_bad_input():
    for kw, exc in (({"brightness": -1.0}, ValueError), ({"contrast": math.inf}, ValueError),
                    ({"translate": 1.5}, ValueError), ({"brightness_unit": "std"}, ValueError)):
        with pytest.raises(exc):
            image_jitter(torch.randn(2, 1, 4, 4), **kw)
    with pytest.raises(TypeError):
        image_jitter(torch.randn(2, 16))
