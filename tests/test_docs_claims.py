"""Behavioural claims made in the prose of the user docs (docs/*.md, README.md).

Each test names the claim, cites the page and section, and checks bnkit against an oracle:
torch's own BN (or tool) on the same data, float64 torch/NumPy, or values derived by hand.
The docs' python blocks are executed by tests/test_docs.py; these tests target the prose.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnkit
import bnkit.functional as BF

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _twin(c: int = 3, cls=bnkit.BatchNorm2d, tcls=nn.BatchNorm2d, **kw):
    """A bnkit layer and a torch layer with the same random affine parameters."""
    ours, theirs = cls(c, **kw), tcls(c, **kw)
    with torch.no_grad():
        if theirs.weight is not None:
            theirs.weight.uniform_(0.5, 1.5)
            if theirs.bias is not None:
                theirs.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _assert_state_equal(m: nn.Module, before: dict[str, torch.Tensor]) -> None:
    now = m.state_dict()
    assert now.keys() == before.keys()
    for k, v in before.items():
        torch.testing.assert_close(now[k], v, rtol=0, atol=0, equal_nan=True, msg=k)


# --------------------------------------------------------------------------------------------- layers.md


@pytest.mark.parametrize("mode", ["train", "eval_grad", "eval_no_grad", "inference_mode"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_relu_inplace_after_the_layer_works_in_every_mode(mode, channels_last):
    """docs/layers.md, "Behaviour you can rely on" (Outputs): `ReLU(inplace=True)` after the layer works
    in every mode. Oracle: torch's BatchNorm2d followed by ReLU(inplace=True)."""
    torch.manual_seed(0)
    ours, theirs = _twin(4)
    nets = [nn.Sequential(bn, nn.ReLU(inplace=True)) for bn in (ours, theirs)]
    x = torch.randn(5, 4, 3, 3)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    for net in nets:
        net.train(mode == "train")
    outs, grads = [], []
    for net in nets:
        if mode in ("train", "eval_grad"):
            leaf = x.clone().requires_grad_()
            y = net(leaf)
            y.backward(torch.ones_like(y))
            grads.append((leaf.grad, net[0].weight.grad, net[0].bias.grad))
        elif mode == "eval_no_grad":
            with torch.no_grad():
                y = net(x.clone())
        else:
            with torch.inference_mode():
                y = net(x.clone())
        outs.append(y)
    torch.testing.assert_close(outs[0], outs[1], **TOL)
    for a, b in zip(*grads) if grads else ():
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, **TOL)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **TOL)


@pytest.mark.parametrize("mode", ["train", "eval_no_grad"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: (bnkit.BatchNorm1d(3), torch.randn(6, 3)),
        lambda: (bnkit.BatchNorm1d(3), torch.randn(6, 3, 5)),
        lambda: (bnkit.BatchNorm2d(3), torch.randn(4, 3, 2, 2).to(memory_format=torch.channels_last)),
        lambda: (bnkit.BatchNorm2d(3, affine=False), torch.randn(4, 3, 2, 2)),
        lambda: (bnkit.BatchNorm(3, axis=-1), torch.randn(4, 2, 3)),
    ],
    ids=["NC", "NCL", "nhwc", "no-affine", "axis-1"],
)
def test_output_is_a_fresh_tensor_not_a_view(make, mode):
    """docs/layers.md, "Behaviour you can rely on" (Outputs); docs/kernels.md, "One call per layer": in
    eager mode on CPU, in training and in inference without grad, the output is a fresh tensor, not a
    view. Oracle: the output shares no storage with the input or the layer's tensors, and writing into
    it changes neither."""
    bn, x = make()
    bn.train(mode == "train")
    ref = x.clone()
    if mode == "train":
        y = bn(x)
    else:
        with torch.no_grad():
            y = bn(x)
    assert y._base is None and not y._is_view()
    storages = {t.untyped_storage().data_ptr() for t in [x, *bn.parameters(), *bn.buffers()]}
    assert y.untyped_storage().data_ptr() not in storages
    state = _state(bn)
    with torch.no_grad():
        y.fill_(7.0)
    assert torch.equal(x, ref)
    _assert_state_equal(bn, state)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_batchnorm3d_keeps_channels_last_3d_in_outputs_and_gradients(train):
    """docs/layers.md, "Shape" (BatchNorm3d: any memory format) and docs/differences.md, "The same as
    torch": channels-last inputs give channels-last outputs and gradients. Oracle: torch's BatchNorm3d."""
    torch.manual_seed(0)
    ours, theirs = _twin(3, bnkit.BatchNorm3d, nn.BatchNorm3d)
    x = torch.randn(2, 3, 2, 3, 4).to(memory_format=torch.channels_last_3d)
    grad_out = torch.randn(x.shape).to(memory_format=torch.channels_last_3d)
    res = []
    for bn in (ours, theirs):
        bn.train(train)
        leaf = x.clone().requires_grad_()
        y = bn(leaf)
        y.backward(grad_out)
        res.append((y, leaf.grad))
    (y, g), (yt, gt) = res
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    assert g.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(y, yt, **TOL)
    torch.testing.assert_close(g, gt, **TOL)


@pytest.mark.parametrize("trained", [False, True], ids=["fresh", "trained"])
def test_version1_state_dict_loads_as_in_torch_and_the_counter_starts_at_0(trained):
    """docs/layers.md, "Behaviour you can rely on" (Old checkpoints): a version-1 state_dict without
    num_batches_tracked loads as it does in torch, and the counter starts at 0 (on a fresh layer);
    docs/differences.md, "load_state_dict": a trained layer keeps its count. Oracle: torch's layer."""
    torch.manual_seed(0)
    ours, theirs = _twin(3, bnkit.BatchNorm1d, nn.BatchNorm1d)
    src = nn.BatchNorm1d(3)
    for _ in range(3):
        src(torch.randn(8, 3) + 2)
    if trained:
        x = torch.randn(8, 3)
        for _ in range(2):
            ours(x), theirs(x)
    sd = {k: v for k, v in src.state_dict().items() if k != "num_batches_tracked"}
    sd = type(src.state_dict())(sd)
    sd._metadata = {"": {"version": 1}}
    ours.load_state_dict(copy.copy(sd))
    theirs.load_state_dict(copy.copy(sd))
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == (2 if trained else 0)
    torch.testing.assert_close(ours.running_mean, src.running_mean)
    torch.testing.assert_close(ours.running_var, src.running_var)


def test_one_value_per_channel_in_training_raises_and_leaves_the_state_unchanged():
    """docs/layers.md, "Behaviour you can rely on" (Errors) and docs/differences.md, "Exception types":
    a single value per channel in training raises ValueError with the layer's name, nothing changes
    (torch's layer has already counted the batch). Oracle: torch raises the same type."""
    ours, theirs = _twin(3, bnkit.BatchNorm1d, nn.BatchNorm1d)
    one = torch.randn(1, 3)
    before = _state(ours)
    with pytest.raises(ValueError):
        theirs(one)
    with pytest.raises(ValueError, match=r"BatchNorm1d\(3\)"):
        ours(one)
    assert int(theirs.num_batches_tracked) == 1
    _assert_state_equal(ours, before)


def test_eps_set_to_zero_after_construction_is_rejected_in_training_with_the_state_unchanged():
    """docs/differences.md, "Arguments are checked at construction": an eps set to 0 after
    construction is rejected in training with a ValueError, as torch rejects it; "Exception types":
    before anything changes. Oracle: torch's layer raises ValueError too."""
    ours, theirs = _twin(3, bnkit.BatchNorm2d, nn.BatchNorm2d)
    ours.eps = theirs.eps = 0.0
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError):
        theirs(x)
    before = _state(ours)
    with pytest.raises(ValueError):
        ours(x)
    _assert_state_equal(ours, before)


@pytest.mark.parametrize("momentum", [-0.1, 1.0001, float("nan")])
def test_momentum_outside_0_1_raises_value_error_at_construction(momentum):
    """docs/layers.md, "Args" (momentum in [0, 1]) and docs/differences.md, "Arguments are checked at
    construction": momentum outside [0, 1] is a ValueError; torch accepts it."""
    torch.nn.BatchNorm2d(3, momentum=momentum)
    with pytest.raises(ValueError):
        bnkit.BatchNorm2d(3, momentum=momentum)


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_momentum_at_the_ends_of_0_1_is_accepted_and_matches_torch(momentum):
    """docs/layers.md, "Args": momentum in the closed range [0, 1]. Oracle: torch's layer."""
    ours, theirs = _twin(3, bnkit.BatchNorm1d, nn.BatchNorm1d, momentum=momentum)
    x = torch.randn(16, 3) * 2 + 1
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, **TOL)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **TOL)


def test_nonfinite_raise_raises_floating_point_error_and_changes_nothing():
    """docs/layers.md, "Args" (nonfinite="raise": FloatingPointError, nothing changes); docs/differences.md,
    "A non-finite batch ..."."""
    bn = bnkit.BatchNorm1d(3, nonfinite="raise")
    bn(torch.randn(8, 3))
    before = _state(bn)
    x = torch.randn(8, 3)
    x[2, 1] = float("inf")
    with pytest.raises(FloatingPointError):
        bn(x)
    _assert_state_equal(bn, before)


def test_nonfinite_skip_output_is_torchs_nan_only_in_the_bad_channel_and_the_warning_names_the_layer():
    """docs/differences.md, "A non-finite batch does not poison the running statistics": the output is
    still computed, NaN in the channels whose statistics are not finite, as torch's is; a RuntimeWarning
    names the layer. Oracle: torch's output."""
    ours, theirs = _twin(3, bnkit.BatchNorm1d, nn.BatchNorm1d)
    x = torch.randn(8, 3)
    x[0, 1] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"BatchNorm1d\(3\)"):
        y = ours(x)
    yt = theirs(x)
    assert torch.equal(torch.isnan(y), torch.isnan(yt))
    assert torch.isnan(y[:, 1]).all()
    torch.testing.assert_close(y[:, [0, 2]], yt[:, [0, 2]], **TOL)


def test_share_affine_weight_is_one_scalar_gamma_and_a_bias_per_channel():
    """docs/layers.md, "Args" (share_affine="weight": one scalar gamma, a bias per channel; the statistics
    stay per channel) and "Shape" (parameters of shape (1,) for a shared weight). Oracle: torch's
    F.batch_norm with the scalar gamma expanded."""
    bn = bnkit.BatchNorm2d(3, share_affine="weight")
    assert bn.weight.shape == (1,) and bn.bias.shape == (3,)
    with torch.no_grad():
        bn.weight.fill_(1.7)
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    x = torch.randn(6, 3, 2, 2) * 3 + 1
    rm, rv = torch.zeros(3), torch.ones(3)
    yt = F.batch_norm(x, rm, rv, bn.weight.detach().expand(3), bn.bias.detach(), training=True)
    torch.testing.assert_close(bn(x), yt, **TOL)
    torch.testing.assert_close(bn.running_mean, rm, **TOL)
    torch.testing.assert_close(bn.running_var, rv, **TOL)


def test_affine_bias_false_gives_a_weight_without_a_bias_as_in_torch():
    """docs/layers.md, "Args" (bias keyword: affine=True, bias=False gives a weight without a bias, as in
    torch). Oracle: torch.nn.BatchNorm2d(C, bias=False)."""
    ours, theirs = _twin(3, bnkit.BatchNorm2d, nn.BatchNorm2d, bias=False)
    assert ours.bias is None and theirs.bias is None
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), **TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_with_float32_parameters_match_torch(dtype):
    """docs/layers.md, "Shape" (float16/bfloat16 inputs with float32 parameters and buffers, the statistics
    accumulated in float32); docs/differences.md, "Dtype rules": the output has the input's dtype.
    Oracle: torch's CPU BatchNorm2d, which takes the same mixture."""
    torch.manual_seed(0)
    ours, theirs = _twin(3)
    x = (torch.randn(8, 3, 4, 4) * 2 + 3).to(dtype)
    y, yt = ours(x), theirs(x)
    assert y.dtype == dtype and ours.running_mean.dtype == torch.float32
    torch.testing.assert_close(y.float(), yt.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-4, atol=1e-4)


