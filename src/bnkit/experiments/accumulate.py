"""Gradient accumulation and BN statistics: one large batch of k x b examples per optimizer step, against
the same k x b examples as k accumulated micro-batches of b, with plain BN (k running updates per step)
and inside ``bnkit.accumulate_stats`` (one update per step, from the exact merge of the micro-batches'
moments).

Claim (``bnkit.accumulate_stats``): with it, the running statistics are the large batch's; without it
they are not: plain BN updates them k times per step from k smaller batches, an average k times shorter
in steps (momentum 1 - (1 - m)^k per step), with ``num_batches_tracked`` counting micro-batches.

What is compared, and why this way: the arms train different weights (the large batch normalizes over
k x b examples, the micro-batches over b), so their running statistics cannot be compared across runs.
Instead every run carries a *reference*: a shadow copy of the net that, at every step, takes the run's
current weights and makes one training-mode forward of the step's whole k x b batch, so its buffers are
what the large-batch update would give on exactly these weights and examples. At every evaluation the
run records, per BN layer, the distance of its running statistics to the reference's: the mean over
channels of ``|mu - mu_ref| / sqrt(var_ref + eps)`` and of ``|log((var + eps) / (var_ref + eps))|``.
In the large-batch arm the reference *is* the arm's own update (the method's oracle: distance 0). The
plain and the accumulating arm see the same micro-batches and compute the same gradients (normalization
is per micro-batch in both), so they train bit-identical weights (checked, from a checksum recorded at
every evaluation) and differ only in their statistics. In the first BN layer the accumulated statistics
are the reference's up to rounding (the same inputs); deeper layers see inputs normalized per micro-batch
instead of over the whole batch, a small difference of their own.

Checks: the large-batch arm's distance is 0 (up to ``exact_tol``); the accumulating arm's first layer
matches up to ``exact_tol``, and at every layer its distance is at most ``max_ratio`` times the plain
arm's (mean over the evaluations after step 0 and the seeds); the plain and accumulating arms' weights
are identical at every evaluation.

Defaults: ``tinycnn`` (8/16/32 channels) on mnist5k, k = 4 micro-batches of b = 16 (large batch 64),
SGD with momentum 0.9, lr 0.05, BN momentum 0.1, 600 steps, an evaluation every 50, seeds 0, 1.
"""
from __future__ import annotations

import copy
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F

from .claims import (
    COMMON_DEFAULTS, arm_summary, by_arm, check, make_run, mean, saved_figure, series_mean, style_axes, with_checks,
)
from .train import RunConfig, RunExtension

__all__ = ["DEFAULTS", "OPTIONS", "make_runs", "summarize", "plot", "Accumulate", "ARMS", "stat_distance"]

ARMS = ("large", "plain", "accumulate")

DEFAULTS: Dict[str, object] = {
    **COMMON_DEFAULTS,
    "arch": "tinycnn", "channels": [8, 16, 32], "activation": "relu", "optimizer": "momentum", "momentum": 0.9,
    "lr": 0.05, "micro_batch": 16, "k": 4, "bn_momentum": 0.1, "steps": 600, "eval_every": 50,
    "exact_tol": 1e-4, "max_ratio": 0.2,
    "batch_size": 0,  # k x micro_batch (set from those); kept for the shared tools
    "threshold": 0.9, "thresholds": [0.9], "seeds": [0, 1],
}

OPTIONS = {
    "arch": {"choices": ("mlp", "tinycnn"), "help": "network"},
    "micro_batch": {"low": 2, "help": "examples per micro-batch (b)"},
    "k": {"low": 2, "help": "micro-batches per optimizer step (the large batch is k x b)"},
    "bn_momentum": {"low": 0, "low_open": True, "high": 1, "help": "the BN layers' momentum"},
    "exact_tol": {"help": "distance counted as equal (rounding)"},
    "max_ratio": {"help": "the accumulating arm's distance at most this times the plain arm's, per layer"},
    "batch_size": {"help": "not used: every arm's batch is k x micro_batch"},
}


def validate(cfg: Dict, data) -> None:
    big = int(cfg["k"]) * int(cfg["micro_batch"])
    if big > len(data.y_train):
        raise ValueError(f"k x micro_batch = {big} is larger than the training set ({len(data.y_train)})")


