"""The BN doctor's report: :class:`BNReport` (with :class:`LayerReport`, :class:`Finding`) and its text, rich, HTML and JSON output."""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SEVERITIES", "BNReport", "Finding", "LayerReport"]

SEVERITIES = ("error", "warning", "info")


@dataclass
class Finding:
    """One problem: ``severity`` (error | warning | info), a stable ``code``, the layer and a sentence."""

    severity: str
    code: str
    layer: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.layer}: {self.message} [{self.code}]"


@dataclass
class LayerReport:
    """What :func:`inspect` found about one BN layer (plain values only, so it serializes as is)."""

    name: str
    cls: str
    mode: str
    num_features: int
    eps: float
    momentum: float | None | str
    num_batches_tracked: int | list[int] | None
    running_mean: dict[str, float] | None = None
    running_var: dict[str, float] | None = None
    nonfinite: dict[str, int] = field(default_factory=dict)
    negative_var: int = 0
    tiny_var: int = 0
    dead_channels: list[int] = field(default_factory=list)
    shift: float | None = None
    shift_max: float | None = None
    log_var_ratio: float | None = None
    data_order: int | None = None
    fuse: str | None = None
    findings: list[Finding] = field(default_factory=list)

    @property
    def status(self) -> str:
        """The worst severity among the findings, or ``"ok"``."""
        for s in SEVERITIES:
            if any(f.severity == s for f in self.findings):
                return s
        return "ok"


