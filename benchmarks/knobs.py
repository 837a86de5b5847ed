"""Same-process A/B of the C++ kernels' tuning knobs (``torch.ops.bnkit._tune``).

Each setting is a named set of knob values; every setting times bnkit on the
benchmark's cases (``benchmarks/kernels.py``), interleaved with ATen and a
clone in an order shuffled every repetition, and the knobs are set before each
timed call (untimed).  Comparing settings across processes is unreliable on
shared machines (10-50% between runs), so this is how the defaults in
``kernels.cpp`` (``tuning()``) were chosen.

Usage::

    python benchmarks/knobs.py --ops backward --only 'NCHW float32' \\
        base: blocked:block_bytes_grad=1048576 streamed:nt_grad_bytes=0

A setting is ``NAME:KNOB=VALUE,KNOB=VALUE`` (``NAME:`` alone: the defaults).
Prints, per case and op, ATen's and the clone's median time and each setting's
median with its speedup over ATen.  Run with the benchmark's ``--allocator
tuned`` environment for numbers comparable to ``bnkit bench``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels as bench  # noqa: E402  (benchmarks/kernels.py: cases, candidates, timing)

from bnkit.kernels import cpp  # noqa: E402


def parse_setting(text: str) -> tuple[str, dict[str, int]]:
    """``'name:knob=1,other=2'`` -> ``('name', {'knob': 1, 'other': 2})``."""
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise ValueError(f"a setting is NAME:KNOB=VALUE,... (NAME: for the defaults), got {text!r}")
    knobs = {}
    for item in filter(None, rest.split(",")):
        knob, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"expected KNOB=VALUE in {text!r}, got {item!r}")
        knobs[knob.strip()] = int(value)
    return name, knobs


class _WithKnobs:
    """A candidate whose (untimed) ``prepare`` sets the knobs, then runs the inner prepare."""

    def __init__(self, fn, knobs: dict[str, int]):
        self.fn, self.knobs = fn, knobs

    def prepare(self) -> None:
        for knob, value in self.knobs.items():
            torch.ops.bnkit._tune(knob, value)
        inner = getattr(self.fn, "prepare", None)
        if inner is not None:
            inner()

    def __call__(self):
        return self.fn()


def run(settings: dict[str, dict[str, int]], ops: list[str], only: str | None, reps: int, warmup: int) -> list[dict]:
    if not cpp.load():
        raise SystemExit("bnkit: the C++ kernels are not available (run `bnkit build`)")
    knobs = sorted({k for s in settings.values() for k in s})
    defaults = {k: torch.ops.bnkit._tune(k, -1) for k in knobs}
    rows = []
    try:
        for name, shape, cl, dtype in bench.CASES:
            label = bench._case_label(name, shape, cl, dtype)
            if only and not any(all(w in label.split() for w in sel.split()) for sel in only.split(",")):
                continue
            cands = bench.candidates(shape, cl, dtype)
            for op in ops:
                fns = {
                    "aten": _WithKnobs(cands[op]["aten"], defaults),
                    "clone": _WithKnobs(cands["clone"]["clone"], defaults),
                }
                for sname, sknobs in settings.items():
                    fns[sname] = _WithKnobs(cands[op]["bnkit"], {**defaults, **sknobs})
                res = bench.time_interleaved(fns, reps, warmup)
                rows.append({"case": label, "op": op, **{k: v * 1e3 for k, v in res.items()}})
                line = f"{label:38s} {op:9s} aten {res['aten'] * 1e3:7.3f} clone {res['clone'] * 1e3:7.3f} |"
                for sname in settings:
                    line += f" {sname} {res[sname] * 1e3:7.3f} ({res['aten'] / res[sname]:.2f}x)"
                print(line, flush=True)
    finally:
        for knob, value in defaults.items():
            torch.ops.bnkit._tune(knob, value)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("settings", nargs="+", help="NAME:KNOB=VALUE,... (NAME: alone = the defaults)")
    p.add_argument("--ops", default="train fwd,backward", help=f"comma-separated, of: {', '.join(bench.OPS)}")
    p.add_argument("--only", metavar="SEL", help="case selection, as in benchmarks/kernels.py --only")
    p.add_argument("--reps", type=int, default=41)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args(argv)
    try:
        settings = dict(parse_setting(s) for s in args.settings)
    except ValueError as e:
        p.error(str(e))
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in bench.OPS]
    if bad:
        p.error(f"unknown op(s) {bad}; choose from {list(bench.OPS)}")
    print(f"bnkit knobs A/B | allocator: {bench.allocator()} | threads={torch.get_num_threads()} | pid {os.getpid()}")
    run(settings, ops, args.only, args.reps, args.warmup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
