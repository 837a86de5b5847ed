"""Population statistics from the data: :func:`recalibrate` (PreciseBN).

The running averages a BN layer keeps during training lag the weights (each
batch was normalized under older weights, and the EMA forgets slowly or
quickly depending on ``momentum``). The paper's prescription (Ioffe &
Szegedy 2015, Alg. 1 step 10) is to use statistics over the training data
for the *final* weights. :func:`recalibrate` computes them in one pass:

* every BN-family layer with running buffers is put in training mode (so it
  normalizes with the batch's statistics and later layers see exactly what
  they see in training) with ``momentum`` temporarily 0; every other module is
  in eval mode (dropout off); no gradients are recorded;
* a forward pre-hook records, for each layer and batch, the per-channel
  :class:`bnkit.stats.Moments` ``(count, mean, M2)`` of the layer's *input*
  along its feature axis; after the pass the buffers the forward touched are
  restored bit for bit, and the parts are merged exactly with Chan's formula
  (:func:`bnkit.stats.merge`, accumulated in float64);
* ``running_mean`` becomes the mean over all the data and ``running_var`` the
  unbiased variance ``M2 / (N - 1)`` (``estimator="exact"``), or, with
  ``estimator="paper"``, the paper's ``E_B[mean_B]`` and
  ``m/(m-1) * E_B[var_B]`` (average over batches of each batch's unbiased
  variance; ``m`` the per-channel count of a batch).

Bad data follows each layer's ``nonfinite`` policy (torch's layers, which
have none, count as ``"skip"``): a batch whose moments at a layer are not
finite is left out of that layer's statistics (``"skip"``, one warning per
call naming the layers and batches), stops the call with
``FloatingPointError`` and every buffer restored (``"raise"``), or is merged
in (``"propagate"``: the statistics become NaN, as a torch layer's would).
The merged moments are computed from float64 copies of the inputs, so the
float32 ``running_mean`` is the float64 mean of the data correctly rounded.

Distributed (``process_group``, default: the default group when
``torch.distributed`` is initialized): each rank's ``(n, mean, M2)`` per
layer and channel are all-gathered once and merged in rank order, so every
rank ends with bitwise identical statistics, those of the union of all ranks'
data (ranks may hold different numbers of batches, or none).

``num_batches_tracked`` is left as it was: it counts training steps (and
drives ``momentum=None`` cumulative averages and schedules such as Batch
Renorm's), which recalibration does not take. Training flags and momenta are
restored afterwards, and parameters are not touched. Layers that do not
learn statistics (no ``momentum``: ``FrozenBatchNorm``, :class:`Affine`) are
left alone. Layers with per-site statistics (``SharedBatchNorm``, called as
``bn(x, site=i)``) get each site's statistics from that site's inputs.
"""

from __future__ import annotations

import inspect
import itertools
import warnings
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..family import check_initialized
from ..stats import Moments, merge
from ._family import bn_axis, has_running_stats, is_bn

__all__ = ["recalibrate", "ESTIMATORS", "resolve_group", "NotEnoughBatchesError"]

ESTIMATORS = ("exact", "paper")


class NotEnoughBatchesError(ValueError):
    """``num_batches=K`` was asked for and the data held fewer batches."""


def resolve_group(process_group: Any) -> Any:
    """The process group to merge over, or ``None`` for a local call.

    ``process_group=None`` means the default group when ``torch.distributed``
    is initialized (with more than one rank) and a local call otherwise;
    ``False`` forces a local call; anything else is used as given.
    """
    if process_group is False:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise RuntimeError("a process_group was given but torch.distributed is not initialized")
        return None
    group = dist.group.WORLD if process_group is None else process_group
    return group if dist.get_world_size(group) > 1 else None


def _policy(m: nn.Module) -> str:
    # torch's layers have no policy; left-out NaN batches are what a recalibration wants.
    return getattr(m, "nonfinite", "skip")


def _correction(m: nn.Module) -> int:
    """1: running_var is the unbiased variance (torch); 0: the biased one (``convention="keras"``)."""
    return 0 if getattr(m, "convention", "torch") == "keras" else 1


