"""Audit: masked BN for padded sequences through every tool a user training padded sequences would take.

The oracle is torch's own ``nn.BatchNorm1d`` applied to the valid tokens only (``x[mask]``
as an ``(n, C)`` batch), run through the same tool where torch supports it: the output on
valid positions, the gradients (w.r.t. the valid inputs, weight, bias), the running
statistics (unbiased variance with the valid count ``n``) and ``num_batches_tracked``.
Where torch has no equivalent (padded positions' output and gradient, Batch Renorm's
``(r, d)``), float64 formulas written out here from docs/training-loops.md
("Padded sequences: masked BN") are the oracle.

Tools: eager (C++ kernels and the portable ``torch`` backend), gradcheck, torch.compile,
torch.export, torch.func, torch.utils.checkpoint, accumulate_stats, preserve_stats,
recalibrate, SyncBatchNorm over 2 gloo ranks, autocast, no_grad/inference_mode, eval mode,
and a small Transformer-style model trained with SGD.
"""

from __future__ import annotations

import copy
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import bnkit
import bnkit.functional as BF

F32, F64 = torch.float32, torch.float64
TOL32 = dict(rtol=1e-5, atol=1e-5)
TOL64 = dict(rtol=1e-10, atol=1e-10)
C = 5


def _tol(dtype):
    return TOL64 if dtype == F64 else TOL32


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def backend(model_backend):
    """Each test once per backend a model runs on (conftest's model_backend)."""
    return model_backend


def _lengths_mask(lengths, length):
    return torch.arange(length) < torch.as_tensor(lengths)[:, None]


def _seq_batch(lengths, length, seed, dtype=F32, pad=1e3):
    """(N, L, C) token-major data with padding filled with a large offset (it would show if it leaked)."""
    g = _gen(seed)
    x = torch.randn(len(lengths), length, C, generator=g, dtype=dtype) * 2 + 1
    mask = _lengths_mask(lengths, length)
    x[~mask] = x[~mask] + pad
    return x, mask


def _random_lengths(n, length, seed):
    """Random lengths with one all-valid and one zero-length sequence."""
    g = _gen(seed)
    lengths = torch.randint(1, length + 1, (n,), generator=g)
    lengths[0] = length
    lengths[1] = 0
    return lengths


# Layouts: (make_layer, layer_input, mask, to_tokens), to_tokens maps a tensor shaped like the
# layer input to a token-major view whose leading dims are the mask's.
def _layout(kind, seed, dtype=F32, n=5, length=6):
    lengths = _random_lengths(n, length, seed)
    if kind == "nlc":  # (N, L, C), axis=-1
        x, mask = _seq_batch(lengths, length, seed, dtype)
        return (lambda **kw: bnkit.BatchNorm(C, axis=-1, dtype=dtype, **kw)), x, mask, (lambda t: t)
    if kind == "ncl":  # (N, C, L) contiguous, BatchNorm1d
        x, mask = _seq_batch(lengths, length, seed, dtype)
        return (lambda **kw: bnkit.BatchNorm1d(C, dtype=dtype, **kw)), x.transpose(1, 2).contiguous(), mask, (
            lambda t: t.transpose(1, 2))
    if kind == "ncl_view":  # (N, C, L) seen on (N, L, C) memory: channels innermost (channels-last-like)
        x, mask = _seq_batch(lengths, length, seed, dtype)
        return (lambda **kw: bnkit.BatchNorm1d(C, dtype=dtype, **kw)), x.transpose(1, 2), mask, (
            lambda t: t.transpose(1, 2))
    if kind == "nlc_strided":  # every other position of a wider batch, and a strided mask
        x, mask = _seq_batch(lengths * 2, 2 * length, seed, dtype)
        return (lambda **kw: bnkit.BatchNorm(C, axis=-1, dtype=dtype, **kw)), x[:, ::2], mask[:, ::2], (lambda t: t)
    if kind == "nchw_channels_last":  # (N, C, H, W) channels_last, (N, H, W) mask
        g = _gen(seed)
        x = (torch.randn(n, C, 3, 2, generator=g, dtype=dtype) * 2 + 1).contiguous(memory_format=torch.channels_last)
        mask = torch.rand(n, 3, 2, generator=g) > 0.4
        mask[0] = True
        mask[1] = False
        with torch.no_grad():
            x.permute(0, 2, 3, 1)[~mask] += 1e3
        return (lambda **kw: bnkit.BatchNorm2d(C, dtype=dtype, **kw)), x, mask, (lambda t: t.permute(0, 2, 3, 1))
    if kind == "tokens_2d":  # already flattened tokens (T, C) with a (T,) mask
        x, mask = _seq_batch(lengths, length, seed, dtype)
        return (lambda **kw: bnkit.BatchNorm1d(C, dtype=dtype, **kw)), x.reshape(-1, C), mask.reshape(-1), (
            lambda t: t)
    raise ValueError(kind)


LAYOUTS = ["nlc", "ncl", "ncl_view", "nlc_strided", "nchw_channels_last", "tokens_2d"]


def _set_affine(layer, seed, dtype):
    g = _gen(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(layer.weight.shape, generator=g, dtype=dtype) + 0.5)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g, dtype=dtype))


def _torch_twin(layer, dtype, **kw):
    """torch's BatchNorm1d with the bnkit layer's parameters, buffers and momentum."""
    ref = nn.BatchNorm1d(C, momentum=layer.momentum, eps=layer.eps, dtype=dtype, **kw)
    ref.load_state_dict(layer.state_dict())
    return ref


def _assert_buffers(ours, ref, tol):
    torch.testing.assert_close(ours.running_mean, ref.running_mean, **tol)
    torch.testing.assert_close(ours.running_var, ref.running_var, **tol)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)


def _padded_oracle(tokens, padded_x, g_pad, w, b, eps):
    """float64: padded entries normalized with the valid statistics; their gradient dy * w / sqrt(var + eps)."""
    t = tokens.detach().to(F64)
    mean, var = t.mean(0), t.var(0, unbiased=False)
    std = torch.sqrt(var + eps)
    w64, b64 = w.detach().to(F64), b.detach().to(F64)
    return (padded_x.detach().to(F64) - mean) / std * w64 + b64, g_pad.to(F64) * w64 / std


def _like_layout(values, like):
    """``values`` in a tensor with exactly ``like``'s strides and storage offset (strided views included)."""
    flat = torch.zeros(like.untyped_storage().nbytes() // like.element_size(), dtype=like.dtype)
    view = flat.as_strided(like.shape, like.stride(), like.storage_offset())
    view.copy_(values)
    return view


class _StridedLeaf:
    """A view with ``x``'s exact strides onto a leaf that requires grad; ``grad`` is the view's gradient."""

    def __init__(self, x):
        self.leaf = _like_layout(x.detach(), x)._base.detach().requires_grad_()
        self.args = (x.shape, x.stride(), x.storage_offset())
        self.view = self.leaf.as_strided(*self.args)

    @property
    def grad(self):
        return self.leaf.grad.as_strided(*self.args)


def _step_and_compare(layer, ref, x, mask, to_tokens, seed, dtype, check_padding=True, call=None):
    """One training call of ``layer(x, mask)`` against ``ref`` on the valid tokens, forward and backward."""
    tol = _tol(dtype)
    xa = _StridedLeaf(x)  # the layer sees x's very layout (non-contiguous, channels-last, strided)
    assert xa.view.stride() == x.stride()
    xr = x.detach().clone().requires_grad_()
    y = (call or layer)(xa.view, mask)
    assert y.shape == x.shape
    gy = torch.randn(y.shape, generator=_gen(seed), dtype=dtype)
    y.backward(gy)
    tokens = to_tokens(xr)[mask]
    y_ref = ref(tokens)
    y_ref.backward(to_tokens(gy)[mask])
    torch.testing.assert_close(to_tokens(y)[mask], y_ref, **tol)
    torch.testing.assert_close(to_tokens(xa.grad)[mask], to_tokens(xr.grad)[mask], **tol)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, **tol)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad, **tol)
    if check_padding and bool((~mask).any()):
        y_pad, g_pad = _padded_oracle(tokens, to_tokens(x)[~mask], to_tokens(gy)[~mask], layer.weight, layer.bias,
                                      layer.eps)
        torch.testing.assert_close(to_tokens(y)[~mask].to(F64), y_pad, **tol)
        torch.testing.assert_close(to_tokens(xa.grad)[~mask].to(F64), g_pad, **tol)
    layer.weight.grad = layer.bias.grad = ref.weight.grad = ref.bias.grad = None
    return y


