"""DomainBatchNorm against its oracle: separate torch BN layers applied to each domain's slice of the batch."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bnkit
from bnkit.kernels import domain as kdomain

from _compare import assert_close

TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
DOMAIN_BN = {1: bnkit.DomainBatchNorm1d, 2: bnkit.DomainBatchNorm2d, 3: bnkit.DomainBatchNorm3d}


def _randomize(layer: bnkit.DomainBatchNorm, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("weight", "bias"):
            p = getattr(layer, name)
            if p is not None:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        if layer.running_mean is not None:
            layer.running_mean.copy_(torch.randn(layer.running_mean.shape, generator=g))
            layer.running_var.copy_(torch.rand(layer.running_var.shape, generator=g) + 0.5)
            layer.num_batches_tracked.copy_(torch.randint(0, 5, layer.num_batches_tracked.shape, generator=g))


def _oracle_layers(layer: bnkit.DomainBatchNorm, rank: int) -> list[nn.Module]:
    """One torch BN per domain holding that domain's parameters and statistics."""
    out = []
    for d in range(layer.num_domains):
        bn = TORCH_BN[rank](layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats,
                            dtype=torch.float64)
        with torch.no_grad():
            w, b = layer.domain_parameters(d)
            if w is not None:
                bn.weight.copy_(w)
                bn.bias.copy_(b)
            if layer.track_running_stats:
                bn.running_mean.copy_(layer.running_mean[d])
                bn.running_var.copy_(layer.running_var[d])
                bn.num_batches_tracked.copy_(layer.num_batches_tracked[d])
        bn.train(layer.training)
        out.append(bn)
    return out


def _compare(layer, x, dom, rank, *, tol=1e-5, backward=True):
    """Run the layer and the per-slice oracle (float64) on x; compare output, gradients and state."""
    layer.zero_grad(set_to_none=True)
    oracle = _oracle_layers(layer, rank)
    dom_t = torch.full((x.shape[0],), dom, dtype=torch.long) if isinstance(dom, int) else dom
    x1 = x.detach().clone().requires_grad_(True)
    y = layer(x1, domain=dom)
    grad = torch.randn_like(y)
    xd = x.detach().double()
    ys = torch.zeros_like(xd)
    gx = torch.zeros_like(xd)
    for d, bn in enumerate(oracle):
        idx = (dom_t == d).nonzero().flatten()
        if idx.numel() == 0:
            continue
        xs = xd[idx].clone().requires_grad_(True)
        yd = bn(xs)
        ys[idx] = yd.detach()
        if backward:
            yd.backward(grad.double()[idx])
            gx[idx] = xs.grad
    assert_close(y, ys, tol, "output", scale=10)
    if backward:
        y.backward(grad)
        assert_close(x1.grad, gx, tol * 10, "input grad", scale=10)
        for name in ("weight", "bias"):
            p = getattr(layer, name)
            if p is None or (layer.shared_affine and layer.num_domains > 1):
                continue
            for d, bn in enumerate(oracle):
                if (dom_t == d).any():
                    got = p.grad if p.dim() == 1 else p.grad[d]
                    want = getattr(bn, name).grad
                    assert_close(got, want, tol * 10, f"{name} grad of domain {d}", scale=10)
    if layer.track_running_stats:
        for d, bn in enumerate(oracle):
            assert_close(layer.running_mean[d], bn.running_mean, tol, f"running_mean[{d}]")
            assert_close(layer.running_var[d], bn.running_var, tol, f"running_var[{d}]")
            assert int(layer.num_batches_tracked[d]) == int(bn.num_batches_tracked), f"num_batches_tracked[{d}]"
    return y


def _shapes(rank, n, c=3):
    return {1: (n, c), 2: (n, c, 4, 5), 3: (n, c, 2, 3, 3)}[rank]


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_mixed_batch_equals_per_domain_layers(backend, rank):
    torch.manual_seed(rank)
    layer = DOMAIN_BN[rank](3, num_domains=4)
    _randomize(layer)
    n = 12 if rank == 1 else 6
    dom = torch.tensor([0, 2, 1, 0, 2, 1, 0, 2, 1, 0, 2, 1][:n])  # domain 3 absent
    before = (layer.running_mean[3].clone(), layer.running_var[3].clone(), int(layer.num_batches_tracked[3]))
    _compare(layer, torch.randn(_shapes(rank, n)) * 2 + 1, dom, rank)
    # the absent domain's state is exactly unchanged
    assert torch.equal(layer.running_mean[3], before[0]) and torch.equal(layer.running_var[3], before[1])
    assert int(layer.num_batches_tracked[3]) == before[2]
    layer.eval()
    _compare(layer, torch.randn(_shapes(rank, 5)), torch.tensor([3, 0, 1, 3, 2]), rank)


