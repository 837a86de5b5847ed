"""benchmarks/models.py: its models and bookkeeping (never its timings)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import bnkit
from bnkit.tools._bnlayers import bn_layers

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "models.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bnkit_bench_models_under_test", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name, expected_bn", [("resnet18", 20), ("mobilenetv2", 52), ("mlp", 3)])
def test_models_have_the_published_layouts_bn_count(bench, name, expected_bn):
    # ResNet-18: stem + 2 per BasicBlock x 8 + 3 downsamples = 20; MobileNetV2: 52 BN layers (torchvision's count).
    assert _bn_count(bench.MODELS[name]()) == expected_bn


def test_without_bn_removes_every_bn_and_leaves_the_original(bench):
    torch.manual_seed(0)
    model = bench.ResNet18Like()
    stripped = bench.without_bn(model)
    assert _bn_count(stripped) == 0 and _bn_count(model) == 20
    assert sum(isinstance(m, nn.Identity) for m in stripped.modules()) == 20


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_bnkit_arm_computes_what_the_torch_arm_computes(bench, name, channels_last):
    # float64: 52 BN layers over 1x1 maps of a batch of 4 amplify float32 rounding past any fixed tolerance.
    torch.manual_seed(0)
    ref = bench.MODELS[name]().double()
    ours = bnkit.convert(ref, inplace=False)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ref.to(memory_format=fmt)
    ours.to(memory_format=fmt)
    x, _ = bench.case_inputs(name, 4, 32, channels_last)
    x = x.double()
    for mode in ("train", "eval"):
        ref.train(mode == "train")
        ours.train(mode == "train")
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-9, atol=1e-9)
    for a, b in zip(ours.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_targets_read_the_rows_they_name(bench):
    def row(model, layout, batch, px, op, ratio, fused=None):
        r = {"model": model, "layout": layout, "batch": batch, "px": px, "op": op, "ratio": ratio}
        return r if fused is None else {**r, "fused_ratio": fused}

    rows = [
        row("mobilenetv2", "NCHW", 128, 64, "train", 1.30),
        row("mobilenetv2", "channels_last", 128, 64, "train", 1.10),
        row("mobilenetv2", "NCHW", 32, 32, "train", 0.97),  # the slowest train row
        row("resnet18", "NCHW", 32, 32, "train", 1.06, fused=1.08),
        row("resnet18", "channels_last", 32, 32, "train", 1.04, fused=1.05),
        row("resnet18", "channels_last", 32, 64, "train", 1.03, fused=1.02),
        row("resnet18", "NCHW", 32, 32, "eval", 1.01),
    ]
    got = {t["target"]: (round(t["value"], 2), t["met"]) for t in bench.targets(rows)}
    assert got["MobileNetV2 train, NCHW, 128x64px"] == (1.30, True)
    assert got["MobileNetV2 train, channels_last, 128x64px"] == (1.10, False)
    assert got["ResNet-18 train, NCHW, slowest config"] == (1.06, True)
    assert got["ResNet-18 train, channels_last, slowest config"] == (1.03, False)
    assert got["ResNet-18 train, NCHW, slowest config, fused activations"] == (1.08, True)
    assert got["ResNet-18 train, channels_last, slowest config, fused activations"] == (1.02, False)
    assert got["any train config, slowest"] == (0.97, False)
    assert got["eval, slowest config"] == (1.01, True)


def test_a_quick_run_writes_every_arm_and_op(bench, tmp_path):
    out = tmp_path / "models.json"
    assert bench.main(["--models", "mlp", "--quick", "--reps", "1", "--warmup", "0", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["op"] for r in data["rows"]] == ["train", "eval"]
    for r in data["rows"]:
        assert r["torch_ms"] > 0 and r["bnkit_ms"] > 0 and r["no-BN_ms"] > 0
        assert r["ratio"] == pytest.approx(r["torch_ms"] / r["bnkit_ms"])


def test_bad_arguments_are_usage_errors(bench):
    for argv in (["--models", "vgg"], ["--ops", "train,infer"]):
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        assert e.value.code == 2


def test_the_frozen_step_trains_with_every_bn_layer_in_eval_mode(bench):
    """``--ops frozen``: the SGD step with the BN statistics frozen; the rows and its target."""
    torch.manual_seed(0)
    for model in (bench.MODELS["mobilenetv2"](), bnkit.convert(bench.MODELS["mobilenetv2"](), fuse_activations=True)):
        stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
        x, y = bench.case_inputs("mobilenetv2", 4, 32, False)
        step = bench.Step(model, x, y, "frozen")
        before = [p.clone() for p in model.parameters()]
        step()
        assert model.training and not any(m.training for _, m in bn_layers(model))
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())
        assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    rows = bench.run_case("mlp", "NCHW", 60, 0, reps=1, warmup=0, ops=("frozen",))
    assert [r["op"] for r in rows] == ["frozen"]
    got = {t["target"]: t for t in bench.targets(rows)}
    t = got["frozen-statistics step, slowest config and conversion"]
    assert t["value"] == min(rows[0][k] for k in ("ratio", "fused_ratio", "accel_ratio") if k in rows[0])


def test_allocator_reruns_drop_the_allocator_and_json_options(bench):
    argv = ["--models", "mlp", "--allocator", "all", "--json", "out.json", "--reps", "3", "--allocator=jemalloc"]
    assert bench.without_options(argv, "--allocator", "--json") == ["--models", "mlp", "--reps", "3"]
    # the re-run's own arguments parse (the bug was a stray "all")
    args = bench.parse_args(bench.without_options(argv, "--allocator", "--json"))
    assert args.allocator == "default" and args.json is None


def test_a_step_times_itself_inside_its_context(bench):
    """The ``accel`` arm enters ``bnkit.accelerated()`` per step: entering and leaving is not the step's time."""
    import contextlib

    clock = [0.0]
    now = lambda: clock[0]  # noqa: E731
    seen = []

    @contextlib.contextmanager
    def slow_context():
        clock[0] += 5.0  # what entering costs
        seen.append("entered")
        yield
        clock[0] += 7.0  # and leaving

    model = bench.MODELS["mlp"]()
    x, y = bench.case_inputs("mlp", 4, 0, False)
    step = bench.Step(model, x, y, "eval", context=slow_context)
    original = step._run
    step._run = lambda: (clock.__setitem__(0, clock[0] + 1.0), original())
    assert step(now) == 1.0 and clock[0] == 13.0 and len(seen) == 1
    # time_interleaved hands its clock to the step and takes its number; a plain callable it times itself,
    # whatever it returns
    clock[0] = 0.0
    med = bench.time_interleaved({"step": step, "plain": lambda: (1, 2)}, reps=3, warmup=1, now=now)
    assert med["step"] == 1.0 and med["plain"] == 0.0 and len(seen) == 5
