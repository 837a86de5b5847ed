"""SyncBatchNorm across real processes (gloo on localhost), checked against single-process oracles.

Few process groups are started (each costs a torch import per process on a
loaded machine): one of 2 ranks and one of 3, each running many scenarios in
sequence, and every test reads its part of the recorded results. Oracle:
bnkit's single-process ``BatchNorm`` on the concatenated global batch
(cross-checked against ``torch.nn.BatchNorm``). The 3-rank group ends by
killing one rank mid-training; the others must raise within the timeout.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue as queue_mod
import time
import traceback
from collections import OrderedDict
from datetime import timedelta

import numpy as np
import pytest
import torch
from torch import nn

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(150)]

STEPS = 2
FAIL_TIMEOUT_S = 4.0  # process-group timeout of the failure scenarios
DEFAULT_TIMEOUT_S = 60.0


# =========================================================================== inputs (parent)
def _rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_case(name, *, sizes, tail, axis=1, dtype="float64", momentum=0.1, share_affine="none",
              channels_last=False, affine=True, seed=0):
    """A scenario's global data: per step a global input and upstream gradient (float64, batch on dim 0)."""
    g = _rng(seed)
    n = sum(sizes)
    shape = (n,) + tuple(tail)
    c = shape[axis]
    steps = []
    for s in range(STEPS):
        x = torch.randn(shape, generator=g, dtype=torch.float64) * (1 + s) + 3.0
        gy = torch.randn(shape, generator=g, dtype=torch.float64)
        steps.append((x.numpy(), gy.numpy()))
    w_size = 1 if share_affine in ("weight", "all") else c
    b_size = 1 if share_affine == "all" else c
    params = (
        (torch.rand(w_size, generator=g, dtype=torch.float64) + 0.5).numpy(),
        torch.randn(b_size, generator=g, dtype=torch.float64).numpy(),
    )
    return dict(
        name=name, kind="exact", sizes=list(sizes), c=c, axis=axis, dtype=dtype, momentum=momentum,
        share_affine=share_affine, channels_last=channels_last, affine=affine, steps=steps, params=params,
    )


def make_ddp_case(name, *, sizes, seed=1):
    g = _rng(seed)
    torch.manual_seed(seed)
    model = _ddp_model()
    state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    n = sum(sizes)
    xs = [torch.randn(n, 5, generator=g, dtype=torch.float64).numpy() for _ in range(STEPS)]
    return dict(name=name, kind="ddp", sizes=list(sizes), state=state, xs=xs)


def _ddp_model():
    import bnkit

    return nn.Sequential(
        OrderedDict(
            lin=nn.Linear(5, 4, dtype=torch.float64),
            bn=bnkit.BatchNorm1d(4, dtype=torch.float64),
            act=nn.Tanh(),
            head=nn.Linear(4, 2, dtype=torch.float64),
        )
    )


def _offsets(sizes):
    o = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    return [(int(o[r]), int(o[r + 1])) for r in range(len(sizes))]


# =========================================================================== scenarios (workers)
def _np(t):
    return None if t is None else t.detach().to(torch.float64).cpu().numpy().copy()


