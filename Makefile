# dreambot: `make run` starts everything locally, `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-fast lint bench bench-venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first, so nothing pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[engine,discord,slack,dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/dreambot run

# One torch thread per process: the model tests run an engine beside the test process, and
# on 2 cores two threads each make them several times slower, not faster.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest

test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -m 'not model'

lint: $(STAMP)
	$(VENV)/bin/ruff check bot engine tests
	$(VENV)/bin/ruff format --check bot engine tests
	$(VENV)/bin/mypy

# The training benchmark runs diffusers' own DreamBooth script beside ours. That script needs
# torchvision, so both trainers run in a venv of their own, outside the repo, with the project's
# diffusers/transformers/accelerate/peft versions and the torch/torchvision pair that installs
# here. diffusers' examples come from a checkout at DIFFUSERS_TAG (never copied into this repo);
# without it bench/train.py prints how to get one and times ours alone.
BENCH_VENV ?= $(abspath ../bench-venv)
BENCH_STAMP := $(BENCH_VENV)/.installed
DIFFUSERS_TAG ?= v0.40.0
DIFFUSERS_EXAMPLES ?= $(abspath ../diffusers/examples)
# Extra flags for both benchmarks, e.g. BENCH_ARGS='--threads 1' on a machine shared with others.
BENCH_ARGS ?=

$(BENCH_STAMP): $(STAMP)
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(PY) -m pip freeze | grep -iE '^(diffusers|transformers|accelerate|peft|safetensors|pillow)==' \
		> $(BENCH_VENV)/constraints.txt
	$(BENCH_VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BENCH_VENV)/bin/pip install -q -c $(BENCH_VENV)/constraints.txt \
		diffusers transformers accelerate peft safetensors pillow
	touch $@

bench-venv: $(BENCH_STAMP)

bench: $(STAMP) $(BENCH_STAMP)
	$(PY) bench/train.py --venv $(BENCH_VENV) --diffusers-examples $(DIFFUSERS_EXAMPLES) \
		--diffusers-version-label $(DIFFUSERS_TAG) $(BENCH_ARGS)
	$(PY) bench/generate.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) data
