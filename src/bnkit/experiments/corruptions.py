"""Image corruptions at five severities, built locally (nothing is downloaded), after the common-corruptions
benchmark (Hendrycks & Dietterich 2019, ImageNet-C) for images with pixels in [0, 1], shape (N, C, H, W):

* ``gaussian_noise``: ``clip(x + N(0, s^2), 0, 1)`` with ``s`` = 0.08, 0.12, 0.18, 0.26, 0.38 (ImageNet-C's);
  the noise comes from a generator seeded by ``seed`` (the same corrupted set every time);
* ``contrast``: ``clip((x - m) * c + m, 0, 1)`` with ``m`` the mean of each image's pixels and ``c`` = 0.4,
  0.3, 0.2, 0.1, 0.05 (ImageNet-C's);
* ``gaussian_blur``: a Gaussian filter of standard deviation ``sigma`` = 0.5, 0.75, 1, 1.25, 1.5 pixels
  (truncated at 4 sigma, edges replicated). ImageNet-C's sigmas (1 to 6) are for 224-pixel images; these
  are scaled for 28x28 digits, whose strokes are 2-3 pixels wide (at 1.5 a digit is a soft blob).

``CORRUPTIONS`` maps each name to ``f(x, severity)``; ``benchmarks/adapt_mnist.py`` and the ``corruption``
experiment use these builders.

Example:
    >>> import torch
    >>> x = torch.rand(2, 1, 28, 28)
    >>> [tuple(f(x, 5).shape) for f in CORRUPTIONS.values()]
    [(2, 1, 28, 28), (2, 1, 28, 28), (2, 1, 28, 28)]
"""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch
import torch.nn.functional as F

__all__ = ["NOISE_STD", "CONTRAST", "BLUR_SIGMA", "SEVERITIES", "CORRUPTIONS", "gaussian_noise", "contrast",
           "gaussian_blur", "corrupt"]

SEVERITIES = (1, 2, 3, 4, 5)
NOISE_STD = {1: 0.08, 2: 0.12, 3: 0.18, 4: 0.26, 5: 0.38}
CONTRAST = {1: 0.4, 2: 0.3, 3: 0.2, 4: 0.1, 5: 0.05}
BLUR_SIGMA = {1: 0.5, 2: 0.75, 3: 1.0, 4: 1.25, 5: 1.5}


def _severity(table: Dict[int, float], severity: int, name: str) -> float:
    try:
        return table[int(severity)]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{name}: severity must be one of {sorted(table)}, got {severity!r}") from None


def gaussian_noise(x: torch.Tensor, severity: int = 5, seed: int = 1) -> torch.Tensor:
    std = _severity(NOISE_STD, severity, "gaussian_noise")
    g = torch.Generator().manual_seed(int(seed))
    return (x + torch.randn(x.shape, generator=g) * std).clamp(0, 1)


def contrast(x: torch.Tensor, severity: int = 5) -> torch.Tensor:
    c = _severity(CONTRAST, severity, "contrast")
    mean = x.mean(dim=tuple(range(1, x.dim())), keepdim=True)
    return ((x - mean) * c + mean).clamp(0, 1)


def gaussian_blur(x: torch.Tensor, severity: int = 5) -> torch.Tensor:
    sigma = _severity(BLUR_SIGMA, severity, "gaussian_blur")
    r = int(math.ceil(4 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    y = F.pad(x, (r, r, r, r), mode="replicate")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)  # separable: rows, then columns
    y = F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return y.clamp(0, 1)


CORRUPTIONS: Dict[str, Callable[..., torch.Tensor]] = {
    "gaussian_noise": gaussian_noise,
    "contrast": contrast,
    "gaussian_blur": gaussian_blur,
}


def corrupt(name: str, x: torch.Tensor, severity: int) -> torch.Tensor:
    """``CORRUPTIONS[name](x, severity)``, with a clear error for an unknown name."""
    try:
        f = CORRUPTIONS[name]
    except KeyError:
        raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}") from None
    return f(x, severity)