def _sc_exact(rank, world, case, ctx):
    import bnkit

    dtype = getattr(torch, case["dtype"])
    lo, hi = _offsets(case["sizes"])[rank]
    layer = bnkit.SyncBatchNorm(
        case["c"], momentum=case["momentum"], axis=case["axis"], share_affine=case["share_affine"],
        affine=case["affine"], dtype=dtype,
    )
    layer.layer_name = case["name"]
    if case["affine"]:
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(case["params"][0]))
            layer.bias.copy_(torch.from_numpy(case["params"][1]))
    rec = {"steps": []}
    for x_np, gy_np in case["steps"]:
        x = torch.from_numpy(x_np[lo:hi]).to(dtype)
        if case["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        gy = torch.from_numpy(gy_np[lo:hi]).to(dtype)
        y = layer(x)
        (y * gy).sum().backward()
        rec["steps"].append(
            dict(
                y=_np(y), dx=_np(x.grad), y_channels_last=bool(y.is_contiguous(memory_format=torch.channels_last)),
                dw=_np(layer.weight.grad) if layer.weight is not None else None,
                db=_np(layer.bias.grad) if layer.bias is not None else None,
                rm=_np(layer.running_mean), rv=_np(layer.running_var), nbt=int(layer.num_batches_tracked),
            )
        )
        layer.zero_grad(set_to_none=True)
    layer.eval()
    x0 = torch.from_numpy(case["steps"][0][0][lo:hi]).to(dtype)
    rec["eval"] = _np(layer(x0))
    return rec


def _sc_ddp(rank, world, case, ctx):
    import bnkit
    from torch.nn.parallel import DistributedDataParallel as DDP

    lo, hi = _offsets(case["sizes"])[rank]
    model = _ddp_model()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in case["state"].items()})
    model = bnkit.convert_sync_batchnorm(model)
    assert isinstance(model.bn, bnkit.SyncBatchNorm)
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    rec = []
    for x_np in case["xs"]:
        opt.zero_grad()
        out = ddp(torch.from_numpy(x_np[lo:hi]))
        # DDP averages gradients over ranks: scale so that the average is the global sum's gradient.
        (out.pow(2).sum() * world).backward()
        rec.append(
            dict(
                grads={n: _np(p.grad) for n, p in model.named_parameters()},
                rm=_np(model.bn.running_mean), rv=_np(model.bn.running_var),
            )
        )
        opt.step()
    return rec


def _sc_mismatch(rank, world, case, ctx):
    import bnkit

    c = 4 + rank
    model = bnkit.convert_sync_batchnorm(nn.Sequential(OrderedDict(stem=nn.Identity(), norm=nn.BatchNorm1d(c))))
    try:
        model(torch.randn(6, c))
    except RuntimeError as e:
        return {"error": str(e)}
    return {"error": None}


@contextlib.contextmanager
def _counting_collectives():
    """Record ``(name, bytes of the first tensor)`` of every torch.distributed collective called meanwhile."""
    import torch.distributed as dist

    calls = []
    originals = {}
    for name in ("all_gather_single", "all_gather_into_tensor", "all_reduce", "all_gather", "broadcast", "barrier"):
        fn = getattr(dist, name, None)
        if fn is None:
            continue
        originals[name] = fn

        def counted(*args, _fn=fn, _name=name, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            calls.append((_name, tensors[0].numel() * tensors[0].element_size() if tensors else 0))
            return _fn(*args, **kwargs)

        setattr(dist, name, counted)
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def _sc_eval_no_comm(rank, world, case, ctx):
    """Only rank 0 runs eval forwards (with and without running statistics): no collective may be called."""
    import torch.distributed as dist

    import bnkit

    calls = []
    if rank == 0:
        with _counting_collectives() as calls:
            for track in (True, False):
                layer = bnkit.SyncBatchNorm(3, track_running_stats=track).eval()
                for _ in range(2):
                    layer(torch.randn(5, 3))
    dist.barrier()
    return {"calls": list(calls)}


def _train_loop_model():
    import bnkit

    torch.manual_seed(0)
    return bnkit.convert_sync_batchnorm(
        nn.Sequential(OrderedDict(lin=nn.Linear(3, 8), bn=nn.BatchNorm1d(8), act=nn.ReLU(), out=nn.Linear(8, 1)))
    )


def _sc_stall(rank, world, case, ctx):
    """The last rank never reaches the collective: the others raise after the group's timeout."""
    import torch.distributed as dist

    group = dist.new_group(list(range(world)), timeout=timedelta(seconds=FAIL_TIMEOUT_S))
    model = _train_loop_model()
    model.bn.process_group = group
    model(torch.randn(4, 3)).sum().backward()  # one step together (past the handshake)
    if rank == world - 1:
        dist.barrier()  # on the default group: waits, without joining the layer's collective, until the others fail
        return {"stalled": True}
    t0 = time.monotonic()
    try:
        model(torch.randn(4, 3)).sum().backward()
        res = {"error": None, "elapsed": time.monotonic() - t0}
    except RuntimeError as e:
        res = {"error": str(e), "elapsed": time.monotonic() - t0}
    dist.barrier()
    return res


def _sc_kill(rank, world, case, ctx):
    """The last rank dies (os._exit) at step 2; the others must raise, naming the layer, within the timeout."""
    import torch.distributed as dist

    group = dist.new_group(list(range(world)), timeout=timedelta(seconds=FAIL_TIMEOUT_S))
    model = _train_loop_model()
    model.bn.process_group = group
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    t0 = time.monotonic()
    for step in range(5):
        if step == 2 and rank == world - 1:
            ctx["die"]()
        t0 = time.monotonic()
        try:
            opt.zero_grad()
            model(torch.randn(4, 3)).pow(2).sum().backward()
            opt.step()
        except RuntimeError as e:
            return {"error": str(e), "elapsed": time.monotonic() - t0, "step": step}
    return {"error": None, "elapsed": time.monotonic() - t0, "step": None}


def _sc_count(rank, world, case, ctx):
    """Collectives and bytes per layer and step, for two batch sizes (rank 1 of a 2-rank world is empty once)."""
    import bnkit

    torch.manual_seed(0)
    model = bnkit.convert_sync_batchnorm(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16))
    )
    with _counting_collectives() as calls:
        model(torch.randn(2, 3, 6, 6)).sum().backward()  # first step: includes the one-time handshakes
        first = list(calls)
        per_batch = {}
        for n in (4, 32):
            calls.clear()
            model(torch.randn(n if rank == 0 else (0 if n == 4 else n), 3, 6, 6)).sum().backward()
            per_batch[n] = list(calls)
    return {"first": first, "per_batch": per_batch}


