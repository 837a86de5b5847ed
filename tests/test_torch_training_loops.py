"""Audit: torch's training-loop machinery run on bnkit layers, with the same model on torch's BN as the oracle.

Autocast (bf16 / fp16 on CPU), activation checkpointing under autocast, SWA / EMA copies, higher-order
autograd (gradient penalties, gradgradcheck, hessians, MAML through ``functional_call``), anomaly mode,
deterministic algorithms, ``no_grad`` training forwards, batch-of-one / empty batches inside a model,
``clip_grad_norm_`` with no-weight-decay parameter groups. Gaps left by test_loops*, test_accumulate*,
test_checkpointing, test_dropin*, test_func and test_parity.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _compare import assert_close
from torch import nn
from torch.func import functional_call
from torch.optim.swa_utils import AveragedModel, update_bn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import bnkit
from bnkit.family import is_torch_bn
from bnkit.variants import BatchNormAct

D = torch.float64
TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
PAIRS = {1: (nn.BatchNorm1d, bnkit.BatchNorm1d), 2: (nn.BatchNorm2d, bnkit.BatchNorm2d),
         3: (nn.BatchNorm3d, bnkit.BatchNorm3d)}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _conv_net(dtype=torch.float32, momentum=0.1):
    """conv-BN-ReLU, conv-BN-ReLU, Linear-BN1d-Linear, with non-trivial BN affine parameters.

    No bias before a BN layer: its exact gradient is 0, so its computed one is rounding noise,
    which Adam's normalisation would turn into full-size steps that differ between any two kernels."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(),
        nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 5 * 5, 6, bias=False), nn.BatchNorm1d(6, momentum=momentum), nn.Linear(6, 2),
    ).to(dtype)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, TORCH_BN):
                m.weight.uniform_(0.5, 1.5, generator=_gen(1))
                m.bias.uniform_(-0.5, 0.5, generator=_gen(2))
    return net


def _twins(dtype=torch.float32, fuse=False, momentum=0.1):
    t = _conv_net(dtype, momentum)
    b = bnkit.convert(t, fuse_activations=fuse)
    kinds = (bnkit.BatchNorm, BatchNormAct) if fuse else (bnkit.BatchNorm,)
    assert not any(is_torch_bn(m) for m in b.modules())
    assert sum(isinstance(m, kinds) for m in b.modules()) == 3
    return t, b


def _batches(n, dtype=torch.float32, shape=(8, 3, 5, 5), seed=10):
    g = _gen(seed)
    return [(torch.randn(shape, generator=g, dtype=dtype) * 2 + 0.5) for _ in range(n)]


def _assert_same_model(a, e, tol, what, grads=False):
    for (n, pa), (_, pe) in zip(a.named_parameters(), e.named_parameters()):
        assert_close(pa, pe, tol, f"{what}: param {n}")
        if grads:
            assert (pa.grad is None) == (pe.grad is None), n
            if pe.grad is not None:
                assert_close(pa.grad, pe.grad, tol, f"{what}: grad {n}")
    ba, be = dict(a.named_buffers()), dict(e.named_buffers())
    assert ba.keys() == be.keys(), what
    for n in be:
        assert ba[n].dtype == be[n].dtype, f"{what}: buffer {n} dtype {ba[n].dtype} != {be[n].dtype}"
        if be[n].is_floating_point():
            assert_close(ba[n], be[n], tol, f"{what}: buffer {n}")
        else:
            assert torch.equal(ba[n], be[n]), f"{what}: buffer {n}"


# =========================================================================== autocast
def _bf16_step(models, opts, x):
    """One GradScaler-free bf16 autocast SGD step of each model on ``x``; their outputs."""
    outs = []
    for m, opt in zip(models, opts):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        y.float().square().mean().backward()
        opt.step()
        outs.append(y)
    return outs


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("fuse", [False, True])
def test_autocast_bf16_sgd_loop_matches_torch(fuse, channels_last):
    """Three GradScaler-free bf16 autocast steps: bf16 outputs, float32 running stats, same values as torch."""
    t, b = _twins(fuse=fuse)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    t, b = t.to(memory_format=fmt), b.to(memory_format=fmt)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (t, b)]
    for x in _batches(3):
        outs = _bf16_step((t, b), opts, x.contiguous(memory_format=fmt))
        assert outs[1].dtype == outs[0].dtype == torch.bfloat16
        assert_close(outs[1], outs[0], 1e-2, "bf16 output")
    _assert_same_model(b, t, 1e-4, "after 3 bf16 steps")
    for m in b.modules():
        if isinstance(m, bnkit.BatchNorm):
            assert m.running_mean.dtype == m.running_var.dtype == torch.float32
    t.eval()
    b.eval()
    x = _batches(1, seed=99)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ye, yb = t(x), b(x)
    assert ye.dtype == yb.dtype
    assert_close(yb, ye, 1e-2, "bf16 eval output")


