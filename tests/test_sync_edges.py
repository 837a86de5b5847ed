"""Edges of bnkit.SyncBatchNorm and convert_sync_batchnorm, against torch's own layers and tools.

Oracles: ``torch.nn.BatchNorm1d/2d/3d`` on the concatenation of the batches of
the ranks that synchronize (outputs per rank slice, input gradients, weight and
bias gradients summed over ranks as DDP reduces them, running statistics),
``torch.nn.SyncBatchNorm`` (its single-process fallback, its input checks) and
``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (what it converts and keeps).

The multi-process part starts ONE gloo world of 3 CPU processes; every rank runs
every scenario in the same order and saves its results with ``torch.save``; the
tests read them. Every rank regenerates the global batch from a seed, so the
parent builds the same data for the oracle.
"""

from __future__ import annotations

import copy
import io
import multiprocessing
import os
import time
import traceback
import warnings
from collections import OrderedDict
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bnkit
from bnkit.sync import SyncBatchNorm, convert_sync_batchnorm
from bnkit.variants import BatchNormAct, BatchNormAct2d

WORLD = 3
GROUP_TIMEOUT_S = 20.0
F64 = dict(atol=1e-10, rtol=1e-9)


# =========================================================================== data (parent and workers)
def global_data(seed, sizes, tail, steps):
    """Per step the global input and upstream gradient (float64, batch on dim 0)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    out = []
    for s in range(steps):
        x = torch.randn((n, *tail), generator=g, dtype=torch.float64) * (1.5 + s) + 2.0 - s
        gy = torch.randn((n, *tail), generator=g, dtype=torch.float64)
        out.append((x, gy))
    return out


def params_for(seed, c):
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.rand(c, generator=g, dtype=torch.float64) + 0.5, torch.randn(c, generator=g, dtype=torch.float64)


def rank_slice(sizes, rank):
    lo = sum(sizes[:rank])
    return lo, lo + sizes[rank]


def case(name, *, sizes, tail, dtype="float64", pdtype=None, fmt="contiguous", affine=True, track=True,
         momentum=0.1, steps=2, source="sync", group="world", partial=False, x_grad=True, twice=False, seed=0):
    return dict(name=name, sizes=list(sizes), tail=tuple(tail), dtype=dtype, pdtype=pdtype or dtype, fmt=fmt,
                affine=affine, track=track, momentum=momentum, steps=steps, source=source, group=group,
                partial=partial, x_grad=x_grad, twice=twice, seed=seed)


# Members of each group: which ranks' batches one rank's statistics cover.
GROUPS = {"world": [0, 1, 2], "sub02": [0, 2]}

CASES = [
    case("nchw_channels_last_f32_batch1_empty", sizes=[3, 1, 0], tail=(4, 3, 2), dtype="float32",
         fmt="channels_last", seed=1),
    case("ncdhw_channels_last_3d_f32", sizes=[2, 1, 2], tail=(3, 2, 2, 3), dtype="float32",
         fmt="channels_last_3d", seed=2),
    case("nc_2d_f64_batch1", sizes=[4, 1, 3], tail=(5,), seed=3),
    case("ncl_3d_f64_converted", sizes=[1, 2, 1], tail=(3, 4), source="convert", seed=4),
    case("nchw_converted_channels_last_f64", sizes=[2, 0, 3], tail=(3, 2, 2), fmt="channels_last",
         source="convert", seed=5),
    case("affine_false_f64", sizes=[2, 3, 1], tail=(4, 3), affine=False, seed=6),
    case("no_running_stats_f64", sizes=[3, 0, 2], tail=(4, 3), track=False, seed=7),
    case("momentum_none_f64", sizes=[2, 2, 1], tail=(3, 2), momentum=None, steps=3, seed=8),
    case("momentum_none_empty_rank_f32", sizes=[0, 3, 2], tail=(3, 2, 2), dtype="float32", momentum=None, steps=3,
         seed=17),
    case("bf16_input_f32_params", sizes=[3, 2, 1], tail=(4, 3, 3), dtype="bfloat16", pdtype="float32", seed=9),
    case("bf16_input_bf16_params", sizes=[2, 2, 3], tail=(3, 4), dtype="bfloat16", seed=10),
    case("subgroup_0_2", sizes=[2, 3, 2], tail=(4, 3), group="sub02", seed=11),
    case("subgroup_0_2_converted", sizes=[1, 2, 3], tail=(3, 2, 2), group="sub02", source="convert", seed=12),
    case("partial_outputs", sizes=[2, 3, 1], tail=(4, 3), partial=True, seed=13),
    case("input_without_grad", sizes=[3, 1, 2], tail=(4, 3), x_grad=False, seed=14),
    case("used_twice", sizes=[2, 1, 3], tail=(3, 4), twice=True, seed=15),
    case("used_twice_momentum_none", sizes=[1, 3, 2], tail=(3, 2), twice=True, momentum=None, seed=16),
]

_FMT = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last,
        "channels_last_3d": torch.channels_last_3d}
_TORCH_CLS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _partial(y):
    """The outputs a 'partial' loss uses: channel 0 and the last position along the last axis only."""
    return y.narrow(1, 0, 1).narrow(-1, y.shape[-1] - 1, 1)


def _forward_loss(layer, x, gy, cfg):
    y = layer(x)
    out = layer(y * 0.5 + 1.0) if cfg["twice"] else y
    if cfg["partial"]:
        loss = (_partial(out) * _partial(gy)).sum()
    else:
        loss = (out * gy).sum()
    return y, out, loss


def _rec(t):
    return None if t is None else t.detach().clone()


# =========================================================================== scenarios (workers)
def _sc_exact(rank, ctx, cfg):
    dtype, pdtype = getattr(torch, cfg["dtype"]), getattr(torch, cfg["pdtype"])
    c = cfg["tail"][0]
    group = ctx["groups"][cfg["group"]]
    w, b = params_for(cfg["seed"], c)
    if cfg["source"] == "convert":
        src = _TORCH_CLS[len(cfg["tail"]) + 1](c, momentum=cfg["momentum"], affine=cfg["affine"],
                                               track_running_stats=cfg["track"], dtype=pdtype)
        layer = convert_sync_batchnorm(nn.Sequential(OrderedDict(bn=src)), process_group=group).bn
        assert type(layer) is SyncBatchNorm and layer.process_group is group
    else:
        layer = SyncBatchNorm(c, momentum=cfg["momentum"], affine=cfg["affine"], track_running_stats=cfg["track"],
                              process_group=group, dtype=pdtype)
    if cfg["affine"]:
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.bias.copy_(b)
    lo, hi = rank_slice(cfg["sizes"], rank)
    rec = {"steps": []}
    for xg, gyg in global_data(cfg["seed"], cfg["sizes"], cfg["tail"], cfg["steps"]):
        x = xg[lo:hi].to(dtype).contiguous(memory_format=_FMT[cfg["fmt"]]).requires_grad_(cfg["x_grad"])
        gy = gyg[lo:hi].to(dtype)
        y, out, loss = _forward_loss(layer, x, gy, cfg)
        loss.backward()
        fmt = _FMT[cfg["fmt"]]
        rec["steps"].append(dict(
            y=_rec(y), out=_rec(out), dx=_rec(x.grad), y_dtype=str(y.dtype),
            y_fmt=bool(y.is_contiguous(memory_format=fmt)),
            dx_fmt=None if x.grad is None else bool(x.grad.is_contiguous(memory_format=fmt)),
            dw=_rec(layer.weight.grad) if layer.weight is not None else None,
            db=_rec(layer.bias.grad) if layer.bias is not None else None,
            rm=_rec(layer.running_mean), rv=_rec(layer.running_var),
            nbt=None if layer.num_batches_tracked is None else int(layer.num_batches_tracked),
        ))
        layer.zero_grad(set_to_none=True)
    layer.eval()
    xg0 = global_data(cfg["seed"], cfg["sizes"], cfg["tail"], 1)[0][0]
    rec["eval"] = _rec(layer(xg0[lo:hi].to(dtype)))
    return rec


NONFINITE = dict(sizes=[3, 2, 2], tail=(3, 2), seed=21)


def _sc_nonfinite(rank, ctx, cfg):
    """Rank 1 has a NaN in channel 0; every policy, on every rank."""
    lo, hi = rank_slice(NONFINITE["sizes"], rank)
    x = global_data(NONFINITE["seed"], NONFINITE["sizes"], NONFINITE["tail"], 1)[0][0]
    x[sum(NONFINITE["sizes"][:1]), 0, 1] = float("nan")
    x = x[lo:hi]
    rec = {}
    for policy in ("skip", "propagate", "raise"):
        layer = SyncBatchNorm(3, dtype=torch.float64, nonfinite=policy)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                y = layer(x)
                err = None
            except Exception as e:  # noqa: BLE001 - recorded for the parent
                y, err = None, type(e).__name__
        rec[policy] = dict(
            y=_rec(y), error=err, warnings=[(w.category.__name__, str(w.message)) for w in caught],
            rm=_rec(layer.running_mean), rv=_rec(layer.running_var), nbt=int(layer.num_batches_tracked),
        )
    return rec


def _state(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}


def _sc_errors(rank, ctx, cfg):
    """Bad input on every rank: the same exception types as the local path, and the state unchanged."""
    rec = {}

    def attempt(name, layer, x):
        before = _state(layer)
        try:
            layer(x)
            err = None
        except Exception as e:  # noqa: BLE001
            err = (type(e).__name__, [k.__name__ for k in type(e).__mro__], str(e))
        after = _state(layer)
        rec[name] = dict(error=err, unchanged=all(torch.equal(before[k], after[k]) for k in before))

    attempt("float64_input_float32_layer", SyncBatchNorm(3), torch.randn(4, 3, dtype=torch.float64))
    attempt("wrong_channels", SyncBatchNorm(3), torch.randn(4, 5))
    attempt("integer_input", SyncBatchNorm(3), torch.ones(4, 3, dtype=torch.long))
    zero_eps = SyncBatchNorm(3)
    zero_eps.eps = 0.0
    attempt("eps_zero", zero_eps, torch.randn(4, 3))
    # one value per channel in the global batch: rank 0 has one sample, the others none
    attempt("global_batch_of_one", SyncBatchNorm(3), torch.randn(1 if rank == 0 else 0, 3))
    return rec


EMPTY_TAIL = (3, 2)


def _sc_all_empty(rank, ctx, cfg):
    """Every rank has an empty batch: torch counts it and leaves the statistics, weight grads are zero."""
    layer = SyncBatchNorm(3)
    x = torch.empty(0, *EMPTY_TAIL, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    return dict(shape=tuple(y.shape), rm=_rec(layer.running_mean), rv=_rec(layer.running_var),
                nbt=int(layer.num_batches_tracked), dw=_rec(layer.weight.grad), db=_rec(layer.bias.grad))


NO_BUFFERS = dict(sizes=[2, 1, 3], tail=(3, 2), seed=31)


def _sc_no_buffers(rank, ctx, cfg):
    """track_running_stats=True with both buffers set to None (torch: batch stats, the batch still counted)."""
    layer = SyncBatchNorm(3, dtype=torch.float64)
    layer.running_mean = None
    layer.running_var = None
    lo, hi = rank_slice(NO_BUFFERS["sizes"], rank)
    x = global_data(NO_BUFFERS["seed"], NO_BUFFERS["sizes"], NO_BUFFERS["tail"], 1)[0][0][lo:hi]
    try:
        y = layer(x)
        return dict(y=_rec(y), nbt=int(layer.num_batches_tracked), error=None)
    except Exception as e:  # noqa: BLE001
        return dict(y=None, nbt=int(layer.num_batches_tracked), error=f"{type(e).__name__}: {e}")


ACT = dict(sizes=[2, 1, 2], tail=(4, 3, 2), seed=41)


def _sc_act(rank, ctx, cfg):
    """bnkit's BatchNormAct2d (fusable ReLU, and a tail that is not fused) converted to SyncBatchNormAct."""
    lo, hi = rank_slice(ACT["sizes"], rank)
    xg, gyg = global_data(ACT["seed"], ACT["sizes"], ACT["tail"], 1)[0]
    rec = {}
    for name, act in (("relu", nn.ReLU()), ("silu", nn.SiLU()), ("tanh", nn.Tanh())):
        model = convert_sync_batchnorm(nn.Sequential(BatchNormAct2d(4, act=act, dtype=torch.float64)))
        x = xg[lo:hi].clone().requires_grad_(True)
        y = model(x)
        (y * gyg[lo:hi]).sum().backward()
        rec[name] = dict(cls=type(model[0]).__name__, y=_rec(y), dx=_rec(x.grad), rm=_rec(model[0].running_mean),
                         rv=_rec(model[0].running_var))
    return rec