SCENARIOS = {
    "count": _sc_count,
    "exact": _sc_exact,
    "ddp": _sc_ddp,
    "mismatch": _sc_mismatch,
    "eval_no_comm": _sc_eval_no_comm,
    "stall": _sc_stall,
    "kill": _sc_kill,
}


def _worker(gid, rank, world, store_path, plan, q):
    os.environ["BNKIT_NO_BUILD"] = "1"  # never start a compiler in a worker (use a cached build or torch ops)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    import torch.distributed as dist

    def send(*item):
        q.put((gid, rank) + item)

    def die():
        q.close()
        q.join_thread()
        os._exit(17)

    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{store_path}", rank=rank, world_size=world,
            timeout=timedelta(seconds=DEFAULT_TIMEOUT_S),
        )
        for case in plan:
            try:
                res = SCENARIOS[case["kind"]](rank, world, case, {"die": die})
                send(case["name"], "ok", res)
            except Exception:  # noqa: BLE001 - reported to the parent
                send(case["name"], "exception", traceback.format_exc())
    except Exception:  # noqa: BLE001
        send("__init__", "exception", traceback.format_exc())
    send("__done__", "ok", None)
    q.close()
    q.join_thread()
    os._exit(0)  # no teardown: a dead peer could make destroy_process_group block


def run_groups(specs, tmp_path, *, deadline_s=120.0):
    """Run process groups side by side (their waits overlap); ``specs``: ``[(world, plan, victim)]``.

    Returns per group ``({name: {rank: result}}, exit codes)``; a scenario that
    raised on a rank has ``{"__exception__": traceback}`` as that rank's result.
    Every spawned process is gone when this returns.
    """
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs, results, waiting = [], [], set()
    try:
        for gid, (world, plan, victim) in enumerate(specs):
            store = tmp_path / f"store_{gid}_{world}_{time.time_ns()}"
            group = [
                ctx.Process(target=_worker, args=(gid, r, world, str(store), plan, q), daemon=True)
                for r in range(world)
            ]
            procs.append(group)
            results.append({})
            waiting |= {(gid, r) for r in range(world) if r != victim}
        for group in procs:
            for p in group:
                p.start()
        end = time.monotonic() + deadline_s
        while waiting and time.monotonic() < end:
            try:
                gid, rank, name, status, payload = q.get(timeout=max(0.1, min(1.0, end - time.monotonic())))
            except queue_mod.Empty:
                if all(not procs[g][r].is_alive() for g, r in waiting) and q.empty():
                    break
                continue
            if name == "__done__":
                waiting.discard((gid, rank))
                continue
            results[gid].setdefault(name, {})[rank] = payload if status == "ok" else {"__exception__": payload}
        assert not waiting, f"(group, rank) {sorted(waiting)} did not finish within {deadline_s} s"
        for group in procs:
            for p in group:
                p.join(timeout=10)
        return [(results[g], [p.exitcode for p in procs[g]]) for g in range(len(specs))]
    finally:
        for group in procs:
            for p in group:
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
        q.close()


