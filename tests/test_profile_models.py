"""benchmarks/profile_models.py: its bookkeeping and the structural facts it reports (never a timing)."""

from __future__ import annotations

import collections
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import bnkit

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_models.py"

needs_cpp = pytest.mark.skipif(
    bnkit.kernels.select(torch.randn(2, 2)) != "cpp", reason="the C++ kernels' copies are what is counted"
)


@pytest.fixture(scope="module")
def prof():
    spec = importlib.util.spec_from_file_location("bnkit_profile_models_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # whole-network steps: a second thread only waits on a shared machine
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)
        torch.set_num_threads(threads)


def _copies_in_backward(x: torch.Tensor, gy: torch.Tensor) -> int:
    """aten::copy_ calls in the backward of one bnkit BatchNorm2d call, by torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    bn = bnkit.BatchNorm2d(x.shape[1])
    x = x.detach().requires_grad_(True)
    y = bn(x)
    with profile(activities=[ProfilerActivity.CPU]) as p:
        torch.autograd.grad(y, (x, bn.weight, bn.bias), gy)
    return sum(e.name == "aten::copy_" for e in p.events())


def test_layout_names(prof):
    x = torch.randn(2, 3, 4, 5)
    assert prof.layout_name(x) == "contiguous"
    assert prof.layout_name(x.contiguous(memory_format=torch.channels_last)) == "channels_last"
    assert prof.layout_name(torch.randn(2, 3, 1, 1)) == "both"  # 1x1 maps: both formats at once
    assert prof.layout_name(x.transpose(2, 3)) == "strides" + str(tuple(x.transpose(2, 3).stride()))


@needs_cpp
@pytest.mark.parametrize(
    "x_cl, gy_cl", [(False, False), (True, True), (True, False), (False, True)]
)
def test_copies_grad_says_when_bnkit_copies_the_gradient(prof, x_cl, gy_cl):
    # The oracle: the copies the profiler sees in bnkit's backward.
    cl = torch.channels_last
    x = torch.randn(4, 8, 5, 5)
    gy = torch.randn(4, 8, 5, 5)
    x = x.contiguous(memory_format=cl) if x_cl else x
    gy = gy.contiguous(memory_format=cl) if gy_cl else gy
    predicted = prof.bnkit_copies_grad(x, gy)
    assert predicted == (x_cl != gy_cl)
    assert (_copies_in_backward(x, gy) > 0) == predicted


def _small_model(prof, channels_last: bool):
    arms = prof.build_arms("mobilenetv2", channels_last)
    x, y = prof.models.case_inputs("mobilenetv2", 2, 32, channels_last)  # small: the structure, not the speed
    return arms, x, y


@pytest.mark.parametrize("channels_last", [False, True])
def test_record_layers_sees_every_bn_layer_with_its_gradient(prof, channels_last):
    arms, x, y = _small_model(prof, channels_last)
    records = prof.record_layers(arms["torch"], x, y, keep=True)
    ours = prof.record_layers(arms["bnkit"], x, y)
    assert len(records) == len(ours) == 52
    bns = [m for m in arms["torch"].modules() if isinstance(m, nn.BatchNorm2d)]
    for r, bn in zip(records, bns):
        assert r.shape[1] == bn.num_features
        assert r.x is not None and r.gy is not None and r.gy.shape == r.x.shape
        assert r.copies_grad == prof.bnkit_copies_grad(r.x, r.gy)
        assert r.faults_fwd >= 0 and r.faults_bwd >= 0
    # Both arms' layers see the same shapes and layouts (bnkit's outputs and input gradients keep the layout).
    assert [(r.shape, r.x_layout, r.gy_layout) for r in ours] == [(r.shape, r.x_layout, r.gy_layout) for r in records]
    expected = "channels_last" if channels_last else "contiguous"
    # 1x1 maps (the last stage at 32 px) are both formats at once; the rest are the network's format.
    assert all(r.x_layout in (expected, "both") for r in records)
    assert sum(r.x_layout == expected for r in records) >= 40
    assert records[0].after == "ReLU(inplace)" and records[2].after == "-"  # stem; a projection without activation
    text = prof.layers_table(records, ours)
    assert "52 BN layers" in text and text.count("\n") >= 52


@needs_cpp
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_bnkit_step_copies_no_more_than_torchs(prof, channels_last):
    # A converted network's training step issues no more aten::copy_ calls than torch's, except one per
    # BN layer whose incoming gradient is in another memory order than its input (bnkit's backward
    # copies it; torch's reads both layouts).
    arms, x, y = _small_model(prof, channels_last)
    records = prof.record_layers(arms["torch"], x, y)
    counts = {}
    for name in ("torch", "bnkit"):
        step = prof.models.Step(arms[name], x, y, "train")
        step()
        counts[name] = prof.count_ops(step)
    assert counts["torch"]["aten::copy_"] > 0
    extra = sum(r.copies_grad for r in records)
    assert prof.copy_ops(counts["bnkit"]) <= prof.copy_ops(counts["torch"]) + extra
    # The BN layers themselves: torch's ops, or one bnkit op and its node per layer.
    assert counts["torch"]["aten::native_batch_norm"] == 52
    assert counts["bnkit"]["bnkit::batch_norm_layer"] == 52
    assert counts["bnkit"]["aten::native_batch_norm"] == 0
    table = prof.ops_table({**counts, "no-BN": collections.Counter()})
    assert "aten::copy_" in table


def test_shape_cases_group_and_count(prof):
    def rec(i, shape, x_layout="contiguous", gy_layout="contiguous"):
        return prof.LayerRecord(i, f"l{i}", shape, x_layout, "-", gy_layout=gy_layout,
                                x=torch.zeros(shape), gy=torch.zeros(shape))

    records = [rec(0, (2, 4, 3, 3)), rec(1, (2, 8, 3, 3)), rec(2, (2, 4, 3, 3)),
               rec(3, (2, 4, 3, 3), gy_layout="channels_last")]
    cases = prof.shape_cases(records)
    assert [(c.shape, c.gy_layout, c.layers) for c in cases] == [
        ((2, 4, 3, 3), "contiguous", 2), ((2, 8, 3, 3), "contiguous", 1), ((2, 4, 3, 3), "channels_last", 1)]


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_timed_candidates_compute_torchs_gradients(prof, channels_last):
    # What is timed for each shape is comparable: bnkit's layer gives torch's output and gradients.
    shape = (4, 6, 5, 5)
    x = torch.randn(shape)
    gy = torch.randn(shape)
    if channels_last:
        x, gy = x.contiguous(memory_format=torch.channels_last), gy.contiguous(memory_format=torch.channels_last)
    case = prof.ShapeCase(shape, prof.layout_name(x), prof.layout_name(gy), 3, x, gy)
    fns = prof.layer_fns(case)
    assert set(fns) == {"torch fwd", "bnkit fwd", "torch fwd+bwd", "bnkit fwd+bwd"}
    torch.testing.assert_close(fns["bnkit fwd"](), fns["torch fwd"](), rtol=1e-5, atol=1e-5)
    for a, b in zip(fns["bnkit fwd+bwd"](), fns["torch fwd+bwd"]()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert a.stride() == b.stride()


def test_time_table_weights_each_shape_by_its_layers(prof):
    x = torch.zeros(2, 4, 3, 3)
    cases = [prof.ShapeCase((2, 4, 3, 3), "contiguous", "contiguous", 3, x, x),
             prof.ShapeCase((2, 8, 3, 3), "contiguous", "contiguous", 1, x, x)]
    rows = [{"case": cases[0], "torch fwd": 2.0, "bnkit fwd": 1.0, "torch fwd+bwd": 6.0, "bnkit fwd+bwd": 3.0},
            {"case": cases[1], "torch fwd": 4.0, "bnkit fwd": 4.0, "torch fwd+bwd": 8.0, "bnkit fwd+bwd": 8.0}]
    last = prof.time_table(rows).splitlines()[-1]
    # sums: fwd 3*2+4 = 10 vs 3*1+4 = 7; fwd+bwd 3*6+8 = 26 vs 3*3+8 = 17; backward 16 vs 10.
    assert "10.0" in last and "7.0" in last and "26.0" in last and "17.0" in last
    assert "1.43x" in last and "1.53x" in last and "1.60x" in last


def test_steps_table_subtracts_the_no_bn_arm(prof):
    def c(faults, user, sys_, wall):
        return {"faults": faults, "user": user, "sys": sys_, "cpu": user + sys_, "wall": wall}

    costs = {"torch": c(300, 3.0, 1.0, 5.0), "bnkit": c(200, 2.0, 1.0, 4.0), "no-BN": c(100, 1.0, 0.5, 2.0)}
    lines = {ln.split("  ")[0].strip(): ln for ln in prof.steps_table(costs).splitlines()}
    assert lines["BN cost, torch"].split()[3:] == ["200", "2.000", "0.500", "2.500", "3.000"]
    assert lines["BN cost, bnkit"].split()[3:] == ["100", "1.000", "0.500", "1.500", "2.000"]
    assert lines["BN cost torch/bnkit"].split()[3:] == ["2.00x", "1.00x", "1.67x", "1.50x"]
    assert lines["step torch/bnkit"].split()[2:] == ["1.50x", "1.00x", "1.33x", "1.25x"]


def test_step_costs_measures_every_arm(prof):
    ran = collections.Counter()

    def arm(name):
        def run():
            ran[name] += 1
        return run

    out = prof.step_costs({"a": arm("a"), "b": arm("b")}, reps=3, warmup=1)
    assert ran == {"a": 4, "b": 4}
    assert set(out) == {"a", "b"} and all(v["faults"] >= 0 and v["wall"] >= 0 for v in out.values())


def test_a_tiny_run_prints_every_section(prof, capsys):
    args = ["--batch", "2", "--size", "32", "--layouts", "nchw", "--reps", "1", "--step-reps", "1", "--warmup", "0",
            "--threads", "1", "--clock", "cpu"]
    assert prof.main(args) == 0
    out = capsys.readouterr().out
    for title in ("the BN layers of one training step", "ops in one training step", "one training step, medians",
                  "each BN shape alone", "sum over the layers"):
        assert title in out
    assert out.split("fixed cost per layer")[1].splitlines()[1].startswith("4x8x2x2")


@pytest.mark.parametrize("bad", [["--sections", "nope"], ["--layouts", "nhwc"], ["--reps", "0"], ["--model", "vgg"]])
def test_bad_arguments_are_usage_errors(prof, bad):
    with pytest.raises(SystemExit) as e:
        prof.main(bad)
    assert e.value.code == 2
