"""Per-forward cost of ``accumulate_stats`` and ``preserve_stats`` (a ratio, same process, interleaved).

A training forward of one BN layer (the contexts change nothing in the backward) on a 1 MB float32 input
``(16, 64, 16, 16)``, plain vs. inside each context (entered once, as in a
step of many micro-batches), the candidates interleaved in an order shuffled
every repetition; prints the median time of each and its ratio to plain.

    PYTHONPATH=src python benchmarks/loops.py [--reps 200]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import time

import torch
from torch import nn

import bnkit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(16, 64, 16, 16, requires_grad=True)  # 1 MB of float32
    for label, layer in (("bnkit.BatchNorm2d", bnkit.BatchNorm2d(64)), ("torch.nn.BatchNorm2d", nn.BatchNorm2d(64))):
        cases = {"plain": lambda m: contextlib.nullcontext(), "preserve_stats": bnkit.preserve_stats,
                 "accumulate_stats": bnkit.accumulate_stats}
        times: dict[str, list[float]] = {name: [] for name in cases}
        # Each context is entered around a block of forwards: measure a block of 10 per sample.
        for _ in range(args.reps):
            order = list(cases)
            random.shuffle(order)
            for name in order:
                with cases[name](layer):
                    t0 = time.perf_counter()
                    for _ in range(10):
                        layer(x)
                    times[name].append((time.perf_counter() - t0) / 10)
        base = statistics.median(times["plain"])
        print(f"{label}: per training forward, median of {args.reps} blocks of 10")
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"  {name:18s} {med * 1e6:9.1f} us   ratio {med / base:.3f}")


if __name__ == "__main__":
    main()