def _bn(model):
    from bnkit.tools._bnlayers import bn_layers
    return [m for _, m in bn_layers(model)]


@torch.no_grad()
def stat_distance(m, ref) -> Dict[str, float]:
    """Distance of BN layer ``m``'s running statistics to ``ref``'s (see the module docstring)."""
    eps = float(getattr(m, "eps", 1e-5))
    mu, var = m.running_mean.double(), m.running_var.double()
    mu_r, var_r = ref.running_mean.double(), ref.running_var.double()
    return {"mean": float(((mu - mu_r).abs() / (var_r + eps).sqrt()).mean()),
            "logvar": float(((var + eps) / (var_r + eps)).log().abs().mean())}


class Accumulate(RunExtension):
    """``mode``: ``"large"`` (one forward of the whole batch), ``"plain"`` (k micro-batches, gradients
    accumulated) or ``"accumulate"`` (the same inside ``bnkit.accumulate_stats``); every mode also keeps
    the large-batch reference statistics on the run's own weights."""

    def __init__(self, mode: str = "plain", k: int = 4):
        if mode not in ARMS:
            raise ValueError(f"mode must be one of {ARMS}, got {mode!r}")
        self.mode, self.k = mode, int(k)

    def prepare(self, model, cfg, data):
        self.ref = copy.deepcopy(model)
        return model

    def train_step(self, model, x, y, opt):
        import bnkit
        with torch.no_grad():  # the reference: the large batch's update on the weights of this step
            for p, q in zip(self.ref.parameters(), model.parameters()):
                p.copy_(q)
            self.ref.train()
            self.ref(x)
        if self.mode == "large":
            return super().train_step(model, x, y, opt)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        ctx = bnkit.accumulate_stats(model) if self.mode == "accumulate" else _null()
        with ctx:
            for xs, ys in zip(x.chunk(self.k), y.chunk(self.k)):
                loss = F.cross_entropy(model(xs), ys) / self.k
                loss.backward()
                total += float(loss.detach())
        opt.step()
        return torch.tensor(total)

    @torch.no_grad()
    def on_eval(self, model, step, data):
        out = {}
        for i, (m, r) in enumerate(zip(_bn(model), _bn(self.ref))):
            d = stat_distance(m, r)
            out[f"mean_dist/{i}"], out[f"logvar_dist/{i}"] = d["mean"], d["logvar"]
            out[f"num_batches_tracked/{i}"] = float(m.num_batches_tracked)
        out["weight_checksum"] = float(sum(p.detach().double().abs().sum() for p in model.parameters()))
        return out

    def state_dict(self):
        return {"ref": {k: v.clone() for k, v in self.ref.state_dict().items()}}

    def load_state_dict(self, state):
        if state:
            self.ref.load_state_dict(state["ref"])


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def make_runs(cfg: Dict) -> List[RunConfig]:
    k, b = int(cfg["k"]), int(cfg["micro_batch"])
    opts = {"norm_kw": {"momentum": float(cfg["bn_momentum"])}}
    if cfg["arch"] == "mlp":
        opts["dropout"] = 0.0
    else:
        opts["channels"] = [int(c) for c in cfg["channels"]]
    return [make_run(cfg, f"{arm}-s{s}", arm, norm="bn", seed=s, batch_size=k * b, options=opts,
                     extension="bnkit.experiments.accumulate:Accumulate",
                     extension_options={"mode": arm, "k": k})
            for s in cfg["seeds"] for arm in ARMS]


def _layers(r) -> List[int]:
    return sorted(int(key.split("/")[1]) for key in r["extra"] if key.startswith("mean_dist/"))


def distances(results: Dict[str, Dict]) -> Dict[str, Dict[str, List[float]]]:
    """arm -> "mean"/"logvar" -> per layer, the mean over the evaluations after step 0 and the seeds."""
    out = {}
    for arm, rs in by_arm(results).items():
        layers = _layers(rs[0])
        out[arm] = {w: [mean(mean(r["extra"][f"{w}_dist/{i}"][1:]) for r in rs) for i in layers]
                    for w in ("mean", "logvar")}
        out[arm]["max_over_evaluations"] = [max(max(r["extra"][f"{w}_dist/{i}"][1:]) for r in rs
                                                for w in ("mean", "logvar")) for i in layers]
    return out


