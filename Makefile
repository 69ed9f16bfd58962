# gan-pipeline: `make train` and `make test` work on a fresh machine (they create .venv first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ACCELERATE := $(VENV)/bin/accelerate
CONFIG ?= configs/mnist5k.yaml
ARGS ?=
NGPU := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)

.PHONY: venv train train-multi test test-fast check-gpu lint style bench bench-scaling ablation clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

## One process (CPU, or one GPU when present).
train: venv
	$(PY) pipeline/train.py --config $(CONFIG) $(ARGS)

## Every GPU of this host; on a CPU-only host, 2 processes over gloo.
train-multi: venv
ifneq ($(NGPU),0)
	$(ACCELERATE) launch --config_file launch/gpus_1host.yaml --num_processes $(NGPU) \
		pipeline/train.py --config $(CONFIG) output_dir=runs/mnist5k-multi $(ARGS)
else
	ACCELERATE_USE_CPU=1 $(ACCELERATE) launch --config_file launch/cpu_2proc.yaml --num_processes 2 \
		pipeline/train.py --config $(CONFIG) output_dir=runs/mnist5k-multi $(ARGS)
endif

test: venv
	$(PY) -m pytest -q

## What only a GPU can check (SyncBatchNorm, bf16, fp16, compile, exact resume); one table.
## Without CUDA: one line saying it skipped, status 0.
check-gpu: venv
	$(PY) tests/gpu/check_gpu.py

lint: venv
	$(VENV)/bin/ruff check pipeline tests bench
	$(VENV)/bin/ruff format --check pipeline tests bench

style: venv
	$(VENV)/bin/ruff check --fix pipeline tests bench
	$(VENV)/bin/ruff format pipeline tests bench

bench: venv
	$(PY) bench/bench.py

bench-scaling: venv
	$(PY) bench/bench.py --only scaling

clean:
	rm -rf runs bench.json .pytest_cache

## The reference design's claims measured over 3 seeds; writes docs/ablation.md (hours on 2 cores).
ablation: venv
	$(PY) bench/ablation.py $(ARGS)
