"""Drop-in fidelity: bnkit does what torch.nn.BatchNorm* / F.batch_norm do on identical calls.

Oracle: torch itself, called the same way on a twin layer. Where bnkit
deliberately differs (docs/differences.md), the test states both
behaviours so that the difference cannot change unnoticed.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnkit
import bnkit.functional as BF
from bnkit.errors import ChannelMismatchError

from _state import assert_state_unchanged, snapshot

PAIRS = [(nn.BatchNorm1d, bnkit.BatchNorm1d, (6, 3)), (nn.BatchNorm2d, bnkit.BatchNorm2d, (4, 3, 2, 2)),
         (nn.BatchNorm3d, bnkit.BatchNorm3d, (2, 3, 2, 2, 2))]


def _twins(torch_cls, bnkit_cls, steps=3, shape=(6, 3), **kw):
    """A torch and a bnkit layer with the same state after ``steps`` identical training forwards."""
    t, b = torch_cls(3, **kw), bnkit_cls(3, **kw)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(shape, generator=g)
        t(x)
        b(x)
    assert int(t.num_batches_tracked) == int(b.num_batches_tracked) == steps
    return t, b


# --------------------------------------------------------------------------- load_state_dict
def _without_nbt(sd, keep_metadata):
    out = OrderedDict((k, v.clone()) for k, v in sd.items() if not k.endswith("num_batches_tracked"))
    if keep_metadata:
        out._metadata = sd._metadata  # type: ignore[attr-defined]
    return out


@pytest.mark.parametrize("torch_cls,bnkit_cls,shape", PAIRS)
@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("keep_metadata", [True, False], ids=["versioned", "plain-dict"])
def test_load_state_dict_without_num_batches_tracked_keeps_it_as_torch(torch_cls, bnkit_cls, shape, strict,
                                                                        keep_metadata):
    t, b = _twins(torch_cls, bnkit_cls, shape=shape)
    src_t, _ = _twins(torch_cls, bnkit_cls, steps=1, shape=shape)
    sd = _without_nbt(src_t.state_dict(), keep_metadata)
    outcomes = []
    for layer in (t, b):
        try:
            res = layer.load_state_dict(OrderedDict(sd) if not keep_metadata else sd, strict=strict)
            outcomes.append(("ok", sorted(res.missing_keys), sorted(res.unexpected_keys)))
        except RuntimeError as e:
            outcomes.append(("error", "num_batches_tracked" in str(e)))
    assert outcomes[0] == outcomes[1]
    assert int(b.num_batches_tracked) == int(t.num_batches_tracked)
    if outcomes[0][0] == "ok":
        assert int(b.num_batches_tracked) == 3  # kept, not reset
        torch.testing.assert_close(b.running_mean, t.running_mean, rtol=0, atol=0)
        torch.testing.assert_close(b.running_mean, src_t.running_mean, rtol=0, atol=0)


def test_batch_renorm_schedule_survives_a_partial_load():
    layer = bnkit.BatchRenorm1d(3, warmup_steps=1, r_max_steps=4, d_max_steps=4)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        layer(torch.randn(8, 3, generator=g))
    before = layer.limits()
    sd = {k: v.clone() for k, v in layer.state_dict().items() if k != "num_batches_tracked"}
    layer.load_state_dict(sd, strict=False)
    assert int(layer.num_batches_tracked) == 3
    assert layer.limits() == before and before != (1.0, 0.0)


def test_shared_batch_norm_keeps_per_site_counts_on_a_partial_load():
    layer = bnkit.SharedBatchNorm(3, sites=2)
    layer(torch.randn(4, 3), site=1)
    sd = {k: v.clone() for k, v in layer.state_dict().items() if k != "num_batches_tracked"}
    layer.load_state_dict(sd, strict=False)
    assert layer.num_batches_tracked.tolist() == [0, 1]


# --------------------------------------------------------------------------- wrong sizes
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("which", ["running_mean", "running_var", "weight", "bias"])
def test_wrong_size_argument_raises_runtime_error_like_torch(which, training):
    x = torch.randn(4, 3)
    args = dict(running_mean=torch.zeros(3), running_var=torch.ones(3), weight=torch.ones(3), bias=torch.zeros(3))
    args[which] = torch.ones(5)
    with pytest.raises(RuntimeError) as torch_err:
        F.batch_norm(x, training=training, **args)
    for fn in (BF.batch_norm, lambda x, **kw: BF.batch_norm_core(x, **kw)):
        before = {k: v.clone() for k, v in args.items()}
        with pytest.raises(RuntimeError, match=f"{which} should have 3 elements") as ours:
            fn(x, training=training, **args)
        assert isinstance(ours.value, type(torch_err.value)) and isinstance(ours.value, ChannelMismatchError)
        assert all(args[k].equal(before[k]) for k in args)  # nothing was updated


@pytest.mark.parametrize("torch_cls,bnkit_cls,shape", PAIRS)
@pytest.mark.parametrize("training", [True, False])
def test_layer_with_wrong_channel_count_raises_runtime_error_like_torch(torch_cls, bnkit_cls, shape, training):
    x = torch.randn((shape[0], 4) + shape[2:])
    t, b = torch_cls(3).train(training), bnkit_cls(3).train(training)
    with pytest.raises(RuntimeError):
        t(x)
    before = snapshot(b)
    with pytest.raises(RuntimeError, match="expected 3 features"):
        b(x)
    assert_state_unchanged(b, before)


def test_channel_mismatch_is_still_a_value_error_for_older_callers():
    with pytest.raises(ValueError):
        BF.batch_norm(torch.randn(4, 3), torch.zeros(4), torch.ones(4))


# --------------------------------------------------------------------------- empty inputs
def _same_result(ours, theirs):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert ours.requires_grad == theirs.requires_grad


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("with_affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_one_d_empty_input_to_functional_batch_norm_as_torch(training, with_affine, dtype):
    results, grads = [], []
    for fn in (F.batch_norm, BF.batch_norm):
        rm, rv = torch.zeros(3), torch.ones(3)
        w = torch.ones(3, requires_grad=True) if with_affine else None
        b = torch.zeros(3, requires_grad=True) if with_affine else None
        y = fn(torch.empty(0, dtype=dtype), rm, rv, w, b, training=training)
        results.append(y)
        if with_affine:
            y.sum().backward()
            grads.append((w.grad, b.grad))
        assert rm.equal(torch.zeros(3)) and rv.equal(torch.ones(3))
    _same_result(*results)
    for (wt, bt), (wb, bb) in zip(grads[:1], grads[1:]):
        torch.testing.assert_close(wb, wt)
        torch.testing.assert_close(bb, bt)


@pytest.mark.parametrize("torch_cls,bnkit_cls,shape", PAIRS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_empty_batch_of_another_float_dtype_as_torch(torch_cls, bnkit_cls, shape, training, dtype):
    t, b = _twins(torch_cls, bnkit_cls, shape=shape)
    t.train(training)
    b.train(training)
    x = torch.empty((0,) + shape[1:], dtype=dtype)
    stats_before = [(layer.running_mean.clone(), layer.running_var.clone()) for layer in (t, b)]
    _same_result(b(x), t(x))
    assert int(b.num_batches_tracked) == int(t.num_batches_tracked) == 3 + training
    for layer, (mean, var) in zip((t, b), stats_before):
        assert layer.running_mean.equal(mean) and layer.running_var.equal(var)


def test_empty_batch_in_batch_renorm_is_counted_like_batch_norm():
    t, b = nn.BatchNorm2d(3), bnkit.BatchRenorm2d(3)
    for dtype in (torch.float32, torch.float64):
        x = torch.empty(0, 3, 2, 2, dtype=dtype)
        _same_result(b(x), t(x))
    assert int(b.num_batches_tracked) == int(t.num_batches_tracked) == 2
    assert b.running_mean.equal(torch.zeros(3)) and b.running_var.equal(torch.ones(3))


# --------------------------------------------------------------------------- deliberate differences
def test_eps_zero_is_rejected_at_construction_where_torch_accepts_it():
    nn.BatchNorm2d(3, eps=0.0)  # torch accepts, then divides by zero on a constant channel
    with pytest.raises(ValueError, match="eps must be a positive number"):
        bnkit.BatchNorm2d(3, eps=0.0)
    with pytest.raises(ValueError, match="eps"):
        bnkit.BatchNorm2d(3, eps=-1e-5)


@pytest.mark.parametrize("cls", [bnkit.BatchNorm2d, bnkit.BatchRenorm2d, bnkit.GhostBatchNorm2d,
                                 bnkit.SharedBatchNorm, bnkit.DomainBatchNorm2d])
@pytest.mark.parametrize("dtype", [torch.long, torch.bool, torch.complex64])
def test_a_non_float_input_raises_the_same_error_in_every_layer(cls, dtype):
    """bnkit.InputDtypeError: a TypeError, and a NotImplementedError as torch's own layer raises."""
    with pytest.raises(NotImplementedError):
        nn.BatchNorm2d(3)(torch.ones(4, 3, 2, 2, dtype=dtype))  # the oracle's type
    extra = {bnkit.GhostBatchNorm2d: {"virtual_batch_size": 2}, bnkit.SharedBatchNorm: {"sites": 1},
             bnkit.DomainBatchNorm2d: {"num_domains": 2}}
    layer = cls(3, **extra.get(cls, {}))
    call = {bnkit.DomainBatchNorm2d: {"domain": torch.tensor([0, 1, 0, 1])}}.get(cls, {})
    before = snapshot(layer)
    with pytest.raises(bnkit.InputDtypeError, match=rf"\(3[^)]*\): expected a floating-point input, got {dtype}") as e:
        layer(torch.ones(4, 3, 2, 2, dtype=dtype), **call)
    assert isinstance(e.value, TypeError) and isinstance(e.value, NotImplementedError)
    assert_state_unchanged(layer, before)