def _sc_order(rank, ctx, cfg):
    """Two converted layers of the same width, called in another order on rank 2: every rank must raise."""
    model = convert_sync_batchnorm(nn.ModuleDict({"a": nn.BatchNorm1d(3), "b": nn.BatchNorm1d(3)}))
    order = ("b", "a") if rank == 2 else ("a", "b")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        for name in order:
            model[name](torch.randn(4, 3))
        err = None
    except RuntimeError as e:
        err = str(e)
    after = model.state_dict()
    return dict(error=err, unchanged=all(torch.equal(before[k], after[k]) for k in before))


SCENARIOS = [(c["name"], _sc_exact, c) for c in CASES] + [
    ("order", _sc_order, None),
    ("nonfinite", _sc_nonfinite, None),
    ("errors", _sc_errors, None),
    ("all_empty", _sc_all_empty, None),
    ("no_buffers", _sc_no_buffers, None),
    ("act", _sc_act, None),
]


def _worker(rank, store, out_dir):
    os.environ["BNKIT_NO_BUILD"] = "1"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    results = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=GROUP_TIMEOUT_S))
        groups = {"world": None, "sub02": dist.new_group([0, 2])}
        for name, fn, cfg in SCENARIOS:
            try:
                results[name] = ("ok", fn(rank, {"groups": groups}, cfg))
            except Exception:  # noqa: BLE001 - reported to the parent
                results[name] = ("exception", traceback.format_exc())
    except Exception:  # noqa: BLE001
        results["__init__"] = ("exception", traceback.format_exc())
    buf = io.BytesIO()
    torch.save(results, buf)
    tmp = os.path.join(out_dir, f"rank{rank}.tmp")
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, os.path.join(out_dir, f"rank{rank}.pt"))
    os._exit(0)  # no teardown (destroy_process_group could wait on a peer)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("sync_edges")
    ctx = multiprocessing.get_context("spawn")
    store = out / f"store_{time.time_ns()}"
    procs = [ctx.Process(target=_worker, args=(r, str(store), str(out)), daemon=True) for r in range(WORLD)]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + 150
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    results = {}
    for r in range(WORLD):
        path = out / f"rank{r}.pt"
        assert path.exists(), f"rank {r} wrote no results (exit code {procs[r].exitcode})"
        results[r] = torch.load(path, weights_only=False)
        assert "__init__" not in results[r], results[r]["__init__"][1]
    return results


