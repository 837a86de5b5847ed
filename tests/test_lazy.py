"""bnkit's lazy layers (``bnkit.LazyBatchNorm1d/2d/3d`` and the generic ``LazyBatchNorm``) against torch's.

The oracle is ``torch.nn.LazyBatchNormNd`` fed the same inputs: outputs, gradients, running statistics,
``state_dict`` and what the layer becomes after its first call; ``bnkit.convert`` of a model with torch's
lazy layers against the torch model itself; the eager bnkit layer of the inferred size for the bnkit-only
options.
"""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn.parameter import is_lazy

import bnkit

CASES = [  # (bnkit lazy, torch lazy, what it becomes in bnkit, input shape)
    (bnkit.LazyBatchNorm1d, nn.LazyBatchNorm1d, bnkit.BatchNorm1d, (8, 5)),
    (bnkit.LazyBatchNorm1d, nn.LazyBatchNorm1d, bnkit.BatchNorm1d, (8, 5, 7)),
    (bnkit.LazyBatchNorm2d, nn.LazyBatchNorm2d, bnkit.BatchNorm2d, (6, 3, 5, 4)),
    (bnkit.LazyBatchNorm3d, nn.LazyBatchNorm3d, bnkit.BatchNorm3d, (4, 2, 3, 4, 5)),
]
OPTIONS = [
    {},
    {"momentum": None},
    {"momentum": 0.3, "eps": 1e-3},
    {"affine": False},
    {"track_running_stats": False},
    {"affine": False, "track_running_stats": False},
]


def _steps(layer: nn.Module, xs: list[torch.Tensor]) -> list[tuple]:
    out = []
    for x in xs:
        x = x.clone().requires_grad_(True)
        y = layer(x)
        (y * torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape).sin()).sum().backward()
        out.append((y.detach(), x.grad))
    return out


def _inputs(shape, n=3, channels_last=False):
    g = torch.Generator().manual_seed(sum(shape))
    xs = [torch.randn(shape, generator=g) * 2 + 0.5 for _ in range(n)]
    if channels_last:
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    return xs


@pytest.mark.parametrize("ours, theirs, becomes, shape", CASES, ids=lambda c: getattr(c, "__name__", str(c)))
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_first_calls_match_torchs_lazy_layer(ours, theirs, becomes, shape, options):
    a, b = ours(**options), theirs(**options)
    assert repr(a) == repr(b)
    assert a.has_uninitialized_params() == b.has_uninitialized_params()
    assert sorted(a.state_dict()) == sorted(b.state_dict())
    xs = _inputs(shape)
    for (ya, ga), (yb, gb) in zip(_steps(a, xs), _steps(b, xs)):
        torch.testing.assert_close(ya, yb)
        torch.testing.assert_close(ga, gb)
    assert type(a) is becomes and a.num_features == shape[1]
    # torch infers num_features only while materializing tensors: a layer with none keeps 0 (bnkit: the size seen)
    assert b.num_features == (0 if options.get("affine") is False and options.get("track_running_stats") is False
                              else shape[1])
    assert not hasattr(a, "_initialize_hook")
    for k, v in b.state_dict().items():
        torch.testing.assert_close(a.state_dict()[k], v, msg=k)
    for name in ("weight", "bias"):
        pa, pb = getattr(a, name), getattr(b, name)
        assert (pa is None) == (pb is None)
        if pa is not None:
            torch.testing.assert_close(pa.grad, pb.grad)
    a.eval(), b.eval()
    torch.testing.assert_close(a(xs[0]), b(xs[0]))


def test_channels_last_and_float64():
    a = bnkit.LazyBatchNorm2d(dtype=torch.float64)
    b = nn.LazyBatchNorm2d(dtype=torch.float64)
    xs = [x.double() for x in _inputs((4, 6, 5, 5), channels_last=True)]
    for (ya, ga), (yb, gb) in zip(_steps(a, xs), _steps(b, xs)):
        torch.testing.assert_close(ya, yb)
        torch.testing.assert_close(ga, gb)
        assert ya.is_contiguous(memory_format=torch.channels_last)
    assert a.weight.dtype == a.running_mean.dtype == torch.float64
    torch.testing.assert_close(a.running_var, b.running_var)


