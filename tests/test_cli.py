"""The command line and a new user's first run: every mistake is one `error:` line with exit status 2 and
nothing written; per-experiment options and defaults; `bnkit demo`'s exit status follows its checks;
`bnkit build` reports what it does; crash-safe checkpoints; report and terminal polish. Tiny runs only."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from bnkit import cli
from bnkit.experiments import data as D
from bnkit.experiments import fig1, norms, registry, report, train
from bnkit.experiments.models import NORMS

TINY = ["--steps", "20", "--eval-every", "10", "--seed", "0", "--probe-size", "100", "--quiet"]
ERR = re.compile(r"^bnkit[^:]*: error: ", re.M)


def _run(argv, capfd):
    rc = cli.main(argv)
    cap = capfd.readouterr()
    return rc, cap.out, cap.err


def _one_error(err: str) -> str:
    lines = ERR.findall(err)
    assert len(lines) == 1, f"expected exactly one error line, got:\n{err}"
    assert "Traceback" not in err
    return next(ln for ln in err.splitlines() if ERR.match(ln))


def _snapshot(d: Path):
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


# ------------------------------------------------------------------------------------------------ bad input

N_TRAIN = len(D.load_dataset("mnist5k").y_train)  # the oracle for "a batch larger than the data"


@pytest.mark.parametrize("args, needle", [
    (["--lr", "-1"], "--lr"), (["--lr", "0"], "--lr"), (["--lr", "abc"], "--lr"), (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--steps", "-5"], "--steps"), (["--steps", "0"], "--steps"), (["--steps", "2.5"], "--steps"),
    (["--steps", "ten"], "--steps"),
    (["--batch-size", "-3"], "--batch-size"), (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "x"], "--batch-size"),
    (["--batch-size", str(N_TRAIN + 1)], f"training set of mnist5k ({N_TRAIN} examples)"),
    (["--seeds", ""], "--seeds"), (["--seeds", ","], "--seeds"), (["--seeds", "1,1"], "repeated"),
    (["--hidden", "100,,100"], "an empty one in '100,,100'"), (["--seeds", "1,"], "--seeds"),
    (["--seed", "-1"], "--seed"),
    (["--eval-every", "0"], "--eval-every"), (["--threshold", "1.5"], "--threshold"),
    (["--init", "normal:-1"], "--init"), (["--init", "xavier"], "--init"),
    (["--data", "imagenet"], "mnist5k"), (["--optimizer", "lbfgs"], "adam"),
    (["--probe-size", "100000"], "test set"),
    (["--batch-size", "1"], "more than 1 value per channel"),  # BN cannot train on one example
    (["--norms", "bn"], "unrecognized"),  # fig1 has no --norms setting
])
def test_bad_run_settings(tmp_path, capfd, args, needle):
    out = tmp_path / "out"
    rc, _, err = _run(["run", "fig1", *TINY, *args, "--out", str(out)], capfd)
    assert rc == 2
    assert needle in _one_error(err)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing written


def test_unknown_norm_lists_the_valid_ones(tmp_path, capfd):
    rc, _, err = _run(["run", "fig1", *TINY, "--norm", "bnn", "--out", str(tmp_path / "o")], capfd)
    line = _one_error(err)
    assert rc == 2 and "'bnn'" in line
    assert all(n in line for n in fig1.OPTIONS["norm"]["choices"])
    rc, _, err = _run(["run", "norms", *TINY, "--norms", "bn,gnn", "--out", str(tmp_path / "o")], capfd)
    line = _one_error(err)
    assert rc == 2 and "'gnn'" in line and all(n in line for n in NORMS)  # a typo is not dropped silently
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, needle", [
    (["run", "fig2"], "fig1, norms"), (["run", "--lr", "1", "fig1"], "name comes first"),
    (["run"], "missing the experiment name"), (["frobnicate"], "invalid choice"), (["demo", "--lr", "-2"], "--lr"),
])
def test_bad_commands(capfd, argv, needle):
    rc, _, err = _run(argv, capfd)
    assert rc == 2 and needle in _one_error(err)


def test_bad_value_is_one_line_in_a_real_process(tmp_path):
    """The console entry point as a user meets it: no traceback, exit status 2, one error line."""
    r = subprocess.run([sys.executable, "-m", "bnkit.cli", "run", "fig1", "--lr", "-0.1", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--lr" in _one_error(r.stderr) and not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["file", "under_file", "unwritable"])
def test_unusable_out(tmp_path, capfd, case):
    f = tmp_path / "afile"
    f.write_text("x")
    if case == "file":
        out, needle = f, "a file is in the way"
    elif case == "under_file":
        out, needle = f / "sub", "is a file"
    else:
        if not Path("/sys").is_dir():
            pytest.skip("no read-only /sys here")
        out, needle = Path("/sys/bnkit-test-out/run"), "cannot write"  # refused even to root
    rc, _, err = _run(["run", "fig1", *TINY, "--out", str(out)], capfd)
    assert rc == 2 and needle in _one_error(err)
    assert f.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_unwritable_dir_by_permission(tmp_path, capfd):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions (the /sys case covers root)")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc, _, err = _run(["run", "fig1", *TINY, "--out", str(ro / "run")], capfd)
        assert rc == 2 and "not writable" in _one_error(err) and list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_failed_start_leaves_nothing_and_the_retry_works(tmp_path, capfd):
    out = tmp_path / "a" / "b" / "run"
    rc, _, err = _run(["run", "fig1", *TINY, "--batch-size", str(N_TRAIN + 1), "--out", str(out)], capfd)
    assert rc == 2 and list(tmp_path.iterdir()) == []
    rc, _, err = _run(["run", "fig1", *TINY, "--out", str(out)], capfd)
    assert rc == 0, err
    assert (out / "metrics.json").is_file()


def test_write_failure_while_creating_the_dir_is_rolled_back(tmp_path, capfd, monkeypatch):
    """A disk that fills up while config.json is written: the directories this start made are removed."""
    import errno

    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(train, "atomic_write_text", full)
    (tmp_path / "keep").mkdir()
    rc, _, err = _run(["run", "fig1", *TINY, "--out", str(tmp_path / "keep" / "x" / "y")], capfd)
    assert rc == 2 and "No space left" in _one_error(err)
    assert [p.name for p in tmp_path.rglob("*")] == ["keep"]  # the pre-existing parent stays


# ------------------------------------------------------------------------------------------------ --resume

@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """An experiment interrupted inside its second run (the first finished), and the uninterrupted result."""
    base = tmp_path_factory.mktemp("resume")
    ov = dict(steps=20, eval_every=10, seeds=[0], probe_size=100)
    full = registry.run_experiment("fig1", ov, out=base / "full", quiet=True)
    with pytest.raises(train.RunInterrupted):
        registry.run_experiment("fig1", ov, out=base / "cut", quiet=True, stop_after=25)
    return base / "cut", full


def _damage(d: Path, case: str):
    ck = d / "checkpoints" / "bn-s0.pt"
    if case == "ckpt_garbage":
        ck.write_bytes(b"garbage")
    elif case == "ckpt_truncated":
        ck.write_bytes(ck.read_bytes()[: len(ck.read_bytes()) // 2])
    elif case == "ckpt_empty":
        ck.write_bytes(b"")
    elif case == "ckpt_not_a_checkpoint":
        torch.save({"hello": 1}, ck)
    elif case == "result_truncated":
        r = d / "runs" / "baseline-s0.json"
        r.write_text(r.read_text()[:100])
    elif case == "config_truncated":
        c = d / "config.json"
        c.write_text(c.read_text()[:30])
    elif case == "config_bad_value":
        c = d / "config.json"
        c.write_text(json.dumps({**json.loads(c.read_text()), "steps": -4}))
    elif case == "config_unknown_key":
        c = d / "config.json"
        c.write_text(json.dumps({**json.loads(c.read_text()), "bogus": 1}))
    elif case == "config_not_object":
        (d / "config.json").write_text("[1, 2]")
    elif case == "config_binary":
        (d / "config.json").write_bytes(b"\xff\xfe\x00garbage")


@pytest.mark.parametrize("case, needle", [
    ("ckpt_garbage", "bn-s0.pt is damaged"), ("ckpt_truncated", "bn-s0.pt is damaged"),
    ("ckpt_empty", "bn-s0.pt is damaged"), ("ckpt_not_a_checkpoint", "not a bnkit training checkpoint"),
    ("result_truncated", "baseline-s0.json is damaged"), ("config_truncated", "config.json is unreadable"),
    ("config_bad_value", "'steps'"), ("config_unknown_key", "'bogus'"), ("config_not_object", "settings object"),
    ("config_binary", "config.json is unreadable"),
])
def test_damaged_experiment_dir_on_resume(interrupted, tmp_path, capfd, case, needle):
    import shutil
    d = tmp_path / "cut"
    shutil.copytree(interrupted[0], d)
    _damage(d, case)
    (d / "checkpoints" / ".bn-s0.pt.tmp999999999").write_bytes(b"partial")  # kept: checks come first
    before = _snapshot(d)
    rc, _, err = _run(["run", "fig1", "--resume", "--out", str(d), "--quiet"], capfd)
    assert rc == 2 and needle in _one_error(err)
    assert _snapshot(d) == before  # nothing changed by the failed resume


def test_deleting_a_damaged_checkpoint_retrains_that_run(interrupted, tmp_path, capfd):
    """The error's advice works: without the checkpoint the run restarts from step 0, and ends exactly as
    the uninterrupted experiment did."""
    import shutil
    d = tmp_path / "cut"
    shutil.copytree(interrupted[0], d)
    _damage(d, "ckpt_garbage")
    assert _run(["run", "fig1", "--resume", "--out", str(d), "--quiet"], capfd)[0] == 2
    (d / "checkpoints" / "bn-s0.pt").unlink()
    rc, _, err = _run(["run", "fig1", "--resume", "--out", str(d), "--quiet"], capfd)
    assert rc == 0, err
    got = json.loads((d / "metrics.json").read_text())["runs"]
    full = interrupted[1]["runs"]
    for name in full:
        assert got[name]["test_acc"] == full[name]["test_acc"] and got[name]["percentiles"] == full[name]["percentiles"]


@pytest.mark.parametrize("argv_tail, needle", [
    (["--out", "{tmp}/nope"], "does not exist"), (["--out", "{tmp}/empty"], "no config.json"),
    (["--out", "{tmp}/afile"], "is a file"),
])
def test_nothing_to_resume(tmp_path, capfd, argv_tail, needle):
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("")
    rc, _, err = _run(["run", "fig1", "--resume", "--quiet"] + [a.format(tmp=tmp_path) for a in argv_tail], capfd)
    assert rc == 2 and needle in _one_error(err)


def test_resuming_another_experiments_directory_names_it(interrupted, tmp_path, capfd):
    """A finished fig1 directory resumed as `norms`: the error names the experiment it holds, nothing changes."""
    import shutil
    d = tmp_path / "done"
    shutil.copytree(interrupted[0], d)
    assert _run(["run", "fig1", "--resume", "--out", str(d), "--quiet"], capfd)[0] == 0  # finishes it
    before = _snapshot(d)
    rc, _, err = _run(["run", "norms", "--resume", "--out", str(d), "--quiet"], capfd)
    assert rc == 2 and "it holds a fig1 experiment" in _one_error(err)
    assert _snapshot(d) == before


def test_bad_override_on_resume_is_an_error(interrupted, tmp_path, capfd):
    import shutil
    d = tmp_path / "cut"
    shutil.copytree(interrupted[0], d)
    rc, _, err = _run(["run", "fig1", "--resume", "--out", str(d), "--quiet", "--steps", "-1"], capfd)
    assert rc == 2 and "--steps" in _one_error(err)


# ------------------------------------------------------------------------------------------------ checkpoints

def test_checkpoint_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}") if Path("/proc/self/fd").is_dir() else str(fd)
        events.append(("fsync", target))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(a), str(b)))
        return real_replace(a, b)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "ck.pt"
    obj = {"w": torch.arange(1000.0), "step": 7}
    train.atomic_save(obj, path)
    kinds = [e[0] for e in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    tmp = events[1][1]
    assert events[0][1] == tmp and events[1][2] == str(path)  # the temp file's data synced, then renamed
    assert events[2][1] == str(tmp_path)  # and the directory entry synced
    back = torch.load(path, weights_only=False)
    assert torch.equal(back["w"], obj["w"]) and back["step"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


_KILLED_WRITER = """
import os, sys
from pathlib import Path
from bnkit.experiments import train
def write(f):
    f.write(b"half a checkpoint")
    f.flush()
    os._exit(9)  # dies mid-write like a kill -9: no cleanup runs
