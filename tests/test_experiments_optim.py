"""The optimization experiments (ics, bnonly, ghost): their pieces against hand-derived values (the noise
layer's statistics, the landscape along the gradient of a quadratic, the random-parameter masks), each
check fed hand-made runs where its claim holds and where it fails, and every experiment end to end on
tiny settings (artifacts, checks, resume)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from _artifacts import run_and_check_artifacts
from bnkit.experiments import bnonly, ghost, ics
from bnkit.experiments.train import RunConfig, StepBudget, RunInterrupted, make_model, steps_to_threshold, train_run


@pytest.fixture(scope="module")
def mnist5k():
    from bnkit.experiments.data import load_dataset
    return load_dataset("mnist5k")


def fake_run(name, variant, seed, acc, *, steps=None, thresholds=(0.9,), drift=0.1, records=(), extra=None):
    """A run dict with the fields the summaries read, its summary computed from the series (as train.py's)."""
    steps = steps or [100 * i for i in range(len(acc))]
    return {"name": name, "variant": variant, "norm": variant, "seed": seed, "config": {}, "steps": steps,
            "test_acc": list(acc), "train_loss": [None] + [1.0] * (len(acc) - 1), "diverged_at": None,
            "step_records": list(records), "extra": dict(extra or {}),
            "summary": {"final_acc": acc[-1], "best_acc": max(acc),
                        "steps_to": {f"{t:.2f}": steps_to_threshold(steps, acc, t) for t in thresholds},
                        "drift": {"range": drift, "relative": 2 * drift}},
            "timing": {"ms_per_step": 1.0}}


# ------------------------------------------------------------------------------------------ ics: the noise

def test_noisy_norm_applies_the_drawn_shift_and_scale_in_training_only():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(5)
    layer = ics.NoisyNorm(bn, 5)
    ics.draw_noise([layer], seed=3, step=7, shift=0.5, scale=1.5)
    x = torch.randn(400, 5) * 3 + 2
    ref = nn.BatchNorm1d(5)
    y = layer(x)
    z = ref(x)  # torch's BN on the same batch: the oracle before the noise
    torch.testing.assert_close(y, z * layer.scale + layer.shift)
    # the output's per-channel mean is the shift and its (biased) std the scale, up to BN's eps
    torch.testing.assert_close(y.mean(0), layer.shift, atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(0, unbiased=False), layer.scale, atol=1e-4, rtol=1e-4)
    layer.eval(), ref.eval()
    torch.testing.assert_close(layer(x), ref(x))
    # conv maps: the noise is per channel (dim 1)
    c = ics.NoisyNorm(nn.BatchNorm2d(3), 3)
    ics.draw_noise([c], 0, 1, 0.5, 1.5)
    y = c(torch.randn(8, 3, 4, 4))
    torch.testing.assert_close(y.mean((0, 2, 3)), c.shift, atol=1e-5, rtol=0)
    assert "shift" not in c.state_dict() and "norm.running_mean" in c.state_dict()
    with pytest.raises(ValueError, match="shape"):
        c.set_noise(torch.zeros(4), torch.ones(4))


def test_noise_draws_are_seeded_time_varying_and_have_the_stated_distribution():
    layers = [ics.NoisyNorm(nn.Identity(), 50), ics.NoisyNorm(nn.Identity(), 30)]

    def draw(seed, step):
        ics.draw_noise(layers, seed, step, 0.5, 1.5)
        return torch.cat([m.shift for m in layers]).clone(), torch.cat([m.scale for m in layers]).clone()
    a, b = draw(1, 10), draw(1, 10)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(draw(1, 11)[0], a[0]) and not torch.equal(draw(2, 10)[0], a[0])
    sh, sc = zip(*(draw(0, t) for t in range(400)))
    sh, lsc = torch.stack(sh), torch.log(torch.stack(sc))
    assert float(sh.abs().max()) <= 0.5 and float(lsc.abs().max()) <= math.log(1.5) + 1e-6
    # U(-a, a): mean 0, variance a^2 / 3; log-scale U(-ln b, ln b): variance (ln b)^2 / 3
    assert abs(float(sh.mean())) < 0.01 and float(sh.var()) == pytest.approx(0.25 / 3, rel=0.03)
    assert abs(float(lsc.mean())) < 0.01 and float(lsc.var()) == pytest.approx(math.log(1.5) ** 2 / 3, rel=0.03)
    # non-zero mean at a given step: the channel's shift, which moves from step to step
    assert float((sh[1:] - sh[:-1]).abs().mean()) > 0.2


# ------------------------------------------------------------------------------------------ ics: the landscape

class _Quadratic(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))


