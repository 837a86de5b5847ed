# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.bnkit-installed

.PHONY: setup demo test test-all build bench clean

# Progress: each step says what it does; pip shows its downloads (no -q), `bnkit build` a heartbeat.
$(STAMP): pyproject.toml
	@echo "==> [setup 1/3] creating the virtual environment $(VENV) (Python >= 3.10)"
	$(PYTHON) -m venv $(VENV)
	@echo "==> [setup 2/3] installing the pinned CPU torch ($(TORCH_PIN); a large download the first time)"
	@# The pinned CPU build first, so the range in pyproject.toml pulls nothing larger.
	$(PY) -m pip install --progress-bar on $(TORCH_PIN)
	@echo "==> [setup 3/3] installing bnkit (editable) with its experiments and dev extras"
	$(PY) -m pip install --progress-bar on -e '.[experiments,dev]'
	touch $(STAMP)

setup: $(STAMP)
	@echo "==> building the C++ kernels (minutes the first time, cached afterwards)"
	$(PY) -m bnkit.cli build

demo: setup
	@echo "==> bnkit demo: Figure 1 on the embedded MNIST digits (6 runs with a progress bar; exit 1 if a check fails)"
	$(PY) -m bnkit.cli demo

# Runs the whole fast suite; fails when a test fails or when no test ran.
test: setup
	@echo "==> the fast test suite (pytest -m 'not slow'; minutes; one character per test, percent at line ends)"
	$(PY) -m pytest -q -m "not slow" --timeout=900

test-all: setup
	$(PY) -m pytest -q --timeout=1800

bench: setup
	$(PY) benchmarks/kernels.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis
