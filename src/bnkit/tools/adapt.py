"""Test-time adaptation of BN statistics and affine parameters: :func:`adapt`, :func:`tent`.

A model trained on a source distribution normalizes with the source's
statistics; under a distribution shift those are wrong for every later layer.
Replacing them with the target's statistics (AdaBN, Li et al. 2016), or mixing
both (Schneider et al. 2020), fixes much of the damage without labels:

* ``mode="reestimate"``: each BN layer's ``running_mean``/``running_var``
  become the mean and the unbiased variance of its input over all of ``data``
  (as :func:`bnkit.recalibrate` computes them: one pass, every layer
  normalizing each batch with that batch's statistics, Chan's exact merge in
  float64).
* ``mode="prior"``: Schneider et al.'s estimate with prior strength ``N``
  (``prior``) and ``n`` target samples seen,

  .. math::

      \\mu = \\tfrac{N}{N+n}\\,\\mu_s + \\tfrac{n}{N+n}\\,\\mu_t, \\qquad
      \\sigma^2 = \\tfrac{N}{N+n}\\,\\sigma_s^2 + \\tfrac{n}{N+n}\\,\\sigma_t^2,

  where ``mu_s, sigma_s^2`` are the layer's (source) running statistics and
  ``mu_t, sigma_t^2`` the mean and unbiased variance of its input over the
  target samples seen so far. During the pass every layer normalizes with this
  mixture (so later layers see what they will see at inference); on a single
  batch this is exactly the authors' procedure.
* ``mode="online"``: the statistics follow a stream. :func:`adapt` installs a
  forward pre-hook on each layer: every eval-mode forward first updates the
  layer's statistics with the batch and then normalizes with them. Cumulative
  by default (the ``prior`` mixture over all samples seen), over the last
  ``window`` batches (the mixture over those), or an exponential moving
  average with ``momentum`` starting from the source statistics (``prior`` not
  used).

Every mode works for torch's BN layers and bnkit's (variants, per-site
``SharedBatchNorm``, per-domain ``DomainBatchNorm``, whose row is the calls'
domain, e.g. inside ``with bnkit.domain(model, d):``, and frozen layers, whose
statistics buffers are replaced). Parameters, ``num_batches_tracked``, momenta and every other module
are left as they are; during a pass all modules are in eval mode (dropout off).
The returned :class:`AdaptHandle` restores the source statistics bit for bit
(``handle.restore()``, or leaving a ``with`` block).

:func:`tent` (Wang et al. 2021) also adapts the BN affine parameters: it
minimizes the mean entropy of the softmax predictions over the BN weights and
biases only (:func:`bn_parameters`), with every BN layer normalizing with
batch statistics. Both live in :mod:`bnkit.tools.tent` and are re-exported here.
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..family import check_initialized
from ..stats import Moments, merge, merge_all
from ._bnlayers import (  # noqa: F401 - has_stats, is_bn_layer: kept importable from here
    _batches,
    _check_num_batches,
    bn_layers,
    feature_axis,
    has_stats,
    is_bn_layer,
    learns_stats,
)
from .calibrate import _model_device, _model_input, call_mask, mask_position

__all__ = ["MODES", "AdaptHandle", "adapt", "bn_parameters", "tent"]  # noqa: F822 - the last two: from .tent

MODES = ("reestimate", "prior", "online")


# ------------------------------------------------------------------ snapshot / restore
class _Snapshot:
    """Bit-exact copies of the BN layers' buffers (and optionally affine parameters) and every training flag."""

    def __init__(self, model: nn.Module, layers: list[tuple[str, nn.Module]], params: bool = False) -> None:
        self.buffers = [
            (m, {k: b.detach().clone() for k, b in m._buffers.items() if isinstance(b, Tensor)}) for _, m in layers
        ]
        self.params = []
        if params:
            self.params = [
                (m, {k: p.detach().clone() for k, p in m.named_parameters(recurse=False)}) for _, m in layers
            ]
        self.flags = [(m, m.training) for m in model.modules()]

    @torch.no_grad()
    def restore(self) -> None:
        # By name, not by object: a model moved with .to() after adapting gets its values back too.
        for m, bufs in self.buffers:
            for k, v in bufs.items():
                cur = m._buffers.get(k)
                if isinstance(cur, Tensor) and cur.shape == v.shape:
                    cur.copy_(v)
                else:
                    m._buffers[k] = v.clone()
        for m, ps in self.params:
            for k, v in ps.items():
                getattr(m, k).copy_(v)
        for m, training in self.flags:
            m.training = training


