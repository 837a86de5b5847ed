"""Module surgery: replace some modules of a model by others, the one way every tool does it.

:func:`replace_modules` serves :func:`bnkit.convert`, :func:`bnkit.freeze` /
:func:`bnkit.unfreeze` and :func:`bnkit.convert_sync_batchnorm`. Its
guarantees:

- everything is checked before anything changes (``check`` runs on every
  selected module first; an error leaves the model as it was);
- a module used at several places (shared) is replaced once, by one new
  module, everywhere;
- parents are edited in their ``_modules`` only, so their hooks and every
  other module stay untouched;
- hooks registered on a replaced module move to its replacement (their
  handles still remove them);
- the root itself may be selected: the function returns the new root.

:func:`take_over_tensors` makes a new layer use an old one's very parameter
and buffer objects (so optimizers keep working). :func:`snapshot` /
:func:`rebuild` bring back a replaced layer of any class (a BN subclass with
its own ``__init__``) with the current tensors.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable

from torch import nn
from torch.nn.parameter import UninitializedBuffer

__all__ = [
    "CALL_HOOK_DICTS", "STATE_HOOK_DICTS", "carry_extras", "copy_model", "move_hooks", "rebuild", "replace_modules", "snapshot",
    "take_over_tensors",
]

# nn.Module attributes holding the hooks registered on a module's calls ...
CALL_HOOK_DICTS = (
    "_backward_pre_hooks",
    "_backward_hooks",
    "_is_full_backward_hook",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)
# ... and on its state_dict.
STATE_HOOK_DICTS = (
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also when it holds lazy layers that have not seen an input yet.

    torch's ``UninitializedBuffer`` cannot be deep-copied (``copy.deepcopy`` of a fresh
    ``nn.LazyBatchNorm2d`` raises ``ValueError``); the copy gets new uninitialized buffers of the same
    device and dtype instead (there is nothing else to copy).
    """
    memo: dict[int, object] = {}
    for b in model.buffers():
        if isinstance(b, UninitializedBuffer):
            memo[id(b)] = UninitializedBuffer(b.requires_grad, b.device, b.dtype)
    return copy.deepcopy(model, memo)


def move_hooks(src: nn.Module, dst: nn.Module, hook_dicts: Iterable[str] = CALL_HOOK_DICTS) -> None:
    """Make ``dst`` fire (and own) the hooks registered on ``src``."""
    for k in hook_dicts:
        if k in src.__dict__:
            dst.__dict__[k] = src.__dict__[k]


def take_over_tensors(dst: nn.Module, src: nn.Module, names: Iterable[str]) -> None:
    """``dst`` uses ``src``'s very parameter/buffer objects for ``names`` (missing or None stay None)."""
    for name in names:
        if name in src._parameters:
            dst._parameters[name] = src._parameters[name]
            dst._buffers.pop(name, None)
        elif name in src._buffers:
            dst._buffers[name] = src._buffers[name]
            dst._parameters.pop(name, None)


def carry_extras(dst: nn.Module, src: nn.Module, names: Iterable[str]) -> None:
    """``dst`` also holds ``src``'s tensors other than ``names`` and its children that ``dst`` has no child of that name for.

    A subclass's own parameters, buffers and child modules (the very objects)
    stay in the replaced layer's ``state_dict`` and come back with it when the
    layer is rebuilt (what torch's converter keeps of them: the children).
    """
    standard = set(names)
    take_over_tensors(dst, src, [k for k in (*src._parameters, *src._buffers) if k not in standard])
    for name, child in src._modules.items():
        if name not in dst._modules:
            dst._modules[name] = child


def replace_modules(
    model: nn.Module,
    select: Callable[[nn.Module], bool],
    build: Callable[[nn.Module, str], nn.Module],
    check: Callable[[nn.Module, str], None] | None = None,
    hook_dicts: Iterable[str] = CALL_HOOK_DICTS,
) -> nn.Module:
    """Replace every module of ``model`` (``model`` included) for which ``select`` is true by ``build(m, name)``.

    ``name`` is the module's first path in ``model`` (``""`` for the root).
    ``check(m, name)`` runs on every selected module before any is built or
    replaced. ``build`` may return ``m`` itself (edited or not): it is then
    left in place. Returns the root (the new one when ``model`` was replaced).
    """
    names: dict[int, str] = {}
    found: dict[int, nn.Module] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if id(m) not in found and select(m):
            found[id(m)] = m
            names[id(m)] = name
    if check is not None:
        for key, m in found.items():
            check(m, names[key])
    new: dict[int, nn.Module] = {}
    for key, m in found.items():
        replacement = build(m, names[key])
        if replacement is not m:
            move_hooks(m, replacement, hook_dicts)
            new[key] = replacement
    if new:
        # The replacements' children too: a child a replacement took over from its original may be replaced itself.
        for parent in [*model.modules(), *new.values()]:
            for child_name, child in list(parent._modules.items()):
                if child is not None and id(child) in new:
                    parent._modules[child_name] = new[id(child)]
    return new.get(id(model), model)


def snapshot(module: nn.Module) -> dict:
    """``module``'s class and non-tensor attributes (no hooks, tensors or children), for :func:`rebuild`."""
    skip = set(CALL_HOOK_DICTS + STATE_HOOK_DICTS + ("_parameters", "_buffers", "_modules"))
    return {"cls": type(module), "attrs": {k: copy.copy(v) for k, v in module.__dict__.items() if k not in skip}}


def rebuild(snap: dict, src: nn.Module, tensor_names: Iterable[str], modules: dict[str, nn.Module]) -> nn.Module:
    """A module of the snapshot's class and attributes, using ``src``'s tensors for ``tensor_names`` and ``modules``.

    The class's ``__init__`` is not called (a subclass may take other
    arguments): the instance is the snapshot's ``__dict__`` plus fresh hook
    dictionaries (:func:`replace_modules` moves the hooks).
    """
    cls = snap["cls"]
    new = cls.__new__(cls)
    new.__dict__.update(nn.Module().__dict__)
    new.__dict__.update({k: copy.copy(v) for k, v in snap["attrs"].items()})
    new.__dict__.update(_parameters={}, _buffers={}, _modules=dict(modules))
    take_over_tensors(new, src, tensor_names)
    return new
