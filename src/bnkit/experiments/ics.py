"""Internal covariate shift and optimization: a deep ReLU MLP trained without BN, with BN, and with
"noisy BN" (BN followed by a per-channel shift and scale redrawn at every step), and the loss landscape
along the gradient measured during training.

Claims (Santurkar, Tsipras, Ilyas & Madry 2018, *How Does Batch Normalization Help Optimization?*):
(a) Figure 2: injecting time-varying, non-zero-mean, non-unit-variance noise after every BN layer -- an
internal covariate shift far larger than the plain network's -- leaves BN's training speed about intact
(VGG on CIFAR-10: "Standard + Noisy BatchNorm" trains about as fast as "Standard + BatchNorm", both far
faster than "Standard"), while the activation distributions of the noisy network drift far more.
(b) Figure 4: along the gradient direction BN's loss varies less (loss landscape) and its gradient
changes less (gradient predictiveness). Checks: the noisy-BN net's mean test accuracy over the
evaluations after step 0 (the area under its learning curve: a measure of speed) is within ``noisy_tol``
of BN's and above the plain net's, and it reaches ``threshold`` before the plain net; its
probed 50th-percentile drift exceeds BN's; the mean (over measurements and seeds) of the loss range and of
the gradient-change range along ``-g`` is smaller with BN than without (the fraction of measurements,
paired by seed and step, where BN's is smaller, and the means over the second half of training, are
reported with them).

Landscape measurement (every ``landscape_every`` steps, on the batch of that step, on a deep copy so
training is untouched, in training mode with that batch's statistics and that step's noise): the loss
``L(w)`` and gradient ``g`` at the current weights, then for each step size ``eta = m * lr``
(``m`` in ``eta_mults``) the loss ``L(w - eta g)`` and gradient ``g(w - eta g)``. Recorded per
measurement: ``loss_min``/``loss_max``/``loss_range`` over the step sizes, the gradient-change norms
``||g(w - eta g) - g(w)||`` (``grad_change_min``/``max``/``range``) and the effective beta-smoothness
``max ||g(w - eta g) - g(w)|| / ||eta g||`` -- the quantities of the paper's Figure 4.

Noise: at step ``t`` every noise layer draws, per channel, a shift ``m ~ U(-noise_shift, noise_shift)`` and
a scale ``s = exp(u)``, ``u ~ U(-ln noise_scale, ln noise_scale)``, from a generator seeded by (seed, t),
and outputs ``s * BN(x) + m`` in training mode (eval mode: ``BN(x)``, as dropout is off at test time).
The draw is a function of the step alone, so ``--resume`` reproduces it.

Defaults: 784-(100 x 8)-10 ReLU MLP, He init (``init_gain`` sqrt 2, the same weights in every arm of a
seed), SGD lr 0.1, batch 60, 1,500 steps, seeds 0, 1; noise shifts up to +-0.5 and scales in [1/1.5, 1.5]
(a shift of +-1 with scales up to x3 left the 8-layer net at 46 % after 300 steps: too much noise to train
through at this depth); the landscape every 50 steps at step sizes 0.25, 0.5, 1, 2 and 4 times the lr.

The paper perturbs each activation of each sample with i.i.d. noise whose (non-zero) mean and (non-unit)
variance change every step; here one shift and one scale per channel per step are shared by the batch,
which shifts every channel's distribution from step to step (the covariate shift the experiment is about)
without adding per-sample noise to the batch statistics of the next layer.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .claims import (
    COMMON_DEFAULTS, arm_summary, by_arm, check, fmt_key, make_run, mean, present_arms, saved_figure, series_mean,
    style_axes, with_checks,
)
from .train import RunConfig, RunExtension

__all__ = ["DEFAULTS", "OPTIONS", "ARMS", "make_runs", "summarize", "plot", "NoisyNorm", "NoisyBNExtension",
           "landscape", "draw_noise", "paired_fraction"]

ARMS = ("standard", "bn", "noisy-bn")

DEFAULTS: Dict[str, object] = {
    **COMMON_DEFAULTS,
    "arch": "mlp", "hidden": [100] * 8, "activation": "relu", "init_gain": math.sqrt(2.0), "norm": "bn",
    "steps": 1500, "batch_size": 60, "lr": 0.1, "eval_every": 50, "threshold": 0.9, "thresholds": [0.9],
    "seeds": [0, 1], "noise_shift": 0.5, "noise_scale": 1.5, "landscape_every": 50,
    "eta_mults": [0.25, 0.5, 1.0, 2.0, 4.0], "noisy_tol": 0.02,
}

OPTIONS = {
    "arch": {"choices": ("mlp", "tinycnn"), "help": "network (mlp: `hidden` widths; tinycnn: 8/16/32 channels)"},
    "norm": {"choices": ("bn", "ghost", "renorm"), "help": "the batch norm of the BN and noisy-BN arms"},
    "noise_shift": {"help": "noise shifts lie in [-noise_shift, noise_shift] (0: no shift)"},
    "noisy_tol": {"help": "the check: noisy BN's final accuracy may be this much below BN's"},
    "noise_scale": {"low": 1.0, "help": "noise scales lie in [1/noise_scale, noise_scale] (1: no scaling)"},
    "landscape_every": {"low": 1, "help": "measure the landscape along the gradient every K steps"},
    "eta_mults": {"low": 0, "low_open": True, "unique": True, "help": "step sizes of the landscape, in units of lr"},
    "init_gain": {"nullable": True, "help": "weights N(0, gain^2/fan_in) (none: torch's default init)"},
}


# ------------------------------------------------------------------------------------------ the noise

class NoisyNorm(nn.Module):
    """``norm`` followed by a per-channel affine noise ``y = scale * norm(x) + shift`` in training mode.

    ``shift`` and ``scale`` (shape ``(C,)``, along dim 1) are set by :meth:`set_noise` (the extension
    redraws them every step); eval mode returns ``norm(x)`` unchanged. They are non-persistent buffers:
    not part of the model's ``state_dict``, since the draw is a function of the step.
    """

    def __init__(self, norm: nn.Module, num_features: int):
        super().__init__()
        self.norm = norm
        self.num_features = int(num_features)
        self.register_buffer("shift", torch.zeros(self.num_features), persistent=False)
        self.register_buffer("scale", torch.ones(self.num_features), persistent=False)

    def set_noise(self, shift: torch.Tensor, scale: torch.Tensor) -> None:
        if shift.shape != (self.num_features,) or scale.shape != (self.num_features,):
            raise ValueError(f"NoisyNorm: shift and scale must have shape ({self.num_features},), got "
                             f"{tuple(shift.shape)} and {tuple(scale.shape)}")
        self.shift.copy_(shift)
        self.scale.copy_(scale)

    def forward(self, x):
        y = self.norm(x)
        if not self.training:
            return y
        view = (1, -1) + (1,) * (y.dim() - 2)
        return y * self.scale.view(view) + self.shift.view(view)


def draw_noise(layers: Sequence[NoisyNorm], seed: int, step: int, shift: float, scale: float) -> None:
    """Set every layer's noise for training step ``step`` (0-based) from a generator seeded by (seed, step):
    shift ~ U(-shift, shift), scale = exp(U(-ln scale, ln scale)), per channel."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + 7_777_777 + int(step))
    ls = math.log(float(scale))
    with torch.no_grad():
        for m in layers:
            c = m.num_features
            sh = (torch.rand(c, generator=g) * 2 - 1) * float(shift)
            sc = torch.exp((torch.rand(c, generator=g) * 2 - 1) * ls)
            m.set_noise(sh, sc)


