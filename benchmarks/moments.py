"""The portable backend's batch moments (``bnkit.stats.Moments.of``) against a plain float32 two-pass.

``Moments.of`` sums a float32 mean along the innermost reduced dim (the trailing reduced dims taken as
one where they merge into a view, H * W of an NCHW or channels-last input) in float32 and the partial sums in
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

# (shape, channels_last): the (N, C, L) views the layers reduce, and 4-D (N, C, H, W) inputs as the F-style
# ``moments(x, [0, 2, 3])`` sees them, whose short innermost dim (W = 28) is the hard case for a float32 sum
CASES = [((64, 64, 784), False), ((128, 32, 1024), False), ((256, 256, 1), False), ((32, 512, 49), False),
         ((64, 64, 28, 28), False), ((64, 64, 28, 28), True), ((32, 256, 14, 14), True)]


def _dims(x: torch.Tensor) -> tuple[int, ...]:
    return (0, *range(2, x.dim()))


def plain(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The shifted two-pass with one float32 mean over every dim but the channel."""
    dims = _dims(x)
    shift = x
    for d in dims:
        shift = shift.narrow(d, 0, 1)
    c = x - shift
    m = c.mean(dim=dims, keepdim=True)
    return (m + shift).squeeze(dims), (c - m).square().sum(dim=dims)


def ours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = Moments.of(x, _dims(x))
    return m.mean, m.m2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=31)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.reps} reps, medians")
    print(f"{'shape':>24} {'float32 mean ms':>16} {'Moments.of ms':>14} {'ratio':>6} "
          f"{'err float32':>12} {'err Moments.of':>15}")
    for shape, channels_last in CASES:
        x3 = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 100 + 1
        if channels_last:
            x3 = x3.contiguous(memory_format=torch.channels_last)
        truth = x3.double().mean(dim=_dims(x3))
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
        label = str(shape) + (" CL" if channels_last else "")
        print(f"{label:>24} {med['plain']:>16.3f} {med['ours']:>14.3f} {med['ours'] / med['plain']:>6.2f} "
              f"{err['plain']:>12.1e} {err['ours']:>15.1e}")


if __name__ == "__main__":
    main()