# --------------------------------------------------------------------------- convert
@pytest.mark.parametrize("axis", [1, -1])
def test_convert_to_torch_refuses_the_generic_layer(axis):
    model = nn.Sequential(nn.Linear(3, 3), bnkit.BatchNorm(3, axis=axis), bnkit.BatchNorm1d(3))
    with pytest.raises(ValueError, match=r"'1'.*generic bnkit.BatchNorm"):
        bnkit.convert(model, to="torch", inplace=True)
    assert type(model[1]) is bnkit.BatchNorm and type(model[2]) is bnkit.BatchNorm1d  # nothing changed


def test_convert_to_torch_still_converts_the_nd_layers():
    model = nn.Sequential(bnkit.BatchNorm1d(3))
    out = bnkit.convert(model, to="torch")
    assert type(out[0]) is nn.BatchNorm1d


@pytest.mark.parametrize("layer_dtype,input_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32)])
def test_dtype_mismatch_is_a_runtime_error_like_torch(layer_dtype, input_dtype):
    x = torch.randn(4, 3, dtype=input_dtype)
    t, b = nn.BatchNorm1d(3, dtype=layer_dtype), bnkit.BatchNorm1d(3, dtype=layer_dtype)
    with pytest.raises(RuntimeError, match="mixed dtype"):
        t(x)
    before = snapshot(b)
    with pytest.raises(RuntimeError, match="has dtype") as ours:
        b(x)
    assert isinstance(ours.value, TypeError) and isinstance(ours.value, bnkit.DtypeMismatchError)
    assert_state_unchanged(b, before)


@pytest.mark.parametrize("convention", ["torch", "keras"])
@pytest.mark.parametrize("cls", [bnkit.BatchNorm2d, bnkit.BatchRenorm2d])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("which", ["running_mean", "running_var", "weight", "bias"])
def test_layer_with_a_wrong_size_tensor_raises_runtime_error_like_torch(which, training, cls, convention):
    t, b = nn.BatchNorm2d(3), cls(3, convention=convention)
    for layer in (t, b):
        if which in ("weight", "bias"):
            setattr(layer, which, nn.Parameter(torch.ones(4)))
        else:
            layer._buffers[which] = torch.ones(4)
        layer.train(training)
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(RuntimeError):
        t(x)
    before = snapshot(b)
    with pytest.raises(ChannelMismatchError, match=f"{which} should have 3 elements"):
        b(x)
    assert_state_unchanged(b, before)


# --------------------------------------------------------------------------- parameters not in the dicts
class _Positive(nn.Module):
    def forward(self, w):
        return torch.nn.functional.softplus(w)


class _Doubled(nn.Module):
    def forward(self, v):
        return 2 * v


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_parametrized_weight_bias_and_buffer_as_torch(training, memory_format):
    """torch.nn.utils.parametrize moves a tensor out of ``_parameters``/``_buffers`` into a property.

    The layers read their tensors from those dicts (fewer Python calls per forward); a
    parametrized one must still be read through the property, as torch's layer reads it.
    """
    from torch.nn.utils import parametrize

    layers = []
    for cls in (nn.BatchNorm2d, bnkit.BatchNorm2d):
        torch.manual_seed(0)
        layer = cls(3)
        with torch.no_grad():
            layer.weight.uniform_(-1, 1)
            layer.bias.uniform_(-1, 1)
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)
        parametrize.register_parametrization(layer, "weight", _Positive())
        parametrize.register_parametrization(layer, "bias", _Doubled())
        if not training:  # a parametrized buffer is recomputed per read: the training update would be lost
            parametrize.register_parametrization(layer, "running_var", _Doubled())
        layers.append(layer.train(training))
    x = torch.randn(4, 3, 5, 5).to(memory_format=memory_format).requires_grad_()
    outs = []
    for layer in layers:
        y = layer(x)
        (gx,) = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum(), x)
        grads = torch.autograd.grad(
            layer(x).pow(2).sum(), [layer.parametrizations.weight.original, layer.parametrizations.bias.original]
        )
        outs.append((y.detach(), gx, grads, layer.running_mean.clone()))
    (yt, gxt, gt, rmt), (yb, gxb, gb, rmb) = outs
    torch.testing.assert_close(yb, yt)
    torch.testing.assert_close(gxb, gxt)
    for a, b in zip(gb, gt):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(rmb, rmt)
