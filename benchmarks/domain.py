"""DomainBatchNorm on a mixed batch against plain BN on the same input, side by side in one process.

Candidates, each a training forward + backward (input, weight and bias gradients) of float32 data:
``torch.nn.BatchNorm2d``, ``bnkit.BatchNorm2d`` and ``bnkit.DomainBatchNorm2d`` with ``--domains``
domains assigned to the samples at random (a mixed batch: every domain present, in shuffled order).
The candidates are interleaved rep by rep in an order shuffled every rep (the machine is shared,
so only same-process ratios mean anything); the table gives each median and the ratios
DomainBN / torch BN and DomainBN / bnkit BN.

Usage::

    python benchmarks/domain.py [--domains 4] [--reps 15] [--threads N] [--allocator default|tuned] [--quick]

Fresh multi-MB outputs page-fault with glibc's default settings, which costs every candidate
alike but adds noise; ``--allocator tuned`` re-runs the script with the settings of
``benchmarks/kernels.py`` that keep freed blocks mapped.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

_SRC = Path(__file__).resolve().parents[1] / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

from kernels import TUNED_MALLOC, allocator  # noqa: E402  (benchmarks/kernels.py, this script's folder)

import bnkit  # noqa: E402

#: (N, C, H, W, memory format)
CASES = [
    (32, 64, 56, 56, "nchw"),
    (32, 64, 56, 56, "channels_last"),
    (32, 256, 14, 14, "nchw"),
    (32, 256, 14, 14, "channels_last"),
    (64, 32, 32, 32, "nchw"),
]
QUICK = [(16, 64, 28, 28, "nchw"), (16, 64, 28, 28, "channels_last"), (32, 128, 14, 14, "nchw")]


def step(layer: torch.nn.Module, x: torch.Tensor, gy: torch.Tensor, **kw) -> None:
    x.grad = layer.weight.grad = layer.bias.grad = None
    layer(x, **kw).backward(gy)


def run_case(n: int, c: int, h: int, w: int, layout: str, domains: int, reps: int, warmup: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(n, c, h, w, generator=g).to(memory_format=fmt).requires_grad_()
    gy = torch.randn(n, c, h, w, generator=g).to(memory_format=fmt)
    dom = torch.arange(n) % domains
    dom = dom[torch.randperm(n, generator=g)]
    ref, ours, per = torch.nn.BatchNorm2d(c), bnkit.BatchNorm2d(c), bnkit.DomainBatchNorm2d(c, domains)
    candidates = {
        "torch BN": lambda: step(ref, x, gy),
        "bnkit BN": lambda: step(ours, x, gy),
        "DomainBN": lambda: step(per, x, gy, domain=dom),
    }
    times: dict[str, list[float]] = {k: [] for k in candidates}
    order = list(candidates)
    for rep in range(warmup + reps):
        random.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            candidates[name]()
            dt = time.perf_counter() - t0
            if rep >= warmup:
                times[name].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--domains", type=int, default=4)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="smaller shapes")
    p.add_argument("--allocator", choices=("default", "tuned"), default="default")
    args = p.parse_args(argv)
    if args.allocator == "tuned" and not all(os.environ.get(k) == v for k, v in TUNED_MALLOC.items()):
        rest = sys.argv[1:] if argv is None else argv
        script = str(Path(__file__).resolve())
        return subprocess.run([sys.executable, script, *rest], env={**os.environ, **TUNED_MALLOC}).returncode
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(0)
    print(
        f"DomainBatchNorm2d ({args.domains} domains, mixed batch) vs plain BN, training fwd+bwd, float32, "
        f"{torch.get_num_threads()} threads, per-domain C++ kernel: {bnkit.kernels.domain.domain_cpp_available()}, "
        f"{args.reps} reps (median ms; shared machine: read the ratios); allocator: {allocator()}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print("| shape | layout | torch BN | bnkit BN | DomainBN | Domain/torch | Domain/bnkit |")
    print("|---|---|---|---|---|---|---|")
    ratios = []
    for n, c, h, w, layout in QUICK if args.quick else CASES:
        med = run_case(n, c, h, w, layout, args.domains, args.reps, args.warmup)
        r_t, r_b = med["DomainBN"] / med["torch BN"], med["DomainBN"] / med["bnkit BN"]
        ratios.append((r_t, r_b))
        print(
            f"| {n}x{c}x{h}x{w} | {layout} | {med['torch BN'] * 1e3:.2f} | {med['bnkit BN'] * 1e3:.2f} | "
            f"{med['DomainBN'] * 1e3:.2f} | {r_t:.2f}x | {r_b:.2f}x |",
            flush=True,
        )
    print(
        f"| median | | | | | {statistics.median(r for r, _ in ratios):.2f}x | "
        f"{statistics.median(r for _, r in ratios):.2f}x |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