def test_a_wrong_first_input_raises_as_torch_and_leaves_the_layer_lazy():
    a, b = bnkit.LazyBatchNorm2d(), nn.LazyBatchNorm2d()
    bad = torch.randn(4, 3, 5)
    with pytest.raises(ValueError) as ours:
        a(bad)
    with pytest.raises(ValueError) as theirs:
        b(bad)
    assert str(theirs.value) in str(ours.value)  # "expected 4D input (got 3D input)"
    # torch has materialized 5 features from the wrong input by then; bnkit has changed nothing
    assert a.has_uninitialized_params() and a.num_features == 0 and type(a) is bnkit.LazyBatchNorm2d
    x = torch.randn(4, 7, 5, 5)
    torch.testing.assert_close(a(x), nn.BatchNorm2d(7)(x))
    assert a.num_features == 7


def test_the_bnkit_options_shape_the_inferred_tensors():
    """Oracle: the eager bnkit layer of the inferred size with the same options."""
    opts = {"axis": -1, "share_affine": "weight", "nonfinite": "raise", "momentum": 0.2}
    lazy, eager = bnkit.LazyBatchNorm(**opts), bnkit.BatchNorm(7, **opts)
    xs = _inputs((4, 5, 7))
    for (ya, ga), (yb, gb) in zip(_steps(lazy, xs), _steps(eager, xs)):
        torch.testing.assert_close(ya, yb)
        torch.testing.assert_close(ga, gb)
    assert type(lazy) is bnkit.BatchNorm and lazy.weight.shape == (1,) and lazy.bias.shape == (7,)
    assert repr(lazy) == repr(eager)
    for k, v in eager.state_dict().items():
        torch.testing.assert_close(lazy.state_dict()[k], v, msg=k)
    with pytest.raises(ValueError, match="share_affine"):
        bnkit.LazyBatchNorm2d(share_affine="channels")  # the layer's own argument checks


def test_a_masked_first_call():
    x = torch.randn(6, 4, 9)
    mask = torch.rand(6, 9, generator=torch.Generator().manual_seed(3)) > 0.3
    lazy, eager = bnkit.LazyBatchNorm1d(), bnkit.BatchNorm1d(4)
    torch.testing.assert_close(lazy(x, mask=mask), eager(x, mask=mask))
    torch.testing.assert_close(lazy.running_mean, eager.running_mean)


def test_state_dict_into_an_uninitialized_layer_as_torch():
    src = nn.BatchNorm2d(5)
    _steps(src.train(), _inputs((4, 5, 3, 3)))
    sd = src.state_dict()
    a, b = bnkit.LazyBatchNorm2d(), nn.LazyBatchNorm2d()
    a.load_state_dict(sd)
    b.load_state_dict(sd)
    assert not a.has_uninitialized_params() and type(a) is bnkit.LazyBatchNorm2d  # as torch: until the first call
    a.eval(), b.eval(), src.eval()
    x = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(a(x), src(x))
    torch.testing.assert_close(a(x), b(x))
    assert type(a) is bnkit.BatchNorm2d and a.num_features == 5
    # an uninitialized layer's state_dict (placeholders) loads into another uninitialized one
    c = bnkit.LazyBatchNorm2d()
    c.load_state_dict(bnkit.LazyBatchNorm2d().state_dict())
    assert c.has_uninitialized_params()


def test_pickle_and_save_of_an_uninitialized_layer(tmp_path):
    a = pickle.loads(pickle.dumps(bnkit.LazyBatchNorm2d(momentum=0.5)))
    torch.save(nn.Sequential(bnkit.LazyBatchNorm2d(momentum=0.5)), tmp_path / "m.pt")
    b = torch.load(tmp_path / "m.pt", weights_only=False)[0]
    x = torch.randn(4, 3, 2, 2)
    ref = nn.BatchNorm2d(3, momentum=0.5)
    y = ref(x)
    for m in (a, b):
        assert m.has_uninitialized_params()
        torch.testing.assert_close(m(x), y)
        torch.testing.assert_close(m.running_mean, ref.running_mean)


def test_compile_initializes_it_without_graph_breaks():
    def net(cls):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), cls(), nn.ReLU())

    x = torch.randn(4, 3, 8, 8)
    assert torch._dynamo.explain(net(bnkit.LazyBatchNorm2d))(x).graph_break_count == 0
    ours, theirs = torch.compile(net(bnkit.LazyBatchNorm2d)), net(nn.LazyBatchNorm2d)
    torch.testing.assert_close(ours(x), theirs(x))
    assert type(ours._orig_mod[1]) is bnkit.BatchNorm2d
    torch.testing.assert_close(ours._orig_mod[1].running_var, theirs[1].running_var)


