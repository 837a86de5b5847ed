"""Eval-mode BN in a graph: the running statistics normalize while gradients flow (fine-tuning with frozen
BN statistics, input gradients of an eval model), with and without a fused activation.

The layer call is one autograd node (``InferFn``) whose backward is one pass over the gradient and the input.
Oracles: torch's BatchNormNd in eval mode followed by the same activation module (outputs, input / weight /
bias gradients, running statistics untouched), gradcheck and gradgradcheck in float64, torch's boundary
rules for the clamps on values placed exactly on the bounds, and the analytic formulas for the op on 3-D
views with gradients for the statistics.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bnkit
from bnkit import kernels
from bnkit.kernels import cpp
from bnkit.tools._bnlayers import bn_layers
from _compare import TORCH_BN_BY_RANK, assert_close

if not cpp.available():  # pragma: no cover - depends on the machine
    pytest.skip(f"the C++ extension cannot be built here: {cpp.build_error()}", allow_module_level=True)

ACTS = {
    "none": None,
    "relu": lambda: nn.ReLU(inplace=True),
    "relu6": lambda: nn.ReLU6(inplace=True),
    "hardtanh": lambda: nn.Hardtanh(-0.5, 1.5),
    "hardswish": lambda: nn.Hardswish(),
    "silu": lambda: nn.SiLU(),
}
SPATIAL = {2: (), 3: (7,), 4: (5, 6), 5: (2, 3, 4)}
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


@pytest.fixture(autouse=True)
def _cpp_backend():
    with kernels.use_backend("cpp"):
        yield


def eval_twins(rank: int, channels: int, act: str, dtype=torch.float32, seed: int = 0):
    """A torch BN (+ activation) in eval mode with non-trivial statistics and parameters, and its bnkit
    conversion (the activation fused)."""
    torch.manual_seed(seed)
    bn = TORCH_BN_BY_RANK[rank](channels)
    with torch.no_grad():
        bn.weight.uniform_(-1.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.normal_(0.0, 0.5)
        bn.running_var.uniform_(0.3, 2.0)
    ref = bn if ACTS[act] is None else nn.Sequential(bn, ACTS[act]())
    ref = ref.to(dtype).eval()
    new = bnkit.convert(copy.deepcopy(ref), fuse_activations=True).eval()
    return ref, new


def bn_of(model: nn.Module) -> nn.Module:
    return model if not isinstance(model, nn.Sequential) else model[0]


def run(model: nn.Module, x: torch.Tensor, g: torch.Tensor, input_grad: bool = True):
    """Output, input gradient and parameter gradients of one backward of ``model(x)`` against ``g``."""
    xi = x.clone().requires_grad_(input_grad)
    y = model(xi)
    y.backward(g)
    bn = bn_of(model)
    grads = {n: (p.grad.clone() if p.grad is not None else None) for n, p in bn.named_parameters()}
    model.zero_grad(set_to_none=True)
    return y.detach(), xi.grad, grads, y.grad_fn.name()


def compare(ref, new, x, g, tol, input_grad=True):
    yr, dxr, pr, _ = run(ref, x, g, input_grad)
    stats = {k: v.clone() for k, v in bn_of(new).state_dict().items()}
    yn, dxn, pn, node = run(new, x, g, input_grad)
    assert "InferFn" in node, f"the eval-mode call is not the one-node path: {node}"
    assert_close(yn, yr, tol, "output")
    if input_grad:
        assert_close(dxn, dxr, tol, "input gradient")
    else:
        assert dxn is None
    for name, expected in pr.items():
        if expected is None:
            assert pn[name] is None, name
        else:
            assert_close(pn[name], expected, tol, f"{name} gradient", scale=x[0].numel())
    for k, v in bn_of(new).state_dict().items():  # eval mode: the statistics are not touched
        assert torch.equal(v, stats[k]), k
    return yn, dxn


@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("rank,channels_last", [(2, False), (3, False), (4, False), (4, True), (5, False), (5, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eval_mode_in_a_graph_matches_torch(act, rank, channels_last, dtype):
    ref, new = eval_twins(rank, 6, act, dtype)
    x = torch.randn(5, 6, *SPATIAL[rank], dtype=dtype) * 2
    if channels_last:
        fmt = torch.channels_last if rank == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    g = torch.randn_like(x)
    y, dx = compare(ref, new, x, g, TOL[dtype])
    if channels_last:  # the output and the gradient keep the input's memory format
        assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("act", ["none", "relu6", "silu"])
@pytest.mark.parametrize("what", ["input", "weight", "bias", "weight_and_bias"])
def test_only_the_gradients_asked_for(act, what):
    ref, new = eval_twins(4, 5, act)
    for model in (ref, new):
        bn = bn_of(model)
        bn.weight.requires_grad_(what in ("input", "weight", "weight_and_bias"))
        bn.bias.requires_grad_(what in ("input", "bias", "weight_and_bias"))
    x = torch.randn(4, 5, 3, 3) * 2
    compare(ref, new, x, torch.randn_like(x), TOL[torch.float32], input_grad=what == "input")


@pytest.mark.parametrize("act", ["none", "relu", "hardswish"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradient_buffer_reused_and_kept(act, channels_last):
    """An upstream gradient only autograd holds becomes the input gradient's memory; one the caller keeps
    is left as it was."""
    ref, new = eval_twins(4, 6, act)
    x = torch.randn(3, 6, 4, 4) * 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn_like(x)
    out = {}
    for name, model in (("ref", ref), ("new", new)):
        xi = x.clone().requires_grad_()
        (model(xi) * w).pow(2).sum().backward()  # the gradient reaching BN is a fresh tensor
        out[name] = xi.grad
    assert_close(out["new"], out["ref"], 2e-5, "input gradient (reused buffer)")
    g = torch.randn_like(x)
    kept = g.clone()
    yr, dxr, _, _ = run(ref, x, g)
    yn, dxn, _, _ = run(new, x, g)
    assert torch.equal(g, kept) and dxn.data_ptr() != g.data_ptr()
    assert_close(dxn, dxr, 2e-5, "input gradient (caller's buffer)")


@pytest.mark.parametrize("act,bounds", [("relu", (0.0,)), ("relu6", (0.0, 6.0)), ("hardtanh", (-0.5, 1.5))])
def test_clamp_values_on_the_bounds_follow_torch(act, bounds):
    """With scale 1 and shift 0 the pre-activation is the input itself: values exactly on a bound get no
    gradient, as in torch's ReLU (output > 0) and Hardtanh (lo < x < hi) backward."""
    ref, new = eval_twins(4, 3, act)
    for model in (ref, new):
        bn = bn_of(model)
        with torch.no_grad():
            bn.weight.fill_(1.0), bn.bias.zero_(), bn.running_mean.zero_(), bn.running_var.fill_(1.0 - bn.eps)
    assert float((1.0 - bn.eps) + bn.eps) == 1.0
    x = torch.randn(4, 3, 5, 5) * 3
    x.view(-1)[::3] = bounds[0]
    x.view(-1)[1::7] = bounds[-1]
    g = torch.randn_like(x)
    _, dx = compare(ref, new, x, g, TOL[torch.float32])
    _, dx_torch, _, _ = run(ref, x, g)
    assert torch.equal(dx, dx_torch)  # scale 1: g or 0, exactly
    on_bound = sum((x == b) for b in bounds).bool()
    assert on_bound.sum() > 20 and torch.all(dx[on_bound] == 0)


