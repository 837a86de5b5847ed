"""bnkit.accelerate(): bnkit's kernels behind torch's own batch-norm operators.

The oracle is always torch itself with the acceleration off: the same module
(a deep copy) or the same F.batch_norm call on the same inputs, compared on
outputs, input/weight/bias gradients, running statistics, num_batches_tracked
and the memory format of the results; the counts op says which kernel ran.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from _compare import assert_close, input_grad_scale, output_scale
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import bnkit
from bnkit.kernels import cpp

if not cpp.available():  # pragma: no cover - depends on the machine
    pytest.skip(f"the C++ extension cannot be built here: {cpp.build_error()}", allow_module_level=True)

TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 4e-3}
CLASSES = {2: (nn.BatchNorm1d, ()), 3: (nn.BatchNorm1d, (5,)), 4: (nn.BatchNorm2d, (3, 4)), 5: (nn.BatchNorm3d, (2, 3, 2))}
FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


pytestmark = pytest.mark.usefixtures("accelerate_off")  # every test starts and ends with it off


def make(shape, dtype=torch.float32, fmt=None, seed=0, loc=0.7, scale=2.5):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + loc).to(dtype)
    return x.contiguous(memory_format=fmt) if fmt is not None else x


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed + 99)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
                    m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
    return module


def step(module, x, g, on):
    """Forward + backward under accelerated(on): (output, input grad, param grads, buffers)."""
    x1 = x.detach().requires_grad_(True)  # x's own strides (a clone would make odd layouts contiguous)
    with bnkit.accelerated(on):
        y = module(x1)
        y.backward(g)
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad(set_to_none=True)
    return y, x1.grad, grads, {n: b.clone() for n, b in module.named_buffers()}


def compare(ours, theirs, tol, what, gscale=1.0, yscale=1.0):
    (y1, gx1, pg1, b1), (y2, gx2, pg2, b2) = ours, theirs
    assert y1.dtype == y2.dtype and y1.stride() == y2.stride(), f"{what}: output {y1.dtype} {y1.stride()}"
    assert gx1.dtype == gx2.dtype and gx1.stride() == gx2.stride(), f"{what}: input grad {gx1.stride()}"
    assert_close(y1, y2, tol, f"{what} output", yscale)
    assert_close(gx1, gx2, tol, f"{what} input grad", gscale)
    assert pg1.keys() == pg2.keys() and b1.keys() == b2.keys()
    for n in pg1:
        assert pg1[n].dtype == pg2[n].dtype, f"{what} {n} grad dtype"
        assert_close(pg1[n], pg2[n], tol, f"{what} {n} grad", gscale)
    for n in b1:
        assert b1[n].dtype == b2[n].dtype, f"{what} {n} dtype"
        if n == "num_batches_tracked":
            assert int(b1[n]) == int(b2[n]), what
        else:
            assert_close(b1[n], b2[n], tol, f"{what} {n}", max(1.0, yscale if "var" not in n else yscale**2))


def counts():
    return bnkit.accelerate_counts(reset=True)


# ------------------------------------------------------------ 1. on / off
def test_on_off_returns_previous_state_and_restores_aten():
    assert not bnkit.is_accelerated()
    assert bnkit.accelerate(True) is False and bnkit.is_accelerated()
    assert bnkit.accelerate(True) is True  # idempotent
    bn = nn.BatchNorm2d(3)
    x = make((4, 3, 5, 5))
    bn(x)
    assert counts()["forward"] == 1
    assert bnkit.accelerate(False) is True and not bnkit.is_accelerated()
    bn(x)
    assert counts() == {"forward": 0, "forward_aten": 0, "backward": 0, "backward_aten": 0}  # ATen's own kernel
    assert bnkit.accelerate(False) is False


def test_context_restores_on_exit_and_on_exception_and_nests():
    x = make((4, 3, 5, 5))
    bn = nn.BatchNorm2d(3)
    with bnkit.accelerated():
        assert bnkit.is_accelerated()
        with bnkit.accelerated(False):
            assert not bnkit.is_accelerated()
            bn(x)
            assert counts()["forward"] == 0
            with bnkit.accelerated(True):
                bn(x)
                assert counts()["forward"] == 1
            assert not bnkit.is_accelerated()
        assert bnkit.is_accelerated()
        with bnkit.accelerated():
            assert bnkit.is_accelerated()
        assert bnkit.is_accelerated()  # the inner block found it on and leaves it on
    assert not bnkit.is_accelerated()
    with pytest.raises(ZeroDivisionError), bnkit.accelerated():
        _ = 1 / 0
    assert not bnkit.is_accelerated()
    bnkit.accelerate(True)
    with pytest.raises(KeyError), bnkit.accelerated(False):
        raise KeyError("x")
    assert bnkit.is_accelerated()


@pytest.mark.parametrize("bad", [1, None, "yes", torch.tensor(True)])
def test_bad_argument_is_a_type_error_and_changes_nothing(bad):
    with pytest.raises(TypeError, match="True or False"):
        bnkit.accelerate(bad)
    assert not bnkit.is_accelerated()
    bnkit.accelerate(True)
    with pytest.raises(TypeError):
        bnkit.accelerate(bad)
    assert bnkit.is_accelerated()
    with pytest.raises(TypeError), bnkit.accelerated(bad):
        pass
    assert bnkit.is_accelerated()


def test_no_override_warning_reaches_the_user():
    # torch prints its kernel-override warning once per process on stderr: check a fresh process
    code = "import bnkit, warnings; warnings.simplefilter('error'); bnkit.accelerate(); bnkit.accelerate(False)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Overriding a previously registered kernel" not in out.stderr


def test_profiler_shows_the_bnkit_kernels():
    bn = nn.BatchNorm2d(3)
    x = make((4, 3, 5, 5)).requires_grad_(True)
    with bnkit.accelerated(), torch.profiler.profile() as prof:
        bn(x).sum().backward()
    names = [e.name for e in prof.events()]
    assert "aten::native_batch_norm" in names and "bnkit::accelerated_batch_norm" in names
    assert "bnkit::accelerated_batch_norm_backward" in names


# ------------------------------------------------- 2. torch's BN classes
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rank=st.sampled_from([2, 3, 4, 5]),
    channels=st.integers(1, 5),
    batch=st.integers(2, 5),
    channels_last=st.booleans(),
    affine=st.booleans(),
    track=st.booleans(),
    momentum=st.sampled_from([0.1, None, 0.0, 1.0]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_modules_match_torch(rank, channels, batch, channels_last, affine, track, momentum, dtype, seed):
    cls, spatial = CLASSES[rank]
    shape = (batch, channels) + spatial
    fmt = FORMATS.get(rank) if channels_last else None
    half = dtype in (torch.bfloat16, torch.float16)
    # half inputs with float32 parameters (autocast-style); the model in float64 for float64
    ours = randomize(cls(channels, momentum=momentum, affine=affine, track_running_stats=track,
                         dtype=torch.float32 if half else dtype), seed)
    theirs = copy.deepcopy(ours)
    tol = TOL[dtype]
    served = affine or track or not half
    for i in range(4):  # three training steps, then eval
        if i == 3:
            ours.eval()
            theirs.eval()
        x = make(shape, dtype, fmt, seed + i)
        g = make(shape, dtype, fmt, seed + 1000 + i, loc=0.0, scale=1.0)
        counts()
        r_ours = step(ours, x, g, True)
        c = counts()
        r_theirs = step(theirs, x, g, False)
        batch_stats = i < 3 or not track
        expected_fwd = served and (batch_stats is False or x.numel() // channels > 1)
        assert c["forward"] == int(expected_fwd), c
        # the eval-mode backward (running statistics) is served too
        assert c["backward"] == int(expected_fwd), c
        gscale = input_grad_scale(x.double(), g.double(), 1e-5) if batch_stats else 1.0
        yscale = output_scale(x.double(), 1e-5) if batch_stats else 1.0
        compare(r_ours, r_theirs, tol, f"step {i}", gscale, yscale)
        if fmt is not None:
            assert r_ours[0].is_contiguous(memory_format=fmt) and r_ours[1].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last_input_with_an_odd_size_one_stride_gets_the_right_gradient(training):
    """torch 2.13's CPU backward is wrong for this input (docs/differences.md); served, it is right.

    Oracle: torch's layer (ATen, not accelerated) on the contiguous copy of the same values.
    """
    x = make((3, 5, 1, 4), torch.float64).permute(0, 3, 2, 1)  # (N, C, 1, W), strides (20, 1, 4, 4)
    assert x.is_contiguous(memory_format=torch.channels_last) and x.stride(2) != x.stride(0)
    g = make(tuple(x.shape), torch.float64, seed=1, loc=0.0, scale=1.0)
    ours = randomize(nn.BatchNorm2d(4, dtype=torch.float64)).train(training)
    truth = copy.deepcopy(ours)
    counts()
    r_ours = step(ours, x, g, True)
    c = counts()
    assert c["forward"] == 1 and c["backward"] == 1, c  # bnkit's kernels computed it
    r_truth = step(truth, x.contiguous(), g, False)
    for a, b, what in zip(r_ours[:2], r_truth[:2], ("output", "input grad")):
        assert_close(a, b, 1e-10, what)
    for n in r_truth[2]:
        assert_close(r_ours[2][n], r_truth[2][n], 1e-10, f"{n} grad")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rank=st.sampled_from([2, 3, 4, 5]),
    channels_last=st.booleans(),
    training=st.booleans(),
    stats=st.booleans(),
    weight=st.booleans(),
    bias=st.booleans(),
    momentum=st.sampled_from([0.1, 0.7]),
    eps=st.sampled_from([1e-5, 1e-3]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    grad_x=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_functional_matches_torch(rank, channels_last, training, stats, weight, bias, momentum, eps, dtype, grad_x, seed):
    if not training and not stats:
        stats = True  # F.batch_norm requires the running statistics in eval
    C = 3
    shape = (4, C) + CLASSES[rank][1]
    fmt = FORMATS.get(rank) if channels_last else None
    x = make(shape, dtype, fmt, seed)
    gy = make(shape, dtype, fmt, seed + 1, loc=0.0, scale=1.0)
    pg = torch.Generator().manual_seed(seed + 2)
    params = {
        "weight": (torch.rand(C, generator=pg, dtype=dtype) + 0.5) if weight else None,
        "bias": torch.randn(C, generator=pg, dtype=dtype) if bias else None,
    }
    rm0 = torch.randn(C, generator=pg, dtype=dtype)
    rv0 = torch.rand(C, generator=pg, dtype=dtype) + 0.5

    def run(on):
        xs = x.clone().requires_grad_(grad_x)
        ps = {k: (v.clone().requires_grad_(True) if v is not None else None) for k, v in params.items()}
        rm, rv = (rm0.clone(), rv0.clone()) if stats else (None, None)
        with bnkit.accelerated(on):
            y = F.batch_norm(xs, rm, rv, ps["weight"], ps["bias"], training, momentum, eps)
            leaves = [t for t in [xs, *ps.values()] if t is not None and t.requires_grad]
            grads = torch.autograd.grad(y, leaves, gy) if leaves else ()
        return y, grads, rm, rv

    counts()
    y1, g1, rm1, rv1 = run(True)
    c = counts()
    y2, g2, rm2, rv2 = run(False)
    assert c["forward"] == 1 and c["forward_aten"] == 0, c
    wants_grad = grad_x or weight or bias
    assert c["backward"] + c["backward_aten"] == int(wants_grad)
    assert c["backward"] == int(wants_grad), c  # the eval-mode backward too
    tol = TOL[dtype]
    gscale = input_grad_scale(x, gy, eps) if training else 1.0
    yscale = output_scale(x, eps) if training else 1.0
    assert y1.stride() == y2.stride()
    assert_close(y1, y2, tol, "output", yscale)
    assert len(g1) == len(g2)
    for a, b in zip(g1, g2):
        assert a.dtype == b.dtype and a.stride() == b.stride()
        assert_close(a, b, tol, "grad", gscale)
    if stats:
        assert_close(rm1, rm2, tol, "running_mean", yscale)
        assert_close(rv1, rv2, tol, "running_var", yscale**2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", [None, torch.channels_last], ids=["nchw", "nhwc"])
def test_half_input_with_float_params_returns_atens_contract(dtype, fmt):
    # The raw operator: save_mean/save_invstd in float32 (ATen's mixed type), the backward's mask honoured.
    C = 4
    x = make((3, C, 4, 5), dtype, fmt)
    gy = make((3, C, 4, 5), dtype, fmt, seed=1, loc=0.0, scale=1.0)
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    rm, rv = torch.zeros(C), torch.ones(C)
    outs = {}
    for on in (True, False):
        rms, rvs = rm.clone(), rv.clone()
        with bnkit.accelerated(on):
            fwd = torch.ops.aten.native_batch_norm(x, w, b, rms, rvs, True, 0.1, 1e-5)
            bwd = [torch.ops.aten.native_batch_norm_backward(gy, x, w, rms, rvs, fwd[1], fwd[2], True, 1e-5, m)
                   for m in ([True, True, True], [True, False, False], [False, True, True])]
            ev = torch.ops.aten.native_batch_norm(x, w, b, rms, rvs, False, 0.1, 1e-5)
        outs[on] = (fwd, bwd, ev, rms, rvs)
    (f1, b1, e1, rm1, rv1), (f2, b2, e2, rm2, rv2) = outs[True], outs[False]
    for a, e in zip([*f1, *e1], [*f2, *e2]):
        assert a.dtype == e.dtype and a.shape == e.shape and a.stride() == e.stride()
        assert_close(a, e, TOL[dtype], "forward", 4.0)
    for r1, r2 in zip(b1, b2):
        for a, e in zip(r1, r2):
            assert (a is None) == (e is None)
            if a is not None:
                assert a.dtype == e.dtype and a.stride() == e.stride()
                assert_close(a, e, TOL[dtype], "backward", 8.0)
    assert_close(rm1, rm2, 1e-6, "running_mean")
    assert_close(rv1, rv2, 1e-6, "running_var")


# ------------------------------------------------- 3. what goes to ATen
FALLBACKS = {
    # name: (input builder, module dtype)
    "strided view": (lambda: make((4, 3, 6, 10))[..., ::2], torch.float32),
    "permuted 4-D": (lambda: make((4, 6, 3, 5)).permute(0, 2, 3, 1), torch.float32),
    "3-D channels-last": (lambda: make((4, 7, 3)).transpose(1, 2), torch.float32),
    "bfloat16 model": (lambda: make((4, 3, 5, 5), torch.bfloat16), torch.bfloat16),
    "float16 model": (lambda: make((4, 3, 5, 5), torch.float16), torch.float16),
}


@pytest.mark.parametrize("name", list(FALLBACKS))
def test_uncovered_cases_go_to_aten_and_match(name):
    build, mdtype = FALLBACKS[name]
    x = build()
    C = x.shape[1]
    cls = nn.BatchNorm1d if x.dim() == 3 else nn.BatchNorm2d
    ours = randomize(cls(C, dtype=mdtype))
    theirs = copy.deepcopy(ours)
    g = torch.randn_like(x)
    r1 = step(ours, x, g, True)
    c = counts()
    assert c["forward"] == 0 and c["forward_aten"] == 1 and c["backward"] == 0 and c["backward_aten"] == 1, c
    r2 = step(theirs, x, g, False)
    compare(r1, r2, 0.0, name)  # ATen's own kernel: bit-identical


def test_eps_zero_goes_to_aten_and_the_eval_backward_is_served():
    # F.batch_norm rejects eps=0 in training; the raw operator accepts it (ATen's rule for 0/0)
    x = make((4, 3, 5))
    x[:, 1] = 2.0  # a constant channel: var + eps = 0
    g = make((4, 3, 5), seed=1)
    res = {}
    for on in (True, False):
        with bnkit.accelerated(on):
            y, m, s = torch.ops.aten.native_batch_norm(x, None, None, None, None, True, 0.1, 0.0)
            gx = torch.ops.aten.native_batch_norm_backward(g, x, None, None, None, m, s, True, 0.0, [True, False, False])
        res[on] = (y, m, s, gx[0])
    for a, e in zip(res[True], res[False]):
        assert torch.equal(a.nan_to_num(), e.nan_to_num())
    counts()
    grads = {}
    for on in (True, False):  # eval mode in a graph: the weight gradient, no input gradient
        w = torch.ones(3, requires_grad=True)
        with bnkit.accelerated(on):
            F.batch_norm(x, torch.zeros(3), torch.ones(3), w, training=False).mul(g).sum().backward()
        grads[on] = w.grad
    c = counts()
    assert c == {"forward": 1, "forward_aten": 0, "backward": 1, "backward_aten": 0}, c
    assert_close(grads[True], grads[False], 1e-6, "eval-mode weight gradient")


def test_errors_are_torchs():
    bn = nn.BatchNorm1d(3)
    for on in (True, False):
        with bnkit.accelerated(on):
            with pytest.raises(ValueError, match="more than 1 value per channel"):
                bn(torch.randn(1, 3))
            with pytest.raises(RuntimeError, match="running_mean should contain 3 elements not 4"):
                F.batch_norm(torch.randn(4, 3), torch.zeros(4), torch.ones(4))


def test_non_finite_values_propagate_like_torch():
    x = make((4, 3, 5, 5))
    x[1, 2, 3, 3] = float("nan")
    ours, theirs = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
    with bnkit.accelerated():
        y1 = ours(x)
    y2 = theirs(x)
    assert torch.equal(y1.isnan(), y2.isnan())
    assert torch.equal(ours.running_var.isnan(), theirs.running_var.isnan())
    assert_close(y1.nan_to_num(), y2.nan_to_num(), 1e-5, "finite channels", 4.0)


# ------------------------------------------------- 4. models and subclasses
class BatchNormAct2d(nn.BatchNorm2d):
    """timm's pattern: a BatchNorm2d subclass whose forward calls F.batch_norm, then an activation."""

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        y = F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats else None,
                         self.running_var if not self.training or self.track_running_stats else None,
                         self.weight, self.bias, self.training or not self.track_running_stats, factor, self.eps)
        return F.relu(y)


