"""bnkit.convert: torch BN <-> bnkit BN, exact round trips (torch BN as the oracle)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnkit
from bnkit.family import is_torch_bn


class Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        f = {"dtype": dtype}
        self.conv = nn.Conv2d(3, 4, 3, padding=1, **f)
        self.bn2 = nn.BatchNorm2d(4, momentum=0.3, eps=1e-3, **f)
        self.block = nn.Sequential(nn.Conv3d(1, 2, 1, **f), nn.BatchNorm3d(2, momentum=None, **f))
        self.seq_bn = nn.BatchNorm1d(4, affine=False, **f)  # (N, C, L) input
        self.head = nn.Linear(4, 3, **f)
        self.bn1 = nn.BatchNorm1d(3, **f)  # (N, C) input
        self.nostats = nn.BatchNorm1d(3, track_running_stats=False, **f)

    def forward(self, x, v):
        h = torch.relu(self.bn2(self.conv(x)))
        s = self.seq_bn(h.flatten(2))
        out = self.nostats(self.bn1(self.head(s.mean(-1))))
        return out, self.block(v)


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 3, 6, 6, generator=g, dtype=dtype), torch.randn(4, 1, 3, 2, 2, generator=g, dtype=dtype)


def _prime(model, steps=2):
    """A couple of training steps so that every buffer holds something non-default."""
    model.train()
    for i in range(steps):
        x, v = _inputs(model.conv.weight.dtype)
        model(x + i, v * (i + 1))
    return model


def _assert_state_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert sa._metadata == sb._metadata


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_convert_to_bnkit_matches_torch(dtype):
    torch.manual_seed(0)
    tmodel = _prime(Net(dtype))
    tmodel.block.eval()  # mixed training flags
    tmodel.head.weight.requires_grad_(False)
    tmodel.bn2.bias.requires_grad_(False)
    bmodel = bnkit.convert(tmodel, to="bnkit")
    types = {n: type(m) for n, m in bmodel.named_modules()}
    assert types["bn2"] is bnkit.BatchNorm2d and types["block.1"] is bnkit.BatchNorm3d
    assert types["seq_bn"] is bnkit.BatchNorm1d and types["nostats"] is bnkit.BatchNorm1d
    assert not any(is_torch_bn(m) for m in bmodel.modules())
    # flags, requires_grad, dtype, hyper-parameters
    for (n, a), (_, b) in zip(tmodel.named_modules(), bmodel.named_modules()):
        assert a.training == b.training, n
        if isinstance(a, nn.modules.batchnorm._BatchNorm):
            assert (a.eps, a.momentum, a.affine, a.track_running_stats) == (b.eps, b.momentum, b.affine, b.track_running_stats)
    assert bmodel.bn2.bias.requires_grad is False and bmodel.bn2.weight.requires_grad is True
    assert bmodel.bn2.weight.dtype == dtype
    _assert_state_equal(tmodel, bmodel)
    # the original was deep-copied, not modified
    assert isinstance(tmodel.bn2, nn.BatchNorm2d) and tmodel.bn2.weight is not bmodel.bn2.weight
    # eval outputs equal to torch's
    tmodel.eval(), bmodel.eval()
    x, v = _inputs(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for a, b in zip(tmodel(x, v), bmodel(x, v)):
        torch.testing.assert_close(b, a, **tol)
    # and training steps keep agreeing (outputs and running buffers)
    tmodel.train(), bmodel.train()
    for a, b in zip(tmodel(x * 2, v), bmodel(x * 2, v)):
        torch.testing.assert_close(b, a, **tol)
    for (k, a), (_, b) in zip(tmodel.state_dict().items(), bmodel.state_dict().items()):
        torch.testing.assert_close(b, a, **tol, msg=k)


def test_round_trip_is_exact():
    torch.manual_seed(1)
    tmodel = _prime(Net())
    back = bnkit.convert(bnkit.convert(tmodel, to="bnkit"), to="torch")
    assert [type(m) for m in back.modules()] == [type(m) for m in tmodel.modules()]
    _assert_state_equal(tmodel, back)
    for a, b in zip(tmodel.modules(), back.modules()):
        assert a.training == b.training
    x, v = _inputs()
    for mode in ("eval", "train"):
        getattr(tmodel, mode)(), getattr(back, mode)()
        for a, b in zip(tmodel(x, v), back(x, v)):
            assert torch.equal(a, b)
    # a state_dict saved from either loads into the other
    bmodel = bnkit.convert(tmodel)
    bmodel.load_state_dict(tmodel.state_dict())
    tmodel.load_state_dict(bmodel.state_dict())


def test_hooks_and_inplace_identity():
    torch.manual_seed(2)
    model = Net()
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append("root"))
    model.block.register_forward_pre_hook(lambda m, i: calls.append("block"))
    h_bn = model.bn2.register_forward_hook(lambda m, i, o: calls.append("bn2"))
    params = {n: p for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = bnkit.convert(model, to="bnkit", inplace=True)
    assert out is model and isinstance(model.bn2, bnkit.BatchNorm2d)
    # the same Parameter objects: an optimizer built before keeps training the converted model
    assert all(p is params[n] for n, p in model.named_parameters())
    x, v = _inputs()
    a, b = model(x, v)
    assert calls == ["bn2", "block", "root"]
    (a * torch.randn_like(a)).sum().backward()
    before = model.bn2.weight.detach().clone()
    opt.step()
    assert not torch.equal(model.bn2.weight, before)
    # hook handles still remove the hooks from the converted layer
    h_bn.remove()
    calls.clear()
    model(x, v)
    assert calls == ["block", "root"]


class MyBN(nn.BatchNorm2d):
    """A subclass that keeps torch's forward (module level: deepcopy and pickle find it)."""

    def __init__(self, c: int) -> None:
        super().__init__(c, momentum=0.3)
        self.tag = "mine"