# =========================================================================== plain eager
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_eager_matches_torch_on_the_valid_tokens(backend, kind, momentum):
    make, x, mask, to_tokens = _layout(kind, seed=1)
    layer = make(momentum=momentum)
    _set_affine(layer, 2, F32)
    ref = _torch_twin(layer, F32)
    if kind in ("ncl_view", "nlc_strided"):
        assert not x.is_contiguous()
    for step in range(2):
        xs = _like_layout(x * (1 + step) - step, x)
        y = _step_and_compare(layer, ref, xs, mask, to_tokens, seed=10 + step, dtype=F32)
        _assert_buffers(layer, ref, TOL32)
        if kind == "nchw_channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last)


def test_eager_float64_and_mask_keyword(backend):
    make, x, mask, to_tokens = _layout("ncl", seed=3, dtype=F64)
    layer = make()
    _set_affine(layer, 4, F64)
    ref = _torch_twin(layer, F64)
    for step in range(2):
        _step_and_compare(layer, ref, x - step, mask, to_tokens, seed=5 + step, dtype=F64,
                          call=lambda a, m: layer(a, mask=m))
        _assert_buffers(layer, ref, TOL64)


def test_all_valid_mask_equals_torch_without_mask(backend):
    g = _gen(6)
    x = torch.randn(4, C, 7, generator=g) * 3 - 1
    mask = torch.ones(4, 7, dtype=torch.bool)
    ours = bnkit.BatchNorm1d(C)
    _set_affine(ours, 7, F32)
    ref = _torch_twin(ours, F32)
    xa, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    gy = torch.randn(x.shape, generator=g)
    y = ours(xa, mask)
    y.backward(gy)
    y_ref = ref(xr)  # torch on the whole (N, C, L) batch
    y_ref.backward(gy)
    torch.testing.assert_close(y, y_ref, **TOL32)
    torch.testing.assert_close(xa.grad, xr.grad, **TOL32)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **TOL32)
    _assert_buffers(ours, ref, TOL32)


def _grad_or_zero(t, like):
    return torch.zeros_like(like) if t is None else t


def test_all_padding_batch_is_torch_empty_batch(backend):
    x, mask = _seq_batch([3, 4, 2], 5, seed=8)
    ours = bnkit.BatchNorm(C, axis=-1)
    _set_affine(ours, 9, F32)
    ref = _torch_twin(ours, F32)
    ours(x, mask)
    ref(x[mask])
    empty = torch.zeros_like(mask)
    xa, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = ours(xa, empty)
    y_ref = ref(xr[empty])  # a (0, C) batch: counted, statistics untouched
    assert y_ref.shape == (0, C)
    _assert_buffers(ours, ref, TOL32)
    # the docs: the output is bias (everywhere) and no gradient flows
    torch.testing.assert_close(y, ours.bias.detach().expand_as(y), rtol=0, atol=0)
    if y.requires_grad:
        (y * torch.randn(y.shape, generator=_gen(1))).sum().backward()
    y_ref.sum().backward()
    assert torch.count_nonzero(_grad_or_zero(xa.grad, x)) == 0
    torch.testing.assert_close(_grad_or_zero(ours.weight.grad, ours.weight), ref.weight.grad, rtol=0, atol=0)


def test_one_valid_token_in_the_whole_batch(backend):
    x, _ = _seq_batch([4, 4, 4], 4, seed=10)
    one = torch.zeros(3, 4, dtype=torch.bool)
    one[1, 2] = True
    ours = bnkit.BatchNorm(C, axis=-1)
    ref = nn.BatchNorm1d(C)
    ours(x, torch.ones_like(one))
    ref(x.reshape(-1, C))
    before = copy.deepcopy(ours.state_dict())
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training") as theirs_err:
        ref(x[one])
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        ours(x, one)
    assert theirs_err.type is ValueError
    # torch has counted the failed batch; bnkit changes nothing (docs/differences.md, "torch's layer has already counted")
    assert int(ref.num_batches_tracked) == 2
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in before.items())
    # tiny_batch="running": the eval output (running statistics everywhere), nothing updated, one warning
    tiny = bnkit.BatchNorm(C, axis=-1, tiny_batch="running")
    tiny.load_state_dict(before)
    with pytest.warns(RuntimeWarning, match="one valid entry"):
        y = tiny(x, one)
    ref_eval = copy.deepcopy(ref).eval()
    ref_eval.load_state_dict(before)
    torch.testing.assert_close(y, ref_eval(x.reshape(-1, C)).reshape(x.shape), **TOL32)
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("kind", ["nlc", "ncl_view"])
def test_gradcheck_float64(backend, kind):
    """The valid outputs are a differentiable function of (x, weight, bias) whose Jacobian is torch's; the padded
    outputs, by the docs' definition, pass gradient to their own input only (statistics, weight, bias held constant)."""
    make, x, mask, to_tokens = _layout(kind, seed=11, dtype=F64, n=3, length=4)
    layer = make()
    w = (torch.rand(C, generator=_gen(12), dtype=F64) + 0.5).requires_grad_()
    b = torch.randn(C, generator=_gen(13), dtype=F64).requires_grad_()
    axis = -1 if kind == "nlc" else 1

    def valid(inp, weight, bias):
        return to_tokens(BF.batch_norm_core(inp, None, None, weight, bias, True, axis=axis, mask=mask))[mask]

    xin = x.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(valid, (xin, w, b))
    assert torch.autograd.gradgradcheck(valid, (xin, w, b))
    # torch's Jacobian on the gathered tokens is the same one
    jac_ours = torch.autograd.functional.jacobian(lambda t: valid(t, w, b), xin)
    jac_ref = torch.autograd.functional.jacobian(
        lambda t: F.batch_norm(to_tokens(t)[mask], None, None, w, b, training=True), xin)
    torch.testing.assert_close(jac_ours, jac_ref, **TOL64)
    # the padded outputs as a function of the padded inputs alone
    pad_idx = (~mask).nonzero(as_tuple=True)

    def padded(pad_values):
        full = to_tokens(x.detach().clone()).clone()
        full = full.index_put(pad_idx, pad_values)
        inp = full if kind == "nlc" else full.transpose(1, 2)
        return to_tokens(layer(inp, mask))[~mask]

    assert torch.autograd.gradcheck(padded, (to_tokens(x)[~mask].detach().clone().requires_grad_(),))


