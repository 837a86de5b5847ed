"""FrozenBatchNorm, freeze() and unfreeze(): frozen layers equal the eval output of the layers they replaced."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import bnkit
from bnkit import FrozenBatchNorm, FrozenBatchNorm2d, FrozenSharedBatchNorm, freeze, unfreeze
from bnkit.tools.freeze import is_freezable


class Net(nn.Module):
    """Every kind of BN layer freeze() knows, a BN instance used twice, and a SharedBatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.body = nn.Sequential(
            nn.BatchNorm2d(4),
            bnkit.BatchNorm2d(4, share_affine="weight"),
            bnkit.GhostBatchNorm2d(4, 3),
            bnkit.BatchRenorm2d(4, warmup_steps=1, r_max_steps=3, d_max_steps=2, momentum=0.3),
            nn.BatchNorm2d(4, bias=False),
            nn.BatchNorm2d(4, affine=False, momentum=None),
        )
        self.last = bnkit.BatchNorm(4, axis=-1, share_affine="all")  # on (N, H, W, C)
        self.twice = nn.BatchNorm1d(4)
        self.again = self.twice  # the same layer at two places
        self.shared = bnkit.SharedBatchNorm(4, 2)

    def forward(self, x):
        h = self.body(self.conv(x))
        h = self.last(h.permute(0, 2, 3, 1)).mean(dim=(1, 2))
        h = self.again(self.twice(h))
        return self.shared(h, site=0) + self.shared(h * 3, site=1)


def trained_net(seed=0):
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():
        for m in net.modules():
            for name in ("weight", "bias"):
                p = getattr(m, name, None)
                if isinstance(p, nn.Parameter) and m is not net.conv:
                    p.copy_(torch.rand_like(p) + 0.5 if name == "weight" else torch.randn_like(p))
    net.train()
    for step in range(3):
        net(torch.randn(6, 3, 5, 5) * (step + 1) + step)
    return net


def bn_layers(model):
    return [(n, m) for n, m in model.named_modules() if is_freezable(m) or isinstance(m, FrozenBatchNorm)]


def test_frozen_batch_norm_is_the_inference_formula():
    rng = np.random.default_rng(0)
    c = 3
    fb = FrozenBatchNorm(c, eps=1e-3, axis=-1, dtype=torch.float64)
    vals = {k: torch.from_numpy(rng.random(c) + 0.5) for k in ("weight", "bias", "running_mean", "running_var")}
    with torch.no_grad():
        for k, v in vals.items():
            getattr(fb, k).copy_(v)
    assert list(fb.parameters()) == []
    assert sorted(dict(fb.named_buffers())) == ["bias", "num_batches_tracked", "running_mean", "running_var", "weight"]
    x = torch.from_numpy(rng.normal(size=(4, 5, c))).requires_grad_()
    xn = x.detach().numpy()
    v = {k: t.numpy() for k, t in vals.items()}
    expected = (xn - v["running_mean"]) / np.sqrt(v["running_var"] + 1e-3) * v["weight"] + v["bias"]
    for mode in (True, False):  # training mode changes nothing
        fb.train(mode)
        before = {k: t.clone() for k, t in fb.state_dict().items()}
        y = fb(x)
        np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-12, atol=1e-12)
        for k, t in fb.state_dict().items():
            assert torch.equal(t, before[k])
    y.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), np.broadcast_to(v["weight"] / np.sqrt(v["running_var"] + 1e-3), x.shape))
    scale, shift = fb.inference_affine()
    torch.testing.assert_close(x.detach() * scale + shift, y.detach())
    with pytest.raises(ValueError, match="expected 4D"):
        FrozenBatchNorm2d(3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="features"):
        fb(torch.randn(2, 4))


def test_frozen_loads_checkpoints_without_num_batches_tracked_and_shared_shapes():
    src = bnkit.BatchNorm2d(3, share_affine="all")
    sd = {k: v for k, v in src.state_dict().items() if k != "num_batches_tracked"}
    fb = FrozenBatchNorm2d(3)
    fb.load_state_dict(sd, strict=True)
    assert tuple(fb.weight.shape) == (1,) and tuple(fb.bias.shape) == (1,)
    x = torch.randn(2, 3, 2, 2)
    torch.testing.assert_close(fb(x), src.eval()(x))


def test_freeze_equals_eval_output_of_replaced_layers_and_keeps_the_rest():
    net = trained_net()
    ref = copy.deepcopy(net).eval()
    conv = net.conv
    calls = []
    net.body.register_forward_hook(lambda m, i, o: calls.append("parent"))
    net.body[1].register_forward_hook(lambda m, i, o: calls.append("bn"))
    sd_before = copy.deepcopy(net.state_dict())
    assert freeze(net) is net
    assert net.conv is conv and net.twice is net.again
    kinds = {n: type(m).__name__ for n, m in bn_layers(net)}
    assert kinds == {
        "body.0": "FrozenBatchNorm2d",
        "body.1": "FrozenBatchNorm2d",
        "body.2": "FrozenBatchNorm2d",
        "body.3": "FrozenBatchNorm2d",
        "body.4": "FrozenBatchNorm2d",
        "body.5": "FrozenBatchNorm2d",
        "last": "FrozenBatchNorm",
        "twice": "FrozenBatchNorm1d",
        "shared": "FrozenSharedBatchNorm",
    }
    # parameters left: only the convolution's
    assert sorted(n for n, _ in net.named_parameters()) == ["conv.bias", "conv.weight"]
    # same state_dict keys and values as before, in both directions
    assert list(net.state_dict()) == list(sd_before)
    for k, v in sd_before.items():
        assert torch.equal(net.state_dict()[k], v), k
    net.load_state_dict(ref.state_dict(), strict=True)
    net.train()  # frozen layers ignore the mode
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    before = copy.deepcopy(net.state_dict())
    y = net(x)
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
    assert calls == ["bn", "parent"]
    y.sum().backward()
    assert x.grad is not None and conv.weight.grad is not None
    for k, v in before.items():
        assert torch.equal(net.state_dict()[k], v)
    assert freeze(net) is net  # idempotent
    assert type(net.body[0]) is FrozenBatchNorm2d


