"""Concurrency and multiple processes, as inference servers and data pipelines use a model.

Oracles: the same bnkit model run serially (bitwise: the same kernels on the same inputs), and the
same model built with torch's own BN (float rounding). Covered: Python threads sharing one eval
model (NCHW / channels-last, float32 / bfloat16, fused activations), threads training their own
copies (also inside ``bnkit.accumulate_stats``), the first bnkit call of a fresh process made from
several threads at once (kernel loading), ``bnkit.accelerate()`` switched while other threads run
torch BN (what ``docs/acceleration.md`` guarantees), ``torch.multiprocessing`` with ``spawn``
(a pickled model, ``share_memory()`` Hogwild updates), and ``DataLoader`` workers (spawn, fork)
whose dataset runs a bnkit feature extractor.

Every wait has a timeout, so a deadlock fails the test instead of blocking the run.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import torch.multiprocessing as tmp
from torch import nn

import bnkit
from bnkit import engine
from bnkit.tools import accumulate as _accumulate

JOIN_S = 60.0  # a thread or process still alive after this is a hang
SUBPROCESS_S = 60.0
F32 = dict(atol=1e-5, rtol=1e-5)
BF16 = dict(atol=2e-2, rtol=2e-2)


# --------------------------------------------------------------------------- helpers
def _torch_net(seed: int = 0) -> nn.Module:
    """A small CNN with torch BN and non-trivial running statistics and affine parameters."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6),
    )
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        net.train()
        for _ in range(3):
            net(torch.randn(8, 3, 10, 10) * 2 + 0.5)
    return net


