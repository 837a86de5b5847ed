"""Masked BN (padded sequences) against the torch workaround, side by side in one process.

The workaround: boolean-index the valid rows (``x[mask]``), ``torch.nn.BatchNorm1d``
on them, scatter the result back into a zero tensor. bnkit: ``bnkit.BatchNorm(C,
axis=-1)(x, mask)``. Both run forward + backward in training mode (input, weight
and bias gradients) on ``(N, L, C)`` float32 with a fraction of padded positions
per sequence (each sequence keeps a random valid prefix). The candidates are
interleaved rep by rep in an order shuffled every rep (the machine is shared, so
only same-process ratios mean anything); the table gives the median time of each
and the ratio workaround / bnkit.

Usage::

    python benchmarks/masked.py [--n 64] [--l 512] [--c 256] [--pad 0.3] [--reps 15] [--threads N]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

_SRC = Path(__file__).resolve().parents[1] / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

import bnkit  # noqa: E402


def make_mask(n: int, length: int, pad: float, generator: torch.Generator) -> torch.Tensor:
    """Valid prefixes of random lengths (roughly uniform in ``[1 - 2 pad, 1] * length``), ``pad`` padded overall."""
    lo = max(0.0, 1.0 - 2 * pad)
    frac = lo + (1.0 - lo) * torch.rand(n, generator=generator)
    lengths = (frac * length).round().long().clamp(2, length)
    target = round((1.0 - pad) * n * length)
    while int(lengths.sum()) != target:  # exact overall padding: move one sequence a step at a time
        i = int(torch.randint(n, (1,), generator=generator))
        step = 1 if int(lengths.sum()) < target else -1
        lengths[i] = (lengths[i] + step).clamp(2, length)
    return torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)


def workaround_step(bn: torch.nn.BatchNorm1d, x: torch.Tensor, mask: torch.Tensor, gy: torch.Tensor) -> None:
    y = torch.zeros_like(x)
    y[mask] = bn(x[mask])
    x.grad = bn.weight.grad = bn.bias.grad = None
    y.backward(gy)


def bnkit_step(bn: bnkit.BatchNorm, x: torch.Tensor, mask: torch.Tensor, gy: torch.Tensor) -> None:
    y = bn(x, mask)
    x.grad = bn.weight.grad = bn.bias.grad = None
    y.backward(gy)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--l", type=int, default=512)
    p.add_argument("--c", type=int, default=256)
    p.add_argument("--pad", type=float, default=0.3)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, args.l, args.c, generator=g).requires_grad_()
    gy = torch.randn(args.n, args.l, args.c, generator=g)
    mask = make_mask(args.n, args.l, args.pad, g)
    ref = torch.nn.BatchNorm1d(args.c)
    ours = bnkit.BatchNorm(args.c, axis=-1)
    gy_valid = gy * mask.unsqueeze(-1)  # the workaround's output is 0 at padding: compare valid entries
    # The two agree before anything is timed.
    y_ref = torch.zeros_like(x)
    y_ref[mask] = ref(x[mask])
    y_ours = ours(x, mask)
    err = (y_ref - y_ours)[mask].abs().max().item()
    candidates = {
        "torch workaround": lambda: workaround_step(ref, x, mask, gy_valid),
        "bnkit mask=": lambda: bnkit_step(ours, x, mask, gy_valid),
    }
    times: dict[str, list[float]] = {k: [] for k in candidates}
    order = list(candidates)
    for rep in range(args.warmup + args.reps):
        random.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            candidates[name]()
            dt = time.perf_counter() - t0
            if rep >= args.warmup:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"masked BN fwd+bwd, training, (N, L, C) = ({args.n}, {args.l}, {args.c}) float32, "
        f"{1 - mask.float().mean().item():.0%} padding, {torch.get_num_threads()} threads, "
        f"backend {bnkit.kernels.select(x)}, {args.reps} reps (median; shared machine: read the ratio)"
    )
    print(f"max |difference| of the valid outputs: {err:.2e}")
    for name in candidates:
        print(f"  {name:<18} {med[name] * 1e3:9.2f} ms")
    print(f"  ratio workaround / bnkit: {med['torch workaround'] / med['bnkit mask=']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