def _variant(name):
    if name == "ghost":  # one ghost batch (virtual_batch_size >= N): plain BN
        return bnkit.GhostBatchNorm2d(4, virtual_batch_size=8)
    if name == "renorm":  # r_max=1, d_max=0: r=1, d=0, plain BN
        return bnkit.BatchRenorm2d(4, momentum=0.1, r_max=1.0, d_max=0.0)
    if name == "act":
        return BatchNormAct(4, act=nn.ReLU())
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["ghost", "renorm", "act"])
def test_autocast_bf16_loop_with_variants_that_reduce_to_bn(name):
    t = _conv_net()
    v = copy.deepcopy(t)
    layer = _variant(name)
    layer.load_state_dict(t[4].state_dict(), strict=False)
    v[4] = layer
    if name == "act":
        v[5] = nn.Identity()
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (t, v)]
    for x in _batches(3):
        outs = _bf16_step((t, v), opts, x)
        assert outs[1].dtype == outs[0].dtype
        assert_close(outs[1], outs[0], 1e-2, f"{name} bf16 output")
    for k in ("running_mean", "running_var"):
        got = getattr(v[4], k)
        assert got.dtype == torch.float32
        assert_close(got, getattr(t[4], k), 1e-4, f"{name} {k}")
    assert int(v[4].num_batches_tracked) == int(t[4].num_batches_tracked) == 3
    for (n, pa), (_, pe) in zip(v.named_parameters(), t.named_parameters()):
        assert_close(pa, pe, 1e-4, f"{name} param {n}")


def test_autocast_fp16_cpu_training_step_matches_torch():
    t, b = _twins()
    x = _batches(1)[0]
    outs = []
    for m in (t, b):
        with torch.autocast("cpu", dtype=torch.float16):
            y = m(x)
        y.float().square().mean().backward()
        outs.append(y)
    assert outs[1].dtype == outs[0].dtype
    assert_close(outs[1], outs[0], 2e-3, "fp16 output")
    _assert_same_model(b, t, 2e-3, "fp16 step", grads=True)


# =========================================================================== checkpointing under autocast
@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant", "sequential"])
def test_checkpointed_conv_bn_relu_under_bf16_autocast_is_the_plain_torch_step(mode):
    """bnkit updates once per checkpointed step (docs/training-loops.md); the oracle is torch's un-checkpointed step."""
    t, b = _twins()
    for step, x in enumerate(_batches(2)):
        xt, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yt = t(xt)
            if mode == "sequential":
                yb = checkpoint_sequential(b, 3, xb, use_reentrant=False)
            else:
                body = b[:6]
                yb = b[6:](checkpoint(body, xb, use_reentrant=(mode == "reentrant")))
        assert yb.dtype == yt.dtype
        assert_close(yb, yt, 1e-2, f"step {step} output")
        yt.float().square().mean().backward()
        yb.float().square().mean().backward()
        assert_close(xb.grad, xt.grad, 1e-2, f"step {step} input grad", scale=xt.grad.abs().max().item())
    _assert_same_model(b, t, 1e-3, "checkpointed bf16", grads=True)
    assert all(int(m.num_batches_tracked) == 2 for m in b.modules() if isinstance(m, bnkit.BatchNorm))


