"""Where the model-level gain goes: a whole network's BN layers, op by op and shape by shape.

``benchmarks/models.py`` times whole training steps; this script takes one of its networks apart, to say
why bnkit's BN layers gain less inside a step than the kernel benchmark says they gain alone. Sections
(``--sections``, default all):

* ``layers``  every BN layer of one training step: its input shape and size, the memory format of its
              input and of the gradient that reaches it from the next layer, the module after it (the
              activation that runs in place on its output, or none), and whether bnkit's backward must
              copy that gradient first (a gradient whose memory order differs from the input's); and the
              minor page faults while each layer's forward and autograd node ran, for both arms.
* ``ops``     a ``torch.profiler`` op count of one training step of each arm (torch BN, bnkit, no BN):
              the copy and allocation ops (``aten::copy_``, ``contiguous``, ``clone``, ``empty*``,
              ``to``/``_to_copy``) and every op whose count differs between torch and bnkit. Counts, not
              times: they do not depend on the machine's load.
* ``steps``   each arm's whole training step: minor page faults, user and system CPU seconds (system time
              is mostly the kernel zeroing fresh pages) and wall seconds, medians of ``--step-reps``
              interleaved steps; "BN cost" is an arm minus the no-BN arm.
* ``time``    each distinct BN shape of the network timed alone, torch's ``nn.BatchNorm2d`` against
              bnkit's, forward and forward+backward (``torch.autograd.grad`` for the input, weight and
              bias, with the gradient's memory format as the network produced it), interleaved rep by rep
              in an order shuffled every rep, medians; each row is weighted by how many layers have that
              shape, so the total is what one step's BN layers cost if each cost what it costs alone.
              A fixed-cost row (a tiny input) gives the per-call overhead of each layer.

On a shared machine use ``--threads 1 --clock cpu``: wall time with two threads then measures how long
each parallel region waits for a descheduled thread. The glibc allocator's settings come from the
environment (``MALLOC_MMAP_THRESHOLD_`` and friends, printed in the header), so an A/B of them is two runs.

Usage::

    python benchmarks/profile_models.py [--model mobilenetv2|resnet18] [--layouts nchw,cl] [--batch 128]
                                        [--size 64] [--sections layers,ops,steps,time] [--reps 15]
                                        [--step-reps 7] [--warmup 2] [--threads 2] [--clock wall|cpu]
                                        [--ops-batch 16]

It prints tables; there are no timed tests (``tests/test_profile_models.py`` checks the bookkeeping).
"""

from __future__ import annotations

import argparse
import collections
import copy
import importlib.util
import os
import platform
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

_HERE = Path(__file__).resolve().parent
_SRC = _HERE.parents[0] / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

import bnkit  # noqa: E402  (after the source checkout is put on the path)