@dataclass
class BNReport:
    """The BN doctor's report: per-layer :class:`LayerReport` rows and all :class:`Finding` s."""

    model: str
    model_mode: str
    layers: list[LayerReport]
    first_shift: str | None = None
    data: dict[str, Any] | None = None
    thresholds: dict[str, Any] = field(default_factory=dict)

    @property
    def findings(self) -> list[Finding]:
        return [f for layer in self.layers for f in layer.findings]

    def codes(self, layer: str | None = None) -> set[str]:
        """The finding codes, for one layer or the whole model."""
        return {f.code for f in self.findings if layer is None or f.layer == layer}

    @property
    def ok(self) -> bool:
        """No error and no warning."""
        return not any(f.severity in ("error", "warning") for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "model": self.model,
            "model_mode": self.model_mode,
            "ok": self.ok,
            "first_shift": self.first_shift,
            "data": self.data,
            "thresholds": self.thresholds,
            "layers": [],
            "findings": [asdict(f) for f in self.findings],
        }
        for layer in self.layers:
            row = asdict(layer)
            row["status"] = layer.status
            row["findings"] = [f.code for f in layer.findings]
            d["layers"].append(row)
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False, default=_json_default)

    # ---------------------------------------------------------------- text / rich
    def _rows(self) -> list[list[str]]:
        rows = []
        for r in self.layers:
            mom = "-" if r.momentum == "n/a" else ("None" if r.momentum is None else f"{r.momentum:g}")
            rows.append([
                r.name, r.cls, r.mode, f"{r.eps:g}", mom, _fmt_nbt(r.num_batches_tracked), str(r.num_features),
                "-" if r.shift is None else f"{r.shift:.2f}",
                "-" if r.log_var_ratio is None else f"{r.log_var_ratio:+.2f}",
                r.fuse or "-", r.status, ", ".join(f.code for f in r.findings) or "-",
            ])
        return rows

    _HEAD = ("layer", "class", "mode", "eps", "momentum", "batches", "C", "shift", "log var ratio", "fuse",
             "status", "findings")

    def __str__(self) -> str:
        rows = [list(self._HEAD)] + self._rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(self._HEAD))]
        lines = [self._summary()]
        for k, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines += [f"  {f}" for f in self.findings]
        return "\n".join(lines)

    def _summary(self) -> str:
        n_err = sum(f.severity == "error" for f in self.findings)
        n_warn = sum(f.severity == "warning" for f in self.findings)
        s = f"{self.model} ({self.model_mode} mode): {len(self.layers)} BN layer(s), {n_err} error(s), {n_warn} warning(s)"
        if self.data:
            s += f"; data: {self.data['samples']} sample(s) in {self.data['batches']} batch(es)"
            s += f"; first large shift: {self.first_shift}" if self.first_shift else "; no large shift"
        return s

    def __rich__(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        style = {"error": "bold red", "warning": "yellow", "info": "cyan", "ok": "green"}
        t = Table(title=self._summary(), title_justify="left", padding=(0, 1), pad_edge=False)
        # short headers: the table has to fit an 80-column terminal for small models
        for h, short in zip(self._HEAD, ("layer", "class", "mode", "eps", "mom.", "nbt", "C", "shift", "log vr",
                                         "fuse", "status", "findings")):
            if h in ("status", "fuse"):
                continue  # status: the colour of the layer name and findings; fuse: a line below
            t.add_column(short, no_wrap=h in ("layer", "class", "mode", "eps"),
                         justify="right" if h in ("eps", "C", "shift", "log var ratio", "batches") else "left")
        for r, row in zip(self.layers, self._rows()):
            cells = [Text(c) for i, c in enumerate(row) if i not in (9, 10)]
            cells[0].stylize(style[r.status])
            cells[-1].stylize(style[r.status])
            t.add_row(*cells)
        items = [t] + [Text(str(f), style=style[f.severity]) for f in self.findings]
        fuse = [f"{r.name} {r.fuse}" for r in self.layers if r.fuse]
        if fuse:
            items.append(Text("fuse: " + "; ".join(fuse), style="dim"))
        return Group(*items)

    def print(self, console: Any = None) -> None:
        """Print the report as a rich table (plain text when ``rich`` is not installed)."""
        try:
            from rich.console import Console
        except ImportError:  # rich is in the experiments extra
            print(str(self))
            return
        (console or Console()).print(self)

    # ---------------------------------------------------------------- HTML
    def to_html(self) -> str:
        """A self-contained HTML page (inline CSS and SVG, no scripts or external resources)."""
        esc = html.escape
        colors = {"error": "#fdd", "warning": "#ffd", "info": "#def", "ok": "#dfd"}
        head = "".join(f"<th>{esc(h)}</th>" for h in self._HEAD)
        body = []
        for r, row in zip(self.layers, self._rows()):
            cells = "".join(f"<td>{esc(c)}</td>" for c in row)
            body.append(f'<tr style="background:{colors[r.status]}">{cells}</tr>')
        findings = "".join(
            f'<li class="{esc(f.severity)}"><b>{esc(f.severity)}</b> <code>{esc(f.layer)}</code>: '
            f"{esc(f.message)} <small>[{esc(f.code)}]</small></li>"
            for f in self.findings
        ) or "<li>no findings</li>"
        chart = self._svg_chart()
        return (
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>bnkit inspect: "
            f"{esc(self.model)}</title><style>"
            "body{font-family:system-ui,sans-serif;margin:1.5em}table{border-collapse:collapse;font-size:90%}"
            "td,th{border:1px solid #bbb;padding:2px 6px;text-align:left}th{background:#eee}"
            "li.error{color:#a00}li.warning{color:#850}li.info{color:#057}code{font-size:95%}"
            "</style></head><body>"
            f"<h1>BN doctor: {esc(self.model)}</h1><p>{esc(self._summary())}</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
            f"<h2>Findings</h2><ul>{findings}</ul>{chart}"
            f"<h2>Thresholds</h2><p>{esc(json.dumps(self.thresholds))}</p>"
            "</body></html>\n"
        )

    def _svg_chart(self) -> str:
        rows = [r for r in self.layers if r.shift is not None and math.isfinite(r.shift)]
        if not rows:
            return ""
        top = max(max(r.shift for r in rows), self.thresholds.get("shift_tol", 0.0), 1e-9)
        bar_h, label_w, width = 16, 220, 420
        parts = [(f'<h2>Shift per layer (data vs running statistics)</h2><svg xmlns="http://www.w3.org/2000/svg" '
                  f'width="{label_w + width + 60}" height="{bar_h * len(rows) + 10}">')]
        for i, r in enumerate(rows):
            w = width * r.shift / top
            color = "#c33" if any(f.code == "domain_shift" for f in r.findings) else "#58a"
            y = i * bar_h + 2
            parts.append(f'<text x="0" y="{y + 12}" font-size="12">{html.escape(r.name)}</text>'
                         f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h - 4}" fill="{color}"/>'
                         f'<text x="{label_w + w + 4:.1f}" y="{y + 12}" font-size="11">{r.shift:.2f}</text>')
        tol = self.thresholds.get("shift_tol")
        if tol:
            x = label_w + width * tol / top
            parts.append(f'<line x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="{bar_h * len(rows) + 4}" stroke="#000" '
                         'stroke-dasharray="3,3"/>')
        parts.append("</svg>")
        return "".join(parts)

    def write_html(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(self.to_html(), encoding="utf-8")
        return p

    def write_json(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(self.to_json() + "\n", encoding="utf-8")
        return p


def _json_default(o: Any) -> Any:
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _fmt_nbt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, list):
        return "[" + ",".join(map(str, v)) + "]"
    return str(v)
