"""The test-time adaptation targets on real MNIST (benchmarks/adapt_mnist.py); slow, skipped without the data.

One model (the benchmark's: seed 0, 3 epochs, standardized inputs) is trained once for the module, then
evaluated at severity 5 on both corruptions (prior with n = 8 only, 3 draws, to stay within a few
minutes); docs/adaptation.md has the full table. TENT runs as in the paper and with EATA's, SAR's and DeYO's
remedies (the benchmark's TENT_VARIANTS).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from bnkit.experiments.data import shared_mnist_dir

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _benchmark():
    spec = importlib.util.spec_from_file_location("adapt_mnist", ROOT / "benchmarks" / "adapt_mnist.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def res():
    if not any(shared_mnist_dir().glob("t10k-images-idx3-ubyte*")):
        pytest.skip(f"MNIST IDX files not found in {shared_mnist_dir()}")
    mod = _benchmark()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the benchmark's main(): the same numbers
    try:
        out = mod.measure(severities=(5,), prior_n=(8,), draws=3, log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    print(mod.table(out))
    return out


def test_clean_accuracy_and_exact_restore(res):
    assert res["clean"] > 95
    assert res["restored_exact"]  # clean logits after every restore() bit-identical to the original


def test_gaussian_noise_targets(res):
    r = res["corruptions"]["gaussian_noise 5"]
    gain = r["reestimate"] - r["source"]
    assert gain >= 10
    assert r["prior_n8_mean"] - r["source"] >= 0.5 * gain  # n = 8 digits, prior strength 8
    assert r["prior_n8_min"] - r["source"] >= 5  # and no draw of 8 is useless
    assert r["online"] >= r["source"] + 10
    assert r["tent"] >= r["reestimate"]
    assert r["tent_eata"] >= r["reestimate"]  # EATA's, SAR's and DeYO's remedies keep TENT's gain on noise
    assert r["tent_sar"] >= r["reestimate"]
    assert r["tent_deyo"] >= r["reestimate"]


def test_contrast_reestimate_target(res):
    r = res["corruptions"]["contrast 5"]
    assert r["reestimate"] >= r["source"] + 10
    assert r["online"] >= r["source"] + 5
    # The prior is reported, not a target: mixing source variances back in cannot undo a ~400x shrinkage.
    assert r["prior_n8_mean"] > r["source"]
    assert r["tent"] > r["source"] + 5
    # The filters shrink TENT's loss against re-estimation (at seed 0; docs/adaptation.md has every seed)
    assert r["tent"] < r["tent_eata"] < r["reestimate"]
    assert r["tent"] < r["tent_deyo"]


@pytest.mark.xfail(strict=True, reason="measured gap (docs/adaptation.md): on contrast severity 5 the "
                                       "re-estimated model's confidence does not tell right from wrong (its "
                                       "most confident digits are no more often right than the rest), so "
                                       "entropy minimization, filtered (EATA, SAR, DeYO) or not, ends "
                                       "below re-estimation")
def test_contrast_tent_at_least_reestimate(res):
    r = res["corruptions"]["contrast 5"]
    assert max(r["tent"], r["tent_eata"], r["tent_sar"], r["tent_deyo"]) >= r["reestimate"]
