"""The statistics experiments (noniid, precise, corruption, accumulate): each check fed hand-made runs where
its claim holds and where it fails, their pieces against oracles (the class-restricted sampler, the
corruption builders, the PreciseBN and large-batch references), and every experiment end to end on tiny
settings (artifacts, checks, --resume)."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _artifacts import run_and_check_artifacts
from bnkit.experiments import accumulate, corruption, noniid, precise
from bnkit.experiments.corruptions import BLUR_SIGMA, CORRUPTIONS, contrast, corrupt, gaussian_blur, gaussian_noise
from bnkit.experiments.train import steps_to_threshold


def fake_run(name, variant, seed, acc, extra=None, steps=None):
    """A run dict with the fields the summaries read (its summary computed from the series, as train.py's)."""
    steps = steps or [100 * i for i in range(len(acc))]
    return {"name": name, "variant": variant, "norm": "bn", "seed": seed, "config": {"arch": "tinycnn"},
            "steps": steps, "test_acc": list(acc), "train_loss": [None] + [1.0] * (len(acc) - 1),
            "diverged_at": None, "extra": extra or {},
            "summary": {"final_acc": acc[-1], "best_acc": max(acc),
                        "steps_to": {"0.90": steps_to_threshold(steps, acc, 0.9)},
                        "drift": {"range": 0.1, "relative": 0.2}},
            "timing": {"ms_per_step": 1.0}}


# ------------------------------------------------------------------------------------------ noniid

def test_class_batch_draws_k_classes_deterministically():
    y = torch.arange(100) % 10
    pools = noniid.class_pools(y)
    for step in range(20):
        idx = noniid.class_batch(y, 12, 3, seed=0, step=step, pools=pools)
        labels = y[idx]
        assert len(idx) == 12 and len(torch.unique(labels)) == 3
        assert sorted(torch.bincount(labels, minlength=10)[torch.unique(labels)].tolist()) == [4, 4, 4]
        assert torch.equal(idx, noniid.class_batch(y, 12, 3, seed=0, step=step))  # a function of (seed, step)
    assert not torch.equal(noniid.class_batch(y, 12, 3, 0, 1), noniid.class_batch(y, 12, 3, 1, 1))
    # over many steps every class is drawn
    seen = torch.cat([y[noniid.class_batch(y, 12, 3, 0, s, pools)] for s in range(50)])
    assert set(seen.tolist()) == set(range(10))


def _noniid_results(acc, bstats=0.9, seeds=(0, 1)):
    out = {}
    acc = {"none non-iid": 0.9, **acc}
    for arm, _, sampling in noniid.ARMS:
        for s in seeds:
            n = noniid._name(arm, s)
            extra = {"test_acc_noniid_batch_stats": [0.1, bstats]} if sampling == "noniid" else {}
            out[n] = fake_run(n, arm, s, [0.1, 0.5, acc[arm] - 0.01, acc[arm] + 0.01], extra)
    return out


def test_noniid_checks_hold_and_fail():
    cfg = dict(noniid.DEFAULTS, final_window=2)
    c = noniid.summarize(cfg, _noniid_results({"bn iid": 0.95, "bn non-iid": 0.70, "renorm non-iid": 0.94}))["checks"]
    assert c["bn_noniid_drop_ge_0.05"]["pass"] and c["bn_noniid_drop_ge_0.05"]["drop"] == pytest.approx(0.25)
    r = c["renorm_noniid_within_0.02_of_iid"]
    assert r["pass"] and r["gap"] == pytest.approx(0.01) and r["fraction_of_bn_drop_recovered"] == pytest.approx(0.96)
    c = noniid.summarize(cfg, _noniid_results({"bn iid": 0.95, "bn non-iid": 0.93, "renorm non-iid": 0.90}))["checks"]
    assert not c["bn_noniid_drop_ge_0.05"]["pass"] and not c["renorm_noniid_within_0.02_of_iid"]["pass"]
    # the accuracy of an arm is the mean of its last final_window evaluations, then over seeds
    assert noniid.arm_accuracy([fake_run("a", "a", 0, [0.1, 0.5, 0.7]), fake_run("b", "a", 1, [0.1, 0.7, 0.9])], 2) \
        == pytest.approx(0.7)


# ------------------------------------------------------------------------------------------ precise

def _precise_results(ema, pre, seeds=(0,)):
    """ema, pre[k]: accuracy series (epoch 0 first)."""
    out = {}
    for s in seeds:
        extra = {}
        for k, v in pre.items():
            extra[f"test_acc_precise_{k}"] = list(v)
            extra[f"precise_samples_{k}"] = [float(min(int(k), 4000))] * len(v)
        out[f"bn-s{s}"] = fake_run(f"bn-s{s}", "bn", s, ema, extra)
    return out


def test_precise_checks_hold_and_fail():
    cfg = dict(precise.DEFAULTS, skip_epochs=1, epochs=6)
    ema = [0.1, 0.5, 0.9, 0.8, 0.92, 0.85, 0.93]
    good = {"100": [0.1, 0.7, 0.90, 0.91, 0.90, 0.91, 0.92], "1000": [0.1, 0.7, 0.93, 0.935, 0.94, 0.94, 0.945],
            "10000": [0.1, 0.7, 0.931, 0.934, 0.94, 0.941, 0.944]}
    s = precise.summarize(cfg, _precise_results(ema, good))
    c = s["checks"]
    assert s["samples_used"] == {"100": 100, "1000": 1000, "10000": 4000}
    assert all(v["pass"] for v in c.values()), c
    a = c["precise_10000_at_least_as_accurate_as_ema"]
    assert a["ema"] == pytest.approx(sum(ema[2:]) / 5) and a["epochs_from"] == 2
    assert c["precise_10000_more_stable_than_ema"]["ema_mean_abs_change"] == pytest.approx(precise.instability(ema[2:]))
    bad = {"100": good["100"], "1000": [0.1, 0.6, 0.80, 0.70, 0.90, 0.70, 0.90],
           "10000": [0.1, 0.7, 0.80, 0.95, 0.70, 0.95, 0.60]}
    c = precise.summarize(cfg, _precise_results(ema, bad))["checks"]
    assert not any(v["pass"] for v in c.values()), c
    assert precise.instability([0.5, 0.7, 0.6]) == pytest.approx(0.15)


def test_precise_extension_matches_recalibrate_and_leaves_the_model(mnist5k_small):
    """The extension's recorded accuracy is that of bnkit.recalibrate + evaluate on the same samples; the
    run's model (weights and EMA buffers) is unchanged."""
    import bnkit
    from bnkit.experiments.train import RunConfig, evaluate, make_model
    cfg = RunConfig(name="x", arch="tinycnn", norm="bn", seed=3, options={"channels": [4, 8]})
    model = make_model(cfg, mnist5k_small)
    model.train()
    with torch.no_grad():
        model(mnist5k_small.x_train[:64] * 3)  # EMA statistics of other inputs
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ext = precise.PreciseEval(samples=[50, 100000], batch_size=25)
    ext.prepare(model, cfg, mnist5k_small)
    out = ext.on_eval(model, 7, mnist5k_small)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert out["precise_samples_50"] == 50 and out["precise_samples_100000"] == len(mnist5k_small.y_train)
    g = torch.Generator().manual_seed((3 + 1) * 104_729 + 7)
    x = mnist5k_small.x_train[torch.randperm(len(mnist5k_small.y_train), generator=g)[:50]]
    import copy
    m = bnkit.recalibrate(copy.deepcopy(model), [x[:25], x[25:]])
    assert out["test_acc_precise_50"] == evaluate(m, mnist5k_small.x_test, mnist5k_small.y_test)[0]


# ------------------------------------------------------------------------------------------ corruptions

@settings(max_examples=20, deadline=None)
@given(sev=st.sampled_from([1, 2, 3, 4, 5]), seed=st.integers(0, 10))
def test_corruption_builders(sev, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 1, 12, 12, generator=g)
    for f in CORRUPTIONS.values():
        y = f(x, sev)
        assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    assert torch.equal(gaussian_noise(x, sev, seed=4), gaussian_noise(x, sev, seed=4))
    # contrast keeps each image's mean (no clipping is needed for values in [0, 1]) and scales the deviations
    c = contrast(x, sev)
    assert torch.allclose(c.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=1e-6)
    from bnkit.experiments.corruptions import CONTRAST
    assert torch.allclose(c - c.mean((1, 2, 3), keepdim=True), (x - x.mean((1, 2, 3), keepdim=True)) * CONTRAST[sev],
                          atol=1e-6)
    # blur: a constant image stays constant; the interior equals a direct 2-D Gaussian convolution
    assert torch.allclose(gaussian_blur(torch.full((1, 1, 9, 9), 0.3), sev), torch.full((1, 1, 9, 9), 0.3), atol=1e-6)


def test_blur_against_direct_convolution_and_severity_order():
    import math
    x = torch.zeros(1, 1, 31, 31)
    x[0, 0, 15, 15] = 1.0
    for sev, sigma in BLUR_SIGMA.items():
        y = gaussian_blur(x, sev)[0, 0]
        i = torch.arange(31, dtype=torch.float64) - 15
        k = torch.exp(-0.5 * (i / sigma) ** 2)
        k[i.abs() > math.ceil(4 * sigma)] = 0
        k = k / k.sum()
        assert torch.allclose(y.double(), torch.outer(k, k), atol=1e-6)
    xs = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    for name in CORRUPTIONS:  # more severe: further from the clean images
        d = [float((corrupt(name, xs, s) - xs).abs().mean()) for s in range(1, 6)]
        assert d == sorted(d), name
    with pytest.raises(ValueError, match="severity"):
        contrast(xs, 6)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt("fog", xs, 1)


def test_benchmark_uses_the_shared_builders():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "adapt_mnist.py"
    spec = importlib.util.spec_from_file_location("adapt_mnist_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    x = torch.rand(5, 1, 28, 28)
    assert torch.equal(mod.CORRUPTIONS["gaussian_noise"](x, 5), gaussian_noise(x, 5, seed=1))
    assert torch.equal(mod.CORRUPTIONS["contrast"](x, 4), contrast(x, 4))


def test_statistics_shift_is_zero_on_the_source_statistics():
    """KL(target || source) is 0 when the running statistics are the target's own (an oracle: recalibrate)."""
    import bnkit
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), bnkit.BatchNorm2d(3), torch.nn.ReLU(),
                              torch.nn.Conv2d(3, 2, 3), bnkit.BatchNorm2d(2), torch.nn.Flatten(),
                              torch.nn.Linear(2 * 8 * 8, 3)).eval()
    x = torch.rand(40, 1, 12, 12)
    bnkit.recalibrate(net, [x])
    # recalibrate normalizes later layers with batch statistics, the shift's forward with running ones:
    # on one batch those are the same (up to the unbiased/biased variance factor n/(n-1))
    assert corruption.statistics_shift(net, x) < 1e-3
    assert corruption.statistics_shift(net, x * 0.2) > 0.3