class Block(nn.Module):
    """A torchvision-style residual block: conv-BN-ReLU-conv-BN + identity, ReLU."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), BatchNormAct2d(8, momentum=None), Block(8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_training_a_model_matches_torch(fmt):
    ours = randomize(small_net()).to(memory_format=fmt)
    theirs = copy.deepcopy(ours)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ours, theirs)]
    for i in range(3):
        x = make((6, 3, 8, 8), fmt=fmt, seed=i)
        for m, opt, on in ((ours, opts[0], True), (theirs, opts[1], False)):
            opt.zero_grad()
            with bnkit.accelerated(on):
                m(x).square().mean().backward()
            opt.step()
    c = counts()
    assert c["forward"] == 3 * 4 and c["backward"] == 3 * 4 and c["forward_aten"] == c["backward_aten"] == 0, c
    for (n, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert_close(a, b, 1e-4, n)
    ours.eval()
    theirs.eval()
    x = make((6, 3, 8, 8), fmt=fmt, seed=9)
    with bnkit.accelerated():
        y1 = ours(x)
    assert_close(y1, theirs(x), 1e-4, "eval output")


@pytest.fixture
def timm_layers():
    """timm.layers, with the tests' torchvision stand-in (tests/_timm_stub.py), as the other timm tests import it."""
    from _timm_stub import import_timm

    return import_timm().layers


