"""Audit: torch and ecosystem code that finds BN layers by torch's class, on bnkit's drop-ins.

bnkit's BatchNorm1d/2d/3d derive from torch's classes (docs/differences.md, "Code that finds BN layers by
torch's class"), so helpers checking ``isinstance(m, _BatchNorm)`` / ``nn.BatchNorm2d`` now take them. The
oracle of every test is the same helper run on the same model built with torch's BN layers (the bnkit twin is
``bnkit.convert(copy.deepcopy(torch_model))``). tests/test_torch_class_lookup.py covers the lookups themselves,
update_bn on a mixed model, torch.func, timm's freeze_batch_norm_2d and torch's SyncBN converter on plain
drop-ins; this file covers fusion, mkldnn, inductor, FSDP, serialization, update_bn options, bnkit-only
options under torch's SyncBN converter, and timm's freeze/unfreeze and SyncBN converter.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.nn.modules import batchnorm as torch_bn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

import bnkit

try:  # before the torchvision stand-in that import_timm installs
    import pytorch_lightning  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    pass

from _compare import assert_close, randomize_bn  # noqa: E402
from _timm_stub import import_timm  # noqa: E402


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 5 * 5, 6), nn.BatchNorm1d(6), nn.Linear(6, 2),
    )
    return randomize_bn(net)


def _twins(make=_net) -> tuple[nn.Module, nn.Module]:
    t = make()
    b = bnkit.convert(copy.deepcopy(t))
    n_torch = sum(isinstance(m, torch_bn._BatchNorm) for m in t.modules())
    assert n_torch and sum(isinstance(m, bnkit.BatchNorm) for m in b.modules()) == n_torch
    return t, b


def _x(n=8, seed=1, shape=(3, 5, 5)):
    return torch.randn(n, *shape, generator=_gen(seed)) * 1.5 + 0.5


def _same_state(a: nn.Module, b: nn.Module, tol=1e-5):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert_close(sa[k], sb[k], tol, k)


# --------------------------------------------------------------------------- torch.nn.utils.fusion

CONV_BN = [
    (nn.Conv1d, nn.BatchNorm1d, (4, 3, 7)),
    (nn.Conv2d, nn.BatchNorm2d, (4, 3, 5, 5)),
    (nn.Conv3d, nn.BatchNorm3d, (2, 3, 3, 4, 4)),
]


@pytest.mark.parametrize("conv_cls, bn_cls, shape", CONV_BN)
@pytest.mark.parametrize("conv_bias", [True, False])
def test_fuse_conv_bn_eval_on_drop_ins_matches_torch(conv_cls, bn_cls, shape, conv_bias):
    torch.manual_seed(0)
    t = randomize_bn(nn.Sequential(conv_cls(3, 4, 3, padding=1, bias=conv_bias), bn_cls(4))).eval()
    b = bnkit.convert(copy.deepcopy(t)).eval()
    assert isinstance(b[1], bnkit.BatchNorm) and isinstance(b[1], bn_cls)
    ft, fb = fuse_conv_bn_eval(t[0], t[1]), fuse_conv_bn_eval(b[0], b[1])
    assert type(fb) is type(ft)
    assert_close(fb.weight, ft.weight, 1e-6, "fused weight")
    assert_close(fb.bias, ft.bias, 1e-6, "fused bias")
    x = torch.randn(*shape, generator=_gen(2))
    assert_close(fb(x), t(x), 1e-5, "fused vs torch conv+bn")


def test_fuse_linear_bn_eval_on_drop_in_matches_torch():
    torch.manual_seed(0)
    t = randomize_bn(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6))).eval()
    b = bnkit.convert(copy.deepcopy(t)).eval()
    ft, fb = fuse_linear_bn_eval(t[0], t[1]), fuse_linear_bn_eval(b[0], b[1])
    assert_close(fb.weight, ft.weight, 1e-6, "weight")
    assert_close(fb.bias, ft.bias, 1e-6, "bias")
    x = torch.randn(7, 5, generator=_gen(3))
    assert_close(fb(x), t(x), 1e-5, "fused")


def _torch_equivalent(bn: bnkit.BatchNorm) -> nn.BatchNorm2d:
    """torch's BatchNorm2d computing what ``bn`` (possibly with bnkit-only affine options) computes in eval."""
    ref = nn.BatchNorm2d(bn.num_features, eps=bn.eps, affine=bn.affine).eval()
    with torch.no_grad():
        ref.running_mean.copy_(bn.running_mean)
        ref.running_var.copy_(bn.running_var)
        if bn.affine:
            ref.weight.copy_(bn.weight.expand(bn.num_features))
            ref.bias.copy_(torch.zeros(bn.num_features) if bn.bias is None else bn.bias.expand(bn.num_features))
    return ref


