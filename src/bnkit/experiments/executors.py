"""Executors: where the independent runs of an experiment train. ``bnkit run NAME`` trains them one after
the other in its own process (:class:`SequentialExecutor`); ``--jobs N`` in N worker processes of this
machine (:class:`ProcessExecutor`); ``--executor ray`` as tasks on a Ray cluster (:class:`.ray_executor.RayExecutor`).

Every executor gives the same results, bit for bit: a run's result depends only on its
:class:`.train.RunConfig` (the seed fixes the initial weights, the data order and torch's global RNG)
and on the number of torch threads, which every worker sets to the experiment's ``threads``. Each run
writes its own files (``runs/<run>.json``, ``runs/<run>-percentiles.npy``, ``checkpoints/<run>.pt``);
the shared ``metrics.jsonl`` is appended to under a file lock (:func:`.checkpoints.jsonl_lock`) and put
in run order at the end (:func:`.checkpoints.order_jsonl`), so it equals a sequential run's line for line.

Stopping: when a run fails, the runs not yet started are cancelled and the running ones stop at their
next step with a checkpoint (:class:`.train.RunInterrupted` in the worker); the failure is raised in
the main process (its own exception when it is one of bnkit's, else :class:`RunFailed`). Ctrl-C stops
all runs the same way and raises ``RunInterrupted``; ``--resume`` continues from the checkpoints, with
any executor. ``stop_after`` (a step budget, used by the tests) counts the steps of each run separately
in the parallel executors, and the steps of all runs together in the sequential one.

Ray: tasks receive the dataset from the object store and report progress through a Ray queue. A task
writes into the experiment directory when it sees it (the same path, holding the driver's
``config.json``: one machine, or shared storage mounted at the same path on every node), checkpoints
included; otherwise it trains in a temporary directory of its node and returns every file, which the
driver writes into the experiment directory. An interrupted run of that second kind restarts from
step 0 on ``--resume`` (its checkpoints stayed on the worker); finished runs are never redone.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import queue as _queue
import tempfile
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

__all__ = ["RunTask", "RunFailed", "SequentialExecutor", "ProcessExecutor", "make_executor",
           "check_executor", "run_runs", "EXECUTORS"]

EXECUTORS = ("local", "ray")


class RunFailed(RuntimeError):
    """A run raised an unexpected error in a worker; the message names the run and the error."""


@dataclass
class RunTask:
    """What a worker needs to train one run (plain, picklable data)."""
    cfg: object                      # RunConfig
    out_dir: str                     # the experiment directory (absolute)
    resume: bool
    threads: int = 1
    stop_after: Optional[int] = None  # this run's step budget in this call
    tensorboard: Optional[str] = None  # the run's TensorBoard directory
    config_text: str = ""            # the driver's config.json (a Ray worker compares it with its own view)
    private: bool = False            # train in a temporary directory and return the files (Ray)

    @property
    def name(self) -> str:
        return self.cfg.name


@dataclass
class Outcome:
    """What a worker returns: the result, or how the run stopped, and (private runs) its files."""
    name: str
    result: Optional[Dict] = None
    interrupted: Optional[tuple] = None   # (message, step)
    error: Optional[BaseException] = None
    error_text: str = ""
    traceback: str = ""
    files: Dict[str, bytes] = field(default_factory=dict)      # relative to the experiment directory
    tb_files: Dict[str, bytes] = field(default_factory=dict)   # relative to the run's TensorBoard directory


# ------------------------------------------------------------------------------------------- the worker side

def _picklable(e: BaseException) -> Optional[BaseException]:
    try:
        e2 = pickle.loads(pickle.dumps(e))
    except Exception:  # noqa: BLE001 - any exception that does not survive the trip is sent as text
        return None
    return e2 if type(e2) is type(e) else None


def _read_files(root: Path) -> Dict[str, bytes]:
    if not root.is_dir():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def execute(task: RunTask, data, progress=None, stop: Optional[Callable[[], bool]] = None) -> Outcome:
    """Train ``task`` in this process (a worker); never raises for a failing run (the outcome says)."""
    import torch

    from .tblog import TensorBoardMonitor
    from .train import RunInterrupted, StepBudget, train_run

    torch.set_num_threads(int(task.threads or 1))
    out = Path(task.out_dir)
    tmp = None
    if task.private:
        tmp = tempfile.TemporaryDirectory(prefix=f"bnkit-{task.name}-")
        out = Path(tmp.name) / "exp"
        tb = Path(tmp.name) / "tb" if task.tensorboard else None
    else:
        tb = Path(task.tensorboard) if task.tensorboard else None
    monitor = TensorBoardMonitor(tb) if tb is not None else None
    oc = Outcome(task.name)
    try:
        try:
            oc.result = train_run(task.cfg, data, out, resume=task.resume and not task.private, progress=progress,
                                  budget=StepBudget(task.stop_after, stop), jsonl=out / "metrics.jsonl",
                                  monitor=monitor)
        finally:
            if monitor is not None:
                monitor.close()
        if task.private:
            oc.files = _read_files(out)
            oc.tb_files = _read_files(tb) if tb is not None else {}
    except RunInterrupted as e:
        oc.interrupted = (str(e), e.step)
    except BaseException as e:  # noqa: BLE001 - reported to the driver, which decides
        oc.error, oc.error_text = _picklable(e), f"{type(e).__name__}: {e}"
        oc.traceback = traceback.format_exc()
    finally:
        if tmp is not None:
            tmp.cleanup()
    return oc


class _QueueProgress:
    """The progress of a worker's run, sent as ``(method, args, kwargs)`` messages to the driver."""

    def __init__(self, put):
        self.put = put

    def start(self, name, total, completed=0):
        self.put(("start", (name, total, completed), {}))

    def update(self, name, step, **info):
        self.put(("update", (name, step), info))

    def finish(self, name):
        self.put(("finish", (name,), {}))


