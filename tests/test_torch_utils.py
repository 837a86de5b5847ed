"""torch's own model utilities on models built with bnkit's drop-in BN layers.

Every test builds a model with torch's ``nn.BatchNorm*``, copies it with ``bnkit.convert`` (the same
parameters and statistics in bnkit's layers) and puts both through the same torch utility: fusion
helpers, ``torch.fx``, eager quantization's ``fuse_modules``, TorchScript (script / trace / freeze /
optimize_for_inference), parametrizations, pruning, spectral / weight norm, ``functional_call``,
module hooks, meta-device construction, ``skip_init``, dtype casts, autocast, flop counting,
profiling, SWA averaging, deep copies and pickles. The torch model's result is the oracle; outputs,
gradients, running statistics and ``num_batches_tracked`` are compared at 1e-5 (float32).

Documented differences (docs/differences.md, docs/deploying.md) are not tested as failures: bnkit's
layers are not subclasses of torch's, and an fx graph traced through a bnkit layer keeps the training
flag it was traced with. Where bnkit documents a replacement (``bnkit.fuse`` for torch's fusion), the
replacement is compared with torch's utility on the torch model.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from typing import Tuple

import pytest
import torch
import torch.ao.quantization as tq
import torch.fx as fx
import torch.nn.utils.parametrize as parametrize
import torch.nn.utils.prune as prune
from torch import nn
from torch.func import functional_call
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights, fuse_linear_bn_eval

import bnkit
from bnkit.family import is_torch_bn

TOL = 1e-5

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
BNKIT_BN = {1: bnkit.BatchNorm1d, 2: bnkit.BatchNorm2d, 3: bnkit.BatchNorm3d}
SPATIAL = {1: (10,), 2: (6, 6), 3: (4, 5, 5)}


# ---------------------------------------------------------------------------------------------- helpers


def close(actual, expected, tol=TOL, what="", scale=1.0):
    """``max|actual - expected| <= tol * max(scale, max|expected|)`` (compared in float64, NaN where NaN)."""
    a, e = torch.as_tensor(actual).detach().double(), torch.as_tensor(expected).detach().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{what}: NaN in different places"
    a, e = torch.nan_to_num(a), torch.nan_to_num(e)
    if e.numel():
        scale = max(scale, e.abs().max().item())
        err = (a - e).abs().max().item()
        assert err <= tol * scale, f"{what}: max abs diff {err:.3g} > {tol:.1g} * {scale:.3g}"


def data(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 1.5 + 0.5).to(dtype)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN parameters and running statistics (a fresh BN is the identity in eval)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                    m.num_batches_tracked.fill_(7)
    return model


def conv_bn(dims=2, relu=True, seed=0, conv_bias=True, **bn_kwargs):
    torch.manual_seed(seed)
    layers = [CONV[dims](3, 4, 3, bias=conv_bias), TORCH_BN[dims](4, **bn_kwargs)]
    if relu:
        layers.append(nn.ReLU())
    return randomize(nn.Sequential(*layers), seed)


def conv_input(dims=2, n=8, seed=0):
    return data(n, 3, *[s + 2 for s in SPATIAL[dims]], seed=seed)


def twins(torch_model: nn.Module):
    """(torch model, the same model with bnkit's layers): equal parameters and buffers, not shared."""
    ours = bnkit.convert(copy.deepcopy(torch_model))
    assert any(isinstance(m, bnkit.BatchNorm) for m in ours.modules())
    assert not any(is_torch_bn(m) for m in ours.modules())
    return torch_model, ours


def assert_same_state(theirs: nn.Module, ours: nn.Module, tol=TOL, what="state"):
    sd_t, sd_o = theirs.state_dict(), ours.state_dict()
    assert list(sd_t) == list(sd_o), f"{what}: keys {list(sd_t)} != {list(sd_o)}"
    for k in sd_t:
        if sd_t[k].dtype == torch.long:
            assert torch.equal(sd_t[k], sd_o[k]), f"{what}: {k} {sd_t[k]} != {sd_o[k]}"
        else:
            close(sd_o[k], sd_t[k], tol, f"{what}: {k}")


def assert_same_grads(theirs: nn.Module, ours: nn.Module, tol=TOL, what="grad"):
    """Gradients relative to the model's largest one (a conv bias before BN has a zero gradient, up to rounding)."""
    gt = {k: p.grad for k, p in theirs.named_parameters()}
    go = {k: p.grad for k, p in ours.named_parameters()}
    assert list(gt) == list(go)
    scale = max([1.0] + [g.abs().max().item() for g in gt.values() if g is not None and g.numel()])
    for k in gt:
        assert (gt[k] is None) == (go[k] is None), f"{what}: {k}"
        if gt[k] is not None:
            close(go[k], gt[k], tol, f"{what}: {k}", scale)


def train_steps(model, inputs, lr=0.02, seed=0):
    """SGD steps on a fixed random projection of the output; returns the last output."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    y = None
    for i, x in enumerate(inputs):
        opt.zero_grad()
        y = model(x)
        w = data(*y.shape, seed=100 + seed + i, dtype=y.dtype)
        (y * w).sum().backward()
        opt.step()
    return y


class NHWCTorch(nn.Module):
    """The oracle of ``bnkit.BatchNorm(C, axis=-1)`` on ``(N, H, W, C)``: torch's BN between two permutes."""

    def __init__(self, c):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def nhwc_twins(c=4, seed=0):
    theirs = randomize(NHWCTorch(c), seed)
    ours = bnkit.BatchNorm(c, axis=-1)
    ours.load_state_dict({k[len("bn."):]: v for k, v in theirs.state_dict().items()})
    return theirs, ours


def nhwc_state(theirs: NHWCTorch) -> dict:
    return {k[len("bn."):]: v for k, v in theirs.state_dict().items()}


# ------------------------------------------------------------------------------------ torch.nn.utils.fusion


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("bn_kwargs", [{}, {"affine": False}, {"bias": False}, {"eps": 1e-3}], ids=str)
def test_fuse_conv_bn_eval_matches_torch(dims, bn_kwargs):
    theirs, ours = twins(conv_bn(dims, relu=False, **bn_kwargs).eval())
    fused_t = fuse_conv_bn_eval(theirs[0], theirs[1])
    fused_o = fuse_conv_bn_eval(ours[0], ours[1])
    close(fused_o.weight, fused_t.weight, what="weight")
    close(fused_o.bias, fused_t.bias, what="bias")
    x = conv_input(dims)
    close(fused_o(x), fused_t(x), what="output")
    close(fused_o(x), ours(x), what="fused vs unfused")


def test_fuse_conv_transpose_bn_eval_matches_torch():
    torch.manual_seed(0)
    theirs = randomize(nn.Sequential(nn.ConvTranspose2d(3, 4, 3, stride=2), nn.BatchNorm2d(4)).eval())
    theirs, ours = twins(theirs)
    fused_t = fuse_conv_bn_eval(theirs[0], theirs[1], transpose=True)
    fused_o = fuse_conv_bn_eval(ours[0], ours[1], transpose=True)
    x = data(2, 3, 5, 5)
    close(fused_o.weight, fused_t.weight, what="weight")
    close(fused_o(x), fused_t(x), what="output")
    close(fused_o(x), ours(x), what="fused vs unfused")


def test_fuse_conv_bn_weights_with_bnkit_tensors_matches_torch():
    theirs, ours = twins(conv_bn(relu=False).eval())
    conv = theirs[0]

    def args(bn):
        return (conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)

    w_t, b_t = fuse_conv_bn_weights(*args(theirs[1]))
    w_o, b_o = fuse_conv_bn_weights(*args(ours[1]))
    close(w_o, w_t, what="weight")
    close(b_o, b_t, what="bias")


@pytest.mark.parametrize("bn_kwargs", [{}, {"eps": 1e-3}], ids=str)  # torch's own fusion needs an affine BN here
def test_fuse_linear_bn_eval_matches_torch(bn_kwargs):
    torch.manual_seed(0)
    theirs = randomize(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6, **bn_kwargs)).eval())
    theirs, ours = twins(theirs)
    fused_t, fused_o = fuse_linear_bn_eval(theirs[0], theirs[1]), fuse_linear_bn_eval(ours[0], ours[1])
    x = data(7, 5)
    close(fused_o.weight, fused_t.weight, what="weight")
    close(fused_o(x), fused_t(x), what="output")
    close(fused_o(x), ours(x), what="fused vs unfused")


