"""Models for the experiments: the BN paper's MLP and a small CNN, both built from a norm factory.

Norm kinds (``NORMS``): ``none | bn | bn-weight | bn-all | renorm | ghost | gn | ln | in``.
``bn`` and its variants are bnkit's own layers (looked up on the ``bnkit`` package when a model is
built; a missing class is a clear :class:`NormNotAvailable` error); ``gn``, ``ln`` and
``in`` are torch's GroupNorm / LayerNorm / InstanceNorm, used as comparison norms.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

__all__ = ["NORMS", "make_norm", "norm_available", "MLP", "SmallCNN", "build_model", "init_weights",
           "NormNotAvailable"]

NORMS = ("none", "bn", "bn-weight", "bn-all", "renorm", "ghost", "gn", "ln", "in")
# Per-channel normalization over the batch (or over space, for "in") cancels a per-channel bias, so the
# linear/conv layer before one of these drops its bias (the BN paper, section 3.2).
_BIAS_FREE = {"bn", "bn-weight", "bn-all", "renorm", "ghost", "in"}

# kind -> (bnkit class name pattern, extra kwargs); {d} is the dimensionality (1 or 2)
# norm kind -> (bnkit family, constructor options); the rank's class comes from the family registry.
_BNKIT = {
    "bn": ("BatchNorm", {}),
    "bn-weight": ("BatchNorm", {"share_affine": "weight"}),
    "bn-all": ("BatchNorm", {"share_affine": "all"}),
    "renorm": ("BatchRenorm", {}),
    "ghost": ("GhostBatchNorm", {}),
}


class NormNotAvailable(RuntimeError):
    """The requested norm cannot be built with the given options (e.g. an option its class does not take)."""


def _bnkit_class(kind: str, dim: int):
    import bnkit
    from bnkit import family

    base_name, kwargs = _BNKIT[kind]
    return family.ranked(getattr(bnkit, base_name), family.RANKS[f"{dim}d"]), dict(kwargs)


def norm_available(kind: str, dim: int = 1) -> bool:
    if kind not in _BNKIT:
        return kind in NORMS
    try:
        cls, kw = _bnkit_class(kind, dim)
        cls(4, **kw)
        return True
    except (NormNotAvailable, TypeError, ValueError):
        return False


def make_norm(kind: str, num_features: int, dim: int = 1, *, groups: int = 0, **overrides) -> nn.Module:
    """A normalization layer for ``num_features`` channels.

    ``dim`` is 1 for (N, C) features (MLP) and 2 for (N, C, H, W) maps (CNN). ``groups`` is GroupNorm's
    group count (0: the largest of 32, 16, 8, 4, 2, 1 dividing C with at least 2 channels per group when
    possible). ``overrides`` go to bnkit layers (e.g. momentum, eps, virtual_batch_size).
    """
    if kind not in NORMS:
        raise ValueError(f"unknown norm {kind!r}; choose from {', '.join(NORMS)}")
    if kind == "none":
        return nn.Identity()
    if kind in _BNKIT:
        cls, kw = _bnkit_class(kind, dim)
        kw.update(overrides)
        try:
            return cls(num_features, **kw)
        except TypeError as e:
            raise NormNotAvailable(f"norm {kind!r}: {cls.__module__}.{cls.__name__}"
                                   f"({num_features}, **{kw}) failed: {e}") from e
    if kind == "gn":
        if groups <= 0:
            groups = next((g for g in (32, 16, 8, 4, 2) if num_features % g == 0 and num_features // g >= 2), 1)
        return nn.GroupNorm(groups, num_features)
    if kind == "ln":
        # over all features of a sample: (C,) for an MLP, (C, H, W) for a CNN (GroupNorm with one group)
        return nn.LayerNorm(num_features) if dim == 1 else nn.GroupNorm(1, num_features)
    if kind == "in":
        if dim == 1:
            raise ValueError("norm 'in' (instance norm) needs spatial dimensions; use it with the CNN, not the MLP")
        return nn.InstanceNorm2d(num_features, affine=True)
    raise AssertionError(kind)


_ACTS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def _act(name: str) -> nn.Module:
    try:
        return _ACTS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose from {', '.join(_ACTS)}") from None


class Block(nn.Module):
    """layer (linear or conv) -> norm -> activation; diagnostics and the training loop's probe hook ``act``."""

    def __init__(self, lin: nn.Module, norm: nn.Module, act: nn.Module):
        super().__init__()
        self.linear, self.norm, self.act = lin, norm, act

    def forward(self, x):
        return self.act(self.norm(self.linear(x)))


