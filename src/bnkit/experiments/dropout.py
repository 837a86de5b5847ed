"""Regularization: a CNN on a small training set, where overfitting shows, trained four ways: plain,
with dropout, with BN, with BN and dropout.

Claim (Ioffe & Szegedy 2015, section 3.4 and 4.2.1: BN regularizes the model, and dropout can be
removed or reduced): BN alone generalizes at least as well as dropout alone (final test accuracy, mean
over seeds), and its train/test gap (final train accuracy - final test accuracy, both in eval mode) is
smaller than the plain net's.

Defaults: the LeNet-style net (conv5x5 6 and 16 channels, fc 120-84) with BN after every conv and fc
layer in the BN arms, dropout p = 0.5 after the fc activations in the dropout arms, trained on the
first 500 mnist5k training digits (tested on the 1,000 test digits) for 1,500 steps of batch 50 (150
epochs), SGD with momentum 0.9, lr 0.02, seeds 0, 1, 2. The train accuracy is measured on those 500
digits.
"""
from __future__ import annotations

from typing import Dict, List

from .claims import (
    COMMON_DEFAULTS, arm_summary, by_arm, check, make_run, present_arms, saved_figure, seeds_text, series_mean,
    style_axes, with_checks,
)
from .train import RunConfig

__all__ = ["DEFAULTS", "make_runs", "summarize", "plot", "ARMS"]

ARMS = ("none", "dropout", "bn", "bn+dropout")

DEFAULTS: Dict[str, object] = {
    **COMMON_DEFAULTS,
    "arch": "lenet", "channels": [6, 16], "fc": [120, 84], "norm": "bn", "p": 0.5, "train_subset": 500,
    "steps": 1500, "batch_size": 50, "optimizer": "momentum", "momentum": 0.9, "lr": 0.02, "eval_every": 50,
    "activation": "relu", "threshold": 0.9, "thresholds": [0.9], "seeds": [0, 1, 2],
}


def _run(cfg, arm, seed) -> RunConfig:
    bn = arm.startswith("bn")
    p = float(cfg["p"]) if arm.endswith("dropout") else 0.0
    opts = {"channels": [int(c) for c in cfg["channels"]], "fc": [int(f) for f in cfg["fc"]], "dropout": p}
    if cfg["arch"] == "lenet":
        opts["conv_norm"] = True
    if cfg["arch"] == "keras":
        opts["dropout"] = [p / 2, p]
    n = int(cfg["train_subset"])
    return make_run(cfg, f"{arm}-s{seed}", arm, norm=cfg["norm"] if bn else "none", seed=seed, options=opts,
                    train_subset=n, train_eval_size=n)


def make_runs(cfg: Dict) -> List[RunConfig]:
    return [_run(cfg, arm, s) for s in cfg["seeds"] for arm in ARMS]


def summarize(cfg: Dict, results: Dict[str, Dict]) -> Dict:
    summary: Dict[str, object] = {arm: arm_summary(rs) for arm, rs in by_arm(results).items()}
    bn, do, base = summary["bn"], summary["dropout"], summary["none"]
    # reported next to the verdict: the difference seed by seed (same initial weights and data order), so a
    # tie within the seeds' spread is visible as one
    per_seed = [x - y for x, y in zip(bn["final_acc_per_seed"], do["final_acc_per_seed"])]
    return with_checks(summary, {
        "bn_test_acc_ge_dropout": check(bn["final_acc"] >= do["final_acc"], bn=bn["final_acc"],
                                        dropout=do["final_acc"], difference=bn["final_acc"] - do["final_acc"],
                                        difference_per_seed=per_seed,
                                        bn_plus_dropout=summary["bn+dropout"]["final_acc"], none=base["final_acc"]),
        "bn_gap_lt_none_gap": check(bn["final_gap"] < base["final_gap"], bn_gap=bn["final_gap"],
                                    none_gap=base["final_gap"], dropout_gap=do["final_gap"],
                                    bn_plus_dropout_gap=summary["bn+dropout"]["final_gap"]),
    }, cfg["threshold"])


_COLORS = {"none": "tab:gray", "dropout": "tab:orange", "bn": "tab:blue", "bn+dropout": "tab:green"}


def plot(cfg: Dict, results: Dict[str, Dict], summary: Dict, path) -> None:
    title = f"dropout vs BN: {cfg['arch']} on {cfg['data']}, {seeds_text(cfg)} (means)"
    with saved_figure(path, 2, figsize=(12, 4.2), title=title) as (fig, axes):
        for arm, rs in present_arms(results, ARMS):
            st, te = series_mean(rs, "test_acc")
            _, tr = series_mean(rs, "train_acc")
            axes[0].plot(st, te, "-", color=_COLORS[arm], lw=1.8, label=f"{arm} test")
            axes[0].plot(st, tr, ":", color=_COLORS[arm], lw=1.4, label=f"{arm} train")
            axes[1].plot(st, tr - te, "-", color=_COLORS[arm], lw=1.8, label=arm)
        axes[0].set_ylim(0.8, 1.005)
        axes[0].set_title(f"(a) train (dotted) and test (solid) accuracy, {cfg['train_subset']} training digits")
        axes[1].set_title("(b) train - test accuracy gap")
        style_axes(axes, "training steps", legend={"fontsize": 7, "ncol": 2})
