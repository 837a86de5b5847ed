"""A test experiment for tests/test_executors.py: Figure 1's runs, one of which raises once in the middle
of training (the first time only: it leaves a marker file), like a run that crashes in a worker."""
from __future__ import annotations

from pathlib import Path

from bnkit.experiments import fig1
from bnkit.experiments.train import RunExtension

DEFAULTS = {**fig1.DEFAULTS, "fail_run": "bn-s0", "fail_step": 7, "fail_marker": ""}
OPTIONS = fig1.OPTIONS
__doc__ = fig1.__doc__


class FailOnce(RunExtension):
    """Plain training that raises at ``step`` unless ``marker`` exists (and then creates it)."""

    def __init__(self, marker: str, step: int):
        self.marker, self.step = Path(marker), int(step)

    def after_step(self, model, step, x, y, opt):
        if step == self.step and not self.marker.exists():
            self.marker.write_text("failed once")
            raise RuntimeError(f"injected failure at step {step}")
        return None


def _fig1_cfg(cfg):
    return {k: v for k, v in cfg.items() if k in fig1.DEFAULTS}


def make_runs(cfg):
    runs = fig1.make_runs(_fig1_cfg(cfg))
    for r in runs:  # every run has the extension, so all runs' configs look alike
        r.extension = "_executor_helpers:FailOnce"
        step = cfg["fail_step"] if r.name == cfg["fail_run"] else -1  # -1: never
        r.extension_options = {"marker": cfg["fail_marker"], "step": step}
    return runs


def summarize(cfg, results):
    return fig1.summarize(_fig1_cfg(cfg), results)


def plot(cfg, results, summary, path):
    fig1.plot(_fig1_cfg(cfg), results, summary, path)
