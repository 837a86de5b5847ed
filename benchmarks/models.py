"""End-to-end benchmark: a training step and an inference batch of real network shapes, torch BN vs bnkit.

What a user feels is the step of a whole network, not a kernel. For each model, memory format, batch and
image size this script builds one network with ``torch.nn.BatchNorm2d`` and copies it (same weights) as

* ``bnkit``     the same network converted with :func:`bnkit.convert` (bnkit's layers),
* ``fused``     converted with ``fuse_activations=True``: each BN + ReLU/ReLU6 pair (of an ``nn.Sequential``,
                or ``relu(bn(x))`` in a block's forward) is one BatchNormAct layer whose activation runs
                inside the BN kernels' passes (column ``fused``: torch / fused),
* ``no-BN``     the same network with every BN replaced by ``nn.Identity`` (what BN costs: the *BN share*
                of torch's step is ``1 - no-BN / torch``, so each ratio can be read against it),
* ``accel``     the unconverted torch network under ``bnkit.accelerated()`` when this bnkit has it,

and times, interleaved rep by rep in an order shuffled every rep (each call pays for what the previous one
left in the caches), the median of ``--reps`` repetitions after ``--warmup``:

* ``train``  one SGD step: forward, cross-entropy, backward, ``optimizer.step()``, ``zero_grad``;
* ``eval``   a forward in eval mode under ``torch.inference_mode()``;
* ``frozen`` (``--ops train,eval,frozen``) the SGD step with every BN layer in eval mode: fine-tuning with
             the BN statistics frozen (their affine parameters still train), as detection and segmentation
             recipes do.

The models are defined here (no torchvision): a ResNet-18-like network (7x7/2 stem, 3x3/2 max-pool,
BasicBlocks of 64-512 channels), a MobileNetV2-like one (inverted residuals, depthwise convolutions, BN after
every convolution) and the Figure-1 MLP (784-100-100-100-10, sigmoid, batch 60).

Allocators: the default (glibc) always; ``--allocator jemalloc|tcmalloc|all`` re-runs the script with the
library in ``LD_PRELOAD`` as extra rows (Debian: ``apt-get install libjemalloc2 google-perftools``).

Usage::

    python benchmarks/models.py [--models resnet18,mobilenetv2,mlp] [--layouts nchw,cl] [--batches 32,128]
                                [--sizes 32,64] [--ops train,eval] [--reps 15] [--warmup 3] [--threads 2]
                                [--allocator default|jemalloc|tcmalloc|all] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

_SRC = Path(__file__).resolve().parents[1] / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

import bnkit  # noqa: E402  (after the source checkout is put on the path)
from bnkit.tools._bnlayers import bn_layers  # noqa: E402

ALLOCATOR_LIBS = {
    "jemalloc": ("libjemalloc.so.2", "libjemalloc2"),
    "tcmalloc": ("libtcmalloc.so.4", "google-perftools"),
}
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib", "/usr/local/lib")


# --------------------------------------------------------------------------- models
def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True) if groups > 1 or k == 1 else nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18Like(nn.Module):
    """torchvision's ResNet-18 layout: 7x7/2 stem, max-pool, four stages of two BasicBlocks (64-512)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        )
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn(cin, hidden, 1))
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), conv_bn(hidden, cout, 1, act=False)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetV2Like(nn.Module):
    """MobileNetV2's layout (width 1.0): inverted residuals, depthwise convs, BN after every conv."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn(3, 32, 3, 2)]
        cin = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(conv_bn(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def fig1_mlp() -> nn.Module:
    """The Figure-1 network of the BN paper: 784-100-100-100-10, sigmoid, BN before each sigmoid."""
    layers: list[nn.Module] = [nn.Flatten()]
    cin = 784
    for _ in range(3):
        layers += [nn.Linear(cin, 100), nn.BatchNorm1d(100), nn.Sigmoid()]
        cin = 100
    layers.append(nn.Linear(cin, 10))
    return nn.Sequential(*layers)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": ResNet18Like,
    "mobilenetv2": MobileNetV2Like,
    "mlp": fig1_mlp,
}


def without_bn(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every torch BN layer replaced by ``nn.Identity``."""
    model = copy.deepcopy(model)
    for m in list(model.modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(m, child_name, nn.Identity())
    return model


# --------------------------------------------------------------------------- timing
class Step:
    """One SGD training step (``train``) or one inference batch (``eval``) of a model on fixed data."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, op: str, context=None) -> None:
        self.model, self.x, self.y, self.op = model, x, y, op
        self.context = context
        if op in ("train", "frozen"):
            model.train()
            if op == "frozen":  # the BN layers normalize with their running statistics, which stay as they are
                for _, bn in bn_layers(model):
                    bn.eval()
            self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        else:
            model.eval()

    def _run(self) -> None:
        if self.op != "eval":
            loss = nn.functional.cross_entropy(self.model(self.x), self.y)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode():
                self.model(self.x)

    times_itself = True  # time_interleaved calls it with its clock

    def __call__(self, now: Callable[[], float] = time.perf_counter) -> float:
        """Runs the step and returns its duration; a context (``bnkit.accelerated``) is entered and left
        outside the timed part, since a user switches it on once, not per step."""
        if self.context is None:
            t0 = now()
            self._run()
            return now() - t0
        with self.context():
            t0 = now()
            self._run()
            return now() - t0


def time_interleaved(fns: dict[str, Callable[..., object]], reps: int, warmup: int, seed: int = 0,
                     now: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per call of each candidate, interleaved rep by rep in an order shuffled every rep.

    A candidate with ``times_itself`` (a :class:`Step`) is called with ``now`` and returns its own
    duration (without entering and leaving its context); the others are timed by ``now`` around the call."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(seed)
    for i in range(warmup + reps):
        rng.shuffle(order)
        for k in order:
            fn = fns[k]
            if getattr(fn, "times_itself", False):
                dt = fn(now)
            else:
                t0 = now()
                fn()
                dt = now() - t0
            if i >= warmup:
                times[k].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


def has_accelerate() -> bool:
    return callable(getattr(bnkit, "accelerated", None))


def case_inputs(model_name: str, batch: int, size: int, channels_last: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if model_name == "mlp":
        x = torch.rand(batch, 784, generator=g)
    else:
        x = torch.randn(batch, 3, size, size, generator=g)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), generator=g)
    return x, y


def run_case(model_name: str, layout: str, batch: int, size: int, reps: int, warmup: int,
             ops: tuple[str, ...] = ("train", "eval")) -> list[dict]:
    torch.manual_seed(0)
    base = MODELS[model_name]()
    channels_last = layout == "channels_last"
    fmt = torch.channels_last if channels_last and model_name != "mlp" else torch.contiguous_format
    arms = {
        "torch": base,
        "bnkit": bnkit.convert(copy.deepcopy(base)),
        "fused": bnkit.convert(copy.deepcopy(base), fuse_activations=True),
        "no-BN": without_bn(base),
    }
    if has_accelerate():
        arms["accel"] = copy.deepcopy(base)
    for m in arms.values():
        m.to(memory_format=fmt)
    x, y = case_inputs(model_name, batch, size, channels_last)
    rows = []
    for op in ops:
        fns = {
            name: Step(
                m if op == "train" else copy.deepcopy(m),
                x,
                y,
                op,
                context=bnkit.accelerated if name == "accel" else None,
            )
            for name, m in arms.items()
        }
        t = time_interleaved(fns, reps, warmup)
        row = {
            "model": model_name,
            "layout": layout if model_name != "mlp" else "NC",
            "batch": batch,
            "px": size if model_name != "mlp" else 0,
            "op": op,
            **{f"{k}_ms": v * 1e3 for k, v in t.items()},
            "ratio": t["torch"] / t["bnkit"],
            "fused_ratio": t["torch"] / t["fused"],
            "bn_share": 1.0 - t["no-BN"] / t["torch"],
        }
        if "accel" in t:
            row["accel_ratio"] = t["torch"] / t["accel"]
        rows.append(row)
    return rows


def format_rows(rows: list[dict], header: bool) -> str:
    lines = []
    if header:
        lines.append(
            f"{'model':>12} {'layout':>13} {'batch':>5} {'px':>3} {'op':>6} | {'torch ms':>9} {'bnkit ms':>9}"
            f" {'torch/bnkit':>11} {'fused':>6} | {'no-BN ms':>9} {'BN share':>8} | {'accel':>6}"
        )
        lines.append("-" * len(lines[0]))
    for r in rows:
        accel = f"{r['accel_ratio']:.2f}x" if "accel_ratio" in r else "-"
        fused = f"{r['fused_ratio']:.2f}x" if "fused_ratio" in r else "-"
        lines.append(
            f"{r['model']:>12} {r['layout']:>13} {r['batch']:>5} {r['px'] or '-':>3} {r['op']:>6} |"
            f" {r['torch_ms']:>9.2f} {r['bnkit_ms']:>9.2f} {r['ratio']:>10.2f}x {fused:>6} | {r['no-BN_ms']:>9.2f}"
            f" {r['bn_share']:>7.0%} | {accel:>6}"
        )
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[dict]:
    """The speed issue's end-to-end targets, evaluated on these rows (absent rows give NaN)."""

    def pick(model, layout, op="train", batch=None, px=None, key="ratio"):
        return [
            r[key]
            for r in rows
            if key in r
            if r["model"] == model
            and r["layout"] == layout
            and r["op"] == op
            and (batch is None or r["batch"] == batch)
            and (px is None or r["px"] == px)
        ]

    def first(xs):
        return xs[0] if xs else float("nan")

    out = []

    def add(what, value, goal, ok):
        out.append({"target": what, "value": value, "goal": goal, "met": bool(ok)})

    v = first(pick("mobilenetv2", "NCHW", batch=128, px=64))
    add("MobileNetV2 train, NCHW, 128x64px", v, ">= 1.25x", v >= 1.25)
    v = first(pick("mobilenetv2", "channels_last", batch=128, px=64))
    add("MobileNetV2 train, channels_last, 128x64px", v, ">= 1.2x", v >= 1.2)
    # the same model converted with fuse_activations=True (BN + ReLU6 in one pass)
    v = first(pick("mobilenetv2", "NCHW", batch=128, px=64, key="fused_ratio"))
    add("MobileNetV2 train, NCHW, 128x64px, fused activations", v, ">= 1.25x", v >= 1.25)
    v = first(pick("mobilenetv2", "channels_last", batch=128, px=64, key="fused_ratio"))
    add("MobileNetV2 train, channels_last, 128x64px, fused activations", v, ">= 1.2x", v >= 1.2)
    for layout in ("NCHW", "channels_last"):
        rs = pick("resnet18", layout)
        v = min(rs) if rs else float("nan")
        add(f"ResNet-18 train, {layout}, slowest config", v, ">= 1.05x", v >= 1.05)
        # fuse_activations=True: each block's bn1 + ReLU (found in forward by torch.fx) and the stem
        rs = pick("resnet18", layout, key="fused_ratio")
        v = min(rs) if rs else float("nan")
        add(f"ResNet-18 train, {layout}, slowest config, fused activations", v, ">= 1.05x", v >= 1.05)
    train = [r["ratio"] for r in rows if r["op"] == "train"]
    v = min(train) if train else float("nan")
    add("any train config, slowest", v, ">= 0.98x", v >= 0.98)
    ev = [r["ratio"] for r in rows if r["op"] == "eval"]
    v = min(ev) if ev else float("nan")
    add("eval, slowest config", v, ">= 1.0x", v >= 1.0)
    frozen = [r[k] for r in rows if r["op"] == "frozen" for k in ("ratio", "fused_ratio", "accel_ratio") if k in r]
    if frozen:
        add("frozen-statistics step, slowest config and conversion", min(frozen), ">= 0.98x", min(frozen) >= 0.98)
    return out


def find_lib(name: str) -> str | None:
    file, _ = ALLOCATOR_LIBS[name]
    for d in LIB_DIRS:
        p = Path(d) / file
        if p.exists():
            return str(p)
    return None


def allocator() -> str:
    pre = os.environ.get("LD_PRELOAD", "")
    for name in ALLOCATOR_LIBS:
        if name in pre:
            return name
    return "default (glibc)"


def without_options(argv: list[str], *options: str) -> list[str]:
    """``argv`` without each of ``options`` and its value (``--opt value`` or ``--opt=value``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in options:
            skip = True
        elif not any(a.startswith(o + "=") for o in options):
            out.append(a)
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bnkit bench --models", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet18,mobilenetv2,mlp", help="comma-separated: " + ",".join(MODELS))
    p.add_argument("--layouts", default="nchw,cl", help="nchw and/or cl (channels_last); the MLP is NC")
    p.add_argument("--batches", default="32,128", help="batch sizes of the CNNs (the MLP uses 60)")
    p.add_argument("--sizes", default="32,64", help="image sizes of the CNNs")
    p.add_argument("--ops", default="train,eval", help="train, eval and/or frozen (the step with BN in eval mode)")
    p.add_argument("--reps", type=int, default=15, help="timed repetitions per candidate (median; default 15)")
    p.add_argument("--warmup", type=int, default=3, help="untimed repetitions first (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--quick", action="store_true", help="one small configuration per model (smoke test)")
    p.add_argument(
        "--allocator",
        choices=("default", "jemalloc", "tcmalloc", "all"),
        default="default",
        help="extra rows with jemalloc/tcmalloc in LD_PRELOAD (re-runs this script); the default always runs",
    )
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = p.parse_args(argv)
    for name in args.models.split(","):
        if name not in MODELS:
            p.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    for lay in args.layouts.split(","):
        if lay not in ("nchw", "cl"):
            p.error(f"unknown layout {lay!r}; choose nchw or cl")
    args.op_list = tuple(args.ops.split(","))
    for op in args.op_list:
        if op not in ("train", "eval", "frozen"):
            p.error(f"unknown op {op!r}; choose train, eval or frozen")
    if args.reps < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--reps and --threads must be >= 1 and --warmup >= 0")
    try:
        args.batch_list = [int(b) for b in args.batches.split(",")]
        args.size_list = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        p.error("--batches and --sizes take comma-separated integers")
    return args


def configs(args) -> list[tuple[str, str, int, int]]:
    out = []
    layouts = {"nchw": "NCHW", "cl": "channels_last"}
    for model in args.models.split(","):
        if model == "mlp":
            out.append((model, "NCHW", 60, 0))
            continue
        if args.quick:
            out.append((model, layouts[args.layouts.split(",")[0]], 8, 32))
            continue
        for lay in args.layouts.split(","):
            for batch in args.batch_list:
                for size in args.size_list:
                    out.append((model, layouts[lay], batch, size))
    return out


def run(args) -> list[dict]:
    rows: list[dict] = []
    todo = configs(args)
    for i, (model, layout, batch, size) in enumerate(todo, 1):
        t0 = time.perf_counter()
        new = run_case(model, layout, batch, size, args.reps, args.warmup, args.op_list)
        for r in new:
            r["allocator"] = allocator()
        print(format_rows(new, header=not rows), flush=True)
        print(f"  [{i}/{len(todo)} in {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
        rows += new
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    backend = bnkit.kernels.select(torch.randn(2, 2))
    print(
        f"bnkit {bnkit.__version__} backend={backend} | torch {torch.__version__} | threads={torch.get_num_threads()}"
        f" | allocator: {allocator()} | {platform.processor() or platform.machine()} | median of {args.reps} after"
        f" {args.warmup} warm-up, candidates interleaved, order shuffled per rep"
        f"{'' if has_accelerate() else ' | bnkit.accelerated() not available: no accel column'}",
        flush=True,
    )
    rows = run(args)
    print()
    for t in targets(rows):
        if t["value"] != t["value"]:
            print(f"  [    n/a] {t['target']} (goal {t['goal']})")
        else:
            print(f"  [{'met' if t['met'] else 'NOT met':>7}] {t['target']}: {t['value']:.2f}x (goal {t['goal']})")
    extra = [] if args.allocator == "default" or "LD_PRELOAD" in os.environ else (
        list(ALLOCATOR_LIBS) if args.allocator == "all" else [args.allocator]
    )
    for name in extra:
        lib = find_lib(name)
        if lib is None:
            print(f"\n{name}: not installed (apt-get install {ALLOCATOR_LIBS[name][1]}); rows skipped")
            continue
        print(f"\n--- {name} (LD_PRELOAD={lib}) ---", flush=True)
        rest = without_options(sys.argv[1:] if argv is None else argv, "--allocator", "--json")
        json_extra = ["--json", f"{args.json}.{name}"] if args.json else []
        subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), *rest, *json_extra],
            env={**os.environ, "LD_PRELOAD": lib},
            check=False,
        )
    if args.json:
        meta = {"torch": torch.__version__, "threads": args.threads, "reps": args.reps, "allocator": allocator()}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows, "targets": targets(rows)}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
