"""bnkit models under torch's multi-process training wrappers (gloo on 127.0.0.1, 2 CPU ranks).

Oracle: the same model with torch's own ``nn.BatchNorm*`` run under the same
wrapper in the same processes (``bnkit.convert(model)`` makes the bnkit twin with
identical state). Every scenario runs both twins on both ranks and returns
outputs, gradients, the state (parameters after the optimizer step, running
statistics, ``num_batches_tracked``) per step to the parent, which compares
them with a float32 tolerance of 1e-5 (integers exactly).

Where torch cannot do something on CPU there is no test against it, except
where bnkit documents doing more (docs/differences.md, "SyncBatchNorm on CPU"):
``torch.nn.SyncBatchNorm`` refuses CPU modules under DDP, so bnkit's
``SyncBatchNorm`` under DDP is compared with torch's ``nn.BatchNorm`` run in one
process on the concatenated global batch (what torch's SyncBatchNorm computes on
GPUs), and in eval mode with ``torch.nn.SyncBatchNorm`` itself. The old
``FullyShardedDataParallel`` needs an accelerator in torch 2.13 ("FSDP needs a
non-CPU accelerator device") for torch's model too: not tested.

Activation checkpointing: torch's BN layers update their running statistics
twice per checkpointed step and bnkit's once (documented, docs/training-loops.md),
so the bnkit model with checkpointing is compared with torch's model without it
(identical per the docs) and, for outputs, gradients and parameters, with torch's
model with it.

One process pair runs all scenarios in sequence (and a second, for the
``torch.compile`` scenario); each scenario's per-rank result travels back
as numpy data.
"""

from __future__ import annotations

import contextlib
import copy
import os
import queue as queue_mod
import socket
import time
import traceback
from collections import OrderedDict
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.multiprocessing as tmp
from torch import nn

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

WORLD = 2
TOL = 1e-5
PG_TIMEOUT_S = 45.0  # a collective left waiting by a failed peer raises after this
DEADLINE_S = 150.0  # the parent gives up on a process pair after this
STEPS = 3
SYNC_CASES = {"sync_1_5": [1, 5], "sync_0_6": [0, 6]}  # per-rank batch sizes of the SyncBatchNorm scenarios


# =========================================================================== models and data
def conv_model(seed: int = 0) -> nn.Module:
    """torch's BN layers: a BatchNorm2d (momentum 0.1) and a BatchNorm1d with the cumulative average."""
    torch.manual_seed(seed)
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, 4, 3),
            bn1=nn.BatchNorm2d(4),
            act=nn.ReLU(),
            flat=nn.Flatten(),
            fc=nn.Linear(4 * 4 * 4, 6),
            bn2=nn.BatchNorm1d(6, momentum=None),
            head=nn.Linear(6, 2),
        )
    )


class Branchy(nn.Module):
    """A branch (with its own BN layer) that only some steps use: DDP's find_unused_parameters."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.stem = conv_model(seed)
        self.extra = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))

    def forward(self, x, use_extra: bool = False):
        y = self.stem(x)
        return y + self.extra(y) if use_extra else y


class Checkpointed(nn.Module):
    """Both halves run through ``torch.utils.checkpoint(use_reentrant=False)`` when ``use_ckpt``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        m = conv_model(seed)
        self.body = nn.Sequential(m.conv, m.bn1, m.act)
        self.tail = nn.Sequential(m.flat, m.fc, m.bn2, m.head)
        self.use_ckpt = True

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        if not self.use_ckpt:
            return self.tail(self.body(x))
        h = checkpoint(self.body, x, use_reentrant=False)
        return checkpoint(self.tail, h, use_reentrant=False)


def batch(seed: int, rank: int, step: int, n: int) -> torch.Tensor:
    """Rank-dependent data (different statistics per rank)."""
    g = torch.Generator().manual_seed(1000 * seed + 10 * step + rank)
    return torch.randn(n, 3, 6, 6, generator=g) * (1.0 + rank) + rank


