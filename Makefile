# The two commands of the README: `make demo` and `make test`; `make docs` builds the site.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.bnkit-installed

.PHONY: setup demo test test-all build bench docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The pinned CPU build first, so the range in pyproject.toml pulls nothing larger.
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[experiments,dev,docs]'
	touch $(STAMP)

setup: $(STAMP)
	$(PY) -m bnkit.cli build

demo: setup
	$(PY) -m bnkit.cli demo

# Runs the whole fast suite; fails when a test fails or when no test ran.
test: setup
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m pytest -q -m "not slow" --timeout=900

test-all: setup
	$(PY) -m pytest -q --timeout=1800

bench: setup
	$(PY) benchmarks/kernels.py

# The user docs (docs/, mkdocs.yml) into site/; tests/test_docs.py runs the same build.
docs: setup
	$(PY) -m mkdocs build --strict -d site

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .pytest_cache .hypothesis
