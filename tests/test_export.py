"""torch.export and ONNX export of bnkit models: standard ATen ops, no bnkit op, no helper needed.

Oracles: the torch-BN version of the same model (its exported program's node
types, its outputs and running statistics), eager bnkit (for the variants
torch has no twin of), and onnxruntime running the exported file against
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
]

BN_EVAL = "aten._native_batch_norm_legit_no_training.default"


@pytest.fixture(autouse=True)
def _quiet_exporter():
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


class Block(nn.Module):
    """A ResNet BasicBlock: conv-BN-ReLU-conv-BN, identity add, ReLU."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


def resnet_like() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), Block(4),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _warm(model: nn.Module, shape, steps: int = 3) -> nn.Module:
    """A few training steps so the running statistics differ from their initial values."""
    model.train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(*shape, generator=g) * 2 + 1)
    return model


def _targets(ep) -> set[str]:
    return {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}


def _ort(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path))
    return session.run(None, {session.get_inputs()[0].name: x.contiguous().numpy()})[0]


def _pair(factory, shape):
    torch_model = _warm(factory(), shape).eval()
    return torch_model, bnkit.convert(torch_model)


@pytest.mark.parametrize("factory,shape", [(resnet_like, (8, 3, 6, 6)), (mlp, (8, 6))])
def test_eval_program_is_torch_program(factory, shape):
    torch_model, model = _pair(factory, shape)
    x = torch.randn(2, *shape[1:])
    ep = torch.export.export(model.eval(), (x,)).run_decompositions()
    oracle = torch.export.export(torch_model.eval(), (x,)).run_decompositions()
    # The very node types of torch's own BN model: no bnkit op, BN as torch's eval BN op.
    assert _targets(ep) == _targets(oracle)
    assert BN_EVAL in _targets(ep)
    torch.testing.assert_close(ep.module()(x), torch_model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_program_has_no_bnkit_op_and_updates_like_torch(momentum):
    torch_model = resnet_like()
    for m in torch_model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    model = bnkit.convert(torch_model)
    x = torch.randn(4, 3, 6, 6)
    ep = torch.export.export(copy.deepcopy(model).train(), (x,)).run_decompositions()
    assert not any("bnkit" in t for t in _targets(ep))
    program, oracle = ep.module(), copy.deepcopy(torch_model).train()
    g = torch.Generator().manual_seed(2)
    for _ in range(3):  # the cumulative average needs num_batches_tracked as a tensor in the program
        xb = torch.randn(4, 3, 6, 6, generator=g)
        torch.testing.assert_close(program(xb), oracle(xb), rtol=1e-5, atol=1e-5)
    state = program.state_dict()
    for k, v in oracle.state_dict().items():
        torch.testing.assert_close(state[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_training_program_keeps_the_nonfinite_policy():
    layer = bnkit.BatchNorm2d(3)  # nonfinite="skip": a NaN batch leaves the statistics (and the count)
    x = torch.randn(4, 3, 5, 5)
    program = torch.export.export(copy.deepcopy(layer), (x,)).run_decompositions().module()
    bad = x.clone()
    bad[0, 1, 0, 0] = float("nan")
    eager = copy.deepcopy(layer)
    for batch in (x, bad, x * 3):
        program(batch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            eager(batch)
    for k, v in eager.state_dict().items():
        torch.testing.assert_close(program.state_dict()[k], v, msg=k)
    assert int(program.state_dict()["num_batches_tracked"]) == 2


def test_axis_shared_affine_and_half_inputs_in_the_program():
    x = torch.randn(4, 5, 3, 6)  # features on the last axis
    layer = _warm(bnkit.BatchNorm2d(6, axis=-1, share_affine="weight"), (8, 5, 3, 6))
    with torch.no_grad():
        layer.weight.fill_(1.5)
        layer.bias.uniform_()
    for train in (False, True):
        layer.train(train)
        eager = copy.deepcopy(layer)
        program = torch.export.export(copy.deepcopy(layer), (x,)).run_decompositions().module()
        torch.testing.assert_close(program(x), eager(x), rtol=1e-5, atol=1e-5)
        for k, v in eager.state_dict().items():
            torch.testing.assert_close(program.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)
    half = _warm(bnkit.BatchNorm2d(5), (8, 5, 3, 3)).to(torch.bfloat16)
    xh = torch.randn(4, 5, 3, 3).to(torch.bfloat16)
    for train in (False, True):
        half.train(train)
        eager = copy.deepcopy(half)
        program = torch.export.export(copy.deepcopy(half), (xh,)).run_decompositions().module()
        torch.testing.assert_close(program(xh), eager(xh), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(program.state_dict()["running_var"], eager.running_var, rtol=1e-2, atol=1e-3)


def _variants_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), bnkit.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 1), bnkit.BatchNorm2d(4, share_affine="weight"), nn.ReLU(),
        nn.Conv2d(4, 4, 1), bnkit.BatchRenorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 1), bnkit.GhostBatchNorm2d(4, virtual_batch_size=4), nn.ReLU(),
        nn.Conv2d(4, 2, 1), bnkit.BatchNorm2d(2),
    )
    _warm(model, (8, 3, 8, 8))
    model[-1] = bnkit.freeze(model[-1])
    return model.eval()


def _check_onnx_file(path) -> list[str]:
    nodes = onnx.load(str(path)).graph.node
    assert all(n.domain in ("", "ai.onnx") for n in nodes), {n.domain for n in nodes}
    return [n.op_type for n in nodes]


@pytest.mark.parametrize("channels_last", [False, True])
def test_onnx_dynamo_exporter_resnet_like_and_variants(tmp_path, channels_last):
    torch_model, model = _pair(resnet_like, (8, 3, 6, 6))
    variants = _variants_model()
    x = torch.randn(2, 3, 8, 8)
    xx = x.to(memory_format=torch.channels_last) if channels_last else x
    torch.onnx.export(torch_model, (xx,), dynamo=True).save(str(tmp_path / "torch.onnx"))
    for name, m, oracle in (("resnet", model, torch_model), ("variants", variants, variants)):
        path = tmp_path / f"{name}.onnx"
        torch.onnx.export(m, (xx,), dynamo=True).save(str(path))
        ops = _check_onnx_file(path)
        if name == "resnet":  # the file torch's own BN model gives (BN folded into the convs)
            assert ops == _check_onnx_file(tmp_path / "torch.onnx")
        else:  # every variant in its inference form: BN nodes or folded, no batch reductions
            assert "ReduceMean" not in ops and ops.count("Conv") == 5, ops
        np.testing.assert_allclose(_ort(path, x), oracle(xx).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_onnx_torchscript_exporter_eval_and_training(tmp_path):
    torch_model, model = _pair(mlp, (8, 6))
    x = torch.randn(5, 6)
    path = tmp_path / "eval.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17)
    assert "BatchNormalization" in _check_onnx_file(path)
    np.testing.assert_allclose(_ort(path, x), torch_model(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    # Training mode: the batch statistics, by ONNX reductions (no custom op, no symbolic registered).
    path = tmp_path / "train.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(copy.deepcopy(model).train(), (x,), str(path), dynamo=False, opset_version=17,
                          training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False)
    _check_onnx_file(path)
    np.testing.assert_allclose(_ort(path, x), copy.deepcopy(torch_model).train()(x).detach().numpy(),
                               rtol=1e-5, atol=1e-5)


def test_onnx_dynamo_exporter_mlp_training_mode(tmp_path):
    torch_model, model = _pair(mlp, (8, 6))
    x = torch.randn(5, 6)
    path = tmp_path / "train.onnx"
    torch.onnx.export(copy.deepcopy(model).train(), (x,), dynamo=True).save(str(path))
    _check_onnx_file(path)
    np.testing.assert_allclose(_ort(path, x), copy.deepcopy(torch_model).train()(x).detach().numpy(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not bnkit.kernels.cpp_available(), reason="the bnkit C++ ops are not available")
def test_decompositions_still_remove_bnkit_ops_from_a_trace_made_in_eager():
    # A program that holds bnkit's C++ ops (recorded by calling the phases in eager mode) decomposes.
    class Phase(nn.Module):
        def forward(self, x3, mean, var):
            return torch.ops.bnkit.batch_norm_infer(x3, mean, var, None, None, 1e-5)

    x3, mean, var = torch.randn(2, 3, 4), torch.randn(3), torch.rand(3) + 0.5
    ep = torch.export.export(Phase(), (x3, mean, var))
    assert any("bnkit" in t for t in _targets(ep))
    decomposed = ep.run_decompositions(bx.decompositions())
    assert BN_EVAL in _targets(decomposed) and not any("bnkit" in t for t in _targets(decomposed))
    torch.testing.assert_close(decomposed.module()(x3, mean, var), Phase()(x3, mean, var))


def test_onnx_torchscript_exporter_variants_channels_last(tmp_path):
    model = _variants_model()
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    path = tmp_path / "variants.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17)
    assert "ReduceMean" not in _check_onnx_file(path)  # every variant in its inference form
    np.testing.assert_allclose(_ort(path, x), model(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_capturing_reads_both_onnx_exporters_flags(monkeypatch):
    """``aten_graph.capturing`` follows ``torch.onnx.is_in_onnx_export`` (its flags read directly)."""
    from torch.onnx._internal.exporter import _flags
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

    from bnkit.kernels import aten_graph

    assert not aten_graph.capturing() and not torch.onnx.is_in_onnx_export()
    monkeypatch.setattr(_flags, "_is_onnx_exporting", True)
    assert aten_graph.capturing() and torch.onnx.is_in_onnx_export()
    monkeypatch.setattr(_flags, "_is_onnx_exporting", False)
    monkeypatch.setattr(GLOBALS, "in_onnx_export", True)
    assert aten_graph.capturing() and torch.onnx.is_in_onnx_export()