def scenario(world, name):
    out = {}
    for r in range(WORLD):
        status, payload = world[r][name]
        if status != "ok":
            raise AssertionError(f"rank {r}, scenario {name!r} raised:\n{payload}")
        out[r] = payload
    return out


# =========================================================================== oracle (parent)
_TOLS = {torch.float64: F64, torch.float32: dict(atol=1e-5, rtol=1.3e-6),  # torch.testing's defaults
         torch.bfloat16: dict(atol=1e-5, rtol=1.6e-2)}


def _close(mine, want, where):
    """``mine`` against the oracle, in float64, within the tolerance of ``mine``'s dtype."""
    assert mine is not None, where
    torch.testing.assert_close(mine.double(), want.double(), **_TOLS[mine.dtype], equal_nan=True,
                               msg=lambda m: f"{where}: {m}")


def torch_oracle(cfg, members):
    """torch.nn.BatchNormNd over the concatenated batch of ``members``' slices; per step its tensors.

    bfloat16 cases: torch's layer in float64 on the bfloat16-rounded inputs, gradients and parameters (torch's
    own bfloat16 kernel is itself a rounded float32 computation, up to a few bfloat16 ulps off).
    """
    dtype, pdtype = getattr(torch, cfg["dtype"]), getattr(torch, cfg["pdtype"])
    work, wparams = (torch.float64, torch.float64) if dtype == torch.bfloat16 else (dtype, pdtype)
    c = cfg["tail"][0]
    ref = _TORCH_CLS[len(cfg["tail"]) + 1](c, momentum=cfg["momentum"], affine=cfg["affine"],
                                           track_running_stats=cfg["track"], dtype=wparams)
    if cfg["affine"]:
        w, b = params_for(cfg["seed"], c)
        with torch.no_grad():
            ref.weight.copy_(w.to(pdtype))
            ref.bias.copy_(b.to(pdtype))
    steps = []
    idx = torch.cat([torch.arange(*rank_slice(cfg["sizes"], r)) for r in members])
    for xg, gyg in global_data(cfg["seed"], cfg["sizes"], cfg["tail"], cfg["steps"]):
        x = xg[idx].to(dtype).to(work).requires_grad_(True)
        gy = gyg[idx].to(dtype).to(work)
        y, out, loss = _forward_loss(ref, x, gy, cfg)
        loss.backward()
        steps.append(dict(y=_rec(y), out=_rec(out), dx=_rec(x.grad),
                          dw=_rec(ref.weight.grad) if cfg["affine"] else None,
                          db=_rec(ref.bias.grad) if cfg["affine"] else None,
                          rm=_rec(ref.running_mean), rv=_rec(ref.running_var),
                          nbt=None if ref.num_batches_tracked is None else int(ref.num_batches_tracked)))
        ref.zero_grad(set_to_none=True)
    ref.eval()
    xg0 = global_data(cfg["seed"], cfg["sizes"], cfg["tail"], 1)[0][0].to(dtype).to(work)
    return steps, ref, xg0


