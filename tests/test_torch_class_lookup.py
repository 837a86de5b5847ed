"""Code that finds BN layers by torch's class (docs/differences.md, "Code that finds BN layers by torch's class").

bnkit's BatchNorm1d/2d/3d are subclasses of torch's classes, so ``isinstance`` lookups written for torch's
layers find them; they still run bnkit's engine. The oracle of every test is the same code run on the same
model with torch's layers: the same layers found, the same result.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.modules import batchnorm as torch_bn

import bnkit
from bnkit.family import is_torch_bn

try:  # before the torchvision stand-in that import_timm installs
    import pytorch_lightning as pl
except ImportError:  # pragma: no cover - depends on the environment
    pl = None

from _compare import assert_close, randomize_bn  # noqa: E402
from _timm_stub import import_timm  # noqa: E402

DROP_INS = [
    (bnkit.BatchNorm1d, nn.BatchNorm1d, (8, 4)),
    (bnkit.BatchNorm1d, nn.BatchNorm1d, (8, 4, 5)),
    (bnkit.BatchNorm2d, nn.BatchNorm2d, (8, 4, 5, 5)),
    (bnkit.BatchNorm3d, nn.BatchNorm3d, (4, 4, 3, 3, 3)),
]
NOT_TORCH = [
    lambda: bnkit.BatchNorm(4),
    lambda: bnkit.BatchNorm(4, axis=-1),
    lambda: bnkit.BatchRenorm2d(4),
    lambda: bnkit.GhostBatchNorm2d(4, virtual_batch_size=2),
    lambda: bnkit.SharedBatchNorm(4, sites=2),
    lambda: bnkit.DomainBatchNorm2d(4, num_domains=2),
    lambda: bnkit.SyncBatchNorm(4),
    lambda: bnkit.FrozenBatchNorm2d(4),
]


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 5 * 5, 6), nn.BatchNorm1d(6), nn.Linear(6, 2),
    )
    return randomize_bn(net)


def _twins() -> tuple[nn.Module, nn.Module]:
    t = _net()
    b = bnkit.convert(copy.deepcopy(t))
    assert sum(isinstance(m, bnkit.BatchNorm) for m in b.modules()) == 3
    assert not any(is_torch_bn(m) for m in b.modules())
    return t, b


def _x(n=8, seed=1):
    return torch.randn(n, 3, 5, 5, generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.5


@pytest.mark.parametrize("ours, theirs, shape", DROP_INS)
def test_drop_ins_are_instances_of_torch_classes_and_run_bnkit_engine(ours, theirs, shape, monkeypatch):
    layer = ours(4)
    assert isinstance(layer, theirs) and isinstance(layer, torch_bn._BatchNorm) and isinstance(layer, torch_bn._NormBase)
    assert not is_torch_bn(layer) and is_torch_bn(theirs(4))
    ref = theirs(4)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 2 + 1
    want_train, want_eval = ref(x), ref.eval()(x)

    def refuse(*args, **kwargs):
        raise AssertionError("torch's BN code ran")

    # nothing of torch's runs: not its forward, not its functional, not its input check
    monkeypatch.setattr(torch_bn._BatchNorm, "forward", refuse)
    monkeypatch.setattr(torch_bn._NormBase, "__init__", refuse)
    monkeypatch.setattr(theirs, "_check_input_dim", refuse)
    monkeypatch.setattr(torch.nn.functional, "batch_norm", refuse)
    layer = ours(4)
    assert_close(layer(x), want_train, 1e-5, "train")
    assert_close(layer.eval()(x), want_eval, 1e-5, "eval")
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(layer, k).double(), getattr(ref, k).double(), rtol=1e-5, atol=1e-6), k


@pytest.mark.parametrize("ours", [bnkit.BatchNorm1d, bnkit.BatchNorm2d, bnkit.BatchNorm3d, bnkit.LazyBatchNorm2d])
def test_every_method_of_torchs_classes_is_bnkits(ours):
    """bnkit's class comes first in the MRO and defines every method torch's classes define."""
    for base in (torch_bn._NormBase, torch_bn._BatchNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        for name, value in vars(base).items():
            if callable(value) or isinstance(value, (staticmethod, classmethod, property)):
                owner = next(c for c in ours.__mro__ if name in vars(c))
                assert owner.__module__.startswith("bnkit."), (base.__name__, name, owner)


def test_check_input_dim_is_bnkits_check_with_torchs_error():
    for ours, theirs, bad in ((bnkit.BatchNorm2d, nn.BatchNorm2d, (2, 4, 3)), (bnkit.BatchNorm1d, nn.BatchNorm1d, (2,))):
        x = torch.randn(*bad)
        with pytest.raises(ValueError) as theirs_err:
            theirs(4)._check_input_dim(x)
        with pytest.raises(ValueError) as ours_err:
            ours(4)._check_input_dim(x)
        assert f"{len(bad)}D" in str(theirs_err.value) and f"{len(bad)}D" in str(ours_err.value)
        ours(4)._check_input_dim(torch.randn(2, 4, *([3] * (ours.expected_dims[0] - 2))))


@pytest.mark.parametrize("make", NOT_TORCH)
def test_generic_layer_and_variants_are_not_torch_instances(make):
    assert not isinstance(make(), torch_bn._NormBase)


def test_lazy_layers_are_torch_instances_from_the_start():
    """The one documented difference: torch's lazy layer becomes an nn.BatchNorm2d at its first call."""
    ours, theirs = bnkit.LazyBatchNorm2d(), nn.LazyBatchNorm2d()
    assert isinstance(ours, nn.BatchNorm2d) and not isinstance(theirs, nn.BatchNorm2d)
    x = torch.randn(4, 3, 2, 2)
    ours(x), theirs(x)
    assert isinstance(ours, nn.BatchNorm2d) and isinstance(theirs, nn.BatchNorm2d)
    assert type(ours) is bnkit.BatchNorm2d and type(theirs) is nn.BatchNorm2d


