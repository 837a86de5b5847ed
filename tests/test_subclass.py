"""BN subclasses through convert / freeze / unfreeze / fuse / convert_sync_batchnorm.

The oracle is the unmodified torch/timm model: outputs in train and eval,
gradients, running statistics after a training step; a fused or frozen model
equals the eval model. timm is imported with a torchvision stand-in
(tests/_timm_stub.py); the tests skip when timm is not installed.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnkit
from bnkit.family import bn_form, register_bn_subclass
from bnkit.sync import SyncBatchNormAct
from bnkit.variants import BatchNormAct2d, FrozenBatchNormAct

from _compare import randomize_bn as _randomize
from _timm_stub import import_timm


@pytest.fixture(scope="module")
def timm():
    return import_timm()


class Negate(nn.Module):
    """A deterministic 'drop' layer that makes the order drop -> act visible (act(-x) != -act(x))."""

    def forward(self, x):
        return -x


class Twice(nn.BatchNorm2d):
    """A subclass whose forward bnkit cannot know."""

    def forward(self, x):
        return 2 * super().forward(x)


class Plain(nn.BatchNorm2d):
    """A subclass keeping torch's forward (its own __init__ and attribute)."""

    def __init__(self, c):
        super().__init__(c, eps=1e-3)
        self.note = "plain"


class BNReLU(nn.BatchNorm2d):
    def __init__(self, c):
        super().__init__(c)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(super().forward(x))


class OwnBN(nn.Module):
    """A module that calls F.batch_norm itself (not a BN class)."""

    def __init__(self, c):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, training=self.training)


def _bnact(timm, **kw):
    return timm.layers.BatchNormAct2d(6, act_layer=nn.SiLU, drop_layer=Negate, **kw)


def _train_step(model, x):
    model.train()
    y = model(x)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    return y


def _assert_same_training(ref: nn.Module, new: nn.Module, x: torch.Tensor, tol: float = 1e-5) -> None:
    """Same train output, input and parameter gradients, running statistics, then eval output."""
    for p in (*ref.parameters(), *new.parameters()):
        p.grad = None
    xr, xn = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yn = _train_step(ref, xr), _train_step(new, xn)
    torch.testing.assert_close(yn, yr, rtol=tol, atol=tol)
    torch.testing.assert_close(xn.grad, xr.grad, rtol=tol, atol=tol)
    pr, pn = dict(ref.named_parameters()), dict(new.named_parameters())
    assert pr.keys() == pn.keys()
    for k in pr:
        torch.testing.assert_close(pn[k].grad, pr[k].grad, rtol=tol, atol=tol, msg=lambda m, k=k: f"{k}: {m}")
    sr, sn = ref.state_dict(), new.state_dict()
    assert list(sr) == list(sn)
    for k in sr:
        torch.testing.assert_close(sn[k], sr[k], rtol=tol, atol=tol, msg=lambda m, k=k: f"{k}: {m}")
    ref.eval(), new.eval()
    with torch.no_grad():
        torch.testing.assert_close(new(x), ref(x), rtol=tol, atol=tol)


# --------------------------------------------------------------------------- timm's layers directly
def test_forms_of_known_classes(timm):
    assert bn_form(_bnact(timm)).tail == ("drop", "act")
    assert bn_form(timm.layers.FrozenBatchNormAct2d(4)).kind == "frozen"
    assert bn_form(Plain(3)).kind == "bn"
    assert bn_form(Twice(3)).kind == "unknown" and "Twice.forward" in bn_form(Twice(3)).reason
    assert bn_form(OwnBN(3)).kind == "unknown" and bn_form(nn.ReLU()) is None


def test_convert_batchnormact_keeps_act_and_drop(timm):
    ref = _randomize(_bnact(timm))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left, so no warning
        new = bnkit.convert(ref)
    assert type(new) is BatchNormAct2d and isinstance(new.act, nn.SiLU) and isinstance(new.drop, Negate)
    x = torch.randn(5, 6, 4, 3)
    _assert_same_training(ref, new, x)
    back = bnkit.convert(new, to="torch")
    assert type(back) is type(ref) and isinstance(back.act, nn.SiLU)
    _assert_same_training(ref, back, x)


