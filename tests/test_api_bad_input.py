"""Mistakes users make with the public API: a clear error, of torch's type where torch has the same API, and nothing lost.

Oracles: torch's own layers, ``F.batch_norm``, ``torch.optim.swa_utils.update_bn``, ``torch.ao`` fusion and
``torch.func``/``SyncBatchNorm.convert_sync_batchnorm`` on the same mistake (the exception type, or that torch
refuses it too); where torch has no twin, bnkit's documented contract (a ``ValueError``/``TypeError`` whose message
names the argument). After every error the layer or model is compared with a snapshot taken before: state_dict
tensors bit for bit, the class and training flag of every module, parameter identity and momenta.

This file targets what the other bad-input tests (test_layers, test_dropin*, test_variants*, test_domain,
test_functional_edges, test_tools_*, test_adapt*) leave out: the variant classes and scalar types they do not try,
sparse and meta-device inputs, in-place tools, non-module arguments, and the TorchScript twin.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parameter import is_lazy

import bnkit
import bnkit.functional as BF
from bnkit import kernels
from bnkit.integrations import func as bnkit_func
from bnkit.integrations import torchscript

NAN = float("nan")


# --------------------------------------------------------------------------- the snapshot every error is checked against
def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v if is_lazy(v) else v.clone() for k, v in model.state_dict().items()},
        "modules": [(n, type(m), m.training) for n, m in model.named_modules()],
        "params": [(n, id(p), p.requires_grad) for n, p in model.named_parameters()],
        "momenta": [(n, getattr(m, "momentum", None)) for n, m in model.named_modules()],
    }


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert list(after["state"]) == list(before["state"])
    for k, v in before["state"].items():
        got = after["state"][k]
        if is_lazy(v):  # still uninitialized (a lazy layer that never saw a good input)
            assert is_lazy(got), f"{k} was materialized"
            continue
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), f"{k} changed"
    assert after["modules"] == before["modules"]
    assert after["params"] == before["params"]
    assert after["momenta"] == before["momenta"]


def _cnn(bn=bnkit.BatchNorm2d) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bn(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 5))
    with torch.no_grad():
        model(torch.randn(6, 3, 2, 2))  # running statistics that are not the defaults
    return model


X = torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- constructors
# Every BN-family class that takes BatchNorm's arguments: name -> factory(**kwargs) with 3 features.
CTORS = {
    "BatchNorm": lambda **kw: bnkit.BatchNorm(3, **kw),
    "BatchNorm2d": lambda **kw: bnkit.BatchNorm2d(3, **kw),
    "LazyBatchNorm2d": lambda **kw: bnkit.LazyBatchNorm2d(**kw),
    "BatchRenorm2d": lambda **kw: bnkit.BatchRenorm2d(3, **kw),
    "GhostBatchNorm2d": lambda **kw: bnkit.GhostBatchNorm2d(3, virtual_batch_size=2, **kw),
    "SharedBatchNorm": lambda **kw: bnkit.SharedBatchNorm(3, 2, **kw),
    "DomainBatchNorm2d": lambda **kw: bnkit.DomainBatchNorm2d(3, 2, **kw),
    "SyncBatchNorm": lambda **kw: bnkit.SyncBatchNorm(3, **kw),
}

# Values torch's constructor accepts (the documented difference: bnkit checks them at construction).
OUT_OF_RANGE = [
    ({"momentum": -0.1}, "momentum"), ({"momentum": 2}, "momentum"), ({"momentum": NAN}, "momentum"),
    ({"eps": NAN}, "eps"), ({"eps": -1.0}, "eps"), ({"eps": "a"}, "eps"),
]


@pytest.mark.parametrize("kwargs,name", OUT_OF_RANGE, ids=[repr(k) for k, _ in OUT_OF_RANGE])
@pytest.mark.parametrize("cls", list(CTORS))
def test_out_of_range_arguments_are_a_value_error_naming_them_in_every_class(cls, kwargs, name):
    nn.BatchNorm2d(3, **kwargs)  # the oracle takes them (docs/differences.md: bnkit refuses at construction)
    with pytest.raises(ValueError, match=name):
        CTORS[cls](**kwargs)


NOT_A_NUMBER = [{"momentum": "x"}, {"momentum": [0.1]}]


@pytest.mark.parametrize("kwargs", NOT_A_NUMBER, ids=repr)
@pytest.mark.parametrize("cls", list(CTORS))
def test_a_momentum_that_is_not_a_number_is_an_error_naming_momentum(cls, kwargs):
    nn.BatchNorm2d(3, **kwargs)  # torch has no check: no twin, so bnkit's contract applies
    with pytest.raises((TypeError, ValueError), match="momentum"):
        CTORS[cls](**kwargs)


# Classes whose first argument is num_features (Lazy has none).
NUM_FEATURES_CTORS = {
    **{k: v for k, v in CTORS.items() if k != "LazyBatchNorm2d"},
    "FrozenBatchNorm2d": None, "FrozenSharedBatchNorm": None,
}


def _with_features(cls: str, n):
    extra = {"BatchRenorm2d": (), "GhostBatchNorm2d": (2,), "SharedBatchNorm": (2,), "DomainBatchNorm2d": (2,),
             "FrozenSharedBatchNorm": (2,)}.get(cls, ())
    return getattr(bnkit, cls)(n, *extra)


@pytest.mark.parametrize("n", [True, None, "3", -1, 2.5, 0], ids=repr)
@pytest.mark.parametrize("cls", list(NUM_FEATURES_CTORS))
def test_num_features_that_is_not_a_positive_int_is_a_value_error_in_every_class(cls, n):
    try:
        nn.BatchNorm2d(n)
    except (TypeError, RuntimeError):
        pass  # torch: torch.empty's TypeError / RuntimeError (0 is accepted); bnkit documents ValueError for all
    with pytest.raises(ValueError, match="num_features"):
        _with_features(cls, n)


# The feature axis of the generic classes; torch has no such argument.
AXIS_LAYERS = {
    "BatchNorm": (lambda axis: bnkit.BatchNorm(3, axis=axis), {}),
    "LazyBatchNorm": (lambda axis: bnkit.LazyBatchNorm(axis=axis), {}),
    "GhostBatchNorm": (lambda axis: bnkit.GhostBatchNorm(3, 2, axis=axis), {}),
    "DomainBatchNorm": (lambda axis: bnkit.DomainBatchNorm(3, 2, axis=axis), {"domain": 0}),
}


@pytest.mark.parametrize("axis", [1.5, "1", None], ids=repr)
@pytest.mark.parametrize("cls", list(AXIS_LAYERS))
def test_an_axis_that_is_not_an_int_is_an_error_naming_axis(cls, axis):
    make, call = AXIS_LAYERS[cls]
    with pytest.raises((TypeError, ValueError), match="axis"):
        make(axis)(X.clone(), **call)  # at construction or, at the latest, at the first call


@pytest.mark.parametrize("axis", [4, -5])
@pytest.mark.parametrize("cls", list(AXIS_LAYERS))
def test_an_axis_beyond_the_input_is_a_value_error_and_changes_nothing(cls, axis):
    make, call = AXIS_LAYERS[cls]
    layer = make(axis)
    before = _snapshot(layer)
    with pytest.raises(ValueError, match="axis"):
        layer(X.clone(), **call)
    _assert_unchanged(layer, before)


# Unknown option strings on the variants (test_layers tries BatchNorm2d's).
UNKNOWN_OPTIONS = [
    ("GhostBatchNorm2d", {"nonfinite": "ignore"}, "nonfinite"),
    ("GhostBatchNorm2d", {"share_affine": "some"}, "share_affine"),
    ("SharedBatchNorm", {"nonfinite": "ignore"}, "nonfinite"),
    ("SharedBatchNorm", {"share_affine": "bias"}, "share_affine"),
    ("DomainBatchNorm2d", {"nonfinite": None}, "nonfinite"),
    ("BatchRenorm2d", {"tiny_batch": "skip"}, "tiny_batch"),
    ("BatchRenorm2d", {"convention": "tf"}, "convention"),
    ("BatchRenorm2d", {"share_affine": "none "}, "share_affine"),
    ("LazyBatchNorm2d", {"convention": "Keras"}, "convention"),
    ("LazyBatchNorm2d", {"tiny_batch": "running", "track_running_stats": False}, "tiny_batch"),
    ("SyncBatchNorm", {"nonfinite": 0}, "nonfinite"),
]


@pytest.mark.parametrize("cls,kwargs,name", UNKNOWN_OPTIONS, ids=[f"{c}-{k}" for c, k, _ in UNKNOWN_OPTIONS])
def test_unknown_option_strings_are_a_value_error_naming_the_option(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        CTORS[cls](**kwargs)


# --------------------------------------------------------------------------- forward: bad inputs against torch's layer
LAYERS = {
    "BatchNorm2d": (lambda: bnkit.BatchNorm2d(3), {}),
    "BatchRenorm2d": (lambda: bnkit.BatchRenorm2d(3, schedule="fixed"), {}),
    "GhostBatchNorm2d": (lambda: bnkit.GhostBatchNorm2d(3, virtual_batch_size=3), {}),
    "SharedBatchNorm": (lambda: bnkit.SharedBatchNorm(3, 2), {"site": 1}),
    "DomainBatchNorm2d": (lambda: bnkit.DomainBatchNorm2d(3, 2), {"domain": torch.tensor([0, 1, 0, 1, 0, 1])}),
    "DomainBatchNorm2d-one": (lambda: bnkit.DomainBatchNorm2d(3, 2), {"domain": 1}),
}


def _trained(kind: str, training: bool) -> tuple[nn.Module, dict]:
    make, call = LAYERS[kind]
    layer = make()
    layer(X.clone(), **call)  # statistics and a count that are not the defaults
    return layer.train(training), call


BAD_INPUTS = {
    "wrong channel count": torch.randn(6, 4, 2, 2),
    "wrong rank": torch.randn(6, 3, 2),
    "float64 input": torch.randn(6, 3, 2, 2, dtype=torch.float64),
    "meta input": torch.randn(6, 3, 2, 2, device="meta"),
    "int input": torch.ones(6, 3, 2, 2, dtype=torch.int32),
    "complex input": torch.ones(6, 3, 2, 2, dtype=torch.complex128),
}


# SharedBatchNorm takes any rank (as bnkit.BatchNorm): a 3-D input is no mistake there.
BAD_INPUT_CASES = [(k, c) for k in LAYERS for c in BAD_INPUTS if not (k == "SharedBatchNorm" and c == "wrong rank")]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind,case", BAD_INPUT_CASES, ids=[f"{k}-{c}" for k, c in BAD_INPUT_CASES])
def test_bad_inputs_raise_torchs_type_in_every_layer_and_change_nothing(kind, case, training):
    x = BAD_INPUTS[case]
    with pytest.raises(Exception) as theirs:
        nn.BatchNorm2d(3).train(training)(x)
    layer, call = _trained(kind, training)
    before = _snapshot(layer)
    with pytest.raises(theirs.type) as ours:
        layer(x, **call)
    assert not isinstance(ours.value, (AttributeError, IndexError, KeyError)), ours.value
    _assert_unchanged(layer, before)


@pytest.mark.parametrize("value", [[1.0, 2.0], None, 3.0], ids=["list", "None", "float"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_a_non_tensor_input_is_a_type_error_in_every_layer_and_changes_nothing(kind, value):
    with pytest.raises(AttributeError):
        nn.BatchNorm2d(3)(value)  # torch's (documented difference: bnkit raises TypeError)
    layer, call = _trained(kind, True)
    before = _snapshot(layer)
    with pytest.raises(TypeError, match="Tensor"):
        layer(value, **call)
    _assert_unchanged(layer, before)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_a_layer_on_the_meta_device_called_with_a_cpu_input_raises_runtime_error_as_torch(kind, training):
    with pytest.raises(RuntimeError):
        nn.BatchNorm2d(3, device="meta").train(training)(X.clone())
    make, call = LAYERS[kind]
    with torch.device("meta"):
        layer = make()
    layer.train(training)
    if isinstance(call.get("domain"), torch.Tensor):
        call = {"domain": 0}  # a CPU domain tensor is refused for the device first
    with pytest.raises(RuntimeError, match="meta|device"):
        layer(X.clone(), **call)
    assert all(t.device.type == "meta" for t in layer.state_dict().values())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_a_sparse_input_raises_torchs_not_implemented_error_and_changes_nothing(kind, training):
    x = X.clone().to_sparse()
    with pytest.raises(NotImplementedError):
        nn.BatchNorm2d(3).train(training)(x)
    layer, call = _trained(kind, training)
    before = _snapshot(layer)
    try:
        with pytest.raises(NotImplementedError):
            layer(x, **call)
    finally:
        _assert_unchanged(layer, before)


# --------------------------------------------------------------------------- variant call arguments
@pytest.mark.parametrize("site,error", [
    (torch.tensor(2), IndexError), (torch.tensor(-1), IndexError), (torch.tensor([0, 1]), TypeError),
    (torch.tensor(1.0), TypeError), (torch.tensor(True), TypeError), ("0", TypeError), (None, TypeError),
], ids=repr)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_shared_batch_norm_bad_site_forms_raise_and_change_nothing(site, error, training):
    layer = bnkit.SharedBatchNorm(3, 2)
    layer(X.clone(), site=0)
    layer.train(training)
    before = _snapshot(layer)
    with pytest.raises(error, match="site"):
        layer(X.clone(), site=site)
    _assert_unchanged(layer, before)


@pytest.mark.parametrize("domain,error", [
    (2, IndexError), (-1, IndexError), (torch.tensor([0, 1, 0, 1, 0, 2]), IndexError),
    (torch.tensor([0, 1, 0, 1, 0, -1]), IndexError), (torch.tensor([0, 1, 0]), ValueError),
    (torch.tensor([0.0, 1, 0, 1, 0, 1]), TypeError), ([0, 1, 0, 1, 0, 1], TypeError), (True, TypeError),
    (torch.tensor([0, 1, 0, 1, 0, 1], device="meta"), RuntimeError),
], ids=repr)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_domain_batch_norm_bad_domains_raise_in_both_modes_and_change_nothing(domain, error, training):
    layer = bnkit.DomainBatchNorm2d(3, 2)
    layer(X.clone(), domain=torch.tensor([0, 1, 0, 1, 0, 1]))
    layer.train(training)
    before = _snapshot(layer)
    with pytest.raises(error, match="domain"):
        layer(X.clone(), domain=domain)
    _assert_unchanged(layer, before)


@pytest.mark.parametrize("domain,error", [(2, IndexError), (-1, IndexError), (1.5, TypeError), ("a", TypeError),
                                          (torch.tensor([0, 2]), IndexError), (torch.tensor([0.0, 1.0]), TypeError)],
                         ids=repr)
def test_set_domain_and_the_domain_context_refuse_bad_domains_and_keep_the_current_one(domain, error):
    model = bnkit.convert_domain_bn(_cnn(nn.BatchNorm2d), 2)
    bnkit.set_domain(model, 1)
    before = _snapshot(model)
    with pytest.raises(error, match="domain"):
        bnkit.set_domain(model, domain)
    assert model[1].current_domain == 1
    with pytest.raises(error, match="domain"):
        with bnkit.domain(model, domain):
            pass
    assert model[1].current_domain == 1
    with pytest.raises(error, match="domain"):
        model[1].set_domain(domain)
    assert model[1].current_domain == 1
    _assert_unchanged(model, before)


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_ghost_virtual_batch_size_set_after_construction_is_checked_before_any_change(value):
    layer = bnkit.GhostBatchNorm2d(3, virtual_batch_size=3)
    layer(X.clone())
    layer.virtual_batch_size = value
    before = _snapshot(layer)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        layer(X.clone())
    _assert_unchanged(layer, before)


# --------------------------------------------------------------------------- bnkit.functional against F.batch_norm
def _cpp():
    if not kernels.cpp_available():
        pytest.skip("the C++ extension is not available here (the default CPU backend)")
    return kernels.use_backend("cpp")


SCALARS = {
    "momentum='x'": {"momentum": "x", "training": True},
    "eps='a'": {"eps": "a", "training": True},
    "eps=None (eval)": {"eps": None, "training": False},
    "training='yes'": {"training": "yes"},
}


@pytest.mark.parametrize("kwargs", list(SCALARS.values()), ids=list(SCALARS))
def test_functional_scalar_arguments_of_the_wrong_type_raise_torchs_type_and_change_nothing(kwargs):
    x = torch.randn(4, 3, 2)
    with pytest.raises(Exception) as theirs:
        F.batch_norm(x, torch.zeros(3), torch.ones(3), **kwargs)
    assert theirs.type is TypeError
    rm, rv = torch.zeros(3), torch.ones(3)
    with _cpp(), pytest.raises(theirs.type):
        BF.batch_norm(x, rm, rv, **kwargs)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_momentum_of_the_wrong_type_is_named_in_the_message_as_torch_names_it(training):
    x = torch.randn(4, 3, 2)
    with pytest.raises(TypeError, match="momentum"):
        F.batch_norm(x, torch.zeros(3), torch.ones(3), training=training, momentum="x")
    with _cpp(), pytest.raises(TypeError, match="momentum"):
        BF.batch_norm(x, torch.zeros(3), torch.ones(3), training=training, momentum="x")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_sparse_input_raises_torchs_not_implemented_error(training):
    x = torch.randn(4, 3, 2).to_sparse()
    with pytest.raises(NotImplementedError):
        F.batch_norm(x, torch.zeros(3), torch.ones(3), training=training)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(NotImplementedError):
        BF.batch_norm(x, rm, rv, training=training)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


@pytest.mark.parametrize("axis", [3, -4])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_core_axis_beyond_the_input_is_a_value_error_and_changes_nothing(axis, training):
    rm, rv = torch.zeros(3), torch.ones(3)
    nbt = torch.tensor(4)
    with pytest.raises(ValueError, match="axis"):
        BF.batch_norm_core(torch.randn(4, 3, 2), rm, rv, training=training, axis=axis, num_batches_tracked=nbt)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3)) and int(nbt) == 4


NO_TWIN_SCALARS = {
    "momentum_from_keras('x')": (lambda: bnkit.momentum_from_keras("x"), "momentum"),
    "momentum_to_keras(None)": (lambda: bnkit.momentum_to_keras(None), "momentum"),
    "moments(axes='a')": (lambda: BF.moments(torch.randn(4, 3), "a"), "ax"),
    "normalize(variance_epsilon='a')": (
        lambda: BF.normalize(torch.randn(4, 3), torch.zeros(3), torch.ones(3), variance_epsilon="a"), "variance_epsilon"),
}


@pytest.mark.parametrize("case", list(NO_TWIN_SCALARS))
def test_helpers_without_a_torch_twin_name_the_argument_of_the_wrong_type(case):
    call, name = NO_TWIN_SCALARS[case]
    with pytest.raises((TypeError, ValueError), match=name):
        call()


@pytest.mark.parametrize("value", [-0.1, 1.5, NAN])
def test_keras_momentum_conversions_refuse_out_of_range_values(value):
    for fn in (bnkit.momentum_from_keras, bnkit.momentum_to_keras):
        with pytest.raises(ValueError, match="momentum"):
            fn(value)


# --------------------------------------------------------------------------- tools: arguments that are not modules
NOT_MODULES = ["model", None, [nn.BatchNorm2d(3)]]


def _enter(cm_factory):
    def run(model):
        with cm_factory(model):
            pass
    return run


# Tools with no torch twin: bnkit's contract, a TypeError naming what was expected.
NO_TWIN_TOOLS = {
    "convert": lambda m: bnkit.convert(m),
    "fuse": lambda m: bnkit.fuse(m),
    "freeze": bnkit.freeze,
    "unfreeze": bnkit.unfreeze,
    "convert_domain_bn": lambda m: bnkit.convert_domain_bn(m, 2),
    "accumulate_stats": _enter(bnkit.accumulate_stats),
    "preserve_stats": _enter(bnkit.preserve_stats),
    "checkpoint_safe": bnkit.checkpoint_safe,
    "inspect": lambda m: bnkit.inspect(m),
    "adapt": lambda m: bnkit.adapt(m, X.clone()),
    "bn_parameters": bnkit.bn_parameters,
    "set_domain": lambda m: bnkit.set_domain(m, 0),
    "select_domain": lambda m: bnkit.select_domain(m, 0),
    "domain": lambda m: _enter(lambda mm: bnkit.domain(mm, 0))(m),
    "scriptable": torchscript.scriptable,
}


@pytest.mark.parametrize("value", NOT_MODULES, ids=["str", "None", "list"])
@pytest.mark.parametrize("tool", list(NO_TWIN_TOOLS))
def test_tools_given_something_that_is_not_a_module_raise_type_error(tool, value):
    call = NO_TWIN_TOOLS[tool]
    with pytest.raises(TypeError, match="Module|module"):
        call(value)


# Tools with a torch twin: the same exception type as torch's on the same mistake.
TWIN_TOOLS = {
    "recalibrate / update_bn": (lambda m: bnkit.recalibrate(m, [X.clone()]),
                                lambda m: torch.optim.swa_utils.update_bn([X.clone()], m)),
    "convert_sync_batchnorm": (bnkit.convert_sync_batchnorm, nn.SyncBatchNorm.convert_sync_batchnorm),
    "replace_all_batch_norm_modules_": (bnkit_func.replace_all_batch_norm_modules_,
                                        torch.func.replace_all_batch_norm_modules_),
}


@pytest.mark.parametrize("value", NOT_MODULES, ids=["str", "None", "list"])
@pytest.mark.parametrize("tool", list(TWIN_TOOLS))
def test_tools_with_a_torch_twin_refuse_a_non_module_with_torchs_type(tool, value):
    ours, theirs = TWIN_TOOLS[tool]
    with pytest.raises(Exception) as want:
        theirs(value)
    with pytest.raises(want.type):
        ours(value)


# --------------------------------------------------------------------------- tools: bad arguments change nothing
@pytest.mark.parametrize("to", ["x", None, "Torch", 1], ids=repr)
@pytest.mark.parametrize("inplace", [False, True])
def test_convert_to_an_unknown_target_changes_nothing(to, inplace):
    model = _cnn()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="to must be"):
        bnkit.convert(model, to=to, inplace=inplace)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("bn", [nn.BatchNorm2d, bnkit.BatchNorm2d], ids=["torch-bn", "bnkit-bn"])
@pytest.mark.parametrize("inplace", [False, True])
def test_fuse_on_a_training_model_refuses_as_torch_and_changes_nothing(bn, inplace):
    model = _cnn(bn).train()
    if bn is nn.BatchNorm2d:  # the oracle: torch's fusion refuses a training model too
        with pytest.raises(AssertionError, match="eval"):
            torch.ao.quantization.fuse_modules(model, [["0", "1"]])
    before = _snapshot(model)
    with pytest.raises(ValueError, match="eval"):
        bnkit.fuse(model, inplace=inplace)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("num_domains", [0, -1, 1.5, True, None, "2"], ids=repr)
@pytest.mark.parametrize("inplace", [False, True])
def test_convert_domain_bn_with_a_bad_num_domains_changes_nothing(num_domains, inplace):
    model = _cnn(nn.BatchNorm2d)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="num_domains"):
        bnkit.convert_domain_bn(model, num_domains, inplace=inplace)
    _assert_unchanged(model, before)
    with pytest.raises(TypeError, match="shared_affine"):
        bnkit.convert_domain_bn(model, 2, shared_affine="yes", inplace=inplace)
    _assert_unchanged(model, before)


RECALIBRATE_BAD = {
    "num_batches=True": ({"num_batches": True}, [X], ValueError, "num_batches"),
    "num_batches=-1": ({"num_batches": -1}, [X], ValueError, "num_batches"),
    "num_batches=1.5": ({"num_batches": 1.5}, [X], ValueError, "num_batches"),
    "estimator=None": ({"estimator": None}, [X], ValueError, "estimator"),
    "too few batches": ({"num_batches": 2}, [X], ValueError, "num_batches"),
    "data=None": ({}, None, TypeError, None),
    "data=3": ({}, 3, TypeError, None),
    "string batch after a good one": ({}, [X, "batch"], TypeError, None),
    "dict batch": ({}, [{"x": X}], TypeError, None),
    "wrong channel count after a good one": ({}, [X, torch.randn(6, 5, 2, 2)], RuntimeError, None),
}


@pytest.mark.parametrize("case", list(RECALIBRATE_BAD))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_recalibrate_bad_arguments_and_batches_change_nothing(case, training):
    kwargs, data, error, match = RECALIBRATE_BAD[case]
    model = _cnn().train(training)
    before = _snapshot(model)
    with pytest.raises(error, match=match):
        bnkit.recalibrate(model, data, **kwargs)
    _assert_unchanged(model, before)


def test_recalibrate_on_data_that_yields_nothing_keeps_what_update_bn_would_reset():
    theirs = _cnn(nn.BatchNorm2d)
    torch.optim.swa_utils.update_bn([], theirs)  # the oracle resets the statistics: nothing to estimate them from
    assert torch.equal(theirs[1].running_mean, torch.zeros(4))
    for data in ([], iter([])):
        model = _cnn()
        before = _snapshot(model)
        with pytest.warns(RuntimeWarning, match="no batch"):
            bnkit.recalibrate(model, data)
        _assert_unchanged(model, before)  # "loses nothing"
        assert not torch.equal(model[1].running_mean, torch.zeros(4))


ADAPT_BAD = [
    {"prior": "a"}, {"prior": None}, {"prior": float("inf")}, {"mode": None}, {"mode": "Reestimate"},
    {"mode": "online", "momentum": "x"}, {"mode": "online", "momentum": NAN}, {"mode": "online", "window": 1.5},
    {"num_batches": True}, {"num_batches": -3},
]


@pytest.mark.parametrize("kwargs", ADAPT_BAD, ids=repr)
def test_adapt_bad_options_name_the_option_and_change_nothing(kwargs):
    model = _cnn().eval()
    before = _snapshot(model)
    name = "mode" if "mode" in kwargs and len(kwargs) == 1 else [k for k in kwargs if k != "mode"][0]
    with pytest.raises(ValueError, match=name):
        bnkit.adapt(model, [X.clone()], **kwargs)
    _assert_unchanged(model, before)


TENT_BAD = [
    {"steps": 1.5}, {"steps": True}, {"steps": -1}, {"lr": NAN}, {"lr": "a"}, {"lr": 0}, {"lr": float("-inf")},
    {"stats": None}, {"step_stats": "Batch"}, {"views": 0}, {"num_batches": 0},
]


@pytest.mark.parametrize("kwargs", TENT_BAD, ids=repr)
def test_tent_bad_options_name_the_option_and_change_nothing(kwargs):
    model = _cnn().eval()
    before = _snapshot(model)  # includes requires_grad of every parameter
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        bnkit.tent(model, [X.clone()], **kwargs)
    _assert_unchanged(model, before)


INSPECT_BAD = [
    {"dead_tol": "a"}, {"dead_tol": NAN}, {"shift_tol": -0.5}, {"log_var_tol": float("inf")},
    {"tiny_var": "a"}, {"tiny_var": NAN}, {"num_batches": -2}, {"num_batches": True},
]


@pytest.mark.parametrize("kwargs", INSPECT_BAD, ids=repr)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_inspect_bad_tolerances_name_the_option_and_change_nothing(kwargs, training):
    model = _cnn().train(training)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        bnkit.inspect(model, [X.clone()], **kwargs)
    _assert_unchanged(model, before)


def test_freeze_refusing_one_layer_converts_none_of_the_others():
    model = nn.Sequential(nn.BatchNorm2d(3), bnkit.BatchNorm2d(3), nn.BatchNorm2d(3, track_running_stats=False))
    model(X.clone())
    before = _snapshot(model)
    with pytest.raises(ValueError, match="running statistics"):
        bnkit.freeze(model)
    _assert_unchanged(model, before)


# --------------------------------------------------------------------------- TorchScript twin against torch's scripted layer
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_scripted_layer_refuses_an_input_of_another_dtype_as_torchs_scripted_layer(training):
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64)
    theirs = torch.jit.script(nn.Sequential(nn.BatchNorm2d(3))).train(training)
    with pytest.raises(RuntimeError):
        theirs(x)
    eager = nn.Sequential(bnkit.BatchNorm2d(3))
    eager(X.clone())
    with pytest.raises(RuntimeError):
        eager(x)  # bnkit's eager layer: DtypeMismatchError (a RuntimeError)
    scripted = torch.jit.script(eager).train(training)
    before = {k: v.clone() for k, v in scripted.state_dict().items()}
    try:
        with pytest.raises((RuntimeError, torch.jit.Error)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scripted(x)
    finally:
        for k, v in scripted.state_dict().items():
            assert torch.equal(v, before[k]), k
