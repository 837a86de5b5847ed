"""Two-rank CPU DDP fits under PyTorch Lightning, for tests/test_lightning.py (run as a script).

``python tests/_lightning_ddp.py OUT`` runs two fits with ``strategy="ddp_fork"``
(the ranks are forked from this process: no second interpreter start-up):
``synced`` with ``plugins=[BnkitSyncBatchNorm()], sync_batchnorm=True`` and
``local`` without synchronization. DDP's buffer broadcast is off, so equal
statistics on the ranks can only come from the synchronization. Each rank
writes ``OUT/<fit>-rank<r>.pt`` (layer types during and after the fit, the
batches it saw, its final state_dict); ``OUT/init.pt`` holds the data and the
initial weights for the single-process oracle.
"""

from __future__ import annotations

import os
import sys
import warnings

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, Dataset

import bnkit
from bnkit.integrations.lightning import BnkitSyncBatchNorm

N, BATCH, STEPS, LR = 24, 4, 3, 0.1


def make_net() -> nn.Module:
    # A bnkit layer (cumulative average) on the data and a torch layer after a conv: both get synchronized.
    return nn.Sequential(
        bnkit.BatchNorm2d(3, momentum=None), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 4 * 4, 2),
    )


class Data(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        # Different scales per sample: the ranks' local statistics differ clearly.
        self.x = torch.randn(N, 3, 6, 6, generator=g) * torch.linspace(0.5, 3.0, N).view(N, 1, 1, 1) + 0.5
        self.y = torch.randn(N, 2, generator=g)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


class Module(pl.LightningModule):
    def __init__(self, record: dict) -> None:
        super().__init__()
        self.net = make_net()
        self.record = record

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        self.record["seen"].append(idx.tolist())
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)

    def train_dataloader(self):
        return DataLoader(Data(), batch_size=BATCH, shuffle=False)


class Recorder(pl.Callback):
    def __init__(self, out: str, name: str) -> None:
        self.out, self.name = out, name

    def on_train_start(self, trainer, pl_module) -> None:
        pl_module.record["types_during"] = [type(m).__name__ for m in pl_module.net]

    def on_fit_end(self, trainer, pl_module) -> None:  # runs after the strategy's teardown (revert)
        rec = pl_module.record
        rec["types_after"] = [type(m).__module__ + "." + type(m).__name__ for m in pl_module.net]
        rec["world_size"] = trainer.world_size
        rec["state"] = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}
        torch.save(rec, os.path.join(self.out, f"{self.name}-rank{trainer.global_rank}.pt"))


def fit(out: str, name: str, synced: bool) -> None:
    pl.seed_everything(0, verbose=False)
    module = Module({"seen": []})
    if synced:
        torch.save({"x": Data().x, "y": Data().y, "init": module.net.state_dict()}, os.path.join(out, "init.pt"))
    os.environ.pop("MASTER_PORT", None)  # a fresh free port for each fit
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(start_method="fork", broadcast_buffers=False, process_group_backend="gloo"),
        plugins=[BnkitSyncBatchNorm()] if synced else None,
        sync_batchnorm=synced,
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[Recorder(out, name)],
    )
    trainer.fit(module)


if __name__ == "__main__":
    torch.set_num_threads(1)  # one intra-op thread in the parent: the ranks are forked from it
    warnings.filterwarnings("ignore")
    out = sys.argv[1]
    fit(out, "synced", True)
    fit(out, "local", False)