def test_freeze_unfreeze_batchnormact(timm):
    ref = _randomize(_bnact(timm)).eval()
    x = torch.randn(5, 6, 4, 3)
    want = ref(x)
    frozen = bnkit.freeze(copy.deepcopy(ref)).train()  # frozen: the eval map, in train mode too
    assert isinstance(frozen, FrozenBatchNormAct) and isinstance(frozen.act, nn.SiLU)
    torch.testing.assert_close(frozen(x), want, rtol=1e-5, atol=1e-5)
    back = bnkit.unfreeze(frozen)
    assert type(back) is type(ref) and isinstance(back.drop, Negate)
    _assert_same_training(copy.deepcopy(ref), back, x)
    # timm's own frozen layer unfreezes to bnkit's trainable equivalent, equal in eval.
    tf = timm.layers.freeze_batch_norm_2d(copy.deepcopy(ref))
    assert type(tf).__name__ == "FrozenBatchNormAct2d"
    un = bnkit.unfreeze(tf).eval()
    assert type(un) is BatchNormAct2d
    torch.testing.assert_close(un(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("frozen_by", [None, "timm", "bnkit"])
def test_fuse_folds_bn_and_keeps_act(timm, frozen_by):
    model = nn.Sequential(nn.Conv2d(3, 6, 3), _bnact(timm), nn.Conv2d(6, 4, 1), timm.layers.BatchNormAct2d(4))
    model = _randomize(model).eval()
    if frozen_by == "timm":
        model = timm.layers.freeze_batch_norm_2d(model)
    elif frozen_by == "bnkit":
        model = bnkit.freeze(model)
    x = torch.randn(2, 3, 7, 7)
    want = model(x)
    fused = bnkit.fuse(model)
    assert len(fused.fuse_report.fused) == 2 and not fused.fuse_report.unfused
    torch.testing.assert_close(fused(x), want, rtol=1e-5, atol=1e-5)
    kinds = [type(m) for m in fused.modules()]
    assert nn.SiLU in kinds and nn.ReLU in kinds and Negate in kinds
    assert not any(bn_form(m) is not None for m in fused.modules())  # no BN left
    # Without the activation kept, the result would differ (the oracle can tell).
    assert (want == 0).any()  # the final ReLU clips: an output without it would differ


def test_fuse_never_folds_an_activation_into_the_next_layer(timm):
    # BN-act -> conv: folding into the *following* conv would move the act; it becomes an Affine + act.
    model = _randomize(nn.Sequential(nn.ReLU(), _bnact(timm), nn.Conv2d(6, 4, 1))).eval()
    x = torch.randn(2, 6, 5, 5)
    fused = bnkit.fuse(model)
    assert not fused.fuse_report.fused and fused.fuse_report.unfused[0].replaced_by == "Affine"
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


def test_sync_conversion_keeps_act(timm):
    ref = _randomize(_bnact(timm))
    new = bnkit.convert_sync_batchnorm(copy.deepcopy(ref))
    assert type(new) is SyncBatchNormAct and isinstance(new.act, nn.SiLU)
    x = torch.randn(5, 6, 4, 3)
    _assert_same_training(ref, new, x)  # no process group: the local path
    back = bnkit.convert_sync_batchnorm(new, revert=True)
    assert type(back) is type(ref) and isinstance(back.drop, Negate)
    _assert_same_training(ref, back, x)  # both have now taken two steps


# --------------------------------------------------------------------------- real timm models
MODELS = ["efficientnet_b0", "mobilenetv3_small_100", "regnety_002", "resnet18"]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_timm_models(timm, name):
    torch.manual_seed(0)
    ref = _randomize(timm.create_model(name, pretrained=False, num_classes=10))
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in ref.modules())
    new, rep = bnkit.convert(ref, report=True)
    assert len(rep.converted) == n_bn > 0 and rep.left == []
    x = torch.randn(4, 3, 32, 32)
    # Training in float64: the last stages normalize 4 values per channel, which amplifies float32 rounding
    # (torch against itself in float64 differs by ~1e-3 there); float64 makes the comparison sharp.
    _assert_same_training(copy.deepcopy(ref).double(), copy.deepcopy(new).double(), x.double(), tol=1e-7)
    ref.eval(), new.eval()
    with torch.no_grad():
        want = ref(x)
        for model in (bnkit.fuse(ref), bnkit.freeze(copy.deepcopy(ref)).train(), bnkit.fuse(new.eval())):
            torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
        assert len(bnkit.fuse(ref).fuse_report.fused) == n_bn


# --------------------------------------------------------------------------- other subclasses
def test_unknown_subclass_refused_or_left_with_its_name():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Sequential(Twice(3)))
    model = _randomize(model).eval()
    before = copy.deepcopy(model.state_dict())
    for tool in (bnkit.freeze, bnkit.convert_sync_batchnorm):
        with pytest.raises(ValueError, match=r"'2\.0' \(.*Twice\).*overrides forward"):
            tool(model)
        assert type(model[1]) is nn.BatchNorm2d and type(model[2][0]) is Twice  # nothing changed
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.warns(UserWarning, match=r"converted 1 of 2 BN layers; left 1: '2\.0' \(.*Twice\)"):
        conv = bnkit.convert(model)
    assert type(conv[2][0]) is Twice
    x = torch.randn(2, 3, 4, 4)
    with pytest.warns(UserWarning, match=r"fuse: left 1 .*'2\.0'"):
        fused = bnkit.fuse(model)
    torch.testing.assert_close(fused(x), model(x))
    assert any(u.bn == "2.0" and u.replaced_by is None for u in fused.fuse_report.unfused)


