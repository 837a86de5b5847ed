"""TENT (Wang et al. 2021): entropy minimization over the BN affine parameters, :func:`tent`, :func:`bn_parameters`."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..family import check_initialized
from ._bnlayers import _batches, _check_num_batches, bn_layers, feature_axis, learns_stats
from .adapt import AdaptHandle, _Snapshot, adapt
from .calibrate import _model_device, _model_input
from .tent_losses import _deyo_loss, _logits, image_jitter, marginal_logits, patch_shuffle, reliable_entropy

__all__ = ["bn_parameters", "image_jitter", "marginal_logits", "patch_shuffle", "reliable_entropy", "tent"]


def bn_parameters(model: nn.Module, *, named: bool = False) -> list:
    """The affine parameters (``weight``, ``bias``) of every BN-family layer of ``model``, each once.

    These are what :func:`tent` trains, and what "train only BN" (Frankle et
    al. 2020) trains: ``torch.optim.SGD(bnkit.bn_parameters(model), lr=0.1)``.
    Frozen layers hold their affine as buffers, so they contribute nothing.

    Args:
        model: any module.
        named: return ``(qualified name, parameter)`` pairs instead.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        >>> [n for n, _ in bn_parameters(net, named=True)]
        ['1.weight', '1.bias']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"bn_parameters: expected an nn.Module, got {type(model).__name__}")
    out, seen = [], set()
    for name, m in bn_layers(model, with_stats=False):
        for pname, p in m.named_parameters(recurse=False):
            if pname in ("weight", "bias") and id(p) not in seen:
                seen.add(id(p))
                out.append((f"{name}.{pname}" if name else pname, p))
    return out if named else [p for _, p in out]


# ------------------------------------------------------------------ TENT
def _undo_tent_setup(hooks: list, momenta: list, grads: list) -> None:
    """Remove TENT's hooks, put back the layers' momenta and the parameters' ``requires_grad`` flags and ``.grad``
    (``grads``: ``(parameter, requires_grad, grad)`` at entry)."""
    for h in hooks:
        h.remove()
    for m, mom in momenta:
        m.momentum = mom
    for p, rg, g in grads:
        p.requires_grad_(rg)
        p.grad = g


def _frozen_batch_stats_hook(module: nn.Module, args: tuple, output: Any) -> Tensor:
    """A frozen layer normalizing with batch statistics (differentiable), keeping its fixed affine."""
    x = args[0]
    axis = feature_axis(module) % x.dim()
    c = int(module.num_features)
    w = None if module.weight is None else module.weight.reshape(-1).expand(c)
    b = None if getattr(module, "bias", None) is None else module.bias.reshape(-1).expand(c)
    y = F.batch_norm(x.movedim(axis, 1), None, None, w, b, True, 0.0, module.eps)
    return y.movedim(1, axis)


def _make_optimizer(optimizer: Any, params: list, lr: float) -> torch.optim.Optimizer:
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if callable(optimizer):
        opt = optimizer(params, lr=lr)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"tent: optimizer(params, lr=lr) must return a torch.optim.Optimizer, got {type(opt).__name__}")
        return opt
    raise ValueError(f"tent: optimizer must be 'adam', 'sgd' or a callable(params, lr=...), got {optimizer!r}")