train._atomic_write(Path(sys.argv[1]), write)
"""


def test_interrupted_write_leaves_a_temp_file_that_the_next_start_removes(tmp_path):
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    r = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(ck / "bn-s0.pt")], timeout=120,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 9
    left = [p.name for p in ck.iterdir()]
    assert len(left) == 1 and left[0].startswith(".bn-s0.pt.tmp") and not (ck / "bn-s0.pt").exists()
    live = ck / f".other.pt.tmp{os.getppid()}"  # a live process's write in progress is left alone
    live.write_bytes(b"")
    removed = train.remove_stale_temp_files(tmp_path)
    assert [p.name for p in removed] == left
    assert [p.name for p in ck.iterdir()] == [live.name]


def test_resume_removes_leftover_temp_files(interrupted, tmp_path, capfd):
    import shutil
    d = tmp_path / "cut"
    shutil.copytree(interrupted[0], d)
    junk = [d / "checkpoints" / ".bn-s0.pt.tmp999999999", d / ".metrics.json.tmp999999998",
            d / "runs" / ".bn-s0.json.tmp999999997"]
    for j in junk:
        j.write_bytes(b"partial")
    rc, _, err = _run(["run", "fig1", "--resume", "--out", str(d), "--quiet"], capfd)
    assert rc == 0, err
    assert not any(j.exists() for j in junk)
    assert not [p for p in d.rglob(".*tmp*")]


# ------------------------------------------------------------------------------------------------ per-experiment options

def _help(name):
    r = subprocess.run([sys.executable, "-m", "bnkit.cli", "run", name, "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_run_fig1_help_shows_its_options_and_defaults():
    text = " ".join(_help("fig1").split())  # argparse wraps lines
    opts = registry.experiment_options(registry.get_experiment("fig1"))
    for key, default in fig1.DEFAULTS.items():
        flag = "--" + key.replace("_", "-")
        assert flag in text, flag
        if key != "data_dir":
            assert f"(default: {opts[key].describe_default(default)})" in text, key
    assert "--seed N" in text and "--norms" not in text and "--arch" not in text  # not fig1's settings
    for choice in fig1.OPTIONS["norm"]["choices"]:
        assert choice in text


def test_run_norms_help_has_its_own_defaults():
    text = " ".join(_help("norms").split())
    assert "--norms NAME,..." in text and f"(default: {','.join(norms.DEFAULTS['norms'])})" in text
    assert f"--steps N training steps per run (default: {norms.DEFAULTS['steps']})" in text


def test_settings_are_generic_for_any_registered_experiment(tmp_path, capfd, monkeypatch):
    """A new experiment only declares DEFAULTS (and optionally OPTIONS): it gets options, defaults and
    checks inferred from its default values; a common setting whose default is outside the common
    description (steps 0, None) follows the experiment's default."""
    mod = types.ModuleType("bnkit.experiments._fake_exp")
    mod.__doc__ = "A fake experiment."
    mod.DEFAULTS = {"steps": 0, "lr": None, "batch_size": None, "momentum": 0.9, "widths": [4, 8], "tag": "x", "flag": False,
                    "mode": "a", "nets": {"a": {"steps": 5}}, "extra": [], "arch": "lenet"}
    mod.OPTIONS = {"mode": {"choices": ("a", "b"), "help": "the mode"}}
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(registry.EXPERIMENTS, "fake", registry.Experiment("fake", "_fake_exp", "f.png", "Fake"))
    exp = registry.get_experiment("fake")
    assert registry.validate_config(exp, dict(mod.DEFAULTS)) == mod.DEFAULTS  # its own defaults are valid
    registry._check_with_data(exp, mod, dict(mod.DEFAULTS), D.load_dataset("digits"), [])  # None: no size check
    ok = registry.validate_config(exp, {**mod.DEFAULTS, "momentum": 2, "widths": (1,), "flag": True, "lr": 0.1,
                                        "nets": {"b": 1}, "steps": 3})
    assert ok["momentum"] == 2.0 and ok["widths"] == [1] and ok["flag"] is True and ok["nets"] == {"b": 1}
    for bad, needle in [({"momentum": -0.1}, ">= 0"), ({"steps": -1}, ">= 0"), ({"lr": 0.0}, "> 0"),
                        ({"widths": []}, "at least one"), ({"mode": "c"}, "choose from a, b"),
                        ({"steps": True}, "integer"), ({"flag": "yes"}, "true or false"), ({"nope": 1}, "'nope'")]:
        with pytest.raises(registry.ConfigError, match=re.escape(needle)):
            registry.validate_config(exp, {**mod.DEFAULTS, **bad})
    p = cli.experiment_parser("fake", "bnkit run fake")
    h = " ".join(p.format_help().split())
    assert "--momentum X" in h and "(default: 0.9)" in h and "--widths N,..." in h and "--no-flag" in h
    assert "the mode; one of a, b (default: a)" in h and '--nets JSON' in h
    a = p.parse_args(["--widths", "[3, 5]", "--nets", '{"c": 2}', "--lr", "none", "--set", "tag=y"])
    assert cli._overrides(a) == {"widths": [3, 5], "nets": {"c": 2}, "tag": "y"}
    rc, _, err = _run(["run", "fake", "--momentum", "-3"], capfd)
    assert rc == 2 and "--momentum" in _one_error(err)
    rc, _, err = _run(["run", "fake", "--set", "nope=1"], capfd)
    assert rc == 2 and "no such setting" in _one_error(err)
    rc, _, err = _run(["run", "fake", "--set", "widths=-1"], capfd)
    line = _one_error(err)
    assert rc == 2 and "--set widths" in line and ">= 0" in line