# ------------------------------------------------------------------------------------------ the landscape

def _ce(model, x, y):
    return F.cross_entropy(model(x), y)


def _loss_and_grad(model, params, loss_fn, x, y):
    loss = loss_fn(model, x, y)
    grads = torch.autograd.grad(loss, params)
    return float(loss.detach()), torch.cat([g.reshape(-1) for g in grads]).detach()


def landscape(model: nn.Module, x, y, etas: Sequence[float],
              loss_fn: Callable = _ce, params: Optional[List[torch.nn.Parameter]] = None) -> Dict[str, float]:
    """The loss and gradient along the negative gradient from the current weights, on one batch.

    With ``g = grad L(w)`` (``params``: default every parameter that requires a gradient) and for each
    ``eta`` in ``etas``: ``L_eta = L(w - eta g)`` and ``d_eta = ||grad L(w - eta g) - g||``. Returns
    ``loss`` (= L(w)), ``grad_norm``, ``loss_min``/``loss_max``/``loss_range`` over the ``L_eta``,
    ``grad_change_min``/``grad_change_max``/``grad_change_range`` over the ``d_eta`` and ``beta`` =
    ``max d_eta / (eta ||g||)`` (the effective smoothness along ``g``). Works on a deep copy: ``model``
    (weights, buffers, gradients, mode) is not changed.

    Example:
        >>> w = nn.Linear(1, 1, bias=False); _ = w.weight.data.fill_(2.0)
        >>> r = landscape(w, None, None, [0.5], loss_fn=lambda m, x, y: 0.5 * (m.weight ** 2).sum())
        >>> (r["loss"], r["loss_max"], r["grad_change_max"])   # w - 0.5*2 = 1
        (2.0, 0.5, 1.0)
    """
    if not etas:
        raise ValueError("landscape: at least one step size is needed")
    m = copy.deepcopy(model)
    ps = [p for p in m.parameters() if p.requires_grad] if params is None else \
        [dict(m.named_parameters())[n] for n in _names(model, params)]
    w0 = [p.detach().clone() for p in ps]
    loss0, g0 = _loss_and_grad(m, ps, loss_fn, x, y)
    gnorm = float(g0.norm())
    losses, changes, betas = [], [], []
    for eta in etas:
        with torch.no_grad():
            off = 0
            for p, w in zip(ps, w0):
                n = p.numel()
                p.copy_(w - float(eta) * g0[off:off + n].view_as(p))
                off += n
        le, ge = _loss_and_grad(m, ps, loss_fn, x, y)
        d = float((ge - g0).norm())
        losses.append(le)
        changes.append(d)
        betas.append(d / (float(eta) * gnorm) if gnorm > 0 else 0.0)
    return {"loss": loss0, "grad_norm": gnorm, "loss_min": min(losses), "loss_max": max(losses),
            "loss_range": max(losses) - min(losses), "grad_change_min": min(changes),
            "grad_change_max": max(changes), "grad_change_range": max(changes) - min(changes),
            "beta": max(betas)}


