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


def _set_arg(s: str):
    import json
    key, eq, val = s.partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {s!r}")
    try:
        v = json.loads(val)
    except ValueError:
        v = val
    return key.strip().replace("-", "_"), v


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
    g.add_argument("--set", dest="set_", action="append", type=_set_arg, metavar="KEY=VALUE", default=None,
                   help="any other setting of the experiment (VALUE is JSON, or a plain string), e.g. "
                        "--set lrs=[0.1,1,10]; repeatable; see DEFAULTS in the experiment's module")
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
    for k, v in getattr(args, "set_", None) or []:
        ov[k] = v
    if ov.get("data_dir") is not None:
        ov["data_dir"] = str(Path(ov["data_dir"]).expanduser().resolve())
    return {k: v for k, v in ov.items() if v is not None}


def _run(experiment: str, args) -> int:
    from .experiments.registry import run_experiment
    from .experiments.train import RunInterrupted
    from .experiments.data import DatasetError
    from .experiments.models import NormNotAvailable

    try:
        if experiment == "all":
            from .experiments.suite import run_all
            run_all(_overrides(args), out=args.out, resume=args.resume, quiet=args.quiet,
                    stop_after=args.stop_after)
        else:
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bnkit", description="bnkit: Batch Normalization from the math up")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    d = sub.add_parser("demo", help="reproduce the BN paper's Figure 1 on the embedded MNIST digits (< 5 min)")
    _add_run_options(d)
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("run", help="run an experiment (see `bnkit list`), or `all` of them")
    r.add_argument("experiment", help="experiment name (see `bnkit list`), or `all`: every experiment and an index page")
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
