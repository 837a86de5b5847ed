"""``torch.func`` helpers that know bnkit's layers.

``torch.func.replace_all_batch_norm_modules_`` finds torch's BN layers by
class (``torch.nn.modules.batchnorm._BatchNorm``): it patches bnkit's
``BatchNorm1d/2d/3d`` (subclasses of torch's) and passes the generic layer and
the variants by: :func:`replace_all_batch_norm_modules_` is the same patch for
all of them.
"""

from __future__ import annotations

from torch import nn
from torch.func import replace_all_batch_norm_modules_ as _torch_replace_all

from ..layers import BatchNorm

__all__ = ["replace_all_batch_norm_modules_"]


def replace_all_batch_norm_modules_(root: nn.Module) -> nn.Module:
    """In place, as ``torch.func.replace_all_batch_norm_modules_``: every BN layer of ``root`` stops tracking running
    statistics (``running_mean``, ``running_var``, ``num_batches_tracked`` set to ``None``,
    ``track_running_stats=False``), so that ``vmap`` over samples in training normalizes each mapped sample with its
    own batch statistics and mutates no buffer. torch's layers and bnkit's (``bnkit.BatchNorm`` and the layers built
    on it) alike; frozen layers, whose statistics are their parameters, are left as they are.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), bnkit.BatchNorm1d(4))
        >>> _ = replace_all_batch_norm_modules_(model)
        >>> model[1].running_mean is None and not model[1].track_running_stats
        True
    """
    _torch_replace_all(root)
    for m in root.modules():
        if isinstance(m, BatchNorm) and m.track_running_stats:
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None
            m.track_running_stats = False
    return root