def _members_of(cfg, rank):
    members = GROUPS[cfg["group"]]
    return members if rank in members else [rank]


def _local_positions(cfg, members, rank):
    """Where ``rank``'s slice sits in the concatenation of ``members``' slices."""
    lo = sum(cfg["sizes"][r] for r in members if r < rank)
    return lo, lo + cfg["sizes"][rank]


@pytest.mark.distributed
@pytest.mark.timeout(200)
@pytest.mark.parametrize("cfg", CASES, ids=[c["name"] for c in CASES])
def test_ranks_match_torch_batchnorm_on_the_global_batch(world, cfg):
    got = scenario(world, cfg["name"])
    dtype = getattr(torch, cfg["dtype"])
    oracles = {}
    for rank in range(WORLD):
        members = tuple(_members_of(cfg, rank))
        if members not in oracles:
            oracles[members] = torch_oracle(cfg, members)
        steps, ref, xg0 = oracles[members]
        lo, hi = _local_positions(cfg, members, rank)
        glo, ghi = rank_slice(cfg["sizes"], rank)
        for s, (mine, want) in enumerate(zip(got[rank]["steps"], steps)):
            where = f"{cfg['name']} rank {rank} step {s}"
            assert mine["y_dtype"] == str(dtype), where
            _close(mine["y"], want["y"][lo:hi], f"{where} output")
            _close(mine["out"], want["out"][lo:hi], f"{where} loss-side output")
            if cfg["x_grad"]:
                _close(mine["dx"], want["dx"][lo:hi], f"{where} input grad")
                if cfg["fmt"] != "contiguous" and hi > lo:
                    assert mine["dx_fmt"], f"{where}: the input gradient lost the {cfg['fmt']} layout (torch keeps it)"
            else:
                assert mine["dx"] is None
            if cfg["fmt"] != "contiguous" and hi > lo:
                assert mine["y_fmt"], f"{where}: the output lost the {cfg['fmt']} layout"
            for k in ("rm", "rv"):
                if want[k] is None:
                    assert mine[k] is None, where
                else:
                    assert mine[k].dtype == getattr(torch, cfg["pdtype"]), where
                    _close(mine[k], want[k], f"{where} {k}")
            assert mine["nbt"] == want["nbt"], where
        # eval: no communication; the running statistics (or, without them, this rank's own batch)
        x0 = xg0[glo:ghi]
        if cfg["track"]:
            # torch's eval formula with this rank's own buffers (checked against the oracle above; in bfloat16
            # they are rounded)
            last = got[rank]["steps"][-1]
            with torch.no_grad():
                ref.running_mean.copy_(last["rm"])
                ref.running_var.copy_(last["rv"])
            want_eval = ref(x0)
        else:
            local = _TORCH_CLS[len(cfg["tail"]) + 1](cfg["tail"][0], affine=cfg["affine"], track_running_stats=False,
                                                     dtype=x0.dtype)
            local.load_state_dict(ref.state_dict())
            want_eval = local(x0) if ghi > glo else x0
        _close(got[rank]["eval"], want_eval.detach(), f"{cfg['name']} rank {rank} eval")
    if cfg["affine"]:
        # DDP reduces the per-rank parameter gradients: their sum over a group is the group's gradient
        for members, (steps, _, _) in oracles.items():
            for s, want in enumerate(steps):
                for k in ("dw", "db"):
                    parts = [got[r]["steps"][s][k] for r in members]
                    total = sum(p.double() for p in parts).to(parts[0].dtype)
                    _close(total, want[k], f"{cfg['name']} {members} step {s} {k} summed over ranks")


