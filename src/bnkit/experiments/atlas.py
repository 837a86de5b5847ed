"""The atlas (``bnkit report [RUNS_DIR]``): one self-contained HTML page indexing every finished experiment
under a directory, with each run's figure (an embedded thumbnail), its checks and their numbers, and a
relative link to its full ``report.html``.

An experiment directory is one holding ``config.json``: *finished* when ``metrics.json`` is there too
(written once every run is done), *unfinished* otherwise (interrupted or still running). The directories
are found at any depth up to :data:`MAX_DEPTH` below ``RUNS_DIR`` (``bnkit run all`` nests them one level
down) and are never descended into. Damaged ones (unreadable or malformed ``metrics.json``, a figure that
does not decode) are listed with the reason instead of failing the page. Runs are grouped by experiment in
the registry's order, newest first within a group; the page is written atomically, like every other output.
"""
from __future__ import annotations

import datetime as _dt
import html
import io
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from urllib.parse import quote

from .report import _img, checks_table, page_head

__all__ = ["AtlasError", "AtlasEntry", "scan_runs", "render_atlas", "write_atlas", "MAX_DEPTH", "THUMB_WIDTH"]

MAX_DEPTH = 4  # directory levels below RUNS_DIR searched for experiments
THUMB_WIDTH = 560  # pixels; figures wider than this are embedded scaled down

_TIME_FORMAT = "%Y-%m-%d %H:%M:%S UTC"  # the format of metrics.json's "finished"

_ATLAS_CSS = """
.run{border:1px solid #ddd;border-radius:6px;padding:.4em 1em 1em;margin:1em 0}
.run h3{margin:.4em 0} .cols{display:flex;flex-wrap:wrap;gap:1.2em;align-items:flex-start}
.cols>div{flex:1 1 420px;min-width:0} .thumb img{max-width:100%;height:auto}
table.meta th{width:9em} .badge{font-weight:600}
"""


class AtlasError(ValueError):
    """A bad ``RUNS_DIR`` or ``--out``, or nothing to index (the CLI prints it as one line)."""


@dataclass
class AtlasEntry:
    """One experiment directory found by :func:`scan_runs`."""
    path: Path
    experiment: str  # the registry name, or "?" when it cannot be told
    status: str  # "finished", "unfinished" or "skipped"
    reason: str = ""  # why an entry is unfinished or skipped
    metrics: Dict = field(default_factory=dict)
    when: float = 0.0  # POSIX time: finished (or started, for unfinished) -- the sort key

    @property
    def checks(self) -> Dict:
        s = self.metrics.get("summary")
        c = s.get("checks") if isinstance(s, dict) else None
        return c if isinstance(c, dict) else {}


