"""convert(fuse_activations=True) beyond nn.Sequential: activations called in a module's forward.

Oracle: the same model with torch's BN layers (outputs, parameter gradients,
running statistics, eval outputs), and torch's own activation modules for the
shared clamps; the fusion itself is checked by counting the activation's
computations (torch's forward runs fewer times).
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnkit
from bnkit import kernels
from bnkit.kernels import cpp
from bnkit.variants import BatchNormAct2d
from bnkit.variants.act import ReLUAfterFusedBN, after_fused_bn
from _compare import assert_close

if not cpp.available():  # pragma: no cover - depends on the machine
    pytest.skip(f"the C++ extension cannot be built here: {cpp.build_error()}", allow_module_level=True)


@pytest.fixture(autouse=True)
def _cpp_backend():
    with kernels.use_backend("cpp"):
        yield


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: one ReLU module, called after bn1 and after the residual sum."""

    def __init__(self, cin: int = 4, cout: int = 6, stride: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: the shared ReLU after bn1, bn2 and the residual sum."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, c, 1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU6()  # not in place, and a ReLU6: still a clamp

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + x)


class TimmStyle(nn.Module):
    """Separate activation modules (timm's blocks): act1 is called once, on bn1's output; act2 on the sum."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.SiLU()
        self.conv2, self.bn2, self.act2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.SiLU()

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(out)) + x)


class IdentityBetween(nn.Module):
    """timm's ResNet blocks: bn1, then nn.Identity placeholders (drop_block), then act1; a hooked Identity stops it."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.bn1, self.drop_block, self.act1 = nn.BatchNorm2d(c), nn.Identity(), nn.ReLU(inplace=True)
        self.bn2, self.watched, self.act2 = nn.BatchNorm2d(c), nn.Identity(), nn.ReLU()
        self.watched.register_forward_hook(lambda m, i, o: None)

    def forward(self, x):
        x = self.act1(self.drop_block(self.bn1(x)))
        return self.act2(self.watched(self.bn2(x)))


