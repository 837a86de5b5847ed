"""Test-time adaptation under corruptions: a BN net trained on clean digits, evaluated on the test digits
corrupted by noise, contrast and blur at five severities each, with its source statistics and with four
adaptations of its BN layers: re-estimation on the corrupted test set (AdaBN), Schneider et al.'s prior
mixing from n = 1, 8 and 32 corrupted digits, and TENT.

Claim (Schneider et al. 2020, *Improving robustness against common corruptions by covariate shift
adaptation*; Li et al. 2016, AdaBN): replacing the source statistics by the target's improves accuracy
on every corruption that shifts the statistics, and most at high severity. Checks: wherever the
corruption shifts the BN layers' input statistics by at least ``min_shift`` (the mean over layers and
channels of KL(target || source) of per-channel Gaussians, :func:`statistics_shift`, recorded for every
corruption and severity),
re-estimation beats the source statistics (mean over seeds); and for every corruption its gain at the
highest severity exceeds its gain at the lowest.

Per corruption and severity the runs record (``extra``, at the final evaluation): the accuracy with
the source statistics, after ``bnkit.adapt(mode="reestimate")`` on the whole corrupted test set, after
``bnkit.adapt(mode="prior", prior=N)`` on n random corrupted digits (mean over ``draws`` draws, each
evaluated on the whole corrupted set), after ``bnkit.tent`` (Adam, lr ``tent_lr``, one step per batch
of ``tent_batch``, one pass, then re-estimated statistics), and the statistics shift. Everything runs on a
copy of the trained model; after every ``restore()`` the copy's clean logits must equal the model's bit
for bit (``extra.restored_exact``).

Defaults: ``tinycnn`` (8/16/32 channels) on mnist5k, trained on the clean 4,000 digits for 1,500 steps
of batch 60 (SGD, momentum 0.9, lr 0.02), seeds 0, 1; the 1,000 test digits corrupted by
``bnkit.experiments.corruptions`` (ImageNet-C's noise and contrast levels, blur sigmas scaled to 28x28);
prior strength N = 16 (bnkit's default), draws 3.
"""
from __future__ import annotations

import copy
from typing import Dict, List

import torch

from .claims import (
    COMMON_DEFAULTS, arm_summary, by_arm, check, make_run, mean, plot_style, saved_figure, style_axes, with_checks,
)
from .corruptions import CORRUPTIONS, SEVERITIES, corrupt
from .train import RunConfig, RunExtension, evaluate

__all__ = ["DEFAULTS", "OPTIONS", "make_runs", "summarize", "plot", "CorruptionEval", "statistics_shift",
           "gain_table"]

DEFAULTS: Dict[str, object] = {
    **COMMON_DEFAULTS,
    "arch": "tinycnn", "channels": [8, 16, 32], "activation": "relu", "optimizer": "momentum", "momentum": 0.9,
    "lr": 0.02, "batch_size": 60, "steps": 1500, "eval_every": 250,
    "corruptions": list(CORRUPTIONS), "severities": list(SEVERITIES), "prior_n": [1, 8, 32], "prior": 16.0,
    "draws": 3, "tent_lr": 1e-3, "tent_batch": 128, "adapt_batch": 250, "min_shift": 0.05, "min_gain": 0.0,
    "threshold": 0.9, "thresholds": [0.9], "seeds": [0, 1],
}

OPTIONS = {
    "arch": {"choices": ("mlp", "tinycnn"), "help": "network"},
    "corruptions": {"choices": tuple(CORRUPTIONS), "unique": True, "help": "corruptions, comma-separated"},
    "severities": {"low": 1, "high": 5, "unique": True, "help": "severities (1-5), comma-separated"},
    "prior_n": {"low": 1, "unique": True, "help": "target samples n for the prior mixing, comma-separated"},
    "prior": {"help": "Schneider et al.'s prior strength N"},
    "draws": {"low": 1, "help": "random draws of the n samples (each evaluated on the whole corrupted set)"},
    "tent_lr": {"low": 0, "low_open": True, "help": "TENT's Adam learning rate"},
    "tent_batch": {"low": 2, "help": "TENT's batch size"},
    "adapt_batch": {"low": 2, "help": "batch size of the re-estimation pass"},
    "min_shift": {"help": "statistics shift (mean KL over the BN layers) from which adaptation must gain"},
    "min_gain": {"help": "the gain re-estimation must exceed there"},
}


def _key(what: str, name: str, sev: int) -> str:
    return f"{what}/{name}/{int(sev)}"


