"""NumPy float64 reference of Batch Normalization: the oracle for every test.

Notation, per feature ``c`` over the ``m`` values ``x_i`` that share it
(all axes but the feature axis)::

    mu      = (1/m) sum_i x_i
    var     = (1/m) sum_i (x_i - mu)^2                  (biased)
    xhat_i  = (x_i - mu) / sqrt(var + eps)
    y_i     = gamma * xhat_i + beta

Backward. With ``g_i = dL/dy_i`` and ``s = 1/sqrt(var + eps)``::

    dL/dbeta  = sum_i g_i
    dL/dgamma = sum_i g_i * xhat_i
    dL/dx_i   = gamma * s * (g_i - mean_j(g_j) - xhat_i * mean_j(g_j * xhat_j))

The last line follows from the chain rule through ``mu`` and ``var``:
``dxhat_i/dx_j = s (delta_ij - 1/m) - s xhat_i xhat_j / m``, so
``dL/dx_j = sum_i gamma g_i dxhat_i/dx_j`` collapses to the two means above.

Inference uses fixed statistics and is an affine map
``y = x * scale + shift`` with ``scale = gamma / sqrt(var + eps)`` and
``shift = beta - mu * scale``.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["forward_train", "forward_eval", "backward", "running_update", "fold"]

F64 = NDArray[np.float64]


def _quiet(fn):
    """NaN/Inf and empty inputs give NaN results silently, as torch does, not NumPy warnings."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return fn(*args, **kwargs)

    return wrapper


def _axes(x: np.ndarray, axis: int) -> tuple[tuple[int, ...], list[int]]:
    axis = axis % x.ndim
    reduce_axes = tuple(i for i in range(x.ndim) if i != axis)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return reduce_axes, shape


@_quiet
def forward_train(
    x: ArrayLike,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    eps: float = 1e-5,
    axis: int = 1,
) -> tuple[F64, F64, F64]:
    """Training forward: returns ``(y, mean, biased_var)`` computed with batch statistics."""
    x = np.asarray(x, dtype=np.float64)
    red, shape = _axes(x, axis)
    mean = x.mean(axis=red)
    var = ((x - mean.reshape(shape)) ** 2).mean(axis=red)
    xhat = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    y = xhat
    if weight is not None:
        y = y * np.asarray(weight, dtype=np.float64).reshape(shape)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64).reshape(shape)
    return y, mean, var


@_quiet
def fold(
    mean: ArrayLike, var: ArrayLike, weight: ArrayLike | None, bias: ArrayLike | None, eps: float
) -> tuple[F64, F64]:
    """Inference BN as ``(scale, shift)`` so that ``y = x * scale + shift``."""
    mean = np.asarray(mean, dtype=np.float64)
    scale = 1.0 / np.sqrt(np.asarray(var, dtype=np.float64) + eps)
    if weight is not None:
        scale = scale * np.asarray(weight, dtype=np.float64)
    shift = -mean * scale
    if bias is not None:
        shift = shift + np.asarray(bias, dtype=np.float64)
    return scale, shift


@_quiet
def forward_eval(
    x: ArrayLike,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    eps: float = 1e-5,
    axis: int = 1,
) -> F64:
    """Inference forward with fixed statistics."""
    x = np.asarray(x, dtype=np.float64)
    _, shape = _axes(x, axis)
    scale, shift = fold(running_mean, running_var, weight, bias, eps)
    return x * scale.reshape(shape) + shift.reshape(shape)


@_quiet
def backward(
    grad_out: ArrayLike,
    x: ArrayLike,
    weight: ArrayLike | None = None,
    eps: float = 1e-5,
    axis: int = 1,
) -> tuple[F64, F64, F64]:
    """Gradients ``(dx, dgamma, dbeta)`` of the training forward (see the module docstring)."""
    g = np.asarray(grad_out, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    red, shape = _axes(x, axis)
    mean = x.mean(axis=red)
    var = ((x - mean.reshape(shape)) ** 2).mean(axis=red)
    s = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean.reshape(shape)) * s.reshape(shape)
    dbeta = g.sum(axis=red)
    dgamma = (g * xhat).sum(axis=red)
    gamma = np.ones_like(mean) if weight is None else np.asarray(weight, dtype=np.float64)
    m = x.size // x.shape[axis % x.ndim] if x.size else 0
    if m == 0:
        return np.zeros_like(x), dgamma, dbeta
    g_mean = (dbeta / m).reshape(shape)
    gx_mean = (dgamma / m).reshape(shape)
    dx = (gamma * s).reshape(shape) * (g - g_mean - xhat * gx_mean)
    return dx, dgamma, dbeta


@_quiet
def running_update(
    running_mean: ArrayLike,
    running_var: ArrayLike,
    batch_mean: ArrayLike,
    batch_var: ArrayLike,
    count: int,
    factor: float,
) -> tuple[F64, F64]:
    """PyTorch's moving-average rule with the unbiased batch variance."""
    rm = np.asarray(running_mean, dtype=np.float64)
    rv = np.asarray(running_var, dtype=np.float64)
    unbiased = np.asarray(batch_var, dtype=np.float64) * (count / (count - 1) if count > 1 else 1.0)
    return (1 - factor) * rm + factor * np.asarray(batch_mean), (1 - factor) * rv + factor * unbiased
