"""Extra networks for the claim experiments, built from the same norm factory as :mod:`.models`.

Every net is a :class:`SeqNet`: a list of ``blocks`` run in order (``Block`` = layer -> norm ->
activation, plus pooling / flatten / dropout modules) and a linear ``head``; the probes of the training
loop hook the activation of the last ``Block``. Architectures (``RunConfig.arch``):

* ``mlp``     -- the BN paper's MLP (``hidden`` widths), with optional dropout after each activation.
* ``tinycnn`` -- three conv3x3-norm-ReLU-maxpool stages (default 8, 16, 32 channels), global average pool,
  linear: about 0.5 M multiply-adds per 28x28 image, small enough for batch-size sweeps on two cores.
* ``keras``   -- the Keras MNIST example's conv net: conv3x3(32)-ReLU-conv3x3(64)-ReLU-maxpool-dropout(0.25)-
  dense(128)-ReLU-dropout(0.5)-dense(10); ``channels``/``fc`` options set the widths (the experiments
  default to half width, 16/32/64, to fit the time budget). With a norm, one after every conv and dense layer.
* ``lenet``   -- the PyTorch CIFAR-10 tutorial's LeNet: conv5x5(6)-ReLU-pool-conv5x5(16)-ReLU-pool-
  fc(120)-ReLU-fc(84)-ReLU-fc(10); with a norm only in the fully connected layers (BatchNorm1d, as in the
  source), unless ``conv_norm`` is set.

Options (``RunConfig.options``): ``dropout`` (p after hidden activations; for ``keras``, a pair
(conv-stage p, dense p)), ``init_gain`` (weights N(0, gain^2 / fan_in), biases 0, from the same
per-layer seeded generators as :func:`.models.init_weights`; sqrt(2) is He's init for ReLU),
``channels``, ``fc``, ``norm_kw`` (keyword arguments of the norm layers, e.g. ``virtual_batch_size``,
``groups``, Batch Renorm's ``warmup_steps``), ``conv_norm`` (lenet). The extra norm kind ``torch-bn`` is
torch's own ``nn.BatchNorm1d/2d`` (for side-by-side cost measurements).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence

import torch
from torch import nn

from .models import NORMS, Block, _act, init_weights, make_norm

__all__ = ["SeqNet", "build_net", "norm_modules", "norm_param_count", "expected_norm_params", "normalized_widths", "NET_ARCHS",
           "NET_NORMS"]

NET_ARCHS = ("mlp", "cnn", "tinycnn", "keras", "lenet")
NET_NORMS = tuple(NORMS) + ("torch-bn",)
# the layer before a per-channel batch (or instance) norm drops its bias: the norm's shift cancels it
_BIAS_FREE = {"bn", "bn-weight", "bn-all", "renorm", "ghost", "in", "torch-bn"}


def _norm(kind: str, c: int, dim: int, kw: Dict[str, Any]) -> nn.Module:
    if kind == "torch-bn":
        return (nn.BatchNorm1d if dim == 1 else nn.BatchNorm2d)(c, **kw)
    kw = dict(kw)
    groups = int(kw.pop("groups", 0)) if kind == "gn" else 0
    if kind not in ("bn", "bn-weight", "bn-all", "renorm", "ghost"):
        kw = {}  # torch's GroupNorm / LayerNorm take no bnkit options
    return make_norm(kind, c, dim, groups=groups, **kw)


class SeqNet(nn.Module):
    """``blocks`` in order, then ``head``; ``norm_kind`` records the norm it was built with."""

    def __init__(self, blocks: List[nn.Module], head: nn.Module, norm: str):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.norm_kind = norm

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class _GAP(nn.Module):
    def forward(self, x):
        return x.mean((2, 3))


def _act_drop(act: str, p: float) -> nn.Module:
    a = _act(act)
    return nn.Sequential(a, nn.Dropout(p)) if p > 0 else a


def _conv_block(ci, co, k, pad, norm, kw, act, use_norm=True):
    kind = norm if use_norm else "none"
    return Block(nn.Conv2d(ci, co, k, padding=pad, bias=kind not in _BIAS_FREE), _norm(kind, co, 2, kw),
                 _act(act))


def _fc_block(ci, co, norm, kw, act, p=0.0):
    return Block(nn.Linear(ci, co, bias=norm not in _BIAS_FREE), _norm(norm, co, 1, kw), _act_drop(act, p))


def _flat_size(blocks: List[nn.Module], input_shape) -> int:
    with torch.no_grad():
        x = torch.zeros(2, *input_shape)
        m = nn.Sequential(*blocks)
        was = m.training
        m.eval()
        n = int(m(x).flatten(1).shape[1])
        m.train(was)
    return n


def _mlp(o, input_shape, num_classes, norm, kw, hidden, act):
    p = float(o.get("dropout", 0.0) or 0.0)
    blocks, d = [nn.Flatten()], int(math.prod(input_shape))
    for h in hidden:
        blocks.append(_fc_block(d, int(h), norm, kw, act or "sigmoid", p))
        d = int(h)
    return SeqNet(blocks, nn.Linear(d, num_classes), norm)


def _tinycnn(o, input_shape, num_classes, norm, kw, act):
    chans = [int(c) for c in o.get("channels", (8, 16, 32))]
    blocks, c = [], int(input_shape[0])
    for i, co in enumerate(chans):
        blocks.append(_conv_block(c, co, 3, 1, norm, kw, act or "relu"))
        if i < len(chans) - 1:
            blocks.append(nn.MaxPool2d(2))
        c = co
    blocks.append(_GAP())
    return SeqNet(blocks, nn.Linear(c, num_classes), norm)


def _keras(o, input_shape, num_classes, norm, kw, act):
    c1, c2 = (int(c) for c in o.get("channels", (32, 64)))
    fc = [int(f) for f in o.get("fc", (128,))]
    d = o.get("dropout", (0.25, 0.5))
    p_conv, p_fc = (float(d), float(d)) if isinstance(d, (int, float)) else (float(d[0]), float(d[1]))
    act = act or "relu"
    blocks: List[nn.Module] = [_conv_block(int(input_shape[0]), c1, 3, 0, norm, kw, act),
                               _conv_block(c1, c2, 3, 0, norm, kw, act), nn.MaxPool2d(2)]
    if p_conv > 0:
        blocks.append(nn.Dropout(p_conv))
    blocks.append(nn.Flatten())
    n = _flat_size(blocks, input_shape)
    for f in fc:
        blocks.append(_fc_block(n, f, norm, kw, act, p_fc))
        n = f
    return SeqNet(blocks, nn.Linear(n, num_classes), norm)


def _lenet(o, input_shape, num_classes, norm, kw, act):
    c1, c2 = (int(c) for c in o.get("channels", (6, 16)))
    fc = [int(f) for f in o.get("fc", (120, 84))]
    p = float(o.get("dropout", 0.0) or 0.0)
    conv_norm = bool(o.get("conv_norm", False))
    act = act or "relu"
    blocks: List[nn.Module] = [_conv_block(int(input_shape[0]), c1, 5, 0, norm, kw, act, conv_norm),
                               nn.MaxPool2d(2), _conv_block(c1, c2, 5, 0, norm, kw, act, conv_norm),
                               nn.MaxPool2d(2), nn.Flatten()]
    n = _flat_size(blocks, input_shape)
    for f in fc:
        blocks.append(_fc_block(n, f, norm, kw, act, p))
        n = f
    return SeqNet(blocks, nn.Linear(n, num_classes), norm)


def _init_gain(model: nn.Module, gain: float, seed: int) -> None:
    """Weights N(0, gain^2 / fan_in), biases 0; layer i draws from the generator seeded by (seed, i), the
    same generators as models.init_weights, so every norm's net starts from the same weights."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    with torch.no_grad():
        for i, m in enumerate(layers):
            g = torch.Generator().manual_seed(seed * 1_000_003 + i)
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (gain / math.sqrt(m.weight[0].numel())))
            if m.bias is not None:
                m.bias.zero_()