def summarize(cfg: Dict, results: Dict[str, Dict]) -> Dict:
    groups = by_arm(results)
    summary: Dict[str, object] = {arm: arm_summary(rs) for arm, rs in groups.items()}
    dist = distances(results)
    summary["distance_to_large_batch_statistics"] = dist
    summary["num_batches_tracked_final"] = {arm: rs[0]["extra"]["num_batches_tracked/0"][-1]
                                            for arm, rs in groups.items()}
    tol, ratio = float(cfg["exact_tol"]), float(cfg["max_ratio"])
    acc, plain, large = dist["accumulate"], dist["plain"], dist["large"]
    per_layer = [max(a / p if p > 0 else (0.0 if a == 0 else float("inf"))
                     for a, p in ((acc[w][i], plain[w][i]) for w in ("mean", "logvar")))
                 for i in range(len(acc["mean"]))]
    same_w = all(p["extra"]["weight_checksum"] == a["extra"]["weight_checksum"]
                 for p, a in zip(groups["plain"], groups["accumulate"]))
    return with_checks(summary, {
        "large_batch_arm_equals_its_reference": check(
            max(large["max_over_evaluations"]) <= tol, max_distance=max(large["max_over_evaluations"]), tolerance=tol),
        "accumulate_first_layer_matches_large_batch": check(
            acc["max_over_evaluations"][0] <= tol, max_distance=acc["max_over_evaluations"][0],
            plain_max_distance=plain["max_over_evaluations"][0], tolerance=tol),
        f"accumulate_distance_le_{ratio:g}x_plain_every_layer": check(
            all(x <= ratio for x in per_layer), ratio_per_layer=per_layer, accumulate_mean=acc["mean"],
            plain_mean=plain["mean"], accumulate_logvar=acc["logvar"], plain_logvar=plain["logvar"]),
        "plain_and_accumulate_train_identical_weights": check(
            same_w, num_batches_tracked=summary["num_batches_tracked_final"]),
    }, cfg["threshold"])


_COLORS = {"large": "tab:gray", "plain": "tab:red", "accumulate": "tab:blue"}


def plot(cfg: Dict, results: Dict[str, Dict], summary: Dict, path) -> None:
    title = (f"k = {cfg['k']} micro-batches of {cfg['micro_batch']} vs one batch of "
             f"{int(cfg['k']) * int(cfg['micro_batch'])}: {cfg['arch']} on {cfg['data']}, {len(cfg['seeds'])} seed(s)")
    with saved_figure(path, 3, figsize=(15, 4.2), title=title) as (fig, axes):
        groups = by_arm(results)
        layers = _layers(next(iter(results.values())))
        ax = axes[0]
        for arm in ("plain", "accumulate"):
            for i in layers:
                st, y = series_mean(_as_series(groups[arm], f"mean_dist/{i}"))
                ax.plot(st[1:], np.maximum(y[1:], 1e-12), color=_COLORS[arm], lw=1.6 - 0.3 * i,
                        ls=["-", "--", ":", "-."][i % 4], label=f"{arm}, layer {i + 1}")
        ax.set_yscale("log")
        ax.set_xlabel("training steps")
        ax.set_title("(a) |mean - mean_ref| / std_ref (mean over channels; 0 drawn at 1e-12)")
        ax.legend(fontsize=7)
        ax = axes[1]
        d = summary["distance_to_large_batch_statistics"]
        w = 0.38
        for j, arm in enumerate(("plain", "accumulate")):
            ax.bar([i + (j - 0.5) * w for i in layers], [max(v, 1e-12) for v in d[arm]["logvar"]], width=w,
                   color=_COLORS[arm], label=arm)
        ax.set_yscale("log")
        ax.set_xticks(layers)
        ax.set_xticklabels([f"layer {i + 1}" for i in layers])
        ax.set_title("(b) |log var / var_ref| (mean over evaluations)")
        ax.legend(fontsize=8)
        ax = axes[2]
        for arm in ARMS:
            st, y = series_mean(groups[arm])
            ax.plot(st, y, color=_COLORS[arm], label=f"{arm} (eval mode)")
        ax.set_ylim(0, 1)
        ax.set_xlabel("training steps")
        ax.set_title("(c) test accuracy")
        ax.legend(fontsize=8)
        style_axes(axes)


def _as_series(rs, key):
    return [{"steps": r["steps"], "test_acc": r["extra"][key]} for r in rs]