def test_fuse_conv_bn_eval_refuses_training_bn_as_torch():
    theirs, ours = twins(conv_bn(relu=False).train())
    with pytest.raises(AssertionError):
        fuse_conv_bn_eval(theirs[0], theirs[1])
    with pytest.raises(AssertionError):
        fuse_conv_bn_eval(ours[0], ours[1])


def _variant_from(bn: nn.BatchNorm2d, kind: str) -> nn.Module:
    """A bnkit variant whose eval map equals the torch BN ``bn`` in eval."""
    if kind == "frozen":
        v = bnkit.FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
    elif kind == "renorm":
        v = bnkit.BatchRenorm2d(bn.num_features, eps=bn.eps)
    elif kind == "ghost":
        v = bnkit.GhostBatchNorm2d(bn.num_features, virtual_batch_size=4, eps=bn.eps)
    else:
        raise AssertionError(kind)
    v.load_state_dict(bn.state_dict())
    return v.eval()


@pytest.mark.parametrize("kind", ["frozen", "renorm", "ghost"])
def test_fuse_conv_bn_eval_on_variants_matches_torch_bn(kind):
    theirs = conv_bn(relu=False).eval()
    conv_o, variant = copy.deepcopy(theirs[0]), _variant_from(theirs[1], kind)
    fused_t, fused_o = fuse_conv_bn_eval(theirs[0], theirs[1]), fuse_conv_bn_eval(conv_o, variant)
    x = conv_input()
    close(fused_o.weight, fused_t.weight, what="weight")
    close(fused_o(x), fused_t(x), what="output")


def test_bnkit_fuse_matches_torch_fusion_on_the_torch_model():
    """bnkit documents ``bnkit.fuse`` as its fusion: it equals torch's fuse_conv_bn_eval of the torch model."""
    theirs, ours = twins(conv_bn().eval())
    fused_t = fuse_conv_bn_eval(theirs[0], theirs[1])
    fused_o = bnkit.fuse(ours)
    assert not any(isinstance(m, bnkit.BatchNorm) for m in fused_o.modules())
    convs = [m for m in fused_o.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1
    close(convs[0].weight, fused_t.weight, what="folded weight")
    close(convs[0].bias, fused_t.bias, what="folded bias")
    x = conv_input()
    close(fused_o(x), torch.relu(fused_t(x)), what="output")


# ------------------------------------------------------------------------------------------------ torch.fx


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_symbolic_trace_training_matches_torch(dims, momentum):
    theirs, ours = twins(conv_bn(dims, momentum=momentum).train())
    gt, go = fx.symbolic_trace(theirs), fx.symbolic_trace(ours)
    for i in range(3):
        x = conv_input(dims, seed=i).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        yt, yo = gt(x), go(x2)
        close(yo, yt, what=f"output {i}")
        g = data(*yt.shape, seed=50 + i)
        (yt * g).sum().backward()
        (yo * g).sum().backward()
        close(x2.grad, x.grad, what=f"input grad {i}")
    assert_same_grads(theirs, ours)
    assert_same_state(theirs, ours, what="running stats (shared with the traced graph)")


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_symbolic_trace_eval_matches_torch(dims):
    theirs, ours = twins(conv_bn(dims).eval())
    gt, go = fx.symbolic_trace(theirs), fx.symbolic_trace(ours)
    x = conv_input(dims)
    close(go(x), gt(x), what="eval output")
    assert_same_state(theirs, ours)


@pytest.mark.parametrize("training", [True, False])
def test_traced_graph_deepcopies_and_pickles_like_torch(training):
    theirs, ours = twins(conv_bn().train(training))
    gt, go = fx.symbolic_trace(theirs), fx.symbolic_trace(ours)
    x = conv_input()
    for make in (copy.deepcopy, lambda g: pickle.loads(pickle.dumps(g))):
        ct, co = make(gt), make(go)
        close(co(x), ct(x), what="copied graph output")
        close(co(x), ct(x), what="copied graph output, second call")
        bt, bo = ct.get_submodule("1"), co.get_submodule("1")
        for k in ("weight", "bias", "running_mean", "running_var"):
            close(getattr(bo, k), getattr(bt, k), what=f"copied graph {k}")
        if training:
            assert_same_state(ct, co, what="copied graph state")


def test_traced_eval_graph_state_dict_keys_match_torch():
    theirs, ours = twins(conv_bn().eval())
    gt, go = fx.symbolic_trace(theirs), fx.symbolic_trace(ours)
    assert list(gt.state_dict()) == list(theirs.state_dict())
    assert list(go.state_dict()) == list(ours.state_dict())
    go.load_state_dict(ours.state_dict())


def test_symbolic_trace_generic_channels_last_layer_matches_permuted_torch():
    theirs, ours = nhwc_twins()
    x = data(6, 5, 5, 4)
    for training in (True, False):
        theirs.train(training)
        ours.train(training)
        # (inside a parent module: torch's own BN cannot be the traced root, its rank check is control flow)
        gt, go = fx.symbolic_trace(nn.Sequential(theirs)), fx.symbolic_trace(nn.Sequential(ours))
        close(go(x), gt(x), what=f"training={training}")
        for k, v in nhwc_state(theirs).items():
            close(ours.state_dict()[k].double(), v.double(), what=k)


def test_shape_prop_on_traced_graph_matches_torch():
    from torch.fx.passes.shape_prop import ShapeProp

    theirs, ours = twins(conv_bn().eval())
    gt, go = fx.symbolic_trace(theirs), fx.symbolic_trace(ours)
    x = conv_input()
    ShapeProp(gt).propagate(x)
    ShapeProp(go).propagate(x)

    def out_meta(g):
        (out,) = [n for n in g.graph.nodes if n.op == "output"]
        (arg,) = out.args
        return arg.meta["tensor_meta"]

    mt, mo = out_meta(gt), out_meta(go)
    assert (mo.shape, mo.dtype, mo.stride) == (mt.shape, mt.dtype, mt.stride)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_fx_experimental_fuse_matches_torch(dims):
    from torch.fx.experimental.optimization import fuse

    theirs, ours = twins(conv_bn(dims).eval())
    ft, fo = fuse(theirs), fuse(ours)
    x = conv_input(dims)
    close(fo(x), ft(x), what="fused output")
    assert_same_state(theirs, ours, what="the originals are left alone")


def test_bnkit_fuse_matches_fx_experimental_fuse_of_the_torch_model():
    from torch.fx.experimental.optimization import fuse

    theirs, ours = twins(conv_bn().eval())
    ft, fo = fuse(theirs), bnkit.fuse(ours)
    x = conv_input()
    close(fo(x), ft(x), what="fused output")
    conv_t = [m for m in ft.modules() if isinstance(m, nn.Conv2d)]
    conv_o = [m for m in fo.modules() if isinstance(m, nn.Conv2d)]
    assert len(conv_t) == len(conv_o) == 1
    close(conv_o[0].weight, conv_t[0].weight, what="folded weight")
    assert not any(isinstance(m, (bnkit.BatchNorm, nn.BatchNorm2d)) for m in list(ft.modules()) + list(fo.modules()))


def test_fx_optimize_for_inference_matches_torch():
    from torch.fx.experimental.optimization import optimize_for_inference

    theirs, ours = twins(conv_bn().eval())
    x = conv_input()
    ot = optimize_for_inference(theirs)
    oo = optimize_for_inference(ours)
    close(oo(x), ot(x), what="optimized output")


def test_fx_transformer_output_can_be_traced_again_like_torch():
    theirs, ours = twins(conv_bn().eval())
    x = conv_input()
    rt = fx.symbolic_trace(fx.Transformer(fx.symbolic_trace(theirs)).transform())
    ro = fx.symbolic_trace(fx.Transformer(fx.symbolic_trace(ours)).transform())
    close(ro(x), rt(x), what="re-traced output")


def test_traced_graph_follows_momentum_set_after_tracing_like_torch():
    theirs, ours = twins(conv_bn().train())
    gt, go = fx.symbolic_trace(theirs), fx.symbolic_trace(ours)
    gt.get_submodule("1").momentum = 0.7
    go.get_submodule("1").momentum = 0.7
    x = conv_input()
    gt(x)
    go(x)
    assert_same_state(gt, go, what="running stats after momentum change")


# -------------------------------------------------------------------------------- eager-mode quantization


def _patterns():
    torch.manual_seed(0)
    return {
        "conv_bn_relu": (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), [["0", "1", "2"]],
                         (8, 3, 6, 6)),
        "conv_bn": (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), [["0", "1"]], (8, 3, 6, 6)),
        "conv1d_bn_relu": (nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.ReLU()), [["0", "1", "2"]],
                           (8, 3, 9)),
        "conv3d_bn": (nn.Sequential(nn.Conv3d(3, 4, 3), nn.BatchNorm3d(4)), [["0", "1"]], (4, 3, 5, 5, 5)),
        "linear_bn": (nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)), [["0", "1"]], (8, 5)),
        "bn_relu": (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), [["1", "2"]], (8, 3, 6, 6)),
        "convT_bn": (nn.Sequential(nn.ConvTranspose2d(3, 4, 3), nn.BatchNorm2d(4)), [["0", "1"]], (8, 3, 5, 5)),
    }


