"""The ``bnkit`` command line (also ``python -m bnkit.cli``).

Subcommands: ``demo`` (Figure 1 on the embedded data), ``run EXPERIMENT``, ``list``, ``build`` (the C++
kernels) and ``bench`` (kernel benchmarks). Imports are lazy: ``bnkit build`` loads no plotting code.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional


def _positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s}")
    return v


def _init_arg(s: str) -> str:
    if s == "default":
        return s
    if s.startswith("normal:"):
        try:
            if float(s.split(":", 1)[1]) > 0:
                return s
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"--init must be 'default' or 'normal:STD' (STD > 0), got {s!r}")


def _int_list(s: str) -> List[int]:
    return [int(x) for x in s.replace(",", " ").split()]


def _str_list(s: str) -> List[str]:
    return [x for x in s.replace(",", " ").split()]


def _add_run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("experiment settings (defaults: the experiment's own; see `bnkit list`)")
    g.add_argument("--data", help="dataset name (mnist5k, mnist, mnist+5k, digits, mnist1d, fashion-mnist, cifar10)")
    g.add_argument("--data-dir", help="directory with the dataset files (default: $BNKIT_DATA)")
    g.add_argument("--steps", type=_positive_int, help="training steps per run")
    g.add_argument("--lr", type=float, help="learning rate")
    g.add_argument("--batch-size", type=_positive_int, help="mini-batch size (paper: 60)")
    g.add_argument("--optimizer", choices=["sgd", "momentum", "adam"])
    g.add_argument("--init", type=_init_arg, help="default | normal:STD")
    g.add_argument("--seed", type=int, help="a single seed (shorthand for --seeds S)")
    g.add_argument("--seeds", type=_int_list, help="comma-separated seeds, e.g. 0,1,2")
    g.add_argument("--eval-every", type=_positive_int, help="evaluate every K steps")
    g.add_argument("--threshold", type=float, help="accuracy threshold for steps-to-threshold")
    g.add_argument("--binarize", action=argparse.BooleanOptionalAction, default=None,
                   help="binarize pixels at 0.5")
    g.add_argument("--normalize", choices=["none", "unit", "center", "standard"])
    g.add_argument("--norm", help="fig1: the normalized variant (bn, bn-weight, bn-all, renorm, ghost, gn, ln)")
    g.add_argument("--norms", type=_str_list, help="norms: which norms to compare (comma-separated)")
    g.add_argument("--arch", choices=["mlp", "cnn"], help="norms: network (fig1 is always the MLP)")
    g.add_argument("--threads", type=_positive_int, help="torch threads (default 1)")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, help="output directory (default runs/<experiment>-<timestamp>)")
    o.add_argument("--resume", action="store_true",
                   help="continue an interrupted experiment in --out (default: the latest runs/<experiment>-*)")
    o.add_argument("--quiet", action="store_true", help="no progress bar or tables")
    o.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: interrupt after N steps


_SETTINGS = ("data", "data_dir", "steps", "lr", "batch_size", "optimizer", "init", "seeds", "eval_every",
             "threshold", "binarize", "normalize", "norm", "norms", "arch", "threads")


def _overrides(args) -> dict:
    ov = {k: getattr(args, k, None) for k in _SETTINGS}
    if getattr(args, "seed", None) is not None:
        ov["seeds"] = [args.seed]
    if ov.get("data_dir") is not None:
        ov["data_dir"] = str(Path(ov["data_dir"]).expanduser().resolve())
    return {k: v for k, v in ov.items() if v is not None}


def _run(experiment: str, args) -> int:
    from .experiments.registry import run_experiment
    from .experiments.train import RunInterrupted
    from .experiments.data import DatasetError
    from .experiments.models import NormNotAvailable

    try:
        run_experiment(experiment, _overrides(args), out=args.out, resume=args.resume, quiet=args.quiet,
                       stop_after=args.stop_after)
    except RunInterrupted as e:
        print(f"\nbnkit: {e}. Continue with: bnkit run {experiment} --resume"
              f"{' --out ' + str(args.out) if args.out else ''}", file=sys.stderr)
        return 3
    except (DatasetError, NormNotAvailable, FloatingPointError) as e:
        print(f"bnkit: error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_demo(args) -> int:
    """Figure 1 on the embedded mnist5k data with the documented defaults (3 seeds)."""
    return _run("fig1", args)


def cmd_run(args) -> int:
    return _run(args.experiment, args)


def cmd_list(args) -> int:
    from .experiments.registry import list_text
    print("\n".join(list_text()))
    return 0


def cmd_build(args) -> int:
    """Build the C++ kernels ahead of time; succeeds (with a message) when there is no C++ extension."""
    try:
        from .kernels import cpp
    except ImportError:
        print("bnkit: no C++ extension in this build; the portable torch backend is used")
        return 0
    build = getattr(cpp, "build", None)
    if build is None:
        print("bnkit: no C++ extension in this build; the portable torch backend is used")
        return 0
    try:
        build(verbose=args.verbose)
    except Exception as e:  # noqa: BLE001 - a failed build must not break `make setup`
        print(f"bnkit: the C++ kernels could not be built ({type(e).__name__}: {e}); "
              f"the portable torch backend will be used", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    """Kernel benchmarks: runs ``main(argv)`` of benchmarks/kernels.py from the source checkout."""
    import importlib.util
    here = Path(__file__).resolve()
    cands = [Path.cwd() / "benchmarks" / "kernels.py", here.parents[2] / "benchmarks" / "kernels.py"]
    path = next((p for p in cands if p.is_file()), None)
    if path is None:
        print("bnkit: benchmarks/kernels.py not found (run from the source checkout)", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("bnkit_bench_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(list(args.bench_args))
    return int(rc or 0)


def _add_inspect_command(sub) -> None:
    """``bnkit inspect MODEL.pt [--data ...]``: the BN doctor (:func:`bnkit.inspect`) on a pickled model."""

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

        from .tools.doctor import inspect

        path = Path(args.model).expanduser()
        try:
            if not path.is_file():
                raise ValueError(f"no such file: {path}")
            try:  # a pickled model runs code from the file: only load files you trust
                model = torch.load(path, map_location="cpu", weights_only=False)
            except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ImportError, ValueError) as e:
                first = (str(e).strip().splitlines() or [""])[0]
                raise ValueError(f"cannot load {path} as a pickled model ({type(e).__name__}: {first})") from None
            if not isinstance(model, nn.Module):
                hint = " (a state_dict: save the model itself with torch.save(model, path))" if isinstance(model, dict) else ""
                raise ValueError(f"{path} holds a {type(model).__name__}, not a pickled torch.nn.Module{hint}")  # noqa: TRY004
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
    p.add_argument("--batch-size", type=_positive_int, default=256)
    p.add_argument("--batches", type=_positive_int, help="use at most this many batches")
    p.add_argument("--json", help="write the report as JSON to this file ('-': stdout, without the table)")
    p.add_argument("--html", help="write a self-contained HTML report to this file")
    p.set_defaults(func=cmd_inspect)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bnkit", description="bnkit: Batch Normalization from the math up")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    d = sub.add_parser("demo", help="reproduce the BN paper's Figure 1 on the embedded MNIST digits (< 5 min)")
    _add_run_options(d)
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("run", help="run an experiment (fig1, norms)")
    r.add_argument("experiment", help="experiment name (see `bnkit list`)")
    _add_run_options(r)
    r.set_defaults(func=cmd_run)

    ls = sub.add_parser("list", help="list experiments, datasets and norms")
    ls.set_defaults(func=cmd_list)

    b = sub.add_parser("build", help="build the C++ CPU kernels ahead of time")
    b.add_argument("--verbose", action="store_true")
    b.set_defaults(func=cmd_build)

    be = sub.add_parser("bench", help="benchmark the kernels (benchmarks/kernels.py)", add_help=False)
    be.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments passed to benchmarks/kernels.py")
    be.set_defaults(func=cmd_bench)
    _add_inspect_command(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to benchmarks/kernels.py, --help included
        return cmd_bench(argparse.Namespace(bench_args=argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "cmd", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