def loss_fn(y: torch.Tensor) -> torch.Tensor:
    return (y.square() + y).mean()


def _bn_types(model: nn.Module) -> list[str]:
    import bnkit

    out = []
    for m in model.modules():
        if isinstance(m, bnkit.SyncBatchNorm):
            out.append("bnkit.sync")
        elif type(m).__module__.startswith("bnkit"):
            out.append("bnkit")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            out.append("torch")
    return out


def twins(make=conv_model):
    """``{"torch": model, "bnkit": bnkit.convert(model)}`` with identical state."""
    import bnkit

    t = make()
    b = bnkit.convert(t)
    assert set(_bn_types(t)) == {"torch"} and set(_bn_types(b)) == {"bnkit"}, (_bn_types(t), _bn_types(b))
    return {"torch": t, "bnkit": b}


# =========================================================================== recording (workers)
def _np(t):
    if t is None:
        return None
    if hasattr(t, "full_tensor"):  # a DTensor (FSDP2)
        t = t.full_tensor()
    return t.detach().clone().cpu().numpy()


def _state(module: nn.Module) -> dict:
    return {k: _np(v) for k, v in module.state_dict().items()}


def _grads(module: nn.Module) -> dict:
    return {n: _np(p.grad) for n, p in module.named_parameters()}


def _train(wrapped, inner, opt, batches, call=None) -> list:
    """Optimizer steps, one batch each; per step the output, gradients and the state after the step."""
    rec = []
    for i, x in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        y = call(wrapped, x, i) if call else wrapped(x)
        loss_fn(y).backward()
        step = {"y": _np(y), "grads": _grads(inner)}
        opt.step()
        step["state"] = _state(inner)
        rec.append(step)
    return rec


def _ddp(model, **kwargs):
    return nn.parallel.DistributedDataParallel(model, **kwargs)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


# =========================================================================== scenarios (workers)
def sc_ddp(rank, ctx, **ddp_kwargs):
    batches = [batch(1, rank, s, 4 + s) for s in range(STEPS)]
    out = {}
    for kind, model in twins().items():
        ddp = _ddp(model, **ddp_kwargs)
        out[kind] = _train(ddp, model, _sgd(ddp.parameters()), batches)
    return out


def sc_unused(rank, ctx):
    batches = [batch(2, rank, s, 5) for s in range(STEPS)]
    out = {}
    for kind, model in twins(Branchy).items():
        ddp = _ddp(model, find_unused_parameters=True)
        out[kind] = _train(ddp, model, _sgd(ddp.parameters()), batches, call=lambda w, x, i: w(x, use_extra=i == 1))
    return out


def sc_no_sync(rank, ctx, accumulate, broadcast_buffers=True):
    import bnkit

    # Uneven micro-batches, the same number on each rank. No micro-batch of 2: BN's input gradient is then zero
    # in exact arithmetic, and what float32 leaves of it (its rounding) differs between any two implementations.
    sizes = [[4, 6, 5], [5, 4, 6]][rank]
    micro = [[batch(3, rank, 10 * step + i, n) for i, n in enumerate(sizes)] for step in range(2)]
    out = {}
    for kind, model in twins().items():
        ddp = _ddp(model, broadcast_buffers=broadcast_buffers)
        opt = _sgd(ddp.parameters())
        rec = []
        for parts in micro:
            opt.zero_grad(set_to_none=True)
            ys = []
            block = bnkit.accumulate_stats(ddp) if accumulate else contextlib.nullcontext()
            with block:
                for i, x in enumerate(parts):
                    sync = i == len(parts) - 1
                    with contextlib.nullcontext() if sync else ddp.no_sync():
                        y = ddp(x)
                        loss_fn(y).backward()
                    ys.append(_np(y))
            rec.append({"ys": ys, "grads": _grads(model)})
            opt.step()
            rec[-1]["state"] = _state(model)
        out[kind] = rec
    if accumulate:
        # Pure torch: what accumulate_stats promises, one forward per step over the concatenated micro-batches
        # under the same DDP wrapper, with the parameters the torch twin had at the start of each step.
        model = conv_model()
        ddp = _ddp(model, broadcast_buffers=broadcast_buffers)
        params = dict(model.named_parameters())
        rec = []
        for step, parts in enumerate(micro):
            if step:
                with torch.no_grad():
                    for name, p in params.items():
                        p.copy_(torch.from_numpy(out["torch"][step - 1]["state"][name]))
            loss_fn(ddp(torch.cat(parts))).backward()  # a full DDP iteration (forward buffer broadcast included)
            rec.append({"state": _state(model)})
        out["torch_concat"] = rec
    return out