@pytest.mark.parametrize("name", list(_patterns()))
def test_fuse_modules_eval_matches_torch(name):
    model, groups, shape = _patterns()[name]
    theirs, ours = twins(randomize(model).eval())
    ft, fo = tq.fuse_modules(theirs, groups), tq.fuse_modules(ours, groups)
    assert [type(m).__name__ for m in fo.children()] == [type(m).__name__ for m in ft.children()]
    x = data(*shape)
    close(fo(x), ft(x), what="fused output")
    assert_same_state(ft, fo, what="fused state")


def test_fuse_modules_inplace_matches_torch():
    model, groups, shape = _patterns()["conv_bn_relu"]
    theirs, ours = twins(randomize(model).eval())
    tq.fuse_modules(theirs, groups, inplace=True)
    tq.fuse_modules(ours, groups, inplace=True)
    assert [type(m).__name__ for m in ours.children()] == [type(m).__name__ for m in theirs.children()]
    x = data(*shape)
    close(ours(x), theirs(x))


@pytest.mark.parametrize("name", ["conv_bn_relu", "conv_bn", "linear_bn", "bn_relu"])
def test_fuse_modules_qat_training_matches_torch(name):
    model, groups, shape = _patterns()[name]
    theirs, ours = twins(randomize(model).train())
    ft, fo = tq.fuse_modules_qat(theirs, groups), tq.fuse_modules_qat(ours, groups)
    assert [type(m).__name__ for m in fo.children()] == [type(m).__name__ for m in ft.children()]
    inputs = [data(*shape, seed=i) for i in range(3)]
    yt, yo = train_steps(ft, inputs), train_steps(fo, inputs)
    close(yo, yt, what="training output")
    assert_same_state(ft, fo, what="after QAT-style training")


def test_qat_prepare_train_convert_matches_torch():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
            self.conv, self.bn, self.relu = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()

        def forward(self, x):
            return self.dequant(self.relu(self.bn(self.conv(self.quant(x)))))

    torch.manual_seed(0)
    theirs, ours = twins(randomize(Net()).train())
    results = []
    for net in (theirs, ours):
        m = tq.fuse_modules_qat(net, [["conv", "bn", "relu"]])
        m.qconfig = tq.get_default_qat_qconfig("x86")
        m = tq.prepare_qat(m)
        train_steps(m, [data(8, 3, 10, 10, seed=i) for i in range(3)], lr=0.01)
        q = tq.convert(copy.deepcopy(m).eval())
        x = data(2, 3, 10, 10, seed=9)
        results.append((m, m(x), q(x)))
    (mt, yt, qt), (mo, yo, qo) = results
    assert_same_state(mt, mo, what="QAT state")
    close(yo, yt, what="QAT output")
    close(qo, qt, what="quantized output")


@pytest.mark.parametrize("kind", ["frozen", "renorm", "ghost"])
def test_fuse_modules_eval_with_variants_matches_torch_bn(kind):
    theirs = conv_bn().eval()
    ours = copy.deepcopy(theirs)
    ours[1] = _variant_from(theirs[1], kind)
    ft, fo = tq.fuse_modules(theirs, [["0", "1", "2"]]), tq.fuse_modules(ours, [["0", "1", "2"]])
    assert type(fo[0]) is type(ft[0])
    x = conv_input()
    close(fo(x), ft(x), what="fused output")


# ------------------------------------------------------------------------------------------- TorchScript


def _quiet():
    w = warnings.catch_warnings()
    w.__enter__()
    warnings.simplefilter("ignore")
    return w


SCRIPT_CONFIGS = [{}, {"momentum": None}, {"affine": False}, {"bias": False}, {"track_running_stats": False},
                  {"eps": 1e-3}]


@pytest.mark.parametrize("bn_kwargs", SCRIPT_CONFIGS, ids=str)
def test_jit_script_training_matches_torch(bn_kwargs):
    theirs, ours = twins(conv_bn(**bn_kwargs).train())
    st, so = torch.jit.script(theirs), torch.jit.script(ours)
    for i in range(3):
        x = conv_input(seed=i)
        yt, yo = st(x), so(x)
        close(yo, yt, what=f"output {i}")
        g = data(*yt.shape, seed=60 + i)
        (yt * g).sum().backward()
        (yo * g).sum().backward()
    assert_same_grads(st, so)
    assert_same_state(st, so, what="scripted state")