def _apply(progress, msg) -> None:
    method, args, kw = msg
    getattr(progress, method)(*args, **kw)


# ------------------------------------------------------------------------------------------- the driver side

class _Collector:
    """Gathers outcomes in the driver: results in run order, the first failure, the interrupted runs."""

    def __init__(self, tasks: Sequence[RunTask]):
        self.order = [t.name for t in tasks]
        self.results: Dict[str, Dict] = {}
        self.failed: Optional[Outcome] = None
        self.interrupted: List[Outcome] = []

    def add(self, oc: Outcome) -> bool:
        """Record ``oc``; True when the other runs should stop (a run failed)."""
        if oc.result is not None:
            self.results[oc.name] = oc.result
        elif oc.interrupted is not None:
            self.interrupted.append(oc)
        elif self.failed is None:
            self.failed = oc
            return True
        return False

    def finish(self, cancelled: bool = False) -> Dict[str, Dict]:
        from .checkpoints import CheckpointError
        from .train import RunInterrupted
        if self.failed is not None:
            oc = self.failed
            e = oc.error
            if os.environ.get("BNKIT_DEBUG") and oc.traceback:
                import sys
                print(oc.traceback, file=sys.stderr)  # the worker's traceback
            others = "; the other runs finished or stopped at a checkpoint (--resume continues)"
            if isinstance(e, (FloatingPointError, CheckpointError)) or type(e).__name__ in ("DatasetError",
                                                                                              "NormNotAvailable"):
                raise e
            raise RunFailed(f"run {oc.name} failed in a worker: {oc.error_text.strip().splitlines()[0]}{others}")
        if self.interrupted or cancelled:
            ints = sorted(self.interrupted, key=lambda o: self.order.index(o.name))
            where = ", ".join(f"{o.name} at step {o.interrupted[1]}" for o in ints)
            if cancelled:
                msg = "interrupted" + (f"; stopped {where}" if where else "")
            else:
                msg = f"step budget exhausted: stopped {where}"
            first = ints[0] if ints else None
            raise RunInterrupted(msg, first.name if first else "", first.interrupted[1] if first else 0)
        return {n: self.results[n] for n in self.order}


