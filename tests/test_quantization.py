"""``torch.ao.quantization`` with bnkit layers: fusion, QAT, conversion (eager and FX).

Oracle: the same workflow on the torch-BN version of the same model: fused
module types, folded weights, fake-quantized training (parameters and
running statistics after each step) and the converted quantized model's
outputs. Variants without a torch equivalent are checked against bnkit's
own eager inference map.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.ao.quantization as tq
from _compare import assert_close
from torch import nn
from torch.ao.nn import intrinsic as nni

import bnkit
from bnkit.integrations.quantization import torch_batchnorm

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

TOL = 1e-6


class Net(nn.Module):
    """Conv-BN-ReLU, Conv-BN, a stand-alone BN, BN-ReLU and Linear-BN1d: every eager fusion pattern with BN."""

    def __init__(self, standalone: bool = True) -> None:
        super().__init__()
        self.quant = tq.QuantStub()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.bn3 = nn.BatchNorm2d(8) if standalone else nn.Identity()
        self.bn4 = nn.BatchNorm2d(8)
        self.relu4 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 6)
        self.bn5 = nn.BatchNorm1d(6)
        self.dequant = tq.DeQuantStub()

    def forward(self, x):
        x = self.quant(x)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.bn3(self.bn2(self.conv2(x)))
        x = self.relu4(self.bn4(x))
        x = self.pool(x).flatten(1)
        return self.dequant(self.bn5(self.fc(x)))


FUSE = [["conv1", "bn1", "relu1"], ["conv2", "bn2"], ["bn4", "relu4"], ["fc", "bn5"]]


def _models(standalone: bool = True):
    torch.manual_seed(0)
    torch_model = Net(standalone)
    with torch.no_grad():
        for m in torch_model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
    bnkit_model = bnkit.convert(torch_model)
    bnkit_model.load_state_dict(torch_model.state_dict())
    assert isinstance(bnkit_model.bn1, bnkit.BatchNorm2d) and isinstance(bnkit_model.bn5, bnkit.BatchNorm1d)
    return torch_model, bnkit_model


def _batch(i: int, n: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, 9, 9, generator=torch.Generator().manual_seed(i)) * 1.5 + 0.3


_AS_TORCH = {bnkit.BatchNorm1d: nn.BatchNorm1d, bnkit.BatchNorm2d: nn.BatchNorm2d}


def _types(model: nn.Module) -> list[tuple[str, type]]:
    """Module types by name; a bnkit layer left out of every pattern counts as its torch counterpart."""
    return [(name, _AS_TORCH.get(type(m), type(m))) for name, m in model.named_modules()]


def _assert_same_state(a: nn.Module, b: nn.Module, tol: float = TOL) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        if sa[k].is_quantized:
            assert torch.equal(sa[k].int_repr(), sb[k].int_repr()), k
            assert torch.equal(sa[k].q_per_channel_scales() if sa[k].qscheme() == torch.per_channel_affine
                               else torch.tensor(sa[k].q_scale()),
                               sb[k].q_per_channel_scales() if sb[k].qscheme() == torch.per_channel_affine
                               else torch.tensor(sb[k].q_scale())), k
        elif isinstance(sa[k], torch.Tensor):
            assert_close(sb[k], sa[k], tol, k)


def test_fuse_modules_eval_gives_torchs_modules():
    torch_model, bnkit_model = _models()
    torch_model.train()(_batch(0))  # non-trivial running statistics
    bnkit_model.train()(_batch(0))
    _assert_same_state(torch_model, bnkit_model, 1e-5)
    bnkit_model.load_state_dict(torch_model.state_dict())  # same bits, so the folds can be compared exactly
    ft = tq.fuse_modules(torch_model.eval(), FUSE)
    fb = tq.fuse_modules(bnkit_model.eval(), FUSE)
    assert _types(fb) == _types(ft)
    assert type(fb.conv1) is nni.ConvReLU2d and type(fb.conv2) is nn.Conv2d and type(fb.fc) is nn.Linear
    assert type(fb.relu4) is nn.Identity and type(fb.bn4) is nni.BNReLU2d
    _assert_same_state(ft, fb, 0.0)  # the folded weights are computed by torch's own functions
    x = _batch(1)
    assert_close(fb(x), ft(x), TOL, "fused output")


def test_fuse_modules_qat_gives_torchs_modules_sharing_parameters():
    torch_model, bnkit_model = _models()
    bn1_weight = bnkit_model.bn1.weight
    ft = tq.fuse_modules_qat(torch_model.train(), FUSE)
    fb = tq.fuse_modules_qat(bnkit_model.train(), FUSE, inplace=True)
    assert _types(fb) == _types(ft)
    assert type(fb.conv1) is nni.ConvBnReLU2d and type(fb.conv2) is nni.ConvBn2d and type(fb.fc) is nni.LinearBn1d
    assert fb.conv1[1].weight is bn1_weight  # an optimizer built before fusing still trains it
    assert isinstance(fb.bn3, bnkit.BatchNorm2d)  # not in a pattern: stays bnkit's
    _assert_same_state(ft, fb, 0.0)


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_qat_workflow_matches_torch(backend):
    if backend not in torch.backends.quantized.supported_engines:
        pytest.skip(f"quantized engine {backend} not available")
    # Every BN is in a fused pattern, so from prepare_qat on both models are torch's modules: exact equality.
    # (A stand-alone bnkit BN in QAT stays bnkit's and agrees to rounding only, which the fake
    # quantization can turn into one quantization step; its conversion is checked below.)
    torch_model, bnkit_model = _models(standalone=False)
    prepared = []
    for model in (torch_model, bnkit_model):
        fused = tq.fuse_modules_qat(model.train(), FUSE)
        fused.qconfig = tq.get_default_qat_qconfig(backend)
        prepared.append(tq.prepare_qat(fused))
    pt, pb = prepared
    assert type(pb.conv1).__module__.startswith("torch.ao.nn.intrinsic.qat")
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in prepared]
    for step in range(4):
        x = _batch(10 + step)
        losses = []
        for m, opt in zip(prepared, opts):
            opt.zero_grad()
            loss = m(x).square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        assert torch.equal(losses[1], losses[0]), f"step {step} loss"
        _assert_same_state(pt, pb, 0.0)
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = backend
    try:
        qt, qb = (tq.convert(m.eval()) for m in prepared)
        assert [type(m).__mro__[-3] for m in qb.modules()] == [type(m).__mro__[-3] for m in qt.modules()]
        x = _batch(99)
        yt, yb = qt(x), qb(x)
    finally:
        torch.backends.quantized.engine = old
    assert torch.equal(yb, yt)


def test_standalone_bn_ptq_matches_torch():
    torch.manual_seed(1)
    torch_model = nn.Sequential(tq.QuantStub(), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), tq.DeQuantStub())
    bnkit_model = bnkit.convert(torch_model)
    outs = []
    for model in (torch_model, bnkit_model):
        model.train()(_batch(0))
    assert_close(bnkit_model[2].running_var, torch_model[2].running_var, 1e-5, "running_var")
    bnkit_model.load_state_dict(torch_model.state_dict())  # the same bits: quantization can then be exact
    for model in (torch_model, bnkit_model):
        model.eval().qconfig = tq.get_default_qconfig("x86")
        prepared = tq.prepare(model)
        prepared(_batch(1))  # calibration
        q = tq.convert(prepared)
        outs.append((q, q(_batch(2))))
    assert type(outs[1][0][2]).__name__ == "QuantizedBatchNorm2d"
    # Calibration runs each float model in eval mode: bnkit's BN output is rounded differently from
    # ATen's (not bitwise, and depending on the thread count), so the BN output observers may pick
    # scales one rounding apart; the quantized outputs then agree within one quantization step.
    # (When the scales differ, nearly every dequantized value differs by a fraction of a step.)
    step = float(outs[0][0][2].scale)
    assert (outs[1][1] - outs[0][1]).abs().max().item() <= step * 1.01


def test_standalone_frozen_bn_ptq_matches_torch_within_one_step():
    # A frozen layer enters torch's quantized BN through its inference map (scale, shift): the same
    # function as torch's BN with the same statistics, rounded differently, so within one quantization step.
    torch.manual_seed(3)
    torch_model = nn.Sequential(tq.QuantStub(), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), tq.DeQuantStub())
    torch_model.train()(_batch(0))
    bnkit_model = bnkit.freeze(bnkit.convert(torch_model))
    assert isinstance(bnkit_model[2], bnkit.FrozenBatchNorm2d)
    outs = []
    for model in (torch_model, bnkit_model):
        model.eval().qconfig = tq.get_default_qconfig("x86")
        prepared = tq.prepare(model)
        prepared(_batch(1))
        q = tq.convert(prepared)
        outs.append(q(_batch(2)))
    step = float(q[2].scale)
    assert type(q[2]).__name__ == "QuantizedBatchNorm2d"
    assert (outs[1] - outs[0]).abs().max().item() <= step * 1.01
    assert (outs[1] != outs[0]).float().mean().item() < 0.05


def _trained_variant(layer: nn.Module) -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), layer, nn.ReLU())
    model.train()
    for i in range(3):
        model(_batch(i))
    return model.eval()


@pytest.mark.parametrize(
    "make",
    [
        lambda: bnkit.BatchNorm2d(4, share_affine="weight"),
        lambda: bnkit.BatchRenorm2d(4),
        lambda: bnkit.GhostBatchNorm2d(4, virtual_batch_size=4),
        lambda: bnkit.freeze(bnkit.BatchNorm2d(4)),
    ],
    ids=["shared", "renorm", "ghost", "frozen"],
)
def test_variants_fuse_in_eval_to_their_inference_map(make):
    model = _trained_variant(make())
    x = _batch(5)
    expected = model(x)  # bnkit's eager inference map is the oracle here
    fused = tq.fuse_modules(copy.deepcopy(model), [["0", "1", "2"]])
    assert type(fused[0]) is nni.ConvReLU2d and type(fused[1]) is nn.Identity
    assert_close(fused(x), expected, 1e-5, "fused output")
    # For QAT (the fused module trains a plain BN) they are refused, naming the layer, nothing changed.
    model.train()
    with pytest.raises(ValueError, match=type(model[1]).__name__):
        tq.fuse_modules_qat(model, [["0", "1", "2"]])
    assert not isinstance(model[0], nni.ConvBnReLU2d)


@pytest.mark.parametrize("qat", [False, True], ids=["ptq", "qat"])
def test_a_layer_without_bias_fuses_as_torchs_bias_free_bn(qat):
    """torch's BatchNorm2d(C, bias=False) fuses (eval and QAT); bnkit's enters as that layer, sharing its tensors."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, bias=False), nn.ReLU())
    ref(_batch(6))
    model = bnkit.convert(copy.deepcopy(ref))
    assert model[1].bias is None
    fuse = tq.fuse_modules_qat if qat else tq.fuse_modules
    expected = fuse(copy.deepcopy(ref).train(qat), [["0", "1", "2"]])
    fused = fuse(model.train(qat), [["0", "1", "2"]])
    assert type(fused[0]) is type(expected[0]) is (nni.ConvBnReLU2d if qat else nni.ConvReLU2d)
    x = _batch(5)
    assert_close(fused(x), expected(x), 1e-6, "fused output")
    if qat:  # the fused module's BN is the bias-free torch layer holding bnkit's weight
        assert fused[0][1].bias is None and torch.equal(fused[0][1].weight, ref[1].weight)


