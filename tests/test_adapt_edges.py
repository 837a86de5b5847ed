"""bnkit.adapt / tent / inspect / convert_domain_bn on the edges, against hand-computed oracles."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnkit
from bnkit.tools._bnlayers import bn_layers


def _net(dropout: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    mods = [nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()]
    if dropout:
        mods.append(nn.Dropout(0.3))
    mods += [nn.Conv2d(4, 4, 3, padding=1), bnkit.BatchNorm2d(4), nn.ReLU(),
             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)]
    m = nn.Sequential(*mods)
    with torch.no_grad():
        for _, bn in bn_layers(m):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return m.eval()


def _state(m: nn.Module) -> dict:
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same_state(m: nn.Module, s: dict) -> bool:
    return all(torch.equal(v, s[k]) for k, v in m.state_dict().items())


def _stats(x: torch.Tensor, dims: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(dims), x.var(dims, unbiased=True)


# ------------------------------------------------------------------ adapt: hand oracles
@torch.no_grad()
def test_prior_two_layers_several_batches_matches_hand_mixture():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                      nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)).double()
    for bn in (m[1], m[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    m.eval()
    ref = copy.deepcopy(m)
    data = [torch.randn(k, 1, 5, 5, dtype=torch.float64) * 2 + 1 for k in (3, 5, 2)]
    N = 4.0
    s1 = (ref[1].running_mean.clone(), ref[1].running_var.clone())
    s2 = (ref[4].running_mean.clone(), ref[4].running_var.clone())
    in1, in2, n = [], [], 0
    for x in data:
        n += x.shape[0]
        w = n / (N + n)
        a = ref[0](x)
        in1.append(a)
        mu, v = _stats(torch.cat(in1), (0, 2, 3))
        m1 = ((1 - w) * s1[0] + w * mu, (1 - w) * s1[1] + w * v)
        b = ref[3](F.relu(F.batch_norm(a, *m1, ref[1].weight, ref[1].bias, False, 0.0, ref[1].eps)))
        in2.append(b)
        mu2, v2 = _stats(torch.cat(in2), (0, 2, 3))
        m2 = ((1 - w) * s2[0] + w * mu2, (1 - w) * s2[1] + w * v2)
    h = bnkit.adapt(m, data, mode="prior", prior=N)
    assert h.samples == 10
    for got, want in ((m[1].running_mean, m1[0]), (m[1].running_var, m1[1]),
                      (m[4].running_mean, m2[0]), (m[4].running_var, m2[1])):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    h.restore()
    assert _same_state(m, ref.state_dict())


@torch.no_grad()
@pytest.mark.parametrize("kind", ["momentum", "window", "cumulative"])
def test_online_outputs_match_hand_statistics(kind):
    torch.manual_seed(2)
    bn = nn.BatchNorm1d(3).double().eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    src = (bn.running_mean.clone(), bn.running_var.clone())
    xs = [torch.randn(k, 3, 4, dtype=torch.float64) * 3 + 2 for k in (2, 3, 4)]
    kw = {"momentum": {"momentum": 0.3}, "window": {"window": 2, "prior": 3}, "cumulative": {"prior": 3}}[kind]
    with bnkit.adapt(bn, mode="online", **kw) as h:
        mu, v = src
        seen = []
        for x in xs:
            y = bn(x)
            seen.append(x)
            if kind == "momentum":
                bm, bv = _stats(x, (0, 2))
                mu, v = 0.7 * mu + 0.3 * bm, 0.7 * v + 0.3 * bv
            else:
                a = torch.cat(seen[-2:] if kind == "window" else seen)
                w = a.shape[0] / (3 + a.shape[0])
                am, av = _stats(a, (0, 2))
                mu, v = (1 - w) * src[0] + w * am, (1 - w) * src[1] + w * av
            want = F.batch_norm(x, mu, v, bn.weight, bn.bias, False, 0.0, bn.eps)
            torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
        assert h.samples == 9
    assert torch.equal(bn.running_mean, src[0]) and torch.equal(bn.running_var, src[1])


@torch.no_grad()
def test_reestimate_data_forms_and_channels_last_agree():
    m = _net(dropout=True)
    x = torch.randn(32, 1, 6, 6) * 2 + 1
    forms = [
        list(x.split(8)),
        (b for b in x.split(8)),
        [(b, torch.zeros(len(b))) for b in x.split(8)],
        torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(32)), batch_size=8),
    ]
    results = []
    for data in forms:
        a = copy.deepcopy(m)
        bnkit.adapt(a, data)
        results.append(_state(a))
    cl = copy.deepcopy(m).to(memory_format=torch.channels_last)
    bnkit.adapt(cl, [b.contiguous(memory_format=torch.channels_last) for b in x.split(8)])
    for r in results[1:]:
        assert all(torch.equal(r[k], results[0][k]) for k in r)
    for k, v in cl.state_dict().items():
        torch.testing.assert_close(v, results[0][k], rtol=1e-5, atol=1e-6)
    # num_batches: only the first two batches
    a, b = copy.deepcopy(m), copy.deepcopy(m)
    bnkit.adapt(a, x.split(8), num_batches=2)
    bnkit.adapt(b, x[:16].split(8))
    assert _same_state(a, b.state_dict())


@torch.no_grad()
@pytest.mark.parametrize("mode", ["reestimate", "prior", "online"])
def test_restore_gives_back_clean_outputs_and_flags(mode):
    m = _net(dropout=True)
    m.train()
    m[1].eval()
    clean = torch.randn(8, 1, 6, 6)
    s = _state(m)
    flags = [mm.training for mm in m.modules()]
    m.eval()
    y0 = m(clean)
    m.train()
    m[1].eval()
    h = bnkit.adapt(m, None if mode == "online" else torch.randn(16, 1, 6, 6) * 3, mode=mode)
    if mode == "online":
        m.eval()
        m(torch.randn(16, 1, 6, 6) * 3)
    h.restore()
    assert _same_state(m, s)
    assert flags == [mm.training for mm in m.modules()]
    m.eval()
    assert torch.equal(m(clean), y0)


def test_online_warm_up_leaves_dropout_flag_alone():
    m = _net(dropout=True).train()
    h = bnkit.adapt(m, [torch.randn(4, 1, 6, 6)], mode="online")
    try:
        assert m[3].training  # the Dropout: only BN layers are put in eval mode
    finally:
        h.restore()


# ------------------------------------------------------------------ tent: hand-written loop
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_tent_matches_a_hand_written_loop(optimizer):
    m = _net(dropout=True)
    ref = copy.deepcopy(m)
    data = [torch.randn(8, 1, 6, 6) * 2 + 1 for _ in range(3)]
    before = _state(m)
    rg = [p.requires_grad for p in m.parameters()]
    m, h = bnkit.tent(m, data, steps=2, lr=1e-2, optimizer=optimizer)
    bns = [ref[1], ref[5]]
    src = [(b.running_mean.clone(), b.running_var.clone(), b.num_batches_tracked.clone()) for b in bns]
    for b in bns:
        b.train()
        b.momentum = 0.0
    ps = [p for b in bns for p in (b.weight, b.bias)]
    for p in ref.parameters():
        p.requires_grad_(False)
    for p in ps:
        p.requires_grad_(True)
    opt = (torch.optim.Adam(ps, lr=1e-2) if optimizer == "adam"
           else torch.optim.SGD(ps, lr=1e-2, momentum=0.9))
    for x in data:
        for _ in range(2):
            opt.zero_grad()
            z = ref(x)
            (-(z.softmax(1) * z.log_softmax(1)).sum(1).mean()).backward()
            opt.step()
    with torch.no_grad():
        for b, (mu, v, nbt) in zip(bns, src):
            b.eval()
            b.momentum = 0.1
            b.running_mean.copy_(mu)
            b.running_var.copy_(v)
            b.num_batches_tracked.copy_(nbt)
    bnkit.adapt(ref, data)
    assert _same_state(m, ref.state_dict())
    assert h.steps_taken == 6 and h.samples_seen == 48 and h.samples_used == 48
    assert [p.requires_grad for p in m.parameters()] == rg
    assert not m.training and all(not mm.training for mm in m.modules())
    # only BN affine parameters and BN statistics changed
    changed = {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
    assert changed <= {"1.weight", "1.bias", "1.running_mean", "1.running_var",
                       "5.weight", "5.bias", "5.running_mean", "5.running_var"}
    h.restore()
    assert _same_state(m, before)


def test_tent_keeps_gradients_of_other_parameters():
    m = _net()
    g = torch.ones_like(m[-1].weight)
    m[-1].weight.grad = g.clone()
    _, h = bnkit.tent(m, torch.randn(8, 1, 6, 6))
    h.restore()
    assert m[-1].weight.grad is not None and torch.equal(m[-1].weight.grad, g)


# ------------------------------------------------------------------ inspect
def test_inspect_formula_data_forms_json_and_model_unchanged():
    m = _net(dropout=True)
    x = torch.randn(16, 1, 6, 6) * 2 + 1
    with torch.no_grad():
        a = m[0](x).double()
    mu, v = _stats(a, (0, 2, 3))
    rm, rv = m[1].running_mean.double(), m[1].running_var.double()
    shift = ((mu - rm).abs() / (rv + m[1].eps).sqrt()).mean().item()
    lvr = ((v + m[1].eps) / (rv + m[1].eps)).log().mean().item()
    s = _state(m)
    m.train()
    flags = [mm.training for mm in m.modules()]
    forms = [x, list(x.split(4)), (b for b in x.split(4)), [(b, torch.zeros(4)) for b in x.split(4)],
             torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(16)), batch_size=4)]
    dicts = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for data in forms:
            r = bnkit.inspect(m, data)
            assert r.layers[0].shift == pytest.approx(shift, rel=1e-9)
            assert r.layers[0].log_var_ratio == pytest.approx(lvr, rel=1e-9)
            d = json.loads(r.to_json())
            assert d == r.to_dict()
            dicts.append((sorted(r.codes()), [lay["fuse"] for lay in d["layers"]], d["first_shift"]))
    assert all(d == dicts[0] for d in dicts[1:])
    assert _same_state(m, s) and flags == [mm.training for mm in m.modules()]


def test_inspect_healthy_recalibrated_model_has_no_findings_in_either_mode():
    m = _net(dropout=True)
    x = torch.randn(64, 1, 6, 6)
    bnkit.recalibrate(m, x)
    m.eval()
    assert bnkit.inspect(m, x.split(16)).codes() == set()
    m.train()
    assert bnkit.inspect(m, x.split(16)).codes() == set()


def test_inspect_nan_mean_with_variance_shifted_data_reports():
    m = _net()
    with torch.no_grad():
        m[1].running_mean[0] = float("nan")
    r = bnkit.inspect(m, torch.randn(8, 1, 6, 6) * 5)
    assert "nonfinite" in r.codes("1")
    json.loads(r.to_json())


def test_inspect_domain_batchnorm_compares_with_the_calls_domain():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    x0, x1 = torch.randn(64, 1, 6, 6), torch.randn(64, 1, 6, 6) * 4 + 3
    bnkit.recalibrate(m, x0)
    d = bnkit.convert_domain_bn(m, 2)
    with bnkit.domain(d, 1):
        bnkit.recalibrate(d, x1)
    d.eval()
    with warnings.catch_warnings(), bnkit.domain(d, 1):
        warnings.simplefilter("ignore")
        r = bnkit.inspect(d, x1)
    assert r.layers[0].shift < 0.01  # domain 1's data against domain 1's own statistics


@pytest.mark.parametrize("name", ["shift_tol", "dead_tol", "log_var_tol", "tiny_var"])
def test_inspect_refuses_a_threshold_its_json_cannot_hold(name):
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        bnkit.inspect(_net(), **{name: math.inf})
    r = bnkit.inspect(_net(), **{name: 1e30})  # a large finite one: the report and its JSON as usual
    assert json.loads(r.to_json())["thresholds"][name] == 1e30


# ------------------------------------------------------------------ convert_domain_bn
@torch.no_grad()
@pytest.mark.parametrize("case", ["torch_mom_none", "torch_no_stats", "torch_noaffine", "bnkit_axis_last",
                                  "bnkit_nobias", "torch_f64"])
def test_convert_domain_bn_layer_kinds_keep_eval_output_hooks_and_state(case):
    torch.manual_seed(3)
    bn, x = {
        "torch_mom_none": (nn.BatchNorm1d(4, momentum=None), torch.randn(5, 4)),
        "torch_no_stats": (nn.BatchNorm1d(4, track_running_stats=False), torch.randn(5, 4)),
        "torch_noaffine": (nn.BatchNorm2d(4, affine=False), torch.randn(5, 4, 3, 3)),
        "bnkit_axis_last": (bnkit.BatchNorm1d(4, axis=-1), torch.randn(5, 3, 4)),
        "bnkit_nobias": (bnkit.BatchNorm2d(4, bias=False), torch.randn(5, 4, 3, 3)),
        "torch_f64": (nn.BatchNorm2d(4).double(), torch.randn(5, 4, 3, 3).double()),
    }[case]
    bn.train()
    for _ in range(3):
        bn(x * 2 + 1)
    if getattr(bn, "weight", None) is not None:
        bn.weight.uniform_(0.5, 2)
    if getattr(bn, "bias", None) is not None:
        bn.bias.uniform_(-1, 1)
    bn.eval()
    calls = []
    bn.register_forward_hook(lambda *a: calls.append(1))
    m = nn.Sequential(bn)
    want = m(x)
    d = bnkit.convert_domain_bn(m, 2)
    for k in range(2):
        with bnkit.domain(d, k):
            torch.testing.assert_close(d(x), want, rtol=1e-5, atol=1e-6)
    assert len(calls) == 3
    sd = d.state_dict()
    d2 = bnkit.convert_domain_bn(m, 2)
    d2.load_state_dict(sd)
    assert all(torch.equal(v, sd[k]) for k, v in d2.state_dict().items())
