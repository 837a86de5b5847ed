"""Large batches and Ghost BN: the same network trained with small batches, and with large batches with
and without Ghost Batch Normalization, the large-batch learning rate scaled by the square root of the
batch ratio and every arm given the same number of updates.

Claim (Hoffer, Hubara & Soudry 2017, *Train longer, generalize better: closing the generalization gap in
large batch training of neural networks*, NeurIPS; sections 4-5 and Table 1): the "generalization gap"
of large-batch training is largely a matter of too few updates and too small a step; with the learning
rate scaled by sqrt(large / small batch), the same number of updates as small-batch training ("regime
adaptation"), and Ghost BN (batch statistics over virtual batches of 128 instead of the whole large
batch), large batches generalize about as well as small ones; Ghost BN improves on plain BN at the same
large batch. Checks: the large-batch arm without Ghost BN has a higher test error than the small-batch
arm (the gap exists at all at this scale; reported either way), and Ghost BN closes at least
``min_closed_frac`` of it: ``(err_large - err_ghost) / (err_large - err_small)``, errors as 1 - the final
test accuracy, means over seeds.

Arms: ``small`` (batch ``small_batch``, lr ``lr``, BN), ``large`` (batch ``large_batch``, lr
``lr * sqrt(large_batch / small_batch)`` with ``lr_scaling`` ``sqrt``, BN over the whole batch),
``large+ghost`` (the same with bnkit's ``GhostBatchNorm1d/2d``, ``virtual_batch_size``
``ghost_virtual_batch``), all ``steps`` updates from the same initial weights for a seed. Eval mode uses
the running statistics in every arm (Ghost BN's are the whole-batch statistics, merged exactly from the
virtual batches).

Defaults: 784-(256 x 3)-10 ReLU MLP, He init, SGD with momentum 0.9, lr 0.1 at batch 128, batch 2,048
with lr 0.4 (= 0.1 x sqrt 16), virtual batch 128, 400 updates each (13 epochs of mnist5k's 4,000
training digits at batch 128, 205 at batch 2,048), seeds 0, 1, 2. On 1,000 test digits one run's error
has a sampling error of about 0.7 points at 95 % accuracy, so gaps below a point are at the noise level:
``seeds_ghost_better`` counts the seeds where Ghost BN beat plain BN at the large batch.
"""
from __future__ import annotations

import math
from typing import Dict, List

import numpy as np

from .claims import (
    COMMON_DEFAULTS, arm_summary, by_arm, check, final_acc, make_run, mean, present_arms, saved_figure, series_mean,
    style_axes, with_checks,
)
from .train import RunConfig

__all__ = ["DEFAULTS", "OPTIONS", "ARMS", "make_runs", "summarize", "plot", "validate", "large_lr"]

ARMS = ("small", "large", "large+ghost")

DEFAULTS: Dict[str, object] = {
    **COMMON_DEFAULTS,
    "arch": "mlp", "hidden": [256] * 3, "activation": "relu", "init_gain": math.sqrt(2.0),
    "channels": [8, 16, 32],
    "steps": 400, "small_batch": 128, "large_batch": 2048, "ghost_virtual_batch": 128, "lr": 0.1,
    "lr_scaling": "sqrt", "optimizer": "momentum", "momentum": 0.9, "eval_every": 50,
    "threshold": 0.9, "thresholds": [0.9], "seeds": [0, 1, 2], "min_closed_frac": 0.2,
    "batch_size": 128,  # not used by the runs (each arm has its own), kept for the shared checks
}

OPTIONS = {
    "momentum": {"help": "the momentum of --optimizer momentum"},
    "arch": {"choices": ("mlp", "tinycnn"), "help": "network (mlp: `hidden` widths; tinycnn: `channels`)"},
    "channels": {"low": 1, "help": "tinycnn's channels per stage"},
    "small_batch": {"low": 2, "help": "batch size of the small-batch arm"},
    "large_batch": {"low": 2, "help": "batch size of the large-batch arms"},
    "ghost_virtual_batch": {"low": 2, "help": "Ghost BN's virtual batch size"},
    "lr_scaling": {"choices": ("sqrt", "linear", "none"), "help": "large-batch lr = lr x (ratio)^(1/2 | 1 | 0)"},
    "min_closed_frac": {"high": 1, "help": "the fraction of the large-batch gap Ghost BN must close"},
    "init_gain": {"nullable": True, "help": "weights N(0, gain^2/fan_in) (none: torch's default init)"},
}


def large_lr(cfg: Dict) -> float:
    r = int(cfg["large_batch"]) / int(cfg["small_batch"])
    p = {"sqrt": 0.5, "linear": 1.0, "none": 0.0}[cfg["lr_scaling"]]
    return float(cfg["lr"]) * r ** p


def validate(cfg: Dict, data) -> None:
    sb, lb, vb = int(cfg["small_batch"]), int(cfg["large_batch"]), int(cfg["ghost_virtual_batch"])
    if lb <= sb:
        raise ValueError(f"--large-batch {lb} must be larger than --small-batch {sb}")
    if lb > len(data.y_train):
        raise ValueError(f"--large-batch {lb} is larger than the training set of {data.name} ({len(data.y_train)})")
    if vb >= lb:
        raise ValueError(f"--ghost-virtual-batch {vb} must be smaller than --large-batch {lb} (else Ghost BN is BN)")


