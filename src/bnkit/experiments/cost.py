"""Compute cost: time per training step and per inference batch of the MLP and the small CNN without a
norm, with bnkit's BN, with torch's BN, and (inference) with BN folded into the preceding layers by
``bnkit.fuse`` (bnkit's and torch's), all measured side by side in one process.

Claims: folding removes BN's inference cost -- the fused net's time per inference batch is within noise
of the BN-free net's (|fused / none - 1| at most max(``tol``, 2 x the relative interquartile range of the
BN-free net's rounds)), for bnkit's and torch's BN -- and the fused net computes the eval-mode BN net's
output (max abs difference reported and required below 1e-4). The training overhead of BN (with BN /
without, bnkit and torch) is reported, not asserted.

Method: the nets are built from the same seed and their BN running statistics set by 20 training-mode
forwards of real digits; then ``rounds`` rounds, each timing every variant in turn (``train_inner``
SGD steps, ``infer_inner`` eval forwards under ``torch.no_grad``) so that a load change on a shared
machine hits every variant alike; the medians over rounds are compared. Defaults: the Figure 1 MLP
(batch 60) and ``tinycnn`` (batch 32) for training, inference batches of 256, 25 rounds, one thread.
Nothing is trained for accuracy, so ``runs`` is empty: the raw per-round times are in ``summary.measurements``.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List

import numpy as np

from .claims import COMMON_DEFAULTS, check, plot_style

__all__ = ["DEFAULTS", "make_runs", "summarize", "plot", "measure"]

DEFAULTS: Dict[str, object] = {
    **COMMON_DEFAULTS,
    "archs": ["mlp", "tinycnn"], "train_batch": {"mlp": 60, "tinycnn": 32}, "infer_batch": 256,
    "rounds": 25, "train_inner": 10, "infer_inner": 5, "tol": 0.05, "max_fused_diff": 1e-4,
    "seeds": [0], "steps": 0, "lr": 0.05, "batch_size": 0, "eval_every": 0, "threshold": None,
}

TRAIN_VARIANTS = ("none", "bnkit", "torch")
INFER_VARIANTS = ("none", "bnkit", "torch", "bnkit-fused", "torch-fused")


def make_runs(cfg: Dict) -> List:
    return []  # nothing is trained for accuracy; summarize() does the measuring


def _nets(cfg, arch, input_shape, num_classes):
    from .nets import build_net
    from .train import RunConfig
    hidden = (100, 100, 100)
    act = "sigmoid" if arch == "mlp" else "relu"
    opts = {"dropout": 0.0} if arch == "mlp" else {"channels": [8, 16, 32]}
    return {v: build_net(RunConfig(name=v, arch=arch, norm={"none": "none", "bnkit": "bn", "torch": "torch-bn"}[v],
                                   hidden=hidden, activation=act, seed=int(cfg["seeds"][0]), options=opts),
                         input_shape, num_classes) for v in TRAIN_VARIANTS}


def _timer(fn: Callable[[], None], inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return 1000.0 * (time.perf_counter() - t0) / inner


def measure(cfg: Dict, arch: str, x_train, y_train, x_infer) -> Dict:
    """Raw per-round times (ms) of every variant, plus the fused nets' output differences."""
    import torch
    import torch.nn.functional as F

    import bnkit
    nets = _nets(cfg, arch, tuple(x_train.shape[1:]), 10)
    with torch.no_grad():  # running statistics from real data, so the folds are not trivial
        for m in nets.values():
            m.train()
            for i in range(20):
                m(x_train[(i * 50) % len(x_train):][:50])
    eval_nets = {}
    for v, m in nets.items():
        e = __import__("copy").deepcopy(m).eval()
        eval_nets[v] = e
    fused, diffs = {}, {}
    for v in ("bnkit", "torch"):
        f = bnkit.fuse(eval_nets[v], example_inputs=x_infer[:2])
        f.eval()
        with torch.no_grad():
            diffs[v] = float((f(x_infer) - eval_nets[v](x_infer)).abs().max())
        fused[f"{v}-fused"] = f
        n_bn = sum(1 for mod in f.modules() if isinstance(mod, torch.nn.modules.batchnorm._NormBase)
                   or type(mod).__name__.startswith("BatchNorm"))
        diffs[f"{v}_bn_layers_left"] = n_bn
    infer_nets = {**eval_nets, **fused}
    bs = int(cfg["train_batch"][arch])
    opts = {v: torch.optim.SGD(m.parameters(), lr=float(cfg["lr"])) for v, m in nets.items()}
    xb, yb = x_train[:bs], y_train[:bs]

    def train_step(v):
        m, opt = nets[v], opts[v]

        def f():
            loss = F.cross_entropy(m(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return f

    def infer(v):
        m = infer_nets[v]

        def f():
            with torch.no_grad():
                m(x_infer)
        return f

    tr = {v: [] for v in TRAIN_VARIANTS}
    inf = {v: [] for v in INFER_VARIANTS}
    for v in TRAIN_VARIANTS:  # warm-up
        _timer(train_step(v), 2)
    for v in INFER_VARIANTS:
        _timer(infer(v), 2)
    for r in range(int(cfg["rounds"])):
        # rotate the order every round: no variant always runs first after a pause
        order_t = TRAIN_VARIANTS[r % 3:] + TRAIN_VARIANTS[:r % 3]
        for v in order_t:
            tr[v].append(_timer(train_step(v), int(cfg["train_inner"])))
        k = r % len(INFER_VARIANTS)
        for v in INFER_VARIANTS[k:] + INFER_VARIANTS[:k]:
            inf[v].append(_timer(infer(v), int(cfg["infer_inner"])))
    return {"train_ms": tr, "infer_ms": inf, "fused": diffs, "train_batch": bs, "infer_batch": int(len(x_infer))}


def _stats(xs):
    a = np.asarray(xs, dtype=float)
    med = float(np.median(a))
    q1, q3 = np.percentile(a, [25, 75])
    return {"median": med, "min": float(a.min()), "rel_iqr": float((q3 - q1) / med) if med > 0 else None}


def evaluate_cost(cfg: Dict, meas: Dict[str, Dict]) -> Dict:
    """Medians, ratios and the checks, from the raw measurements (arch -> measure() output)."""
    out: Dict[str, object] = {"medians": {}, "ratios": {}}
    checks = {}
    for arch, m in meas.items():
        tr = {v: _stats(xs) for v, xs in m["train_ms"].items()}
        inf = {v: _stats(xs) for v, xs in m["infer_ms"].items()}
        out["medians"][arch] = {"train_ms_per_step": {v: s["median"] for v, s in tr.items()},
                                "infer_ms_per_batch": {v: s["median"] for v, s in inf.items()}}
        none_t, none_i = tr["none"]["median"], inf["none"]["median"]
        out["ratios"][arch] = {
            "train_bnkit_over_none": tr["bnkit"]["median"] / none_t, "train_torch_over_none": tr["torch"]["median"] / none_t,
            "train_bnkit_over_torch": tr["bnkit"]["median"] / tr["torch"]["median"],
            **{f"infer_{v}_over_none": inf[v]["median"] / none_i for v in INFER_VARIANTS if v != "none"}}
        tol = max(float(cfg["tol"]), 2 * (inf["none"]["rel_iqr"] or 0.0))
        for v in ("bnkit", "torch"):
            ratio = inf[f"{v}-fused"]["median"] / none_i
            diff = m["fused"][v]
            checks[f"{arch}_{v}_fused_inference_within_noise_of_none"] = check(
                abs(ratio - 1) <= tol and diff <= float(cfg["max_fused_diff"]) and m["fused"][f"{v}_bn_layers_left"] == 0,
                fused_over_none=ratio, tolerance=tol, unfused_over_none=inf[v]["median"] / none_i,
                # the fastest rounds (least disturbed by other processes), reported next to the medians
                fused_over_none_min=inf[f"{v}-fused"]["min"] / inf["none"]["min"],
                unfused_over_none_min=inf[v]["min"] / inf["none"]["min"],
                max_abs_output_diff=diff, bn_layers_left=m["fused"][f"{v}_bn_layers_left"],
                train_overhead_bn_over_none=tr[v]["median"] / none_t)
    out["checks"] = checks
    return out


def summarize(cfg: Dict, results: Dict[str, Dict]) -> Dict:
    import torch

    from .data import load_dataset
    d = load_dataset(cfg["data"], cfg.get("data_dir"), binarize=bool(cfg.get("binarize")),
                     normalize=cfg.get("normalize", "none"))
    torch.manual_seed(0)
    meas = {arch: measure(cfg, arch, d.x_train, d.y_train, d.x_test[: int(cfg["infer_batch"])])
            for arch in cfg["archs"]}
    ev = evaluate_cost(cfg, meas)
    return {"checks": ev["checks"], "medians": ev["medians"], "ratios": ev["ratios"], "measurements": meas,
            "note": "times from one process; on a machine shared with other work they are indicative only"}


def plot(cfg: Dict, results: Dict[str, Dict], summary: Dict, path) -> None:
    plt = plot_style()
    archs = list(cfg["archs"])
    fig, axes = plt.subplots(1, 2 * len(archs), figsize=(5 * len(archs) * 2 / 1.4, 4.0), dpi=110, squeeze=False)
    meas = summary["measurements"]
    colors = {"none": "tab:gray", "bnkit": "tab:blue", "torch": "tab:orange", "bnkit-fused": "tab:cyan",
              "torch-fused": "tab:olive"}
    for i, arch in enumerate(archs):
        for j, (phase, variants, unit) in enumerate((("train_ms", TRAIN_VARIANTS, "ms / training step"),
                                                     ("infer_ms", INFER_VARIANTS, "ms / inference batch"))):
            ax = axes[0][2 * i + j]
            data = [meas[arch][phase][v] for v in variants]
            bp = ax.boxplot(data, patch_artist=True, widths=0.6)
            for patch, v in zip(bp["boxes"], variants):
                patch.set_facecolor(colors[v])
                patch.set_alpha(0.6)
            ax.set_xticks(range(1, len(variants) + 1))
            ax.set_xticklabels(variants, rotation=20, fontsize=8)
            bsz = meas[arch]["train_batch"] if phase == "train_ms" else meas[arch]["infer_batch"]
            ax.set_title(f"{arch}: {unit} (batch {bsz})", fontsize=9)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"BN cost, {cfg['rounds']} interleaved rounds, torch threads {cfg.get('threads', 1)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