def _nonfinite_oracle():
    x = global_data(NONFINITE["seed"], NONFINITE["sizes"], NONFINITE["tail"], 1)[0][0]
    x[NONFINITE["sizes"][0], 0, 1] = float("nan")
    ref = nn.BatchNorm1d(3, dtype=torch.float64)
    return ref(x).detach(), ref


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_nonfinite_on_one_rank_skip_propagate_raise(world):
    got = scenario(world, "nonfinite")
    y_want, torch_ref = _nonfinite_oracle()
    assert torch.isnan(y_want[:, 0]).all() and torch.isfinite(y_want[:, 1:]).all()
    for rank in range(WORLD):
        lo, hi = rank_slice(NONFINITE["sizes"], rank)
        skip, prop, rais = (got[rank][p] for p in ("skip", "propagate", "raise"))
        # outputs: torch's (channel 0 NaN on every rank, the other channels normalized by the global batch)
        for res in (skip, prop):
            assert res["error"] is None, (rank, res)
            torch.testing.assert_close(res["y"], y_want[lo:hi], equal_nan=True, **F64)
        # skip: buffers and count unchanged, a RuntimeWarning naming the layer
        assert torch.equal(skip["rm"], torch.zeros(3, dtype=torch.float64)), rank
        assert torch.equal(skip["rv"], torch.ones(3, dtype=torch.float64)), rank
        assert skip["nbt"] == 0, rank
        assert any(cat == "RuntimeWarning" and "SyncBatchNorm(3)" in msg for cat, msg in skip["warnings"]), skip
        # propagate: torch's buffers (non-finite in the same entries)
        assert prop["nbt"] == int(torch_ref.num_batches_tracked) == 1
        assert torch.equal(torch.isfinite(prop["rm"]), torch.isfinite(torch_ref.running_mean)), rank
        assert torch.equal(torch.isfinite(prop["rv"]), torch.isfinite(torch_ref.running_var)), rank
        fin = torch.isfinite(torch_ref.running_var)
        torch.testing.assert_close(prop["rm"][fin], torch_ref.running_mean[fin], **F64)
        torch.testing.assert_close(prop["rv"][fin], torch_ref.running_var[fin], **F64)
        # raise: FloatingPointError on every rank, nothing changed
        assert rais["error"] == "FloatingPointError", (rank, rais)
        assert torch.equal(rais["rm"], torch.zeros(3, dtype=torch.float64)) and rais["nbt"] == 0


def _err(world, name):
    return {r: res[name] for r, res in scenario(world, "errors").items()}


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_dtype_mismatch_raises_as_the_local_path_and_changes_nothing(world):
    for rank, res in _err(world, "float64_input_float32_layer").items():
        assert res["error"] is not None and res["error"][0] == "DtypeMismatchError", (rank, res)
        assert res["unchanged"], rank


@pytest.mark.distributed
@pytest.mark.timeout(200)
@pytest.mark.parametrize("name,expected", [
    ("wrong_channels", "ChannelMismatchError"),
    ("integer_input", "InputDtypeError"),
    ("eps_zero", "ValueError"),
    ("global_batch_of_one", "ValueError"),
])
def test_bad_input_raises_on_every_rank_and_changes_nothing(world, name, expected):
    for rank, res in _err(world, name).items():
        assert res["error"] is not None, (rank, name)
        assert expected in res["error"][1], (rank, res["error"])
        assert res["unchanged"], (rank, name)
    if name == "global_batch_of_one":  # torch's message
        assert all("Expected more than 1 value per channel" in res["error"][2] for res in _err(world, name).values())


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_every_rank_empty_is_counted_like_torch(world):
    ref = nn.BatchNorm1d(3)
    x = torch.empty(0, *EMPTY_TAIL, requires_grad=True)
    ref(x).sum().backward()
    for rank, res in scenario(world, "all_empty").items():
        assert res["shape"] == (0, *EMPTY_TAIL)
        assert res["nbt"] == int(ref.num_batches_tracked) == 1, rank
        assert torch.equal(res["rm"], ref.running_mean) and torch.equal(res["rv"], ref.running_var), rank
        assert torch.equal(res["dw"], torch.zeros(3)) and torch.equal(res["db"], torch.zeros(3)), rank


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_buffers_set_to_none_use_batch_statistics(world):
    x = global_data(NO_BUFFERS["seed"], NO_BUFFERS["sizes"], NO_BUFFERS["tail"], 1)[0][0]
    ref = nn.BatchNorm1d(3, dtype=torch.float64)
    ref.running_mean = None
    ref.running_var = None
    y_want = ref(x).detach()
    for rank, res in scenario(world, "no_buffers").items():
        assert res["error"] is None, (rank, res["error"])
        lo, hi = rank_slice(NO_BUFFERS["sizes"], rank)
        torch.testing.assert_close(res["y"], y_want[lo:hi], **F64)
        assert res["nbt"] == int(ref.num_batches_tracked) == 1


def _act_oracle(act):
    xg, gyg = global_data(ACT["seed"], ACT["sizes"], ACT["tail"], 1)[0]
    ref = nn.BatchNorm2d(4, dtype=torch.float64)
    x = xg.clone().requires_grad_(True)
    y = act(ref(x))
    (y * gyg).sum().backward()
    return y.detach(), x.grad, ref


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_converted_batchnormact_with_unfused_tail_is_synchronized(world):
    y_want, dx_want, ref = _act_oracle(torch.tanh)
    for rank, res in scenario(world, "act").items():
        lo, hi = rank_slice(ACT["sizes"], rank)
        r = res["tanh"]
        assert r["cls"] == "SyncBatchNormAct"
        torch.testing.assert_close(r["y"], y_want[lo:hi], **F64)
        torch.testing.assert_close(r["dx"], dx_want[lo:hi], **F64)
        torch.testing.assert_close(r["rv"], ref.running_var, **F64)