def test_int_domain_and_channels_last(backend):
    torch.manual_seed(1)
    layer = bnkit.DomainBatchNorm2d(5, num_domains=3)
    _randomize(layer)
    _compare(layer, torch.randn(4, 5, 3, 3), 1, 2)
    x = torch.randn(6, 5, 4, 4).to(memory_format=torch.channels_last)
    y = _compare(layer, x, torch.tensor([0, 2, 2, 0, 1, 1]), 2)
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("options", [
    {"momentum": None}, {"track_running_stats": False}, {"affine": False}, {"shared_affine": True},
])
def test_options_match_oracle(backend, options):
    torch.manual_seed(2)
    layer = bnkit.DomainBatchNorm1d(4, num_domains=3, **options)
    _randomize(layer)
    for step in range(3):  # several steps: the cumulative average counts per domain
        dom = torch.tensor([0, 0, 1, 1, 1, 0, 2, 2] if step != 1 else [0, 1, 0, 1, 0, 1, 0, 1])
        _compare(layer, torch.randn(8, 4, 3), dom, 1)
    if options.get("momentum", 0.1) is None:
        assert layer.num_batches_tracked.tolist() != [0, 0, 0]
    layer.eval()
    _compare(layer, torch.randn(5, 4, 3), torch.tensor([2, 1, 0, 0, 2]), 1)


def test_shared_affine_gradient_is_summed_over_domains():
    torch.manual_seed(3)
    layer = bnkit.DomainBatchNorm1d(4, num_domains=2, shared_affine=True)
    assert layer.weight.shape == (4,)
    x = torch.randn(8, 4, requires_grad=True)
    dom = torch.tensor([0, 1] * 4)
    g = torch.randn(8, 4)
    layer(x, domain=dom).backward(g)
    want_w = torch.zeros(4)
    for d in range(2):
        xs = x.detach()[dom == d]
        xhat = (xs - xs.mean(0)) / (xs.var(0, unbiased=False) + layer.eps).sqrt()
        want_w += (g[dom == d] * xhat).sum(0)
    assert_close(layer.weight.grad, want_w, 1e-5, "shared weight grad")
    assert_close(layer.bias.grad, g.sum(0), 1e-5, "shared bias grad")


