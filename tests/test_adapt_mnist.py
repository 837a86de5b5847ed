"""The test-time adaptation targets on real MNIST (benchmarks/adapt_mnist.py); slow, skipped without the data."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from bnkit.experiments.data import shared_mnist_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_adaptation_targets_on_corrupted_mnist():
    if not any(shared_mnist_dir().glob("t10k-images-idx3-ubyte*")):
        pytest.skip(f"MNIST IDX files not found in {shared_mnist_dir()}")
    spec = importlib.util.spec_from_file_location("adapt_mnist", ROOT / "benchmarks" / "adapt_mnist.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.measure(log=lambda *a: None)
    print(mod.table(res))
    assert res["clean"] > 95
    assert res["restored_exact"]  # clean logits after every restore() bit-identical to the original
    c = res["corruptions"]
    noise = c["gaussian_noise (sev. 5)"]
    assert noise["reestimate"] >= noise["source"] + 10
    assert noise["prior_n8_mean"] - noise["source"] >= 0.5 * (noise["reestimate"] - noise["source"])
    assert noise["prior_n8_min"] - noise["source"] >= 5
    assert noise["tent"] >= noise["reestimate"]
    assert c["contrast (sev. 4)"]["reestimate"] >= c["contrast (sev. 4)"]["source"] + 10
    # Known gaps, measured and documented (docs/adaptation.md), not targets met: at contrast severity 5
    # re-estimation gains ~8 points, and TENT stays slightly below re-estimation on contrast.
    assert c["contrast (sev. 5)"]["reestimate"] > c["contrast (sev. 5)"]["source"] + 5
    for name in ("contrast (sev. 5)", "contrast (sev. 4)"):
        assert c[name]["tent"] > c[name]["source"] + 5, name