def test_systemexit_message_from_lower_code_is_one_error_line(capfd, monkeypatch):
    def boom(args):
        raise SystemExit("bnkit: nothing to resume: no runs/all-* directory")
    monkeypatch.setattr(cli, "cmd_list", boom)
    rc, _, err = _run(["list"], capfd)
    assert rc == 2 and "nothing to resume" in _one_error(err)


def test_list_shows_every_norm_without_scaffolding():
    text = "\n".join(registry.list_text())
    assert "not available" not in text and "yet" not in text
    assert text.splitlines()[-1].split(":", 1)[1].split() == list(NORMS)


# ------------------------------------------------------------------------------------------------ demo exit code

def _demo(tmp_path, capfd, name):
    return _run(["demo", *TINY, "--out", str(tmp_path / name)], capfd)


def test_demo_exit_status_follows_its_checks(tmp_path, capfd, monkeypatch):
    real = fig1.summarize
    rc, _, err = _demo(tmp_path, capfd, "real")
    checks = json.loads((tmp_path / "real" / "metrics.json").read_text())["summary"]["checks"]
    failed = [k for k, c in checks.items() if not c["pass"]]
    assert rc == (1 if failed else 0)
    if failed:
        assert all(k in err for k in failed) and "FAILED" in err

    def forced(verdicts):
        def summarize(cfg, results):
            s = real(cfg, results)
            for k, v in zip(s["checks"], verdicts):
                s["checks"][k]["pass"] = v
            return s
        return summarize
    n = len(checks)
    monkeypatch.setattr(fig1, "summarize", forced([True] * n))
    assert _demo(tmp_path, capfd, "pass")[0] == 0
    monkeypatch.setattr(fig1, "summarize", forced([True] * (n - 1) + [False]))
    rc, _, err = _demo(tmp_path, capfd, "fail")
    assert rc == 1 and f"1 of {n} checks FAILED: {list(checks)[-1]}" in err
    # `bnkit run fig1` reports the same checks but is not a pass/fail command
    assert _run(["run", "fig1", *TINY, "--out", str(tmp_path / "run")], capfd)[0] == 0