@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_float64(channels_last):
    torch.manual_seed(4)
    layer = bnkit.DomainBatchNorm2d(3, num_domains=3).double()
    _randomize(layer)
    x = torch.randn(5, 3, 2, 3, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    dom = torch.tensor([0, 2, 0, 2, 2])
    w, b = layer.weight, layer.bias

    def f(x, w, b):
        return bnkit.engine.domain_module_call(layer.call_spec(), x, dom, 3, w, b, None, None, None, True)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_cpp_kernel_matches_torch_ops():
    if not kdomain.domain_cpp_available():
        pytest.skip("the C++ extension is not available")
    torch.manual_seed(5)
    for shape, rows in (((6, 4, 7), 1), ((12, 4, 1), 3), ((8, 5, 33), 2)):
        x3 = torch.randn(shape) * 3 + 100  # a large mean: the shifted sums must not cancel
        dom = torch.randint(0, 3, (shape[0] // rows,))
        w, b = torch.randn(3, shape[1]), torch.randn(3, shape[1])
        y, mean, var, count = torch.ops.bnkit.domain_train(x3, dom, rows, 3, w, b, 1e-5)
        y2, mean2, var2, count2 = kdomain.torch_domain_train_forward(x3.double(), dom, rows, 3, w.double(),
                                                                     b.double(), 1e-5)
        present = count2 > 0
        assert torch.equal(count, count2)
        assert_close(mean[present], mean2[present], 1e-6, "mean")
        assert_close(var[present], var2[present], 1e-4, "var")
        assert_close(y, y2, 1e-4, "y", scale=10)


def test_single_sample_domain_raises_and_changes_nothing():
    layer = bnkit.DomainBatchNorm1d(3, num_domains=2)
    state = copy.deepcopy(layer.state_dict())
    with pytest.raises(ValueError, match="domain 1"):
        layer(torch.randn(4, 3), domain=torch.tensor([0, 0, 0, 1]))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k
    # with more values per channel (N, C, L) one sample is enough, as for torch's BN
    layer(torch.randn(4, 3, 2), domain=torch.tensor([0, 0, 0, 1]))
    assert layer.num_batches_tracked.tolist() == [1, 1]


@pytest.mark.parametrize("bad, error", [
    (5, IndexError), (-1, IndexError), (torch.tensor([0, 1, 2, 0]), IndexError), (1.0, TypeError),
    (torch.tensor([0.0, 1.0, 0.0, 1.0]), TypeError), (torch.tensor([True, False, True, False]), TypeError),
    (torch.tensor([0, 1, 0]), ValueError), (torch.tensor([[0, 1], [0, 1]]), ValueError), ("0", TypeError),
])
def test_bad_domain_is_a_clear_error_and_changes_nothing(bad, error):
    layer = bnkit.DomainBatchNorm1d(3, num_domains=2)
    state = copy.deepcopy(layer.state_dict())
    with pytest.raises(error, match="domain"):
        layer(torch.randn(4, 3), domain=bad)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_bad_input_and_arguments():
    layer = bnkit.DomainBatchNorm2d(3, num_domains=2)
    with pytest.raises(ValueError, match="expected 4D input"):
        layer(torch.randn(4, 3), domain=0)
    with pytest.raises(RuntimeError, match="expected 3 features"):
        layer(torch.randn(4, 5, 2, 2), domain=torch.tensor([0, 1, 0, 1]))
    with pytest.raises(TypeError, match="domain=d"):
        layer(torch.randn(4, 3, 2, 2))
    with pytest.raises(ValueError, match="num_domains"):
        bnkit.DomainBatchNorm2d(3, num_domains=0)
    with pytest.raises(ValueError, match="axis cannot be 0"):
        bnkit.DomainBatchNorm(3, 2, axis=0)
    assert layer.num_batches_tracked.tolist() == [0, 0]


def test_generic_axis_channels_last_features():
    torch.manual_seed(6)
    layer = bnkit.DomainBatchNorm(4, 2, axis=-1)
    x = torch.randn(6, 5, 4)  # (N, L, C)
    dom = torch.tensor([0, 1, 1, 0, 1, 0])
    y = layer(x, domain=dom)
    for d in range(2):
        xs = x[dom == d].reshape(-1, 4)
        want = (xs - xs.mean(0)) / (xs.var(0, unbiased=False) + 1e-5).sqrt()
        assert_close(y[dom == d].reshape(-1, 4), want, 1e-5, f"domain {d}")
        assert_close(layer.running_mean[d], 0.1 * xs.mean(0), 1e-6, "running_mean")


def test_set_domain_and_context_manager():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    dmodel = bnkit.convert_domain_bn(model, 3)
    assert isinstance(dmodel[1], bnkit.DomainBatchNorm2d) and isinstance(model[1], nn.BatchNorm2d)
    x = torch.randn(4, 2, 3, 3)
    with bnkit.domain(dmodel, 2):
        dmodel(x)
    assert dmodel[1].num_batches_tracked.tolist() == [0, 0, 1]
    assert dmodel[1].current_domain is None
    bnkit.set_domain(dmodel, torch.tensor([0, 1, 0, 1]))
    dmodel(x)
    assert dmodel[4].num_batches_tracked.tolist() == [1, 1, 1]
    with pytest.raises(IndexError):
        bnkit.set_domain(dmodel, 3)
    assert torch.equal(dmodel[1].current_domain, torch.tensor([0, 1, 0, 1]))  # unchanged by the failed call
    with pytest.raises(ValueError, match="no DomainBatchNorm"):
        bnkit.set_domain(model, 0)


@pytest.mark.parametrize("source", ["torch", "bnkit"])
def test_convert_copies_every_domain_and_eval_equals_original(source):
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 5),
                          nn.BatchNorm1d(5))
    for _ in range(3):
        model(torch.randn(8, 2, 4, 4))
    if source == "bnkit":
        model = bnkit.convert(model)
    model.eval()
    dmodel = bnkit.convert_domain_bn(model, 3)
    assert isinstance(dmodel[5], bnkit.DomainBatchNorm1d) and not dmodel[5].training
    assert dmodel[1].num_batches_tracked.tolist() == [3, 3, 3]
    x = torch.randn(6, 2, 4, 4)
    want = model(x)
    for d in (0, 2):
        assert_close(_with(dmodel, d, x), want, 1e-6, f"domain {d}")
    assert_close(_with(dmodel, torch.tensor([0, 1, 2, 2, 1, 0]), x), want, 1e-6, "mixed")
    shared = bnkit.convert_domain_bn(model, 2, shared_affine=True)
    assert shared[1].weight.shape == (4,)
    assert_close(_with(shared, 1, x), want, 1e-6, "shared affine")


def _with(model, d, x):
    with bnkit.domain(model, d):
        return model(x)


def test_select_domain_and_fuse_equal_the_eval_domain_model():
    torch.manual_seed(9)
    dmodel = bnkit.convert_domain_bn(nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), 3)
    for d in range(3):  # make the domains differ
        with bnkit.domain(dmodel, d):
            for _ in range(2):
                dmodel(torch.randn(8, 2, 5, 5) * (d + 1) + d)
    with torch.no_grad():
        dmodel[1].weight.copy_(torch.randn(3, 4))
    dmodel.eval()
    x = torch.randn(4, 2, 5, 5)
    for d in range(3):
        plain = bnkit.select_domain(dmodel, d)
        assert type(plain[1]) is bnkit.BatchNorm2d
        want = _with(dmodel, d, x)
        assert_close(plain(x), want, 1e-6, f"select_domain({d})")
        fused = bnkit.fuse(plain)
        assert not any(isinstance(m, (bnkit.BatchNorm, bnkit.Affine)) for m in fused.modules())
        assert_close(fused(x), want, 1e-5, f"fused domain {d}")
        scale, shift = dmodel[1].inference_affine(domain=d)
        assert_close(plain[1].inference_affine()[0], scale, 1e-7, "scale")
        assert_close(plain[1].inference_affine()[1], shift, 1e-7, "shift")
    with pytest.raises(RuntimeError, match="one inference form per domain"):
        dmodel[1].inference_affine()
    with pytest.warns(UserWarning, match="per domain"):
        left = bnkit.fuse(dmodel)  # fuse itself leaves the per-domain layer, saying why
    assert any(isinstance(m, bnkit.DomainBatchNorm2d) for m in left.modules())
    with pytest.raises(ValueError, match="per domain"):
        bnkit.freeze(dmodel)


