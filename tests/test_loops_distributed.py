"""Distributed recalibration and sync_running_stats across real processes (gloo on localhost).

One 2-rank and one 3-rank group run side by side, each running every
scenario in sequence; the ranks hold uneven numbers of batches (the 3-rank
group has an empty rank). Oracle: single-process ``bnkit.recalibrate`` on the
union of all ranks' batches (float64), and hand-computed averages.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_mod
import time
import traceback
from datetime import timedelta

import numpy as np
import pytest
import torch
from torch import nn

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(150)]

BATCHES = {2: [3, 1], 3: [2, 0, 3]}  # batches per rank: uneven, and an empty rank
ROWS = [5, 7, 4]  # rows of the batches, cycled


def make_model():
    import bnkit

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 5, dtype=torch.float64), bnkit.BatchNorm1d(5, dtype=torch.float64), nn.ReLU(),
        nn.Linear(5, 3, dtype=torch.float64), nn.BatchNorm1d(3, dtype=torch.float64),
        nn.Unflatten(1, (1, 3)), bnkit.BatchNorm(3, axis=-1, dtype=torch.float64),
    )


def rank_batches(world, rank):
    """The batches of one rank (deterministic: the parent rebuilds every rank's data for the oracle)."""
    g = torch.Generator().manual_seed(100 * world + rank)
    return [torch.randn(ROWS[(rank + i) % 3], 4, generator=g, dtype=torch.float64) * (1 + rank) + rank
            for i in range(BATCHES[world][rank])]


def all_batches(world):
    return [b for r in range(world) for b in rank_batches(world, r)]


def stats_of(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


BN_NAMES = ("1", "4", "6")


def values_per_channel(batches):
    return sum(b.shape[0] for b in batches)  # every BN here sees one value per sample and channel


# =========================================================================== scenarios (workers)
def _sc_recalibrate(rank, world, estimator):
    import bnkit

    model = make_model()
    bnkit.recalibrate(model, rank_batches(world, rank), estimator=estimator)  # default group
    return stats_of(model)


def _sc_too_few(rank, world, _):
    import bnkit

    model = make_model()
    before = stats_of(model)
    data = rank_batches(world, rank)
    try:
        # every rank asks for what it has, except the last, which asks for one more
        k = len(data) + (rank == world - 1)
        bnkit.recalibrate(model, data, num_batches=k or None)  # the empty rank: None (all of nothing)
    except Exception as e:  # noqa: BLE001 - the result is the exception
        after = stats_of(model)
        return {"error": type(e).__name__, "message": str(e),
                "unchanged": all(np.array_equal(before[k], after[k]) for k in before)}
    return {"error": None}


def _sc_local_then_sync(rank, world, _):
    import warnings

    import bnkit

    model = make_model()
    data = rank_batches(world, rank)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the empty rank: "data yielded no batch"
        bnkit.recalibrate(model, data, process_group=False)
    local = stats_of(model)
    n = values_per_channel(data)
    bnkit.sync_running_stats(model, counts={name: n for name in BN_NAMES})
    return {"local": local, "synced": stats_of(model)}


def _sc_average(rank, world, _):
    import bnkit

    model = make_model()
    with torch.no_grad():
        for i, name in enumerate(BN_NAMES):
            m = model.get_submodule(name)
            m.running_mean.fill_(rank + i)
            m.running_var.fill_(2.0 ** rank)
            m.num_batches_tracked.fill_(10 * rank + i)
    bnkit.sync_running_stats(model)
    return stats_of(model)


def _sc_swa(rank, world, _):
    from torch.optim.swa_utils import AveragedModel

    import bnkit

    model = make_model()
    swa = AveragedModel(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    swa.update_parameters(model)  # the average of the two weight sets
    bnkit.recalibrate(swa, rank_batches(world, rank))
    return stats_of(swa.module)


SCENARIOS = {
    "recalibrate_exact": (_sc_recalibrate, "exact"),
    "recalibrate_paper": (_sc_recalibrate, "paper"),
    "too_few": (_sc_too_few, None),
    "local_then_sync": (_sc_local_then_sync, None),
    "average": (_sc_average, None),
    "swa": (_sc_swa, None),
}


def _worker(rank, world, store_path, q):
    os.environ["BNKIT_NO_BUILD"] = "1"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        for name, (fn, arg) in SCENARIOS.items():
            try:
                q.put((world, rank, name, "ok", fn(rank, world, arg)))
            except Exception:  # noqa: BLE001 - reported to the parent
                q.put((world, rank, name, "exception", traceback.format_exc()))
    except Exception:  # noqa: BLE001
        q.put((world, rank, "__init__", "exception", traceback.format_exc()))
    q.put((world, rank, "__done__", "ok", None))
    q.close()
    q.join_thread()
    os._exit(0)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loops")
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs, out, waiting = [], {2: {}, 3: {}}, set()
    try:
        for world in (2, 3):
            store = tmp / f"store_{world}_{time.time_ns()}"
            for r in range(world):
                procs.append(ctx.Process(target=_worker, args=(r, world, str(store), q), daemon=True))
                waiting.add((world, r))
        for p in procs:
            p.start()
        end = time.monotonic() + 120
        while waiting and time.monotonic() < end:
            try:
                world, rank, name, status, payload = q.get(timeout=1.0)
            except queue_mod.Empty:
                if not any(p.is_alive() for p in procs) and q.empty():
                    break
                continue
            if name == "__done__":
                waiting.discard((world, rank))
                continue
            out[world].setdefault(name, {})[rank] = payload if status == "ok" else {"__exception__": payload}
        assert not waiting, f"(world, rank) {sorted(waiting)} did not finish"
        return out
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        q.close()


def scenario(results, world, name):
    res = results[world]
    assert "__init__" not in res, res["__init__"]
    per_rank = res[name]
    for rank, r in per_rank.items():
        if isinstance(r, dict) and "__exception__" in r:
            raise AssertionError(f"world {world} rank {rank} {name!r}:\n{r['__exception__']}")
    assert sorted(per_rank) == list(range(world))
    return per_rank


def oracle(world, estimator="exact", model=None):
    import bnkit

    model = make_model() if model is None else model
    bnkit.recalibrate(model, all_batches(world), estimator=estimator)
    return stats_of(model)


def assert_identical_and_close(per_rank, expected, tol=1e-12):
    first = per_rank[0]
    for rank, got in per_rank.items():
        for k in expected:
            assert np.array_equal(got[k], first[k]), f"rank {rank} differs from rank 0 at {k}"
    for k, v in expected.items():
        np.testing.assert_allclose(first[k], v, rtol=tol, atol=tol, err_msg=k)


# =========================================================================== tests
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("estimator", ["exact", "paper"])
def test_distributed_recalibrate_equals_the_union_of_all_ranks_data(results, world, estimator):
    per_rank = scenario(results, world, f"recalibrate_{estimator}")
    expected = oracle(world, estimator)
    assert_identical_and_close(per_rank, expected)
    # the check can fail: each rank's own data gives other statistics
    import bnkit

    local = make_model()
    bnkit.recalibrate(local, rank_batches(world, 0), estimator=estimator)
    assert not np.allclose(stats_of(local)["1.running_mean"], expected["1.running_mean"])


@pytest.mark.parametrize("world", [2, 3])
def test_too_few_batches_on_one_rank_stops_every_rank_with_nothing_changed(results, world):
    per_rank = scenario(results, world, "too_few")
    for rank, r in per_rank.items():
        assert r["error"] is not None and r["unchanged"], (rank, r)
        if rank == world - 1:
            assert r["error"] == "NotEnoughBatchesError" and "yielded only" in r["message"]
        else:
            assert r["error"] == "RuntimeError" and f"rank(s) [{world - 1}] failed" in r["message"]


@pytest.mark.parametrize("world", [2, 3])
def test_local_recalibrate_then_exact_sync_equals_the_union(results, world):
    per_rank = scenario(results, world, "local_then_sync")
    expected = oracle(world)
    assert_identical_and_close({r: v["synced"] for r, v in per_rank.items()}, expected)
    assert not np.allclose(per_rank[0]["local"]["1.running_var"], expected["1.running_var"])


@pytest.mark.parametrize("world", [2, 3])
def test_sync_without_counts_averages_and_takes_the_largest_count(results, world):
    per_rank = scenario(results, world, "average")
    for i, name in enumerate(BN_NAMES):
        mean = np.mean([r + i for r in range(world)])
        var = np.mean([2.0 ** r for r in range(world)])
        expected = {f"{name}.running_mean": np.full(per_rank[0][f"{name}.running_mean"].shape, mean),
                    f"{name}.running_var": np.full(per_rank[0][f"{name}.running_var"].shape, var),
                    f"{name}.num_batches_tracked": np.array(10 * (world - 1) + i)}
        assert_identical_and_close(per_rank, expected, tol=0)


@pytest.mark.parametrize("world", [2, 3])
def test_recalibrating_an_averaged_model_copy(results, world):
    from torch.optim.swa_utils import AveragedModel

    per_rank = scenario(results, world, "swa")
    model = make_model()
    swa = AveragedModel(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    swa.update_parameters(model)
    assert_identical_and_close(per_rank, oracle(world, model=swa.module))
