"""Benchmark bnkit's fused CPU kernels against PyTorch's own (ATen) BatchNorm.

For each shape/layout/dtype it times, in one process, interleaving the
candidates rep by rep (so that machine noise hits all of them alike) in an
order shuffled every rep (each call pays for what the call before it left in
the caches -- e.g. write-backs of its dirty output lines -- so a fixed order
would favour whichever candidate always follows the cheapest one), the median
of ``--reps`` (>= 25 by default) repetitions after ``--warmup``:

* ``train fwd``   bnkit.functional.batch_norm vs torch.nn.functional.batch_norm
                  (training mode, with running-statistics update);
* ``backward``    the backward alone: torch.autograd.grad of the two forwards
                  above (input, weight and bias gradients);
* ``fwd+bwd``     forward + backward through bnkit.BatchNorm{1,2}d vs
                  torch.nn.BatchNorm{1,2}d (train mode);
* ``eval fwd``    the two modules in eval mode under torch.no_grad();
* ``clone``       ``x.clone()``: one read + one write pass over the tensor, the
                  bandwidth limit; it runs side by side with each op above (in
                  the same interleaving), and each op is also expressed as a
                  multiple of its own side-by-side clone.

Both candidates allocate their outputs through the same allocator (reported
in the header: glibc malloc unless LD_PRELOAD names another); fresh multi-MB
outputs page-fault with glibc, which costs both candidates alike.

``--allocator tuned`` re-runs the script with glibc settings that keep freed
blocks mapped (both candidates still share one allocator).

Usage::

    python benchmarks/kernels.py [--reps 25] [--warmup 5] [--threads N]
                                 [--allocator default|tuned] [--quick] [--only SEL]
                                 [--json results.json]
    bnkit bench [same arguments]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

# Runs from a source checkout without installation too.
_SRC = Path(__file__).resolve().parents[1] / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

import bnkit  # noqa: E402
import bnkit.functional as BF  # noqa: E402
from bnkit import kernels  # noqa: E402

# (name, shape, channels_last, dtype)
CASES = [
    ("32x64x56x56", (32, 64, 56, 56), False, torch.float32),
    ("32x64x56x56", (32, 64, 56, 56), True, torch.float32),
    ("32x256x14x14", (32, 256, 14, 14), False, torch.float32),
    ("32x256x14x14", (32, 256, 14, 14), True, torch.float32),
    ("8x512x7x7", (8, 512, 7, 7), False, torch.float32),
    ("8x512x7x7", (8, 512, 7, 7), True, torch.float32),
    ("64x32x28x28", (64, 32, 28, 28), False, torch.float32),
    ("64x32x28x28", (64, 32, 28, 28), True, torch.float32),
    ("256x1024", (256, 1024), False, torch.float32),
    ("32x64x56x56", (32, 64, 56, 56), False, torch.bfloat16),
    ("32x256x14x14", (32, 256, 14, 14), True, torch.bfloat16),
]
OPS = ("train fwd", "backward", "fwd+bwd", "eval fwd")


# glibc settings that keep freed multi-MB blocks in the heap (no unmapping, no
# trimming), so that fresh outputs stop page-faulting after the warm-up.
TUNED_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),  # glibc's maximum; tensors below it come from the heap
    "MALLOC_TRIM_THRESHOLD_": str(2**30),
    "MALLOC_TOP_PAD_": str(64 * 2**20),
}


def allocator() -> str:
    pre = os.environ.get("LD_PRELOAD", "")
    for name in ("jemalloc", "tcmalloc", "mimalloc"):
        if name in pre:
            return f"{name} (LD_PRELOAD)"
    if all(os.environ.get(k) == v for k, v in TUNED_MALLOC.items()):
        return "glibc malloc, tuned (mmap threshold 32 MB, no trim: no page faults after warm-up)"
    return "glibc malloc (default settings: fresh multi-MB outputs page-fault)"


def make_case(shape, channels_last, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    grad = torch.randn(shape, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        grad = grad.contiguous(memory_format=torch.channels_last)
    return x, grad


def candidates(shape, channels_last, dtype) -> dict[str, dict[str, Callable[[], object]]]:
    """{op: {"aten": fn, "bnkit": fn}} plus {"clone": {"clone": fn}}."""
    x, grad = make_case(shape, channels_last, dtype)
    C = shape[1]
    pdt = torch.float32  # parameters/buffers: float32 also for bfloat16 inputs
    w = (torch.rand(C) + 0.5).to(pdt)
    b = torch.randn(C).to(pdt)
    state = {
        "aten": (torch.zeros(C, dtype=pdt), torch.ones(C, dtype=pdt)),
        "bnkit": (torch.zeros(C, dtype=pdt), torch.ones(C, dtype=pdt)),
    }
    fwd = {"aten": F.batch_norm, "bnkit": BF.batch_norm}
    dims = len(shape)
    tmod = torch.nn.BatchNorm1d if dims in (2, 3) else torch.nn.BatchNorm2d
    bmod = bnkit.BatchNorm1d if dims in (2, 3) else bnkit.BatchNorm2d
    mods = {"aten": tmod(C).to(pdt), "bnkit": bmod(C).to(pdt)}
    emods = {"aten": tmod(C).to(pdt).eval(), "bnkit": bmod(C).to(pdt).eval()}
    for m in list(mods.values()) + list(emods.values()):
        with torch.no_grad():
            m.weight.copy_(w)
            m.bias.copy_(b)
            m.running_var.fill_(1.3)

    xw = x.detach().requires_grad_(True)
    wp = w.clone().requires_grad_(True)
    bp = b.clone().requires_grad_(True)

    out: dict[str, dict[str, Callable[[], object]]] = {op: {} for op in OPS}
    for who in ("aten", "bnkit"):
        f = fwd[who]
        rm, rv = state[who]
        out["train fwd"][who] = lambda f=f, rm=rm, rv=rv: f(x, rm, rv, w, b, True, 0.1, 1e-5)

        out["backward"][who] = _Backward(lambda f=f, rm=rm, rv=rv: f(xw, rm, rv, wp, bp, True, 0.1, 1e-5), (xw, wp, bp), grad)
        m = mods[who]

        def fwd_bwd(m=m):
            m(xw).backward(grad)
            xw.grad = None
            m.weight.grad = None
            m.bias.grad = None

        out["fwd+bwd"][who] = fwd_bwd
        em = emods[who]

        def eval_fwd(em=em):
            with torch.no_grad():
                return em(x)

        out["eval fwd"][who] = eval_fwd
    out["clone"] = {"clone": lambda: x.clone()}
    return out


class _Backward:
    """Times only the backward: ``prepare`` (untimed) runs a fresh forward."""

    def __init__(self, forward, inputs, grad):
        self.forward, self.inputs, self.grad, self.y = forward, inputs, grad, None

    def prepare(self):
        self.y = self.forward()

    def __call__(self):
        out = torch.autograd.grad(self.y, self.inputs, self.grad)
        self.y = None
        return out


def time_interleaved(
    fns: dict[str, Callable[[], object]], reps: int, warmup: int, seed: int = 0
) -> dict[str, float]:
    """Median seconds per call of each fn, candidates interleaved rep by rep in a shuffled order."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(seed)
    for i in range(warmup + reps):
        rng.shuffle(order)
        for k in order:
            fn = fns[k]
            prep = getattr(fn, "prepare", None)
            if prep is not None:
                prep()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[k].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


