# dewey_lab: `make help` lists the targets. `make train` and `make test` set up .venv on first use.
.DEFAULT_GOAL := help
SHELL := /bin/bash

EXP ?= tiny
# a study (theta_ablation, ...) runs on the scale its first line names (`# scale: small`), else on the
# tiny CPU scale; SCALE= (empty) or SCALE=dewey overrides it
SCALE ?= $(if $(filter tiny small dewey,$(EXP)),,$(or $(shell sed -n '1s/^\# scale: *//p' experiments/$(EXP).yaml 2>/dev/null),tiny))
# a '# start: <experiment>' line in the scale's or the study's file trains that experiment first (skipped when
# finished): its run is the start the file's model.init_from names (train short, then long)
START ?= $(strip $(shell sed -n 's/^\# start: *//p' $(if $(SCALE),experiments/$(SCALE).yaml) experiments/$(EXP).yaml 2>/dev/null | head -1))
# VARIANT=k runs only variant k of a study's sweep (dewey-lab sweep --print lists them)
VARIANT ?=
# COMPARE_FLAGS=--reuse-eval reports a study's newest post-fit results instead of rerunning its eval (--skip-eval: none)
COMPARE_FLAGS ?=
# make test's pytest-xdist workers (2: this project's CI machine has 2 cores; 0 runs in one process)
TEST_WORKERS ?= 2
# BENCH='--sections train,st' passes options to benchmarks/suite.py
BENCH ?=
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU-only machines get the CPU build of torch 2.13.0; machines with nvidia-smi get the newest CUDA
# build pip allows. Override with e.g. `make setup TORCH='torch==2.14.1'`.
TORCH ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
EXTRAS ?= dev

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'
	@echo "  variables: EXP=$(EXP) (experiments/<EXP>.yaml)  SCALE=$(SCALE)  TORCH=$(TORCH)  EXTRAS=$(EXTRAS)"

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed ## create .venv and install the package (EXTRAS=dev,hub,flash for more)

train: setup ## train experiments/$(EXP).yaml, every variant of its sweep: (studies stack on SCALE=tiny)
	$(if $(START),$(MAKE) train EXP=$(START) SCALE= START= VARIANT=)
	$(VENV)/bin/dewey-lab sweep $(if $(SCALE),-c experiments/$(SCALE).yaml) -c experiments/$(EXP).yaml $(if $(VARIANT),--sweep_index $(VARIANT))

compare: setup ## results/$(EXP)/report.md and plots from the study's runs (runs/$(EXP)/), and its '# eval:' study
	$(PY) -m dewey_lab.runs.compare $(EXP) $(COMPARE_FLAGS)

eval: setup ## run an evaluation study: dewey-lab eval --config experiments/$(EXP).yaml (e.g. EXP=extension_ablation)
	$(VENV)/bin/dewey-lab eval --config experiments/$(EXP).yaml

test: setup ## run the test suite (CPU, offline; what CI runs), on TEST_WORKERS pytest-xdist workers
	$(PY) -m pytest -n $(TEST_WORKERS)

test-slow: setup ## the slow tests make test leaves out: 2-process kill-and-resume (DDP, FSDP2, FSDP1, a stream) and FSDP1 (CPU, gloo)
	$(PY) -m pytest -m slow

bench: setup ## benchmark suite -> results/bench.md: packed vs padded, vs sentence-transformers, fill, late chunking, long passages (~25 min CPU)
	$(PY) benchmarks/suite.py $(BENCH)

bench-gpu: ## GPU training throughput, MFU, peak memory (base/large, padded vs packed, compile) -> results/bench-gpu.md; needs no install beyond torch, transformers, lightning, torchmetrics (<8 min; tiny smoke run on a CPU)
	$(if $(wildcard $(PY)),$(PY),python3) benchmarks/bench_gpu.py $(BENCH)

tensorboard: setup ## TensorBoard over runs/ (every experiment side by side)
	$(VENV)/bin/tensorboard --logdir runs

lint: setup ## ruff over the package and tests
	$(VENV)/bin/ruff check dewey_lab tests benchmarks

clean: ## remove runs/ (keeps results/: committed evidence; data/: corpus and teacher cache)
	rm -rf runs lightning_logs

.PHONY: help setup train compare eval test test-slow bench bench-gpu tensorboard lint clean
