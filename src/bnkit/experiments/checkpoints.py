"""Crash-safe files of an experiment: atomic writes, checkpoint and run-result reading, resume checks."""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

import torch

if TYPE_CHECKING:
    from .train import RunConfig

__all__ = ["CheckpointError", "atomic_write_bytes", "atomic_write_text", "atomic_save", "remove_stale_temp_files",
           "check_resumable", "finite_or_none", "strict_json", "append_jsonl", "jsonl_lock", "order_jsonl"]


class CheckpointError(ValueError):
    """A saved checkpoint or run result of an experiment directory cannot be used for ``--resume``."""


_TMP = re.compile(r"^\..+\.tmp(\d+)$")  # the temporary names of _tmp_path: .<name>.tmp<pid>


def finite_or_none(o):
    """``o`` with every non-finite float (NaN, +-Infinity) replaced by ``None``, recursively (dicts,
    lists, tuples): the values a diverged run records are not representable in strict JSON."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: finite_or_none(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [finite_or_none(v) for v in o]
    return o


def strict_json(o, **kw) -> str:
    """``json.dumps`` of ``o`` as strict JSON (RFC 8259): non-finite floats are written as ``null``, so
    every JSON reader accepts the files; a reader sees ``None`` where a diverged run had NaN or Infinity."""
    return json.dumps(finite_or_none(o), allow_nan=False, **kw)


@contextlib.contextmanager
def jsonl_lock(path: Path):
    """An exclusive lock on the JSON-lines file ``path`` (created if missing), held while a run appends to
    it or rewrites it, so that runs in other processes sharing the file never lose a line; a no-op where
    ``fcntl`` is missing. The lock is ``flock`` on the file itself; a rewrite replaces the file (a new
    inode), so a waiter that wakes up on the replaced one tries again on the current file."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: runs of one process only
        yield
        return
    path = Path(path)
    while True:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            current = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)  # releases the lock on the replaced file
    try:
        yield
    finally:
        os.close(fd)


def append_jsonl(path: Path, rec: Dict) -> None:
    """Append one record (strict JSON, one line) to ``path`` under :func:`jsonl_lock`."""
    line = strict_json(rec) + "\n"
    with jsonl_lock(path), open(path, "a") as f:
        f.write(line)


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    """``write(fileobj)`` into a temporary file, fsync it, rename it over ``path``, fsync the directory."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` with the same crash safety as :func:`atomic_write_bytes`."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is not writing anything yet when it cleans up
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temp_files(out_dir: Path) -> List[Path]:
    """Delete the temporary files that interrupted atomic writes left in ``out_dir`` (and its ``runs`` and
    ``checkpoints``); files of a process that is still alive are kept. Returns the removed paths."""
    removed = []
    for d in (Path(out_dir), Path(out_dir) / "runs", Path(out_dir) / "checkpoints"):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            m = _TMP.match(p.name)
            if m and p.is_file() and not _pid_alive(int(m.group(1))):
                try:
                    p.unlink()
                    removed.append(p)
                except OSError:
                    pass
    return removed


def _damaged(path: Path, run: str, e: BaseException) -> str:
    why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return (f"cannot resume run {run}: {path} is damaged ({type(e).__name__}: {why}); delete it to retrain "
            f"that run from step 0")


_STATE_KEYS = {"step", "hist", "pct", "loss_sum", "loss_n", "ema", "train_seconds", "interval_ms"}


def _read_checkpoint(cfg: RunConfig, path: Path) -> Dict:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise CheckpointError(_damaged(path, cfg.name, e)) from None
    if not (isinstance(ck, dict) and {"config", "model", "optimizer", "torch_rng", "state"} <= set(ck)
            and isinstance(ck["state"], dict) and _STATE_KEYS <= set(ck["state"])):
        raise CheckpointError(_damaged(path, cfg.name, ValueError("not a bnkit training checkpoint")))
    if ck["config"] != asdict(cfg):
        raise CheckpointError(f"cannot resume run {cfg.name}: {path} was written with different settings")
    return ck


def _read_result(cfg: RunConfig, path: Path) -> Dict:
    try:
        res = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(_damaged(path, cfg.name, e)) from None
    if not (isinstance(res, dict) and {"name", "steps", "test_acc", "summary", "timing"} <= set(res)):
        raise CheckpointError(_damaged(path, cfg.name, ValueError("not a bnkit run result")))
    return res


def check_resumable(runs: Sequence[RunConfig], out_dir: Path) -> None:
    """Read every run's saved result or checkpoint in ``out_dir`` (those that exist); raises
    :class:`CheckpointError` for the first unusable one, before any run continues."""
    for cfg in runs:
        result_path = Path(out_dir) / "runs" / f"{cfg.name}.json"
        ckpt_path = Path(out_dir) / "checkpoints" / f"{cfg.name}.pt"
        if result_path.exists():
            _read_result(cfg, result_path)
        elif ckpt_path.exists():
            _read_checkpoint(cfg, ckpt_path)


def _filter_jsonl(path: Path, run: str, max_step: Optional[int]) -> None:
    """Drop this run's lines after ``max_step`` (all of them when None): they are re-emitted on resume."""
    if not path.exists():
        return
    with jsonl_lock(path):
        _filter_jsonl_locked(path, run, max_step)


def _filter_jsonl_locked(path: Path, run: str, max_step: Optional[int]) -> None:
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line from a hard kill
        if rec.get("run") == run and (max_step is None or rec.get("step", 0) > max_step):
            continue
        keep.append(line)
    atomic_write_text(path, "".join(l + "\n" for l in keep))


def order_jsonl(path: Path, runs: Sequence[str]) -> None:
    """Rewrite ``path`` with its lines grouped by run in the order of ``runs`` (stable within a run; lines
    of other runs last): runs that trained in parallel appended in any order, and this makes the file
    what a sequential run writes."""
    if not path.exists():
        return
    rank = {r: i for i, r in enumerate(runs)}
    with jsonl_lock(path):
        lines = path.read_text().splitlines()
        keyed = []
        for i, line in enumerate(lines):
            try:
                run = json.loads(line).get("run")
            except (json.JSONDecodeError, AttributeError):
                continue  # a torn line from a hard kill
            keyed.append((rank.get(run, len(rank)), i, line))
        text = "".join(l + "\n" for _, _, l in sorted(keyed))
        if text != "".join(l + "\n" for l in lines):
            atomic_write_text(path, text)
