"""The ``bnkit`` command line (also ``python -m bnkit.cli``).

Subcommands: ``demo`` (Figure 1 on the embedded data; exits 1 when one of its checks fails),
``run EXPERIMENT`` (each experiment has its own options: ``bnkit run NAME --help``), ``list``, ``build``
(the C++ kernels), ``bench`` (kernel benchmarks), ``inspect`` (the BN doctor) and ``report`` (the atlas of
the finished experiments). Imports are lazy: ``bnkit build`` loads no
plotting code.

Exit codes: 0 success, 1 a demo check failed, a run failed in a worker process (``--jobs``,
``--executor ray``) or an unexpected error, 2 a usage error (bad option
value, unknown name, unusable ``--out``, damaged experiment directory: one ``error:`` line on stderr,
nothing written), 3 interrupted (continue with ``--resume``), 130 Ctrl-C outside training.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

from .cli_options import (  # noqa: F401 - re-exported
    _add_output_options,
    _json_or_text,
    _option_type,
    _overrides,
    _Parser,
    _set_arg,
    _suite_parser,
    _UsageError,
    execution_kwargs,
    experiment_parser,
)

_RUN_HELP = "run an experiment (`bnkit run NAME --help`: its options and defaults)"


def _error(msg: str, prog: str = "bnkit") -> int:
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return 2


def _run(experiment: str, args, prog: str):
    """Runs the experiment; returns (exit code, metrics or None)."""
    from .experiments.data import DatasetError
    from .experiments.models import NormNotAvailable
    from .experiments.registry import ConfigError, run_experiment
    from .experiments.executors import RunFailed
    from .experiments.train import CheckpointError, RunInterrupted

    try:
        if experiment == "all":
            from .experiments.suite import run_all
            metrics = run_all(_overrides(args), out=args.out, resume=args.resume, quiet=args.quiet,
                              stop_after=args.stop_after, **execution_kwargs(args))
        else:
            metrics = run_experiment(experiment, _overrides(args), out=args.out, resume=args.resume,
                                     quiet=args.quiet, stop_after=args.stop_after, **execution_kwargs(args))
    except _UsageError as e:
        return _error(str(e), prog), None
    except RunInterrupted as e:
        # quoted: the hint is meant to be pasted, and --out may hold spaces, '#' or quotes
        again = shlex.join(["bnkit", "run", experiment, "--resume"] + (["--out", str(args.out)] if args.out else []))
        print(f"\n{prog}: {e}. Continue with: {again}", file=sys.stderr)
        return 3, None
    except (ConfigError, CheckpointError, DatasetError, NormNotAvailable, FloatingPointError) as e:
        return _error(str(e), prog), None
    except RunFailed as e:  # a run failed in a worker process (--jobs, --executor ray)
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1, None
    return 0, metrics


def _failed_checks(metrics) -> List[str]:
    checks = (metrics or {}).get("summary", {}).get("checks") or {}
    return [name for name, c in checks.items() if not c.get("pass")]


def cmd_demo(args) -> int:
    """Figure 1 on the embedded mnist5k data with the documented defaults (3 seeds); exit 1 when a
    check fails."""
    rc, metrics = _run("fig1", args, "bnkit demo")
    if rc:
        return rc
    failed = _failed_checks(metrics)
    if failed:
        total = len(metrics["summary"]["checks"])
        print(f"bnkit demo: {len(failed)} of {total} checks FAILED: {', '.join(failed)} "
              f"(details: {Path(metrics['out_dir']) / 'report.html'})", file=sys.stderr)
        return 1
    return 0


def cmd_list(args) -> int:
    from .experiments.registry import list_text
    print("\n".join(list_text()))
    return 0


_TICK_SECONDS = 20.0


class _Ticker:
    """Prints ``MESSAGE (N s)`` every ``every`` seconds on stderr until stopped (a long silent step)."""

    def __init__(self, message: str, every: Optional[float] = None):
        self.message, self.every = message, _TICK_SECONDS if every is None else every
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self.t0 = time.perf_counter()

    def _loop(self):
        while not self._stop.wait(self.every):
            print(f"bnkit build: {self.message} ({time.perf_counter() - self.t0:.0f} s)", file=sys.stderr,
                  flush=True)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def cmd_build(args) -> int:
    """Build the C++ kernels ahead of time; succeeds (with a message) when there is no C++ extension."""
    try:
        from .kernels import cpp
    except ImportError:
        print("bnkit build: no C++ extension in this build; the portable torch backend is used")
        return 0
    build = getattr(cpp, "build", None)
    if build is None:
        print("bnkit build: no C++ extension in this build; the portable torch backend is used")
        return 0
    cached = cpp.library_path().exists()
    t0 = time.perf_counter()
    if cached:
        print(f"bnkit build: checking the cached C++ kernels ({cpp.library_path()})", file=sys.stderr, flush=True)
    else:
        print(f"bnkit build: compiling the C++ CPU kernels ({len(cpp.SOURCES)} sources, one time per source "
              f"version; a cold build takes about 1-3 minutes on 2 cores) into "
              f"{cpp.library_path().parent}", file=sys.stderr, flush=True)
    try:
        if args.verbose or cached:
            build(verbose=args.verbose)
        else:
            with _Ticker("still compiling"):
                build(verbose=False)
    except Exception as e:  # noqa: BLE001 - a failed build must not break `make setup`
        print(f"bnkit build: the C++ kernels could not be built after {time.perf_counter() - t0:.0f} s "
              f"({type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}); "
              f"the portable torch backend will be used (`bnkit build --verbose` shows the compiler output)",
              file=sys.stderr)
        return 0
    print(f"bnkit build: done in {time.perf_counter() - t0:.1f} s ({'cached' if cached else 'compiled'})",
          file=sys.stderr)
    return 0


def bench_script(argv: List[str]) -> tuple[str, List[str]]:
    """Which benchmark ``bnkit bench ARGS`` runs, and its arguments: benchmarks/models.py (whole networks)
    when ARGS name ``--models`` (``--models`` without a value: its default models), else
    benchmarks/kernels.py."""
    if not any(a == "--models" or a.startswith("--models=") for a in argv):
        return "kernels.py", list(argv)
    out = []
    for i, a in enumerate(argv):
        if a == "--models" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            continue
        out.append(a)
    return "models.py", out


def cmd_bench(args) -> int:
    """Benchmarks: runs ``main(argv)`` of benchmarks/kernels.py, or of benchmarks/models.py with ``--models``,
    from the source checkout."""
    import importlib.util
    script, argv = bench_script(list(args.bench_args))
    here = Path(__file__).resolve()
    cands = [Path.cwd() / "benchmarks" / script, here.parents[2] / "benchmarks" / script]
    path = next((p for p in cands if p.is_file()), None)
    if path is None:
        return _error(f"benchmarks/{script} not found (run from the source checkout)", "bnkit bench")
    spec = importlib.util.spec_from_file_location(f"bnkit_bench_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(argv)
    return int(rc or 0)


def _add_inspect_command(sub) -> None:
    """``bnkit inspect MODEL.pt [--data ...]``: the BN doctor (:func:`bnkit.inspect`) on a pickled model."""

    def positive_int(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            v = 0
        if v <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
        return v

    def load_data(spec: str, data_dir):
        path = Path(spec).expanduser()
        if path.suffix in (".pt", ".pth", ".npy") or path.exists():
            if not path.is_file():
                raise ValueError(f"--data: no such file: {path}")
            if path.suffix == ".npy":
                import numpy as np

                obj = np.load(path)
            else:
                import torch

                obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                obj = next((obj[k] for k in ("x", "images", "inputs", "data") if k in obj), obj)
            if isinstance(obj, (tuple, list)) and obj:
                obj = obj[0]
            import torch

            if not isinstance(obj, torch.Tensor):
                try:
                    obj = torch.as_tensor(obj)
                except (TypeError, ValueError, RuntimeError):
                    raise ValueError(f"--data: {path} holds a {type(obj).__name__}, not a tensor of inputs") from None
            return obj.float() if not obj.is_floating_point() else obj
        from .experiments.data import load_dataset

        return load_dataset(spec, data_dir).x_test

    def cmd_inspect(args) -> int:
        import pickle

        import torch
        from torch import nn

        from .family import still_lazy
        from .tools.doctor import inspect

        path = Path(args.model).expanduser()
        try:
            if not path.is_file():
                raise ValueError(f"no such file: {path}")
            for option, target in (("--json", args.json), ("--html", args.html)):
                if target and target != "-":  # checked before the work, which a bad path would waste
                    out = Path(target).expanduser()
                    if out.is_dir():
                        raise ValueError(f"{option} {target}: a directory is in the way (give a file name)")
                    if not out.parent.is_dir():
                        raise ValueError(f"{option} {target}: the directory {out.parent} does not exist")
            try:  # a pickled model runs code from the file: only load files you trust
                model = torch.load(path, map_location="cpu", weights_only=False)
            except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ImportError, ValueError) as e:
                first = (str(e).strip().splitlines() or [""])[0]
                raise ValueError(f"cannot load {path} as a pickled model ({type(e).__name__}: {first})") from None
            if not isinstance(model, nn.Module):
                hint = " (a state_dict: save the model itself with torch.save(model, path))" if isinstance(model, dict) else ""
                raise ValueError(f"{path} holds a {type(model).__name__}, not a pickled torch.nn.Module{hint}")  # noqa: TRY004
            lazy = next((n for n, m in model.named_modules() if still_lazy(m)), None)
            if lazy is not None:
                raise ValueError(f"{path}: layer {lazy or '<root>'!r} is a lazy layer that has not seen an input yet "
                                 "(save the model after one forward pass)")
            data = None
            if args.data:
                x = load_data(args.data, args.data_dir)
                if x.dim() == 0 or len(x) == 0:
                    raise ValueError(f"--data {args.data}: no samples")
                data = [x[i:i + args.batch_size] for i in range(0, len(x), args.batch_size)]
                if args.batches:
                    data = data[: args.batches]
            try:
                report = inspect(model, data)
            except (RuntimeError, ValueError, TypeError, IndexError) as e:
                first = (str(e).strip().splitlines() or [""])[0]
                raise ValueError(f"the model failed on the data ({type(e).__name__}: {first})") from None
        except ValueError as e:
            print(f"bnkit: error: {e}", file=sys.stderr)
            return 2
        except Exception as e:  # noqa: BLE001 - the CLI answers in one line, never with a traceback
            first = (str(e).strip().splitlines() or [""])[0]
            print(f"bnkit: error: {type(e).__name__}: {first}", file=sys.stderr)
            return 2
        if args.json == "-":
            print(report.to_json())
        else:
            report.print()
            if args.json:
                print(f"wrote {report.write_json(args.json)}")
        if args.html:
            print(f"wrote {report.write_html(args.html)}", file=sys.stderr if args.json == "-" else sys.stdout)
        return 0

    p = sub.add_parser("inspect", help="the BN doctor: diagnose the BN layers of a pickled model (torch.save(model))")
    p.add_argument("model", help="a file written by torch.save(model) (unpickled: only open files you trust)")
    p.add_argument("--data", help="inputs to compare statistics on: a .pt/.npy file (tensor, or (x, y)) or a dataset "
                   "name (its test split, e.g. mnist5k)")
    p.add_argument("--data-dir", help="directory with the dataset files (default: $BNKIT_DATA)")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--batches", type=positive_int, help="use at most this many batches")
    p.add_argument("--json", help="write the report as JSON to this file ('-': stdout, without the table)")
    p.add_argument("--html", help="write a self-contained HTML report to this file")
    p.set_defaults(func=cmd_inspect)


def cmd_report(args) -> int:
    """``bnkit report [RUNS_DIR] [--out FILE]``: the atlas of the finished experiments (experiments/atlas.py)."""
    from .experiments.atlas import AtlasError, write_atlas

    try:
        out, entries = write_atlas(Path(args.runs_dir), Path(args.out) if args.out else None)
    except AtlasError as e:
        return _error(str(e), "bnkit report")
    n_fin = sum(e.status == "finished" for e in entries)
    print(f"wrote {out}: {n_fin} finished experiment run{'s' * (n_fin != 1)} of "
          f"{len({e.experiment for e in entries if e.status == 'finished'})} experiment(s)")
    for e in sorted((e for e in entries if e.status != "finished"), key=lambda e: str(e.path)):
        print(f"  {e.status} {e.path}: {e.reason}")
    return 0


def _add_report_command(sub) -> None:
    p = sub.add_parser("report", help="the atlas: one self-contained RUNS_DIR/index.html of every finished "
                                      "experiment (figure, checks, link to its report)")
    p.add_argument("runs_dir", nargs="?", default="runs", metavar="RUNS_DIR",
                   help="the directory searched for experiment runs (default: runs)")
    p.add_argument("--out", metavar="FILE", help="write the page here (default: RUNS_DIR/index.html)")
    p.set_defaults(func=cmd_report)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser (``bnkit --help``). ``run`` and ``demo`` get their experiment's own parser
    (:func:`experiment_parser`) in :func:`main`, so building this one imports no experiment code."""
    p = _Parser(prog="bnkit", description="bnkit: Batch Normalization from the math up",
                epilog="`bnkit run NAME --help` and `bnkit demo --help` list an experiment's options.")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)

    sub.add_parser("demo", help="reproduce the BN paper's Figure 1 on the embedded MNIST digits (a few "
                                "minutes); exit 1 when a check fails", add_help=False)
    sub.add_parser("run", help=_RUN_HELP, add_help=False)

    ls = sub.add_parser("list", help="list experiments, datasets and norms")
    ls.set_defaults(func=cmd_list)

    b = sub.add_parser("build", help="build the C++ CPU kernels ahead of time (says how long it took)")
    b.add_argument("--verbose", action="store_true", help="show the compiler output")
    b.set_defaults(func=cmd_build)

    sub.add_parser("bench", help="benchmark the kernels (benchmarks/kernels.py); with --models, whole networks "
                   "(benchmarks/models.py)", add_help=False)
    _add_inspect_command(sub)
    _add_report_command(sub)
    return p


