"""The claim experiments (lr, init, dropout, batchsize, variants, cnn, cost, `run all`): each check fed
hand-made runs where its claim holds and where it fails, the networks and their parameter counts, every
experiment's artifacts on tiny settings, determinism, --resume and the CLI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from _artifacts import run_and_check_artifacts
from bnkit.experiments import batchsize, cnn, cost, dropout, init, lr, variants
from bnkit.experiments.claims import (arm_summary, by_arm, check, saved_figure, seeds_text, series_mean, style_axes,
                                      with_checks)
from bnkit.experiments.nets import build_net, expected_norm_params, norm_param_count, normalized_widths
from bnkit.experiments.train import RunConfig, steps_to_threshold, train_run


# ------------------------------------------------------------------------------------------ hand-made runs

def fake_run(name, variant, seed, acc, *, steps=None, thresholds=(0.9,), train_acc=None, arch="mlp",
             diverged_at=None, ms=1.0):
    """A run dict with the fields the summaries read, its summary computed from the series (as train.py's)."""
    steps = steps or [100 * i for i in range(len(acc))]
    r = {"name": name, "variant": variant, "norm": variant, "seed": seed, "config": {"arch": arch},
         "steps": steps, "test_acc": list(acc), "train_loss": [None] + [1.0] * (len(acc) - 1),
         "diverged_at": diverged_at,
         "summary": {"final_acc": acc[-1], "best_acc": max(acc),
                     "steps_to": {f"{t:.2f}": steps_to_threshold(steps, acc, t) for t in thresholds},
                     "drift": {"range": 0.1, "relative": 0.2}},
         "timing": {"ms_per_step": ms}}
    if train_acc is not None:
        r["train_acc"] = list(train_acc)
    return r


def _ramp(final, n=5):
    return [0.1 + (final - 0.1) * i / (n - 1) for i in range(n)]


def test_check_and_grouping():
    assert check(np.float64(2.0) > 1, x=1.5) == {"pass": True, "x": 1.5}
    assert type(check(np.bool_(False))["pass"]) is bool
    rs = {"a-s1": fake_run("a-s1", "a", 1, [0.1, 0.5]), "a-s0": fake_run("a-s0", "a", 0, [0.1, 0.7]),
          "b-s0": fake_run("b-s0", "b", 0, [0.1, 0.95])}
    g = by_arm(rs)
    assert [r["seed"] for r in g["a"]] == [0, 1]
    s = arm_summary(g["a"])
    assert s["final_acc"] == pytest.approx(0.6) and s["steps_to"]["0.90"] is None
    assert arm_summary(g["b"])["steps_to"]["0.90"] == 100
    # a diverged (shorter) run is padded with its last value in the mean curve
    st, y = series_mean([fake_run("x", "x", 0, [0.1, 0.5, 0.9]), fake_run("y", "x", 1, [0.1, 0.1])])
    assert st == [0, 100, 200] and y.tolist() == pytest.approx([0.1, 0.3, 0.5])


def test_summary_checks_and_threshold():
    s = {"a": 1}
    assert with_checks(s, {"c": check(True)}, np.float32(0.5)) is s
    assert list(s) == ["a", "checks", "threshold"] and type(s["threshold"]) is float and s["threshold"] == 0.5
    assert with_checks({}, {"c": check(False)}) == {"checks": {"c": {"pass": False}}}  # no threshold: none set
    assert seeds_text({"seeds": [0]}) == "1 seed" and seeds_text({"seeds": [0, 1, 2]}) == "3 seeds"


def test_saved_figure_writes_and_closes_and_style_axes(tmp_path):
    import matplotlib.pyplot as plt
    from _artifacts import PNG_SIGNATURE
    open_before = plt.get_fignums()
    with saved_figure(tmp_path / "f.png", 2, figsize=(4, 2), dpi=50, title="T") as (fig, axes):
        axes[0].plot([0, 1], [0, 1], label="line")
        style_axes(axes[:1], "steps", legend={"fontsize": 7})
        style_axes(axes[1:])
        assert axes[0].get_xlabel() == "steps" and axes[0].get_legend() is not None
        assert axes[1].get_xlabel() == "" and axes[1].get_legend() is None
        assert all(line.get_visible() for ax in axes for line in ax.get_xgridlines())
        assert fig.get_size_inches().tolist() == [4, 2]
    assert fig._suptitle.get_text() == "T" and fig._suptitle.get_fontsize() == 10
    assert (tmp_path / "f.png").read_bytes()[:8] == PNG_SIGNATURE and plt.get_fignums() == open_before
    with pytest.raises(RuntimeError, match="plotting"):  # nothing written, the figure closed all the same
        with saved_figure(tmp_path / "g.png", 1, figsize=(2, 2)):
            raise RuntimeError("plotting failed")
    assert not (tmp_path / "g.png").exists() and plt.get_fignums() == open_before


def _lr_results(cfg, curves):
    out = {}
    for net, accs in curves.items():
        for lr_, a in zip(cfg["lrs"], accs):
            for s in cfg["seeds"]:
                n = f"{net}-lr{lr_:g}-s{s}"
                out[n] = fake_run(n, f"{net} lr={lr_:g}", s, _ramp(a))
    return out


def test_lr_checks_hold_and_fail():
    cfg = dict(lr.DEFAULTS, lrs=[0.01, 0.1, 1.0, 10.0], seeds=[0, 1])
    holds = _lr_results(cfg, {"baseline": [0.8, 0.92, 0.3, 0.1], "bn": [0.91, 0.95, 0.95, 0.93]})
    c = lr.summarize(cfg, holds)["checks"]
    k = "largest_lr_reaching_0.90_ratio_ge_10"
    assert c[k]["pass"] and c[k]["bn_largest_lr"] == 10.0 and c[k]["baseline_largest_lr"] == 0.1
    assert c[k]["ratio"] == pytest.approx(100.0)
    assert c["bn_best_ge_baseline_best"]["pass"]
    fails = _lr_results(cfg, {"baseline": [0.8, 0.92, 0.96, 0.1], "bn": [0.91, 0.95, 0.95, 0.5]})
    c = lr.summarize(cfg, fails)["checks"]
    assert not c[k]["pass"] and c[k]["ratio"] == pytest.approx(1.0)
    assert not c["bn_best_ge_baseline_best"]["pass"] and c["bn_best_ge_baseline_best"]["difference"] < 0
    assert lr.largest_reaching({0.1: 0.95, 1.0: 0.2, 3.0: 0.91}, 0.9) == 3.0
    assert lr.largest_reaching({0.1: 0.5}, 0.9) is None


def _init_results(cfg, curves):
    out = {}
    for net, accs in curves.items():
        for sc, a in zip(cfg["scales"], accs):
            for s in cfg["seeds"]:
                n = f"{net}-x{sc:g}-s{s}"
                out[n] = fake_run(n, f"{net} x{sc:g}", s, _ramp(a))
    return out


def test_init_checks_hold_and_fail():
    cfg = dict(init.DEFAULTS, scales=[0.1, 1.0, 10.0], seeds=[0], hidden=[20] * 3, act_probe=50)
    s = init.summarize(cfg, _init_results(cfg, {"baseline": [0.1, 0.93, 0.1], "bn": [0.94, 0.95, 0.935]}))
    c = s["checks"]
    assert c["bn_range_le_0.02"]["pass"] and c["bn_range_le_0.02"]["range"] == pytest.approx(0.015)
    assert c["baseline_range_ge_0.2"]["pass"] and c["baseline_range_ge_0.2"]["scales_below_50pct"] == ["0.1", "10"]
    c = init.summarize(cfg, _init_results(cfg, {"baseline": [0.85, 0.93, 0.9], "bn": [0.7, 0.95, 0.9]}))["checks"]
    assert not c["bn_range_le_0.02"]["pass"] and not c["baseline_range_ge_0.2"]["pass"]
    # the activation scale at init: without BN it grows geometrically with depth (a ReLU layer with He's
    # init keeps the scale, so scale x10 multiplies it by about 10 per layer), with BN it stays about 1
    act = s["activation_std_at_init"]
    base10, bn10 = act["baseline"]["10"], act["bn"]["10"]
    assert all(5 < b / a < 20 for a, b in zip(base10, base10[1:])) and all(0.5 < v < 2 for v in bn10)
    assert all(0.05 < b / a < 0.2 for a, b in zip(act["baseline"]["0.1"], act["baseline"]["0.1"][1:]))


def test_dropout_checks_hold_and_fail():
    cfg = dict(dropout.DEFAULTS, seeds=[0])

    def res(test, train):
        return {f"{a}-s0": fake_run(f"{a}-s0", a, 0, _ramp(test[a]), train_acc=_ramp(train[a])) for a in dropout.ARMS}
    ok = res({"none": 0.90, "dropout": 0.92, "bn": 0.93, "bn+dropout": 0.935},
             {"none": 1.0, "dropout": 0.99, "bn": 1.0, "bn+dropout": 0.99})
    c = dropout.summarize(cfg, ok)["checks"]
    assert c["bn_test_acc_ge_dropout"]["pass"] and c["bn_gap_lt_none_gap"]["pass"]
    assert c["bn_gap_lt_none_gap"]["bn_gap"] == pytest.approx(0.07)
    assert c["bn_test_acc_ge_dropout"]["difference_per_seed"] == [pytest.approx(0.01)]
    bad = res({"none": 0.90, "dropout": 0.94, "bn": 0.89, "bn+dropout": 0.935},
              {"none": 1.0, "dropout": 0.99, "bn": 1.0, "bn+dropout": 0.99})
    c = dropout.summarize(cfg, bad)["checks"]
    assert not c["bn_test_acc_ge_dropout"]["pass"] and not c["bn_gap_lt_none_gap"]["pass"]


def _bs_results(cfg, err):
    out = {}
    for norm, row in err.items():
        for bs, e in zip(cfg["batch_sizes"], row):
            n = f"{norm}-b{bs}-s0"
            out[n] = fake_run(n, f"{norm} b{bs}", 0, _ramp(1 - e))
    return out


def test_batchsize_checks_hold_and_fail():
    cfg = dict(batchsize.DEFAULTS, batch_sizes=[2, 4, 32], seeds=[0], norms=["bn", "renorm", "gn"])
    ok = _bs_results(cfg, {"bn": [0.20, 0.10, 0.05], "renorm": [0.12, 0.08, 0.05], "gn": [0.07, 0.06, 0.065]})
    s = batchsize.summarize(cfg, ok)
    c = s["checks"]
    assert c["bn_error_b2_minus_b32_ge_0.02"]["pass"] and c["bn_error_b2_minus_b32_ge_0.02"]["gap"] == pytest.approx(0.15)
    assert c["gn_range_le_half_bn_range"]["pass"] and c["renorm_better_than_bn_at_smallest_batches"]["pass"]
    assert c["gn_range_le_half_bn_range"]["bn_worst_batch"] == 2 and c["gn_range_le_half_bn_range"]["gn_worst_batch"] == 2
    assert s["test_error"]["gn"]["4"] == pytest.approx(0.06)
    bad = _bs_results(cfg, {"bn": [0.06, 0.06, 0.05], "renorm": [0.07, 0.05, 0.05], "gn": [0.10, 0.06, 0.05]})
    c = batchsize.summarize(cfg, bad)["checks"]
    assert not any(v["pass"] for v in c.values())
    # the schedule: same epochs, lr scaled with the batch, renorm's warm-up compressed to the run
    runs = {r.name: r for r in batchsize.make_runs(dict(batchsize.DEFAULTS, train_subset=128, epochs=2,
                                                         batch_sizes=[2, 64], seeds=[0]))}
    assert runs["bn-b2-s0"].steps == 128 and runs["bn-b64-s0"].steps == 4
    assert runs["bn-b2-s0"].lr == pytest.approx(0.1 * 2 / 32) and runs["bn-b64-s0"].lr == pytest.approx(0.2)
    kw = runs["renorm-b2-s0"].options["norm_kw"]
    assert kw["warmup_steps"] == 12 and kw["r_max_steps"] == 64 and kw["momentum"] == 0.1
    assert "ghost-b2-s0" not in runs and runs["ghost-b64-s0"].options["norm_kw"] == {"virtual_batch_size": 16}


def test_variants_checks_hold_and_fail():
    cfg = dict(variants.DEFAULTS, seeds=[0])
    fast = {"none": None, "bn": 300, "bn-weight": 400, "bn-all": 500, "ln": 600, "gn": 700}

    def res(at):
        out = {}
        for arch in cfg["archs"]:
            for n, s90 in at.items():
                acc = [0.1, 0.5, 0.85, 0.88, 0.89, 0.895, 0.895, 0.895, 0.895]
                if s90 is not None:
                    acc = [a if 100 * i < s90 else 0.92 for i, a in enumerate(acc)]
                out[f"{arch}-{n}-s0"] = fake_run(f"{arch}-{n}-s0", f"{arch} {n}", 0, acc, thresholds=(0.8, 0.9))
        return out
    s = variants.summarize(cfg, res(fast))
    c = s["checks"]
    assert c["norm_param_counts_as_designed"]["pass"]
    assert c["norm_param_counts_as_designed"]["mlp bn-weight"] == "303 (design 303)"
    assert c["tinycnn_every_bn_variant_before_none_at_0.90"]["pass"]
    assert [x["norm"] for x in s["ranking"]["mlp"]][-1] == "none"
    slow = dict(fast, none=300, **{"bn-all": None})
    c = variants.summarize(cfg, res(slow))["checks"]
    assert not c["mlp_every_bn_variant_before_none_at_0.90"]["pass"]
    assert c["mlp_every_bn_variant_before_none_at_0.90"]["bn-all_steps"] is None


def test_cnn_checks_hold_and_fail():
    cfg = dict(cnn.DEFAULTS, seeds=[0])

    def res(bn_acc, base_acc):
        out = {}
        for net in cfg["nets"]:
            out[f"{net}-bn-s0"] = fake_run(f"{net}-bn-s0", f"{net} bn", 0, bn_acc, thresholds=(0.95,))
            out[f"{net}-baseline-s0"] = fake_run(f"{net}-baseline-s0", f"{net} baseline", 0, base_acc, thresholds=(0.95,))
        return out
    c = cnn.summarize(cfg, res([0.1, 0.96, 0.97, 0.98, 0.98], [0.1, 0.5, 0.9, 0.94, 0.96]))["checks"]
    assert c["keras_bn_reaches_0.95_2x_faster"]["pass"] and c["keras_bn_reaches_0.95_2x_faster"]["speedup"] == 4.0
    assert c["lenet_bn_final_ge_baseline"]["pass"]
    c = cnn.summarize(cfg, res([0.1, 0.5, 0.96, 0.96, 0.96], [0.1, 0.5, 0.9, 0.96, 0.97]))["checks"]
    assert not c["keras_bn_reaches_0.95_2x_faster"]["pass"] and c["keras_bn_reaches_0.95_2x_faster"]["speedup"] == 1.5
    assert not c["lenet_bn_final_ge_baseline"]["pass"]


def test_cost_checks_hold_and_fail():
    cfg = dict(cost.DEFAULTS)
    rng = np.random.default_rng(0)

    def meas(fused_ms, diff=1e-7, left=0):
        t = {v: list(10 + rng.normal(0, 0.05, 9)) for v in cost.TRAIN_VARIANTS}
        i = {v: list(base + rng.normal(0, 0.05, 9)) for v, base in
             {"none": 10, "bnkit": 13, "torch": 12, "bnkit-fused": fused_ms, "torch-fused": fused_ms}.items()}
        return {"train_ms": t, "infer_ms": i, "train_batch": 60, "infer_batch": 256,
                "fused": {"bnkit": diff, "torch": diff, "bnkit_bn_layers_left": left, "torch_bn_layers_left": left}}
    c = cost.evaluate_cost(cfg, {"mlp": meas(10.1)})["checks"]
    assert c["mlp_bnkit_fused_inference_within_noise_of_none"]["pass"]
    assert c["mlp_torch_fused_inference_within_noise_of_none"]["unfused_over_none"] == pytest.approx(1.2, abs=0.02)
    assert not cost.evaluate_cost(cfg, {"mlp": meas(12.0)})["checks"]["mlp_bnkit_fused_inference_within_noise_of_none"]["pass"]
    assert not cost.evaluate_cost(cfg, {"mlp": meas(10.0, diff=1e-2)})["checks"]["mlp_torch_fused_inference_within_noise_of_none"]["pass"]
    assert not cost.evaluate_cost(cfg, {"mlp": meas(10.0, left=1)})["checks"]["mlp_torch_fused_inference_within_noise_of_none"]["pass"]


def test_cost_paired_ratios_cancel_the_load_of_each_round():
    # a load that multiplies every variant's time of a round by 1 to 5 (a shared machine): the raw times'
    # spread is huge, but the paired ratios fused / none see the 20 % difference and the check fails
    cfg = dict(cost.DEFAULTS)
    load = np.random.default_rng(1).uniform(1, 5, 25)
    rng = np.random.default_rng(2)

    def meas(fused):
        base = {"none": 10, "bnkit": 13, "torch": 12, "bnkit-fused": fused, "torch-fused": 10}
        i = {v: list(b * load * (1 + rng.normal(0, 0.01, 25))) for v, b in base.items()}
        t = {v: list(10 * load) for v in cost.TRAIN_VARIANTS}
        return {"train_ms": t, "infer_ms": i, "train_batch": 60, "infer_batch": 256,
                "fused": {"bnkit": 1e-7, "torch": 1e-7, "bnkit_bn_layers_left": 0, "torch_bn_layers_left": 0}}
    ev = cost.evaluate_cost(cfg, {"mlp": meas(12.0)})
    c = ev["checks"]["mlp_bnkit_fused_inference_within_noise_of_none"]
    assert not c["pass"] and c["fused_over_none"] == pytest.approx(1.2, abs=0.01) and c["tolerance"] < 0.06
    assert c["fused_over_none_ci95"][0] > 1.15 and c["unfused_cost_resolved"]
    assert ev["checks"]["mlp_torch_fused_inference_within_noise_of_none"]["pass"]
    assert ev["ratios"]["mlp"]["train_bnkit_over_none"] == pytest.approx(1.0)
    # the raw times' interquartile range is far above 20 %: a tolerance from it would have passed
    q1, q3 = np.percentile(meas(12.0)["infer_ms"]["none"], [25, 75])
    assert (q3 - q1) / np.median(meas(12.0)["infer_ms"]["none"]) > 0.3
    # the interval of the median: order statistics of ranks 7 and 19 of 25 (hand-derived: 12.5 -+ 4.9)
    assert cost.median_ci(list(range(1, 26))) == (13.0, 7.0, 19.0)
    assert cost.paired_ratios([2, 6], [1, 3]) == [2.0, 2.0]


# ------------------------------------------------------------------------------------------ networks

@pytest.mark.parametrize("arch", ["mlp", "tinycnn", "keras", "lenet"])
@pytest.mark.parametrize("norm", ["none", "bn", "bn-weight", "bn-all", "gn", "ln", "torch-bn"])
def test_nets_norm_params_and_same_init(arch, norm):
    opts = {"channels": [4, 8], "fc": [16]} if arch in ("keras", "lenet") else {"dropout": 0.0} if arch == "mlp" else {"channels": [4, 8]}
    mk = lambda n, seed=0: build_net(RunConfig(name="x", arch=arch, norm=n, hidden=(12, 10), seed=seed, options=opts),
                                     (1, 28, 28), 10)
    m = mk(norm)
    assert m(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert norm_param_count(m) == expected_norm_params(norm, normalized_widths(m))
    if norm == "bn-all":
        assert norm_param_count(m) == 2 * len(normalized_widths(m))
    # same seed, same initial weights whatever the norm (the biased layers of the plain net aside)
    ref = mk("none")
    w = [p for n, p in m.named_parameters() if n.endswith("weight") and p.dim() > 1]
    w0 = [p for n, p in ref.named_parameters() if n.endswith("weight") and p.dim() > 1]
    assert len(w) == len(w0) and all(torch.equal(a, b) for a, b in zip(w, w0))
    assert not torch.equal(w0[0], [p for n, p in mk("none", 1).named_parameters() if p.dim() > 1][0])


def test_lenet_norm_only_in_fc_and_init_gain():
    m = build_net(RunConfig(name="x", arch="lenet", norm="bn", options={}), (1, 28, 28), 10)
    assert normalized_widths(m) == [120, 84]  # the source's BatchNorm1d in the fc layers only
    m = build_net(RunConfig(name="x", arch="lenet", norm="bn", options={"conv_norm": True}), (1, 28, 28), 10)
    assert normalized_widths(m) == [6, 16, 120, 84]
    g = build_net(RunConfig(name="x", arch="mlp", norm="none", hidden=(400,), options={"init_gain": 3.0}), (1, 28, 28), 10)
    w = g.blocks[1].linear.weight.detach()
    assert float(w.std()) == pytest.approx(3.0 / math.sqrt(784), rel=0.02) and float(g.blocks[1].linear.bias.detach().abs().max()) == 0
    with pytest.raises(ValueError, match="unknown model option"):
        build_net(RunConfig(name="x", arch="mlp", options={"dropuot": 0.5}), (1, 28, 28), 10)
    with pytest.raises(ValueError, match="unknown architecture"):
        build_net(RunConfig(name="x", arch="resnet", options={}), (1, 28, 28), 10)


def test_dropout_option_is_active_in_training_only():
    m = build_net(RunConfig(name="x", arch="mlp", norm="none", hidden=(50,), options={"dropout": 0.5}), (1, 28, 28), 10)
    x = torch.rand(8, 1, 28, 28)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    torch.manual_seed(0)
    assert not torch.equal(m(x), m(x))


# ------------------------------------------------------------------------------------------ training loop additions

@pytest.fixture(scope="module")
def mnist5k():
    from bnkit.experiments.data import load_dataset
    return load_dataset("mnist5k")


def test_diverging_run_stops_and_is_recorded(mnist5k, tmp_path):
    cfg = RunConfig(name="b-s0", norm="none", activation="relu", lr=1e4, steps=40, eval_every=20, probe_size=50,
                    on_diverge="stop")
    r = train_run(cfg, mnist5k, tmp_path)
    assert r["diverged_at"] is not None and r["diverged_at"] < 40 and r["steps"][-1] == r["diverged_at"]
    assert r["test_acc"][-1] < 0.2
    with pytest.raises(FloatingPointError):
        train_run(RunConfig(name="c-s0", norm="none", activation="relu", lr=1e4, steps=40, eval_every=20,
                            probe_size=50), mnist5k, tmp_path)


def test_train_subset_and_train_eval(mnist5k, tmp_path):
    cfg = RunConfig(name="d-s0", arch="lenet", norm="bn", steps=30, eval_every=10, batch_size=20, probe_size=50,
                    lr=0.05, optimizer="momentum", options={"fc": [16, 8]}, train_subset=40, train_eval_size=40)
    r = train_run(cfg, mnist5k, tmp_path)
    assert len(r["train_acc"]) == len(r["test_acc"]) == 4
    # 40 digits seen 15 times each: the net fits them better than the 1,000 unseen test digits
    assert r["train_acc"][-1] > r["test_acc"][-1]


# ------------------------------------------------------------------------------------------ artifacts, determinism, resume

TINY = {
    "lr": {"steps": 12, "eval_every": 6, "lrs": [0.1, 1e4], "seeds": [0, 1]},
    "init": {"steps": 12, "eval_every": 6, "scales": [0.1, 10.0], "hidden": [16] * 3, "seeds": [0], "act_probe": 50},
    "dropout": {"steps": 12, "eval_every": 6, "train_subset": 60, "seeds": [0], "fc": [16, 8], "batch_size": 20},
    "batchsize": {"epochs": 1, "train_subset": 32, "batch_sizes": [2, 16], "seeds": [0], "norms": ["bn", "renorm", "gn"],
                  "evals": 2, "channels": [4, 8]},
    "variants": {"steps": 12, "eval_every": 6, "seeds": [0], "norms": ["none", "bn", "bn-weight", "bn-all"]},
    "cnn": {"steps": 8, "eval_every": 4, "seeds": [0], "keras": {"channels": [4, 8], "fc": [16], "dropout": [0.25, 0.5]},
            "lenet": {"channels": [6, 16], "fc": [120, 84]}},
    "cost": {"rounds": 2, "train_inner": 1, "infer_inner": 1, "infer_batch": 32},
}


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items()
                if not k.startswith("ms_per_step") and k not in ("timing", "wall_seconds_this_call", "finished",
                                                                "out_dir", "environment")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


@pytest.mark.parametrize("name", list(TINY))
def test_experiment_artifacts(name, tmp_path):
    _, saved = run_and_check_artifacts(name, TINY[name], tmp_path / name)
    for r in saved["runs"].values():  # every arm's full configuration and raw series
        assert {"config", "steps", "test_acc", "train_loss"} <= set(r)
        assert r["config"]["name"] == r["name"] and len(r["steps"]) == len(r["test_acc"]) == len(r["train_loss"])
    if name == "cost":
        meas = saved["summary"]["measurements"]
        assert set(meas) == {"mlp", "tinycnn"} and len(meas["mlp"]["infer_ms"]["bnkit-fused"]) == 2
        assert meas["tinycnn"]["fused"]["bnkit"] < 1e-4 and meas["tinycnn"]["fused"]["bnkit_bn_layers_left"] == 0
    if name == "lr":
        assert saved["runs"]["baseline-lr10000-s0"]["diverged_at"] is not None


def test_lr_deterministic_and_resume(tmp_path):
    from bnkit.experiments.registry import run_experiment
    from bnkit.experiments.train import RunInterrupted
    ov = dict(TINY["lr"], lrs=[0.1, 1.0])
    a = run_experiment("lr", ov, out=tmp_path / "a", quiet=True)
    b = run_experiment("lr", ov, out=tmp_path / "b", quiet=True)
    assert _strip(a["runs"]) == _strip(b["runs"]) and _strip(a["summary"]) == _strip(b["summary"])
    with pytest.raises(RunInterrupted):
        run_experiment("lr", ov, out=tmp_path / "c", quiet=True, stop_after=30)  # inside the third run
    c = run_experiment("lr", {}, out=tmp_path / "c", resume=True, quiet=True)
    assert _strip(c["runs"]) == _strip(a["runs"]) and _strip(c["summary"]) == _strip(a["summary"])
    # same seed: the BN and baseline arms start from the same weights and see the same batches, so the
    # first training losses differ only through the norm; different seeds give different series
    assert a["runs"]["bn-lr0.1-s0"]["test_acc"] != a["runs"]["bn-lr0.1-s1"]["test_acc"]


def test_batchsize_resume(tmp_path):
    from bnkit.experiments.registry import run_experiment
    from bnkit.experiments.train import RunInterrupted
    ov = dict(TINY["batchsize"], norms=["bn", "renorm"])
    a = run_experiment("batchsize", ov, out=tmp_path / "a", quiet=True)
    with pytest.raises(RunInterrupted):
        run_experiment("batchsize", ov, out=tmp_path / "c", quiet=True, stop_after=20)
    c = run_experiment("batchsize", {}, out=tmp_path / "c", resume=True, quiet=True)
    assert _strip(c["runs"]) == _strip(a["runs"]) and _strip(c["summary"]) == _strip(a["summary"])


def test_run_all_index_and_resume(tmp_path):
    from bnkit.experiments.suite import run_all
    from bnkit.experiments.train import RunInterrupted
    names = ("lr", "variants")
    ov = {"steps": 12, "eval_every": 6, "seeds": [0], "lrs": [0.1], "norms": ["none", "bn"]}
    with pytest.raises(RunInterrupted):
        run_all(ov, out=tmp_path / "all", quiet=True, names=names, stop_after=30)  # lr done, variants cut
    assert (tmp_path / "all" / "lr" / "metrics.json").exists() and not (tmp_path / "all" / "index.html").exists()
    idx = run_all({}, out=tmp_path / "all", resume=True, quiet=True, names=names)
    assert [e["experiment"] for e in idx["experiments"]] == list(names)
    page = (tmp_path / "all" / "index.html").read_text()
    for n in names:
        assert f'href="{n}/report.html"' in page and (tmp_path / "all" / n / "report.html").is_file()
    saved = json.loads((tmp_path / "all" / "index.json").read_text())
    v = json.loads((tmp_path / "all" / "variants" / "metrics.json").read_text())
    assert saved["experiments"][1]["checks"] == {k: c["pass"] for k, c in v["summary"]["checks"].items()}


def test_cli_set_and_errors(tmp_path, capsys):
    from bnkit.cli import main
    out = tmp_path / "lr"
    assert main(["run", "lr", "--steps", "6", "--eval-every", "3", "--seed", "0", "--set", "lrs=[0.5]",
                 "--out", str(out), "--quiet"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lrs"] == [0.5] and cfg["seeds"] == [0]
    assert main(["run", "lr", "--set", "novalue", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_docs_page_python_blocks_run():
    import re
    page = Path(__file__).resolve().parents[1] / "docs" / "experiments-claims.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert blocks
    for i, b in enumerate(blocks):
        exec(compile(b, f"experiments-claims.md[python block {i}]", "exec"), {"__name__": "__docs__"})


def test_cli_run_all_dispatches(monkeypatch, tmp_path, capsys):
    from bnkit.cli import main
    from bnkit.experiments import suite
    from bnkit.experiments.train import RunInterrupted
    seen = {}

    def fake(ov, **kw):
        seen.update(ov=ov, **kw)
        raise RunInterrupted("step budget exhausted in run x at step 3", "x", 3)
    monkeypatch.setattr(suite, "run_all", fake)
    assert main(["run", "all", "--seed", "1", "--set", "epochs=2", "--out", str(tmp_path), "--quiet"]) == 3
    assert seen["ov"] == {"seeds": [1], "epochs": 2} and seen["out"] == tmp_path and seen["quiet"]
    assert "bnkit run all --resume" in capsys.readouterr().err


def test_lenet_on_cifar_shapes_is_the_tutorial_net():
    """On 3x32x32 inputs the LeNet is the PyTorch CIFAR-10 tutorial's: fc1 takes 16 * 5 * 5 features."""
    m = build_net(RunConfig(name="x", arch="lenet", norm="bn", options={}), (3, 32, 32), 10)
    fcs = [b.linear for b in m.blocks if hasattr(b, "linear") and isinstance(b.linear, torch.nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(400, 120), (120, 84)]
    assert m(torch.rand(4, 3, 32, 32)).shape == (4, 10)