def _utc(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime(_TIME_FORMAT)


def _finished_time(metrics: Dict, fallback: float) -> float:
    try:
        return _dt.datetime.strptime(str(metrics.get("finished")), _TIME_FORMAT).replace(
            tzinfo=_dt.timezone.utc).timestamp()
    except ValueError:
        return fallback


def _name_from_dir(d: Path) -> str:
    """The experiment of a directory without metrics.json: ``NAME`` (inside ``bnkit run all``'s directory)
    or ``NAME-<timestamp>`` (the default ``--out``); the longest registered name that fits."""
    from .registry import EXPERIMENTS
    fits = [n for n in EXPERIMENTS if d.name == n or d.name.startswith(n + "-")]
    return max(fits, key=len) if fits else "?"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _entry(d: Path) -> AtlasEntry:
    cfg, met = d / "config.json", d / "metrics.json"
    if not met.exists():
        try:
            started = cfg.stat().st_mtime
        except OSError:
            started = 0.0
        name = _name_from_dir(d)
        # quoted: a directory name with spaces or '#' must survive being pasted into a shell
        how = shlex.join(["bnkit", "run", name if name != "?" else "NAME", "--resume", "--out", str(d)])
        return AtlasEntry(d, name, "unfinished", f"no metrics.json yet (interrupted or still running; "
                                                 f"continue with `{how}`)", when=started)
    if not cfg.exists():
        return AtlasEntry(d, _name_from_dir(d), "skipped", "metrics.json without config.json: not a bnkit "
                                                           "experiment directory")
    try:
        metrics = json.loads(met.read_text(encoding="utf-8"))
        mtime = met.stat().st_mtime
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        return AtlasEntry(d, _name_from_dir(d), "skipped", f"metrics.json is unreadable ({_first_line(e)})")
    if not isinstance(metrics, dict):
        return AtlasEntry(d, _name_from_dir(d), "skipped",
                          f"metrics.json holds a {type(metrics).__name__}, not an experiment's metrics")
    name = metrics.get("experiment")
    if not isinstance(name, str) or not name:
        return AtlasEntry(d, _name_from_dir(d), "skipped", "metrics.json names no experiment")
    return AtlasEntry(d, name, "finished", metrics=metrics, when=_finished_time(metrics, mtime))


def scan_runs(runs_dir: Path, max_depth: int = MAX_DEPTH) -> List[AtlasEntry]:
    """Every experiment directory under ``runs_dir`` (itself included), in no particular order; a
    directory that cannot be listed is returned as a skipped entry."""
    root = Path(runs_dir)
    found: List[AtlasEntry] = []

    def unreadable(err: OSError) -> None:
        found.append(AtlasEntry(Path(err.filename or root), "?", "skipped",
                                f"cannot list the directory ({err.strerror or err})"))

    # symbolic links are followed (a run linked in from elsewhere), each real directory visited once
    # (no loops, no run listed twice)
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        d = Path(dirpath)
        real = os.path.realpath(d)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        if "config.json" in filenames or "metrics.json" in filenames:
            found.append(_entry(d))
            dirnames[:] = []  # its runs/ and checkpoints/ belong to it
            continue
        depth = len(d.relative_to(root).parts)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".")) if depth < max_depth else []
    return found


def _order(entries: List[AtlasEntry]) -> List[Tuple[str, List[AtlasEntry]]]:
    """Finished entries grouped by experiment (registry order, then unknown names A-Z), newest first."""
    from .registry import EXPERIMENTS
    groups: Dict[str, List[AtlasEntry]] = {}
    for e in entries:
        if e.status == "finished":
            groups.setdefault(e.experiment, []).append(e)
    known = list(EXPERIMENTS)
    names = sorted(groups, key=lambda n: (known.index(n), "") if n in known else (len(known), n))
    return [(n, sorted(groups[n], key=lambda e: (-e.when, str(e.path)))) for n in names]


def _href(target: Path, page: Path) -> str:
    """A relative URL from the page's directory to ``target`` (percent-encoded)."""
    try:
        rel = os.path.relpath(Path(target).resolve(), Path(page).resolve().parent)
    except ValueError:  # another drive (Windows): an absolute file URL
        return Path(target).resolve().as_uri()
    return quote(Path(rel).as_posix())


