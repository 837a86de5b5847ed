"""benchmarks/kernels.py: its bookkeeping (not its timings, which are never asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from bnkit import cli

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load(BENCH, "bnkit_bench_under_test")


def test_interleaving_calls_each_candidate_once_per_rep_in_a_shuffled_order(bench):
    calls: list[str] = []

    class Prepared:
        def __init__(self):
            self.prepared = 0

        def prepare(self):
            self.prepared += 1

        def __call__(self):
            assert self.prepared == calls.count("p") + 1  # prepare ran right before this call
            calls.append("p")

    p = Prepared()
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "p": p}
    reps, warmup = 12, 2
    med = bench.time_interleaved(fns, reps, warmup)
    assert set(med) == set(fns) and all(v >= 0 for v in med.values())
    rounds = [calls[i : i + 3] for i in range(0, len(calls), 3)]
    assert len(rounds) == reps + warmup
    assert all(sorted(r) == ["a", "b", "p"] for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # the order changes between reps
    assert p.prepared == reps + warmup
    # the shuffle is seeded: the same sequence again
    calls.clear()
    p.prepared = 0
    bench.time_interleaved(fns, reps, warmup)
    assert [calls[i : i + 3] for i in range(0, len(calls), 3)] == rounds


def _row(op, layout, speedup, dtype="float32", mb=6.1, per_clone=1.0):
    return {"op": op, "layout": layout, "dtype": dtype, "MB": mb, "speedup": speedup, "bnkit_per_clone": per_clone}


def test_targets_against_hand_values(bench):
    rows = [
        _row("train fwd", "NCHW", 3.0, per_clone=1.7),
        _row("train fwd", "NCHW", 2.0, per_clone=1.9, mb=0.8),  # under 6 MB: not in the clone target
        _row("train fwd", "channels_last", 1.4, per_clone=1.8),
        _row("train fwd", "channels_last", 1.8),
        _row("train fwd", "NC", 1.5, mb=1.0),
        _row("backward", "NCHW", 1.05),
        _row("backward", "NCHW", 1.2),
        _row("backward", "channels_last", 1.6),
        _row("backward", "NC", 1.4),
        _row("fwd+bwd", "NCHW", 2.0),
        _row("fwd+bwd", "channels_last", 0.9),
        _row("fwd+bwd", "NC", 1.5),
        _row("eval fwd", "NCHW", 1.1),
        _row("eval fwd", "NC", 1.0),
        _row("train fwd", "NCHW", 1.25, dtype="bfloat16", per_clone=9.0),  # bf16 rows: not in the clone target
    ]
    got = {t["target"]: (round(t["value"], 6), t["met"]) for t in bench.targets(rows)}
    assert got == {
        "train fwd speedup, median NCHW": (2.5, True),  # median of 3.0 and 2.0
        "train fwd speedup, median channels_last": (1.6, True),
        "train fwd speedup, median NC": (1.5, True),
        "backward speedup, median NCHW": (1.125, True),
        "backward speedup, median channels_last": (1.6, True),
        "backward speedup, median NC": (1.4, False),
        "fwd+bwd (module) speedup, median": (1.5, True),
        "fwd+bwd (module) slowest shape": (0.9, False),
        "train fwd on >= 6 MB, worst multiple of clone": (1.8, True),
        "eval fwd speedup, slowest float32 shape": (1.0, True),
        "bfloat16 train fwd speedup, slowest": (1.25, True),
    }


def test_bench_cli_smoke_writes_rows_with_side_by_side_clones(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--reps", "1", "--warmup", "0", "--only", "8x512x7x7 NCHW", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "order shuffled per rep" in printed and "train fwd" in printed
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [r["op"] for r in rows] == ["train fwd", "backward", "fwd+bwd", "eval fwd"]
    for r in rows:
        assert r["shape"] == "8x512x7x7" and r["layout"] == "NCHW" and r["dtype"] == "float32"
        assert r["clone_best_ms"] <= r["clone_ms"]
        assert r["speedup"] == pytest.approx(r["aten_ms"] / r["bnkit_ms"])
        assert r["bnkit_per_clone"] == pytest.approx(r["bnkit_ms"] / r["clone_ms"])
    assert {t["target"] for t in data["targets"]} >= {"train fwd speedup, median NCHW"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--reps", "0"], "--reps and --threads must be >= 1"),
        (["--warmup", "-1"], "--warmup >= 0"),
        (["--threads", "0"], "--reps and --threads must be >= 1"),
        (["--only", "no such case"], "selects no case; the cases: 256x1024 NC float32"),
    ],
)
def test_bad_arguments_are_one_line_usage_errors(argv, message, capsys):
    assert cli.main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bench_models_option_runs_the_whole_network_benchmark(tmp_path, capsys):
    """``bnkit bench --models ...`` is benchmarks/models.py (``--models`` alone: its default models);
    every other ``bnkit bench`` is benchmarks/kernels.py."""
    assert cli.bench_script(["--reps", "3"]) == ("kernels.py", ["--reps", "3"])
    assert cli.bench_script(["--models", "mlp", "--reps", "3"]) == ("models.py", ["--models", "mlp", "--reps", "3"])
    assert cli.bench_script(["--models=mlp"]) == ("models.py", ["--models=mlp"])
    assert cli.bench_script(["--models", "--reps", "3"]) == ("models.py", ["--reps", "3"])
    assert cli.bench_script(["--quick", "--models"]) == ("models.py", ["--quick"])
    out = tmp_path / "models.json"
    rc = cli.main(["bench", "--models", "mlp", "--quick", "--reps", "1", "--warmup", "0", "--ops", "train,frozen",
                   "--json", str(out)])
    assert rc == 0
    assert "torch/bnkit" in capsys.readouterr().out
    assert [r["op"] for r in json.loads(out.read_text())["rows"]] == ["train", "frozen"]


KNOBS = BENCH.parent / "knobs.py"


@pytest.fixture(scope="module")
def knobs():
    return _load(KNOBS, "bnkit_knobs_under_test")


def test_knob_settings_parse_and_bad_ones_are_named(knobs):
    assert knobs.parse_setting("base:") == ("base", {})
    assert knobs.parse_setting("s:nt_bytes=0,block_bytes_grad=1048576") == (
        "s",
        {"nt_bytes": 0, "block_bytes_grad": 1048576},
    )
    for bad in ("no_colon", ":nt_bytes=0", "s:nt_bytes"):
        with pytest.raises(ValueError, match="KNOB=VALUE"):
            knobs.parse_setting(bad)


def test_knobs_ab_sets_each_setting_before_its_calls_and_restores_the_defaults(knobs, monkeypatch, capsys):
    """One rep of the (N, C) case: every setting's calls run with its knob values (seen from
    inside the timed call), and the defaults are back afterwards.  No timing is asserted."""
    import torch

    tune = torch.ops.bnkit._tune
    before = tune("nt_bytes", -1)
    seen: dict[str, set[int]] = {}
    real_candidates = knobs.bench.candidates

    def spying_candidates(*a):
        c = real_candidates(*a)
        inner = c["train fwd"]["bnkit"]

        def bnkit_call():
            seen.setdefault("bnkit", set()).add(tune("nt_bytes", -1))
            return inner()

        c["train fwd"]["bnkit"] = bnkit_call
        return c

    monkeypatch.setattr(knobs.bench, "candidates", spying_candidates)
    rows = knobs.run({"a": {}, "b": {"nt_bytes": 0}}, ["train fwd"], "NC", reps=1, warmup=0)
    assert [r["op"] for r in rows] == ["train fwd"] and rows[0]["case"] == "256x1024 NC float32"
    assert set(rows[0]) >= {"aten", "clone", "a", "b"}
    assert seen["bnkit"] == {before, 0}  # setting a ran with the default, b with 0
    assert tune("nt_bytes", -1) == before
    assert "(" in capsys.readouterr().out