def test_bn_freezing_loop_by_class_matches_torch():
    """Fine-tuning with BN frozen (mmdet's norm_eval): every nn.BatchNorm2d to eval in a training model."""
    t, b = _twins()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (t, b)]
    for m in (t, b):
        m.train()
        for layer in m.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.eval()
    assert [m.training for m in b.modules()] == [m.training for m in t.modules()]
    before = copy.deepcopy(b.state_dict())
    for step in range(2):
        for m, opt in zip((t, b), opts):
            opt.zero_grad()
            m(_x(seed=step)).square().mean().backward()
            opt.step()
    after = b.state_dict()
    for name in ("1", "4"):
        assert torch.equal(after[f"{name}.running_mean"], before[f"{name}.running_mean"])
    assert not torch.equal(after["8.running_mean"], before["8.running_mean"])  # the BatchNorm1d still trains
    for (n, p), (_, q) in zip(b.state_dict().items(), t.state_dict().items()):
        assert_close(p, q, 1e-4, n)


def test_weight_decay_groups_by_class_match_torch():
    def groups(model):
        bn = [n for n, m in model.named_modules() if isinstance(m, torch_bn._BatchNorm)]
        return sorted(n for n, _ in model.named_parameters() if n.rsplit(".", 1)[0] in bn)

    t, b = _twins()
    assert groups(b) == groups(t) == ["1.bias", "1.weight", "4.bias", "4.weight", "8.bias", "8.weight"]


def test_torch_func_replace_all_batch_norm_modules_then_vmap_matches_torch():
    t, b = _twins()
    for m in (t, b):
        torch.func.replace_all_batch_norm_modules_(m)
    assert b[1].running_mean is None and not b[4].track_running_stats and b[8].num_batches_tracked is None
    x = _x(n=12).reshape(3, 4, 3, 5, 5)  # three mapped batches of four

    def run(model):
        params = {k: v.detach() for k, v in model.named_parameters()}
        return torch.func.vmap(lambda xb: torch.func.functional_call(model, params, (xb,)))(x)

    assert_close(run(b.train()), run(t.train()), 1e-5, "vmap over batches")


