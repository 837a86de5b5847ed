"""Comparison helpers shared by the tests that check bnkit against an oracle."""

from __future__ import annotations

import torch
from torch import nn

import bnkit

# The BN classes of each input rank: torch's (the oracle) and bnkit's drop-ins
TORCH_BN_BY_RANK = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
BNKIT_BN_BY_RANK = {2: bnkit.BatchNorm1d, 3: bnkit.BatchNorm1d, 4: bnkit.BatchNorm2d, 5: bnkit.BatchNorm3d}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str, scale: float = 1.0) -> None:
    """``max|actual - expected| <= tol * max(scale, max|expected|)``, compared in float64; shapes must agree."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    scale = max(scale, e.abs().max().item()) if e.numel() else scale
    err = (a - e).abs().max().item() if e.numel() else 0.0
    assert err <= tol * scale, f"{what}: max abs diff {err:.3g} > {tol:.1g} * {scale:.3g}"


def input_grad_scale(x: torch.Tensor, grad: torch.Tensor, eps: float) -> float:
    """The natural size of BN's input gradient, max|dy| / min(std): with few values per
    channel the exact gradient nearly cancels and what remains is rounding of that size."""
    if x.numel() == 0:
        return 1.0
    dims = [d for d in range(x.dim()) if d != 1]
    var = x.double().var(dim=dims, unbiased=False)
    return max(1.0, grad.double().abs().max().item() / (var.min().item() + eps) ** 0.5)


def output_scale(x: torch.Tensor, eps: float) -> float:
    """The natural size of the rounding error of BN's normalized output, max|x| / min(std):
    the statistics are computed from values of size |x|, so their rounding (about u*|x|)
    reaches the output amplified by 1/std. Two float32 values 0.01 apart near 2.8 give
    outputs that torch itself gets only to ~2e-5 of the exact value."""
    return input_grad_scale(x, x, eps)


def twin_layers(cls_torch, cls_bnkit, num_features: int, *, device="cpu", dtype=torch.float32, **kwargs):
    """A torch BN layer and a bnkit one with the same (non-trivial) affine parameters, for parity tests."""
    torch.manual_seed(0)
    t = cls_torch(num_features, **kwargs).to(device)
    b = cls_bnkit(num_features, **kwargs).to(device)
    with torch.no_grad():
        if t.weight is not None:
            t.weight.uniform_(0.5, 1.5)
            t.bias.uniform_(-0.5, 0.5)
            b.weight.copy_(t.weight)
            b.bias.copy_(t.bias)
    return t.to(dtype), b.to(dtype)


def randomize_bn(model: nn.Module, seed: int = 0, *, parameters_only: bool = False) -> nn.Module:
    """Non-trivial BN parameters and statistics, in each tensor's dtype (a fresh layer is the identity in eval).

    ``parameters_only``: ``weight``/``bias`` are set only where they are parameters (not a frozen layer's buffers).
    """
    g = torch.Generator().manual_seed(seed)
    kind = nn.Parameter if parameters_only else torch.Tensor
    with torch.no_grad():
        for m in model.modules():
            rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
            if isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor):
                rm.copy_(torch.randn(rm.shape, generator=g, dtype=rm.dtype) * 0.3)
                rv.copy_(torch.rand(rv.shape, generator=g, dtype=rv.dtype) + 0.5)
                for name in ("weight", "bias"):
                    t = getattr(m, name, None)
                    if isinstance(t, kind):
                        t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.3 + (name == "weight"))
    return model