# =========================================================================== SWA / EMA
def test_update_bn_recalibrates_an_all_bnkit_model_as_the_torch_model():
    """docs/differences.md: update_bn finds BN layers by isinstance(_BatchNorm); bnkit's BatchNorm1d/2d/3d are
    subclasses of torch's classes, so it resets them and takes their cumulative average, as on the torch model
    (the oracle), and bnkit.recalibrate(estimator="paper") gives the same statistics."""
    t, b = _twins()
    loader = _batches(3)
    swas = [AveragedModel(m) for m in (t, b)]
    paper = copy.deepcopy(swas[1])
    update_bn(loader, swas[0])
    update_bn(loader, swas[1])
    bnkit.recalibrate(paper, loader, estimator="paper")
    for i in (1, 4, 8):
        exp = swas[0].module[i]
        for got in (swas[1].module[i], paper.module[i]):
            for k in ("running_mean", "running_var"):
                assert_close(getattr(got, k), getattr(exp, k), 1e-5, f"{i} {k}")
        got = swas[1].module[i]
        assert got.momentum == exp.momentum == 0.1 and int(got.num_batches_tracked) == int(exp.num_batches_tracked) == 3
    assert not torch.equal(swas[1].module[4].running_var, b[4].running_var)  # the statistics did change


def test_update_bn_on_a_mixed_model_resets_and_averages_every_layer():
    """docs/differences.md: update_bn resets and averages torch's layers and bnkit's drop-ins alike."""
    t = _conv_net()
    mixed = copy.deepcopy(t)
    for i in (4, 8):
        mixed[i] = bnkit.convert(t[i])
    loader = _batches(3)
    oracle_avg = copy.deepcopy(t)
    update_bn(loader, oracle_avg)  # every torch layer: reset and cumulative average
    oracle_ema = copy.deepcopy(t).train()  # every layer: the usual EMA forwards, no reset
    with torch.no_grad():
        for x in loader:
            oracle_ema(x)
    update_bn(loader, mixed)
    # train-mode outputs use batch statistics only, so every layer sees the same inputs in all three models
    for i in (1, 4, 8):
        got, exp = mixed[i], oracle_avg[i]
        assert got.momentum == 0.1
        for k in ("running_mean", "running_var"):
            assert_close(getattr(got, k), getattr(exp, k), 1e-5, f"{i} {k}")
        assert int(got.num_batches_tracked) == int(exp.num_batches_tracked) == 3
    assert not torch.allclose(oracle_avg[4].running_var, oracle_ema[4].running_var)  # the two rules differ here


def test_swa_loop_recalibrated_with_paper_estimator_equals_update_bn_on_torch():
    t, b = _twins()
    swas = [AveragedModel(m) for m in (t, b)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (t, b)]
    data = _batches(4)
    for x in data:
        for m, opt, swa in zip((t, b), opts, swas):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
            swa.update_parameters(m)
    update_bn(data, swas[0])
    bnkit.recalibrate(swas[1], data, estimator="paper")
    for i in (1, 4, 8):
        for k in ("running_mean", "running_var"):
            assert_close(getattr(swas[1].module[i], k), getattr(swas[0].module[i], k), 1e-5, f"{i} {k}")
    for s in swas:
        s.eval()
    x = _batches(1, seed=77)[0]
    with torch.no_grad():
        assert_close(swas[1](x), swas[0](x), 1e-5, "swa eval output")


def _ema_update(ema, model, decay):
    with torch.no_grad():
        src = model.state_dict()
        for k, v in ema.state_dict().items():
            if v.is_floating_point():
                v.lerp_(src[k], 1 - decay)
            else:
                v.copy_(src[k])


@pytest.mark.parametrize("momentum", [0.1, None])
def test_ema_state_dict_lerp_copy_then_eval_matches_torch(momentum):
    t, b = _twins(momentum=momentum)
    emas = [copy.deepcopy(m).eval() for m in (t, b)]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (t, b)]
    for x in _batches(4):
        for m, opt, ema in zip((t, b), opts, emas):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
            _ema_update(ema, m, 0.8)
    _assert_same_model(emas[1], emas[0], 1e-5, "ema copy")
    x = _batches(1, seed=5)[0]
    with torch.no_grad():
        assert_close(emas[1](x), emas[0](x), 1e-5, "ema eval output")
    assert all(not m.training for m in emas[1].modules())


