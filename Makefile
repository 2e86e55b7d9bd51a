# dreambot: `make run` starts everything locally, `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-fast lint bench bench-venv gpu-wheels clean

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
	$(VENV)/bin/ruff check bot engine tests bench
	$(VENV)/bin/ruff format --check bot engine tests bench
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

# For a lent GPU machine without a package index (bench/gpu.sh): the project's diffusers,
# transformers, peft and regex as Python 3.12 wheels, bitsandbytes unpacked with only its
# CUDA 13.0 and CPU libraries, and diffusers' DreamBooth LoRA script, all under .whl/
# (ignored by git: `echo /.whl/ >> .git/info/exclude`), to carry with the run.
WHEEL_PLATFORMS := --python-version 3.12 --implementation cp --only-binary=:all: \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64

gpu-wheels: $(STAMP)
	mkdir -p .whl/examples/dreambooth
	$(PY) -m pip freeze | grep -iE '^(diffusers|transformers|peft|regex)==' > .whl/wanted.txt
	$(PY) -m pip download -q --no-deps $(WHEEL_PLATFORMS) -d .whl -r .whl/wanted.txt
	$(PY) -m pip download -q --no-deps $(WHEEL_PLATFORMS) -d .whl/bnb-wheel bitsandbytes
	unzip -q -o .whl/bnb-wheel/*.whl -d .whl/bnb -x 'bitsandbytes/libbitsandbytes_cuda1[12]*' \
		'bitsandbytes/libbitsandbytes_cuda132*' 'bitsandbytes/libbitsandbytes_rocm*' \
		'bitsandbytes/libbitsandbytes_xpu*'
	rm -rf .whl/bnb-wheel .whl/wanted.txt
	cp $(DIFFUSERS_EXAMPLES)/dreambooth/train_dreambooth_lora.py .whl/examples/dreambooth/
	du -sh .whl

clean:
	rm -rf $(VENV) data
