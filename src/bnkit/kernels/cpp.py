"""Build, cache and load bnkit's fused C++ CPU kernels.

The sources in ``kernels/csrc`` are compiled once with
:func:`torch.utils.cpp_extension.load` into a plain shared library (no Python
module: the ops register themselves with ``TORCH_LIBRARY(bnkit, ...)`` and are
reached as ``torch.ops.bnkit.*``).  The build is cached under
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) in a folder
whose name carries a hash of the sources, the flags and the torch version, so
a stale build is never loaded; later processes load the cached library
directly (a few milliseconds), without starting a compiler.

Flags are portable (``-O3``, no ``-march=native``), so a cached build is valid
on any x86-64 machine.  ``-fopenmp`` is passed at compile time only so that
``at::parallel_for`` uses torch's thread pool; the library links against the
``libgomp.so.1`` that torch itself ships and has loaded (one OpenMP runtime).

Builds are serialized with our own ``fcntl.flock`` on ``bnkit.flock`` in the
build folder, held around torch's build.  The kernel releases a flock when its
holder dies, so a build killed half-way never blocks later processes; torch's
own lock file (``lock``, a ``FileBaton`` that torch's build waits on forever)
found while we hold the flock can only be a killed build's leftover, and is
removed with a one-line message (see :func:`_clear_stale_baton`).  Where
``fcntl`` is missing, a ``lock`` file untouched for ``STALE_LOCK_SECONDS`` is
treated as stale.

Public functions: :func:`available`, :func:`load`, :func:`build`,
:func:`build_error`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
import time
from pathlib import Path

from .._warn import warn

__all__ = ["available", "load", "build", "build_error", "library_path", "EXTENSION_NAME"]

EXTENSION_NAME = "bnkit_kernels"
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (
    "ops.cpp",
    "autograd.cpp",
    "layer.cpp",
    "accelerate.cpp",
    "masked.cpp",
    "domain.cpp",
    "kernels.cpp",
    "kernels_backward.cpp",
    "cpu_config.cpp",
    "rowkernels_default.cpp",
    "rowkernels_avx2.cpp",
    "rowkernels_avx512.cpp",
    "rowkernels_avx512bf16.cpp",
)
HEADERS = ("bnkit_kernels.h", "drivers.h", "layout.h", "op_def.h", "rowkernels.h", "rowkernels_act.h", "rowkernels_impl.h")
CFLAGS = ("-O3", "-fopenmp", "-fno-math-errno", "-DNDEBUG")

# torch's FileBaton in the build folder, and our own lock file beside it.
BATON_NAME = "lock"
FLOCK_NAME = "bnkit.flock"
# Without fcntl: a baton untouched for this long is a killed build's leftover.
STALE_LOCK_SECONDS = 300.0

_lock = threading.RLock()
_loaded: bool = False
_error: str | None = None  # why the build/load failed (sticky for the process)
_warned = False


def _torch_lib_dir() -> Path:
    import torch

    return Path(torch.__file__).resolve().parent / "lib"


def _ldflags() -> list[str]:
    flags: list[str] = []
    gomp = _torch_lib_dir() / "libgomp.so.1"
    if gomp.exists():
        # torch's own OpenMP runtime (already loaded by libtorch_cpu).
        flags += [str(gomp), f"-Wl,-rpath,{gomp.parent}"]
    else:  # e.g. a torch built against the system libgomp
        flags += ["-fopenmp"]
    return flags


def _tag() -> str:
    import torch

    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    h.update(" ".join(CFLAGS).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.split()[0].encode())
    return h.hexdigest()[:12]


def _name() -> str:
    return f"{EXTENSION_NAME}_{_tag()}"


def _build_root() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root).expanduser()
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def library_path() -> Path:
    """Where the compiled library for the current sources lives (or will)."""
    name = _name()
    return _build_root() / name / f"{name}.so"


def _ops_registered() -> bool:
    import torch

    try:
        torch.ops.bnkit.batch_norm_train  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def _clear_stale_baton(build_dir: Path, flock_held: bool) -> bool:
    """Remove torch's build lock in ``build_dir`` if it is a dead build's leftover.

    With ``flock_held`` (we hold ``bnkit.flock``, which every bnkit build holds
    while torch's lock exists), any ``lock`` file is stale.  Otherwise it is
    stale when untouched for :data:`STALE_LOCK_SECONDS`.  Returns whether a
    stale lock was removed (and says so in one line on stderr).
    """
    baton = build_dir / BATON_NAME
    try:
        age = time.time() - baton.stat().st_mtime
    except FileNotFoundError:
        return False
    if not flock_held and age < STALE_LOCK_SECONDS:
        return False
    try:
        baton.unlink()
    except FileNotFoundError:
        return False
    print(
        f"bnkit: removed a stale build lock left by a killed build ({baton}, {age:.0f} s old); rebuilding",
        file=sys.stderr,
        flush=True,
    )
    return True


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """Hold bnkit's inter-process build lock on ``build_dir``; clears a stale torch lock.

    Yields whether the flock is held (False where ``fcntl`` is unavailable).
    """
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        _clear_stale_baton(build_dir, flock_held=False)
        yield False
        return
    with open(build_dir / FLOCK_NAME, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print("bnkit: waiting for another process building the C++ kernels...", file=sys.stderr, flush=True)
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            _clear_stale_baton(build_dir, flock_held=True)
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _compile(verbose: bool) -> None:
    name = _name()
    build_dir = _build_root() / name
    with _build_lock(build_dir):
        _compile_locked(name, build_dir, verbose)


def _compile_locked(name: str, build_dir: Path, verbose: bool) -> None:
    import torch.utils.cpp_extension as ext

    ext.load(
        name=name,
        sources=[str(CSRC / s) for s in SOURCES],
        extra_cflags=list(CFLAGS),
        extra_ldflags=_ldflags(),
        extra_include_paths=[str(CSRC)],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=verbose,
    )


def _load(verbose: bool = False, force_build: bool = False) -> None:
    global _loaded, _error
    import torch

    if _loaded:
        return
    if _ops_registered():  # loaded by someone else in this process
        _loaded = True
        return
    path = library_path()
    if path.exists() and not force_build:
        torch.ops.load_library(str(path))
    else:
        if not verbose:
            print("bnkit: compiling the C++ kernels (once per source version; a cold build takes "
                  "minutes)...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        _compile(verbose)
        print(f"bnkit: built {path} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    if not _ops_registered():
        raise RuntimeError(f"the library {path} loaded but registered no torch.ops.bnkit ops")
    _loaded = True


def _reason(exc: BaseException) -> str:
    """A one-line reason: the first compiler/linker error line if there is one."""
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        low = ln.lower()
        if "error:" in low or "fatal" in low or "not found" in low or "no such file" in low:
            return f"{type(exc).__name__}: {ln[:240]}"
    return f"{type(exc).__name__}: {(lines[-1] if lines else repr(exc))[:240]}"


def load() -> bool:
    """Load (building once if needed) the kernels; ``True`` when the ops are usable.

    On failure a single warning says why and how to fix it, and ``False`` is
    returned (callers fall back to the portable torch backend).
    """
    global _error, _warned
    if _loaded:
        return True
    with _lock:
        if _loaded:
            return True
        if _error is not None:
            return False
        if os.environ.get("BNKIT_NO_BUILD") == "1" and not library_path().exists():
            _error = "BNKIT_NO_BUILD=1 is set and no cached build exists"
        else:
            try:
                _load()
            except Exception as exc:  # compiler missing, headers missing, ...
                _error = _reason(exc)
        if _error is not None:
            if not _warned:
                _warned = True
                warn(
                    "bnkit: the C++ CPU kernels are unavailable, falling back to the portable torch "
                    f"backend (slower). Reason: {_error}. To fix: install a C++ compiler (g++ >= 9) "
                    "and ninja (`pip install ninja`), make $TORCH_EXTENSIONS_DIR (default "
                    "~/.cache/torch_extensions) writable, then run `bnkit build --verbose` to see the "
                    "full compiler output. Set BNKIT_BACKEND=torch to silence this warning.",
                    RuntimeWarning,
                )
            return False
        return True


def available() -> bool:
    """Whether the C++ kernels can be used in this process (builds them once if needed)."""
    return load()


def build_error() -> str | None:
    """Why the last :func:`load` failed, or ``None``."""
    return _error


def build(verbose: bool = False) -> None:
    """Build the kernels ahead of time (``bnkit build``); raises on failure.

    Always re-runs the (incremental) build step, so ``bnkit build`` also
    repairs a broken cache; prints where the library is.
    """
    global _error, _loaded
    with _lock:
        _error = None
        t0 = time.perf_counter()
        cached = library_path().exists()
        if cached and not verbose:
            _load()
        else:
            _compile(verbose)
            if not _ops_registered():
                raise RuntimeError("bnkit: the kernels built but registered no torch.ops.bnkit ops")
            _loaded = True
        state = "cached" if cached else f"built in {time.perf_counter() - t0:.1f} s"
        print(f"bnkit: C++ kernels ready ({state}): {library_path()}", file=sys.stderr, flush=True)