# =========================================================================== higher-order autograd
@pytest.mark.parametrize("training", [True, False])
def test_gradient_penalty_double_backward_loop_matches_torch(training):
    t, b = _twins(dtype=D)
    opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (t, b)]
    for x in _batches(2, dtype=D):
        grads = []
        for m, opt in zip((t, b), opts):
            m.train(training)
            opt.zero_grad()
            xi = x.clone().requires_grad_()
            loss = m(xi).square().sum()
            (gx,) = torch.autograd.grad(loss, xi, create_graph=True)
            (loss + gx.square().sum()).backward()
            opt.step()
            grads.append(xi.grad)
        assert_close(grads[1], grads[0], 1e-10, "input grad of the penalty")
    _assert_same_model(b, t, 1e-10, "after penalty steps", grads=True)


def _gg_layers():
    return {
        "1d": (lambda: nn.BatchNorm1d(3), lambda: bnkit.BatchNorm1d(3), (5, 3, 2)),
        "2d": (lambda: nn.BatchNorm2d(3), lambda: bnkit.BatchNorm2d(3), (3, 3, 2, 2)),
        "3d": (lambda: nn.BatchNorm3d(2), lambda: bnkit.BatchNorm3d(2), (2, 2, 2, 1, 2)),
        "ghost": (lambda: nn.BatchNorm1d(3), lambda: bnkit.GhostBatchNorm1d(3, virtual_batch_size=8), (5, 3, 2)),
        "renorm": (lambda: nn.BatchNorm1d(3), lambda: bnkit.BatchRenorm1d(3, r_max=1.0, d_max=0.0), (5, 3, 2)),
    }


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", sorted(_gg_layers()))
def test_gradgradcheck_layers_float64_with_torch_as_control(name, training):
    make_t, make_b, shape = _gg_layers()[name]
    x = torch.randn(shape, generator=_gen(3), dtype=D).requires_grad_()
    grads = []
    for make in (make_t, make_b):
        layer = make().double().train(training)
        with torch.no_grad():
            layer.running_mean.uniform_(-1, 1, generator=_gen(4))
            layer.running_var.uniform_(0.5, 2, generator=_gen(5))
            layer.weight.uniform_(0.5, 1.5, generator=_gen(6))
            layer.bias.uniform_(-0.5, 0.5, generator=_gen(7))

        def f(inp, layer=layer):
            return copy.deepcopy(layer)(inp)  # a fresh copy per call: every call sees the same state

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert torch.autograd.gradcheck(f, (x,))
            assert torch.autograd.gradgradcheck(f, (x,))
        y = f(x)
        (gx,) = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)
        grads.append(torch.autograd.grad(gx.square().sum(), x)[0])
    assert_close(grads[1], grads[0], 1e-9, "second-order input gradient")


@pytest.mark.parametrize("wrt", ["input", "weight"])
def test_hessian_of_a_training_layer_matches_torch(wrt):
    x = torch.randn(4, 3, 2, generator=_gen(8), dtype=D)
    hs = []
    for cls in PAIRS[1]:
        layer = cls(3).double().train()
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5, generator=_gen(9))
        if wrt == "input":
            def f(z, layer=layer):
                return copy.deepcopy(layer)(z).pow(3).sum()
            hs.append(torch.autograd.functional.hessian(f, x))
        else:
            def f(w, layer=layer):
                return functional_call(layer, {"weight": w}, (x,)).pow(3).sum()
            hs.append(torch.autograd.functional.hessian(f, layer.weight.detach().clone()))
    assert_close(hs[1], hs[0], 1e-10, f"hessian wrt {wrt}")


def test_maml_second_order_inner_step_through_functional_call_matches_torch():
    torch.manual_seed(0)
    t = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2)).double()
    b = bnkit.convert(t)
    g = _gen(11)
    tasks = [(torch.randn(6, 4, generator=g, dtype=D), torch.randn(6, 4, generator=g, dtype=D)) for _ in range(2)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (t, b)]
    for support, query in tasks:
        for m, opt in zip((t, b), opts):
            opt.zero_grad()
            params = dict(m.named_parameters())
            inner = functional_call(m, params, (support,)).pow(2).sum()
            grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
            fast = {k: v - 0.1 * gr for (k, v), gr in zip(params.items(), grads)}
            functional_call(m, fast, (query,)).pow(2).sum().backward()
            opt.step()
    _assert_same_model(b, t, 1e-10, "after 2 MAML steps", grads=True)
    assert int(b[1].num_batches_tracked) == 4


