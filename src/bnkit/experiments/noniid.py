"""Non-i.i.d. mini-batches: BN and Batch Renorm trained on batches drawn from only a few classes each,
against BN on the usual i.i.d. batches.

Claim (Ioffe 2017, *Batch Renormalization*, section 4.3: Inception trained with mini-batches whose
examples are not independent reaches 67 % top-1 with BN against 78.3 % with i.i.d. batches, and 76.5 %
with Batch Renorm): BN's inference accuracy (eval mode, the moving averages) drops clearly under
non-i.i.d. batches (by at least ``min_drop``), and Batch Renorm's stays close to the i.i.d. baseline (at
most ``max_gap`` below it). During training BN normalizes each example with the statistics of a batch of
``classes_per_batch`` classes, so the net learns features *relative* to the other classes in its batch;
at inference the population statistics replace those batch statistics and the features change. Batch
Renorm's correction ``r, d`` makes the training-mode output the one computed with the moving averages,
so what the net learns is what it computes at inference.

Defaults: ``tinycnn`` (conv3x3-norm-ReLU x 3, 8/16/32 channels) on mnist5k, batches of 60 holding
``classes_per_batch`` = 2 classes with 30 digits each (the classes and the digits drawn afresh at every
step from a generator seeded by (seed, step), with replacement across steps), 1,500 steps of SGD with
momentum 0.9, lr 0.05, seeds 0, 1; Batch Renorm: plain BN for the first 10 % of the steps, then r_max 1
-> 3 and d_max 0 -> 5 until 50 % (the paper's schedule compressed to the run), momentum 0.1 as BN's. The
i.i.d. arm uses the runner's seeded permutation per epoch. A control arm, the same net without a norm on
the same non-i.i.d. batches, shows what those batches cost plain SGD (each step sees two classes only),
apart from any normalization; it is reported, not checked. An arm's accuracy is the mean over seeds of
the mean of its last ``final_window`` evaluations. The runs also record, at every evaluation, the test
accuracy computed with *batch* statistics on non-i.i.d. test batches of the same composition
(``extra.test_acc_noniid_batch_stats``): what the net computes on the batches it was trained on.
"""
from __future__ import annotations

import copy
from typing import Dict, List

import torch

from .claims import (
    COMMON_DEFAULTS, arm_summary, by_arm, check, make_run, mean, present_arms, saved_figure, series_mean, style_axes,
    with_checks,
)
from .train import RunConfig, RunExtension

__all__ = ["DEFAULTS", "OPTIONS", "make_runs", "summarize", "plot", "validate", "ClassBatches", "class_batch",
           "ARMS", "arm_accuracy"]

# (arm label, norm, sampling)
ARMS = (("bn iid", "bn", "iid"), ("bn non-iid", "bn", "noniid"), ("renorm non-iid", "renorm", "noniid"),
        ("none non-iid", "none", "noniid"))  # the control: what non-i.i.d. batches cost SGD itself

DEFAULTS: Dict[str, object] = {
    **COMMON_DEFAULTS,
    "arch": "tinycnn", "channels": [8, 16, 32], "activation": "relu", "optimizer": "momentum", "momentum": 0.9,
    "lr": 0.05, "batch_size": 60, "steps": 1500, "eval_every": 100, "classes_per_batch": 2,
    "renorm_momentum": 0.1, "renorm_warmup_frac": 0.1, "renorm_ramp_frac": 0.5, "renorm_r_max": 3.0,
    "renorm_d_max": 5.0, "final_window": 3, "min_drop": 0.05, "max_gap": 0.02,
    "threshold": 0.9, "thresholds": [0.9], "seeds": [0, 1],
}

OPTIONS = {
    "arch": {"choices": ("mlp", "tinycnn"), "help": "network"},
    "classes_per_batch": {"low": 1, "help": "classes in every non-i.i.d. batch (batch_size must be a multiple)"},
    "final_window": {"low": 1, "help": "evaluations at the end averaged into an arm's accuracy"},
    "min_drop": {"help": "BN's accuracy drop (i.i.d. - non-i.i.d.) the first check requires"},
    "max_gap": {"help": "how far below the i.i.d. baseline Batch Renorm may end"},
}