def test_two_running_buffers_of_different_dtypes_each_keep_their_dtype():
    """docs/differences.md, "Dtype rules": the two running buffers of a half-precision input may differ
    (one bfloat16, one float32); each keeps its dtype. Oracle: the running update by hand in float64."""
    torch.manual_seed(0)
    bn = bnkit.BatchNorm1d(3)
    bn.running_mean = bn.running_mean.bfloat16()
    x = (torch.randn(16, 3) * 2 + 1).bfloat16()
    bn(x)
    assert bn.running_mean.dtype == torch.bfloat16 and bn.running_var.dtype == torch.float32
    xd = x.double()
    torch.testing.assert_close(bn.running_mean.double(), 0.1 * xd.mean(0), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(bn.running_var.double(), 0.9 + 0.1 * xd.var(0), rtol=1e-5, atol=1e-5)


def test_error_message_names_the_layer_and_the_channel_counts():
    """docs/differences.md, "Exception types": a message that names the layer, for example
    `BatchNorm2d(3): expected 3 features along axis 1, got 4 ...`."""
    with pytest.raises(bnkit.ChannelMismatchError, match=r"^BatchNorm2d\(3\): expected 3 features along axis 1, got 4"):
        bnkit.BatchNorm2d(3)(torch.randn(2, 4, 2, 2))


def test_eval_with_a_running_buffer_set_to_none_raises_missing_statistics_error():
    """docs/differences.md, "Exception types": a layer in eval with one of its running buffers set to None
    raises bnkit.MissingStatisticsError (a RuntimeError and a ValueError); torch raises RuntimeError."""
    x = torch.randn(4, 3)
    for name in ("running_mean", "running_var"):
        theirs, ours = nn.BatchNorm1d(3).eval(), bnkit.BatchNorm1d(3).eval()
        setattr(theirs, name, None)
        setattr(ours, name, None)
        with pytest.raises(RuntimeError):
            theirs(x)
        with pytest.raises(bnkit.MissingStatisticsError) as info:
            ours(x)
        assert isinstance(info.value, RuntimeError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_running_buffers_that_are_not_1d_raise_channel_mismatch_before_anything_is_written(train):
    """docs/differences.md, "Exception types": running buffers that are not 1-D ((C, 1)) raise
    bnkit.ChannelMismatchError in both modes, before anything is written."""
    bn = bnkit.BatchNorm1d(3).train(train)
    bn.running_mean = torch.zeros(3, 1)
    bn.running_var = torch.ones(3, 1)
    before = _state(bn)
    with pytest.raises(bnkit.ChannelMismatchError):
        bn(torch.randn(8, 3))
    _assert_state_equal(bn, before)


def test_training_outside_inference_mode_with_inference_buffers_raises_before_any_write():
    """docs/differences.md, "Exception types": a training call outside torch.inference_mode with running
    buffers made inside it raises RuntimeError ("Inplace update to inference tensor outside
    InferenceMode"), raised before any buffer is written."""
    with torch.inference_mode():
        bn = bnkit.BatchNorm1d(3)
    x = torch.randn(8, 3)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(RuntimeError, match="[Ii]nference"):
        bn(x)
    for k, v in before.items():
        assert torch.equal(bn.state_dict()[k], v), k


def _variants():
    return [
        ("BatchNorm2d", bnkit.BatchNorm2d(3), {}),
        ("BatchRenorm2d", bnkit.BatchRenorm2d(3), {}),
        ("GhostBatchNorm2d", bnkit.GhostBatchNorm2d(3, virtual_batch_size=2), {}),
        ("SharedBatchNorm", bnkit.SharedBatchNorm(3, sites=2), {"site": 0}),
        ("DomainBatchNorm2d", bnkit.DomainBatchNorm2d(3, num_domains=2), {"domain": 0}),
        ("FrozenBatchNorm2d", bnkit.FrozenBatchNorm2d(3), {}),
        ("SyncBatchNorm", bnkit.SyncBatchNorm(3), {}),
        ("BatchNorm(axis=-1)", bnkit.BatchNorm(3, axis=1), {}),
    ]


@pytest.mark.parametrize("dtype", [torch.long, torch.bool, torch.complex64])
@pytest.mark.parametrize("n", [4, 0], ids=["nonempty", "empty"])
def test_integer_bool_complex_inputs_raise_input_dtype_error_in_every_layer_and_variant(dtype, n):
    """docs/differences.md, "Exception types": an integer, bool or complex input, empty or not (every bnkit
    layer and variant) raises bnkit.InputDtypeError (a TypeError and a NotImplementedError); "Empty
    inputs": an integer empty input is rejected (TypeError). Nothing changes."""
    x = torch.zeros(n, 3, 2, 2, dtype=dtype)
    for name, layer, kw in _variants():
        for train in (True, False):
            layer.train(train)
            before = _state(layer)
            with pytest.raises(bnkit.InputDtypeError) as info:
                layer(x, **kw)
            assert isinstance(info.value, TypeError) and isinstance(info.value, NotImplementedError), name
            _assert_state_equal(layer, before)


def test_non_tensor_input_raises_type_error_where_torch_raises_attribute_error():
    """docs/differences.md, "Exception types" table: not a tensor -> torch AttributeError, bnkit TypeError."""
    with pytest.raises(AttributeError):
        nn.BatchNorm1d(2)([[1.0, 2.0], [3.0, 4.0]])
    for _, layer, kw in _variants():
        with pytest.raises(TypeError):
            layer([[1.0, 2.0], [3.0, 4.0]], **kw)


def test_empty_batch_gives_a_copy_joined_to_the_graph_with_zero_gradients_and_is_counted():
    """docs/differences.md, "Empty inputs": an input with no elements gives torch's result: a copy of the
    input (joined to the graph of weight and bias, whose gradients are zero), the batch counted in
    num_batches_tracked in training and the statistics untouched. Oracle: torch's layer."""
    ours, theirs = _twin(3)
    x = torch.empty(0, 3, 4, 4, requires_grad=True)
    y, yt = ours(x), theirs(x)
    assert y.shape == yt.shape == x.shape
    assert y.requires_grad == yt.requires_grad
    y.sum().backward()
    yt.sum().backward()
    for a, b in ((ours.weight.grad, theirs.weight.grad), (ours.bias.grad, theirs.bias.grad)):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b) and torch.equal(a, torch.zeros(3))
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 1
    assert torch.equal(ours.running_mean, theirs.running_mean)
    assert torch.equal(ours.running_var, theirs.running_var)


def test_num_batches_tracked_counts_empty_batches_with_a_cumulative_average_as_torch():
    """docs/layers.md, "Math": with momentum=None the factor is 1 / num_batches_tracked, which counts the
    training batches, including empty ones, as torch counts them. Oracle: torch's layer."""
    ours, theirs = _twin(3, bnkit.BatchNorm1d, nn.BatchNorm1d, momentum=None)
    torch.manual_seed(0)
    for x in (torch.randn(8, 3), torch.empty(0, 3), torch.randn(8, 3) + 2, torch.empty(0, 3), torch.randn(4, 3)):
        ours(x), theirs(x)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 5
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, **TOL)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **TOL)


def test_track_running_stats_false_uses_batch_statistics_in_eval():
    """docs/layers.md, "Math": with track_running_stats=False there are no buffers, and the batch
    statistics are used in eval mode too. Oracle: torch's layer."""
    ours, theirs = _twin(3, track_running_stats=False)
    assert ours.running_mean is None and ours.num_batches_tracked is None
    ours.eval(), theirs.eval()
    x = torch.randn(4, 3, 2, 2) * 3 + 1
    torch.testing.assert_close(ours(x), theirs(x), **TOL)


def test_lazy_layer_without_tensors_records_the_number_of_features():
    """docs/differences.md, "Lazy layers": a lazy layer with no tensors (affine=False,
    track_running_stats=False) records the number of features it saw (torch's keeps 0). Oracle: torch's
    lazy layer for the output."""
    ours = bnkit.LazyBatchNorm2d(affine=False, track_running_stats=False)
    theirs = nn.LazyBatchNorm2d(affine=False, track_running_stats=False)
    x = torch.randn(4, 5, 2, 2)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    assert ours.num_features == 5 and theirs.num_features == 0


# ----------------------------------------------------------------------------------------- conversion


def test_convert_to_torch_refuses_before_anything_changes_even_inplace():
    """docs/differences.md, "Conversion": a bnkit layer that torch cannot express raises ValueError before
    anything changes. Oracle: the model's classes and state before the call."""
    model = nn.Sequential(bnkit.BatchNorm2d(3), nn.ReLU(), bnkit.BatchNorm2d(3, share_affine="weight"))
    before = _state(model)
    with pytest.raises(ValueError):
        bnkit.convert(model, to="torch", inplace=True)
    assert type(model[0]) is bnkit.BatchNorm2d and type(model[2]) is bnkit.BatchNorm2d
    _assert_state_equal(model, before)


def test_convert_to_torch_leaves_variants_and_syncbn_as_they_are():
    """docs/differences.md, "Conversion": subclasses (the variants, SyncBatchNorm) are left as they are."""
    model = nn.Sequential(bnkit.GhostBatchNorm2d(3), bnkit.BatchRenorm2d(3), bnkit.SyncBatchNorm(3),
                          bnkit.BatchNorm2d(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = bnkit.convert(model, to="torch")
    assert [type(m) for m in out] == [bnkit.GhostBatchNorm2d, bnkit.BatchRenorm2d, bnkit.SyncBatchNorm,
                                      nn.BatchNorm2d]


def test_convert_takes_over_the_same_tensors_flags_hooks_eps_and_momentum():
    """docs/deployment.md, "convert": the new layers take over the same parameter and buffer objects
    (num_batches_tracked included), the training flags, hooks, eps and momentum; the outputs and
    state_dict are equal and a torch-to-bnkit-to-torch round trip is exact. Oracle: the torch model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1e-3, momentum=0.3), nn.BatchNorm2d(4))
    model(torch.randn(4, 3, 6, 6))
    model[2].eval()
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(type(m)))
    tensors = {k: getattr(model[1], k) for k in ("weight", "bias", "running_mean", "running_var",
                                                  "num_batches_tracked")}
    ref = copy.deepcopy(model)
    ref_state = _state(ref)
    ours = bnkit.convert(model, inplace=True)
    _assert_state_equal(ours, ref_state)
    assert type(ours[1]) is bnkit.BatchNorm2d
    for k, t in tensors.items():
        assert getattr(ours[1], k) is t, k
    assert ours[1].training and not ours[2].training
    assert ours[1].eps == 1e-3 and ours[1].momentum == 0.3
    x = torch.randn(4, 3, 6, 6)
    expected = ref(x)
    seen.clear()
    torch.testing.assert_close(ours(x), expected, **TOL)
    assert seen == [bnkit.BatchNorm2d]
    snapshot = _state(ours)
    back = bnkit.convert(ours, to="torch", inplace=True)
    assert type(back[1]) is nn.BatchNorm2d and back[1].weight is tensors["weight"]
    _assert_state_equal(back, snapshot)


def test_convert_bias_false_becomes_a_torch_layer_without_bias_and_back():
    """docs/deployment.md, "convert": a layer with bias=False becomes a torch layer whose bias is None, as
    torch.nn.BatchNorm2d(C, bias=False) makes it (no bias key either), and such a torch layer converts
    back."""
    ours = bnkit.BatchNorm2d(3, bias=False)
    t = bnkit.convert(nn.Sequential(ours), to="torch")[0]
    assert type(t) is nn.BatchNorm2d and t.bias is None
    assert t.state_dict().keys() == nn.BatchNorm2d(3, bias=False).state_dict().keys()
    b = bnkit.convert(nn.Sequential(nn.BatchNorm2d(3, bias=False)))[0]
    assert type(b) is bnkit.BatchNorm2d and b.bias is None
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(b(x), nn.BatchNorm2d(3, bias=False)(x), **TOL)


def test_convert_drops_nonfinite_and_tiny_batch_going_to_torch():
    """docs/differences.md, "Conversion": to="torch" drops the nonfinite policy and tiny_batch (torch
    raises on a one-value batch); to="bnkit" gives the default nonfinite="skip"."""
    ours = bnkit.BatchNorm1d(3, nonfinite="raise", tiny_batch="running")
    t = bnkit.convert(nn.Sequential(ours), to="torch")[0]
    assert type(t) is nn.BatchNorm1d
    with pytest.raises(ValueError):
        t(torch.randn(1, 3))
    assert bnkit.convert(nn.Sequential(nn.BatchNorm1d(3)))[0].nonfinite == "skip"


# ------------------------------------------------------------------------------ recalibrate / update_bn


def test_update_bn_resets_and_averages_bnkit_drop_ins_as_torch_layers():
    """docs/differences.md, "PreciseBN versus update_bn": update_bn finds bnkit's BatchNorm1d/2d/3d (subclasses
    of torch's classes) and resets and averages them as torch's layers. Oracle: update_bn on the same model with
    torch's layers only."""
    from torch.optim.swa_utils import update_bn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), bnkit.BatchNorm1d(4))
    model(torch.randn(8, 3))
    oracle = bnkit.convert(copy.deepcopy(model), to="torch")
    assert type(oracle[3]) is nn.BatchNorm1d
    loader = [torch.randn(16, 3) * 2 + 1 for _ in range(4)]
    update_bn(loader, model)
    update_bn(loader, oracle)
    for i in (1, 3):
        torch.testing.assert_close(model[i].running_mean, oracle[i].running_mean, **TOL)
        torch.testing.assert_close(model[i].running_var, oracle[i].running_var, **TOL)
        assert int(model[i].num_batches_tracked) == int(oracle[i].num_batches_tracked) == 4
        assert model[i].momentum == 0.1


