"""Edges of the command line and of the experiment runs, against the project's stated standard: a user
mistake is one ``error:`` line on stderr (argparse adds its documented ``(see ...)`` hint), no traceback, a
non-zero exit status (2 for usage errors) and the existing state untouched; every ``--help`` works; runs
are written atomically, and a run interrupted (Ctrl-C, SIGTERM, a kill -9 mid-write) resumes to exactly
the results of an uninterrupted run of the same seed. The oracles are the uninterrupted run of the same
settings (bit for bit, timing fields aside), byte snapshots of the directories, and hand-written
expectations from docs/cli.md and docs/experiments.md. Tiny runs only (20-300 steps of Figure 1)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from _artifacts import strip_timing
from hypothesis import strategies as st

from bnkit import cli
from bnkit.experiments import fig1, registry

TINY = ["--steps", "20", "--eval-every", "10", "--seed", "0", "--probe-size", "100", "--quiet"]
TINY_OV = dict(steps=20, eval_every=10, seeds=[0], probe_size=100)
# long enough that a signal sent at the first progress line lands before the end
SIG = ["--steps", "200", "--eval-every", "50", "--seed", "0", "--probe-size", "100"]
SIG_OV = dict(steps=200, eval_every=50, seeds=[0], probe_size=100)
ERR = re.compile(r"^bnkit[^:]*: error: ")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
ENV.pop("BNKIT_DEBUG", None)


# ------------------------------------------------------------------------------------------------ helpers

def _main(argv, capfd):
    rc = cli.main(list(argv))
    cap = capfd.readouterr()
    return rc, cap.out, cap.err


class _Proc:
    """A child process whose output goes to files, not pipes, in its own session: waiting for it can never
    block on a grandchild that holds an inherited pipe open, and cleanup kills the whole process group."""

    def __init__(self, args, cwd, env=None):
        self._out, self._err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        self.p = subprocess.Popen(args, cwd=cwd, stdout=self._out, stderr=self._err, env=env or ENV,
                                  start_new_session=True)
        self.pid = self.p.pid

    def poll(self):
        return self.p.poll()

    def send_signal(self, sig):
        self.p.send_signal(sig)

    def _read(self, f) -> str:
        f.seek(0)
        return f.read().decode("utf-8", "replace")

    def finish(self, timeout=120):
        """(returncode, stdout, stderr); a child still running after ``timeout`` fails the test, naming the
        processes of its group, and is killed with them."""
        try:
            rc = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            tree = "(ps unavailable)"
            with contextlib.suppress(OSError):
                tree = subprocess.run(["ps", "-o", "pid,stat,etime,args", "-g", str(self.pid)], capture_output=True,
                                      text=True, timeout=10).stdout
            self.kill()
            pytest.fail(f"still running after {timeout} s:\n{tree}\nstderr:\n{self._read(self._err)[-3000:]}")
        self.kill()  # what it left behind in its group
        return rc, self._read(self._out), self._read(self._err)

    def kill(self):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.p.wait(timeout=30)


def _cli(argv, cwd, timeout=120, env=None, args=None):
    proc = _Proc(args or [sys.executable, "-m", "bnkit.cli", *argv], cwd, env)
    rc, out, err = proc.finish(timeout)
    return subprocess.CompletedProcess(proc.p.args, rc, out, err)


def _one_error(err: str) -> str:
    """The error line of a failed command: one ``PROG: error:`` line, at most argparse's ``(see ...)`` hint
    after it, no traceback."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and ERR.match(lines[0]), err
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("(see `")), err
    return lines[0]


def _snapshot(d: Path):
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(Path(d).rglob("*"))}


_strip = strip_timing


