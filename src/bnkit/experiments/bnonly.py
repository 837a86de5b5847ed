"""Training only BatchNorm: a network whose other weights stay at their random initialization, trained
three ways -- only BN's gamma and beta, as many randomly chosen other parameters, or only the output layer.

Claim (Frankle, Schwab & Morcos 2021, *Training BatchNorm and Only BatchNorm*, ICLR; the arXiv version
2020): with every other weight frozen at its random initialization, training only the BN affine
parameters reaches far higher accuracy than training the same number of randomly chosen other
parameters (the paper's "two random parameters per channel"), and than training the output layer only
(the abstract: 82 % on CIFAR-10 and 32 % top-5 on ImageNet with BN-only training of very deep ResNets),
and BN-only training makes a sizable fraction of gamma close to zero, which switches those channels
off (about a third). Checks: BN-only's final test accuracy exceeds
both other arms' by at least ``min_margin``, and its fraction of ``|gamma| < gamma_tol`` is at least
``min_dead_frac``.

Arms: ``bn-only`` trains ``bnkit.bn_parameters(model)`` (every BN weight and bias); ``random`` trains
exactly as many entries of the non-BN parameters (the conv/linear weights and the output layer),
chosen uniformly without replacement by a generator seeded by the run's seed, by masking the other
entries' gradients to zero (a gradient hook; with no weight decay, a zero gradient leaves an entry
unchanged under SGD, momentum and Adam); ``output`` trains the output layer's weight and bias. The BN
layers of the ``random`` and ``output`` arms keep gamma = 1 and beta = 0 (their batch statistics still
normalize). Every arm of a seed starts from the same weights and sees the same batches. At every
evaluation the run records the fraction of BN channels with ``|gamma| < gamma_tol`` (``dead_frac``) and
at 0.01 and 0.1 (``dead_frac_0.01``, ``dead_frac_0.1``) and the number of trained entries.

Defaults: 784-(256 x 6)-10 ReLU MLP with BN (1,536 BN channels, 3,072 BN parameters against 2,570 in the
output layer), He init (``init_gain`` sqrt 2), SGD with momentum 0.9, lr 0.3 (at lr 0.1 BN-only had not
settled after 400 steps), batch 128, 2,000 steps (64 epochs), seeds 0, 1; ``gamma_tol`` 0.05. No weight
decay: it would move the masked entries of the ``random`` arm.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch
from torch import nn

from .claims import (
    COMMON_DEFAULTS, arm_summary, by_arm, check, make_run, mean, present_arms, saved_figure, series_mean, style_axes,
    with_checks,
)
from .train import RunConfig, RunExtension

__all__ = ["DEFAULTS", "OPTIONS", "ARMS", "make_runs", "summarize", "plot", "TrainOnly", "random_masks",
           "gammas"]

ARMS = ("bn-only", "random", "output")

DEFAULTS: Dict[str, object] = {
    **COMMON_DEFAULTS,
    "arch": "mlp", "hidden": [256] * 6, "activation": "relu", "init_gain": math.sqrt(2.0), "norm": "bn",
    "channels": [16, 32, 64],
    "steps": 2000, "batch_size": 128, "lr": 0.3, "optimizer": "momentum", "momentum": 0.9, "eval_every": 200,
    "threshold": 0.9, "thresholds": [0.9], "seeds": [0, 1], "gamma_tol": 0.05, "min_margin": 0.02,
    "min_dead_frac": 0.1,
}

OPTIONS = {
    "momentum": {"help": "the momentum of --optimizer momentum"},
    "arch": {"choices": ("mlp", "tinycnn"), "help": "network (mlp: `hidden` widths; tinycnn: `channels`)"},
    "norm": {"choices": ("bn", "ghost", "renorm"), "help": "the BN layers' kind"},
    "channels": {"low": 1, "help": "tinycnn's channels per stage"},
    "gamma_tol": {"low": 0, "low_open": True, "help": "a channel counts as switched off when |gamma| < tol"},
    "min_margin": {"help": "the check: BN-only's final accuracy must exceed the other arms' by this much"},
    "min_dead_frac": {"high": 1, "help": "the check's required fraction of switched-off BN channels"},
    "init_gain": {"nullable": True, "help": "weights N(0, gain^2/fan_in) (none: torch's default init)"},
}


def gammas(model: nn.Module) -> torch.Tensor:
    """Every BN layer's weight (gamma), concatenated (``bnkit.bn_parameters``' weights)."""
    import bnkit
    ws = [p.detach().reshape(-1) for n, p in bnkit.bn_parameters(model, named=True) if n.endswith("weight")]
    return torch.cat(ws) if ws else torch.zeros(0)


def random_masks(params: Sequence[torch.Tensor], count: int, seed: int) -> List[torch.Tensor]:
    """Boolean masks, one per tensor of ``params``, selecting exactly ``count`` entries in all, uniformly
    without replacement over the concatenation of the tensors, by a generator seeded by ``seed``."""
    total = sum(int(p.numel()) for p in params)
    if not 0 <= count <= total:
        raise ValueError(f"cannot choose {count} of {total} parameters")
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + 424_242)
    flat = torch.zeros(total, dtype=torch.bool)
    flat[torch.randperm(total, generator=g)[:count]] = True
    out, off = [], 0
    for p in params:
        n = int(p.numel())
        out.append(flat[off:off + n].view(p.shape).clone())
        off += n
    return out


class TrainOnly(RunExtension):
    """Train only a subset of the parameters: ``which`` = ``bn`` (BN's gamma and beta), ``random`` (as many
    random entries of the other parameters, gradient-masked) or ``output`` (``model.head``). Every other
    parameter gets ``requires_grad = False``."""

    def __init__(self, which: str = "bn", seed: int = 0, gamma_tol: float = 0.05):
        if which not in ("bn", "random", "output"):
            raise ValueError(f"TrainOnly: which must be bn, random or output, got {which!r}")
        self.which, self.seed, self.tol = which, int(seed), float(gamma_tol)
        self.trainable: List[nn.Parameter] = []
        self.masks: Dict[int, torch.Tensor] = {}
        self.count = 0

    def prepare(self, model, cfg, data):
        import bnkit
        bn = bnkit.bn_parameters(model)
        if not bn:
            raise ValueError("TrainOnly: the network has no BN layer with an affine to train")
        n_bn = sum(int(p.numel()) for p in bn)
        bn_ids = {id(p) for p in bn}
        if self.which == "bn":
            self.trainable = list(bn)
        elif self.which == "output":
            self.trainable = list(model.head.parameters())
        else:
            pool = [p for p in model.parameters() if id(p) not in bn_ids]
            masks = random_masks(pool, n_bn, self.seed)
            for p, m in zip(pool, masks):
                if m.any():
                    self.trainable.append(p)
                    self.masks[id(p)] = m
                    mf = m.to(p.dtype)
                    p.register_hook(lambda g, mf=mf: g * mf)
        keep = {id(p) for p in self.trainable}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
        self.count = (sum(int(m.sum()) for m in self.masks.values()) if self.which == "random"
                      else sum(int(p.numel()) for p in self.trainable))
        return model

    def parameters(self, model):
        return self.trainable

    def on_eval(self, model, step, data):
        g = gammas(model).abs()
        return {"dead_frac": float((g < self.tol).float().mean()), "dead_frac_0.01": float((g < 0.01).float().mean()),
                "dead_frac_0.1": float((g < 0.1).float().mean()),
                **{f"gamma_abs_q{q}": float(torch.quantile(g, q / 100)) for q in (10, 25, 50)},
                "trained_entries": float(self.count)}


_WHICH = {"bn-only": "bn", "random": "random", "output": "output"}


def make_runs(cfg: Dict) -> List[RunConfig]:
    opts: Dict[str, object] = {"channels": [int(c) for c in cfg["channels"]]} if cfg["arch"] == "tinycnn" else {"dropout": 0.0}
    if cfg.get("init_gain") is not None:
        opts["init_gain"] = float(cfg["init_gain"])
    return [make_run(cfg, f"{arm}-s{s}", arm, norm=cfg["norm"], seed=s, options=dict(opts),
                     extension="bnkit.experiments.bnonly:TrainOnly",
                     extension_options={"which": _WHICH[arm], "seed": int(s), "gamma_tol": float(cfg["gamma_tol"])})
            for s in cfg["seeds"] for arm in ARMS]


def summarize(cfg: Dict, results: Dict[str, Dict]) -> Dict:
    groups = by_arm(results)
    summary: Dict[str, object] = {arm: arm_summary(rs) for arm, rs in groups.items()}
    for arm, rs in groups.items():
        summary[arm]["dead_frac"] = mean(r["extra"]["dead_frac"][-1] for r in rs)
        summary[arm]["dead_frac_0.01"] = mean(r["extra"]["dead_frac_0.01"][-1] for r in rs)
        summary[arm]["dead_frac_0.1"] = mean(r["extra"]["dead_frac_0.1"][-1] for r in rs)
        summary[arm]["trained_entries"] = [int(r["extra"]["trained_entries"][-1]) for r in rs]
    bn, rnd, out = summary["bn-only"], summary["random"], summary["output"]
    m = float(cfg["min_margin"])
    return with_checks(summary, {
        f"bn_only_beats_random_and_output_by_{m:g}": check(
            bn["final_acc"] >= rnd["final_acc"] + m and bn["final_acc"] >= out["final_acc"] + m,
            bn_only=bn["final_acc"], random=rnd["final_acc"], output=out["final_acc"],
            margin_over_random=bn["final_acc"] - rnd["final_acc"], margin_over_output=bn["final_acc"] - out["final_acc"]),
        "random_arm_trains_as_many_entries_as_bn_only": check(
            rnd["trained_entries"] == bn["trained_entries"], random=rnd["trained_entries"],
            bn_only=bn["trained_entries"], output=out["trained_entries"]),
        f"bn_only_dead_frac_ge_{float(cfg['min_dead_frac']):g}": check(
            bn["dead_frac"] >= float(cfg["min_dead_frac"]), dead_frac=bn["dead_frac"], gamma_tol=float(cfg["gamma_tol"]),
            dead_frac_at_0_01=bn["dead_frac_0.01"], dead_frac_at_0_1=bn["dead_frac_0.1"],
            paper_fraction="about one third (deep ResNets)"),
    }, cfg["threshold"])


_COLORS = {"bn-only": "tab:blue", "random": "tab:orange", "output": "tab:green"}


def plot(cfg: Dict, results: Dict[str, Dict], summary: Dict, path) -> None:
    title = f"training only BN: {cfg['arch']} on {cfg['data']}, {len(cfg['seeds'])} seed(s)"
    with saved_figure(path, 3, figsize=(15, 4.2), dpi=100, title=title) as (fig, axes):
        for arm, rs in present_arms(results, ARMS):
            st, acc = series_mean(rs, "test_acc")
            axes[0].plot(st, acc, color=_COLORS[arm], lw=1.8,
                         label=f"{arm} ({summary[arm]['trained_entries'][0]:,} trained)")
            axes[1].plot(rs[0]["steps"], rs[0]["extra"]["dead_frac"], color=_COLORS[arm], lw=1.6, label=arm)
        bn_only = by_arm(results).get("bn-only", [])
        for q, ls in (("q10", ":"), ("q25", "--"), ("q50", "-")):
            for j, r in enumerate(bn_only):
                axes[2].plot(r["steps"], r["extra"][f"gamma_abs_{q}"], ls, color=_COLORS["bn-only"],
                             lw=1.4 if j == 0 else 0.7, label=f"{q[1:]}th pct of |gamma|" if j == 0 else None)
        axes[2].axhline(float(cfg["gamma_tol"]), color="k", lw=0.8, label=f"tol {cfg['gamma_tol']:g}")
        axes[2].set_yscale("log")
        axes[0].set_title("(a) test accuracy, other weights frozen at init")
        axes[0].set_ylim(0, 1)
        axes[1].set_title(f"(b) share of BN channels with |gamma| < {cfg['gamma_tol']:g}, first seed")
        axes[2].set_title("(c) BN-only: percentiles of |gamma| (all seeds)")
        style_axes(axes, "training steps", legend={"fontsize": 8})