@pytest.mark.parametrize("act", ["relu", "relu6", "hardtanh"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_backward_mask_is_the_forwards(act, channels_last):
    """Inputs placed around the running mean, biases on the bounds: many pre-activations lie next to a bound. The input
    gradient is ``g * scale`` exactly where the layer's own output is strictly inside the bounds, 0
    elsewhere."""
    ref, new = eval_twins(4, 8, act, seed=3)
    bn = bn_of(new)
    lo, hi = {"relu": (0.0, float("inf")), "relu6": (0.0, 6.0), "hardtanh": (-0.5, 1.5)}[act]
    with torch.no_grad():  # pre-activations centred on a bound: lo in even channels, hi (where finite) in odd
        bn.bias.fill_(lo)
        if hi != float("inf"):
            bn.bias[1::2] = hi
    # the layer's scale, folded in float64 and rounded once
    scale = (bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)).float().detach()
    x = bn.running_mean.detach().view(1, -1, 1, 1) + 1e-7 * torch.randn(16, 8, 6, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(x)
    y, dx, _, node = run(new, x, g)
    assert "InferFn" in node
    inside = (y > lo) & (y < hi)
    assert 0 < inside.sum() < inside.numel()
    expected = torch.where(inside, g * scale.view(1, -1, 1, 1), torch.zeros_like(g))
    assert torch.equal(dx, expected)


@pytest.mark.parametrize("act", sorted(ACTS))
def test_gradcheck_and_double_backward(act):
    _, new = eval_twins(4, 3, act, torch.float64, seed=1)
    x = (torch.randn(3, 3, 2, 3, dtype=torch.float64) * 2).requires_grad_()
    params = tuple(bn_of(new).parameters())

    def fn(x, *p):
        return new(x)

    assert torch.autograd.gradcheck(fn, (x, *params))
    if act in ("none", "silu", "hardswish"):  # (a clamp's second derivative is 0 away from its bounds)
        assert torch.autograd.gradgradcheck(fn, (x, *params))


@pytest.mark.parametrize("act", ["none", "relu", "silu"])
def test_bfloat16_input(act):
    ref, new = eval_twins(4, 8, act, seed=2)
    x = (torch.randn(4, 8, 5, 5) * 2).to(torch.bfloat16)
    g = torch.randn_like(x)
    for model in (ref, new):
        bn_of(model).to(torch.bfloat16)
    yr, dxr, pr, _ = run(ref, x, g)
    yn, dxn, pn, node = run(new, x, g)
    assert "InferFn" in node and yn.dtype == dxn.dtype == torch.bfloat16
    assert_close(yn, yr, 1e-2, "output")
    assert_close(dxn, dxr, 1e-2, "input gradient")
    for name in pr:
        assert_close(pn[name], pr[name], 2e-2, f"{name} gradient", scale=25.0)


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),
        nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fine_tuning_with_frozen_bn_statistics(fuse, channels_last):
    """The usual fine-tuning recipe: the model in train mode, its BN layers in eval mode (statistics frozen,
    affine parameters trained). Three SGD steps give torch's weights; the statistics stay as loaded."""
    base = small_cnn()
    with torch.no_grad():  # statistics as a pretrained model would have
        base.train()(torch.randn(16, 3, 8, 8))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    models = {"torch": copy.deepcopy(base), "bnkit": bnkit.convert(copy.deepcopy(base), fuse_activations=fuse)}
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 4, (6,), generator=g)) for _ in range(3)]
    for model in models.values():
        model.to(memory_format=fmt).train()
        for _, m in bn_layers(model):
            m.eval()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for x, y in batches:
            loss = nn.functional.cross_entropy(model(x.contiguous(memory_format=fmt)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert len(bn_layers(models["bnkit"])) == 3 and not any(m.training for _, m in bn_layers(models["bnkit"]))
    ref, new = models["torch"].state_dict(), models["bnkit"].state_dict()
    assert ref.keys() == new.keys()
    for k in ref:
        assert_close(new[k], ref[k], 1e-4, k)
        if "running" in k or "num_batches" in k:
            assert torch.equal(new[k], base.state_dict()[k]), k


def test_op_on_views_with_statistics_gradients():
    """bnkit::batch_norm_infer on a 3-D view (the op the general path calls), with and without gradients for
    the statistics, against the formula ``(x - mean) / sqrt(var + eps) * w + b`` in float64."""
    torch.manual_seed(4)
    x = torch.randn(4, 5, 7, dtype=torch.float64)
    mean, var = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
    w, b = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    eps = 1e-5
    g = torch.randn_like(x)

    def formula(x, mean, var, w, b):
        return (x - mean.view(1, -1, 1)) / torch.sqrt(var.view(1, -1, 1) + eps) * w.view(1, -1, 1) + b.view(1, -1, 1)

    for stats_grad in (False, True):
        leaves = [t.clone().requires_grad_(stats_grad or i in (0, 3, 4)) for i, t in enumerate((x, mean, var, w, b))]
        expected = torch.autograd.grad(formula(*leaves), [t for t in leaves if t.requires_grad], g)
        leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
        y = torch.ops.bnkit.batch_norm_infer(*leaves, eps)
        assert_close(y, formula(*leaves), 1e-12, "output")
        got = torch.autograd.grad(y, [t for t in leaves if t.requires_grad], g)
        for a, e in zip(got, expected):
            assert_close(a, e, 1e-12, "gradient")
    assert torch.autograd.gradcheck(lambda *t: torch.ops.bnkit.batch_norm_infer(*t, eps),
                                    tuple(t.clone().requires_grad_() for t in (x, mean, var, w, b)))


@settings(max_examples=40, deadline=None)
@given(
    rank=st.sampled_from(sorted(TORCH_BN_BY_RANK)),
    channels=st.integers(1, 24),
    batch=st.integers(1, 6),
    act=st.sampled_from(sorted(ACTS)),
    channels_last=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    offset=st.floats(-3.0, 3.0),
    seed=st.integers(0, 2**16),
)
def test_property_against_torch(rank, channels, batch, act, channels_last, dtype, offset, seed):
    ref, new = eval_twins(rank, channels, act, dtype, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *SPATIAL[rank], generator=g, dtype=dtype) * 2 + offset
    if channels_last and rank in (4, 5):
        x = x.contiguous(memory_format=torch.channels_last if rank == 4 else torch.channels_last_3d)
    compare(ref, new, x, torch.randn(x.shape, generator=g, dtype=dtype), TOL[dtype] * 4)


@pytest.mark.parametrize("channels_last", [False, True])
def test_accelerated_torch_model_with_frozen_statistics(channels_last):
    """bnkit.accelerate() serves torch's eval-mode backward (aten::native_batch_norm_backward with
    train=False) too: the same gradients as ATen's kernels, and every BN call served."""
    base = small_cnn()
    with torch.no_grad():
        base.train()(torch.randn(16, 3, 8, 8))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(6, 3, 8, 8).contiguous(memory_format=fmt)
    y = torch.randint(0, 4, (6,))
    grads = {}
    for on in (True, False):
        model = copy.deepcopy(base).to(memory_format=fmt).train()
        for _, m in bn_layers(model):
            m.eval()
        bnkit.accelerate_counts(reset=True)
        with bnkit.accelerated(on):
            nn.functional.cross_entropy(model(x), y).backward()
        c = bnkit.accelerate_counts(reset=True)
        assert c == ({"forward": 3, "forward_aten": 0, "backward": 3, "backward_aten": 0} if on else
                     {"forward": 0, "forward_aten": 0, "backward": 0, "backward_aten": 0}), c
        grads[on] = {n: p.grad for n, p in model.named_parameters()}
    for n in grads[False]:
        assert_close(grads[True][n], grads[False][n], 1e-5, n)


@pytest.mark.parametrize("act", ["none", "relu"])
@pytest.mark.parametrize("case", ["grad_in_other_format", "strided_input", "axis_last"])
def test_layouts_the_kernels_do_not_read_in_place(act, case):
    """A gradient arriving in another memory format than the input, an input that is neither contiguous
    nor channels-last (a permuted view: copied), and a bnkit layer with features on the last axis."""
    if case == "axis_last":
        torch.manual_seed(5)
        ref_bn = nn.BatchNorm1d(6)
        with torch.no_grad():
            ref_bn.weight.uniform_(-1.5, 1.5), ref_bn.bias.uniform_(-0.5, 0.5)
            ref_bn.running_mean.normal_(0.0, 0.5), ref_bn.running_var.uniform_(0.3, 2.0)
        new_bn = bnkit.BatchNorm(6, axis=-1)
        new_bn.load_state_dict(ref_bn.state_dict())
        acts = (ACTS[act]() if ACTS[act] else nn.Identity(),)
        ref_bn.eval(), new_bn.eval()
        x = torch.randn(4, 5, 6) * 2
        g = torch.randn_like(x)
        xr, xn = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr = acts[0](ref_bn(xr.transpose(1, 2))).transpose(1, 2)
        yn = acts[0](new_bn(xn))
        assert "InferFn" in yn.grad_fn.name() or act != "none"
        yr.backward(g), yn.backward(g)
        assert_close(yn, yr, 2e-5, "output")
        assert_close(xn.grad, xr.grad, 2e-5, "input gradient")
        for n in ("weight", "bias"):
            assert_close(getattr(new_bn, n).grad, getattr(ref_bn, n).grad, 2e-5, n, scale=20.0)
        return
    ref, new = eval_twins(4, 6, act)
    x = torch.randn(3, 6, 5, 7) * 2
    g = torch.randn_like(x)
    if case == "grad_in_other_format":
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = (torch.randn(3, 5, 7, 6) * 2).permute(0, 3, 2, 1).contiguous().permute(0, 1, 3, 2)
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
        g = torch.randn_like(x, memory_format=torch.contiguous_format)
    compare(ref, new, x, g, TOL[torch.float32])