def sc_checkpoint(rank, ctx):
    batches = [batch(4, rank, s, 4) for s in range(STEPS)]
    models = twins(Checkpointed)
    plain = copy.deepcopy(models["torch"])
    plain.use_ckpt = False
    out = {}
    for kind, model in (("torch_plain", plain), ("torch", models["torch"]), ("bnkit", models["bnkit"])):
        ddp = _ddp(model)
        out[kind] = _train(ddp, model, _sgd(ddp.parameters()), batches)
    return out


def sc_zero(rank, ctx):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    batches = [batch(5, rank, s, 4) for s in range(STEPS)]
    out = {}
    for kind, model in twins().items():
        ddp = _ddp(model)
        # SGD, not Adam: Adam would turn the rounding noise in conv.bias's gradient (zero in exact arithmetic:
        # a BN layer follows) into steps of size lr.
        opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=torch.optim.SGD, lr=0.1, momentum=0.9)
        out[kind] = _train(ddp, model, opt, batches)
    return out


def sc_dcp(rank, ctx):
    """Train 2 steps under DDP, dcp.save each twin, dcp.load into fresh models (also across twins)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    import bnkit

    root = ctx["tmp"]
    batches = [batch(6, rank, s, 4) for s in range(2)]
    saved = {}
    for kind, model in twins().items():
        ddp = _ddp(model, broadcast_buffers=False)  # the ranks end with different running statistics
        _train(ddp, model, _sgd(ddp.parameters()), batches)
        saved[kind] = _state(model)
        dcp.save(model.state_dict(), checkpoint_id=os.path.join(root, kind))
    dist.barrier()
    x_eval = batch(6, rank, 9, 3)
    loaded, evals = {}, {}
    for target in ("torch", "bnkit"):
        for source in ("torch", "bnkit"):
            fresh = conv_model(seed=123)  # other parameters, default buffers
            if target == "bnkit":
                fresh = bnkit.convert(fresh)
            sd = fresh.state_dict()
            dcp.load(sd, checkpoint_id=os.path.join(root, source))
            fresh.load_state_dict(sd)
            loaded[f"{target}<-{source}"] = _state(fresh)
            evals[f"{target}<-{source}"] = _np(fresh.eval()(x_eval))
    return {"saved": saved, "loaded": loaded, "eval": evals}


def sc_fsdp2(rank, ctx):
    from torch.distributed.fsdp import fully_shard

    batches = [batch(7, rank, s, 4) for s in range(STEPS)]
    out = {}
    for kind, model in twins().items():
        fully_shard(model.bn1)  # a BN layer as its own FSDP unit
        fully_shard(model)
        out[kind] = _train(model, model, _sgd(model.parameters()), batches)
    return out


def sc_sync(rank, ctx, sizes):
    """bnkit.SyncBatchNorm under DDP with uneven (1 or empty) batches, training then eval."""
    import bnkit

    t = conv_model()
    tsync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(t))
    try:
        _ddp(tsync)
        torch_sync_error = None
    except Exception as err:  # noqa: BLE001 - the parent checks it
        torch_sync_error = f"{type(err).__name__}: {err}"
    model = bnkit.convert_sync_batchnorm(copy.deepcopy(t))
    types = _bn_types(model)
    ddp = _ddp(model)
    opt = _sgd(ddp.parameters())
    n_global = sum(sizes)
    rec = []
    for s in range(2):
        opt.zero_grad(set_to_none=True)
        y = ddp(batch(8, rank, s, sizes[rank]))
        # DDP averages the gradients: this is the gradient of the global batch's mean loss.
        ((y.square() + y).sum() * WORLD / n_global).backward()
        rec.append({"y": _np(y), "grads": _grads(model)})
        opt.step()
        rec[-1]["state"] = _state(model)
    x_eval = batch(8, rank, 5, sizes[rank])
    ddp.eval()
    y_eval = _np(ddp(x_eval))
    tsync.load_state_dict(model.state_dict())
    t.load_state_dict(model.state_dict())
    y_torch_sync_eval = _np(tsync.eval()(x_eval))  # torch.nn.SyncBatchNorm in eval runs on CPU
    y_torch_ddp_eval = _np(_ddp(t).eval()(x_eval))
    return {
        "types": types, "torch_sync_error": torch_sync_error, "train": rec, "eval": y_eval,
        "torch_sync_eval": y_torch_sync_eval, "torch_ddp_eval": y_torch_ddp_eval,
    }


def sc_mixed(rank, ctx):
    """A model with a bnkit BatchNorm2d and torch's BatchNorm1d, against the all-torch twin."""
    import bnkit

    t = conv_model()
    mixed = copy.deepcopy(t)
    mixed.bn1 = bnkit.convert(mixed.bn1)
    types = _bn_types(mixed)
    batches = [batch(9, rank, s, 4) for s in range(STEPS)]
    out = {"types": types}
    for kind, model in (("torch", t), ("bnkit", mixed)):
        ddp = _ddp(model)
        out[kind] = _train(ddp, model, _sgd(ddp.parameters()), batches)
    return out


