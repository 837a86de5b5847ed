"""Figure 1 from Python instead of the CLI: the same experiment, then a look at the numbers.

    .venv/bin/python examples/fig1_api.py            # about 20 s: one seed, 1,500 steps
"""
from pathlib import Path

from bnkit.experiments.registry import run_experiment

metrics = run_experiment("fig1", {"seeds": [0], "steps": 1500})  # writes runs/fig1-<timestamp>/
s = metrics["summary"]
for v in ("baseline", "bn"):
    print(f"{v:>8}: final accuracy {s[v]['final_acc']:.3f}, steps to 90% {s[v]['steps_to']['0.90']}, "
          f"50th-percentile drift {s[v]['drift']['range']:.2f}")
print("open", Path(metrics["out_dir"]) / "report.html")