def test_timm_batchnormact2d_is_served(timm_layers):
    ours = randomize(timm_layers.BatchNormAct2d(5, act_layer=nn.ReLU))
    assert type(ours).forward is not nn.BatchNorm2d.forward  # its own forward, calling F.batch_norm
    theirs = copy.deepcopy(ours)
    x = make((4, 5, 6, 6), fmt=torch.channels_last)
    g = make((4, 5, 6, 6), fmt=torch.channels_last, seed=3, loc=0.0, scale=1.0)
    r1 = step(ours, x, g, True)
    assert counts()["forward"] == 1
    r2 = step(theirs, x, g, False)
    compare(r1, r2, 1e-5, "BatchNormAct2d", input_grad_scale(x, g, 1e-5), output_scale(x, 1e-5))


# ------------------------------------------------- 5. autograd and tools
def test_gradcheck_and_gradgradcheck_float64():
    x = make((3, 2, 3, 2), torch.float64).requires_grad_(True)
    w = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return F.batch_norm(x, None, None, w, b, training=True, eps=1e-3)

    with bnkit.accelerated():
        assert torch.autograd.gradcheck(fn, (x, w, b))
        assert torch.autograd.gradgradcheck(fn, (x, w, b))
        fmt_x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
        assert torch.autograd.gradgradcheck(fn, (fmt_x, w, b))
    assert counts()["backward"] > 0