# ------------------------------------------------------------------------------------------------ convert

def _lazy_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d(momentum=0.3), nn.ReLU(), nn.Flatten(),
                         nn.LazyBatchNorm1d(eps=1e-3))


@pytest.mark.parametrize("inplace", [False, True])
def test_convert_makes_torchs_lazy_layers_bnkits(inplace):
    torch_net = _lazy_net()
    model = _lazy_net() if inplace else torch_net
    seen = []
    model[1].register_forward_pre_hook(lambda m, args: seen.append(type(m)))
    converted, rep = bnkit.convert(model, inplace=inplace, report=True)
    assert [c[2] for c in rep.converted] == ["LazyBatchNorm2d", "LazyBatchNorm1d"] and not rep.left
    assert type(converted[1]) is bnkit.LazyBatchNorm2d and converted[1].momentum == 0.3
    assert converted[4].eps == 1e-3
    if not inplace:  # the original is untouched and still works
        assert type(torch_net[1]) is nn.LazyBatchNorm2d and torch_net[1].has_uninitialized_params()
    xs = _inputs((4, 3, 8, 8))
    for (ya, ga), (yb, gb) in zip(_steps(converted, xs), _steps(torch_net, xs)):
        torch.testing.assert_close(ya, yb)
        torch.testing.assert_close(ga, gb)
    assert type(converted[1]) is bnkit.BatchNorm2d and type(converted[4]) is bnkit.BatchNorm1d
    torch.testing.assert_close(converted[4].running_var, torch_net[4].running_var)
    # the user's hook moved with the layer and fires once per call, after the layer knows its size
    # (inplace=False: the original keeps a copy of the hook, which saw the torch layer's calls)
    assert seen.count(bnkit.BatchNorm2d) == 3 and seen.count(nn.BatchNorm2d) == (0 if inplace else 3)


def test_convert_back_to_torch_keeps_them_lazy():
    back = bnkit.convert(bnkit.convert(_lazy_net()), to="torch")
    assert [type(back[i]) for i in (1, 4)] == [nn.LazyBatchNorm2d, nn.LazyBatchNorm1d]
    ref = _lazy_net()
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(back(x), ref(x))
    assert type(back[1]) is nn.BatchNorm2d
    with pytest.raises(ValueError, match="generic"):
        bnkit.convert(nn.Sequential(bnkit.LazyBatchNorm(axis=-1)), to="torch")


def test_convert_of_a_lazy_layer_loaded_from_a_state_dict():
    """Loaded tensors but no num_features yet (torch's rule): it converts to the lazy class, which learns its
    size on the first call."""
    trained = _lazy_net()
    _steps(trained, _inputs((4, 3, 8, 8)))
    fresh = _lazy_net()
    fresh.load_state_dict(trained.state_dict())
    converted = bnkit.convert(fresh)
    assert type(converted[1]) is bnkit.LazyBatchNorm2d
    converted.eval(), trained.eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(converted(x), trained(x))
    assert converted[1].num_features == 4


@pytest.mark.parametrize("tool", ["fuse", "inspect", "recalibrate", "adapt", "tent", "convert_domain_bn", "freeze",
                                  "convert_sync_batchnorm"])
@pytest.mark.parametrize("lazy", [nn.LazyBatchNorm2d, bnkit.LazyBatchNorm2d], ids=["torch", "bnkit"])
def test_tools_refuse_a_layer_that_has_not_seen_an_input(tool, lazy):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), lazy(), nn.Flatten(), nn.Linear(144, 3)).eval()
    data = [torch.randn(4, 3, 8, 8)]
    calls = {
        "fuse": lambda: bnkit.fuse(net), "inspect": lambda: bnkit.inspect(net),
        "recalibrate": lambda: bnkit.recalibrate(net, data), "adapt": lambda: bnkit.adapt(net, data),
        "tent": lambda: bnkit.tent(net, data), "convert_domain_bn": lambda: bnkit.convert_domain_bn(net, 2),
        "freeze": lambda: bnkit.freeze(net), "convert_sync_batchnorm": lambda: bnkit.convert_sync_batchnorm(net),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="lazy layer that has not seen an input|not initialized yet"):
            calls[tool]()
    assert type(net[1]) is lazy and all(is_lazy(t) for t in (net[1].weight, net[1].running_mean))
