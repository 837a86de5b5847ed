"""timm's BN helpers for models that hold bnkit layers.

timm finds BN layers by class: ``timm.layers.freeze_batch_norm_2d`` freezes
``torch.nn.BatchNorm2d``/``SyncBatchNorm`` and timm's ``BatchNormAct2d``, and
the re-parameterization of RepVGG/MobileOne/FastViT blocks asserts that their
branches hold ``torch.nn.BatchNorm2d``. On a model converted with
:func:`bnkit.convert` the first turns ``bnkit.BatchNorm2d`` (a subclass of
torch's) into timm's frozen layer, which unfreezes into torch's class, and
freezes none of bnkit's other 2-D layers; the second fails. The functions here
are the same operations for both kinds of layers, with timm's own result on
timm's and torch's layers:

* :func:`freeze_batch_norm_2d` / :func:`unfreeze_batch_norm_2d`: timm's, and
  :func:`bnkit.freeze` / :func:`bnkit.unfreeze` for bnkit's 2-D layers;
* :func:`reparameterize_model`: timm's, after turning the bnkit layers inside
  the blocks it re-parameterizes back into torch's (their BN is folded into
  convolutions there, so nothing of bnkit is lost).

Needs timm (``pip install --no-deps timm``); imported on demand, not by
``import bnkit``.

Example::

    model = bnkit.convert(timm.create_model("resnet50"))
    model = bnkit.integrations.timm.freeze_batch_norm_2d(model)
"""

from __future__ import annotations

import copy

from torch import nn

from .. import layers
from ..sync import SyncBatchNorm, SyncBatchNormAct
from ..tools.convert import convert
from ..tools.freeze import freeze, unfreeze
from ..variants import FrozenBatchNorm2d
from ..variants.act import BatchNormAct2d, FrozenBatchNormAct2d

try:
    import timm.layers as _timm_layers
    from timm.models import reparameterize_model as _timm_reparameterize_model
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("bnkit.integrations.timm needs timm: pip install --no-deps timm") from e

__all__ = ["freeze_batch_norm_2d", "unfreeze_batch_norm_2d", "reparameterize_model"]

# The bnkit counterparts of the classes timm's freeze_batch_norm_2d selects.
_BNKIT_2D = (layers.BatchNorm2d, BatchNormAct2d, SyncBatchNorm, SyncBatchNormAct)
_BNKIT_FROZEN_2D = (FrozenBatchNorm2d, FrozenBatchNormAct2d)
# The methods timm's reparameterize_model calls on a child.
_REPARAMETERIZE = ("fuse", "reparameterize", "switch_to_deploy")


def _replace_selected(module: nn.Module, classes: tuple[type, ...], op) -> nn.Module:
    """``op`` applied to every (outermost) submodule of one of ``classes``; a matching root is returned replaced."""
    if isinstance(module, classes):
        return op(module)
    for name, child in list(module.named_children()):
        new = _replace_selected(child, classes, op)
        if new is not child:
            module._modules[name] = new
    return module


def freeze_batch_norm_2d(module: nn.Module) -> nn.Module:
    """``timm.layers.freeze_batch_norm_2d`` for torch's, timm's and bnkit's layers.

    torch's ``BatchNorm2d``/``SyncBatchNorm`` and timm's ``BatchNormAct2d``
    become timm's frozen layers (timm's own function), and bnkit's
    ``BatchNorm2d``, ``variants.BatchNormAct2d``, ``SyncBatchNorm`` and
    ``SyncBatchNormAct`` become :class:`bnkit.FrozenBatchNorm2d` /
    :class:`bnkit.variants.FrozenBatchNormAct2d` (:func:`bnkit.freeze`): the
    eval map in every mode, weight and bias as buffers, no parameters left.
    Like timm's, edits ``module`` in place and returns it, or the frozen layer
    when ``module`` is one of these layers.
    """
    # bnkit's first: its BatchNorm2d is also a torch.nn.BatchNorm2d, which timm's function would freeze into timm's
    # class (and unfreeze into torch's).
    module = _replace_selected(module, _BNKIT_2D, freeze)
    return _timm_layers.freeze_batch_norm_2d(module)


def unfreeze_batch_norm_2d(module: nn.Module) -> nn.Module:
    """``timm.layers.unfreeze_batch_norm_2d`` for timm's and bnkit's frozen 2-D layers.

    timm's frozen layers go back to torch's/timm's trainable classes (timm's
    function); bnkit's to the layers they were frozen from (:func:`bnkit.unfreeze`).
    """
    module = _timm_layers.unfreeze_batch_norm_2d(module)
    return _replace_selected(module, _BNKIT_FROZEN_2D, unfreeze)


def _holds_bnkit(module: nn.Module) -> bool:
    return any(isinstance(m, layers.BatchNorm) for m in module.modules())


def reparameterize_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``timm.models.reparameterize_model`` for models holding bnkit layers.

    Every child that timm re-parameterizes (it has ``fuse``,
    ``reparameterize`` or ``switch_to_deploy``) and holds bnkit BN layers gets
    torch's layers back first (:func:`bnkit.convert` with ``to="torch"``,
    same values), then timm's function runs. The result equals timm's on the
    same model built with torch's BN; BN layers outside those children stay
    bnkit's.

    Args:
        model: the model.
        inplace: edit ``model`` itself; otherwise a deep copy is re-parameterized.
    """
    if not inplace:
        model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if any(hasattr(child, a) for a in _REPARAMETERIZE) and _holds_bnkit(child):
                parent._modules[name] = convert(child, to="torch", inplace=True)
    return _timm_reparameterize_model(model, inplace=True)