@pytest.mark.parametrize(
    "opts", [dict(bias=False), dict(share_affine="weight"), dict(share_affine="all"), dict(affine=False)]
)
def test_fuse_conv_bn_eval_with_bnkit_affine_options_matches_torch_equivalent(opts):
    """bnkit-only affine options (``bias=False``, a shared scalar weight/bias) give tensors torch's fusion
    formula still takes (None, or broadcasting size-1 tensors): the result is torch's fusion of the
    equivalent torch layer."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    bn = randomize_bn(bnkit.BatchNorm2d(4, **opts)).eval()
    conv.eval()
    ref = _torch_equivalent(bn)
    fb, ft = fuse_conv_bn_eval(conv, bn), fuse_conv_bn_eval(conv, ref)
    assert_close(fb.weight, ft.weight, 1e-6, "weight")
    assert_close(fb.bias, ft.bias, 1e-6, "bias")
    x = torch.randn(2, 3, 5, 5, generator=_gen(4))
    assert_close(fb(x), bn(conv(x)), 1e-5, "fused vs bnkit's conv+bn")


def test_fuse_conv_bn_eval_refuses_training_and_stat_less_drop_ins_as_torch():
    conv = nn.Conv2d(3, 4, 3).eval()
    for make in (nn.BatchNorm2d, bnkit.BatchNorm2d):
        with pytest.raises(AssertionError, match="only for eval"):
            fuse_conv_bn_eval(conv, make(4).train())
        with pytest.raises(AssertionError, match="must not be None"):
            fuse_conv_bn_eval(conv, make(4, track_running_stats=False).eval())


# --------------------------------------------------------------------------- torch.fx.experimental.optimization.fuse


def _fx_fuse_pair():
    from torch.fx.experimental.optimization import fuse

    t, b = _twins()
    t.eval(), b.eval()
    return fuse(t), fuse(b), t, b


def test_fx_fuse_model_with_drop_ins_computes_torchs_fused_result():
    ft, fb, t, _ = _fx_fuse_pair()
    x = _x()
    with torch.no_grad():
        assert_close(fb(x), ft(x), 1e-5, "fx.fuse output")
        assert_close(fb(x), t(x), 1e-5, "vs unfused torch")


def test_fx_fuse_matches_by_exact_type_and_leaves_drop_ins_unfused():
    """docs/differences.md: matchers comparing type(m) exactly (fx.experimental.optimization.fuse) miss the
    drop-ins; bnkit.fuse folds them (tests/test_torch_utils.py)."""
    ft, fb, _, _ = _fx_fuse_pair()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in ft.modules())
    assert sum(isinstance(m, bnkit.BatchNorm) for m in fb.modules()) == 3


# --------------------------------------------------------------------------- torch.utils.mkldnn


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs mkldnn")
@pytest.mark.parametrize("conv_cls, bn_cls, shape", CONV_BN[1:])
def test_to_mkldnn_converts_drop_ins_as_torch(conv_cls, bn_cls, shape):
    from torch.utils.mkldnn import to_mkldnn

    torch.manual_seed(0)
    t = randomize_bn(nn.Sequential(conv_cls(3, 4, 3, padding=1), bn_cls(4))).eval()
    b = bnkit.convert(copy.deepcopy(t)).eval()
    mt, mb = to_mkldnn(copy.deepcopy(t)), to_mkldnn(copy.deepcopy(b))
    assert [type(m).__name__ for m in mb.modules()] == [type(m).__name__ for m in mt.modules()]
    assert type(mt[1]).__name__ == "MkldnnBatchNorm"
    x = torch.randn(*shape, generator=_gen(5))
    with torch.no_grad():
        assert_close(mb(x.to_mkldnn()).to_dense(), mt(x.to_mkldnn()).to_dense(), 1e-5, "mkldnn output")
        assert_close(mb(x.to_mkldnn()).to_dense(), t(x), 1e-5, "vs dense torch")


# --------------------------------------------------------------------------- inductor efficient_conv_bn_eval


@pytest.fixture(scope="module")
def compiled_with_efficient_conv_bn():
    """Both twins compiled with inductor's efficient_conv_bn_eval pass: (output, pairs rewritten) per twin.

    Each model runs once eagerly first, as a model usually has before it is compiled (for bnkit's layers this
    also loads the C++ extension, which changes what bnkit's forward traces to)."""
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    def make():
        torch.manual_seed(0)
        return randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()))

    t, b = _twins(make)
    t.eval(), b.eval()
    x = _x(n=2)
    got = {}
    # no FX graph cache: a cache hit skips the pre-grad passes, and so the count of rewritten pairs
    with inductor_config.patch(efficient_conv_bn_eval_fx_passes=True, fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False), torch.no_grad():
        for name, m in (("torch", t), ("bnkit", b)):
            eager = m(x)
            torch._dynamo.reset()
            counters.clear()
            y = torch.compile(m)(x)
            got[name] = (y, counters["inductor"]["efficient_conv_bn_eval"], eager)
    torch._dynamo.reset()
    return got