def _write_private(oc: Outcome, out: Path, tb: Optional[str]) -> None:
    """Put the files of a run trained in a worker's temporary directory into the experiment directory."""
    from .checkpoints import _filter_jsonl, atomic_write_bytes, jsonl_lock
    jsonl_lines = b""
    for rel, blob in oc.files.items():
        if rel == "metrics.jsonl":
            jsonl_lines = blob
            continue
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(dest, blob)
    path = out / "metrics.jsonl"
    _filter_jsonl(path, oc.name, None)
    with jsonl_lock(path), open(path, "ab") as f:
        f.write(jsonl_lines)
    if tb:
        for rel, blob in oc.tb_files.items():
            dest = Path(tb) / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(dest, blob)


class SequentialExecutor:
    """The runs one after the other in this process (one step budget shared by all runs)."""

    jobs = 1

    def prepare(self) -> None:
        """Nothing to start."""

    def run(self, tasks: Sequence[RunTask], data, progress, stop_after: Optional[int] = None) -> Dict[str, Dict]:
        from .tblog import TensorBoardMonitor
        from .train import StepBudget, train_run
        budget = StepBudget(stop_after)
        results = {}
        for t in tasks:
            monitor = TensorBoardMonitor(t.tensorboard) if t.tensorboard else None
            try:
                results[t.name] = train_run(t.cfg, data, Path(t.out_dir), resume=t.resume, progress=progress,
                                            budget=budget, jsonl=Path(t.out_dir) / "metrics.jsonl", monitor=monitor)
            finally:
                if monitor is not None:
                    monitor.close()
        return results


# the worker processes' globals, set by _init_worker
_W: Dict[str, object] = {}


def _init_worker(q, stop, data) -> None:
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the driver, which stops the runs cleanly
    _W.update(q=q, stop=stop, data=data)


def _process_task(task: RunTask) -> Outcome:
    stop = _W["stop"]
    if stop.is_set():
        return Outcome(task.name, interrupted=(f"not started: run {task.name}", 0))
    return execute(task, _W["data"], _QueueProgress(_W["q"].put), stop.is_set)


class _Pump(threading.Thread):
    """Applies the workers' progress messages to the driver's progress bars."""

    def __init__(self, get, progress):
        super().__init__(daemon=True)
        self.get, self.progress = get, progress
        self.done = threading.Event()

    def run(self):
        while True:
            try:
                msg = self.get(timeout=0.1)
            except _queue.Empty:
                if self.done.is_set():
                    return
                continue
            except (EOFError, OSError):
                return
            try:
                _apply(self.progress, msg)
            except Exception:  # noqa: BLE001 - a progress bar never stops training
                pass


def _mp_context():
    """``forkserver`` where there is one (Linux, macOS): a server process imports torch and bnkit once and
    every worker, of this pool and of later ones, is a fork of it (fast starts, nothing of the driver's
    state inherited); ``spawn`` elsewhere."""
    import multiprocessing as mp
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["bnkit.experiments.executors", "bnkit.experiments.train"])  # no effect once started
        return ctx
    return mp.get_context("spawn")