def _load_models():
    """``benchmarks/models.py`` (its networks, inputs and no-BN copy), imported by path."""
    spec = importlib.util.spec_from_file_location("bnkit_bench_models", _HERE / "models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


models = _load_models()

# The ops that move or allocate memory, counted whatever their counts.
COPY_OPS = (
    "aten::copy_", "aten::contiguous", "aten::clone", "aten::empty", "aten::empty_like", "aten::empty_strided",
    "aten::to", "aten::_to_copy", "aten::zeros", "aten::zero_", "aten::fill_",
)
BN_TYPES = (nn.modules.batchnorm._BatchNorm, bnkit.BatchNorm)


# --------------------------------------------------------------------------- layouts
def layout_name(t: torch.Tensor) -> str:
    """``t``'s memory format: ``contiguous``, ``channels_last``, ``both`` (ambiguous, e.g. 1x1 maps) or its strides."""
    c = t.is_contiguous()
    cl = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
    if c and cl:
        return "both"
    if c:
        return "contiguous"
    if cl:
        return "channels_last"
    return "strides" + str(tuple(t.stride()))


def bnkit_copies_grad(x: torch.Tensor, gy: torch.Tensor, axis: int = 1) -> bool:
    """Whether bnkit's backward copies ``gy`` before its kernel: ``gy``'s memory order is not ``x``'s.

    The kernels read the gradient through the same ``(outer, C, inner)`` view as the saved input
    (``layout.h``: ``view3``), which is a view when ``gy`` is laid out as ``x`` and a ``.contiguous()``
    copy otherwise.
    """
    if x.is_contiguous():
        return not gy.is_contiguous()
    if x.movedim(axis, -1).is_contiguous():
        return not gy.movedim(axis, -1).is_contiguous()
    return True


# --------------------------------------------------------------------------- the BN layers of one step
@dataclass
class LayerRecord:
    index: int
    name: str
    shape: tuple[int, ...]
    x_layout: str
    after: str  # the module that runs next on the output (an activation in place), or "-"
    gy_layout: str = "?"
    copies_grad: bool = False
    faults_fwd: int = 0  # minor page faults while the layer's forward ran (the whole process)
    faults_bwd: int = 0  # ... and while its autograd node ran
    x: torch.Tensor | None = field(default=None, repr=False)
    gy: torch.Tensor | None = field(default=None, repr=False)

    @property
    def mb(self) -> float:
        n = 1
        for s in self.shape:
            n *= s
        return n * 4 / 2**20


def _successors(model: nn.Module) -> dict[int, str]:
    """For each BN module (by id), the module after it in its ``nn.Sequential`` ("-" when last)."""
    out: dict[int, str] = {}
    for m in model.modules():
        if isinstance(m, nn.Sequential):
            kids = list(m.children())
            for i, k in enumerate(kids):
                if isinstance(k, BN_TYPES):
                    nxt = kids[i + 1] if i + 1 < len(kids) else None
                    if nxt is None:
                        out[id(k)] = "-"
                    else:
                        inplace = getattr(nxt, "inplace", False)
                        out[id(k)] = type(nxt).__name__ + ("(inplace)" if inplace else "")
        for k in m.children():
            if isinstance(k, BN_TYPES) and id(k) not in out:
                out[id(k)] = "(in forward)"  # called from a module's own forward (e.g. a ResNet block)
    return out


def minor_faults() -> int:
    """The process's minor page faults so far (a fresh page touched for the first time is one)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def record_layers(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, keep: bool = False, warm: bool = True
) -> list[LayerRecord]:
    """One training step's BN layers, in forward order, with the gradient each one receives.

    A forward hook records each BN call's input; a pre-hook on its autograd node (the node that made its
    output, before any in-place activation rewrites that output) records the gradient arriving there, and
    the page faults of the forward and of the node. ``keep``: keep the input and the gradient (detached,
    the same tensors) for :func:`time_shapes`. ``warm``: one plain step first (the heap's state of a
    training loop, not of a fresh process).
    """
    model.train()
    if warm:
        nn.functional.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)
    after = _successors(model)
    names = {id(m): n for n, m in model.named_modules()}
    records: list[LayerRecord] = []
    handles = []
    start: dict[int, int] = {}

    def pre_forward(mod, inputs):
        start[id(mod)] = minor_faults()

    def forward_hook(mod, inputs, output):
        faults = minor_faults() - start[id(mod)]
        inp = inputs[0]
        rec = LayerRecord(len(records), names.get(id(mod), "?"), tuple(inp.shape), layout_name(inp),
                          after.get(id(mod), "?"), faults_fwd=faults)
        if keep:
            rec.x = inp.detach()
        records.append(rec)
        node_start = [0]

        def pre(grad_outputs, rec=rec, inp=inp):
            g = grad_outputs[0]
            rec.gy_layout = layout_name(g)
            rec.copies_grad = bnkit_copies_grad(inp, g)
            if keep:
                rec.gy = g.detach()
            node_start[0] = minor_faults()

        def post(grad_inputs, grad_outputs, rec=rec):
            rec.faults_bwd = minor_faults() - node_start[0]

        output.grad_fn.register_prehook(pre)
        output.grad_fn.register_hook(post)

    for m in model.modules():
        if isinstance(m, BN_TYPES):
            handles.append(m.register_forward_pre_hook(pre_forward))
            handles.append(m.register_forward_hook(forward_hook))
    try:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    return records


def layers_table(records: list[LayerRecord], other: list[LayerRecord] | None = None) -> str:
    """The layers of ``records`` (torch's arm); ``other`` (bnkit's arm) adds its page-fault columns."""
    other = other if other is not None and len(other) == len(records) else None
    head = (f"{'#':>3} {'layer':<24} {'input shape':<16} {'MB':>6} {'input':<13} {'grad in':<13} {'then':<15}"
            f" {'copied':>6} | {'faults torch fwd/bwd':>20}")
    if other is not None:
        head += f" | {'faults bnkit fwd/bwd':>20}"
    lines = [head, "-" * len(head)]
    for i, r in enumerate(records):
        line = (
            f"{r.index:>3} {r.name[:24]:<24} {'x'.join(map(str, r.shape)):<16} {r.mb:>6.2f} {r.x_layout[:13]:<13}"
            f" {r.gy_layout[:13]:<13} {r.after[:15]:<15} {'yes' if r.copies_grad else 'no':>6} |"
            f" {r.faults_fwd:>10}/{r.faults_bwd:<9}"
        )
        if other is not None:
            line += f" | {other[i].faults_fwd:>10}/{other[i].faults_bwd:<9}"
        lines.append(line)
    copied = [r for r in records if r.copies_grad]
    lines.append(
        f"{len(records)} BN layers, {sum(r.mb for r in records):.1f} MB of inputs; {len(copied)} receive a gradient"
        f" in another memory order than their input (bnkit copies it: {sum(r.mb for r in copied):.2f} MB)"
    )
    for name, recs in (("torch", records), ("bnkit", other)):
        if recs is not None:
            lines.append(f"page faults inside the {name} BN layers: {sum(r.faults_fwd for r in recs)} forward,"
                         f" {sum(r.faults_bwd for r in recs)} backward (4 KB each)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- whole steps: user, system, faults
def step_costs(
    steps: dict[str, Callable[[], None]], reps: int, warmup: int, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Medians per step of each arm: minor page faults and CPU seconds (user, system; all threads), wall seconds.

    CPU time is what a loaded machine does not inflate much (preemption is not counted); the system time
    is mostly the kernel's page-fault handling (zeroing fresh pages). Interleaved, order shuffled per rep.
    """
    samples: dict[str, list[tuple[float, float, float, float]]] = {k: [] for k in steps}
    order = list(steps)
    rng = random.Random(seed)
    for i in range(warmup + reps):
        rng.shuffle(order)
        for k in order:
            r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            steps[k]()
            r1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            if i >= warmup:
                samples[k].append((r1.ru_minflt - r0.ru_minflt, r1.ru_utime - r0.ru_utime,
                                   r1.ru_stime - r0.ru_stime, w1 - w0))
    out = {}
    for k, v in samples.items():
        faults, user, sys_, wall = (statistics.median(c) for c in zip(*v))
        out[k] = {"faults": faults, "user": user, "sys": sys_, "cpu": statistics.median(a + b for _, a, b, _ in v),
                  "wall": wall}
    return out


