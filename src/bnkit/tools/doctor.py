"""The BN doctor: :func:`inspect` reports what is wrong with a model's BN layers.

Per BN-family layer (qualified name, class, mode, ``eps``, ``momentum``,
``num_batches_tracked``) it checks:

* ``nonfinite``: NaN/Inf in ``running_mean``, ``running_var``, ``weight`` or
  ``bias`` (error: every output of the layer is NaN at inference);
* ``negative_var``: a negative ``running_var`` (error: ``sqrt`` of a negative);
* ``tiny_var``: ``running_var < tiny_var`` (default: the layer's ``eps``), where
  ``eps`` rather than the data sets the scale;
* ``dead_channels``: ``|weight| < dead_tol``: channels switched off
  (Frankle et al. 2020 find many such gammas);
* ``train_in_eval``: a layer left in training mode in an eval-mode model (it
  normalizes with batch statistics and updates its averages at inference);
  ``eval_in_train`` the other way round (often deliberate: frozen statistics);
* ``never_updated``: ``num_batches_tracked == 0`` and statistics still at their
  initial values (mean 0, variance 1);
* with ``data``: the statistics of each layer's input over ``data`` (the model
  in eval mode) against the running ones,

  .. math::

      \\text{shift} = \\operatorname{mean}_c \\frac{|\\mu_c - \\hat\\mu_c|}{\\sqrt{\\hat\\sigma_c^2 + \\epsilon}},
      \\qquad
      \\text{log\\_var\\_ratio} = \\operatorname{mean}_c \\log\\frac{\\sigma_c^2 + \\epsilon}{\\hat\\sigma_c^2 + \\epsilon}

  (hats: running statistics); ``domain_shift`` when ``shift > shift_tol`` or
  ``|log_var_ratio| > log_var_tol``, and ``first_shift`` names the first such
  layer in execution order;
* what :func:`bnkit.fuse` would fold each layer into (on a copy).

The :class:`BNReport` prints as a rich table (``report.print()``, or
``rich.print(report)``), and has ``to_dict()``, ``to_json()`` and a
self-contained ``to_html()`` page.
"""

from __future__ import annotations

import copy
import html
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..stats import Moments, merge
from .adapt import (
    _batches,
    _check_num_batches,
    bn_layers,
    feature_axis,
    has_stats,
    learns_stats,
)
from .calibrate import _input_of, _model_device, _model_input

__all__ = ["SEVERITIES", "BNReport", "Finding", "LayerReport", "inspect"]

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


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _summary(t: Tensor) -> dict[str, float | None]:
    t = t.detach().to(torch.float64).reshape(-1)
    fin = t[torch.isfinite(t)]
    if fin.numel() == 0:
        return {"min": None, "max": None, "mean": None}
    return {"min": fin.min().item(), "max": fin.max().item(), "mean": fin.mean().item()}


# ------------------------------------------------------------------ data pass
@torch.no_grad()
def _data_stats(model: nn.Module, layers: list[tuple[str, nn.Module]], data: Any, num_batches: int | None):
    """Moments of every BN layer's input over ``data`` with the model in eval mode; nothing changes."""
    accs: dict[tuple[int, Any], Moments] = {}
    order: dict[int, int] = {}
    hooks = []

    def make(m: nn.Module):
        per_site = has_stats(m) and m.running_mean.dim() == 2

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not args or not isinstance(args[0], Tensor):
                return
            site = kwargs.get("site", args[1] if len(args) > 1 else None) if per_site else None
            if per_site and site is None:
                site = 0
            x = args[0].detach()
            axis = feature_axis(module) % x.dim()
            mo = Moments.of(x.to(torch.float64), [d for d in range(x.dim()) if d != axis])
            key = (id(module), site)
            accs[key] = mo if key not in accs else merge(accs[key], mo)
            order.setdefault(id(module), len(order))

        return hook

    flags = [(m, m.training) for m in model.modules()]
    saved = [(m, {k: b.clone() for k, b in m._buffers.items() if isinstance(b, Tensor)}) for _, m in layers]
    device = _model_device(model)
    batches = samples = 0
    try:
        for _, m in layers:
            hooks.append(m.register_forward_pre_hook(make(m), with_kwargs=True))
        model.eval()
        for batch in _batches(data, num_batches):
            x = _model_input(batch, device)
            model(x)
            batches += 1
            samples += int(x.shape[0]) if isinstance(x, Tensor) and x.dim() > 0 else 1
    finally:
        for h in hooks:
            h.remove()
        for m, training in flags:
            m.training = training
        for m, bufs in saved:  # eval-mode forwards change nothing; this keeps it so for odd layers too
            for k, v in bufs.items():
                m._buffers[k].copy_(v)
    return accs, order, {"batches": batches, "samples": samples}


