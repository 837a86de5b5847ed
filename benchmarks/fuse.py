"""Eval latency of a ResNet-style CNN before and after ``bnkit.fuse``.

    .venv/bin/python benchmarks/fuse.py [--bn torch|bnkit|both] [--runs 50] [--batch 8] [--size 64] [--threads 1]

The network: a conv-BN-ReLU stem, four stages of two basic residual blocks
(conv-BN-ReLU-conv-BN + shortcut, a 1x1 conv-BN shortcut when the shape
changes) and a BN after the last residual add: 20 conv-BN pairs that fold and
one BN that becomes an ``Affine`` op. Original and fused models run
alternately (order alternating too) in the same process, so machine load
hits both alike; the speed-up is the ratio of the medians (and, as checks on
a loaded machine, the ratio of the minima and the median of the per-pair
ratios). Also printed: the max abs difference of the outputs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import bnkit


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, bn) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = bn(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = bn(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), bn(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNetish(nn.Module):
    def __init__(self, bn, widths=(16, 32, 64, 128), classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False), bn(widths[0]), nn.ReLU())
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks += [BasicBlock(cin, w, 1 if i == 0 else 2, bn), BasicBlock(w, w, 1, bn)]
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.bn_final = bn(cin)  # after a residual add: not foldable, becomes Affine
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        h = self.bn_final(self.blocks(self.stem(x)))
        return self.head(h.mean(dim=(2, 3)))


def build(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    bn = {"torch": nn.BatchNorm2d, "bnkit": bnkit.BatchNorm2d}[kind]
    model = ResNetish(bn)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # trained-looking statistics and affine parameters
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, bnkit.BatchNorm)):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@torch.inference_mode()
def bench(kind: str, runs: int, batch: int, size: int) -> dict:
    model = build(kind)
    fused, report = bnkit.fuse(model, report=True)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    ref, out = model(x), fused(x)
    for _ in range(3):  # warm-up
        model(x), fused(x)
    t_orig, t_fused = [], []
    pairs = ((model, t_orig), (fused, t_fused))
    for i in range(runs):
        for f, times in pairs if i % 2 == 0 else pairs[::-1]:  # alternate the order too
            t0 = time.perf_counter()
            f(x)
            times.append(time.perf_counter() - t0)
    med_o, med_f = statistics.median(t_orig), statistics.median(t_fused)
    return {
        "bn": kind,
        "fused": report.num_fused,
        "affine": sum(u.replaced_by == "Affine" for u in report.unfused),
        "orig_ms": med_o * 1e3,
        "fused_ms": med_f * 1e3,
        "speedup": med_o / med_f,
        "speedup_min": min(t_orig) / min(t_fused),
        "speedup_paired": statistics.median(a / b for a, b in zip(t_orig, t_fused)),
        "max_abs_diff": (out - ref).abs().max().item(),
        "max_abs_out": ref.abs().max().item(),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bn", choices=("torch", "bnkit", "both"), default="both")
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    kinds = ("torch", "bnkit") if args.bn == "both" else (args.bn,)
    print(
        f"ResNet-style CNN, input {args.batch}x3x{args.size}x{args.size}, {args.threads} thread(s), "
        f"median of {args.runs} alternating runs, torch {torch.__version__}"
    )
    print(
        f"{'BN':>6} {'folded':>6} {'affine':>6} {'orig ms':>9} {'fused ms':>9} {'speedup':>8} "
        f"{'of mins':>8} {'paired':>7} {'max|diff|':>10} {'max|out|':>9}"
    )
    for kind in kinds:
        r = bench(kind, args.runs, args.batch, args.size)
        print(
            f"{r['bn']:>6} {r['fused']:>6} {r['affine']:>6} {r['orig_ms']:>9.2f} {r['fused_ms']:>9.2f} "
            f"{r['speedup']:>7.2f}x {r['speedup_min']:>7.2f}x {r['speedup_paired']:>6.2f}x {r['max_abs_diff']:>10.2e} {r['max_abs_out']:>9.2f}"
        )


if __name__ == "__main__":
    main()