def _names(model, params):
    ids = {id(p): n for n, p in model.named_parameters()}
    return [ids[id(p)] for p in params]


# ------------------------------------------------------------------------------------------ the extension

class NoisyBNExtension(RunExtension):
    """Wraps every BN layer of the net in a :class:`NoisyNorm` (when ``noise``), redraws its noise before
    every training step, and measures :func:`landscape` every ``every`` steps (``etas``: absolute step
    sizes) on the batch of that step."""

    def __init__(self, noise: bool = False, seed: int = 0, shift: float = 1.0, scale: float = 3.0,
                 every: int = 0, etas: Sequence[float] = ()):
        self.noise, self.seed, self.shift, self.scale = bool(noise), int(seed), float(shift), float(scale)
        self.every, self.etas = int(every), [float(e) for e in etas]
        self.layers: List[NoisyNorm] = []
        self.step = 0  # the training step whose noise is set

    def prepare(self, model, cfg, data):
        if self.noise:
            for b in model.blocks:
                if hasattr(b, "norm") and not isinstance(b.norm, nn.Identity):
                    lin = b.linear
                    c = lin.out_features if isinstance(lin, nn.Linear) else lin.out_channels
                    b.norm = NoisyNorm(b.norm, c)
                    self.layers.append(b.norm)
            if not self.layers:
                raise ValueError("noisy BN: the network has no norm layer to add noise to")
            draw_noise(self.layers, self.seed, 0, self.shift, self.scale)
        return model

    def batch_indices(self, step, default, y_train):
        if self.noise:
            self.step = int(step)
            draw_noise(self.layers, self.seed, self.step, self.shift, self.scale)
        return default

    def after_step(self, model, step, x, y, opt):
        if self.every <= 0 or step % self.every:
            return None
        return landscape(model, x, y, self.etas)

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = int(state.get("step", 0))
        if self.noise:
            draw_noise(self.layers, self.seed, self.step, self.shift, self.scale)


