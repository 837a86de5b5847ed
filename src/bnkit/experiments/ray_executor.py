"""The Ray executor of ``bnkit run --executor ray``: each run is a Ray task (see :mod:`.executors` for what
every executor guarantees, and for how a task finds or ships back the experiment directory)."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Dict, Optional, Sequence

from .executors import Outcome, RunTask, _apply, _Collector, _QueueProgress, _write_private, execute

__all__ = ["RayExecutor"]


def _ray_task(task: RunTask, data, qactor) -> Outcome:
    """A Ray task: train in the experiment directory when this node sees it, else privately."""
    out = Path(task.out_dir)
    try:
        shared = (out / "config.json").read_text() == task.config_text
    except OSError:
        shared = False
    if not shared:
        task = dataclasses.replace(task, private=True)
    put = (lambda msg: qactor.put_nowait.remote(msg)) if qactor is not None else (lambda msg: None)
    return execute(task, data, _QueueProgress(put))


def _check_reachable(address: Optional[str], timeout: float = 10.0) -> None:
    """A HOST:PORT address must accept a connection (``ray.init`` would retry for minutes otherwise);
    ``auto``, ``ray://`` and ``local`` addresses are left to Ray."""
    if not address or address in ("auto", "local") or "://" in address or ":" not in address:
        return
    import socket
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise ValueError(f"--executor ray: no Ray cluster answers at {address} ({e.strerror or e})") from None


class RayExecutor:
    """The runs as Ray tasks (``ray.init(address=address)``; a local Ray instance when ``address`` is
    None and ``RAY_ADDRESS`` is unset); at most ``jobs`` at a time (None: as many as the cluster
    schedules), each task reserving ``threads`` CPUs. A Ray session this process already started is
    reused and left running; one started here is shut down at the end."""

    def __init__(self, address: Optional[str] = None, jobs: Optional[int] = None, private: bool = False):
        self.address, self.jobs, self.private = address, jobs, private  # private: never use the driver's directory
        self._started = False

    def prepare(self) -> None:
        """Join (or start) Ray, before the experiment directory is made; ``ValueError`` when that fails."""
        import ray
        _check_reachable(self.address)
        if ray.is_initialized():  # a session of the caller's: used as it is
            return
        local = self.address is None and not os.environ.get("RAY_ADDRESS")
        try:  # a local instance without the dashboard (faster start); a cluster keeps its own settings
            ray.init(address=self.address, logging_level="WARNING", **({"include_dashboard": False} if local else {}))
        except Exception as e:  # noqa: BLE001 - ConnectionError, ValueError, RuntimeError, ... from ray.init
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            where = f"the Ray cluster at {self.address}" if self.address else "Ray"
            raise ValueError(f"--executor ray: cannot start or join {where} ({type(e).__name__}: {first})") from None
        self._started = True

    def run(self, tasks: Sequence[RunTask], data, progress, stop_after: Optional[int] = None) -> Dict[str, Dict]:
        import ray
        from ray.util.queue import Queue

        coll = _Collector(tasks)
        if not tasks:
            if self._started:
                ray.shutdown()
                self._started = False
            return {}
        self.prepare()
        started, self._started = self._started, False
        cancelled = False
        q = None
        try:
            q = Queue()
            data_ref = ray.put(data)
            remote = ray.remote(_ray_task)
            todo = list(tasks)
            running = {}
            limit = self.jobs or len(tasks)
            try:
                while todo or running:
                    while todo and len(running) < limit and coll.failed is None:
                        t = todo.pop(0)
                        if self.private:
                            t = dataclasses.replace(t, private=True)
                        ref = remote.options(num_cpus=max(1, int(t.threads or 1)), max_retries=0).remote(
                            t, data_ref, q.actor)
                        running[ref] = t
                    if coll.failed is not None:
                        todo.clear()
                    if not running:
                        break
                    ready, _ = ray.wait(list(running), num_returns=1, timeout=0.2)
                    self._drain(q, progress)
                    for ref in ready:
                        t = running.pop(ref)
                        oc = self._get(ray, ref, t)
                        if oc.files or oc.tb_files:
                            _write_private(oc, Path(t.out_dir), t.tensorboard)
                        if coll.add(oc):
                            for r in running:
                                ray.cancel(r)
            except KeyboardInterrupt:
                cancelled = True
                for r in running:
                    ray.cancel(r)
                for ref, t in running.items():
                    coll.add(self._get(ray, ref, t))
            self._drain(q, progress)
        finally:
            if q is not None:
                q.shutdown()
            if started:
                ray.shutdown()
        return coll.finish(cancelled)

    @staticmethod
    def _get(ray, ref, task: RunTask) -> Outcome:
        try:
            return ray.get(ref)
        except ray.exceptions.TaskCancelledError:
            return Outcome(task.name, interrupted=(f"cancelled: run {task.name}", 0))
        except ray.exceptions.RayError as e:
            return Outcome(task.name, error_text=f"{type(e).__name__}: {str(e).strip().splitlines()[0]}")

    @staticmethod
    def _drain(q, progress) -> None:
        try:
            n = q.qsize()
            msgs = q.get_nowait_batch(n) if n else []
        except Exception:  # noqa: BLE001 - a progress bar never stops training
            return
        for m in msgs:
            try:
                _apply(progress, m)
            except Exception:  # noqa: BLE001
                pass