class SharedSiLU(nn.Module):
    """One SiLU called twice: SiLU applied twice is not SiLU, so the hand-over is not offered."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.SiLU()

    def forward(self, x):
        return self.act(self.act(self.bn(self.conv(x))) + x)


class Functional(nn.Module):
    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.bn, self.relu = nn.BatchNorm2d(c), nn.ReLU()

    def forward(self, x):
        return self.relu(F.relu(self.bn(x)) - 0.5)


class TwoUsers(nn.Module):
    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.bn, self.relu = nn.BatchNorm2d(c), nn.ReLU()

    def forward(self, x):
        y = self.bn(x)
        return self.relu(y) + y


class Untraceable(nn.Module):
    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.bn, self.relu = nn.BatchNorm2d(c), nn.ReLU()

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.relu(self.bn(x))
        return self.relu(self.bn(-x))


CASES = {  # model, input channels, expected fused (BN, activation) pairs
    "basic_block": (BasicBlock, 4, [("bn1", "relu")]),
    "bottleneck": (Bottleneck, 8, [("bn1", "relu"), ("bn2", "relu")]),
    "timm_style": (TimmStyle, 6, [("bn1", "act1")]),
    "identity_between": (IdentityBetween, 6, [("bn1", "act1")]),
    "shared_silu": (SharedSiLU, 6, []),
    "functional": (Functional, 6, []),
    "two_users": (TwoUsers, 6, []),
    "untraceable": (Untraceable, 6, []),
}


def make(case: str, seed: int = 0) -> nn.Module:
    cls, _, _ = CASES[case]
    torch.manual_seed(seed)
    model = cls()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def assert_same_training(ref: nn.Module, new: nn.Module, x: torch.Tensor, steps: int = 2) -> None:
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.01)
    opt_n = torch.optim.SGD(new.parameters(), lr=0.01)
    for step in range(steps):
        xs = x + 0.5 * step
        yr, yn = ref(xs), new(xs)
        assert_close(yn, yr, 2e-5, f"step {step} output")
        w = torch.randn(yr.shape, generator=torch.Generator().manual_seed(step))
        (yr * w).sum().backward()
        (yn * w).sum().backward()
        for (name, p), q in zip(ref.named_parameters(), new.parameters()):
            assert_close(q.grad, p.grad, 2e-4, f"step {step} {name}.grad")
        opt_r.step(), opt_n.step()
        opt_r.zero_grad(), opt_n.zero_grad()
    for (name, b), c in zip(ref.named_buffers(), new.buffers()):
        assert_close(c, b, 1e-5, name)
    ref.eval(), new.eval()
    assert_close(new(x), ref(x), 2e-5, "eval output")
    # eval mode in a graph (the statistics frozen; input and parameter gradients)
    xr, xn = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yn = ref(xr), new(xn)
    w = torch.randn(yr.shape, generator=torch.Generator().manual_seed(steps))
    (yr * w).sum().backward()
    (yn * w).sum().backward()
    assert_close(xn.grad, xr.grad, 2e-4, "eval-mode input gradient")
    for (name, p), q in zip(ref.named_parameters(), new.parameters()):
        assert_close(q.grad, p.grad, 2e-4, f"eval-mode {name}.grad")
    ref.zero_grad(), new.zero_grad()
    with torch.inference_mode():
        assert_close(new(x), ref(x), 2e-5, "inference-mode output")


@pytest.mark.parametrize("case", sorted(CASES))
def test_traced_fusion_equals_the_torch_model(case):
    ref = make(case)
    new, report = bnkit.convert(ref, fuse_activations=True, report=True)
    assert report.fused == CASES[case][2]
    assert not report.left and len(report.converted) == sum(isinstance(m, nn.BatchNorm2d) for m in ref.modules())
    assert list(new.state_dict()) == list(ref.state_dict())
    for bn_name, _ in report.fused:
        assert isinstance(new.get_submodule(bn_name), BatchNormAct2d)
    torch.manual_seed(1)
    assert_same_training(ref, new, torch.randn(4, CASES[case][1], 6, 6))


def count_clamps(monkeypatch) -> list:
    calls: list = []
    for cls in (nn.ReLU, nn.ReLU6):
        original = cls.forward
        monkeypatch.setattr(cls, "forward", lambda self, x, _f=original: (calls.append(type(self)), _f(self, x))[1])
    return calls


def test_the_shared_relu_computes_only_after_the_residual_sum(monkeypatch):
    ref = make("basic_block")
    new = bnkit.convert(ref, fuse_activations=True)
    assert type(new.relu) is ReLUAfterFusedBN and new.bn1.act is new.relu and new.relu.inplace
    calls = count_clamps(monkeypatch)
    x = torch.randn(4, 4, 6, 6)
    ref(x)
    assert len(calls) == 2
    calls.clear()
    new(x).sum().backward()
    assert len(calls) == 1  # bn1's ReLU ran inside the BN kernels
    calls.clear()
    with torch.inference_mode():
        new.eval()(x)
    assert len(calls) == 1
    big = make("bottleneck")
    calls.clear()
    bnkit.convert(big, fuse_activations=True)(torch.randn(2, 8, 5, 5))
    assert len(calls) == 1


def test_the_shared_clamp_computes_whenever_the_hand_over_does_not_apply():
    new = bnkit.convert(make("basic_block"), fuse_activations=True)
    x = torch.randn(4, 6, 3, 3)
    assert_close(new.relu(x.clone()), torch.relu(x), 0, "a call on another tensor")
    y = new.bn1(torch.randn(4, 6, 3, 3))
    assert y.min() >= 0  # the fused layer applied the ReLU
    assert new.relu(y) is y  # ... and the shared module hands it on
    z = new.bn1(torch.randn(4, 6, 3, 3))
    z.sub_(0.5)  # edited in place since: the ReLU is computed
    assert (new.relu(z.clone()) >= 0).all() and new.relu(z).min() == 0
    w = new.bn1(torch.randn(4, 6, 3, 3))
    new.bn1(torch.randn(4, 6, 3, 3))  # a later output takes the hand-over
    w.sub_(1.0)
    assert new.relu(w).min() == 0


def test_hooks_on_the_shared_activation_fire_as_on_the_torch_model():
    ref = make("basic_block")
    new = bnkit.convert(ref, fuse_activations=True)
    seen = {"ref": [], "new": []}
    ref.relu.register_forward_hook(lambda m, i, o: seen["ref"].append(i[0].clone()))
    new.relu.register_forward_hook(lambda m, i, o: seen["new"].append(i[0].clone()))
    x = torch.randn(4, 4, 6, 6)
    assert_close(new(x), ref(x), 2e-5, "output with hooks")
    assert len(seen["new"]) == len(seen["ref"]) == 2
    for a, b in zip(seen["new"], seen["ref"]):
        assert_close(a, b, 2e-5, "the activation's input")


def test_split_back_to_torch_and_checkpoints():
    ref = make("bottleneck")
    new = bnkit.convert(ref, fuse_activations=True)
    back, report = bnkit.convert(new, to="torch", report=True)
    assert str(back) == str(ref) and report.fused == [("bn1", "relu"), ("bn2", "relu")]
    assert type(back.relu) is nn.ReLU6 and not back.relu.inplace
    assert all(type(m) in (nn.Conv2d, nn.BatchNorm2d, nn.ReLU6, Bottleneck) for m in back.modules())
    x = torch.randn(2, 8, 5, 5)
    assert_close(back(x), ref(x), 2e-5, "split model")
    fresh = make("bottleneck", seed=3)
    fresh.load_state_dict(new.state_dict())
    assert_close(fresh(x), ref(x), 2e-5, "torch model from the fused checkpoint")
    buffer = io.BytesIO()
    torch.save(new, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.relu) is type(new.relu) and loaded.bn1.act is loaded.relu
    assert_close(loaded(x), new(x), 0, "pickled model")
    assert pickle.loads(pickle.dumps(copy.deepcopy(new))).bn2.act is not None
    broken = bnkit.convert(ref, fuse_activations=True)
    broken.relu = nn.ReLU6()  # the shared module the fused layers hand over to is gone
    with pytest.raises(ValueError, match="shared activation 'relu'"):
        bnkit.convert(broken, to="torch")


def test_after_fused_bn_takes_only_clamps():
    assert type(after_fused_bn(nn.ReLU(inplace=True))) is ReLUAfterFusedBN
    h = after_fused_bn(nn.Hardtanh(-2.0, 3.0))
    assert (h.min_val, h.max_val) == (-2.0, 3.0) and isinstance(h, nn.Hardtanh)
    assert after_fused_bn(nn.SiLU()) is None and after_fused_bn(nn.LeakyReLU()) is None


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_traced_fusion_under_jit_trace_export_and_compile():
    ref = make("basic_block")
    new = bnkit.convert(ref, fuse_activations=True).eval()
    ref.eval()
    x = torch.randn(4, 4, 6, 6)
    traced = torch.jit.trace(copy.deepcopy(new), x, check_trace=False)
    assert_close(traced(x + 1), ref(x + 1), 2e-5, "traced")
    exported = torch.export.export(copy.deepcopy(new), (x,))
    assert_close(exported.module()(x - 1), ref(x - 1), 2e-5, "exported")
    train = bnkit.convert(make("basic_block"), fuse_activations=True)
    oracle = make("basic_block")
    explanation = torch._dynamo.explain(copy.deepcopy(train))(x)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(train, backend="aot_eager")
    y = compiled(x)
    assert_close(y, oracle(x), 2e-5, "compiled output")
    y.square().sum().backward()
    oracle(x).square().sum().backward()
    for (name, p), q in zip(oracle.named_parameters(), train.parameters()):
        assert_close(q.grad, p.grad, 2e-4, f"compiled {name}.grad")


def test_fuse_and_freeze_of_a_traced_fusion_equal_the_torch_model():
    ref = make("basic_block")
    x = torch.randn(4, 4, 6, 6)
    new = bnkit.convert(ref, fuse_activations=True)
    new(x), ref(x)  # one training step's statistics
    ref.eval(), new.eval()
    expected = ref(x)
    folded = bnkit.fuse(copy.deepcopy(new))
    assert not any(isinstance(m, (nn.BatchNorm2d, bnkit.BatchNorm2d, BatchNormAct2d)) for m in folded.modules())
    assert_close(folded(x), expected, 2e-5, "fused into the convolutions")
    frozen = bnkit.freeze(copy.deepcopy(new))
    assert_close(frozen(x), expected, 2e-5, "frozen")
    with torch.inference_mode():
        assert_close(frozen(x), expected, 2e-5, "frozen, inference mode")


def test_timm_resnet_blocks_fuse_and_equal_the_torch_model():
    from _timm_stub import import_timm

    timm = import_timm()
    torch.manual_seed(0)
    ref = timm.create_model("resnet18", pretrained=False, num_classes=5)
    new, report = bnkit.convert(ref, fuse_activations=True, report=True)
    # the stem, and each block's bn1 -> drop_block (an nn.Identity) -> act1; bn2 goes to the residual sum
    assert len(report.fused) == 9 and ("layer1.0.bn1", "layer1.0.act1") in report.fused
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ref.double(), new.double()
    yr, yn = ref(x), new(x)
    assert_close(yn, yr, 1e-10, "timm resnet18 output")
    yr.sum().backward()
    yn.sum().backward()
    for (name, p), q in zip(ref.named_parameters(), new.parameters()):
        assert_close(q.grad, p.grad, 1e-9, f"{name}.grad")
    ref.eval(), new.eval()
    assert_close(new(x), ref(x), 1e-10, "timm resnet18 eval output")