def test_landscape_of_a_quadratic_matches_the_closed_form():
    a = np.array([1.0, 4.0, 0.25])
    w = np.array([1.0, -2.0, 3.0])
    m = _Quadratic(w.tolist())
    A = torch.tensor(a)
    loss = lambda mod, x, y: 0.5 * (A * mod.w ** 2).sum()
    etas = [0.05, 0.1, 0.3]
    r = ics.landscape(m, None, None, etas, loss_fn=loss)
    g = a * w
    L = [0.5 * np.sum(a * (w - e * g) ** 2) for e in etas]
    d = [e * np.linalg.norm(a * g) for e in etas]  # grad(w - eta g) - g = -eta A g
    assert r["loss"] == pytest.approx(0.5 * np.sum(a * w ** 2))
    assert r["grad_norm"] == pytest.approx(np.linalg.norm(g))
    assert r["loss_min"] == pytest.approx(min(L)) and r["loss_max"] == pytest.approx(max(L))
    assert r["loss_range"] == pytest.approx(max(L) - min(L))
    assert r["grad_change_min"] == pytest.approx(min(d)) and r["grad_change_max"] == pytest.approx(max(d))
    assert r["grad_change_range"] == pytest.approx(max(d) - min(d))
    assert r["beta"] == pytest.approx(np.linalg.norm(a * g) / np.linalg.norm(g))
    # the model itself is untouched
    assert m.w.tolist() == w.tolist() and m.w.grad is None
    with pytest.raises(ValueError, match="step size"):
        ics.landscape(m, None, None, [], loss_fn=loss)


def test_landscape_leaves_a_bn_net_unchanged():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    r = ics.landscape(net, x, y, [0.1, 1.0])
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    assert r["loss"] == pytest.approx(float(nn.functional.cross_entropy(net.train()(x), y).detach()))


def test_ics_noisy_run_resumes_exactly(mnist5k, tmp_path):
    cfg = dict(ics.DEFAULTS, hidden=[16] * 3, steps=20, eval_every=10, seeds=[0], landscape_every=5, probe_size=50)
    rc = next(r for r in ics.make_runs(cfg) if r.variant == "noisy-bn")
    full = train_run(rc, mnist5k, tmp_path / "a")
    assert [r["step"] for r in full["step_records"]] == [5, 10, 15, 20]
    with pytest.raises(RunInterrupted):
        train_run(rc, mnist5k, tmp_path / "b", budget=StepBudget(13))
    again = train_run(rc, mnist5k, tmp_path / "b", resume=True)
    strip = lambda r: {k: v for k, v in r.items() if k != "timing"}
    assert strip(again) == strip(full)
    # the noise changes training: the plain BN arm of the same seed differs
    bn = train_run(next(r for r in ics.make_runs(cfg) if r.variant == "bn"), mnist5k, tmp_path / "c")
    assert bn["train_loss"] != full["train_loss"]


def _ics_results(acc, drift, land):
    out = {}
    for arm in ics.ARMS:
        for s in (0, 1):
            recs = [{"step": 50 * (i + 1), **{k: v for k, v in land[arm].items()}} for i in range(3)]
            out[f"{arm}-s{s}"] = fake_run(f"{arm}-s{s}", arm, s, acc[arm], drift=drift[arm], records=recs)
    return out


