"""BN variants: standard BN, BN with a shared weight (one gamma for all channels) and with shared
parameters (one gamma and one beta), LayerNorm, GroupNorm and no norm, on the MLP and on a small CNN:
final accuracy, steps to the threshold, normalization parameters and time per step.

Claims checked: the number of normalization parameters is as designed (per normalized layer of C
channels: 2C for BN, LN and GN, 1 + C with a shared weight, 2 with shared parameters, 0 without a norm;
counted on the built networks), and every BN variant reaches the threshold in fewer steps than the net
without a norm (mean over seeds; a net that never reaches it counts as slower). The ranking by final
accuracy is reported, not asserted. ``bnkit run norms`` is the older one-network table of every norm.

Defaults: the Figure 1 sigmoid MLP (784-100-100-100-10, plain SGD, lr 0.5, batch 60, 1,500 steps) and
``tinycnn`` (8/16/32-channel conv3x3-norm-ReLU stages, SGD with momentum 0.9, lr 0.05, batch 32, 600 steps),
both on mnist5k, threshold 90 %, seeds 0 and 1. Time per step is the fastest evaluation interval of the
arm (the least disturbed by other processes); on a shared machine it is indicative only.
"""
from __future__ import annotations

from typing import Dict, List

from .claims import (
    COMMON_DEFAULTS, arm_summary, by_arm, check, fmt_key, make_run, saved_figure, series_mean, style_axes, with_checks,
)
from .train import RunConfig

__all__ = ["DEFAULTS", "make_runs", "summarize", "plot", "BN_VARIANTS"]

BN_VARIANTS = ("bn", "bn-weight", "bn-all")

DEFAULTS: Dict[str, object] = {
    **COMMON_DEFAULTS,
    "archs": ["mlp", "tinycnn"], "norms": ["none", "bn", "bn-weight", "bn-all", "ln", "gn"],
    "mlp": {"hidden": [100, 100, 100], "activation": "sigmoid", "optimizer": "sgd", "lr": 0.5, "batch_size": 60,
            "steps": 1500, "eval_every": 50},
    "tinycnn": {"channels": [8, 16, 32], "activation": "relu", "optimizer": "momentum", "lr": 0.05,
                "batch_size": 32, "steps": 600, "eval_every": 25},
    "threshold": 0.9, "thresholds": [0.8, 0.9], "seeds": [0, 1],
    # None: the per-architecture value above; a value here (e.g. --lr, --steps) applies to both nets
    "steps": None, "lr": None, "batch_size": None, "eval_every": None, "optimizer": None,
}


def _arch_cfg(cfg, arch) -> Dict:
    a = dict(cfg)
    a.update({k: v for k, v in cfg[arch].items() if cfg.get(k) is None})
    a["arch"] = arch
    return a


def _run(cfg, arch, norm, seed) -> RunConfig:
    a = _arch_cfg(cfg, arch)
    opts = {"channels": [int(c) for c in a["channels"]]} if arch != "mlp" else {}
    return make_run(a, f"{arch}-{norm}-s{seed}", f"{arch} {norm}", norm=norm, seed=seed,
                    hidden=a.get("hidden", (100, 100, 100)), options=opts or {"dropout": 0.0})


def make_runs(cfg: Dict) -> List[RunConfig]:
    return [_run(cfg, arch, n, s) for s in cfg["seeds"] for arch in cfg["archs"] for n in cfg["norms"]]


def param_counts(cfg: Dict, input_shape=(1, 28, 28), num_classes=10) -> Dict[str, Dict[str, Dict[str, int]]]:
    """arch -> norm -> {"actual": params in the built net's norm layers, "expected": the design}."""
    from .nets import build_net, expected_norm_params, norm_param_count, normalized_widths
    out: Dict[str, Dict[str, Dict[str, int]]] = {}
    for arch in cfg["archs"]:
        out[arch] = {}
        for n in cfg["norms"]:
            m = build_net(_run(cfg, arch, n, cfg["seeds"][0]), input_shape, num_classes)
            widths = [int(w) for w in (cfg[arch].get("hidden") if arch == "mlp" else cfg[arch]["channels"])]
            out[arch][n] = {"actual": norm_param_count(m), "expected": expected_norm_params(n, widths),
                            "normalized_layers_found": len(normalized_widths(m))}
    return out


