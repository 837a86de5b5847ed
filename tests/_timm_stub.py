"""A pure-Python stand-in for the one piece of torchvision that ``import timm`` needs.

timm imports ``torchvision.ops.misc.FrozenBatchNorm2d``; torchvision cannot be
installed next to this CPU torch, so tests install this module first (only
when torchvision is not importable). The class is faithful to torchvision's:
buffers ``weight``, ``bias``, ``running_mean``, ``running_var``, ``eps=1e-5``,
forward ``x * scale + shift`` with ``scale = weight * rsqrt(running_var + eps)``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

import torch
from torch import nn


class FrozenBatchNorm2d(nn.Module):
    """torchvision's FrozenBatchNorm2d: BatchNorm2d with fixed statistics and affine parameters."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.weight.shape[0]}, eps={self.eps})"


FrozenBatchNorm2d.__module__ = "torchvision.ops.misc"


class _Missing(type):
    """Placeholders for the rest of torchvision that timm's data modules name at import time.

    ``InterpolationMode.BILINEAR``, ``transforms.Compose`` ... resolve to further
    placeholders; making an instance raises, so a test that needs real
    torchvision fails loudly instead of silently using a stand-in.
    """

    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Missing(f"{cls.__name__}.{name}", (), {})

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"torchvision stand-in: {cls.__name__} is not available in the test environment")


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Missing(f"{self.__name__}.{name}", (), {})


# What timm imports from torchvision (everything but FrozenBatchNorm2d is a placeholder).
_MODULES = (
    "torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.datasets", "torchvision.transforms",
    "torchvision.transforms.functional", "torchvision.models", "torchvision.models.feature_extraction",
    "torchvision.utils",
)


def install() -> bool:
    """Put the stand-in into ``sys.modules`` unless a real torchvision is importable; True when installed."""
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return False
    mods = {name: _StubModule(name) for name in _MODULES}
    for name, mod in mods.items():
        mod.__path__ = []  # a package, so that submodule imports resolve through sys.modules
        # a spec, as every imported module has: importlib.util.find_spec raises ValueError on a None one, and
        # torch.onnx and lightning_utilities ask it whether torchvision is there
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(mods[parent], child, mod)
    mods["torchvision.ops.misc"].FrozenBatchNorm2d = FrozenBatchNorm2d
    sys.modules.update(mods)
    return True


def import_timm():
    """``timm`` with the stand-in installed, or ``pytest.skip`` with the reason when timm is absent."""
    import pytest

    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (pip install --no-deps timm)")
    install()
    import timm

    return timm
