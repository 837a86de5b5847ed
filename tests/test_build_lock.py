"""A build killed half-way must not make later processes wait forever.

torch's cpp_extension build holds a lock *file* (FileBaton ``lock``) in the
build folder and waits, without limit, while it exists; a killed build leaves
it behind.  bnkit holds its own ``fcntl.flock`` around the build (released by
the kernel when the holder dies) and removes a leftover ``lock`` it finds while
holding it.  The compiler itself is replaced by a stand-in that takes torch's
baton exactly as torch does, so these tests need no compiler and run in
seconds; each runs in a subprocess bounded by a timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bnkit.kernels import cpp

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX flock")

SRC = str(Path(cpp.__file__).resolve().parents[2])

# Runs cpp._compile with torch's loader replaced by a stand-in that acquires
# torch's FileBaton the way torch's build does (and would wait forever on a
# stale one).
_FAKE_BUILD = textwrap.dedent(
    """
    import sys, os
    sys.path.insert(0, {src!r})
    import torch.utils.cpp_extension as ext
    from torch.utils.file_baton import FileBaton
    from bnkit.kernels import cpp

    def fake_load(name, build_directory, **kw):
        baton = FileBaton(os.path.join(build_directory, "lock"))
        if baton.try_acquire():
            baton.release()
            print("BUILT", flush=True)
        else:
            baton.wait()
            print("WAITED", flush=True)

    ext.load = fake_load
    cpp._compile(verbose=False)
    """
)


def _build_dir(tmp_path: Path) -> Path:
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), PYTHONPATH=SRC)
    out = subprocess.run(
        [sys.executable, "-c", "from bnkit.kernels import cpp; print(cpp._build_root() / cpp._name())"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return Path(out.stdout.strip())


def _run_fake_build(tmp_path: Path, timeout: float = 60.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path))
    try:
        return subprocess.run(
            [sys.executable, "-c", _FAKE_BUILD.format(src=SRC)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:  # pragma: no cover - the bug
        pytest.fail(f"the build hung on a stale lock for {timeout} s")


def test_stale_torch_lock_is_removed_and_the_build_proceeds(tmp_path):
    build_dir = _build_dir(tmp_path)
    build_dir.mkdir(parents=True)
    (build_dir / cpp.BATON_NAME).touch()  # left by a killed build
    out = _run_fake_build(tmp_path)
    assert out.returncode == 0, out.stderr
    assert "BUILT" in out.stdout
    assert "removed a stale build lock" in out.stderr
    assert len([ln for ln in out.stderr.splitlines() if "stale" in ln]) == 1  # one line
    assert not (build_dir / cpp.BATON_NAME).exists()


def test_build_killed_while_holding_the_locks_does_not_block_the_next(tmp_path):
    build_dir = _build_dir(tmp_path)
    # A "build" that takes bnkit's flock and torch's baton, then dies by SIGKILL.
    killer = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {SRC!r})
        from pathlib import Path
        from bnkit.kernels import cpp
        d = Path({str(build_dir)!r})
        with cpp._build_lock(d):
            (d / cpp.BATON_NAME).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    p = subprocess.run([sys.executable, "-c", killer], capture_output=True, text=True, timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert (build_dir / cpp.BATON_NAME).exists()
    out = _run_fake_build(tmp_path)
    assert out.returncode == 0, out.stderr
    assert "BUILT" in out.stdout and "removed a stale build lock" in out.stderr


def test_live_build_is_waited_for_not_broken(tmp_path):
    """A build in progress (flock held) is waited for; its lock is not removed.  The holder
    releases only once the second build has said that it waits (no race with start-up time)."""
    build_dir = _build_dir(tmp_path)
    release = tmp_path / "release"
    holder = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {SRC!r})
        from pathlib import Path
        from bnkit.kernels import cpp
        d = Path({str(build_dir)!r})
        release = Path({str(release)!r})
        with cpp._build_lock(d):
            (d / cpp.BATON_NAME).touch()
            print("HOLDING", flush=True)
            deadline = time.monotonic() + 60
            while not release.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            (d / cpp.BATON_NAME).unlink()
        """
    )
    h = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    build = None
    try:
        assert h.stdout.readline().strip() == "HOLDING"
        env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path))
        build = subprocess.Popen(
            [sys.executable, "-c", _FAKE_BUILD.format(src=SRC)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        first = build.stderr.readline()
        assert "waiting for another process" in first, first
        assert h.poll() is None  # the holder still holds the lock: the build really waits
        release.touch()
        stdout, stderr = build.communicate(timeout=60)
        assert build.returncode == 0, stderr
        assert "BUILT" in stdout
        assert "stale" not in first + stderr
    finally:
        release.touch()
        h.wait(timeout=60)
        if build is not None and build.poll() is None:  # pragma: no cover - the bug
            build.kill()


def test_stale_lock_detection_by_age_without_flock(tmp_path):
    baton = tmp_path / cpp.BATON_NAME
    assert not cpp._clear_stale_baton(tmp_path, flock_held=False)  # no lock at all
    baton.touch()
    assert not cpp._clear_stale_baton(tmp_path, flock_held=False)  # fresh: maybe a live build
    assert baton.exists()
    old = time.time() - cpp.STALE_LOCK_SECONDS - 10
    os.utime(baton, (old, old))
    assert cpp._clear_stale_baton(tmp_path, flock_held=False)
    assert not baton.exists()