# ------------------------------------------------------------------------------------------------ build

def test_build_says_what_it_does_and_how_long(tmp_path, capfd, monkeypatch):
    from bnkit.kernels import cpp
    monkeypatch.setattr(cpp, "library_path", lambda: tmp_path / "cold" / "bnkit.so")
    monkeypatch.setattr(cli, "_TICK_SECONDS", 0.1)

    def slow_build(verbose=False):
        time.sleep(0.45)
    monkeypatch.setattr(cpp, "build", slow_build)
    t0 = time.perf_counter()
    assert cli.main(["build"]) == 0
    wall = time.perf_counter() - t0
    err = capfd.readouterr().err
    assert "compiling the C++ CPU kernels" in err and str(tmp_path / "cold") in err
    assert len(re.findall(r"still compiling \(\d+ s\)", err)) >= 2  # a heartbeat, not minutes of silence
    took = float(re.search(r"done in ([\d.]+) s \(compiled\)", err).group(1))
    assert 0.45 <= took + 0.05 and took <= wall + 0.05

    def broken(verbose=False):
        raise RuntimeError("g++: error: no such compiler")
    monkeypatch.setattr(cpp, "build", broken)
    assert cli.main(["build"]) == 0  # the portable backend still works; `make setup` goes on
    err = capfd.readouterr().err
    assert "could not be built" in err and "no such compiler" in err and "Traceback" not in err