class _Accumulator:
    """Per-channel statistics of one layer's inputs, batch by batch, in float64."""

    def __init__(self, axis: int, channels: int, device: torch.device, policy: str, name: str) -> None:
        self.axis = axis
        self.policy = policy
        self.name = name
        zeros = torch.zeros(channels, dtype=torch.float64, device=device)
        self.total = Moments(0, zeros, zeros.clone())
        self.sum_means = zeros.clone()
        self.sum_vars = zeros.clone()
        self.batches = 0
        self.skipped: list[int] = []

    def add(self, x: Tensor, batch: int, mask: Tensor | None = None) -> None:
        """A batch (its valid entries only, with a padding ``mask``: as the layer's masked call counts them)."""
        # float64 copies: the float32 mean of N(0, 1) data is otherwise hundreds of ulps off.
        m = Moments.per_feature(x.detach().to(torch.float64), self.axis, mask)
        if m.count == 0:
            return
        if self.policy != "propagate" and not bool(torch.isfinite(m.m2).all() and torch.isfinite(m.mean).all()):
            if self.policy == "raise":
                raise FloatingPointError(
                    f"recalibrate: batch {batch} gives non-finite statistics at {self.name} (NaN/Inf in its input; "
                    "the layer's nonfinite='raise'); every buffer is as before"
                )
            self.skipped.append(batch)
            return
        self.total = merge(self.total, m)
        unbiased = m.variance(1) if m.count > 1 else m.m2
        self.sum_means = self.sum_means + m.mean
        self.sum_vars = self.sum_vars + unbiased
        self.batches += 1

    def pack(self) -> Tensor:
        """``[count, batches, mean (C), M2 (C), sum of means (C), sum of variances (C)]`` as float64."""
        head = torch.tensor([float(self.total.count), float(self.batches)], dtype=torch.float64,
                            device=self.sum_means.device)
        return torch.cat([head, self.total.mean, self.total.m2, self.sum_means, self.sum_vars])

    def unpack_merge(self, rows: Tensor) -> None:
        """Replace the local statistics by the merge of ``rows`` (one packed row per rank, in rank order)."""
        c = self.sum_means.numel()
        zeros = torch.zeros(c, dtype=torch.float64, device=rows.device)
        total = Moments(0, zeros, zeros.clone())
        for row in rows:
            n = int(row[0].item())
            if n:
                total = merge(total, Moments(n, row[2 : 2 + c], row[2 + c : 2 + 2 * c]))
        self.total = total
        self.batches = int(rows[:, 1].sum().item())
        self.sum_means = rows[:, 2 + 2 * c : 2 + 3 * c].sum(0)
        self.sum_vars = rows[:, 2 + 3 * c :].sum(0)

    def result(self, estimator: str, correction: int) -> tuple[Tensor, Tensor]:
        if estimator == "paper":
            return self.sum_means / self.batches, self.sum_vars / self.batches
        n = self.total.count
        var = self.total.m2 / (n - correction) if n > correction else self.total.m2
        return self.total.mean, var


def _model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter or buffer (None for a model without tensors)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return None


def _input_of(batch: Any, who: str = "") -> Any:
    """The model input of a batch: its first item when it is a tuple/list (e.g. ``(x, y)``), else the batch.

    ``who`` prefixes the error message (e.g. ``"recalibrate: "``).
    """
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError(f"{who}got an empty tuple/list as a batch")
        return batch[0]
    return batch


def _model_input(batch: Any, device: torch.device | None, who: str = "") -> Any:
    """:func:`_input_of`, moved to ``device`` when it is a tensor elsewhere (the tools' forward passes)."""
    x = _input_of(batch, who)
    if isinstance(x, Tensor) and device is not None and x.device != device:
        x = x.to(device)
    return x


def _exchange_status(group: Any, device: torch.device, failed: bool, batches: int) -> tuple[list[int], list[int]]:
    """Every rank's (failed, batches seen), so that a failure on one rank stops all of them."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    mine = torch.tensor([float(failed), float(batches)], dtype=torch.float64, device=device)
    rows = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(rows, mine, group=group)
    return [r for r in range(world) if rows[r][0] > 0], [int(rows[r][1]) for r in range(world)]


def _merge_over_ranks(group: Any, accs: list[_Accumulator], device: torch.device) -> None:
    """One all_gather of every accumulator's packed moments; each rank merges them in rank order."""
    import torch.distributed as dist

    if not accs:
        return
    flat = torch.cat([a.pack() for a in accs])
    world = dist.get_world_size(group)
    rows = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(rows, flat, group=group)
    table = torch.stack(rows)
    offset = 0
    for a in accs:
        width = 2 + 4 * a.sum_means.numel()
        a.unpack_merge(table[:, offset : offset + width])
        offset += width


