"""Norm comparison: the same network trained with each norm of the factory (``none | bn | bn-weight |
bn-all | renorm | ghost | gn | ln | in``), same seeds, same data order, same initial weights.
``in`` needs spatial dimensions, so the MLP skips it (listed in the summary's ``skipped``).
Defaults: the Figure 1 MLP on ``mnist5k`` for 2,000 steps, lr 0.5; ``--arch cnn`` uses the small CNN
(conv-norm-ReLU) instead, where ``in`` (instance norm) is also meaningful.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from .models import NORMS
from .report import save_figure
from .train import RunConfig

DEFAULTS: Dict[str, object] = {
    "data": "mnist5k", "data_dir": None, "arch": "mlp", "steps": 2000, "lr": 0.5, "batch_size": 60,
    "optimizer": "sgd", "init": "default", "binarize": False, "normalize": "none",
    "hidden": [100, 100, 100], "activation": None, "eval_every": 50, "probe_size": 600,
    "threshold": 0.9, "thresholds": [0.8, 0.9, 0.95], "seeds": [0], "threads": 1,
    "norms": [n for n in NORMS],
}


def _usable(cfg) -> Dict[str, str]:
    dim = 2 if cfg["arch"] == "cnn" else 1
    out = {}
    for n in cfg["norms"]:
        if n == "in" and dim == 1:
            out[n] = "instance norm needs spatial dims (use --arch cnn)"
    return out


def make_runs(cfg: Dict) -> List[RunConfig]:
    skip = _usable(cfg)
    act = cfg.get("activation") or ("sigmoid" if cfg["arch"] == "mlp" else "relu")
    hidden = cfg["hidden"] if cfg["arch"] == "mlp" else [32, 64]
    thr = sorted(set(float(t) for t in list(cfg["thresholds"]) + [cfg["threshold"]]))
    return [RunConfig(name=f"{n}-s{s}", variant=n, norm=n, seed=int(s), arch=cfg["arch"], hidden=hidden,
                      activation=act, init=cfg["init"], steps=int(cfg["steps"]), batch_size=int(cfg["batch_size"]),
                      lr=float(cfg["lr"]), optimizer=cfg["optimizer"], eval_every=int(cfg["eval_every"]),
                      probe_size=int(cfg["probe_size"]), thresholds=thr)
            for s in cfg["seeds"] for n in cfg["norms"] if n not in skip]


def summarize(cfg: Dict, results: Dict[str, Dict]) -> Dict:
    out: Dict[str, object] = {"skipped": _usable(cfg)}
    for n in cfg["norms"]:
        rs = [r for r in results.values() if r["norm"] == n]
        if not rs:
            continue
        keys = rs[0]["summary"]["steps_to"].keys()
        st = {k: [r["summary"]["steps_to"][k] for r in rs] for k in keys}
        out[n] = {"final_acc": float(np.mean([r["summary"]["final_acc"] for r in rs])),
                  "best_acc": float(np.mean([r["summary"]["best_acc"] for r in rs])),
                  "steps_to": {k: (None if None in v else float(np.mean(v))) for k, v in st.items()},
                  "drift": {m: float(np.mean([r["summary"]["drift"][m] for r in rs])) for m in ("range", "relative")},
                  "ms_per_step": float(np.mean([r["timing"]["ms_per_step"] for r in rs]))}
    return out


def figure(cfg: Dict, results: Dict[str, Dict], summary: Dict):
    """The comparison figure (a matplotlib Figure): test accuracy and the drift of a typical unit."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), dpi=110)
    cmap = plt.get_cmap("tab10")
    norms = [n for n in cfg["norms"] if n in summary]
    accs = []
    for i, n in enumerate(norms):
        for j, r in enumerate(r for r in results.values() if r["norm"] == n):
            axes[0].plot(r["steps"], r["test_acc"], color=cmap(i % 10), lw=1.5 if j == 0 else 0.8,
                         label=n if j == 0 else None)
            axes[1].plot(r["steps"], r["percentiles"]["p50"], color=cmap(i % 10), lw=1.5 if j == 0 else 0.8,
                         label=n if j == 0 else None)
            accs += list(r["test_acc"])
    # every point stays visible: a norm that trains badly (or step 0's chance level) is shown, not clipped
    lo = min(accs) if accs else 0.5
    axes[0].set_ylim(max(0.0, min(0.5, lo) - 0.02), 1.0)
    axes[0].set_title(f"test accuracy ({cfg['arch']}, {cfg['data']})")
    axes[0].set_ylabel("test accuracy")
    axes[1].set_title("50th percentile of a typical last-layer activation input")
    for ax in axes:
        ax.set_xlabel("training steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return fig


def plot(cfg: Dict, results: Dict[str, Dict], summary: Dict, path) -> None:
    import matplotlib.pyplot as plt
    fig = figure(cfg, results, summary)
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