def test_build_cached_is_quick_and_says_so(capfd):
    from bnkit.kernels import cpp
    if not cpp.library_path().exists():
        pytest.skip("no cached build of the kernels")
    assert cli.main(["build"]) == 0
    err = capfd.readouterr().err
    assert "checking the cached C++ kernels" in err and re.search(r"done in [\d.]+ s \(cached\)", err)


# ------------------------------------------------------------------------------------------------ report and plots

def _synthetic_fig1(steps, acc_bn, acc_base, p_base, p_bn):
    def run(name, variant, acc, p):
        return {"name": name, "variant": variant, "norm": "bn" if variant == "bn" else "none", "seed": 0,
                "steps": steps, "test_acc": acc, "typical_unit": 3, "percentiles": p,
                "summary": {"drift": {"range": 1.0, "relative": 0.5}}}
    cfg = {**fig1.DEFAULTS, "seeds": [0], "steps": steps[-1]}
    return cfg, {"baseline-s0": run("baseline-s0", "baseline", acc_base, p_base),
                 "bn-s0": run("bn-s0", "bn", acc_bn, p_bn)}


def _points_inside(ax, box):
    n = 0
    for line in ax.get_lines():
        xy = ax.transData.transform(np.column_stack(line.get_data()))
        n += int(np.sum((xy[:, 0] >= box.x0) & (xy[:, 0] <= box.x1) & (xy[:, 1] >= box.y0) & (xy[:, 1] <= box.y1)))
    return n