def test_ics_checks_hold_and_fail():
    cfg = dict(ics.DEFAULTS)
    land_ok = {"standard": {"loss_range": 2.0, "grad_change_range": 5.0, "grad_change_max": 6, "beta": 9, "grad_norm": 1},
               "bn": {"loss_range": 0.1, "grad_change_range": 0.5, "grad_change_max": 1, "beta": 3, "grad_norm": 1},
               "noisy-bn": {"loss_range": 0.3, "grad_change_range": 1.0, "grad_change_max": 2, "beta": 4, "grad_norm": 1}}
    ok = _ics_results({"standard": [0.1, 0.5, 0.8, 0.88], "bn": [0.1, 0.92, 0.94, 0.95], "noisy-bn": [0.1, 0.91, 0.93, 0.94]},
                      {"standard": 0.5, "bn": 0.1, "noisy-bn": 0.9}, land_ok)
    s = ics.summarize(cfg, ok)
    c = s["checks"]
    assert all(v["pass"] for v in c.values()), c
    assert c["noisy_bn_reaches_0.90_before_standard"]["noisy_bn_steps"] == 100
    k = "noisy_bn_mean_acc_within_0.02_of_bn_and_above_standard"
    assert c[k]["noisy_bn"] == pytest.approx((0.91 + 0.93 + 0.94) / 3)
    assert c[k]["final_noisy_bn"] == pytest.approx(0.94)
    assert c["bn_loss_range_lt_standard"]["ratio"] == pytest.approx(20.0)
    assert s["landscape"]["noisy-bn"]["grad_change_range"] == pytest.approx(1.0)
    assert c["bn_loss_range_lt_standard"]["bn_smaller_in_frac_of_measurements"] == 1.0
    a = [{"seed": 0, "step_records": [{"step": 1, "x": 1.0}, {"step": 2, "x": 5.0}, {"step": 3, "x": 0.0}]}]
    b = [{"seed": 0, "step_records": [{"step": 1, "x": 2.0}, {"step": 2, "x": 4.0}]}, {"seed": 1, "step_records": []}]
    assert ics.paired_fraction(a, b, "x") == 0.5 and ics.paired_fraction(a, [], "x") is None
    land_bad = dict(land_ok, bn=dict(land_ok["bn"], loss_range=3.0, grad_change_range=6.0))
    bad = _ics_results({"standard": [0.1, 0.91, 0.92, 0.93], "bn": [0.1, 0.92, 0.94, 0.95], "noisy-bn": [0.1, 0.5, 0.85, 0.9]},
                       {"standard": 0.5, "bn": 0.1, "noisy-bn": 0.05}, land_bad)
    c = ics.summarize(cfg, bad)["checks"]
    assert not any(v["pass"] for v in c.values()), c


# ------------------------------------------------------------------------------------------ bnonly

def test_random_masks_choose_exactly_count_entries():
    ps = [torch.zeros(7, 5), torch.zeros(3), torch.zeros(2, 2, 3)]
    for count in (0, 1, 13, 50):
        ms = bnonly.random_masks(ps, count, seed=4)
        assert [m.shape for m in ms] == [p.shape for p in ps] and sum(int(m.sum()) for m in ms) == count
    a, b = bnonly.random_masks(ps, 13, 4), bnonly.random_masks(ps, 13, 4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, bnonly.random_masks(ps, 13, 5)))
    with pytest.raises(ValueError, match="cannot choose"):
        bnonly.random_masks(ps, 51, 0)


