"""Parallel and Ray executors (bnkit.experiments.executors), TensorBoard event files (bnkit.experiments.tblog)
and strict JSON outputs: the oracle is always the sequential run of the same experiment, whose runs,
summary and metrics.jsonl the other executors must reproduce exactly (timing fields aside)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bnkit.experiments import executors, registry
from bnkit.experiments.registry import run_experiment

HERE = Path(__file__).resolve().parent
TINY = dict(steps=20, eval_every=10, seeds=[0], probe_size=100)


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items()
                if not k.startswith("ms_per_step") and k not in (
                    "timing", "time_per_step_ratio", "wall_seconds_this_call", "finished", "out_dir", "environment")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _no_constants(name):
    raise ValueError(f"non-strict JSON constant {name}")


def _strict(path: Path):
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line, parse_constant=_no_constants) for line in text.splitlines()]
    return json.loads(text, parse_constant=_no_constants)


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """The oracle: Figure 1 (2 runs, 20 steps) trained one run after the other."""
    out = tmp_path_factory.mktemp("seq") / "fig1"
    m = run_experiment("fig1", TINY, out=out, quiet=True)
    return m, out


def _same_as(m, out, ref):
    m_ref, out_ref = ref
    assert list(m["runs"]) == list(m_ref["runs"])
    assert _strip(m["runs"]) == _strip(m_ref["runs"])
    assert _strip(m["summary"]) == _strip(m_ref["summary"])
    assert (out / "metrics.jsonl").read_text() == (out_ref / "metrics.jsonl").read_text()
    for name in m["runs"]:
        np.testing.assert_array_equal(np.load(out / "runs" / f"{name}-percentiles.npy"),
                                      np.load(out_ref / "runs" / f"{name}-percentiles.npy"))
        assert (out / "checkpoints" / f"{name}.pt").is_file()
    assert not list(out.rglob(".*"))  # no temporary or lock files left


# ----------------------------------------------------------------------------------------- process pool

def test_jobs_match_sequential_and_tensorboard_reads_back(sequential, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, tb = tmp_path / "par", tmp_path / "tb"
    m = run_experiment("fig1", TINY, out=out, quiet=True, jobs=2, tensorboard=tb)
    _same_as(m, out, sequential)

    for name, r in m["runs"].items():
        ea = EventAccumulator(str(tb / "fig1" / name), size_guidance={"scalars": 0, "histograms": 0})
        ea.Reload()
        tags = ea.Tags()["scalars"]

        def series(tag, ea=ea):
            return [e.step for e in ea.Scalars(tag)], [e.value for e in ea.Scalars(tag)]

        f32 = lambda xs: [float(np.float32(x)) for x in xs]
        assert series("test/acc") == (r["steps"], f32(r["test_acc"]))
        assert series("test/loss") == (r["steps"], f32(r["test_loss"]))
        assert series("train/loss") == (r["steps"][1:], f32(r["train_loss"][1:]))  # none at step 0
        for q in ("p15", "p50", "p85"):
            assert series(f"percentiles/{q}") == (r["steps"], f32(r["percentiles"][q]))
        lines = [x for x in _strict(out / "metrics.jsonl") if x["run"] == name]
        assert series("probe/p50_units_median") == (r["steps"], f32([x["p50_units_median"] for x in lines]))
        bn_tags = sorted(t for t in tags if t.startswith("bn/"))
        ck = torch.load(out / "checkpoints" / f"{name}.pt", weights_only=False)  # the model at the last evaluation
        means = {k[:-len(".running_mean")]: v for k, v in ck["model"].items() if k.endswith(".running_mean")}
        if r["variant"] == "baseline":
            assert not bn_tags and not means
            continue
        assert len(means) == 3 and len(bn_tags) == 2 * len(means)
        for layer, rm in means.items():
            rv = ck["model"][f"{layer}.running_var"]
            steps, vals = series(f"bn/{layer}/mean_abs_running_mean")
            assert steps == r["steps"]
            assert vals[-1] == pytest.approx(float(rm.abs().mean()), rel=1e-6)
            assert series(f"bn/{layer}/mean_running_var")[1][-1] == pytest.approx(float(rv.mean()), rel=1e-6)
            assert [e.step for e in ea.Histograms(f"bn/{layer}/running_mean")] == r["steps"]


def test_failing_run_then_resume_with_jobs(sequential, tmp_path, monkeypatch, capsys):
    """A run that raises in a worker: a one-line error naming it, the other run stops or finishes with
    valid files, and `--resume --jobs 2` then ends with exactly the sequential results."""
    import _executor_helpers as helper
    from bnkit.cli import main

    monkeypatch.syspath_prepend(str(HERE))  # the workers import the helper's extension too
    monkeypatch.setitem(sys.modules, "bnkit.experiments._executor_helpers", helper)
    monkeypatch.setitem(registry.EXPERIMENTS, "failonce",
                        registry.Experiment("failonce", "_executor_helpers", "fig1.png", "fig1, one run fails once"))
    marker, out = tmp_path / "failed-once", tmp_path / "exp"
    argv = ["run", "failonce", "--steps", "20", "--eval-every", "10", "--seed", "0", "--probe-size", "100",
            "--set", f"fail_marker={marker}", "--out", str(out), "--quiet", "--jobs", "2"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run bn-s0 failed in a worker: RuntimeError: injected failure at step 7" in err[0], err
    assert marker.exists() and not (out / "metrics.json").exists() and not (out / "runs" / "bn-s0.json").exists()
    from bnkit.experiments.train import check_resumable
    check_resumable(helper.make_runs(json.loads((out / "config.json").read_text())), out)  # every file readable

    resumed = run_experiment("failonce", {}, out=out, resume=True, quiet=True, jobs=2)
    # the extension trains like plain training: the results are the sequential Figure 1's, except for the
    # extension fields in each run's config
    no_ext = lambda m: {n: {**r, "config": {k: v for k, v in r["config"].items() if not k.startswith("extension")}}
                        for n, r in _strip(m["runs"]).items()}
    assert no_ext(resumed) == no_ext(sequential[0])
    _same_as({**resumed, "runs": sequential[0]["runs"]}, out, sequential)  # summary, metrics.jsonl, files


@pytest.mark.slow
def test_stop_after_counts_per_run_with_jobs_and_resume(sequential, tmp_path):
    from bnkit.experiments.train import RunInterrupted

    out = tmp_path / "cut"
    with pytest.raises(RunInterrupted, match=r"baseline-s0 at step 13, bn-s0 at step 13"):
        run_experiment("fig1", TINY, out=out, quiet=True, jobs=2, stop_after=13)
    assert not (out / "metrics.json").exists()
    m = run_experiment("fig1", {}, out=out, resume=True, quiet=True)  # sequentially this time
    _same_as(m, out, sequential)


# ----------------------------------------------------------------------------------------------- Ray

@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    import os
    src = str(Path(registry.__file__).resolve().parents[2])
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([src, before or ""])  # Ray's workers import this bnkit
    try:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    finally:  # the workers got the environment when Ray started
        if before is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = before
    yield ray
    ray.shutdown()


def test_ray_matches_sequential(sequential, ray_local, tmp_path, monkeypatch):
    out = tmp_path / "ray"
    m = run_experiment("fig1", TINY, out=out, quiet=True, executor="ray")
    _same_as(m, out, sequential)
    assert ray_local.is_initialized()  # a session the caller started is left running
    # a cluster without shared storage: the workers train in their own temporary directories and the
    # driver writes every file, TensorBoard's too
    monkeypatch.setattr(executors, "make_executor", lambda *a, **k: executors.RayExecutor(private=True))
    out2, tb = tmp_path / "ray-private", tmp_path / "tb"
    m2 = run_experiment("fig1", TINY, out=out2, quiet=True, executor="ray", tensorboard=tb)
    _same_as(m2, out2, sequential)
    assert sorted(p.parent.name for p in tb.glob("fig1/*/events.out.tfevents.*")) == ["baseline-s0", "bn-s0"]


# ------------------------------------------------------------------------------------- strict JSON

def test_diverged_runs_write_strict_json_and_resume_reads_it(tmp_path):
    ov = dict(steps=10, eval_every=5, lrs=[0.1, 1000.0], seeds=[0], probe_size=50)
    out = tmp_path / "lr"
    m = run_experiment("lr", ov, out=out, quiet=True)
    diverged = m["runs"]["baseline-lr1000-s0"]
    assert diverged["diverged_at"] is not None
    assert diverged["test_loss"][-1] is None and diverged["summary"]["drift"]["range"] is None  # was NaN
    files = [out / "metrics.json", out / "metrics.jsonl"] + sorted((out / "runs").glob("*.json"))
    for f in files:
        _strict(f)  # raises on NaN / Infinity
    assert _strict(out / "metrics.json")["runs"] == json.loads(json.dumps(m["runs"]))
    assert (out / "report.html").is_file() and (out / "lr.png").is_file()
    again = run_experiment("lr", {}, out=out, resume=True, quiet=True)  # every run read back from its file
    assert _strip(again["runs"]) == _strip(m["runs"]) and _strip(again["summary"]) == _strip(m["summary"])


def test_strict_json_helper():
    from bnkit.experiments.checkpoints import finite_or_none, strict_json
    obj = {"a": [1.0, float("nan"), float("inf"), -float("inf")], "b": (2, {"c": float("nan")}), "d": "NaN", "e": None}
    assert json.loads(strict_json(obj), parse_constant=_no_constants) == {
        "a": [1.0, None, None, None], "b": [2, {"c": None}], "d": "NaN", "e": None}
    assert finite_or_none(3) == 3 and finite_or_none(True) is True


# ------------------------------------------------------------------------------------------------ CLI

@pytest.mark.parametrize("args, msg", [
    (["--jobs", "0"], "--jobs: expected a positive integer, got '0'"),
    (["--jobs", "x"], "--jobs: expected a positive integer, got 'x'"),
    (["--executor", "dask"], "--executor: invalid choice: 'dask'"),
    (["--address", "auto"], "--address needs --executor ray"),
])
def test_cli_bad_execution_options(tmp_path, capsys, args, msg):
    from bnkit.cli import main
    out = tmp_path / "o"
    assert main(["run", "fig1", "--steps", "5", "--out", str(out), "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert msg in err[0] and "Traceback" not in "".join(err)
    assert not out.exists()


def test_cli_ray_address_where_no_cluster_answers(tmp_path, capsys):
    pytest.importorskip("ray")
    import socket
    from bnkit.cli import main
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "o"
    assert main(["run", "fig1", "--steps", "5", "--out", str(out), "--quiet", "--executor", "ray",
                 "--address", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"no Ray cluster answers at 127.0.0.1:{port}" in err[0], err
    assert not out.exists()


def test_cli_missing_ray_and_tensorboard_on_a_file(tmp_path, capsys, monkeypatch):
    from bnkit.cli import main
    from bnkit.experiments import tblog
    out = tmp_path / "o"
    monkeypatch.setattr(executors, "_have", lambda name: False)
    assert main(["run", "fig1", "--steps", "5", "--out", str(out), "--quiet", "--executor", "ray"]) == 2
    assert capsys.readouterr().err.strip() == "bnkit run fig1: error: ray is not installed; pip install 'bnkit[ray]'"
    monkeypatch.undo()
    f = tmp_path / "file"
    f.write_text("x")
    for tb, msg in ((f, "a file is in the way"), (f / "sub", "is a file, not a directory")):
        assert main(["run", "fig1", "--steps", "5", "--out", str(out), "--quiet", "--tensorboard", str(tb)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0]
    monkeypatch.setattr(tblog, "tensorboard_available", lambda: False)
    assert main(["run", "fig1", "--steps", "5", "--out", str(out), "--quiet", "--tensorboard", str(tmp_path / "tb")]) == 2
    assert "tensorboard is not installed; pip install 'bnkit[tensorboard]'" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "tb").exists()
    # `bnkit run all` checks them before it creates its directory
    assert main(["run", "all", "--out", str(tmp_path / "all"), "--quiet", "--tensorboard", str(f)]) == 2
    assert not (tmp_path / "all").exists()


# ------------------------------------------------------------------------------------------- jsonl lock

def _append_and_rewrite(path, run, n):
    from bnkit.experiments.checkpoints import _filter_jsonl, append_jsonl
    for i in range(n):
        append_jsonl(Path(path), {"run": run, "step": i})
        if i % 10 == 9:
            _filter_jsonl(Path(path), run, 10 ** 9)  # rewrites the file (keeping every line)


def test_jsonl_appends_and_rewrites_from_many_processes_lose_nothing(tmp_path):
    import multiprocessing as mp
    from bnkit.experiments.checkpoints import order_jsonl
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("needs the fork start method")
    ctx = mp.get_context("fork")
    path = tmp_path / "metrics.jsonl"
    runs = [f"r{i}" for i in range(4)]
    procs = [ctx.Process(target=_append_and_rewrite, args=(str(path), r, 60)) for r in runs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    recs = _strict(path)
    assert sorted((r["run"], r["step"]) for r in recs) == [(r, i) for r in runs for i in range(60)]
    order_jsonl(path, runs[::-1])
    assert [(r["run"], r["step"]) for r in _strict(path)] == [(r, i) for r in runs[::-1] for i in range(60)]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


# ------------------------------------------------------------------------------------------- TensorBoard

def test_tensorboard_monitor_purges_what_a_resumed_run_rewrites(tmp_path):
    """An attempt that wrote evaluations past its last checkpoint (step 10) and then died: the resumed
    attempt starts at step 10, and TensorBoard shows each step once, with the resumed values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from bnkit.experiments.tblog import TensorBoardMonitor, bn_statistics

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    with torch.no_grad():
        model[1].running_mean.copy_(torch.tensor([1.0, -2.0, 3.0, -4.0]))
        model[1].running_var.copy_(torch.tensor([0.5, 1.0, 1.5, 2.0]))
    first = TensorBoardMonitor(tmp_path)
    first.start(None, 0)
    for step, acc in ((0, 0.1), (10, 0.2), (20, 0.3)):
        first.on_eval(step, model, {"run": "r", "step": step, "test_acc": acc, "train_loss": None, "gain": 2.0})
    first.close()
    again = TensorBoardMonitor(tmp_path)
    again.start(None, 10)
    again.on_eval(20, model, {"run": "r", "step": 20, "test_acc": 0.4, "train_loss": 1.5, "gain": 3.0})
    again.finish({"steps": [0, 10, 20], "percentiles": {"p50": [0.0, None, 1.0]}, "step_records": [{"step": 3, "g": 7.0}]})
    again.close()
    ea = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    ea.Reload()
    sc = lambda tag: [(e.step, e.value) for e in ea.Scalars(tag)]
    assert sc("test/acc") == [(0, pytest.approx(0.1)), (10, pytest.approx(0.2)), (20, pytest.approx(0.4))]
    assert sc("train/loss") == [(20, 1.5)] and sc("extra/gain") == [(0, 2.0), (10, 2.0), (20, 3.0)]
    assert sc("percentiles/p50") == [(0, 0.0), (20, 1.0)] and sc("step/g") == [(3, 7.0)]
    assert sc("bn/1/mean_abs_running_mean")[-1] == (20, 2.5) and sc("bn/1/mean_running_var")[-1] == (20, 1.25)
    assert list(bn_statistics(model)) == ["1"]


def test_run_all_passes_the_execution_options_to_every_experiment(tmp_path, monkeypatch, capsys):
    from bnkit.cli import main
    seen = []

    def fake(name, overrides=None, **kw):
        seen.append((name, kw["jobs"], kw["executor"], kw["address"], kw["tensorboard"]))
        return {"summary": {"checks": {}}, "wall_seconds_this_call": 0.0, "finished": "now"}

    monkeypatch.setattr(registry, "run_experiment", fake)
    tb = tmp_path / "tb"
    assert main(["run", "all", "--out", str(tmp_path / "all"), "--quiet", "--jobs", "3", "--tensorboard", str(tb)]) == 0
    from bnkit.experiments.suite import SUITE
    assert seen == [(n, 3, "local", None, tb) for n in SUITE]