def _corr_results(src, rest, shift, seeds=(0,)):
    cfg = dict(corruption.DEFAULTS, severities=[1, 5], prior_n=[8], corruptions=["gaussian_noise", "contrast"])
    out = {}
    for s in seeds:
        extra = {"clean_acc": [0.97], "restored_exact": [1.0]}
        for n in cfg["corruptions"]:
            for i, sev in enumerate(cfg["severities"]):
                extra[f"shift/{n}/{sev}"] = [shift[n][i]]
                extra[f"source/{n}/{sev}"] = [src[n][i]]
                extra[f"reestimate/{n}/{sev}"] = [rest[n][i]]
                extra[f"prior_n8/{n}/{sev}"] = [(src[n][i] + rest[n][i]) / 2]
                extra[f"tent/{n}/{sev}"] = [rest[n][i]]
        out[f"bn-s{s}"] = fake_run(f"bn-s{s}", "bn", s, [0.1, 0.97], extra)
    return cfg, out


def test_corruption_checks_hold_and_fail():
    cfg, res = _corr_results({"gaussian_noise": [0.95, 0.3], "contrast": [0.96, 0.2]},
                             {"gaussian_noise": [0.96, 0.7], "contrast": [0.97, 0.8]},
                             {"gaussian_noise": [0.01, 0.5], "contrast": [0.2, 1.5]})
    s = corruption.summarize(cfg, res)
    c = s["checks"]
    g = c["reestimate_gains_where_statistics_shift"]
    assert g["pass"] and g["exempt_small_shift"] == ["gaussian_noise/1"]  # a small shift need not gain
    assert c["gain_larger_at_highest_severity"]["pass"]
    assert s["reestimate_gain"]["contrast"]["5"] == pytest.approx(0.6) and s["restored_exact"]
    cfg, res = _corr_results({"gaussian_noise": [0.95, 0.3], "contrast": [0.90, 0.2]},
                             {"gaussian_noise": [0.96, 0.25], "contrast": [0.96, 0.21]},
                             {"gaussian_noise": [0.01, 0.5], "contrast": [0.2, 1.5]})
    c = corruption.summarize(cfg, res)["checks"]
    assert not c["reestimate_gains_where_statistics_shift"]["pass"]
    assert c["reestimate_gains_where_statistics_shift"]["not_gaining"] == ["gaussian_noise/5"]
    assert not c["gain_larger_at_highest_severity"]["pass"]
    assert c["gain_larger_at_highest_severity"]["contrast_gain"] == pytest.approx([0.06, 0.01])