def _fuse_notes(model: nn.Module, example: Any) -> dict[str, str]:
    """What bnkit.fuse would do with each BN layer (run on an eval-mode copy); {} when it cannot run."""
    from .fuse import fuse

    try:
        m = copy.deepcopy(model).eval()
        _, rep = fuse(m, inplace=True, report=True, example_inputs=example)
    except Exception as e:  # noqa: BLE001 - the doctor reports, it does not fail on an unfusable model
        return {"*": f"fuse failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    notes = {}
    for p in rep.fused:
        notes[p.bn] = f"into {p.layer} ({p.position})"
    for u in rep.unfused:
        notes[u.bn] = f"{u.replaced_by or 'kept'} ({u.reason})"
    return notes


# ------------------------------------------------------------------ inspect
def inspect(
    model: nn.Module,
    data: Iterable[Any] | Tensor | None = None,
    *,
    num_batches: int | None = None,
    dead_tol: float = 1e-3,
    tiny_var: float | None = None,
    shift_tol: float = 0.5,
    log_var_tol: float = 1.0,
    fuse: bool = True,
) -> BNReport:
    """Diagnose every BN-family layer of ``model`` (the BN doctor); the model is left exactly as it was.

    Args:
        model: any module.
        data: optional batches (as for :func:`bnkit.adapt`; a tensor is one
            batch) run through the model in eval mode to compare each layer's
            input statistics with its running statistics.
        num_batches: read at most this many batches.
        dead_tol: a channel is dead when ``|weight| < dead_tol``.
        tiny_var: flag ``running_var`` below this (default: the layer's ``eps``).
        shift_tol: flag ``domain_shift`` when the mean standardized mean
            difference exceeds this ...
        log_var_tol: ... or the mean log variance ratio exceeds this in
            absolute value (1.0: variances e-fold apart).
        fuse: also report what :func:`bnkit.fuse` would fold (on a copy).

    Returns:
        A :class:`BNReport`.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).eval()
        >>> sorted(inspect(net).codes())
        ['never_updated']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"inspect: expected an nn.Module, got {type(model).__name__}")
    for nm, v in (("dead_tol", dead_tol), ("shift_tol", shift_tol), ("log_var_tol", log_var_tol)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ValueError(f"inspect: {nm} must be a number >= 0, got {v!r}")
    if tiny_var is not None and (isinstance(tiny_var, bool) or not isinstance(tiny_var, (int, float)) or not tiny_var >= 0):
        raise ValueError(f"inspect: tiny_var must be a number >= 0 or None, got {tiny_var!r}")
    _check_num_batches("inspect", num_batches)

    layers = bn_layers(model, with_stats=False)
    model_mode = "train" if model.training else "eval"
    reports: list[LayerReport] = []
    accs, order, data_info = ({}, {}, None)
    example = None
    if data is not None:
        if isinstance(data, Tensor):
            data = [data]
        elif iter(data) is data:  # a one-shot iterator: keep the batches for the fuse check too
            data = list(_batches(data, num_batches))
        accs, order, data_info = _data_stats(model, layers, data, num_batches)
        if data_info["batches"] == 0:
            raise ValueError("inspect: data yielded no batch")
        first = next(iter(_batches(data, 1)))
        example = _input_of(first)
    notes = _fuse_notes(model, example) if fuse and layers else {}

    for name, m in layers:
        name = name or "<root>"
        frozen = not learns_stats(m)
        mode = "frozen" if frozen else ("train" if m.training else "eval")
        nbt = getattr(m, "num_batches_tracked", None)
        nbt_v = None if not isinstance(nbt, Tensor) else (int(nbt.item()) if nbt.dim() == 0 else nbt.tolist())
        r = LayerReport(name=name, cls=type(m).__name__, mode=mode, num_features=int(m.num_features),
                        eps=float(m.eps), momentum="n/a" if frozen else m.momentum, num_batches_tracked=nbt_v)

        def add(sev: str, code: str, msg: str, r: LayerReport = r) -> None:
            r.findings.append(Finding(sev, code, r.name, msg))

        for bname in ("running_mean", "running_var", "weight", "bias"):
            t = getattr(m, bname, None)
            if isinstance(t, Tensor):
                bad = int((~torch.isfinite(t.detach())).sum().item())
                if bad:
                    r.nonfinite[bname] = bad
        if r.nonfinite:
            add("error", "nonfinite", "non-finite values in " + ", ".join(f"{k} ({v})" for k, v in r.nonfinite.items()))
        if has_stats(m):
            rv = m.running_var.detach()
            r.running_mean, r.running_var = _summary(m.running_mean), _summary(rv)
            r.negative_var = int((rv < 0).sum().item())
            if r.negative_var:
                add("error", "negative_var", f"{r.negative_var} negative running_var value(s)")
            tol = float(m.eps) if tiny_var is None else float(tiny_var)
            r.tiny_var = int(((rv >= 0) & (rv < tol)).sum().item())
            if r.tiny_var:
                add("warning", "tiny_var", f"{r.tiny_var} channel(s) with running_var < {tol:g}: eps, not the data, "
                    "sets their scale")
            if (nbt_v == 0 or (isinstance(nbt_v, list) and not any(nbt_v))) and bool(
                (m.running_mean == 0).all() and (m.running_var == 1).all()
            ):
                add("warning", "never_updated", "statistics never updated (num_batches_tracked 0, mean 0, var 1)")
        else:
            add("info", "no_running_stats", "no running statistics: it always normalizes with batch statistics")
        w = getattr(m, "weight", None)
        if isinstance(w, Tensor):
            wd = w.detach().reshape(-1)
            dead = (wd.abs() < dead_tol).nonzero().reshape(-1).tolist()
            r.dead_channels = list(range(int(m.num_features))) if dead and wd.numel() == 1 else dead
            if r.dead_channels:
                add("warning", "dead_channels", f"{len(r.dead_channels)} of {m.num_features} channel(s) switched off "
                    f"(|weight| < {dead_tol:g}): {_short(r.dead_channels)}")
        if not frozen and has_stats(m):
            if model_mode == "eval" and m.training:
                add("warning", "train_in_eval", "in training mode inside an eval-mode model: it normalizes with "
                    "batch statistics and updates its running averages at inference")
            elif model_mode == "train" and not m.training:
                add("info", "eval_in_train", "in eval mode inside a training-mode model (its statistics are frozen)")
        if data is not None and has_stats(m):
            keys = [k for k in accs if k[0] == id(m)]
            if not keys:
                add("info", "unseen", "received no input from the data")
            scores, maxes, ratios = [], [], []
            for _, site in keys:
                mo = accs[(id(m), site)]
                mean = mo.mean
                var = mo.variance(1) if mo.count > 1 else mo.m2
                rm = m.running_mean.detach().to(torch.float64)
                rv = m.running_var.detach().to(torch.float64)
                if site is not None:
                    rm, rv = rm[site], rv[site]
                eps = float(m.eps)
                z = (mean - rm).abs() / (rv.clamp_min(0) + eps).sqrt()
                lr = ((var + eps) / (rv.clamp_min(0) + eps)).log()
                scores.append(z.mean().item())
                maxes.append(z.max().item())
                ratios.append(lr.mean().item())
            if keys:
                r.shift = _finite_or_none(sum(scores) / len(scores))
                r.shift_max = _finite_or_none(max(maxes))
                r.log_var_ratio = _finite_or_none(sum(ratios) / len(ratios))
                r.data_order = order.get(id(m))
                if (r.shift is not None and r.shift > shift_tol) or (
                    r.log_var_ratio is not None and abs(r.log_var_ratio) > log_var_tol
                ):
                    add("warning", "domain_shift", f"the data's statistics differ from the running ones (shift "
                        f"{r.shift:.2f}, log variance ratio {r.log_var_ratio:+.2f}): a domain shift or stale statistics")
        if notes:
            r.fuse = notes.get(name, notes.get("*"))
        reports.append(r)

    shifted = [r for r in reports if r.data_order is not None and any(f.code == "domain_shift" for f in r.findings)]
    first = min(shifted, key=lambda r: r.data_order).name if shifted else None
    return BNReport(
        model=type(model).__name__, model_mode=model_mode, layers=reports, first_shift=first, data=data_info,
        thresholds={"dead_tol": dead_tol, "tiny_var": tiny_var,
                    "shift_tol": shift_tol, "log_var_tol": log_var_tol},
    )


def _short(idx: list[int], k: int = 8) -> str:
    s = ", ".join(map(str, idx[:k]))
    return s + (f", ... (+{len(idx) - k})" if len(idx) > k else "")
