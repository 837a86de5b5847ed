"""PreciseBN: the EMA statistics of a net trained with a high learning rate, against statistics
recomputed (``bnkit.recalibrate``) on the current weights from 100, 1,000 and 10,000 training samples, at
every epoch of the same run.

Claim (Wu & Johnson 2021, *Rethinking "Batch" in BatchNorm*, section 3: ResNet-50 on ImageNet with
batch 8192 and EMA momentum 0.9; with large learning rates the EMA lags the fast-changing weights and
its validation accuracy is unstable across epochs, while PreciseBN's is stable; PreciseBN needs only
10^3 to 10^4 samples): over the epochs after ``skip_epochs``, the accuracy with PreciseBN statistics
from the largest sample count is at least that of the EMA (mean over those epochs and seeds, within
``acc_tol``), it changes less from epoch to epoch (mean absolute change), and 1,000 samples are within
``suffice_tol`` of the largest count.

The EMA and the recalibrated statistics are measured on the same weights: the run trains once; at every
evaluation (one per epoch) the extension copies the model, recalibrates the copy on the first N digits
of a permutation of the training set drawn from (seed, step), and evaluates it on the test set, in eval
mode. The sample counts are capped at the training set: mnist5k has 4,000 training digits, so "10,000"
uses all 4,000 (the cap is recorded in ``summary.samples_used``); ``--data mnist+5k --data-dir
../shared/data/mnist`` has 12,000.

Defaults: ``tinycnn`` (8/16/32 channels) on mnist5k, batch 60, SGD with momentum 0.9 at lr 0.2 (a high
learning rate for this net), BN momentum 0.1 (the paper's EMA momentum 0.9 in torch's convention), 20
epochs (66 steps each), seeds 0, 1; recalibration batches of the training batch size.
"""
from __future__ import annotations

import copy
from typing import Dict, List

import torch

from .claims import (
    COMMON_DEFAULTS, arm_summary, by_arm, check, make_run, mean, plot_style, saved_figure, style_axes, with_checks,
)
from .train import RunConfig, RunExtension, evaluate

__all__ = ["DEFAULTS", "OPTIONS", "make_runs", "summarize", "plot", "PreciseEval", "instability"]

DEFAULTS: Dict[str, object] = {
    **COMMON_DEFAULTS,
    "arch": "tinycnn", "channels": [8, 16, 32], "activation": "relu", "optimizer": "momentum", "momentum": 0.9,
    "lr": 0.2, "bn_momentum": 0.1, "batch_size": 60, "epochs": 20, "samples": [100, 1000, 10000],
    "skip_epochs": 5, "acc_tol": 0.0, "suffice_tol": 0.005,
    # steps and eval_every follow from epochs (one evaluation per epoch); kept for the shared tools
    "steps": 0, "eval_every": 0, "threshold": 0.9, "thresholds": [0.9], "seeds": [0, 1],
}

OPTIONS = {
    "arch": {"choices": ("mlp", "tinycnn"), "help": "network"},
    "epochs": {"low": 2, "help": "training epochs (one evaluation per epoch)"},
    "samples": {"low": 1, "unique": True, "help": "PreciseBN sample counts, comma-separated (capped at the training set)"},
    "bn_momentum": {"low": 0, "low_open": True, "high": 1, "help": "the BN layers' EMA momentum (torch convention)"},
    "skip_epochs": {"help": "first epochs left out of the checks"},
    "acc_tol": {"help": "how far below the EMA's mean accuracy PreciseBN's may be"},
    "suffice_tol": {"help": "how far from the largest count's accuracy 1,000 samples may be"},
    "steps": {"help": "not used: the runs train --epochs epochs"},
    "eval_every": {"help": "not used: one evaluation per epoch"},
}