@pytest.mark.parametrize("bn_kwargs", SCRIPT_CONFIGS, ids=str)
@pytest.mark.parametrize("how", ["freeze", "optimize_for_inference"])
def test_jit_script_freeze_eval_matches_torch(bn_kwargs, how):
    theirs, ours = twins(conv_bn(**bn_kwargs).eval())
    fn = torch.jit.freeze if how == "freeze" else torch.jit.optimize_for_inference
    ft, fo = fn(torch.jit.script(theirs)), fn(torch.jit.script(ours))
    for i in range(2):
        x = conv_input(seed=i)
        close(fo(x), ft(x), what=f"{how} output {i}")


@pytest.mark.parametrize("how", ["freeze", "optimize_for_inference"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_jit_trace_freeze_eval_matches_torch(how, dims):
    theirs, ours = twins(conv_bn(dims).eval())
    x = conv_input(dims)
    fn = torch.jit.freeze if how == "freeze" else torch.jit.optimize_for_inference
    w = _quiet()
    try:
        ft, fo = fn(torch.jit.trace(theirs, x)), fn(torch.jit.trace(ours, x))
    finally:
        w.__exit__(None, None, None)
    x2 = conv_input(dims, seed=3)
    close(fo(x2), ft(x2), what=f"traced {how}")


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_jit_trace_training_matches_torch(dims):
    theirs, ours = twins(conv_bn(dims).train())
    x = conv_input(dims)
    w = _quiet()
    try:
        tt = torch.jit.trace(theirs, x, check_trace=False)
        to = torch.jit.trace(ours, x, check_trace=False)
    finally:
        w.__exit__(None, None, None)
    for i in range(2):
        xi = conv_input(dims, seed=10 + i)
        close(to(xi), tt(xi), what=f"traced training output {i}")
    assert_same_state(theirs, ours, what="running stats after traced training calls")


def test_jit_script_of_scriptable_trace_matches_torch_trace():
    from bnkit.integrations.torchscript import scriptable

    theirs, ours = twins(conv_bn().eval())
    x = conv_input()
    w = _quiet()
    try:
        ft = torch.jit.freeze(torch.jit.trace(theirs, x))
        fo = torch.jit.freeze(torch.jit.trace(scriptable(ours), x))
    finally:
        w.__exit__(None, None, None)
    kinds = {n.kind() for n in fo.inlined_graph.nodes()}
    assert not any(k.startswith("bnkit::") for k in kinds)
    close(fo(conv_input(seed=2)), ft(conv_input(seed=2)))


@pytest.mark.parametrize("shape", [(8, 4), (8, 4, 7)])
def test_jit_script_batchnorm1d_both_ranks_and_save_load(shape):
    torch.manual_seed(0)
    theirs = randomize(nn.Sequential(nn.BatchNorm1d(4)))
    theirs, ours = twins(theirs)
    st, so = torch.jit.script(theirs), torch.jit.script(ours)
    buf = io.BytesIO()
    torch.jit.save(so, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    x = data(*shape)
    yt = st(x)
    close(so(x), yt, what="training")
    assert_same_state(st, so)
    close(loaded(x), yt, what="loaded copy, training")
    for m in (st, so, loaded):
        m.eval()
    close(so(x), st(x), what="eval")
    close(loaded(x), st(x), what="loaded copy, eval")


def test_jit_script_generic_channels_last_layer_matches_permuted_torch():
    theirs, ours = nhwc_twins()
    st, so = torch.jit.script(theirs), torch.jit.script(ours)
    x = data(6, 5, 5, 4)
    close(so(x), st(x), what="training")
    for k, v in nhwc_state(theirs).items():
        close(so.state_dict()[k].double(), v.double(), what=k)
    st.eval()
    so.eval()
    ft, fo = torch.jit.freeze(st), torch.jit.freeze(so)
    close(fo(x), ft(x), what="frozen eval")


def test_jit_script_frozen_batchnorm_matches_torch_eval_bn():
    theirs = conv_bn().eval()
    ours = copy.deepcopy(theirs)
    ours[1] = _variant_from(theirs[1], "frozen")
    ft, fo = torch.jit.freeze(torch.jit.script(theirs)), torch.jit.freeze(torch.jit.script(ours.eval()))
    x = conv_input()
    close(fo(x), ft(x))


def _add_one(module: nn.Module, inputs: Tuple[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
    return output + 1.0


def _double_input(module: nn.Module, inputs: Tuple[torch.Tensor]) -> Tuple[torch.Tensor]:
    return (inputs[0] * 2.0,)


def test_jit_script_runs_forward_hooks_of_the_bn_layer_like_torch():
    theirs, ours = twins(conv_bn().eval())
    for m in (theirs, ours):
        m[1].register_forward_pre_hook(_double_input)
        m[1].register_forward_hook(_add_one)
    x = conv_input()
    yt_eager = theirs(x)
    close(ours(x), yt_eager, what="eager with hooks")
    st, so = torch.jit.script(theirs), torch.jit.script(ours)
    close(st(x), yt_eager, what="torch scripted")
    close(so(x), st(x), what="bnkit scripted with hooks")


def test_jit_script_keeps_the_eager_models_results_and_hooks_like_torch():
    """docs/deploying.md: torch.jit.script writes bnkit's twins into the model (torch's __prepare_scriptable__
    protocol); the eager model then computes as before, its hooks included, as torch's scripted model does."""
    theirs, ours = twins(conv_bn().eval())
    for m in (theirs, ours):
        m[1].register_forward_hook(_add_one)
    x = conv_input()
    before_t, before_o = theirs(x), ours(x)
    torch.jit.script(theirs)
    torch.jit.script(ours)
    assert type(theirs[1]) is nn.BatchNorm2d
    close(theirs(x), before_t, what="torch eager model after scripting")
    close(ours(x), before_o, what="bnkit eager model after scripting")
    assert ours[1].weight is not None and ours[1]._forward_hooks


def test_jit_script_of_scriptable_copy_leaves_the_model_as_it_was():
    """docs/deploying.md: scripting bnkit.integrations.torchscript.scriptable(model) leaves model's layers."""
    from bnkit.integrations.torchscript import scriptable

    theirs, ours = twins(conv_bn().eval())
    x = conv_input()
    scripted = torch.jit.script(scriptable(ours))
    assert isinstance(ours[1], bnkit.BatchNorm2d)
    close(scripted(x), theirs(x), what="scripted copy")
    close(ours(x), theirs(x), what="the model")


# ---------------------------------------------------------------------------------------- parametrizations


class Doubled(nn.Module):
    def forward(self, b):
        return 2.0 * b

    def right_inverse(self, b):
        return b / 2.0


class Positive(nn.Module):
    def forward(self, w):
        return nn.functional.softplus(w)

    def right_inverse(self, w):
        return torch.log(torch.expm1(w))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_parametrized_bn_weight_training_and_eval_match_torch(dims):
    theirs, ours = twins(conv_bn(dims).train())
    for m in (theirs, ours):
        parametrize.register_parametrization(m[1], "weight", Positive())
    close(ours[1].weight, theirs[1].weight, what="parametrized weight")
    inputs = [conv_input(dims, seed=i) for i in range(3)]
    yt, yo = train_steps(theirs, inputs), train_steps(ours, inputs)
    close(yo, yt, what="training output")
    assert_same_grads(theirs, ours, what="grad of weight.original")
    assert_same_state(theirs, ours, what="after training")
    theirs.eval()
    ours.eval()
    x = conv_input(dims, seed=9)
    close(ours(x), theirs(x), what="eval output")


def test_parametrized_weight_and_bias_cached_and_removed_match_torch():
    theirs, ours = twins(conv_bn().train())
    for m in (theirs, ours):
        parametrize.register_parametrization(m[1], "weight", Positive())
        parametrize.register_parametrization(m[1], "bias", Doubled())
    inputs = [conv_input(seed=i) for i in range(2)]
    with parametrize.cached():
        yt, yo = theirs(inputs[0]), ours(inputs[0])
    close(yo, yt, what="cached output")
    train_steps(theirs, inputs)
    train_steps(ours, inputs)
    for m in (theirs, ours):
        parametrize.remove_parametrizations(m[1], "weight", leave_parametrized=True)
        parametrize.remove_parametrizations(m[1], "bias", leave_parametrized=False)
    assert isinstance(ours[1].weight, nn.Parameter) and isinstance(ours[1].bias, nn.Parameter)
    assert_same_state(theirs, ours, what="after removal")
    x = conv_input(seed=5)
    close(ours(x), theirs(x), what="training output after removal")
    assert_same_state(theirs, ours, what="stats after removal")


def test_parametrized_running_var_buffer_matches_torch():
    class Scale(nn.Module):
        def forward(self, v):
            return v * 1.0

    theirs, ours = twins(conv_bn().train())
    for m in (theirs, ours):
        parametrize.register_parametrization(m[1], "running_var", Scale())
    for i in range(2):
        x = conv_input(seed=i)
        close(ours(x), theirs(x), what=f"training output {i}")
    assert_same_state(theirs, ours)
    theirs.eval()
    ours.eval()
    close(ours(conv_input(seed=4)), theirs(conv_input(seed=4)), what="eval output")


def test_parametrized_generic_layer_matches_permuted_torch():
    theirs, ours = nhwc_twins()
    parametrize.register_parametrization(theirs.bn, "weight", Positive())
    parametrize.register_parametrization(ours, "weight", Positive())
    x = data(6, 5, 5, 4).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    g = data(6, 5, 5, 4, seed=3)
    (theirs(x) * g).sum().backward()
    (ours(x2) * g).sum().backward()
    close(x2.grad, x.grad, what="input grad")
    close(ours.parametrizations.weight.original.grad, theirs.bn.parametrizations.weight.original.grad)
    close(ours.running_var, theirs.bn.running_var)


# --------------------------------------------------------------------------------------------------- prune


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_l1_pruned_bn_weight_training_matches_torch(dims):
    theirs, ours = twins(conv_bn(dims).train())
    for m in (theirs, ours):
        prune.l1_unstructured(m[1], "weight", amount=0.5)
    assert torch.equal(ours[1].weight_mask, theirs[1].weight_mask)
    inputs = [conv_input(dims, seed=i) for i in range(3)]
    yt, yo = train_steps(theirs, inputs), train_steps(ours, inputs)
    close(yo, yt, what="training output")
    assert_same_grads(theirs, ours, what="grad of weight_orig")
    assert_same_state(theirs, ours)
    for m in (theirs, ours):
        prune.remove(m[1], "weight")
    assert isinstance(ours[1].weight, nn.Parameter)
    for m in (theirs, ours):
        m.eval()
    close(ours(inputs[0]), theirs(inputs[0]), what="eval after prune.remove")


def test_global_and_random_pruning_match_torch():
    theirs, ours = twins(conv_bn().train())
    for m in (theirs, ours):
        prune.global_unstructured([(m[0], "weight"), (m[1], "weight")], prune.L1Unstructured, amount=0.3)
        torch.manual_seed(123)
        prune.random_unstructured(m[1], "bias", amount=0.5)
    assert torch.equal(ours[1].bias_mask, theirs[1].bias_mask)
    assert torch.equal(ours[1].weight_mask, theirs[1].weight_mask)
    inputs = [conv_input(seed=i) for i in range(2)]
    yt, yo = train_steps(theirs, inputs), train_steps(ours, inputs)
    close(yo, yt)
    assert_same_grads(theirs, ours)
    assert_same_state(theirs, ours)


# ----------------------------------------------------------------------------- spectral norm / weight norm


NORMS = {
    "spectral_norm": lambda m: torch.nn.utils.parametrizations.spectral_norm(m),
    "weight_norm": lambda m: torch.nn.utils.parametrizations.weight_norm(m),
    "legacy_spectral_norm": lambda m: torch.nn.utils.spectral_norm(m),
    "legacy_weight_norm": lambda m: torch.nn.utils.weight_norm(m),
}


@pytest.mark.parametrize("norm", list(NORMS))
def test_norm_on_conv_before_bn_matches_torch(norm):
    theirs, ours = twins(conv_bn().train())
    w = _quiet()
    try:
        for m in (theirs, ours):
            torch.manual_seed(5)  # spectral norm's random u
            NORMS[norm](m[0])
        inputs = [conv_input(seed=i) for i in range(3)]
        yt, yo = train_steps(theirs, inputs), train_steps(ours, inputs)
        close(yo, yt, what="training output")
        assert_same_grads(theirs, ours)
        assert_same_state(theirs, ours)
        theirs.eval()
        ours.eval()
        close(ours(inputs[0]), theirs(inputs[0]), what="eval output")
    finally:
        w.__exit__(None, None, None)


def test_weight_norm_on_bn_weight_matches_torch():
    theirs, ours = twins(conv_bn().train())
    for m in (theirs, ours):
        torch.nn.utils.parametrizations.weight_norm(m[1], "weight", dim=0)
    inputs = [conv_input(seed=i) for i in range(2)]
    yt, yo = train_steps(theirs, inputs), train_steps(ours, inputs)
    close(yo, yt)
    assert_same_grads(theirs, ours)
    assert_same_state(theirs, ours)


# ------------------------------------------------------------------------- functional_call / stateless


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("api", ["torch.func", "stateless"])
def test_functional_call_updates_the_passed_buffers_like_torch(momentum, api):
    theirs, ours = twins(conv_bn(momentum=momentum).train())
    call = functional_call if api == "torch.func" else torch.nn.utils.stateless.functional_call

    def state(m):
        sd = {k: v.detach().clone() for k, v in m.named_buffers()}
        sd.update({k: v.detach().clone().requires_grad_() for k, v in m.named_parameters()})
        return sd

    dt, do = state(theirs), state(ours)
    x = conv_input()
    w = _quiet()
    try:
        yt, yo = call(theirs, dt, (x,)), call(ours, do, (x,))
    finally:
        w.__exit__(None, None, None)
    close(yo, yt, what="output")
    g = data(*yt.shape, seed=7)
    (yt * g).sum().backward()
    (yo * g).sum().backward()
    for k in dt:
        if dt[k].dtype == torch.long:
            assert torch.equal(do[k], dt[k]), k
        else:
            close(do[k], dt[k], what=f"passed {k}")
        if k == "0.bias":
            # the conv bias feeds a training-mode BN: its exact gradient is zero, and both are the rounding of a
            # per-channel sum of N*H*W terms (|term| <~ max|g|): the oracle is zero, at that sum's rounding bound
            bound = yt[:, 0].numel() * torch.finfo(torch.float32).eps * g.abs().max().item()
            assert dt[k].grad.abs().max() <= bound and do[k].grad.abs().max() <= bound, (dt[k].grad, do[k].grad)
        elif dt[k].requires_grad:
            close(do[k].grad, dt[k].grad, what=f"grad of passed {k}")
    assert_same_state(theirs, ours, what="the module's own tensors (untouched)")
    assert all(p.grad is None for p in ours.parameters())


def test_functional_call_with_parameters_only_updates_module_buffers_like_torch():
    theirs, ours = twins(conv_bn().train())
    pt = {k: v.detach() * 1.1 for k, v in theirs.named_parameters()}
    po = {k: v.detach() * 1.1 for k, v in ours.named_parameters()}
    x = conv_input()
    close(functional_call(ours, po, (x,)), functional_call(theirs, pt, (x,)))
    assert_same_state(theirs, ours, what="module buffers updated in place")
    assert int(ours[1].num_batches_tracked) == 8


def test_functional_call_eval_with_substituted_running_stats_matches_torch():
    theirs, ours = twins(conv_bn().eval())
    g = torch.Generator().manual_seed(3)
    sub = {"1.running_mean": torch.randn(4, generator=g), "1.running_var": torch.rand(4, generator=g) + 0.2}
    x = conv_input()
    yt = functional_call(theirs, dict(sub), (x,))
    yo = functional_call(ours, dict(sub), (x,))
    close(yo, yt)
    assert not torch.allclose(yo, ours(x)), "the substituted statistics were used"


def test_torch_func_grad_eval_matches_torch():
    from torch.func import grad

    theirs, ours = twins(conv_bn().eval())
    x = conv_input()
    target = data(8, 4, 6, 6, seed=4)

    def grads(m):
        params = {k: v.detach() for k, v in m.named_parameters()}
        return grad(lambda p: ((functional_call(m, p, (x,)) - target) ** 2).mean())(params)

    gt, go = grads(theirs), grads(ours)
    for k in gt:
        close(go[k], gt[k], what=k)


def test_stack_module_state_vmap_ensemble_eval_matches_torch():
    from torch.func import stack_module_state, vmap

    torch_models = [conv_bn(seed=s).eval() for s in range(3)]
    bnkit_models = [bnkit.convert(copy.deepcopy(m)) for m in torch_models]
    x = conv_input()
    outs = []
    for models in (torch_models, bnkit_models):
        params, buffers = stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")
        outs.append(vmap(lambda p, b, inp, base=base: functional_call(base, (p, b), (inp,)), in_dims=(0, 0, None))(
            params, buffers, x))
    close(outs[1], outs[0])


# ---------------------------------------------------------------------------------------------------- hooks


def test_forward_and_backward_hooks_match_torch():
    theirs, ours = twins(conv_bn().train())
    logs = []
    for m in (theirs, ours):
        log = {}
        logs.append(log)
        bn = m[1]

        def pre(mod, args, kwargs, log=log):
            log["pre"] = (len(args), sorted(kwargs))
            return (args[0] * 1.5,), kwargs

        def post(mod, args, kwargs, out, log=log):
            log["post"] = (args[0].detach().clone(), sorted(kwargs))
            return out - 0.25

        def bwd_pre(mod, grad_output, log=log):
            log["bwd_pre"] = grad_output[0].clone()

        def bwd(mod, grad_input, grad_output, log=log):
            log["bwd"] = (grad_input[0].clone(), grad_output[0].clone())

        bn.register_forward_pre_hook(pre, with_kwargs=True)
        bn.register_forward_hook(post, with_kwargs=True)
        bn.register_full_backward_pre_hook(bwd_pre)
        bn.register_full_backward_hook(bwd)
    x = conv_input()
    yt, yo = theirs(x), ours(x)
    close(yo, yt, what="hooked output")
    g = data(*yt.shape, seed=8)
    (yt * g).sum().backward()
    (yo * g).sum().backward()
    lt, lo = logs
    assert lo["pre"] == lt["pre"] == (1, [])
    close(lo["post"][0], lt["post"][0], what="input the forward hook saw")
    assert lo["post"][1] == lt["post"][1]
    close(lo["bwd_pre"], lt["bwd_pre"], what="grad_output (pre hook)")
    close(lo["bwd"][0], lt["bwd"][0], what="grad_input")
    close(lo["bwd"][1], lt["bwd"][1], what="grad_output")
    assert_same_grads(theirs, ours)
    assert_same_state(theirs, ours)


def test_state_dict_and_load_state_dict_hooks_match_torch():
    theirs, ours = twins(conv_bn())
    logs = []
    for m in (theirs, ours):
        log = []
        logs.append(log)
        bn = m[1]
        bn.register_state_dict_pre_hook(lambda mod, prefix, keep_vars, log=log: log.append(("sd_pre", prefix)))
        bn.register_state_dict_post_hook(
            lambda mod, sd, prefix, meta, log=log: log.append(("sd_post", prefix, sorted(sd))))
        bn.register_load_state_dict_pre_hook(
            lambda mod, sd, prefix, meta, strict, mk, uk, em, log=log: log.append(("ld_pre", prefix, sorted(sd))))

        def ld_post(mod, incompatible, log=log):
            log.append(("ld_post", list(incompatible.missing_keys), list(incompatible.unexpected_keys)))
            incompatible.missing_keys.clear()  # torch: a post hook may clear the keys for strict loading

        bn.register_load_state_dict_post_hook(ld_post)
    sds = [m.state_dict() for m in (theirs, ours)]
    for sd in sds:
        del sd["1.num_batches_tracked"]
        sd["1.running_mean"] = sd["1.running_mean"] + 1.0
    results = [m.load_state_dict(sd, strict=True) for m, sd in zip((theirs, ours), sds)]
    assert logs[1] == logs[0]
    assert results[1] == results[0]
    assert_same_state(theirs, ours, what="after the hooked load")


def test_hooks_on_torch_bn_survive_convert_and_fire_like_torch():
    theirs = conv_bn().train()
    calls = []
    theirs[1].register_forward_hook(lambda mod, args, out: calls.append(out.detach().sum().item()) or out * 2)
    ours = bnkit.convert(copy.deepcopy(theirs))
    x = conv_input()
    close(ours(x), theirs(x))
    assert len(calls) == 2
    assert abs(calls[0] - calls[1]) <= TOL * max(1.0, abs(calls[0]))


def test_global_module_hooks_see_bnkit_layers_like_torch():
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    theirs, ours = twins(conv_bn().train())
    seen = []
    h1 = register_module_forward_pre_hook(lambda mod, args: seen.append(("pre", mod.__class__.__name__)))
    h2 = register_module_forward_hook(lambda mod, args, out: seen.append(("post", tuple(out.shape))))
    try:
        x = conv_input()
        theirs(x)
        n = len(seen)
        ours(x)
    finally:
        h1.remove()
        h2.remove()
    assert seen[n:] == seen[:n]


# -------------------------------------------------------------------------------- meta device, skip_init


META_LAYERS = {
    "BatchNorm1d": (lambda: nn.BatchNorm1d(4), lambda: bnkit.BatchNorm1d(4), (8, 4)),
    "BatchNorm2d": (lambda: nn.BatchNorm2d(4), lambda: bnkit.BatchNorm2d(4), (8, 4, 3, 3)),
    "BatchNorm3d": (lambda: nn.BatchNorm3d(4), lambda: bnkit.BatchNorm3d(4), (4, 4, 2, 3, 3)),
    "generic axis=1": (lambda: nn.BatchNorm2d(4), lambda: bnkit.BatchNorm(4, axis=1), (8, 4, 3, 3)),
    # in its warm-up (r = 1, d = 0) BatchRenorm is BN; its default momentum is 0.01
    "BatchRenorm2d": (lambda: nn.BatchNorm2d(4, momentum=0.01), lambda: bnkit.BatchRenorm2d(4), (8, 4, 3, 3)),
    "GhostBatchNorm2d (one virtual batch)": (
        lambda: nn.BatchNorm2d(4), lambda: bnkit.GhostBatchNorm2d(4, virtual_batch_size=8), (8, 4, 3, 3)),
}


@pytest.mark.parametrize("name", list(META_LAYERS))
def test_to_empty_after_meta_then_reset_parameters_matches_torch(name):
    make_t, make_o, shape = META_LAYERS[name]
    models = []
    for make in (make_t, make_o):
        with torch.device("meta"):
            m = nn.Sequential(nn.Conv1d(4, 4, 1) if len(shape) == 2 else nn.Identity(), make())
        assert m[1].running_mean.is_meta
        m.to_empty(device="cpu")
        m[1].reset_parameters()
        models.append(m)
    theirs, ours = models
    assert int(ours[1].num_batches_tracked) == 0
    for k in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(ours[1], k), getattr(theirs[1], k)), k
    x = data(*shape)
    if len(shape) == 2:
        theirs, ours = theirs[1], ours[1]
    for i in range(2):
        close(ours(x + i), theirs(x + i), what=f"training output {i}")
    assert_same_state(theirs, ours)


def test_to_empty_then_reset_running_stats_matches_torch():
    models = []
    for cls in (nn.BatchNorm2d, bnkit.BatchNorm2d):
        with torch.device("meta"):
            m = cls(4)
        m.to_empty(device="cpu")
        m.reset_running_stats()
        with torch.no_grad():
            m.weight.fill_(1.5)
            m.bias.fill_(0.25)
        models.append(m)
    theirs, ours = models
    x = data(8, 4, 3, 3)
    close(ours(x), theirs(x))
    assert_same_state(theirs, ours)


@pytest.mark.parametrize("training", [True, False])
def test_meta_device_forward_shape_inference_matches_torch(training):
    theirs, ours = twins(conv_bn().train(training))
    theirs, ours = theirs.to("meta"), ours.to("meta")
    x = torch.empty(8, 3, 6, 6, device="meta")
    yt, yo = theirs(x), ours(x)
    assert yo.device == yt.device and yo.shape == yt.shape and yo.dtype == yt.dtype
    assert yo.stride() == yt.stride()


def test_load_state_dict_assign_into_meta_model_matches_torch():
    source = conv_bn().train()
    source(conv_input())
    models = []
    for cls in (nn.BatchNorm2d, bnkit.BatchNorm2d):
        with torch.device("meta"):
            m = nn.Sequential(nn.Conv2d(3, 4, 3), cls(4), nn.ReLU())
        result = m.load_state_dict(source.state_dict(), assign=True)
        assert not result.missing_keys and not result.unexpected_keys
        models.append(m)
    theirs, ours = models
    assert isinstance(ours[1].weight, nn.Parameter) and ours[1].weight.requires_grad
    assert_same_state(theirs, ours)
    x = conv_input(seed=1)
    close(ours(x), theirs(x), what="training output")
    assert_same_state(theirs, ours)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_skip_init_then_reset_parameters_matches_torch(dims):
    theirs = torch.nn.utils.skip_init(TORCH_BN[dims], 4)
    ours = torch.nn.utils.skip_init(BNKIT_BN[dims], 4)
    assert ours.weight.shape == theirs.weight.shape and ours.running_mean.shape == theirs.running_mean.shape
    assert ours.num_batches_tracked.dtype == theirs.num_batches_tracked.dtype
    theirs.reset_parameters()
    ours.reset_parameters()
    assert_same_state(theirs, ours, what="after reset_parameters")
    x = data(8, 4, *([3] * dims)) if dims > 1 else data(8, 4)
    close(ours(x), theirs(x))
    assert_same_state(theirs, ours)


# ------------------------------------------------------------------------------------------------- dtypes


DTYPE_TOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-10}


@pytest.mark.parametrize("cast", ["half", "bfloat16", "double"])
@pytest.mark.parametrize("training", [True, False])
def test_module_dtype_casts_then_forward_match_torch(cast, training):
    theirs, ours = twins(conv_bn().train(training))
    theirs, ours = getattr(theirs, cast)(), getattr(ours, cast)()
    dtype = ours[1].weight.dtype
    assert ours[1].running_var.dtype == theirs[1].running_var.dtype == dtype
    tol = DTYPE_TOL[dtype]
    x = conv_input().to(dtype).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    yt, yo = theirs(x), ours(x2)
    assert yo.dtype == yt.dtype == dtype
    close(yo.double(), yt.double(), tol, "output")
    g = data(*yt.shape, seed=2, dtype=dtype)
    (yt * g).sum().backward()
    (yo * g).sum().backward()
    close(x2.grad.double(), x.grad.double(), tol * 10, "input grad")
    for k in ("weight", "bias"):
        close(getattr(ours[1], k).grad.double(), getattr(theirs[1], k).grad.double(), tol * 10, f"{k} grad")
    for k in ("running_mean", "running_var"):
        close(getattr(ours[1], k).double(), getattr(theirs[1], k).double(), tol, k)
    assert int(ours[1].num_batches_tracked) == int(theirs[1].num_batches_tracked)


@pytest.mark.parametrize("training", [True, False])
def test_cpu_autocast_bfloat16_matches_torch(training):
    theirs, ours = twins(conv_bn().train(training))
    x = conv_input()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yt, yo = theirs(x), ours(x)
    assert yo.dtype == yt.dtype
    close(yo.float(), yt.float(), 1e-2, "autocast output")
    assert ours[1].running_var.dtype == theirs[1].running_var.dtype == torch.float32
    assert_same_state(theirs, ours, 1e-4, "running stats under autocast")


@pytest.mark.parametrize("training", [True, False])
def test_channels_last_model_and_weight_format_conversion_match_torch(training):
    theirs, ours = twins(conv_bn().train(training))
    theirs = torch.nn.utils.convert_conv2d_weight_memory_format(theirs, torch.channels_last)
    ours = torch.nn.utils.convert_conv2d_weight_memory_format(ours, torch.channels_last)
    theirs, ours = theirs.to(memory_format=torch.channels_last), ours.to(memory_format=torch.channels_last)
    x = conv_input().to(memory_format=torch.channels_last).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    yt, yo = theirs(x), ours(x2)
    assert yo.is_contiguous(memory_format=torch.channels_last) == yt.is_contiguous(memory_format=torch.channels_last)
    close(yo, yt, what="output")
    g = data(*yt.shape, seed=4)
    (yt * g).sum().backward()
    (yo * g).sum().backward()
    close(x2.grad, x.grad, what="input grad", scale=x.grad.abs().max().item())
    assert_same_grads(theirs, ours)
    assert_same_state(theirs, ours)


# ------------------------------------------------------------------------ flop counting and profiling


def _flops(model, x, backward):
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        y = model(x)
        if backward:
            y.sum().backward()
    counts = {mod: {str(op): n for op, n in ops.items()} for mod, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops(), counts


@pytest.mark.parametrize("training", [True, False])
def test_flop_counter_matches_torch(training):
    theirs, ours = twins(conv_bn().train(training))
    x = conv_input()
    assert _flops(ours, x, training) == _flops(theirs, x, training)


def test_flop_counter_on_meta_model_matches_torch():
    theirs, ours = twins(conv_bn().train())
    x = torch.empty(8, 3, 6, 6, device="meta")
    assert _flops(ours.to("meta"), x, True) == _flops(theirs.to("meta"), x, True)


def test_fake_tensor_mode_eval_forward_matches_torch():
    from torch._subclasses.fake_tensor import FakeTensorMode

    results = []
    for cls in (nn.BatchNorm2d, bnkit.BatchNorm2d):
        with FakeTensorMode():
            m = nn.Sequential(nn.Conv2d(3, 4, 3), cls(4)).eval()
            y = m(torch.randn(8, 3, 6, 6))
        results.append((type(y).__name__, y.shape, y.dtype, y.stride()))
    assert results[1] == results[0]


def test_fake_tensor_mode_training_flop_count_matches_torch():
    from torch._subclasses.fake_tensor import FakeTensorMode

    results = []
    for cls in (nn.BatchNorm2d, bnkit.BatchNorm2d):
        with FakeTensorMode():
            m = nn.Sequential(nn.Conv2d(3, 4, 3), cls(4)).train()
            flops = _flops(m, torch.randn(8, 3, 6, 6), True)
            results.append((flops, tuple(m[1].running_mean.shape)))
    assert results[1] == results[0]


def test_torch_profiler_runs_and_outputs_match_torch():
    from torch.profiler import ProfilerActivity, profile, record_function

    theirs, ours = twins(conv_bn().train())
    x = conv_input()
    outs = []
    for m in (theirs, ours):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True, profile_memory=True) as prof:
            with record_function("step"):
                y = m(x)
                y.sum().backward()
        keys = {e.key for e in prof.key_averages()}
        assert "step" in keys and "aten::convolution" in keys
        outs.append(y)
    close(outs[1], outs[0])
    assert_same_grads(theirs, ours)
    assert_same_state(theirs, ours)


def test_legacy_autograd_profiler_and_anomaly_mode_match_torch():
    theirs, ours = twins(conv_bn().train())
    x = conv_input()
    for m in (theirs, ours):
        with torch.autograd.profiler.profile(), torch.autograd.detect_anomaly():
            (m(x) * data(8, 4, 6, 6, seed=3)).sum().backward()
    assert_same_grads(theirs, ours)
    assert_same_state(theirs, ours)


def test_double_backward_matches_torch():
    theirs, ours = twins(conv_bn(relu=False).double().train())
    x = conv_input().double().requires_grad_()
    v = data(*x.shape, seed=5, dtype=torch.float64)
    hvps = []
    for m in (theirs, ours):
        xi = x.detach().clone().requires_grad_()
        y = m(xi)
        (gx,) = torch.autograd.grad((y ** 2).sum(), xi, create_graph=True)
        (hv,) = torch.autograd.grad((gx * v).sum(), xi)
        hvps.append(hv)
    close(hvps[1], hvps[0], 1e-8, "Hessian-vector product")


# ----------------------------------------------------------------- SWA averaging, grad clipping


def test_averaged_model_with_buffers_matches_torch():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    theirs, ours = twins(conv_bn())
    averages = []
    for m in (theirs, ours):
        avg = AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for i in range(3):
            opt.zero_grad()
            (m(conv_input(seed=i)) * data(8, 4, 6, 6, seed=20 + i)).sum().backward()
            total = torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            avg.update_parameters(m)
        averages.append((avg.eval(), total))
    (at, nt), (ao, no) = averages
    close(no, nt, what="clipped grad norm")
    assert_same_state(at, ao, what="averaged state")
    close(ao(conv_input(seed=7)), at(conv_input(seed=7)), what="averaged eval output")


# ---------------------------------------------------------------- deepcopy / pickle mid-training


COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "torch.save": lambda m: torch.load(_saved(m), weights_only=False),
}


def _saved(m):
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("momentum", [0.1, None])
def test_copy_mid_training_continues_like_torch(how, momentum):
    theirs, ours = twins(conv_bn(momentum=momentum).train())
    first = [conv_input(seed=i) for i in range(2)]
    later = [conv_input(seed=10 + i) for i in range(2)]
    train_steps(theirs, first)
    train_steps(ours, first)
    ct, co = COPIES[how](theirs), COPIES[how](ours)
    assert co.training and isinstance(co[1], bnkit.BatchNorm2d)
    assert_same_state(ct, co, what="the copies")
    yt, yo = train_steps(ct, later), train_steps(co, later)
    close(yo, yt, what="copy's training output")
    assert_same_state(ct, co, what="copies after more training")
    assert_same_state(theirs, ours, what="originals untouched by the copies' training")
    assert int(ours[1].num_batches_tracked) == 9 and int(co[1].num_batches_tracked) == 11


def test_deepcopy_of_model_and_optimizer_together_matches_torch():
    theirs, ours = twins(conv_bn(conv_bias=False).train())  # (Adam would amplify a conv bias's zero gradient)
    states = []
    for m in (theirs, ours):
        opt = torch.optim.Adam(m.parameters(), lr=0.01)
        for i in range(2):
            opt.zero_grad()
            (m(conv_input(seed=i)) * data(8, 4, 6, 6, seed=30 + i)).sum().backward()
            opt.step()
        m2, opt2 = copy.deepcopy((m, opt))
        for i in range(2):
            opt2.zero_grad()
            (m2(conv_input(seed=5 + i)) * data(8, 4, 6, 6, seed=40 + i)).sum().backward()
            opt2.step()
        states.append(m2)
    assert_same_state(states[0], states[1])


def test_deepcopy_of_generic_and_ghost_layers_mid_training_matches_torch():
    theirs, ours = nhwc_twins()
    ghost_t = randomize(nn.BatchNorm2d(4), 3)
    ghost_o = bnkit.GhostBatchNorm2d(4, virtual_batch_size=8)  # one virtual batch: torch's BN
    ghost_o.load_state_dict(ghost_t.state_dict())
    x, z = data(8, 5, 5, 4), data(8, 4, 3, 3)
    theirs(x)
    ours(x)
    ghost_t(z)
    ghost_o(z)
    copies = [copy.deepcopy(m) for m in (theirs, ours, ghost_t, ghost_o)]
    for m in copies:
        m(x if m.__class__ in (NHWCTorch, bnkit.BatchNorm) else z)
    ct, co, gt, go = copies
    close(co(x), ct(x), what="generic copy")
    for k, v in nhwc_state(ct).items():
        close(co.state_dict()[k].double(), v.double(), what=k)
    close(go(z), gt(z), what="ghost copy")
    assert_same_state(gt, go, what="ghost copy state")
