"""bnkit's CPU kernels behind PyTorch's own batch-norm operators.

:func:`accelerate` makes every batch normalization in the process that runs
through PyTorch -- ``torch.nn.BatchNorm1d/2d/3d``, ``F.batch_norm``,
subclasses such as timm's ``BatchNormAct2d``, torchvision models -- use
bnkit's fused CPU kernels, with no model conversion::

    bnkit.accelerate()            # on for the whole process
    bnkit.accelerate(False)       # ATen's own kernels again
    with bnkit.accelerated():     # on inside the block only
        loss = model(x).sum()

In eager mode on CPU, ``F.batch_norm`` reaches ``aten::batch_norm`` ->
``aten::_batch_norm_impl_index`` -> ``aten::native_batch_norm``, and its
autograd node calls ``aten::native_batch_norm_backward``.  While on, these two
operators get new kernels for the ``CPU`` dispatch key only (the way Intel's
extension for PyTorch overrides ATen CPU kernels), so autograd formulas
(double backward included), the shape functions and decompositions that
``torch.compile``, ``torch.export``, ONNX export and ``torch.jit`` use, and
other devices are untouched.  The kernels keep torch's semantics: in
training, with ``n`` values per channel,

.. math::

    \\mu = \\frac{1}{n}\\sum x, \\quad \\sigma^2 = \\frac{1}{n}\\sum (x-\\mu)^2, \\quad
    y = \\frac{x-\\mu}{\\sqrt{\\sigma^2+\\epsilon}}\\,\\gamma + \\beta,

    \\hat\\mu \\leftarrow (1-m)\\,\\hat\\mu + m\\,\\mu, \\quad
    \\hat\\sigma^2 \\leftarrow (1-m)\\,\\hat\\sigma^2 + m\\,\\frac{n}{n-1}\\sigma^2,

and :math:`y = (x-\\hat\\mu)/\\sqrt{\\hat\\sigma^2+\\epsilon}\\,\\gamma+\\beta` in eval;
the operators return what ATen's do (``save_mean``/``save_invstd``, empty
tensors in eval, the input's memory format, the backward's ``output_mask``).
Cases the kernels do not cover -- other dtypes (bfloat16/float16 models whose
parameters are bfloat16/float16 too), layouts other than contiguous and
channels-last, ``eps <= 0``, one value per channel in training, ... -- are handed to
ATen's own kernel, so results never depend on coverage beyond float rounding.

The state is the process's dispatcher registration (global, all threads;
switching is serialized by a lock); :func:`accelerated` restores the previous
state on exit (also on an exception), so blocks nest within a thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .kernels import cpp

__all__ = ["accelerate", "accelerate_counts", "accelerated", "is_accelerated"]

def _check_bool(on: object, fn: str) -> bool:
    if not isinstance(on, bool):
        raise TypeError(f"bnkit.{fn}: expected on=True or False, got {on!r} ({type(on).__name__})")
    return on


def _require_kernels() -> None:
    if not cpp.load():
        raise RuntimeError(
            "bnkit.accelerate: the C++ CPU kernels are unavailable "
            f"({cpp.build_error()}); run `bnkit build --verbose` to see why"
        )


def accelerate(on: bool = True) -> bool:
    """Serve PyTorch's CPU batch-norm operators with bnkit's kernels (``on``) or ATen's.

    Args:
        on: ``True`` to turn the acceleration on for the whole process,
            ``False`` to restore ATen's kernels.

    Returns:
        The previous state, so that ``prev = accelerate(True); ...;
        accelerate(prev)`` restores it.

    Raises:
        TypeError: ``on`` is not a bool (nothing changes).
        RuntimeError: ``on=True`` and the C++ kernels cannot be built or
            loaded (nothing changes).

    Example:
        >>> import torch, bnkit
        >>> bn = torch.nn.BatchNorm2d(3)
        >>> prev = bnkit.accelerate(True)
        >>> y = bn(torch.randn(4, 3, 8, 8))
        >>> bnkit.accelerate(prev)
        True
    """
    on = _check_bool(on, "accelerate")
    if not on and not cpp.load():
        return False  # never on without the kernels
    _require_kernels()
    return bool(torch.ops.bnkit._accelerate(on))


def is_accelerated() -> bool:
    """Whether :func:`accelerate` is on in this process."""
    if not cpp.load():
        return False
    return bool(torch.ops.bnkit._accelerated())


@contextlib.contextmanager
def accelerated(on: bool = True) -> Iterator[None]:
    """Context manager: :func:`accelerate` (``on``) inside the block, the previous state after it.

    The previous state is restored also when the block raises; blocks nest
    (``with accelerated(False):`` inside an accelerated block runs ATen's
    kernels there).

    Example:
        >>> import torch, bnkit
        >>> with bnkit.accelerated():
        ...     y = torch.nn.functional.batch_norm(torch.randn(8, 4), None, None, training=True)
        >>> bnkit.is_accelerated()
        False
    """
    prev = accelerate(on)
    try:
        yield
    finally:
        accelerate(prev)


def accelerate_counts(reset: bool = False) -> dict[str, int]:
    """How many batch-norm operator calls bnkit's kernels served, and how many went to ATen.

    Counted while :func:`accelerate` is on (process-wide, all threads).

    Args:
        reset: set the counts to zero after reading them.

    Returns:
        ``{"forward": ..., "forward_aten": ..., "backward": ..., "backward_aten": ...}``.
    """
    reset = _check_bool(reset, "accelerate_counts")
    if not cpp.load():
        return {"forward": 0, "forward_aten": 0, "backward": 0, "backward_aten": 0}
    f, fa, b, ba = (int(v) for v in torch.ops.bnkit._accelerate_counts(reset))
    return {"forward": f, "forward_aten": fa, "backward": b, "backward_aten": ba}