def test_anomaly_mode_training_step_is_clean_and_matches_torch():
    t, b = _twins()
    x = _batches(1)[0]
    with torch.autograd.set_detect_anomaly(True, check_nan=True):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for m in (t, b):
                xi = x.clone().requires_grad_()
                m(xi).square().mean().backward()
    _assert_same_model(b, t, 1e-5, "anomaly-mode step", grads=True)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_retain_graph_two_backwards_and_params_only_grad_match_torch(rank):
    shape = {1: (6, 3, 4), 2: (4, 3, 2, 3), 3: (2, 3, 2, 2, 3)}[rank]
    x = torch.randn(shape, generator=_gen(12), dtype=D)
    res = []
    for cls in PAIRS[rank]:
        layer = cls(3).double()
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5, generator=_gen(13))
        xi = x.clone().requires_grad_()
        loss = layer(xi).pow(3).sum()
        loss.backward(retain_graph=True)
        loss.backward()
        xj = x.clone()  # no input gradient: only the parameters
        gw, gb = torch.autograd.grad(layer(xj).pow(3).sum(), (layer.weight, layer.bias))
        res.append((xi.grad, layer.weight.grad, layer.bias.grad, gw, gb, layer.running_mean, layer.running_var))
        assert int(layer.num_batches_tracked) == 2
    for i, (a, e) in enumerate(zip(*reversed(res))):
        assert_close(a, e, 1e-10, f"item {i}")


# =========================================================================== determinism, no_grad, batch edges
def _deterministic_run(model, data):
    m = copy.deepcopy(model)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for x in data:
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()
    return m


def test_deterministic_algorithms_bitwise_reproducible_and_as_torch():
    t, b = _twins()
    data = _batches(3)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        r1, r2, rt = _deterministic_run(b, data), _deterministic_run(b, data), _deterministic_run(t, data)
    finally:
        torch.use_deterministic_algorithms(before)
    s1, s2 = r1.state_dict(), r2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    _assert_same_model(r1, rt, 1e-5, "deterministic run")


@pytest.mark.parametrize("ctx", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("which", ["convert", "ghost", "renorm"])
def test_training_forwards_without_grad_update_like_torch(which, ctx):
    t = _conv_net()
    b = bnkit.convert(t)
    if which != "convert":
        layer = _variant(which)
        layer.load_state_dict(t[4].state_dict(), strict=False)
        b[4] = layer
    cm = torch.no_grad if ctx == "no_grad" else torch.inference_mode
    for x in _batches(3):
        with cm():
            yt, yb = t(x), b(x)
        assert_close(yb, yt, 1e-5, "output")
        assert yb.requires_grad == yt.requires_grad
    _assert_same_model(b, t, 1e-5, f"{which} under {ctx}")


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_batch_of_one_value_per_channel_in_a_training_model_raises_value_error_like_torch(rank):
    shape = {1: (1, 3), 2: (1, 3, 1, 1), 3: (1, 3, 1, 1, 1)}[rank]
    torch.manual_seed(0)
    t = nn.Sequential(nn.Identity(), PAIRS[rank][0](3))
    b = bnkit.convert(t)
    x = torch.randn(shape)
    with pytest.raises(ValueError):
        t(x)
    before = copy.deepcopy(b.state_dict())
    with pytest.raises(ValueError):
        b(x)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in before.items())
    # documented (docs/differences.md, exception types): torch has already counted the batch when it raises
    assert int(t[1].num_batches_tracked) == int(b[1].num_batches_tracked) + 1 == 1
    assert torch.equal(t[1].running_mean, b[1].running_mean) and torch.equal(t[1].running_var, b[1].running_var)
    # one sample with several values per channel trains, as in torch
    x2 = torch.randn((1, 3, 4) if rank == 1 else (1, 3) + (2,) * rank)
    assert_close(b(x2), t(x2), 1e-5, "batch of one sample")
    for k in ("running_mean", "running_var"):
        assert_close(getattr(b[1], k), getattr(t[1], k), 1e-5, k)