def test_double_backward_matches_torch():
    x = make((4, 3, 5), torch.float64)
    w = torch.rand(3, dtype=torch.float64) + 0.5
    res = {}
    for on in (True, False):
        xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with bnkit.accelerated(on):
            y = F.batch_norm(xs, None, None, ws, None, training=True)
            (gx,) = torch.autograd.grad(y.pow(3).sum(), xs, create_graph=True)
            res[on] = torch.autograd.grad(gx.square().sum(), (xs, ws))
    for a, e in zip(res[True], res[False]):
        assert_close(a, e, 1e-9, "second derivative", 10.0)


def _eval_net():
    return randomize(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), Block(4))).eval()


def test_torch_compile_with_it_on_equals_eager():
    net = randomize(small_net())
    ref = copy.deepcopy(net)
    x = make((4, 3, 8, 8))
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="aot_eager")
    with bnkit.accelerated():
        y1 = compiled(x)
        y1.square().sum().backward()
    c = counts()
    # aot_eager runs the traced aten ops eagerly: the backward graph calls native_batch_norm_backward
    # (bnkit's kernel); most forwards are functionalized into _native_batch_norm_legit_functional (ATen's)
    assert c["backward"] == 4 and c["forward"] >= 1, c
    y2 = ref(x)
    y2.square().sum().backward()
    assert_close(y1, y2, 1e-4, "compiled output")
    for (n, a), (_, b) in zip(net.named_parameters(), ref.named_parameters()):
        assert_close(a.grad, b.grad, 1e-4, f"{n} grad")
    for (n, a), (_, b) in zip(net.named_buffers(), ref.named_buffers()):
        assert_close(a, b, 1e-4, n)