def sc_compile(rank, ctx):
    batches = [batch(10, rank, s, 4) for s in range(2)]
    out = {}
    for kind, model in twins().items():
        compiled = torch.compile(_ddp(model))
        out[kind] = _train(compiled, model, _sgd(model.parameters()), batches)
    return out


SCENARIOS = {
    "ddp_broadcast": lambda r, c: sc_ddp(r, c, broadcast_buffers=True),
    "ddp_no_broadcast": lambda r, c: sc_ddp(r, c, broadcast_buffers=False),
    "ddp_unused": sc_unused,
    "ddp_static_graph": lambda r, c: sc_ddp(r, c, static_graph=True),
    "ddp_bucket_view": lambda r, c: sc_ddp(r, c, gradient_as_bucket_view=True, bucket_cap_mb=0.0005),
    "no_sync": lambda r, c: sc_no_sync(r, c, accumulate=False),
    "no_sync_accumulate": lambda r, c: sc_no_sync(r, c, accumulate=True),
    "no_sync_accumulate_no_broadcast": lambda r, c: sc_no_sync(r, c, accumulate=True, broadcast_buffers=False),
    "checkpoint": sc_checkpoint,
    "zero": sc_zero,
    "dcp": sc_dcp,
    "fsdp2": sc_fsdp2,
    "mixed": sc_mixed,
    "compile": sc_compile,
    **{name: (lambda r, c, _s=sizes: sc_sync(r, c, _s)) for name, sizes in SYNC_CASES.items()},
}
FAST_PLAN = [n for n in SCENARIOS if n != "compile"]


