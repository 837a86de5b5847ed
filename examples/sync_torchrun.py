"""Data-parallel training with bnkit's SyncBatchNorm on CPU (gloo).

Run with::

    torchrun --nproc_per_node=2 examples/sync_torchrun.py

(``python examples/sync_torchrun.py`` runs the same code in one process,
where SyncBatchNorm is plain BatchNorm.) Each rank gets a batch of a
*different* size; the BN statistics are those of the global batch, and the
running statistics end up identical on every rank.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import bnkit


def main() -> None:
    torch.set_num_threads(1)
    distributed = "RANK" in os.environ  # set by torchrun
    if distributed:
        # A dead or stalled rank makes the others raise after this timeout instead of hanging.
        dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1

    torch.manual_seed(0)  # the same initial model on every rank
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    model = bnkit.convert_sync_batchnorm(model)  # every BN layer -> bnkit.SyncBatchNorm
    net = DDP(model) if distributed else model
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)

    gen = torch.Generator().manual_seed(1000 + rank)
    per_rank_batch = 8 + 4 * rank  # unequal batches are fine
    for step in range(5):
        x = torch.randn(per_rank_batch, 3, 16, 16, generator=gen)
        target = torch.randint(0, 10, (per_rank_batch,), generator=gen)
        loss = nn.functional.cross_entropy(net(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"rank {rank}/{world} step {step} batch {per_rank_batch} loss {loss.item():.4f}", flush=True)

    bn = model[1]
    if distributed:
        gathered = [torch.empty_like(bn.running_mean) for _ in range(world)]
        dist.all_gather(gathered, bn.running_mean)
        same = all(torch.equal(g, gathered[0]) for g in gathered)
        if rank == 0:
            print(f"running statistics identical on all {world} ranks: {same}")
        dist.destroy_process_group()
    else:
        print("single process: SyncBatchNorm behaved as BatchNorm")


if __name__ == "__main__":
    main()
