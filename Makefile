# `make test` runs the whole suite (lint, types, tests); both targets create or reuse .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
export OMP_NUM_THREADS ?= 1
export PYTHONHASHSEED ?= 0

.PHONY: test lint typecheck pytest clean

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

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