def test_state_dict_round_trip_and_wrong_num_domains():
    torch.manual_seed(10)
    layer = bnkit.DomainBatchNorm2d(3, num_domains=4)
    _randomize(layer)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    other = bnkit.DomainBatchNorm2d(3, num_domains=4)
    other.load_state_dict(torch.load(buf))
    for k, v in layer.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    wrong = bnkit.DomainBatchNorm2d(3, num_domains=2)
    before = copy.deepcopy(wrong.state_dict())
    with pytest.raises(RuntimeError, match="num_domains=2"):
        wrong.load_state_dict(layer.state_dict())
    for k, v in wrong.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(RuntimeError, match="convert_domain_bn"):
        wrong.load_state_dict(nn.BatchNorm2d(3).state_dict())


def test_empty_batch_and_nonfinite_raise():
    layer = bnkit.DomainBatchNorm1d(3, num_domains=2, nonfinite="raise")
    y = layer(torch.randn(0, 3), domain=torch.zeros(0, dtype=torch.long))
    assert y.shape == (0, 3) and layer.num_batches_tracked.tolist() == [0, 0]
    x = torch.randn(6, 3)
    x[5, 1] = float("nan")
    with pytest.raises(FloatingPointError):
        layer(x, domain=torch.tensor([0, 0, 0, 1, 1, 1]))
    assert layer.num_batches_tracked.tolist() == [0, 0]
    assert torch.equal(layer.running_mean, torch.zeros(2, 3))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 10), d=st.integers(1, 4), seed=st.integers(0, 2**16), rank=st.sampled_from([1, 2]),
    channels_last=st.booleans(),
)
def test_property_random_assignments_equal_per_slice_oracle(n, d, seed, rank, channels_last):
    g = torch.Generator().manual_seed(seed)
    dom = torch.randint(0, d, (n,), generator=g)
    x = torch.randn(_shapes(rank, n, 3), generator=g)
    if rank == 1:
        # (N, C) data needs two samples per present domain; make every present one have two
        counts = torch.bincount(dom, minlength=d)
        if (counts == 1).any():
            dom = torch.cat([dom, dom[counts[dom] == 1]])
            x = torch.cat([x, torch.randn(_shapes(rank, int((counts[dom[:n]] == 1).sum()), 3), generator=g)])
    elif channels_last:
        x = x.to(memory_format=torch.channels_last)
    layer = DOMAIN_BN[rank](3, num_domains=d)
    _randomize(layer, seed)
    _compare(layer, x, dom, rank)