def validate(cfg: Dict, data) -> None:
    if int(cfg["skip_epochs"]) >= int(cfg["epochs"]) - 1:
        raise ValueError(f"--skip-epochs {cfg['skip_epochs']} leaves fewer than 2 of the {cfg['epochs']} epochs")
    if int(cfg["batch_size"]) > len(data.y_train):
        raise ValueError(f"--batch-size {cfg['batch_size']} is larger than the training set ({len(data.y_train)})")


class PreciseEval(RunExtension):
    """At every evaluation: the test accuracy after ``bnkit.recalibrate`` on N training samples (a copy of
    the model; the run's own model and its EMA statistics are untouched), one series per N."""

    def __init__(self, samples=(100, 1000, 10000), batch_size: int = 60):
        self.samples, self.batch = [int(n) for n in samples], int(batch_size)

    def prepare(self, model, cfg, data):
        self.seed = cfg.seed
        return model

    @torch.no_grad()
    def on_eval(self, model, step, data):
        import bnkit
        n = len(data.y_train)
        g = torch.Generator().manual_seed((self.seed + 1) * 104_729 + step)
        perm = torch.randperm(n, generator=g)
        out = {}
        for k in self.samples:
            x = data.x_train[perm[:min(k, n)]]
            m = copy.deepcopy(model)
            bnkit.recalibrate(m, [x[i:i + self.batch] for i in range(0, len(x), self.batch)])
            out[f"test_acc_precise_{k}"] = evaluate(m, data.x_test, data.y_test)[0]
            out[f"precise_samples_{k}"] = len(x)
        return out


def _steps(cfg, n_train: int):
    per = n_train // int(cfg["batch_size"])
    return per * int(cfg["epochs"]), per


def _train_size(cfg) -> int:
    from .data import load_dataset
    return len(load_dataset(cfg["data"], cfg.get("data_dir"), binarize=bool(cfg.get("binarize")),
                            normalize=cfg.get("normalize", "none")).y_train)


def make_runs(cfg: Dict) -> List[RunConfig]:
    steps, per = _steps(cfg, _train_size(cfg))
    opts = {"norm_kw": {"momentum": float(cfg["bn_momentum"])}}
    if cfg["arch"] == "mlp":
        opts["dropout"] = 0.0
    else:
        opts["channels"] = [int(c) for c in cfg["channels"]]
    return [make_run(cfg, f"bn-s{s}", "bn", norm="bn", seed=s, steps=steps, eval_every=per, options=opts,
                     extension="bnkit.experiments.precise:PreciseEval",
                     extension_options={"samples": [int(n) for n in cfg["samples"]],
                                        "batch_size": int(cfg["batch_size"])})
            for s in cfg["seeds"]]


def instability(series) -> float:
    """Mean absolute change between consecutive evaluations."""
    return mean(abs(b - a) for a, b in zip(series, series[1:]))


def _window(r, key, skip):
    """A run's series from the evaluation after epoch ``skip`` on (evaluation 0 is before training)."""
    s = r["test_acc"] if key == "ema" else r["extra"][f"test_acc_precise_{key}"]
    return s[int(skip) + 1:]