def _opts(cfg, extra=None) -> Dict:
    o: Dict[str, object] = {"channels": [int(c) for c in cfg["channels"]]} if cfg["arch"] == "tinycnn" else {"dropout": 0.0}
    if cfg.get("init_gain") is not None:
        o["init_gain"] = float(cfg["init_gain"])
    o.update(extra or {})
    return o


def make_runs(cfg: Dict) -> List[RunConfig]:
    sb, lb = int(cfg["small_batch"]), int(cfg["large_batch"])
    runs = []
    for s in cfg["seeds"]:
        runs.append(make_run(cfg, f"small-s{s}", "small", norm="bn", seed=s, batch_size=sb, lr=float(cfg["lr"]),
                             options=_opts(cfg)))
        runs.append(make_run(cfg, f"large-s{s}", "large", norm="bn", seed=s, batch_size=lb, lr=large_lr(cfg),
                             options=_opts(cfg)))
        runs.append(make_run(cfg, f"large+ghost-s{s}", "large+ghost", norm="ghost", seed=s, batch_size=lb,
                             lr=large_lr(cfg), options=_opts(cfg, {"norm_kw": {
                                 "virtual_batch_size": int(cfg["ghost_virtual_batch"])}})))
    return runs


def summarize(cfg: Dict, results: Dict[str, Dict]) -> Dict:
    groups = by_arm(results)
    summary: Dict[str, object] = {arm: arm_summary(rs) for arm, rs in groups.items()}
    err = {arm: 1.0 - mean(final_acc(r) for r in rs) for arm, rs in groups.items()}
    summary["test_error"] = err
    summary["test_error_per_seed"] = {arm: [1.0 - final_acc(r) for r in rs] for arm, rs in groups.items()}
    gap = err["large"] - err["small"]
    closed = (err["large"] - err["large+ghost"]) / gap if gap > 0 else None
    summary["lr"] = {"small": float(cfg["lr"]), "large": large_lr(cfg)}
    mcf = float(cfg["min_closed_frac"])
    return with_checks(summary, {
        "large_batch_error_gt_small_batch": check(gap > 0, large=err["large"], small=err["small"], gap=gap),
        f"ghost_bn_closes_ge_{mcf:g}_of_the_gap": check(
            closed is not None and closed >= mcf, closed_fraction=closed, large=err["large"],
            large_ghost=err["large+ghost"], small=err["small"], gap=gap,
            seeds_ghost_better=sum(g < lg for g, lg in zip(summary["test_error_per_seed"]["large+ghost"],
                                                           summary["test_error_per_seed"]["large"])),
            seeds=len(groups["large"])),
    }, cfg["threshold"])


_COLORS = {"small": "tab:green", "large": "tab:red", "large+ghost": "tab:blue"}


def plot(cfg: Dict, results: Dict[str, Dict], summary: Dict, path) -> None:
    labels = {"small": f"batch {cfg['small_batch']}, lr {float(cfg['lr']):g}",
              "large": f"batch {cfg['large_batch']}, lr {large_lr(cfg):.3g}",
              "large+ghost": f"batch {cfg['large_batch']} + Ghost BN {cfg['ghost_virtual_batch']}"}
    title = (f"large batches and Ghost BN: {cfg['arch']} on {cfg['data']}, {cfg['lr_scaling']} lr scaling, "
             f"{len(cfg['seeds'])} seed(s)")
    with saved_figure(path, 3, figsize=(15, 4.2), dpi=100, title=title) as (fig, axes):
        for arm, rs in present_arms(results, ARMS):
            st, acc = series_mean(rs, "test_acc")
            axes[0].plot(st, 100 * (1 - acc), color=_COLORS[arm], lw=1.8, label=labels[arm])
            # the training loss of an interval (none at step 0), mean over seeds
            n = min(len(r["train_loss"]) for r in rs)
            axes[1].plot(rs[0]["steps"][1:n], np.mean([r["train_loss"][1:n] for r in rs], axis=0),
                         color=_COLORS[arm], lw=1.8, label=labels[arm])
            per = summary["test_error_per_seed"][arm]
            i = ARMS.index(arm)
            axes[2].bar(i, 100 * summary["test_error"][arm], color=_COLORS[arm], alpha=0.7)
            axes[2].scatter([i] * len(per), [100 * e for e in per], color="k", s=12, zorder=3)
        axes[0].set_title("(a) test error (%), mean over seeds")
        axes[0].set_ylim(0, 12)
        axes[1].set_title("(b) training loss (mean over each interval)")
        axes[1].set_yscale("log")
        axes[2].set_xticks(range(len(ARMS)))
        axes[2].set_xticklabels(ARMS)
        axes[2].set_title("(c) final test error (%), bars: mean, dots: seeds")
        style_axes(axes[:2], "updates (the same number in every arm)", legend={"fontsize": 8})
        style_axes(axes[2:])
