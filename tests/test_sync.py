"""SyncBatchNorm in one process: no process group means plain BatchNorm; conversion both ways."""

from __future__ import annotations

import copy
import io
import pickle
from collections import OrderedDict
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

import bnkit
from bnkit.sync import SyncBatchNorm, convert_sync_batchnorm, sync_payload_bytes


@pytest.fixture(autouse=True)
def _portable_backend():
    # The oracle and the layer run on the same portable kernels (no compiler started by these tests).
    with bnkit.kernels.use_backend("torch"):
        yield


def _pair(**kwargs):
    torch.manual_seed(0)
    ref = bnkit.BatchNorm(6, **kwargs)
    sync = SyncBatchNorm(6, **kwargs)
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(0.5, 1.5)
    sync.load_state_dict(ref.state_dict())
    return ref, sync


@pytest.mark.parametrize(
    "kwargs,shape",
    [
        ({}, (5, 6, 3)),
        ({"axis": -1, "momentum": None}, (4, 3, 6)),
        ({"share_affine": "weight", "dtype": torch.float64}, (3, 6, 2, 2)),
        ({"track_running_stats": False}, (7, 6)),
    ],
)
def test_without_process_group_equals_batchnorm(kwargs, shape):
    assert not dist.is_initialized()
    ref, sync = _pair(**kwargs)
    dtype = kwargs.get("dtype", torch.float32)
    for step in range(2):
        x = (torch.randn(shape, dtype=dtype) * 2 + step).requires_grad_(True)
        gy = torch.randn(shape, dtype=dtype)
        x2 = x.detach().clone().requires_grad_(True)
        y_ref, y = ref(x), sync(x2)
        (y_ref * gy).sum().backward()
        (y * gy).sum().backward()
        assert torch.equal(y, y_ref)
        assert torch.equal(x2.grad, x.grad)
        for (n, a), (_, b) in zip(ref.named_parameters(), sync.named_parameters()):
            assert torch.equal(a.grad, b.grad), n
    for (n, a), (_, b) in zip(ref.state_dict().items(), sync.state_dict().items()):
        assert torch.equal(a, b), n
    ref.eval()
    sync.eval()
    x = torch.randn(shape, dtype=dtype)
    assert torch.equal(sync(x), ref(x))


def test_world_of_one_process_does_not_communicate(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1, timeout=timedelta(seconds=10)
    )
    try:
        ref, sync = _pair()
        x = torch.randn(8, 6, 2)
        assert torch.equal(sync(x), ref(x))
        assert torch.equal(sync.running_var, ref.running_var)
    finally:
        dist.destroy_process_group()


def test_same_state_dict_and_arguments_as_batchnorm():
    ref = bnkit.BatchNorm(4, eps=1e-3, momentum=0.2, axis=-1, share_affine="all", nonfinite="raise")
    sync = SyncBatchNorm(4, eps=1e-3, momentum=0.2, axis=-1, share_affine="all", nonfinite="raise")
    assert list(sync.state_dict()) == list(ref.state_dict())
    assert [p.shape for p in sync.parameters()] == [p.shape for p in ref.parameters()]
    assert sync.process_group is None and isinstance(sync, bnkit.BatchNorm)
    assert "share_affine='all'" in repr(sync)


def _model():
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, 4, 3),
            bn=nn.BatchNorm2d(4, momentum=0.3),
            block=nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, affine=False)),
            bk=bnkit.BatchNorm(5, axis=-1, share_affine="weight", nonfinite="raise"),
            bk3=bnkit.BatchNorm3d(2, track_running_stats=False),
            inorm=nn.InstanceNorm2d(4),
        )
    )


def test_convert_keeps_parameters_buffers_flags_and_names():
    model = _model()
    model.bn.running_mean.uniform_()
    model.block[1].num_batches_tracked.fill_(7)
    model.block.eval()
    model.bn.weight.requires_grad_(False)
    before = {n: t for n, t in model.state_dict(keep_vars=True).items()}
    before_keys = list(before)
    out = convert_sync_batchnorm(model)
    assert out is model
    for name in ("bn", "bk", "bk3"):
        assert type(getattr(out, name)) is SyncBatchNorm, name
    assert type(out.block[1]) is SyncBatchNorm
    assert type(out.inorm) is nn.InstanceNorm2d
    after = out.state_dict(keep_vars=True)
    assert list(after) == before_keys
    for k in before_keys:
        assert after[k] is before[k], f"{k} is not the same tensor after conversion"
    assert out.bn.momentum == 0.3 and out.bn._expected_dims == (4,)
    assert out.block[1].training is False and out.bn.training is True
    assert out.block[1].affine is False and out.block[1].weight is None
    assert out.bk.axis == -1 and out.bk.share_affine == "weight" and out.bk.nonfinite == "raise"
    assert out.bk3.track_running_stats is False and out.bk3.running_mean is None
    assert out.bn.weight.requires_grad is False
    assert out.bn.layer_name == "bn" and out.block[1].layer_name == "block.1"
    assert "SyncBatchNorm(4) at 'bn'" in out.bn._describe()
    with pytest.raises(ValueError, match="expected 4D input"):
        out.bn(torch.randn(2, 4, 3))  # the converted layer keeps BatchNorm2d's input check

    back = convert_sync_batchnorm(out, revert=True)
    assert type(back.bn) is nn.BatchNorm2d and type(back.block[1]) is nn.BatchNorm1d
    assert type(back.bk) is bnkit.BatchNorm and back.bk.share_affine == "weight" and back.bk.axis == -1
    assert type(back.bk3) is bnkit.BatchNorm3d
    assert back.block[1].training is False
    reverted = back.state_dict(keep_vars=True)
    assert list(reverted) == before_keys
    for k in before_keys:
        assert reverted[k] is before[k], k


