"""Terminal output of an experiment: the live progress bars and the summary tables."""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict

if TYPE_CHECKING:
    from .registry import Experiment

__all__ = ["RichProgress"]


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



def _print_summary(console, exp: Experiment, metrics: Dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    runs = metrics["runs"]
    if runs:
        _print_runs(console, exp, metrics, runs)
    checks = metrics["summary"].get("checks")
    if checks:
        ct = Table(title=f"checks ({exp.name})")
        ct.add_column("check")
        ct.add_column("result")
        ct.add_column("detail", overflow="fold")
        for name, c in checks.items():
            detail = {k: v for k, v in c.items() if k != "pass"}
            txt = escape("; ".join(f"{k}={_short(v)}" for k, v in detail.items()))
            ct.add_row(name, "[green]PASS[/]" if c.get("pass") else "[red]FAIL[/]", txt)
        console.print(ct)


def _print_runs(console, exp: Experiment, metrics: Dict, runs: Dict) -> None:
    """The table of training runs (an experiment such as ``cost`` has none)."""
    from rich.table import Table

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


def _short(v) -> str:
    """A check's detail value for the terminal: floats to 3 significant digits, recursively."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_short(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_short(x)}" for k, x in v.items()) + "}"
    return str(v)