def _thumbnail(png: Path) -> bytes:
    """The figure as PNG bytes, scaled down to :data:`THUMB_WIDTH` pixels wide; raises when it does not
    decode (a half-written or damaged file)."""
    from PIL import Image  # matplotlib's own dependency

    with Image.open(png) as im:
        im.load()
        if im.width > THUMB_WIDTH:
            im = im.resize((THUMB_WIDTH, max(1, round(im.height * THUMB_WIDTH / im.width))),
                           Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _figure_path(e: AtlasEntry) -> Optional[Path]:
    from .registry import EXPERIMENTS
    exp = EXPERIMENTS.get(e.experiment)
    if exp is not None:
        return e.path / exp.figure
    pngs = sorted(e.path.glob("*.png"))
    return pngs[0] if pngs else None


def _seconds(v) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v or v < 0:
        return "-"
    if v < 60:
        return f"{v:.1f} s"
    m, s = divmod(int(round(v)), 60)
    return f"{m} min {s} s" if m < 60 else f"{m // 60} h {m % 60} min"


def _dataset(metrics: Dict) -> str:
    ds = metrics.get("dataset")
    if not isinstance(ds, dict):
        return "-"
    sizes = [f"{ds[k]} {k}" for k in ("train", "test") if isinstance(ds.get(k), int)]
    return str(ds.get("name", "-")) + (f" ({', '.join(sizes)})" if sizes else "")


def _shown(path: Path, root: Path) -> str:
    """``path`` relative to RUNS_DIR (``all-.../fig1`` says more than ``fig1``)."""
    try:
        rel = Path(path).relative_to(root)
    except ValueError:
        return str(path)
    return rel.as_posix() if rel.parts else Path(root).resolve().name


def _run_card(e: AtlasEntry, page: Path, title: str, root: Path) -> str:
    m, esc = e.metrics, html.escape
    report = e.path / "report.html"
    link = _href(report, page) if report.is_file() else None
    checks = e.checks
    n_pass = sum(1 for c in checks.values() if isinstance(c, dict) and c.get("pass"))
    shown = esc(_shown(e.path, root))
    head = shown if link is None else f"<a href=\"{esc(link)}\">{shown}</a>"
    badge = (f" <span class=\"badge {'pass' if n_pass == len(checks) else 'fail'}\">{n_pass}/{len(checks)} "
             f"checks pass</span>" if checks else "")
    runs = m.get("runs")
    rows = [("title", esc(title)), ("experiment", f"<code>{esc(e.experiment)}</code>"),
            ("finished", esc(str(m.get("finished") or _utc(e.when)))), ("dataset", esc(_dataset(m))),
            ("runs", esc(str(len(runs))) if isinstance(runs, dict) else "-"),
            ("wall time", esc(_seconds(m.get("wall_seconds_this_call"))) + " <span class=\"muted\">(last call)</span>"),
            ("directory", f"<code>{esc(str(e.path))}</code>"),
            ("report", f"<a href=\"{esc(link)}\">report.html</a>" if link else
             "<span class=\"fail\">no report.html</span>")]
    meta = "<table class=\"meta\">" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"

    fig = _figure_path(e)
    if fig is None or not fig.is_file():
        figure = f"<p class=\"fail\">no figure{f' ({esc(fig.name)} is missing)' if fig else ''}</p>"
    else:
        try:
            img = _img(_thumbnail(fig), f"{e.experiment}: {fig.name}")
            figure = f"<a href=\"{esc(link)}\">{img}</a>" if link else img
        except Exception as err:  # noqa: BLE001 - any decoding failure: say so, keep the page
            figure = f"<p class=\"fail\">{esc(fig.name)} does not decode ({esc(_first_line(err))})</p>"
    checks_html = checks_table(checks) if checks else "<p class=\"muted\">no checks in metrics.json</p>"
    return (f"<section class=\"run\"><h3>{head}{badge}</h3><div class=\"cols\"><div class=\"thumb\">{figure}</div>"
            f"<div>{meta}</div></div><h4>Checks</h4>{checks_html}</section>")


def render_atlas(entries: List[AtlasEntry], *, runs_dir: Path, page: Path, written: Optional[str] = None) -> str:
    """The atlas page for ``entries`` (from :func:`scan_runs`); links are relative to ``page``'s directory."""
    from .registry import EXPERIMENTS
    esc = html.escape
    groups = _order(entries)
    others = sorted((e for e in entries if e.status != "finished"), key=lambda e: str(e.path))
    n_fin = sum(len(g) for _, g in groups)
    written = written or _utc(_dt.datetime.now(_dt.timezone.utc).timestamp())
    parts = [page_head("bnkit experiments: atlas", _ATLAS_CSS), "<h1>bnkit experiments</h1>",
             f"<p class=\"muted\">{n_fin} finished experiment run{'s' * (n_fin != 1)} in <code>{esc(str(runs_dir))}"
             f"</code>{f', {len(others)} unfinished or skipped' if others else ''}; written {esc(written)} by "
             f"<code>bnkit report</code>. Each figure links to its full report (every run, the settings, the "
             f"dataset's provenance); the raw numbers are in each directory's metrics.json.</p>"]
    toc = []
    for name, runs in groups:
        exp = EXPERIMENTS.get(name)
        last = runs[0].checks
        ok = sum(1 for c in last.values() if isinstance(c, dict) and c.get("pass"))
        toc.append(f"<tr><td><a href=\"#exp-{esc(quote(name))}\">{esc(name)}</a></td>"
                   f"<td>{esc(exp.title if exp else name)}</td><td class=\"num\">{len(runs)}</td>"
                   f"<td>{esc(str(runs[0].metrics.get('finished') or _utc(runs[0].when)))}</td>"
                   + (f"<td class=\"{'pass' if ok == len(last) else 'fail'}\">{ok}/{len(last)}</td></tr>" if last
                      else "<td>-</td></tr>"))
    parts.append("<table class=\"toc\"><thead><tr><th>experiment</th><th>what</th><th>runs</th>"
                 "<th>newest</th><th>checks passed (newest)</th></tr></thead><tbody>" + "".join(toc) +
                 "</tbody></table>")
    for name, runs in groups:
        exp = EXPERIMENTS.get(name)
        title = exp.title if exp else name
        parts.append(f"<h2 id=\"exp-{esc(quote(name))}\">{esc(title)} <span class=\"muted\">"
                     f"(<code>{esc(name)}</code>, {len(runs)} run{'s' * (len(runs) != 1)})</span></h2>")
        parts.extend(_run_card(e, page, title, runs_dir) for e in runs)
    if others:
        rows = "".join(f"<tr><td><code>{esc(str(e.path))}</code></td><td>{esc(e.experiment)}</td>"
                       f"<td class=\"fail\">{esc(e.status)}</td><td>{esc(e.reason)}</td></tr>" for e in others)
        parts.append("<h2 id=\"unfinished\">Unfinished and skipped directories</h2><table class=\"others\"><thead>"
                     "<tr><th>directory</th><th>experiment</th><th>status</th><th>reason</th></tr></thead>"
                     f"<tbody>{rows}</tbody></table>")
    parts.append("<p class=\"muted\">Generated by bnkit; self-contained (the figures are embedded).</p>"
                 "</body></html>\n")
    return "\n".join(parts)


def write_atlas(runs_dir: Path = Path("runs"), out: Optional[Path] = None) -> Tuple[Path, List[AtlasEntry]]:
    """Scan ``runs_dir`` and write the atlas to ``out`` (default ``runs_dir/index.html``), atomically;
    returns the page's path and the entries. Raises :class:`AtlasError` (nothing written) when
    ``runs_dir`` is not a directory, ``out`` cannot be written, or no experiment has finished."""
    from .train import atomic_write_text

    runs_dir = Path(runs_dir)
    if not runs_dir.exists():
        raise AtlasError(f"{runs_dir} does not exist (give the directory holding the experiment runs)")
    if not runs_dir.is_dir():
        raise AtlasError(f"{runs_dir} is not a directory")
    out = Path(out) if out is not None else runs_dir / "index.html"
    if out.is_dir():
        raise AtlasError(f"--out {out} is a directory; give a file name")
    if not out.parent.is_dir():
        raise AtlasError(f"--out {out}: the directory {out.parent} does not exist")
    entries = scan_runs(runs_dir)
    n_fin = sum(e.status == "finished" for e in entries)
    if not n_fin:
        rest = f" ({len(entries)} unfinished or skipped)" if entries else ""
        raise AtlasError(f"no finished experiment runs in {runs_dir}{rest}; run one with `bnkit run NAME`")
    text = render_atlas(entries, runs_dir=runs_dir, page=out)
    try:
        atomic_write_text(out, text)
    except OSError as e:
        raise AtlasError(f"cannot write {out} ({e.strerror or e})") from None
    return out, entries