def summarize(cfg: Dict, results: Dict[str, Dict]) -> Dict:
    rs = by_arm(results)["bn"]
    summary: Dict[str, object] = {"bn": arm_summary(rs)}
    skip = int(cfg["skip_epochs"])
    sizes = [str(int(n)) for n in cfg["samples"]]
    keys = ["ema"] + sizes
    acc = {k: mean(mean(_window(r, k, skip)) for r in rs) for k in keys}
    unst = {k: mean(instability(_window(r, k, skip)) for r in rs) for k in keys}
    largest = max(sizes, key=int)
    summary["mean_acc_after_skip"] = acc
    summary["instability_after_skip"] = unst
    # the counts actually used (capped at the training set), as the runs recorded them
    summary["samples_used"] = {k: int(rs[0]["extra"][f"precise_samples_{k}"][0]) for k in sizes}
    checks = {
        f"precise_{largest}_at_least_as_accurate_as_ema": check(
            acc[largest] >= acc["ema"] - float(cfg["acc_tol"]), precise=acc[largest], ema=acc["ema"],
            difference=acc[largest] - acc["ema"], tolerance=float(cfg["acc_tol"]), epochs_from=skip + 1),
        f"precise_{largest}_more_stable_than_ema": check(
            unst[largest] < unst["ema"], precise_mean_abs_change=unst[largest], ema_mean_abs_change=unst["ema"]),
    }
    if "1000" in sizes and largest != "1000":
        gap = mean(mean(abs(a - b) for a, b in zip(_window(r, "1000", skip), _window(r, largest, skip))) for r in rs)
        checks[f"precise_1000_within_{float(cfg['suffice_tol']):g}_of_{largest}"] = check(
            gap <= float(cfg["suffice_tol"]), mean_abs_difference=gap, precise_1000=acc["1000"],
            **{f"precise_{largest}": acc[largest]}, **({"precise_100": acc["100"]} if "100" in acc else {}))
    return with_checks(summary, checks, cfg["threshold"])


def plot(cfg: Dict, results: Dict[str, Dict], summary: Dict, path) -> None:
    title = (f"PreciseBN vs EMA: {cfg['arch']} on {cfg['data']}, lr {cfg['lr']:g}, BN momentum "
             f"{cfg['bn_momentum']:g}, {len(cfg['seeds'])} seed(s)")
    with saved_figure(path, 2, figsize=(12, 4.2), title=title) as (fig, axes):
        rs = by_arm(results)["bn"]
        sizes = sorted((str(int(n)) for n in cfg["samples"]), key=int)
        cmap = plot_style().get_cmap("viridis")
        used = summary["samples_used"]
        ax = axes[0]
        for j, r in enumerate(rs):
            ep = list(range(len(r["steps"])))
            ax.plot(ep, r["test_acc"], "-", color="tab:red", lw=1.6 if j == 0 else 0.8,
                    label="EMA statistics" if j == 0 else None)
            for i, k in enumerate(sizes):
                ax.plot(ep, r["extra"][f"test_acc_precise_{k}"], "-",
                        color=cmap(0.15 + 0.7 * i / max(1, len(sizes) - 1)), lw=1.4 if j == 0 else 0.7,
                        label=f"PreciseBN, {used[k]} samples" if j == 0 else None)
        ax.axvline(int(cfg["skip_epochs"]) + 0.5, color="k", lw=0.6, ls=":")
        ax.set_ylabel("test accuracy")
        lo = min(min(r["test_acc"][int(cfg["skip_epochs"]) + 1:]) for r in rs)
        ax.set_ylim(max(0.0, lo - 0.05), 1.0)
        ax.set_title("(a) test accuracy at every epoch (all seeds; checks right of the dotted line)")
        style_axes([ax], "epoch", legend={"fontsize": 7})
        ax = axes[1]
        keys = ["ema"] + sizes
        labels = ["EMA"] + [f"{used[k]}" for k in sizes]
        acc, unst = summary["mean_acc_after_skip"], summary["instability_after_skip"]
        xs = range(len(keys))
        ax.bar([x - 0.2 for x in xs], [100 * acc[k] for k in keys], width=0.4, color="tab:blue",
               label="mean accuracy (%)")
        ax2 = ax.twinx()
        ax2.bar([x + 0.2 for x in xs], [100 * unst[k] for k in keys], width=0.4, color="tab:orange",
                label="mean |change| per epoch (points)")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels)
        ax.set_ylim(max(0, 100 * min(acc.values()) - 5), 100)
        ax.set_ylabel("mean test accuracy (%)")
        ax2.set_ylabel("mean |change| between epochs (points)")
        ax.set_title("(b) accuracy and epoch-to-epoch instability")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        style_axes([ax], "statistics: EMA, or PreciseBN from N samples", legend={
            "handles": h1 + h2, "labels": l1 + l2, "fontsize": 7, "loc": "lower right"})