@pytest.mark.parametrize("which", ["bn", "random", "output"])
def test_train_only_trains_exactly_the_chosen_entries(mnist5k, which):
    import bnkit
    cfg = RunConfig(name="x", arch="mlp", norm="bn", hidden=(12, 10), activation="relu", options={"dropout": 0.0},
                    lr=0.5, optimizer="momentum", steps=5)
    ext = bnonly.TrainOnly(which, seed=1)
    model = ext.prepare(make_model(cfg, mnist5k), cfg, mnist5k)
    n_bn = sum(p.numel() for p in bnkit.bn_parameters(model))
    assert n_bn == 2 * (12 + 10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(ext.parameters(model), lr=0.5, momentum=0.9)
    for i in range(4):
        ext.train_step(model, mnist5k.x_train[32 * i:32 * (i + 1)], mnist5k.y_train[32 * i:32 * (i + 1)], opt)
    changed = {n: (p.detach() != before[n]) for n, p in model.named_parameters()}
    bn_names = {n for n, _ in bnkit.bn_parameters(model, named=True)}
    if which == "bn":
        assert ext.count == n_bn
        assert all(not c.any() for n, c in changed.items() if n not in bn_names)
        assert all(c.all() for n, c in changed.items() if n in bn_names)
    elif which == "output":
        assert ext.count == 10 * 10 + 10
        assert all(not c.any() for n, c in changed.items() if not n.startswith("head."))
    else:
        assert ext.count == n_bn
        assert all(not changed[n].any() for n in bn_names)
        params = dict(model.named_parameters())
        total_changed = 0
        for n, c in changed.items():
            m = ext.masks.get(id(params[n]))
            if m is None:
                assert not c.any()
            else:
                assert not (c & ~m).any()  # nothing outside the mask moved
                total_changed += int(c.sum())
        assert 0 < total_changed <= n_bn
    ev = ext.on_eval(model, 4, mnist5k)
    assert ev["trained_entries"] == ext.count and 0.0 <= ev["dead_frac"] <= 1.0


def test_dead_fraction_counts_small_gammas(mnist5k):
    cfg = RunConfig(name="x", arch="mlp", norm="bn", hidden=(10, 10), activation="relu", options={"dropout": 0.0})
    ext = bnonly.TrainOnly("bn", gamma_tol=0.05)
    model = ext.prepare(make_model(cfg, mnist5k), cfg, mnist5k)
    with torch.no_grad():
        w = model.blocks[1].norm.weight
        w[:3] = torch.tensor([0.01, -0.04, 0.06])
        model.blocks[2].norm.weight[0] = -0.005
    ev = ext.on_eval(model, 0, mnist5k)
    # |gamma| < 0.05: 0.01, -0.04, -0.005; < 0.01: -0.005 only; < 0.1: those and 0.06
    assert ev["dead_frac"] == pytest.approx(3 / 20) and ev["dead_frac_0.01"] == pytest.approx(1 / 20)
    assert ev["dead_frac_0.1"] == pytest.approx(4 / 20)
    with pytest.raises(ValueError, match="which"):
        bnonly.TrainOnly("all")


def _bnonly_results(acc, dead, counts=None):
    counts = counts or {"bn-only": 100, "random": 100, "output": 60}
    out = {}
    for arm in bnonly.ARMS:
        for s in (0, 1):
            n = len(acc[arm])
            ex = {"dead_frac": [0.0] * (n - 1) + [dead[arm]], "dead_frac_0.01": [0.0] * n, "dead_frac_0.1": [dead[arm]] * n,
                  "trained_entries": [float(counts[arm])] * n}
            out[f"{arm}-s{s}"] = fake_run(f"{arm}-s{s}", arm, s, acc[arm], extra=ex)
    return out


def test_bnonly_checks_hold_and_fail():
    cfg = dict(bnonly.DEFAULTS)
    ok = _bnonly_results({"bn-only": [0.1, 0.7, 0.85], "random": [0.1, 0.5, 0.7], "output": [0.1, 0.6, 0.65]},
                         {"bn-only": 0.3, "random": 0.0, "output": 0.0})
    c = bnonly.summarize(cfg, ok)["checks"]
    assert all(v["pass"] for v in c.values()), c
    assert c["bn_only_beats_random_and_output_by_0.02"]["margin_over_random"] == pytest.approx(0.15)
    bad = _bnonly_results({"bn-only": [0.1, 0.7, 0.71], "random": [0.1, 0.5, 0.7], "output": [0.1, 0.6, 0.65]},
                          {"bn-only": 0.05, "random": 0.0, "output": 0.0}, {"bn-only": 100, "random": 99, "output": 60})
    c = bnonly.summarize(cfg, bad)["checks"]
    assert not any(v["pass"] for v in c.values()), c


# ------------------------------------------------------------------------------------------ ghost

def test_ghost_runs_scale_the_lr_and_keep_the_updates():
    runs = {r.name: r for r in ghost.make_runs(dict(ghost.DEFAULTS, seeds=[0]))}
    assert set(runs) == {"small-s0", "large-s0", "large+ghost-s0"}
    assert runs["large-s0"].lr == pytest.approx(0.1 * math.sqrt(2048 / 128)) and runs["small-s0"].lr == pytest.approx(0.1)
    assert runs["large-s0"].batch_size == 2048 and runs["small-s0"].batch_size == 128
    assert len({r.steps for r in runs.values()}) == 1
    assert runs["large+ghost-s0"].norm == "ghost" and runs["large+ghost-s0"].options["norm_kw"] == {"virtual_batch_size": 128}
    assert ghost.large_lr(dict(ghost.DEFAULTS, lr_scaling="linear")) == pytest.approx(1.6)
    assert ghost.large_lr(dict(ghost.DEFAULTS, lr_scaling="none")) == pytest.approx(0.1)


def test_ghost_checks_hold_and_fail():
    cfg = dict(ghost.DEFAULTS)

    def res(err):
        return {f"{a}-s{s}": fake_run(f"{a}-s{s}", a, s, [0.1, 1 - err[a]]) for a in ghost.ARMS for s in (0, 1)}
    s = ghost.summarize(cfg, res({"small": 0.04, "large": 0.08, "large+ghost": 0.05}))
    c = s["checks"]
    assert c["large_batch_error_gt_small_batch"]["pass"] and c["ghost_bn_closes_ge_0.2_of_the_gap"]["pass"]
    assert c["ghost_bn_closes_ge_0.2_of_the_gap"]["closed_fraction"] == pytest.approx(0.75)
    assert c["ghost_bn_closes_ge_0.2_of_the_gap"]["seeds_ghost_better"] == 2
    c = ghost.summarize(cfg, res({"small": 0.04, "large": 0.08, "large+ghost": 0.075}))["checks"]
    assert not c["ghost_bn_closes_ge_0.2_of_the_gap"]["pass"] and c["large_batch_error_gt_small_batch"]["pass"]
    c = ghost.summarize(cfg, res({"small": 0.05, "large": 0.04, "large+ghost": 0.03}))["checks"]
    assert not c["large_batch_error_gt_small_batch"]["pass"] and c["ghost_bn_closes_ge_0.2_of_the_gap"]["closed_fraction"] is None
    assert not c["ghost_bn_closes_ge_0.2_of_the_gap"]["pass"]


# ------------------------------------------------------------------------------------------ end to end

TINY = {
    "ics": {"steps": 12, "eval_every": 6, "seeds": [0], "hidden": [16] * 3, "landscape_every": 4, "probe_size": 50},
    "bnonly": {"steps": 12, "eval_every": 6, "seeds": [0], "hidden": [16] * 3, "batch_size": 32, "probe_size": 50},
    "ghost": {"steps": 8, "eval_every": 4, "seeds": [0], "hidden": [16, 16], "small_batch": 16, "large_batch": 64,
              "ghost_virtual_batch": 16, "probe_size": 50},
}


@pytest.mark.parametrize("name", list(TINY))
def test_experiment_artifacts(name, tmp_path):
    from bnkit.experiments.registry import EXPERIMENTS
    _, saved = run_and_check_artifacts(name, TINY[name], tmp_path / name)
    assert len(saved["runs"]) == 3
    checks = saved["summary"]["checks"]
    # the checks are recomputed from the raw runs alone
    mod = EXPERIMENTS[name].load()
    assert json.loads(json.dumps(mod.summarize(saved["config"], saved["runs"])["checks"])) == checks
    if name == "ics":
        assert [r["step"] for r in saved["runs"]["bn-s0"]["step_records"]] == [4, 8, 12]
    if name == "bnonly":
        assert checks["random_arm_trains_as_many_entries_as_bn_only"]["pass"]
        assert saved["runs"]["bn-only-s0"]["extra"]["trained_entries"][-1] == 2 * 3 * 16


def test_settings_are_checked_before_anything_is_written(tmp_path):
    from bnkit.experiments.registry import ConfigError, run_experiment
    with pytest.raises(ConfigError, match="larger than --small-batch"):
        run_experiment("ghost", dict(TINY["ghost"], large_batch=16), out=tmp_path / "g", quiet=True)
    with pytest.raises(ConfigError, match="landscape-every"):
        run_experiment("ics", dict(TINY["ics"], landscape_every=100), out=tmp_path / "i", quiet=True)
    with pytest.raises(ConfigError, match="noise-scale"):
        run_experiment("ics", dict(TINY["ics"], noise_scale=0.5), out=tmp_path / "i", quiet=True)
    assert not (tmp_path / "g").exists() and not (tmp_path / "i").exists()
