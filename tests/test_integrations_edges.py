"""bnkit with timm models and PyTorch Lightning, on the edges.

Oracles: the unconverted timm model (timm's own BN classes, i.e. torch's
kernels) for everything timm; the same LightningModule built with torch's BN
layers, trained by the same ``Trainer``, for Lightning; and values derived by
hand from the BN formulas (the statistics of an ``accumulate_stats`` step).
Deep models are compared in float64: float32 rounding, amplified by the last
stages (4 values per channel at 32 px), makes torch differ from itself there.

timm is imported with the torchvision stand-in (tests/_timm_stub.py);
Lightning is imported *before* it (torchmetrics, which Lightning imports,
probes ``torchvision.__spec__``, which the stand-in lacks).
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bnkit
from bnkit.family import is_torch_bn

try:  # before the torchvision stand-in (see the module docstring)
    import pytorch_lightning as pl
except ImportError:  # pragma: no cover - depends on the environment
    pl = None

from _compare import randomize_bn  # noqa: E402
from _timm_stub import import_timm  # noqa: E402

# Deep nets amplify rounding (BN over 4 values per channel at 32 px): errors are measured against the size of
# the values (_assert_scaled). torch against itself (NCHW vs channels-last) differs by ~2e-10 (float64) and
# ~1e-5 (float32, 64 px) of the largest gradient there; bnkit by as much.
REL64, REL32 = 1e-8, 5e-5
# eval after a few steps normalizes with running variances that can be small (huge outputs): torch NCHW vs
# channels-last differ by ~3e-8 of the largest output there (mobilenetv3, 32 px); bnkit by as much.
EVAL64 = 1e-6
F64 = dict(rtol=1e-7, atol=1e-9)  # elementwise, for well-conditioned float64 comparisons


@pytest.fixture(scope="module")
def timm():
    return import_timm()


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    return randomize_bn(model, seed, parameters_only=True)


def _data(n: int, px: int, dtype=torch.float64, seed: int = 1, classes: int = 10):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(4, 3, px, px, generator=g, dtype=dtype) for _ in range(n)]
    ys = [torch.randint(0, classes, (4,), generator=g) for _ in range(n)]
    return xs, ys


def _sgd_run(model: nn.Module, xs, ys, lr: float = 0.01):
    """A few SGD steps (momentum: the optimizer's state matters too); per step the output and every gradient."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    record = []
    for x, y in zip(xs, ys):
        model.train()
        opt.zero_grad()
        out = model(x)
        nn.functional.cross_entropy(out, y).backward()
        record.append((out.detach().clone(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
        opt.step()
    return record


def _assert_scaled(a: torch.Tensor, b: torch.Tensor, rel: float, scale: float, what: str) -> None:
    """``max|a - b| <= rel * scale``: the error measured against the size of the values (an elementwise
    relative error means nothing for entries that are rounding noise, e.g. the gradient of a bias that the
    next training-mode BN layer removes, zero in exact arithmetic)."""
    assert a.shape == b.shape and a.dtype == b.dtype, what
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    assert err <= rel * scale, f"{what}: max abs difference {err:.3g} > {rel:g} * {scale:.3g}"


def _assert_same_state(new: nn.Module, ref: nn.Module, exact: bool = False, rel: float | None = None, **tol) -> None:
    """Same keys, dtypes and values; ``rel``: each tensor within ``rel`` times its own largest value."""
    sn, sr = new.state_dict(), ref.state_dict()
    assert list(sn) == list(sr)
    for k in sr:
        assert sn[k].dtype == sr[k].dtype, k
        if exact:
            assert torch.equal(sn[k], sr[k]), k
        elif rel is not None:
            _assert_scaled(sn[k], sr[k], rel, max(sr[k].double().abs().max().item(), 1.0), k)
        else:
            torch.testing.assert_close(sn[k], sr[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


def _assert_same_runs(rec_new, rec_ref, rel: float) -> None:
    """Per step: the output, and every gradient measured against the step's largest gradient."""
    assert len(rec_new) == len(rec_ref)
    for step, ((on, gn), (or_, gr)) in enumerate(zip(rec_new, rec_ref)):
        _assert_scaled(on, or_, rel, or_.abs().max().item(), f"output, step {step}")
        assert gn.keys() == gr.keys()
        scale = max(g.abs().max().item() for g in gr.values())
        for k in gr:
            _assert_scaled(gn[k], gr[k], rel, scale, f"grad {k}, step {step}")


def _bn_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if bnkit.family.bn_form(m) is not None]


# =========================================================================== timm models
@pytest.mark.parametrize("name, fuse", [
    ("resnet10t", False),
    ("resnet10t", True),
    ("mobilenetv3_small_050", False),
    pytest.param("mobilenetv3_small_050", True, marks=pytest.mark.slow),  # its BatchNormAct2d fuse anyway
])
def test_timm_model_sgd_steps_match_timm(timm, name, fuse):
    torch.manual_seed(0)
    ref = _randomize(timm.create_model(name, pretrained=False, num_classes=10)).double()
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in ref.modules())
    new, rep = bnkit.convert(ref, report=True, fuse_activations=fuse)
    assert len(rep.converted) == n_bn and rep.left == []
    assert not any(is_torch_bn(m) for m in new.modules())
    if name == "resnet10t" and fuse:
        # the stem's two Sequential ReLUs and every block's act1 (through drop_block, an nn.Identity)
        assert ("layer1.0.bn1", "layer1.0.act1") in rep.fused and ("conv1.1", "conv1.2") in rep.fused
        assert type(new.layer1[0].act1) is nn.Identity and new.layer1[0].bn1.fused_activation() is not None
    if name == "mobilenetv3_small_050":  # timm's BatchNormAct2d (hardswish/relu) fuses with a plain convert
        assert new.bn1.fused_activation() is not None
    ref_run = copy.deepcopy(ref)
    xs, ys = _data(3, 32)
    rec_ref, rec_new = _sgd_run(ref_run, xs, ys), _sgd_run(new, xs, ys)
    _assert_same_runs(rec_new, rec_ref, REL64)
    _assert_same_state(new, ref_run, rel=REL64)
    ref_run.eval(), new.eval()
    with torch.no_grad():
        y_ref = ref_run(xs[0])
        _assert_scaled(new(xs[0]), y_ref, EVAL64, y_ref.abs().max().item(), "eval output")
    # and back: timm's classes again, the same tensors, the same eval outputs
    back = bnkit.convert(new, to="torch")
    assert [type(m) for m in back.modules()] == [type(m) for m in ref_run.modules()]
    _assert_same_state(back, new, exact=True)
    with torch.no_grad():
        y_ref = ref_run(xs[1])
        _assert_scaled(back(xs[1]), y_ref, EVAL64, y_ref.abs().max().item(), "eval output after to='torch'")


def test_timm_model_float32_matches_timm_at_default_tolerance(timm):
    """float32 where the net is well conditioned (64 px, batch 8): torch.testing's default tolerance."""
    torch.manual_seed(0)
    ref = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10)
    new = bnkit.convert(ref)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(8, 3, 64, 64, generator=g) for _ in range(2)]
    ys = [torch.randint(0, 10, (8,), generator=g) for _ in range(2)]
    ref_run = copy.deepcopy(ref)
    rec_ref, rec_new = _sgd_run(ref_run, xs, ys), _sgd_run(new, xs, ys)
    _assert_same_runs(rec_new, rec_ref, REL32)
    _assert_same_state(new, ref_run, rel=REL32)


def test_timm_state_dict_interchangeable_both_ways(timm):
    torch.manual_seed(0)
    ref = _randomize(timm.create_model("resnet10t", pretrained=False, num_classes=10), seed=1).double()
    ref.train()(_data(1, 32)[0][0])  # num_batches_tracked != 0
    new = bnkit.convert(timm.create_model("resnet10t", pretrained=False, num_classes=10).double(),
                        fuse_activations=True)
    md_new, md_ref = new.state_dict()._metadata, ref.state_dict()._metadata
    # every module's version as timm's; the fused layers' new children (bn.act, bn.drop) add entries
    assert {k: md_new[k] for k in md_ref} == dict(md_ref)
    assert set(md_new) - set(md_ref) == {f"{bn}.{c}" for bn, _ in bnkit.convert(ref, report=True,
                                         fuse_activations=True)[1].fused for c in ("act", "drop")}
    assert new.load_state_dict(ref.state_dict(), strict=True) == ref.load_state_dict(ref.state_dict(), strict=True)
    _assert_same_state(new, ref, exact=True)
    fresh = timm.create_model("resnet10t", pretrained=False, num_classes=10).double()
    fresh.load_state_dict(new.state_dict(), strict=True)
    _assert_same_state(fresh, ref, exact=True)
    x = _data(1, 32, seed=5)[0][0]
    ref.eval(), new.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(new(x), ref(x), rtol=1e-12, atol=1e-12)
        assert torch.equal(fresh(x), ref(x))


def test_timm_legacy_state_dict_without_num_batches_tracked_loads_as_in_timm(timm):
    """Old checkpoints (no num_batches_tracked, no version metadata) load strictly into torch's BN; the same here."""
    torch.manual_seed(0)
    ref = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    new = bnkit.convert(ref)
    for m in (ref, new):
        m.train()(torch.randn(4, 3, 32, 32))  # num_batches_tracked 1
    src = _randomize(timm.create_model("resnet10t", pretrained=False, num_classes=10), seed=2).state_dict()
    legacy = {k: v for k, v in src.items() if not k.endswith("num_batches_tracked")}  # a plain dict: no _metadata
    res_ref = ref.load_state_dict(dict(legacy), strict=True)
    res_new = new.load_state_dict(dict(legacy), strict=True)
    assert (res_new.missing_keys, res_new.unexpected_keys) == (res_ref.missing_keys, res_ref.unexpected_keys) == ([], [])
    _assert_same_state(new, ref, exact=True)  # num_batches_tracked as torch leaves it


def test_timm_model_attributes_repr_and_helpers_survive_conversion(timm):
    torch.manual_seed(0)
    ref = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10)
    new = bnkit.convert(ref)
    assert type(new) is type(ref)
    assert repr(new) == repr(ref)  # bnkit's layers print as the classes they replace
    assert new.pretrained_cfg == ref.pretrained_cfg and new.default_cfg == ref.default_cfg
    assert new.feature_info == ref.feature_info and new.num_classes == ref.num_classes
    assert repr(new.get_classifier()) == repr(ref.get_classifier())
    new.reset_classifier(5)
    assert new(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    # features_only (timm's FeatureListNet wrapper): the same feature maps
    f = _randomize(timm.create_model("resnet10t", pretrained=False, features_only=True, out_indices=(1, 3))).double().eval()
    fn = bnkit.convert(f)
    assert type(fn) is type(f) and fn.feature_info.channels() == f.feature_info.channels()
    x = _data(1, 32)[0][0]
    with torch.no_grad():
        for a, b in zip(fn(x), f(x), strict=True):
            _assert_scaled(a, b, REL64, b.abs().max().item(), "feature map")


def test_timm_norm_layer_argument_names_timms_own_layers_and_convert_is_the_way(timm):
    """docs/deployment.md, "timm models": timm looks a norm-act layer up by class name, so
    ``norm_layer=bnkit.BatchNorm2d`` builds timm's own BatchNormAct2d in an EfficientNet; converting the
    created model gives bnkit's layers with the same outputs and gradients."""
    torch.manual_seed(0)
    built = timm.create_model("efficientnet_b0", pretrained=False, num_classes=10, norm_layer=bnkit.BatchNorm2d)
    assert any(type(m) is timm.layers.BatchNormAct2d for m in built.modules())
    assert not any(isinstance(m, bnkit.BatchNorm) for m in built.modules())
    built = built.double()  # (49 BN layers down to 1x1 maps of a batch of 4: float32 rounding grows)
    ours, rep = bnkit.convert(built, report=True)
    assert rep.left == [] and not any(is_torch_bn(m) for m in ours.modules())
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    for m in (built, ours):
        m.train()
        m(x).square().sum().backward()
    torch.testing.assert_close(ours(x), built(x))
    for (n, p), (_, q) in zip(built.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=n)


def test_timm_optimizer_factory_and_model_ema_see_the_same_model(timm):
    from timm.optim import create_optimizer_v2
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    ref = _randomize(timm.create_model("resnet10t", pretrained=False, num_classes=10)).double()
    new = bnkit.convert(ref)
    xs, _ = _data(3, 32)
    emas, opts = [], []
    for m in (ref, new):
        # weight decay off for 1-d parameters (BN's gamma/beta) by ndim: the same groups for both
        opts.append(create_optimizer_v2(m, "sgd", lr=0.01, weight_decay=0.05, momentum=0.9))
        emas.append(ModelEmaV3(m, decay=0.5))  # averages the state_dict, BN buffers included
    assert [len(g["params"]) for g in opts[0].param_groups] == [len(g["params"]) for g in opts[1].param_groups]
    assert [g["weight_decay"] for g in opts[0].param_groups] == [g["weight_decay"] for g in opts[1].param_groups]
    for step, x in enumerate(xs):
        for m, o, e in zip((ref, new), opts, emas):
            m.train()
            o.zero_grad()
            m(x).logsumexp(1).sum().backward()
            o.step()
            e.update(m, step=step)
    _assert_same_state(new, ref, rel=REL64)
    _assert_same_state(emas[1].module, emas[0].module, rel=REL64)


@pytest.mark.parametrize("fuse", [False, True], ids=["plain", "fuse_act"])
def test_timm_grad_checkpointing_counts_each_step_once(timm, fuse):
    """``model.set_grad_checkpointing()`` (timm's checkpoint_seq, non-reentrant): bnkit's layers update once
    per step, as the model without checkpointing does (docs/training-loops.md); torch's update again in the
    recompute (the control shows that the comparison can tell)."""
    torch.manual_seed(0)
    ref = _randomize(timm.create_model("resnet10t", pretrained=False, num_classes=10)).double()
    torch_ckpt = copy.deepcopy(ref)
    torch_ckpt.set_grad_checkpointing(True)
    new = bnkit.convert(ref, fuse_activations=fuse)
    new.set_grad_checkpointing(True)
    assert new.grad_checkpointing
    xs, ys = _data(2, 32)
    rec_ref, rec_new = _sgd_run(ref, xs, ys), _sgd_run(new, xs, ys)
    _assert_same_runs(rec_new, rec_ref, REL64)
    _assert_same_state(new, ref, rel=REL64)
    _sgd_run(torch_ckpt, xs, ys)
    assert int(torch_ckpt.layer2[0].bn1.num_batches_tracked) == 4 != int(new.layer2[0].bn1.num_batches_tracked)


def test_timm_drop_path_draws_the_same_random_numbers(timm):
    torch.manual_seed(0)
    ref = _randomize(timm.create_model("resnet10t", pretrained=False, num_classes=10, drop_path_rate=0.5)).double()
    new = bnkit.convert(ref, fuse_activations=True)
    xs, ys = _data(3, 32)
    torch.manual_seed(7)
    rec_ref = _sgd_run(ref, xs, ys)
    torch.manual_seed(7)
    rec_new = _sgd_run(new, xs, ys)
    _assert_same_runs(rec_new, rec_ref, REL64)
    _assert_same_state(new, ref, rel=REL64)
    # the draw matters: another seed gives other outputs (so the comparison above can fail)
    torch.manual_seed(8)
    other = _sgd_run(copy.deepcopy(new), xs[:1], ys[:1])
    assert not torch.allclose(other[0][0], rec_new[0][0])


def test_timm_split_batchnorm_left_with_its_aux_layers_converted(timm):
    from timm.layers import SplitBatchNorm2d, convert_splitbn_model

    torch.manual_seed(0)
    base = _randomize(timm.create_model("resnet10t", pretrained=False, num_classes=10)).double()
    ref = convert_splitbn_model(base, num_splits=2)
    n_split = sum(type(m) is SplitBatchNorm2d for m in ref.modules())
    new, rep = bnkit.convert(ref, report=True)
    assert len(rep.left) == n_split and all("SplitBatchNorm2d" in cls and "overrides forward" in why for _, cls, why in rep.left)
    assert len(rep.converted) == n_split  # one aux_bn per split layer
    assert type(new.bn1) is SplitBatchNorm2d and type(new.bn1.aux_bn[0]) is bnkit.BatchNorm2d
    xs, ys = _data(2, 32)
    rec_ref, rec_new = _sgd_run(ref, xs, ys), _sgd_run(new, xs, ys)
    _assert_same_runs(rec_new, rec_ref, REL64)
    _assert_same_state(new, ref, rel=REL64)
    ref.eval(), new.eval()
    with torch.no_grad():
        y_ref = ref(xs[0])
        _assert_scaled(new(xs[0]), y_ref, EVAL64, y_ref.abs().max().item(), "eval output")


def test_timm_freeze_batch_norm_2d_freezes_a_converted_model(timm):
    """timm's freeze_batch_norm_2d finds BN by torch's class and passes bnkit's layers by; bnkit's version of it
    freezes them: the same outputs in train mode as timm's on the torch model, and no BN parameter left."""
    from bnkit.integrations.timm import freeze_batch_norm_2d, unfreeze_batch_norm_2d

    torch.manual_seed(0)
    ref = _randomize(timm.create_model("resnet10t", pretrained=False, num_classes=10))
    new = bnkit.convert(ref)
    fz_ref = timm.layers.freeze_batch_norm_2d(copy.deepcopy(ref))
    fz_new = freeze_batch_norm_2d(copy.deepcopy(new))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fz_new.train()(x), fz_ref.train()(x))  # frozen: the eval map in train mode
    assert [n for n, _ in fz_new.named_parameters()] == [n for n, _ in fz_ref.named_parameters()]
    back = unfreeze_batch_norm_2d(fz_new)
    assert [n for n, _ in back.named_parameters()] == [n for n, _ in new.named_parameters()]
    assert [type(m) for m in back.modules()] == [type(m) for m in new.modules()]
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), ref.eval()(x))
    # a converted layer as the root is returned frozen, as timm returns a frozen torch layer
    layer = bnkit.convert(_randomize(nn.BatchNorm2d(3)))
    assert isinstance(freeze_batch_norm_2d(layer), bnkit.FrozenBatchNorm2d)