def _same_results(out: Path, ref: Path):
    """``out`` holds exactly the results of the uninterrupted run in ``ref`` (timing aside)."""
    m, m_ref = (json.loads((d / "metrics.json").read_text()) for d in (out, ref))
    assert list(m["runs"]) == list(m_ref["runs"])
    assert _strip(m["runs"]) == _strip(m_ref["runs"])
    assert _strip(m["summary"]) == _strip(m_ref["summary"])
    assert m["config"] == m_ref["config"]
    assert (out / "metrics.jsonl").read_text() == (ref / "metrics.jsonl").read_text()
    for name in m_ref["runs"]:
        np.testing.assert_array_equal(np.load(out / "runs" / f"{name}-percentiles.npy"),
                                      np.load(ref / "runs" / f"{name}-percentiles.npy"))
    assert not [p for p in out.rglob(".*")], "temporary files left behind"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The oracles (uninterrupted runs) and an interrupted experiment (first run done, second at step 5)."""
    b = tmp_path_factory.mktemp("edges")
    registry.run_experiment("fig1", TINY_OV, out=b / "full", quiet=True)
    registry.run_experiment("fig1", SIG_OV, out=b / "sigref", quiet=True)
    with contextlib.suppress(Exception):
        registry.run_experiment("fig1", TINY_OV, out=b / "cut", quiet=True, stop_after=25)
    assert (b / "cut" / "runs" / "baseline-s0.json").is_file() and not (b / "cut" / "metrics.json").exists()
    return b


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------------ --help

_HELPS = ([["--help"], ["-h"], ["run", "--help"], ["run", "all", "--help"], ["demo", "--help"], ["list", "--help"],
           ["build", "--help"], ["inspect", "--help"], ["report", "--help"], ["bench", "--help"]]
          + [["run", name, "--help"] for name in registry.EXPERIMENTS] + [["run", "fig1", "-h"]])


@pytest.mark.parametrize("argv", _HELPS, ids=[" ".join(a) for a in _HELPS])
def test_every_help_works_and_writes_nothing(argv, tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = _main(argv, capfd)
    assert rc == 0, err
    assert "usage" in out.lower() and err == ""
    if argv[:1] == ["run"] and len(argv) == 3 and argv[1] != "all":
        exp = registry.get_experiment(argv[1])
        for key in exp.load().DEFAULTS:  # each experiment's own settings (docs/cli.md)
            assert registry.flag(key) in out, key
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ usage errors

@pytest.mark.parametrize("argv, needle", [
    (["list", "extra"], "unrecognized arguments: extra"),
    (["build", "--bogus"], "--bogus"),
    (["report", "a", "b"], "unrecognized arguments: b"),
    (["report", "--out"], "--out"),
    (["inspect"], "model"),
    (["inspect", "m.pt", "--batch-size", "0"], "--batch-size"),
    (["inspect", "m.pt", "--batches", "-3"], "--batches"),
    (["inspect", "m.pt", "--batch-size", "many"], "--batch-size"),
    (["--version"], "--version"),
    (["run", "FIG1"], "unknown experiment 'FIG1'"),
    (["run", ""], "unknown experiment ''"),
    (["run", "fig1", "extra"], "unrecognized arguments: extra"),
    (["run", "fig1", "--steps"], "--steps"),
    (["run", "fig1", "--seeds", "0,x"], "--seeds"),
    (["run", "fig1", "--seeds", "-1,2"], "--seeds"),
    (["run", "fig1", "--hidden", "0"], "--hidden"),
    (["run", "fig1", "--hidden", "100,-1"], "--hidden"),
    (["run", "fig1", "--threads", "0"], "--threads"),
    (["run", "fig1", "--probe-size", "1"], "--probe-size"),
    (["run", "fig1", "--lr", "1e400"], "--lr"),
    (["run", "fig1", "--lr", "0x1p-3"], "--lr"),
    (["run", "fig1", "--binarize=yes"], "--binarize"),
    (["run", "fig1", "--normalize", "zscore"], "--normalize"),
    (["run", "fig1", "--set", "steps"], "KEY=VALUE"),
    (["run", "fig1", "--set", "=3"], "KEY=VALUE"),
    (["run", "fig1", "--set", "steps=0"], "--set steps"),
    (["run", "fig1", "--set", "seeds=[]"], "--set seeds"),
    (["run", "fig1", "--jobs", "-1"], "--jobs"),
    (["run", "fig1", "--executor", ""], "--executor"),
    (["run", "norms", "--norms", "bn,bn"], "repeated"),
    (["run", "all", "--bogus"], "--bogus"),
    (["run", "all", "--steps", "0"], "--steps"),
    (["run", "all", "--seeds", "a"], "--seeds"),
    (["demo", "extra"], "unrecognized arguments: extra"),
    (["demo", "--steps", "-1"], "--steps"),
])
def test_usage_errors_are_one_line_status_2_and_write_nothing(argv, needle, tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = _main(argv + (["--out", str(tmp_path / "o")] if argv[:1] in (["run"], ["demo"])
                                 and len(argv) > 1 and argv[1] else []), capfd)
    assert rc == 2
    assert needle in _one_error(err)
    assert list(tmp_path.iterdir()) == []


_NUMBERISH = st.text(alphabet="0123456789-+._eE xinfa", min_size=0, max_size=8)


def _py_int(text):
    try:
        return int(text)
    except ValueError:
        return None


def _py_float(text):
    try:
        return float(text)
    except ValueError:
        return None


@settings(max_examples=40, deadline=None)
@given(steps=_NUMBERISH, lr=_NUMBERISH)
@example(steps="--", lr="")  # argparse dropped a '--' value: the option got [] silently
@example(steps="1", lr="--")
def test_numeric_options_accept_exactly_the_valid_numbers(steps, lr):
    """--steps takes what int() takes if >= 1, --lr what float() takes if finite and > 0 (the oracle is
    Python's own parsing plus the documented bounds); anything else is one error line, status 2."""
    import math
    parser = cli.experiment_parser("fig1", "bnkit run fig1")
    n, x = _py_int(steps), _py_float(lr)
    ok = n is not None and n >= 1 and x is not None and math.isfinite(x) and x > 0
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args = parser.parse_args(["--steps=" + steps, "--lr=" + lr])
        except SystemExit as e:
            args, code = None, e.code
    if ok:
        assert args is not None, err.getvalue()
        assert args.steps == n and type(args.steps) is int and args.lr == x
    else:
        assert args is None and code == 2
        line = _one_error(err.getvalue())
        assert ("--steps" in line) if (n is None or n < 1) else ("--lr" in line)


# ------------------------------------------------------------------------------------------------ output paths

def test_unicode_and_spaces_in_out_run_resume_and_report(base, tmp_path, capfd, monkeypatch):
    """A directory name with spaces, accents and '#': interrupted, resumed (same results as the
    uninterrupted run), and linked from the atlas with a URL that reaches the report."""
    from urllib.parse import unquote
    monkeypatch.chdir(tmp_path)
    out = Path("runs dir") / "été run #1"
    rc, _, err = _main(["run", "fig1", *TINY, "--out", str(out), "--stop-after", "25"], capfd)
    assert rc == 3 and "--resume" in err
    rc, _, err = _main(["run", "fig1", "--resume", "--out", str(out), "--quiet"], capfd)
    assert rc == 0, err
    _same_results(out, base / "full")
    rc, stdout, err = _main(["report", "runs dir"], capfd)
    assert rc == 0, err
    page = (tmp_path / "runs dir" / "index.html").read_text(encoding="utf-8")
    hrefs = set(re.findall(r'href="([^"#][^"]*)"', page))
    assert hrefs and all((tmp_path / "runs dir" / unquote(h)).is_file() for h in hrefs), hrefs


def test_continue_hint_is_a_command_that_works_when_pasted(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = "my runs/try #2"
    rc, _, err = _main(["run", "fig1", *TINY, "--out", out, "--stop-after", "25"], capfd)
    assert rc == 3
    cmd = err.split("Continue with: ", 1)[1].strip()
    assert shlex.split(cmd, comments=True) == ["bnkit", "run", "fig1", "--resume", "--out", out]


# ------------------------------------------------------------------------------------------------ two runs, one dir

def test_second_run_into_a_finished_dir_is_refused_byte_identical(base, tmp_path, capfd):
    d = _copy(base / "full", tmp_path / "done")
    before = _snapshot(d)
    rc, _, err = _main(["run", "fig1", *TINY, "--seed", "3", "--out", str(d)], capfd)
    assert rc == 2 and "already holds an experiment" in _one_error(err)
    assert _snapshot(d) == before


def test_concurrent_start_into_the_same_dir_does_not_overwrite_the_other(tmp_path, capfd, monkeypatch):
    """Another `bnkit run --out D` creates D/config.json while this one loads its data (between the check of
    --out and the creation of the directory): this one must not take the directory over."""
    out = tmp_path / "race"
    real = registry._check_with_data

    def other_process_starts(*a, **k):
        real(*a, **k)
        out.mkdir()
        (out / "config.json").write_text('{"the": "other run"}')
    monkeypatch.setattr(registry, "_check_with_data", other_process_starts)
    rc, _, err = _main(["run", "fig1", *TINY, "--out", str(out)], capfd)
    assert (out / "config.json").read_text() == '{"the": "other run"}'
    assert rc == 2 and "already holds an experiment" in _one_error(err)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_losing_the_mkdir_race_does_not_delete_the_winners_dir(tmp_path, capfd, monkeypatch):
    out = tmp_path / "race"
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *a, **k):
        if self == out and not self.exists():  # the other process wins the race by a hair
            real_mkdir(self)
            (self / "config.json").write_text('{"the": "other run"}')
        return real_mkdir(self, *a, **k)
    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    rc, _, err = _main(["run", "fig1", *TINY, "--out", str(out)], capfd)
    assert rc == 2 and _one_error(err)
    assert (out / "config.json").read_text() == '{"the": "other run"}'


# ------------------------------------------------------------------------------------------------ --resume

def test_resume_of_a_completed_run_changes_no_result(base, tmp_path, capfd):
    d = _copy(base / "full", tmp_path / "done")
    before = _snapshot(d)
    rc, _, err = _main(["run", "fig1", "--resume", "--out", str(d), "--quiet"], capfd)
    assert rc == 0, err
    after = _snapshot(d)
    assert set(after) == set(before)
    for rel in before:  # the run results, checkpoints, stream, settings and figure: byte-identical
        if rel not in ("metrics.json", "report.html"):
            assert after[rel] == before[rel], rel
    m0, m1 = (json.loads(s[("metrics.json")]) for s in (before, after))
    assert _strip(m1) == _strip(m0)


def test_resume_with_other_settings_reports_and_ignores_them(base, tmp_path, capfd):
    d = _copy(base / "cut", tmp_path / "cut")
    rc, out, err = _main(["run", "fig1", "--resume", "--out", str(d), "--steps", "50", "--seed", "7"], capfd)
    assert rc == 0, err
    note = " ".join((out + err).split())
    assert "ignoring" in note and "'steps': 50" in note and "'seeds': [7]" in note
    _same_results(d, base / "full")  # the saved settings were used


def test_resume_quiet_still_reports_ignored_settings(base, tmp_path, capfd):
    d = _copy(base / "cut", tmp_path / "cut")
    rc, out, err = _main(["run", "fig1", "--resume", "--out", str(d), "--steps", "50", "--quiet"], capfd)
    assert rc == 0, err
    assert "ignoring" in out + err and "steps" in out + err


def test_resume_refuses_a_run_result_written_with_other_settings(base, tmp_path, capfd):
    d = _copy(base / "cut", tmp_path / "cut")
    rc, _, _ = _main(["run", "fig1", *TINY[:-1], "--steps", "30", "--quiet", "--out", str(tmp_path / "other")], capfd)
    assert rc == 0
    shutil.copy(tmp_path / "other" / "runs" / "baseline-s0.json", d / "runs" / "baseline-s0.json")
    before = _snapshot(d)
    rc, _, err = _main(["run", "fig1", "--resume", "--out", str(d), "--quiet"], capfd)
    if rc == 0:  # what a resume that accepted it produced: a 20-step experiment with a 30-step run inside
        m = json.loads((d / "metrics.json").read_text())
        assert m["runs"]["baseline-s0"]["steps"][-1] == m["config"]["steps"]
    assert rc == 2 and "baseline-s0.json" in _one_error(err)
    assert _snapshot(d) == before


def _result_wrong_types(d):
    (d / "runs" / "baseline-s0.json").write_text(json.dumps(
        {"name": "baseline-s0", "steps": "x", "test_acc": 5, "summary": 3, "timing": {}}))


def _jsonl_list_line(d):
    p = d / "metrics.jsonl"
    p.write_text(p.read_text() + "[1, 2]\n")


def _runs_is_file(d):
    shutil.rmtree(d / "runs")
    (d / "runs").write_text("x")


@pytest.mark.parametrize("damage, names", [
    (lambda d: (d / "runs" / "baseline-s0.json").write_text(""), "baseline-s0.json"),
    (lambda d: (d / "config.json").write_text(""), "config.json"),
    (lambda d: ((d / "config.json").unlink(), (d / "config.json").mkdir()), "config.json"),
    (lambda d: ((d / "checkpoints" / "bn-s0.pt").unlink(), (d / "checkpoints" / "bn-s0.pt").mkdir()), "bn-s0.pt"),
    (_result_wrong_types, "baseline-s0.json"),
    (_jsonl_list_line, "metrics.jsonl"),
    (lambda d: (d / "metrics.jsonl").write_bytes(b"\xff\xfe\n"), "metrics.jsonl"),
    (_runs_is_file, "runs"),
], ids=["result_empty", "config_empty", "config_is_dir", "ckpt_is_dir", "result_wrong_types", "jsonl_list_line",
        "jsonl_binary", "runs_is_a_file"])
def test_damaged_dir_on_resume_is_status_2_naming_the_file_and_nothing_changes(base, tmp_path, capfd, damage, names):
    d = _copy(base / "cut", tmp_path / "cut")
    damage(d)
    before = _snapshot(d)
    rc, _, err = _main(["run", "fig1", "--resume", "--out", str(d), "--quiet"], capfd)
    assert _snapshot(d) == before
    assert rc == 2 and names in _one_error(err)


def test_resume_of_another_experiments_unfinished_dir(tmp_path, capfd):
    d = tmp_path / "norms-cut"
    rc, _, _ = _main(["run", "norms", *TINY, "--norms", "bn", "--out", str(d), "--stop-after", "3"], capfd)
    assert rc == 3
    before = _snapshot(d)
    rc, _, err = _main(["run", "fig1", "--resume", "--out", str(d), "--quiet"], capfd)
    assert rc == 2 and "config.json" in _one_error(err)
    assert _snapshot(d) == before


# ------------------------------------------------------------------------------------------------ signals

def _start_and_signal(argv, cwd: Path, out: Path, sig):
    """Start ``bnkit ARGV``, send ``sig`` at its first progress line (the first line of metrics.jsonl)."""
    p = _Proc([sys.executable, "-m", "bnkit.cli", *argv], cwd)
    jsonl = out / "metrics.jsonl"
    t0 = time.monotonic()
    try:
        while p.poll() is None and time.monotonic() - t0 < 120:
            if jsonl.is_file() and jsonl.read_text().strip():
                break
            time.sleep(0.01)
        assert p.poll() is None, "finished before the signal"
        p.send_signal(sig)
        return p.finish(timeout=120)
    finally:
        p.kill()


def test_ctrl_c_at_the_first_progress_line_then_resume_is_bit_identical(base, tmp_path, capfd):
    out = tmp_path / "sig int été"
    rc, _, err = _start_and_signal(["run", "fig1", *SIG, "--out", str(out)], tmp_path, out, signal.SIGINT)
    assert rc in (3, 130), (rc, err)  # 3: during training, 130: outside it (docs/cli.md)
    assert "Traceback" not in err and len([ln for ln in err.splitlines() if ln.strip()]) == 1, err
    if rc == 3:
        assert "--resume" in err
    assert not (out / "metrics.json").exists()
    rc, _, err = _main(["run", "fig1", "--resume", "--out", str(out), "--quiet"], capfd)
    assert rc == 0, err
    _same_results(out, base / "sigref")


def test_sigterm_at_the_first_progress_line_then_resume_is_bit_identical(base, tmp_path, capfd):
    out = tmp_path / "sigterm"
    rc, _, err = _start_and_signal(["run", "fig1", *SIG, "--quiet", "--out", str(out)], tmp_path, out,
                                   signal.SIGTERM)
    assert rc != 0 and not (out / "metrics.json").exists()
    rc, _, err = _main(["run", "fig1", "--resume", "--out", str(out), "--quiet"], capfd)
    assert rc == 0, err
    _same_results(out, base / "sigref")


def _torch_loading(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _launcher(how: str) -> list[str]:
    if how == "module":
        return [sys.executable, "-m", "bnkit.cli"]
    script = Path(sys.executable).parent / "bnkit"  # the console script pip installs beside the interpreter
    if not script.exists():
        pytest.skip(f"no console script at {script} (bnkit not pip-installed into this environment)")
    return [str(script)]


@pytest.mark.parametrize("how", ["module", "console script"])
def test_ctrl_c_during_startup_is_one_line_without_traceback(tmp_path, how):
    out = tmp_path / "early"
    p = _Proc([*_launcher(how), "run", "fig1", *TINY, "--out", str(out)], tmp_path)
    t0 = time.monotonic()
    if Path("/proc/self/maps").exists():
        while p.poll() is None and not _torch_loading(p.pid) and time.monotonic() - t0 < 60:
            time.sleep(0.002)
    else:
        time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    rc, _, err = p.finish(timeout=120)
    assert not out.exists()
    assert rc in (130, -signal.SIGINT), rc
    assert "Traceback" not in err and len([ln for ln in err.splitlines() if ln.strip()]) <= 1, err[-2000:]


@pytest.mark.parametrize("code", [
    "import bnkit",  # a library import: the startup guard of the command is not installed
    "import sys; sys.argv = ['-m']; import bnkit",  # runpy's argv, but another module is being run
])
def test_importing_bnkit_leaves_ctrl_c_to_python(tmp_path, code):
    check = code + "; import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    r = _cli([], tmp_path, args=[sys.executable, "-c", check])
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr


@pytest.mark.parametrize("argv0, ignored, guarded", [
    ("/usr/local/bin/bnkit", False, True),  # the console script's argv[0]: the guard is installed
    ("/usr/local/bin/bnkit", True, False),  # Ctrl-C ignored (nohup, a background job): left as it is
    ("/usr/local/bin/bnkit-tools", False, False),  # another program's name
])
def test_the_startup_guard_follows_the_console_scripts_name(tmp_path, argv0, ignored, guarded):
    check = ("import signal, sys\n"
             + ("signal.signal(signal.SIGINT, signal.SIG_IGN)\n" if ignored else "")
             + f"sys.argv = [{argv0!r}, 'run']\n"
             "before = signal.getsignal(signal.SIGINT)\n"
             "import bnkit, bnkit.cli\n"
             "after_import = signal.getsignal(signal.SIGINT)\n"
             "bnkit.cli._end_startup_guard()\n"
             "print(after_import is bnkit._cli_startup_sigint is not None, after_import is before,"
             " signal.getsignal(signal.SIGINT) is before)\n")
    r = _cli([], tmp_path, args=[sys.executable, "-c", check])
    assert r.returncode == 0, r.stderr
    # guarded: the guard replaced Python's handler, and main()'s first step gives Python's back
    assert r.stdout.split() == (["True", "False", "True"] if guarded else ["False", "True", "True"]), r.stdout


@pytest.mark.slow
def test_ctrl_c_with_jobs_then_resume_is_bit_identical(base, tmp_path):
    out = tmp_path / "jobs"
    rc, _, err = _start_and_signal(["run", "fig1", *SIG, "--jobs", "2", "--out", str(out)], tmp_path, out,
                                   signal.SIGINT)
    assert rc == 3 and "Traceback" not in err and len([ln for ln in err.splitlines() if ln.strip()]) == 1, err
    r = _cli(["run", "fig1", "--resume", "--out", str(out), "--quiet"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    _same_results(out, base / "sigref")


# ------------------------------------------------------------------------------------------------ atomic writes

_KILLED_IN = """
import os, sys
def die(*a, **k):
    f = a[0] if a else k.get("fname") or k.get("file")
    if hasattr(f, "write"):
        f.write(b"\\x93NUMPY\\x89PNG")
        f.flush()
    else:
        with open(f, "wb") as fh:
            fh.write(b"\\x93NUMPY\\x89PNG")
    os._exit(9)  # a kill -9 in the middle of the write: no cleanup runs
import numpy, matplotlib.figure
if sys.argv[1] == "npy":
    numpy.save = lambda file, *a, **k: die(file)
else:
    matplotlib.figure.Figure.savefig = lambda self, fname, *a, **k: die(fname)
from bnkit.cli import main
main(sys.argv[2:])
"""


def _killed_while_writing(what: str, out: Path, cwd: Path):
    r = _cli(None, cwd, args=[sys.executable, "-c", _KILLED_IN, what, "run", "fig1", *TINY, "--out", str(out)])
    assert r.returncode == 9, r.stderr


def test_kill_while_writing_the_percentiles_then_resume_repairs_them(base, tmp_path, capfd):
    out = tmp_path / "npy"
    _killed_while_writing("npy", out, tmp_path)
    rc, _, err = _main(["run", "fig1", "--resume", "--out", str(out), "--quiet"], capfd)
    assert rc == 0, err
    _same_results(out, base / "full")


def test_kill_while_writing_the_figure_leaves_no_half_written_png(tmp_path):
    from PIL import Image
    out = tmp_path / "fig"
    _killed_while_writing("png", out, tmp_path)
    png = out / "fig1.png"
    if png.exists():
        with Image.open(png) as im:
            im.load()


def test_unexpected_error_is_one_line_then_resume_finishes_it(base, tmp_path, capfd, monkeypatch):
    """An unexpected error after training (a bug in an experiment's summary): one line and exit 1; with
    BNKIT_DEBUG=1 the traceback; the trained runs are kept and --resume finishes the experiment."""
    out = tmp_path / "boom"

    def boom(cfg, results):
        raise ZeroDivisionError("boom")
    monkeypatch.setattr(fig1, "summarize", boom)
    monkeypatch.delenv("BNKIT_DEBUG", raising=False)
    rc, _, err = _main(["run", "fig1", *TINY, "--out", str(out)], capfd)
    line = _one_error(err)
    assert rc == 1 and "ZeroDivisionError: boom" in line and "BNKIT_DEBUG=1" in line
    monkeypatch.setenv("BNKIT_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        cli.main(["run", "fig1", "--resume", "--out", str(out), "--quiet"])
    monkeypatch.undo()
    rc, _, err = _main(["run", "fig1", "--resume", "--out", str(out), "--quiet"], capfd)
    assert rc == 0, err
    _same_results(out, base / "full")


# ------------------------------------------------------------------------------------------------ environment

def test_bnkit_data_naming_a_file_says_so(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    monkeypatch.setenv("BNKIT_DATA", "notes.txt")
    rc, _, err = _main(["run", "fig1", *TINY, "--data", "mnist", "--out", "o"], capfd)
    line = _one_error(err)
    assert rc == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert "notes.txt" in line and "does not exist" not in line


def test_bnkit_data_unset_or_missing_is_one_line(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for value, needle in (("", "BNKIT_DATA"), (str(tmp_path / "nowhere"), "nowhere")):
        monkeypatch.setenv("BNKIT_DATA", value)
        rc, _, err = _main(["run", "fig1", *TINY, "--data", "mnist", "--out", "o"], capfd)
        assert rc == 2 and needle in _one_error(err)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ run all

def test_run_all_bad_setting_leaves_no_directory(tmp_path, capfd):
    out = tmp_path / "suite"
    rc, _, err = _main(["run", "all", "--quiet", "--set", "lr=-1", "--out", str(out)], capfd)
    assert rc == 2 and "--lr" in _one_error(err)
    assert not out.exists()


def test_run_all_out_is_a_file(tmp_path, capfd):
    f = tmp_path / "notes.txt"
    f.write_text("keep")
    rc, _, err = _main(["run", "all", "--quiet", "--out", str(f)], capfd)
    assert f.read_text() == "keep"
    assert rc == 2 and "notes.txt" in _one_error(err)


def test_run_all_set_of_an_unknown_setting_is_an_error(tmp_path, capfd):
    out = tmp_path / "suite"
    rc, _, err = _main(["run", "all", "--quiet", "--steps", "1", "--seed", "0", "--stop-after", "1",
                        "--set", "stpes=5", "--out", str(out)], capfd)
    assert rc == 2 and "stpes" in _one_error(err)
    assert not out.exists()


def test_run_all_resume_of_a_missing_dir_is_an_error(tmp_path, capfd):
    out = tmp_path / "typo"
    rc, _, err = _main(["run", "all", "--resume", "--quiet", "--steps", "1", "--seed", "0", "--stop-after", "1",
                        "--out", str(out)], capfd)
    assert rc == 2 and "typo" in _one_error(err)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ report

def _finished(d: Path, name="fig1"):
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "metrics.json").write_text(json.dumps({"experiment": name, "summary": {"checks": {"ok": {"pass": True}}}}))


@pytest.mark.parametrize("text, why", [
    ('{"experiment": "fig1", "summary": [1, 2]}', None),
    ('{"experiment": "fig1", "summary": {"checks": [1, 2]}, "runs": [], "dataset": {"name": ["x"], "train": true}}',
     None),
    ('{"experiment": "fig1", "wall_seconds_this_call": NaN, "finished": 5, "summary": {"checks": {"a": 3}}}', None),
    ('{"experiment": {"a": 1}}', "names no experiment"),
    ('{"experiment": "fig1"', "unreadable"),
    ("", "unreadable"),
    ("[" * 100000 + "]" * 100000, "unreadable"),
], ids=["summary_list", "wrong_types", "nan_and_odd", "experiment_dict", "truncated", "empty", "deeply_nested"])
def test_report_survives_odd_metrics_files(tmp_path, capfd, text, why):
    root = tmp_path / "runs"
    _finished(root / "fig1-good")
    odd = root / "fig1-odd"
    odd.mkdir(parents=True)
    (odd / "config.json").write_text("{}")
    (odd / "metrics.json").write_text(text)
    before = _snapshot(root)
    rc, out, err = _main(["report", str(root)], capfd)
    assert rc == 0 and "Traceback" not in err, err
    page = (root / "index.html").read_text()
    assert "fig1-good" in page and "fig1-odd" in page
    if why:
        assert why in out and "fig1-odd" in out
    after = _snapshot(root)
    del after["index.html"]
    assert after == before  # the atlas writes its page only


def test_report_on_an_experiment_dir_and_a_unicode_out(tmp_path, capfd):
    """RUNS_DIR may be one experiment directory itself; --out with spaces and accents."""
    d = tmp_path / "fig1-one"
    _finished(d)
    site = tmp_path / "mon site"
    site.mkdir()
    rc, out, err = _main(["report", str(d), "--out", str(site / "atlas été.html")], capfd)
    assert rc == 0, err
    assert (site / "atlas été.html").read_text().startswith("<!DOCTYPE html>")
    assert not (d / "index.html").exists()


def test_report_errors_keep_an_existing_page(tmp_path, capfd):
    root = tmp_path / "runs"
    _finished(root / "fig1-a")
    page = tmp_path / "atlas.html"
    page.write_text("old page")
    (root / "fig1-a" / "metrics.json").unlink()  # now nothing is finished
    rc, _, err = _main(["report", str(root), "--out", str(page)], capfd)
    assert rc == 2 and "no finished experiment" in _one_error(err)
    assert page.read_text() == "old page"