def _worker(rank, port, plan, ctx, q):
    os.environ["BNKIT_NO_BUILD"] = "1"  # never start a compiler in a worker
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
            timeout=timedelta(seconds=PG_TIMEOUT_S),
        )
        for name in plan:
            try:
                q.put((rank, name, "ok", SCENARIOS[name](rank, ctx)))
            except Exception:  # noqa: BLE001 - reported to the parent
                q.put((rank, name, "exception", traceback.format_exc()))
    except Exception:  # noqa: BLE001
        q.put((rank, "__init__", "exception", traceback.format_exc()))
    q.put((rank, "__done__", "ok", None))
    q.close()
    q.join_thread()
    os._exit(0)  # no teardown: a failed peer could make destroy_process_group block


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pair(plan, ctx) -> dict:
    """Run ``plan`` on a spawned 2-rank gloo group; ``{scenario: {rank: result}}``."""
    mp = tmp.get_context("spawn")
    q = mp.Queue()
    port = _free_port()
    procs = [mp.Process(target=_worker, args=(r, port, plan, ctx, q), daemon=True) for r in range(WORLD)]
    results, waiting = {}, set(range(WORLD))
    try:
        for p in procs:
            p.start()
        end = time.monotonic() + DEADLINE_S
        while waiting and time.monotonic() < end:
            try:
                rank, name, status, payload = q.get(timeout=1.0)
            except queue_mod.Empty:
                if not any(p.is_alive() for p in procs) and q.empty():
                    break
                continue
            if name == "__done__":
                waiting.discard(rank)
                continue
            results.setdefault(name, {})[rank] = payload if status == "ok" else {"__exception__": payload}
        assert not waiting, f"ranks {sorted(waiting)} did not finish within {DEADLINE_S} s: {results.keys()}"
        for p in procs:
            p.join(timeout=10)
        return results
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        q.close()


def scenario(results, name) -> dict:
    assert "__init__" not in results, results["__init__"]
    assert name in results and sorted(results[name]) == list(range(WORLD)), f"{name!r}: {results.get(name)}"
    for rank, res in results[name].items():
        if isinstance(res, dict) and "__exception__" in res:
            raise AssertionError(f"rank {rank}, scenario {name!r} raised:\n{res['__exception__']}")
    return results[name]


