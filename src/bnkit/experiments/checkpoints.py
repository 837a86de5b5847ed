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

import numpy as np
import torch

if TYPE_CHECKING:
    from .train import RunConfig

__all__ = ["CheckpointError", "atomic_write_bytes", "atomic_write_text", "link_new", "atomic_save",
           "atomic_save_npy", "remove_stale_temp_files", "check_resumable", "percentiles_ok", "finite_or_none",
           "strict_json", "append_jsonl", "jsonl_lock", "order_jsonl"]


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


@contextlib.contextmanager
def _sigint_held():
    """Ctrl-C held back until the block has ended, then handled as it would have been: a KeyboardInterrupt
    raised inside ``torch.save``'s writer comes out of its zip writer as a RuntimeError ("unexpected pos"),
    an unexpected error instead of an interruption. Only in the main thread, with a Python handler."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.getsignal(signal.SIGINT)
    if not callable(old):  # SIG_IGN (the workers of --jobs), SIG_DFL, or set from C
        yield
        return
    got = []
    signal.signal(signal.SIGINT, lambda *a: got.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if got:
        old(*got[0])


def _atomic_write(path: Path, write) -> None:
    """``write(fileobj)`` into a temporary file, fsync it, rename it over ``path``, fsync the directory."""
    path = Path(path)
    tmp = _tmp_path(path)
    with _sigint_held():  # a Ctrl-C lands after the file is in place
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


def link_new(src: Path, dst: Path) -> None:
    """Put the complete file ``src`` at ``dst`` too, unless ``dst`` exists (``FileExistsError``, ``dst``
    untouched): the claim of a name by one of two processes that both found it free. A hard link, which
    fails rather than replaces; ``src`` stays (the caller removes it)."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:  # pragma: no cover - a file system without hard links: claim by O_EXCL, then fill
        os.close(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        atomic_write_bytes(dst, Path(src).read_bytes())
    _fsync_dir(Path(dst).parent)


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` with the same crash safety as :func:`atomic_write_bytes`."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_save_npy(path: Path, arr) -> None:
    """``np.save`` with the same crash safety as :func:`atomic_write_bytes`."""
    _atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False))


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


def _is_num(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _result_problem(res) -> Optional[str]:
    """What is wrong with the shape of a run result (the dict of ``train._result``), or None: the readers
    of a result (the experiments' summaries, the report) index it without checking."""
    if not (isinstance(res, dict) and {"name", "config", "steps", "test_acc", "test_loss", "train_loss",
                                       "percentiles", "summary", "timing"} <= set(res)):
        return "not a bnkit run result"
    steps = res["steps"]
    if not (isinstance(steps, list) and steps and all(_is_int(s) for s in steps)):
        return "'steps' is not a list of integers"
    for k in ("test_acc", "test_loss", "train_loss", "train_acc", "train_eval_loss"):
        v = res.get(k, steps)
        if not (isinstance(v, list) and len(v) == len(steps) and all(_is_num(x) for x in v)):
            return f"{k!r} is not a list of {len(steps)} numbers"
    pct = res["percentiles"]
    if not (isinstance(pct, dict) and all(isinstance(pct.get(k), list) and all(_is_num(x) for x in pct[k])
                                          for k in ("p15", "p50", "p85"))):
        return "'percentiles' is not three lists of numbers"
    summ = res["summary"]
    if not (isinstance(summ, dict) and all(_is_num(summ.get(k, "")) for k in ("final_acc", "best_acc"))
            and isinstance(summ.get("steps_to"), dict) and isinstance(summ.get("drift"), dict)):
        return "'summary' is not a run summary"
    for k, typ in (("timing", dict), ("extra", dict), ("step_records", list)):
        if not isinstance(res.get(k, typ()), typ):
            return f"{k!r} is not a {typ.__name__}"
    if not all(res.get(k) is None or _is_int(res[k]) for k in ("diverged_at", "typical_unit")):
        return "'diverged_at' or 'typical_unit' is not an integer"
    return None


def _read_result(cfg: RunConfig, path: Path) -> Dict:
    try:
        res = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(_damaged(path, cfg.name, e)) from None
    why = _result_problem(res)
    if why:
        raise CheckpointError(_damaged(path, cfg.name, ValueError(why)))
    # the result's settings in their JSON form (tuples as lists), as train._result wrote them
    if res["name"] != cfg.name or res["config"] != json.loads(strict_json(asdict(cfg))):
        raise CheckpointError(f"cannot resume run {cfg.name}: {path} was written with different settings; "
                              f"delete it to retrain that run")
    return res


def percentiles_ok(cfg: RunConfig, out_dir: Path, res: Dict) -> bool:
    """Whether ``runs/<run>-percentiles.npy`` is the probe series of the result ``res``: written after the
    result by older versions, a kill could leave it truncated or missing; such a run is trained again."""
    path = Path(out_dir) / "runs" / f"{cfg.name}-percentiles.npy"
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return False
    return (isinstance(arr, np.ndarray) and arr.ndim == 3 and arr.shape[0] == len(res["steps"])
            and arr.shape[1] == 3 and arr.dtype.kind == "f")


def _check_jsonl(path: Path) -> None:
    """``metrics.jsonl`` holds JSON objects, one a line (a torn line from a hard kill is dropped later)."""
    if not path.exists():
        return
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot resume: {path} is unreadable ({type(e).__name__}: {e})") from None
    for i, line in enumerate(text.splitlines(), 1):
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        if not (isinstance(rec, dict) and isinstance(rec.get("run"), str) and _is_int(rec.get("step"))):
            raise CheckpointError(f"cannot resume: {path} is damaged (line {i} is not a bnkit metrics record)")


def check_resumable(runs: Sequence[RunConfig], out_dir: Path) -> None:
    """Read every run's saved result or checkpoint in ``out_dir`` (those that exist) and the metrics
    stream; raises :class:`CheckpointError` for the first unusable one, before any run continues."""
    out_dir = Path(out_dir)
    for sub in ("runs", "checkpoints"):
        if (out_dir / sub).exists() and not (out_dir / sub).is_dir():
            raise CheckpointError(f"cannot resume {out_dir}: {out_dir / sub} is not a directory")
    _check_jsonl(out_dir / "metrics.jsonl")
    for cfg in runs:
        result_path = out_dir / "runs" / f"{cfg.name}.json"
        ckpt_path = out_dir / "checkpoints" / f"{cfg.name}.pt"
        if result_path.exists():
            res = _read_result(cfg, result_path)
            if percentiles_ok(cfg, out_dir, res):
                continue
        if ckpt_path.exists():  # the run (re)trains from it
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
        if not isinstance(rec, dict):
            continue
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