def test_fig1_legends_and_notes_hide_no_curve():
    """Curves that visit every corner of the panels, where any legend inside the axes would sit on one."""
    import matplotlib.pyplot as plt
    steps = list(range(0, 101, 5))
    zig = [(-2.0 if i % 2 else 2.0) for i in range(len(steps))]
    p = {"p15": [z - 0.5 for z in zig], "p50": zig, "p85": [z + 0.5 for z in zig]}
    acc = [0.1 if i % 2 else 1.0 for i in range(len(steps))]
    cfg, res = _synthetic_fig1(steps, acc, acc[::-1], p, p)
    fig = fig1.figure(cfg, res, {})
    try:
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        for ax in fig.axes:
            leg = ax.get_legend()
            assert leg is not None
            assert _points_inside(ax, leg.get_window_extent(r)) == 0
            for t in ax.texts:
                assert _points_inside(ax, t.get_window_extent(r)) == 0
    finally:
        plt.close(fig)


def test_norms_plot_keeps_curves_below_half():
    import matplotlib.pyplot as plt
    steps = [0, 10, 20]
    res = {f"{n}-s0": {"norm": n, "steps": steps, "test_acc": a, "percentiles": {"p50": [0.0, 0.1, 0.2]}}
           for n, a in (("bn", [0.1, 0.6, 0.9]), ("gn", [0.1, 0.2, 0.3]))}
    cfg = {**norms.DEFAULTS, "norms": ["bn", "gn"]}
    fig = norms.figure(cfg, res, {"bn": {}, "gn": {}})
    try:
        lo, hi = fig.axes[0].get_ylim()
        assert lo <= 0.1 and hi >= 0.9  # every accuracy, including 0.1-0.3, inside the axes
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        for ax in fig.axes:
            assert _points_inside(ax, ax.get_legend().get_window_extent(r)) == 0
    finally:
        plt.close(fig)


