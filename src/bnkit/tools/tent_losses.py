"""The losses of :func:`.tent.tent`: TENT's entropy and the reliable-sample remedies it offers as options
(EATA's and SAR's entropy filter and weights, DeYO's patch-shuffle filter), and MEMO's marginal entropy
over augmented views with a default image augmentation."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["image_jitter", "marginal_logits", "patch_shuffle", "reliable_entropy"]


def _logits(model: nn.Module, x: Any) -> Tensor:
    logits = model(x)
    if not isinstance(logits, Tensor) or logits.dim() < 2:
        raise TypeError("tent: the model must return (N, classes) logits")
    return logits


def _entropy(logits: Tensor) -> Tensor:
    """Mean Shannon entropy of ``softmax(logits)`` over the batch (classes along dim 1)."""
    return _sample_entropy(logits).mean()


def _sample_entropy(logits: Tensor) -> Tensor:
    """Shannon entropy of ``softmax(logits)`` per sample (classes along dim 1; shape ``logits`` without dim 1)."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def reliable_entropy(logits: Tensor, max_entropy: float | None = None, weighted: bool = False, *,
                     within: Tensor | None = None) -> tuple[Tensor | None, Tensor]:
    r"""TENT's loss with EATA's / SAR's reliable-sample filter: ``(loss, mask)``.

    With ``H_i`` the entropy of ``softmax(logits_i)`` and ``E0 = max_entropy * ln C``
    (``C = logits.shape[1]`` classes), the samples with ``H_i < E0`` are kept
    (``mask``) and

    .. math::  L = \frac{1}{|S|}\sum_{i \in S} w_i H_i,\qquad
               S = \{i : H_i < E_0\},\quad w_i = e^{E_0 - H_i}\ (\texttt{weighted})\ \text{or}\ 1,

    the weights held constant (no gradient through them), as in EATA (Niu et
    al. 2022). ``max_entropy=None`` keeps every sample: plain TENT, the mean
    entropy. ``loss`` is ``None`` when no sample is kept (nothing to step on).

    Args:
        logits: ``(N, C, ...)`` logits.
        max_entropy: ``E0`` as a fraction of the maximum entropy ``ln C``
            (EATA and SAR: 0.4); ``None`` or ``inf``: every sample.
        weighted: weight the kept samples by ``exp(E0 - H_i)`` (needs ``max_entropy``).
        within: a boolean mask (shape of ``H``): keep only samples inside it
            too (SAR's second filter, after the sharpness step).

    Example:
        >>> loss, mask = reliable_entropy(torch.tensor([[4.0, 0, 0], [0.0, 0, 0]]), max_entropy=0.4)
        >>> mask.tolist()
        [True, False]
    """
    h = _sample_entropy(logits)
    if max_entropy is None and within is None:
        return h.mean(), torch.ones_like(h, dtype=torch.bool)
    e0 = math.inf if max_entropy is None else float(max_entropy) * math.log(logits.shape[1])
    mask = h < e0
    if within is not None:
        mask = mask & within
    if not bool(mask.any()):
        return None, mask
    if weighted:
        h = h * torch.exp(e0 - h.detach())
    return h[mask].mean(), mask


