"""convention="keras": training outputs and moving statistics as Keras computes them.

The oracle is written here in float64 NumPy from Keras' documented update
rules (no TensorFlow/Keras install is needed or used):

Keras 3 ``BatchNormalization.call(training=True)`` (same as Flax's BatchNorm)::

    mean, variance = ops.moments(x, reduction_axes)          # biased variance
    moving_mean     = moving_mean * momentum + mean * (1 - momentum)
    moving_variance = moving_variance * momentum + variance * (1 - momentum)
    y = (x - mean) / sqrt(variance + epsilon) * gamma + beta

tf-keras 2.x ``BatchNormalization(renorm=True)`` (``_renorm_correction_and_moments``
and ``variance_update``; ``renorm_stddev`` and ``moving_stddev`` are initialized
to ones, ``renorm_mean``/``moving_mean`` to zeros, ``moving_variance`` to ones;
``_assign_moving_average(var, value, m)`` is ``var -= (var - value) * (1 - m)``)::

    stddev = sqrt(variance + epsilon)
    renorm_stddev_ = max(renorm_stddev, sqrt(epsilon))
    r = clip(stddev / renorm_stddev_, rmin, rmax)
    d = clip((mean - renorm_mean) / renorm_stddev_, -dmax, dmax)
    y = (x - mean) / sqrt(variance + epsilon) * (gamma * r) + (gamma * d + beta)
    renorm_mean   -= (renorm_mean - mean) * (1 - renorm_momentum)
    renorm_stddev -= (renorm_stddev - stddev) * (1 - renorm_momentum)
    moving_mean   -= (moving_mean - mean) * (1 - momentum)
    moving_stddev -= (moving_stddev - stddev) * (1 - momentum)
    moving_variance = relu(moving_stddev**2 - epsilon)

Inference (both): ``y = (x - moving_mean) / sqrt(moving_variance + epsilon) * gamma + beta``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bnkit

KERAS_MOMENTUM = 0.9
EPS = 1e-3  # Keras' default epsilon
C = 3


def drifting_batches(steps=6, n=5, seed=0, shape_tail=()):
    """Batches whose mean and scale drift, so that sigma- and variance-averages part ways."""
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(n,) + shape_tail + (C,)) * (0.5 + i) + 2.0 * i for i in range(steps)]


def params(seed=1):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.5, 1.5, C), rng.normal(size=C)


class KerasBN:
    """Keras 3 BatchNormalization, channels last, float64."""

    def __init__(self, gamma, beta):
        self.gamma, self.beta = gamma, beta
        self.moving_mean, self.moving_variance = np.zeros(C), np.ones(C)

    def train_step(self, x):
        axes = tuple(range(x.ndim - 1))
        mean, variance = x.mean(axes), x.var(axes)
        self.moving_mean = self.moving_mean * KERAS_MOMENTUM + mean * (1 - KERAS_MOMENTUM)
        self.moving_variance = self.moving_variance * KERAS_MOMENTUM + variance * (1 - KERAS_MOMENTUM)
        return (x - mean) / np.sqrt(variance + EPS) * self.gamma + self.beta

    def infer(self, x):
        return (x - self.moving_mean) / np.sqrt(self.moving_variance + EPS) * self.gamma + self.beta


class KerasRenorm(KerasBN):
    """tf-keras BatchNormalization(renorm=True), renorm_momentum = momentum, channels last, float64."""

    def __init__(self, gamma, beta, rmax, dmax):
        super().__init__(gamma, beta)
        self.rmin, self.rmax, self.dmax = 1.0 / rmax, rmax, dmax
        self.renorm_mean, self.renorm_stddev = np.zeros(C), np.ones(C)
        self.moving_stddev = np.ones(C)

    def train_step(self, x):
        axes = tuple(range(x.ndim - 1))
        mean, variance = x.mean(axes), x.var(axes)
        stddev = np.sqrt(variance + EPS)
        renorm_stddev = np.maximum(self.renorm_stddev, np.sqrt(EPS))
        r = np.clip(stddev / renorm_stddev, self.rmin, self.rmax)
        d = np.clip((mean - self.renorm_mean) / renorm_stddev, -self.dmax, self.dmax)
        y = (x - mean) / np.sqrt(variance + EPS) * (self.gamma * r) + (self.gamma * d + self.beta)
        decay = 1 - KERAS_MOMENTUM
        self.renorm_mean = self.renorm_mean - (self.renorm_mean - mean) * decay
        self.renorm_stddev = self.renorm_stddev - (self.renorm_stddev - stddev) * decay
        self.moving_mean = self.moving_mean - (self.moving_mean - mean) * decay
        self.moving_stddev = self.moving_stddev - (self.moving_stddev - stddev) * decay
        self.moving_variance = np.maximum(self.moving_stddev**2 - EPS, 0.0)
        self.clipped = bool((r != stddev / renorm_stddev).any() or (d != (mean - self.renorm_mean) / renorm_stddev).any())
        return y


def _bnkit(cls, layout, **kw):
    gamma, beta = params()
    if layout == "channels_last":
        layer = (bnkit.BatchNorm if cls == "bn" else bnkit.BatchRenorm)(C, axis=-1, **kw)
    else:
        layer = (bnkit.BatchNorm2d if cls == "bn" else bnkit.BatchRenorm2d)(C, **kw)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(gamma))
        layer.bias.copy_(torch.from_numpy(beta))
    return layer


def _to_layer(x, layout):
    t = torch.from_numpy(x)
    return t if layout == "channels_last" else t.movedim(-1, 1)  # NHWC -> NCHW


def _from_layer(y, layout):
    y = y.detach()
    return (y if layout == "channels_last" else y.movedim(1, -1)).numpy()


LAYOUTS = ["channels_last", "nchw"]
TOL = dict(rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_keras_batch_norm_matches_keras_update_rules(layout):
    layer = _bnkit("bn", layout, eps=EPS, momentum=bnkit.momentum_from_keras(KERAS_MOMENTUM), dtype=torch.float64,
                   convention="keras")
    torch_conv = _bnkit("bn", layout, eps=EPS, momentum=bnkit.momentum_from_keras(KERAS_MOMENTUM), dtype=torch.float64)
    oracle = KerasBN(*params())
    for x in drifting_batches(shape_tail=(2, 2)):
        y = layer(_to_layer(x, layout))
        torch_conv(_to_layer(x, layout))
        np.testing.assert_allclose(_from_layer(y, layout), oracle.train_step(x), **TOL)
        np.testing.assert_allclose(layer.running_mean.numpy(), oracle.moving_mean, **TOL)
        np.testing.assert_allclose(layer.running_var.numpy(), oracle.moving_variance, **TOL)
    assert int(layer.num_batches_tracked) == 6
    x = drifting_batches(steps=1, seed=5, shape_tail=(2, 2))[0]
    np.testing.assert_allclose(_from_layer(layer.eval()(_to_layer(x, layout)), layout), oracle.infer(x), **TOL)
    # The check can fail: torch's convention (unbiased variance) gives other moving variances.
    assert not np.allclose(torch_conv.running_var.numpy(), oracle.moving_variance, rtol=1e-3)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_keras_batch_renorm_matches_keras_renorm_rules(layout):
    kw = dict(eps=EPS, momentum=bnkit.momentum_from_keras(KERAS_MOMENTUM), dtype=torch.float64, schedule="fixed",
              r_max=1.5, d_max=0.5)
    layer = _bnkit("renorm", layout, convention="keras", **kw)
    torch_conv = _bnkit("renorm", layout, **kw)
    oracle = KerasRenorm(*params(), rmax=1.5, dmax=0.5)
    assert torch.equal(layer.running_std, torch.ones(C, dtype=torch.float64))  # Keras' initial stddev
    clipped = 0
    for x in drifting_batches(shape_tail=(2, 2)):
        y = layer(_to_layer(x, layout))
        torch_conv(_to_layer(x, layout))
        np.testing.assert_allclose(_from_layer(y, layout), oracle.train_step(x), **TOL)
        clipped += oracle.clipped
        np.testing.assert_allclose(layer.running_mean.numpy(), oracle.moving_mean, **TOL)
        np.testing.assert_allclose(layer.running_std.numpy(), oracle.moving_stddev, **TOL)
        np.testing.assert_allclose(layer.running_var.numpy(), oracle.moving_variance, **TOL)
        # renorm_momentum == momentum: Keras' renorm averages are its moving averages.
        np.testing.assert_allclose(oracle.renorm_stddev, oracle.moving_stddev, rtol=0, atol=0)
    assert clipped >= 2  # the clipping was exercised
    x = drifting_batches(steps=1, seed=5, shape_tail=(2, 2))[0]
    np.testing.assert_allclose(_from_layer(layer.eval()(_to_layer(x, layout)), layout), oracle.infer(x), **TOL)
    # Averaging sigmas is not averaging variances up to Bessel's factor (the README's former claim):
    n = 5 * 2 * 2
    bessel_only = torch_conv.running_var.numpy() * (n - 1) / n
    assert np.abs(bessel_only / oracle.moving_variance - 1).max() > 0.05


def test_keras_cumulative_average_is_the_mean_of_batch_moments():
    layer = bnkit.BatchNorm1d(C, momentum=None, dtype=torch.float64, convention="keras")
    xs = drifting_batches(steps=4)
    for x in xs:
        layer(torch.from_numpy(x))
    np.testing.assert_allclose(layer.running_mean.numpy(), np.mean([x.mean(0) for x in xs], 0), **TOL)
    np.testing.assert_allclose(layer.running_var.numpy(), np.mean([x.var(0) for x in xs], 0), **TOL)


@pytest.mark.parametrize("cls", [bnkit.BatchNorm1d, bnkit.BatchRenorm1d])
@pytest.mark.parametrize("policy", ["skip", "raise", "propagate"])
def test_keras_convention_follows_the_nonfinite_policy(cls, policy):
    layer = cls(C, nonfinite=policy, convention="keras")
    layer(torch.randn(6, C))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(6, C)
    x[2, 1] = float("nan")
    if policy == "skip":
        with pytest.warns(RuntimeWarning, match="not finite"):
            layer(x)
    elif policy == "raise":
        with pytest.raises(FloatingPointError):
            layer(x)
    else:
        layer(x)
    for k, v in layer.state_dict().items():
        if policy == "propagate" and k in ("running_mean", "running_var", "running_std"):
            assert torch.isnan(v).any(), k
        elif policy == "propagate" and k == "num_batches_tracked":
            assert int(v) == int(before[k]) + 1
        else:
            assert torch.equal(v, before[k]), k


def test_keras_convention_keeps_the_layer_contract():
    with pytest.raises(ValueError, match="convention"):
        bnkit.BatchNorm2d(3, convention="flax")
    with pytest.raises(ValueError, match="convention"):
        bnkit.BatchRenorm2d(3, convention="tf")
    bn = bnkit.BatchNorm1d(C, convention="keras")
    assert "convention='keras'" in repr(bn)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.randn(1, C))
    y = bn(torch.empty(0, C, dtype=torch.float64))  # empty batch: counted, nothing else (as torch)
    assert y.shape == (0, C) and int(bn.num_batches_tracked) == 1
    # Outputs in training are those of the torch convention (only the moving statistics differ).
    x = torch.randn(8, C, 4)
    ref = bnkit.BatchNorm1d(C)
    torch.testing.assert_close(bnkit.BatchNorm1d(C, convention="keras")(x), ref(x))
    # A Keras-convention layer has no torch equivalent.
    with pytest.raises(ValueError, match="convention='keras'"):
        bnkit.convert(torch.nn.Sequential(bn), to="torch")
    renorm = bnkit.BatchRenorm1d(C, convention="keras")
    renorm(torch.randn(8, C))
    renorm.reset_running_stats()
    assert torch.equal(renorm.running_std, torch.ones(C)) and int(renorm.num_batches_tracked) == 0


def test_recalibrate_keeps_the_keras_statistics_consistent():
    torch.manual_seed(0)
    model = torch.nn.Sequential(bnkit.BatchNorm1d(C, dtype=torch.float64, convention="keras"),
                                bnkit.BatchRenorm1d(C, dtype=torch.float64, convention="keras", eps=EPS))
    data = [torch.from_numpy(x) for x in drifting_batches(steps=3)]
    bnkit.recalibrate(model, data)
    allx = torch.cat(data)
    torch.testing.assert_close(model[0].running_var, allx.var(0, correction=0))  # Keras' variance is biased
    torch.testing.assert_close(model[1].running_std, torch.sqrt(model[1].running_var + EPS))


@pytest.mark.parametrize("kw", [{"convention": "keras"}, {"tiny_batch": "running"}])
def test_convert_sync_batchnorm_refuses_options_sync_batch_norm_lacks(kw):
    model = torch.nn.Sequential(bnkit.BatchNorm1d(C, **kw))
    with pytest.raises(ValueError, match="SyncBatchNorm supports convention='torch', tiny_batch='raise' only"):
        bnkit.convert_sync_batchnorm(model)
    assert type(model[0]) is bnkit.BatchNorm1d