def test_corruption_gain_must_exceed_min_gain():
    cfg, res = _corr_results({"gaussian_noise": [0.95, 0.3], "contrast": [0.96, 0.2]},
                             {"gaussian_noise": [0.96, 0.7], "contrast": [0.97, 0.8]},
                             {"gaussian_noise": [0.01, 0.5], "contrast": [0.2, 1.5]})
    c = corruption.summarize(dict(cfg, min_gain=0.02), res)["checks"]
    assert c["reestimate_gains_where_statistics_shift"]["not_gaining"] == ["contrast/1"]


# ------------------------------------------------------------------------------------------ accumulate

def _acc_results(dist, checksums=None, seeds=(0,)):
    """dist[arm]: per layer, a distance series (mean and logvar alike)."""
    out = {}
    for s in seeds:
        for arm, layers in dist.items():
            extra = {}
            for i, series in enumerate(layers):
                extra[f"mean_dist/{i}"] = [0.0] + list(series)
                extra[f"logvar_dist/{i}"] = [0.0] + list(series)
                extra[f"num_batches_tracked/{i}"] = [0.0, 40.0 if arm == "plain" else 10.0]
            extra["weight_checksum"] = (checksums or {}).get(arm, [1.0, 2.0])
            out[f"{arm}-s{s}"] = fake_run(f"{arm}-s{s}", arm, s, [0.1, 0.9], extra)
    return out


