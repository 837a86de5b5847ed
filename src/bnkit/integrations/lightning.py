"""PyTorch Lightning: synchronize BN layers with :class:`bnkit.SyncBatchNorm` (CPU included).

``Trainer(sync_batchnorm=True)`` converts layers with
``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, which leaves bnkit's generic
layer and its variants unsynchronized and turns its ``BatchNorm1d/2d/3d``
(subclasses of torch's) into torch's class, dropping bnkit's options; and
torch's SyncBatchNorm does not run on CPU. This plugin
is a subclass of Lightning's ``TorchSyncBatchNorm`` (Lightning accepts
``plugins=[...]`` with ``sync_batchnorm=True`` only for such a subclass) that
converts with :func:`bnkit.convert_sync_batchnorm` instead:

* ``bnkit.BatchNorm`` / ``BatchNorm1d/2d/3d`` and torch's ``BatchNorm1d/2d/3d``
  and ``SyncBatchNorm`` become :class:`bnkit.SyncBatchNorm` holding the very
  same parameter and buffer tensors (the optimizer keeps working);
* after ``fit`` (Lightning calls :meth:`BnkitSyncBatchNorm.revert` in the
  strategy's teardown), every layer becomes the class it was again (Lightning's
  own plugin turns torch's layers into a private ``_BatchNormXd``).

BN variants with their own statistics rules (ghost, renorm, shared) are
left as they are, with a warning naming them; frozen layers need no sync.

Example::

    import pytorch_lightning as pl
    from bnkit.integrations.lightning import BnkitSyncBatchNorm

    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp",
                         plugins=[BnkitSyncBatchNorm()], sync_batchnorm=True)

Needs the ``lightning`` extra (``pip install bnkit[lightning]``).
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from ..sync import SyncBatchNorm, convert_sync_batchnorm
from ..tools._family import has_running_stats, is_bn
from ..variants import FrozenBatchNorm

try:  # the standalone package first (the extra installs it), then the unified one
    from pytorch_lightning.plugins.layer_sync import TorchSyncBatchNorm
except ImportError:  # pragma: no cover - depends on the environment
    try:
        from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
    except ImportError as err:
        raise ImportError(
            "bnkit.integrations.lightning needs PyTorch Lightning: pip install 'bnkit[lightning]'"
        ) from err

__all__ = ["BnkitSyncBatchNorm"]


class BnkitSyncBatchNorm(TorchSyncBatchNorm):
    """Lightning ``LayerSync`` plugin converting BN layers to :class:`bnkit.SyncBatchNorm` for ``fit``.

    Args:
        process_group: the group to synchronize over (None: the default
            group, resolved at each call), as in ``convert_sync_batchnorm``.
    """

    def __init__(self, process_group: Any = None) -> None:
        super().__init__()
        self.process_group = process_group

    def apply(self, model: nn.Module) -> nn.Module:
        """Convert every convertible BN layer of ``model`` to :class:`bnkit.SyncBatchNorm`."""
        converted = convert_sync_batchnorm(model, self.process_group)
        left = [
            name or type(m).__name__
            for name, m in converted.named_modules()
            if is_bn(m)
            and not isinstance(m, (SyncBatchNorm, FrozenBatchNorm))
            and has_running_stats(m)
        ]
        if left:
            warnings.warn(
                "BnkitSyncBatchNorm: these BN-family layers have their own statistics rules and keep "
                f"per-rank statistics (not synchronized): {', '.join(left)}",
                UserWarning,
                stacklevel=2,
            )
        return converted

    def revert(self, model: nn.Module) -> nn.Module:
        """Turn every layer :meth:`apply` converted back into its class (same tensors).

        A :class:`bnkit.SyncBatchNorm` that the model had before ``apply`` stays one.
        """
        def walk(m: nn.Module) -> nn.Module:
            out = m
            if isinstance(m, SyncBatchNorm) and getattr(m, "_sync_original", None) is not None:
                out = convert_sync_batchnorm(m, revert=True)
            for name, child in list(m.named_children()):
                new = walk(child)
                if new is not child:
                    out.add_module(name, new)
            return out

        return walk(model)