def test_converted_model_computes_the_same_without_process_group():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    ref = copy.deepcopy(model)
    sync = convert_sync_batchnorm(copy.deepcopy(model))
    x = torch.randn(5, 3, 6, 6)
    torch.testing.assert_close(sync(x), ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sync[1].running_var, ref[1].running_var, atol=1e-6, rtol=1e-6)


def test_convert_top_level_layer_and_torch_syncbatchnorm():
    bn = nn.SyncBatchNorm(3)
    out = convert_sync_batchnorm(bn)
    assert type(out) is SyncBatchNorm and out.weight is bn.weight and out._expected_dims is None
    assert type(convert_sync_batchnorm(out, revert=True)) is nn.SyncBatchNorm
    direct = SyncBatchNorm(3)
    assert type(convert_sync_batchnorm(direct, revert=True)) is bnkit.BatchNorm
    assert convert_sync_batchnorm(direct) is direct


def test_convert_leaves_other_batchnorm_subclasses_alone():
    class Variant(bnkit.BatchNorm):
        pass

    m = nn.Sequential(Variant(3))
    assert type(convert_sync_batchnorm(m)[0]) is Variant


def test_revert_to_torch_refuses_what_torch_cannot_express():
    out = convert_sync_batchnorm(nn.BatchNorm1d(3))
    out.share_affine = "all"
    with pytest.raises(ValueError, match="cannot become BatchNorm1d"):
        convert_sync_batchnorm(out, revert=True)


def test_copies_and_pickles_forget_checked_groups():
    layer = SyncBatchNorm(3)
    layer._checked_groups.add(12345)
    assert copy.deepcopy(layer)._checked_groups == set()
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=False)._checked_groups == set()
    assert pickle.loads(pickle.dumps(layer))._checked_groups == set()
    assert layer._checked_groups == {12345}


def test_payload_is_o_of_channels():
    b = sync_payload_bytes(64, 4)
    assert b == {"forward_send": 8 * 131, "forward_gathered": 4 * 8 * 131, "backward_allreduce": 8 * 128}


@pytest.mark.parametrize("dtype,shape", [(torch.float64, (6, 5, 7)), (torch.float32, (3, 4, 10)), (torch.float64, (0, 3, 2))])
def test_synchronized_path_on_a_world_of_one_matches_torch(backend, tmp_path, dtype, shape):
    """The autograd function itself (forced through its collectives), per kernel backend, vs torch's BN."""
    from bnkit.sync import _Comm, _SyncBatchNormFunction

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1, timeout=timedelta(seconds=10)
    )
    try:
        torch.manual_seed(3)
        # a large offset in float64; float32 data at such an offset carries only ~3 digits of its spread
        scale, offset = (0.1, 1e3) if dtype == torch.float64 else (2.0, 10.0)
        x = (torch.randn(shape, dtype=dtype) * scale + offset).requires_grad_(True)
        w = (torch.rand(shape[1], dtype=dtype) + 0.5).requires_grad_(True)
        b = torch.randn(shape[1], dtype=dtype).requires_grad_(True)
        gy = torch.randn(shape, dtype=dtype)
        comm = _Comm(dist.group.WORLD, 1, "test", 0)
        y, mean, var, count = _SyncBatchNormFunction.apply(x, w, b, 1e-5, comm)
        (y * gy).sum().backward()
        assert int(count) == shape[0] * shape[2]
        if x.numel() == 0:
            assert y.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))
            return
        xr, wr, br = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
        yr = nn.functional.batch_norm(xr, None, None, wr, br, training=True, eps=1e-5)
        (yr * gy).sum().backward()
        tol = 1e-9 if dtype == torch.float64 else 1e-5
        for got, want in ((y, yr), (x.grad, xr.grad), (w.grad, wr.grad), (b.grad, br.grad)):
            torch.testing.assert_close(got.detach(), want.detach(), atol=tol, rtol=tol)
    finally:
        dist.destroy_process_group()


def test_example_script_runs_in_a_single_process(monkeypatch, capsys):
    import runpy
    from pathlib import Path

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "sync_torchrun.py"), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "step 4" in out and "behaved as BatchNorm" in out
