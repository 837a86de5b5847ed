"""Shared fixtures: the kernel backends every parity test runs against."""

from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch
from hypothesis import settings


from bnkit import kernels

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# CI replays the same examples every run (a red CI is then always reproducible);
# local runs explore new random examples each time.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

ALL_BACKENDS = ("torch", "reference", "cpp")


def _backend_params():
    forced = os.environ.get("BNKIT_BACKEND")
    names = (forced,) if forced in ALL_BACKENDS else ALL_BACKENDS
    return [pytest.param(n, id=n) for n in names]


@pytest.fixture(params=_backend_params())
def backend(request):
    """Run the test once per backend; ``cpp`` is skipped when the extension is unavailable."""
    name = request.param
    if name == "cpp" and not kernels.cpp_available():
        pytest.skip("the C++ extension is not available on this machine")
    with kernels.use_backend(name):
        yield name


@pytest.fixture(params=[pytest.param(n, id=n) for n in ("cpp", "torch")])
def model_backend(request):
    """The two backends a model runs on (not the NumPy reference): the test once per backend, ``cpp`` skipped
    when the extension is unavailable."""
    if request.param == "cpp" and not kernels.cpp_available():
        pytest.skip("the C++ extension is not available on this machine")
    with kernels.use_backend(request.param):
        yield request.param


@pytest.fixture
def accelerate_off():
    """The test starts and ends with ``bnkit.accelerate()`` off and its counts reset (it is process-wide)."""
    import bnkit

    bnkit.accelerate(False)
    bnkit.accelerate_counts(reset=True)
    yield
    bnkit.accelerate(False)


@pytest.fixture
def quiet_lightning():
    """Lightning's logs at ERROR and its warnings ignored for one test, restored afterwards."""
    names = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    for n, lvl in levels.items():
        logging.getLogger(n).setLevel(lvl)
