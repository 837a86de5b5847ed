"""Per-forward cost of ``accumulate_stats``, ``preserve_stats`` and ``checkpoint_safe`` (ratios, same process, interleaved).

A training forward of one BN layer (the contexts change nothing in the backward) on a 1 MB float32 input
``(16, 64, 16, 16)``, plain vs. inside each context (entered once, as in a
step of many micro-batches), the candidates interleaved in an order shuffled
every repetition; prints the median time of each, its ratio to plain, the
median of the per-repetition ratios (each against the plain block of the same
repetition: slow drifts of a shared machine cancel) and the minor page faults
per forward (a 1 MB output served from fresh pages faults on every forward).
On a loaded machine (more runnable threads than cores) wall-clock blocks
mostly measure preemption; ``--threads 1 --cpu-time`` times the one thread's
CPU time instead (``time.thread_time``: what the calls themselves cost).

``--with-entry`` times each block with the context's entry and exit (what a
step of ``--block`` micro-batches pays in all), spread over its forwards.

    PYTHONPATH=src python benchmarks/loops.py [--reps 200] [--block 10] [--threads N] [--cpu-time] [--with-entry]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import resource
import statistics
import time

import torch
from torch import nn

import bnkit


def _minor_faults() -> int:
    return resource.getrusage(getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)).ru_minflt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--block", type=int, default=10, help="forwards per entry of a context (one sample)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true", help="time this thread's CPU time (needs --threads 1)")
    parser.add_argument("--with-entry", action="store_true", help="time the context's entry and exit too")
    args = parser.parse_args()
    if args.cpu_time and args.threads != 1:
        parser.error("--cpu-time needs --threads 1 (it times the calling thread only)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    torch.manual_seed(0)
    x = torch.randn(16, 64, 16, 16, requires_grad=True)  # 1 MB of float32
    for label, layer in (("bnkit.BatchNorm2d", bnkit.BatchNorm2d(64)), ("torch.nn.BatchNorm2d", nn.BatchNorm2d(64))):
        cases = {"plain": lambda m: contextlib.nullcontext(), "preserve_stats": bnkit.preserve_stats,
                 "checkpoint_safe": bnkit.checkpoint_safe, "accumulate_stats": bnkit.accumulate_stats}
        times: dict[str, list[float]] = {name: [] for name in cases}
        faults: dict[str, int] = dict.fromkeys(cases, 0)
        # Each context is entered around a block of forwards: measure a block of --block per sample.
        for _ in range(args.reps):
            order = list(cases)
            random.shuffle(order)
            for name in order:
                f0, t0 = _minor_faults(), clock()
                with cases[name](layer):
                    if not args.with_entry:
                        f0, t0 = _minor_faults(), clock()
                    for _ in range(args.block):
                        layer(x)
                    if not args.with_entry:
                        t1, f1 = clock(), _minor_faults()
                if args.with_entry:
                    t1, f1 = clock(), _minor_faults()
                times[name].append((t1 - t0) / args.block)
                faults[name] += f1 - f0
        base = statistics.median(times["plain"])
        print(f"{label}: per training forward, median of {args.reps} blocks of {args.block} "
              f"({torch.get_num_threads()} threads, {'CPU' if args.cpu_time else 'wall'} time"
              f"{', entry and exit included' if args.with_entry else ''})")
        for name, ts in times.items():
            med = statistics.median(ts)
            paired = statistics.median(t / p for t, p in zip(ts, times["plain"]))
            print(f"  {name:18s} {med * 1e6:9.1f} us   ratio {med / base:.3f}   paired {paired:.3f}   "
                  f"page faults {faults[name] / (args.reps * args.block):6.1f}")


if __name__ == "__main__":
    main()