def scenario(results, name):
    """The per-rank results of one scenario; fails with the worker's traceback if it raised."""
    assert "__init__" not in results, results["__init__"]
    assert name in results, f"scenario {name!r} reported nothing"
    for rank, res in results[name].items():
        if isinstance(res, dict) and "__exception__" in res:
            raise AssertionError(f"rank {rank}, scenario {name!r} raised:\n{res['__exception__']}")
    return results[name]


# =========================================================================== oracle (parent)
def oracle_exact(case):
    """Single-process bnkit BatchNorm (portable torch backend) on the concatenated global batch."""
    import bnkit

    dtype = getattr(torch, case["dtype"])
    with bnkit.kernels.use_backend("torch"):
        layer = bnkit.BatchNorm(
            case["c"], momentum=case["momentum"], axis=case["axis"], share_affine=case["share_affine"],
            affine=case["affine"], dtype=dtype,
        )
        if case["affine"]:
            with torch.no_grad():
                layer.weight.copy_(torch.from_numpy(case["params"][0]))
                layer.bias.copy_(torch.from_numpy(case["params"][1]))
        ref = layer if case["axis"] == 1 and case["share_affine"] == "none" else None
        tref = None
        if ref is not None:
            tcls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[
                case["steps"][0][0].ndim
            ]
            tref = tcls(case["c"], momentum=case["momentum"], affine=case["affine"], dtype=dtype)
            tref.load_state_dict(layer.state_dict())
        out = {"steps": []}
        for x_np, gy_np in case["steps"]:
            x = torch.from_numpy(x_np).to(dtype).requires_grad_(True)
            gy = torch.from_numpy(gy_np).to(dtype)
            y = layer(x)
            (y * gy).sum().backward()
            step = dict(
                y=_np(y), dx=_np(x.grad),
                dw=_np(layer.weight.grad) if layer.weight is not None else None,
                db=_np(layer.bias.grad) if layer.bias is not None else None,
                rm=_np(layer.running_mean), rv=_np(layer.running_var), nbt=int(layer.num_batches_tracked),
            )
            if tref is not None:  # the oracle agrees with torch itself
                xt = torch.from_numpy(x_np).to(dtype).requires_grad_(True)
                yt = tref(xt)
                (yt * gy).sum().backward()
                tol = 1e-10 if dtype == torch.float64 else 1e-5
                torch.testing.assert_close(yt.detach(), y.detach(), atol=tol, rtol=0)
                torch.testing.assert_close(xt.grad, x.grad, atol=tol, rtol=0)
                torch.testing.assert_close(tref.running_var, layer.running_var, atol=tol, rtol=0)
                tref.zero_grad(set_to_none=True)
            out["steps"].append(step)
            layer.zero_grad(set_to_none=True)
        layer.eval()
        out["eval"] = _np(layer(torch.from_numpy(case["steps"][0][0]).to(dtype)))
    return out


def _close(a, b, tol, what):
    assert a is not None and b is not None, what
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    if a.size:
        err = float(np.max(np.abs(a - b)))
        assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:g}"