@pytest.mark.slow
def test_torch_compile_inductor_with_it_on_equals_eager():
    net = _eval_net()
    x = make((2, 3, 8, 8))
    torch._dynamo.reset()
    with bnkit.accelerated():
        y1 = torch.compile(net)(x)
    assert_close(y1, net(x), 1e-5, "inductor output")


def test_torch_export_with_it_on_equals_eager():
    net = _eval_net()
    x = make((2, 3, 8, 8))
    with bnkit.accelerated():
        ep = torch.export.export(net, (x,))
        counts()
        y1 = ep.module()(x)
        assert counts()["forward"] == 3  # the exported graph keeps aten.batch_norm: bnkit's kernel runs it
        y_eager_on = net(x)
    assert_close(y1, net(x), 1e-5, "exported output")
    assert_close(y_eager_on, net(x), 1e-5, "eager output")


def test_torch_jit_trace_and_script_with_it_on_equal_eager():
    net = _eval_net()
    x = make((2, 3, 8, 8))
    ref = net(x)
    with bnkit.accelerated():
        traced = torch.jit.trace(net, (x,))
        scripted = torch.jit.script(nn.BatchNorm2d(4).eval())
        y_traced = traced(x)
        y_script = scripted(ref)
        c = counts()
    assert c["forward"] >= 2  # the traced and the scripted module ran bnkit's kernels
    assert_close(y_traced, ref, 1e-5, "traced output")
    assert_close(y_script, nn.BatchNorm2d(4).eval()(ref), 1e-5, "scripted output")


