"""Compute cost: time per training step and per inference batch of the MLP and the small CNN without a
norm, with bnkit's BN, with torch's BN, and (inference) with BN folded into the preceding layers by
``bnkit.fuse`` (bnkit's and torch's), all measured side by side in one process.

Claims: folding removes BN's inference cost -- the fused net's time per inference batch is within noise
of the BN-free net's, for bnkit's and torch's BN -- and the fused net computes the eval-mode BN net's
output (max abs difference reported and required below 1e-4, no BN layer left). "Within noise": the
median over rounds of the *paired* ratio fused / none (both timed in the same round) is within
max(``tol``, the half-width of its 95 % confidence interval) of 1. The training overhead of BN (with BN /
without, bnkit and torch, also paired per round) is reported, not asserted; so is whether the unfused BN
net's inference cost is resolved (its ratio's interval above 1), which says whether the measurement
could have seen a cost at all.

Method: the nets are built from the same seed and their BN running statistics set by 20 training-mode
forwards of real digits; then ``rounds`` rounds, each timing every variant in turn (``train_inner``
SGD steps, ``infer_inner`` eval forwards under ``torch.no_grad``) so that a load change on a shared
machine hits every variant of a round alike. Each variant's time is divided by the BN-free net's time
of the same round, which cancels the load of that moment (the raw medians of a loaded machine swing by
tens of percent from round to round); the median of these paired ratios is compared, with a
distribution-free 95 % interval from its order statistics. Defaults: the Figure 1 MLP
(batch 60) and ``tinycnn`` (batch 32) for training, inference batches of 256, 25 rounds of 10 training
steps and 25 (MLP) or 5 (``tinycnn``) inference batches per variant, one thread.
Nothing is trained for accuracy, so ``runs`` is empty: the raw per-round times are in ``summary.measurements``.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List

import numpy as np

from .claims import COMMON_DEFAULTS, check, saved_figure

__all__ = ["DEFAULTS", "make_runs", "summarize", "plot", "measure"]

DEFAULTS: Dict[str, object] = {
    **COMMON_DEFAULTS,
    "archs": ["mlp", "tinycnn"], "train_batch": {"mlp": 60, "tinycnn": 32}, "infer_batch": 256,
    # inner repetitions per timing: a number, or one per net; the MLP's inference batch takes ~1 ms, so 25
    # of them make a timing long enough (~25 ms) that a scheduler time slice of another process hits the
    # variants of a round about alike
    "rounds": 25, "train_inner": 10, "infer_inner": {"mlp": 25, "tinycnn": 5}, "tol": 0.05, "max_fused_diff": 1e-4,
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


def _inner(cfg: Dict, key: str, arch: str) -> int:
    """``cfg[key]``: one count for every net, or a dict with one per net."""
    v = cfg[key]
    if isinstance(v, dict):
        if arch not in v:
            raise ValueError(f"{key} gives no count for {arch!r}: {v}")
        v = v[arch]
    return max(1, int(v))


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
            tr[v].append(_timer(train_step(v), _inner(cfg, "train_inner", arch)))
        k = r % len(INFER_VARIANTS)
        for v in INFER_VARIANTS[k:] + INFER_VARIANTS[:k]:
            inf[v].append(_timer(infer(v), _inner(cfg, "infer_inner", arch)))
    return {"train_ms": tr, "infer_ms": inf, "fused": diffs, "train_batch": bs, "infer_batch": int(len(x_infer))}


def _stats(xs):
    a = np.asarray(xs, dtype=float)
    med = float(np.median(a))
    q1, q3 = np.percentile(a, [25, 75])
    return {"median": med, "min": float(a.min()), "rel_iqr": float((q3 - q1) / med) if med > 0 else None}


def median_ci(xs, z: float = 1.96):
    """(median, low, high): the median and its distribution-free ~95 % confidence interval, the order
    statistics of ranks n/2 - z sqrt(n)/2 and 1 + n/2 + z sqrt(n)/2 (1-based, rounded outwards)."""
    a = np.sort(np.asarray(xs, dtype=float))
    n = len(a)
    lo = max(1, int(np.floor(n / 2 - z * np.sqrt(n) / 2)))
    hi = min(n, int(np.ceil(1 + n / 2 + z * np.sqrt(n) / 2)))
    return float(np.median(a)), float(a[lo - 1]), float(a[hi - 1])


def paired_ratios(xs, ref):
    """Per-round ratios xs[r] / ref[r] of two variants timed in the same round."""
    return [float(x) / float(r) for x, r in zip(xs, ref)]


def evaluate_cost(cfg: Dict, meas: Dict[str, Dict]) -> Dict:
    """Medians, paired ratios and the checks, from the raw measurements (arch -> measure() output)."""
    out: Dict[str, object] = {"medians": {}, "ratios": {}, "ratio_ci": {}}
    checks = {}
    for arch, m in meas.items():
        tr = {v: _stats(xs) for v, xs in m["train_ms"].items()}
        inf = {v: _stats(xs) for v, xs in m["infer_ms"].items()}
        out["medians"][arch] = {"train_ms_per_step": {v: s["median"] for v, s in tr.items()},
                                "infer_ms_per_batch": {v: s["median"] for v, s in inf.items()}}
        ci = {f"train_{v}_over_none": median_ci(paired_ratios(m["train_ms"][v], m["train_ms"]["none"]))
              for v in TRAIN_VARIANTS if v != "none"}
        ci["train_bnkit_over_torch"] = median_ci(paired_ratios(m["train_ms"]["bnkit"], m["train_ms"]["torch"]))
        ci.update({f"infer_{v}_over_none": median_ci(paired_ratios(m["infer_ms"][v], m["infer_ms"]["none"]))
                   for v in INFER_VARIANTS if v != "none"})
        out["ratio_ci"][arch] = {k: {"median": c[0], "low": c[1], "high": c[2]} for k, c in ci.items()}
        out["ratios"][arch] = {k: c[0] for k, c in ci.items()}
        for v in ("bnkit", "torch"):
            med, lo, hi = ci[f"infer_{v}-fused_over_none"]
            tol = max(float(cfg["tol"]), (hi - lo) / 2)
            umed, ulo, uhi = ci[f"infer_{v}_over_none"]
            diff = m["fused"][v]
            checks[f"{arch}_{v}_fused_inference_within_noise_of_none"] = check(
                abs(med - 1) <= tol and diff <= float(cfg["max_fused_diff"]) and m["fused"][f"{v}_bn_layers_left"] == 0,
                fused_over_none=med, fused_over_none_ci95=[lo, hi], tolerance=tol,
                unfused_over_none=umed, unfused_over_none_ci95=[ulo, uhi],
                # reported: could this measurement see BN's inference cost at all?
                unfused_cost_resolved=bool(ulo > 1.0),
                # the medians of the raw times and the fastest rounds, next to the paired ratios
                fused_over_none_raw_medians=inf[f"{v}-fused"]["median"] / inf["none"]["median"],
                fused_over_none_min=inf[f"{v}-fused"]["min"] / inf["none"]["min"],
                unfused_over_none_min=inf[v]["min"] / inf["none"]["min"],
                max_abs_output_diff=diff, bn_layers_left=m["fused"][f"{v}_bn_layers_left"],
                train_overhead_bn_over_none=ci[f"train_{v}_over_none"][0])
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
    return {"checks": ev["checks"], "medians": ev["medians"], "ratios": ev["ratios"], "ratio_ci": ev["ratio_ci"],
            "measurements": meas,
            "note": "times from one process; on a machine shared with other work they are indicative only"}


def plot(cfg: Dict, results: Dict[str, Dict], summary: Dict, path) -> None:
    """Per net: the per-round paired ratios to the BN-free net (box plots; the load of the moment cancels
    in them), training and inference, with the median's 95 % interval and the tolerance band around 1;
    the raw medians in ms are in the tick labels."""
    archs = list(cfg["archs"])
    title = (f"BN cost: per-round paired ratios, {cfg['rounds']} interleaved rounds, torch threads "
             f"{cfg.get('threads', 1)} (red: median and its 95 % interval; green: +-{float(cfg['tol']):.0%})")
    with saved_figure(path, 2 * len(archs), figsize=(5 * len(archs) * 2 / 1.4, 4.2), title=title,
                      squeeze=False) as (fig, axes):
        meas = summary["measurements"]
        colors = {"bnkit": "tab:blue", "torch": "tab:orange", "bnkit-fused": "tab:cyan", "torch-fused": "tab:olive"}
        for i, arch in enumerate(archs):
            for j, (phase, variants, what) in enumerate((("train_ms", TRAIN_VARIANTS[1:], "training step"),
                                                         ("infer_ms", INFER_VARIANTS[1:], "inference batch"))):
                ax = axes[0][2 * i + j]
                raw = meas[arch][phase]
                data = [paired_ratios(raw[v], raw["none"]) for v in variants]
                bp = ax.boxplot(data, patch_artist=True, widths=0.6)
                for k, (patch, v) in enumerate(zip(bp["boxes"], variants), start=1):
                    patch.set_facecolor(colors[v])
                    patch.set_alpha(0.5)
                    med, lo, hi = median_ci(data[k - 1])
                    ax.errorbar([k + 0.38], [med], yerr=[[med - lo], [hi - med]], fmt="o", color="tab:red", ms=3,
                                capsize=3, lw=1.4)
                tol = float(cfg["tol"])
                ax.axhspan(1 - tol, 1 + tol, color="tab:green", alpha=0.12, lw=0)
                ax.axhline(1.0, color="k", lw=0.8)
                ax.set_xticks(range(1, len(variants) + 1))
                ax.set_xticklabels([f"{v}\n{float(np.median(raw[v])):.3g} ms" for v in variants], fontsize=7)
                bsz = meas[arch]["train_batch"] if phase == "train_ms" else meas[arch]["infer_batch"]
                ax.set_title(f"{arch}: {what} (batch {bsz}) / BN-free\n"
                             f"(BN-free median {float(np.median(raw['none'])):.3g} ms)", fontsize=9)
                hi = max(max(d) for d in data)
                ax.set_ylim(max(0.0, min(min(d) for d in data) - 0.05), min(hi, 3.0) + 0.05)
                ax.grid(alpha=0.3, axis="y")
        axes[0][0].set_ylabel("time / BN-free net's time in the same round")