@torch.no_grad()
def statistics_shift(model, x: torch.Tensor) -> float:
    """How far ``x`` moves the statistics the BN layers normalize with: for every BN layer, the mean over
    its channels of KL(N(mu_t, var_t) || N(mu_s, var_s)), the target's per-channel moments of the layer's
    input on ``x`` (one eval-mode forward, so each layer sees what the source-statistics net computes)
    against the layer's running (source) statistics; averaged over the layers."""
    from bnkit.tools._bnlayers import bn_layers
    layers = [m for _, m in bn_layers(model)]
    seen = {}

    def grab(mod, args):
        seen.setdefault(id(mod), args[0].detach())

    hooks = [m.register_forward_pre_hook(grab) for m in layers]
    was = model.training
    try:
        model.eval()
        model(x)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    kls = []
    for m in layers:
        z = seen[id(m)].double()
        dims = [d for d in range(z.dim()) if d != 1]
        vt = z.var(dims) + float(getattr(m, "eps", 1e-5))
        vs = m.running_var.double() + float(getattr(m, "eps", 1e-5))
        kl = 0.5 * (vt / vs + (z.mean(dims) - m.running_mean.double()) ** 2 / vs - 1 - torch.log(vt / vs))
        kls.append(float(kl.mean()))
    return sum(kls) / len(kls)


class CorruptionEval(RunExtension):
    """At the final evaluation: every corruption x severity evaluated with the source statistics and each
    adaptation (on a copy of the model), recorded as ``extra`` scalars ``<method>/<corruption>/<severity>``."""

    def __init__(self, corruptions=tuple(CORRUPTIONS), severities=SEVERITIES, prior_n=(1, 8, 32), prior=16.0,
                 draws=3, tent_lr=1e-3, tent_batch=128, adapt_batch=250):
        self.corruptions, self.severities = list(corruptions), [int(s) for s in severities]
        self.prior_n, self.prior, self.draws = [int(n) for n in prior_n], float(prior), int(draws)
        self.tent_lr, self.tent_batch, self.adapt_batch = float(tent_lr), int(tent_batch), int(adapt_batch)

    def prepare(self, model, cfg, data):
        self.final, self.seed = cfg.steps, cfg.seed
        return model

    def on_eval(self, model, step, data):
        if step != self.final:
            return {}
        return evaluate_corruptions(model, data.x_test, data.y_test, self.corruptions, self.severities,
                                    self.prior_n, self.prior, self.draws, self.tent_lr, self.tent_batch,
                                    self.adapt_batch, seed=self.seed)


def _logits(m, x, bs=1000):
    m.eval()
    with torch.no_grad():
        return torch.cat([m(x[i:i + bs]) for i in range(0, len(x), bs)])


def evaluate_corruptions(model, x, y, corruptions, severities, prior_n, prior, draws, tent_lr, tent_batch,
                         adapt_batch, seed=0) -> Dict[str, float]:
    """The measurements of :class:`CorruptionEval` on test inputs ``x`` and labels ``y``."""
    import bnkit
    m = copy.deepcopy(model).eval()
    clean = _logits(m, x)
    out = {"clean_acc": evaluate(m, x, y)[0]}
    exact = True
    batches = lambda t, b: [t[i:i + b] for i in range(0, len(t), b)]  # noqa: E731
    g = torch.Generator().manual_seed((int(seed) + 1) * 32_452_843)
    for name in corruptions:
        for sev in severities:
            xc = corrupt(name, x, sev)
            out[_key("shift", name, sev)] = statistics_shift(m, xc)
            out[_key("source", name, sev)] = evaluate(m, xc, y)[0]
            with bnkit.adapt(m, batches(xc, adapt_batch), mode="reestimate"):
                out[_key("reestimate", name, sev)] = evaluate(m, xc, y)[0]
            exact &= torch.equal(_logits(m, x), clean)
            for n in prior_n:
                accs = []
                for _ in range(draws):
                    idx = torch.randperm(len(xc), generator=g)[:n]
                    with bnkit.adapt(m, xc[idx], mode="prior", prior=prior):
                        accs.append(evaluate(m, xc, y)[0])
                    exact &= torch.equal(_logits(m, x), clean)
                out[_key(f"prior_n{n}", name, sev)] = sum(accs) / len(accs)
            _, h = bnkit.tent(m, batches(xc, tent_batch), steps=1, lr=tent_lr)
            out[_key("tent", name, sev)] = evaluate(m, xc, y)[0]
            h.restore()
            exact &= torch.equal(_logits(m, x), clean)
    out["restored_exact"] = float(exact)
    return out


def methods(cfg: Dict) -> List[str]:
    return ["source", "reestimate"] + [f"prior_n{int(n)}" for n in cfg["prior_n"]] + ["tent"]