def test_functional_batch_norm_mask_matches_torch(backend):
    x, mask = _seq_batch([5, 2, 0, 3], 5, seed=14)
    xc = x.transpose(1, 2)  # (N, C, L)
    rm, rv = torch.randn(C, generator=_gen(15)), torch.rand(C, generator=_gen(16)) + 0.5
    w, b = torch.rand(C, generator=_gen(17)) + 0.5, torch.randn(C, generator=_gen(18))
    for training in (True, False):
        ours_rm, ours_rv, ref_rm, ref_rv = rm.clone(), rv.clone(), rm.clone(), rv.clone()
        y = BF.batch_norm(xc, ours_rm, ours_rv, w, b, training=training, momentum=0.3, mask=mask)
        if training:
            y_ref = F.batch_norm(x[mask], ref_rm, ref_rv, w, b, training=True, momentum=0.3)
            torch.testing.assert_close(y.transpose(1, 2)[mask], y_ref, **TOL32)
        else:  # eval ignores the mask
            y_ref = F.batch_norm(xc, ref_rm, ref_rv, w, b, training=False)
            torch.testing.assert_close(y, y_ref, **TOL32)
        torch.testing.assert_close(ours_rm, ref_rm, **TOL32)
        torch.testing.assert_close(ours_rv, ref_rv, **TOL32)


# =========================================================================== oracle modules
class GatherBN(nn.Module):
    """The oracle of a masked layer on (N, L, C): gather the valid tokens, torch's BatchNorm1d, scatter back (zeros)."""

    def __init__(self, bn):
        super().__init__()
        self.bn = bn

    def forward(self, h, mask):
        out = torch.zeros_like(h)
        return out.index_put(mask.nonzero(as_tuple=True), self.bn(h[mask]))


class HandRenorm(nn.Module):
    """Batch Renorm (convention "torch", fixed schedule) on (n, C) tokens, written out from the docs in float64."""

    def __init__(self, layer):
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach().to(F64).clone())
        self.bias = nn.Parameter(layer.bias.detach().to(F64).clone())
        self.register_buffer("running_mean", layer.running_mean.to(F64).clone())
        self.register_buffer("running_var", layer.running_var.to(F64).clone())
        self.register_buffer("num_batches_tracked", layer.num_batches_tracked.clone())
        self.eps, self.momentum, self.r_max, self.d_max = layer.eps, layer.momentum, layer.r_max, layer.d_max

    def forward(self, t):
        n = t.shape[0]
        mean_b, var_b = t.mean(0), t.var(0, unbiased=False)
        sigma_b = torch.sqrt(var_b + self.eps)
        sigma = torch.sqrt(self.running_var + self.eps)
        r = torch.clamp(sigma_b / sigma, 1 / self.r_max, self.r_max).detach()
        d = torch.clamp((mean_b - self.running_mean) / sigma, -self.d_max, self.d_max).detach()
        y = ((t - mean_b) / sigma_b * r + d) * self.weight + self.bias
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean_b)
            self.running_var.mul_(1 - m).add_(m * var_b * n / (n - 1))
            self.num_batches_tracked += 1
        return y


def _ghost_oracle(h, mask, vbs, ref):
    """Ghost BN with a mask: each virtual batch of sequences normalized with its own valid tokens (torch's
    F.batch_norm); ``ref``'s running statistics updated once with all the valid tokens."""
    outs = []
    for lo in range(0, h.shape[0], vbs):
        hc, mc = h[lo:lo + vbs], mask[lo:lo + vbs]
        out = torch.zeros_like(hc)
        if bool(mc.any()):
            out = out.index_put(mc.nonzero(as_tuple=True),
                                F.batch_norm(hc[mc], None, None, ref.weight, ref.bias, True, 0.0, ref.eps))
        outs.append(out)
    with torch.no_grad():
        F.batch_norm(h[mask].detach(), ref.running_mean, ref.running_var, None, None, True, ref.momentum, ref.eps)
        ref.num_batches_tracked += 1
    return torch.cat(outs)


def _variant(name, dtype=F32):
    if name == "BatchNorm":
        return bnkit.BatchNorm(C, axis=-1, dtype=dtype)
    if name == "BatchRenorm":
        return bnkit.BatchRenorm(C, axis=-1, schedule="fixed", r_max=1.3, d_max=0.4, momentum=0.2, dtype=dtype)
    if name == "GhostBatchNorm":
        return bnkit.GhostBatchNorm(C, virtual_batch_size=2, axis=-1, dtype=dtype)
    raise ValueError(name)


def _variant_oracle(name, layer, dtype):
    """A callable (h, mask) -> oracle output on the valid tokens (token-major), with the oracle's state."""
    if name == "BatchNorm":
        ref = _torch_twin(layer, dtype)
        return ref, lambda h, m: ref(h[m])
    if name == "BatchRenorm":
        ref = HandRenorm(layer)
        return ref, lambda h, m: ref(h[m].to(F64))
    ref = _torch_twin(layer, dtype)
    return ref, lambda h, m: _ghost_oracle(h, m, layer.virtual_batch_size, ref)[m]


def _renorm_padded(ref_before, tokens, x_pad):
    """Batch Renorm's padded outputs: normalized with the valid statistics and (r, d) (float64)."""
    t = tokens.detach().to(F64)
    mean_b, var_b = t.mean(0), t.var(0, unbiased=False)
    sigma_b = torch.sqrt(var_b + ref_before.eps)
    sigma = torch.sqrt(ref_before.running_var + ref_before.eps)
    r = torch.clamp(sigma_b / sigma, 1 / ref_before.r_max, ref_before.r_max)
    d = torch.clamp((mean_b - ref_before.running_mean) / sigma, -ref_before.d_max, ref_before.d_max)
    return ((x_pad.to(F64) - mean_b) / sigma_b * r + d) * ref_before.weight.detach() + ref_before.bias.detach()


@pytest.mark.parametrize("name", ["BatchRenorm", "GhostBatchNorm"])
def test_variants_eager_match_their_oracles(backend, name):
    layer = _variant(name, F64)
    _set_affine(layer, 20, F64)
    ref, oracle = _variant_oracle(name, layer, F64)
    for step, lengths in enumerate([[6, 0, 3, 5, 2], [1, 6, 0, 0, 4], [6, 6, 2, 0, 3]]):
        x, mask = _seq_batch(lengths, 6, seed=21 + step, dtype=F64)
        x = x * (1 + step)
        before = copy.deepcopy(ref)
        xa = x.clone().requires_grad_()
        xr = x.clone().requires_grad_()
        y = layer(xa, mask)
        gy = torch.randn(y.shape, generator=_gen(30 + step), dtype=F64)
        y.backward(gy)
        y_ref = oracle(xr, mask)
        y_ref.backward(gy[mask])
        torch.testing.assert_close(y[mask], y_ref, **TOL64)
        torch.testing.assert_close(xa.grad[mask], xr.grad[mask], **TOL64)
        torch.testing.assert_close(layer.weight.grad, ref.weight.grad, **TOL64)
        torch.testing.assert_close(layer.bias.grad, ref.bias.grad, **TOL64)
        torch.testing.assert_close(layer.running_mean, ref.running_mean, **TOL64)
        torch.testing.assert_close(layer.running_var, ref.running_var, **TOL64)
        assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked) == step + 1
        if name == "BatchRenorm":
            torch.testing.assert_close(y[~mask], _renorm_padded(before, x[mask], x[~mask]), **TOL64)
        layer.weight.grad = layer.bias.grad = ref.weight.grad = ref.bias.grad = None


