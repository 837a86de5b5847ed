"""bnkit on a CUDA GPU, against torch's own BN on the same GPU (and bnkit's CPU path for the variants).

Every test is marked ``cuda`` and skipped without a GPU (CI has none); ``make test-cuda`` runs them on a
machine that has one. What they check: parity with torch for every torch-compatible layer, in training
and eval, NCHW and channels-last, float32 / float16 / bfloat16; the variants against bnkit's CPU path;
that the ATen path (cuDNN) serves the standard case; a training step captured in a CUDA graph and
replayed; SyncBatchNorm over NCCL when two GPUs are present.
"""

from __future__ import annotations

import os

import pytest
import torch

import bnkit
from _compare import twin_layers
from bnkit import _engine_device

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine"),
]

DEV = "cuda"
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=4e-2, atol=4e-2)}


def _pair(cls_t, cls_b, c, dtype=torch.float32, **kw):
    return twin_layers(cls_t, cls_b, c, device=DEV, dtype=dtype, **kw)


@pytest.mark.parametrize("cls_t,cls_b,shape", [
    (torch.nn.BatchNorm1d, bnkit.BatchNorm1d, (16, 8)),
    (torch.nn.BatchNorm1d, bnkit.BatchNorm1d, (16, 8, 10)),
    (torch.nn.BatchNorm2d, bnkit.BatchNorm2d, (8, 8, 6, 6)),
    (torch.nn.BatchNorm3d, bnkit.BatchNorm3d, (4, 8, 3, 4, 5)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_layers_match_torch(cls_t, cls_b, shape, dtype, momentum):
    t, b = _pair(cls_t, cls_b, shape[1], dtype, momentum=momentum)
    for step in range(3):
        x = (torch.randn(shape, device=DEV) * (1 + step) + step).to(dtype)
        xt, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        yt, yb = t(xt), b(xb)
        torch.testing.assert_close(yb, yt, **TOL[dtype])
        g = torch.randn_like(yt)
        yt.backward(g)
        yb.backward(g)
        torch.testing.assert_close(xb.grad, xt.grad, **TOL[dtype])
        torch.testing.assert_close(b.weight.grad, t.weight.grad, **TOL[dtype])
    torch.testing.assert_close(b.running_mean, t.running_mean, **TOL[dtype])
    torch.testing.assert_close(b.running_var, t.running_var, **TOL[dtype])
    assert int(b.num_batches_tracked) == int(t.num_batches_tracked)
    t.eval()
    b.eval()
    x = torch.randn(shape, device=DEV).to(dtype)
    torch.testing.assert_close(b(x), t(x), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_channels_last(dtype):
    t, b = _pair(torch.nn.BatchNorm2d, bnkit.BatchNorm2d, 16, dtype)
    x = torch.randn(8, 16, 7, 7, device=DEV).to(dtype).contiguous(memory_format=torch.channels_last)
    xt, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    yt, yb = t(xt), b(xb)
    torch.testing.assert_close(yb, yt, **TOL[dtype])
    assert yb.is_contiguous(memory_format=torch.channels_last)
    yt.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(xb.grad, xt.grad, **TOL[dtype])


def test_standard_case_takes_the_aten_path(monkeypatch):
    calls = []
    real = _engine_device.call
    monkeypatch.setattr(_engine_device, "call", lambda *a, **k: calls.append(1) or real(*a, **k))
    b = bnkit.BatchNorm2d(4).to(DEV)
    b(torch.randn(4, 4, 3, 3, device=DEV))
    b.eval()
    b(torch.randn(4, 4, 3, 3, device=DEV))
    assert calls == [1, 1]


@pytest.mark.parametrize("make", [
    lambda: bnkit.BatchNorm2d(4, share_affine="all"),
    lambda: bnkit.BatchNorm2d(4, convention="keras"),
    lambda: bnkit.BatchNorm(4, axis=-1),
    lambda: bnkit.GhostBatchNorm2d(4, virtual_batch_size=4),
    lambda: bnkit.BatchRenorm2d(4),
    lambda: bnkit.SharedBatchNorm(4, sites=1),
    lambda: bnkit.FrozenBatchNorm2d(4),
], ids=["share-all", "keras", "axis-last", "ghost", "renorm", "shared", "frozen"])
def test_variants_match_cpu(make):
    """The same layer on the GPU and on the CPU: outputs, gradients and buffers agree."""
    torch.manual_seed(3)
    cpu = make()
    gpu = make().to(DEV)
    gpu.load_state_dict(cpu.state_dict())
    for _ in range(2):
        x = torch.randn(8, 4, 5, 5) * 2 + 1
        if isinstance(cpu, bnkit.BatchNorm) and cpu.axis == -1:
            x = x.permute(0, 2, 3, 1).contiguous()
        xc, xg = x.clone().requires_grad_(), x.to(DEV).requires_grad_()
        yc, yg = cpu(xc), gpu(xg)
        torch.testing.assert_close(yg.cpu(), yc, rtol=1e-4, atol=1e-4)
        yc.square().sum().backward()
        yg.square().sum().backward()
        torch.testing.assert_close(xg.grad.cpu(), xc.grad, rtol=1e-3, atol=1e-3)
    for k, v in cpu.state_dict().items():
        torch.testing.assert_close(gpu.state_dict()[k].cpu(), v, rtol=1e-4, atol=1e-4, msg=k)


def test_nonfinite_skip_without_host_sync():
    b = bnkit.BatchNorm2d(3).to(DEV)
    x = torch.randn(4, 3, 2, 2, device=DEV)
    x[0, 0, 0, 0] = float("nan")
    b(x)
    assert torch.equal(b.running_var.cpu(), torch.ones(3)) and int(b.num_batches_tracked) == 0


def test_cuda_graph_captures_a_training_step():
    """A whole training step (forward, backward, SGD) captured once and replayed equals eager steps."""
    torch.manual_seed(0)

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), bnkit.BatchNorm2d(8), torch.nn.ReLU(),
                                   torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10)).to(DEV)

    xs = [torch.randn(16, 3, 8, 8, device=DEV) for _ in range(4)]
    ys = [torch.randint(0, 10, (16,), device=DEV) for _ in range(4)]
    eager = model()
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    for x, y in zip(xs, ys):
        opt_e.zero_grad(set_to_none=False)
        torch.nn.functional.cross_entropy(eager(x), y).backward()
        opt_e.step()

    graphed = model()
    opt_g = torch.optim.SGD(graphed.parameters(), lr=0.1)
    static_x, static_y = xs[0].clone(), ys[0].clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as the CUDA-graphs docs require
        snapshot = {k: v.clone() for k, v in graphed.state_dict().items()}
        for _ in range(2):
            opt_g.zero_grad(set_to_none=False)
            torch.nn.functional.cross_entropy(graphed(static_x), static_y).backward()
        graphed.load_state_dict(snapshot)
    torch.cuda.current_stream().wait_stream(stream)
    opt_g.zero_grad(set_to_none=False)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = torch.nn.functional.cross_entropy(graphed(static_x), static_y)
        loss.backward()
        opt_g.step()
    # the capture itself ran nothing: replay the four steps
    graphed.load_state_dict(snapshot)
    for x, y in zip(xs, ys):
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
    torch.cuda.synchronize()
    for (k, a), b in zip(eager.state_dict().items(), graphed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=k)


def _nccl_worker(rank, world, port, results):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    torch.manual_seed(0)
    x = torch.randn(8 * world, 4, 3, 3) * 3 + 1
    layer = bnkit.SyncBatchNorm(4).cuda()
    part = x[rank * 8:(rank + 1) * 8].cuda().requires_grad_()
    y = layer(part)
    y.square().sum().backward()
    results.put((rank, y.detach().cpu(), part.grad.cpu(), layer.running_var.cpu()))
    dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="SyncBN over NCCL needs two GPUs")
def test_sync_batchnorm_over_nccl():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_nccl_worker, args=(r, 2, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict((r, rest) for r, *rest in (results.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(60)
    torch.manual_seed(0)
    x = (torch.randn(16, 4, 3, 3) * 3 + 1).requires_grad_()
    oracle = torch.nn.BatchNorm2d(4)
    y = oracle(x)
    y.square().sum().backward()
    for r in range(2):
        torch.testing.assert_close(got[r][0], y.detach()[r * 8:(r + 1) * 8], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[r][1], x.grad[r * 8:(r + 1) * 8], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(got[r][2], oracle.running_var, rtol=1e-4, atol=1e-4)