@pytest.mark.distributed
@pytest.mark.timeout(200)
@pytest.mark.parametrize("act", ["relu", "silu"])
def test_converted_batchnormact_with_fused_act_is_synchronized(world, act):
    y_want, dx_want, ref = _act_oracle(getattr(torch.nn.functional, act))
    for rank, res in scenario(world, "act").items():
        lo, hi = rank_slice(ACT["sizes"], rank)
        r = res[act]
        assert r["cls"] == "SyncBatchNormAct"
        torch.testing.assert_close(r["y"], y_want[lo:hi], **F64)
        torch.testing.assert_close(r["dx"], dx_want[lo:hi], **F64)
        torch.testing.assert_close(r["rv"], ref.running_var, **F64)


# =========================================================================== single process
@pytest.fixture
def no_process_group():
    assert not dist.is_initialized()
    yield


@pytest.mark.parametrize("shape,fmt", [((5, 3), None), ((4, 3, 6), None), ((3, 3, 4, 2), torch.channels_last),
                                       ((2, 3, 2, 3, 2), torch.channels_last_3d), ((0, 3, 4), None)])
@pytest.mark.parametrize("momentum", [0.3, None])
def test_without_process_group_equals_torch_syncbatchnorm(no_process_group, shape, fmt, momentum):
    """torch's SyncBatchNorm falls back to F.batch_norm without a process group: the same results."""
    torch.manual_seed(0)
    theirs = nn.SyncBatchNorm(3, momentum=momentum, dtype=torch.float64)
    ours = SyncBatchNorm(3, momentum=momentum, dtype=torch.float64)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-1, 1)
    ours.load_state_dict(theirs.state_dict())
    for step in range(3):
        x = torch.randn(shape, dtype=torch.float64) * (1 + step) + step
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        gy = torch.randn(shape, dtype=torch.float64)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = theirs(xa), ours(xb)
        (ya * gy).sum().backward()
        (yb * gy).sum().backward()
        torch.testing.assert_close(yb, ya, **F64)
        torch.testing.assert_close(xb.grad, xa.grad, **F64)
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **F64)
        torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, **F64)
        if fmt is not None:
            assert yb.is_contiguous(memory_format=fmt) and xb.grad.is_contiguous(memory_format=fmt)
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, **F64, msg=k)
    theirs.eval()
    ours.eval()
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), **F64)


def test_input_rank_checks_like_torch_syncbatchnorm(no_process_group):
    theirs, ours = nn.SyncBatchNorm(3), SyncBatchNorm(3)
    for layer in (theirs, ours):
        with pytest.raises(ValueError):
            layer(torch.randn(4))  # a 1-D input
        assert layer(torch.randn(4, 3)).shape == (4, 3)  # (N, C) is accepted
    with pytest.raises(ValueError, match="1-D"):
        ours(torch.randn(4))
    assert int(ours.num_batches_tracked) == 1  # the rejected call counted nothing


def test_state_dict_interchangeable_with_torch_layers():
    torch.manual_seed(0)
    ours = SyncBatchNorm(4, momentum=None)
    ours(torch.randn(6, 4, 3, 3) * 3 + 1)
    ours(torch.randn(6, 4, 3, 3))
    sd = ours.state_dict()
    for cls in (nn.SyncBatchNorm, nn.BatchNorm2d):
        theirs = cls(4, momentum=None)
        assert list(theirs.state_dict()) == list(sd)
        theirs.load_state_dict(sd)
        for k, v in sd.items():
            assert torch.equal(theirs.state_dict()[k], v), (cls, k)
        back = SyncBatchNorm(4, momentum=None)
        back.load_state_dict(theirs.state_dict())
        assert all(torch.equal(back.state_dict()[k], v) for k, v in sd.items())
        assert back.state_dict()._metadata[""]["version"] == theirs.state_dict()._metadata[""]["version"]
    # a version-1 checkpoint without num_batches_tracked keeps the count, as torch's layer does
    old = {k: v for k, v in sd.items() if k != "num_batches_tracked"}
    theirs = nn.SyncBatchNorm(4)
    theirs.num_batches_tracked.fill_(5)
    ours = SyncBatchNorm(4)
    ours.num_batches_tracked.fill_(5)
    theirs.load_state_dict(old, strict=False)
    ours.load_state_dict(old, strict=False)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


class _PlainSubclass(nn.BatchNorm2d):
    """A torch BN subclass that keeps torch's forward (torch's convert converts it)."""

    def __init__(self, c):
        super().__init__(c)
        self.note = "kept"


def _zoo():
    torch.manual_seed(0)
    lazy = nn.LazyBatchNorm2d()
    lazy(torch.randn(2, 3, 2, 2))  # initialized: it is a BatchNorm2d now
    model = nn.Sequential(OrderedDict(
        conv=nn.Conv2d(3, 3, 1),
        bn2=nn.BatchNorm2d(3, momentum=0.2),
        sub=_PlainSubclass(3),
        lazy=lazy,
        tsync=nn.SyncBatchNorm(3, eps=1e-3),
        block=nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.BatchNorm1d(5, affine=False)),
        bn3=nn.BatchNorm3d(2, track_running_stats=False),
        inorm=nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
        gnorm=nn.GroupNorm(1, 3),
        bk=bnkit.BatchNorm2d(3, nonfinite="raise"),
        renorm=bnkit.BatchRenorm2d(3),
        ghost=bnkit.GhostBatchNorm2d(3, virtual_batch_size=2),
        frozen=bnkit.FrozenBatchNorm2d(3),
    ))
    model.block.eval()
    model.sub.weight.requires_grad_(False)
    model.bn2.qconfig = "qc-marker"
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.uniform_()
                m.num_batches_tracked.fill_(3)
    return model