@pytest.mark.parametrize("block", ["RepVggBlock", "MobileOneBlock"])
def test_timm_reparameterize_a_converted_block(timm, block):
    """timm's reparameterize asserts its branches are torch's BatchNorm2d; bnkit's reparameterize_model gives them
    back to timm as torch layers: the same map as timm's on the torch block, and the original is kept."""
    from timm.models import byobnet

    from bnkit.integrations.timm import reparameterize_model

    torch.manual_seed(0)
    ref = _randomize(getattr(byobnet, block)(8, 8)).double().eval()
    model = nn.Sequential(bnkit.convert(ref), bnkit.convert(_randomize(nn.BatchNorm2d(8))).double().eval())
    x = torch.randn(4, 8, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        fused = reparameterize_model(model)
        torch.testing.assert_close(fused(x), want, **F64)
        torch.testing.assert_close(fused(x), timm.models.reparameterize_model(nn.Sequential(ref, model[1]))(x), **F64)
    assert not any(isinstance(m, (nn.BatchNorm2d, bnkit.BatchNorm)) for m in fused[0].modules())
    assert isinstance(fused[1], bnkit.BatchNorm2d)  # BN outside re-parameterized blocks stays bnkit's
    assert any(isinstance(m, bnkit.BatchNorm) for m in model[0].modules())  # not inplace: the model is unchanged


def test_timm_reparameterize_after_converting_back(timm):
    """The way that works today: convert(to="torch") gives timm's classes back, and reparameterize is exact."""
    from timm.models import byobnet

    torch.manual_seed(0)
    ref = _randomize(byobnet.MobileOneBlock(8, 8, num_conv_branches=2)).double()
    new = bnkit.convert(ref)
    x = torch.randn(4, 8, 6, 6, dtype=torch.float64)
    new.train()(x), ref.train()(x)  # a training forward: the statistics move
    back = bnkit.convert(new, to="torch").eval()
    ref.eval()
    with torch.no_grad():
        want = ref(x)
        back.reparameterize()
        assert back.reparam_conv is not None
        torch.testing.assert_close(back(x), want, rtol=1e-10, atol=1e-10)


def test_timm_batchnormact_wrong_rank_raises_torchs_exception_with_timms_message(timm):
    """docs/differences.md: a converted BatchNormAct2d raises what torch's BatchNorm2d raises for a wrong rank
    (ValueError), not timm's AssertionError (torch._assert); the message is the same."""
    ref = timm.layers.BatchNormAct2d(4)
    new = bnkit.convert(ref)
    x = torch.randn(2, 4, 3)
    with pytest.raises(AssertionError) as want:
        ref(x)
    with pytest.raises(ValueError) as got:
        new(x)
    with pytest.raises(ValueError) as torch_bn:
        nn.BatchNorm2d(4)(x)
    assert str(got.value) == str(want.value) == str(torch_bn.value)


_ACTS = ["relu", "silu", "hard_swish", "gelu", "leaky_relu", "relu6", None]


@settings(max_examples=12, deadline=None)
@given(
    act=st.sampled_from(_ACTS),
    drop=st.booleans(),
    affine=st.booleans(),
    track=st.booleans(),
    momentum=st.sampled_from([0.1, 0.7, None]),
    eps=st.sampled_from([1e-5, 1e-3]),
    channels_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_timm_norm_act_layers_from_the_factory(timm, act, drop, affine, track, momentum, eps, channels_last, seed):
    """create_norm_act_layer("batchnorm", ...) -> timm's BatchNormAct2d, every flag; converted == timm's, float64."""
    kw = dict(eps=eps, momentum=momentum, affine=affine, track_running_stats=track, apply_act=act is not None,
              drop_layer=nn.Dropout if drop else None)
    ref = timm.layers.create_norm_act_layer("batchnorm", 5, act_layer=act or "relu", **kw)
    assert type(ref) is timm.layers.BatchNormAct2d
    ref = _randomize(ref, seed).double()
    new = bnkit.convert(ref)
    assert type(new) is bnkit.variants.BatchNormAct2d and (new.momentum, new.eps) == (momentum, eps)
    g = torch.Generator().manual_seed(seed)
    for step, training in enumerate((True, True, False, True)):
        x = torch.randn(3, 5, 4, 3, generator=g, dtype=torch.float64) * 2 + 0.5
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        w = torch.randn(3, 5, 4, 3, generator=g, dtype=torch.float64)
        outs = []
        for m in (ref, new):
            m.train(training)
            for p in m.parameters():
                p.grad = None
            xi = x.clone().requires_grad_()
            torch.manual_seed(seed + step)  # dropout's draw
            y = m(xi)
            (y * w).sum().backward()
            outs.append((y, xi.grad, [p.grad for p in m.parameters()]))
        (yr, gr, pr), (yn, gn, pn) = outs
        tol = dict(rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(yn, yr, **tol)
        torch.testing.assert_close(gn, gr, **tol)
        for a, b in zip(pn, pr, strict=True):
            torch.testing.assert_close(a, b, **tol)
        _assert_same_state(new, ref, **tol)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_accelerate_on_an_unconverted_timm_model_is_the_same(timm, accelerate_off, channels_last):
    torch.manual_seed(0)
    ref = _randomize(timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ref = ref.to(memory_format=fmt)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(8, 3, 64, 64, generator=g).to(memory_format=fmt) for _ in range(2)]
    ys = [torch.randint(0, 10, (8,), generator=g) for _ in range(2)]
    acc = copy.deepcopy(ref)
    rec_ref = _sgd_run(ref, xs, ys)
    with bnkit.accelerated():
        rec_acc = _sgd_run(acc, xs, ys)
        acc.eval(), ref.eval()
        with torch.no_grad():
            y_acc = acc(xs[0])
    counts = bnkit.accelerate_counts()
    assert counts["forward"] > 0 and counts["backward"] > 0  # bnkit's kernels did serve timm's layers
    assert not bnkit.is_accelerated()
    _assert_same_runs(rec_acc, rec_ref, REL32)
    _assert_same_state(acc, ref, rel=REL32)
    with torch.no_grad():
        y_ref = ref(xs[0])
        _assert_scaled(y_acc, y_ref, REL32, y_ref.abs().max().item(), "eval output")


# =========================================================================== Lightning
needs_pl = pytest.mark.skipif(pl is None, reason="pytorch_lightning is not installed")


def _pl_net(kind: str) -> nn.Sequential:
    """conv -> BN2d -> ReLU -> pool -> linear -> BN1d -> linear; ``kind``: "torch" or "bnkit" BN layers."""
    bn2, bn1 = (nn.BatchNorm2d, nn.BatchNorm1d) if kind == "torch" else (bnkit.BatchNorm2d, bnkit.BatchNorm1d)
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), bn2(6, momentum=0.3), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(24, 8), bn1(8, momentum=None), nn.Linear(8, 3))


_G = torch.Generator().manual_seed(0)
_X = torch.randn(48, 3, 8, 8, generator=_G) * 2 + 0.5
_Y = torch.randint(0, 3, (48,), generator=_G)


def _loader(batch_size: int = 8) -> DataLoader:
    return DataLoader(TensorDataset(_X, _Y), batch_size=batch_size, shuffle=False)


if pl is not None:

    class _Module(pl.LightningModule):
        def __init__(self, model: nn.Module, lr: float = 0.1) -> None:
            super().__init__()
            self.model = model
            self.lr = lr
            self.events: list = []
            self.val_out: list[torch.Tensor] = []
            self.train_dtypes: set = set()

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.events.append(("train", self.model.training, sorted({type(m).__qualname__ for m in self.model.modules()})))
            out = self.model(x)
            self.train_dtypes.add(out.dtype)
            return nn.functional.cross_entropy(out.float(), y)

        def validation_step(self, batch, batch_idx):
            x, _ = batch
            self.events.append(("val", self.model.training))
            self.val_out.append(self.model(x).detach().clone())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def _fit(model: nn.Module, *, val: bool = False, ckpt_path=None, callbacks=(), **kw) -> tuple:
    lm = _Module(model)
    kw.setdefault("max_epochs", 1)
    kw.setdefault("enable_checkpointing", False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=list(callbacks), **kw)
    trainer.fit(lm, _loader(), _loader() if val else None, ckpt_path=ckpt_path)
    return lm, trainer


@needs_pl
def test_lightning_fit_with_validation_matches_torch_bn(quiet_lightning):
    ref, _ = _fit(_pl_net("torch"), val=True, val_check_interval=3)
    new, _ = _fit(_pl_net("bnkit"), val=True, val_check_interval=3)
    _assert_same_state(new, ref)
    # validation ran in eval mode (sanity check, then after steps 3 and 6), training in train mode again after it
    assert [e[:2] for e in new.events] == [e[:2] for e in ref.events]
    modes = [e[1] for e in new.events]
    assert modes.count(False) == 2 + 6 + 6 and all(e[1] for e in new.events if e[0] == "train")
    assert [e[0] for e in new.events][2:6] == ["train"] * 3 + ["val"]  # sanity val, 3 steps, val, ...
    assert len(new.val_out) == len(ref.val_out) == 14
    for a, b in zip(new.val_out, ref.val_out):
        torch.testing.assert_close(a, b)
    # validation does not move the statistics: 6 training batches, nothing else
    assert int(new.model[1].num_batches_tracked) == int(ref.model[1].num_batches_tracked) == 6
    assert new.model.training  # Lightning leaves the module in train mode after fit


@needs_pl
def test_lightning_accumulate_grad_batches_matches_torch_bn(quiet_lightning):
    """With accumulate_grad_batches=2 every micro-batch moves the statistics, as torch's (docs: pytorch#46516)."""
    ref, _ = _fit(_pl_net("torch"), accumulate_grad_batches=2)
    new, _ = _fit(_pl_net("bnkit"), accumulate_grad_batches=2)
    _assert_same_state(new, ref)
    assert int(new.model[1].num_batches_tracked) == 6  # micro-batches, not the 3 optimizer steps


if pl is not None:

    class _AccumulateStats(pl.Callback):
        """bnkit.accumulate_stats around each optimizer step's micro-batches (one running update per step)."""

        def __init__(self, k: int) -> None:
            self.k, self.block, self.steps = k, None, 0

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx % self.k == 0:
                self.block = bnkit.accumulate_stats(module.model)
                self.block.__enter__()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if (batch_idx + 1) % self.k == 0:
                self.block.__exit__(None, None, None)
                self.block = None
                self.steps += 1


@needs_pl
@pytest.mark.parametrize("kind", ["bnkit", "torch"])
def test_lightning_accumulate_stats_callback_gives_one_update_per_step(quiet_lightning, kind):
    """docs/training-loops.md: inside accumulate_stats each micro-batch is normalized as without it, and at the
    block's exit one update from the whole step's batch. Oracle by hand: the BN layer comes first, so it sees
    the raw data: rm <- (1-m) rm + m mean(step), rv <- (1-m) rv + m var_unbiased(step)."""
    bn = bnkit.BatchNorm2d if kind == "bnkit" else nn.BatchNorm2d

    def net():
        torch.manual_seed(0)
        return nn.Sequential(bn(3, momentum=0.3), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(4, 3))

    cb = _AccumulateStats(2)
    new, _ = _fit(net(), accumulate_grad_batches=2, callbacks=[cb])
    plain, _ = _fit(net(), accumulate_grad_batches=2)
    assert cb.steps == 3
    # weights: the same as without the block (normalization per micro-batch unchanged)
    for (k, a), (_, b) in zip(new.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a, b, msg=lambda m, k=k: f"{k}: {m}")
    layer = new.model[0]
    assert int(layer.num_batches_tracked) == 3
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for step in range(3):
        part = _X[16 * step: 16 * (step + 1)].double().transpose(0, 1).reshape(3, -1)
        rm = 0.7 * rm + 0.3 * part.mean(1)
        rv = 0.7 * rv + 0.3 * part.var(1, unbiased=True)
    torch.testing.assert_close(layer.running_mean.double(), rm, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.running_var.double(), rv, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(plain.model[0].running_var.double(), rv, atol=1e-3)  # the control differs


@needs_pl
def test_lightning_checkpoint_resume_equals_an_uninterrupted_run(quiet_lightning, tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    full_torch, _ = _fit(_pl_net("torch"), max_epochs=2)
    full, _ = _fit(_pl_net("bnkit"), max_epochs=2)
    ck = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    _fit(_pl_net("bnkit"), max_epochs=1, enable_checkpointing=True, callbacks=[ck])
    last = tmp_path / "last.ckpt"
    assert last.exists()
    resumed, trainer = _fit(_pl_net("bnkit"), max_epochs=2, ckpt_path=str(last))
    assert trainer.global_step == 12
    _assert_same_state(resumed, full, exact=True)  # bit for bit: the resumed run is the same run
    _assert_same_state(resumed, full_torch)
    assert int(resumed.model[1].num_batches_tracked) == 12
    # the checkpoint bnkit's module wrote loads into the torch-BN module, strictly (weights_only too)
    state = torch.load(last, weights_only=True)["state_dict"]
    into = _Module(_pl_net("torch"))
    into.load_state_dict(state, strict=True)
    half_torch, _ = _fit(_pl_net("torch"), max_epochs=1)
    _assert_same_state(into, half_torch)


@needs_pl
def test_lightning_bf16_mixed_on_cpu_matches_torch_bn(quiet_lightning):
    ref, _ = _fit(_pl_net("torch"), precision="bf16-mixed")
    new, _ = _fit(_pl_net("bnkit"), precision="bf16-mixed")
    f32, _ = _fit(_pl_net("bnkit"))
    assert new.train_dtypes == ref.train_dtypes == {torch.bfloat16}
    for m in (new.model[1], new.model[6]):
        assert m.weight.dtype == m.running_mean.dtype == m.running_var.dtype == torch.float32
    _assert_same_state(new, ref, rtol=1.6e-2, atol=1e-3)
    # and the comparison can tell bf16 from float32 training
    assert not all(torch.allclose(a, b, atol=1e-3) for a, b in zip(f32.state_dict().values(), new.state_dict().values()))


@pytest.fixture
def ddp_one_process():
    """Lightning's DDP strategy, one CPU process (gloo, world size 1); the group and env are removed after."""
    import torch.distributed as dist

    env = dict(os.environ)
    assert not dist.is_initialized()
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)


@needs_pl
def test_lightning_plugin_under_ddp_converts_for_fit_and_restores_after(quiet_lightning, ddp_one_process, timm):
    from bnkit.integrations.lightning import BnkitSyncBatchNorm

    class Net(nn.Module):
        def __init__(self, oracle: bool = False) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.a = bnkit.BatchNorm2d(6) if not oracle else nn.BatchNorm2d(6)
            self.b = timm.layers.BatchNormAct2d(6, act_layer=nn.SiLU)
            self.c = nn.SyncBatchNorm(6) if not oracle else nn.BatchNorm2d(6)
            self.d = nn.Sequential(nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6), nn.ReLU())
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 3))

        def forward(self, x):
            return self.head(self.d(self.c(self.b(self.a(self.conv(x))))))

    net = Net()
    net.d = bnkit.convert(net.d, fuse_activations=True)  # a fused bnkit BatchNormAct2d, its ReLU slot an Identity
    before = {n: type(m) for n, m in net.named_modules()}
    tensors = dict(net.state_dict(keep_vars=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing left per-rank: no warning from the plugin
        warnings.filterwarnings("ignore", module="pytorch_lightning|lightning_fabric|torch")
        new, trainer = _fit(net, strategy="ddp", plugins=[BnkitSyncBatchNorm()], sync_batchnorm=True)
    assert trainer.world_size == 1
    during = set(new.events[0][2])
    assert {"SyncBatchNorm", "SyncBatchNormAct"} <= during and "BatchNorm2d" not in during and "BatchNormAct2d" not in during
    assert {n: type(m) for n, m in new.model.named_modules()} == before  # every layer its class again
    for k, v in new.model.state_dict(keep_vars=True).items():
        assert v is tensors[k], k  # the very tensors
    assert new.model.d[1].fused_activation() is not None and type(new.model.d[2]) is nn.Identity
    ref, _ = _fit(Net(oracle=True), strategy="ddp")  # the same strategy: DDP's sampler orders the data
    _assert_same_state(new.model, ref.model)
