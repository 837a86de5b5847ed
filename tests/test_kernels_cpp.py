"""The fused C++ CPU kernels (torch.ops.bnkit.*) against float64 oracles.

Oracles: float64 formulas / torch.nn.functional.batch_norm in float64 and its
autograd backward -- never the kernels themselves.  Skipped (with the reason)
when the extension cannot be built on this machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from bnkit.kernels import cpp
from _compare import assert_close

if not cpp.available():  # pragma: no cover - depends on the machine
    pytest.skip(f"the C++ extension cannot be built here: {cpp.build_error()}", allow_module_level=True)

ops = torch.ops.bnkit
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Tolerance on outputs of magnitude ~1, per input dtype (half precision: the
# rounding of the output itself).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}

# (shape, layout): every layout of the issue, plus shapes that hit each code
# path: channel-fused NCHW (C >= 2 threads), row-partial NCHW (C small),
# channels-last row blocks and several tasks, rows longer than one block, and
# channels-last rows of 128 channels or more (element-wise loops one row at a time).
CASES = [
    ((6, 4), "contiguous"),  # BatchNorm1d (N, C)
    ((5, 3, 7), "contiguous"),  # (N, C, L)
    ((4, 6, 3, 5), "contiguous"),  # NCHW
    ((4, 6, 3, 5), "channels_last"),
    ((2, 5, 2, 3, 4), "contiguous"),  # NCDHW
    ((2, 5, 2, 3, 4), "channels_last_3d"),
    ((3, 1, 5, 5), "contiguous"),  # one channel: row-partial path
    ((2, 2, 4500), "contiguous"),  # rows longer than one accumulation block
    ((40000, 3), "contiguous"),  # many rows, several tasks, row blocks
    ((9, 64, 4, 4), "channels_last"),
    ((3, 130, 3, 3), "channels_last"),  # rows of >= 128 channels: one row per iteration, odd row count
]


def make(shape, layout, dtype, seed=0, loc=0.7, scale=2.5):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + loc).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x


def view3(x: torch.Tensor) -> torch.Tensor:
    """The canonical (outer, C, inner) view of the kernel contract (no copy)."""
    C = x.shape[1]
    if x.is_contiguous():
        return x.view(x.shape[0], C, -1)
    moved = x.movedim(1, -1)
    assert moved.is_contiguous()
    return moved.view(-1, C, 1)


def param_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def params(C, dtype, affine, seed=1):
    if not affine:
        return None, None
    g = torch.Generator().manual_seed(seed)
    pd = param_dtype(dtype)
    return (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(pd), torch.randn(C, generator=g, dtype=torch.float64).to(pd)


def ref_train(x3, w, b, eps):
    """float64 oracle: (y3, mean, biased var)."""
    xd = x3.double()
    mean = xd.mean((0, 2))
    var = ((xd - mean.view(1, -1, 1)) ** 2).mean((0, 2))
    y = (xd - mean.view(1, -1, 1)) / torch.sqrt(var.view(1, -1, 1) + eps)
    if w is not None:
        y = y * w.double().view(1, -1, 1)
    if b is not None:
        y = y + b.double().view(1, -1, 1)
    return y, mean, var


# ----------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES, ids=[f"{s}-{l}" for s, l in CASES])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_train_forward_and_backward_match_float64(shape, layout, dtype, affine):
    x = make(shape, layout, dtype)
    x3 = view3(x)
    w, b = params(shape[1], dtype, affine)
    eps = 1e-5
    y3, mean, var = ops.batch_norm_train(x3, w, b, eps)
    assert y3.dtype == dtype and y3.shape == x3.shape
    assert mean.dtype == var.dtype == param_dtype(dtype)
    yr, mr, vr = ref_train(x3, w, b, eps)
    tol = TOL[dtype]
    assert_close(y3, yr, tol, "y3")
    assert_close(mean, mr, 1e-6 if dtype != torch.float64 else 1e-12, "mean")
    assert_close(var, vr, 1e-6 if dtype != torch.float64 else 1e-12, "var")

    # backward op vs autograd of float64 F.batch_norm on the original layout
    g = make(shape, layout, dtype, seed=7, loc=0.0, scale=1.0)
    dx3, dw, db = ops.batch_norm_backward(view3(g), x3, mean, var, w, eps)
    xd = x.double().requires_grad_(True)
    wd = None if w is None else w.double().requires_grad_(True)
    bd = None if b is None else b.double().requires_grad_(True)
    F.batch_norm(xd, None, None, wd, bd, True, 0.0, eps).backward(g.double())
    assert_close(dx3, view3(xd.grad.contiguous(memory_format=_fmt(x))), 4 * tol, "grad x")
    if affine:
        gw, gb = wd.grad, bd.grad
    else:  # the sums the op returns regardless: sum(g*xhat), sum(g)
        xhat, _, _ = ref_train(x3, None, None, eps)
        gw, gb = (view3(g).double() * xhat).sum((0, 2)), view3(g).double().sum((0, 2))
    n = x3.shape[0] * x3.shape[2]
    assert_close(dw, gw, 1e-10 if dtype == torch.float64 else 1e-5 * n**0.5, "grad weight")
    assert_close(db, gb, 1e-10 if dtype == torch.float64 else 1e-5 * n**0.5, "grad bias")


def _fmt(x):
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES, ids=[f"{s}-{l}" for s, l in CASES])
def test_eval_forward_and_moments(shape, layout, dtype):
    x = make(shape, layout, dtype)
    x3 = view3(x)
    C = shape[1]
    scale, shift = params(C, dtype, True, seed=3)
    y3 = ops.batch_norm_eval(x3, scale, shift)
    expected = x3.double() * scale.double().view(1, -1, 1) + shift.double().view(1, -1, 1)
    assert_close(y3, expected, TOL[dtype], "eval y3")
    rm, rv = params(C, dtype, True, seed=4)
    rv = rv.abs() + 0.1
    w, b = params(C, dtype, True, seed=5)
    y3 = ops.batch_norm_infer(x3, rm, rv, w, b, 1e-5)
    rmd, rvd, wd, bd = (t.double().view(1, -1, 1) for t in (rm, rv, w, b))
    assert_close(y3, (x3.double() - rmd) / torch.sqrt(rvd + 1e-5) * wd + bd, TOL[dtype], "infer y3")
    y3 = ops.batch_norm_infer(x3, rm, rv, None, None, 1e-5)
    assert_close(y3, (x3.double() - rmd) / torch.sqrt(rvd + 1e-5), TOL[dtype], "infer y3 (no affine)")
    mean, var = ops.moments(x3)
    assert_close(mean, x3.double().mean((0, 2)), 1e-12 if dtype == torch.float64 else 1e-6, "moments mean")
    assert_close(var, x3.double().var((0, 2), unbiased=False), 1e-12 if dtype == torch.float64 else 1e-6, "moments var")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_eval_and_train_autograd_float32(layout):
    x = make((4, 8, 3, 3), layout, torch.float32)
    x3 = view3(x)
    scale, shift = params(8, torch.float32, True)
    for create_graph in (False, True):  # fused backward op / composite double-backward path
        xs, ss, hs = (t.detach().clone().requires_grad_(True) for t in (x3, scale, shift))
        y = ops.batch_norm_eval(xs, ss, hs)
        g = torch.randn_like(y)
        gx, gs, gh = torch.autograd.grad(y, (xs, ss, hs), g, create_graph=create_graph)
        assert_close(gx, g * scale.view(1, -1, 1), 1e-6, "eval grad x")
        assert_close(gs, (g.double() * x3.double()).sum((0, 2)), 1e-5, "eval grad scale")
        assert_close(gh, g.double().sum((0, 2)), 1e-5, "eval grad shift")
        xs, ws, bs = (t.detach().clone().requires_grad_(True) for t in (x3, scale, shift))
        y, mean, var = ops.batch_norm_train(xs, ws, bs, 1e-3)
        assert not mean.requires_grad and not var.requires_grad
        gx, gw, gb = torch.autograd.grad(y, (xs, ws, bs), g, create_graph=create_graph)
        xd, wd, bd = (t.detach().double().requires_grad_(True) for t in (x3, scale, shift))
        ed = torch.autograd.grad(F.batch_norm(xd, None, None, wd, bd, True, 0.0, 1e-3), (xd, wd, bd), g.double())
        for a, e, what in zip((gx, gw, gb), ed, ("x", "weight", "bias")):
            assert_close(a, e, 1e-4, f"train grad {what} (create_graph={create_graph})")


# ------------------------------------------------------------- stability
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_stable_statistics_mean_1e3_std_0p1(layout):
    """float32 data with mean 1e3 and std 0.1: the one-read statistics keep the variance."""
    x = make((16, 8, 12, 12), layout, torch.float32, seed=5, loc=1e3, scale=0.1)
    x3 = view3(x)
    y3, mean, var = ops.batch_norm_train(x3, None, None, 1e-5)
    yr, mr, vr = ref_train(x3, None, None, 1e-5)  # float64 on the same float32 values
    assert (y3.double() - yr).abs().max().item() <= 1e-3
    assert ((var.double() - vr).abs() / vr).max().item() <= 1e-4
    m2, v2 = ops.moments(x3)
    assert ((v2.double() - vr).abs() / vr).max().item() <= 1e-4
    # and the backward is as accurate
    g = torch.randn_like(x3)
    dx, dw, db = ops.batch_norm_backward(g, x3, mean, var, None, 1e-5)
    xd = x3.double().requires_grad_(True)
    F.batch_norm(xd, None, None, None, None, True, 0.0, 1e-5).backward(g.double())
    assert_close(dx, xd.grad, 1e-3, "grad x at mean 1e3")


def test_threads_do_not_change_results_much():
    x3 = view3(make((64, 4, 30, 30), "contiguous", torch.float32))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.batch_norm_train(x3, None, None, 1e-5)
    finally:
        torch.set_num_threads(n)
    many = ops.batch_norm_train(x3, None, None, 1e-5)
    for a, b in zip(one, many):
        assert_close(a, b, 1e-5, "1 thread vs many")


def test_empty_batch():
    x3 = torch.empty(0, 3, 5)
    y3, mean, var = ops.batch_norm_train(x3, None, None, 1e-5)
    assert y3.shape == (0, 3, 5) and mean.shape == (3,)
    dx, dw, db = ops.batch_norm_backward(x3, x3, mean, var, None, 1e-5)
    assert dx.shape == (0, 3, 5) and torch.equal(db, torch.zeros(3))


# --------------------------------------------------------------- autograd
@pytest.mark.parametrize("shape", [(4, 3, 5), (7, 4, 1)], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_gradcheck_and_gradgradcheck_train(shape, affine):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).requires_grad_(True)
    if affine:
        w = (torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
        b = torch.randn(shape[1], generator=g, dtype=torch.float64).requires_grad_(True)
        inputs = (x, w, b)
        fn = lambda x, w, b: ops.batch_norm_train(x, w, b, 1e-3)[0]  # noqa: E731
    else:
        inputs = (x,)
        fn = lambda x: ops.batch_norm_train(x, None, None, 1e-3)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_gradcheck_and_gradgradcheck_eval_and_moments():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    h = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.batch_norm_eval, (x, s, h))
    assert torch.autograd.gradgradcheck(ops.batch_norm_eval, (x, s, h))
    rm = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    rv = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    infer = lambda x, m, v, w, b: ops.batch_norm_infer(x, m, v, w, b, 1e-3)  # noqa: E731
    assert torch.autograd.gradcheck(infer, (x, rm, rv, s, h))
    assert torch.autograd.gradgradcheck(infer, (x, rm, rv, s, h))
    mom = lambda x: ops.moments(x)  # noqa: E731
    assert torch.autograd.gradcheck(mom, (x,))
    assert torch.autograd.gradgradcheck(mom, (x,))


# ---------------------------------------------------------- torch.compile
def test_torch_compile_sees_opaque_ops_without_graph_breaks():
    torch._dynamo.reset()

    def fn(x3, w, b):
        y, mean, var = ops.batch_norm_train(x3, w, b, 1e-5)
        return ops.batch_norm_eval(y, w, b).relu().sum() + mean.sum() + var.sum()

    x3 = torch.randn(4, 6, 10)
    w, b = torch.rand(6) + 0.5, torch.randn(6)
    explanation = torch._dynamo.explain(fn)(x3, w, b)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    xs = [x3.clone().requires_grad_(True), x3.clone().requires_grad_(True)]
    ws = [w.clone().requires_grad_(True), w.clone().requires_grad_(True)]
    out_e = fn(xs[0], ws[0], b)
    out_c = compiled(xs[1], ws[1], b)
    assert_close(out_c, out_e, 1e-6, "compiled vs eager")
    out_e.backward()
    out_c.backward()
    assert_close(xs[1].grad, xs[0].grad, 1e-6, "compiled grad x")
    assert_close(ws[1].grad, ws[0].grad, 1e-6, "compiled grad w")


def test_fx_trace_sees_a_single_op():
    from torch.fx.experimental.proxy_tensor import make_fx

    def fn(x3):
        return ops.batch_norm_train(x3, None, None, 1e-5)[0]

    gm = make_fx(fn)(torch.randn(2, 3, 4))
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == ["bnkit.batch_norm_train.default", "<built-in function getitem>"] or targets.count(
        "bnkit.batch_norm_train.default"
    ) == 1, targets


# --------------------------------------------------------------- bad input
def test_bad_input_messages():
    with pytest.raises(RuntimeError, match="3-D view"):
        ops.batch_norm_train(torch.randn(4, 3), None, None, 1e-5)
    with pytest.raises(RuntimeError, match="one value per channel"):
        ops.batch_norm_train(torch.randn(4, 3, 2), torch.ones(4), None, 1e-5)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        ops.moments(torch.ones(4, 3, 2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="eps must be >= 0"):
        ops.batch_norm_train(torch.randn(4, 3, 2), None, None, -1.0)
    with pytest.raises(RuntimeError, match="grad_y3 has shape"):
        ops.batch_norm_backward(torch.randn(4, 3, 3), torch.randn(4, 3, 2), torch.zeros(3), torch.ones(3), None, 1e-5)


# ---------------------------------------------------- instruction sets
def test_baseline_instruction_set_matches_the_oracle():
    """The portable (no AVX) row kernels (BNKIT_CPU_ISA=default) and the channel-blocked NCHW
    schedules of the training forward and the backward (BNKIT_BLOCK_BYTES*: channel blocks of
    at most 1 MB), in a fresh process."""
    code = textwrap.dedent(
        """
        import torch
        from bnkit.kernels import cpp
        assert cpp.load()
        ops = torch.ops.bnkit
        assert ops.cpu_isa() == "default", ops.cpu_isa()
        worst = 0.0
        for shape in [(5, 6, 37), (300, 7, 1), (3, 1, 50), (4, 40, 300)]:
            x = torch.randn(shape, dtype=torch.float64) * 3 + 2
            for dt in (torch.float32, torch.bfloat16):
                x3 = x.to(dt)
                y, m, v = ops.batch_norm_train(x3, None, None, 1e-5)
                xd = x3.double()
                yr = (xd - xd.mean((0, 2), keepdim=True)) / torch.sqrt(xd.var((0, 2), unbiased=False, keepdim=True) + 1e-5)
                tol = 2e-5 if dt == torch.float32 else 1.6e-2
                worst = max(worst, (y.double() - yr).abs().max().item() / tol)
                g = torch.randn_like(x3)
                dx, dw, db = ops.batch_norm_backward(g, x3, m, v, None, 1e-5)
                xr = xd.clone().requires_grad_(True)
                torch.nn.functional.batch_norm(xr, None, None, None, None, True, 0.0, 1e-5).backward(g.double())
                worst = max(worst, (dx.double() - xr.grad).abs().max().item() / (4 * tol))
        print("WORST", worst)
        """
    )
    env = dict(os.environ, BNKIT_CPU_ISA="default", BNKIT_BLOCK_BYTES="1048576", BNKIT_BLOCK_BYTES_GRAD="1048576")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    worst = float(out.stdout.split("WORST")[-1])
    assert worst <= 1.0


def test_non_temporal_store_kernels_match_the_oracle():
    """The streaming-store paths for large outputs (BNKIT_NT_*BYTES=0: used for every size), in a
    fresh process: channels-last rows (C % 16 == 0, one 64-channel chunk or longer rows walked in
    memory order, and C = 20 which falls back), NCHW spans of
    odd lengths (unaligned heads and tails), train/eval forward and backward, mean 1e3 std 0.1;
    bfloat16 channels-last."""
    code = textwrap.dedent(
        """
        import itertools
        import torch
        from bnkit.kernels import cpp
        assert cpp.load()
        ops = torch.ops.bnkit
        worst = 0.0
        cases = [(300, 32, 1), (77, 64, 1), (41, 144, 1), (50, 20, 1), (5, 6, 37), (3, 4, 1000), (2, 3, 5)]
        # block: the NCHW backward in two passes in memory order (0), or in channel blocks
        for shape, (loc, sc), block in itertools.product(cases, ((2.0, 3.0), (1e3, 0.1)), (0, 1 << 20)):
            ops._tune("block_bytes_grad", block)
            x = torch.randn(shape, dtype=torch.float64) * sc + loc
            x3 = x.float()
            xd = x3.double()
            m_r = xd.mean((0, 2), keepdim=True)
            v_r = xd.var((0, 2), unbiased=False, keepdim=True)
            y, m, v = ops.batch_norm_train(x3, None, None, 1e-5)
            yr = (xd - m_r) / torch.sqrt(v_r + 1e-5)
            worst = max(worst, (y.double() - yr).abs().max().item() / 1e-3)
            g = torch.randn_like(x3)
            dx, dw, db = ops.batch_norm_backward(g, x3, m, v, None, 1e-5)
            xr = xd.clone().requires_grad_(True)
            torch.nn.functional.batch_norm(xr, None, None, None, None, True, 0.0, 1e-5).backward(g.double())
            worst = max(worst, (dx.double() - xr.grad).abs().max().item() / (1e-3 * xr.grad.abs().max().item()))
            a = torch.rand(shape[1]) + 0.5
            b = torch.randn(shape[1])
            ye = ops.batch_norm_eval(x3, a, b)
            yer = xd * a.double().view(1, -1, 1) + b.double().view(1, -1, 1)
            worst = max(worst, (ye.double() - yer).abs().max().item() / (2e-6 * yer.abs().max().item()))
        for shape in [(300, 32, 1), (77, 64, 1), (50, 20, 1)]:  # bfloat16 channels-last
            x3 = (torch.randn(shape, dtype=torch.float64) * 3 + 2).bfloat16()
            xd = x3.double()
            y, m, v = ops.batch_norm_train(x3, None, None, 1e-5)
            yr = (xd - xd.mean((0, 2), keepdim=True)) / torch.sqrt(xd.var((0, 2), unbiased=False, keepdim=True) + 1e-5)
            worst = max(worst, (y.double() - yr).abs().max().item() / (1e-2 * yr.abs().max().item()))
            g = torch.randn_like(x3)
            dx, dw, db = ops.batch_norm_backward(g, x3, m, v, None, 1e-5)
            xr = xd.clone().requires_grad_(True)
            torch.nn.functional.batch_norm(xr, None, None, None, None, True, 0.0, 1e-5).backward(g.double())
            worst = max(worst, (dx.double() - xr.grad).abs().max().item() / (2e-2 * xr.grad.abs().max().item()))
        print("WORST", worst)
        """
    )
    env = dict(os.environ, BNKIT_NT_BYTES="0", BNKIT_NT_GRAD_BYTES="0", BNKIT_NT_EVAL_BYTES="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    worst = float(out.stdout.split("WORST")[-1])
    assert worst <= 1.0


# ------------------------------------------------------- running statistics
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_update_running_stats_matches_torch_rule(dtype):
    x = make((6, 5, 4), "contiguous", dtype)
    rm, rv = torch.randn(5, dtype=dtype), torch.rand(5, dtype=dtype) + 0.5
    trm, trv = rm.clone(), rv.clone()
    F.batch_norm(x, trm, trv, None, None, True, 0.3, 1e-5)  # the oracle: torch's own update
    _, mean, var = ops.batch_norm_train(x, None, None, 1e-5)
    v0 = rm._version
    assert ops.update_running_stats_(rm, rv, mean, var, 0.3, 24, True)
    assert rm._version > v0
    assert_close(rm, trm, 1e-6 if dtype == torch.float32 else 1e-12, "running_mean")
    assert_close(rv, trv, 1e-6 if dtype == torch.float32 else 1e-12, "running_var")
    before = (rm.clone(), rv.clone())
    nan_var = var.clone()
    nan_var[2] = float("nan")
    assert not ops.update_running_stats_(rm, rv, mean, nan_var, 0.3, 24, True)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
    assert ops.update_running_stats_(rm, rv, mean, nan_var, 0.3, 24, False)
    assert torch.isnan(rv[2])


_BF16_ROUNDING = textwrap.dedent(
    """
    import torch
    from bnkit.kernels import cpp
    assert cpp.load()
    ops = torch.ops.bnkit
    g = torch.Generator().manual_seed(0)
    C = 48
    x = (torch.randn(4000, C, 1, generator=g) * 3).bfloat16()
    x[0, :6, 0] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-3]).bfloat16()
    a = torch.rand(C, generator=g) * 2 - 1
    b = torch.randn(C, generator=g)
    y = ops.batch_norm_eval(x, a, b)  # one multiply-add per value, then float32 -> bfloat16
    # Oracle: the multiply-add exactly (in float64), rounded once to float32, then torch's
    # round-to-nearest-even to bfloat16.
    ref = (x.double() * a.double().view(1, -1, 1) + b.double().view(1, -1, 1)).float().bfloat16()
    same = (y.view(torch.int16) == ref.view(torch.int16)) | (y.isnan() & ref.isnan())
    off = (~same).sum().item()
    ulp = ((y.float() - ref.float()).abs() / ref.float().abs().clamp_min(1e-30))[~same & ref.isfinite()]
    print("RESULT", ops.cpu_isa(), off, y.numel(), float(ulp.max()) if ulp.numel() else 0.0,
          bool(y[0, 0, 0].isnan()), float(y[0, 1, 0]), float(y[0, 2, 0]))
    """
)


@pytest.mark.parametrize("isa", ["", "avx512"], ids=["best", "no-avx512bf16"])
def test_bfloat16_outputs_round_to_nearest_even(isa):
    """Channels-last bfloat16 outputs are the float32 result rounded to nearest-even, with NaN and
    +-Inf kept: the AVX512-BF16 conversion (where the CPU has it) and the bit-operation one alike."""
    env = dict(os.environ, BNKIT_CPU_ISA=isa)
    out = subprocess.run([sys.executable, "-c", _BF16_ROUNDING], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    isa_used, off, n, worst_rel, nan_kept, pos_inf, neg_inf = out.stdout.split("RESULT")[-1].split()
    # Double rounding (float64 -> float32 -> bfloat16) may differ from the kernel's single float32
    # rounding in rare ties: at most one bfloat16 step (2^-7 relative), in a handful of values.
    assert int(off) <= int(n) // 1000, (isa_used, off)
    assert float(worst_rel) <= 2.0**-7
    assert nan_kept == "True" and float(pos_inf) in (float("inf"), float("-inf"))
    assert float(neg_inf) in (float("inf"), float("-inf"))


def test_cache_dependent_defaults_follow_the_l2_size():
    """The documented rule (cpu_config.cpp, kKnobs): with a 2 MB or larger L2 per core the NCHW
    backward is blocked in half the L2 and inference outputs stream from twice the L2; otherwise
    neither (inference outputs stream from 16 MB, or 3 MB with the AVX2 kernels and an L2 under 1 MB).
    Read in a fresh process, without the environment overrides."""
    try:  # glibc's sysconf(_SC_LEVEL2_CACHE_SIZE), which Python's os.sysconf does not name
        got = subprocess.run(["getconf", "LEVEL2_CACHE_SIZE"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("no getconf")
    l2 = max(int(got.stdout.strip() or 0), 0) if got.returncode == 0 else 0
    code = (
        "import torch; from bnkit.kernels import cpp; assert cpp.load(); t = torch.ops.bnkit._tune;"
        "print('KNOBS', t('block_bytes_grad', -1), t('nt_eval_bytes', -1), t('block_bytes', -1),"
        " torch.ops.bnkit.cpu_isa())"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BNKIT_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    *knobs, isa = out.stdout.split("KNOBS")[-1].split()
    block_grad, nt_eval, block = (int(v) for v in knobs)
    large = l2 >= 2 << 20
    assert block_grad == (l2 // 2 if large else 0)
    assert nt_eval == (2 * l2 if large else (3 << 20 if isa == "avx2" and l2 < 1 << 20 else 16 << 20))
    assert block == 0
    with pytest.raises(RuntimeError, match="unknown knob"):
        ops._tune("no_such_knob", 1)


def _meta_and_cpu_calls(dtype):
    """(name, call) for every op with a Meta kernel; call(to) runs it on inputs moved by `to`."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, 4, generator=g, dtype=torch.float64).to(dtype)
    gy = torch.randn(6, 5, 4, generator=g, dtype=torch.float64).to(dtype)
    w, b = torch.rand(5, generator=g, dtype=acc) + 0.5, torch.randn(5, generator=g, dtype=acc)
    mean, var = torch.randn(5, generator=g, dtype=acc), torch.rand(5, generator=g, dtype=acc) + 0.5
    m2 = torch.rand(6, 4, generator=g) > 0.3
    dom = torch.tensor([0, 2, 1])
    dmean, dvar = torch.randn(3, 5, generator=g, dtype=acc), torch.rand(3, 5, generator=g, dtype=acc) + 0.5
    return [
        ("batch_norm_train", lambda t: ops.batch_norm_train(t(x), t(w), t(b), 1e-5)),
        ("batch_norm_eval", lambda t: ops.batch_norm_eval(t(x), t(w), t(b))),
        ("batch_norm_infer", lambda t: ops.batch_norm_infer(t(x), t(mean), t(var), t(w), None, 1e-5)),
        ("moments", lambda t: ops.moments(t(x))),
        ("batch_norm_backward", lambda t: ops.batch_norm_backward(t(gy), t(x), t(mean), t(var), t(w), 1e-5)),
        ("batch_norm_eval_backward", lambda t: ops.batch_norm_eval_backward(t(gy), t(x), t(w))),
        ("batch_norm_backward_apply",
         lambda t: ops.batch_norm_backward_apply(t(gy), t(x), t(mean), t(var), None, t(b), t(w), 24, 1e-5)),
        ("masked_moments", lambda t: ops.masked_moments(t(x), t(m2))),
        ("masked_train", lambda t: ops.masked_train(t(x), t(m2), t(w), None, 1e-5)),
        ("masked_backward", lambda t: ops.masked_backward(t(gy), t(x), t(m2), t(mean), t(var), t(w), 1e-5)),
        ("domain_train", lambda t: ops.domain_train(t(x), t(dom), 2, 3, None, None, 1e-5)),
        ("domain_backward", lambda t: ops.domain_backward(t(gy), t(x), t(dom), 2, t(dmean), t(dvar), None, 1e-5)),
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_meta_kernels_describe_the_cpu_outputs(dtype):
    """Every op's Meta kernel (what torch.compile / torch.export trace) gives the CPU kernel's
    output shapes, dtypes and strides, for a non-contiguous input too."""
    for name, call in _meta_and_cpu_calls(dtype):
        for to_cpu in (lambda a: a, lambda a: a.transpose(0, -1).contiguous().transpose(0, -1) if a.dim() == 3 else a):
            cpu = call(to_cpu)
            meta = call(lambda a, to_cpu=to_cpu: to_cpu(a).to("meta"))
            cpu, meta = (cpu, meta) if isinstance(cpu, tuple) else ((cpu,), (meta,))
            assert len(meta) == len(cpu), name
            for c, m in zip(cpu, meta):
                assert m.device.type == "meta", name
                assert (m.shape, m.dtype, m.stride()) == (c.shape, c.dtype, c.stride()), name


def test_meta_kernels_check_the_view():
    """A Meta kernel rejects what the CPU kernel rejects for the 3-D view, with the op's name."""
    x2 = torch.randn(4, 3)
    for to in ("cpu", "meta"):
        with pytest.raises(RuntimeError, match="bnkit::batch_norm_train: expected x3 to be the 3-D view"):
            ops.batch_norm_train(x2.to(to), None, None, 1e-5)
        with pytest.raises(RuntimeError, match="bnkit::batch_norm_backward: .*3-D view"):
            ops.batch_norm_backward(x2.to(to), x2.to(to), torch.ones(3).to(to), torch.ones(3).to(to), None, 1e-5)
        with pytest.raises(RuntimeError, match="bnkit::masked_train: expected the canonical 3-D view"):
            ops.masked_train(x2.to(to), torch.ones(4, 3, dtype=torch.bool).to(to), None, None, 1e-5)