def test_recalibrate_runs_other_modules_in_eval_and_restores_flags_momenta_and_count():
    """docs/deployment.md, "recalibrate" and docs/differences.md, "PreciseBN versus update_bn": every
    non-BN module in eval mode (dropout off), the training flags and momenta restored, num_batches_tracked
    left as it was, frozen layers left alone. Oracle: float64 statistics of the BN inputs computed with
    dropout off."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Dropout(0.5), bnkit.BatchNorm1d(6, momentum=0.3),
                          bnkit.FrozenBatchNorm1d(6)).train()
    model[2](torch.randn(8, 6))
    model[2].eval()
    frozen_before = _state(model[3])
    data = [torch.randn(16, 3) + 1 for _ in range(3)]
    bnkit.recalibrate(model, data)
    with torch.no_grad():
        feats = torch.cat([model[0](x) for x in data]).double()
    torch.testing.assert_close(model[2].running_mean.double(), feats.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model[2].running_var.double(), feats.var(0), rtol=1e-5, atol=1e-6)
    assert model.training and model[1].training and not model[2].training
    assert model[2].momentum == 0.3 and int(model[2].num_batches_tracked) == 1
    _assert_state_equal(model[3], frozen_before)


def test_recalibrate_with_too_few_batches_raises_not_enough_batches_and_changes_nothing():
    """docs/training-loops.md, "Population statistics": num_batches=K raises bnkit.NotEnoughBatchesError (a
    ValueError, saying how many it saw, with nothing changed) when the data has fewer."""
    model = nn.Sequential(nn.Linear(3, 4), bnkit.BatchNorm1d(4), nn.BatchNorm1d(4))
    model(torch.randn(8, 3))
    before = _state(model)
    with pytest.raises(bnkit.NotEnoughBatchesError, match="2") as info:
        bnkit.recalibrate(model, [torch.randn(8, 3), torch.randn(8, 3)], num_batches=5)
    assert isinstance(info.value, ValueError)
    _assert_state_equal(model, before)


# ------------------------------------------------------------------------------------------- variants.md


def test_batchrenorm_schedule_grows_linearly_after_the_warmup():
    """docs/variants.md, "BatchRenorm": r_max and d_max stay at 1 and 0 for warmup_steps steps, then grow
    linearly, reaching their final values at r_max_steps and d_max_steps; the step is
    num_batches_tracked. Oracle: the linear ramp written out by hand."""
    layer = bnkit.BatchRenorm1d(2, r_max=3.0, d_max=5.0, warmup_steps=10, r_max_steps=30, d_max_steps=20)
    for step in (0, 5, 10, 15, 20, 25, 30, 100):
        layer.num_batches_tracked.fill_(step)
        fr = min(max((step - 10) / 20, 0.0), 1.0)
        fd = min(max((step - 10) / 10, 0.0), 1.0)
        r, d = layer.limits()
        assert r == pytest.approx(1 + 2 * fr) and d == pytest.approx(5 * fd), step


def test_batchrenorm_with_r_max_1_d_max_0_is_exactly_batchnorm_and_momentum_defaults_to_0_01():
    """docs/variants.md, "BatchRenorm": with r_max=1, d_max=0 the layer is exactly BatchNorm; momentum
    defaults to 0.01; eval is plain BN with the moving averages. Oracle: torch's BatchNorm2d(momentum=0.01)."""
    torch.manual_seed(0)
    ours = bnkit.BatchRenorm2d(3, r_max=1.0, d_max=0.0, schedule="fixed")
    assert ours.momentum == 0.01
    theirs = nn.BatchNorm2d(3, momentum=0.01)
    for _ in range(3):
        x = torch.randn(6, 3, 2, 2) * 2 + 1
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, yt = ours(xa), theirs(xb)
        g = torch.randn_like(y)
        y.backward(g), yt.backward(g)
        torch.testing.assert_close(y, yt, **TOL)
        torch.testing.assert_close(xa.grad, xb.grad, **TOL)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **TOL)
    ours.eval(), theirs.eval()
    x = torch.randn(2, 3, 2, 2)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)


def test_ghost_batchnorm_normalizes_a_final_smaller_chunk_on_its_own_and_updates_from_the_whole_batch():
    """docs/variants.md, "GhostBatchNorm": a final smaller chunk is normalized on its own; the running
    statistics are updated once per call from the statistics of the whole batch. Oracle: torch's BN per
    chunk (outputs) and on the whole batch (running statistics)."""
    torch.manual_seed(0)
    ghost = bnkit.GhostBatchNorm1d(3, virtual_batch_size=4)
    x = torch.randn(10, 3) * 2 + 1
    y = ghost(x)
    parts = [F.batch_norm(c, None, None, training=True) for c in x.split(4)]
    torch.testing.assert_close(y, torch.cat(parts), **TOL)
    whole = nn.BatchNorm1d(3, affine=False)
    whole(x)
    assert int(ghost.num_batches_tracked) == 1
    torch.testing.assert_close(ghost.running_mean, whole.running_mean, **TOL)
    torch.testing.assert_close(ghost.running_var, whole.running_var, **TOL)


def test_ghost_batchnorm_with_a_virtual_batch_at_least_n_is_exactly_batchnorm():
    """docs/variants.md, "GhostBatchNorm": with virtual_batch_size >= N it is exactly BatchNorm. Oracle:
    torch's BatchNorm2d (outputs, gradients, running statistics)."""
    ours = bnkit.GhostBatchNorm2d(3, virtual_batch_size=16)
    theirs = nn.BatchNorm2d(3)
    x = torch.randn(8, 3, 2, 2) * 2 + 1
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, yt = ours(xa), theirs(xb)
    g = torch.randn_like(y)
    y.backward(g), yt.backward(g)
    torch.testing.assert_close(y, yt, **TOL)
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **TOL)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **TOL)


def test_ghost_batchnorm_feature_axis_cannot_be_0():
    """docs/variants.md, "GhostBatchNorm": Ghost BN splits dim 0, so the feature axis cannot be 0."""
    with pytest.raises(ValueError):
        bnkit.GhostBatchNorm(3, axis=0)


def test_shared_batchnorm_counts_per_site_and_site_may_be_omitted_when_it_is_unambiguous():
    """docs/variants.md, "SharedBatchNorm": num_batches_tracked is kept per site (shape [sites]); site may be
    omitted when sites == 1 or share_stats=True; running statistics per site. Oracle: one torch BN per site."""
    torch.manual_seed(0)
    shared = bnkit.SharedBatchNorm(3, sites=2)
    oracles = [nn.BatchNorm1d(3), nn.BatchNorm1d(3)]
    xs = [torch.randn(8, 3), torch.randn(8, 3) * 3 + 1, torch.randn(8, 3) - 1]
    for x, site in zip(xs, (0, 1, 1)):
        torch.testing.assert_close(shared(x, site=site), oracles[site](x), **TOL)
    assert shared.num_batches_tracked.shape == (2,) and shared.num_batches_tracked.tolist() == [1, 2]
    for s in (0, 1):
        torch.testing.assert_close(shared.running_mean[s], oracles[s].running_mean, **TOL)
    x = torch.randn(8, 3)
    for layer in (bnkit.SharedBatchNorm(3, sites=1), bnkit.SharedBatchNorm(3, sites=3, share_stats=True)):
        torch.testing.assert_close(layer(x), F.batch_norm(x, None, None, training=True), **TOL)


def test_freeze_moves_hooks_to_the_replacement_and_keeps_a_shared_layer_one_layer():
    """docs/variants.md, "freeze / unfreeze": hooks on a BN layer follow it to its replacement; a layer used
    twice stays one layer; same values and state_dict keys. Oracle: the eval-mode model before freezing."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4)
    bn(torch.randn(8, 4) + 1)
    model = nn.Sequential(nn.Linear(4, 4), bn, nn.Linear(4, 4), bn).eval()
    calls = []
    bn.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    x = torch.randn(3, 4)
    expected = model(x)
    keys = model.state_dict().keys()
    calls.clear()
    bnkit.freeze(model)
    assert model[1] is model[3] and isinstance(model[1], bnkit.FrozenBatchNorm)
    torch.testing.assert_close(model(x), expected, **TOL)
    assert calls == [type(model[1]).__name__] * 2
    assert model.state_dict().keys() == keys


def test_freeze_refuses_layers_without_running_statistics_and_changes_nothing():
    """docs/variants.md, "freeze / unfreeze": freeze refuses layers without running statistics, and then
    changes nothing (a convertible layer before it stays as it was)."""
    model = nn.Sequential(nn.BatchNorm1d(4), nn.BatchNorm1d(4, track_running_stats=False))
    first = model[0]
    with pytest.raises(ValueError):
        bnkit.freeze(model)
    assert model[0] is first and type(model[1]) is nn.BatchNorm1d


def test_unfreeze_gives_fresh_parameters_holding_the_current_values():
    """docs/variants.md, "freeze / unfreeze": unfreeze rebuilds the original class and arguments; gamma and
    beta become fresh nn.Parameter objects that hold the current values."""
    bn = bnkit.BatchNorm2d(3, eps=1e-3, momentum=0.2)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
    w = bn.weight.detach().clone()
    model = bnkit.freeze(nn.Sequential(bn))
    back = bnkit.unfreeze(model)[0]
    assert type(back) is bnkit.BatchNorm2d and back.eps == 1e-3 and back.momentum == 0.2
    assert isinstance(back.weight, nn.Parameter) and back.weight is not bn.weight
    assert torch.equal(back.weight.detach(), w)


# ------------------------------------------------------------------------------------- training-loops.md


def test_preserve_stats_restores_every_buffer_bitwise_on_an_exception():
    """docs/training-loops.md, "Forwards that must not count": on exit, normal or by an exception, every
    buffer of every BN layer is bitwise what it was at entry; nested blocks restore their own entry state."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), bnkit.BatchRenorm1d(4), bnkit.BatchNorm1d(4))
    model(torch.randn(8, 3))
    before = _state(model)
    with pytest.raises(KeyError):
        with bnkit.preserve_stats(model):
            model(torch.randn(8, 3))
            with bnkit.preserve_stats(model):
                model(torch.randn(8, 3))
            mid = _state(model)
            model(torch.randn(8, 3))
            raise KeyError("boom")
    _assert_state_equal(model, before)
    assert any(not torch.equal(mid[k], before[k]) for k in before)


