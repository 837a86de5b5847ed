"""Experiment registry and the orchestration shared by every experiment: output directory, config,
data, the runs with a live progress bar, ``metrics.json``, the figure, ``report.html`` and the terminal
summary. ``--resume`` picks up an interrupted experiment from its directory."""
from __future__ import annotations

import datetime as _dt
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Optional

__all__ = ["EXPERIMENTS", "Experiment", "get_experiment", "run_experiment", "latest_run_dir"]


@dataclass(frozen=True)
class Experiment:
    name: str
    module: str  # bnkit.experiments.<module>
    figure: str
    title: str

    def load(self) -> ModuleType:
        import importlib
        return importlib.import_module(f"bnkit.experiments.{self.module}")

    @property
    def description(self) -> str:
        doc = (self.load().__doc__ or "").strip()
        return doc.split("\n\n")[0].replace("\n", " ")


EXPERIMENTS: Dict[str, Experiment] = {e.name: e for e in [
    Experiment("fig1", "fig1", "fig1.png",
               "Batch Normalization, Figure 1: MLP on MNIST with and without BN"),
    Experiment("norms", "norms", "norms.png", "Norm comparison: one network, every norm of the factory"),
    # the claim experiments (bnkit.experiments.claims)
    Experiment("lr", "lr", "lr.png", "Learning rate: with and without BN over a learning-rate grid"),
    Experiment("init", "init", "init.png", "Initialization: sensitivity to the weight-init scale, with and without BN"),
    Experiment("dropout", "dropout", "dropout.png", "Regularization: BN and dropout on a small training set"),
    Experiment("batchsize", "batchsize", "batchsize.png", "Small batches: BN, Batch Renorm, GroupNorm, LayerNorm vs batch size"),
    Experiment("variants", "variants", "variants.png", "BN variants: standard, shared-weight, shared-parameter BN, LN, GN, none"),
    Experiment("cnn", "cnn", "cnn.png", "CNNs from the sources: Keras-style conv net and LeNet, with and without BN"),
    Experiment("cost", "cost", "cost.png", "Compute cost of BN in training and inference, and with BN folded"),
]}


def get_experiment(name: str) -> Experiment:
    try:
        return EXPERIMENTS[name]
    except KeyError:
        raise SystemExit(f"bnkit: unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}") from None


def latest_run_dir(experiment: str, root: Path = Path("runs")) -> Optional[Path]:
    cands = sorted(p for p in Path(root).glob(f"{experiment}-*") if (p / "config.json").exists())
    return cands[-1] if cands else None


class RichProgress:
    """One progress bar per run, with the live loss (EMA) and the last test accuracy."""

    def __init__(self, console):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)
        self.p = Progress(TextColumn("[bold]{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}"),
                          TimeElapsedColumn(), TimeRemainingColumn(), console=console)
        self.tasks = {}

    def __enter__(self):
        self.p.start()
        return self

    def __exit__(self, *exc):
        self.p.stop()

    def start(self, name, total, completed=0):
        self.tasks[name] = self.p.add_task(name, total=total, completed=completed, loss="-", acc="-")

    def update(self, name, step, loss=None, acc=None):
        kw = {"completed": step}
        if loss is not None:
            kw["loss"] = f"{loss:.3f}"
        if acc is not None:
            kw["acc"] = f"{acc:.3f}"
        self.p.update(self.tasks[name], **kw)

    def finish(self, name):
        t = self.tasks[name]
        self.p.update(t, completed=self.p.tasks[[x.id for x in self.p.tasks].index(t)].total)


def _jsonable(o):
    if isinstance(o, (tuple, list)):
        return [_jsonable(x) for x in o]
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, Path):
        return str(o)
    return o


def _print_summary(console, exp: Experiment, metrics: Dict) -> None:
    from rich.table import Table

    runs = metrics["runs"]
    thr = metrics["config"].get("threshold")
    key = f"{float(thr):.2f}" if thr is not None else None
    from rich import box
    t = Table(box=box.SIMPLE_HEAD, caption="final/best: test accuracy; to X: steps to reach X; unit: the "
              "typical unit; p50 rng: range of its 50th percentile; rng/sprd: that range / mean 15-85 spread",
              title=f"{exp.name}: {metrics['dataset'].get('name')} "
                    f"({metrics['dataset'].get('train')} train / {metrics['dataset'].get('test')} test)")
    for c in ["run", "final", "best", f"to {key}", "unit", "p50 rng", "rng/sprd", "ms/step"]:
        t.add_column(c, justify="left" if c == "run" else "right", no_wrap=True)
    f = lambda v, d=3: "-" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))
    for r in runs.values():
        s = r["summary"]
        t.add_row(r["name"], f(s["final_acc"]), f(s["best_acc"]), f(s["steps_to"].get(key)),
                  str(r["typical_unit"]), f(s["drift"]["range"]), f(s["drift"]["relative"], 2),
                  f(r["timing"]["ms_per_step"], 2))
    console.print(t)
    checks = metrics["summary"].get("checks")
    if checks:
        ct = Table(title="checks (Figure 1 targets)")
        ct.add_column("check")
        ct.add_column("result")
        ct.add_column("detail")
        for name, c in checks.items():
            detail = {k: v for k, v in c.items() if k != "pass"}
            txt = "; ".join(f"{k}={_short(v)}" for k, v in detail.items())
            ct.add_row(name, "[green]PASS[/]" if c.get("pass") else "[red]FAIL[/]", txt)
        console.print(ct)