def validate(cfg: Dict, data) -> None:
    k, bs = int(cfg["classes_per_batch"]), int(cfg["batch_size"])
    if k > data.num_classes:
        raise ValueError(f"--classes-per-batch {k} is more than the {data.num_classes} classes of {data.name}")
    if bs % k:
        raise ValueError(f"--batch-size {bs} is not a multiple of --classes-per-batch {k}")


def class_batch(y: torch.Tensor, batch_size: int, classes: int, seed: int, step: int,
                pools=None) -> torch.Tensor:
    """The indices of one non-i.i.d. batch: ``classes`` classes drawn without replacement, then
    ``batch_size / classes`` examples of each drawn uniformly with replacement; a pure function of
    ``(seed, step)`` (and the labels)."""
    if pools is None:
        pools = class_pools(y)
    g = torch.Generator().manual_seed((int(seed) + 1) * 15_485_863 + int(step))
    avail = [c for c, p in enumerate(pools) if len(p)]
    chosen = [avail[i] for i in torch.randperm(len(avail), generator=g)[:classes].tolist()]
    per = batch_size // classes
    return torch.cat([pools[c][torch.randint(len(pools[c]), (per,), generator=g)] for c in chosen])


def class_pools(y: torch.Tensor) -> List[torch.Tensor]:
    return [torch.nonzero(y == c).flatten() for c in range(int(y.max()) + 1)]


class ClassBatches(RunExtension):
    """Trains on :func:`class_batch` batches (``classes`` per batch) and records, at every evaluation, the
    test accuracy with batch statistics on test batches of the same composition."""

    def __init__(self, classes: int = 2, eval_batches: int = 0):
        self.classes, self.eval_batches = int(classes), int(eval_batches)
        self._pools = None

    def prepare(self, model, cfg, data):
        self.seed, self.bs = cfg.seed, cfg.batch_size
        return model

    def batch_indices(self, step, default, y_train):
        if self._pools is None or self._pools[0] is not y_train:
            self._pools = (y_train, class_pools(y_train))
        return class_batch(y_train, len(default), self.classes, self.seed, step, self._pools[1])

    @torch.no_grad()
    def on_eval(self, model, step, data):
        return {"test_acc_noniid_batch_stats": batch_stats_accuracy(model, data.x_test, data.y_test, self.bs,
                                                                     self.classes, self.eval_batches)}