def summarize(cfg: Dict, results: Dict[str, Dict]) -> Dict:
    from .data import load_dataset
    summary: Dict[str, object] = {arm: arm_summary(rs) for arm, rs in by_arm(results).items()}
    d = load_dataset(cfg["data"], cfg.get("data_dir"), binarize=bool(cfg.get("binarize")),
                     normalize=cfg.get("normalize", "none"))
    pc = param_counts(cfg, tuple(d.input_shape), d.num_classes)
    summary["norm_params"] = pc
    key = fmt_key(cfg["threshold"])
    checks = {"norm_param_counts_as_designed": check(
        all(v["actual"] == v["expected"] for a in pc.values() for v in a.values()),
        **{f"{arch} {n}": f"{v['actual']} (design {v['expected']})" for arch, a in pc.items() for n, v in a.items()})}
    ranking = {}
    for arch in cfg["archs"]:
        arms = {n: summary.get(f"{arch} {n}") for n in cfg["norms"] if f"{arch} {n}" in summary}
        ranking[arch] = [{"norm": n, "final_acc": s["final_acc"], "steps_to": s["steps_to"].get(key),
                          "ms_per_step": s["ms_per_step"]}
                         for n, s in sorted(arms.items(), key=lambda kv: -(kv[1]["final_acc"] or 0))]
        if "none" in arms:
            base = arms["none"]["steps_to"].get(key)
            per = {n: arms[n]["steps_to"].get(key) for n in BN_VARIANTS if n in arms}
            checks[f"{arch}_every_bn_variant_before_none_at_{key}"] = check(
                bool(per) and all(v is not None and (base is None or v < base) for v in per.values()),
                none_steps=base, **{f"{n}_steps": v for n, v in per.items()})
    summary["ranking"] = ranking
    return with_checks(summary, checks, cfg["threshold"])


_COLORS = {"none": "tab:gray", "bn": "tab:blue", "bn-weight": "tab:cyan", "bn-all": "tab:olive",
           "ln": "tab:purple", "gn": "tab:green", "renorm": "tab:orange", "ghost": "tab:red", "in": "tab:brown"}


def plot(cfg: Dict, results: Dict[str, Dict], summary: Dict, path) -> None:
    archs = list(cfg["archs"])
    with saved_figure(path, len(archs) + 1, figsize=(5.2 * (len(archs) + 1), 4.2)) as (fig, axes):
        groups = by_arm(results)
        for ax, arch in zip(axes, archs):
            for n in cfg["norms"]:
                rs = groups.get(f"{arch} {n}", [])
                for r in rs:  # every seed thin, their mean bold
                    ax.plot(r["steps"], r["test_acc"], color=_COLORS.get(n), lw=0.5, alpha=0.35)
                if rs:
                    st, y = series_mean(rs)
                    ax.plot(st, y, color=_COLORS.get(n), lw=1.8, label=n)
            ax.axhline(float(cfg["threshold"]), color="k", lw=0.6, ls=":")
            ax.set_ylim(0.5, 1.0)
            ax.set_title(f"test accuracy, {arch} on {cfg['data']} (mean of {len(cfg['seeds'])} seeds bold)")
            style_axes([ax], "training steps", legend={"fontsize": 8})
        ax = axes[-1]
        width = 0.8 / max(1, len(archs))
        for i, arch in enumerate(archs):
            vals = [summary["norm_params"][arch][n]["actual"] for n in cfg["norms"]]
            xs = [k + i * width for k in range(len(cfg["norms"]))]
            ax.bar(xs, [max(v, 0.5) for v in vals], width, label=arch)
            for x, v in zip(xs, vals):
                ax.text(x, max(v, 0.5), str(v), ha="center", va="bottom", fontsize=7)
        ax.set_yscale("log")
        ax.set_xticks([k + width * (len(archs) - 1) / 2 for k in range(len(cfg["norms"]))])
        ax.set_xticklabels(cfg["norms"])
        ax.set_title("normalization parameters")
        ax.legend(fontsize=8)