# ------------------------------------------------------------------------------------------ runs and checks

def make_runs(cfg: Dict) -> List[RunConfig]:
    runs = []
    etas = [float(m) * float(cfg["lr"]) for m in cfg["eta_mults"]]
    opts = {} if cfg["arch"] == "tinycnn" else {"dropout": 0.0}
    if cfg.get("init_gain") is not None:
        opts["init_gain"] = float(cfg["init_gain"])
    for s in cfg["seeds"]:
        for arm in ARMS:
            ext = {"noise": arm == "noisy-bn", "seed": int(s), "shift": float(cfg["noise_shift"]),
                   "scale": float(cfg["noise_scale"]), "every": int(cfg["landscape_every"]), "etas": etas}
            runs.append(make_run(cfg, f"{arm}-s{s}", arm, norm="none" if arm == "standard" else cfg["norm"],
                                 seed=s, options=dict(opts), extension="bnkit.experiments.ics:NoisyBNExtension",
                                 extension_options=ext))
    return runs


def validate(cfg: Dict, data) -> None:
    if int(cfg["landscape_every"]) > int(cfg["steps"]):
        raise ValueError(f"--landscape-every {cfg['landscape_every']} is larger than --steps {cfg['steps']}: "
                         f"no landscape measurement would be made")


def landscape_means(rs: Sequence[Dict]) -> Dict[str, Optional[float]]:
    """Means over every measurement of every seed of one arm."""
    keys = ("loss_range", "grad_change_range", "grad_change_max", "beta", "grad_norm")
    return {k: mean(rec[k] for r in rs for rec in r.get("step_records", [])) for k in keys}


def paired_fraction(a: Sequence[Dict], b: Sequence[Dict], key: str) -> Optional[float]:
    """The fraction of measurements (paired by seed and step) where arm ``a``'s ``key`` is below ``b``'s."""
    bb = {(r["seed"], rec["step"]): rec[key] for r in b for rec in r.get("step_records", [])}
    pairs = [(rec[key], bb[(r["seed"], rec["step"])]) for r in a for rec in r.get("step_records", [])
             if (r["seed"], rec["step"]) in bb]
    return sum(x < y for x, y in pairs) / len(pairs) if pairs else None


def _late_mean(rs: Sequence[Dict], key: str, steps: int) -> Optional[float]:
    return mean(rec[key] for r in rs for rec in r.get("step_records", []) if rec["step"] > steps / 2)