def test_ghost_virtual_batch_with_one_valid_token_raises_and_changes_nothing(backend):
    layer = _variant("GhostBatchNorm")
    x, mask = _seq_batch([1, 0, 6, 5], 6, seed=40)  # the first virtual batch holds one valid token
    before = copy.deepcopy(layer.state_dict())
    with pytest.raises(ValueError, match="single valid value"):
        layer(x, mask)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nn.BatchNorm1d(C)(x[:2][mask[:2]])  # torch on that virtual batch's tokens
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())


# =========================================================================== the small Transformer-style model
class TokenNet(nn.Module):
    """Linear -> masked BN -> ReLU -> Linear on (N, L, D) tokens; ``bn`` is a bnkit layer or a GatherBN oracle."""

    def __init__(self, bn, channels_first=False, d_in=4, d_out=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin1 = nn.Linear(d_in, C)
        self.bn = bn
        self.lin2 = nn.Linear(C, d_out)
        self.channels_first = channels_first

    def forward(self, x, mask):
        h = self.lin1(x)
        if self.channels_first:  # bnkit.BatchNorm1d on (N, C, L)
            h = self.bn(h.transpose(1, 2), mask).transpose(1, 2)
        else:
            h = self.bn(h, mask)
        return self.lin2(torch.relu(h))


def _masked_loss(out, target, mask):
    return ((out - target) ** 2)[mask].mean()


def _nets(kind="nlc", variant="BatchNorm", dtype=F32):
    """(bnkit net, oracle net) with the same weights."""
    if variant == "BatchNorm" and kind == "ncl":
        bn = bnkit.BatchNorm1d(C, dtype=dtype)
    else:
        bn = _variant(variant, dtype)
    ours = TokenNet(bn, channels_first=(kind == "ncl")).to(dtype)
    if variant == "BatchRenorm":
        oracle_bn = _HandRenormTokens(HandRenorm(bn))
    elif variant == "GhostBatchNorm":
        oracle_bn = _GhostTokens(_torch_twin(bn, dtype), bn.virtual_batch_size)
    else:
        oracle_bn = GatherBN(_torch_twin(bn, dtype))
    ref = TokenNet(oracle_bn).to(dtype)
    ref.lin1.load_state_dict(ours.lin1.state_dict())
    ref.lin2.load_state_dict(ours.lin2.state_dict())
    return ours, ref


class _HandRenormTokens(nn.Module):
    def __init__(self, hand):
        super().__init__()
        self.bn = hand

    def forward(self, h, mask):
        out = torch.zeros_like(h)
        return out.index_put(mask.nonzero(as_tuple=True), self.bn(h[mask].to(F64)).to(h.dtype))


class _GhostTokens(nn.Module):
    def __init__(self, ref, vbs):
        super().__init__()
        self.bn, self.vbs = ref, vbs

    def forward(self, h, mask):
        return _ghost_oracle(h, mask, self.vbs, self.bn)


def _token_batch(seed, n=4, length=6, d_in=4, d_out=3, dtype=F32, lengths=None):
    g = _gen(seed)
    if lengths is None:
        lengths = _random_lengths(n, length, seed)
    mask = _lengths_mask(lengths, length)
    x = torch.randn(len(lengths), length, d_in, generator=g, dtype=dtype)
    x[~mask] = 7.0  # a padding value
    target = torch.randn(len(lengths), length, d_out, generator=g, dtype=dtype)
    return x, mask, target


def _bn_of(net):
    """The layer holding the statistics (the bnkit layer, or the oracle's torch/hand layer)."""
    return net.bn.bn if hasattr(net.bn, "bn") else net.bn


def _train_like_oracle(run, ours, ref, seed, steps=2):
    """``steps`` forward+backward calls of ``run`` (``ours``, or a wrapper of it) and ``ref`` on the same token
    batches, ``ours`` compared with ``ref`` after each."""
    for step in range(steps):
        x, mask, target = _token_batch(seed + step)
        for net in (run, ref):
            net.zero_grad()
            _masked_loss(net(x, mask), target, mask).backward()
        _assert_nets(ours, ref, TOL32)


def _assert_nets(ours, ref, tol, grads=True):
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.to(q.dtype), q, **tol, msg=name)
        if grads:
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                torch.testing.assert_close(p.grad.to(q.dtype), q.grad, **tol, msg=f"grad of {name}")
    a, b = _bn_of(ours), _bn_of(ref)
    torch.testing.assert_close(a.running_mean.to(b.running_mean.dtype), b.running_mean, **tol)
    torch.testing.assert_close(a.running_var.to(b.running_var.dtype), b.running_var, **tol)
    assert int(a.num_batches_tracked) == int(b.num_batches_tracked)


@pytest.mark.parametrize("kind", ["nlc", "ncl"])
def test_token_model_trained_with_sgd_matches_gathering_oracle(backend, kind):
    ours, ref = _nets(kind)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ours, ref)]
    for step in range(4):
        x, mask, target = _token_batch(100 + step)
        for net, opt in zip((ours, ref), opts):
            opt.zero_grad()
            _masked_loss(net(x, mask), target, mask).backward()
        _assert_nets(ours, ref, TOL32)
        for opt in opts:
            opt.step()
    _assert_nets(ours, ref, TOL32, grads=False)
    # eval: the mask is ignored, the running statistics on every position
    ours.eval()
    ref.eval()
    x, mask, _ = _token_batch(200)
    h = ref.lin1(x)
    expected = ref.lin2(torch.relu(_bn_of(ref)(h.reshape(-1, C)).reshape(h.shape)))
    torch.testing.assert_close(ours(x, mask), expected, **TOL32)


# =========================================================================== no_grad, inference_mode, autocast, eval
@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode])
def test_training_forward_without_grad_updates_once_like_torch(backend, ctx):
    ours, ref = _nets()
    for step in range(2):
        x, mask, _ = _token_batch(300 + step)
        with ctx():
            y, y_ref = ours(x, mask), ref(x, mask)
        torch.testing.assert_close(y[mask], y_ref[mask], **TOL32)
        _assert_nets(ours, ref, TOL32, grads=False)


def test_autocast_bfloat16_matches_torch(backend):
    ours, ref = _nets()
    for step in range(2):
        x, mask, target = _token_batch(310 + step)
        outs = []
        for net in (ours, ref):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                h = net.lin1(x)
                assert h.dtype == torch.bfloat16
                hn = net.bn(h, mask)
                outs.append((h, hn))
            hn.float()[mask].sum().backward()
        (h, y), (h_ref, y_ref) = outs
        assert y.dtype == y_ref.dtype == torch.bfloat16
        torch.testing.assert_close(h, h_ref, rtol=0, atol=0)
        # bfloat16 outputs: one rounding of the same float32 result (torch's default bf16 tolerance)
        torch.testing.assert_close(y[mask], y_ref[mask], rtol=1.6e-2, atol=1e-5)
        # float32 statistics accumulated from the same bfloat16 inputs: float32 tolerance
        _assert_nets(ours, ref, dict(rtol=1.6e-2, atol=1e-5), grads=True)
        a, b = _bn_of(ours), _bn_of(ref)
        torch.testing.assert_close(a.running_mean, b.running_mean, **TOL32)
        torch.testing.assert_close(a.running_var, b.running_var, **TOL32)
        for net in (ours, ref):
            net.zero_grad()


