"""bnkit.fuse: folded models against the eval-mode original (torch BN as the oracle)."""

from __future__ import annotations


import pytest
import torch
from torch import nn

import bnkit
from bnkit.tools.fuse import Affine

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters for every BN layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, bnkit.BatchNorm)) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 2 + 0.2)
                if m.weight is not None:
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model


def bn_modules(model: nn.Module) -> list[nn.Module]:
    return [
        m
        for m in model.modules()
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, bnkit.BatchNorm, Affine))
        or hasattr(m, "inference_affine")
    ]


def assert_close(out, ref, dtype):
    tol = TOL[dtype]
    scale = ref.abs().max().item() + 1.0
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * scale)


CONV = {
    (1, False): nn.Conv1d,
    (2, False): nn.Conv2d,
    (3, False): nn.Conv3d,
    (1, True): nn.ConvTranspose1d,
    (2, True): nn.ConvTranspose2d,
    (3, True): nn.ConvTranspose3d,
}
TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SPATIAL = {1: (9,), 2: (7, 6), 3: (5, 4, 5)}


def _conv(d, transposed, cin, cout, groups, bias, before, dtype):
    cls = CONV[(d, transposed)]
    if transposed:
        if before:  # pointwise: the only transposed conv that reads each input once per output
            return cls(cin, cout, 1, stride=1, padding=0, groups=groups, bias=bias, dtype=dtype)
        return cls(cin, cout, 3, stride=2, padding=1, output_padding=1, groups=groups, bias=bias, dilation=1, dtype=dtype)
    if before:  # no padding; stride and dilation are fine
        return cls(cin, cout, 3, stride=2, padding=0, dilation=2 if d < 3 else 1, groups=groups, bias=bias, dtype=dtype)
    return cls(cin, cout, 3, stride=2, padding=2, dilation=2, groups=groups, bias=bias, padding_mode="reflect" if d == 2 else "zeros", dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("groups", [1, 3], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "convT"])
@pytest.mark.parametrize("d", [1, 2, 3], ids=lambda d: f"{d}d")
@pytest.mark.parametrize("before", [False, True], ids=["layer_bn", "bn_layer"])
def test_fuse_conv_patterns(d, transposed, groups, bias, dtype, before):
    torch.manual_seed(d * 100 + groups * 10 + bias)
    cin, cout = 6, 12
    conv = _conv(d, transposed, cin, cout, groups, bias, before, dtype)
    if before:
        model = nn.Sequential(TORCH_BN[d](cin, dtype=dtype), conv)
    else:
        model = nn.Sequential(conv, TORCH_BN[d](cout, dtype=dtype))
    randomize_bn(model).eval()
    x = torch.randn(3, cin, *SPATIAL[d], dtype=dtype)
    ref = model(x)
    fused, report = bnkit.fuse(model, report=True)
    assert bn_modules(fused) == []
    assert report.num_fused == 1 and report.unfused == []
    assert report.fused[0].position == ("before" if before else "after")
    out = fused(x)
    assert out.dtype == dtype
    assert_close(out, ref, dtype)
    # the original is untouched (inplace=False)
    assert bn_modules(model)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_fuse_linear_patterns(dtype, bias):
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(5, 8, bias=bias, dtype=dtype),
        nn.BatchNorm1d(8, dtype=dtype),
        nn.ReLU(),
        nn.BatchNorm1d(8, dtype=dtype),
        nn.Linear(8, 4, bias=bias, dtype=dtype),
    )
    randomize_bn(model).eval()
    x = torch.randn(7, 5, dtype=dtype)
    fused, report = bnkit.fuse(model, report=True)
    assert bn_modules(fused) == []
    assert sorted(p.position for p in report.fused) == ["after", "before"]
    assert_close(fused(x), model(x), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_fuse_bnkit_layers_any_axis(dtype):
    """bnkit BN-family layers fold too, including channels-last (axis=-1) after a Linear on 3-D input."""
    torch.manual_seed(2)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1, dtype=dtype)
            self.bn = bnkit.BatchNorm2d(4, dtype=dtype, share_affine="weight")
            self.lin = nn.Linear(4, 6, dtype=dtype)
            self.bn_last = bnkit.BatchNorm(6, axis=-1, dtype=dtype)
            self.bn_pre = bnkit.BatchNorm(6, axis=-1, dtype=dtype, bias=False)
            self.head = nn.Linear(6, 2, dtype=dtype)

        def forward(self, x):
            h = torch.relu(self.bn(self.conv(x)))  # (N, 4, H, W)
            h = h.permute(0, 2, 3, 1)  # channels last
            h = torch.relu(self.bn_last(self.lin(h)))
            return self.head(self.bn_pre(h))

    model = randomize_bn(Net()).eval()
    x = torch.randn(2, 3, 5, 4, dtype=dtype)
    # oracle: the same network with torch-computed BN (explicit eval formula)
    ref = model(x)
    fused, report = bnkit.fuse(model, report=True)
    assert bn_modules(fused) == []
    assert report.num_fused == 3
    assert_close(fused(x), ref, dtype)