def test_accumulate_stats_applies_nothing_on_an_exception():
    """docs/training-loops.md, "Gradient accumulation": on an exception nothing is applied and every BN
    buffer is as at entry."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), bnkit.BatchNorm1d(4))
    model(torch.randn(8, 3))
    before = _state(model)
    with pytest.raises(KeyError):
        with bnkit.accumulate_stats(model):
            model(torch.randn(8, 3))
            model(torch.randn(8, 3))
            raise KeyError("boom")
    _assert_state_equal(model, before)


def test_accumulate_stats_with_a_cumulative_average_counts_the_step_once_and_skips_eval_forwards():
    """docs/training-loops.md, "Gradient accumulation": one update from the exact merge, with momentum=None
    the cumulative average counts the step once; eval-mode forwards are not counted. Oracle: torch's
    layer (momentum=None) on the concatenated micro-batches."""
    torch.manual_seed(0)
    ours, theirs = _twin(4, bnkit.BatchNorm1d, nn.BatchNorm1d, momentum=None)
    first = torch.randn(8, 4)
    ours(first), theirs(first)
    micro = [torch.randn(6, 4) * 2 + 1 for _ in range(3)]
    with bnkit.accumulate_stats(ours):
        for x in micro:
            ours(x)
        ours.eval()
        ours(torch.randn(6, 4) + 10)
        ours.train()
    theirs(torch.cat(micro))
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 2
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, **TOL)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **TOL)


def test_tiny_batch_running_on_batchrenorm_normalizes_with_the_running_statistics():
    """docs/training-loops.md, "A batch of one" and docs/differences.md, "Options torch does not have":
    with tiny_batch="running" (on BatchNorm* and BatchRenorm*) a batch of one value per channel is
    normalized with the running statistics, as in eval, without updating them or num_batches_tracked, and
    one RuntimeWarning says so. Oracle: the same layer in eval mode."""
    layer = bnkit.BatchRenorm1d(3, tiny_batch="running", schedule="fixed")
    layer(torch.randn(16, 3) * 2 + 1)
    before = _state(layer)
    one = torch.randn(1, 3)
    with pytest.warns(RuntimeWarning) as record:
        y = layer(one)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    _assert_state_equal(layer, before)
    expected = copy.deepcopy(layer).eval()(one)
    torch.testing.assert_close(y, expected, **TOL)


def test_checkpointed_bnkit_layers_give_bitwise_the_buffers_and_gradients_of_no_checkpointing():
    """docs/training-loops.md, "Activation checkpointing": bnkit's layers need no change: outputs, gradients
    and buffers are bitwise those of the same step without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(4, 8), bnkit.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8),
                         bnkit.BatchRenorm1d(8, schedule="fixed", momentum=0.1))
    x = torch.randn(16, 4)
    for use_reentrant in (True, False):
        plain, ckpt = copy.deepcopy(body), copy.deepcopy(body)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        for _ in range(2):
            plain(xa).square().sum().backward()
            checkpoint(ckpt, xb, use_reentrant=use_reentrant).square().sum().backward()
        assert torch.equal(xa.grad, xb.grad)
        for (k, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
            assert torch.equal(p.grad, q.grad), k
        _assert_state_equal(ckpt, _state(plain))


def test_masked_bn_rejects_bad_masks_before_anything_changes():
    """docs/training-loops.md, "Padded sequences": a mask of the wrong shape or not torch.bool raises
    (ValueError, TypeError) before anything changes."""
    bn = bnkit.BatchNorm(4, axis=-1)
    x = torch.randn(3, 5, 4)
    before = _state(bn)
    with pytest.raises(ValueError):
        bn(x, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(TypeError):
        bn(x, torch.ones(3, 5))
    _assert_state_equal(bn, before)


def test_masked_bn_all_padding_is_an_empty_batch_with_output_bias_and_eval_ignores_the_mask():
    """docs/training-loops.md, "Padded sequences": a batch without any valid entry is an empty batch: the
    running statistics are not updated, num_batches_tracked counts it, the output is bias; eval mode ignores
    the mask. Oracle: bias by hand, and the same layer in eval without a mask."""
    bn = bnkit.BatchNorm(4, axis=-1)
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([1.0, -2.0, 3.0, 0.5]))
    x = torch.randn(3, 5, 4)
    y = bn(x, torch.zeros(3, 5, dtype=torch.bool))
    assert int(bn.num_batches_tracked) == 1
    assert torch.equal(bn.running_mean, torch.zeros(4)) and torch.equal(bn.running_var, torch.ones(4))
    torch.testing.assert_close(y, bn.bias.detach().expand_as(x))
    bn.eval()
    mask = torch.rand(3, 5) > 0.5
    torch.testing.assert_close(bn(x, mask), bn(x))


def test_masked_bn_without_running_statistics_uses_masked_batch_statistics_in_eval():
    """docs/training-loops.md, "Padded sequences": a layer without running statistics
    (track_running_stats=False) normalizes with masked batch statistics in eval too. Oracle: torch's BN
    over the valid rows alone."""
    torch.manual_seed(0)
    bn = bnkit.BatchNorm(4, axis=-1, track_running_stats=False).eval()
    x = torch.randn(3, 5, 4) * 2 + 1
    mask = torch.arange(5) < torch.tensor([[5], [2], [3]])
    y = bn(x, mask)
    torch.testing.assert_close(y[mask], F.batch_norm(x[mask], None, None, training=True), **TOL)


def test_frozen_layers_check_the_mask_and_ignore_it():
    """docs/training-loops.md, "Padded sequences": frozen layers check the mask and ignore it."""
    frozen = bnkit.FrozenBatchNorm1d(4)
    with torch.no_grad():
        frozen.running_mean.uniform_(-1, 1)
    x = torch.randn(3, 4, 5)
    mask = torch.rand(3, 5) > 0.5
    torch.testing.assert_close(frozen(x, mask), frozen(x))
    with pytest.raises(ValueError):
        frozen(x, torch.ones(3, 4, dtype=torch.bool))


# ----------------------------------------------------------------------------------------- functional.md


def test_moments_over_no_axes_gives_each_value_as_its_mean_and_zero_variance():
    """docs/functional.md, "TF-style": over no axes (axes=[]) each value is its own mean and the variance
    is zero."""
    x = torch.randn(3, 4, 2)
    mean, var = BF.moments(x, axes=[])
    assert torch.equal(mean, x) and torch.equal(var, torch.zeros_like(x))


def test_moments_matches_a_float64_reference():
    """docs/functional.md, "TF-style": moments(x, axes, keepdims, correction) gives (mean, variance) over
    axes, like tf.nn.moments. Oracle: NumPy float64."""
    x = (torch.randn(16, 3, 5) * 0.1 + 1e3).float()
    mean, var = BF.moments(x, axes=[0, 2], keepdims=True, correction=1)
    xn = x.double().numpy()
    np.testing.assert_allclose(mean.numpy(), xn.mean(axis=(0, 2), keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(var.numpy(), xn.var(axis=(0, 2), keepdims=True, ddof=1), rtol=1e-3)


def test_fold_is_differentiable_in_every_input():
    """docs/functional.md, "TF-style": fold(mean, var, weight, bias, eps) is differentiable in every input.
    Oracle: gradcheck (finite differences)."""
    args = [torch.randn(3, dtype=torch.float64, requires_grad=True),
            torch.rand(3, dtype=torch.float64).add(0.5).requires_grad_(),
            torch.randn(3, dtype=torch.float64, requires_grad=True),
            torch.randn(3, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(lambda m, v, w, b: BF.fold(m, v, w, b, 1e-5), args)


def test_canonical_view_makes_no_copy_when_the_feature_axis_is_innermost():
    """docs/functional.md, "The canonical view": no copy when the feature axis is the innermost dense
    dimension; the inverse restores the original memory format."""
    x = torch.randn(2, 4, 5, 3)
    x3, restore = BF.canonical_view(x, 3)
    assert x3.shape == (40, 3, 1) and x3.data_ptr() == x.data_ptr()
    assert torch.equal(restore(x3), x)
    v = torch.randn(2, 3, 2, 4, 5).to(memory_format=torch.channels_last_3d)
    v3, restore = BF.canonical_view(v, 1)
    assert v3.shape == (80, 3, 1) and v3.data_ptr() == v.data_ptr()
    assert restore(v3).is_contiguous(memory_format=torch.channels_last_3d) and torch.equal(restore(v3), v)


def test_canonical_view_takes_a_negative_axis_as_the_layers_do():
    """docs/functional.md, "The canonical view": canonical_view(x, axis), the view the layers use; the layers
    take negative axes (docs/layers.md, "Args": negative values count from the end). Oracle: the same call
    with the equivalent positive axis."""
    x = torch.randn(2, 4, 5, 3)
    want, _ = BF.canonical_view(x, 3)
    got, restore = BF.canonical_view(x, -1)
    assert got.shape == want.shape and torch.equal(got, want)
    assert torch.equal(restore(got), x)


def test_batch_norm_step_mutates_nothing_and_bn_state_returns_the_layers_own_tensors():
    """docs/functional.md, "batch_norm_step": nothing is mutated; bn_state(module) reads a layer's state (its
    own tensors, not copies); load_bn_state writes one back, checked first. Oracle: the layer's own call."""
    from bnkit.functional import batch_norm_step, bn_state, load_bn_state

    layer = bnkit.BatchNorm1d(3)
    st = bn_state(layer)
    assert st["running_mean"] is layer.running_mean and st["num_batches_tracked"] is layer.num_batches_tracked
    state = {k: v.clone() for k, v in st.items()}
    frozen = {k: v.clone() for k, v in state.items()}
    x = torch.randn(8, 3)
    params = {"weight": layer.weight, "bias": layer.bias}
    y, new = batch_norm_step(x, params, state, training=True, nonfinite=layer.nonfinite)
    for k, v in frozen.items():
        assert torch.equal(state[k], v), k
    before = _state(layer)
    torch.testing.assert_close(y, copy.deepcopy(layer)(x))
    _assert_state_equal(layer, before)
    bad = dict(new, running_var=torch.ones(4))
    with pytest.raises((ValueError, RuntimeError)):
        load_bn_state(layer, bad)
    _assert_state_equal(layer, before)


def test_vmap_training_with_one_unbatched_buffer_raises_naming_batch_norm_step_and_changes_nothing():
    """docs/functional.md, "Transforms": vmap in training with one unbatched buffer and batch statistics
    that differ per mapped sample: a RuntimeError that names batch_norm_step; nothing is changed."""
    from torch.func import vmap

    layer = bnkit.BatchNorm1d(3)
    before = _state(layer)
    with pytest.raises(RuntimeError, match="batch_norm_step"):
        vmap(layer)(torch.randn(4, 8, 3))
    _assert_state_equal(layer, before)


def test_integrations_func_replace_all_batch_norm_modules_handles_bnkit_and_torch_layers():
    """docs/functional.md, "Transforms": bnkit.integrations.func.replace_all_batch_norm_modules_(model) does
    what torch's does (every BN stops tracking running statistics) for torch's and bnkit's layers, so vmap
    in training works. Oracle: torch's function on the torch-only twin."""
    from torch.func import replace_all_batch_norm_modules_ as torch_replace
    from torch.func import vmap

    from bnkit.integrations.func import replace_all_batch_norm_modules_

    model = nn.Sequential(nn.Linear(3, 4), bnkit.BatchNorm1d(4), nn.BatchNorm1d(4))
    twin = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4))
    twin.load_state_dict(model.state_dict())
    replace_all_batch_norm_modules_(model)
    torch_replace(twin)
    for m in (model[1], model[2]):
        assert m.running_mean is None and m.running_var is None and not m.track_running_stats
    xs = torch.randn(5, 8, 3)
    torch.testing.assert_close(vmap(model)(xs), vmap(twin)(xs), **TOL)


# ---------------------------------------------------------------------------------------------- sync.md


def test_syncbatchnorm_without_a_process_group_is_exactly_batchnorm():
    """docs/sync.md, "How it works": no process group, a world of one, or eval(): no communication, and the
    layer is exactly bnkit.BatchNorm, with the same buffers and state_dict. Oracle: torch's BatchNorm2d."""
    sync = bnkit.SyncBatchNorm(3)
    theirs = nn.BatchNorm2d(3)
    assert sync.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(4, 3, 2, 2) * 2 + 1
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, yt = sync(xa), theirs(xb)
    (y * y).sum().backward()
    (yt * yt).sum().backward()
    torch.testing.assert_close(y, yt, **TOL)
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)
    torch.testing.assert_close(sync.running_var, theirs.running_var, **TOL)


@pytest.mark.parametrize("bad", [lambda: bnkit.BatchNorm2d(3, convention="keras"),
                                 lambda: bnkit.BatchNorm2d(3, tiny_batch="running")], ids=["keras", "tiny"])
def test_convert_sync_batchnorm_refuses_unsyncable_layers_and_leaves_the_model_as_it_was(bad):
    """docs/sync.md, "Conversion": every layer is checked before any is converted: a layer that cannot be
    synchronized (convention="keras" or a tiny_batch policy) raises ValueError and leaves the model as it
    was."""
    model = nn.Sequential(nn.BatchNorm2d(3), bad())
    first = model[0]
    with pytest.raises(ValueError):
        bnkit.convert_sync_batchnorm(model)
    assert model[0] is first and type(model[0]) is nn.BatchNorm2d and type(model[1]) is bnkit.BatchNorm2d


def test_convert_sync_batchnorm_keeps_the_tensors_and_the_training_flag():
    """docs/sync.md, "Conversion": the new layers keep the same parameter and buffer tensors, the training
    flag and the input-rank checks; revert=True restores the original classes."""
    model = nn.Sequential(nn.BatchNorm1d(3).eval(), bnkit.BatchNorm2d(3))
    tensors = [(m.weight, m.running_mean) for m in model]
    out = bnkit.convert_sync_batchnorm(model)
    assert all(isinstance(m, bnkit.SyncBatchNorm) for m in out)
    assert [(m.weight, m.running_mean) for m in out] == tensors
    assert not out[0].training and out[1].training
    with pytest.raises(ValueError):
        out[0](torch.randn(2, 3, 2, 2))
    back = bnkit.convert_sync_batchnorm(out, revert=True)
    assert type(back[0]) is nn.BatchNorm1d and type(back[1]) is bnkit.BatchNorm2d


# -------------------------------------------------------------------------------------- acceleration.md


def test_accelerate_rejects_a_non_bool_and_accelerated_restores_on_error():
    """docs/acceleration.md, API table: accelerate(on) raises TypeError for a non-bool; accelerated()
    restores the previous state on exit, also on error."""
    state = bnkit.is_accelerated()
    with pytest.raises(TypeError):
        bnkit.accelerate(1)
    assert bnkit.is_accelerated() == state
    if not bnkit.kernels.cpp_available():
        pytest.skip("C++ kernels unavailable")
    with pytest.raises(KeyError):
        with bnkit.accelerated():
            assert bnkit.is_accelerated()
            raise KeyError("boom")
    assert bnkit.is_accelerated() == state


def test_accelerated_torch_layers_match_torch_in_training_and_eval():
    """docs/acceleration.md: while it is on, torch's own BN layers run with torch's semantics (outputs,
    gradients, running statistics and num_batches_tracked, to float rounding). Oracle: the same layer with
    it off."""
    if not bnkit.kernels.cpp_available():
        pytest.skip("C++ kernels unavailable")
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(3, momentum=None)
    acc = copy.deepcopy(ref)
    x = (torch.randn(4, 3, 5, 5) * 2 + 1).to(memory_format=torch.channels_last)
    g = torch.randn_like(x)
    out = []
    for layer, on in ((ref, False), (acc, True)):
        with bnkit.accelerated(on):
            res = []
            for train in (True, True, False):
                layer.train(train)
                leaf = x.clone().requires_grad_()
                y = layer(leaf)
                y.backward(g)
                res.append((y, leaf.grad))
            out.append(res)
    for (y, gx), (ya, gxa) in zip(*out):
        torch.testing.assert_close(ya, y, **TOL)
        torch.testing.assert_close(gxa, gx, **TOL)
        assert ya.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(acc.running_var, ref.running_var, **TOL)
    assert int(acc.num_batches_tracked) == int(ref.num_batches_tracked) == 2


# -------------------------------------------------------------------------------------- adaptation.md


def test_adapt_prior_mixes_source_and_target_statistics_by_counts():
    """docs/adaptation.md, "bnkit.adapt" (mode="prior"): mu = N/(N+n) mu_source + n/(N+n) mu_target, the
    variance likewise, with N = prior and n the number of target samples; num_batches_tracked, momenta and
    training flags are left as they were. Oracle: the formula by hand on float64 statistics."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3, momentum=0.2)
    bn(torch.randn(32, 3))
    bn.eval()
    src_mean, src_var = bn.running_mean.clone().double(), bn.running_var.clone().double()
    target = torch.randn(8, 3) * 3 + 1
    handle = bnkit.adapt(bn, [target], mode="prior", prior=8)
    t = target.double()
    w = 8 / 16
    torch.testing.assert_close(bn.running_mean.double(), w * src_mean + w * t.mean(0), rtol=1e-5, atol=1e-5)
    # the docs say "the variance likewise": accept the unbiased or the biased target variance
    unbiased, biased = w * src_var + w * t.var(0), w * src_var + w * t.var(0, correction=0)
    got = bn.running_var.double()
    assert torch.allclose(got, unbiased, rtol=1e-5) or torch.allclose(got, biased, rtol=1e-5)
    assert int(bn.num_batches_tracked) == 1 and bn.momentum == 0.2 and not bn.training
    handle.restore()
    assert torch.equal(bn.running_mean, src_mean.float())


def test_adapt_prior_zero_uses_the_target_statistics_alone():
    """docs/adaptation.md, "bnkit.adapt": prior=0 uses the target statistics alone. Oracle: the target's
    mean and variance in float64."""
    bn = nn.BatchNorm1d(3)
    bn(torch.randn(32, 3))
    bn.eval()
    target = torch.randn(16, 3) * 3 + 1
    with bnkit.adapt(bn, [target], mode="prior", prior=0):
        torch.testing.assert_close(bn.running_mean.double(), target.double().mean(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("code", ["nonfinite", "negative_var", "never_updated", "no_running_stats",
                                  "eval_in_train", "tiny_var"])
def test_inspect_reports_each_documented_finding(code):
    """docs/adaptation.md, "bnkit.inspect": the findings table (nonfinite, negative_var, tiny_var,
    never_updated, no_running_stats, eval_in_train), each on a model built to have it; nothing changes."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model(torch.randn(8, 3))
    model.eval()
    bn = model[1]
    if code == "nonfinite":
        bn.running_mean[0] = float("nan")
    elif code == "negative_var":
        bn.running_var[1] = -0.5
    elif code == "tiny_var":
        bn.running_var[1] = 1e-8
    elif code == "never_updated":
        model[1] = nn.BatchNorm1d(4).eval()
    elif code == "no_running_stats":
        model[1] = nn.BatchNorm1d(4, track_running_stats=False)
    elif code == "eval_in_train":
        model.train()
        model[1].eval()
    before = _state(model)
    report = bnkit.inspect(model)
    assert code in report.codes()
    _assert_state_equal(model, before)


def test_domain_bn_without_a_domain_raises_type_error_unless_single_domain():
    """docs/adaptation.md, "Per-domain BN": a call without domain= and without a current domain is a
    TypeError (unless the layer has a single domain). Oracle for the single domain: torch's BN."""
    layer = bnkit.DomainBatchNorm2d(3, num_domains=2)
    before = _state(layer)
    with pytest.raises(TypeError):
        layer(torch.randn(4, 3, 2, 2))
    _assert_state_equal(layer, before)
    single = bnkit.DomainBatchNorm2d(3, num_domains=1)
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(single(x), nn.BatchNorm2d(3)(x), **TOL)


def test_domain_bn_bad_domains_raise_with_the_state_unchanged():
    """docs/adaptation.md, "Per-domain BN": bad domain values (out of range, a float or bool tensor, a tensor
    not of shape (N,)) raise IndexError/TypeError/ValueError with the layer's name, state unchanged."""
    layer = bnkit.DomainBatchNorm2d(3, num_domains=2)
    x = torch.randn(4, 3, 2, 2)
    before = _state(layer)
    for d, err in ((2, IndexError), (torch.tensor([0, 1, 2, 0]), IndexError),
                   (torch.tensor([0.0, 1.0, 0.0, 1.0]), TypeError),
                   (torch.tensor([True, False, True, False]), TypeError),
                   (torch.tensor([[0, 1, 0, 1]]), ValueError), (torch.tensor([0, 1, 0]), ValueError)):
        with pytest.raises(err, match="DomainBatchNorm2d"):
            layer(x, domain=d)
        _assert_state_equal(layer, before)


def test_domain_bn_loading_another_number_of_domains_raises_naming_num_domains():
    """docs/adaptation.md, "Per-domain BN": loading a checkpoint with another number of domains (or a plain
    BN layer's) is one clear RuntimeError naming num_domains, and the layer is unchanged."""
    layer = bnkit.DomainBatchNorm2d(3, num_domains=2)
    layer(torch.randn(4, 3, 2, 2), domain=1)
    before = _state(layer)
    for sd in (bnkit.DomainBatchNorm2d(3, num_domains=3).state_dict(), nn.BatchNorm2d(3).state_dict()):
        with pytest.raises(RuntimeError, match="num_domains"):
            layer.load_state_dict(sd)
        _assert_state_equal(layer, before)


def test_freeze_refuses_domain_bn_and_changes_nothing():
    """docs/adaptation.md, "Per-domain BN": bnkit.freeze refuses a DomainBatchNorm (ValueError, nothing
    changed)."""
    model = nn.Sequential(nn.BatchNorm2d(3), bnkit.DomainBatchNorm2d(3, num_domains=2))
    first = model[0]
    with pytest.raises(ValueError):
        bnkit.freeze(model)
    assert model[0] is first and type(model[1]) is bnkit.DomainBatchNorm2d


def test_domain_bn_mixed_batch_equals_separate_bn_per_domain():
    """docs/adaptation.md, "Per-domain BN": it computes exactly what separate BN layers applied to each
    domain's slice of the batch compute (forward and running statistics); only the domains present are
    updated. Oracle: one torch BatchNorm2d per domain."""
    torch.manual_seed(0)
    layer = bnkit.DomainBatchNorm2d(3, num_domains=3)
    oracles = [nn.BatchNorm2d(3) for _ in range(3)]
    x = torch.randn(6, 3, 2, 2) * 2 + 1
    d = torch.tensor([0, 2, 0, 2, 2, 0])
    y = layer(x, domain=d)
    for k in (0, 2):
        torch.testing.assert_close(y[d == k], oracles[k](x[d == k]), **TOL)
        torch.testing.assert_close(layer.running_var[k], oracles[k].running_var, **TOL)
    assert layer.num_batches_tracked.tolist() == [1, 0, 1]
    assert torch.equal(layer.running_mean[1], torch.zeros(3))


# ---------------------------------------------------------------------------------------- deploying.md


def test_torchscript_refuses_the_variants_and_tiny_batch_layers_with_a_type_error():
    """docs/deploying.md, "TorchScript": layers with training rules the twin does not have
    (convention="keras", a tiny_batch policy) and the variants are refused with a TypeError."""
    for layer in (bnkit.BatchNorm2d(3, convention="keras"), bnkit.BatchNorm2d(3, tiny_batch="running"),
                  bnkit.GhostBatchNorm2d(3), bnkit.BatchRenorm2d(3), bnkit.SharedBatchNorm(3, sites=2)):
        with pytest.raises(TypeError):
            torch.jit.script(nn.Sequential(layer))


def test_scripted_layer_keeps_the_nonfinite_skip_policy():
    """docs/deploying.md, "TorchScript": the twin keeps the nonfinite policy ("skip" warns and leaves the
    running statistics). Oracle: the eager layer."""
    layer = bnkit.BatchNorm1d(3)
    scripted = torch.jit.script(layer)
    x = torch.randn(8, 3)
    x[0, 0] = float("nan")
    with pytest.warns(Warning, match="not finite"):   # TorchScript's warnings.warn emits a UserWarning
        scripted(x)
    assert torch.equal(layer.running_mean, torch.zeros(3)) and int(layer.num_batches_tracked) == 0


def test_torch_export_eval_program_matches_torchs_own_bn_graph_targets():
    """docs/deploying.md, "torch.export, ONNX and torch.compile": the training-mode program holds standard
    ATen ops only and computes the batch statistics; outputs equal eager. Oracle: torch's BN in training."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bnkit.BatchNorm2d(4)).train()
    x = torch.randn(4, 3, 6, 6)
    ep = torch.export.export(copy.deepcopy(model), (x,)).run_decompositions()
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("bnkit" in t for t in targets)
    ref = bnkit.convert(copy.deepcopy(model), to="torch")
    torch.testing.assert_close(ep.module()(x), ref(x), **TOL)


def test_compiled_layer_nonfinite_raise_acts_as_skip_without_a_warning():
    """docs/deploying.md, "torch.compile" and docs/kernels.md, "torch.compile": inside a compiled region
    "raise" acts as "skip" (no host check) and no warning is given for a skipped batch."""
    layer = bnkit.BatchNorm1d(3, nonfinite="raise")
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    x = torch.randn(8, 3)
    compiled(x)
    before = _state(layer)
    bad = torch.randn(8, 3)
    bad[0, 1] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled(bad)
    _assert_state_equal(layer, before)


def test_kernels_tune_with_a_negative_value_only_reads():
    """docs/kernels.md, "Tuning knobs": _tune(name, value) returns the old value, and a negative value only
    reads it."""
    if not bnkit.kernels.cpp_available():
        pytest.skip("C++ kernels unavailable")
    bnkit.BatchNorm1d(2)(torch.randn(4, 2))
    now = torch.ops.bnkit._tune("nt_bytes", -1)
    assert torch.ops.bnkit._tune("nt_bytes", -1) == now
    old = torch.ops.bnkit._tune("nt_bytes", now + 64)
    try:
        assert old == now and torch.ops.bnkit._tune("nt_bytes", -1) == now + 64
    finally:
        torch.ops.bnkit._tune("nt_bytes", now)
    assert math.isfinite(now)


# ------------------------------------------------------------------------------------------ more claims


def _variant_layers_2d():
    return [
        ("BatchNorm2d", lambda: bnkit.BatchNorm2d(3), {}),
        ("BatchRenorm2d", lambda: bnkit.BatchRenorm2d(3, schedule="fixed", momentum=0.1), {}),
        ("GhostBatchNorm2d", lambda: bnkit.GhostBatchNorm2d(3, virtual_batch_size=2), {}),
        ("SharedBatchNorm", lambda: bnkit.SharedBatchNorm(3, sites=2), {"site": 1}),
        ("DomainBatchNorm2d", lambda: bnkit.DomainBatchNorm2d(3, num_domains=2), {"domain": 1}),
        ("FrozenBatchNorm2d", lambda: bnkit.FrozenBatchNorm2d(3), {}),
        ("share_affine=all", lambda: bnkit.BatchNorm2d(3, share_affine="all"), {}),
    ]


@pytest.mark.parametrize("name,make,kw", _variant_layers_2d(), ids=[v[0] for v in _variant_layers_2d()])
def test_every_variant_keeps_channels_last_and_matches_its_nchw_result(name, make, kw):
    """docs/variants.md, "Every variant": works on every rank and memory format (channels_last stays
    channels_last), outputs and input gradients. Oracle: the same layer on the contiguous NCHW copy."""
    torch.manual_seed(0)
    a, b = make(), make()
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 3, 3, 5) * 2 + 1
    xa = x.clone().requires_grad_()
    xb = x.to(memory_format=torch.channels_last).requires_grad_()
    ya, yb = a(xa, **kw), b(xb, **kw)
    g = torch.randn_like(ya)
    ya.backward(g), yb.backward(g.to(memory_format=torch.channels_last))
    assert yb.is_contiguous(memory_format=torch.channels_last)
    assert xb.grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(yb, ya, **TOL)
    torch.testing.assert_close(xb.grad, xa.grad, **TOL)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, **TOL)


@pytest.mark.parametrize("name,make,kw", _variant_layers_2d(), ids=[v[0] for v in _variant_layers_2d()])
def test_every_variant_gives_the_eager_results_under_torch_compile(name, make, kw):
    """docs/variants.md, "Every variant": gives the eager results under torch.compile (outputs and running
    statistics, training then eval). Oracle: the eager layer."""
    torch.manual_seed(0)
    eager = make()
    layer = copy.deepcopy(eager)
    compiled = torch.compile(layer, backend="eager")
    for train in (True, True, False):
        eager.train(train), layer.train(train)
        x = torch.randn(4, 3, 2, 2) * 2 + 1
        torch.testing.assert_close(compiled(x, **kw), eager(x, **kw), **TOL)
    for k, v in eager.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[k], v, **TOL)


@pytest.mark.parametrize("name,make,kw", _variant_layers_2d(), ids=[v[0] for v in _variant_layers_2d()])
def test_every_variant_round_trips_through_state_dict(name, make, kw):
    """docs/variants.md, "Every variant": round-trips through state_dict. Oracle: the trained layer's own
    eval outputs and state."""
    torch.manual_seed(0)
    a = make()
    a(torch.randn(4, 3, 2, 2) * 2 + 1, **kw)
    b = make()
    b.load_state_dict(a.state_dict())
    _assert_state_equal(b, _state(a))
    a.eval(), b.eval()
    x = torch.randn(2, 3, 2, 2)
    assert torch.equal(a(x, **kw), b(x, **kw))


@pytest.mark.parametrize("name,make,kw", _variant_layers_2d(), ids=[v[0] for v in _variant_layers_2d()])
def test_every_variant_takes_bfloat16_inputs_with_float32_parameters(name, make, kw):
    """docs/variants.md, "Every variant": works with bfloat16/float16 inputs and float32 parameters. Oracle:
    the same layer on the float32 copy of the input."""
    torch.manual_seed(0)
    a = make()
    b = copy.deepcopy(a)
    x = (torch.randn(4, 3, 2, 2) * 2 + 1).bfloat16()
    y = a(x, **kw)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), b(x.float(), **kw), rtol=2e-2, atol=2e-2)
    for k, v in b.state_dict().items():
        torch.testing.assert_close(a.state_dict()[k], v, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,make,positional", [
    ("BatchRenorm1d", lambda: bnkit.BatchRenorm1d(3, schedule="fixed", momentum=0.1), True),
    ("GhostBatchNorm1d", lambda: bnkit.GhostBatchNorm1d(3, virtual_batch_size=64), True),
    ("SharedBatchNorm", lambda: bnkit.SharedBatchNorm(3, sites=1), "after the site"),
    ("SharedBatchNorm", lambda: bnkit.SharedBatchNorm(3, sites=1), False),
    ("SyncBatchNorm", lambda: bnkit.SyncBatchNorm(3), True),
], ids=["renorm", "ghost", "shared-positional", "shared-keyword", "sync"])
def test_every_layer_takes_a_mask_and_padding_reaches_nothing_else(name, make, positional):
    """docs/training-loops.md, "Padded sequences": every bnkit BN layer takes a mask; the valid outputs equal
    BN over the valid entries alone (torch.nn.BatchNorm1d on x[mask]); padded entries never influence the
    valid outputs or gradients, whatever the padding holds, NaN included. Oracle: torch's BatchNorm1d on
    the valid rows; for BatchRenorm the renorm formula by hand on the valid rows (first call: running
    statistics 0 and 1, r and d clipped to the final limits of schedule="fixed")."""
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(3, 3, 6) * 2 + 1                     # (N, C, L)
    mask = torch.arange(6) < torch.tensor([[6], [2], [4]])
    x = x.masked_fill(~mask[:, None, :], float("nan"))
    leaf = x.clone().requires_grad_()
    if positional == "after the site":  # SharedBatchNorm's second argument is the site
        y = layer(leaf, None, mask)
    else:
        y = layer(leaf, mask) if positional else layer(leaf, mask=mask)
    valid = x.transpose(1, 2)[mask].clone().requires_grad_()   # (n_valid, C)
    ref = nn.BatchNorm1d(3)
    if name == "BatchRenorm1d":
        # r = clip(sigma_B / 1, 1/3, 3), d = clip(mu_B, -5, 5): the first call uses the initial running stats
        with torch.no_grad():
            mu, var = valid.mean(0), valid.var(0, correction=0)
            sigma = (var + 1e-5).sqrt()
            r, d = (sigma / 1.0).clamp(1 / 3, 3), (mu / 1.0).clamp(-5, 5)
        yv = (valid - valid.mean(0)) / (valid.var(0, correction=0) + 1e-5).sqrt() * r + d
    else:
        yv = ref(valid)
    got = y.transpose(1, 2)[mask]
    torch.testing.assert_close(got, yv, **TOL)
    g = torch.randn_like(got)
    got.backward(g)
    yv.backward(g)
    gx = leaf.grad.transpose(1, 2)[mask]
    assert torch.isfinite(leaf.grad.transpose(1, 2)[mask]).all()
    torch.testing.assert_close(gx, valid.grad, **TOL)
    assert torch.isfinite(layer.running_mean).all() and torch.isfinite(layer.running_var).all()


def test_masked_padded_entries_input_gradient_is_dy_weight_over_sigma():
    """docs/training-loops.md, "Padded sequences": padded entries' own input gradient is
    dy * weight / sqrt(var + eps) (the statistics held constant). Oracle: that formula with the valid
    entries' biased variance in float64."""
    torch.manual_seed(0)
    bn = bnkit.BatchNorm(3, axis=-1).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64))
    x = torch.randn(4, 5, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.arange(5) < torch.tensor([[5], [1], [3], [2]])
    y = bn(x, mask)
    g = torch.randn_like(y)
    y.backward(g)
    var = x.detach()[mask].var(0, correction=0)
    expected = g * bn.weight.detach() / (var + bn.eps).sqrt()
    torch.testing.assert_close(x.grad[~mask], expected[~mask])


def test_masked_bn_with_one_valid_entry_raises_torchs_message():
    """docs/training-loops.md, "Padded sequences": one valid entry per channel raises torch's "Expected more
    than 1 value per channel", before anything changes."""
    bn = bnkit.BatchNorm(3, axis=-1)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[1, 2] = True
    before = _state(bn)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bn(torch.randn(2, 4, 3), mask)
    _assert_state_equal(bn, before)


def test_keras_convention_training_outputs_equal_the_torch_conventions():
    """docs/differences.md, "Statistics conventions": training outputs are the same under both conventions;
    the moving variance averages the biased batch variance. Oracle: torch's layer, and the rule by hand."""
    torch.manual_seed(0)
    keras = bnkit.BatchNorm2d(3, convention="keras", momentum=0.2)
    theirs = nn.BatchNorm2d(3, momentum=0.2)
    x = torch.randn(4, 3, 2, 2) * 2 + 1
    torch.testing.assert_close(keras(x), theirs(x), **TOL)
    torch.testing.assert_close(keras.running_mean, theirs.running_mean, **TOL)
    expected = 0.8 + 0.2 * x.double().var(dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(keras.running_var.double(), expected, **TOL)


def test_accumulate_stats_refuses_keras_layers_and_changes_nothing():
    """docs/training-loops.md, "Gradient accumulation": convention="keras" layers are refused
    (NotImplementedError, nothing changed)."""
    model = nn.Sequential(nn.BatchNorm1d(3), bnkit.BatchNorm1d(3, convention="keras"))
    before = _state(model)
    with pytest.raises(NotImplementedError):
        with bnkit.accumulate_stats(model):
            model(torch.randn(8, 3))
    _assert_state_equal(model, before)
    assert model[0].momentum == 0.1


def test_preserve_stats_forwards_inside_accumulate_stats_do_not_count():
    """docs/training-loops.md, "Forwards that must not count": inside an accumulate_stats block the forwards
    of a preserve_stats block do not count either: they are left out of the block's one update. Oracle:
    torch's layer on the concatenation of the counted micro-batches."""
    torch.manual_seed(0)
    for ours, theirs in (_twin(4, bnkit.BatchNorm1d, nn.BatchNorm1d),
                         (nn.BatchNorm1d(4), nn.BatchNorm1d(4))):
        counted = [torch.randn(6, 4) for _ in range(2)]
        with bnkit.accumulate_stats(ours):
            ours(counted[0])
            with bnkit.preserve_stats(ours):
                ours(torch.randn(6, 4) * 5 + 3)
            ours(counted[1])
        theirs(torch.cat(counted))
        assert int(ours.num_batches_tracked) == 1
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, **TOL)
        torch.testing.assert_close(ours.running_var, theirs.running_var, **TOL)


def test_accumulate_stats_leaves_out_a_nonfinite_micro_batch_with_a_warning():
    """docs/training-loops.md, "Gradient accumulation": a non-finite micro-batch follows the layer's
    nonfinite policy at its forward ("skip": left out, with a warning). Oracle: torch's layer on the
    concatenation of the finite micro-batches."""
    torch.manual_seed(0)
    ours, theirs = _twin(4, bnkit.BatchNorm1d, nn.BatchNorm1d)
    good = [torch.randn(6, 4), torch.randn(6, 4) + 1]
    bad = torch.randn(6, 4)
    bad[0, 2] = float("nan")
    with bnkit.accumulate_stats(ours):
        ours(good[0])
        with pytest.warns(RuntimeWarning, match="not finite"):
            ours(bad)
        ours(good[1])
    theirs(torch.cat(good))
    assert int(ours.num_batches_tracked) == 1
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, **TOL)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **TOL)


