"""The portable backend's batch moments (``bnkit.stats.Moments.of``) against a plain float32 two-pass.

``Moments.of`` sums a float32 mean along the innermost reduced dim in float32 and the partial sums in
float64 (as accurate as ATen's CPU batch norm, which accumulates in double); the peer is the same
shifted two-pass with one float32 ``mean(dims)``. Both run in one process, interleaved in an order
shuffled every rep; the table gives medians, their ratio, and each one's error of the mean against
float64 on data whose mean is small against its spread (randn * 100 + 1).

Usage::

    python benchmarks/moments.py [--threads 2] [--reps 31]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from bnkit.stats import Moments

SHAPES = [(64, 64, 784), (128, 32, 1024), (256, 256, 1), (32, 512, 49)]


def plain(x3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The shifted two-pass with a float32 mean over (0, 2)."""
    shift = x3[:1, :, :1]
    c = x3 - shift
    m = c.mean(dim=(0, 2), keepdim=True)
    return (m + shift).squeeze((0, 2)), (c - m).square().sum(dim=(0, 2))


def ours(x3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = Moments.of(x3, (0, 2))
    return m.mean, m.m2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=31)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.reps} reps, medians")
    print(f"{'shape (N, C, L)':>18} {'float32 mean ms':>16} {'Moments.of ms':>14} {'ratio':>6} "
          f"{'err float32':>12} {'err Moments.of':>15}")
    for shape in SHAPES:
        x3 = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 100 + 1
        truth = x3.double().mean(dim=(0, 2))
        fns = {"plain": plain, "ours": ours}
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(3):
            for f in fns.values():
                f(x3)
        for _ in range(args.reps):
            order = list(fns)
            random.shuffle(order)
            for k in order:
                t0 = time.perf_counter()
                fns[k](x3)
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        err = {k: ((f(x3)[0].double() - truth).abs().max() / truth.abs().max()).item() for k, f in fns.items()}
        print(f"{str(shape):>18} {med['plain']:>16.3f} {med['ours']:>14.3f} {med['ours'] / med['plain']:>6.2f} "
              f"{err['plain']:>12.1e} {err['ours']:>15.1e}")


if __name__ == "__main__":
    main()