def test_fuse_matches_torch_oracle_after_convert():
    """A bnkit model fused equals the torch-BN model it was converted from (torch as oracle)."""
    torch.manual_seed(3)
    tmodel = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
    randomize_bn(tmodel).eval()
    x = torch.randn(4, 3, 6, 6)
    fused = bnkit.fuse(bnkit.convert(tmodel, to="bnkit"))
    assert bn_modules(fused) == []
    assert_close(fused(x), tmodel(x), torch.float32)


class ResidualBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.bn_post = nn.BatchNorm2d(c)  # after the add: no adjacent linear layer
        self.bn_pad = nn.BatchNorm2d(c)  # before a padded conv: not exact
        self.conv3 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        y = self.bn_post(torch.relu(h + x))
        return self.conv3(self.bn_pad(y))


def test_nonfusable_bn_becomes_affine_with_reasons():
    torch.manual_seed(4)
    model = randomize_bn(ResidualBlock(4)).eval()
    x = torch.randn(2, 4, 5, 5)
    fused, report = bnkit.fuse(model, report=True)
    assert sorted(p.bn for p in report.fused) == ["bn1", "bn2"]
    unfused = {u.bn: u for u in report.unfused}
    assert set(unfused) == {"bn_post", "bn_pad"}
    assert all(u.replaced_by == "Affine" for u in unfused.values())
    assert "padding" in unfused["bn_pad"].reason
    kinds = [type(m) for m in fused.modules()]
    assert not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds)
    assert kinds.count(Affine) == 2
    assert_close(fused(x), model(x), torch.float32)
    assert "bn_post" in str(report) and fused.fuse_report is report


def test_conv_output_with_other_users_is_not_folded():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            h = self.conv(x)
            return self.bn(h) + h

    model = randomize_bn(Net()).eval()
    x = torch.randn(2, 3, 4, 4)
    fused, report = bnkit.fuse(model, report=True)
    assert report.fused == [] and report.unfused[0].replaced_by == "Affine"
    assert "other users" in report.unfused[0].reason
    assert_close(fused(x), model(x), torch.float32)


def test_shared_conv_is_copied_before_folding():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.conv(x * 2)

    model = randomize_bn(Net()).eval()
    x = torch.randn(2, 3, 4, 4)
    fused, report = bnkit.fuse(model, report=True)
    assert report.num_fused == 1 and bn_modules(fused) == []
    assert_close(fused(x), model(x), torch.float32)