def test_recalibrate_leaves_a_nonfinite_batch_out_with_one_warning():
    """docs/training-loops.md, "Population statistics": a batch with NaN/Inf follows each layer's nonfinite
    policy: by default it is left out of that layer's statistics, with one warning naming the layers and
    batches. Oracle: float64 statistics of the finite batches."""
    torch.manual_seed(0)
    model = nn.Sequential(bnkit.BatchNorm1d(3))
    good = [torch.randn(8, 3), torch.randn(8, 3) + 2]
    bad = torch.randn(8, 3)
    bad[1, 1] = float("inf")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bnkit.recalibrate(model, [good[0], bad, good[1]])
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "0" in msgs[0]
    whole = torch.cat(good).double()
    torch.testing.assert_close(model[0].running_mean.double(), whole.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model[0].running_var.double(), whole.var(0), rtol=1e-5, atol=1e-6)


def test_checkpoint_safe_with_block_counts_torch_layers_once_and_restores_on_exit():
    """docs/training-loops.md, "Activation checkpointing": for torch's layers, checkpoint_safe(model)
    registers hooks so that the recompute does not update the buffers; leaving its with block takes them
    off. Oracle: the same torch layer without checkpointing (inside), and torch's double count (after)."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    plain = copy.deepcopy(body)
    x = torch.randn(16, 4, requires_grad=True)
    with bnkit.checkpoint_safe(body):
        checkpoint(body, x, use_reentrant=False).sum().backward()
    plain(x).sum().backward()
    assert int(body[1].num_batches_tracked) == 1
    torch.testing.assert_close(body[1].running_mean, plain[1].running_mean, **TOL)
    torch.testing.assert_close(body[1].running_var, plain[1].running_var, **TOL)
    checkpoint(body, x, use_reentrant=False).sum().backward()
    assert int(body[1].num_batches_tracked) == 3              # torch's own double update is back


def test_adapt_online_ema_follows_the_stream_and_normalizes_with_statistics_that_include_the_batch():
    """docs/adaptation.md, "bnkit.adapt" (mode="online"): an exponential moving average with momentum
    starting from the source; every layer normalizes each batch with the statistics that already include
    it; the layers are in eval mode until restore(). Oracle: the EMA of the batch means by hand, and an
    eval-mode BN with those statistics."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4).eval()
    src = _state(bn)
    stream = [torch.randn(8, 4, 3, 3) * 2 + 1 for _ in range(3)]
    mean = torch.zeros(4, dtype=torch.float64)
    with bnkit.adapt(bn, mode="online", momentum=0.5) as h:
        for x in stream:
            y = bn(x)
            mean = 0.5 * mean + 0.5 * x.double().mean(dim=(0, 2, 3))
            torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-5)
            expected = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
            torch.testing.assert_close(y, expected, **TOL)
        assert h.samples == 24 and not bn.training
    _assert_state_equal(bn, src)