def test_accumulate_checks_hold_and_fail():
    cfg = dict(accumulate.DEFAULTS)
    ok = _acc_results({"large": [[0.0], [0.0]], "plain": [[0.1], [0.2]], "accumulate": [[1e-8], [0.01]]})
    c = accumulate.summarize(cfg, ok)["checks"]
    assert all(v["pass"] for v in c.values()), c
    assert c["accumulate_distance_le_0.2x_plain_every_layer"]["ratio_per_layer"] == pytest.approx([1e-7, 0.05])
    bad = _acc_results({"large": [[1e-3], [0.0]], "plain": [[0.1], [0.02]], "accumulate": [[1e-3], [0.01]]},
                       checksums={"plain": [1.0, 2.0], "accumulate": [1.0, 2.0000001]})
    c = accumulate.summarize(cfg, bad)["checks"]
    assert not any(v["pass"] for v in c.values()), c


def test_accumulate_reference_is_the_large_batch_update():
    """The reference buffers after a step are those of torch's BN after one forward of the whole batch on
    the same weights (torch.nn.BatchNorm2d as the oracle); the accumulating step moves the model's buffers
    to the same first-layer values, the plain step does not, and both compute the same gradients."""
    import bnkit
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, bias=False), bnkit.BatchNorm2d(3), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(3 * 6 * 6, 4))
    oracle = torch.nn.BatchNorm2d(3)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 4, (16,))
    with torch.no_grad():
        oracle(net[0](x))
    grads = {}
    for mode in ("plain", "accumulate", "large"):
        m = __import__("copy").deepcopy(net)
        ext = accumulate.Accumulate(mode=mode, k=4)
        ext.prepare(m, None, None)
        opt = torch.optim.SGD(m.parameters(), lr=0.0)  # lr 0: the weights stay, the statistics move
        ext.train_step(m, x, y, opt)
        assert torch.allclose(ext.ref[1].running_mean, oracle.running_mean, atol=1e-6)
        assert torch.allclose(ext.ref[1].running_var, oracle.running_var, atol=1e-6)
        d = accumulate.stat_distance(m[1], ext.ref[1])
        assert (d["mean"] < 1e-6) == (mode != "plain"), (mode, d)
        grads[mode] = m[0].weight.grad.clone()
        # a state round-trip restores the reference
        ext2 = accumulate.Accumulate(mode=mode, k=4)
        ext2.prepare(__import__("copy").deepcopy(net), None, None)
        ext2.load_state_dict(ext.state_dict())
        assert torch.equal(ext2.ref[1].running_var, ext.ref[1].running_var)
    assert torch.allclose(grads["plain"], grads["accumulate"], atol=0, rtol=0)
    with pytest.raises(ValueError, match="mode"):
        accumulate.Accumulate(mode="ghost")