# =========================================================================== comparison (parent)
def same(got, want, where: str) -> None:
    """Equal structure; float arrays within TOL (absolute and relative), integer arrays and the rest exactly."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), f"{where}: lengths differ"
        for i, (g, w) in enumerate(zip(got, want)):
            same(g, w, f"{where}[{i}]")
    elif isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray), f"{where}: {type(got).__name__} is not an array"
        assert got.shape == want.shape and got.dtype == want.dtype, f"{where}: {got.shape}/{got.dtype} != {want.shape}/{want.dtype}"
        if np.issubdtype(want.dtype, np.floating):
            torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), atol=TOL, rtol=TOL, msg=lambda m: f"{where}: {m}")
        else:
            assert np.array_equal(got, want), f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def _buffers(step_state: dict) -> dict:
    return {k: v for k, v in step_state.items() if "running" in k or "num_batches" in k}


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    return run_pair(FAST_PLAN, {"tmp": str(tmp_path_factory.mktemp("dcp"))})


def _twins_agree(res, name):
    for rank, r in res.items():
        same(r["bnkit"], r["torch"], f"{name} rank {rank}")


# =========================================================================== tests
@pytest.mark.parametrize("name", ["ddp_broadcast", "ddp_no_broadcast"])
def test_ddp_broadcast_buffers_running_stats_per_rank(fast, name):
    res = scenario(fast, name)
    _twins_agree(res, name)
    for kind in ("torch", "bnkit"):
        last = [_buffers(res[r][kind][-1]["state"]) for r in range(WORLD)]
        assert int(last[0]["bn1.num_batches_tracked"]) == STEPS == int(last[1]["bn1.num_batches_tracked"])
        # The ranks see different data, so their own last updates differ (the scenario is not vacuous).
        assert not np.allclose(last[0]["bn1.running_mean"], last[1]["bn1.running_mean"]), kind


@pytest.mark.parametrize("name", ["ddp_unused", "ddp_static_graph", "ddp_bucket_view", "zero", "fsdp2"])
def test_wrapper_matches_torch_twin(fast, name):
    res = scenario(fast, name)
    _twins_agree(res, name)
    for kind in ("torch", "bnkit"):  # gradients are averaged over the ranks by every wrapper
        for s in range(STEPS):
            same(res[1][kind][s]["grads"], res[0][kind][s]["grads"], f"{name} {kind} step {s} grads rank 1 vs 0")
    if name == "ddp_unused":  # the extra branch ran once: its BN layer counted one batch, its grads only then
        for r in range(WORLD):
            assert int(res[r]["bnkit"][-1]["state"]["extra.1.num_batches_tracked"]) == 1
            assert res[r]["bnkit"][0]["grads"]["extra.1.weight"] is None
            assert res[r]["bnkit"][1]["grads"]["extra.1.weight"] is not None


def test_no_sync_gradient_accumulation(fast):
    res = scenario(fast, "no_sync")
    _twins_agree(res, "no_sync")
    for r in range(WORLD):
        assert int(res[r]["bnkit"][-1]["state"]["bn1.num_batches_tracked"]) == 2 * 3  # every micro-batch counts


def _check_against_concat(res, name, kind):
    """``kind``'s running buffers == one forward per step over the concatenated micro-batches (pure torch).

    Only for ``bn1``, whose input is the same either way: a later BN layer sees the micro-batches normalized
    one by one (per micro-batch statistics), not the concatenation normalized as one batch.
    """
    for r in range(WORLD):
        for s, want in enumerate(res[r]["torch_concat"]):
            keys = [k for k in _buffers(want["state"]) if k.startswith("bn1.")] + ["bn2.num_batches_tracked"]
            same({k: res[r][kind][s]["state"][k] for k in keys}, {k: want["state"][k] for k in keys},
                 f"{name} rank {r} step {s} {kind}")
        assert int(res[r][kind][-1]["state"]["bn1.num_batches_tracked"]) == 2  # one update per optimizer step


@pytest.mark.parametrize("name", ["no_sync_accumulate", "no_sync_accumulate_no_broadcast"])
def test_no_sync_accumulate_stats_bnkit_model(fast, name):
    res = scenario(fast, name)
    for r in range(WORLD):  # outputs, gradients and parameters: as torch's model in the same block
        for s, (got, want) in enumerate(zip(res[r]["bnkit"], res[r]["torch"])):
            same(got["ys"], want["ys"], f"{name} rank {r} step {s} outputs")
            same(got["grads"], want["grads"], f"{name} rank {r} step {s} grads")
            params = {k: v for k, v in want["state"].items() if k not in _buffers(want["state"])}
            same({k: got["state"][k] for k in params}, params, f"{name} rank {r} step {s} params")
    _check_against_concat(res, name, "bnkit")


def test_no_sync_accumulate_stats_torch_model_without_broadcast(fast):
    name = "no_sync_accumulate_no_broadcast"
    res = scenario(fast, name)
    _check_against_concat(res, name, "torch")
    _twins_agree({r: {k: res[r][k] for k in ("torch", "bnkit")} for r in res}, name)


def test_no_sync_accumulate_stats_torch_model_with_broadcast(fast):
    name = "no_sync_accumulate"
    res = scenario(fast, name)
    _check_against_concat(res, name, "torch")
    _twins_agree({r: {k: res[r][k] for k in ("torch", "bnkit")} for r in res}, name)


def test_checkpoint_non_reentrant_under_ddp(fast):
    res = scenario(fast, "checkpoint")
    for rank, r in res.items():
        # bnkit with checkpointing == torch without it (buffers counted once per step) ...
        same(r["bnkit"], r["torch_plain"], f"checkpoint rank {rank} bnkit vs torch without checkpoint")
        # ... and == torch with it, except torch's documented second update of the buffers.
        for s in range(STEPS):
            same(r["bnkit"][s]["y"], r["torch"][s]["y"], f"rank {rank} step {s} y")
            same(r["bnkit"][s]["grads"], r["torch"][s]["grads"], f"rank {rank} step {s} grads")
            params = {k: v for k, v in r["torch"][s]["state"].items() if k not in _buffers(r["torch"][s]["state"])}
            same({k: r["bnkit"][s]["state"][k] for k in params}, params, f"rank {rank} step {s} params")


def test_dcp_save_load_round_trip(fast):
    res = scenario(fast, "dcp")
    for rank, r in res.items():
        same(r["saved"]["bnkit"], r["saved"]["torch"], f"dcp rank {rank} trained state")
        for key in ("torch<-bnkit", "bnkit<-torch", "bnkit<-bnkit"):  # bnkit's and torch's checkpoints interchange
            same(r["loaded"][key], r["loaded"]["torch<-torch"], f"dcp rank {rank} loaded {key}")
            same(r["eval"][key], r["eval"]["torch<-torch"], f"dcp rank {rank} eval after loading {key}")
        # Every loaded entry is a saved one: DCP keeps one rank's copy of each (replicated) tensor, parameters
        # (the same on every rank) and buffers (different on each rank here), counts included.
        loaded = r["loaded"]["bnkit<-bnkit"]
        assert int(loaded["bn1.num_batches_tracked"]) == int(loaded["bn2.num_batches_tracked"]) == 2
        for key, value in loaded.items():
            saved = [res[q]["saved"]["bnkit"][key] for q in range(WORLD)]
            assert any(np.array_equal(value, v) for v in saved), f"rank {rank}: loaded {key} is no rank's saved one"
        assert not np.array_equal(res[0]["saved"]["bnkit"]["bn1.running_mean"], res[1]["saved"]["bnkit"]["bn1.running_mean"])


@pytest.mark.parametrize("name", list(SYNC_CASES))
def test_sync_batchnorm_under_ddp_uneven_batches(fast, name):
    sizes = SYNC_CASES[name]
    res = scenario(fast, name)
    for r in range(WORLD):
        assert res[r]["types"] == ["bnkit.sync", "bnkit.sync"], res[r]["types"]
        # torch's own SyncBatchNorm cannot run under DDP on CPU (docs/differences.md): the oracle below.
        assert res[r]["torch_sync_error"] and "GPU" in res[r]["torch_sync_error"], res[r]["torch_sync_error"]
    # Oracle: torch's nn.BatchNorm model in one process on the concatenated global batch, mean loss.
    model = conv_model()
    opt = _sgd(model.parameters())
    offs = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    for s in range(2):
        opt.zero_grad(set_to_none=True)
        y = model(torch.cat([batch(8, r, s, sizes[r]) for r in range(WORLD)]))
        ((y.square() + y).sum() / sum(sizes)).backward()
        want = {"grads": _grads(model)}
        opt.step()
        want["state"] = _state(model)
        for r in range(WORLD):
            got = res[r]["train"][s]
            same(got["y"], _np(y)[offs[r]:offs[r + 1]], f"{name} rank {r} step {s} y")
            same(got["grads"], want["grads"], f"{name} rank {r} step {s} grads")
            same(got["state"], want["state"], f"{name} rank {r} step {s} state")
    with torch.no_grad():
        y_eval = _np(model.eval()(torch.cat([batch(8, r, 5, sizes[r]) for r in range(WORLD)])))
    for r in range(WORLD):
        same(res[r]["eval"], y_eval[offs[r]:offs[r + 1]], f"{name} rank {r} eval vs global oracle")
        same(res[r]["eval"], res[r]["torch_sync_eval"], f"{name} rank {r} eval vs torch.nn.SyncBatchNorm")
        same(res[r]["eval"], res[r]["torch_ddp_eval"], f"{name} rank {r} eval vs torch BN under DDP")


def test_ddp_model_with_bnkit_and_torch_layers(fast):
    res = scenario(fast, "mixed")
    for r in range(WORLD):
        assert res[r]["types"] == ["bnkit", "torch"], res[r]["types"]
    _twins_agree({r: {k: v for k, v in res[r].items() if k != "types"} for r in res}, "mixed")


def test_ddp_torch_compile(tmp_path):
    """torch.compile(DDP(model)) (about 20 s: bnkit's model compiles in ~10 s, torch's in ~2 s)."""
    res = scenario(run_pair(["compile"], {"tmp": str(tmp_path)}), "compile")
    _twins_agree(res, "compile")
