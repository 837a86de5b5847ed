"""What every experiment writes, checked once for the tests of each experiment family."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Tuple

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_and_check_artifacts(name: str, overrides: Dict, out: Path) -> Tuple[Dict, Dict]:
    """Run experiment ``name`` with ``overrides`` into ``out`` and check its artifacts: ``metrics.json`` with the
    returned runs and a PASS/FAIL (with its numbers) per check, the figure (a PNG) and ``report.html`` with
    every check. Returns the metrics ``run_experiment`` returned and ``metrics.json`` as read back."""
    from bnkit.experiments.registry import EXPERIMENTS, run_experiment

    m = run_experiment(name, overrides, out=out, quiet=True)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["experiment"] == name and set(saved["runs"]) == set(m["runs"])
    checks = saved["summary"]["checks"]
    assert checks and all(isinstance(c["pass"], bool) and len(c) > 1 for c in checks.values())
    assert (out / EXPERIMENTS[name].figure).read_bytes()[:8] == PNG_SIGNATURE
    page = (out / "report.html").read_text()
    assert "<h2>Checks</h2>" in page and all(k in page for k in checks)
    return m, saved


# What differs between two identical runs: wall-clock times and where/when they ran (train._result's "timing";
# the summaries' "ms_per_step*" and fig1's "time_per_step_ratio"; registry's "wall_seconds_this_call",
# "finished", "out_dir", "environment").
TIMING_KEYS = ("timing", "time_per_step_ratio", "wall_seconds_this_call", "finished", "out_dir", "environment")


def strip_timing(obj):
    """``obj`` (metrics, a run result) without the keys that differ between two identical runs."""
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if not k.startswith("ms_per_step") and k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj
