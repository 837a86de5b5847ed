"""``bnkit run all``: every experiment with its defaults, one after the other, each in its own
sub-directory of one output directory, and an ``index.html`` (plus ``index.json``) linking their reports
with every check's PASS/FAIL. ``--resume`` skips the finished experiments and resumes the interrupted one.
Settings given on the command line go to every experiment that has them (e.g. ``--data``, ``--seeds``)."""
from __future__ import annotations

import datetime as _dt
import html
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = ["SUITE", "run_all", "render_index", "latest_suite_dir"]

# the order of `bnkit run all` (norms, the older table, is covered by variants)
SUITE = ("fig1", "lr", "init", "dropout", "batchsize", "variants", "cnn", "cost")


def latest_suite_dir(root: Path = Path("runs")) -> Optional[Path]:
    c = sorted(p for p in Path(root).glob("all-*") if p.is_dir())
    return c[-1] if c else None


def run_all(overrides: Optional[Dict] = None, *, out: Optional[Path] = None, resume: bool = False,
            quiet: bool = False, stop_after: Optional[int] = None, names: Sequence[str] = SUITE,
            console=None, **execution) -> Dict:
    """Run (or resume) every experiment in ``names``; returns the index dict (also ``out/index.json``).
    ``execution``: ``jobs``, ``executor``, ``address``, ``tensorboard`` of every experiment's
    :func:`.registry.run_experiment`."""
    from .registry import get_experiment, run_experiment
    from .train import atomic_write_text

    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    for n in names:
        get_experiment(n)
    if execution:  # a bad --executor/--tensorboard is reported before the suite's directory is made
        from .registry import _check_run_options
        _check_run_options("all", execution.get("jobs"), execution.get("executor") or "local",
                           execution.get("address"), execution.get("tensorboard"))
    if out is None:
        if resume:
            out = latest_suite_dir()
            if out is None:
                raise SystemExit("bnkit: nothing to resume: no runs/all-* directory")
        else:
            out = Path("runs") / f"all-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries: List[Dict] = []
    for n in names:
        exp = get_experiment(n)
        d = out / n
        if resume and (d / "metrics.json").exists():
            m = json.loads((d / "metrics.json").read_text())
        elif resume and (d / "config.json").exists():
            m = run_experiment(n, {}, out=d, resume=True, quiet=quiet, stop_after=stop_after, console=console,
                               **execution)
        else:
            defaults = exp.load().DEFAULTS
            ov = {k: v for k, v in overrides.items() if k in defaults}
            m = run_experiment(n, ov, out=d, quiet=quiet, stop_after=stop_after, console=console, **execution)
        checks = (m.get("summary") or {}).get("checks") or {}
        entries.append({"experiment": n, "title": exp.title, "report": f"{n}/report.html",
                        "figure": f"{n}/{exp.figure}", "metrics": f"{n}/metrics.json",
                        "checks": {k: bool(c.get("pass")) for k, c in checks.items()},
                        "wall_seconds": m.get("wall_seconds_this_call"), "finished": m.get("finished")})
    index = {"out_dir": str(out), "experiments": entries,
             "written": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}
    atomic_write_text(out / "index.json", json.dumps(index, indent=1))
    atomic_write_text(out / "index.html", render_index(index))
    if console is not None and not quiet:
        console.print(f"wrote {out / 'index.html'}")
    return index


def render_index(index: Dict) -> str:
    """A self-contained page: one row per experiment, linking its report, with its checks."""
    rows = []
    for e in index["experiments"]:
        n_pass = sum(e["checks"].values())
        checks = "<br>".join(f"<span class=\"{'pass' if ok else 'fail'}\">{'PASS' if ok else 'FAIL'}</span> "
                             f"{html.escape(k)}" for k, ok in e["checks"].items()) or "-"
        wall = e.get("wall_seconds")
        rows.append(f"<tr><td><a href=\"{html.escape(e['report'])}\">{html.escape(e['experiment'])}</a></td>"
                    f"<td>{html.escape(e['title'])}</td><td>{n_pass}/{len(e['checks'])}</td><td>{checks}</td>"
                    f"<td class=\"num\">{'-' if wall is None else f'{wall:.0f}'}</td></tr>")
    css = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
           "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;"
           "vertical-align:top}th{background:#f4f4f4}.pass{color:#0a7d28;font-weight:600}"
           ".fail{color:#b3261e;font-weight:600}td.num{text-align:right}")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>bnkit experiments</title>"
            f"<style>{css}</style></head><body><h1>bnkit experiments</h1>"
            f"<p>Output directory <code>{html.escape(index['out_dir'])}</code>, written {html.escape(index['written'])}. "
            "Each report has the figure, the checks with the numbers they used, every run and the settings; "
            "the raw series are in each experiment's metrics.json.</p>"
            "<table><thead><tr><th>experiment</th><th>what</th><th>checks passed</th><th>checks</th>"
            "<th>seconds (last call)</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table></body></html>\n")