def site_keyword(layer: nn.Module) -> str:
    """The keyword naming a per-site layer's site: its forward's second argument (SharedBatchNorm's ``site``,
    DomainBatchNorm's ``domain``)."""
    names = list(inspect.signature(type(layer).forward).parameters)
    return names[2] if len(names) > 2 else "site"


def mask_position(layer: nn.Module) -> int | None:
    """Where a layer's forward takes its validity ``mask`` (the index of ``args`` in a forward pre-hook),
    or ``None``: it takes none (torch's layers)."""
    names = list(inspect.signature(type(layer).forward).parameters)[1:]  # without self
    return names.index("mask") if "mask" in names else None


def call_mask(position: int | None, args: tuple, kwargs: dict) -> Tensor | None:
    """The ``mask`` of one call (from a forward pre-hook's ``args`` and ``kwargs``), or ``None``."""
    if position is None:
        return None
    mask = kwargs.get("mask", args[position] if len(args) > position else None)
    return mask if isinstance(mask, Tensor) else None


def call_site(layer: nn.Module, key: str, args: tuple, kwargs: dict) -> int:
    """The int site of one call of a per-site layer (from a forward pre-hook's ``args`` and ``kwargs``), as the layer
    itself reads it (``layer._check_site``: a default, the current domain, its errors)."""
    return layer._check_site(kwargs.get(key, args[1] if len(args) > 1 else None))