def test_plain_subclass_is_converted_exactly():
    ref = _randomize(nn.Sequential(nn.Conv2d(3, 3, 1, bias=False), Plain(3)))
    x = torch.randn(4, 3, 5, 5)
    new = bnkit.convert(ref)
    assert type(new[1]) is bnkit.BatchNorm2d and new[1].eps == 1e-3
    _assert_same_training(copy.deepcopy(ref), new, x)
    assert type(bnkit.convert(new, to="torch")[1]) is Plain
    frozen = bnkit.freeze(copy.deepcopy(ref).eval())
    torch.testing.assert_close(frozen(x), ref.eval()(x), rtol=1e-5, atol=1e-5)
    assert type(bnkit.unfreeze(frozen)[1]) is Plain


def test_registered_subclass_is_handled_exactly():
    register_bn_subclass(BNReLU, ("act",))
    ref = _randomize(nn.Sequential(nn.Conv2d(3, 3, 1, bias=False), BNReLU(3)))
    x = torch.randn(4, 3, 5, 5)
    new = bnkit.convert(ref)
    assert new[1].bn_tail == ("act",) and isinstance(new[1].act, nn.ReLU)
    _assert_same_training(copy.deepcopy(ref), new, x)
    ref.eval()
    torch.testing.assert_close(bnkit.fuse(ref)(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bnkit.freeze(copy.deepcopy(ref))(x), ref(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="not a torch BN subclass"):
        register_bn_subclass(nn.ReLU)


def test_module_calling_batch_norm_itself_is_reported():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), OwnBN(3), nn.BatchNorm2d(3))
    out, rep = bnkit.convert(model, report=True)
    assert [r[0] for r in rep.converted] == ["2"]
    assert rep.left[0][0] == "1" and "F.batch_norm" in rep.left[0][2]
    assert "converted 1 of 2" in str(rep)


def test_small_network_of_timm_blocks(timm):
    """The fast stand-in for the model tests above: timm's ConvNormAct blocks (regnet/efficientnet style)."""
    from timm.layers import ConvNormAct

    torch.manual_seed(0)
    ref = nn.Sequential(
        ConvNormAct(3, 8, 3, stride=2, act_layer=nn.SiLU),
        ConvNormAct(8, 8, 3, groups=8, act_layer=nn.ReLU),
        ConvNormAct(8, 4, 1, apply_act=False),
    )
    ref = _randomize(ref)
    new, rep = bnkit.convert(ref, report=True)
    assert len(rep.converted) == 3 and rep.left == []
    x = torch.randn(4, 3, 12, 12)
    # float64: gradients through three BN layers carry float32 rounding of ~1e-5 relative
    _assert_same_training(copy.deepcopy(ref).double(), copy.deepcopy(new).double(), x.double(), tol=1e-7)
    ref.eval()
    with torch.no_grad():
        want = ref(x)
        fused = bnkit.fuse(ref)
        assert len(fused.fuse_report.fused) == 3
        for model in (fused, bnkit.freeze(copy.deepcopy(ref)).train(), bnkit.fuse(new.eval())):
            torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