class ProcessExecutor:
    """The runs in ``jobs`` worker processes of this machine (``concurrent.futures.ProcessPoolExecutor``
    with the ``forkserver`` start method, or ``spawn`` where there is none: the workers inherit no state
    of the driver)."""

    def __init__(self, jobs: int):
        self.jobs = int(jobs)

    def prepare(self) -> None:
        """Nothing to start: the workers start with the first run."""

    def run(self, tasks: Sequence[RunTask], data, progress, stop_after: Optional[int] = None) -> Dict[str, Dict]:
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
        from concurrent.futures.process import BrokenProcessPool

        coll = _Collector(tasks)
        if not tasks:
            return {}
        ctx = _mp_context()
        q, stop = ctx.Queue(), ctx.Event()
        pump = _Pump(q.get, progress)
        pump.start()
        cancelled = False
        pool = ProcessPoolExecutor(max_workers=min(self.jobs, len(tasks)), mp_context=ctx,
                                   initializer=_init_worker, initargs=(q, stop, data))
        try:
            futs = {pool.submit(_process_task, t): t for t in tasks}
            pending = set(futs)
            try:
                while pending:
                    done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    for f in done:
                        try:
                            oc = f.result()
                        except BrokenProcessPool:
                            oc = Outcome(futs[f].name, error_text="its worker process died (killed, out of memory, or a "
                                         "script without the `if __name__ == '__main__':` guard that spawned "
                                         "workers need)")
                        if coll.add(oc):
                            stop.set()
                            for p in pending:
                                p.cancel()
            except KeyboardInterrupt:
                cancelled = True
                stop.set()
                for p in pending:
                    p.cancel()
                for f in pending:
                    try:
                        coll.add(f.result())
                    except BaseException:  # noqa: BLE001 - cancelled or broken: nothing to collect
                        pass
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            pump.done.set()
            pump.join()
            q.close()
        return coll.finish(cancelled)


def _have(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def check_executor(executor: str, jobs: Optional[int], address: Optional[str]) -> None:
    """Raises ``ValueError`` (one line, the flag named) for settings that cannot run; imports nothing heavy."""
    if executor not in EXECUTORS:
        raise ValueError(f"--executor: unknown executor {executor!r}; choose from {', '.join(EXECUTORS)}")
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ValueError(f"--jobs: expected a positive integer, got {jobs!r}")
    if address is not None and executor != "ray":
        raise ValueError("--address needs --executor ray")
    if executor == "ray" and not _have("ray"):
        raise ValueError("ray is not installed; pip install 'bnkit[ray]'")


def make_executor(executor: str = "local", jobs: Optional[int] = None, address: Optional[str] = None):
    """The executor of ``bnkit run``: ``local`` with ``jobs`` > 1 is a :class:`ProcessExecutor`, with one job
    the :class:`SequentialExecutor`; ``ray`` a :class:`RayExecutor`."""
    check_executor(executor, jobs, address)
    if executor == "ray":
        from .ray_executor import RayExecutor
        return RayExecutor(address, jobs)
    if jobs and jobs > 1:
        return ProcessExecutor(jobs)
    return SequentialExecutor()


def run_runs(runs: Sequence, data, out: Path, executor, *, resume: bool, progress, stop_after: Optional[int] = None,
             threads: int = 1, tensorboard: Optional[Path] = None) -> Dict[str, Dict]:
    """Train ``runs`` (RunConfigs) of the experiment in ``out`` with ``executor``; returns the results in
    run order. ``tensorboard``: the experiment's TensorBoard directory (``DIR/<experiment>``), one
    sub-directory per run. A parallel executor gets only the unfinished runs (the finished ones are read
    back here) and a step budget per run."""
    from .checkpoints import _read_result, percentiles_ok
    out = Path(out).resolve()
    config_text = (out / "config.json").read_text()
    parallel = not isinstance(executor, SequentialExecutor)
    tasks = [RunTask(rc, str(out), resume=resume or i > 0, threads=int(threads or 1),
                     stop_after=stop_after if parallel else None,
                     tensorboard=str(Path(tensorboard) / rc.name) if tensorboard else None, config_text=config_text)
             for i, rc in enumerate(runs)]
    if not parallel:
        return executor.run(tasks, data, progress, stop_after)
    done = {}
    for t in tasks:
        path = out / "runs" / f"{t.name}.json"
        if t.resume and path.exists() and percentiles_ok(t.cfg, out, res := _read_result(t.cfg, path)):
            done[t.name] = res
            progress.start(t.name, t.cfg.steps, t.cfg.steps)
            progress.finish(t.name)
    got = executor.run([t for t in tasks if t.name not in done], data, progress)
    return {t.name: done[t.name] if t.name in done else got[t.name] for t in tasks}


def __getattr__(name: str):
    # RayExecutor lives in its own module (it needs these helpers; Ray itself is imported only when it runs).
    if name == "RayExecutor":
        from .ray_executor import RayExecutor
        return RayExecutor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