@torch.no_grad()
def recalibrate(
    model: nn.Module,
    data: Iterable[Any] | Tensor,
    *,
    num_batches: int | None = None,
    estimator: str = "exact",
    process_group: Any = None,
) -> nn.Module:
    """PreciseBN: set every BN layer's running statistics to those of ``data`` under the current weights.

    Args:
        model: any module containing torch or bnkit BN-family layers; edited in place.
        data: an iterable of batches: tensors, or tuples/lists whose first
            element is the input (as a ``DataLoader`` yields). A single tensor
            is one batch. Inputs are moved to the model's device.
        num_batches: use exactly this many batches (the first ``num_batches``);
            fewer available raises :class:`NotEnoughBatchesError` (a
            ``ValueError``) saying how many were seen, with nothing changed.
            ``None`` (default): all of them.
        estimator: ``"exact"`` (mean and unbiased variance over all the data,
            by Chan's merge; the biased one for ``convention="keras"`` layers)
            or ``"paper"`` (average of per-batch means, and of per-batch
            variances times ``m/(m-1)``).
        process_group: merge over the ranks of this group (every rank must
            call ``recalibrate`` on the same model structure); ``None``
            (default): the default group when ``torch.distributed`` is
            initialized, else local; ``False``: local even when distributed.
            ``num_batches`` then counts each rank's own batches.

    Returns:
        ``model``. Its training flags, momenta, parameters and
        ``num_batches_tracked`` are as before; only ``running_mean`` and
        ``running_var`` of layers that saw finite data change (and the
        ``running_std`` of a Keras-convention BatchRenorm, set to
        ``sqrt(running_var + eps)``). Layers without running buffers
        (``track_running_stats=False``) are skipped.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), bnkit.BatchNorm1d(4))
        >>> _ = bnkit.recalibrate(model, [torch.randn(8, 3) for _ in range(4)])
    """
    check_initialized(model, "recalibrate")
    if estimator not in ESTIMATORS:
        raise ValueError(f"recalibrate: estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if num_batches is not None and (
        not isinstance(num_batches, int) or isinstance(num_batches, bool) or num_batches < 1
    ):
        raise ValueError(f"recalibrate: num_batches must be a positive int or None, got {num_batches!r}")
    group = resolve_group(process_group)
    if isinstance(data, Tensor):
        data = [data]

    bns: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    for name, m in model.named_modules():
        # Layers without ``momentum`` (FrozenBatchNorm, Affine) do not learn statistics: left alone.
        if id(m) not in seen and is_bn(m) and has_running_stats(m) and hasattr(m, "momentum"):
            seen.add(id(m))
            bns.append((name, m))
    if not bns:
        warnings.warn("recalibrate: the model has no BN layer with running statistics", RuntimeWarning, stacklevel=2)
        return model

    device = _model_device(model)
    # One accumulator per (layer, site), made up front in model order (so that every rank
    # packs them identically): layers such as SharedBatchNorm keep running statistics per
    # call site (running_mean of shape [sites, C], called as bn(x, site=i)).
    accs: dict[tuple[int, int | None], _Accumulator] = {}
    for name, m in bns:
        per_site = m.running_mean.dim() == 2 and callable(getattr(m, "_check_site", None))
        sites = range(m.running_mean.shape[0]) if per_site else [None]
        for site in sites:
            label = (name or "<root>") + ("" if site is None else f"[site {site}]")
            accs[(id(m), site)] = _Accumulator(
                bn_axis(m), m.running_mean.shape[-1], m.running_mean.device, _policy(m), label
            )

    flags = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for _, m in bns]
    saved = [(m, {k: (b, b.clone()) for k, b in m._buffers.items() if b is not None}) for _, m in bns]
    handles = []
    batch_index = [0]

    def make_hook(m: nn.Module):
        per_site = m.running_mean.dim() == 2 and callable(getattr(m, "_check_site", None))
        key = site_keyword(m)
        position = mask_position(m)

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not args or not isinstance(args[0], Tensor):
                return
            site = None
            if per_site:
                site = call_site(module, key, args, kwargs)
            accs[(id(module), site)].add(args[0], batch_index[0], call_mask(position, args, kwargs))

        return hook

    batches = 0
    error: Exception | None = None
    try:
        model.eval()
        for _, m in bns:
            m.training = True  # the layer alone: a BN+activation layer's drop child stays in eval mode
            m.momentum = 0.0
            handles.append(m.register_forward_pre_hook(make_hook(m), with_kwargs=True))
        iterator = iter(data) if num_batches is None else itertools.islice(data, num_batches)
        with warnings.catch_warnings():
            # The layers' own non-finite warnings would say "left unchanged" about buffers that are
            # restored anyway; the policy is applied (and reported once) by the accumulators.
            warnings.filterwarnings("ignore", message=r".*batch statistics are not finite", category=RuntimeWarning)
            for batch in iterator:
                batch_index[0] = batches
                model(_model_input(batch, device, "recalibrate: "))
                batches += 1
        if num_batches is not None and batches < num_batches:
            raise NotEnoughBatchesError(
                f"recalibrate: num_batches={num_batches} but the data yielded only {batches} batch(es); "
                "nothing was changed (pass num_batches=None to use all of them)"
            )
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks are told
        error = e
    finally:
        for h in handles:
            h.remove()
        for m, bufs in saved:
            for k, (orig, copy_) in bufs.items():
                orig.copy_(copy_)
                m._buffers[k] = orig
        for m, mom in momenta:
            m.momentum = mom
        for m, training in flags:
            m.training = training

    acc_list = list(accs.values())
    if group is not None:
        comm_device = device if device is not None else torch.device("cpu")
        failed, per_rank = _exchange_status(group, comm_device, error is not None, batches)
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(
                f"recalibrate: rank(s) {failed} failed during the pass; nothing was changed on any rank"
            )
        _merge_over_ranks(group, acc_list, comm_device)
        batches = sum(per_rank)
    elif error is not None:
        raise error
    if batches == 0:
        warnings.warn("recalibrate: data yielded no batch; nothing changed", RuntimeWarning, stacklevel=2)
        return model

    skipped = {a.name: sorted(set(a.skipped)) for a in acc_list if a.skipped}
    if skipped:
        details = "; ".join(f"{n}: batch(es) {b[:5]}" for n, b in list(skipped.items())[:5])
        warnings.warn(
            f"recalibrate: non-finite statistics (NaN/Inf in the input) left out of {len(skipped)} layer(s) "
            f"under nonfinite='skip': {details}",
            RuntimeWarning,
            stacklevel=2,
        )
    unseen = []
    for name, m in bns:
        keys = [k for k in accs if k[0] == id(m) and accs[k].total.count > 0]
        if not keys:
            unseen.append(name or "<root>")
            continue
        for key in keys:
            mean, var = accs[key].result(estimator, _correction(m))
            site = key[1]
            rm = m.running_mean if site is None else m.running_mean[site]
            rv = m.running_var if site is None else m.running_var[site]
            rm.copy_(mean.to(rm.dtype))
            rv.copy_(var.to(rv.dtype))
            std = getattr(m, "running_std", None)
            if isinstance(std, Tensor):  # Keras-convention BatchRenorm averages sigma = sqrt(var + eps)
                (std if site is None else std[site]).copy_(torch.sqrt(var + m.eps).to(std.dtype))
    if unseen:
        warnings.warn(
            f"recalibrate: {len(unseen)} BN layer(s) received no finite input and keep their statistics: "
            + ", ".join(unseen[:5]),
            RuntimeWarning,
            stacklevel=2,
        )
    return model
