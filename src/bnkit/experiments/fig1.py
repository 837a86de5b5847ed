"""Ioffe & Szegedy (2015), Figure 1: a 784-100-100-100-10 sigmoid MLP on MNIST, batch 60, trained with and
without Batch Normalization. (a) test accuracy vs training steps; (b, c) the 15th/50th/85th percentiles
of the input to a typical sigmoid of the last hidden layer over training, without (b) and with (c) BN.

Default settings (``bnkit demo``, chosen and measured on the embedded ``mnist5k``, 4,000/1,000 digits):
plain SGD, lr 0.5, batch 60, torch's default init, raw pixels in [0, 1] (no binarization), 3,000 steps
(45 epochs), evaluation every 50 steps, threshold 90 %, seeds 0, 1, 2. On 4,000 training digits both
nets end at the same data-limited plateau (about 92-93 %): the baseline catches up with BN after
about 3,700-4,000 steps at lr 0.5, so the demo shows the training-speed effect, as the paper's Figure 1
does, and stops before that point. See docs/experiments.md for measured numbers.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from .report import save_figure
from .train import RunConfig

__all__ = ["DEFAULTS", "OPTIONS", "make_runs", "summarize", "figure", "plot", "VARIANTS"]

DEFAULTS: Dict[str, object] = {
    "data": "mnist5k",
    "data_dir": None,
    "steps": 3000,
    "lr": 0.5,
    "batch_size": 60,
    "optimizer": "sgd",
    "init": "default",
    "binarize": False,
    "normalize": "none",
    "hidden": [100, 100, 100],
    "activation": "sigmoid",
    "eval_every": 50,
    "probe_size": 600,
    "threshold": 0.9,
    "thresholds": [0.8, 0.85, 0.9, 0.95],
    "seeds": [0, 1, 2],
    "norm": "bn",            # the normalized variant compared with the baseline (any factory kind)
    "skip_evals": 3,         # "after the first few": evaluations ignored by the BN-ahead check (incl. step 0)
    "threads": 1,
}

# the settings' checks and help beyond the common ones (registry.common_options)
OPTIONS: Dict[str, Dict[str, object]] = {
    "norm": {"choices": ("bn", "bn-weight", "bn-all", "renorm", "ghost", "gn", "ln"),
             "help": "the norm of the normalized MLP (compared with the un-normalized baseline)"},
}

VARIANTS = ("baseline", "bn")


def make_runs(cfg: Dict) -> List[RunConfig]:
    thr = sorted(set(float(t) for t in list(cfg["thresholds"]) + [cfg["threshold"]]))
    runs = []
    for seed in cfg["seeds"]:
        for variant, norm in (("baseline", "none"), ("bn", cfg["norm"])):
            runs.append(RunConfig(
                name=f"{variant}-s{seed}", variant=variant, norm=norm, seed=int(seed), arch="mlp",
                hidden=cfg["hidden"], activation=cfg["activation"], init=cfg["init"], steps=int(cfg["steps"]),
                batch_size=int(cfg["batch_size"]), lr=float(cfg["lr"]), optimizer=cfg["optimizer"],
                eval_every=int(cfg["eval_every"]), probe_size=int(cfg["probe_size"]), thresholds=thr))
    return runs


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def summarize(cfg: Dict, results: Dict[str, Dict]) -> Dict:
    thr_key = f"{float(cfg['threshold']):.2f}"
    seeds = list(cfg["seeds"])
    by = {v: [results[f"{v}-s{s}"] for s in seeds] for v in VARIANTS}
    summary: Dict[str, object] = {}
    for v, rs in by.items():
        keys = rs[0]["summary"]["steps_to"].keys()
        steps_to_ps = {k: [r["summary"]["steps_to"][k] for r in rs] for k in keys}
        summary[v] = {
            "final_acc": _mean([r["summary"]["final_acc"] for r in rs]),
            "final_acc_per_seed": [r["summary"]["final_acc"] for r in rs],
            "best_acc": _mean([r["summary"]["best_acc"] for r in rs]),
            # mean over seeds; null when some seed never reached the threshold
            "steps_to": {k: (None if None in ps else _mean(ps)) for k, ps in steps_to_ps.items()},
            "steps_to_per_seed": steps_to_ps,
            "drift": {m: _mean([r["summary"]["drift"][m] for r in rs]) for m in ("range", "spread", "relative")},
            "drift_per_seed": [r["summary"]["drift"] for r in rs],
            "typical_unit_per_seed": [r["typical_unit"] for r in rs],
            # the fastest evaluation interval over the variant's runs (timeit-style minimum: the cost of a
            # step with the least interference from other processes), and the plain mean over all steps
            "ms_per_step": min(r["timing"]["ms_per_step"] for r in rs),
            "ms_per_step_mean": _mean([r["timing"].get("ms_per_step_mean") for r in rs]),
        }
    skip = int(cfg.get("skip_evals", 3))
    ahead, steps_ok, drift_ratio, drift_ratio_rel, final_ok = [], [], [], [], []
    for b, n in zip(by["bn"], by["baseline"]):
        a_bn, a_base = np.asarray(b["test_acc"]), np.asarray(n["test_acc"])
        not_ahead = [int(b["steps"][i]) for i in range(skip, len(a_bn)) if a_bn[i] <= a_base[i]]
        ahead.append(not_ahead)
        sb, sn = b["summary"]["steps_to"][thr_key], n["summary"]["steps_to"][thr_key]
        steps_ok.append(sb is not None and (sn is None or sb < sn))
        drift_ratio.append(n["summary"]["drift"]["range"] / max(b["summary"]["drift"]["range"], 1e-12))
        drift_ratio_rel.append(n["summary"]["drift"]["relative"] / max(b["summary"]["drift"]["relative"], 1e-12))
        final_ok.append(b["summary"]["final_acc"] > n["summary"]["final_acc"])
    t_bn, t_base = summary["bn"]["ms_per_step"], summary["baseline"]["ms_per_step"]
    summary["checks"] = {
        "bn_ahead_after_first_few": {
            "pass": all(not x for x in ahead), "skipped_evals": skip,
            "evals_where_bn_not_ahead_per_seed": ahead},
        f"steps_to_{thr_key}": {"pass": all(steps_ok), "per_seed": steps_ok,
                                "bn": summary["bn"]["steps_to_per_seed"][thr_key],
                                "baseline": summary["baseline"]["steps_to_per_seed"][thr_key]},
        "final_acc_bn_above_baseline": {"pass": all(final_ok), "per_seed": final_ok},
        "drift_ratio_ge_3": {"pass": all(r >= 3 for r in drift_ratio), "per_seed": drift_ratio,
                             "relative_per_seed": drift_ratio_rel},
        # ms/step: the fastest evaluation interval of each variant (least interference on a shared machine)
        "time_per_step_ratio": {"bn_over_baseline": (t_bn / t_base) if t_bn and t_base else None,
                                "ms_per_step": {"bn": t_bn, "baseline": t_base},
                                "mean_ratio": (summary["bn"]["ms_per_step_mean"] / summary["baseline"]["ms_per_step_mean"])
                                if summary["baseline"]["ms_per_step_mean"] else None,
                                "pass": bool(t_bn and t_base and t_bn / t_base <= 1.5)},
    }
    summary["threshold"] = float(cfg["threshold"])
    return summary


def figure(cfg: Dict, results: Dict[str, Dict], summary: Dict):
    """Figure 1 (a matplotlib Figure). The legends sit below the panels, so they never cover a curve."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = list(cfg["seeds"])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.8), dpi=110)
    ax = axes[0]
    for i, s in enumerate(seeds):
        lw, alpha = (2.0, 1.0) if i == 0 else (0.9, 0.45)
        for v, color, ls, label in (("baseline", "tab:gray", "--", "Without BN"), ("bn", "tab:blue", "-", "With BN")):
            r = results[f"{v}-s{s}"]
            ax.plot(r["steps"], r["test_acc"], ls, color=color, lw=lw, alpha=alpha,
                    label=f"{label}" if i == 0 else None)
    thr = float(cfg["threshold"])
    ax.axhline(thr, color="k", lw=0.6, ls=":")
    lo = min(min(results[f"{v}-s{s}"]["test_acc"][min(2, len(results[f'{v}-s{s}']['test_acc']) - 1):])
             for v in VARIANTS for s in seeds)
    ax.set_ylim(max(0.0, min(lo, thr) - 0.05), 1.0)
    ax.set_xlabel("training steps")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"(a) test accuracy, {cfg['data']} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})",
                 fontsize=10)
    ax.legend(**_LEGEND)
    ax.grid(alpha=0.3)

    s0 = seeds[0]
    ys = []
    for ax, v, title in ((axes[1], "baseline", "(b) Without BN"), (axes[2], "bn", "(c) With BN")):
        r = results[f"{v}-s{s0}"]
        p = r["percentiles"]
        for key, style in (("p85", ":"), ("p50", "-"), ("p15", ":")):
            ax.plot(r["steps"], p[key], style, color="tab:blue" if v == "bn" else "tab:gray", lw=1.6,
                    label={"p15": "15th", "p50": "50th", "p85": "85th"}[key] + " percentile")
        ys += p["p15"] + p["p85"]
        d = r["summary"]["drift"]
        ax.set_title(f"{title}: unit {r['typical_unit']}, last hidden layer\n"
                     f"50th pct range {d['range']:.2f} ({d['relative']:.2f} x its 15-85 spread)", fontsize=10)
        ax.set_xlabel("training steps")
        ax.set_ylabel("sigmoid input")
        ax.grid(alpha=0.3)
        ax.legend(**_LEGEND)
    pad = 0.05 * (max(ys) - min(ys) + 1e-9)
    for ax in axes[1:]:
        ax.set_ylim(min(ys) - pad, max(ys) + pad)
    from matplotlib.ticker import FuncFormatter, MaxNLocator
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(6, integer=True))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k" if abs(v) >= 1000 else f"{v:g}"))
    fig.suptitle(f"Batch Normalization, Figure 1: {cfg['data']}, lr {cfg['lr']}, batch {cfg['batch_size']}, "
                 f"{cfg['steps']} steps (seed {s0} in b, c)", fontsize=10)
    fig.tight_layout()
    return fig


# below the axes (under the x label), one row: outside the data area, so no curve is hidden
_LEGEND = dict(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8, frameon=False)


def plot(cfg: Dict, results: Dict[str, Dict], summary: Dict, path) -> None:
    import matplotlib.pyplot as plt
    fig = figure(cfg, results, summary)
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)

