"""PT2E quantization (torchao's ``prepare_pt2e`` / ``prepare_qat_pt2e`` / ``convert_pt2e``, the flow torch's
eager and FX quantization migrate to) of models with bnkit layers, against the same model with torch's BN.

Post-training quantization of an exported eval model: a bnkit layer exports as torch's own BN op, so the
quantizer folds it into the convolution exactly as torch's (bitwise equal outputs). Quantization-aware
training: the QAT pattern matcher folds conv + torch's *training* BN op; a bnkit layer's training graph is
its own decomposition (its non-finite policy, conventions), so QAT goes through ``bnkit.convert(model,
to="torch")`` first (docs/deploying.md), which then equals torch's QAT step by step.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnkit

pt2e = pytest.importorskip("torchao.quantization.pt2e.quantize_pt2e", reason="torchao is not installed")
xiq = pytest.importorskip("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer")
from torchao.quantization.pt2e import move_exported_model_to_eval  # noqa: E402


def _net(act: type = nn.ReLU) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), act(), nn.Conv2d(8, 8, 3, groups=2),
                      nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 12 * 12, 5))
    m.train()
    for _ in range(3):  # running statistics and affine parameters away from their initial values
        m(torch.randn(8, 3, 16, 16) * 2 + 1)
    with torch.no_grad():
        for bn in (m[1], m[4]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return m


def _quantizer(qat: bool):
    q = xiq.X86InductorQuantizer()
    q.set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=qat))
    return q


def _ptq(model: nn.Module, calibration: list[torch.Tensor]) -> nn.Module:
    program = torch.export.export(copy.deepcopy(model).eval(), (calibration[0],)).module()
    prepared = pt2e.prepare_pt2e(program, _quantizer(qat=False))
    for x in calibration:
        prepared(x)
    return pt2e.convert_pt2e(prepared)


@pytest.mark.parametrize("fuse_activations", [False, True], ids=["plain", "fused BN+ReLU"])
def test_post_training_quantization_equals_torchs(fuse_activations):
    theirs = _net()
    ours = bnkit.convert(theirs, fuse_activations=fuse_activations)
    calibration = [torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    q_theirs, q_ours = _ptq(theirs, calibration), _ptq(ours, calibration)
    for q in (q_theirs, q_ours):  # BN folded into the convolutions: no BN op is left
        assert not any("batch_norm" in str(n.target) for n in q.graph.nodes if n.op == "call_function")
    x = torch.randn(4, 3, 16, 16)  # (the exported batch size)
    torch.testing.assert_close(q_ours(x), q_theirs(x), rtol=0, atol=0)


def _qat(model: nn.Module, batches: list[torch.Tensor], convert: bool) -> tuple[list[torch.Tensor], nn.Module | None]:
    program = torch.export.export(copy.deepcopy(model).train(), (batches[0],)).module()
    prepared = pt2e.prepare_qat_pt2e(program, _quantizer(qat=True))
    opt = torch.optim.SGD(prepared.parameters(), lr=0.05)
    outs = []
    for x in batches:
        opt.zero_grad()
        y = prepared(x)
        y.square().mean().backward()
        opt.step()
        outs.append(y.detach())
    if not convert:
        return outs, None
    move_exported_model_to_eval(prepared)
    return outs, pt2e.convert_pt2e(prepared)  # (about 15 s on 2 cores)


@pytest.mark.parametrize("convert", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["steps", "converted"])
def test_qat_after_converting_back_to_torch_equals_torchs_qat(convert):
    theirs = _net()
    ours = bnkit.convert(theirs)
    batches = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(10 + i)) for i in range(3)]
    outs_theirs, q_theirs = _qat(theirs, batches, convert)
    outs_ours, q_ours = _qat(bnkit.convert(ours, to="torch"), batches, convert)
    for a, b in zip(outs_ours, outs_theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if convert:
        x = torch.randn(8, 3, 16, 16)  # (the exported batch size)
        torch.testing.assert_close(q_ours(x), q_theirs(x), rtol=0, atol=0)


def test_qat_on_bnkit_layers_directly_does_not_fold_them():
    """The documented limit: without the conversion, the QAT graph keeps bnkit's decomposed training BN (no
    conv-BN fold, so the fake-quantized weights are the unfolded ones), where torch's graph folds."""
    theirs = _net()
    x = torch.randn(8, 3, 16, 16)
    graphs = {}
    for name, model in (("theirs", theirs), ("ours", bnkit.convert(theirs))):
        program = torch.export.export(copy.deepcopy(model).train(), (x,)).module()
        graphs[name] = {str(n.target) for n in pt2e.prepare_qat_pt2e(program, _quantizer(qat=True)).graph.nodes
                        if n.op == "call_function"}
    assert "aten.batch_norm.default" in graphs["theirs"]  # the folded pattern keeps torch's op
    assert "aten.batch_norm.default" not in graphs["ours"] and "aten.var_mean.correction" in graphs["ours"]