def test_nonfinite_skip_is_per_domain():
    layer = bnkit.DomainBatchNorm1d(3, num_domains=2)
    x = torch.randn(6, 3)
    x[5, 1] = float("nan")
    dom = torch.tensor([0, 0, 0, 1, 1, 1])
    with pytest.warns(RuntimeWarning, match="not finite"):
        layer(x, domain=dom)
    assert_close(layer.running_mean[0], 0.1 * x[:3].mean(0), 1e-6, "domain 0 updated")
    assert torch.equal(layer.running_mean[1], torch.zeros(3)) and layer.num_batches_tracked.tolist() == [1, 0]


def test_update_hook_sees_one_call_per_present_domain():
    """With a running-update hook installed, each present domain's row goes through engine.running_update."""
    torch.manual_seed(11)
    x, dom = torch.randn(8, 3, 2), torch.tensor([0, 2, 0, 2, 2, 0, 0, 2])
    plain = bnkit.DomainBatchNorm1d(3, num_domains=3, momentum=None)
    hooked = copy.deepcopy(plain)
    plain(x, domain=dom)
    seen = []
    previous = bnkit.engine.set_running_update_hook(lambda spec, rm, rv, nbt, mean, var, count: seen.append(count))
    try:
        hooked(x, domain=dom)
    finally:
        bnkit.engine.set_running_update_hook(previous)
    assert seen == [8, 8]  # domains 0 and 2, 4 samples of 2 values each
    for k, v in plain.state_dict().items():
        assert_close(hooked.state_dict()[k], v, 1e-6, k)


def test_forward_mode_ad_uses_the_portable_ops():
    """Under torch.func transforms the per-domain forward is made of torch ops, so jvp works (vs finite differences)."""
    torch.manual_seed(12)
    layer = bnkit.DomainBatchNorm1d(3, num_domains=2, track_running_stats=False).double()
    x, v = torch.randn(6, 3, 2, dtype=torch.float64), torch.randn(6, 3, 2, dtype=torch.float64)
    dom = torch.tensor([0, 1, 1, 0, 1, 0])

    def f(t):
        return layer(t, domain=dom)

    _, tangent = torch.func.jvp(f, (x,), (v,))
    h = 1e-6
    assert_close(tangent, (f(x + h * v) - f(x - h * v)) / (2 * h), 1e-6, "jvp")


def test_dtype_mismatch_is_the_engines_error():
    layer = bnkit.DomainBatchNorm1d(3, num_domains=2)
    with pytest.raises(bnkit.DtypeMismatchError):
        layer(torch.randn(4, 3, dtype=torch.float64), domain=torch.tensor([0, 1, 0, 1]))
    with pytest.raises(bnkit.DtypeMismatchError):
        layer(torch.randn(4, 3, dtype=torch.float64), domain=1)  # the one door's own check
    assert layer.num_batches_tracked.tolist() == [0, 0]


def test_recalibrate_reestimates_the_current_domain_only():
    torch.manual_seed(13)
    dmodel = bnkit.convert_domain_bn(nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), 3).eval()
    data = [torch.randn(8, 2, 5, 5) * 2 + 1 for _ in range(3)]
    before = dmodel[1].running_mean.clone(), dmodel[1].running_var.clone()
    want = bnkit.recalibrate(bnkit.select_domain(dmodel, 1), data)  # the oracle: a plain model of domain 1
    with bnkit.domain(dmodel, 1):
        bnkit.recalibrate(dmodel, data)
    assert_close(dmodel[1].running_mean[1], want[1].running_mean, 1e-6, "running_mean[1]")
    assert_close(dmodel[1].running_var[1], want[1].running_var, 1e-6, "running_var[1]")
    for d in (0, 2):  # other domains exactly unchanged
        assert torch.equal(dmodel[1].running_mean[d], before[0][d]) and torch.equal(dmodel[1].running_var[d], before[1][d])
