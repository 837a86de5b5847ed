"""Shared pieces of the claim experiments (``lr``, ``init``, ``dropout``, ``batchsize``, ``variants``,
``cnn``, ``cost``): building the runs of an arm from the experiment settings, grouping the raw runs
by arm, per-arm summaries, the PASS/FAIL checks (:func:`with_checks` puts them in the summary), and the
frame every figure shares (:func:`saved_figure`: the panels, title, layout, file; :func:`style_axes`).

A *check* is a dict ``{"pass": bool, ...the numbers it was computed from...}``, computed only from the
raw runs in ``metrics.json`` (``runs``), so anyone can recompute it from that file. Every arm of an
experiment uses the same seeds; a seed fixes both the initial weights (:func:`.models.init_weights`
draws layer i from a generator seeded by (seed, i), whatever the norm) and the data order (a function
of (seed, epoch)), so the arms differ only in what is compared.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .report import save_figure
from .train import RunConfig

__all__ = ["check", "with_checks", "make_run", "thresholds", "by_arm", "present_arms", "mean", "arm_summary",
           "final_acc", "reaches", "fmt_key", "series_mean", "plot_style", "saved_figure", "style_axes", "seeds_text",
           "COMMON_DEFAULTS"]

# settings every claim experiment has (each module adds its own and may change these)
COMMON_DEFAULTS: Dict[str, Any] = {
    "data": "mnist5k", "data_dir": None, "binarize": False, "normalize": "none", "optimizer": "sgd",
    "init": "default", "probe_size": 200, "threads": 1,
}


def check(passed: bool, **numbers) -> Dict[str, Any]:
    """A check result: ``pass`` plus the numbers it was computed from."""
    return {"pass": bool(passed), **numbers}


def with_checks(summary: Dict, checks: Dict[str, Dict], threshold: Optional[float] = None) -> Dict:
    """``summary`` with the experiment's ``checks`` (name -> :func:`check`) and, when given, the accuracy
    ``threshold`` its runs were measured against: the keys the report and the terminal summary read."""
    summary["checks"] = checks
    if threshold is not None:
        summary["threshold"] = float(threshold)
    return summary


def fmt_key(t: float) -> str:
    """The key of a threshold in a run's ``summary.steps_to``."""
    return f"{float(t):.2f}"


def thresholds(cfg: Dict, extra: Iterable[float] = ()) -> List[float]:
    ts = list(cfg.get("thresholds") or []) + [cfg["threshold"]] + list(extra)
    return sorted(set(float(t) for t in ts if t is not None))


def make_run(cfg: Dict, name: str, variant: str, *, norm: str, seed: int, **kw) -> RunConfig:
    """A RunConfig from the experiment settings ``cfg``; ``kw`` overrides any field."""
    base = dict(arch=cfg.get("arch", "mlp"), hidden=cfg.get("hidden", (100, 100, 100)),
                activation=cfg.get("activation") or ("sigmoid" if cfg.get("arch", "mlp") == "mlp" else "relu"),
                init=cfg.get("init", "default"), steps=int(cfg["steps"]), batch_size=int(cfg["batch_size"]),
                lr=float(cfg["lr"]), optimizer=cfg.get("optimizer", "sgd"), eval_every=int(cfg["eval_every"]),
                probe_size=int(cfg.get("probe_size", 200)), thresholds=thresholds(cfg),
                momentum=float(cfg.get("momentum", 0.9)))
    base.update(kw)
    return RunConfig(name=name, variant=variant, norm=norm, seed=int(seed), **base)


def by_arm(results: Dict[str, Dict], key: Callable[[Dict], Any] = lambda r: r["variant"]) -> Dict[Any, List[Dict]]:
    """Runs grouped by arm (default: their ``variant`` label), each group sorted by seed."""
    out: Dict[Any, List[Dict]] = {}
    for r in results.values():
        out.setdefault(key(r), []).append(r)
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in out.items()}


