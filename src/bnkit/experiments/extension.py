"""Run extensions: what an experiment changes in one training run, as one hook object per run.

The training loop (:func:`bnkit.experiments.train.train_run`) calls the hooks of the run's extension at
fixed points: once on the fresh model (:meth:`RunExtension.prepare`, :meth:`RunExtension.parameters`),
at each step (:meth:`RunExtension.batch_indices`, :meth:`RunExtension.train_step`,
:meth:`RunExtension.after_step`) and at each evaluation (:meth:`RunExtension.on_eval`). The research
experiments (non-i.i.d. batches, PreciseBN, noisy BN, BN-only training, ...) are extensions of the one
loop, so every run keeps the loop's determinism, checkpoints and resume.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # the loop imports this module; these are only annotations
    from .data import Dataset
    from .train import RunConfig

__all__ = ["RunExtension", "make_extension"]


class RunExtension:
    """What an experiment changes in :func:`train_run`, one method per point of the loop; the defaults are
    plain training. A run names its extension in ``RunConfig.extension`` (``"module:Class"``), so a run
    stays a plain, picklable config (the parallel executors send configs, not objects).

    Resume: ``state_dict``/``load_state_dict`` hold whatever the extension keeps between steps (it is saved
    in every checkpoint); the measurements it returns are saved by the loop.
    """

    def prepare(self, model: torch.nn.Module, cfg: "RunConfig", data: "Dataset") -> torch.nn.Module:
        """The model to train (called once on the freshly initialised model, before the optimizer)."""
        return model

    def parameters(self, model: torch.nn.Module):
        """The parameters the optimizer updates."""
        return model.parameters()

    def batch_indices(self, step: int, default: torch.Tensor, y_train: torch.Tensor) -> torch.Tensor:
        """The training examples of this step (default: the seeded i.i.d. order of :class:`_Batches`)."""
        return default

    def train_step(self, model, x, y, opt) -> torch.Tensor:
        """One optimizer step on the batch; returns the (detached or not) training loss."""
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    def after_step(self, model, step: int, x, y, opt) -> Optional[Dict[str, float]]:
        """Measurements after training step ``step`` (1-based); recorded with the step in ``step_records``."""
        return None

    def on_eval(self, model, step: int, data: "Dataset") -> Dict[str, float]:
        """Extra scalars at every evaluation; each key becomes a series in the run's ``extra``."""
        return {}

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


def make_extension(cfg: "RunConfig") -> "RunExtension":
    """The run's extension (a plain :class:`RunExtension` when ``cfg.extension`` is empty)."""
    if not cfg.extension:
        return RunExtension()
    import importlib
    mod_name, _, cls_name = cfg.extension.partition(":")
    try:
        cls = getattr(importlib.import_module(mod_name), cls_name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"run {cfg.name}: unknown extension {cfg.extension!r} ({e})") from None
    return cls(**dict(cfg.extension_options or {}))
