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
self-contained ``to_html()`` page (the report classes live in
:mod:`bnkit.tools.doctor_report` and are re-exported here).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..family import check_initialized
from ..stats import Moments, merge
from ._bnlayers import _batches, _check_num_batches, bn_layers, feature_axis, has_stats, learns_stats
from .calibrate import _input_of, _model_device, _model_input, call_site, site_keyword
from .doctor_report import SEVERITIES, BNReport, Finding, LayerReport, _fmt_nbt, _json_default  # noqa: F401

__all__ = ["SEVERITIES", "BNReport", "Finding", "LayerReport", "inspect"]


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
        checked = per_site and callable(getattr(m, "_check_site", None))  # the layer reads its own site or domain
        keyword = site_keyword(m) if checked else "site"

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not args or not isinstance(args[0], Tensor):
                return
            if checked:
                site = call_site(module, keyword, args, kwargs)
            else:
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
    check_initialized(model, "inspect")
    if not isinstance(model, nn.Module):
        raise TypeError(f"inspect: expected an nn.Module, got {type(model).__name__}")
    for nm, v in (("dead_tol", dead_tol), ("shift_tol", shift_tol), ("log_var_tol", log_var_tol)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:  # (JSON has no inf)
            raise ValueError(f"inspect: {nm} must be a finite number >= 0, got {v!r}")
    if tiny_var is not None and (
        isinstance(tiny_var, bool) or not isinstance(tiny_var, (int, float)) or not 0 <= tiny_var < math.inf
    ):
        raise ValueError(f"inspect: tiny_var must be a finite number >= 0 or None, got {tiny_var!r}")
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
                    shift = "-" if r.shift is None else f"{r.shift:.2f}"  # (None: not finite, e.g. a NaN running mean)
                    ratio = "-" if r.log_var_ratio is None else f"{r.log_var_ratio:+.2f}"
                    add("warning", "domain_shift", f"the data's statistics differ from the running ones (shift "
                        f"{shift}, log variance ratio {ratio}): a domain shift or stale statistics")
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