def _short(v):
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list):
        return "[" + ", ".join(_short(x) for x in v) + "]"
    return str(v)


def run_experiment(name: str, overrides: Optional[Dict] = None, *, out: Optional[Path] = None,
                   resume: bool = False, quiet: bool = False, stop_after: Optional[int] = None,
                   console=None) -> Dict:
    """Run (or resume) an experiment; returns the metrics dict (also in ``<out>/metrics.json``)."""
    import torch

    from .data import load_dataset
    from .report import environment, write_report
    from .train import StepBudget, atomic_write_text, train_run

    exp = get_experiment(name)
    mod = exp.load()
    if console is None:
        from rich.console import Console
        console = Console(stderr=False, quiet=quiet)

    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if resume:
        out = Path(out) if out else latest_run_dir(name)
        if out is None or not (out / "config.json").exists():
            raise SystemExit(f"bnkit: nothing to resume: no {'config.json in ' + str(out) if out else 'runs/' + name + '-* directory'}")
        cfg = json.loads((out / "config.json").read_text())
        ignored = {k: v for k, v in overrides.items() if _jsonable(v) != cfg.get(k)}
        if ignored:
            console.print(f"[yellow]--resume uses the saved settings of {out}; ignoring {ignored}[/]")
        console.print(f"resuming [bold]{out}[/]")
    else:
        cfg = dict(mod.DEFAULTS)
        unknown = set(overrides) - set(cfg)
        if unknown:
            raise SystemExit(f"bnkit: experiment {name} has no setting(s) {sorted(unknown)}")
        cfg.update(overrides)
        cfg = _jsonable(cfg)
        if out is None:
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            out = Path("runs") / f"{name}-{stamp}"
            i = 1
            while out.exists():
                out = Path("runs") / f"{name}-{stamp}-{i}"
                i += 1
        out = Path(out)
        if (out / "config.json").exists():
            raise SystemExit(f"bnkit: {out} already holds an experiment; use --resume to continue it or "
                             f"choose another --out")
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.json", json.dumps(cfg, indent=1))

    torch.set_num_threads(int(cfg.get("threads") or 1))
    t0 = time.perf_counter()
    data = load_dataset(cfg["data"], cfg.get("data_dir"), binarize=bool(cfg.get("binarize")),
                        normalize=cfg.get("normalize", "none"))
    console.print(f"[bold]{exp.title}[/]\n{data.describe()}; output: {out}")
    runs = mod.make_runs(cfg)
    budget = StepBudget(stop_after)
    results: Dict[str, Dict] = {}
    from .train import NullProgress
    prog_cm = RichProgress(console) if not quiet else None
    progress = prog_cm or NullProgress()
    try:
        if prog_cm:
            prog_cm.__enter__()
        for rc in runs:
            results[rc.name] = train_run(rc, data, out, resume=resume, progress=progress, budget=budget,
                                         jsonl=out / "metrics.jsonl")
            resume = True  # later runs in the same call may also have partial state (never with fresh dirs)
    finally:
        if prog_cm:
            prog_cm.__exit__(None, None, None)

    summary = mod.summarize(cfg, results)
    metrics = {
        "experiment": name, "out_dir": str(out), "config": cfg, "dataset": {"name": data.name, **data.provenance,
                                                                           "train": len(data.y_train), "test": len(data.y_test)},
        "summary": summary, "runs": results, "environment": environment(),
        "finished": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "wall_seconds_this_call": time.perf_counter() - t0,
    }
    atomic_write_text(out / "metrics.json", json.dumps(_jsonable(metrics), indent=1))
    fig = out / exp.figure
    mod.plot(cfg, results, summary, fig)
    from . import diagnostics
    write_report(out / "report.html", metrics, [fig], title=exp.title, intro=mod.__doc__ or "",
                 notes=diagnostics.__doc__)
    if not quiet:
        _print_summary(console, exp, metrics)
        console.print(f"wrote {out / 'metrics.json'}, {fig}, {out / 'report.html'} "
                      f"({time.perf_counter() - t0:.0f} s)")
    return metrics


def list_text() -> List[str]:
    from .data import DATASETS
    lines = ["experiments:"]
    for e in EXPERIMENTS.values():
        lines.append(f"  {e.name:<14} {e.title}")
    lines.append("datasets:")
    for d in DATASETS.values():
        lines.append(f"  {d.name:<14} {d.description}{'  [needs --data-dir]' if d.needs_dir else ''}")
    from .models import NORMS, norm_available
    missing = [n for n in NORMS if n != "in" and not norm_available(n)]
    lines.append("norms (models): " + " ".join(NORMS) +
                 (f"  [not available in this build yet: {' '.join(missing)}]" if missing else ""))
    return lines
