# Every target sets up .venv first if needed (idempotent: a second run installs nothing).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The small CPU build of torch where it can be had (a file on this project's machines); set
# TORCH_SPEC / TORCH_PIP_ARGS to bring your own build, e.g. a CUDA one.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=

.PHONY: help setup train test lint format tensorboard aggregate bench gpu-wheels slurm-up slurm-down clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)" \
		|| $(PY) -m pip install $(TORCH_PIP_ARGS) torch
	$(PY) -m pip install -e ".[dev,joblib,slurm,optuna,compare]"
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install the project (once)

train: $(STAMP)  ## run the default experiment: trained net vs random features, d=32
	$(PY) train.py -m model=trainable,frozen resume=false
	@echo "Curves and hparams: make tensorboard (or: $(VENV)/bin/tensorboard --logdir outputs)"

test: $(STAMP)  ## lint, then the whole test suite (slow end-to-end tests included)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

lint: $(STAMP)  ## ruff check and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)  ## ruff format and autofix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

aggregate: $(STAMP)  ## table, summary and plots of a sweep: make aggregate [SWEEP=dir] (default newest)
	$(PY) scripts/aggregate.py $(SWEEP)

bench: $(STAMP)  ## speed figures as in-process ratios; writes bench.json (about 2 minutes here)
	$(PY) scripts/bench.py

gpu-wheels: $(STAMP)  ## wheels of what GPU images lack (Hydra, OmegaConf) into .whl/, for scripts/gpu_check.sh
	rm -rf .whl && mkdir .whl
	$(PY) -m pip freeze | grep -iE '^(hydra-core|omegaconf|antlr4-python3-runtime)==' \
		| xargs $(PY) -m pip wheel --no-deps -q -w .whl

tensorboard: $(STAMP)  ## open TensorBoard on every run under outputs/
	$(VENV)/bin/tensorboard --logdir outputs

slurm-up:  ## a one-node Slurm cluster on this machine, for tests and trials (root; docs/cluster.md)
	bash scripts/slurm_local.sh start

slurm-down:  ## stop the cluster of make slurm-up (its jobs first)
	bash scripts/slurm_local.sh stop

clean:  ## remove the virtual environment and caches (outputs/ is kept)
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