def test_convert_converts_at_least_what_torch_converts_and_keeps_its_state():
    theirs = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(_zoo()), process_group="PG")
    model = _zoo()
    before = model.state_dict(keep_vars=True)
    flags = {n: (m.training, getattr(m, "qconfig", None)) for n, m in model.named_modules()}
    ours = convert_sync_batchnorm(model, process_group="PG")
    torch_converted = {n for n, m in theirs.named_modules() if type(m) is nn.SyncBatchNorm}
    ours_converted = {n for n, m in ours.named_modules() if isinstance(m, SyncBatchNorm)}
    # bnkit's BatchNorm2d is a torch.nn.BatchNorm2d: torch's converter takes it too (into torch's class, its
    # nonfinite policy lost), bnkit's into bnkit's SyncBatchNorm (kept, below).
    assert torch_converted == {"bn2", "sub", "lazy", "tsync", "block.2", "bn3", "bk"}
    assert ours_converted == torch_converted
    for n in ("inorm", "gnorm", "renorm", "ghost", "frozen"):  # not BN (torch) or other semantics (bnkit variants)
        assert type(ours.get_submodule(n)) is type(_zoo().get_submodule(n)), n
    after = ours.state_dict(keep_vars=True)
    assert list(after) == list(before) == list(theirs.state_dict())
    for k in before:
        assert after[k] is before[k], k
    for n in ours_converted:
        m = ours.get_submodule(n)
        assert (m.training, getattr(m, "qconfig", None)) == flags[n], n
        assert m.process_group == "PG", n
    assert ours.bk.nonfinite == "raise" and ours.bk.expected_dims == (4,)
    for n in torch_converted:
        m, t = ours.get_submodule(n), theirs.get_submodule(n)
        assert m.training == t.training and m.process_group == t.process_group == "PG", n
        assert (m.eps, m.momentum, m.affine, m.track_running_stats) == (t.eps, t.momentum, t.affine,
                                                                           t.track_running_stats), n
        for p, q in zip(m.parameters(), t.parameters()):
            assert p.requires_grad == q.requires_grad, n
    assert ours.bn2.qconfig == "qc-marker"


def test_revert_restores_the_original_classes_and_attributes():
    model = _zoo()
    classes = {n: type(m) for n, m in model.named_modules()}
    before = model.state_dict(keep_vars=True)
    back = convert_sync_batchnorm(convert_sync_batchnorm(model), revert=True)
    for n, m in back.named_modules():
        assert type(m) is classes[n], n
    assert back.sub.note == "kept" and back.sub.weight.requires_grad is False
    assert back.block[2].training is False and back.bk.nonfinite == "raise"
    after = back.state_dict(keep_vars=True)
    assert list(after) == list(before)
    assert all(after[k] is before[k] for k in before)


def test_convert_then_train_matches_torch_without_process_group():
    torch.manual_seed(1)
    base = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16, 3), nn.BatchNorm1d(3)).double()
    theirs = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(base))
    ours = convert_sync_batchnorm(copy.deepcopy(base))
    for _ in range(2):
        x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
        ya, yb = theirs(x), ours(x)
        torch.testing.assert_close(yb, ya, **F64)
        ya.square().sum().backward()
        yb.square().sum().backward()
    for (n, p), (_, q) in zip(theirs.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, **F64, msg=n)
    for (n, a), (_, b) in zip(theirs.state_dict().items(), ours.state_dict().items()):
        torch.testing.assert_close(b, a, **F64, msg=n)


class _SubclassWithChildren(nn.BatchNorm2d):
    """Keeps torch's forward; holds a child module and an extra buffer (saved in its state_dict)."""

    def __init__(self, c):
        super().__init__(c)
        self.extra = nn.Linear(2, 2)
        self.register_buffer("hint", torch.full((c,), 7.0))


def test_convert_keeps_the_children_of_a_torch_subclass_like_torch():
    theirs = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(_SubclassWithChildren(3)))
    ours = convert_sync_batchnorm(nn.Sequential(_SubclassWithChildren(3)))
    assert {k for k in theirs.state_dict() if "extra" in k} == {"0.extra.weight", "0.extra.bias"}
    # torch's children, and (a documented improvement: docs/sync.md) the subclass's own buffer, kept in the state_dict
    assert set(ours.state_dict()) == set(theirs.state_dict()) | {"0.hint"}
    assert torch.equal(ours.state_dict()["0.hint"], torch.full((3,), 7.0))


def test_revert_of_a_subclass_loses_nothing():
    model = nn.Sequential(_SubclassWithChildren(3))
    before = model.state_dict(keep_vars=True)
    back = convert_sync_batchnorm(convert_sync_batchnorm(model), revert=True)
    assert type(back[0]) is _SubclassWithChildren
    after = back.state_dict(keep_vars=True)
    assert list(after) == list(before)
    assert all(after[k] is before[k] for k in before)


