"""The reference and the functional API against finite differences, gradcheck and hand-derived values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bnkit
from bnkit import functional as BF
from bnkit import reference


def numeric_grad(f, x, eps=1e-6):
    """Central finite differences of the scalar ``f`` at ``x`` (float64)."""
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + eps
        hi = f(x)
        x[i] = old - eps
        lo = f(x)
        x[i] = old
        g[i] = (hi - lo) / (2 * eps)
    return g


@pytest.mark.parametrize("axis,shape", [(1, (5, 3)), (1, (4, 2, 3)), (-1, (3, 2, 4)), (0, (3, 6))])
def test_reference_backward_matches_finite_differences(axis, shape):
    rng = np.random.default_rng(1)
    x = rng.normal(size=shape)
    c = shape[axis]
    w, b = rng.normal(size=c), rng.normal(size=c)
    g = rng.normal(size=shape)
    dx, dw, db = reference.backward(g, x, w, eps=1e-3, axis=axis)

    def loss_x(xv):
        return float((reference.forward_train(xv, w, b, 1e-3, axis)[0] * g).sum())

    np.testing.assert_allclose(dx, numeric_grad(loss_x, x.copy()), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dw, numeric_grad(lambda wv: float((reference.forward_train(x, wv, b, 1e-3, axis)[0] * g).sum()), w.copy()), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(db, numeric_grad(lambda bv: float((reference.forward_train(x, w, bv, 1e-3, axis)[0] * g).sum()), b.copy()), rtol=1e-5, atol=1e-7)


def test_reference_hand_derived_values():
    x = np.array([[1.0], [3.0]])  # mean 2, biased var 1
    y, mean, var = reference.forward_train(x, eps=0.0)
    np.testing.assert_allclose(y[:, 0], [-1.0, 1.0])
    assert mean[0] == 2.0 and var[0] == 1.0
    scale, shift = reference.fold([2.0], [1.0], [3.0], [0.5], 0.0)
    np.testing.assert_allclose([scale[0], shift[0]], [3.0, -5.5])


def test_reference_agrees_with_layer(backend):
    torch.manual_seed(3)
    bn = bnkit.BatchNorm2d(4, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
    x = torch.randn(3, 4, 5, 2, dtype=torch.float64, requires_grad=True)
    y = bn(x)
    g = torch.randn_like(y)
    y.backward(g)
    ry, rmean, rvar = reference.forward_train(x.detach().numpy(), bn.weight.detach().numpy(), bn.bias.detach().numpy(), bn.eps)
    np.testing.assert_allclose(y.detach().numpy(), ry, atol=1e-12)
    dx, dw, db = reference.backward(g.numpy(), x.detach().numpy(), bn.weight.detach().numpy(), bn.eps)
    np.testing.assert_allclose(x.grad.numpy(), dx, atol=1e-12)
    np.testing.assert_allclose(bn.weight.grad.numpy(), dw, atol=1e-11)
    np.testing.assert_allclose(bn.bias.grad.numpy(), db, atol=1e-11)
    rm, rv = reference.running_update(np.zeros(4), np.ones(4), rmean, rvar, 30, 0.1)
    np.testing.assert_allclose(bn.running_mean.numpy(), rm, atol=1e-14)
    np.testing.assert_allclose(bn.running_var.numpy(), rv, atol=1e-14)
    bn.eval()
    np.testing.assert_allclose(
        bn(x).detach().numpy(),
        reference.forward_eval(x.detach().numpy(), rm, rv, bn.weight.detach().numpy(), bn.bias.detach().numpy(), bn.eps),
        atol=1e-12,
    )


@pytest.mark.parametrize("layout", ["nc", "ncl", "nchw", "channels_last"])
def test_gradcheck_and_gradgradcheck(backend, layout):
    torch.manual_seed(0)
    shape = {"nc": (5, 3), "ncl": (3, 2, 4), "nchw": (2, 3, 2, 2), "channels_last": (2, 3, 2, 2)}[layout]
    x = torch.randn(shape, dtype=torch.float64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w = (torch.rand(shape[1], dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return BF.batch_norm(x, None, None, w, b, training=True, eps=1e-3)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))

    rm = torch.randn(shape[1], dtype=torch.float64)
    rv = torch.rand(shape[1], dtype=torch.float64) + 0.5

    def f_eval(x, w, b):
        return BF.batch_norm(x, rm, rv, w, b, training=False, eps=1e-3)

    assert torch.autograd.gradcheck(f_eval, (x, w, b))
    assert torch.autograd.gradgradcheck(f_eval, (x, w, b))


def test_gradient_penalty_training_step():
    """Double backward in practice: a gradient penalty on the input trains the weights."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), bnkit.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    ref = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    ref.load_state_dict(model.state_dict())
    x = torch.randn(16, 4)
    for m in (model, ref):
        xi = x.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(m(xi).sum(), xi, create_graph=True)
        gx.square().sum().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)


def test_tf_style_moments_and_normalize():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(6, 4, 5))
    mean, var = BF.moments(torch.from_numpy(x), [0, 2])
    np.testing.assert_allclose(mean.numpy(), x.mean(axis=(0, 2)))
    np.testing.assert_allclose(var.numpy(), x.var(axis=(0, 2)))
    mean_k, var_k = BF.moments(torch.from_numpy(x), [0, 2], keepdims=True)
    assert mean_k.shape == (1, 4, 1) and var_k.shape == (1, 4, 1)
    _, var_u = BF.moments(torch.from_numpy(x), 0, correction=1)
    np.testing.assert_allclose(var_u.numpy(), x.var(axis=0, ddof=1))
    offset, scale = rng.normal(size=(1, 4, 1)), rng.normal(size=(1, 4, 1))
    y = BF.normalize(torch.from_numpy(x), mean_k, var_k, torch.from_numpy(offset), torch.from_numpy(scale), 1e-3)
    expected = (x - x.mean(axis=(0, 2), keepdims=True)) / np.sqrt(x.var(axis=(0, 2), keepdims=True) + 1e-3) * scale + offset
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-12)


def test_fold_gives_the_inference_map():
    mean, var = torch.tensor([1.0, -2.0]), torch.tensor([4.0, 0.25])
    w, b = torch.tensor([2.0, 3.0]), torch.tensor([0.5, -1.0])
    scale, shift = BF.fold(mean, var, w, b, eps=0.0)
    torch.testing.assert_close(scale, torch.tensor([1.0, 6.0]))
    torch.testing.assert_close(shift, torch.tensor([-0.5, 11.0]))


def test_functional_rejects_bad_input():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="eps must be positive"):
        BF.batch_norm(x, None, None, training=True, eps=0.0)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BF.batch_norm(torch.randn(1, 3), None, None, training=True)
    with pytest.raises(ValueError, match="required when training=False"):
        BF.batch_norm(x, None, None, training=False)
    with pytest.raises(TypeError, match="dtype"):
        BF.batch_norm(x, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="3 elements"):
        BF.batch_norm(x, torch.zeros(4), torch.ones(4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        BF.batch_norm([[1.0, 2.0]], None, None, training=True)
    with pytest.raises(RuntimeError, match="device"):
        BF.batch_norm(x, torch.zeros(3, device="meta"), torch.ones(3, device="meta"))
