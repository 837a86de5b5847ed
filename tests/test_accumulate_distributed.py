"""accumulate_stats with bnkit.SyncBatchNorm and DDP's no_sync() on 2- and 3-rank gloo groups.

Oracle: torch's BatchNorm1d run once, in the parent, on the concatenation of
every rank's micro-batches (the layer's input, rebuilt from the same
weights), and the same forwards without the block (outputs).
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_mod
import time
import traceback
from datetime import timedelta

import pytest
import torch
from torch import nn

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(150)]

SIZES = {0: [5, 3, 6], 1: [4, 7, 2], 2: [2, 6, 3]}  # uneven micro-batches; the same number on every rank
D = torch.float64


def make_model():
    import bnkit

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5, dtype=D), bnkit.SyncBatchNorm(5, dtype=D), nn.ReLU(),
                         nn.Linear(5, 3, dtype=D), bnkit.BatchNorm1d(3, momentum=None, dtype=D))


def micro_batches(rank):
    g = torch.Generator().manual_seed(10 + rank)
    return [torch.randn(n, 4, generator=g, dtype=D) * (1 + rank) + rank for n in SIZES[rank]]


def _scenario(rank):
    import bnkit

    model = make_model()
    plain = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    parts = micro_batches(rank)
    same_outputs = True
    with bnkit.accumulate_stats(ddp):
        for i, x in enumerate(parts):
            with ddp.no_sync() if i < len(parts) - 1 else torch.enable_grad():
                y = ddp(x)
                y.square().sum().backward()
            same_outputs &= torch.equal(y.detach(), plain(x).detach())  # normalized per micro-batch as without
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    # numpy, not tensors: a tensor sent through the queue would live in this process's shared memory.
    out = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    return out | {"grads": grads.numpy().copy(), "same_outputs": bool(same_outputs)}


def _worker(rank, world, store_path, q):
    os.environ["BNKIT_NO_BUILD"] = "1"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        q.put((rank, "ok", _scenario(rank)))
    except Exception:  # noqa: BLE001 - reported to the parent
        q.put((rank, "exception", traceback.format_exc()))
    q.close()
    q.join_thread()
    os._exit(0)


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def world(request):
    return request.param


@pytest.fixture(scope="module")
def results(tmp_path_factory, world):
    WORLD = world
    store = tmp_path_factory.mktemp("accumulate") / f"store_{time.time_ns()}"
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, WORLD, str(store), q), daemon=True) for r in range(WORLD)]
    out = {}
    try:
        for p in procs:
            p.start()
        end = time.monotonic() + 120
        while len(out) < WORLD and time.monotonic() < end:
            try:
                rank, status, payload = q.get(timeout=1.0)
            except queue_mod.Empty:
                if not any(p.is_alive() for p in procs) and q.empty():
                    break
                continue
            assert status == "ok", payload
            out[rank] = payload
        assert len(out) == WORLD, f"ranks {sorted(set(range(WORLD)) - set(out))} did not finish"
        return out
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        q.close()


def test_sync_bn_one_update_from_every_rank_and_micro_batch(results, world):
    WORLD = world
    model = make_model()
    with torch.no_grad():
        seen = torch.cat([model[0](x) for r in range(WORLD) for x in micro_batches(r)])
    ref = nn.BatchNorm1d(5, dtype=D)
    ref(seen)  # one forward over the whole global step
    for r in range(WORLD):
        for k in ("running_mean", "running_var"):
            torch.testing.assert_close(torch.from_numpy(results[r][f"1.{k}"]), getattr(ref, k), rtol=1e-12, atol=1e-12)
        assert int(results[r]["1.num_batches_tracked"]) == 1
        assert int(results[r]["4.num_batches_tracked"]) == 1  # the local layer: one step too
        assert results[r]["same_outputs"]
    for k in ("1.running_mean", "1.running_var", "grads"):
        for r in range(1, WORLD):  # identical on every rank (grads: DDP's all-reduce)
            assert (results[0][k] == results[r][k]).all(), k