def check_exact(case, per_rank):
    tol = 1e-10 if case["dtype"] == "float64" else 1e-5
    want = oracle_exact(case)
    offs = _offsets(case["sizes"])
    world = len(case["sizes"])
    assert sorted(per_rank) == list(range(world))
    for s, ws in enumerate(want["steps"]):
        dw_sum = None
        db_sum = None
        for r in range(world):
            lo, hi = offs[r]
            got = per_rank[r]["steps"][s]
            where = f"{case['name']} step {s} rank {r}"
            _close(got["y"], ws["y"][lo:hi], tol, f"{where} output")
            _close(got["dx"], ws["dx"][lo:hi], tol, f"{where} input grad")
            _close(got["rm"], ws["rm"], tol, f"{where} running_mean")
            _close(got["rv"], ws["rv"], tol, f"{where} running_var")
            assert got["nbt"] == ws["nbt"], where
            if case["channels_last"]:
                assert got["y_channels_last"], f"{where}: the output lost the channels_last layout"
            if case["affine"]:
                dw_sum = got["dw"] if dw_sum is None else dw_sum + got["dw"]
                db_sum = got["db"] if db_sum is None else db_sum + got["db"]
                # bias grad is per rank: the sum of this rank's upstream gradient (independent oracle)
                gy = case["steps"][s][1][lo:hi]
                axis = case["axis"] % gy.ndim
                local_db = gy.sum(axis=tuple(d for d in range(gy.ndim) if d != axis))
                if case["share_affine"] == "all":
                    local_db = local_db.sum(keepdims=True)
                _close(got["db"], local_db, tol, f"{where} per-rank bias grad")
        if case["affine"]:
            _close(dw_sum, ws["dw"], tol * 10, f"{case['name']} step {s}: weight grad summed over ranks")
            _close(db_sum, ws["db"], tol * 10, f"{case['name']} step {s}: bias grad summed over ranks")
    for r in range(world):
        lo, hi = offs[r]
        _close(per_rank[r]["eval"], want["eval"][lo:hi], tol, f"{case['name']} rank {r} eval output")


def oracle_ddp(case):
    import bnkit

    with bnkit.kernels.use_backend("torch"):
        model = _ddp_model()
        model.load_state_dict({k: torch.from_numpy(v) for k, v in case["state"].items()})
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        rec = []
        for x_np in case["xs"]:
            opt.zero_grad()
            model(torch.from_numpy(x_np)).pow(2).sum().backward()
            rec.append(
                dict(
                    grads={n: _np(p.grad) for n, p in model.named_parameters()},
                    rm=_np(model.bn.running_mean), rv=_np(model.bn.running_var),
                )
            )
            opt.step()
    return rec


def check_ddp(case, per_rank):
    want = oracle_ddp(case)
    for r, got in per_rank.items():
        for s, (g, w) in enumerate(zip(got, want)):
            for n in w["grads"]:
                _close(g["grads"][n], w["grads"][n], 1e-10, f"{case['name']} rank {r} step {s} grad {n}")
            _close(g["rm"], w["rm"], 1e-10, f"{case['name']} rank {r} step {s} running_mean")
            _close(g["rv"], w["rv"], 1e-10, f"{case['name']} rank {r} step {s} running_var")


# =========================================================================== plans
CASES_2 = [
    make_case("f64_unequal", sizes=[3, 5], tail=(4, 3), seed=10),
    make_case("f32_nchw_channels_last", sizes=[4, 4], tail=(3, 5, 2), dtype="float32", channels_last=True, seed=11),
    make_case("f64_empty_rank", sizes=[0, 6], tail=(5, 2), seed=12),
    make_case("f64_axis_last_cumulative", sizes=[2, 7], tail=(3, 4), axis=-1, momentum=None, seed=13),
    make_case("f64_shared_affine_2d", sizes=[1, 4], tail=(6,), share_affine="all", seed=14),
    make_case("f32_no_affine", sizes=[5, 2], tail=(3, 4), dtype="float32", affine=False, seed=15),
]
CASES_3 = [
    make_case("w3_f64_empty_middle", sizes=[2, 0, 5], tail=(4, 3), seed=20),
    make_case("w3_f32_unequal", sizes=[3, 1, 4], tail=(6, 5), dtype="float32", seed=21),
    make_case("w3_f64_large_offset", sizes=[4, 2, 3], tail=(3, 8), seed=22),
]
DDP_2 = make_ddp_case("ddp2", sizes=[3, 5])
DDP_3 = make_ddp_case("ddp3_empty", sizes=[4, 0, 4], seed=2)