def test_torch_batchnorm_refusals_are_clear():
    layer = bnkit.BatchNorm2d(4, share_affine="all").train()
    with pytest.raises(ValueError, match="training mode"):
        torch_batchnorm(layer, training=False)
    with pytest.raises(ValueError, match="share_affine"):
        torch_batchnorm(layer, training=True)
    generic = bnkit.BatchNorm(4).eval()  # any rank: no torch BN of a fixed rank
    with pytest.raises(ValueError, match="channels-first"):
        torch_batchnorm(generic, training=False)


def test_fx_prepare_qat_through_convert_matches_torch():
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

    torch.manual_seed(2)
    torch_model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                                nn.BatchNorm2d(4))
    bnkit_model = bnkit.convert(torch_model)
    x = _batch(0)
    qconfig = get_default_qat_qconfig_mapping("x86")
    pt = prepare_qat_fx(copy.deepcopy(torch_model).train(), qconfig, (x,))
    pb = prepare_qat_fx(bnkit.convert(bnkit_model, to="torch").train(), qconfig, (x,))
    assert [type(m) for m in list(pb.modules())[1:]] == [type(m) for m in list(pt.modules())[1:]]
    assert any(isinstance(m, torch.ao.nn.intrinsic.qat.ConvBnReLU2d) for m in pb.modules())
    for step in range(2):
        pt(_batch(step))
        pb(_batch(step))
    _assert_same_state(pt, pb, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qt, qb = convert_fx(pt.eval()), convert_fx(pb.eval())
    assert torch.equal(qb(x), qt(x))


def test_fx_prepare_qat_on_the_bnkit_model_matches_torch():
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

    from bnkit.integrations.quantization import (
        fx_backend_config,
        fx_prepare_custom_config,
    )

    torch.manual_seed(4)
    torch_model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                                nn.BatchNorm2d(4))
    bnkit_model = bnkit.convert(torch_model)
    x = _batch(0)
    qconfig = get_default_qat_qconfig_mapping("x86")
    backend = fx_backend_config()
    pt = prepare_qat_fx(copy.deepcopy(torch_model).train(), qconfig, (x,))
    pb = prepare_qat_fx(bnkit_model.train(), qconfig, (x,), prepare_custom_config=fx_prepare_custom_config(),
                        backend_config=backend)
    assert [type(m) for m in list(pb.modules())[1:]] == [type(m) for m in list(pt.modules())[1:]]
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (pt, pb)]
    for step in range(2):
        for m, opt in zip((pt, pb), opts):
            opt.zero_grad()
            m(_batch(step)).square().mean().backward()
            opt.step()
    _assert_same_state(pt, pb, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qt, qb = convert_fx(pt.eval()), convert_fx(pb.eval(), backend_config=backend)
    assert torch.equal(qb(x), qt(x))
