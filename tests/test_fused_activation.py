"""BN fused with its activation: BatchNormAct with ReLU / ReLU6 / Hardtanh / Hardswish / SiLU, and convert(fuse_activations=True).

Oracles: torch's BatchNormNd followed by the same activation module (outputs,
input/weight/bias gradients, running statistics), gradcheck in float64, and the
unfused bnkit path (BN, then the activation) where the fused op declines.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bnkit
from bnkit import kernels
from bnkit.kernels import cpp
from bnkit.variants import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from _compare import assert_close, input_grad_scale, output_scale

if not cpp.available():  # pragma: no cover - depends on the machine
    pytest.skip(f"the C++ extension cannot be built here: {cpp.build_error()}", allow_module_level=True)

TOL = {torch.float32: 2e-5, torch.float64: 1e-10}
ACTS = {
    "relu": lambda: nn.ReLU(),
    "relu_inplace": lambda: nn.ReLU(inplace=True),
    "relu6": lambda: nn.ReLU6(inplace=True),
    "hardtanh": lambda: nn.Hardtanh(-0.5, 1.0),
    "hardswish": lambda: nn.Hardswish(),
    "silu": lambda: nn.SiLU(inplace=True),
}
# rank -> (BatchNormAct class, torch BN class, spatial shape)
RANKS = {2: (BatchNormAct1d, nn.BatchNorm1d, ()), 3: (BatchNormAct1d, nn.BatchNorm1d, (7,)),
         4: (BatchNormAct2d, nn.BatchNorm2d, (5, 6)), 5: (BatchNormAct3d, nn.BatchNorm3d, (2, 3, 4))}


@pytest.fixture(autouse=True)
def _cpp_backend():
    with kernels.use_backend("cpp"):
        yield


def twins(rank: int, channels: int, act: str, dtype=torch.float32, seed: int = 0):
    """A torch BN + activation (nn.Sequential) and the bnkit BatchNormAct with the same parameters."""
    cls, torch_cls, _ = RANKS[rank]
    torch.manual_seed(seed)
    ref = nn.Sequential(torch_cls(channels), ACTS[act]()).to(dtype)
    with torch.no_grad():
        ref[0].weight.uniform_(0.5, 1.5)
        ref[0].bias.uniform_(-0.5, 0.5)
    new = cls(channels, act=ACTS[act]()).to(dtype)
    new.load_state_dict({k.removeprefix("0."): v for k, v in ref.state_dict().items()})
    return ref, new


def check_step(ref: nn.Module, new: nn.Module, x: torch.Tensor, tol: float) -> None:
    """One training forward/backward and one eval forward of both, compared."""
    eps = 1e-5
    xr, xn = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yn = ref(xr), new(xn)
    scale = output_scale(x, eps)
    assert_close(yn, yr, tol, "output", scale)
    if x.dim() >= 4:
        assert yn.is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous()
    g = torch.randn_like(yr)
    yr.backward(g)
    yn.backward(g)
    assert_close(xn.grad, xr.grad, tol, "input gradient", input_grad_scale(x, g, eps))
    assert_close(new.weight.grad, ref[0].weight.grad, tol, "weight gradient", scale * g.abs().sum().item() / g.shape[1])
    assert_close(new.bias.grad, ref[0].bias.grad, tol, "bias gradient", g.abs().sum().item() / g.shape[1])
    assert_close(new.running_mean, ref[0].running_mean, tol, "running_mean")
    assert_close(new.running_var, ref[0].running_var, tol, "running_var")
    assert int(new.num_batches_tracked) == int(ref[0].num_batches_tracked)
    ref.eval(), new.eval()
    with torch.no_grad():
        assert_close(new(x), ref(x), tol, "eval output", scale)
    ref.train(), new.train()


def fused_op_calls(fn) -> int:
    """How many times ``fn()`` calls ``bnkit::batch_norm_act_layer`` (from the profiler's op events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "bnkit::batch_norm_act_layer")


@settings(max_examples=40, deadline=None)
@given(
    rank=st.sampled_from(sorted(RANKS)),
    channels=st.integers(1, 40),
    batch=st.integers(2, 9),
    act=st.sampled_from(sorted(ACTS)),
    channels_last=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    shift=st.floats(-2.0, 2.0),
    seed=st.integers(0, 2**16),
)
def test_batchnormact_equals_torch_bn_then_activation(rank, channels, batch, act, channels_last, dtype, shift, seed):
    ref, new = twins(rank, channels, act, dtype, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *RANKS[rank][2], generator=g, dtype=dtype) * 2 + shift
    if channels_last and rank in (4, 5):
        x = x.contiguous(memory_format=torch.channels_last if rank == 4 else torch.channels_last_3d)
    check_step(ref, new, x, TOL[dtype])


@pytest.mark.parametrize("shape", [(4, 16, 40, 40), (2, 300, 3, 3), (256, 64), (32, 96, 14, 14)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("act", ["relu6", "silu"])
def test_large_and_short_rows_equal_torch(shape, channels_last, act):
    # 40x40 maps take the channel-block schedule, 3x3 the short-row sums, (N, C) the channels-last rows.
    ref, new = twins(len(shape), shape[1], act)
    x = torch.randn(*shape) * 3 + 1
    x.view(-1)[:: 97] = torch.linspace(-120, 120, x.view(-1)[::97].numel())  # SiLU's exp at both far ends
    if channels_last and len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    check_step(ref, new, x, TOL[torch.float32])


def test_the_fused_op_runs_and_the_graph_is_one_node():
    _, new = twins(4, 8, "relu")
    x = torch.randn(4, 8, 5, 5, requires_grad=True)
    assert fused_op_calls(lambda: new(x)) == 1
    y = new(x)
    assert "Relu" not in type(y.grad_fn).__name__ and y.grad_fn.next_functions  # one C++ node, no ReluBackward
    new.eval()
    with torch.no_grad():
        assert fused_op_calls(lambda: new(x)) == 1


def test_values_on_the_bounds_get_the_activations_gradient_rule():
    # Channel values -1, 0, 1 (mean 0, weight 1, bias 0): the 0 normalizes to exactly 0, where ReLU passes no
    # gradient; Hardtanh(-1.2247, 1.2247) bounds sit exactly on the normalized +-1 (1 / sqrt(2/3 + eps) ~ 1.2247).
    x = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64).repeat(2, 1).t().reshape(3, 2).contiguous()
    for act in (nn.ReLU(), nn.Hardtanh(-1.0, 1.0)):
        ref = nn.Sequential(nn.BatchNorm1d(2), copy.deepcopy(act)).double()
        new = BatchNormAct1d(2, act=copy.deepcopy(act)).double()
        xr, xn = x.clone().requires_grad_(), x.clone().requires_grad_()
        g = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float64)
        ref(xr).backward(g)
        new(xn).backward(g)
        torch.testing.assert_close(xn.grad, xr.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(new.bias.grad, ref[0].bias.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", ["relu", "hardtanh", "hardswish", "silu"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_and_double_backward(act, channels_last):
    _, new = twins(4, 3, act, torch.float64)
    new.track_running_stats = False
    new.running_mean = new.running_var = new.num_batches_tracked = None
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64) * 2 + 0.3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    assert fused_op_calls(lambda: new(x)) == 1
    assert torch.autograd.gradcheck(lambda t: new(t), (x,))
    assert torch.autograd.gradgradcheck(lambda t: new(t), (x,))


def test_bfloat16_hardtanh_masks_as_torch_does_on_the_rounded_output():
    ref, new = twins(4, 16, "hardtanh")
    ref, new = ref.to(torch.bfloat16), new.to(torch.bfloat16)
    ref[0].float()
    new.float()  # float32 parameters: the usual mixed-precision set-up
    x = (torch.randn(8, 16, 9, 9) * 2).to(torch.bfloat16)
    xr, xn = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(x.shape).to(torch.bfloat16)
    ref(xr).backward(g)
    new(xn).backward(g)
    # the values differ by bfloat16 rounding only: an element masked on one side and not on the other would
    # differ by the whole of k1 * g (about 1 here)
    assert (xn.grad.float() - xr.grad.float()).abs().max() < 0.05


def _hook_calls(module: nn.Module) -> list:
    calls: list = []
    module.register_forward_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("case", ["act_hook", "act_subclass", "dropout", "global_hook", "tiny_batch"])
def test_what_is_not_fused_runs_bn_then_the_activation(case):
    ref, new = twins(4, 6, "relu6")
    x = torch.randn(4, 6, 5, 5) * 2
    handle = None
    if case == "act_hook":
        calls = _hook_calls(new.act)
    elif case == "act_subclass":
        class MyReLU6(nn.ReLU6):
            pass
        new.act = MyReLU6()
    elif case == "dropout":
        new.drop = nn.Dropout(0.0)
    elif case == "global_hook":
        seen: list = []
        handle = nn.modules.module.register_module_forward_hook(lambda *a: seen.append(1))
    elif case == "tiny_batch":
        new.tiny_batch = "running"
    try:
        assert new.fused_activation() is None or case == "tiny_batch"
        n = fused_op_calls(lambda: new(x.clone().requires_grad_()))
        ref(x)  # the same running-statistics update for the oracle
        assert n == 0
        check_step(ref, new, x, TOL[torch.float32])
        if case == "act_hook":
            assert calls
        if case == "global_hook":
            assert seen
    finally:
        if handle is not None:
            handle.remove()


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Sequential(nn.Conv2d(8, 8, 3, groups=8, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True)),
        nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8),  # no activation: stays a plain BN
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


def test_convert_fuse_activations_keeps_outputs_gradients_and_state_dict():
    base = small_cnn()
    fused, report = bnkit.convert(base, fuse_activations=True, report=True)
    assert [name for name, _ in report.fused] == ["1", "3.1"] and [a for _, a in report.fused] == ["2", "3.2"]
    assert isinstance(fused[1], BatchNormAct2d) and type(fused[2]) is nn.Identity and type(fused[1].act) is nn.ReLU
    assert type(fused[5]) is bnkit.BatchNorm2d
    assert list(fused.state_dict()) == list(base.state_dict())
    x = torch.randn(6, 3, 8, 8)
    for model in (base, fused):
        model(x).square().sum().backward()
    for (name, p), q in zip(base.named_parameters(), fused.parameters()):
        assert_close(q.grad, p.grad, 1e-4, name)
    for (name, b), c in zip(base.named_buffers(), fused.buffers()):
        assert_close(c, b, 1e-5, name)
    base.eval(), fused.eval()
    assert_close(fused(x), base(x), 1e-5, "eval output")
    fresh = small_cnn()
    fresh.load_state_dict(fused.state_dict())  # checkpoints load both ways


def test_a_hooked_bn_layer_stays_unfused_and_its_hook_sees_what_torch_shows():
    base = small_cnn()
    seen: list = []
    base[1].register_forward_hook(lambda m, i, out: seen.append(out.detach().clone()))
    x = torch.randn(2, 3, 8, 8)
    base(x)
    fused, report = bnkit.convert(base, fuse_activations=True, report=True)
    assert [name for name, _ in report.fused] == ["3.1"]
    assert type(fused[1]) is bnkit.BatchNorm2d and type(fused[2]) is nn.ReLU
    fused(x)
    assert len(seen) == 2 and seen[0].min() < 0  # the BN output before the ReLU
    assert_close(seen[1], seen[0], 1e-5, "hooked output")


def test_convert_back_to_torch_puts_the_activations_back():
    base = small_cnn()
    fused = bnkit.convert(base, fuse_activations=True)
    back, report = bnkit.convert(fused, to="torch", report=True)
    assert str(back) == str(base) and len(report.fused) == 2
    assert type(back[1]) is nn.BatchNorm2d and type(back[2]) is nn.ReLU and back[2].inplace
    with pytest.raises(ValueError, match="fuse_activations"):
        bnkit.convert(base, to="torch", fuse_activations=True)
    broken = bnkit.convert(base, fuse_activations=True)
    broken[2] = nn.ReLU()  # the Identity that held the place is gone
    with pytest.raises(ValueError, match="nn.Identity"):
        bnkit.convert(broken, to="torch")


def test_fused_layers_under_accumulate_stats_and_checkpointing_equal_unfused():
    base = bnkit.convert(small_cnn())
    fused = bnkit.convert(small_cnn(), fuse_activations=True)
    x = torch.randn(8, 3, 8, 8)
    for model in (base, fused):
        with bnkit.accumulate_stats(model):
            for part in x.split(4):
                model(part).sum().backward()
    for (name, b), c in zip(base.named_buffers(), fused.buffers()):
        assert_close(c, b, 1e-5, name)
    from torch.utils.checkpoint import checkpoint
    for model in (base, fused):
        model.zero_grad()
        checkpoint(model, x, use_reentrant=False).sum().backward()
    for (name, p), q in zip(base.named_parameters(), fused.parameters()):
        assert_close(q.grad, p.grad, 1e-4, name)


def test_compiled_fused_model_equals_eager_without_graph_breaks():
    fused = bnkit.convert(small_cnn(), fuse_activations=True)
    eager = copy.deepcopy(fused)
    x = torch.randn(4, 3, 8, 8)
    explanation = torch._dynamo.explain(copy.deepcopy(fused))(x)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(fused, backend="aot_eager")
    assert_close(compiled(x), eager(x), 1e-5, "compiled output")
    for (name, b), c in zip(eager.named_buffers(), fused.buffers()):
        assert_close(c, b, 1e-6, name)


def test_nan_in_a_channel_propagates_through_the_clamp_as_in_torch():
    ref, new = twins(2, 3, "relu6", torch.float64)
    x = torch.randn(6, 3, dtype=torch.float64)
    x[2, 1] = math.nan
    torch.testing.assert_close(new(x), ref(x), equal_nan=True)  # channel 1 all NaN, the others finite
    assert new(x)[:, 1].isnan().all() and not new(x)[:, [0, 2]].isnan().any()


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_frozen_batchnormact_fuses_in_inference_and_equals_the_frozen_map_then_the_activation(act):
    from bnkit.variants import FrozenBatchNormAct2d
    torch.manual_seed(0)
    layer = FrozenBatchNormAct2d(6, act=ACTS[act]())
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    ref = nn.Sequential(nn.BatchNorm2d(6).eval(), ACTS[act]())
    ref[0].load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith(("act", "drop"))},
                           strict=False)
    x = torch.randn(4, 6, 5, 5) * 2
    assert layer.fused_activation() is not None
    with torch.no_grad():
        assert fused_op_calls(lambda: layer(x)) == 1
        assert_close(layer(x), ref(x), 1e-5, "frozen + activation")
    xr, xn = x.clone().requires_grad_(), x.clone().requires_grad_()  # with a graph: the op declines, same values
    ref(xr).sum().backward()
    layer(xn).sum().backward()
    assert_close(xn.grad, xr.grad, 1e-5, "frozen input gradient")