def test_torch_convert_sync_batchnorm_converts_drop_ins_as_torch_layers():
    """torch's converter takes bnkit's drop-ins as its own (into torch's SyncBatchNorm, the same tensors)."""
    t, b = _twins()
    ts, bs = (nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(m)) for m in (t, b))
    assert [type(m) for m in bs.modules()] == [type(m) for m in ts.modules()]
    for (n, p), (_, q) in zip(bs.state_dict().items(), ts.state_dict().items()):
        assert torch.equal(p, q), n


def test_update_bn_on_a_model_mixing_drop_ins_and_a_variant():
    """update_bn resets and averages the drop-ins; a variant (not a _BatchNorm) keeps its EMA update, as the docs
    say. Oracles: update_bn on the torch model for the drop-ins, plain training forwards for the variant."""
    from torch.optim.swa_utils import update_bn

    t, b = _twins()
    b[8] = bnkit.BatchRenorm1d(6)
    b[8].load_state_dict(t[8].state_dict())
    ema = copy.deepcopy(b[8])
    loader = [_x(seed=s) for s in range(3)]
    update_bn(loader, t)
    update_bn(loader, b)
    for i in (1, 4):
        for k in ("running_mean", "running_var", "num_batches_tracked"):
            assert_close(getattr(b[i], k), getattr(t[i], k), 1e-5, f"{i} {k}")
    with torch.no_grad():
        for x in loader:
            ema.train()(b[:8].train()(x))
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert_close(getattr(b[8], k), getattr(ema, k), 1e-5, f"renorm {k}")


def test_bnkit_tools_still_see_drop_ins_as_bnkits():
    t, b = _twins()
    again, report = bnkit.convert(b, report=True)
    assert report.converted == [] and [type(m) for m in again.modules()] == [type(m) for m in b.modules()]
    back = bnkit.convert(b, to="torch")
    assert [type(m) for m in back.modules()] == [type(m) for m in t.modules()]
    rows = bnkit.inspect(b.eval()).to_dict()["layers"]
    assert [(r["name"], r["cls"]) for r in rows] == [("1", "BatchNorm2d"), ("4", "BatchNorm2d"), ("8", "BatchNorm1d")]
    with bnkit.accumulate_stats(b.train()):  # bnkit's layers: one update for the block, no forward wrapped
        b(_x(seed=0)), b(_x(seed=1))
    assert "forward" not in b[1].__dict__ and int(b[1].num_batches_tracked) == int(t[1].num_batches_tracked) + 1


def test_timm_freeze_batch_norm_2d_freezes_converted_drop_ins_as_torch_layers():
    timm = import_timm()
    torch.manual_seed(0)
    ref = randomize_bn(timm.create_model("resnet10t", pretrained=False, num_classes=10), parameters_only=True)
    new = bnkit.convert(ref)
    frozen_ref = timm.layers.freeze_batch_norm_2d(copy.deepcopy(ref))
    frozen_new = timm.layers.freeze_batch_norm_2d(copy.deepcopy(new))
    assert [type(m) for m in frozen_new.modules()] == [type(m) for m in frozen_ref.modules()]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(frozen_new.train()(x), frozen_ref.train()(x), 1e-5, "frozen")


@pytest.mark.skipif(pl is None, reason="needs pytorch_lightning")
def test_lightning_base_finetuning_freeze_keeps_bn_trainable_as_torch():
    from pytorch_lightning.callbacks import BaseFinetuning

    t, b = _twins()
    for m in (t, b):
        BaseFinetuning.freeze(m, train_bn=True)
    want = {n: p.requires_grad for n, p in t.named_parameters()}
    assert {n: p.requires_grad for n, p in b.named_parameters()} == want
    assert want["1.weight"] and not want["0.weight"]