def patch_shuffle(x: Tensor, patches: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """DeYO's object-destructive view: each image cut into ``patches x patches`` tiles, shuffled per image.

    ``x``: ``(N, C, H, W)``. Tiles are ``(H // patches, W // patches)``; a
    remainder at the bottom and right border (when ``patches`` does not
    divide the size) stays in place (DeYO resizes instead). Shuffling keeps
    every pixel, so whatever a prediction reads from the image's pixel
    statistics (its mean level, its colours) survives it; the shape does not.

    Example:
        >>> y = patch_shuffle(torch.arange(16.0).reshape(1, 1, 4, 4), 2, torch.Generator().manual_seed(0))
        >>> sorted(y.flatten().tolist()) == list(range(16))
        True
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise TypeError(f"patch_shuffle: expected an (N, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    n, c, height, width = x.shape
    ph, pw = height // patches, width // patches
    if ph == 0 or pw == 0:
        raise ValueError(f"patch_shuffle: {patches} x {patches} patches do not fit an image of {height} x {width}")
    region = x[:, :, : patches * ph, : patches * pw]
    tiles = region.reshape(n, c, patches, ph, patches, pw).permute(0, 2, 4, 1, 3, 5).reshape(n, patches * patches, c, ph, pw)
    perm = torch.rand(n, patches * patches, generator=generator).argsort(1).to(x.device)
    tiles = tiles[torch.arange(n, device=x.device).unsqueeze(1), perm]
    out = x.clone()
    out[:, :, : patches * ph, : patches * pw] = (
        tiles.reshape(n, patches, patches, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, patches * ph, patches * pw)
    )
    return out


def _deyo_loss(model: nn.Module, x: Any, logits: Tensor, max_entropy: float | None, weighted: bool | float,
               min_plpd: float, patches: int, generator: torch.Generator) -> tuple[Tensor | None, Tensor]:
    r"""DeYO's loss (Lee et al. 2024): the reliable samples whose prediction the shape supports.

    ``PLPD_i = p_i[y_i] - p'_i[y_i]``, with ``y_i`` the predicted class and
    ``p'`` the prediction for :func:`patch_shuffle`'d ``x_i`` (no gradient):
    how much of the confidence goes when the shape is destroyed. Kept:
    ``H_i < E0`` (when ``max_entropy``) and ``PLPD_i > min_plpd``; weights
    ``exp(E0w - H_i) + exp(PLPD_i)`` (when ``weighted``, constants).
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise TypeError("tent: min_plpd needs (N, C, H, W) image batches (DeYO shuffles patches of the input)")
    h = _sample_entropy(logits)
    log_c = math.log(logits.shape[1])
    keep = h < (math.inf if max_entropy is None else float(max_entropy) * log_c)
    mask = torch.zeros_like(keep)
    if not bool(keep.any()):
        return None, mask
    idx = keep.nonzero().squeeze(1)
    with torch.no_grad():
        p_shuffled = _logits(model, patch_shuffle(x[idx], patches, generator)).softmax(1)
    p = logits[idx].detach().softmax(1)
    cls = p.argmax(1, keepdim=True)
    plpd = (p.gather(1, cls) - p_shuffled.gather(1, cls)).squeeze(1)
    ok = plpd > min_plpd
    mask[idx[ok]] = True
    if not bool(ok.any()):
        return None, mask
    hk = h[idx[ok]]
    if weighted is not False:
        e0w = (float(max_entropy) if weighted is True else float(weighted)) * log_c
        hk = hk * (torch.exp(e0w - hk.detach()) + torch.exp(plpd[ok]))
    return hk.mean(), mask


# ------------------------------------------------------------------ MEMO: marginal entropy over views
def marginal_logits(view_logits: Tensor, views: int) -> Tensor:
    r"""The log of the mean prediction over ``views`` augmented views of each sample (MEMO's marginal).

    ``view_logits`` holds ``views`` blocks of ``N`` rows, view ``k`` of sample
    ``i`` at row ``k N + i`` (the views concatenated along the batch). The
    result is ``(N, C, ...)``:

    .. math::  \log \bar p_i = \log \frac{1}{K}\sum_{k=1}^{K} \mathrm{softmax}(z_{ki}),

    computed as ``logsumexp_k log_softmax(z_ki) - log K``. It is a valid
    logits tensor (``softmax(log p) = p``), so the entropy of the marginal
    (Zhang, Levine & Finn 2022) and the reliable-sample filter on it are
    :func:`reliable_entropy` of it. With ``views=1`` the view's logits are
    returned as they are: the marginal of one view is its prediction.

    Example:
        >>> z = torch.tensor([[2.0, 0.0], [0.0, 2.0]])          # one sample, two views that disagree
        >>> marginal_logits(z, 2).softmax(1).tolist()
        [[0.5, 0.5]]
    """
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise ValueError(f"marginal_logits: views must be a positive int, got {views!r}")
    if view_logits.shape[0] % views:
        raise ValueError(f"marginal_logits: {view_logits.shape[0]} rows are not {views} views of the same samples")
    if views == 1:
        return view_logits
    logp = view_logits.log_softmax(1).reshape(views, view_logits.shape[0] // views, *view_logits.shape[1:])
    return torch.logsumexp(logp, 0) - math.log(views)


def image_jitter(x: Tensor, generator: torch.Generator | None = None, *, brightness: float = 0.5,
                 contrast: float = 0.5, translate: int = 2, brightness_unit: str = "pixels") -> Tensor:
    r"""A generic random view of an image batch: small translation, contrast and brightness jitter, per image.

    For each image ``i`` of ``x`` (``(N, C, H, W)``), independently:

    .. math::  x'_i = \mu_i + a_i\,(T_i x_i - \mu_i) + b_i\, s,\qquad
               a_i = 2^{u_i},\ u_i \sim U(-\text{contrast}, \text{contrast}),\quad
               b_i \sim U(-\text{brightness}, \text{brightness}),

    with ``T_i`` a translation by whole pixels, up to ``translate`` in each
    direction (the border pixels repeated into the gap), ``mu_i`` the
    translated image's mean per channel, and ``s`` the batch's standard
    deviation per channel (so the jitter is relative to the data's own scale
    and the function works on raw or standardized inputs alike; no clipping);
    with ``brightness_unit="levels"``, ``s`` is instead the standard deviation
    over the batch's images of their mean levels ``mu_i`` (per channel): the
    views' levels then vary as much as the images' levels do.
    The defaults are moderate, a priori values (contrast x0.71 to x1.41, a
    shift of up to half a standard deviation, 2 pixels), not tuned on any
    test set. It is :func:`.tent.tent`'s augmentation for MEMO's marginal
    entropy (``augment=image_jitter``); MEMO itself uses AugMix's operations.

    Args:
        x: ``(N, C, H, W)`` images.
        generator: the random numbers (drawn on the CPU).
        brightness: the largest level shift, in batch standard deviations.
        contrast: the largest contrast change, in octaves (``log2`` of the factor).
        translate: the largest translation in pixels.
        brightness_unit: ``"pixels"`` or ``"levels"``, the unit ``s`` of the shift.

    Example:
        >>> y = image_jitter(torch.rand(4, 1, 8, 8), torch.Generator().manual_seed(0))
        >>> y.shape
        torch.Size([4, 1, 8, 8])
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise TypeError(f"image_jitter: expected an (N, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    for name, v in (("brightness", brightness), ("contrast", contrast)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
            raise ValueError(f"image_jitter: {name} must be a finite number >= 0, got {v!r}")
    if isinstance(translate, bool) or not isinstance(translate, int) or translate < 0:
        raise ValueError(f"image_jitter: translate must be an int >= 0, got {translate!r}")
    if brightness_unit not in ("pixels", "levels"):
        raise ValueError(f"image_jitter: brightness_unit must be 'pixels' or 'levels', got {brightness_unit!r}")
    n, c, height, width = x.shape
    dev = x.device
    d = torch.randint(-translate, translate + 1, (2, n), generator=generator).to(dev)
    u = (torch.rand(n, generator=generator) * 2 - 1) * contrast
    b = (torch.rand(n, generator=generator) * 2 - 1) * brightness
    if translate:
        padded = F.pad(x, (translate,) * 4, mode="replicate")
        rows = torch.arange(height, device=dev) + translate + d[0][:, None]  # (N, H)
        cols = torch.arange(width, device=dev) + translate + d[1][:, None]  # (N, W)
        # advanced indices on dims 0, 2, 3 around a slice: the result is (N, H, W, C)
        x = padded[torch.arange(n, device=dev)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        x = x.permute(0, 3, 1, 2).contiguous()
    mu = x.mean(dim=(2, 3), keepdim=True)
    if brightness_unit == "levels":
        s = mu.detach().std(dim=0, keepdim=True) if n > 1 else torch.zeros_like(mu[:1])
    else:
        s = x.detach().std(dim=(0, 2, 3), keepdim=True) if n * height * width > 1 else torch.zeros_like(mu[:1])
    a = torch.exp2(u).to(dev, x.dtype).reshape(n, 1, 1, 1)
    return mu + a * (x - mu) + b.to(dev, x.dtype).reshape(n, 1, 1, 1) * s