def test_compile_efficient_conv_bn_eval_pass_output_matches_torch(compiled_with_efficient_conv_bn):
    got = compiled_with_efficient_conv_bn
    assert_close(got["bnkit"][0], got["torch"][0], 1e-5, "compiled output")
    assert_close(got["bnkit"][0], got["bnkit"][2], 1e-5, "compiled vs eager")


def test_compile_efficient_conv_bn_eval_pass_rewrites_drop_ins_as_torch(compiled_with_efficient_conv_bn):
    got = compiled_with_efficient_conv_bn
    assert got["torch"][1] == 1
    assert got["bnkit"][1] == got["torch"][1], "the pass rewrote a different number of conv+bn pairs"


# --------------------------------------------------------------------------- FSDP mixed precision


def test_fsdp_mixed_precision_keeps_drop_ins_in_float32_as_torch(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import MixedPrecision
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    def make():
        torch.manual_seed(0)
        return randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)))

    t, b = _twins(make)
    x = _x(n=4)
    mp = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16, buffer_dtype=torch.bfloat16)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        seen = {}
        for name, m in (("torch", t), ("bnkit", b)):
            with pytest.warns(UserWarning, match="mixed precision disabled"):
                w = FSDP(m, mixed_precision=mp, auto_wrap_policy=ModuleWrapPolicy({nn.Conv2d}),
                         device_id=torch.device("cpu"), use_orig_params=True)
            y = w.train()(x)
            wrapped = [n for n, q in w.named_modules() if isinstance(q, FSDP)]
            no_mp = [n for n, q in w.named_modules() if isinstance(q, FSDP) and q.mixed_precision.param_dtype is None]
            buffers = {n: v.dtype for n, v in w.named_buffers()}
            seen[name] = (y, wrapped, no_mp, buffers, {n: v.detach().clone() for n, v in w.named_buffers()})
    finally:
        dist.destroy_process_group()
    yt, yb = seen["torch"], seen["bnkit"]
    assert yb[1] == yt[1] and yb[2] == yt[2] and yt[2], "the BN layers are wrapped without mixed precision"
    assert yb[3] == yt[3] and any(d == torch.float32 for k, d in yt[3].items() if "running" in k)
    assert yb[0].dtype == yt[0].dtype
    assert_close(yb[0], yt[0], 1e-2, "bf16 output")  # bf16 conv: identical tensors, identical rounding
    for k in yt[4]:
        assert_close(yb[4][k], yt[4][k], 1e-5, k)


# --------------------------------------------------------------------------- torch's SyncBN converter, bnkit options

def _sync(bn):
    return nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(copy.deepcopy(bn)))[0]


def _bn_pair(**opts):
    """A randomized bnkit layer with ``opts`` and torch's BatchNorm2d with the same tensors."""
    b = randomize_bn(bnkit.BatchNorm2d(4, **opts))
    t = nn.BatchNorm2d(4)
    t.load_state_dict(b.state_dict())
    return b, t


def test_torch_sync_converter_drops_keras_convention():
    """docs: torch's converter drops convention="keras": the SyncBatchNorm averages the unbiased variance as
    torch's layer, not the biased one as the bnkit layer does."""
    b, t = _bn_pair(convention="keras")
    s = _sync(b)
    assert type(s) is nn.SyncBatchNorm and not hasattr(s, "convention")
    x = _x(n=6, shape=(4, 3, 3)) * 2
    for m in (b, t, s):
        m.train()(x)
    assert_close(s.running_var, t.running_var, 1e-5, "torch's convention")
    assert not torch.allclose(b.running_var, t.running_var, rtol=1e-4), "the keras layer must differ"


