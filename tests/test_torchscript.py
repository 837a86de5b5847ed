"""TorchScript: ``torch.jit.script`` and ``torch.jit.trace`` of models with bnkit layers.

Oracle: the torch-BN version of the same model (eager), step by step in
training and in eval: outputs, input and parameter gradients, running
statistics. Where bnkit differs from torch (feature axis, shared affine,
non-finite policy, half inputs), the oracle is torch on the equivalent
problem or bnkit's eager layer.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
from _compare import assert_close
from torch import nn

import bnkit
from bnkit.integrations.torchscript import ScriptableBatchNorm, scriptable

TOL = 2e-5


def _net(kind: str, bn_kwargs: dict) -> nn.Module:
    torch.manual_seed(0)
    if kind == "1d":
        net = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, **bn_kwargs), nn.ReLU(), nn.Linear(4, 3))
    elif kind == "1d-seq":
        net = nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4, **bn_kwargs), nn.ReLU())
    elif kind == "3d":
        net = nn.Sequential(nn.Conv3d(2, 4, 2), nn.BatchNorm3d(4, **bn_kwargs), nn.ReLU())
    else:
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, **bn_kwargs), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        bn = net[1]
        if bn.weight is not None:
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
    return net


def _input(kind: str, n: int, seed: int, channels_last: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = {"1d": (n, 5), "1d-seq": (n, 3, 9), "3d": (n, 2, 4, 5, 5)}.get(kind, (n, 3, 8, 8))
    x = torch.randn(shape, generator=g) * 2 + 0.5
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x


def _step(model: nn.Module, x: torch.Tensor, g: torch.Tensor):
    x = x.clone().requires_grad_()
    model.zero_grad()
    y = model(x)
    y.backward(g)
    grads = [p.grad.clone() for p in model.parameters()]
    return y.detach(), x.grad, grads


def _compare_models(oracle: nn.Module, other: nn.Module, kind: str, steps=((6, True), (4, True), (5, False)),
                    channels_last: bool = False) -> None:
    for i, (n, train) in enumerate(steps):
        oracle.train(train)
        other.train(train)
        x = _input(kind, n, seed=10 + i, channels_last=channels_last)
        with torch.no_grad():
            shape = copy.deepcopy(oracle)(x).shape
        g = torch.randn(shape, generator=torch.Generator().manual_seed(i))
        y0, dx0, grads0 = _step(oracle, x, g)
        y1, dx1, grads1 = _step(other, x, g)
        assert_close(y1, y0, TOL, f"step {i} output")
        assert_close(dx1, dx0, TOL, f"step {i} input grad")
        for a, b in zip(grads1, grads0):
            assert_close(a, b, TOL, f"step {i} param grad")
        sd0, sd1 = oracle.state_dict(), other.state_dict()
        assert list(sd0) == list(sd1)
        for k in sd0:
            assert_close(sd1[k], sd0[k], TOL, f"step {i} {k}")


@pytest.mark.parametrize(
    "kind,bn_kwargs,channels_last",
    [
        ("2d", {}, False),
        ("2d", {}, True),
        ("2d", {"momentum": None}, False),
        ("2d", {"affine": False}, False),
        ("2d", {"track_running_stats": False}, False),
        ("1d", {}, False),
        ("1d-seq", {"momentum": 0.3}, False),
        ("3d", {}, False),
    ],
)
def test_script_matches_torch(kind, bn_kwargs, channels_last):
    torch_net = _net(kind, bn_kwargs)
    bnkit_net = bnkit.convert(torch_net)
    scripted = torch.jit.script(copy.deepcopy(bnkit_net))
    assert isinstance(scripted, torch.jit.ScriptModule)
    assert not any(n.kind().startswith("bnkit::") for n in scripted.inlined_graph.nodes())
    _compare_models(torch_net, scripted, kind, channels_last=channels_last)
    # ... and the eager bnkit model agrees with both.
    _compare_models(_net(kind, bn_kwargs), bnkit_net, kind, channels_last=channels_last)


def test_script_keeps_feature_axis_and_channels_last_layout():
    # bnkit's axis=-1 on (N, H, W, C) data is torch's BatchNorm2d on the permuted tensor.
    torch.manual_seed(1)
    ref = nn.BatchNorm2d(4, momentum=None)
    layer = bnkit.BatchNorm(4, axis=-1, momentum=None)
    scripted = torch.jit.script(copy.deepcopy(layer))
    for i, train in enumerate((True, True, False)):
        ref.train(train)
        scripted.train(train)
        x = torch.randn(5, 3, 6, 4) * 3 - 1
        y = scripted(x)
        y_ref = ref(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        assert_close(y, y_ref, TOL, f"step {i}")
        for k in ("running_mean", "running_var", "num_batches_tracked"):
            assert_close(getattr(scripted, k), getattr(ref, k), TOL, k)


@pytest.mark.parametrize("share_affine", ["weight", "all"])
def test_script_shared_affine_matches_eager(share_affine):
    torch.manual_seed(2)
    layer = bnkit.BatchNorm2d(4, share_affine=share_affine)
    with torch.no_grad():
        layer.weight.fill_(1.7)
        layer.bias.uniform_(-1, 1)
    scripted = torch.jit.script(copy.deepcopy(layer))
    for i, train in enumerate((True, False)):
        layer.train(train)
        scripted.train(train)
        x = torch.randn(4, 4, 5, 5)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = layer(xa), scripted(xb)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        assert_close(yb, ya, TOL, "output")
        assert_close(xb.grad, xa.grad, TOL, "input grad")
        assert_close(scripted.weight.grad, layer.weight.grad, TOL, "weight grad")
        assert scripted.weight.shape == (1,)


def test_script_nonfinite_policies_match_eager():
    x = torch.randn(4, 3, 5, 5)
    x[0, 1, 0, 0] = float("nan")
    for policy in ("skip", "raise", "propagate"):
        eager = bnkit.BatchNorm2d(3, nonfinite=policy)
        scripted = torch.jit.script(copy.deepcopy(eager))
        if policy == "raise":
            with pytest.raises(FloatingPointError):
                eager(x)
            with pytest.raises(torch.jit.Error, match="FloatingPointError.*not finite"):
                scripted(x)
        elif policy == "skip":
            with pytest.warns(RuntimeWarning, match="not finite"):
                eager(x)
            with pytest.warns(UserWarning, match="not finite"):
                scripted(x)
        else:
            eager(x)
            scripted(x)
            torch_bn = nn.BatchNorm2d(3)
            torch_bn(x)
            assert torch.equal(scripted.running_var.isnan(), torch_bn.running_var.isnan())
        for k, v in eager.state_dict().items():
            assert torch.equal(scripted.state_dict()[k].isnan(), v.isnan()), (policy, k)
            assert_close(scripted.state_dict()[k].nan_to_num(), v.nan_to_num(), TOL, f"{policy} {k}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_script_half_inputs_match_eager(dtype):
    torch.manual_seed(3)
    eager = bnkit.BatchNorm2d(3)  # float32 parameters and buffers, half input: float32 statistics
    scripted = torch.jit.script(copy.deepcopy(eager))
    ref = nn.BatchNorm2d(3)
    x = (torch.randn(4, 3, 6, 6) * 2 + 1).to(dtype)
    ya, yb, yr = eager(x), scripted(x), ref(x.float())
    assert ya.dtype == yb.dtype == dtype
    assert_close(yb, yr, 1e-2, "output vs torch float32")
    assert_close(yb, ya, 1e-2, "output vs eager")
    assert_close(scripted.running_var, ref.running_var, 1e-5, "running_var")


def test_script_frozen_matches_torch_eval():
    torch.manual_seed(4)
    ref = nn.BatchNorm2d(4)
    with torch.no_grad():
        ref.running_mean.uniform_(-1, 1)
        ref.running_var.uniform_(0.5, 2)
        ref.weight.uniform_(0.5, 2)
        ref.bias.uniform_(-1, 1)
    ref.eval()
    model = bnkit.freeze(nn.Sequential(nn.Conv2d(3, 4, 3), bnkit.convert(copy.deepcopy(ref))))
    assert isinstance(model[1], bnkit.FrozenBatchNorm2d)
    scripted = torch.jit.script(copy.deepcopy(model)).train()  # frozen: training mode is ignored
    x = torch.randn(2, 3, 7, 7)
    assert_close(scripted(x), ref(model[0](x)), TOL, "frozen output")


def test_script_variants_raise_or_freeze():
    torch.manual_seed(5)
    for layer in (bnkit.GhostBatchNorm2d(4, virtual_batch_size=2), bnkit.BatchRenorm2d(4), bnkit.SyncBatchNorm(4)):
        model = nn.Sequential(nn.Conv2d(3, 4, 1), layer)
        with pytest.raises(TypeError, match=type(layer).__name__):
            torch.jit.script(model)
    # In eval mode a variant with an inference form scripts once frozen; oracle: the eager variant.
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bnkit.BatchRenorm2d(4))
    model.train()
    model(torch.randn(8, 3, 4, 4))
    model.eval()
    x = torch.randn(2, 3, 4, 4)
    scripted = torch.jit.script(bnkit.freeze(copy.deepcopy(model)))
    assert_close(scripted(x), model(x), TOL, "frozen renorm")


def test_script_input_errors_carry_eager_messages():
    layer = bnkit.BatchNorm2d(3)
    scripted = torch.jit.script(copy.deepcopy(layer))
    torch_scripted = torch.jit.script(nn.BatchNorm2d(3))
    for bad in (torch.randn(2, 3, 4), torch.randn(2, 5, 4, 4)):
        with pytest.raises(ValueError) as eager_err:
            layer(bad)
        with pytest.raises(torch.jit.Error) as script_err:
            scripted(bad)
        assert str(eager_err.value) in str(script_err.value)
    with pytest.raises(torch.jit.Error, match="expected 4D input"):  # torch's own scripted layer, same type
        torch_scripted(torch.randn(2, 3, 4))
    no_stats = bnkit.BatchNorm2d(3, track_running_stats=False).eval()  # eval with batch statistics
    for eager, twin in ((layer, scripted), (no_stats, torch.jit.script(copy.deepcopy(no_stats)))):
        with pytest.raises(ValueError) as eager_err:
            eager(torch.randn(1, 3, 1, 1))
        with pytest.raises(torch.jit.Error) as script_err:
            twin(torch.randn(1, 3, 1, 1))
        assert str(eager_err.value) in str(script_err.value)
    assert int(layer.num_batches_tracked) == int(scripted.num_batches_tracked) == 0  # nothing changed


def test_script_state_dict_round_trip_and_loads_without_bnkit(tmp_path):
    torch_net = _net("2d", {})
    bnkit_net = bnkit.convert(torch_net)
    scripted = torch.jit.script(copy.deepcopy(bnkit_net))
    scripted.train()(_input("2d", 4, 0))
    torch_net.train()(_input("2d", 4, 0))
    bnkit_net.load_state_dict(scripted.state_dict())  # same keys and shapes
    for k, v in torch_net.state_dict().items():
        assert_close(bnkit_net.state_dict()[k], v, TOL, k)
    path = tmp_path / "model.pt"
    torch.jit.save(scripted, str(path))
    scripted.eval()
    x = _input("2d", 3, 1)
    torch.save(x, tmp_path / "x.pt")
    expected = scripted(x)
    # A fresh interpreter that never imports bnkit loads and runs the archive.
    code = (
        "import sys, torch; m = torch.jit.load(sys.argv[1]).eval(); y = m(torch.load(sys.argv[2])); "
        "assert 'bnkit' not in sys.modules; torch.save(y, sys.argv[3])"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        check=True, timeout=120, env={"PATH": "/usr/bin:/bin"},
    )
    # (Not bit-exact: the fresh interpreter may use another number of threads for the reductions.)
    assert_close(torch.load(tmp_path / "y.pt"), expected, TOL, "reloaded output")
    assert_close(expected, torch_net.eval()(x), TOL, "torch output")
    assert_close(bnkit_net.eval()(x), expected, TOL, "eager output after loading the scripted state")


def _trace(model: nn.Module, x: torch.Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # shape-only TracerWarnings and the deprecation notice
        return torch.jit.trace(model, x)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("pure_aten", [False, True])
def test_trace_training_mode_matches_torch(momentum, pure_aten):
    torch_net = _net("2d", {"momentum": momentum}).train()
    bnkit_net = bnkit.convert(torch_net)
    src = scriptable(bnkit_net) if pure_aten else copy.deepcopy(bnkit_net)
    traced = _trace(src, _input("2d", 4, 99))
    traced.load_state_dict(torch_net.state_dict())  # undo the trace's own step
    kinds = {n.kind() for n in traced.inlined_graph.nodes()}
    assert any(k.startswith("bnkit::") for k in kinds) != pure_aten
    # Batches of other sizes than the trace's: the statistics must not be baked in.
    _compare_models(torch_net, traced, "2d", steps=((6, True), (3, True), (5, True)))


def test_trace_skips_nonfinite_batches_like_eager():
    x = torch.randn(4, 3, 5, 5)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("inf")
    eager = bnkit.BatchNorm2d(3, momentum=None)
    for src in (copy.deepcopy(eager), scriptable(eager)):
        traced = _trace(src, x)
        traced.load_state_dict(eager.state_dict())
        ref = copy.deepcopy(eager)
        for batch in (x, bad, x * 2):
            traced(batch)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                ref(batch)
        for k, v in ref.state_dict().items():
            assert_close(traced.state_dict()[k], v, TOL, k)
        assert int(traced.state_dict()["num_batches_tracked"]) == 2
    # "propagate" in a trace updates with the non-finite batch, as torch does.
    torch_bn = nn.BatchNorm2d(3, momentum=None)
    traced = _trace(bnkit.BatchNorm2d(3, momentum=None, nonfinite="propagate"), x)
    traced.load_state_dict(torch_bn.state_dict())
    for batch in (x, bad):
        traced(batch)
        torch_bn(batch)
    for k, v in torch_bn.state_dict().items():
        assert torch.equal(traced.state_dict()[k].isfinite(), v.isfinite()), k
    assert int(traced.state_dict()["num_batches_tracked"]) == 2


def test_scriptable_shares_tensors_and_rejects_before_copying():
    layer = bnkit.BatchNorm2d(3)
    twin = ScriptableBatchNorm.from_layer(layer)
    assert twin.weight is layer.weight and twin.running_mean is layer.running_mean
    model = nn.Sequential(bnkit.BatchNorm2d(3), bnkit.GhostBatchNorm2d(3, virtual_batch_size=2))
    with pytest.raises(TypeError, match="GhostBatchNorm2d"):
        scriptable(model)
    assert isinstance(model[0], bnkit.BatchNorm2d)


def test_trace_works_when_it_is_the_first_bnkit_call_of_a_process():
    # The engine reads its shared constants from the extension on the first layer call; under torch.jit.trace
    # that read must not be recorded (the tracer refuses an op returning plain ints).
    import os
    from pathlib import Path

    code = (
        "import warnings, torch, bnkit; from torch import nn\n"
        "warnings.simplefilter('ignore')\n"
        "torch.manual_seed(0)\n"
        "ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()\n"
        "m = bnkit.convert(ref, fuse_activations=True).eval()\n"
        "x = torch.randn(2, 3, 6, 6)\n"
        "t = torch.jit.trace(m, x)\n"
        "torch.testing.assert_close(t(x), ref(x))\n"
        "print('ok')\n"
    )
    src = str(Path(bnkit.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
