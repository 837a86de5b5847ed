"""The cost of torch's classes as bases of bnkit's drop-ins (ratios, same process, interleaved).

``bnkit.BatchNorm2d`` derives from ``bnkit.BatchNorm`` and from ``torch.nn.BatchNorm2d`` (so that code finding
BN layers by torch's class finds it). This times a layer call of it against the same layer built without the
torch base (``BatchNorm`` with ``expected_dims=(4,)``, the class before), in training and eval, on a small input
where the fixed cost of a call dominates; the two in an order shuffled every repetition; prints the median
microseconds per call and the median of the per-repetition ratios.

    PYTHONPATH=src python benchmarks/class_bases.py [--reps 41] [--calls 300] [--threads 2]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

import bnkit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=41)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    without = type("BatchNorm2d", (bnkit.BatchNorm,), {"expected_dims": (4,), "__module__": "bnkit.layers"})
    x = torch.randn(8, 16, 4, 4)
    print("| mode | with torch base (us/call) | without (us/call) | ratio with/without (median of reps) |")
    print("|---|---|---|---|")
    for train in (True, False):
        arms = {"with": bnkit.BatchNorm2d(16).train(train), "without": without(16).train(train)}
        times: dict[str, list[float]] = {k: [] for k in arms}
        for _ in range(args.reps):
            order = list(arms)
            random.shuffle(order)
            for k in order:
                layer = arms[k]
                t = time.perf_counter()
                for _ in range(args.calls):
                    layer(x)
                times[k].append((time.perf_counter() - t) / args.calls * 1e6)
        ratio = statistics.median(a / b for a, b in zip(times["with"], times["without"]))
        print(f"| {'train' if train else 'eval'} | {statistics.median(times['with']):.1f} | "
              f"{statistics.median(times['without']):.1f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
