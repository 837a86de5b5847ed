"""TensorBoard event files of a run (``bnkit run NAME --tensorboard DIR``): a monitor that
:func:`.train.train_run` calls at its start, at every evaluation and at its end.

Tags (``step`` is the training step of the evaluation):

* ``test/acc``, ``test/loss``, ``train/loss`` (mean training loss since the previous evaluation; absent
  at step 0), ``train/acc`` and ``train/eval_loss`` (runs with ``train_eval_size``);
* ``probe/p50_units_median``, ``probe/p15_85_spread_mean``: the probed layer over all its units;
* ``percentiles/p15``, ``percentiles/p50``, ``percentiles/p85``: the typical unit's series (the unit is
  chosen when the run ends, so these are written then, for every evaluation step);
* ``bn/<layer>/mean_abs_running_mean``, ``bn/<layer>/mean_running_var`` for every layer with running
  statistics, and their histograms ``bn/<layer>/running_mean``, ``bn/<layer>/running_var``;
* ``extra/<key>``: what the run's :class:`.train.RunExtension` measures at evaluations, and
  ``step/<key>`` what it records after training steps.

The values equal those of ``runs/<run>.json`` (as float32, TensorBoard's scalar type). A resumed run
opens its writer with ``purge_step`` one past its checkpoint, so TensorBoard drops the events that the
interrupted attempt wrote after that checkpoint and each step appears once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch

__all__ = ["TensorBoardMonitor", "tensorboard_available", "bn_statistics"]


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` can write event files (it needs the ``tensorboard`` package)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


def bn_statistics(model: torch.nn.Module) -> Dict[str, Dict[str, torch.Tensor]]:
    """``{layer name: {"running_mean": ..., "running_var": ...}}`` of every module holding running
    statistics (torch's and bnkit's BN layers and their variants)."""
    out = {}
    for name, m in model.named_modules():
        rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
        if isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor):
            out[name or "model"] = {"running_mean": rm.detach().float(), "running_var": rv.detach().float()}
    return out


class TensorBoardMonitor:
    """Writes one run's scalars to ``log_dir`` (created on :meth:`start`) with
    ``torch.utils.tensorboard.SummaryWriter``.

    Args:
        log_dir: the run's event directory (``DIR/<experiment>/<run>``).
        histograms: also write histograms of the running statistics at every evaluation.
    """

    def __init__(self, log_dir, histograms: bool = True):
        self.log_dir = Path(log_dir)
        self.histograms = histograms
        self._w = None

    def start(self, cfg, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._w = SummaryWriter(str(self.log_dir), purge_step=step + 1 if step > 0 else None)

    def _scalar(self, tag: str, v, step: int) -> None:
        if v is not None:
            self._w.add_scalar(tag, float(v), step)

    def on_eval(self, step: int, model: torch.nn.Module, record: Dict) -> None:
        """``record``: the evaluation's ``metrics.jsonl`` line (``test_acc``, ``train_loss``, extras)."""
        fixed = {"run", "variant", "seed", "step"}
        tags = {"test_acc": "test/acc", "test_loss": "test/loss", "train_loss": "train/loss",
                "train_acc": "train/acc", "train_eval_loss": "train/eval_loss",
                "p50_units_median": "probe/p50_units_median", "p15_85_spread_mean": "probe/p15_85_spread_mean"}
        for k, v in record.items():
            if k not in fixed:
                self._scalar(tags.get(k, f"extra/{k}"), v, step)
        for name, s in bn_statistics(model).items():
            self._scalar(f"bn/{name}/mean_abs_running_mean", s["running_mean"].abs().mean(), step)
            self._scalar(f"bn/{name}/mean_running_var", s["running_var"].mean(), step)
            if self.histograms and bool(torch.isfinite(s["running_mean"]).all() & torch.isfinite(s["running_var"]).all()):
                self._w.add_histogram(f"bn/{name}/running_mean", s["running_mean"], step)
                self._w.add_histogram(f"bn/{name}/running_var", s["running_var"], step)

    def finish(self, result: Dict) -> None:
        """The series known only at the end: the typical unit's percentiles and the per-step records."""
        for q, series in result["percentiles"].items():
            for step, v in zip(result["steps"], series):
                self._scalar(f"percentiles/{q}", v, step)
        for rec in result.get("step_records", []):
            for k, v in rec.items():
                if k != "step":
                    self._scalar(f"step/{k}", v, rec["step"])
        self._w.flush()

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None


def run_log_dir(root, experiment: str, run: str) -> Optional[Path]:
    """``root/<experiment>/<run>`` (None when ``root`` is None)."""
    return None if root is None else Path(root) / experiment / run