def test_quantization_tooling_with_it_on():
    from torch.ao.quantization import (
        fuse_modules_qat,
        get_default_qat_qconfig,
        prepare_qat,
    )

    def qat():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        m.train()
        m = fuse_modules_qat(m, [["0", "1", "2"]])
        m.qconfig = get_default_qat_qconfig("x86")
        return prepare_qat(m)

    x = make((4, 3, 8, 8))
    ours, theirs = qat(), qat()
    with bnkit.accelerated():
        y1 = ours(x)
        y1.sum().backward()
    assert counts()["forward"] >= 1  # the QAT ConvBnReLU2d computes its batch statistics with F.batch_norm
    y2 = theirs(x)
    y2.sum().backward()
    assert_close(y1, y2, 1e-4, "QAT output")
    assert_close(ours[0].weight.grad, theirs[0].weight.grad, 1e-4, "QAT weight grad")


def _onnx_matches_eager(dynamo: bool) -> None:
    import io
    import warnings

    ort = pytest.importorskip("onnxruntime")
    net = _eval_net()
    x = make((2, 3, 8, 8))
    f = io.BytesIO()
    with bnkit.accelerated(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation notes
        torch.onnx.export(net, (x,), f, dynamo=dynamo)
    sess = ort.InferenceSession(f.getvalue())
    (y,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    assert_close(torch.from_numpy(y), net(x), 1e-5, "ONNX Runtime output")


def test_onnx_export_with_it_on_runs_like_eager():
    _onnx_matches_eager(dynamo=False)


@pytest.mark.slow
def test_onnx_dynamo_export_with_it_on_runs_like_eager():
    _onnx_matches_eager(dynamo=True)


def test_functorch_vmap_and_grad_with_it_on():
    xs = make((3, 4, 2, 5), torch.float64)  # vmap over dim 0: three (4, 2, 5) batches, C = 2
    w = torch.rand(2, dtype=torch.float64) + 0.5

    def loss(w, x):
        return F.batch_norm(x, None, None, w, None, training=True).pow(3).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))
    with bnkit.accelerated():
        g1 = per_sample(w, xs)
    assert counts()["forward"] >= 1
    g2 = per_sample(w, xs)
    assert_close(g1, g2, 1e-10, "per-batch weight gradients")


@pytest.mark.parametrize("track", [False, True])
def test_instance_norm_which_calls_batch_norm_matches_torch(track):
    # F.instance_norm reshapes to (1, N*C, ...) and calls aten::batch_norm: it is served too
    ours = randomize(nn.InstanceNorm2d(3, affine=True, track_running_stats=track))
    theirs = copy.deepcopy(ours)
    x = make((4, 3, 5, 6))
    g = make((4, 3, 5, 6), seed=1, loc=0.0, scale=1.0)
    r1 = step(ours, x, g, True)
    assert counts()["forward"] == 1
    r2 = step(theirs, x, g, False)
    compare(r1, r2, 1e-5, "InstanceNorm2d", input_grad_scale(x, g, 1e-5), output_scale(x, 1e-5))