def summarize(cfg: Dict, results: Dict[str, Dict]) -> Dict:
    groups = by_arm(results)
    summary: Dict[str, object] = {arm: arm_summary(rs) for arm, rs in groups.items()}
    land = {arm: landscape_means(rs) for arm, rs in groups.items()}
    summary["landscape"] = land
    std, bn, noisy = summary["standard"], summary["bn"], summary["noisy-bn"]
    k = fmt_key(cfg["threshold"])
    st_n, st_s = noisy["steps_to"][k], std["steps_to"][k]
    tol = float(cfg["noisy_tol"])
    # training speed: the mean test accuracy over the evaluations after step 0 (the area under the curve
    # per step); the final accuracies are reported too, but all arms end on the same data-limited plateau
    auc = {arm: mean(mean(r["test_acc"][1:]) for r in rs) for arm, rs in groups.items()}
    summary["mean_test_acc"] = auc
    return with_checks(summary, {
        f"noisy_bn_mean_acc_within_{tol:g}_of_bn_and_above_standard": check(
            auc["noisy-bn"] >= auc["bn"] - tol and auc["noisy-bn"] > auc["standard"],
            noisy_bn=auc["noisy-bn"], bn=auc["bn"], standard=auc["standard"],
            noisy_minus_bn=auc["noisy-bn"] - auc["bn"], final_noisy_bn=noisy["final_acc"], final_bn=bn["final_acc"],
            final_standard=std["final_acc"]),
        f"noisy_bn_reaches_{k}_before_standard": check(
            st_n is not None and (st_s is None or st_n < st_s), noisy_bn_steps=st_n, standard_steps=st_s,
            bn_steps=bn["steps_to"][k]),
        "noisy_bn_drift_gt_bn_drift": check(
            (noisy["drift"]["range"] or 0) > (bn["drift"]["range"] or 0), noisy_bn=noisy["drift"]["range"],
            bn=bn["drift"]["range"], standard=std["drift"]["range"]),
        **{f"bn_{key}_lt_standard": _smaller_landscape_check(cfg, groups, land, key)
           for key in ("loss_range", "grad_change_range")},
    }, cfg["threshold"])


def _smaller_landscape_check(cfg: Dict, groups: Dict[str, List[Dict]], land: Dict, key: str) -> Dict:
    """BN's landscape measure ``key`` (the mean over the measurements) is below the standard net's."""
    b, s = land["bn"][key], land["standard"][key]
    return check(b is not None and s is not None and b < s, bn=b, standard=s, noisy_bn=land["noisy-bn"][key],
                 ratio=(s / b if b else None),
                 bn_smaller_in_frac_of_measurements=paired_fraction(groups["bn"], groups["standard"], key),
                 bn_second_half=_late_mean(groups["bn"], key, int(cfg["steps"])),
                 standard_second_half=_late_mean(groups["standard"], key, int(cfg["steps"])))


_COLORS = {"standard": "tab:gray", "bn": "tab:blue", "noisy-bn": "tab:red"}


def plot(cfg: Dict, results: Dict[str, Dict], summary: Dict, path) -> None:
    title = (f"ICS and the landscape: {cfg['arch']} {cfg['hidden'] if cfg['arch'] == 'mlp' else ''} on "
             f"{cfg['data']}, lr {cfg['lr']:g}, noise shift {cfg['noise_shift']:g} scale x{cfg['noise_scale']:g}")
    with saved_figure(path, 4, figsize=(18, 4.2), dpi=100, title=title) as (fig, axes):
        for arm, rs in present_arms(results, ARMS):
            st, acc = series_mean(rs, "test_acc")
            axes[0].plot(st, acc, color=_COLORS[arm], lw=1.8, label=arm)
            r = rs[0]
            axes[1].plot(r["steps"], r["percentiles"]["p50"], color=_COLORS[arm], lw=1.4, label=f"{arm} p50")
            axes[1].fill_between(r["steps"], r["percentiles"]["p15"], r["percentiles"]["p85"], color=_COLORS[arm],
                                 alpha=0.15)
            recs = r.get("step_records", [])
            if recs:
                s = [x["step"] for x in recs]
                for ax, lo, hi in ((axes[2], "loss_min", "loss_max"), (axes[3], "grad_change_min", "grad_change_max")):
                    ax.fill_between(s, [x[lo] for x in recs], [x[hi] for x in recs], color=_COLORS[arm],
                                    alpha=0.35, label=arm)
        axes[0].set_title("(a) test accuracy (mean over seeds)")
        axes[0].set_ylim(0, 1)
        axes[1].set_title("(b) last hidden layer's activation input, seed 0\n(typical unit: 15/50/85th pct)")
        axes[2].set_title(f"(c) loss at w - eta g, eta = {cfg['eta_mults']} x lr\n(min-max band, seed 0)")
        axes[2].set_yscale("log")
        axes[3].set_title("(d) ||g(w - eta g) - g(w)|| (min-max band, seed 0)")
        axes[3].set_yscale("log")
        style_axes(axes, "training steps", legend={"fontsize": 7})