def test_unfreeze_restores_classes_arguments_and_parameters():
    net = trained_net(1)
    net.body[0].weight.requires_grad_(False)
    ref = copy.deepcopy(net)
    freeze(net)
    with torch.no_grad():  # values changed while frozen are what comes back
        net.body[1].bias.add_(1.0)
        ref.body[1].bias.add_(1.0)
    unfreeze(net)
    assert net.twice is net.again
    assert len(bn_layers(net)) == len(bn_layers(ref)) == 9
    for (n, m), (rn, r) in zip(bn_layers(net), bn_layers(ref)):
        assert n == rn and type(m) is type(r), n
        for attr in ("momentum", "eps", "axis", "share_affine", "virtual_batch_size", "r_max", "d_max",
                     "warmup_steps", "sites", "share_stats", "affine", "track_running_stats", "nonfinite"):
            assert getattr(m, attr, None) == getattr(r, attr, None), (n, attr)
        assert [k for k, _ in m.named_parameters()] == [k for k, _ in r.named_parameters()]
        for (k, p), (_, rp) in zip(m.named_parameters(), r.named_parameters()):
            assert type(p) is nn.Parameter and p.requires_grad == rp.requires_grad and torch.equal(p, rp), (n, k)
    assert list(net.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(net.state_dict()[k], v), k
    # trainable again: the same training step as the never-frozen copy
    net.train()
    ref.train()
    x = torch.randn(6, 3, 5, 5)
    torch.testing.assert_close(net(x), ref(x))
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(net.state_dict()[k], v)


def test_freeze_refuses_layers_without_running_stats_and_changes_nothing():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        freeze(model)
    assert type(model[0]) is nn.BatchNorm1d
    lazy = nn.Sequential(nn.BatchNorm1d(3), nn.LazyBatchNorm1d())
    with pytest.raises(ValueError, match="lazy"):
        freeze(lazy)
    assert type(lazy[0]) is nn.BatchNorm1d
    with pytest.raises(TypeError):
        freeze("model")


def test_freeze_and_unfreeze_a_single_layer_and_direct_frozen_layers():
    bn = bnkit.GhostBatchNorm(5, 2, axis=-1)
    frozen = freeze(bn)
    assert type(frozen) is FrozenBatchNorm and frozen.axis == -1
    back = unfreeze(frozen)
    assert type(back) is bnkit.GhostBatchNorm and back.virtual_batch_size == 2
    direct = unfreeze(FrozenBatchNorm2d(3))
    assert type(direct) is bnkit.BatchNorm2d and isinstance(direct.weight, nn.Parameter)
    shared_frozen = FrozenSharedBatchNorm(3, 4)
    with torch.no_grad():
        shared_frozen.running_mean.copy_(torch.randn(4, 3))
    shared = unfreeze(shared_frozen)
    assert type(shared) is bnkit.SharedBatchNorm and shared.sites == 4
    assert torch.equal(shared.running_mean, shared_frozen.running_mean)


def test_frozen_shared_batch_norm_sites():
    bn = bnkit.SharedBatchNorm(3, 2)
    for site in (0, 1, 1):
        bn(torch.randn(5, 3) + site, site=site)
    frozen = freeze(copy.deepcopy(bn))
    bn.eval()
    x = torch.randn(4, 3)
    for s in (0, 1):
        torch.testing.assert_close(frozen(x, site=s), bn(x, site=s))
        scale, shift = frozen.inference_affine(site=s)
        torch.testing.assert_close(x * scale + shift, bn(x, site=s))
    with pytest.raises(IndexError):
        frozen(x, site=2)
    with pytest.raises(TypeError):
        frozen(x)
    with pytest.raises(RuntimeError, match="site"):
        frozen.inference_affine()


def test_freeze_torch_sync_batch_norm_and_back():
    sync = nn.SyncBatchNorm(3, eps=1e-3)
    with torch.no_grad():
        sync.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        sync.running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
        sync.weight.copy_(torch.tensor([1.5, 0.5, -1.0]))
    model = nn.Sequential(sync).eval()
    x = torch.randn(4, 3, 2, 2)
    expected = model(x)
    freeze(model)
    assert type(model[0]) is FrozenBatchNorm and model[0].eps == 1e-3
    torch.testing.assert_close(model(x), expected)
    unfreeze(model)
    assert type(model[0]) is nn.SyncBatchNorm and model[0].eps == 1e-3
    torch.testing.assert_close(model(x), expected)