def test_empty_batch_step_in_a_conv_model_matches_torch():
    t, b = _twins()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (t, b)]
    for x in (_batches(1)[0], torch.zeros(0, 3, 5, 5), _batches(1, seed=3)[0]):
        outs = []
        for m, opt in zip((t, b), opts):
            opt.zero_grad()
            xi = x.clone().requires_grad_()
            y = m(xi)
            y.square().sum().backward()
            opt.step()
            outs.append((y, xi.grad))
        assert outs[1][0].shape == outs[0][0].shape
        assert_close(outs[1][0], outs[0][0], 1e-5, "output")
        assert_close(outs[1][1], outs[0][1], 1e-5, "input grad", scale=outs[0][1].abs().max().item() if x.numel() else 1)
    _assert_same_model(b, t, 1e-5, "after an empty batch", grads=True)
    assert int(b[1].num_batches_tracked) == 3


def test_expanded_zero_stride_and_strided_inputs_in_training_match_torch():
    base = torch.randn(4, 3, 1, 5, generator=_gen(14))
    strided = torch.randn(4, 6, 5, 3, generator=_gen(15)).permute(0, 3, 1, 2)[:, :, 1:, ::2]
    gy = torch.randn(4, 3, 6, 5, generator=_gen(16))
    res = []
    for cls in PAIRS[2]:
        layer = cls(3)
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5, generator=_gen(17))
        xb = base.clone().requires_grad_()
        y1 = layer(xb.expand(4, 3, 6, 5))
        y1.backward(gy)
        xs = strided.clone().requires_grad_()  # a clone keeps the strides of the permuted slice
        y2 = layer(xs)
        y2.backward(gy[:, :, :5, :3])
        res.append((y1, xb.grad, y2, xs.grad, layer.weight.grad, layer.bias.grad, layer.running_mean,
                    layer.running_var))
    for i, (a, e) in enumerate(zip(res[1], res[0])):
        assert_close(a, e, 2e-5, f"item {i}")


def test_frozen_affine_requires_grad_false_training_step_matches_torch():
    t, b = _twins()
    for m in (t, b):
        for layer in m.modules():
            if isinstance(layer, (*TORCH_BN, bnkit.BatchNorm)):
                layer.weight.requires_grad_(False)
                layer.bias.requires_grad_(False)
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1) for m in (t, b)]
    for x in _batches(2):
        for m, opt in zip((t, b), opts):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    _assert_same_model(b, t, 1e-5, "frozen BN affine", grads=True)
    assert all(m.weight.grad is None for m in b.modules() if isinstance(m, bnkit.BatchNorm))
    x = torch.randn(4, 4, 2, 2, generator=_gen(18))
    ys = [m[1](x) for m in (t, b)]  # nothing requires a gradient: no graph, as torch
    assert ys[1].requires_grad == ys[0].requires_grad
    assert (ys[1].grad_fn is None) == (ys[0].grad_fn is None)


# =========================================================================== optimizers: clipping and param groups
def _groups(model, torch_side):
    if torch_side:
        bn = [p for m in model.modules() if isinstance(m, TORCH_BN) for p in m.parameters(recurse=False)]
    else:
        bn = bnkit.bn_parameters(model)
    ids = {id(p) for p in bn}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": rest, "weight_decay": 0.1}, {"params": bn, "weight_decay": 0.0}]


@pytest.mark.parametrize("fuse", [False, True])
def test_adamw_no_decay_bn_groups_and_clip_grad_norm_loop_matches_torch(fuse):
    t, b = _twins(fuse=fuse)
    gt, gb = _groups(t, True), _groups(b, False)
    assert [len(g["params"]) for g in gb] == [len(g["params"]) for g in gt] == [5, 6]
    opts = [torch.optim.AdamW(g, lr=1e-2) for g in (gt, gb)]
    for x in _batches(3):
        norms = []
        for m, opt in zip((t, b), opts):
            opt.zero_grad()
            m(x).square().mean().backward()
            norms.append(nn.utils.clip_grad_norm_(m.parameters(), 0.5))
            opt.step()
        assert_close(norms[1], norms[0], 1e-5, "total grad norm")
    _assert_same_model(b, t, 1e-5, "AdamW with no-decay BN groups", grads=True)
