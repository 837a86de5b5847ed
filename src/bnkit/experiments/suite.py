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
    from .options import ConfigError, validate_config
    from .registry import _fresh_out_dir, _jsonable, get_experiment, run_experiment
    from .train import atomic_write_text

    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    exps = [get_experiment(n) for n in names]
    defaults = {e.name: e.load().DEFAULTS for e in exps}
    unknown = [k for k in overrides if not any(k in d for d in defaults.values())]
    if unknown:  # what `run NAME --set` says; silently dropping it would run other settings than asked
        raise ConfigError(f"--set {unknown[0]}: no such setting in any experiment of the suite "
                          f"({', '.join(names)})")
    if execution:  # a bad --executor/--tensorboard is reported before the suite's directory is made
        from .registry import _check_run_options
        _check_run_options("all", execution.get("jobs"), execution.get("executor") or "local",
                           execution.get("address"), execution.get("tensorboard"))
    if resume:
        if out is None:
            out = latest_suite_dir()
            if out is None:
                raise ConfigError("nothing to resume: no runs/all-* directory; give --out DIR")
        out = Path(out)
        if not out.exists():
            raise ConfigError(f"nothing to resume: {out} does not exist")
        if not out.is_dir():
            raise ConfigError(f"nothing to resume: {out} is a file, not a suite directory")
    else:
        out = _fresh_out_dir("all", Path(out) if out is not None else None)
    # every experiment's settings, checked before the first one starts (each checks its data itself
    # before its directory, and the suite's, is made)
    for e in exps:
        if not (resume and ((out / e.name / "config.json").exists() or (out / e.name / "metrics.json").exists())):
            validate_config(e, _jsonable({**defaults[e.name], **_own(overrides, defaults[e.name])}))
    entries: List[Dict] = []
    for exp in exps:
        n, d = exp.name, out / exp.name
        if resume and (d / "metrics.json").exists():
            m = _read_metrics(d / "metrics.json")
        elif resume and (d / "config.json").exists():
            m = run_experiment(n, {}, out=d, resume=True, quiet=quiet, stop_after=stop_after, console=console,
                               **execution)
        else:
            m = run_experiment(n, _own(overrides, defaults[n]), out=d, quiet=quiet, stop_after=stop_after,
                               console=console, **execution)
        checks = (m.get("summary") or {}).get("checks") or {}
        entries.append({"experiment": n, "title": exp.title, "report": f"{n}/report.html",
                        "figure": f"{n}/{exp.figure}", "metrics": f"{n}/metrics.json",
                        "checks": {k: bool(c.get("pass")) for k, c in checks.items()},
                        "wall_seconds": m.get("wall_seconds_this_call"), "finished": m.get("finished")})
    index = {"out_dir": str(out), "experiments": entries,
             "written": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}
    out.mkdir(parents=True, exist_ok=True)  # made by the first experiment, unless there is none
    atomic_write_text(out / "index.json", json.dumps(index, indent=1))
    atomic_write_text(out / "index.html", render_index(index))
    if console is not None and not quiet:
        console.print(f"wrote {out / 'index.html'}")
    return index


def _own(overrides: Dict, defaults: Dict) -> Dict:
    """The settings of the command line that an experiment has."""
    return {k: v for k, v in overrides.items() if k in defaults}


def _read_metrics(path: Path) -> Dict:
    from .options import ConfigError
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ConfigError(f"cannot resume: {path} is unreadable ({type(e).__name__}); delete it to finish "
                          f"that experiment again") from None
    if not isinstance(m, dict):
        raise ConfigError(f"cannot resume: {path} does not hold an experiment's metrics")
    return m


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