def _twins(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """``(torch model, bnkit model)`` with the same weights and statistics."""
    ref = _torch_net(seed)
    mine = bnkit.convert(ref)
    assert any(isinstance(m, bnkit.BatchNorm2d) for m in mine.modules())
    return ref, mine


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _assert_state_close(mine: dict, ref: dict, **tol) -> None:
    assert mine.keys() == ref.keys()
    for k in mine:
        torch.testing.assert_close(mine[k], ref[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


def _run_threads(targets: list, timeout: float = JOIN_S) -> None:
    """Start one thread per callable, join them all; re-raise the first exception; fail on a hang."""
    errors: list[BaseException] = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported to the test
                errors.append(exc)
        return run

    threads = [threading.Thread(target=wrap(fn), daemon=True) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, f"threads still running after {timeout} s (deadlock?): {alive}"
    if errors:
        raise errors[0]


def _inputs(n: int, dtype: torch.dtype, channels_last: bool, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = []
    for i in range(n):
        x = (torch.randn(2 + i % 3, 3, 9, 11, generator=g) * 1.5 + 0.25).to(dtype)
        xs.append(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    return xs


def _python(code: str, timeout: float = SUBPROCESS_S) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (this one's environment); a hang is a failure."""
    env = dict(os.environ)
    env.pop("BNKIT_BACKEND", None)  # the default (C++ kernels on CPU) is what a fresh process gets
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the subprocess hung for {timeout} s (deadlock?); stderr:\n{exc.stderr}")


def _last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, f"exit code {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no result line\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads(lines[-1])


# =========================================================================== threads: one shared eval model
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_threads_share_one_eval_model_bitwise(dtype, channels_last):
    """6 threads call the same eval model at once (grad on / no_grad / inference_mode): every output equals
    the serial output bit for bit, equals torch's BN to rounding, and no buffer or parameter moves."""
    ref, mine = _twins()
    ref, mine = ref.to(dtype).eval(), mine.to(dtype).eval()
    if channels_last:
        ref, mine = ref.to(memory_format=torch.channels_last), mine.to(memory_format=torch.channels_last)
    n_threads, n_calls = 6, 8
    inputs = [_inputs(n_calls, dtype, channels_last, seed=100 + t) for t in range(n_threads)]
    before = _state(mine)
    with torch.no_grad():
        serial = [[mine(x) for x in xs] for xs in inputs]
        oracle = [[ref(x) for x in xs] for xs in inputs]
    _assert_state_equal(_state(mine), before)

    got: list[list] = [[None] * n_calls for _ in range(n_threads)]
    barrier = threading.Barrier(n_threads, timeout=JOIN_S)

    def worker(t):
        def run():
            mode = (torch.enable_grad, torch.no_grad, torch.inference_mode)[t % 3]
            barrier.wait()
            for _ in range(2):  # several rounds: calls of different threads overlap
                for i, x in enumerate(inputs[t]):
                    with mode():
                        got[t][i] = mine(x).detach()
        return run

    _run_threads([worker(t) for t in range(n_threads)])
    tol = F32 if dtype == torch.float32 else BF16
    for t in range(n_threads):
        for i in range(n_calls):
            y = got[t][i]
            assert y.dtype == dtype and y.is_contiguous(
                memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            assert torch.equal(y, serial[t][i]), (t, i)
            torch.testing.assert_close(y.float(), oracle[t][i].float(), **tol)
    _assert_state_equal(_state(mine), before)


class _Block(nn.Module):
    """torchvision's BasicBlock shape: one ReLU called after bn1 and after the residual sum."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + x
        return self.relu(out)


def test_threads_share_fused_activation_model_bitwise():
    """A model converted with fuse_activations=True (the shared ReLU becomes a pass-through for the fused
    layer's fresh output, kept per module): 6 threads at once give the serial outputs bit for bit."""
    torch.manual_seed(1)
    ref = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), _Block(8), _Block(8))
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1.0, 0.5)  # many negative pre-activations: the ReLU matters
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    ref.eval()
    mine = bnkit.convert(ref, fuse_activations=True).eval()
    kinds = {type(m).__name__ for m in mine.modules()}
    assert "ReLUAfterFusedBN" in kinds, kinds  # the shared-activation path is the one under test
    n_threads, n_calls = 6, 6
    inputs = [_inputs(n_calls, torch.float32, False, seed=200 + t) for t in range(n_threads)]
    with torch.no_grad():
        serial = [[mine(x) for x in xs] for xs in inputs]
        oracle = [[ref(x) for x in xs] for xs in inputs]
    got: list[list] = [[None] * n_calls for _ in range(n_threads)]
    barrier = threading.Barrier(n_threads, timeout=JOIN_S)

    def worker(t):
        def run():
            barrier.wait()
            for _ in range(2):
                for i, x in enumerate(inputs[t]):
                    with torch.no_grad():
                        got[t][i] = mine(x)
        return run

    _run_threads([worker(t) for t in range(n_threads)])
    for t in range(n_threads):
        for i in range(n_calls):
            assert torch.equal(got[t][i], serial[t][i]), (t, i)
            torch.testing.assert_close(got[t][i], oracle[t][i], **F32)


# =========================================================================== threads: training own copies
def _train(model: nn.Module, seed: int, steps: int, channels_last: bool, accumulate: bool = False,
           at=None) -> dict:
    """SGD steps on seeded data (with ``accumulate``: 3 micro-batches per step in accumulate_stats);
    ``at(step, where)`` is called before, inside (after entry, after the forwards) and after each block."""
    at = at or (lambda step, where: None)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        x = torch.randn(6, 3, 8, 8, generator=g) * 2 - 0.5
        target = torch.randn(6, 6, 8, 8, generator=g)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        opt.zero_grad()
        if accumulate:
            at(step, "before")
            with bnkit.accumulate_stats(model):
                at(step, "entered")
                for xm, tm in zip(x.chunk(3), target.chunk(3)):
                    (model(xm) - tm).square().mean().backward()
                at(step, "forwards done")
            at(step, "exited")
        else:
            (model(x) - target).square().mean().backward()
        opt.step()
    return _state(model)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_threads_train_own_copies_equal_serial(channels_last):
    """4 threads each train their own copy at once: each copy ends bit for bit as the same copy trained
    serially, and as torch's BN twin trained serially to rounding."""
    ref, mine = _twins()
    n = 4
    serial = [_train(copy.deepcopy(mine), seed=10 + t, steps=5, channels_last=channels_last) for t in range(n)]
    oracle = [_train(copy.deepcopy(ref), seed=10 + t, steps=5, channels_last=channels_last) for t in range(n)]
    results: list = [None] * n
    copies = [copy.deepcopy(mine) for _ in range(n)]
    barrier = threading.Barrier(n, timeout=JOIN_S)

    def worker(t):
        def run():
            barrier.wait()
            results[t] = _train(copies[t], seed=10 + t, steps=5, channels_last=channels_last)
        return run

    _run_threads([worker(t) for t in range(n)])
    for t in range(n):
        _assert_state_equal(results[t], serial[t])
        _assert_state_close(results[t], oracle[t], atol=1e-4, rtol=1e-4)


@pytest.fixture
def clean_accumulate_state():
    """accumulate_stats keeps this thread's block stack and the engine its update hook: put them back."""
    hook, stack = engine.running_update_hook(), list(_accumulate._BLOCKS.stack)
    yield
    engine.set_running_update_hook(hook)
    _accumulate._BLOCKS.stack[:] = stack


def test_accumulate_stats_serial_matches_torch_twin(clean_accumulate_state):
    """Sanity for the threaded test below: accumulate_stats on the bnkit model and on torch's twin agree."""
    ref, mine = _twins()
    _assert_state_close(_train(copy.deepcopy(mine), 3, 3, False, accumulate=True),
                        _train(copy.deepcopy(ref), 3, 3, False, accumulate=True), atol=1e-4, rtol=1e-4)
    assert engine.running_update_hook() is None and not engine._ANY_HOOK and not _accumulate._BLOCKS.stack


@pytest.mark.parametrize("kind", ["bnkit", "torch"])
def test_threads_accumulate_stats_own_copies_equal_serial(clean_accumulate_state, kind):
    """Two threads, each training its own copy with gradient accumulation (accumulate_stats), their blocks
    overlapping (A enters, B enters, A exits, B exits): each copy ends as trained serially (bnkit's layers,
    through the engine's hook, and torch's, through their wrapped forwards: both per thread)."""
    ref, mine = _twins()
    mine = mine if kind == "bnkit" else ref
    steps = 2
    serial = [_train(copy.deepcopy(mine), 20 + t, steps, False, accumulate=True) for t in range(2)]
    assert engine.running_update_hook() is None and not engine._ANY_HOOK and not _accumulate._BLOCKS.stack
    # The interleaving is forced (events), so the outcome does not depend on the scheduler.
    ev = {(who, where, step): threading.Event() for who in "ab" for where in ("entered", "exited")
          for step in range(steps)}

    def wait(key):
        assert ev[key].wait(JOIN_S), f"the other thread never got to {key}"

    def at_a(step, where):
        if where == "before" and step:
            wait(("b", "exited", step - 1))
        elif where == "entered":
            ev["a", "entered", step].set()
            wait(("b", "entered", step))
        elif where == "exited":
            ev["a", "exited", step].set()

    def at_b(step, where):
        if where == "before":
            wait(("a", "entered", step))
        elif where == "entered":
            ev["b", "entered", step].set()
        elif where == "forwards done":
            wait(("a", "exited", step))
        elif where == "exited":
            ev["b", "exited", step].set()

    copies = [copy.deepcopy(mine) for _ in range(2)]
    results: list = [None, None]

    def run(t, at):
        def go():
            results[t] = _train(copies[t], 20 + t, steps, False, accumulate=True, at=at)
        return go

    _run_threads([run(0, at_a), run(1, at_b)])
    for t in range(2):
        _assert_state_equal(results[t], serial[t])
    assert engine.running_update_hook() is None and not engine._ANY_HOOK and not _accumulate._BLOCKS.stack  # nothing left installed


def _block_open_in_thread(model: nn.Module, inside) -> None:
    """Run ``inside()`` in this thread while another thread holds an accumulate_stats block on ``model``
    (one training forward done in it); the other thread's block exits after ``inside`` returns."""
    entered, done = threading.Event(), threading.Event()
    errors: list = []

    def holder():
        try:
            with bnkit.accumulate_stats(model):
                model(torch.randn(4, 3, 8, 8))
                entered.set()
                assert done.wait(JOIN_S), "the main thread never finished"
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)
            entered.set()

    t = threading.Thread(target=holder, daemon=True)
    t.start()
    try:
        assert entered.wait(JOIN_S), "the block never opened"
        assert not errors, errors
        inside()
    finally:
        done.set()
        t.join(JOIN_S)
    assert not t.is_alive() and not errors, errors


@pytest.mark.parametrize("kind", ["bnkit", "torch"])
def test_forwards_outside_a_block_update_while_another_thread_accumulates(clean_accumulate_state, kind):
    """A thread with no block of its own updates its model at every forward, as without any block, while
    another thread accumulates on a different model (the engine's hook and the block stack are per thread)."""
    ref, mine = _twins()
    mine = mine if kind == "bnkit" else ref
    other = copy.deepcopy(mine)
    serial = _train(copy.deepcopy(mine), 7, 3, False)
    got = {}
    _block_open_in_thread(other, lambda: got.update(_train(mine, 7, 3, False)))
    _assert_state_equal(got, serial)
    assert engine.running_update_hook() is None and not engine._ANY_HOOK


def test_torch_layers_in_another_threads_block_are_refused(clean_accumulate_state):
    """One torch-BN model in two threads' blocks at once would restore the wrong forward and momentum:
    the second block raises a RuntimeError, before touching the model."""
    ref, _ = _twins()
    before = {}

    def inside():
        bn = ref[1]
        before.update(momentum=bn.momentum, forward=bn.__dict__.get("forward"), state=_state(ref))
        with pytest.raises(RuntimeError, match="another thread's open block"):
            with bnkit.accumulate_stats(ref):
                pass
        assert bn.momentum == before["momentum"] and bn.__dict__.get("forward") is before["forward"]
        _assert_state_equal(_state(ref), before["state"])

    _block_open_in_thread(ref, inside)
    assert "forward" not in ref[1].__dict__ and ref[1].momentum == 0.1  # the holder's exit restored it
    assert engine.running_update_hook() is None and not engine._ANY_HOOK


# =========================================================================== first call from many threads
_FIRST_CALL = """
import json, threading, torch, bnkit
from bnkit.kernels import cpp
assert not cpp._loaded, "the kernels were loaded before the first call"
N = 8
torch.manual_seed(0)
xs = [torch.randn(4, 5, 6, 7) * (1 + i) + i for i in range(N)]
layers = [bnkit.BatchNorm2d(5) for _ in range(N)]          # training mode: batch statistics + running update
shared = bnkit.BatchNorm2d(5).eval()
with torch.no_grad():
    shared.running_mean.uniform_(-1, 1); shared.running_var.uniform_(0.5, 2)
assert not cpp._loaded, "building the layers loaded the kernels: the first call would not be in the threads"
barrier = threading.Barrier(N, timeout=60)
out, errors = [None] * N, []
def run(i):
    try:
        barrier.wait()
        if i % 3 == 0:
            y = layers[i](xs[i])
        elif i % 3 == 1:
            y = bnkit.functional.batch_norm(xs[i], None, None, training=True)
        else:
            y = shared(xs[i])
        out[i] = y.detach()
    except BaseException as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(N)]
for t in threads: t.start()
for t in threads: t.join(60)
assert not any(t.is_alive() for t in threads), "hang"
assert not errors, errors
assert cpp._loaded
# the serial reference, computed after, and torch's BN as the oracle
bad, far = [], []
for i in range(N):
    if i % 3 == 0:
        ref_layer = bnkit.BatchNorm2d(5)
        want = ref_layer(xs[i]).detach()
        tb = torch.nn.BatchNorm2d(5); oracle = tb(xs[i]).detach()
        if not (torch.equal(layers[i].running_mean, ref_layer.running_mean)
                and torch.equal(layers[i].running_var, ref_layer.running_var)
                and int(layers[i].num_batches_tracked) == 1):
            bad.append(("buffers", i))
        if not torch.allclose(layers[i].running_var, tb.running_var, atol=1e-5, rtol=1e-5):
            far.append(("buffers", i))
    elif i % 3 == 1:
        want = bnkit.functional.batch_norm(xs[i], None, None, training=True)
        oracle = torch.nn.functional.batch_norm(xs[i], None, None, training=True)
    else:
        want = shared(xs[i]).detach()
        oracle = torch.nn.functional.batch_norm(xs[i], shared.running_mean, shared.running_var, training=False)
    if not torch.equal(out[i], want):
        bad.append(i)
    if not torch.allclose(out[i], oracle, atol=1e-5, rtol=1e-5):
        far.append(i)
print(json.dumps({"bad": bad, "far": far, "cpp": bnkit.kernels.select(xs[0])}))
"""


def test_first_call_from_many_threads_in_a_fresh_process():
    """8 threads make the process's first bnkit call at once (the C++ kernels load then): no exception, no
    hang, exit code 0, every result equal to the serial one computed after and close to torch's BN."""
    from bnkit.kernels import cpp

    if not cpp.library_path().exists():
        pytest.skip("no cached build of the C++ kernels (a fresh process would compile them: minutes)")
    res = _last_json(_python(_FIRST_CALL))
    assert res == {"bad": [], "far": [], "cpp": "cpp"}


# =========================================================================== accelerate() and threads
def test_accelerate_is_seen_by_other_threads(accelerate_off):
    """'process-wide: all threads and all models see it': switched on in the main thread, a torch BN call
    in another thread is served by bnkit's kernels (and equals ATen's to rounding)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    x = torch.randn(3, 4, 5, 5)
    want = nn.BatchNorm2d(4)(x)  # ATen, off
    got = {}

    def other():
        got["y"] = bn(x)
        got["on"] = bnkit.is_accelerated()

    with bnkit.accelerated():
        bnkit.accelerate_counts(reset=True)
        _run_threads([other])
        counts = bnkit.accelerate_counts()
    assert got["on"] is True
    assert counts["forward"] == 1 and counts["forward_aten"] == 0
    torch.testing.assert_close(got["y"], want, **F32)
    assert not bnkit.is_accelerated()


def test_accelerated_blocks_overlapping_in_two_threads_last_exit_wins(accelerate_off):
    """The documented behaviour of overlapping blocks: each sees the other's switches, and the state after
    both is what the block exiting last found at its entry ('the last one to exit wins')."""
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def wait(ev):
        assert ev.wait(JOIN_S)

    def a():
        with bnkit.accelerated(True):  # found: off
            a_in.set()
            wait(b_in)
            seen["a_inside"] = bnkit.is_accelerated()
        a_out.set()

    def b():
        wait(a_in)
        with bnkit.accelerated(True):  # found: on (A's switch)
            b_in.set()
            wait(a_out)
            seen["b_after_a_exit"] = bnkit.is_accelerated()  # A restored "off" for the whole process
        seen["after_both"] = bnkit.is_accelerated()

    _run_threads([a, b])
    assert seen == {"a_inside": True, "b_after_a_exit": False, "after_both": True}
    assert bnkit.accelerate(False) is True


_ACCEL_STRESS = """
import json, threading, time, torch, bnkit
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                          torch.nn.Conv2d(6, 4, 1), torch.nn.BatchNorm2d(4))
for m in net.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
        torch.nn.init.uniform_(m.weight, 0.5, 1.5); torch.nn.init.uniform_(m.bias, -0.5, 0.5)
K = 20
xs = [torch.randn(4, 3, 8, 8) * 2 + 0.3 for _ in range(K)]
def step(model, x, cl):
    if cl: x = x.contiguous(memory_format=torch.channels_last)
    x = x.clone().requires_grad_(True)
    model.train(); y = model(x); y.square().mean().backward()
    model.eval()
    with torch.no_grad(): z = model(x)
    return y.detach(), z, x.grad
def run_all(model, cl):
    out = [step(model, x, cl) for x in xs]
    return out, [p.grad.clone() for p in model.parameters()], [b.clone() for b in model.buffers()]
import copy
models = {cl: copy.deepcopy(net) for cl in (False, True)}
refs = {cl: run_all(copy.deepcopy(net), cl) for cl in (False, True)}   # ATen, acceleration off
stop = threading.Event(); errors = []; got = {}; switches = [0]
def toggler():
    try:
        i = 0
        while not stop.is_set():
            if i % 3 == 2:
                with bnkit.accelerated(): pass
            else:
                bnkit.accelerate(i % 3 == 0)
            i += 1
            time.sleep(0)  # let the runners in between switches (the GIL)
        bnkit.accelerate(False); switches[0] = i
    except BaseException as exc:
        errors.append(repr(exc))
def runner(cl):
    try:
        got[cl] = run_all(models[cl], cl)
    except BaseException as exc:
        errors.append(repr(exc))
bnkit.accelerate_counts(reset=True)
ts = [threading.Thread(target=toggler, daemon=True)]
rs = [threading.Thread(target=runner, args=(cl,), daemon=True) for cl in (False, True)]
for t in ts + rs: t.start()
for t in rs: t.join(120)
stop.set()
for t in ts: t.join(60)
assert not any(t.is_alive() for t in ts + rs), "hang"
far = []
for cl in (False, True):
    (o, g, b), (ro, rg, rb) = got[cl], refs[cl]
    for i, (a, r) in enumerate(zip(o, ro)):
        for j, (u, v) in enumerate(zip(a, r)):
            if not torch.allclose(u, v, atol=1e-4, rtol=1e-4): far.append((cl, i, j))
    for j, (u, v) in enumerate(zip(g + b, rg + rb)):
        if not torch.allclose(u.double(), v.double(), atol=1e-4, rtol=1e-4): far.append((cl, "state", j))
c = bnkit.accelerate_counts()
print(json.dumps({"errors": errors, "far": far, "switches": switches[0], "served": c["forward"] > 0,
                  "on": bnkit.is_accelerated()}))
"""


def test_accelerate_toggled_while_other_threads_run_torch_bn():
    """Switching is serialized and never changes results beyond float rounding: one thread toggles
    accelerate()/accelerated() as fast as it can while two threads train and evaluate torch BN models
    (NCHW, channels-last; forward and backward). Every output, gradient and running statistic equals the
    ATen run to rounding, nothing raises or hangs. Run in a fresh process: a crash cannot take pytest down."""
    from bnkit.kernels import cpp

    if not cpp.available():
        pytest.skip("the C++ kernels are unavailable")
    res = _last_json(_python(_ACCEL_STRESS))
    assert res["errors"] == [] and res["far"] == [], res
    assert res["switches"] > 10 and res["on"] is False, res


# =========================================================================== torch.multiprocessing, spawn
def _spawn_forward(model: nn.Module, x: torch.Tensor, threads: int) -> torch.Tensor:
    torch.set_num_threads(threads)  # the parent's (the child's default may differ): the same kernels' work
    model.eval()
    with torch.no_grad():
        return model(x)


def test_spawn_workers_run_a_pickled_model_as_the_parent():
    """A bnkit model pickled to 2 'spawn' workers (each loads the kernels itself): each returns the parent's
    eval output bit for bit (and torch's BN twin's to rounding)."""
    ref, mine = _twins()
    mine.eval()
    ref.eval()
    xs = [torch.randn(3, 3, 9, 9), torch.randn(5, 3, 7, 7).contiguous(memory_format=torch.channels_last)]
    with torch.no_grad():
        want = [mine(x) for x in xs]
        oracle = [ref(x) for x in xs]
    ctx = tmp.get_context("spawn")
    with ctx.Pool(2) as pool:
        res = pool.starmap_async(_spawn_forward, [(mine, x, torch.get_num_threads()) for x in xs])
        got = res.get(timeout=JOIN_S)
    for g, w, o in zip(got, want, oracle):
        assert torch.equal(g, w)
        torch.testing.assert_close(g, o, **F32)
    assert isinstance(mine[1], bnkit.BatchNorm2d)


def _hogwild_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, threads: int) -> None:
    torch.set_num_threads(threads)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for xm, tm in zip(x.chunk(2), target.chunk(2)):
        opt.zero_grad()
        (model(xm) - tm).square().mean().backward()
        opt.step()


def test_share_memory_hogwild_update_in_a_spawn_child_is_seen_by_the_parent():
    """share_memory() then training steps in a 'spawn' child (Hogwild): the parameters and the running
    statistics the child updates are the parent's tensors, as with torch's BN twin doing the same."""
    ref, mine = _twins()
    expected = {}
    g = torch.Generator().manual_seed(5)
    x, target = torch.randn(8, 3, 8, 8, generator=g), torch.randn(8, 6, 8, 8, generator=g)
    for name, model in (("torch", ref), ("bnkit", mine)):
        local = copy.deepcopy(model)
        _hogwild_step(local, x, target, torch.get_num_threads())
        expected[name] = _state(local)
    before = _state(mine)
    ctx = tmp.get_context("spawn")
    for model in (ref, mine):
        model.share_memory()
    procs = [ctx.Process(target=_hogwild_step, args=(m, x, target, torch.get_num_threads()), daemon=True)
             for m in (ref, mine)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(JOIN_S)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    got = {"torch": _state(ref), "bnkit": _state(mine)}
    _assert_state_close(got["torch"], expected["torch"], **F32)  # the oracle: torch's BN sees the child's steps
    assert not torch.equal(got["bnkit"]["1.running_mean"], before["1.running_mean"])
    assert int(got["bnkit"]["1.num_batches_tracked"]) == int(before["1.num_batches_tracked"]) + 2
    _assert_state_equal(got["bnkit"], expected["bnkit"])
    _assert_state_close(got["bnkit"], got["torch"], atol=1e-4, rtol=1e-4)


# =========================================================================== DataLoader workers
class _FeatureDataset(torch.utils.data.Dataset):
    """Samples made by a frozen feature extractor (eval, no_grad) in ``__getitem__``."""

    def __init__(self, extractor: nn.Module, n: int) -> None:
        self.extractor = extractor.eval()
        g = torch.Generator().manual_seed(7)
        self.raw = torch.randn(n, 3, 9, 9, generator=g) * 1.7 + 0.2

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i: int):
        with torch.no_grad():
            return self.extractor(self.raw[i : i + 1])[0], i


def _collate_with_bn(batch):
    """A collate that normalizes the stacked features with a bnkit layer in eval."""
    feats = torch.stack([f for f, _ in batch])
    with torch.no_grad():
        return _COLLATE_BN(feats), torch.tensor([i for _, i in batch])


_COLLATE_BN = bnkit.BatchNorm2d(6).eval()
with torch.no_grad():
    _COLLATE_BN.running_mean.copy_(torch.linspace(-0.5, 0.5, 6))
    _COLLATE_BN.running_var.copy_(torch.linspace(0.5, 2.0, 6))
    _COLLATE_BN.weight.copy_(torch.linspace(0.8, 1.2, 6))


def _load_all(dataset, workers: int, context: str | None):
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=3, num_workers=workers, collate_fn=_collate_with_bn,
        multiprocessing_context=context if workers else None, timeout=JOIN_S if workers else 0,
    )
    return list(loader)


@pytest.mark.parametrize("context", ["spawn", "fork"])
def test_dataloader_workers_running_bnkit_equal_num_workers_0(context):
    """DataLoader with 2 workers ('spawn' / 'fork') whose dataset and collate run bnkit layers: the batches
    equal those of num_workers=0 bit for bit, and those of torch's BN twin to rounding."""
    if context not in tmp.get_all_start_methods():
        pytest.skip(f"no {context!r} start method here")
    ref, mine = _twins()
    n = 10
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what DataLoader sets in its workers (the convolution's sums depend on it)
    try:
        want = _load_all(_FeatureDataset(mine, n), 0, None)
        oracle = _load_all(_FeatureDataset(ref, n), 0, None)
    finally:
        torch.set_num_threads(threads)
    got = _load_all(_FeatureDataset(mine, n), 2, context)
    assert len(got) == len(want) == 4
    for (gf, gi), (wf, wi), (of, oi) in zip(got, want, oracle):
        assert torch.equal(gi, wi) and torch.equal(gi, oi)
        assert torch.equal(gf, wf)
        torch.testing.assert_close(gf, of, **F32)