@pytest.mark.parametrize("kind", ["nlc", "ncl_view", "nchw_channels_last"])
def test_eval_ignores_the_mask_like_torch_eval(backend, kind):
    make, x, mask, to_tokens = _layout(kind, seed=320)
    layer = make()
    _set_affine(layer, 321, F32)
    layer(x, mask)  # one training step: non-trivial running statistics
    ref = _torch_twin(layer, F32).eval()
    layer.eval()
    before = copy.deepcopy(layer.state_dict())
    xa, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = layer(xa, mask)
    tokens = to_tokens(xr).reshape(-1, C)
    y_ref = ref(tokens)
    gy = torch.randn(y.shape, generator=_gen(322))
    y.backward(gy)
    y_ref.backward(to_tokens(gy).reshape(-1, C))
    torch.testing.assert_close(to_tokens(y).reshape(-1, C), y_ref, **TOL32)
    torch.testing.assert_close(xa.grad, xr.grad, **TOL32)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, **TOL32)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad, **TOL32)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())


def test_eval_without_running_stats_uses_masked_batch_statistics(backend):
    x, mask = _seq_batch([5, 0, 2, 4], 5, seed=330)
    ours = bnkit.BatchNorm(C, axis=-1, track_running_stats=False).eval()
    ref = nn.BatchNorm1d(C, track_running_stats=False).eval()
    torch.testing.assert_close(ours(x, mask)[mask], ref(x[mask]), **TOL32)


# =========================================================================== checkpointing
class CheckpointedTokenNet(nn.Module):
    def __init__(self, net, use_reentrant):
        super().__init__()
        self.net, self.use_reentrant = net, use_reentrant

    def forward(self, x, mask):
        return checkpoint(self.net, x, mask, use_reentrant=self.use_reentrant)


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("variant", ["BatchNorm", "BatchRenorm", "GhostBatchNorm"])
def test_checkpoint_recompute_does_not_update_twice(backend, variant, use_reentrant):
    dtype = F32 if variant == "BatchNorm" else F64
    tol = _tol(dtype)
    ours, ref = _nets(variant=variant, dtype=dtype)
    wrapped = CheckpointedTokenNet(ours, use_reentrant)
    for step, lengths in enumerate([[6, 0, 3, 5, 2], [2, 6, 0, 4, 3], [6, 6, 2, 0, 5]]):
        x, mask, target = _token_batch(400 + step, dtype=dtype, lengths=lengths)
        x.requires_grad_(use_reentrant)  # reentrant checkpointing needs an input that requires grad
        for net in (wrapped, ref):
            net.zero_grad()
            _masked_loss(net(x, mask), target, mask).backward()
        _assert_nets(ours, ref, tol)
        assert int(_bn_of(ours).num_batches_tracked) == step + 1
        with torch.no_grad():
            for net in (ours, ref):
                for p in net.parameters():
                    p -= 0.1 * p.grad


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpoint_sequential_of_masked_layer(backend, use_reentrant):
    """The masked layer itself checkpointed (as a user checkpoints a block): gradients and one update, as torch on
    the valid tokens without checkpointing."""
    x, mask = _seq_batch([6, 0, 3, 5], 6, seed=410)
    layer = bnkit.BatchNorm(C, axis=-1)
    _set_affine(layer, 411, F32)
    ref = _torch_twin(layer, F32)
    _step_and_compare(layer, ref, x, mask, lambda t: t, seed=412, dtype=F32,
                      call=lambda a, m: checkpoint(layer, a, m, use_reentrant=use_reentrant))
    _assert_buffers(layer, ref, TOL32)


# =========================================================================== accumulate_stats and preserve_stats
def _micro_batches(seed):
    """One optimizer step of padded micro-batches of different sizes and lengths, one of them all padding."""
    specs = [([6, 2, 0], 6), ([3, 3, 1, 4], 4), ([0, 0], 5), ([7, 1, 5, 2, 6], 7)]
    return [_seq_batch(lengths, length, seed + i) for i, (lengths, length) in enumerate(specs)]


@pytest.mark.parametrize("momentum", [0.1, None])
def test_accumulate_stats_one_update_equal_to_torch_on_all_valid_tokens(backend, momentum):
    ours = bnkit.BatchNorm(C, axis=-1, momentum=momentum)
    _set_affine(ours, 500, F32)
    ref = _torch_twin(ours, F32)  # the outputs, micro-batch by micro-batch
    step_ref = _torch_twin(ours, F32)  # the statistics: one forward over the step's valid tokens
    for step in range(3):
        micro = _micro_batches(510 + 10 * step)
        with bnkit.accumulate_stats(ours):
            for x, mask in micro:
                before = copy.deepcopy(ours.state_dict())
                xa, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
                y = ours(xa, mask)
                gy = torch.randn(y.shape, generator=_gen(step))
                y.backward(gy)
                # the normalization of each micro-batch: its own valid tokens
                y_ref = F.batch_norm(xr[mask], None, None, ref.weight, ref.bias, True, 0.0, ref.eps)
                y_ref.backward(gy[mask])
                torch.testing.assert_close(y[mask], y_ref, **TOL32)
                torch.testing.assert_close(xa.grad[mask], xr.grad[mask], **TOL32)
                assert all(torch.equal(v, ours.state_dict()[k]) for k, v in before.items())  # nothing written yet
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **TOL32)  # accumulated over the micro-batches
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, **TOL32)
        step_ref(torch.cat([x[m] for x, m in micro]))
        _assert_buffers(ours, step_ref, TOL32)
        assert int(ours.num_batches_tracked) == step + 1
        ours.zero_grad()
        ref.zero_grad()


@pytest.mark.parametrize("variant", ["BatchRenorm", "GhostBatchNorm", "ncl", "SharedBatchNorm"])
def test_accumulate_stats_variants(backend, variant):
    if variant == "SharedBatchNorm":
        ours = bnkit.SharedBatchNorm(C, 2, axis=-1)
        refs = [nn.BatchNorm1d(C) for _ in range(2)]
    elif variant == "ncl":
        ours = bnkit.BatchNorm1d(C)
        refs = [nn.BatchNorm1d(C)]
    else:
        ours = _variant(variant)
        refs = [nn.BatchNorm1d(C, momentum=ours.momentum)]
    micro = _micro_batches(520)
    sites = [i % len(refs) for i in range(len(micro))]
    with bnkit.accumulate_stats(ours):
        for (x, mask), site in zip(micro, sites):
            if variant == "SharedBatchNorm":
                ours(x, site, mask)
            elif variant == "ncl":
                ours(x.transpose(1, 2), mask)
            else:
                ours(x, mask)
    for s, ref in enumerate(refs):
        ref(torch.cat([x[m] for (x, m), site in zip(micro, sites) if site == s]))
        rm = ours.running_mean if len(refs) == 1 else ours.running_mean[s]
        rv = ours.running_var if len(refs) == 1 else ours.running_var[s]
        nbt = ours.num_batches_tracked if len(refs) == 1 else ours.num_batches_tracked[s]
        torch.testing.assert_close(rm, ref.running_mean, **TOL32)
        torch.testing.assert_close(rv, ref.running_var, **TOL32)
        assert int(nbt) == int(ref.num_batches_tracked) == 1


def test_accumulate_stats_with_checkpointed_micro_batches_and_a_model(backend):
    ours, ref = _nets()
    wrapped = CheckpointedTokenNet(ours, use_reentrant=False)
    micro = [_token_batch(530 + i, n=3 + i) for i in range(3)]
    with bnkit.accumulate_stats(wrapped):
        for x, mask, target in micro:
            _masked_loss(wrapped(x, mask), target, mask).backward()
    # the oracle: the step's gradients per micro-batch (batch statistics of each), the statistics of all tokens
    torch_bn = _bn_of(ref)
    for x, mask, target in micro:
        h = ref.lin1(x)
        hn = torch.zeros_like(h).index_put(mask.nonzero(as_tuple=True),
                                           F.batch_norm(h[mask], None, None, torch_bn.weight, torch_bn.bias, True))
        _masked_loss(ref.lin2(torch.relu(hn)), target, mask).backward()
    with torch.no_grad():
        torch_bn(torch.cat([ref.lin1(x)[m] for x, m, _ in micro]))
    _assert_nets(ours, ref, TOL32)


