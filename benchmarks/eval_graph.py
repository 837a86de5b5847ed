"""Layer benchmark: eval-mode BN in a graph (frozen statistics while fine-tuning, input gradients of an eval
model), forward + backward, torch vs bnkit.

For each shape and memory format one ``torch.nn.BatchNorm2d`` in eval mode with random running statistics is
copied (same parameters) as

* ``bnkit``   :func:`bnkit.convert` of it,
* ``accel``   the torch layer under ``bnkit.accelerated()``,
* ``torch+relu`` / ``fused``  the layer followed by ``nn.ReLU(inplace=True)``, and its conversion with
  ``fuse_activations=True`` (one ``BatchNormAct2d``),

and each candidate runs ``y = layer(x); y.backward(g)`` with ``x`` requiring grad (input, weight and bias
gradients), interleaved rep by rep in an order shuffled every rep; the table gives medians and the ratios
torch / bnkit, torch / accel and (torch+relu) / fused.

Usage::

    python benchmarks/eval_graph.py [--reps 21] [--warmup 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))
from models import time_interleaved  # noqa: E402  (also puts the source checkout on the path)

import bnkit  # noqa: E402

SHAPES = [(32, 64, 32, 32), (32, 128, 16, 16), (32, 256, 16, 16), (128, 32, 32, 32), (32, 512, 8, 8)]


def candidates(shape, channels_last: bool):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(*shape).contiguous(memory_format=fmt).requires_grad_()
    g = torch.randn(*shape).contiguous(memory_format=fmt)
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(shape[1])
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.0)
    layers = {
        "torch": bn,
        "bnkit": bnkit.convert(copy.deepcopy(bn)),
        "accel": copy.deepcopy(bn),
        "torch+relu": nn.Sequential(copy.deepcopy(bn), nn.ReLU(inplace=True)),
    }
    layers["fused"] = bnkit.convert(copy.deepcopy(layers["torch+relu"]), fuse_activations=True)
    for m in layers.values():
        m.eval()

    def step(name):
        m = layers[name]

        def run():
            y = m(x)
            y.backward(g)
            x.grad = None
            m.zero_grad(set_to_none=True)

        if name == "accel":
            def accelerated():
                with bnkit.accelerated():
                    run()
            return accelerated
        return run

    return {name: step(name) for name in layers}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"bnkit {bnkit.__version__} | torch {torch.__version__} | threads={torch.get_num_threads()} | median of"
          f" {args.reps}, candidates interleaved, order shuffled per rep; eval-mode layer, forward + backward")
    head = (f"{'shape':>18} {'layout':>13} | {'torch ms':>8} {'bnkit ms':>8} {'torch/bnkit':>11} {'accel':>6} |"
            f" {'+relu ms':>8} {'fused ms':>8} {'fused':>6}")
    print(head)
    print("-" * len(head))
    for shape in SHAPES:
        for cl in (False, True):
            t = time_interleaved(candidates(shape, cl), args.reps, args.warmup)
            print(f"{'x'.join(map(str, shape)):>18} {'channels_last' if cl else 'NCHW':>13} |"
                  f" {t['torch'] * 1e3:>8.2f} {t['bnkit'] * 1e3:>8.2f} {t['torch'] / t['bnkit']:>10.2f}x"
                  f" {t['torch'] / t['accel']:>5.2f}x | {t['torch+relu'] * 1e3:>8.2f} {t['fused'] * 1e3:>8.2f}"
                  f" {t['torch+relu'] / t['fused']:>5.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