@torch.no_grad()
def batch_stats_accuracy(model, x, y, batch_size: int, classes: int, n_batches: int = 0) -> float:
    """Accuracy of ``model`` in training mode (each batch normalized with its own statistics) on
    non-i.i.d. test batches (:func:`class_batch`, fixed seed), on a copy (the model's buffers are kept)."""
    m = copy.deepcopy(model).train()
    pools = class_pools(y)
    n = n_batches or max(1, len(y) // batch_size)
    correct = total = 0
    for i in range(n):
        idx = class_batch(y, batch_size, classes, 10_007, i, pools)
        correct += int((m(x[idx]).argmax(1) == y[idx]).sum())
        total += len(idx)
    return correct / total


def _norm_kw(cfg, norm, steps):
    if norm != "renorm":
        return {}
    w = int(float(cfg["renorm_warmup_frac"]) * steps)
    ramp = max(w + 1, int(float(cfg["renorm_ramp_frac"]) * steps))
    return {"momentum": float(cfg["renorm_momentum"]), "warmup_steps": w, "r_max_steps": ramp,
            "d_max_steps": ramp, "r_max": float(cfg["renorm_r_max"]), "d_max": float(cfg["renorm_d_max"])}


def _name(arm: str, seed: int) -> str:
    return f"{arm.replace(' ', '-')}-s{seed}"


def make_runs(cfg: Dict) -> List[RunConfig]:
    runs = []
    steps = int(cfg["steps"])
    for seed in cfg["seeds"]:
        for arm, norm, sampling in ARMS:
            kw = _norm_kw(cfg, norm, steps)
            opts = {"norm_kw": kw} if kw else {}
            if cfg["arch"] != "mlp":
                opts["channels"] = [int(c) for c in cfg["channels"]]
            else:
                opts.setdefault("dropout", 0.0)
            ext = {}
            if sampling == "noniid":
                ext = dict(extension="bnkit.experiments.noniid:ClassBatches",
                           extension_options={"classes": int(cfg["classes_per_batch"])})
            runs.append(make_run(cfg, _name(arm, seed), arm, norm=norm, seed=seed, options=opts, **ext))
    return runs


def arm_accuracy(rs, window: int) -> float:
    """Mean over seeds of the mean test accuracy over the last ``window`` evaluations."""
    return mean(mean(r["test_acc"][-int(window):]) for r in rs)


def summarize(cfg: Dict, results: Dict[str, Dict]) -> Dict:
    groups = by_arm(results)
    summary: Dict[str, object] = {arm: arm_summary(rs) for arm, rs in groups.items()}
    w = int(cfg["final_window"])
    acc = {arm: arm_accuracy(groups[arm], w) for arm, _, _ in ARMS if arm in groups}
    bstat = {arm: mean(r["extra"]["test_acc_noniid_batch_stats"][-1] for r in groups[arm])
             for arm, _, s in ARMS if s == "noniid" and arm in groups}
    summary["accuracy"] = acc
    summary["accuracy_with_noniid_batch_statistics"] = bstat
    control = acc.get("none non-iid")
    iid, bn, rn = acc["bn iid"], acc["bn non-iid"], acc["renorm non-iid"]
    drop = iid - bn
    return with_checks(summary, {
        f"bn_noniid_drop_ge_{float(cfg['min_drop']):g}": check(
            drop >= float(cfg["min_drop"]), bn_iid=iid, bn_noniid=bn, drop=drop,
            bn_noniid_with_batch_statistics=bstat.get("bn non-iid"), no_norm_noniid=control, final_window=w),
        f"renorm_noniid_within_{float(cfg['max_gap']):g}_of_iid": check(
            iid - rn <= float(cfg["max_gap"]), bn_iid=iid, renorm_noniid=rn, gap=iid - rn,
            fraction_of_bn_drop_recovered=(rn - bn) / drop if drop > 0 else None),
    }, cfg["threshold"])


_COLORS = {"bn iid": "tab:blue", "bn non-iid": "tab:red", "renorm non-iid": "tab:orange", "none non-iid": "tab:gray"}


def plot(cfg: Dict, results: Dict[str, Dict], summary: Dict, path) -> None:
    title = (f"non-i.i.d. batches ({cfg['classes_per_batch']} classes per batch of {cfg['batch_size']}): "
             f"{cfg['arch']} on {cfg['data']}, {len(cfg['seeds'])} seed(s)")
    with saved_figure(path, 2, figsize=(12, 4.2), title=title) as (fig, axes):
        ax = axes[0]
        for arm, rs in present_arms(results, [a for a, _, _ in ARMS]):
            for r in rs:
                ax.plot(r["steps"], r["test_acc"], color=_COLORS[arm], lw=0.6, alpha=0.5)
            st, y = series_mean(rs)
            ax.plot(st, y, color=_COLORS[arm], lw=1.8, label=arm)
        ax.set_title("(a) test accuracy, eval mode (moving averages)")
        ax.set_xlabel("training steps")
        ax.set_ylim(0, 1)
        ax.legend()
        ax = axes[1]
        arms = [a for a, _, _ in ARMS if a in summary["accuracy"]]
        xs = range(len(arms))
        ax.bar(xs, [100 * summary["accuracy"][a] for a in arms], color=[_COLORS[a] for a in arms],
               label="eval mode (moving averages)")
        bs = summary["accuracy_with_noniid_batch_statistics"]
        ax.scatter([i for i, a in enumerate(arms) if a in bs], [100 * bs[a] for a in arms if a in bs], marker="D",
                   color="k", zorder=3, label="train mode on non-i.i.d. test batches")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(arms)
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"(b) final accuracy (mean of the last {cfg['final_window']} evaluations)")
        ax.legend(fontsize=8, loc="lower right")
        style_axes(axes)