def test_adapt_reestimate_leaves_weights_counts_momenta_and_flags_as_they_were():
    """docs/adaptation.md, intro and "bnkit.adapt": all tools leave everything else (weights, dropout,
    num_batches_tracked, momenta, training flags) as it was; "reestimate" gives the mean and unbiased
    variance of the BN input over all of data. Oracle: float64 statistics by hand."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.3), bnkit.BatchNorm1d(4, momentum=0.25))
    model(torch.randn(8, 3))
    model.eval()
    w = model[0].weight.detach().clone()
    data = [torch.randn(8, 3) * 2 for _ in range(3)]
    handle = bnkit.adapt(model, data, mode="reestimate")
    with torch.no_grad():
        feats = torch.cat([model[0](x) for x in data]).double()
    torch.testing.assert_close(model[2].running_mean.double(), feats.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model[2].running_var.double(), feats.var(0), rtol=1e-5, atol=1e-6)
    assert int(model[2].num_batches_tracked) == 1 and model[2].momentum == 0.25
    assert not model.training and not model[1].training and torch.equal(model[0].weight, w)
    handle.restore()


def _tent_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    target = torch.randn(32, 1, 6, 6) * 3 + 1
    return model, target


def test_tent_restore_gives_back_the_source_model_bit_for_bit():
    """docs/adaptation.md, "bnkit.tent": handle.restore() gives back the source affine parameters and
    statistics, bit for bit. Oracle: the state before."""
    model, target = _tent_setup()
    before = _state(model)
    x = torch.randn(4, 1, 6, 6)
    logits = model(x)
    model, handle = bnkit.tent(model, target.split(8), steps=1, lr=1e-2)
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in before.items())
    handle.restore()
    _assert_state_equal(model, before)
    assert torch.equal(model(x), logits)


@pytest.mark.parametrize("option", ["max_entropy_inf", "identity_view"])
def test_tent_options_that_are_documented_as_plain_tent_bit_for_bit(option):
    """docs/adaptation.md, "Remedies for TENT's error accumulation": max_entropy=math.inf is plain TENT, bit
    for bit; with views=1 one view of an identity augmentation is plain TENT, bit for bit. Oracle: plain
    bnkit.tent on a copy."""
    model, target = _tent_setup()
    twin = copy.deepcopy(model)
    plain, _ = bnkit.tent(twin, target.split(8), steps=2, lr=1e-2)
    kw = {"max_entropy": math.inf} if option == "max_entropy_inf" else {"augment": lambda x, g: x, "views": 1}
    other, _ = bnkit.tent(model, target.split(8), steps=2, lr=1e-2, **kw)
    _assert_state_equal(other, _state(plain))


def test_tent_batch_without_reliable_samples_takes_no_step():
    """docs/adaptation.md, "Remedies" table: with max_entropy, a batch without any reliable sample is skipped
    (no step). Oracle: the affine parameters before the call."""
    model, target = _tent_setup()
    w, b = model[1].weight.detach().clone(), model[1].bias.detach().clone()
    _, h = bnkit.tent(model, target.split(8), max_entropy=1e-9, lr=1e-1)
    assert h.steps_taken == 0 and h.samples_used == 0 and h.samples_seen == 32
    assert torch.equal(model[1].weight, w) and torch.equal(model[1].bias, b)
    h.restore()


def test_inspect_shift_and_log_var_ratio_follow_the_documented_formulas():
    """docs/adaptation.md, "bnkit.inspect": shift = mean_c |mu_c - mu_run,c| / sqrt(var_run,c + eps) and
    log_var_ratio = mean_c log((var_c + eps) / (var_run,c + eps)); with data the model runs in eval mode
    (nothing changes). Oracle: the formulas in float64."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3)
    bn(torch.randn(16, 3))
    model = nn.Sequential(bn).eval()
    before = _state(model)
    data = torch.randn(64, 3) * 3 + 1
    layer = bnkit.inspect(model, data).to_dict()["layers"][0]
    _assert_state_equal(model, before)
    rm, rv, d = bn.running_mean.double(), bn.running_var.double(), data.double()
    shift = ((d.mean(0) - rm).abs() / (rv + bn.eps).sqrt()).mean().item()
    assert layer["shift"] == pytest.approx(shift, rel=1e-6)
    ratios = [torch.log((d.var(0, correction=c) + bn.eps) / (rv + bn.eps)).mean().item() for c in (0, 1)]
    assert any(layer["log_var_ratio"] == pytest.approx(r, rel=1e-6) for r in ratios)
    assert "domain_shift" in layer["findings"]