def _check_options(max_entropy: Any, weighted: Any, sharpness: Any, step_stats: Any, min_plpd: Any = None,
                   patches: Any = 4, augment: Any = None, views: Any = 1) -> None:
    if augment is not None and not callable(augment):
        raise TypeError(f"tent: augment must be None or a callable(x, generator), got {type(augment).__name__}")
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise ValueError(f"tent: views must be a positive int, got {views!r}")
    if views > 1 and augment is None:
        raise ValueError("tent: views > 1 needs augment (the views are augmentations of each batch)")
    if augment is not None and min_plpd is not None:
        raise ValueError("tent: augment (MEMO) and min_plpd (DeYO) are not combined")
    if max_entropy is not None and (
        isinstance(max_entropy, bool) or not isinstance(max_entropy, (int, float)) or not max_entropy > 0
    ):
        raise ValueError(f"tent: max_entropy must be None or a positive number (a fraction of ln C), got {max_entropy!r}")
    if not isinstance(weighted, (bool, int, float)):
        raise TypeError(f"tent: weighted must be a bool or a number (a fraction of ln C), got {type(weighted).__name__}")
    if not isinstance(weighted, bool):
        if not (0 < weighted < math.inf):
            raise ValueError(f"tent: weighted must be True, False or a positive finite fraction of ln C, got {weighted!r}")
        if min_plpd is None:
            raise ValueError("tent: a weighted= margin of its own is DeYO's (with min_plpd); EATA weighs with max_entropy")
    elif weighted and (max_entropy is None or math.isinf(max_entropy)):
        raise ValueError("tent: weighted=True needs a finite max_entropy (the weights are exp(E0 - H))")
    if min_plpd is not None and (isinstance(min_plpd, bool) or not isinstance(min_plpd, (int, float))
                                 or not -1 <= min_plpd < 1):
        raise ValueError(f"tent: min_plpd must be None or a number in [-1, 1) (a difference of probabilities), got {min_plpd!r}")
    if isinstance(patches, bool) or not isinstance(patches, int) or patches < 1:
        raise ValueError(f"tent: patches must be a positive int, got {patches!r}")
    if min_plpd is not None and sharpness is not None:
        raise ValueError("tent: min_plpd (DeYO) and sharpness (SAR) are not combined")
    if sharpness is not None and (
        isinstance(sharpness, bool) or not isinstance(sharpness, (int, float)) or not 0 < sharpness < math.inf
    ):
        raise ValueError(f"tent: sharpness must be None or a positive finite number (SAM's rho), got {sharpness!r}")
    if step_stats not in ("batch", "reestimate"):
        raise ValueError(f"tent: step_stats must be 'batch' or 'reestimate', got {step_stats!r}")