def test_torch_sync_converter_drops_nonfinite_policy():
    b, t = _bn_pair(nonfinite="raise")
    s = _sync(b)
    x = _x(n=4, shape=(4, 3, 3))
    x[0, 1, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        b.train()(x)
    for m in (t, s):
        m.train()(x)
    assert torch.isnan(t.running_mean[1]) and torch.isnan(s.running_mean[1])  # as torch: propagated
    assert_close(s.running_mean[[0, 2, 3]], t.running_mean[[0, 2, 3]], 1e-6, "other channels")


def test_torch_sync_converter_drops_tiny_batch_policy():
    b, t = _bn_pair(tiny_batch="running")
    s = _sync(b)
    x = _x(n=1, shape=(4, 1, 1))
    with pytest.warns(RuntimeWarning):
        b.train()(x)
    for m in (t, s):
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            m.train()(x)


@pytest.mark.parametrize("share", ["weight", "all"])
def test_torch_sync_converter_gives_share_affine_layers_a_layer_that_cannot_run(share):
    """docs/differences.md: torch's converter copies the (1,)-shaped shared parameters as they are, so the
    SyncBatchNorm it makes raises torch's RuntimeError at its first call; bnkit's converter keeps the option."""
    b = randomize_bn(bnkit.BatchNorm2d(4, share_affine=share)).eval()
    s = _sync(b).eval()
    x = _x(n=2, shape=(4, 3, 3))
    with pytest.raises(RuntimeError, match="weight should contain 4 elements"):
        s(x)
    ours = bnkit.convert_sync_batchnorm(copy.deepcopy(b)).eval()
    assert ours.share_affine == share
    assert_close(ours(x), b(x), 1e-6, "bnkit's converter")


# --------------------------------------------------------------------------- serialization


def test_state_dict_round_trip_torch_to_bnkit_and_back_through_weights_only_load():
    t, b = _twins()
    fresh_t, fresh_b = bnkit.convert(copy.deepcopy(t), to="torch"), bnkit.convert(copy.deepcopy(t))
    for m in (fresh_t, fresh_b):  # clear the copied tensors, so that only the load can give them back
        for layer in m.modules():
            if isinstance(layer, torch_bn._BatchNorm):
                layer.reset_parameters()
    buf = io.BytesIO()
    torch.save(t.state_dict(), buf)
    buf.seek(0)
    fresh_b.load_state_dict(torch.load(buf, weights_only=True))  # a torch checkpoint into bnkit's layers
    _same_state(fresh_b, t, 0)
    buf = io.BytesIO()
    torch.save(fresh_b.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert sd._metadata["1"]["version"] == t.state_dict()._metadata["1"]["version"]
    fresh_t.load_state_dict(sd)  # and back into torch's
    _same_state(fresh_t, t, 0)
    x = _x()
    for m in (t, fresh_b, fresh_t):
        m.eval()
    assert_close(fresh_b(x), t(x), 1e-5, "bnkit after load")
    assert_close(fresh_t(x), t(x), 1e-5, "torch after round trip")


def test_pickle_and_deepcopy_of_whole_model_keep_drop_ins_and_match_torch():
    t, b = _twins()
    for how in ("pickle", "deepcopy", "torch.save"):
        if how == "pickle":
            tt, bb = pickle.loads(pickle.dumps(t)), pickle.loads(pickle.dumps(b))
        elif how == "deepcopy":
            tt, bb = copy.deepcopy(t), copy.deepcopy(b)
        else:
            out = []
            for m in (t, b):
                buf = io.BytesIO()
                torch.save(m, buf)
                buf.seek(0)
                out.append(torch.load(buf, weights_only=False))
            tt, bb = out
        assert [type(m) for m in bb.modules()] == [type(m) for m in b.modules()], how
        assert isinstance(bb[1], nn.BatchNorm2d) and isinstance(bb[8], nn.BatchNorm1d)
        _same_state(bb, tt, 0)
        x = _x(seed=7)
        assert_close(bb.train()(x), tt.train()(x), 1e-5, f"{how} train")
        _same_state(bb, tt)
        assert_close(bb.eval()(x), tt.eval()(x), 1e-5, f"{how} eval")


def test_weights_only_load_of_whole_model_refused_alike():
    t, b = _twins()
    errors = []
    for m in (t, b):
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        with pytest.raises(pickle.UnpicklingError) as err:
            torch.load(buf, weights_only=True)
        errors.append(str(err.value))
    assert "Weights only load failed" in errors[0] and "Weights only load failed" in errors[1]


# --------------------------------------------------------------------------- update_bn with options


@pytest.mark.parametrize("opts", [dict(momentum=None), dict(track_running_stats=False), dict(momentum=0.3)])
def test_update_bn_on_drop_ins_with_torch_options_matches_torch(opts):
    from torch.optim.swa_utils import update_bn

    def make():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, **opts), nn.ReLU(), nn.Flatten(),
                            nn.Linear(36, 5), nn.BatchNorm1d(5, **opts))
        return randomize_bn(net)

    t, b = _twins(make)
    for m in (t, b):  # a few training steps first, so that there is something to reset
        m.train()
        for s in range(2):
            m(_x(seed=10 + s))
    _same_state(b, t)
    loader = [_x(n=6, seed=s) for s in range(3)]
    update_bn(loader, t)
    update_bn(loader, b)
    _same_state(b, t)
    for i in (1, 5):
        assert b[i].momentum == t[i].momentum == opts.get("momentum", 0.1)
        assert b[i].training == t[i].training
    x = _x(seed=20)
    assert_close(b.eval()(x), t.eval()(x), 1e-5, "eval after update_bn")
    t.train()(x), b.train()(x)  # the restored momentum is used by the next training step
    _same_state(b, t)