def test_preserve_stats_masked_forwards_change_nothing(backend):
    ours, ref = _nets()
    x, mask, target = _token_batch(540)
    ours(x, mask)
    ref(x, mask)
    before = copy.deepcopy(ours.state_dict())
    with bnkit.preserve_stats(ours):
        for i in range(3):
            x, mask, target = _token_batch(541 + i)
            _masked_loss(ours(x, mask), target, mask).backward()
            with bnkit.preserve_stats(ref.bn.bn):  # torch's layer through the same tool
                _masked_loss(ref(x, mask), target, mask).backward()
    after = ours.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    _assert_nets(ours, ref, TOL32)  # same gradients (batch statistics), same untouched buffers
    # an exception inside the block restores as well
    with pytest.raises(ValueError, match="more than 1 value"):
        with bnkit.preserve_stats(ours):
            ours(*_token_batch(545)[:2])
            one = torch.zeros(4, 6, dtype=torch.bool)
            one[0, 0] = True
            ours(x, one)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in before.items())


def test_preserve_stats_inside_accumulate_stats_is_left_out(backend):
    ours = bnkit.BatchNorm(C, axis=-1)
    ref = nn.BatchNorm1d(C)
    micro = _micro_batches(550)
    with bnkit.accumulate_stats(ours):
        ours(*micro[0])
        with bnkit.preserve_stats(ours):
            ours(*micro[1])  # a probe: not part of the step
        ours(*micro[3])
    ref(torch.cat([micro[0][0][micro[0][1]], micro[3][0][micro[3][1]]]))
    _assert_buffers(ours, ref, TOL32)