def _sharpness_aware_grads(logits_of: Any, params: list, rho: float, mask: Tensor,
                           max_entropy: float | None, weighted: bool) -> bool:
    """SAM's second pass (Foret et al. 2021, as SAR uses it): the gradient at ``theta + rho g/|g|``.

    ``params`` hold the gradient ``g`` of the first loss. They are moved to the
    worst-case neighbour, the loss is taken again on the samples the first pass
    kept that are still reliable there (SAR's second filter), its gradient
    replaces ``g``, and the parameters are moved back. Returns False (grads
    cleared) when no sample is left. ``logits_of()`` gives the step's logits
    (of the same views, with MEMO) at the current parameters.
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = rho / (norm + 1e-12)
    with torch.no_grad():
        shifts = [g * scale for g in grads]
        for p, e in zip(params, shifts):
            p.add_(e)
    for p in params:
        p.grad = None
    try:
        loss, keep = reliable_entropy(logits_of(), max_entropy, weighted, within=mask)
        if loss is not None:
            loss.backward()
    finally:
        with torch.no_grad():
            for p, e in zip(params, shifts):
                p.sub_(e)
    return loss is not None


def _augmented_views(augment: Any, x: Any, views: int, generator: torch.Generator) -> Tensor:
    """``views`` calls of ``augment(x, generator)``, concatenated along the batch (view ``k``: rows ``k N ...``)."""
    if not isinstance(x, Tensor):
        raise TypeError("tent: augment needs tensor batches")
    out = []
    for _ in range(views):
        v = augment(x, generator)
        if not isinstance(v, Tensor) or v.shape != x.shape:
            raise TypeError(f"tent: augment(x, generator) must return a tensor of x's shape {tuple(x.shape)}, "
                            f"got {getattr(v, 'shape', type(v).__name__)}")
        out.append(v)
    return out[0] if views == 1 else torch.cat(out)


def tent(
    model: nn.Module,
    data: Iterable[Any] | Tensor,
    *,
    steps: int = 1,
    lr: float = 1e-3,
    optimizer: Any = "adam",
    stats: str = "reestimate",
    num_batches: int | None = None,
    max_entropy: float | None = None,
    weighted: bool = False,
    sharpness: float | None = None,
    step_stats: str = "batch",
    min_plpd: float | None = None,
    patches: int = 4,
    augment: Any = None,
    views: int = 1,
    generator: torch.Generator | None = None,
) -> tuple[nn.Module, AdaptHandle]:
    r"""TENT: adapt the BN affine parameters by minimizing the prediction entropy on target batches.

    For each batch ``x`` of ``data`` and each of ``steps`` steps, one
    optimizer step on

    .. math::  H(x) = -\frac{1}{B}\sum_{i}\sum_k p_{ik}\log p_{ik},\qquad p_i = \mathrm{softmax}(f(x_i))

    over :func:`bn_parameters` only, with every BN layer normalizing with the
    batch's statistics (gradients flow through them, as in training) and every
    other module in eval mode (dropout off). Running statistics are not
    updated during the steps; afterwards, with ``stats="reestimate"``, they
    are re-estimated on ``data`` under the adapted parameters (as
    :func:`adapt` does), so the eval-mode model is the adapted one; with
    ``stats="source"`` they stay the source's.

    The remedies of the literature for TENT's error accumulation (confident
    mistakes reinforced step after step) are options; their defaults are
    plain TENT:

    * ``max_entropy`` (EATA, Niu et al. 2022; SAR, Niu et al. 2023): only the
      reliable samples, ``H_i < E0 = max_entropy * ln C``, enter the loss
      (their mean; a batch with none is skipped), see
      :func:`reliable_entropy`; both papers use 0.4. ``weighted=True`` adds
      EATA's weights ``exp(E0 - H_i)``.
    * ``sharpness`` (SAR): SAM's radius ``rho`` (SAR: 0.05); each step takes
      the gradient at the worst-case neighbour ``theta + rho g / |g|`` of the
      current parameters, on the samples still reliable there.
    * ``min_plpd`` (DeYO, Lee et al. 2024): of those, only the samples whose
      confidence in their predicted class drops by more than ``min_plpd``
      when the image's ``patches x patches`` tiles are shuffled
      (:func:`patch_shuffle`): predictions that rest on the shape, not on the
      image's pixel statistics. DeYO: ``max_entropy=0.5, min_plpd=0.3``
      (0.2 in its wild settings), ``patches=4``, ``weighted=0.4`` (weights
      ``exp(0.4 ln C - H_i) + exp(PLPD_i)``).
    * ``augment`` and ``views`` (MEMO, Zhang, Levine & Finn 2022): the loss
      is the entropy of each sample's *marginal* prediction, the mean of the
      softmax over ``views`` augmented views ``augment(x, generator)`` of the
      batch (:func:`marginal_logits`), so that a prediction which changes
      under the augmentation has a high entropy; the views are forwarded as
      one batch (the BN layers normalize with the statistics of all of
      them). :func:`image_jitter` is a generic augmentation for images.
      ``max_entropy``, ``weighted`` and ``sharpness`` then act on the
      marginal's entropy (the second SAM pass on the same views).
    * ``step_stats="reestimate"`` (AdaBN, then TENT): the statistics are
      first re-estimated on all of ``data`` and the steps normalize with them
      (fixed, eval-mode BN) instead of each batch's own.

    Args:
        model: a classifier whose output is ``(N, classes)`` logits (edited in place).
        data: batches as for :func:`adapt`. A one-shot iterator is read once
            (its batches are kept for the statistics pass).
        steps: optimizer steps per batch.
        lr: learning rate.
        optimizer: ``"adam"`` (Adam, betas 0.9/0.999, as in the paper),
            ``"sgd"`` (momentum 0.9), or a callable ``(params, lr=lr)``
            returning an optimizer (e.g. ``torch.optim.AdamW``).
        stats: ``"reestimate"`` or ``"source"``.
        num_batches: use at most this many batches.
        max_entropy: the reliable-sample threshold as a fraction of ``ln C``
            (``None``: every sample; ``inf`` is the same loss).
        weighted: EATA's weights (needs a finite ``max_entropy``); with
            ``min_plpd``, DeYO's, and a number is the weights' own ``E0``
            as a fraction of ``ln C``.
        sharpness: SAM's ``rho`` (``None``: plain gradient steps).
        step_stats: ``"batch"`` or ``"reestimate"``, the statistics the steps
            normalize with.
        min_plpd: DeYO's PLPD threshold (``None``: no PLPD filter); needs
            ``(N, C, H, W)`` image batches.
        patches: DeYO's tiles per row and column.
        augment: ``None`` (the prediction's own entropy) or a callable
            ``(x, generator) -> tensor of x's shape``, a random view of a
            batch, e.g. :func:`image_jitter`; drawn anew for every step.
        views: augmented views per sample (``> 1`` needs ``augment``).
        generator: the shuffles' and augmentations' random numbers
            (``None``: a generator seeded with 0 for each call).

    Returns:
        ``(model, handle)``; ``handle.restore()`` puts back the source
        parameters and statistics bit for bit. ``requires_grad`` flags,
        momenta and training flags are as before. ``handle.samples_used``
        and ``handle.samples_seen`` count the samples that entered a loss
        (first pass) and that were seen, summed over the steps;
        ``handle.steps_taken`` the optimizer steps.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 3)).eval()
        >>> net, h = tent(net, torch.randn(8, 1, 8, 8), steps=2)
        >>> _ = h.restore()
    """
    check_initialized(model, "tent")
    if not isinstance(model, nn.Module):
        raise TypeError(f"tent: expected an nn.Module, got {type(model).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"tent: steps must be a positive int, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"tent: lr must be a positive number, got {lr!r}")
    if stats not in ("reestimate", "source"):
        raise ValueError(f"tent: stats must be 'reestimate' or 'source', got {stats!r}")
    if not (optimizer in ("adam", "sgd") or callable(optimizer)):
        raise ValueError(f"tent: optimizer must be 'adam', 'sgd' or a callable(params, lr=...), got {optimizer!r}")
    _check_options(max_entropy, weighted, sharpness, step_stats, min_plpd, patches, augment, views)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"tent: generator must be a torch.Generator, got {type(generator).__name__}")
    _check_num_batches("tent", num_batches)
    params = bn_parameters(model)
    if not params:
        raise ValueError("tent: the model has no BN affine parameters to adapt")
    layers = bn_layers(model, with_stats=False)
    if isinstance(data, Tensor):
        data = [data]
    elif iter(data) is data:  # a one-shot iterator: keep its batches for the statistics pass
        data = list(_batches(data, num_batches))

    snapshot = _Snapshot(model, layers, params=True)
    handle = AdaptHandle(model, "tent", [n or "<root>" for n, _ in layers], snapshot)
    grads = [(p, p.requires_grad, p.grad) for p in model.parameters()]  # put back at the end: tent leaves no .grad
    momenta = [(m, m.momentum) for _, m in layers if learns_stats(m)]
    hooks = []
    device = _model_device(model)
    seen = used = taken = samples = 0
    if generator is None and (min_plpd is not None or augment is not None):
        generator = torch.Generator().manual_seed(0)  # the same shuffles on every call: reproducible
    try:
        opt = _make_optimizer(optimizer, params, lr)
        if step_stats == "reestimate" and bn_layers(model):
            adapt(model, data, mode="reestimate", num_batches=num_batches)  # undone by the snapshot
        model.eval()
        for _, m in layers:
            if step_stats == "reestimate":
                continue  # eval mode: the re-estimated running statistics (frozen layers: their buffers)
            if learns_stats(m):
                m.training = True  # batch statistics, with their gradient (the layer alone: a drop child stays off) ...
                m.momentum = 0.0  # ... and the running averages kept as they are
            else:
                hooks.append(m.register_forward_hook(_frozen_batch_stats_hook))
        for p, _, _ in grads:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        for batch in _batches(data, num_batches):
            x = _model_input(batch, device)
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                if augment is not None:
                    xv = _augmented_views(augment, x, views, generator)

                    def logits_of(xv=xv):
                        return marginal_logits(_logits(model, xv), views)
                else:
                    def logits_of(x=x):
                        return _logits(model, x)
                if min_plpd is None:
                    loss, mask = reliable_entropy(logits_of(), max_entropy, weighted)
                else:
                    loss, mask = _deyo_loss(model, x, _logits(model, x), max_entropy, weighted, float(min_plpd),
                                            patches, generator)
                samples += mask.numel()
                if loss is None:
                    continue  # no reliable sample in this batch: no step
                used += int(mask.sum())
                loss.backward()
                if sharpness is not None and not _sharpness_aware_grads(
                        logits_of, params, float(sharpness), mask, max_entropy, weighted):
                    continue
                opt.step()
                taken += 1
            seen += 1
    except BaseException:
        _undo_tent_setup(hooks, momenta, grads)
        snapshot.restore()
        raise
    _undo_tent_setup(hooks, momenta, grads)
    # The steps left the statistics as they were (momentum 0) but counted batches: put the buffers back.
    adapted = [p.detach().clone() for p in params]
    snapshot.restore()
    with torch.no_grad():
        for p, v in zip(params, adapted):
            p.copy_(v)
    if seen == 0:
        snapshot.restore()
        raise ValueError("tent: data yielded no batch; nothing changed")
    if stats == "reestimate" and bn_layers(model):
        adapt(model, data, mode="reestimate", num_batches=num_batches)
    handle.samples_used, handle.samples_seen, handle.steps_taken = used, samples, taken
    return model, handle
