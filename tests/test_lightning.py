"""PyTorch Lightning's ``sync_batchnorm`` with bnkit's plugin.

Oracle: torch's BN on one process. The distributed test runs two CPU DDP
ranks under a real ``Trainer`` (tests/_lightning_ddp.py) and checks that both
ranks end with the statistics *and* weights of single-process torch BN
trained on the concatenated global batches, and that without the plugin the
ranks' statistics differ (so the comparison can fail).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _compare import assert_close
from torch import nn

import bnkit

pl = pytest.importorskip("pytorch_lightning")
from bnkit.integrations.lightning import BnkitSyncBatchNorm  # noqa: E402  (after the importorskip)

TOL = 1e-5


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        bnkit.BatchNorm2d(3),
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4, momentum=None),
        bnkit.GhostBatchNorm2d(4, virtual_batch_size=2),
        bnkit.FrozenBatchNorm2d(4),
        bnkit.SyncBatchNorm(4),  # the user's own: stays a SyncBatchNorm after revert
    )


def test_trainer_accepts_the_plugin_with_sync_batchnorm():
    plugin = BnkitSyncBatchNorm()
    trainer = pl.Trainer(accelerator="cpu", devices=1, plugins=[plugin], sync_batchnorm=True, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False)
    assert trainer._accelerator_connector._layer_sync is plugin
    # Lightning's check that this is what makes it legal: any other LayerSync is refused with sync_batchnorm=True.
    assert isinstance(plugin, pl.plugins.TorchSyncBatchNorm)


def test_apply_and_revert_keep_tensors_classes_and_outputs():
    model = _model()
    before = [type(m) for m in model]
    tensors = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    plugin = BnkitSyncBatchNorm()
    with pytest.warns(UserWarning, match=r"per-rank statistics.*\b3\b"):  # the ghost layer, by name
        synced = plugin.apply(model)
    assert [type(m) for m in synced] == [bnkit.SyncBatchNorm, nn.Conv2d, bnkit.SyncBatchNorm,
                                         bnkit.GhostBatchNorm2d, bnkit.FrozenBatchNorm2d, bnkit.SyncBatchNorm]
    for k, v in synced.state_dict(keep_vars=True).items():
        assert v is tensors[k], k  # the optimizer's references stay valid
    # One process, no process group: SyncBatchNorm is the local BN. Oracle: torch BN (momentum=None for layer 2).
    oracle = nn.Sequential(nn.BatchNorm2d(3), copy.deepcopy(model[1]), nn.BatchNorm2d(4, momentum=None))
    x = torch.randn(8, 3, 5, 5) * 2 + 1
    for _ in range(2):
        y = synced[:3](x)
        y_ref = oracle(x)
        assert_close(y, y_ref, TOL, "train output")
    for i in (0, 2):
        for k in ("running_mean", "running_var", "num_batches_tracked"):
            assert_close(getattr(synced[i], k), getattr(oracle[i], k), TOL, f"{i}.{k}")
    reverted = plugin.revert(synced)
    assert [type(m) for m in reverted] == before
    for k, v in reverted.state_dict(keep_vars=True).items():
        assert v is tensors[k], k
    reverted.eval()
    oracle.eval()
    assert_close(reverted[:3](x), oracle(x), TOL, "eval output after revert")


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_two_rank_ddp_fit_matches_single_process_torch_bn(tmp_path):
    script = Path(__file__).with_name("_lightning_ddp.py")
    src = str(Path(bnkit.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=170, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    sys.path.insert(0, str(script.parent))
    try:
        import _lightning_ddp as run
    finally:
        sys.path.pop(0)
    init = torch.load(tmp_path / "init.pt")
    ranks = [torch.load(tmp_path / f"synced-rank{r}.pt") for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["types_during"][0] == ranks[0]["types_during"][2] == "SyncBatchNorm"
    assert ranks[0]["types_after"][0] == "bnkit.layers.BatchNorm2d"  # reverted after fit, original classes
    assert ranks[0]["types_after"][2] == "torch.nn.modules.batchnorm.BatchNorm2d"
    seen = [r["seen"] for r in ranks]
    assert len(seen[0]) == len(seen[1]) == run.STEPS
    assert not {i for b in seen[0] for i in b} & {i for b in seen[1] for i in b}  # the ranks saw different samples

    # Oracle: torch BN layers, one process, the concatenated global batch of each step.
    oracle = run.make_net()
    oracle[0] = nn.BatchNorm2d(3, momentum=None)
    oracle.load_state_dict(init["init"])
    opt = torch.optim.SGD(oracle.parameters(), lr=run.LR)
    for step in range(run.STEPS):
        idx = seen[0][step] + seen[1][step]
        opt.zero_grad()
        nn.functional.mse_loss(oracle(init["x"][idx]), init["y"][idx]).backward()
        opt.step()
    expected = oracle.state_dict()
    for r, rec in enumerate(ranks):
        assert list(rec["state"]) == list(expected)
        for k, v in expected.items():
            assert_close(rec["state"][k], v, TOL, f"rank {r} {k}")
    for k, v in ranks[0]["state"].items():
        assert torch.equal(v, ranks[1]["state"][k]), k  # identical on both ranks, bit for bit

    # Control: the same fit without synchronization leaves the ranks with different statistics.
    local = [torch.load(tmp_path / f"local-rank{r}.pt")["state"] for r in (0, 1)]
    assert not torch.allclose(local[0]["0.running_var"], local[1]["0.running_var"], atol=1e-3)
    assert not torch.allclose(local[0]["2.running_mean"], local[1]["2.running_mean"], atol=1e-4)