class Untraceable(nn.Module):
    """Data-dependent control flow: symbolic tracing fails."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


def test_sequential_fallback_for_untraceable_models():
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, groups=3),
        nn.BatchNorm2d(6),
        Untraceable(),
        nn.BatchNorm2d(6),
        nn.Conv2d(6, 4, 1),
        nn.ReLU(),
        nn.BatchNorm2d(4),  # after a ReLU, before nothing: Affine
        nn.Sequential(nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2), nn.BatchNorm2d(4)),
    )
    randomize_bn(model).eval()
    x = torch.randn(2, 3, 5, 5)
    ref = model(x)
    fused, report = bnkit.fuse(model, report=True)
    assert isinstance(fused, nn.Sequential) and not isinstance(fused, torch.fx.GraphModule)
    assert ("", "sequential") in [(n, m) for n, m, _ in report.methods]
    assert sorted(str(p) for p in report.fused) == ["0 -> 1", "3 -> 4", "7.0 -> 7.1"]
    assert [u.bn for u in report.unfused] == ["6"]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    assert_close(fused(x), ref, torch.float32)


def test_untraceable_root_fuses_traceable_children():
    torch.manual_seed(6)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
            self.bn = nn.BatchNorm2d(4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            h = self.stem(x)
            if h.mean() > 0:  # data-dependent
                h = self.bn(h)
            return self.head(h.mean(dim=(2, 3)))

    model = randomize_bn(Net()).eval()
    x = torch.randn(2, 3, 6, 6) + 1
    fused, report = bnkit.fuse(model, report=True)
    assert isinstance(fused, Net)
    assert [str(p) for p in report.fused] == ["stem.0 -> stem.1"]
    assert isinstance(fused.bn, Affine)
    assert_close(fused(x), model(x), torch.float32)


def test_fuse_requires_eval_mode_and_keeps_bn_without_inference_form():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="eval"):
        bnkit.fuse(model)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    fused, report = bnkit.fuse(model, report=True)
    assert report.fused == [] and report.unfused[0].replaced_by is None
    assert "running statistics" in report.unfused[0].reason
    x = torch.randn(3, 3, 4, 4)
    torch.testing.assert_close(fused(x), model(x))


def test_fuse_is_idempotent_and_inplace():
    torch.manual_seed(7)
    model = randomize_bn(ResidualBlock(3)).eval()
    x = torch.randn(2, 3, 5, 5)
    ref = model(x)
    once = bnkit.fuse(model)
    twice, report = bnkit.fuse(once, report=True)
    assert report.num_fused == 0 and len(report.unfused) == 2
    assert_close(twice(x), ref, torch.float32)
    same = bnkit.fuse(model, inplace=True)
    assert_close(same(x), ref, torch.float32)


def test_fuse_variants_when_available():
    variants = pytest.importorskip("bnkit.variants")
    torch.manual_seed(8)

    class RNNish(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.bn = variants.SharedBatchNorm(4, sites=3)
            self.frozen = variants.FrozenBatchNorm1d(4)
            self.out = nn.Linear(4, 4)

        def forward(self, x):
            h = x
            for t in range(3):
                h = torch.tanh(self.bn(self.lin(h), site=t))
            return self.out(self.frozen(h))

    model = RNNish()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2)
        model.frozen.running_mean.normal_()
        model.frozen.running_var.uniform_(0.5, 2)
        model.frozen.weight.normal_()
    model.eval()
    model.frozen.train()  # frozen layers are the same in both modes
    x = torch.randn(5, 4)
    fused, report = bnkit.fuse(model, report=True)
    # each site's call folds into its own copy of the shared Linear; the frozen BN folds into `out`
    assert report.num_fused == 4 and report.unfused == []
    assert bn_modules(fused) == []
    assert_close(fused(x), model(x), torch.float32)


def test_affine_module_is_traceable():
    aff = Affine(torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0]), axis=1)
    gm = torch.fx.symbolic_trace(nn.Sequential(aff))
    x = torch.randn(3, 2, 4)
    torch.testing.assert_close(gm(x), x * torch.tensor([1.0, 2.0]).view(1, 2, 1) + torch.tensor([0.5, -1.0]).view(1, 2, 1))


def test_example_inputs_check_the_rank_next_to_linear():
    """BatchNorm1d on (N, C, L) next to a Linear over L: with C == L only the input rank tells it apart."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4))
    randomize_bn(model).eval()
    x2, x3 = torch.randn(5, 4), torch.randn(5, 4, 4)
    fused, report = bnkit.fuse(model, report=True)
    assert report.num_fused == 1 and "assumes a 2-D" in report.fused[0].note
    assert_close(fused(x2), model(x2), torch.float32)
    fused3, report3 = bnkit.fuse(model, report=True, example_inputs=x3)
    assert report3.fused == [] and report3.unfused[0].replaced_by == "Affine"
    assert_close(fused3(x3), model(x3), torch.float32)
    fused2, report2 = bnkit.fuse(model, report=True, example_inputs=(x2,))
    assert report2.num_fused == 1 and report2.fused[0].note == ""
    assert_close(fused2(x2), model(x2), torch.float32)


def test_shared_layers_are_copied_in_the_fallback():
    torch.manual_seed(10)
    conv = nn.Conv2d(3, 3, 1)
    model = nn.Sequential(conv, nn.BatchNorm2d(3), Untraceable(), conv)
    randomize_bn(model).eval()
    x = torch.randn(2, 3, 4, 4)
    fused, report = bnkit.fuse(model, report=True)
    assert report.num_fused == 1 and bn_modules(fused) == []
    assert_close(fused(x), model(x), torch.float32)


def test_fused_model_keeps_eval_flags():
    model = randomize_bn(ResidualBlock(3)).eval()
    fused = bnkit.fuse(model)
    assert not any(m.training for m in fused.modules())
