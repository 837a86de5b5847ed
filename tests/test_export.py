"""Export prototype (bnkit.integrations.export): bnkit ops decomposed for torch.export and ONNX.

Oracles: the torch-BN version of the same model (its exported program's
node types, its outputs) and onnxruntime running the exported file against
PyTorch's outputs.
"""

from __future__ import annotations

import copy
import logging
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import bnkit
from bnkit.integrations import export as bx

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning"),
    pytest.mark.skipif(not bnkit.kernels.cpp_available(), reason="the bnkit C++ ops are not available"),
]


@pytest.fixture(autouse=True)
def _quiet_exporter():
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def _trained(bn: nn.Module, torch_bn: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bn, nn.ReLU(), nn.Conv2d(4, 2, 1))
    model.train()
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        model(torch.randn(8, 3, 8, 8, generator=g) * 2 + 1)
    return model.eval()


def _ort(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path))
    return session.run(None, {session.get_inputs()[0].name: x.contiguous().numpy()})[0]


def _call_targets(ep) -> list[str]:
    return [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]


def test_run_decompositions_leaves_no_bnkit_op_and_matches_torch_program():
    torch_model = _trained(nn.BatchNorm2d(4))
    model = bnkit.convert(torch_model)
    x = torch.randn(2, 3, 8, 8)
    for train in (False, True):
        model.train(train)
        ep = torch.export.export(copy.deepcopy(model), (x,))
        assert any("bnkit" in t for t in _call_targets(ep))  # what the prototype removes
        targets = _call_targets(ep.run_decompositions(bx.decompositions()))
        assert not any("bnkit" in t for t in targets)
        if not train:  # the same normalization op as torch's own eval BN after decomposition
            torch_targets = _call_targets(torch.export.export(torch_model.eval(), (x,)).run_decompositions())
            bn_op = "aten._native_batch_norm_legit_no_training.default"
            assert bn_op in torch_targets and bn_op in targets
    # The decomposed training program computes what the layer does (outputs and running statistics).
    ep = torch.export.export(copy.deepcopy(model).train(), (x,)).run_decompositions(bx.decompositions())
    ref = copy.deepcopy(model).train()
    mod = ep.module()
    torch.testing.assert_close(mod(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mod.state_dict()["1.running_var"], ref[1].running_var, rtol=1e-5, atol=1e-6)


def test_onnx_dynamo_export_runs_in_onnxruntime(tmp_path):
    # One model with every variant that has an inference form (one export per layout: exports are slow).
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), bnkit.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 1), bnkit.BatchNorm2d(4, share_affine="weight"), nn.ReLU(),
        nn.Conv2d(4, 4, 1), bnkit.BatchRenorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 1), bnkit.GhostBatchNorm2d(4, virtual_batch_size=4), nn.ReLU(),
        nn.Conv2d(4, 2, 1), bnkit.BatchNorm2d(2),
    )
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        model(torch.randn(8, 3, 8, 8, generator=g) * 2 + 1)
    model[-1] = bnkit.freeze(model[-1])
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    for channels_last in (False, True):
        xx = x.to(memory_format=torch.channels_last) if channels_last else x
        program = bx.export_onnx(model, (xx,))
        path = tmp_path / f"model{int(channels_last)}.onnx"
        program.save(str(path))
        ops = [n.op_type for n in onnx.load(str(path)).graph.node]
        # Standard BN nodes (an ONNX optimizer may fold some into the convs), no custom domain.
        assert ops.count("BatchNormalization") + ops.count("Conv") >= 10, ops
        assert all(n.domain in ("", "ai.onnx") for n in onnx.load(str(path)).graph.node)
        np.testing.assert_allclose(_ort(path, x), model(xx).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_onnx_torchscript_exporter_with_symbolics(tmp_path):
    torch_model = _trained(nn.BatchNorm2d(4))
    model = bnkit.convert(torch_model)
    x = torch.randn(2, 3, 8, 8)
    bx.register_onnx_symbolics(17)
    path = tmp_path / "ts.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17)
    assert "BatchNormalization" in [n.op_type for n in onnx.load(str(path)).graph.node]
    np.testing.assert_allclose(_ort(path, x), torch_model(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    # Training mode: the batch statistics, by ONNX reductions.
    model.train()
    torch_model.train()
    path = tmp_path / "ts_train.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(copy.deepcopy(model), (x,), str(path), dynamo=False, opset_version=17,
                          training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False)
    np.testing.assert_allclose(_ort(path, x), torch_model(x).detach().numpy(), rtol=1e-5, atol=1e-5)
