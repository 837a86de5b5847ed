"""Learning rate: the same MLP with and without BN over a learning-rate grid spanning four decades.

Claim (Ioffe & Szegedy 2015, sections 3.3 and 4.2: BN-x30 trains Inception with a 30x larger learning
rate; Bjorck et al. 2018 argue that the larger learning rates BN allows are the main source of its
gains): the largest learning rate whose final test accuracy (mean over seeds) still reaches the
threshold is at least 10x larger with BN, and BN's best final accuracy over the grid is at least the
baseline's best.

Defaults: a 784-100-100-100-10 ReLU MLP on mnist5k, plain SGD, batch 60, 1,000 steps per run, learning
rates 0.003 to 30 (nine values, about half a decade apart), threshold 90 %, seeds 0, 1, 2; a run whose
loss becomes non-finite stops there and counts with the accuracy of its non-finite model (about chance).
"""
from __future__ import annotations

from typing import Dict, List

from .claims import (
    COMMON_DEFAULTS, arm_summary, by_arm, check, final_acc, make_run, mean, plot_style, saved_figure, seeds_text,
    series_mean, style_axes, with_checks,
)
from .train import RunConfig

__all__ = ["DEFAULTS", "make_runs", "summarize", "plot", "largest_reaching"]

DEFAULTS: Dict[str, object] = {
    **COMMON_DEFAULTS,
    "arch": "mlp", "hidden": [100, 100, 100], "activation": "relu", "norm": "bn",
    "steps": 1000, "lr": 0.1, "lrs": [0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0],
    "batch_size": 60, "eval_every": 100, "threshold": 0.9, "thresholds": [0.9],
    "seeds": [0, 1, 2], "min_ratio": 10.0,
}

NETS = (("baseline", "none"), ("bn", None))


def _name(net: str, lr: float, seed: int) -> str:
    return f"{net}-lr{lr:g}-s{seed}"


def make_runs(cfg: Dict) -> List[RunConfig]:
    runs = []
    for seed in cfg["seeds"]:
        for lr in cfg["lrs"]:
            for net, norm in NETS:
                runs.append(make_run(cfg, _name(net, float(lr), seed), f"{net} lr={float(lr):g}",
                                     norm=norm or cfg["norm"], seed=seed, lr=float(lr), on_diverge="stop"))
    return runs


def largest_reaching(accs: Dict[float, float], thr: float):
    """The largest learning rate whose (mean) final accuracy is at least ``thr`` (None if none)."""
    ok = [lr for lr, a in accs.items() if a is not None and a >= thr]
    return max(ok) if ok else None


def _curve(results, cfg, net):
    """lr -> (mean final accuracy over seeds, per-seed final accuracies)."""
    out = {}
    for lr in cfg["lrs"]:
        rs = [results[_name(net, float(lr), s)] for s in cfg["seeds"] if _name(net, float(lr), s) in results]
        if rs:
            out[float(lr)] = (mean(final_acc(r) for r in rs), [final_acc(r) for r in rs])
    return out


def summarize(cfg: Dict, results: Dict[str, Dict]) -> Dict:
    thr = float(cfg["threshold"])
    summary: Dict[str, object] = {arm: arm_summary(rs) for arm, rs in by_arm(results).items()}
    curves = {net: _curve(results, cfg, net) for net, _ in NETS}
    mx = {net: largest_reaching({lr: a for lr, (a, _) in c.items()}, thr) for net, c in curves.items()}
    best = {net: max((a for a, _ in c.values() if a is not None), default=None) for net, c in curves.items()}
    best_lr = {net: max(c, key=lambda lr: c[lr][0] if c[lr][0] is not None else -1) for net, c in curves.items()}
    ratio = (mx["bn"] / mx["baseline"]) if mx["bn"] and mx["baseline"] else None
    diverged = {net: [lr for lr in cfg["lrs"] for s in cfg["seeds"]
                      if (results.get(_name(net, float(lr), s)) or {}).get("diverged_at") is not None]
                for net, _ in NETS}
    summary["final_acc_vs_lr"] = {net: {f"{lr:g}": a for lr, (a, _) in c.items()} for net, c in curves.items()}
    return with_checks(summary, {
        f"largest_lr_reaching_{thr:.2f}_ratio_ge_{cfg['min_ratio']:g}": check(
            mx["bn"] is not None and (mx["baseline"] is None or ratio >= float(cfg["min_ratio"])),
            bn_largest_lr=mx["bn"], baseline_largest_lr=mx["baseline"], ratio=ratio, threshold=thr,
            lrs_where_some_seed_diverged=diverged),
        "bn_best_ge_baseline_best": check(
            best["bn"] is not None and best["baseline"] is not None and best["bn"] >= best["baseline"],
            bn_best=best["bn"], bn_best_lr=best_lr["bn"], baseline_best=best["baseline"],
            baseline_best_lr=best_lr["baseline"], difference=(best["bn"] - best["baseline"])
            if best["bn"] is not None and best["baseline"] is not None else None),
    }, thr)


def plot(cfg: Dict, results: Dict[str, Dict], summary: Dict, path) -> None:
    title = (f"lr sweep: {cfg['arch']} {cfg['activation']} on {cfg['data']}, batch {cfg['batch_size']}, "
             f"{seeds_text(cfg)}")
    with saved_figure(path, 2, figsize=(12, 4.2), title=title) as (fig, axes):
        ax = axes[0]
        colors = {"baseline": "tab:gray", "bn": "tab:blue"}
        labels = {"baseline": "without BN", "bn": f"with {cfg['norm']}"}
        thr = float(cfg["threshold"])
        for net, _ in NETS:
            c = _curve(results, cfg, net)
            lrs = sorted(c)
            ax.plot(lrs, [c[lr][0] for lr in lrs], "-o", color=colors[net], label=labels[net])
            for lr in lrs:
                ax.scatter([lr] * len(c[lr][1]), c[lr][1], s=9, color=colors[net], alpha=0.4)
        ax.axhline(thr, color="k", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_ylabel(f"final test accuracy after {cfg['steps']} steps")
        ck = next(iter(summary["checks"].values()))
        ax.set_title(f"(a) largest lr reaching {thr:.0%}: BN {ck['bn_largest_lr']}, "
                     f"baseline {ck['baseline_largest_lr']}")
        ax.set_ylim(0, 1)
        style_axes([ax], "learning rate (log)", legend={"loc": "lower left"})
        ax = axes[1]
        cmap = plot_style().get_cmap("viridis")
        lrs = [float(x) for x in cfg["lrs"]]
        for i, lr in enumerate(lrs):
            for net, ls in (("baseline", "--"), ("bn", "-")):
                rs = [results[_name(net, lr, s)] for s in cfg["seeds"] if _name(net, lr, s) in results]
                if rs:
                    st, y = series_mean(rs)
                    ax.plot(st, y, ls, color=cmap(i / max(1, len(lrs) - 1)), lw=1.2,
                            label=f"lr {lr:g}" if net == "bn" else None)
        ax.set_title("(b) test accuracy (mean over seeds): BN solid, baseline dashed")
        ax.set_ylim(0, 1)
        style_axes([ax], "training steps", legend={"fontsize": 7, "ncol": 3, "loc": "lower right"})
