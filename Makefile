# dreambot: `make run` starts everything locally, `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first, so nothing pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[engine,discord,dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/dreambot run

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m 'not model'

lint: $(STAMP)
	$(VENV)/bin/ruff check bot engine tests
	$(VENV)/bin/ruff format --check bot engine tests
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) data