def test_domain_bn_empty_batch_counts_only_with_an_int_domain():
    """docs/adaptation.md, "Per-domain BN": an empty batch belongs to no domain: nothing is counted (with an
    int domain it is that domain's empty batch, which torch's BN counts, so it is counted)."""
    layer = bnkit.DomainBatchNorm2d(3, num_domains=2)
    empty = torch.empty(0, 3, 2, 2)
    layer(empty, domain=torch.empty(0, dtype=torch.long))
    assert layer.num_batches_tracked.tolist() == [0, 0]
    layer(empty, domain=1)
    assert layer.num_batches_tracked.tolist() == [0, 1]


def test_domain_bn_single_value_per_channel_in_a_domain_raises_but_nchw_needs_one_sample():
    """docs/adaptation.md, "Per-domain BN": a domain with a single value per channel in a training batch of
    (N, C) data raises ValueError before anything changes; (N, C, L) or image data need only one sample per
    domain. Oracle: torch's BN on each domain's slice."""
    flat = bnkit.DomainBatchNorm1d(3, num_domains=2)
    before = _state(flat)
    with pytest.raises(ValueError):
        flat(torch.randn(3, 3), domain=torch.tensor([0, 0, 1]))
    _assert_state_equal(flat, before)
    seq = bnkit.DomainBatchNorm1d(3, num_domains=2)
    x = torch.randn(3, 3, 4)
    d = torch.tensor([0, 0, 1])
    y = seq(x, domain=d)
    torch.testing.assert_close(y[2:], nn.BatchNorm1d(3)(x[2:]), **TOL)
    torch.testing.assert_close(y[:2], nn.BatchNorm1d(3)(x[:2]), **TOL)


def test_domain_bn_cumulative_average_uses_each_domains_own_count():
    """docs/adaptation.md, "Per-domain BN": momentum=None averages each domain cumulatively over its own
    num_batches_tracked[d]. Oracle: one torch BN (momentum=None) per domain."""
    torch.manual_seed(0)
    layer = bnkit.DomainBatchNorm1d(3, num_domains=2, momentum=None)
    oracles = [nn.BatchNorm1d(3, momentum=None) for _ in range(2)]
    for dom in (0, 1, 1, 0, 1):
        x = torch.randn(6, 3) * (dom + 1) + dom
        layer(x, domain=dom)
        oracles[dom](x)
    for dom in (0, 1):
        torch.testing.assert_close(layer.running_mean[dom], oracles[dom].running_mean, **TOL)
        torch.testing.assert_close(layer.running_var[dom], oracles[dom].running_var, **TOL)
    assert layer.num_batches_tracked.tolist() == [2, 3]


def test_recalibrate_inside_a_domain_block_reestimates_that_domain_only():
    """docs/adaptation.md, "Per-domain BN": bnkit.recalibrate(model, data) inside with bnkit.domain(model, d)
    re-estimates domain d's statistics only (the other domains are untouched). Oracle: float64 statistics
    of the data."""
    model = nn.Sequential(bnkit.DomainBatchNorm1d(3, num_domains=2))
    model[0](torch.randn(8, 3), domain=0)
    other = model[0].running_mean[0].clone(), model[0].running_var[0].clone()
    data = [torch.randn(8, 3) * 2 + 1 for _ in range(2)]
    with bnkit.domain(model, 1):
        bnkit.recalibrate(model, data)
    whole = torch.cat(data).double()
    torch.testing.assert_close(model[0].running_mean[1].double(), whole.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model[0].running_var[1].double(), whole.var(0), rtol=1e-5, atol=1e-6)
    assert torch.equal(model[0].running_mean[0], other[0]) and torch.equal(model[0].running_var[0], other[1])


def test_fuse_leaves_domain_bn_with_a_warning():
    """docs/adaptation.md, "Per-domain BN": a DomainBatchNorm has one inference form per domain, so
    bnkit.fuse leaves it as it is (with a warning saying why). Oracle: the unfused model's output."""
    model = nn.Sequential(nn.Conv2d(3, 3, 1), bnkit.DomainBatchNorm2d(3, num_domains=2)).eval()
    x = torch.randn(2, 3, 4, 4)
    with bnkit.domain(model, 1):
        expected = model(x)
    with pytest.warns(UserWarning):
        fused = bnkit.fuse(model)
    assert any(isinstance(m, bnkit.DomainBatchNorm) for m in fused.modules())
    with bnkit.domain(fused, 1):
        torch.testing.assert_close(fused(x), expected, **TOL)


@pytest.mark.parametrize("after", ["conv_nopad", "conv_pad", "convT_1x1", "linear"])
def test_fuse_folds_a_bn_into_the_next_layer_where_exact_and_otherwise_makes_an_affine(after):
    """docs/deployment.md, "fuse": after the BN: Linear, a zero-padding Conv, or a pointwise ConvTranspose
    are folded; a BN that cannot be folded (before a padded conv) becomes one bnkit.Affine op. Oracle: the
    unfused eval model's output."""
    torch.manual_seed(0)
    nxt = {"conv_nopad": nn.Conv2d(4, 5, 3), "conv_pad": nn.Conv2d(4, 5, 3, padding=1),
           "convT_1x1": nn.ConvTranspose2d(4, 5, 1), "linear": nn.Linear(4, 5)}[after]
    bn = nn.BatchNorm1d(4) if after == "linear" else nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2)
    model = nn.Sequential(nn.ReLU(), bn, nxt).eval()
    x = torch.randn(2, 4) if after == "linear" else torch.randn(2, 4, 6, 6)
    fused = bnkit.fuse(model)
    affine = any(isinstance(m, bnkit.Affine) for m in fused.modules())
    assert affine == (after == "conv_pad")
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in fused.modules())
    torch.testing.assert_close(fused(x), model(x), **TOL)