def test_report_definitions_render_as_text():
    from bnkit.experiments import diagnostics
    html = report.render_report({"config": {}, "summary": {}}, [], title="t", intro=fig1.__doc__,
                                notes=diagnostics.__doc__)
    defs = html[html.index("<h2>Definitions</h2>"):]
    bullets = [ln for ln in diagnostics.__doc__.splitlines() if ln.startswith("* ")]
    assert defs.count("<li>") == len(bullets) > 0 and "<ul>" in defs
    visible = re.sub(r"<[^>]+>", "", html)
    for raw in ("``", ":class:", ":func:", "`", "\n* "):
        assert raw not in visible, raw
    assert "<code>InputRecorder</code>" in defs and "<code>bnkit demo</code>" in html
    assert "<em>training</em>" in defs


def test_report_step_means_are_whole_steps():
    per_seed = {"0.90": [1200, 1250, 1250]}  # mean 1233.33
    s = {v: {"final_acc": 0.9, "best_acc": 0.91, "steps_to": {"0.90": float(np.mean(per_seed["0.90"]))},
             "drift": {"range": 1.0, "relative": 0.5}, "ms_per_step": 1.0} for v in ("bn", "baseline")}
    s["baseline"]["steps_to"]["0.90"] = float(np.mean([550, 575, 575]))  # 566.67
    html = report.render_report({"config": {}, "summary": s}, [], title="t")
    table = html[html.index("<h2>Summary"):html.index("</table>", html.index("<h2>Summary"))]
    cells = re.findall(r'<td class="num">([^<]+)</td>', table)
    assert str(round(1233.333)) in cells and str(round(566.667)) in cells
    assert "1233.3" not in table and "566.7" not in table and "rounded to a whole step" in html


def test_terminal_check_table_is_rounded():
    from rich.console import Console
    metrics = {"config": {"threshold": 0.9}, "dataset": {"name": "x", "train": 1, "test": 1}, "runs": {},
               "summary": {"checks": {
                   "time_per_step_ratio": {"pass": True, "bn_over_baseline": 1.23456789,
                                           "ms_per_step": {"bn": 6.123456789, "baseline": 4.987654321},
                                           "mean_ratio": 0.000123456},
                   "drift_ratio_ge_3": {"pass": False, "per_seed": [7.7777777, 12345.6789]}}}}
    con = Console(record=True, width=200, color_system=None)
    registry._print_summary(con, registry.get_experiment("fig1"), metrics)
    text = con.export_text()
    for want in ("1.23", "6.12", "4.99", "0.000123", "7.78", "1.23e+04", "PASS", "FAIL"):
        assert want in text, want
    for num in re.findall(r"\d+\.\d+(?:e[+-]\d+)?", text):
        digits = num.split("e")[0].replace(".", "").lstrip("0")
        assert len(digits) <= 3, num
