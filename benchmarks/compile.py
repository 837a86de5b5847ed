"""torch.compile: compiled bnkit vs compiled torch on the ResNet-18-like network of ``models.py``.

Under ``torch.compile`` bnkit's layers express themselves in standard ATen ops
(``bnkit.kernels.aten_graph``), so inductor fuses BN with the ReLU/add around
it as it does for ``torch.nn.BatchNorm2d``. This script compiles both
networks (same weights) and times them in one process, interleaved in an
order shuffled every repetition (``models.time_interleaved``): an SGD training
step and an eval batch, NCHW and channels-last. Ratio = torch / bnkit
(> 1: bnkit faster). Eager rows are printed for reference.

Usage::

    python benchmarks/compile.py [--batch 32] [--sizes 32,64] [--layouts nchw,cl] [--ops train,eval]
                                 [--reps 15] [--warmup 3] [--threads 2] [--mode default]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402  (the benchmark's own models and timing helpers; puts src/ on the path)

import bnkit  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--sizes", default="32,64")
    p.add_argument("--layouts", default="nchw,cl")
    p.add_argument("--ops", default="eval,train")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", default="default", help="torch.compile mode")
    p.add_argument("--eager", action="store_true", help="also time the eager models")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, compile mode {args.mode!r}")
    print(f"{'op':5} {'layout':6} {'px':>3} {'torch ms':>9} {'bnkit ms':>9} {'torch/bnkit':>11}")
    for size in (int(s) for s in args.sizes.split(",")):
        for layout in args.layouts.split(","):
            for op in args.ops.split(","):
                torch.manual_seed(0)
                ref = models.ResNet18Like()
                cl = layout == "cl"
                x, y = models.case_inputs("resnet18", args.batch, size, cl)
                nets = {"torch": ref, "bnkit": bnkit.convert(copy.deepcopy(ref))}
                if cl:
                    nets = {k: m.to(memory_format=torch.channels_last) for k, m in nets.items()}
                steps = {}
                for name, net in nets.items():
                    compiled = torch.compile(net, mode=args.mode)
                    steps[name] = models.Step(compiled, x, y, op)
                    if args.eager:
                        steps["eager " + name] = models.Step(copy.deepcopy(net), x, y, op)
                for s in steps.values():  # compile outside the timing
                    s()
                t = models.time_interleaved(steps, args.reps, args.warmup)
                print(f"{op:5} {layout:6} {size:3d} {t['torch'] * 1e3:9.2f} {t['bnkit'] * 1e3:9.2f} "
                      f"{t['torch'] / t['bnkit']:10.3f}x", flush=True)
                if args.eager:
                    print(f"{'':5} {'eager':6} {'':3} {t['eager torch'] * 1e3:9.2f} {t['eager bnkit'] * 1e3:9.2f} "
                          f"{t['eager torch'] / t['eager bnkit']:10.3f}x", flush=True)
                torch._dynamo.reset()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
