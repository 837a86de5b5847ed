"""SyncBatchNorm vs local BatchNorm: forward+backward time on 2 and 4 CPU processes (gloo), and bytes per layer.

    .venv/bin/python benchmarks/sync.py [--worlds 2 4] [--batch 16] [--channels 64] [--size 16] [--iters 30]

Each of ``world`` spawned processes (one thread each, gloo over localhost)
normalizes its own batch of shape ``(batch, channels, size, size)`` with
``bnkit.BatchNorm2d`` (local statistics) and with ``bnkit.SyncBatchNorm``
(global statistics), alternating the two so that machine load hits both
alike; a barrier starts every timed iteration on all ranks together. Reported:
the median fwd+bwd time per iteration (slowest rank), the ratio sync/local, and
the bytes one SyncBN layer moves per step, measured by counting the tensors
handed to ``torch.distributed`` for two batch sizes (they must be equal: the
payload is O(C), independent of the batch size). On an oversubscribed machine
(more processes than cores) the times include scheduling noise.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from datetime import timedelta

import torch


def _count_bytes(layer, shape, rank):
    """Bytes handed to torch.distributed in one fwd+bwd of ``layer`` (gathered output + all-reduced sums)."""
    import torch.distributed as dist

    calls = []
    originals = {}
    for name in ("all_gather_single", "all_gather_into_tensor", "all_reduce"):
        fn = getattr(dist, name, None)
        if fn is None:
            continue
        originals[name] = fn

        def counted(*args, _fn=fn, _name=name, **kwargs):
            t = next(a for a in args if isinstance(a, torch.Tensor))
            calls.append((_name, t.numel() * t.element_size()))
            return _fn(*args, **kwargs)

        setattr(dist, name, counted)
    try:
        x = torch.randn(shape, requires_grad=True)
        layer(x).sum().backward()
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return {
        "collectives": len(calls),
        "forward_gathered_bytes": sum(b for n, b in calls if n.startswith("all_gather")),
        "backward_allreduce_bytes": sum(b for n, b in calls if n == "all_reduce"),
    }


def _worker(rank, world, store, args, q):
    os.environ["BNKIT_NO_BUILD"] = "1"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    import torch.distributed as dist

    import bnkit

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    c = args["channels"]
    shape = (args["batch"], c, args["size"], args["size"])
    local = bnkit.BatchNorm2d(c)
    sync = bnkit.SyncBatchNorm(c)
    x = torch.randn(shape, requires_grad=True)
    gy = torch.randn(shape)

    def step(layer):
        x.grad = None
        layer(x).backward(gy)

    for _ in range(3):  # warm-up (and the one-time channel-count handshake)
        step(local)
        step(sync)
    times = {"local": [], "sync": []}
    for _ in range(args["iters"]):
        for name, layer in (("local", local), ("sync", sync)):
            dist.barrier()
            t0 = time.perf_counter()
            step(layer)
            times[name].append(time.perf_counter() - t0)
    small = _count_bytes(sync, (2, c, args["size"], args["size"]), rank)
    big = _count_bytes(sync, (4 * args["batch"], c, args["size"], args["size"]), rank)
    q.put((rank, {k: statistics.median(v) for k, v in times.items()}, small, big, bnkit.kernels.select(x)))
    q.close()
    q.join_thread()
    dist.barrier()
    dist.destroy_process_group()


def run(world: int, args: dict) -> dict:
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(r, world, store, args, q)) for r in range(world)]
        for p in procs:
            p.start()
        try:
            results = [q.get(timeout=600) for _ in range(world)]
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    local = max(r[1]["local"] for r in results)
    sync = max(r[1]["sync"] for r in results)
    small, big = results[0][2], results[0][3]
    assert small == big, f"bytes depend on the batch size: {small} vs {big}"
    return {
        "world": world,
        "per_rank_shape": [args["batch"], args["channels"], args["size"], args["size"]],
        "backend": results[0][4],
        "local_ms": local * 1e3,
        "sync_ms": sync * 1e3,
        "ratio": sync / local,
        "collectives_per_step": small["collectives"],
        "forward_gathered_bytes": small["forward_gathered_bytes"],
        "backward_allreduce_bytes": small["backward_allreduce_bytes"],
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--batch", type=int, default=16, help="per-rank batch size")
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--size", type=int, default=16, help="spatial size (H = W)")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--json", help="also write the results to this file")
    a = p.parse_args(argv)
    args = {"batch": a.batch, "channels": a.channels, "size": a.size, "iters": a.iters}
    rows = [run(w, args) for w in a.worlds]
    print(f"per-rank input {tuple(rows[0]['per_rank_shape'])}, {a.iters} iterations, median of the slowest rank, "
          f"{os.cpu_count()} CPU cores, backend {rows[0]['backend']}")
    print(f"{'procs':>5} {'local BN ms':>12} {'SyncBN ms':>10} {'ratio':>6} {'colls':>6} "
          f"{'fwd bytes (gathered)':>21} {'bwd bytes':>10}")
    for r in rows:
        print(f"{r['world']:>5} {r['local_ms']:>12.3f} {r['sync_ms']:>10.3f} {r['ratio']:>6.2f} "
              f"{r['collectives_per_step']:>6} {r['forward_gathered_bytes']:>21} {r['backward_allreduce_bytes']:>10}")
    print("bytes per layer are the same for per-rank batches of 2 and of 4x the batch: O(C), batch-independent")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
