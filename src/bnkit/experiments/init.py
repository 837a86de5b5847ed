"""Initialization: a deep MLP with and without BN, its initial weights scaled by factors spanning two
decades.

Claim (Ioffe & Szegedy 2015, section 3.3: with BN, back-propagation through a layer is unaffected by
the scale of its parameters, so training is less sensitive to initialization): BN's final test
accuracy (mean over seeds) varies by at most 2 points across the init scales, while the baseline's
varies by at least 20 points (a scale at which it fails to train counts with the accuracy it ends at).

Defaults: a 784-(100 x 6)-10 ReLU MLP on mnist5k, weights N(0, (scale * sqrt(2))^2 / fan_in) (He's
init times ``scale``), biases 0, for scales 0.1, 0.3, 1, 3, 10; plain SGD, lr 0.1, batch 60, 1,000
steps, seeds 0, 1, 2; a run whose loss becomes non-finite stops there (accuracy of its non-finite model).
The second panel shows the standard deviation of every hidden layer's pre-activation (the activation's
input) at initialization on 500 training digits: without BN it grows or shrinks geometrically with depth.
"""
from __future__ import annotations

import math
from typing import Dict, List

from .claims import (
    COMMON_DEFAULTS, arm_summary, by_arm, check, final_acc, make_run, mean, plot_style, saved_figure, seeds_text,
    style_axes, with_checks,
)
from .train import RunConfig

__all__ = ["DEFAULTS", "make_runs", "summarize", "plot", "activation_scales"]

DEFAULTS: Dict[str, object] = {
    **COMMON_DEFAULTS,
    "arch": "mlp", "hidden": [100] * 6, "activation": "relu", "norm": "bn",
    "scales": [0.1, 0.3, 1.0, 3.0, 10.0], "base_gain": math.sqrt(2.0),
    "steps": 1000, "lr": 0.1, "batch_size": 60, "eval_every": 100, "threshold": 0.9, "thresholds": [0.9],
    "seeds": [0, 1, 2], "bn_max_range": 0.02, "baseline_min_range": 0.20, "act_probe": 500,
}

NETS = (("baseline", "none"), ("bn", None))


def _name(net, scale, seed):
    return f"{net}-x{scale:g}-s{seed}"


def _run(cfg, net, norm, scale, seed) -> RunConfig:
    return make_run(cfg, _name(net, scale, seed), f"{net} x{scale:g}", norm=norm or cfg["norm"], seed=seed,
                    hidden=cfg["hidden"], options={"init_gain": float(scale) * float(cfg["base_gain"])},
                    on_diverge="stop")


def make_runs(cfg: Dict) -> List[RunConfig]:
    return [_run(cfg, net, norm, float(sc), s) for s in cfg["seeds"] for sc in cfg["scales"] for net, norm in NETS]


def activation_scales(cfg: Dict, x) -> Dict[str, Dict[str, List[float]]]:
    """net -> scale -> std of each hidden layer's pre-activation at initialization (training-mode
    forward of ``x``, seed = the first seed)."""
    import torch

    from .nets import build_net
    out: Dict[str, Dict[str, List[float]]] = {}
    for net, norm in NETS:
        out[net] = {}
        for sc in cfg["scales"]:
            rc = _run(cfg, net, norm, float(sc), cfg["seeds"][0])
            m = build_net(rc, tuple(x.shape[1:]), 10)
            m.train()
            stds: List[float] = []

            def hook(mod, inp, outp, stds=stds):
                stds.append(float(inp[0].std()))
            hooks = [b.act.register_forward_hook(hook) for b in m.blocks if hasattr(b, "act")]
            with torch.no_grad():
                m(x)
            for h in hooks:
                h.remove()
            out[net][f"{float(sc):g}"] = stds
    return out


def summarize(cfg: Dict, results: Dict[str, Dict]) -> Dict:
    from .data import load_dataset

    summary: Dict[str, object] = {arm: arm_summary(rs) for arm, rs in by_arm(results).items()}
    acc = {net: {f"{float(sc):g}": mean(final_acc(results[_name(net, float(sc), s)]) for s in cfg["seeds"])
                 for sc in cfg["scales"]} for net, _ in NETS}
    rng = {net: (max(v.values()) - min(v.values())) for net, v in acc.items()}
    failed = {net: [k for k, a in v.items() if a < 0.5] for net, v in acc.items()}
    summary["final_acc_vs_scale"] = acc
    data = load_dataset(cfg["data"], cfg.get("data_dir"), binarize=bool(cfg.get("binarize")),
                        normalize=cfg.get("normalize", "none"))
    summary["activation_std_at_init"] = activation_scales(cfg, data.x_train[: int(cfg["act_probe"])])
    return with_checks(summary, {
        f"bn_range_le_{cfg['bn_max_range']:g}": check(rng["bn"] <= float(cfg["bn_max_range"]), range=rng["bn"],
                                                     final_acc_per_scale=acc["bn"]),
        f"baseline_range_ge_{cfg['baseline_min_range']:g}": check(
            rng["baseline"] >= float(cfg["baseline_min_range"]), range=rng["baseline"],
            final_acc_per_scale=acc["baseline"], scales_below_50pct=failed["baseline"]),
    })


def plot(cfg: Dict, results: Dict[str, Dict], summary: Dict, path) -> None:
    colors = {"baseline": "tab:gray", "bn": "tab:blue"}
    labels = {"baseline": "without BN", "bn": f"with {cfg['norm']}"}
    title = (f"init scale sweep: {len(cfg['hidden'])}-hidden-layer {cfg['activation']} MLP on {cfg['data']}, "
             f"lr {cfg['lr']}, {seeds_text(cfg)}")
    with saved_figure(path, 2, figsize=(12, 4.2), title=title) as (fig, axes):
        ax = axes[0]
        scales = [float(s) for s in cfg["scales"]]
        for net, _ in NETS:
            ys = [summary["final_acc_vs_scale"][net][f"{s:g}"] for s in scales]
            ax.plot(scales, ys, "-o", color=colors[net], label=labels[net])
            for s in scales:
                per = [final_acc(results[_name(net, s, sd)]) for sd in cfg["seeds"]]
                ax.scatter([s] * len(per), per, s=9, color=colors[net], alpha=0.4)
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
        ax.set_xlabel("init scale (x He init)")
        ax.set_ylabel(f"final test accuracy after {cfg['steps']} steps")
        r = [c["range"] for c in summary["checks"].values()]
        ax.set_title(f"(a) accuracy range over scales: BN {r[0]:.3f}, baseline {r[1]:.3f}")
        style_axes([ax], legend={"loc": "lower center"})
        ax = axes[1]
        cmap = plot_style().get_cmap("viridis")
        for i, s in enumerate(scales):
            for net, ls in (("baseline", "--"), ("bn", "-")):
                stds = summary["activation_std_at_init"][net][f"{s:g}"]
                ax.plot(range(1, len(stds) + 1), stds, ls, marker="o", ms=3, color=cmap(i / max(1, len(scales) - 1)),
                        label=f"x{s:g}" if net == "baseline" else None)
        ax.set_yscale("log")
        ax.set_xlabel("hidden layer")
        ax.set_ylabel("std of the pre-activation at init")
        ax.set_title("(b) activation scale at initialization: baseline dashed, BN solid")
        style_axes([ax], legend={"fontsize": 8})