def test_root_bn_and_plain_subclasses():
    bn = nn.BatchNorm2d(3)
    out = bnkit.convert(bn)
    assert type(out) is bnkit.BatchNorm2d

    # A subclass that keeps torch's forward computes what its base computes: converted, and restored on the way back.
    m = nn.Sequential(MyBN(3), bnkit.BatchNorm2d(3))
    out, rep = bnkit.convert(m, to="bnkit", report=True)
    assert type(out[0]) is bnkit.BatchNorm2d and out[0].momentum == 0.3 and type(out[1]) is bnkit.BatchNorm2d
    assert [r[0] for r in rep.converted] == ["0"] and rep.left == []
    back = bnkit.convert(out, to="torch")
    assert type(back[0]) is MyBN and back[0].tag == "mine" and back[0].momentum == 0.3
    x = torch.randn(4, 3, 5, 5)
    m.train(), out.train(), back.train()
    torch.testing.assert_close(out(x), m(x))
    torch.testing.assert_close(back(x), m(x))
    assert list(back.state_dict()) == list(m.state_dict())


@pytest.mark.parametrize("training", [True, False])
def test_a_layer_without_bias_goes_to_torch_with_bias_none_and_back(training):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), bnkit.BatchNorm2d(3, bias=False))
    model(torch.randn(4, 3, 5, 5))
    keys = list(model.state_dict())
    out = bnkit.convert(model, to="torch")
    assert type(out[1]) is nn.BatchNorm2d and out[1].bias is None and torch.equal(out[1].weight, model[1].weight)
    assert list(out.state_dict()) == keys
    back = bnkit.convert(out)
    assert type(back[1]) is bnkit.BatchNorm2d and back[1].bias is None and list(back.state_dict()) == keys
    for m in (model, out, back):
        m.train(training)
    x = torch.randn(4, 3, 5, 5)
    expected = model(x)  # the oracle: the bnkit layer computes BN with gamma only
    torch.testing.assert_close(out(x), expected)
    torch.testing.assert_close(back(x), expected)
    for a, b in zip(model[1].buffers(), out[1].buffers()):
        torch.testing.assert_close(a, b)


def test_to_torch_rejects_layers_without_equivalent():
    for bad in (bnkit.BatchNorm2d(3, axis=-1), bnkit.BatchNorm2d(3, share_affine="all")):
        model = nn.Sequential(nn.Conv2d(3, 3, 1), bad)
        with pytest.raises(ValueError, match="no torch equivalent"):
            bnkit.convert(model, to="torch", inplace=True)
        assert model[1] is bad  # nothing changed
    with pytest.raises(ValueError, match="'bnkit' or 'torch'"):
        bnkit.convert(nn.Sequential(), to="keras")