def build_net(cfg, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """The network of a :class:`.train.RunConfig` (``arch``, ``norm``, ``hidden``, ``activation``, ``init``,
    ``seed`` and ``options``), initialised deterministically from its seed."""
    o = dict(cfg.options or {})
    unknown = set(o) - {"dropout", "init_gain", "channels", "fc", "norm_kw", "conv_norm"}
    if unknown:
        raise ValueError(f"unknown model option(s) {sorted(unknown)}")
    if cfg.norm not in NET_NORMS:
        raise ValueError(f"unknown norm {cfg.norm!r}; choose from {', '.join(NET_NORMS)}")
    kw = dict(o.get("norm_kw") or {})
    act = cfg.activation
    if cfg.arch == "mlp":
        m = _mlp(o, input_shape, num_classes, cfg.norm, kw, cfg.hidden, act)
    elif cfg.arch == "cnn":
        from .models import build_model
        if "channels" in o or "dropout" in o or kw or cfg.norm == "torch-bn":
            raise ValueError("arch 'cnn' (models.SmallCNN) takes no channels/dropout/norm_kw options; use tinycnn")
        return _apply_gain(build_model("cnn", cfg.norm, input_shape=input_shape, num_classes=num_classes,
                                       activation=act, init=cfg.init, seed=cfg.seed), o, cfg.seed)
    elif cfg.arch == "tinycnn":
        m = _tinycnn(o, input_shape, num_classes, cfg.norm, kw, act)
    elif cfg.arch == "keras":
        m = _keras(o, input_shape, num_classes, cfg.norm, kw, act)
    elif cfg.arch == "lenet":
        m = _lenet(o, input_shape, num_classes, cfg.norm, kw, act)
    else:
        raise ValueError(f"unknown architecture {cfg.arch!r}; choose from {', '.join(NET_ARCHS)}")
    return _apply_gain(init_weights(m, cfg.init, cfg.seed), o, cfg.seed)


def _apply_gain(m: nn.Module, o: Dict, seed: int) -> nn.Module:
    if o.get("init_gain") is not None:
        _init_gain(m, float(o["init_gain"]), seed)
    return m


def norm_modules(model: nn.Module) -> List[nn.Module]:
    """The norm layer of every ``Block`` of the net (``nn.Identity`` where there is none)."""
    return [b.norm for b in model.blocks if hasattr(b, "norm") and hasattr(b, "linear")]


def norm_param_count(model: nn.Module) -> int:
    """Learnable parameters in the net's normalization layers."""
    return sum(p.numel() for n in norm_modules(model) for p in n.parameters())


def expected_norm_params(kind: str, widths: Sequence[int]) -> int:
    """The design: per normalized layer of C channels, ``bn``/``renorm``/``ghost``/``gn``/``ln``/``in``/
    ``torch-bn`` learn a gamma and a beta per channel (2C), ``bn-weight`` one gamma shared by all channels
    and a beta per channel (1 + C), ``bn-all`` one gamma and one beta (2), ``none`` nothing."""
    per = {"none": lambda c: 0, "bn-weight": lambda c: 1 + c, "bn-all": lambda c: 2}
    f = per.get(kind, lambda c: 2 * c)
    return int(sum(f(int(c)) for c in widths))


def normalized_widths(model: nn.Module) -> List[int]:
    """Output channels of the layer before every norm slot that holds a norm (not ``nn.Identity``)."""
    out = []
    for b in model.blocks:
        if hasattr(b, "norm") and hasattr(b, "linear") and not isinstance(b.norm, nn.Identity):
            lin = b.linear
            out.append(int(lin.out_features if isinstance(lin, nn.Linear) else lin.out_channels))
    return out