def test_fuse_folds_into_a_preceding_grouped_dilated_conv_transpose():
    """docs/deployment.md, "fuse": before the BN, ConvTranspose1d/2d/3d with any groups, stride, dilation,
    with or without bias. Oracle: the unfused eval model's output."""
    torch.manual_seed(0)
    bn = bnkit.BatchNorm2d(6)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2)
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, dilation=2, bias=False), bn).eval()
    x = torch.randn(2, 4, 5, 5)
    fused, report = bnkit.fuse(model, report=True)
    assert not any(isinstance(m, (bnkit.BatchNorm, bnkit.Affine)) for m in fused.modules())
    torch.testing.assert_close(fused(x), model(x), **TOL)


def test_freeze_of_a_subclass_overriding_forward_names_the_layer_and_class():
    """docs/deployment.md, "BN subclasses" table: a subclass overriding forward, unknown to bnkit: freeze
    raises ValueError naming the layer and class, and changes nothing."""
    class Odd(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.BatchNorm2d(3), nn.Sequential(Odd(3))).eval()
    first = model[0]
    with pytest.raises(ValueError, match=r"1\.0.*Odd|Odd.*1\.0"):
        bnkit.freeze(model)
    assert model[0] is first and type(model[1][0]) is Odd


def test_convert_without_report_names_a_layer_it_leaves_in_a_user_warning():
    """docs/deployment.md, "BN subclasses": without report=True, any layer left is named in a UserWarning;
    with it, a ConvertReport lists it under left."""
    class Odd(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.BatchNorm2d(3), Odd(3))
    with pytest.warns(UserWarning, match="1"):
        out = bnkit.convert(model)
    assert type(out[0]) is bnkit.BatchNorm2d and type(out[1]) is Odd
    _, report = bnkit.convert(model, report=True)
    assert any("1" in str(entry) for entry in report.left)


def test_convert_sync_batchnorm_turns_batchnormact_into_syncbatchnormact_keeping_its_activation():
    """docs/sync.md, "Conversion": bnkit's BatchNormAct layers become SyncBatchNormAct, which keeps their
    drop and act children. Oracle: torch's BN followed by ReLU6."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU6())
    ref = copy.deepcopy(model)
    fused = bnkit.convert(model, fuse_activations=True)
    synced = bnkit.convert_sync_batchnorm(fused)
    assert type(synced[1]).__name__ == "SyncBatchNormAct"
    x = torch.randn(4, 3, 6, 6) * 3
    torch.testing.assert_close(synced(x), ref(x), **TOL)


def test_func_grad_of_a_training_layer_updates_the_buffers_once():
    """docs/functional.md, "Transforms": jvp / jacfwd / grad of a layer in training: the buffers are updated
    once, with the primal batch statistics, as an eager call would. Oracle: torch's eager layer."""
    from torch.func import grad

    torch.manual_seed(0)
    ours = bnkit.BatchNorm1d(3).double()
    theirs = nn.BatchNorm1d(3).double()
    x = torch.randn(8, 3, dtype=torch.float64) * 2 + 1
    gx = grad(lambda inp: ours(inp).square().mul(torch.arange(3.0, dtype=torch.float64)).sum())(x)
    leaf = x.clone().requires_grad_()
    theirs(leaf).square().mul(torch.arange(3.0, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(gx, leaf.grad)
    assert int(ours.num_batches_tracked) == 1
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_nonfinite_raise_under_a_transform_keeps_the_old_statistics_without_raising():
    """docs/functional.md, "Transforms": under transforms the non-finite check cannot stop on the host:
    nonfinite="raise" keeps the old statistics as "skip" does (without the warning)."""
    from torch.func import jvp

    layer = bnkit.BatchNorm1d(3, nonfinite="raise").double()
    before = _state(layer)
    x = torch.randn(8, 3, dtype=torch.float64)
    x[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        jvp(layer, (x,), (torch.ones_like(x),))
    _assert_state_equal(layer, before)


def test_accelerate_keeps_torchs_errors_and_serves_instance_norm():
    """docs/acceleration.md, "What bnkit's kernels serve": turning it on never changes what works or which
    errors are raised; F.instance_norm (which calls aten::batch_norm on CPU) runs with torch's semantics.
    Oracle: the same calls with it off."""
    if not bnkit.kernels.cpp_available():
        pytest.skip("C++ kernels unavailable")
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    w = torch.rand(3) + 0.5
    ref = F.instance_norm(x, weight=w)
    with bnkit.accelerated():
        got = F.instance_norm(x, weight=w)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            nn.BatchNorm1d(3)(torch.randn(1, 3))
        lax = nn.BatchNorm2d(3, eps=0)
        with pytest.raises(ValueError):
            lax(x)
    torch.testing.assert_close(got, ref, **TOL)


@pytest.mark.parametrize("name,make,kw,train", [
    ("BatchNorm2d", lambda: bnkit.BatchNorm2d(3), {}, False),
    ("BatchRenorm2d", lambda: bnkit.BatchRenorm2d(3), {}, False),
    ("GhostBatchNorm2d", lambda: bnkit.GhostBatchNorm2d(3), {}, False),
    ("SharedBatchNorm-eval", lambda: bnkit.SharedBatchNorm(3, sites=1), {}, False),
    ("SharedBatchNorm-train", lambda: bnkit.SharedBatchNorm(3, sites=1), {}, True),
    ("FrozenBatchNorm2d-train", lambda: bnkit.FrozenBatchNorm2d(3), {}, True),
], ids=lambda v: v if isinstance(v, str) else None)
def test_every_variant_is_one_node_under_fx_symbolic_trace(name, make, kw, train):
    """docs/variants.md, "Every variant": is one node under torch.fx.symbolic_trace (in eval mode;
    SharedBatchNorm and the frozen layers in both modes); docs/layers.md, "Tracing and compiling". Oracle:
    the traced module's output equals the layer's."""
    layer = make().train(train)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), layer).train(train)
    gm = torch.fx.symbolic_trace(model)
    # the layer is a leaf, as torch's BN is: one call_module node of the layer itself
    compute = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    assert [(n.op, n.target) for n in compute] == [("call_module", "0"), ("call_module", "1")]
    assert compute[1].args == (compute[0],) and [u.op for u in compute[1].users] == ["output"]
    assert gm.get_submodule("1") is layer
    x = torch.randn(4, 3, 2, 2)
    ref = copy.deepcopy(model)
    torch.testing.assert_close(gm(x), ref(x), **TOL)


def test_jit_trace_of_a_training_call_acts_on_nonfinite_raise_as_skip():
    """docs/deploying.md, "TorchScript": torch.jit.trace works in training mode too; the non-finite check is
    a torch.where, so nonfinite="raise" acts as "skip" in a trace. Oracle: the eager layer (finite batch)
    and the state before (non-finite batch)."""
    layer = bnkit.BatchNorm1d(3, nonfinite="raise")
    eager = copy.deepcopy(layer)
    x = torch.randn(8, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(layer, x.clone(), check_trace=False)
    layer.load_state_dict(eager.state_dict())
    y = traced(x)
    torch.testing.assert_close(y, eager(x), **TOL)
    for k, v in eager.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[k], v, **TOL)
    bad = torch.randn(8, 3)
    bad[0, 0] = float("nan")
    before = _state(layer)
    traced(bad)
    _assert_state_equal(layer, before)


def test_jit_trace_of_a_ghost_training_call_refuses_another_batch_size():
    """docs/deploying.md, "torch.export, ONNX and torch.compile": a torch.jit.trace of a GhostBatchNorm
    training call takes only the size it was made with; a trace called with another size raises."""
    layer = bnkit.GhostBatchNorm1d(3, virtual_batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(layer, torch.randn(8, 3), check_trace=False)
    traced(torch.randn(8, 3))
    with pytest.raises(Exception):
        traced(torch.randn(12, 3))


def test_eager_quantization_fuses_variants_through_their_inference_map_and_refuses_qat():
    """docs/deploying.md, "Quantization (eager mode)": layers without a torch equivalent (share_affine,
    frozen, renorm, ghost) fuse in eval mode through their inference map; for QAT they raise a ValueError
    naming the layer. Oracle: the unfused eval model's output."""
    import torch.ao.quantization as tq

    torch.manual_seed(0)
    for make in (lambda: bnkit.BatchNorm2d(4, share_affine="all"), lambda: bnkit.FrozenBatchNorm2d(4),
                 lambda: bnkit.BatchRenorm2d(4), lambda: bnkit.GhostBatchNorm2d(4)):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), make())
        if not isinstance(model[1], bnkit.FrozenBatchNorm):
            model(torch.randn(8, 3, 6, 6) * 2 + 1)
        model.eval()
        x = torch.randn(2, 3, 6, 6)
        expected = model(x)
        fused = tq.fuse_modules(copy.deepcopy(model), [["0", "1"]])
        torch.testing.assert_close(fused(x), expected, **TOL)
        with pytest.raises(ValueError, match=type(model[1]).__name__):
            tq.fuse_modules_qat(copy.deepcopy(model).train(), [["0", "1"]])


def test_freezing_a_fused_conversion_keeps_each_bn_activation_pair_one_layer():
    """docs/deployment.md, "freeze": bnkit.freeze(bnkit.convert(model, fuse_activations=True)) keeps each BN +
    activation pair one layer (FrozenBatchNormAct2d). Oracle: the torch model in eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model(torch.randn(8, 3, 6, 6))
    model.eval()
    ref = copy.deepcopy(model)
    frozen = bnkit.freeze(bnkit.convert(model, fuse_activations=True))
    assert type(frozen[1]).__name__ == "FrozenBatchNormAct2d"
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(frozen.train()(x), ref(x), **TOL)


def test_convert_leaves_a_parametrized_layer_as_it_is_and_reports_it():
    """docs/deployment.md, "BN subclasses": convert leaves a layer with a torch.nn.utils.parametrize
    parametrization as it is, in both directions, and reports it."""
    from torch.nn.utils import parametrize

    class Pos(nn.Module):
        def forward(self, w):
            return w.abs()

    model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3))
    parametrize.register_parametrization(model[1], "weight", Pos())
    out, report = bnkit.convert(model, report=True)
    assert type(out[0]) is bnkit.BatchNorm2d
    assert parametrize.is_parametrized(out[1]) and isinstance(out[1], nn.BatchNorm2d)
    assert any("1" in str(entry) for entry in report.left)


def test_batch_norm_step_tensor_momentum_equals_float_momentum():
    """docs/functional.md, "batch_norm_step": the momentum may be a float, a 0-d tensor or None. Oracle: the
    float-momentum call (and torch's F.batch_norm)."""
    from bnkit.functional import batch_norm_step

    torch.manual_seed(0)
    x = torch.randn(8, 3, dtype=torch.float64) * 2 + 1
    state = {"running_mean": torch.zeros(3, dtype=torch.float64), "running_var": torch.ones(3, dtype=torch.float64),
             "num_batches_tracked": torch.tensor(0)}
    y1, s1 = batch_norm_step(x, {}, state, training=True, momentum=0.3)
    y2, s2 = batch_norm_step(x, {}, state, training=True, momentum=torch.tensor(0.3, dtype=torch.float64))
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    yt = F.batch_norm(x, rm, rv, training=True, momentum=0.3)
    torch.testing.assert_close(y2, y1)
    torch.testing.assert_close(y1, yt)
    for k in ("running_mean", "running_var"):
        torch.testing.assert_close(s2[k], s1[k])
    torch.testing.assert_close(s1["running_mean"], rm)
    torch.testing.assert_close(s1["running_var"], rv)
    assert int(s1["num_batches_tracked"]) == int(s2["num_batches_tracked"]) == 1


def test_compiled_masked_call_with_one_valid_entry_raises_runtime_error_before_any_write():
    """docs/deploying.md, "torch.compile": a batch with exactly one valid entry, a ValueError in eager mode,
    raises a RuntimeError on CPU (torch._assert_async, before anything is written)."""
    layer = bnkit.BatchNorm1d(3)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 4)
    good = torch.ones(2, 4, dtype=torch.bool)
    compiled(x, mask=good)
    before = _state(layer)
    one = torch.zeros(2, 4, dtype=torch.bool)
    one[0, 1] = True
    with pytest.raises(RuntimeError):
        compiled(x, mask=one)
    _assert_state_equal(layer, before)
