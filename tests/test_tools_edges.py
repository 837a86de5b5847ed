"""The deployment tools (fuse, freeze/unfreeze, recalibrate) on the edges, against independent oracles: torch's own
fusion functions, the unfused eval model, and statistics computed by hand in float64."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

import bnkit
from bnkit import variants as V


def _rand_bn(bn: nn.Module) -> nn.Module:
    with torch.no_grad():
        if getattr(bn, "running_mean", None) is not None:
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
        if getattr(bn, "weight", None) is not None:
            bn.weight.uniform_(0.5, 2)
        if getattr(bn, "bias", None) is not None:
            bn.bias.uniform_(-1, 1)
    return bn


def _fuse_quiet(model: nn.Module, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bnkit.fuse(model, report=True, **kw)


# --------------------------------------------------------------------------- fuse
@pytest.mark.parametrize(
    "layer, bn, shape",
    [
        (lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, padding_mode="reflect", bias=False),
         lambda: nn.BatchNorm2d(6), (2, 4, 7, 7)),
        (lambda: nn.Conv3d(4, 8, 3, groups=4), lambda: nn.BatchNorm3d(8), (2, 4, 5, 5, 5)),
        (lambda: nn.Conv1d(3, 6, 3, stride=2, padding=1, padding_mode="circular"), lambda: nn.BatchNorm1d(6), (2, 3, 9)),
        (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, output_padding=1, dilation=2),
         lambda: nn.BatchNorm2d(6), (2, 4, 5, 5)),
    ],
)
def test_conv_then_bn_matches_torch_fusion(layer, bn, shape):
    torch.manual_seed(0)
    model = nn.Sequential(layer(), _rand_bn(bn())).eval()
    x = torch.randn(*shape)
    fused, report = _fuse_quiet(model)
    assert [(p.bn, p.layer, p.position) for p in report.fused] == [("1", "0", "after")]
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)
    if isinstance(model[0], nn.ConvTranspose2d):
        return  # torch's fuse_conv_bn_eval does not handle grouped transposed convs; outputs checked above
    oracle = fuse_conv_bn_eval(copy.deepcopy(model[0]), copy.deepcopy(model[1]))
    conv = next(m for m in fused.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)))
    torch.testing.assert_close(conv.weight, oracle.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(conv.bias, oracle.bias, rtol=1e-5, atol=1e-6)


def test_linear_then_bn_matches_torch_fusion():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), _rand_bn(nn.BatchNorm1d(8))).eval()
    fused, _ = _fuse_quiet(model)
    oracle = fuse_linear_bn_eval(copy.deepcopy(model[0]), copy.deepcopy(model[1]))
    lin = next(m for m in fused.modules() if isinstance(m, nn.Linear))
    torch.testing.assert_close(lin.weight, oracle.weight)
    torch.testing.assert_close(lin.bias, oracle.bias)


@pytest.mark.parametrize(
    "conv, shape",
    [
        (lambda: nn.Conv2d(4, 6, 3, dilation=2, groups=2, stride=2), (2, 4, 9, 9)),
        (lambda: nn.Conv2d(4, 4, 1, padding="same"), (2, 4, 5, 5)),
        (lambda: nn.ConvTranspose2d(4, 6, 1, padding=1, groups=2), (2, 4, 5, 5)),
        (lambda: nn.Conv1d(4, 8, 3, groups=4, bias=False), (2, 4, 9)),
    ],
)
def test_bn_then_conv_folds_exactly(conv, shape):
    torch.manual_seed(0)
    model = nn.Sequential(_rand_bn(nn.BatchNorm2d(4) if len(shape) == 4 else nn.BatchNorm1d(4)), conv()).eval()
    x = torch.randn(*shape)
    fused, report = _fuse_quiet(model)
    assert [p.position for p in report.fused] == ["before"]
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


def test_bn_then_pointwise_conv_transpose_with_output_padding():
    torch.manual_seed(0)
    model = nn.Sequential(_rand_bn(nn.BatchNorm2d(4)),
                          nn.ConvTranspose2d(4, 6, 1, stride=1, dilation=2, output_padding=1)).eval()
    x = torch.randn(2, 4, 5, 5)
    fused, _ = _fuse_quiet(model)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv", [
    lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"),
    lambda: nn.Conv2d(4, 4, 3, padding="same"),
])
def test_bn_before_padded_conv_becomes_affine(conv):
    torch.manual_seed(0)
    model = nn.Sequential(_rand_bn(nn.BatchNorm2d(4)), conv()).eval()
    x = torch.randn(2, 4, 6, 6)
    fused, report = _fuse_quiet(model)
    assert not report.fused and [u.replaced_by for u in report.unfused] == ["Affine"]
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


class _BNTwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = _rand_bn(nn.BatchNorm2d(3))
        self.c1 = nn.Conv2d(3, 4, 1)
        self.c2 = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.bn(x)
        return self.c1(y) + self.c2(y)


class _SharedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = _rand_bn(nn.BatchNorm2d(4))
        self.c1 = nn.Conv2d(3, 4, 1)
        self.c2 = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.bn(self.c1(x)) + self.bn(self.c2(x)) + self.bn(x[:, :1].expand(-1, 4, -1, -1).contiguous())


class _SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn1 = _rand_bn(nn.BatchNorm2d(4))
        self.bn2 = _rand_bn(nn.BatchNorm2d(4))
        self.c = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.bn1(self.c(x)) + self.bn2(self.c(x))


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _rand_bn(nn.BatchNorm2d(4)), nn.ReLU(),
                                 _rand_bn(nn.BatchNorm2d(4)), nn.Conv2d(4, 4, 1))
        self.bn = _rand_bn(nn.BatchNorm2d(4))

    def forward(self, x):
        y = self.seq(x)
        if y.sum() > 0:
            y = y * 2
        return self.bn(y)


@pytest.mark.parametrize("make, n_fused", [(_BNTwoConvs, 0), (_SharedBN, 2), (_SharedConv, 2), (_Untraceable, 2)])
def test_fx_and_fallback_graphs_match_eval_model(make, n_fused):
    torch.manual_seed(0)
    model = make().eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 5, 5)
    fused, report = _fuse_quiet(model)
    assert report.num_fused == n_fused
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the original is untouched


@pytest.mark.parametrize("make", [
    lambda: bnkit.BatchNorm(4, share_affine="weight"),
    lambda: bnkit.BatchNorm(4, share_affine="all"),
    lambda: bnkit.BatchNorm2d(4, bias=False),
    lambda: bnkit.BatchNorm2d(4, affine=False, eps=0.3),
    lambda: V.BatchRenorm2d(4, convention="keras"),
    lambda: V.GhostBatchNorm2d(4, virtual_batch_size=1),
    lambda: V.FrozenBatchNorm2d(4),
    lambda: V.SharedBatchNorm(4, 1),
])
@pytest.mark.parametrize("side", ["after", "before"])
def test_fuse_bnkit_variants(make, side):
    torch.manual_seed(0)
    bn = _rand_bn(make())
    if side == "after":
        model, x = nn.Sequential(nn.Conv2d(3, 4, 3), bn).eval(), torch.randn(2, 3, 6, 6)
    else:
        model, x = nn.Sequential(bn, nn.Conv2d(4, 5, 1)).eval(), torch.randn(2, 4, 5, 5)
    fused, report = _fuse_quiet(model)
    assert [p.position for p in report.fused] == [side]
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


def test_fuse_channels_last_bnkit_axis_and_example_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), _rand_bn(bnkit.BatchNorm(4, axis=-1))).eval()
    x = torch.randn(2, 3, 5)
    fused, report = _fuse_quiet(model)
    assert report.num_fused == 1
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)
    # BatchNorm1d on (N, C, L) data after a Linear: refused once example_inputs show the 3-D input
    model = nn.Sequential(nn.Linear(5, 3), _rand_bn(nn.BatchNorm1d(3))).eval()
    fused, report = _fuse_quiet(model, example_inputs=x)
    assert report.num_fused == 0
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- freeze / unfreeze
@pytest.mark.parametrize("make", [
    lambda: nn.BatchNorm2d(4, affine=False),
    lambda: nn.BatchNorm2d(4, momentum=None, eps=1e-2),
    lambda: bnkit.BatchNorm(4, share_affine="all"),
    lambda: bnkit.BatchNorm2d(4, bias=False),
    lambda: V.BatchRenorm2d(4, warmup_steps=0, r_max_steps=3, d_max_steps=3),
    lambda: V.GhostBatchNorm2d(4, virtual_batch_size=2),
    lambda: bnkit.BatchNorm2d(4, convention="keras", momentum=None),
])
def test_freeze_unfreeze_round_trip_then_training(make):
    torch.manual_seed(1)
    ref = nn.Sequential(nn.Conv2d(3, 4, 1), _rand_bn(make())).eval()
    with torch.no_grad():
        ref[1].num_batches_tracked.fill_(7)
    model = copy.deepcopy(ref)
    x = torch.randn(4, 3, 5, 5)
    want = ref(x)
    sd0 = ref.state_dict()
    bnkit.freeze(model)
    fr = model[1]
    assert set(model.state_dict()) == set(sd0)
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias"]
    model.train()
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)
    # torchvision's FrozenBatchNorm2d formula
    w = fr.weight.reshape(1, -1, 1, 1) if fr.weight is not None else 1.0
    b = fr.bias.reshape(1, -1, 1, 1) if fr.bias is not None else 0.0
    h = model[0](x)
    tv = (h - fr.running_mean.reshape(1, -1, 1, 1)) / torch.sqrt(fr.running_var.reshape(1, -1, 1, 1) + fr.eps) * w + b
    torch.testing.assert_close(model(x), tv, rtol=1e-5, atol=1e-5)
    bnkit.unfreeze(model)
    assert type(model[1]) is type(ref[1])
    sd = model.state_dict()
    assert set(sd) == set(sd0) and all(torch.equal(sd[k], sd0[k]) for k in sd0)
    ref.train()
    model.train()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, model)]
    for _ in range(2):
        xb = torch.randn_like(x)
        for m, opt in zip((ref, model), opts):
            loss = m(xb).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    sd1, sd2 = ref.state_dict(), model.state_dict()
    for k in sd1:
        torch.testing.assert_close(sd1[k], sd2[k], rtol=0, atol=0)


def test_freeze_keras_batch_renorm_keeps_state_dict_keys():
    # docs/variants.md: "The frozen layer has the same values and the same state_dict keys."
    bn = V.BatchRenorm2d(4, convention="keras", schedule="fixed")
    bn(torch.randn(8, 4, 3, 3))
    sd = bn.eval().state_dict()
    round_trip = bnkit.unfreeze(bnkit.freeze(copy.deepcopy(bn)))
    assert set(round_trip.state_dict()) == set(sd)
    round_trip.load_state_dict(sd)


def test_freeze_shared_layer_and_hooks_and_refusal():
    bn = nn.BatchNorm2d(4)
    calls = []
    bn.register_forward_hook(lambda *a: calls.append(1))
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bn, nn.Conv2d(4, 4, 1), bn)
    bnkit.freeze(model)
    assert model[1] is model[3] and isinstance(model[1], bnkit.FrozenBatchNorm)
    model(torch.randn(1, 3, 2, 2))
    assert len(calls) == 2
    bnkit.unfreeze(model)
    assert model[1] is model[3] and type(model[1]) is nn.BatchNorm2d
    bad = nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="running statistics"):
        bnkit.freeze(bad)
    assert type(bad[0]) is nn.BatchNorm2d


# --------------------------------------------------------------------------- recalibrate
def _model(bn1: nn.Module | None = None) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), bn1 if bn1 is not None else nn.BatchNorm2d(4), nn.Dropout(0.5),
                         nn.Conv2d(4, 5, 1), bnkit.BatchNorm2d(5, momentum=None))


def _exact(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = h.double()
    return h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=True)


def _oracle(model: nn.Sequential, xs: list[torch.Tensor]):
    with torch.no_grad():
        first = torch.cat([model[0](x) for x in xs])
        second = []
        for x in xs:
            h = model[0](x).double()
            mu, var = h.mean((0, 2, 3), keepdim=True), h.var((0, 2, 3), unbiased=False, keepdim=True)
            w, b = model[1].weight.double().reshape(1, -1, 1, 1), model[1].bias.double().reshape(1, -1, 1, 1)
            conv = copy.deepcopy(model[3]).double()
            second.append(conv((h - mu) / torch.sqrt(var + model[1].eps) * w + b))
    return _exact(first), _exact(torch.cat(second))


@pytest.mark.parametrize("kind", ["list", "tuples", "lists", "generator", "eval", "limit", "limit_gen", "uneven",
                                  "momentum_none"])
def test_recalibrate_exact_statistics(kind):
    torch.manual_seed(0)
    sizes = (1, 2, 7) if kind == "uneven" else (4,) * 5
    xs = [torch.randn(n, 3, 6, 6) * 2 + 1 for n in sizes]
    model = _model(nn.BatchNorm2d(4, momentum=None) if kind == "momentum_none" else None)
    model.train(kind != "eval")
    nbt = [model[1].num_batches_tracked.clone(), model[4].num_batches_tracked.clone()]
    moms = [model[1].momentum, model[4].momentum]
    kw, used = {}, xs
    data = {"tuples": [(x, torch.zeros(len(x))) for x in xs], "lists": [[x, 0] for x in xs],
            "generator": (x for x in xs), "limit_gen": (x for x in xs)}.get(kind, xs)
    if kind.startswith("limit"):
        kw, used = {"num_batches": 3}, xs[:3]
    bnkit.recalibrate(model, data, **kw)
    (m1, v1), (m2, v2) = _oracle(model, used)
    for got, want in ((model[1].running_mean, m1), (model[1].running_var, v1),
                      (model[4].running_mean, m2), (model[4].running_var, v2)):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert all(m.training == (kind != "eval") for m in model.modules())
    assert [model[1].momentum, model[4].momentum] == moms
    assert torch.equal(nbt[0], model[1].num_batches_tracked) and torch.equal(nbt[1], model[4].num_batches_tracked)


def test_recalibrate_errors_change_nothing():
    model = _model()
    sd = copy.deepcopy(model.state_dict())
    with pytest.raises(bnkit.tools.calibrate.NotEnoughBatchesError):
        bnkit.recalibrate(model, [torch.randn(2, 3, 6, 6)], num_batches=3)
    with pytest.raises(RuntimeError):
        bnkit.recalibrate(model, [torch.randn(2, 3, 6, 6), torch.randn(2, 7, 6, 6)])
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    assert model.training and model[1].momentum == 0.1


def test_recalibrate_keeps_dropout_in_bn_act_tail_off():
    torch.manual_seed(0)
    model = nn.Sequential(V.BatchNormAct2d(4, drop=nn.Dropout(0.5), act=nn.ReLU()), bnkit.BatchNorm2d(4))
    xs = [torch.randn(8, 4, 3, 3) * 2 + 1 for _ in range(3)]
    bnkit.recalibrate(model, xs)
    outs = []
    for x in xs:
        mu, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)
        outs.append(torch.relu((x - mu) / torch.sqrt(var + 1e-5)))
    mean, var = _exact(torch.cat(outs))
    torch.testing.assert_close(model[1].running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var.double(), var, rtol=1e-5, atol=1e-6)


class _DomainKw(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = V.DomainBatchNorm2d(4, 3)

    def forward(self, x):
        return self.bn(x, domain=2)  # the documented call form bn(x, domain=d)


def test_recalibrate_domain_bn_positional_domain():
    class Pos(_DomainKw):
        def forward(self, x):
            return self.bn(x, 2)

    torch.manual_seed(0)
    xs = [torch.randn(8, 4, 3, 3) * 2 + 5 for _ in range(3)]
    model = Pos()
    bnkit.recalibrate(model, xs)
    mean, var = _exact(torch.cat(xs))
    torch.testing.assert_close(model.bn.running_mean[2].double(), mean, rtol=1e-6, atol=1e-6)
    assert torch.equal(model.bn.running_mean[:2], torch.zeros(2, 4))


def test_recalibrate_domain_bn_keyword_domain():
    torch.manual_seed(0)
    xs = [torch.randn(8, 4, 3, 3) * 2 + 5 for _ in range(3)]
    model = _DomainKw()
    with bnkit.domain(model, 0):
        bnkit.recalibrate(model, xs)
    mean, _ = _exact(torch.cat(xs))
    torch.testing.assert_close(model.bn.running_mean[2].double(), mean, rtol=1e-6, atol=1e-6)
    assert torch.equal(model.bn.running_mean[0], torch.zeros(4))  # domain 0 saw no data


class _SubclassWithExtras(nn.BatchNorm2d):
    """torch's forward; a child module and an extra buffer of its own (both in its state_dict)."""

    def __init__(self, c):
        super().__init__(c)
        self.extra = nn.Linear(2, 2)
        self.register_buffer("hint", torch.full((c,), 7.0))


def test_convert_round_trip_keeps_a_subclass_s_children_buffers_and_their_flags():
    model = nn.Sequential(_SubclassWithExtras(3))
    model[0].extra.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    extra, hint = model[0].extra, model[0].hint
    converted = bnkit.convert(model, inplace=True)
    assert type(converted[0]) is bnkit.BatchNorm2d
    assert list(converted.state_dict()) == list(before)  # the same keys as the torch model: checkpoints load both ways
    assert converted[0].extra is extra and converted[0].hint is hint and not converted[0].extra.training
    back = bnkit.convert(converted, to="torch", inplace=True)
    assert type(back[0]) is _SubclassWithExtras and back[0].extra is extra and back[0].hint is hint
    assert back[0].training and not back[0].extra.training  # the layer's flag set, not its children's
    for k, v in back.state_dict().items():
        assert torch.equal(v, before[k]), k
