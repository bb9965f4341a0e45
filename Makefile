# `make test` runs the whole suite (lint, types, tests); `make demo` trains the demo (Shampoo vs AdamW
# on scikit-learn's digits, logs and a plot in runs/demo). Both create or reuse .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
export OMP_NUM_THREADS ?= 1
export PYTHONHASHSEED ?= 0

.PHONY: test lint typecheck pytest demo clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev,cli]"
	touch $@

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check lightning_shampoo tests benchmarks
	$(VENV)/bin/ruff format --check lightning_shampoo tests benchmarks

typecheck: $(VENV)/.installed
	$(VENV)/bin/mypy

pytest: $(VENV)/.installed
	$(PY) -m pytest -q

test: lint typecheck pytest

demo: $(VENV)/.installed
	$(VENV)/bin/lightning-shampoo demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