class MLP(nn.Module):
    """The BN paper's Figure 1 network: 784-100-100-100-10 with sigmoids, a norm slot per hidden layer."""

    def __init__(self, in_features: int = 784, hidden: Sequence[int] = (100, 100, 100), num_classes: int = 10,
                 activation: str = "sigmoid", norm: str = "none", **norm_kw):
        super().__init__()
        self.norm_kind = norm
        blocks, d = [], in_features
        for h in hidden:
            blocks.append(Block(nn.Linear(d, h, bias=norm not in _BIAS_FREE), make_norm(norm, h, 1, **norm_kw),
                                _act(activation)))
            d = h
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x):
        x = x.flatten(1)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class SmallCNN(nn.Module):
    """conv3x3-norm-ReLU blocks (two per stage, max-pool between stages), global average pool, linear."""

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (32, 64), num_classes: int = 10,
                 activation: str = "relu", norm: str = "bn", **norm_kw):
        super().__init__()
        self.norm_kind = norm
        blocks, c = [], in_channels
        for i, co in enumerate(channels):
            for _ in range(2):
                blocks.append(Block(nn.Conv2d(c, co, 3, padding=1, bias=norm not in _BIAS_FREE),
                                    make_norm(norm, co, 2, **norm_kw), _act(activation)))
                c = co
            if i < len(channels) - 1:
                blocks.append(nn.MaxPool2d(2))
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean((2, 3)))


def init_weights(model: nn.Module, init: str = "default", seed: int = 0) -> nn.Module:
    """Seeded, architecture-independent initialization of every Linear/Conv layer.

    Layer i draws from its own generator seeded by (seed, i), so a BN net and its baseline with the same
    seed start from the same weights (the bias is simply absent in the BN net).
    ``default``: torch's default distribution, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases.
    ``normal:STD``: weights N(0, STD^2), biases 0.
    """
    std = None
    if init != "default":
        if not init.startswith("normal:"):
            raise ValueError(f"init must be 'default' or 'normal:STD', got {init!r}")
        std = float(init.split(":", 1)[1])
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    with torch.no_grad():
        for i, m in enumerate(layers):
            g = torch.Generator().manual_seed(seed * 1_000_003 + i)
            fan_in = m.weight[0].numel()
            if std is None:
                bound = 1.0 / math.sqrt(fan_in)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 2 * bound - bound)
                if m.bias is not None:
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 2 * bound - bound)
            else:
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std)
                if m.bias is not None:
                    m.bias.zero_()
    return model


def build_model(arch: str, norm: str, *, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (100, 100, 100),
                channels: Sequence[int] = (32, 64), activation: Optional[str] = None, init: str = "default",
                seed: int = 0, **norm_kw) -> nn.Module:
    if arch == "mlp":
        m = MLP(int(math.prod(input_shape)), hidden, num_classes, activation or "sigmoid", norm, **norm_kw)
    elif arch == "cnn":
        if len(input_shape) != 3:
            raise ValueError(f"the CNN needs image inputs (C, H, W), got input shape {tuple(input_shape)}")
        m = SmallCNN(input_shape[0], channels, num_classes, activation or "relu", norm, **norm_kw)
    else:
        raise ValueError(f"unknown architecture {arch!r} (mlp|cnn)")
    return init_weights(m, init, seed)
