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

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Optional

from .console import RichProgress, _print_summary, _short  # noqa: F401  (moved; re-exported)
from .options import (_LIST_KINDS, ConfigError, Option, _check_init, _inferred,  # noqa: F401  (re-exported)
                      common_options, experiment_options, flag, validate_config)

__all__ = ["EXPERIMENTS", "Experiment", "Option", "ConfigError", "get_experiment", "experiment_options",
           "validate_config", "run_experiment", "latest_run_dir", "common_options"]


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
    # the statistics experiments (docs/research-statistics.md)
    Experiment("noniid", "noniid", "noniid.png", "Non-i.i.d. batches: BN and Batch Renorm on few-class mini-batches"),
    Experiment("precise", "precise", "precise.png", "PreciseBN: EMA statistics against recalibrated ones, every epoch"),
    Experiment("corruption", "corruption", "corruption.png", "Corrupted digits: source statistics, adapt, prior, TENT"),
    Experiment("accumulate", "accumulate", "accumulate.png", "Accumulated micro-batches: running statistics with and without accumulate_stats"),
    # optimization (docs/research-optimization.md)
    Experiment("ics", "ics", "ics.png", "Internal covariate shift: noisy BN, and the loss landscape along the gradient"),
    Experiment("bnonly", "bnonly", "bnonly.png", "Training only BN: gamma and beta vs as many random parameters vs the output layer"),
    Experiment("ghost", "ghost", "ghost.png", "Large batches: Ghost BN, sqrt lr scaling and equal updates vs small batches"),
]}


def get_experiment(name: str) -> Experiment:
    try:
        return EXPERIMENTS[name]
    except KeyError:
        raise ConfigError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}") from None


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
    """Create ``out`` and write ``config.json``; on failure remove what was created and raise ConfigError.

    Another ``bnkit run`` may have chosen the same ``out`` since :func:`_fresh_out_dir` checked it: the
    directory is made exclusively and ``config.json`` claimed exclusively, so of two runs one starts and
    the other stops with nothing of its own left there, and nothing of the other's removed."""
    from .checkpoints import _tmp_path, link_new
    from .train import atomic_write_text

    todo = []
    p = out
    while not p.exists():
        todo.append(p)
        if p.parent == p:
            break
        p = p.parent
    taken = f"{out} already holds an experiment (another run started there meanwhile); choose another --out"
    created = []  # only what this call made, innermost last
    try:
        for d in reversed(todo):
            try:
                d.mkdir()
            except FileExistsError:
                if d == out:
                    raise ConfigError(taken) from None
                continue  # a parent that another run made meanwhile: shared, not ours
            created.append(d)
        claim = _tmp_path(out / "config.json")  # a temporary name: removed on resume if a kill leaves it
        try:
            atomic_write_text(claim, json.dumps(cfg, indent=1))
            link_new(claim, out / "config.json")
        except FileExistsError:
            raise ConfigError(taken) from None
        finally:
            with contextlib.suppress(OSError):
                claim.unlink()
    except (OSError, ConfigError) as e:
        for d in reversed(created):  # rmdir, not rmtree: another run may be using one of them already
            try:
                d.rmdir()
            except OSError:
                break
        if isinstance(e, ConfigError):
            raise
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
    try:  # a finished experiment names itself in its metrics: say so rather than list mismatched settings
        saved = json.loads((out / "metrics.json").read_text()).get("experiment")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        saved = None
    if isinstance(saved, str) and saved != exp.name:
        raise ConfigError(f"cannot resume {out} as {exp.name}: it holds a {saved} experiment "
                          f"(`{shlex.join(['bnkit', 'run', saved, '--out', str(out), '--resume'])}`)")
    return validate_config(exp, cfg, where=str(path))


def _jsonable(o):
    if isinstance(o, (tuple, list)):
        return [_jsonable(x) for x in o]
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, Path):
        return str(o)
    return o


