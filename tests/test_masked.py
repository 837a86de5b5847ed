"""Masked BN (``layer(x, mask)``, ``functional.batch_norm(..., mask=)``) against its oracles.

Oracles: ``torch.nn.BatchNorm1d`` on the packed valid rows ``x[mask]``, the
float64 NumPy reference on the same rows, ``gradcheck``/``gradgradcheck`` in
float64, and hand-derived values for the padded entries (normalized with the
valid entries' statistics; ``dx = dy * weight / sqrt(var + eps)``). A 2-rank
gloo group checks SyncBatchNorm against single-process BN on the union of the
ranks' valid rows.
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
from hypothesis import given, settings
from hypothesis import strategies as st

import bnkit
from bnkit import kernels, reference
from bnkit.functional import batch_norm, batch_norm_core
from bnkit.variants import BatchRenorm, GhostBatchNorm, SharedBatchNorm

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layout(kind: str, n: int, c: int, seed: int = 0):
    """``(x, mask, axis, to_rows)``: an input, its mask and the map from a tensor like x to its (positions, C) rows."""
    g = _gen(seed)
    if kind == "nlc":  # (N, L, C), axis=-1
        x = torch.randn(n, 7, c, generator=g, dtype=F64) * 2 + 3
        mask = torch.rand(n, 7, generator=g) > 0.35
        return x, mask, -1, lambda t: t
    if kind == "ncl":  # (N, C, L), axis=1
        x = torch.randn(n, c, 6, generator=g, dtype=F64) * 2 + 3
        mask = torch.rand(n, 6, generator=g) > 0.35
        return x, mask, 1, lambda t: t.transpose(1, 2)
    if kind == "nchw_cl":  # (N, C, H, W) in channels_last memory, axis=1
        x = (torch.randn(n, c, 3, 4, generator=g, dtype=F64) * 2 + 3).contiguous(memory_format=torch.channels_last)
        mask = torch.rand(n, 3, 4, generator=g) > 0.35
        return x, mask, 1, lambda t: t.permute(0, 2, 3, 1)
    raise ValueError(kind)


def _rows(t: torch.Tensor, to_rows, mask: torch.Tensor) -> torch.Tensor:
    return to_rows(t)[mask]


def _pair(c: int, seed: int = 1, momentum=0.1, **kw):
    g = _gen(seed)
    ours = bnkit.BatchNorm(c, momentum=momentum, dtype=F64, **kw)
    ref = torch.nn.BatchNorm1d(c, momentum=momentum, dtype=F64)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(c, generator=g, dtype=F64) + 0.5)
        ours.bias.copy_(torch.randn(c, generator=g, dtype=F64))
        ref.weight.copy_(ours.weight)
        ref.bias.copy_(ours.bias)
    return ours, ref


def _assert_close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# --------------------------------------------------------------------------- the oracle
@pytest.mark.parametrize("kind", ["nlc", "ncl", "nchw_cl"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_matches_torch_on_packed_rows(backend, kind, momentum):
    x, mask, axis, to_rows = _layout(kind, 5, 3)
    ours, ref = _pair(3, momentum=momentum, axis=axis)
    for step in range(2):
        xs = (x * (1 + step)).detach().requires_grad_()
        xr = _rows(xs.detach(), to_rows, mask).clone().requires_grad_()
        gy = torch.randn(xs.shape, generator=_gen(10 + step), dtype=F64)
        y = ours(xs, mask)
        yr = ref(xr)
        _assert_close(_rows(y, to_rows, mask), yr)
        y.backward(gy)
        yr.backward(_rows(gy, to_rows, mask))
        _assert_close(_rows(xs.grad, to_rows, mask), xr.grad)
    _assert_close(ours.weight.grad, ref.weight.grad)
    _assert_close(ours.bias.grad, ref.bias.grad)
    _assert_close(ours.running_mean, ref.running_mean)
    _assert_close(ours.running_var, ref.running_var)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 2
    if kind == "nchw_cl":
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_matches_float64_reference(backend):
    x, mask, axis, to_rows = _layout("nlc", 6, 4, seed=3)
    w = torch.rand(4, generator=_gen(4), dtype=F64) + 0.5
    b = torch.randn(4, generator=_gen(5), dtype=F64)
    y = batch_norm_core(x, None, None, w, b, True, axis=axis, mask=mask)
    rows = _rows(x, to_rows, mask).numpy()
    y_ref, mean, var = reference.forward_train(rows, w.numpy(), b.numpy(), 1e-5, axis=1)
    np.testing.assert_allclose(_rows(y, to_rows, mask).numpy(), y_ref, rtol=1e-12, atol=1e-12)
    # Padded entries: the same statistics, by hand.
    pad = to_rows(x)[~mask].numpy()
    expected_pad = (pad - mean) / np.sqrt(var + 1e-5) * w.numpy() + b.numpy()
    np.testing.assert_allclose(to_rows(y)[~mask].numpy(), expected_pad, rtol=1e-12, atol=1e-12)


def test_float32_and_halves_agree_with_float64(backend):
    x64, mask, axis, to_rows = _layout("nlc", 8, 5, seed=7)
    y64 = batch_norm_core(x64, None, None, None, None, True, axis=axis, mask=mask)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)):
        y = batch_norm_core(x64.to(dtype), None, None, None, None, True, axis=axis, mask=mask)
        assert y.dtype == dtype
        torch.testing.assert_close(y.to(F64), y64, rtol=tol, atol=tol)


# --------------------------------------------------------------------------- padding is inert
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), poison=st.sampled_from([0.0, 1e6, float("nan"), float("inf")]))
def test_padding_never_reaches_valid_results(seed, poison):
    """Whatever the padding holds (NaN, Inf, huge) and whatever its output gradient, valid results are the same."""
    x, mask, axis, to_rows = _layout("nlc", 4, 3, seed=seed)
    if mask.sum() < 2:
        return
    gy = torch.randn(x.shape, generator=_gen(seed + 1), dtype=F64)
    results = []
    for variant in range(2):
        ours, _ = _pair(3, axis=axis)
        xs = x.clone()
        g = gy.clone()
        if variant:
            xs[~mask] = poison
            g[~mask] = 123.0
        xs.requires_grad_()
        y = ours(xs, mask)
        y.backward(g)
        results.append((y[mask].detach(), xs.grad[mask], ours.weight.grad, ours.bias.grad, ours.running_mean.clone(),
                        ours.running_var.clone()))
    for a, b in zip(*results):
        _assert_close(a, b, tol=1e-12)


def test_padded_entries_gradient_is_local(backend):
    x, mask, axis, to_rows = _layout("ncl", 5, 3, seed=11)
    ours, _ = _pair(3, axis=axis)
    xs = x.clone().requires_grad_()
    y = ours(xs, mask)
    gy = torch.randn(x.shape, generator=_gen(12), dtype=F64)
    y.backward(gy)
    rows = _rows(x, to_rows, mask)
    var = rows.var(0, unbiased=False)
    slope = ours.weight.detach() / torch.sqrt(var + ours.eps)
    _assert_close(to_rows(xs.grad)[~mask], to_rows(gy)[~mask] * slope)


@pytest.mark.parametrize("backend_name", ["torch", "cpp"])
def test_gradcheck(backend_name):
    if backend_name == "cpp" and not kernels.cpp_available():
        pytest.skip("no C++ extension")
    x, mask, axis, to_rows = _layout("ncl", 3, 2, seed=13)
    w = (torch.rand(2, generator=_gen(14), dtype=F64) + 0.5).requires_grad_()
    b = torch.randn(2, generator=_gen(15), dtype=F64).requires_grad_()
    xs = x.clone().requires_grad_()

    def valid_outputs(xx, ww, bb):  # the valid entries are a true function of x, w and b
        return _rows(batch_norm_core(xx, None, None, ww, bb, True, axis=axis, mask=mask), to_rows, mask)

    def all_outputs(xx, ww, bb):
        return batch_norm_core(xx, None, None, ww, bb, True, axis=axis, mask=mask)

    with kernels.use_backend(backend_name):
        assert torch.autograd.gradcheck(valid_outputs, (xs, w, b))
        assert torch.autograd.gradgradcheck(valid_outputs, (xs, w, b))
        # Padded entries hold the statistics constant: their Jacobian with respect to their own input only.
        jac = torch.autograd.functional.jacobian(lambda xx: all_outputs(xx, w, b), xs)
        pad = ~mask.unsqueeze(1).expand_as(x)
        assert torch.all(jac[pad][:, ~pad] == 0)


# --------------------------------------------------------------------------- state rules
def test_eval_ignores_mask(backend):
    x, mask, axis, _ = _layout("nlc", 4, 3)
    ours, _ = _pair(3, axis=axis)
    ours(x, mask)
    ours.eval()
    _assert_close(ours(x, mask), ours(x), tol=0)


def test_without_running_stats_eval_uses_masked_batch_statistics():
    x, mask, axis, to_rows = _layout("ncl", 5, 3, seed=6)
    bn = bnkit.BatchNorm1d(3, track_running_stats=False, affine=False, dtype=F64).eval()
    y = bn(x, mask)
    _assert_close(_rows(y, to_rows, mask), torch.nn.functional.batch_norm(_rows(x, to_rows, mask), None, None,
                                                                         training=True))


def test_all_padding_batch_is_an_empty_batch(backend):
    x, mask, axis, _ = _layout("nlc", 4, 3)
    ours, ref = _pair(3, axis=axis)
    ours(x, mask)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    xs = x.clone().requires_grad_()
    y = ours(xs, torch.zeros_like(mask))
    ref(torch.empty(0, 3, dtype=F64))  # torch counts an empty batch and changes nothing else
    assert int(ours.num_batches_tracked) == int(before["num_batches_tracked"]) + 1
    assert int(ref.num_batches_tracked) == 1
    _assert_close(ours.running_mean, before["running_mean"], tol=0)
    _assert_close(ours.running_var, before["running_var"], tol=0)
    _assert_close(y, ours.bias.detach().expand_as(y), tol=0)
    y.sum().backward()
    assert torch.all(xs.grad == 0)
    for p in (ours.weight, ours.bias):  # no gradient reaches them (None: not even a zero one)
        assert p.grad is None or torch.all(p.grad == 0)


def test_one_valid_entry_raises_and_changes_nothing(backend):
    x, mask, axis, _ = _layout("nlc", 4, 3)
    ours, _ = _pair(3, axis=axis)
    one = torch.zeros_like(mask)
    one[0, 0] = True
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ours(x, one)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (lambda m: m[:, :-1], ValueError, "shape"),
        (lambda m: m.unsqueeze(-1), ValueError, "shape"),
        (lambda m: m.float(), TypeError, "torch.bool"),
        (lambda m: m.tolist(), TypeError, "bool torch.Tensor"),
        (lambda m: m.to("meta"), RuntimeError, "device"),
    ],
)
def test_bad_mask_raises_before_any_change(bad, error, match):
    x, mask, axis, _ = _layout("nlc", 4, 3)
    layers = [bnkit.BatchNorm(3, axis=axis, dtype=F64), BatchRenorm(3, axis=axis, dtype=F64),
              GhostBatchNorm(3, 2, axis=axis, dtype=F64), SharedBatchNorm(3, 2, axis=axis, dtype=F64),
              bnkit.SyncBatchNorm(3, axis=axis, dtype=F64)]
    for layer in layers:
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        kwargs = {"site": 1} if isinstance(layer, SharedBatchNorm) else {}
        with pytest.raises(error, match=match):
            layer(x, mask=bad(mask), **kwargs)
        for k, v in layer.state_dict().items():
            assert torch.equal(v, before[k]), (type(layer).__name__, k)
    with pytest.raises(error, match=match):
        batch_norm(x.transpose(1, 2), None, None, training=True, mask=bad(mask))


def test_tiny_batch_running_policy_with_one_valid_entry():
    x, mask, axis, _ = _layout("nlc", 4, 3)
    ours = bnkit.BatchNorm(3, axis=axis, dtype=F64, tiny_batch="running")
    ours(x, mask)
    one = torch.zeros_like(mask)
    one[1, 2] = True
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="one valid entry"):
        y = ours(x, one)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k])
    ours.eval()
    _assert_close(y, ours(x), tol=0)


# --------------------------------------------------------------------------- functional and variants
def test_functional_batch_norm_matches_torch_on_packed_rows(backend):
    x, mask, axis, to_rows = _layout("ncl", 5, 3, seed=21)
    rm, rv = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    rm_t, rv_t = rm.clone(), rv.clone()
    y = batch_norm(x, rm, rv, training=True, momentum=0.2, mask=mask)
    yr = torch.nn.functional.batch_norm(_rows(x, to_rows, mask), rm_t, rv_t, training=True, momentum=0.2)
    _assert_close(_rows(y, to_rows, mask), yr)
    _assert_close(rm, rm_t)
    _assert_close(rv, rv_t)
    _assert_close(batch_norm(x, rm, rv, mask=mask), batch_norm(x, rm, rv), tol=0)  # eval ignores it


def test_batch_renorm_matches_renorm_on_packed_rows(backend):
    x, mask, axis, to_rows = _layout("nlc", 6, 3, seed=22)
    ours = BatchRenorm(3, axis=axis, dtype=F64, schedule="fixed", r_max=1.5, d_max=0.5)
    packed = BatchRenorm(3, dtype=F64, schedule="fixed", r_max=1.5, d_max=0.5)
    for step in range(3):
        xs = x * (1 + step) + step
        y = ours(xs, mask)
        yr = packed(_rows(xs, to_rows, mask))
        _assert_close(_rows(y, to_rows, mask), yr)
    _assert_close(ours.running_mean, packed.running_mean)
    _assert_close(ours.running_var, packed.running_var)


def test_ghost_batch_norm_per_virtual_batch(backend):
    x, mask, axis, to_rows = _layout("nlc", 7, 3, seed=23)
    ours = GhostBatchNorm(3, 3, axis=axis, dtype=F64)
    ref = torch.nn.BatchNorm1d(3, dtype=F64)
    y = ours(x, mask)
    for lo in range(0, 7, 3):  # each virtual batch: BN over its own valid rows
        part = slice(lo, lo + 3)
        rows = _rows(x[part], to_rows, mask[part])
        _assert_close(_rows(y[part], to_rows, mask[part]), torch.nn.functional.batch_norm(rows, None, None, training=True))
    ref(_rows(x, to_rows, mask))  # the running update: the merged statistics of all valid rows
    _assert_close(ours.running_mean, ref.running_mean)
    _assert_close(ours.running_var, ref.running_var)


def test_shared_batch_norm_per_site(backend):
    x, mask, axis, to_rows = _layout("nlc", 5, 3, seed=24)
    ours = SharedBatchNorm(3, 2, axis=axis, dtype=F64)
    ref = torch.nn.BatchNorm1d(3, dtype=F64)
    y = ours(x, site=1, mask=mask)
    yr = ref(_rows(x, to_rows, mask))
    _assert_close(_rows(y, to_rows, mask), yr)
    _assert_close(ours.running_mean[1], ref.running_mean)
    assert ours.num_batches_tracked.tolist() == [0, 1]
    _assert_close(ours.running_mean[0], torch.zeros(3, dtype=F64), tol=0)


def test_sync_batch_norm_without_group_is_batch_norm():
    x, mask, axis, _ = _layout("nlc", 5, 3, seed=25)
    sync = bnkit.SyncBatchNorm(3, axis=axis, dtype=F64)
    plain = bnkit.BatchNorm(3, axis=axis, dtype=F64)
    _assert_close(sync(x, mask), plain(x, mask), tol=0)
    _assert_close(sync.running_var, plain.running_var, tol=0)


def test_frozen_layers_check_and_ignore_the_mask():
    x, mask, axis, _ = _layout("nlc", 5, 3, seed=26)
    bn = bnkit.BatchNorm(3, axis=axis, dtype=F64)
    bn(x, mask)
    frozen = bnkit.freeze(bn)
    _assert_close(frozen(x, mask), frozen(x), tol=0)
    with pytest.raises(ValueError, match="shape"):
        frozen(x, mask[:, 1:])


def test_cpp_kernels_and_meta():
    if not kernels.cpp_available():
        pytest.skip("no C++ extension")
    x, mask, axis, _ = _layout("ncl", 4, 3, seed=27)
    x3 = x.float()
    m2 = mask
    with kernels.use_backend("torch"):
        y_t, mean_t, var_t = kernels.masked_train_forward(x3, m2, None, None, 1e-5, int(m2.sum()))
    y, mean, var = torch.ops.bnkit.masked_train(x3, m2, None, None, 1e-5)
    torch.testing.assert_close(y, y_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean, mean_t)
    torch.testing.assert_close(var, var_t)
    meta = torch.ops.bnkit.masked_train(x3.to("meta"), m2.to("meta"), None, None, 1e-5)
    assert [t.shape for t in meta] == [x3.shape, (3,), (3,)] and meta[1].dtype == torch.float32
    dx, _, _ = torch.ops.bnkit.masked_backward(x3.to("meta"), x3.to("meta"), m2.to("meta"), mean.to("meta"),
                                               var.to("meta"), None, 1e-5)
    assert dx.shape == x3.shape


# --------------------------------------------------------------------------- SyncBN, 2 ranks (gloo)
def _sync_case():
    g = _gen(31)
    x = torch.randn(6, 5, 3, generator=g, dtype=F64) * 2 + 1  # global batch: ranks get rows 0..3 and 4..5
    mask = torch.rand(6, 5, generator=g) > 0.4
    mask[4:] = False  # rank 1: all padding in step 1
    gy = torch.randn(6, 5, 3, generator=g, dtype=F64)
    return x, mask, gy


# rows of the global batch per rank; with 3 ranks, rank 2 (rows 4-5) is all padding in step 0
SYNC_PARTS = {2: (slice(0, 4), slice(4, 6)), 3: (slice(0, 2), slice(2, 4), slice(4, 6))}


def _sync_worker(rank, world, store, q):
    os.environ["BNKIT_NO_BUILD"] = "1"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        x, mask, gy = _sync_case()
        part = SYNC_PARTS[world][rank]
        bn = bnkit.SyncBatchNorm(3, axis=-1, dtype=F64)
        out = []
        for step in range(2):
            m = mask.clone()
            if step == 1:
                m[4:, :3] = True  # rank 1 has valid rows in the second step
            xs = (x[part] * (1 + step)).clone().requires_grad_()
            y = bn(xs, m[part])
            y.backward(gy[part])
            out.append((y.detach().numpy(), xs.grad.numpy(), bn.weight.grad.numpy().copy()))
            bn.weight.grad = bn.bias.grad = None
        q.put((rank, "ok", (out, bn.running_mean.numpy(), bn.running_var.numpy(), int(bn.num_batches_tracked))))
    except Exception:  # noqa: BLE001 - reported to the parent
        q.put((rank, "exception", traceback.format_exc()))
    q.close()
    q.join_thread()
    os._exit(0)


@pytest.mark.distributed
@pytest.mark.timeout(150)
@pytest.mark.parametrize("world", [2, 3])
def test_sync_batch_norm_gloo(tmp_path, world):
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    store = tmp_path / f"store_{time.time_ns()}"
    procs = [ctx.Process(target=_sync_worker, args=(r, world, str(store), q), daemon=True) for r in range(world)]
    results = {}
    try:
        for p in procs:
            p.start()
        end = time.monotonic() + 120
        while len(results) < world and time.monotonic() < end:
            try:
                rank, status, payload = q.get(timeout=1.0)
            except queue_mod.Empty:
                if not any(p.is_alive() for p in procs):
                    break
                continue
            assert status == "ok", f"rank {rank}:\n{payload}"
            results[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert sorted(results) == list(range(world))
    # The oracle: one process, the whole global batch, the same masks.
    x, mask, gy = _sync_case()
    bn = bnkit.BatchNorm(3, axis=-1, dtype=F64)
    ref = torch.nn.BatchNorm1d(3, dtype=F64)
    for step in range(2):
        m = mask.clone()
        if step == 1:
            m[4:, :3] = True
        xs = (x * (1 + step)).clone().requires_grad_()
        y = bn(xs, m)
        y.backward(gy)
        ref(xs.detach()[m])
        for rank, part in enumerate(SYNC_PARTS[world]):
            y_r, dx_r, _ = results[rank][0][step]
            np.testing.assert_allclose(y_r, y.detach()[part].numpy(), rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(dx_r, xs.grad[part].numpy(), rtol=1e-10, atol=1e-10)
        dw = sum(results[r][0][step][2] for r in range(world))  # per-rank weight gradients sum to the global one
        np.testing.assert_allclose(dw, bn.weight.grad.numpy(), rtol=1e-10, atol=1e-10)
        bn.weight.grad = bn.bias.grad = None
    for rank in range(world):
        _, rm, rv, nbt = results[rank]
        np.testing.assert_allclose(rm, ref.running_mean.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(rv, ref.running_var.numpy(), rtol=1e-10, atol=1e-12)
        assert nbt == 2