def check_backend() -> str:
    x = torch.randn(4, 3, 5)
    backend = kernels.select(x)
    return backend


def _layout(shape, channels_last) -> str:
    return "NC" if len(shape) == 2 else ("channels_last" if channels_last else "NCHW")


def _case_label(name, shape, cl, dtype) -> str:
    return f"{name} {_layout(shape, cl)} {str(dtype).replace('torch.', '')}"


def select_cases(quick: bool = False, only: str | None = None) -> list:
    """The cases a run times: all, the ``--quick`` few, or those ``--only`` selects."""
    cases = CASES[:3] + CASES[8:9] if quick else CASES
    if only:
        words = only.split(",")
        cases = [c for c in cases if any(all(w in _case_label(*c).split() for w in word.split()) for word in words)]
    return cases


def run(reps: int, warmup: int, quick: bool = False, only: str | None = None) -> dict:
    rows = []
    for name, shape, cl, dtype in select_cases(quick, only):
        c = candidates(shape, cl, dtype)
        x_bytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        res = {}
        for op in OPS:
            fns = dict(c[op])
            fns["clone"] = c["clone"]["clone"]
            res[op] = time_interleaved(fns, reps, warmup)
        clone_best = min(t["clone"] for t in res.values())
        layout = _layout(shape, cl)
        for op in OPS:
            a, k, clone_t = res[op]["aten"], res[op]["bnkit"], res[op]["clone"]
            rows.append(
                {
                    "shape": name,
                    "layout": layout,
                    "dtype": str(dtype).replace("torch.", ""),
                    "MB": round(x_bytes / 2**20, 2),
                    "op": op,
                    "aten_ms": a * 1e3,
                    "bnkit_ms": k * 1e3,
                    "clone_ms": clone_t * 1e3,  # side by side: the same interleaving as this op
                    "clone_best_ms": clone_best * 1e3,  # the fastest of the case's four clones
                    "speedup": a / k,
                    "bnkit_per_clone": k / clone_t,
                    "aten_per_clone": a / clone_t,
                }
            )
        print(_format_rows(rows[-len(OPS) :], header=(len(rows) == len(OPS))), flush=True)
    return {"rows": rows, "targets": targets(rows)}


