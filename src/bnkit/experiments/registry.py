"""Experiment registry and the orchestration shared by every experiment: settings and their checks, the
output directory, data, the runs with a live progress bar, ``metrics.json``, the figure, ``report.html``
and the terminal summary. ``--resume`` picks up an interrupted experiment from its directory.

Every experiment module declares ``DEFAULTS`` (its settings) and may declare ``OPTIONS`` (per-setting
overrides of the checks and help: ``{"norm": {"choices": (...), "help": "..."}}``). Each setting is an
:class:`Option`: the common ones are described in :func:`common_options`, any other is inferred from its
default value. The command line offers exactly these settings, with the experiment's defaults, and the
same checks run on command-line values, on ``run_experiment`` overrides and on a saved ``config.json``.
A run is checked completely (settings, data, output directory, every run's model on one batch) before
anything is written, so a start that fails leaves nothing behind.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = ["EXPERIMENTS", "Experiment", "Option", "ConfigError", "get_experiment", "experiment_options",
           "validate_config", "run_experiment", "latest_run_dir", "common_options"]


class ConfigError(ValueError):
    """A setting, the output directory or a saved experiment cannot be used; the message says which and why."""


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
        raise ConfigError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}") from None


# ------------------------------------------------------------------------------------------ settings

_LIST_KINDS = {"ints": "int", "floats": "float", "strs": "str"}


@dataclass(frozen=True)
class Option:
    """One setting of an experiment: its type, the values it accepts and its help text.

    ``kind`` is ``int | float | str | bool`` or a list of one of the first three (``ints | floats | strs``:
    at least one item, given on the command line as ``0,1,2``), or ``json`` (any JSON value, e.g. a dict
    of per-network settings; given on the command line as JSON). Numbers (and list items) must be finite
    and at least ``low`` (greater than ``low`` with ``low_open``) and at most ``high``; strings must be
    one of ``choices`` when given; ``check`` raises ``ValueError`` for anything else it rejects.
    """
    kind: str
    help: str = ""
    low: Optional[float] = None
    low_open: bool = False
    high: Optional[float] = None
    choices: Optional[Tuple[str, ...]] = None
    unique: bool = False          # lists: no repeated items
    nullable: bool = False        # None (JSON null) is allowed: "use the built-in choice"
    check: Optional[Callable[[Any], None]] = None

    @property
    def item_kind(self) -> str:
        return _LIST_KINDS.get(self.kind, self.kind)

    def _scalar_text(self, s: str):
        k = self.item_kind
        if k == "int":
            try:
                return int(s)
            except ValueError:
                raise ValueError(f"expected an integer, got {s!r}") from None
        if k == "float":
            try:
                return float(s)
            except ValueError:
                raise ValueError(f"expected a number, got {s!r}") from None
        return s

    def parse(self, text: str):
        """A command-line string to a checked value; raises ``ValueError`` with the reason."""
        if self.kind == "json":
            try:
                return self.validate(json.loads(text))
            except json.JSONDecodeError:
                return self.validate(text)  # a plain string
        if self.nullable and text.strip().lower() in ("none", "null"):
            return None
        if self.kind in _LIST_KINDS and text.strip().startswith("["):  # a JSON list, e.g. [0.1, 1, 10]
            try:
                return self.validate(json.loads(text))
            except json.JSONDecodeError as e:
                raise ValueError(f"expected a JSON list or comma-separated values, got {text!r} ({e})") from None
        if self.kind in _LIST_KINDS:
            items = text.replace(",", " ").split()
            if not items:
                raise ValueError(f"expected a comma-separated list of at least one value, got {text!r}")
            return self.validate([self._scalar_text(x) for x in items])
        if self.kind == "bool":
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected true or false, got {text!r}")
        return self.validate(self._scalar_text(text))

    def _bounds(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"<= {self.high:g}")
        return " and ".join(parts)

    def _scalar(self, v):
        k = self.item_kind
        if k in ("int", "float"):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"expected {'an integer' if k == 'int' else 'a number'}, got {v!r}")
            if not math.isfinite(v):
                raise ValueError(f"expected a finite number, got {v!r}")
            if k == "int":
                if isinstance(v, float) and not v.is_integer():
                    raise ValueError(f"expected an integer, got {v!r}")
                v = int(v)
            else:
                v = float(v)
            bad = ((self.low is not None and (v <= self.low if self.low_open else v < self.low)) or
                   (self.high is not None and v > self.high))
            if bad:
                what = "an integer" if k == "int" else "a number"
                raise ValueError(f"expected {what} {self._bounds()}, got {v:g}")
            return v
        if k == "bool":
            if not isinstance(v, bool):
                raise ValueError(f"expected true or false, got {v!r}")
            return v
        if not isinstance(v, str):
            raise ValueError(f"expected a string, got {v!r}")
        if self.choices is not None and v not in self.choices:
            raise ValueError(f"unknown value {v!r}; choose from {', '.join(self.choices)}")
        return v

    def validate(self, v):
        """A value (from the command line, an override or ``config.json``) checked and normalized
        (tuples to lists, integral floats to ints); raises ``ValueError`` with the reason."""
        if v is None:
            if self.nullable:
                return None
            raise ValueError("a value is required")
        if self.kind == "json":
            out = v
        elif self.kind in _LIST_KINDS:
            if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)):
                raise ValueError(f"expected a list, got {v!r}")
            if not v:
                raise ValueError("expected at least one value, got an empty list")
            out = [self._scalar(x) for x in v]
            if self.unique and len(set(out)) != len(out):
                dup = sorted({x for x in out if out.count(x) > 1}, key=str)
                raise ValueError(f"repeated value(s) {', '.join(map(str, dup))}")
        else:
            out = self._scalar(v)
        if self.check is not None:
            self.check(out)
        return out

    def describe_default(self, default) -> str:
        if default is None:
            return "none"
        if isinstance(default, bool):
            return "on" if default else "off"
        if self.kind == "json":
            return json.dumps(default)
        if isinstance(default, (list, tuple)):
            return ",".join(str(x) for x in default)
        return str(default)


def _check_init(v: str) -> None:
    if v == "default":
        return
    if v.startswith("normal:"):
        try:
            std = float(v.split(":", 1)[1])
        except ValueError:
            std = float("nan")
        if math.isfinite(std) and std > 0:
            return
    raise ValueError(f"expected 'default' or 'normal:STD' with STD > 0, got {v!r}")


def common_options() -> Dict[str, Option]:
    """The settings shared by the experiments (an experiment offers those in its ``DEFAULTS``)."""
    from .data import DATASETS
    from .models import _ACTS, NORMS
    return {
        "data": Option("str", "dataset (see `bnkit list`)", choices=tuple(DATASETS)),
        "data_dir": Option("str", "directory with the dataset files (default: $BNKIT_DATA)", nullable=True),
        "steps": Option("int", "training steps per run", low=1),
        "lr": Option("float", "learning rate", low=0, low_open=True),
        "batch_size": Option("int", "mini-batch size (at most the training set's size)", low=1),
        "optimizer": Option("str", "optimizer", choices=("sgd", "momentum", "adam")),
        "init": Option("str", "weight init: default | normal:STD", check=_check_init),
        "seeds": Option("ints", "seeds, comma-separated (--seed S: one seed)", low=0, unique=True),
        "eval_every": Option("int", "evaluate every K steps", low=1),
        "threshold": Option("float", "accuracy threshold for steps-to-threshold", low=0, low_open=True, high=1),
        "thresholds": Option("floats", "further accuracy thresholds reported in the tables", low=0,
                             low_open=True, high=1, unique=True),
        "binarize": Option("bool", "binarize pixels at 0.5"),
        "normalize": Option("str", "input scaling", choices=("none", "unit", "center", "standard")),
        "norm": Option("str", "norm of the normalized network", choices=tuple(NORMS)),
        "norms": Option("strs", "norms to compare, comma-separated", choices=tuple(NORMS), unique=True),
        "arch": Option("str", "network", choices=("mlp", "cnn")),
        "hidden": Option("ints", "hidden layer widths of the MLP, comma-separated", low=1),
        "activation": Option("str", "activation (none: the network's own)", choices=tuple(_ACTS), nullable=True),
        "probe_size": Option("int", "test examples in the fixed probe batch", low=2),
        "skip_evals": Option("int", "evaluations (from step 0) ignored by the BN-ahead check", low=0),
        "threads": Option("int", "torch threads", low=1),
    }


def _inferred(default) -> Option:
    """The option of a setting that has no description, from its default value: its kind, and a
    non-negative default stays non-negative (an experiment declares stricter checks in ``OPTIONS``)."""
    def bound(x):
        return {"low": 0} if x >= 0 else {}
    if isinstance(default, bool):
        return Option("bool")
    if isinstance(default, int):
        return Option("int", **bound(default))
    if isinstance(default, float):
        return Option("float", **bound(default))
    if isinstance(default, str):
        return Option("str")
    if isinstance(default, (list, tuple)) and default:
        if all(isinstance(x, int) and not isinstance(x, bool) for x in default):
            return Option("ints", **bound(min(default)))
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in default):
            return Option("floats", **bound(min(default)))
        if all(isinstance(x, str) for x in default):
            return Option("strs")
    return Option("json", nullable=default is None)  # None, a dict, an empty or mixed list


def experiment_options(exp: Experiment) -> Dict[str, Option]:
    """The settings of ``exp`` (its ``DEFAULTS`` keys, in order) with their checks.

    A setting described in :func:`common_options` uses that description, made nullable when its default
    is None; when the experiment's default lies outside it (``steps: 0`` for an experiment that does not
    train, an architecture of its own), the option is inferred from the default instead, keeping the
    help. ``OPTIONS`` of the experiment module then overrides any field.
    """
    mod = exp.load()
    common = common_options()
    extra = getattr(mod, "OPTIONS", {}) or {}
    out = {}
    for key, default in mod.DEFAULTS.items():
        opt = common.get(key)
        if opt is None:
            opt = _inferred(default)
        elif default is None:
            opt = dataclasses.replace(opt, nullable=True)
        else:
            try:
                opt.validate(default)
            except ValueError:
                opt = dataclasses.replace(_inferred(default), help=opt.help)
        if key in extra:
            kw = dict(extra[key])
            if kw.get("choices") is not None:
                kw["choices"] = tuple(kw["choices"])
            opt = dataclasses.replace(opt, **kw)
        out[key] = opt
    return out


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def validate_config(exp: Experiment, cfg: Dict, *, where: str = "") -> Dict:
    """``cfg`` checked against the experiment's options: every setting known and valid (a ``ConfigError``
    naming the first bad one otherwise); returns the normalized copy. ``where`` prefixes the message
    (e.g. the path of a saved config)."""
    opts = experiment_options(exp)
    pre = f"{where}: " if where else ""
    unknown = [k for k in cfg if k not in opts]
    if unknown:
        raise ConfigError(f"{pre}experiment {exp.name} has no setting(s) {', '.join(map(repr, unknown))}; "
                          f"its settings: {', '.join(opts)}")
    out = {}
    for k, opt in opts.items():
        if k not in cfg:
            raise ConfigError(f"{pre}setting {k!r} is missing")
        try:
            out[k] = opt.validate(cfg[k])
        except ValueError as e:
            raise ConfigError(f"{pre}{flag(k) if not where else repr(k)}: {e}") from None
    return out


def _check_with_data(exp: Experiment, mod: ModuleType, cfg: Dict, data, runs) -> None:
    """The checks that need the data: sizes, and every distinct model built and run on one batch in
    training mode (wrong norm for the network, a batch too small for batch statistics, ...)."""
    from .models import NormNotAvailable
    from .train import check_run

    n_train, n_test = len(data.y_train), len(data.y_test)
    if isinstance(cfg.get("batch_size"), int) and cfg["batch_size"] > n_train:  # None: the runs' own
        raise ConfigError(f"--batch-size {cfg['batch_size']} is larger than the training set of {data.name} "
                          f"({n_train} examples)")
    if isinstance(cfg.get("probe_size"), int) and cfg["probe_size"] > n_test:
        raise ConfigError(f"--probe-size {cfg['probe_size']} is larger than the test set of {data.name} "
                          f"({n_test} examples)")
    if hasattr(mod, "validate"):
        try:
            mod.validate(cfg, data)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    seen = set()
    for rc in runs:
        key = json.dumps({k: v for k, v in dataclasses.asdict(rc).items() if k not in ("name", "seed", "variant")},
                         sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        try:
            check_run(rc, data)
        except (ValueError, RuntimeError, TypeError, NormNotAvailable) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"run {rc.name} (norm {rc.norm}, {rc.arch}, batch {rc.batch_size}) cannot "
                              f"train on {data.name}: {msg}") from None


# ------------------------------------------------------------------------------------------ run directory

def latest_run_dir(experiment: str, root: Path = Path("runs")) -> Optional[Path]:
    cands = sorted(p for p in Path(root).glob(f"{experiment}-*") if (p / "config.json").exists())
    return cands[-1] if cands else None


def _fresh_out_dir(name: str, out: Optional[Path]) -> Path:
    """The output directory of a new experiment, checked (not created): a directory or a path that can
    become one, holding no experiment yet."""
    if out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{name}-{stamp}"
        i = 1
        while out.exists():
            out = Path("runs") / f"{name}-{stamp}-{i}"
            i += 1
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: a file is in the way (not a directory)")
    if (out / "config.json").exists():
        raise ConfigError(f"{out} already holds an experiment; use --resume to continue it or choose "
                          f"another --out")
    anc = out
    while not anc.exists():
        if anc.parent == anc:
            break
        anc = anc.parent
    if anc.exists() and not anc.is_dir():
        raise ConfigError(f"--out {out}: {anc} is a file, not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {anc} is not writable")
    return out


def _create_out_dir(out: Path, cfg: Dict) -> None:
    """Create ``out`` and write ``config.json``; on failure remove what was created and raise ConfigError."""
    from .train import atomic_write_text

    created = []
    p = out
    while not p.exists():
        created.append(p)
        if p.parent == p:
            break
        p = p.parent
    try:
        for d in reversed(created):
            d.mkdir()
        atomic_write_text(out / "config.json", json.dumps(cfg, indent=1))
    except OSError as e:
        for d in created:  # innermost first; only what this call made
            shutil.rmtree(d, ignore_errors=True)
        raise ConfigError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def _read_saved_config(exp: Experiment, out: Path) -> Dict:
    path = out / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot resume {out}: {path} is unreadable ({e}); it is not a bnkit experiment "
                          f"directory or the file is damaged") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"cannot resume {out}: {path} does not hold a settings object")
    return validate_config(exp, cfg, where=str(path))


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
    from rich.markup import escape
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
        ct.add_column("detail", overflow="fold")
        for name, c in checks.items():
            detail = {k: v for k, v in c.items() if k != "pass"}
            txt = escape("; ".join(f"{k}={_short(v)}" for k, v in detail.items()))
            ct.add_row(name, "[green]PASS[/]" if c.get("pass") else "[red]FAIL[/]", txt)
        console.print(ct)


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


def run_experiment(name: str, overrides: Optional[Dict] = None, *, out: Optional[Path] = None,
                   resume: bool = False, quiet: bool = False, stop_after: Optional[int] = None,
                   console=None) -> Dict:
    """Run (or resume) an experiment; returns the metrics dict (also in ``<out>/metrics.json``).

    Raises :class:`ConfigError` (a bad setting, output directory or saved experiment; nothing written),
    ``DatasetError``, ``train.CheckpointError``, ``train.RunInterrupted`` (a checkpoint was written).
    """
    import torch

    from .data import load_dataset
    from .report import environment, write_report
    from .train import StepBudget, atomic_write_text, check_resumable, remove_stale_temp_files, train_run

    exp = get_experiment(name)
    mod = exp.load()
    if console is None:
        from rich.console import Console
        console = Console(stderr=False, quiet=quiet)

    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    notes = []
    if resume:
        out = Path(out) if out else latest_run_dir(name)
        if out is None:
            raise ConfigError(f"nothing to resume: no runs/{name}-* directory; give --out DIR")
        if not out.exists():
            raise ConfigError(f"nothing to resume: {out} does not exist")
        if not out.is_dir():
            raise ConfigError(f"nothing to resume: {out} is a file, not an experiment directory")
        if not (out / "config.json").exists():
            raise ConfigError(f"nothing to resume: no config.json in {out}")
        if not os.access(out, os.W_OK | os.X_OK):
            raise ConfigError(f"cannot resume {out}: the directory is not writable")
        cfg = _read_saved_config(exp, out)
        validate_config(exp, {**cfg, **overrides})  # a bad override is an error even though it is ignored
        ignored = {k: v for k, v in overrides.items() if _jsonable(v) != cfg.get(k)}
        if ignored:
            notes.append(f"[yellow]--resume uses the saved settings of {out}; ignoring {ignored}[/]")
    else:
        cfg = validate_config(exp, _jsonable({**mod.DEFAULTS, **overrides}))
        out = _fresh_out_dir(name, out)

    # everything is checked before the first write: a start that fails leaves no directory behind
    data = load_dataset(cfg["data"], cfg.get("data_dir"), binarize=bool(cfg.get("binarize")),
                        normalize=cfg.get("normalize", "none"))
    runs = mod.make_runs(cfg)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(int(cfg.get("threads") or 1))
    try:
        _check_with_data(exp, mod, cfg, data, runs)
        if resume:
            check_resumable(runs, out)
            removed = remove_stale_temp_files(out)
            if removed:
                notes.append(f"removed {len(removed)} temporary file(s) left by an interrupted write")
        else:
            _create_out_dir(out, cfg)
    except BaseException:
        torch.set_num_threads(threads_before)
        raise

    t0 = time.perf_counter()
    for n in notes:
        console.print(n)
    if resume:
        console.print(f"resuming [bold]{out}[/]")
    console.print(f"[bold]{exp.title}[/]\n{data.describe()}; output: {out}")
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
    from .models import NORMS
    lines.append("norms (models): " + " ".join(NORMS))
    return lines