# --------------------------------------------------------------------------- timm helpers


def _timm():
    return import_timm()


def test_timm_freeze_and_unfreeze_match_torch():
    timm = _timm()
    from timm.utils.model import freeze, unfreeze

    t, b = _twins()
    for m in (t, b):
        freeze(m, submodules=["1", "3", "4", "8"])
    assert [type(m).__name__ for m in b.modules()] == [type(m).__name__ for m in t.modules()]
    assert type(b[1]) is timm.utils.model.FrozenBatchNorm2d  # BatchNorm2d frozen, BatchNorm1d left (timm: 2d only)
    assert {n: p.requires_grad for n, p in b.named_parameters()} == {n: p.requires_grad for n, p in t.named_parameters()}
    x = _x(seed=3)
    with torch.no_grad():
        assert_close(b.train()(x), t.train()(x), 1e-5, "frozen, training mode")
    _same_state(b, t)
    for m in (t, b):
        unfreeze(m, submodules=["1", "3", "4", "8"])
    # the frozen BatchNorm2d layers come back as torch's BatchNorm2d (docs), the BatchNorm1d stays bnkit's
    assert [type(m) for m in b.modules()][:9] == [type(m) for m in t.modules()][:9]
    assert type(b[1]) is nn.BatchNorm2d and type(b[8]) is bnkit.BatchNorm1d
    _same_state(b, t)
    assert_close(b.train()(x), t.train()(x), 1e-5, "unfrozen")
    _same_state(b, t)


def test_timm_freeze_refuses_a_drop_in_as_root_like_torch():
    _timm()
    from timm.utils.model import freeze

    for bn in (nn.BatchNorm2d(4), bnkit.BatchNorm2d(4)):
        with pytest.raises(AssertionError, match="batch norm layer as the `root module`"):
            freeze(bn)


def test_timm_convert_sync_batchnorm_matches_torch():
    """timm's converter: drop-ins (a _BatchNorm) become torch's SyncBatchNorm as torch's layers do; bnkit's
    BatchNormAct2d (a variant, not a torch class: docs) is passed by and still applies its activation."""
    timm = _timm()

    def make():
        torch.manual_seed(0)
        return randomize_bn(nn.Sequential(
            nn.Conv2d(3, 4, 3), timm.layers.BatchNormAct2d(4, act_layer=nn.ReLU), nn.Conv2d(4, 4, 1),
            nn.BatchNorm2d(4)))

    t, b = _twins(make)
    ts, bs = (timm.layers.convert_sync_batchnorm(copy.deepcopy(m)) for m in (t, b))
    assert type(ts[3]) is type(bs[3]) is nn.SyncBatchNorm
    assert type(ts[1]) is timm.layers.SyncBatchNormAct and not isinstance(bs[1], torch_bn._BatchNorm)
    x = _x(n=4, shape=(3, 6, 6))
    with torch.no_grad():
        assert_close(bs.eval()(x), ts.eval()(x), 1e-5, "converted model, eval")
    assert (bs[1](bs[0](x)) >= 0).all()  # the activation still runs
