"""CNNs from the sources, with and without BN: the Keras MNIST example's conv net and the PyTorch
CIFAR-10 tutorial's LeNet (with BatchNorm1d in its fully connected layers, as in the source).

Claim (the sources' demos; Ioffe & Szegedy 2015, section 4): with BN the net reaches the accuracy
threshold in at least 2x fewer steps (or the net without BN never reaches it) and ends at least as high
(final test accuracy, mean over seeds), for each of the two nets.

Defaults: both nets on mnist5k (``--data cifar10 --data-dir DIR`` runs them on CIFAR-10: set a lower
``threshold``, e.g. 0.45); the Keras net at half width (conv 16 and 32 channels, dense 64; the
source's 32/64/128 with ``--set keras='{"channels": [32, 64], "fc": [128]}'``) to fit the time budget, with
its dropout (0.25, 0.5); BN after every conv and dense layer. LeNet: 6/16 channels, fc 120-84, BN only in
the fc layers. SGD with momentum 0.9, lr 0.01, batch 64; the Keras net 400 steps, LeNet 1,000 steps;
threshold 95 %, seeds 0 and 1.
"""
from __future__ import annotations

from typing import Dict, List

from .claims import (
    COMMON_DEFAULTS, arm_summary, by_arm, check, fmt_key, make_run, saved_figure, series_mean, style_axes, with_checks,
)
from .train import RunConfig

__all__ = ["DEFAULTS", "make_runs", "summarize", "plot", "NETS"]

NETS = ("keras", "lenet")

DEFAULTS: Dict[str, object] = {
    **COMMON_DEFAULTS,
    "nets": ["keras", "lenet"], "norm": "bn",
    "keras": {"channels": [16, 32], "fc": [64], "dropout": [0.25, 0.5], "steps": 400, "eval_every": 20},
    "lenet": {"channels": [6, 16], "fc": [120, 84], "steps": 1000, "eval_every": 50},
    "optimizer": "momentum", "momentum": 0.9, "lr": 0.01, "batch_size": 64, "activation": "relu",
    "threshold": 0.95, "thresholds": [0.9, 0.95], "seeds": [0, 1], "min_speedup": 2.0,
    # None: the per-net value above; a value here (e.g. --steps) applies to both nets
    "steps": None, "eval_every": None,
}

_OPTION_KEYS = ("channels", "fc", "dropout", "conv_norm")


def _run(cfg, net, with_bn, seed) -> RunConfig:
    a = dict(cfg)
    a.update({k: v for k, v in cfg[net].items() if cfg.get(k) is None})
    opts = {k: a[k] for k in _OPTION_KEYS if k in cfg[net]}
    label = "bn" if with_bn else "baseline"
    return make_run(a, f"{net}-{label}-s{seed}", f"{net} {label}", norm=cfg["norm"] if with_bn else "none",
                    seed=seed, arch=net, options=opts)


def make_runs(cfg: Dict) -> List[RunConfig]:
    return [_run(cfg, net, bn, s) for s in cfg["seeds"] for net in cfg["nets"] for bn in (False, True)]


def summarize(cfg: Dict, results: Dict[str, Dict]) -> Dict:
    summary: Dict[str, object] = {arm: arm_summary(rs) for arm, rs in by_arm(results).items()}
    key = fmt_key(cfg["threshold"])
    checks = {}
    for net in cfg["nets"]:
        b, n = summary[f"{net} bn"], summary[f"{net} baseline"]
        sb, sn = b["steps_to"].get(key), n["steps_to"].get(key)
        speed = (sn / sb) if (sb and sn) else None
        checks[f"{net}_bn_reaches_{key}_2x_faster"] = check(
            sb is not None and (sn is None or sn / sb >= float(cfg["min_speedup"])),
            bn_steps=sb, baseline_steps=sn, speedup=speed, bn_steps_per_seed=b["steps_to_per_seed"][key],
            baseline_steps_per_seed=n["steps_to_per_seed"][key])
        checks[f"{net}_bn_final_ge_baseline"] = check(
            b["final_acc"] >= n["final_acc"], bn_final=b["final_acc"], baseline_final=n["final_acc"],
            difference=b["final_acc"] - n["final_acc"])
    return with_checks(summary, checks, cfg["threshold"])


def _steps(v) -> str:
    return "never" if v is None else f"{v:g}"


def plot(cfg: Dict, results: Dict[str, Dict], summary: Dict, path) -> None:
    nets = list(cfg["nets"])
    with saved_figure(path, len(nets), figsize=(6 * len(nets), 4.2), squeeze=False) as (fig, axes):
        groups = by_arm(results)
        thr = float(cfg["threshold"])
        for ax, net in zip(axes[0], nets):
            for lab, color, ls in (("baseline", "tab:gray", "--"), ("bn", "tab:blue", "-")):
                rs = groups.get(f"{net} {lab}", [])
                for r in rs:
                    ax.plot(r["steps"], r["test_acc"], ls, color=color, lw=0.6, alpha=0.5)
                if rs:
                    st, y = series_mean(rs)
                    ax.plot(st, y, ls, color=color, lw=2,
                            label=("with BN" if lab == "bn" else "without BN") + " (mean)")
            ax.axhline(thr, color="k", lw=0.6, ls=":")
            c = summary["checks"][f"{net}_bn_reaches_{fmt_key(thr)}_2x_faster"]
            ax.set_title(f"{net} on {cfg['data']}: steps to {thr:.0%} (mean over seeds): BN {_steps(c['bn_steps'])}, "
                         f"without BN {_steps(c['baseline_steps'])}", fontsize=9)
            lo = min(min(r["test_acc"][1:] or [0.5]) for r in results.values() if r["config"]["arch"] == net)
            ax.set_ylim(max(0.0, min(lo, thr) - 0.05), 1.0)
            ax.set_ylabel("test accuracy")
            style_axes([ax], "training steps", legend={"loc": "lower right"})