def present_arms(results: Dict[str, Dict], arms: Iterable[Any]) -> List[Tuple[Any, List[Dict]]]:
    """``(arm, runs)`` for each of ``arms`` that has runs, in that order (each group sorted by seed)."""
    groups = by_arm(results)
    return [(arm, groups[arm]) for arm in arms if groups.get(arm)]


def mean(xs: Iterable[Optional[float]]) -> Optional[float]:
    """Mean of the finite values (None when there are none)."""
    v = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    return float(np.mean(v)) if v else None


def final_acc(r: Dict) -> float:
    """A run's final test accuracy (a diverged run: the accuracy of its non-finite model, about chance)."""
    return float(r["test_acc"][-1])


def reaches(rs: Sequence[Dict], thr: float) -> bool:
    """An arm reaches ``thr`` when the mean over seeds of the final test accuracy is at least ``thr``."""
    return (mean(final_acc(r) for r in rs) or 0.0) >= thr


def arm_summary(rs: Sequence[Dict]) -> Dict[str, Any]:
    """Means over seeds of one arm, in the form the HTML report's summary table reads."""
    keys = rs[0]["summary"]["steps_to"].keys()
    st = {k: [r["summary"]["steps_to"][k] for r in rs] for k in keys}
    out = {
        "final_acc": mean(final_acc(r) for r in rs),
        "final_acc_per_seed": [final_acc(r) for r in rs],
        "best_acc": mean(r["summary"]["best_acc"] for r in rs),
        # mean over seeds; None when some seed never reached the threshold
        "steps_to": {k: (None if None in v else mean(v)) for k, v in st.items()},
        "steps_to_per_seed": st,
        "drift": {m: mean(r["summary"]["drift"][m] for r in rs) for m in ("range", "relative")},
        "ms_per_step": min(r["timing"]["ms_per_step"] for r in rs),
        "diverged_per_seed": [r.get("diverged_at") for r in rs],
    }
    if all("train_acc" in r for r in rs):
        out["final_train_acc"] = mean(r["train_acc"][-1] for r in rs)
        out["final_gap"] = mean(r["train_acc"][-1] - r["test_acc"][-1] for r in rs)
    return out


def series_mean(rs: Sequence[Dict], key: str = "test_acc"):
    """(steps, mean over seeds) of a series; runs that stopped early (diverged) are padded with their last
    value so every seed contributes at every step."""
    longest = max(rs, key=lambda r: len(r["steps"]))
    steps = longest["steps"]
    ys = []
    for r in rs:
        v = list(r[key])
        v = [(np.nan if x is None else x) for x in v]
        ys.append(v + [v[-1]] * (len(steps) - len(v)))
    return steps, np.nanmean(np.asarray(ys, dtype=float), axis=0)


def plot_style():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


@contextmanager
def saved_figure(path, ncols: int, *, figsize: Tuple[float, float], dpi: int = 110, title: Optional[str] = None,
                 **subplots: Any) -> Iterator[Tuple[Any, Any]]:
    """``(fig, axes)``: a figure of ``ncols`` panels in a row (``subplots``: more arguments of
    ``plt.subplots``), written to ``path`` when the block ends, after its ``title`` (font size 10) and a
    tight layout. The figure is closed also when plotting raises (and then nothing is written)."""
    plt = plot_style()
    fig, axes = plt.subplots(1, ncols, figsize=figsize, dpi=dpi, **subplots)
    try:
        yield fig, axes
        if title is not None:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        save_figure(fig, path)
    finally:
        plt.close(fig)


def style_axes(axes: Iterable[Any], xlabel: Optional[str] = None, legend: Optional[Dict[str, Any]] = None) -> None:
    """Each of ``axes``: the x label ``xlabel`` (when given), a light grid, and a legend made with the
    arguments ``legend`` (when given; ``{}``: matplotlib's defaults)."""
    for ax in axes:
        if xlabel is not None:
            ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if legend is not None:
            ax.legend(**legend)


def seeds_text(cfg: Dict) -> str:
    """``"1 seed"`` or ``"<n> seeds"``: how many seeds the figure titles say an experiment ran."""
    n = len(cfg["seeds"])
    return f"{n} seed{'s' if n > 1 else ''}"