def test_failed_conversion_leaves_existing_syncbatchnorm_untouched():
    mine = SyncBatchNorm(3)
    mine.layer_name = "mine"
    model = nn.Sequential(mine, bnkit.BatchNorm1d(3, convention="keras"))
    with pytest.raises(ValueError, match="convention"):
        convert_sync_batchnorm(model, process_group="PG")
    assert model[0] is mine and type(model[1]) is bnkit.BatchNorm1d
    assert mine.process_group is None and mine.layer_name == "mine"


def test_convert_keeps_the_training_flags_of_tail_children():
    layer = BatchNormAct2d(4, act=nn.ReLU(), drop=nn.Dropout(0.5))
    layer.drop.eval()
    out = convert_sync_batchnorm(nn.Sequential(layer))[0]
    assert type(out).__name__ == "SyncBatchNormAct" and out.drop is layer.drop
    assert out.training is True and out.drop.training is False


def test_generic_batchnormact_is_converted_like_generic_batchnorm():
    assert isinstance(convert_sync_batchnorm(nn.Sequential(bnkit.BatchNorm(3)))[0], SyncBatchNorm)
    out = convert_sync_batchnorm(nn.Sequential(BatchNormAct(3, act=nn.ReLU())))[0]
    assert isinstance(out, SyncBatchNorm)


def test_refused_forward_override_changes_nothing():
    class Custom(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.BatchNorm2d(3), Custom(3))
    first = model[0]
    with pytest.raises(ValueError, match="overrides forward"):
        convert_sync_batchnorm(model)
    assert model[0] is first and type(model[1]) is Custom


_KINDS = ["t1", "t2", "t3", "tsync", "b1", "b2", "bgen"]


def _make(kind, affine, track, training):
    c = 3
    layer = {"t1": lambda: nn.BatchNorm1d(c, affine=affine, track_running_stats=track),
             "t2": lambda: nn.BatchNorm2d(c, affine=affine, track_running_stats=track),
             "t3": lambda: nn.BatchNorm3d(c, affine=affine, track_running_stats=track),
             "tsync": lambda: nn.SyncBatchNorm(c, affine=affine, track_running_stats=track),
             "b1": lambda: bnkit.BatchNorm1d(c, affine=affine, track_running_stats=track),
             "b2": lambda: bnkit.BatchNorm2d(c, affine=affine, track_running_stats=track),
             "bgen": lambda: bnkit.BatchNorm(c, affine=affine, track_running_stats=track)}[kind]()
    return layer.train(training)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_KINDS), st.booleans(), st.booleans(), st.booleans()), min_size=1,
                max_size=4))
def test_convert_and_revert_round_trip_property(layers):
    model = nn.Sequential(*[_make(*spec) for spec in layers])
    classes = [type(m) for m in model]
    before = model.state_dict(keep_vars=True)
    flags = [m.training for m in model]
    synced = convert_sync_batchnorm(model)
    assert all(type(m) is SyncBatchNorm for m in synced)
    assert [m.training for m in synced] == flags
    assert all(synced.state_dict(keep_vars=True)[k] is v for k, v in before.items())
    converted = list(synced)
    back = convert_sync_batchnorm(synced, revert=True)
    assert [type(m) for m in back] == classes
    assert [m.training for m in back] == flags
    after = back.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(after[k] is v for k, v in before.items())
    # the converted layers keep the rank checks of the classes they replace
    for m, cls in zip(converted, classes):
        dims = getattr(cls, "expected_dims", None) or {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,),
                                                        nn.BatchNorm3d: (5,)}.get(cls)
        assert m.expected_dims == dims, cls


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_layers_called_in_another_order_are_reported_on_every_rank(world):
    for rank, res in scenario(world, "order").items():
        assert res["error"] is not None and "different SyncBatchNorm layers" in res["error"], (rank, res)
        assert res["unchanged"], rank


def test_process_group_through_convert_and_revert():
    tsync = nn.SyncBatchNorm(3, process_group="G1")
    out = convert_sync_batchnorm(nn.Sequential(tsync))[0]
    assert type(out) is SyncBatchNorm and out.process_group == "G1"  # kept when no group is given
    assert convert_sync_batchnorm(nn.Sequential(nn.SyncBatchNorm(3)), process_group="G2")[0].process_group == "G2"
    back = convert_sync_batchnorm(nn.Sequential(out), revert=True)[0]
    assert type(back) is nn.SyncBatchNorm and back.process_group == "G1"
    mine = SyncBatchNorm(3, process_group="G3")
    assert convert_sync_batchnorm(mine, process_group="G4") is mine and mine.process_group == "G4"


def test_shared_layer_stays_shared_and_hooks_move():
    bn = nn.BatchNorm1d(3)
    calls = []
    bn.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    model = nn.Sequential(bn, nn.ReLU(), bn)
    out = convert_sync_batchnorm(model)
    assert out[0] is out[2] and type(out[0]) is SyncBatchNorm
    out(torch.randn(4, 3))
    assert calls == ["SyncBatchNorm", "SyncBatchNorm"]


@pytest.mark.parametrize("cls", [nn.BatchNorm2d, nn.SyncBatchNorm])
def test_torch_layer_without_bias_round_trips(cls):
    layer = cls(3, bias=False)
    before = list(nn.Sequential(layer).state_dict())
    synced = convert_sync_batchnorm(nn.Sequential(layer))
    assert synced[0].bias is None and list(synced.state_dict()) == before
    back = convert_sync_batchnorm(synced, revert=True)
    assert type(back[0]) is cls and back[0].bias is None and list(back.state_dict()) == before
