"""Deploying exported bnkit models where bnkit is not installed: ``torch.export.save`` / ``load`` in a process
that never imports bnkit, and AOTInductor packages.

Every layer and variant exports to ATen ops only, so a saved program needs nothing of bnkit. Oracles: the
eager model the program was exported from, run on the same inputs (outputs and, in training, the running
buffers after two calls), and for the plain layers the same model with torch's BN.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import bnkit
from bnkit.variants import BatchNormAct2d

C = 4


class _Site(nn.Module):
    """A model around one layer: conv, the layer (called with its keyword, channels-last for axis=-1), ReLU."""

    def __init__(self, layer: nn.Module, **kw) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, C, 3, bias=False)
        self.bn = layer
        self.kw = kw

    def forward(self, x):
        h = self.conv(x)
        if getattr(self.bn, "axis", 1) == -1:
            return torch.relu(self.bn(h.permute(0, 2, 3, 1), **self.kw)).permute(0, 3, 1, 2)
        return torch.relu(self.bn(h, **self.kw))


LAYERS = {
    "BatchNorm2d": lambda: bnkit.BatchNorm2d(C, momentum=0.3),
    "BatchNorm(axis=-1)": lambda: bnkit.BatchNorm(C, axis=-1),
    "share_affine": lambda: bnkit.BatchNorm2d(C, share_affine="all"),
    "keras convention": lambda: bnkit.BatchNorm2d(C, convention="keras"),
    "GhostBatchNorm2d": lambda: bnkit.GhostBatchNorm2d(C, virtual_batch_size=3),
    "BatchRenorm2d": lambda: bnkit.BatchRenorm2d(C),
    "keras BatchRenorm2d": lambda: bnkit.BatchRenorm2d(C, convention="keras"),
    "GhostBatchNorm2d momentum=None": lambda: bnkit.GhostBatchNorm2d(C, virtual_batch_size=2, momentum=None),
    "FrozenBatchNorm2d": lambda: bnkit.FrozenBatchNorm2d(C),
    "BatchNormAct2d": lambda: BatchNormAct2d(C, act=nn.ReLU6()),
    "DomainBatchNorm2d": lambda: bnkit.DomainBatchNorm2d(C, 2),
    "SharedBatchNorm": lambda: bnkit.SharedBatchNorm(C, 2),
}
KWARGS = {"DomainBatchNorm2d": {"domain": 1}, "SharedBatchNorm": {"site": 1}}
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _model(name: str, training: bool) -> nn.Module:
    torch.manual_seed(0)
    m = _Site(LAYERS[name](), **KWARGS.get(name, {}))
    with torch.no_grad():  # statistics and affine parameters away from their initial values
        for t in m.bn.buffers():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape) + 0.5)
        for p in m.bn.parameters():
            p.copy_(torch.rand(p.shape) + 0.5)
    return m.train(training)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(6, 3, 7, 7, generator=g) * 2 + 1 for _ in range(2)]


def _run(module: nn.Module) -> dict:
    """Outputs of two calls and the floating/int buffers after them (by name)."""
    outs = [module(x) for x in _inputs()]
    return {"outs": outs, "buffers": {k: v.clone() for k, v in module.state_dict().items() if k.split(".")[-1] in _BUFFERS}}


_LOADER = textwrap.dedent("""
    import sys, torch
    results = {}
    for path in sys.argv[2:]:
        program = torch.export.load(path)
        module = program.module()
        data = torch.load(path + ".inputs")
        outs = [module(x) for x in data]
        bufs = {k: v.clone() for k, v in module.state_dict().items()
                if k.split(".")[-1] in ("running_mean", "running_var", "num_batches_tracked")}
        results[path] = {"outs": outs, "buffers": bufs}
    assert not any(m == "bnkit" or m.startswith("bnkit.") for m in sys.modules), "bnkit was imported"
    torch.save(results, sys.argv[1])
""")


def test_saved_programs_run_where_bnkit_is_not_imported(tmp_path):
    expected, paths = {}, []
    for name in LAYERS:
        for training in (True, False):
            model = _model(name, training)
            program = torch.export.export(copy.deepcopy(model), (_inputs()[0],))
            path = str(tmp_path / f"{len(paths)}.pt2")
            torch.export.save(program, path)
            torch.save(_inputs(), path + ".inputs")
            expected[path] = (name, training, _run(model))
            paths.append(path)
    out = tmp_path / "results.pt"
    r = subprocess.run([sys.executable, "-c", _LOADER, str(out), *paths], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(out)
    for path, (name, training, want) in expected.items():
        where = f"{name} ({'train' if training else 'eval'})"
        for a, b in zip(got[path]["outs"], want["outs"]):
            torch.testing.assert_close(a, b, msg=where)
        assert got[path]["buffers"].keys() == want["buffers"].keys(), where
        for k, v in want["buffers"].items():
            torch.testing.assert_close(got[path]["buffers"][k], v, msg=f"{where} {k}")


def _torch_twin(training: bool) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    theirs = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4))
    theirs(torch.randn(8, 3, 12, 12))  # running statistics away from 0 / 1
    return theirs.train(training), bnkit.convert(theirs).train(training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_saved_converted_model_matches_torchs_own_saved_model(tmp_path, training):
    theirs, ours = _torch_twin(training)
    x = torch.randn(4, 3, 12, 12)
    for model, name in ((theirs, "theirs"), (ours, "ours")):
        torch.export.save(torch.export.export(copy.deepcopy(model), (x,)), str(tmp_path / f"{name}.pt2"))
    loaded = {n: torch.export.load(str(tmp_path / f"{n}.pt2")).module() for n in ("theirs", "ours")}
    for _ in range(2):
        torch.testing.assert_close(loaded["ours"](x), loaded["theirs"](x))
    for k, v in loaded["theirs"].state_dict().items():
        torch.testing.assert_close(loaded["ours"].state_dict()[k], v, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_aot_inductor_package_matches_torchs(tmp_path, training):
    """AOTInductor compiles the exported graph to a shared library (about 10-30 s on 2 cores)."""
    theirs, ours = _torch_twin(training)
    x = torch.randn(4, 3, 12, 12)
    path = torch._inductor.aoti_compile_and_package(
        torch.export.export(copy.deepcopy(ours), (x,)), package_path=str(tmp_path / "ours.pt2")
    )
    runner = torch._inductor.aoti_load_package(path)
    torch.testing.assert_close(runner(x), theirs(x), rtol=1e-4, atol=1e-5)