def gain_table(cfg: Dict, results: Dict[str, Dict]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """method (and ``shift``) -> corruption -> severity -> mean over seeds of the final recorded value."""
    rs = list(results.values())
    tab: Dict[str, Dict[str, Dict[str, float]]] = {}
    for what in methods(cfg) + ["shift"]:
        tab[what] = {name: {str(int(s)): mean(r["extra"][_key(what, name, s)][-1] for r in rs)
                            for s in cfg["severities"]} for name in cfg["corruptions"]}
    return tab


def summarize(cfg: Dict, results: Dict[str, Dict]) -> Dict:
    summary: Dict[str, object] = {arm: arm_summary(rs) for arm, rs in by_arm(results).items()}
    tab = gain_table(cfg, results)
    summary["accuracy"] = {k: v for k, v in tab.items() if k != "shift"}
    summary["statistics_shift"] = tab["shift"]
    summary["clean_acc"] = mean(r["extra"]["clean_acc"][-1] for r in results.values())
    summary["restored_exact"] = all(r["extra"]["restored_exact"][-1] == 1.0 for r in results.values())
    sevs = [str(int(s)) for s in sorted(cfg["severities"])]
    gain = {n: {s: tab["reestimate"][n][s] - tab["source"][n][s] for s in sevs} for n in cfg["corruptions"]}
    summary["reestimate_gain"] = gain
    thr_shift, thr_gain = float(cfg["min_shift"]), float(cfg["min_gain"])
    shifted = [(n, s) for n in cfg["corruptions"] for s in sevs if tab["shift"][n][s] >= thr_shift]
    failing = [f"{n}/{s}" for n, s in shifted if not gain[n][s] > thr_gain]
    checks = {
        "reestimate_gains_where_statistics_shift": check(
            bool(shifted) and not failing, shifted=[f"{n}/{s}" for n, s in shifted], not_gaining=failing,
            exempt_small_shift=[f"{n}/{s}" for n in cfg["corruptions"] for s in sevs if (n, s) not in shifted],
            min_shift=thr_shift, min_gain=thr_gain, smallest_gain_where_shifted=min(
                (gain[n][s] for n, s in shifted), default=None)),
    }
    if len(sevs) >= 2:
        lo, hi = sevs[0], sevs[-1]
        checks["gain_larger_at_highest_severity"] = check(
            all(gain[n][hi] > gain[n][lo] for n in cfg["corruptions"]),
            lowest_severity=int(lo), highest_severity=int(hi),
            **{f"{n}_gain": [gain[n][lo], gain[n][hi]] for n in cfg["corruptions"]})
    return with_checks(summary, checks, cfg["threshold"])


_COLORS = {"source": "tab:gray", "reestimate": "tab:blue", "tent": "tab:green"}


def plot(cfg: Dict, results: Dict[str, Dict], summary: Dict, path) -> None:
    names = list(cfg["corruptions"])
    title = f"corrupted {cfg['data']} test digits: {cfg['arch']} trained clean, {len(results)} seed(s)"
    with saved_figure(path, len(names) + 1, figsize=(4.2 * (len(names) + 1), 4.0), title=title,
                      squeeze=False) as (fig, axes):
        axes = axes[0]
        acc = summary["accuracy"]
        sevs = [str(int(s)) for s in sorted(cfg["severities"])]
        priors = [m for m in methods(cfg) if m.startswith("prior")]
        cmap = plot_style().get_cmap("Oranges")
        for ax, n in zip(axes, names):
            for mth in methods(cfg):
                if mth.startswith("prior"):
                    c = cmap(0.4 + 0.5 * priors.index(mth) / max(1, len(priors) - 1))
                    ls = "--"
                else:
                    c, ls = _COLORS[mth], "-"
                ax.plot([int(s) for s in sevs], [100 * acc[mth][n][s] for s in sevs], ls, marker="o", ms=3, color=c,
                        label=mth.replace("prior_n", f"prior N={cfg['prior']:g}, n="))
            ax.axhline(100 * summary["clean_acc"], color="k", lw=0.6, ls=":")
            ax.set_title(n)
            ax.set_xticks([int(s) for s in sevs])
            ax.set_ylim(0, 100)
        style_axes(axes[:-1], "severity")
        axes[0].set_ylabel("test accuracy (%) (dotted: clean)")
        axes[0].legend(fontsize=7, loc="lower left")
        ax = axes[-1]
        for n in names:
            xs = [summary["statistics_shift"][n][s] for s in sevs]
            ys = [100 * summary["reestimate_gain"][n][s] for s in sevs]
            ax.plot(xs, ys, "-o", ms=3, label=n)
        ax.axvline(float(cfg["min_shift"]), color="k", lw=0.6, ls=":")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlim(left=0)  # a KL divergence is >= 0
        ax.set_ylabel("re-estimation gain (points)")
        ax.set_title("gain vs shift (severity 1 -> 5)")
        style_axes([ax], "statistics shift (mean KL over the BN layers)", legend={"fontsize": 7})


def make_runs(cfg: Dict) -> List[RunConfig]:
    opts = {"dropout": 0.0} if cfg["arch"] == "mlp" else {"channels": [int(c) for c in cfg["channels"]]}
    ext = {k: cfg[k] for k in ("corruptions", "severities", "prior_n", "prior", "draws", "tent_lr", "tent_batch",
                               "adapt_batch")}
    return [make_run(cfg, f"bn-s{s}", "bn", norm="bn", seed=s, options=opts,
                     extension="bnkit.experiments.corruption:CorruptionEval", extension_options=ext)
            for s in cfg["seeds"]]