def steps_table(costs: dict[str, dict[str, float]]) -> str:
    head = f"{'arm':<22} {'faults':>9} {'user s':>8} {'sys s':>8} {'cpu s':>8} {'wall s':>8}"
    lines = [head, "-" * len(head)]
    for k, c in costs.items():
        lines.append(f"{k:<22} {c['faults']:>9.0f} {c['user']:>8.3f} {c['sys']:>8.3f} {c['cpu']:>8.3f} {c['wall']:>8.3f}")
    if {"torch", "bnkit", "no-BN"} <= set(costs):
        base = costs["no-BN"]
        bn = {k: {m: costs[k][m] - base[m] for m in ("faults", "user", "sys", "cpu", "wall")} for k in ("torch", "bnkit")}
        for k in ("torch", "bnkit"):
            c = bn[k]
            lines.append(f"{'BN cost, ' + k:<22} {c['faults']:>9.0f} {c['user']:>8.3f} {c['sys']:>8.3f}"
                         f" {c['cpu']:>8.3f} {c['wall']:>8.3f}")

        def ratio(a, b):
            return f"{a / b:>7.2f}x" if b > 0 else f"{'-':>8}"

        t, b = bn["torch"], bn["bnkit"]
        lines.append(f"{'BN cost torch/bnkit':<22} {'':>9} {ratio(t['user'], b['user'])} {ratio(t['sys'], b['sys'])}"
                     f" {ratio(t['cpu'], b['cpu'])} {ratio(t['wall'], b['wall'])}")
        ct, cb = costs["torch"], costs["bnkit"]
        lines.append(f"{'step torch/bnkit':<22} {'':>9} {ratio(ct['user'], cb['user'])} {ratio(ct['sys'], cb['sys'])}"
                     f" {ratio(ct['cpu'], cb['cpu'])} {ratio(ct['wall'], cb['wall'])}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- op counts
def count_ops(step: Callable[[], None]) -> collections.Counter:
    """How many times each op runs in one call of ``step`` (all nesting levels), by ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return collections.Counter(e.name for e in prof.events())


def ops_table(counts: dict[str, collections.Counter]) -> str:
    arms = list(counts)
    names = sorted(set().union(*counts.values()))
    keep = [n for n in names if n in COPY_OPS or counts["torch"][n] != counts["bnkit"][n]]
    w = max([len(n) for n in keep] + [10])
    lines = [f"{'op':<{w}} " + " ".join(f"{a:>7}" for a in arms) + f" {'bnkit-torch':>11}"]
    lines.append("-" * len(lines[0]))
    for n in keep:
        lines.append(
            f"{n:<{w}} " + " ".join(f"{counts[a][n]:>7}" for a in arms)
            + f" {counts['bnkit'][n] - counts['torch'][n]:>+11}"
        )
    return "\n".join(lines)


def copy_ops(counts: collections.Counter) -> int:
    """The number of ``aten::copy_`` calls (every copy, ``contiguous``/``clone``/``to`` included, ends in one)."""
    return counts["aten::copy_"]


# --------------------------------------------------------------------------- per-shape timing
@dataclass
class ShapeCase:
    shape: tuple[int, ...]
    x_layout: str
    gy_layout: str
    layers: int
    x: torch.Tensor
    gy: torch.Tensor


def shape_cases(records: list[LayerRecord]) -> list[ShapeCase]:
    """The distinct (shape, input layout, gradient layout) of ``records`` (kept tensors), with their layer counts."""
    cases: dict[tuple, ShapeCase] = {}
    for r in records:
        key = (r.shape, r.x_layout, r.gy_layout)
        if key in cases:
            cases[key].layers += 1
        else:
            cases[key] = ShapeCase(r.shape, r.x_layout, r.gy_layout, 1, r.x, r.gy)
    return list(cases.values())


def _like(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random values in ``t``'s shape and strides (an expanded gradient keeps its stride-0 dimensions)."""
    if 0 in t.stride():
        return t  # the network's own (expanded) tensor
    out = torch.empty_like(t, memory_format=torch.preserve_format)  # dense: the same strides
    return out.copy_(torch.randn(t.shape, generator=g))


def layer_fns(case: ShapeCase, seed: int = 0) -> dict[str, Callable[[], object]]:
    """The timed candidates of one shape: forward, and forward+backward, of torch's and bnkit's layer."""
    g = torch.Generator().manual_seed(seed)
    C = case.shape[1]
    x = _like(case.x, g).requires_grad_(True)
    gy = _like(case.gy, g)
    ref = nn.BatchNorm2d(C)
    ours = bnkit.BatchNorm2d(C)
    fns: dict[str, Callable[[], object]] = {}
    for name, bn in (("torch", ref), ("bnkit", ours)):
        params = (x, bn.weight, bn.bias)

        def fwd(bn=bn):
            return bn(x)

        def fwd_bwd(bn=bn, params=params):
            return torch.autograd.grad(bn(x), params, gy)

        fns[f"{name} fwd"] = fwd
        fns[f"{name} fwd+bwd"] = fwd_bwd
    return fns


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def time_interleaved(
    fns: dict[str, Callable[[], object]], reps: int, warmup: int, seed: int = 0, clock: str = "wall"
) -> dict[str, float]:
    """Median seconds per call of each candidate, interleaved rep by rep in an order shuffled every rep.

    ``clock="cpu"``: the calling thread's CPU time (user + system, page faults included), which a loaded
    machine's preemption does not inflate; it counts only this thread's work, so use it with one thread.
    """
    return models.time_interleaved(fns, reps, warmup, seed, now=CLOCKS[clock])


FIXED_COST_SHAPE = (4, 8, 2, 2)


def fixed_cost_case(channels_last: bool) -> ShapeCase:
    """A tiny input: what a layer costs before its kernels do any work (module call, op, autograd node)."""
    x = torch.zeros(FIXED_COST_SHAPE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return ShapeCase(FIXED_COST_SHAPE, layout_name(x), layout_name(x), 0, x, x)


def time_shapes(cases: list[ShapeCase], reps: int, warmup: int, clock: str = "wall") -> list[dict]:
    """Each case's candidates (:func:`layer_fns`) timed, one row per case, ms."""
    rows = []
    for case in cases:
        t = time_interleaved(layer_fns(case), reps, warmup, clock=clock)
        rows.append({"case": case, **{k: v * 1e3 for k, v in t.items()}})
    return rows


def _ratio(a: float, b: float) -> str:
    """``a / b`` as ``1.23x``; ``-`` where ``b`` is not positive (a clock too coarse, or noise)."""
    return f"{a / b:.2f}x" if b > 0 and a >= 0 else "-"


def time_table(rows: list[dict]) -> str:
    head = (f"{'shape':<18} {'input':<13} {'grad in':<13} {'n':>2} | {'torch fwd':>9} {'bnkit fwd':>9} {'ratio':>6} |"
            f" {'torch f+b':>9} {'bnkit f+b':>9} {'ratio':>6} | {'bwd ratio':>9}")
    lines = [head, "-" * len(head)]
    tot = collections.Counter()
    for r in rows:
        c = r["case"]
        tf, bf, tfb, bfb = r["torch fwd"], r["bnkit fwd"], r["torch fwd+bwd"], r["bnkit fwd+bwd"]
        lines.append(
            f"{'x'.join(map(str, c.shape)):<18} {c.x_layout[:13]:<13} {c.gy_layout[:13]:<13} {c.layers:>2} |"
            f" {tf:>9.3f} {bf:>9.3f} {_ratio(tf, bf):>6} | {tfb:>9.3f} {bfb:>9.3f} {_ratio(tfb, bfb):>6} |"
            f" {_ratio(tfb - tf, bfb - bf):>9}"
        )
        for k in ("torch fwd", "bnkit fwd", "torch fwd+bwd", "bnkit fwd+bwd"):
            tot[k] += r[k] * c.layers
    if not tot:
        return "\n".join(lines)
    lines.append("-" * len(head))
    tf, bf, tfb, bfb = tot["torch fwd"], tot["bnkit fwd"], tot["torch fwd+bwd"], tot["bnkit fwd+bwd"]
    lines.append(
        f"{'sum over the layers':<50} | {tf:>9.1f} {bf:>9.1f} {_ratio(tf, bf):>6} | {tfb:>9.1f} {bfb:>9.1f}"
        f" {_ratio(tfb, bfb):>6} | {_ratio(tfb - tf, bfb - bf):>9}"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- driver
def build_arms(model_name: str, channels_last: bool) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base = models.MODELS[model_name]()
    arms = {"torch": base, "bnkit": bnkit.convert(copy.deepcopy(base)), "no-BN": models.without_bn(base)}
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for m in arms.values():
        m.to(memory_format=fmt)
    return arms


SECTIONS = ("layers", "ops", "steps", "time")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="profile_models.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mobilenetv2", choices=("mobilenetv2", "resnet18"))
    p.add_argument("--layouts", default="nchw,cl", help="nchw and/or cl (channels_last)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: " + ", ".join(SECTIONS))
    p.add_argument("--reps", type=int, default=15, help="timed repetitions per candidate (median)")
    p.add_argument("--step-reps", type=int, default=7, help="repetitions of each arm's step in 'steps'")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                   help="'time': wall time, or the thread's CPU time (on a loaded machine, with --threads 1)")
    p.add_argument("--ops-batch", type=int, default=16,
                   help="batch of the op-count step (default 16: the counts do not depend on it, the profiler's cost does)")
    args = p.parse_args(argv)
    args.section_set = set(args.sections.split(","))
    bad = args.section_set - set(SECTIONS)
    if bad:
        p.error(f"unknown section(s) {', '.join(sorted(bad))}; choose from {', '.join(SECTIONS)}")
    for lay in args.layouts.split(","):
        if lay not in ("nchw", "cl"):
            p.error(f"unknown layout {lay!r}; choose nchw or cl")
    if min(args.reps, args.step_reps, args.threads) < 1 or args.warmup < 0 or args.batch < 2 or args.size < 8:
        p.error("--reps, --step-reps and --threads must be >= 1, --warmup >= 0, --batch >= 2 and --size >= 8")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    malloc = " ".join(f"{k}={os.environ[k]}" for k in sorted(os.environ) if k.startswith("MALLOC_")) or "glibc defaults"
    print(f"bnkit {bnkit.__version__} backend={bnkit.kernels.select(torch.randn(2, 2))} | torch {torch.__version__}"
          f" | threads={torch.get_num_threads()} | malloc: {malloc} | LD_PRELOAD={os.environ.get('LD_PRELOAD', '-')}"
          f" | {platform.processor() or platform.machine()} | {args.model} batch {args.batch} at {args.size} px",
          flush=True)
    for lay in args.layouts.split(","):
        cl = lay == "cl"
        arms = build_arms(args.model, cl)
        x, y = models.case_inputs(args.model, args.batch, args.size, cl)
        title = "channels_last" if cl else "NCHW"
        records = None
        if args.section_set & {"layers", "time"}:
            records = record_layers(arms["torch"], x, y, keep="time" in args.section_set)
            ours = record_layers(arms["bnkit"], x, y)
            if [(r.shape, r.x_layout, r.gy_layout) for r in ours] != [(r.shape, r.x_layout, r.gy_layout)
                                                                      for r in records]:
                print("  note: bnkit's layers see other shapes or layouts than torch's", flush=True)
            if "layers" in args.section_set:
                print(f"\n== {title}: the BN layers of one training step (torch's arm; faults of both)\n"
                      f"{layers_table(records, ours)}", flush=True)
            del ours
        if "ops" in args.section_set:
            ob = args.ops_batch
            xo, yo = models.case_inputs(args.model, ob, args.size, cl)
            counts = {}
            for name, m in arms.items():
                step = models.Step(m, xo, yo, "train")
                step()  # warm: the optimizer's state, the first-call caches
                counts[name] = count_ops(step)
            print(f"\n== {title}: ops in one training step (batch {ob}), by torch.profiler\n{ops_table(counts)}",
                  flush=True)
        if "steps" in args.section_set:
            steps = {name: models.Step(m, x, y, "train") for name, m in arms.items()}
            costs = step_costs(steps, args.step_reps, args.warmup)
            print(f"\n== {title}: one training step, medians of {args.step_reps} (interleaved, shuffled)\n"
                  f"{steps_table(costs)}", flush=True)
        if "time" in args.section_set:
            cases = shape_cases(records)
            del records
            rows = time_shapes(cases, args.reps, args.warmup, args.clock)
            fixed = time_shapes([fixed_cost_case(cl)], args.reps, args.warmup, args.clock)
            print(f"\n== {title}: each BN shape alone, ms ({args.clock} clock), median of {args.reps}"
                  f" (interleaved, shuffled)\n{time_table(rows)}\n"
                  f"fixed cost per layer (a {'x'.join(map(str, FIXED_COST_SHAPE))} input, n = 0: not in the sum):\n"
                  f"{time_table(fixed).splitlines()[2]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