def run_experiment(name: str, overrides: Optional[Dict] = None, *, out: Optional[Path] = None,
                   resume: bool = False, quiet: bool = False, stop_after: Optional[int] = None,
                   console=None, jobs: Optional[int] = None, executor: str = "local", address: Optional[str] = None,
                   tensorboard: Optional[Path] = None) -> Dict:
    """Run (or resume) an experiment; returns the metrics dict (also in ``<out>/metrics.json``).

    ``jobs``, ``executor``, ``address``: where the runs train (:mod:`.executors`: one after the other,
    in ``jobs`` processes, or on a Ray cluster at ``address``; the same results). ``tensorboard``: also
    write TensorBoard event files to ``tensorboard/<name>/<run>`` (:mod:`.tblog`).

    Raises :class:`ConfigError` (a bad setting, output directory or saved experiment; nothing written),
    ``DatasetError``, ``train.CheckpointError``, ``train.RunInterrupted`` (a checkpoint was written),
    ``executors.RunFailed`` (a run failed in a worker; the other runs stopped at a checkpoint).
    """
    import torch

    from .data import load_dataset
    from .report import environment, write_report
    from .checkpoints import order_jsonl, strict_json
    from .executors import run_runs
    from .train import atomic_write_text, check_resumable, remove_stale_temp_files

    exp = get_experiment(name)
    mod = exp.load()
    ex, tb_dir = _check_run_options(name, jobs, executor, address, tensorboard)
    if console is None:
        from rich.console import Console
        console = Console(stderr=False, quiet=quiet)
        # --quiet silences progress, not what the user must know about the settings they gave
        alert = Console(stderr=True) if quiet else console
    else:
        alert = console

    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    notes, alerts = [], []
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
            alerts.append(f"[yellow]--resume uses the saved settings of {out}; ignoring {ignored}[/]")
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
        try:
            ex.prepare()  # e.g. join the Ray cluster: a failure leaves nothing behind
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if resume:
            removed = remove_stale_temp_files(out)
            if removed:
                notes.append(f"removed {len(removed)} temporary file(s) left by an interrupted write")
        else:
            _create_out_dir(out, cfg)
    except BaseException:
        torch.set_num_threads(threads_before)
        raise

    t0 = time.perf_counter()
    for n in alerts:
        alert.print(n)
    for n in notes:
        console.print(n)
    if resume:
        console.print(f"resuming [bold]{out}[/]")
    console.print(f"[bold]{exp.title}[/]\n{data.describe()}; output: {out}")
    from .train import NullProgress
    prog_cm = RichProgress(console) if not quiet else None
    progress = prog_cm or NullProgress()
    try:
        if prog_cm:
            prog_cm.__enter__()
        # later runs of a fresh directory resume too: harmless, nothing of theirs exists yet
        results = run_runs(runs, data, out, ex, resume=resume, progress=progress, stop_after=stop_after,
                           threads=int(cfg.get("threads") or 1), tensorboard=tb_dir)
    finally:
        if prog_cm:
            prog_cm.__exit__(None, None, None)
    order_jsonl(out / "metrics.jsonl", [rc.name for rc in runs])  # parallel runs appended in any order

    summary = mod.summarize(cfg, results)
    metrics = {
        "experiment": name, "out_dir": str(out), "config": cfg, "dataset": {"name": data.name, **data.provenance,
                                                                           "train": len(data.y_train), "test": len(data.y_test)},
        "summary": summary, "runs": results, "environment": environment(),
        "finished": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "wall_seconds_this_call": time.perf_counter() - t0,
    }
    atomic_write_text(out / "metrics.json", strict_json(_jsonable(metrics), indent=1))  # non-finite: null
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


def _check_run_options(name: str, jobs, executor: str, address, tensorboard):
    """The executor and the TensorBoard directory of a run, checked before anything is written."""
    from .executors import make_executor
    try:
        ex = make_executor(executor or "local", jobs, address)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if tensorboard is None:
        return ex, None
    from .tblog import tensorboard_available
    tb = Path(tensorboard).expanduser()
    if tb.exists() and not tb.is_dir():
        raise ConfigError(f"--tensorboard {tb}: a file is in the way (not a directory)")
    anc = tb
    while not anc.exists() and anc.parent != anc:
        anc = anc.parent
    if not anc.is_dir():
        raise ConfigError(f"--tensorboard {tb}: {anc} is a file, not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ConfigError(f"--tensorboard {tb}: {anc} is not writable")
    if not tensorboard_available():
        raise ConfigError("tensorboard is not installed; pip install 'bnkit[tensorboard]'")
    return ex, tb.resolve() / name


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