def _main_run(argv: List[str]) -> int:
    from .experiments.registry import EXPERIMENTS

    names = ", ".join(EXPERIMENTS) + (", all" if _have_suite() else "")
    if not argv:
        return _error(f"missing the experiment name: bnkit run NAME [options] (NAME: {names})", "bnkit run")
    if argv[0] in ("-h", "--help"):
        print("usage: bnkit run NAME [options]   (`bnkit run NAME --help`: the options of NAME)\n"
              f"experiments: {names}")
        return 0
    name = argv[0]
    if name.startswith("-"):
        return _error(f"the experiment name comes first: bnkit run NAME [options] (NAME: {names})", "bnkit run")
    if name == "all" and _have_suite():
        return _run("all", _suite_parser().parse_args(argv[1:]), "bnkit run all")[0]
    if name not in EXPERIMENTS:
        return _error(f"unknown experiment {name!r}; choose from {names}", "bnkit run")
    prog = f"bnkit run {name}"
    args = experiment_parser(name, prog).parse_args(argv[1:])
    return _run(name, args, prog)[0]


def _have_suite() -> bool:
    import importlib.util
    return importlib.util.find_spec("bnkit.experiments.suite") is not None




def _dispatch(argv: List[str]) -> int:
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to the benchmark script, --help included
        return cmd_bench(argparse.Namespace(bench_args=argv[1:]))
    if argv[:1] == ["run"]:
        return _main_run(argv[1:])
    if argv[:1] == ["demo"]:
        return cmd_demo(experiment_parser("fig1", "bnkit demo").parse_args(argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "cmd", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


def _end_startup_guard() -> None:
    """Gives Ctrl-C back to Python (KeyboardInterrupt, handled in :func:`main`) from the handler that
    ``bnkit/__init__`` installs for the startup of the command."""
    import signal

    from . import _cli_startup_sigint

    if _cli_startup_sigint is not None and signal.getsignal(signal.SIGINT) is _cli_startup_sigint:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        _end_startup_guard()
        return _dispatch(argv)
    except SystemExit as e:  # argparse's --help and usage errors (it has printed them)
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        msg = str(e.code)  # SystemExit("bnkit: ...") from lower code: one error line, a usage error
        if ": error: " not in msg:
            msg = "bnkit: error: " + (msg[len("bnkit: "):] if msg.startswith("bnkit: ") else msg)
        print(msg, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nbnkit: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a vanished directory, ...: one line, not a traceback
        print(f"bnkit: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a bug; one line unless asked for the traceback
        if os.environ.get("BNKIT_DEBUG"):
            raise
        print(f"bnkit: error: unexpected {type(e).__name__}: {e} (BNKIT_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
