"""Option parsers of the ``bnkit`` command line: one experiment's settings as options (:func:`experiment_parser`), ``run all``, ``--set``."""

from __future__ import annotations

import argparse
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG: error: MESSAGE`` (plus a hint line), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n(see `{self.prog} --help`)\n")

    def _get_values(self, action, arg_strings):
        # `--steps=--`: argparse drops a '--' value as the end of the options, and the option silently gets []
        # (CPython 3.11/3.12); given explicitly as the value it is a value, checked like any other.
        if action.option_strings and action.nargs is None and arg_strings == ["--"]:
            value = self._get_value(action, "--")
            self._check_value(action, value)
            return value
        return super()._get_values(action, arg_strings)


def _option_type(key, opt):
    def parse(s: str):
        try:
            return opt.parse(s)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = key  # argparse names the type in some messages
    return parse


def experiment_parser(name: str, prog: str) -> argparse.ArgumentParser:
    """The parser of one experiment: its settings (``DEFAULTS``) as options, with their defaults shown."""
    from .experiments.registry import experiment_options, flag, get_experiment

    exp = get_experiment(name)
    mod = exp.load()
    opts = experiment_options(exp)
    doc = (mod.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    p = _Parser(prog=prog, description=f"{exp.title}. {doc}",
                epilog="List values are comma-separated (e.g. --seeds 0,1,2). "
                       "Exit codes: 0 done, 1 a run failed in a worker (--jobs, --executor ray), 2 bad usage (nothing "
                       "written), 3 interrupted (--resume continues).")
    g = p.add_argument_group(f"settings of {name} (with its defaults)")
    for key, opt in opts.items():
        default = mod.DEFAULTS[key]
        help_ = opt.help or key.replace("_", " ")
        if opt.choices and opt.kind in ("str", "strs"):
            help_ += f"; one of {', '.join(opt.choices)}" if opt.kind == "str" else f"; from {', '.join(opt.choices)}"
        if "(default:" not in help_:
            help_ += f" (default: {opt.describe_default(default)})"
        dest = key
        if opt.kind == "bool":
            g.add_argument(flag(key), dest=dest, action=argparse.BooleanOptionalAction, default=None,
                           help=help_.replace("%", "%%"))
        else:
            metavar = {"int": "N", "float": "X", "ints": "N,...", "floats": "X,...", "strs": "NAME,...",
                       "json": "JSON"}.get(
                opt.kind, "NAME" if opt.choices else ("DIR" if key.endswith("_dir") else "VALUE"))
            g.add_argument(flag(key), dest=dest, type=_option_type(key, opt), default=None, metavar=metavar,
                           help=help_.replace("%", "%%"))
        if key == "seeds":
            g.add_argument("--seed", dest="seeds", type=_option_type("seed", opt), default=None, metavar="N",
                           help="a single seed (short for --seeds N)")
    g.add_argument("--set", dest="_set", action="append", type=_set_arg, default=None, metavar="KEY=VALUE",
                   help="any setting by its DEFAULTS name, the value as on its own option (or JSON); repeatable")
    _add_output_options(p, name)
    p.set_defaults(_settings=list(opts), _options=opts)
    return p


def _set_arg(s: str):
    key, eq, val = s.partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    return key.strip().replace("-", "_"), val


def _add_output_options(p: argparse.ArgumentParser, name: str) -> None:
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, metavar="DIR", help=f"output directory (default: runs/{name}-<timestamp>)")
    o.add_argument("--resume", action="store_true",
                   help=f"continue an interrupted experiment in --out (default: the latest runs/{name}-*); "
                        f"its saved settings are used")
    o.add_argument("--quiet", action="store_true", help="no progress bar or tables")
    o.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: interrupt after N steps
    _add_execution_options(p)


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _add_execution_options(p: argparse.ArgumentParser) -> None:
    """Where the runs train (bnkit.experiments.executors) and the TensorBoard event files."""
    x = p.add_argument_group("execution (the results are the same however the runs are executed)")
    x.add_argument("--jobs", type=_positive_int, default=None, metavar="N",
                   help="train up to N runs at once, each in a worker process (default: 1, one after the other); "
                        "with --executor ray: at most N Ray tasks at a time")
    x.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: this machine (default); ray: tasks on a Ray cluster (pip install 'bnkit[ray]')")
    x.add_argument("--address", metavar="ADDR", default=None,
                   help="with --executor ray: the cluster to join (auto: the one `ray start` set up on this node; "
                        "default: $RAY_ADDRESS, else a local Ray instance)")
    x.add_argument("--tensorboard", type=Path, metavar="DIR", default=None,
                   help="also write TensorBoard event files to DIR/<experiment>/<run> (pip install 'bnkit[tensorboard]')")


def execution_kwargs(args) -> dict:
    """The executor and TensorBoard keyword arguments of ``run_experiment``/``run_all`` from parsed ``args``."""
    return {"jobs": getattr(args, "jobs", None), "executor": getattr(args, "executor", None) or "local",
            "address": getattr(args, "address", None), "tensorboard": getattr(args, "tensorboard", None)}


class _UsageError(Exception):
    """A mistake found after parsing (``--set`` of an unknown setting): one error line, exit status 2."""


def _overrides(args) -> dict:
    opts = getattr(args, "_options", None) or {}
    ov = {k: getattr(args, k, None) for k in getattr(args, "_settings", [])}
    for key, text in getattr(args, "_set", None) or []:
        if opts and key not in opts:
            raise _UsageError(f"--set {key}: no such setting; the settings: {', '.join(opts)}")
        try:
            ov[key] = opts[key].parse(text) if opts else _json_or_text(text)
        except ValueError as e:
            raise _UsageError(f"--set {key}: {e}") from None
    if ov.get("data_dir") is not None:
        ov["data_dir"] = str(Path(ov["data_dir"]).expanduser().resolve())
    return {k: v for k, v in ov.items() if v is not None}


def _json_or_text(text: str):
    import json
    try:
        return json.loads(text)
    except ValueError:
        return text


def _suite_parser() -> argparse.ArgumentParser:
    """``bnkit run all``: every experiment in turn; a setting given here applies where an experiment has it."""
    from .experiments.registry import common_options, flag
    p = _Parser(prog="bnkit run all", description="Run every experiment and write an index page.")
    g = p.add_argument_group("settings (each applies to the experiments that have it)")
    common = common_options()
    for key in ("steps", "seeds", "threads", "data_dir"):
        g.add_argument(flag(key), dest=key, type=_option_type(key, common[key]), default=None,
                       help=common[key].help)
    g.add_argument("--seed", dest="seeds", type=_option_type("seed", common["seeds"]), default=None,
                   metavar="N", help="a single seed (short for --seeds N)")
    g.add_argument("--set", dest="_set", action="append", type=_set_arg, default=None, metavar="KEY=VALUE",
                   help="any other setting (the value as JSON, or a plain string); repeatable")
    _add_output_options(p, "all")
    p.set_defaults(_settings=["steps", "seeds", "threads", "data_dir"], _options=None)
    return p