# =========================================================================== recalibrate (PreciseBN)
class MaskedBatchNet(nn.Module):
    """A model whose batches are (tokens, mask) pairs: what a recalibration loader of padded sequences yields."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, batch):
        x, mask = batch
        return self.net(x, mask)


def test_recalibrate_with_masked_layers_uses_the_valid_tokens_only():
    ours, ref = _nets()
    data = [(_token_batch(600 + i)[:2], None) for i in range(4)]  # (input, target) batches; input = (x, mask)
    bnkit.recalibrate(MaskedBatchNet(ours), data)
    bnkit.recalibrate(MaskedBatchNet(ref), data)  # torch's layer on the gathered tokens, through the same tool
    # the float64 population statistics of the valid tokens under the current weights
    with torch.no_grad():
        h = torch.cat([ref.lin1(x)[m] for (x, m), _ in data]).to(F64)
    torch.testing.assert_close(_bn_of(ref).running_mean, h.mean(0).float(), **TOL32)
    torch.testing.assert_close(_bn_of(ref).running_var, h.var(0).float(), **TOL32)
    _assert_nets(ours, ref, TOL32, grads=False)


@pytest.mark.parametrize("mode", ["reestimate", "online"])
def test_adapt_with_masked_layers_uses_the_valid_tokens_only(mode):
    """bnkit.adapt on a model whose BN is called as bn(h, mask): the statistics are those of the valid tokens,
    as the same tool gives them on the oracle model (torch's layer on the gathered tokens); the float64
    re-estimate of the valid tokens derived by hand; restore() puts every buffer back."""
    ours, ref = _nets()
    data = [(_token_batch(620 + i)[:2], None) for i in range(3)]
    before = {k: v.clone() for k, v in _bn_of(ours).state_dict().items()}
    kw = {"momentum": 0.5} if mode == "online" else {}  # (prior's n counts sequences, the oracle's tokens)
    handle = bnkit.adapt(MaskedBatchNet(ours), data, mode=mode, **kw)
    bnkit.adapt(MaskedBatchNet(ref), data, mode=mode, **kw)
    torch.testing.assert_close(_bn_of(ours).running_mean, _bn_of(ref).running_mean, **TOL32)
    torch.testing.assert_close(_bn_of(ours).running_var, _bn_of(ref).running_var, **TOL32)
    if mode == "reestimate":
        with torch.no_grad():
            h = torch.cat([ref.lin1(x)[m] for (x, m), _ in data]).to(F64)
        torch.testing.assert_close(_bn_of(ours).running_mean, h.mean(0).float(), **TOL32)
        torch.testing.assert_close(_bn_of(ours).running_var, h.var(0).float(), **TOL32)
    handle.restore()
    for k, v in _bn_of(ours).state_dict().items():
        assert torch.equal(v, before[k]), k


# =========================================================================== torch.compile
def _compiled_training_checks(compile_backend):
    torch._dynamo.reset()
    ours, ref = _nets()
    compiled = torch.compile(ours, backend=compile_backend, fullgraph=True)
    # two steps with different masks (same shapes: no recompilation needed), then an all-padding batch
    for step in range(3):
        x, mask, target = _token_batch(700 + step, n=4, length=6)
        if step == 2:
            mask = torch.zeros_like(mask)
        outs = []
        for net in (compiled, ref):
            net.zero_grad()
            outs.append(net(x, mask))
            if step < 2:
                _masked_loss(outs[-1], target, mask).backward()
        torch.testing.assert_close(outs[0][mask], outs[1][mask], **TOL32)
        _assert_nets(ours, ref, TOL32, grads=step < 2)
        if step == 2:  # all padding: the output is bias through lin2 (ReLU of bias)
            expected = ours.lin2(torch.relu(_bn_of(ours).bias)).expand_as(outs[0])
            torch.testing.assert_close(outs[0], expected, **TOL32)
    # outputs on the valid tokens against the oracle (the step's first forward, buffers already compared)
    x, mask, _ = _token_batch(710)
    y = compiled(x, mask)
    y_ref = ref(x, mask)
    torch.testing.assert_close(y[mask], y_ref[mask], **TOL32)
    _assert_nets(ours, ref, TOL32, grads=False)
    # a batch with one valid token: a RuntimeError on CPU in a compiled graph (the docs), nothing written
    before = copy.deepcopy(ours.state_dict())
    one = torch.zeros_like(mask)
    one[2, 1] = True
    with pytest.raises(RuntimeError, match="value per channel|valid entr"):
        compiled(x, one)
    with pytest.raises(ValueError, match="more than 1 value"):
        _bn_of(ref)(ref.lin1(x)[one])
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_compile_masked_model_matches_oracle(compile_backend):
    _compiled_training_checks(compile_backend)


@pytest.mark.slow
def test_compile_inductor_masked_model_matches_oracle():
    _compiled_training_checks("inductor")


def test_compile_inside_accumulate_stats():
    torch._dynamo.reset()
    ours = bnkit.BatchNorm(C, axis=-1)
    ref = nn.BatchNorm1d(C)
    compiled = torch.compile(ours, backend="aot_eager")
    micro = [_seq_batch(lengths, 6, seed=720 + i) for i, lengths in enumerate([[6, 2, 0], [0, 0, 0], [1, 5, 3]])]
    with bnkit.accumulate_stats(ours):
        for x, mask in micro:
            y = compiled(x, mask)
            if bool(mask.any()):
                torch.testing.assert_close(y[mask], F.batch_norm(x[mask], None, None, ours.weight, ours.bias, True),
                                           **TOL32)
    ref(torch.cat([x[m] for x, m in micro]))
    _assert_buffers(ours, ref, TOL32)
    # outside the block the compiled layer updates as usual
    compiled(*micro[2])
    ref(micro[2][0][micro[2][1]])
    _assert_buffers(ours, ref, TOL32)


def test_compile_model_calling_checkpoint_updates_once():
    torch._dynamo.reset()
    ours, ref = _nets()
    compiled = torch.compile(CheckpointedTokenNet(ours, use_reentrant=False), backend="aot_eager")
    _train_like_oracle(compiled, ours, ref, seed=730)


# =========================================================================== torch.export
def test_export_training_program_matches_torch_for_other_masks():
    ours = bnkit.BatchNorm(C, axis=-1)
    _set_affine(ours, 800, F32)
    ref = _torch_twin(ours, F32)
    x, mask = _seq_batch([6, 0, 3, 5], 6, seed=801)
    program = torch.export.export(ours, (x, mask)).module()
    # the program is called with other masks (same shapes): the valid count is not baked in
    for step, lengths in enumerate([[6, 0, 3, 5], [2, 2, 2, 2], [0, 0, 0, 0], [6, 6, 6, 6]]):
        x, mask = _seq_batch(lengths, 6, seed=802 + step)
        y = program(x, mask)
        y_ref = ref(x[mask])
        torch.testing.assert_close(y[mask], y_ref, **TOL32)
        if not bool(mask.any()):
            torch.testing.assert_close(y, ours.bias.detach().expand_as(y), rtol=0, atol=0)
        _assert_buffers(program, ref, TOL32)
    # an eval program ignores the mask as torch's eval BN on every position
    ours.load_state_dict(program.state_dict())
    ours.eval()
    eval_program = torch.export.export(ours, (x, mask)).module()
    ref.eval()
    x, mask = _seq_batch([3, 1, 0, 6], 6, seed=810)
    torch.testing.assert_close(eval_program(x, mask), ref(x.reshape(-1, C)).reshape(x.shape), **TOL32)


# =========================================================================== torch.func
def test_func_grad_and_functional_call_match_torch():
    from torch.func import functional_call, grad

    ours, ref = _nets(dtype=F64)
    params = {k: v.detach() for k, v in ours.named_parameters()}
    buffers = dict(ours.named_buffers())
    for step in range(2):
        x, mask, target = _token_batch(900 + step, dtype=F64)

        def loss(p, inp, mask=mask, target=target):
            return _masked_loss(functional_call(ours, (p, buffers), (inp,), {"mask": mask}), target, mask)

        g_params, g_x = grad(loss, argnums=(0, 1))(params, x)  # one call: one update
        xr = x.clone().requires_grad_()
        ref.zero_grad()
        _masked_loss(ref(xr, mask), target, mask).backward()
        for name, (_, q) in zip(params, ref.named_parameters()):
            torch.testing.assert_close(g_params[name], q.grad, **TOL64, msg=name)
        torch.testing.assert_close(g_x[mask], xr.grad[mask], **TOL64)
        a, b = _bn_of(ours), _bn_of(ref)
        torch.testing.assert_close(a.running_mean, b.running_mean, **TOL64)
        torch.testing.assert_close(a.running_var, b.running_var, **TOL64)
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == step + 1


def test_func_jvp_matches_torch_forward_ad():
    import torch.autograd.forward_ad as fwAD
    from torch.func import jvp

    x, mask = _seq_batch([6, 0, 3, 5], 6, seed=910, dtype=F64)
    tangent = torch.randn(x.shape, generator=_gen(911), dtype=F64)
    ours = bnkit.BatchNorm(C, axis=-1, dtype=F64)
    _set_affine(ours, 912, F64)
    ref = _torch_twin(ours, F64)
    y, dy = jvp(lambda t: ours(t, mask), (x,), (tangent,))
    with fwAD.dual_level():
        out = ref(fwAD.make_dual(x[mask], tangent[mask]))
        y_ref, dy_ref = fwAD.unpack_dual(out)
    torch.testing.assert_close(y[mask], y_ref, **TOL64)
    torch.testing.assert_close(dy[mask], dy_ref, **TOL64)
    _assert_buffers(ours, ref, TOL64)


def test_vmap_over_sequences_in_eval_matches_torch_eval():
    from torch.func import vmap

    ours = bnkit.BatchNorm(C, axis=-1, dtype=F64)
    x, mask = _seq_batch([6, 0, 3, 5], 6, seed=920, dtype=F64)
    ours(x, mask)
    ours.eval()
    ref = _torch_twin(ours, F64).eval()
    ys = vmap(lambda xi, mi: ours(xi, mi))(x, mask)  # each sequence (L, C) with its (L,) mask
    torch.testing.assert_close(ys, ref(x.reshape(-1, C)).reshape(x.shape), **TOL64)


def _vmap_case(kind):
    from torch.func import functional_call, stack_module_state, vmap

    g = _gen(930)
    xs = torch.randn(3, 4, 6, C, generator=g, dtype=F64)
    masks = torch.stack([_lengths_mask(lengths, 6) for lengths in ([6, 0, 3, 5], [2, 2, 2, 2], [6, 6, 1, 0])])
    if kind == "no_running_stats":
        layer = bnkit.BatchNorm(C, axis=-1, track_running_stats=False, dtype=F64)
        ys = vmap(layer)(xs, masks)
        refs = [nn.BatchNorm1d(C, track_running_stats=False, dtype=F64) for _ in range(3)]
        return ys, xs, masks, refs, None
    models = [bnkit.BatchNorm(C, axis=-1, dtype=F64) for _ in range(3)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    ys = vmap(lambda p, b, xi, mi: functional_call(base, (p, b), (xi, mi)))(params, buffers, xs, masks)
    return ys, xs, masks, [nn.BatchNorm1d(C, dtype=F64) for _ in range(3)], buffers


@pytest.mark.parametrize("kind", ["no_running_stats", "stacked_buffers"])
def test_vmap_masked_training_over_independent_batches(kind):
    """docs/functional.md: vmap in training works with track_running_stats=False and over stacked per-model
    buffers ("every layer"); with one mask per mapped batch each batch is BN over its own valid tokens."""
    ys, xs, masks, refs, buffers = _vmap_case(kind)
    for i, ref in enumerate(refs):
        torch.testing.assert_close(ys[i][masks[i]], ref(xs[i][masks[i]]), **TOL64)
        if buffers is not None:
            torch.testing.assert_close(buffers["running_mean"][i], ref.running_mean, **TOL64)
            torch.testing.assert_close(buffers["running_var"][i], ref.running_var, **TOL64)
            assert int(buffers["num_batches_tracked"][i]) == 1


def test_vmap_with_one_shared_mask_and_no_running_stats():
    """The same mask for every mapped batch (the mask not mapped) works: each batch over its valid tokens."""
    from torch.func import vmap

    g = _gen(940)
    xs = torch.randn(3, 4, 6, C, generator=g, dtype=F64)
    mask = _lengths_mask([6, 0, 3, 5], 6)
    layer = bnkit.BatchNorm(C, axis=-1, track_running_stats=False, dtype=F64)
    ys = vmap(lambda xi: layer(xi, mask))(xs)
    ref = nn.BatchNorm1d(C, track_running_stats=False, dtype=F64)
    for i in range(3):
        torch.testing.assert_close(ys[i][mask], ref(xs[i][mask]), **TOL64)


# =========================================================================== SyncBatchNorm, 2 gloo ranks
def _sync_batches():
    """Per scenario, per rank: (x, mask, gy) in float64; the oracle concatenates the ranks' valid tokens."""
    def batch(lengths, length, seed):
        x, mask = _seq_batch(lengths, length, seed, dtype=F64)
        return x, mask, torch.randn(x.shape, generator=_gen(seed + 1000), dtype=F64)

    return {
        "plain": [batch([5, 0, 3], 5, 1), batch([0, 0], 5, 2)],           # rank 1 all padding
        "one_each": [batch([1, 0], 4, 3), batch([0, 1, 0], 4, 4)],       # one valid token per rank: two in all
        "micro0": [batch([4, 2], 6, 5), batch([6, 0, 3], 6, 6)],         # accumulate_stats, micro-batch 0
        "micro1": [batch([1, 1, 2], 3, 7), batch([3, 2], 3, 8)],         # ... micro-batch 1
        "checkpoint": [batch([4, 2], 5, 9), batch([3, 3, 1], 5, 10)],
    }


def _sync_worker(rank, world, port, outdir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        data = _sync_batches()
        bn = bnkit.SyncBatchNorm(C, axis=-1, dtype=F64)
        _set_affine(bn, 77, F64)
        results = {}

        def run(name, call):
            x, mask, gy = data[name][rank]
            xa = x.clone().requires_grad_()
            y = call(xa, mask)
            y.backward(gy)
            out = dict(y=y.detach(), dx=xa.grad, dw=bn.weight.grad.clone(), db=bn.bias.grad.clone())
            bn.weight.grad = bn.bias.grad = None
            return out

        results["plain"] = run("plain", bn)
        results["plain_state"] = copy.deepcopy(bn.state_dict())
        results["one_each"] = run("one_each", bn)
        results["one_each_state"] = copy.deepcopy(bn.state_dict())
        with bnkit.accumulate_stats(bn):
            results["micro0"] = run("micro0", bn)
            results["micro1"] = run("micro1", bn)
        results["accumulate_state"] = copy.deepcopy(bn.state_dict())
        results["checkpoint"] = run("checkpoint", lambda a, m: checkpoint(bn, a, m, use_reentrant=False))
        results["checkpoint_state"] = copy.deepcopy(bn.state_dict())
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_sync_batch_norm_two_gloo_ranks_matches_torch_on_all_valid_tokens(tmp_path, monkeypatch):
    import time

    import torch.multiprocessing as tmp

    monkeypatch.setenv("BNKIT_NO_BUILD", "1")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    world = 2
    ctx = tmp.start_processes(_sync_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=False,
                              start_method="spawn")
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, "the spawned ranks did not finish"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    data = _sync_batches()
    layer = bnkit.SyncBatchNorm(C, axis=-1, dtype=F64)  # for its initial parameters
    _set_affine(layer, 77, F64)
    ref = _torch_twin(layer, F64)

    def check(name, update=True):
        parts = data[name]
        xs = [x.clone().requires_grad_() for x, _, _ in parts]
        tokens = torch.cat([x[m] for x, (_, m, _) in zip(xs, parts)])
        if update:
            y_ref = ref(tokens)
        else:
            y_ref = F.batch_norm(tokens, None, None, ref.weight, ref.bias, True, 0.0, ref.eps)
        y_ref.backward(torch.cat([gy[m] for _, m, gy in parts]))
        offset = 0
        for rank, (x, m, _) in enumerate(parts):
            n = int(m.sum())
            got = results[rank][name]
            torch.testing.assert_close(got["y"][m], y_ref.detach()[offset:offset + n], **TOL64)
            torch.testing.assert_close(got["dx"][m], xs[rank].grad[m], **TOL64)
            offset += n
        # each rank's weight/bias gradient is its local part: they sum to the global one
        torch.testing.assert_close(sum(r[name]["dw"] for r in results), ref.weight.grad, **TOL64)
        torch.testing.assert_close(sum(r[name]["db"] for r in results), ref.bias.grad, **TOL64)
        ref.weight.grad = ref.bias.grad = None

    def check_state(key):
        for r in results:
            torch.testing.assert_close(r[key]["running_mean"], ref.running_mean, **TOL64)
            torch.testing.assert_close(r[key]["running_var"], ref.running_var, **TOL64)
            assert int(r[key]["num_batches_tracked"]) == int(ref.num_batches_tracked)

    check("plain")
    check_state("plain_state")
    check("one_each")  # one valid token per rank is two in the global batch: no error, as torch on the two
    check_state("one_each_state")
    check("micro0", update=False)  # each micro-batch normalized over both ranks' valid tokens
    check("micro1", update=False)
    ref(torch.cat([x[m] for name in ("micro0", "micro1") for x, m, _ in data[name]]))  # one update for the step
    check_state("accumulate_state")
    check("checkpoint")
    check_state("checkpoint_state")
    assert int(ref.num_batches_tracked) == 4


# =========================================================================== conversion, fused activations, tiny batches
class ActTokenNet(nn.Module):
    """(N, L, D) tokens -> Linear -> bnkit.BatchNorm1d(h, mask) on (N, C, L) -> nn.ReLU module -> Linear."""

    def __init__(self, bn):
        super().__init__()
        torch.manual_seed(0)
        self.lin1, self.bn, self.act, self.lin2 = nn.Linear(4, C), bn, nn.ReLU(), nn.Linear(C, 3)

    def forward(self, x, mask):
        h = self.lin1(x).transpose(1, 2)
        return self.lin2(self.act(self.bn(h, mask)).transpose(1, 2))


def test_convert_fuse_activations_keeps_the_masked_call(backend):
    ours = bnkit.convert(ActTokenNet(bnkit.BatchNorm1d(C)), fuse_activations=True)
    _, ref = _nets()
    ref.lin1.load_state_dict(ours.lin1.state_dict())
    ref.lin2.load_state_dict(ours.lin2.state_dict())
    _train_like_oracle(ours, ours, ref, seed=1100)


def test_batch_norm_act_takes_a_mask():
    x, mask = _seq_batch([6, 0, 3, 5], 6, seed=1110)
    ours = bnkit.variants.BatchNormAct1d(C, act=nn.ReLU())
    ref = nn.BatchNorm1d(C)
    y = ours(x.transpose(1, 2), mask)
    torch.testing.assert_close(y.transpose(1, 2)[mask], torch.relu(ref(x[mask])), **TOL32)
    _assert_buffers(ours, ref, TOL32)


def test_accumulate_stats_tiny_batch_micro_batch_is_left_out(backend):
    ours = bnkit.BatchNorm(C, axis=-1, tiny_batch="running")
    ref = nn.BatchNorm1d(C)
    x0, m0 = _seq_batch([6, 3], 6, seed=1120)
    ours(x0, m0)
    ref(x0[m0])
    x1, m1 = _seq_batch([0, 1, 0], 6, seed=1121)  # one valid token: the running statistics' output
    x2, m2 = _seq_batch([2, 5, 4], 6, seed=1122)
    with bnkit.accumulate_stats(ours):
        with pytest.warns(RuntimeWarning, match="one valid entry"):
            y1 = ours(x1, m1)
        ours(x2, m2)
    torch.testing.assert_close(y1, copy.deepcopy(ref).eval()(x1.reshape(-1, C)).reshape(x1.shape), **TOL32)
    ref(x2[m2])  # the step's one update: the other micro-batch's tokens
    _assert_buffers(ours, ref, TOL32)