def _format_rows(rows, header=False) -> str:
    lines = []
    if header:
        lines.append(
            f"{'shape':>13} {'layout':>13} {'dtype':>8} {'MB':>6} {'op':>9} | {'ATen ms':>8} {'bnkit ms':>8}"
            f" {'speedup':>7} | {'clone ms':>8} {'bnkit/clone':>11} {'ATen/clone':>10}"
        )
        lines.append("-" * len(lines[0]))
    for r in rows:
        lines.append(
            f"{r['shape']:>13} {r['layout']:>13} {r['dtype']:>8} {r['MB']:>6.2f} {r['op']:>9} | {r['aten_ms']:>8.3f}"
            f" {r['bnkit_ms']:>8.3f} {r['speedup']:>6.2f}x | {r['clone_ms']:>8.3f} {r['bnkit_per_clone']:>10.2f}x"
            f" {r['aten_per_clone']:>9.2f}x"
        )
    return "\n".join(lines)


def targets(rows) -> list[dict]:
    """The issue's targets, evaluated on these rows."""

    def sel(op, layouts=None, dtype="float32", min_mb=0.0):
        return [
            r
            for r in rows
            if r["op"] == op
            and r["dtype"] == dtype
            and (layouts is None or r["layout"] in layouts)
            and r["MB"] >= min_mb
        ]

    def med(rs, key="speedup"):
        return statistics.median(r[key] for r in rs) if rs else float("nan")

    out = []

    def add(what, value, goal, ok):
        out.append({"target": what, "value": value, "goal": goal, "met": bool(ok)})

    v = med(sel("train fwd", ["NCHW"]))
    add("train fwd speedup, median NCHW", v, ">= 2.5x", v >= 2.5)
    for lay in ("channels_last", "NC"):
        v = med(sel("train fwd", [lay]))
        add(f"train fwd speedup, median {lay}", v, ">= 1.5x", v >= 1.5)
    v = med(sel("backward", ["NCHW"]))
    add("backward speedup, median NCHW", v, ">= 1.1x", v >= 1.1)
    for lay in ("channels_last", "NC"):
        v = med(sel("backward", [lay]))
        add(f"backward speedup, median {lay}", v, ">= 1.5x", v >= 1.5)
    fb = sel("fwd+bwd")
    v = med(fb)
    add("fwd+bwd (module) speedup, median", v, ">= 1.5x", v >= 1.5)
    worst = min((r["speedup"] for r in fb), default=float("nan"))
    add("fwd+bwd (module) slowest shape", worst, ">= 1.0x", worst >= 1.0)
    big = sel("train fwd", min_mb=6.0)
    worst = max((r["bnkit_per_clone"] for r in big), default=float("nan"))
    add("train fwd on >= 6 MB, worst multiple of clone", worst, "<= 1.8x", worst <= 1.8)
    ev = sel("eval fwd")
    worst = min((r["speedup"] for r in ev), default=float("nan"))
    add("eval fwd speedup, slowest float32 shape", worst, ">= 1.0x", worst >= 1.0)
    bf = sel("train fwd", dtype="bfloat16")
    worst = min((r["speedup"] for r in bf), default=float("nan"))
    add("bfloat16 train fwd speedup, slowest", worst, ">= 1.2x", worst >= 1.2)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bnkit bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=25, help="timed repetitions per candidate (median; default 25)")
    p.add_argument("--warmup", type=int, default=5, help="untimed repetitions first (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="a few shapes only (smoke test)")
    p.add_argument(
        "--only",
        metavar="SEL",
        help="run only the cases whose label (e.g. '32x256x14x14 channels_last float32') has all the words of"
        " one of the comma-separated selections, e.g. --only 'channels_last float32,NC'",
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument(
        "--allocator",
        choices=("default", "tuned"),
        default="default",
        help="glibc malloc as is, or tuned to keep freed blocks (re-runs this script with MALLOC_* set)",
    )
    args = p.parse_args(argv)
    if args.reps < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        p.error("--reps and --threads must be >= 1 and --warmup >= 0")
    if not select_cases(args.quick, args.only):
        labels = sorted({_case_label(*c) for c in CASES})
        p.error(f"--only {args.only!r} selects no case; the cases: {', '.join(labels)}")
    if args.allocator == "tuned" and not all(os.environ.get(k) == v for k, v in TUNED_MALLOC.items()):
        import subprocess

        rest = list(sys.argv[1:] if argv is None else argv)
        return subprocess.run([sys.executable, str(Path(__file__).resolve()), *rest], env={**os.environ, **TUNED_MALLOC}).returncode
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = check_backend()
    isa = torch.ops.bnkit.cpu_isa() if backend == "cpp" else "-"
    print(
        f"bnkit {getattr(bnkit, '__version__', '?')} backend={backend} isa={isa} | torch {torch.__version__}"
        f" | threads={torch.get_num_threads()} | allocator: {allocator()} | {platform.processor() or platform.machine()}"
        f" | median of {args.reps} after {args.warmup} warm-up, candidates interleaved, order shuffled per rep",
        flush=True,
    )
    if backend != "cpp":
        print(f"bnkit: WARNING: the C++ kernels are not in use (backend={backend})", file=sys.stderr)
    t0 = time.perf_counter()
    result = run(args.reps, args.warmup, args.quick, args.only)
    print()
    for t in result["targets"]:
        if t["value"] != t["value"]:  # NaN: no row for this target (e.g. --quick)
            print(f"  [    n/a] {t['target']} (goal {t['goal']})")
            continue
        print(f"  [{'met' if t['met'] else 'NOT met':>7}] {t['target']}: {t['value']:.2f}x (goal {t['goal']})")
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.json:
        meta = {
            "torch": torch.__version__,
            "backend": backend,
            "isa": isa,
            "threads": torch.get_num_threads(),
            "allocator": allocator(),
            "reps": args.reps,
            "warmup": args.warmup,
        }
        Path(args.json).write_text(json.dumps({"meta": meta, **result}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
