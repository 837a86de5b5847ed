"""A self-contained HTML report: no external resources (images are base64 data URIs, CSS is inline)."""
from __future__ import annotations

import base64
import html
import json
import platform
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = ["render_report", "write_report", "save_figure", "fmt", "doc_html", "page_head", "checks_table"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em} th,td{border:1px solid #ccc;padding:.25em .6em;
text-align:left;vertical-align:top} th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#0a7d28;font-weight:600} .fail{color:#b3261e;font-weight:600} img{max-width:100%;border:1px solid #eee}
code,pre{background:#f6f6f6;padding:.1em .3em;border-radius:3px} pre{padding:.6em;overflow-x:auto}
.muted{color:#666;font-size:.9em} .pl{white-space:pre-line}
"""


def fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            return str(v)
        if abs(v) >= 1000 and float(v).is_integer():
            return f"{int(v)}"
        return f"{v:.{digits}g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x, digits) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, default=str)
    return str(v)


def _inline(text: str) -> str:
    """One paragraph of docstring text to HTML: escaped, reST roles and ``literals`` as <code>."""
    t = html.escape(text, quote=False)
    t = re.sub(r":[\w.]+:`~?([^`]+)`", r"<code>\1</code>", t)
    t = re.sub(r"``([^`]+)``", r"<code>\1</code>", t)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    t = re.sub(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])", r"<em>\1</em>", t)
    return t.replace(" -- ", " &ndash; ")


_BULLET = re.compile(r"^\s*[*-]\s+")


def doc_html(text: str) -> str:
    """A docstring (paragraphs, ``*``/``-`` bullet lists, reST inline markup) as HTML paragraphs and lists,
    so a report shows text rather than raw markup."""
    out = []
    for para in re.split(r"\n\s*\n", text.strip()):
        lines = [ln.strip() for ln in para.strip().splitlines() if ln.strip()]
        if not lines:
            continue
        first = next((i for i, ln in enumerate(lines) if _BULLET.match(ln)), None)
        head = lines if first is None else lines[:first]
        if head:
            out.append(f"<p>{_inline(' '.join(head))}</p>")
        if first is not None:
            items: List[str] = []
            for ln in lines[first:]:
                if _BULLET.match(ln):
                    items.append(_BULLET.sub("", ln))
                else:
                    items[-1] += " " + ln
            out.append("<ul>" + "".join(f"<li>{_inline(it)}</li>" for it in items) + "</ul>")
    return "".join(out)


def _steps(v):
    """A mean over seeds of a step count, shown as a whole step (None stays None)."""
    return None if v is None else int(round(float(v)))


def _brief(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_brief(x) for x in v) + "]"
    if isinstance(v, dict):
        return "; ".join(f"{k}: {_brief(x)}" for k, x in v.items())
    return "-" if v is None else str(v)


def _e(v) -> str:
    return html.escape(fmt(v))


def _kv_table(d: Dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_e(v)}</td></tr>" for k, v in d.items())
    return f"<table>{rows}</table>"


def _table(header: Sequence[str], rows: List[Sequence]) -> str:
    h = "".join(f"<th>{html.escape(str(x))}</th>" for x in header)
    body = ""
    for r in rows:
        body += "<tr>" + "".join(
            f"<td class=\"num\">{_e(x)}</td>" if isinstance(x, (int, float)) and not isinstance(x, bool)
            else f"<td>{_e(x)}</td>" for x in r) + "</tr>"
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _img(path, alt: str) -> str:
    """An ``<img>`` with the PNG embedded as a data URI (``path``: a file, or the PNG's bytes)."""
    raw = path if isinstance(path, (bytes, bytearray)) else Path(path).read_bytes()
    data = base64.b64encode(raw).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


# The page may load nothing but itself: inline CSS and data: images. The browser enforces it, and reports a
# violation on the console, so a stray external resource cannot slip in unnoticed.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def page_head(title: str, css: str = "") -> str:
    """The start of a self-contained page, up to and including ``<body>``: charset, viewport, the
    content-security policy above, the title and the shared CSS (plus ``css``)."""
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{_CSP}\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}{css}</style></head><body>")


def checks_table(checks: Dict) -> str:
    """``summary.checks`` as a table: one row per check, PASS/FAIL and the numbers it used."""
    body = ""
    for name, c in checks.items():
        c = c if isinstance(c, dict) else {"pass": False, "value": c}
        ok = bool(c.get("pass"))
        detail = {k: v for k, v in c.items() if k != "pass"}
        body += (f"<tr><td>{html.escape(str(name))}</td><td class=\"{'pass' if ok else 'fail'}\">"
                 f"{'PASS' if ok else 'FAIL'}</td><td>{html.escape(_brief(detail))}</td></tr>")
    return ("<table class=\"checks\"><thead><tr><th>check</th><th>result</th><th>detail</th></tr></thead>"
            f"<tbody>{body}</tbody></table>")


def render_report(metrics: Dict, images: Sequence[Path], *, title: str, intro: str = "",
                  notes: Optional[str] = None) -> str:
    cfg = metrics.get("config", {})
    summary = metrics.get("summary", {})
    parts = [page_head(title),
             f"<h1>{html.escape(title)}</h1>",
             f"<p class=\"muted\">experiment <code>{html.escape(str(metrics.get('experiment')))}</code>, "
             f"output directory <code>{html.escape(str(metrics.get('out_dir', '')))}</code>, "
             f"finished {html.escape(str(metrics.get('finished', '')))}</p>"]
    if intro:
        parts.append(doc_html(intro))
    for img in images:
        parts.append(f"<h2>Figure</h2><p>{_img(img, Path(img).name)}</p>")

    checks = summary.get("checks")
    if checks:
        parts.append("<h2>Checks</h2>" + checks_table(checks))

    variants = [k for k, v in summary.items() if isinstance(v, dict) and "final_acc" in v]
    if variants:
        keys = sorted({k for v in variants for k in summary[v]["steps_to"]})
        header = ["variant", "final acc (mean)", "best acc (mean)"] + [f"steps to {k} (mean)" for k in keys] + \
                 ["drift: 50th pct range", "drift / 15-85 spread", "ms / step"]
        rows = []
        for v in variants:
            s = summary[v]
            d = s.get("drift") or {}
            rows.append([v, s["final_acc"], s.get("best_acc")] + [_steps(s["steps_to"].get(k)) for k in keys] +
                        [d.get("range"), d.get("relative"), s.get("ms_per_step")])
        parts.append("<h2>Summary (mean over seeds)</h2>" + _table(header, rows) +
                     "<p class=\"muted\">steps to X: the first evaluated step with test accuracy &ge; X, "
                     "averaged over the seeds and rounded to a whole step (- when a seed never reached X); "
                     "accuracies and drifts to 4 significant digits.</p>")

    runs = metrics.get("runs", {})
    if runs:
        keys = sorted({k for r in runs.values() for k in r["summary"]["steps_to"]})
        header = ["run", "norm", "seed", "final acc", "best acc"] + [f"steps to {k}" for k in keys] + \
                 ["typical unit", "50th pct range", "relative drift", "ms / step"]
        rows = [[r["name"], r["norm"], r["seed"], r["summary"]["final_acc"], r["summary"]["best_acc"]] +
                [r["summary"]["steps_to"].get(k) for k in keys] +
                [r.get("typical_unit"), r["summary"]["drift"]["range"], r["summary"]["drift"]["relative"],
                 r["timing"]["ms_per_step"]] for r in runs.values()]
        parts.append("<h2>Runs</h2>" + _table(header, rows))

    parts.append("<h2>Settings</h2>" + _kv_table(cfg))
    ds = metrics.get("dataset", {})
    if ds:
        parts.append("<h2>Dataset provenance</h2>" + _kv_table(ds))
    env = metrics.get("environment", {})
    if env:
        parts.append("<h2>Environment</h2>" + _kv_table(env))
    if notes:
        parts.append("<h2>Definitions</h2>" + doc_html(notes))
    parts.append("<p class=\"muted\">Generated by bnkit. The raw numbers are in metrics.json and metrics.jsonl "
                 "next to this file.</p></body></html>\n")
    return "\n".join(parts)


def write_report(path: Path, metrics: Dict, images: Sequence[Path], **kw) -> Path:
    from .train import atomic_write_text
    atomic_write_text(Path(path), render_report(metrics, images, **kw))
    return Path(path)


def save_figure(fig, path, **kw) -> Path:
    """``fig.savefig(path, **kw)``, written atomically like every other output: a run killed mid-write
    leaves the old figure (or none) and a temporary file that ``--resume`` deletes, never a truncated PNG.
    The format comes from the suffix of ``path`` unless ``kw`` names it."""
    from .checkpoints import _atomic_write
    path = Path(path)
    kw.setdefault("format", path.suffix[1:] or None)
    _atomic_write(path, lambda f: fig.savefig(f, **kw))
    return path


def environment() -> Dict[str, str]:
    import torch
    try:
        import bnkit
        ver = getattr(bnkit, "__version__", "?")
    except Exception:  # noqa: BLE001
        ver = "?"
    try:
        from bnkit import kernels
        backend = kernels.select(torch.zeros(2, 2))
    except Exception:  # noqa: BLE001
        backend = "?"
    return {"bnkit": ver, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "torch threads": str(torch.get_num_threads()),
            "bnkit kernel backend": str(backend)}