# ------------------------------------------------------------------------------------------ end to end

TINY = {
    "noniid": {"steps": 6, "eval_every": 3, "seeds": [0], "channels": [4, 8], "batch_size": 20, "final_window": 1},
    "precise": {"epochs": 2, "skip_epochs": 0, "seeds": [0], "channels": [4, 8], "batch_size": 1000,
                "samples": [100, 1000, 10000]},
    "corruption": {"steps": 6, "eval_every": 3, "seeds": [0], "channels": [4, 8], "severities": [1, 5],
                   "prior_n": [1, 8], "draws": 1},
    "accumulate": {"steps": 6, "eval_every": 3, "seeds": [0], "channels": [4, 8], "k": 2, "micro_batch": 8},
}


@pytest.fixture(scope="module")
def mnist5k_small():
    from bnkit.experiments.data import Dataset, load_dataset
    ds = load_dataset("mnist5k")
    return Dataset(ds.name, ds.x_train[:300], ds.y_train[:300], ds.x_test[:200], ds.y_test[:200], ds.input_shape,
                   ds.num_classes, ds.provenance)


@pytest.mark.parametrize("name", list(TINY))
def test_experiment_artifacts(name, tmp_path):
    from bnkit.experiments.registry import EXPERIMENTS
    _, saved = run_and_check_artifacts(name, TINY[name], tmp_path / name)
    checks = saved["summary"]["checks"]
    for r in saved["runs"].values():
        assert {"config", "steps", "test_acc", "extra"} <= set(r) and "extension" in r["config"]
    # the summary is a function of the raw runs alone
    mod = EXPERIMENTS[name].load()
    assert json.loads(json.dumps(mod.summarize(saved["config"], saved["runs"]))) == saved["summary"]
    if name == "noniid":
        r = saved["runs"]["bn-non-iid-s0"]
        assert len(r["extra"]["test_acc_noniid_batch_stats"]) == len(r["steps"])
    if name == "precise":
        assert saved["summary"]["samples_used"] == {"100": 100, "1000": 1000, "10000": 4000}
        assert len(saved["runs"]["bn-s0"]["steps"]) == 3  # step 0 and one evaluation per epoch
    if name == "corruption":
        r = saved["runs"]["bn-s0"]
        assert r["extra"]["restored_exact"] == [1.0] and len(r["extra"]["source/contrast/5"]) == 1
        assert saved["summary"]["restored_exact"]
    if name == "accumulate":  # the oracle checks hold at any size
        for k in ("large_batch_arm_equals_its_reference", "accumulate_first_layer_matches_large_batch",
                  "plain_and_accumulate_train_identical_weights"):
            assert checks[k]["pass"], (k, checks[k])
        assert checks["plain_and_accumulate_train_identical_weights"]["num_batches_tracked"] == \
            {"large": 6.0, "plain": 12.0, "accumulate": 6.0}


def test_accumulate_resume_is_exact(tmp_path):
    from bnkit.experiments.registry import run_experiment
    from bnkit.experiments.train import RunInterrupted
    ov = TINY["accumulate"]
    a = run_experiment("accumulate", ov, out=tmp_path / "a", quiet=True)
    with pytest.raises(RunInterrupted):
        run_experiment("accumulate", ov, out=tmp_path / "b", quiet=True, stop_after=10)  # inside the 2nd run
    b = run_experiment("accumulate", {}, out=tmp_path / "b", resume=True, quiet=True)

    def strip(o):
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if k not in ("timing", "ms_per_step", "wall_seconds_this_call",
                                                                   "finished", "out_dir", "environment")}
        return [strip(v) for v in o] if isinstance(o, list) else o
    assert strip(a["runs"]) == strip(b["runs"]) and strip(a["summary"]) == strip(b["summary"])


def test_bad_settings_are_config_errors(tmp_path):
    from bnkit.experiments.registry import ConfigError, run_experiment
    with pytest.raises(ConfigError, match="multiple"):
        run_experiment("noniid", dict(TINY["noniid"], classes_per_batch=3), out=tmp_path / "a", quiet=True)
    with pytest.raises(ConfigError, match="skip-epochs"):
        run_experiment("precise", dict(TINY["precise"], skip_epochs=1), out=tmp_path / "b", quiet=True)
    with pytest.raises(ConfigError, match="severities"):
        run_experiment("corruption", dict(TINY["corruption"], severities=[6]), out=tmp_path / "c", quiet=True)
    assert not any(tmp_path.iterdir())
