# The two commands of the README: `make demo` and `make test`; `make docs` builds the site.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.bnkit-installed
# Packages that depend on torch: a plain install would pull a multi-GB CUDA torch, so --no-deps
# (their other requirements are in the dev extra).
# torchao: PT2E quantization (tests/test_quantization_pt2e.py); its compiled kernels are built for a given
# torch, hence the pin.
TORCH_PACKAGES := timm==1.0.31 pytorch-lightning==2.6.6 torchmetrics==1.9.0 torchao==0.18.0

.PHONY: setup browser demo test test-cuda test-all build bench docs clean

# Progress: each step says what it does; pip shows its downloads (no -q), `bnkit build` a heartbeat.
$(STAMP): pyproject.toml Makefile
	@echo "==> [setup 1/4] creating the virtual environment $(VENV) (Python >= 3.10)"
	$(PYTHON) -m venv $(VENV)
	@echo "==> [setup 2/4] installing the pinned CPU torch ($(TORCH_PIN); a large download the first time)"
	@# The pinned CPU build first, so the range in pyproject.toml pulls nothing larger.
	$(PY) -m pip install --progress-bar on $(TORCH_PIN)
	@echo "==> [setup 3/4] installing bnkit (editable) with its experiments, dev, docs, ray and tensorboard extras"
	$(PY) -m pip install --progress-bar on -e '.[experiments,dev,docs,ray,tensorboard]'
	@echo "==> [setup 4/4] integrations tested against (they depend on torch: installed without their deps)"
	$(PY) -m pip install --progress-bar on --no-deps $(TORCH_PACKAGES)
	touch $(STAMP)

setup: $(STAMP)
	@echo "==> building the C++ kernels (minutes the first time, cached afterwards)"
	$(PY) -m bnkit.cli build

demo: setup
	@echo "==> bnkit demo: Figure 1 on the embedded MNIST digits (6 runs with a progress bar; exit 1 if a check fails)"
	$(PY) -m bnkit.cli demo

# The browser tests (tests/test_browser.py) drive Debian's chromium through chromium-driver; installed
# when missing (as root, or with sudo). Elsewhere the tests skip, except under CI, where they fail.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then \
	  echo "==> browser tests: using $$(command -v chromium) and $$(command -v chromedriver)"; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  echo "==> installing Debian's chromium and chromium-driver for the browser tests (apt-get; a large download the first time)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; \
	  else echo "==> not root and no sudo: cannot install chromium; the browser tests will skip (fail under CI)"; \
	  [ -z "$$CI" ] || exit 1; exit 0; fi; \
	  { $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; } || \
	  { echo "==> installing chromium failed: the browser tests will skip (fail under CI)"; [ -z "$$CI" ] || exit 1; }; \
	else \
	  echo "==> no chromium/chromedriver and no apt-get: the browser tests will skip (fail under CI)"; \
	  [ -z "$$CI" ] || exit 1; \
	fi

# Runs the whole fast suite; fails when a test fails or when no test ran.
test: setup browser
	@echo "==> ruff (lint)"
	$(PY) -m ruff check src tests benchmarks examples
	@echo "==> the fast test suite (pytest -m 'not slow'; minutes; one character per test, percent at line ends)"
	$(PY) -m pytest -q -m "not slow" --timeout=900

# The GPU tests (tests/test_cuda.py; skipped on a machine without CUDA).
test-cuda: setup
	$(PY) -m pytest -q -m cuda tests/test_cuda.py

test-all: setup browser
	$(PY) -m pytest -q --timeout=1800

bench: setup
	$(PY) benchmarks/kernels.py

# The user docs (docs/, mkdocs.yml) into site/; tests/test_docs.py runs the same build.
docs: setup
	$(PY) -m mkdocs build --strict -d site

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .pytest_cache .hypothesis