class AdaptHandle:
    """What :func:`adapt` / :func:`tent` changed, and the way back.

    ``restore()`` puts back the source statistics (and, after :func:`tent`,
    the affine parameters) bit for bit, the training flags, and removes the
    hooks of ``mode="online"``; calling it again does nothing. As a context
    manager the model is adapted inside the ``with`` block and restored when
    it is left.

    Attributes:
        model: the adapted model.
        mode: ``"reestimate"``, ``"prior"``, ``"online"`` or ``"tent"``.
        layers: qualified names of the adapted BN layers.
    """

    def __init__(self, model: nn.Module, mode: str, layers: list[str], snapshot: _Snapshot) -> None:
        self.model = model
        self.mode = mode
        self.layers = layers
        self._snapshot = snapshot
        self._hooks: list[Any] = []
        self._states: list[_LayerState] = []
        self.active = True

    @property
    def samples(self) -> int:
        """Target samples the first adapted layer has seen (``mode="online"``: so far)."""
        return max((s.samples_total() for s in self._states[:1]), default=0)

    def restore(self) -> nn.Module:
        """Undo the adaptation; returns the model."""
        if self.active:
            for h in self._hooks:
                h.remove()
            self._hooks.clear()
            self._snapshot.restore()
            self.active = False
        return self.model

    def __enter__(self) -> AdaptHandle:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def __repr__(self) -> str:
        state = "active" if self.active else "restored"
        return f"AdaptHandle(mode={self.mode!r}, layers={len(self.layers)}, {state})"


# ------------------------------------------------------------------ per-layer statistics
class _LayerState:
    """Source statistics and the target statistics seen so far, per call site (``None`` for plain layers).

    The layer itself is not kept: its forward pre-hook holds this state (a reference back would be a cycle that
    keeps an online-adapted model dropped without ``restore()`` alive until the cyclic GC runs), and the methods
    that need it are handed the module the hook is called on (that of a ``deepcopy`` too, whose hook and state
    are copies).
    """

    def __init__(self, m: nn.Module, mode: str, prior: float, momentum: float | None, window: int | None) -> None:
        self.axis = feature_axis(m)
        self.per_site = m.running_mean.dim() == 2
        self.mode, self.prior, self.momentum, self.window = mode, float(prior), momentum, window
        self.source = (m.running_mean.detach().to(torch.float64).clone(), m.running_var.detach().to(torch.float64).clone())
        self.total: dict[Any, Moments] = {}
        self.samples: dict[Any, int] = {}
        self.recent: dict[Any, collections.deque] = {}
        self.ema: dict[Any, tuple[Tensor, Tensor]] = {}

    def samples_total(self) -> int:
        return sum(self.samples.values())

    def site_of(self, m: nn.Module, args: tuple, kwargs: dict) -> Any:
        """The row of per-site layer ``m`` this call uses, or ``False`` when the call is not one to adapt."""
        if not self.per_site:
            return None
        rows = m.running_mean.shape[0]
        if hasattr(m, "num_domains"):  # DomainBatchNorm: the row is the call's domain
            return self._domain_row(m, args, kwargs, rows)
        site = kwargs.get("site", args[1] if len(args) > 1 else None)
        if site is None:
            return 0 if rows == 1 else False  # the layer itself raises its own error
        if isinstance(site, bool) or not isinstance(site, int) or not 0 <= site < rows:
            return False
        return site

    def _domain_row(self, m: nn.Module, args: tuple, kwargs: dict, rows: int) -> Any:
        domain = kwargs.get("domain", args[1] if len(args) > 1 else None)
        if domain is None:
            domain = m.__dict__.get("current_domain")
        if isinstance(domain, Tensor) and domain.numel() > 0:
            present = torch.unique(domain)
            if present.numel() > 1:
                raise ValueError(
                    "adapt: a DomainBatchNorm call with samples of several domains; adapt one domain at a time "
                    "(with bnkit.domain(model, d): bnkit.adapt(model, data_of_d))"
                )
            domain = int(present)
        if domain is None:
            return 0 if rows == 1 else False  # the layer itself raises its own error
        if isinstance(domain, bool) or not isinstance(domain, int) or not 0 <= domain < rows:
            return False
        return domain

    def src(self, site: Any) -> tuple[Tensor, Tensor]:
        mean, var = self.source
        return (mean, var) if site is None else (mean[site], var[site])

    def mix(self, site: Any, target: Moments, n: int) -> tuple[Tensor, Tensor]:
        """Schneider et al.'s mixture of the source and the target's mean / unbiased variance."""
        mean_s, var_s = self.src(site)
        var_t = target.variance(1) if target.count > 1 else target.m2 * 0
        w = n / (self.prior + n) if self.prior + n > 0 else 1.0
        return (1 - w) * mean_s + w * target.mean, (1 - w) * var_s + w * var_t

    def observe(self, x: Tensor, site: Any, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Add a batch (its valid entries, with a padding ``mask``); returns the (mean, var) it is normalized with."""
        b = Moments.per_feature(x.detach().to(torch.float64), self.axis, mask)
        n = x.shape[0] if self.axis % x.dim() != 0 else 1
        self.samples[site] = self.samples.get(site, 0) + n
        if self.mode == "reestimate":
            self.total[site] = b if site not in self.total else merge(self.total[site], b)
            return b.mean, b.variance(0)  # training-mode normalization: the batch's biased variance
        if self.momentum is not None:
            mean_p, var_p = self.ema.get(site, self.src(site))
            var_b = b.variance(1) if b.count > 1 else b.m2 * 0
            self.ema[site] = ((1 - self.momentum) * mean_p + self.momentum * b.mean,
                              (1 - self.momentum) * var_p + self.momentum * var_b)
            return self.ema[site]
        if self.window is not None:
            q = self.recent.setdefault(site, collections.deque(maxlen=self.window))
            q.append((b, n))
            return self.mix(site, merge_all(p for p, _ in q), sum(k for _, k in q))
        self.total[site] = b if site not in self.total else merge(self.total[site], b)
        return self.mix(site, self.total[site], self.samples[site])

    def final(self, site: Any) -> tuple[Tensor, Tensor]:
        """The statistics after a reestimate / prior pass."""
        t = self.total[site]
        if self.mode == "reestimate":
            return t.mean, (t.variance(1) if t.count > 1 else t.m2)
        return self.mix(site, t, self.samples[site])

    @torch.no_grad()
    def write(self, m: nn.Module, site: Any, mean: Tensor, var: Tensor) -> None:
        rm, rv = m.running_mean, m.running_var
        if site is not None:
            rm, rv = rm[site], rv[site]
        rm.copy_(mean.to(rm.dtype))
        rv.copy_(var.to(rv.dtype))


class _AdaptHook:
    """A layer's forward pre-hook: each input batch observed, and the statistics it is normalized with written.

    An object (not a closure), so that a ``deepcopy`` of an adapted model copies it and its state: the copy
    then adapts its own statistics.
    """

    def __init__(self, state: _LayerState, online: bool, position: Any) -> None:
        self.state, self.online, self.position = state, online, position

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not args or not isinstance(args[0], Tensor):
            return
        if self.online and module.training and learns_stats(module):
            return  # a training-mode layer normalizes with batch statistics and keeps its own averages
        site = self.state.site_of(module, args, kwargs)
        if site is False:
            return
        with torch.no_grad():
            mean, var = self.state.observe(args[0], site, call_mask(self.position, args, kwargs))
            self.state.write(module, site, mean, var)


# ------------------------------------------------------------------ adapt
def adapt(
    model: nn.Module,
    data: Iterable[Any] | Tensor | None = None,
    *,
    mode: str = "reestimate",
    prior: float = 16,
    momentum: float | None = None,
    window: int | None = None,
    num_batches: int | None = None,
) -> AdaptHandle:
    r"""Adapt the BN statistics of ``model`` to unlabelled target data; returns a restore handle.

    ``reestimate`` sets ``mu = mean(x)``, ``var = M2 / (n - 1)`` over all of
    ``data`` per layer; ``prior`` sets
    ``mu = N/(N+n) mu_s + n/(N+n) mu_t`` and likewise the variance, with
    ``N = prior`` and ``n`` the target samples seen; ``online`` keeps updating
    the statistics on every later eval-mode forward (see the module docstring).

    Args:
        model: a module with torch or bnkit BN-family layers (edited in place).
        data: an iterable of batches (tensors, or tuples/lists whose first
            element is the input, as a ``DataLoader`` yields); a single tensor
            is one batch. Required for ``reestimate`` and ``prior``; optional
            for ``online`` (a warm-up stream fed through the model at once).
        mode: ``"reestimate"``, ``"prior"`` or ``"online"``.
        prior: Schneider et al.'s prior strength ``N >= 0`` (``prior`` and
            ``online``; ``0``: the target statistics alone).
        momentum: ``online`` only: exponential moving average with this factor
            in ``(0, 1]`` instead of the cumulative mixture (``prior`` unused).
        window: ``online`` only: the mixture over the last ``window`` batches.
        num_batches: read at most this many batches of ``data``.

    Returns:
        An :class:`AdaptHandle`; ``handle.restore()`` (or leaving
        ``with adapt(...):``) puts the source statistics back exactly.

    Shape:
        Any input the model takes; a layer's statistics are per channel along
        its feature axis (per call site for per-site ``SharedBatchNorm``).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).eval()
        >>> target = torch.randn(16, 1, 8, 8) * 3 + 1
        >>> with adapt(net, target) as h:
        ...     y = net(target)          # normalized with the target's statistics
        >>> h.active
        False
    """
    check_initialized(model, "adapt")
    if not isinstance(model, nn.Module):
        raise TypeError(f"adapt: expected an nn.Module, got {type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"adapt: mode must be one of {MODES}, got {mode!r}")
    if isinstance(prior, bool) or not isinstance(prior, (int, float)) or not prior >= 0 or prior == float("inf"):
        raise ValueError(f"adapt: prior must be a finite number >= 0, got {prior!r}")
    if momentum is not None or window is not None:
        if mode != "online":
            raise ValueError(f"adapt: momentum and window apply to mode='online' only (got mode={mode!r})")
        if momentum is not None and window is not None:
            raise ValueError("adapt: give momentum or window, not both")
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 < momentum <= 1):
        raise ValueError(f"adapt: momentum must be in (0, 1], got {momentum!r}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"adapt: window must be a positive int, got {window!r}")
    _check_num_batches("adapt", num_batches)
    if data is None and mode != "online":
        raise ValueError(f"adapt: mode={mode!r} needs data")
    layers = bn_layers(model)
    if not layers:
        raise ValueError("adapt: the model has no BN layer with running statistics")

    snapshot = _Snapshot(model, layers)
    handle = AdaptHandle(model, mode, [n or "<root>" for n, _ in layers], snapshot)
    states = [_LayerState(m, mode, prior, momentum, window) for _, m in layers]
    handle._states = states
    online = mode == "online"
    for (_, m), st in zip(layers, states):
        handle._hooks.append(m.register_forward_pre_hook(_AdaptHook(st, online, mask_position(m)), with_kwargs=True))

    if online:
        _online_modes(snapshot, layers)
        if data is None:
            return handle
    try:
        seen = _run(model, data, num_batches)
    except BaseException:
        handle.restore()
        raise
    if seen == 0:
        handle.restore()
        raise ValueError("adapt: data yielded no batch; nothing changed")
    if online:
        _online_modes(snapshot, layers)  # the warm-up ran the model in eval mode: every other flag back
        return handle
    for h in handle._hooks:
        h.remove()
    handle._hooks.clear()
    unseen = []
    for (name, m), st in zip(layers, states):
        if not st.total:
            unseen.append(name or "<root>")
        for site in st.total:
            st.write(m, site, *st.final(site))
    for m, training in snapshot.flags:
        m.training = training
    if unseen:
        warnings.warn(
            f"adapt: {len(unseen)} BN layer(s) received no input and keep their statistics: " + ", ".join(unseen[:5]),
            RuntimeWarning,
            stacklevel=2,
        )
    return handle


def _online_modes(snapshot: _Snapshot, layers: list) -> None:
    """``mode="online"``'s training flags: every module's own, but the BN layers (alone, not their children) in
    eval mode, so that they normalize with the statistics the hook has just written."""
    for m, training in snapshot.flags:
        m.training = training
    for _, m in layers:
        if learns_stats(m):
            m.training = False


@torch.no_grad()
def _run(model: nn.Module, data: Any, num_batches: int | None) -> int:
    """Feed the batches through the model in eval mode; returns how many there were."""
    device = _model_device(model)
    model.eval()
    seen = 0
    for batch in _batches(data, num_batches):
        model(_model_input(batch, device))
        seen += 1
    return seen


# ------------------------------------------------------------------ re-exports
_FROM_TENT = ("bn_parameters", "tent", "_entropy", "_frozen_batch_stats_hook", "_make_optimizer", "_undo_tent_setup")


def __getattr__(name: str) -> Any:
    """``bnkit.tools.adapt.tent`` etc.: resolved lazily from :mod:`.tent`, which imports this module (no cycle)."""
    if name in _FROM_TENT:
        import importlib  # not `from . import tent`: the package's `tent` attribute is the function

        return getattr(importlib.import_module(f"{__package__}.tent"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