PLAN_2 = CASES_2 + [
    DDP_2,
    {"name": "count", "kind": "count"},
    {"name": "mismatch", "kind": "mismatch"},
    {"name": "eval_no_comm", "kind": "eval_no_comm"},
    {"name": "stall", "kind": "stall"},
]
PLAN_3 = CASES_3 + [DDP_3, {"name": "kill", "kind": "kill"}]


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    """A 2-rank and a 3-rank gloo world, run side by side; the 3-rank one loses its last rank at the end."""
    (r2, codes2), (r3, codes3) = run_groups([(2, PLAN_2, None), (3, PLAN_3, 2)], tmp_path_factory.mktemp("sync"))
    assert codes2 == [0, 0], codes2
    assert codes3[:2] == [0, 0] and codes3[2] == 17, codes3
    return r2, r3


@pytest.fixture(scope="module")
def group2(groups):
    return groups[0]


@pytest.fixture(scope="module")
def group3(groups):
    return groups[1]


# =========================================================================== tests
@pytest.mark.parametrize("case", CASES_2, ids=[c["name"] for c in CASES_2])
def test_two_ranks_match_global_batch(group2, case):
    check_exact(case, scenario(group2, case["name"]))


@pytest.mark.parametrize("case", CASES_3, ids=[c["name"] for c in CASES_3])
def test_three_ranks_match_global_batch(group3, case):
    check_exact(case, scenario(group3, case["name"]))


def test_ddp_two_ranks_matches_single_process(group2):
    check_ddp(DDP_2, scenario(group2, "ddp2"))


def test_ddp_three_ranks_with_empty_rank(group3):
    check_ddp(DDP_3, scenario(group3, "ddp3_empty"))


def test_channel_mismatch_is_reported_on_every_rank(group2):
    for r, res in scenario(group2, "mismatch").items():
        assert res["error"] is not None, f"rank {r} did not detect the mismatch"
        assert "channel count mismatch" in res["error"] and "[4, 5]" in res["error"], res["error"]
        assert "'norm'" in res["error"], res["error"]


def test_eval_mode_does_not_communicate(group2):
    assert scenario(group2, "eval_no_comm")[0]["calls"] == []


def test_stalled_rank_gives_timeout_error(group2):
    res = scenario(group2, "stall")[0]
    assert res["error"] is not None, "the collective did not fail although a rank never arrived"
    assert "SyncBatchNorm(8) at 'bn'" in res["error"] and "collective failed in the forward" in res["error"], res
    assert res["elapsed"] < FAIL_TIMEOUT_S + 5.0, res


def test_killed_rank_makes_the_others_raise(group3):
    for r in (0, 1):
        res = scenario(group3, "kill")[r]
        assert res["error"] is not None, f"rank {r} did not notice the dead rank"
        assert res["step"] == 2, res
        assert "SyncBatchNorm(8) at 'bn'" in res["error"] and "collective failed" in res["error"], res["error"]
        assert res["elapsed"] < FAIL_TIMEOUT_S + 5.0, res


def test_one_collective_per_layer_forward_and_backward_with_o_c_bytes(group2):
    from bnkit.sync import sync_payload_bytes

    for r, res in scenario(group2, "count").items():
        first_gathers = [b for n, b in res["first"] if n.startswith("all_gather")]
        assert len(first_gathers) == 4, res["first"]  # per layer: one handshake + one statistics gather
        for n, calls in res["per_batch"].items():
            gathers = [b for name, b in calls if name.startswith("all_gather")]
            reduces = [b for name, b in calls if name == "all_reduce"]
            assert len(calls) == 4 and len(gathers) == 2 and len(reduces) == 2, (r, n, calls)
            # bytes depend on the channel count only (backward runs from the last layer)
            assert gathers == [sync_payload_bytes(c, 2)["forward_gathered"] for c in (8, 16)], (n, gathers)
            assert reduces == [sync_payload_bytes(c, 2)["backward_allreduce"] for c in (16, 8)], (n, reduces)


@pytest.mark.slow
def test_readme_torchrun_example(tmp_path):
    """``torchrun --nproc_per_node=2 examples/sync_torchrun.py`` (as in docs/sync.md), on a free port."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", str(root / "examples" / "sync_torchrun.py")]
    env = dict(os.environ, BNKIT_NO_BUILD="1", GLOO_SOCKET_IFNAME="lo")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "running statistics identical on all 2 ranks: True" in proc.stdout, proc.stdout
