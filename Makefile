# Thin wrappers; each target is documented in README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo exp test test-fast ui lint install install-dev clean-results

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: a bare `torch` requirement would pull another multi-GB build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[dev,ray]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

## demo: install, export the embedded digits dataset, run the pipeline, print the COSE table
demo: install
	cose data fetch digits
	dvc repro
	@echo
	@cat results/cose_table.md
	@echo
	@echo "to share this run: git add -A && git commit (dvc.lock, results/*.json), then dvc push (README, Share results)"

## exp: experiments side by side: the params that differ and COSE per method (README); it needs
## only dvc: the venv's if there is one, else the one on PATH (no install to show a table)
exp:
	@command -v dvc >/dev/null || { echo "make exp needs dvc: run make install (or pip install dvc)" >&2; exit 1; }
	dvc exp show --only-changed --keep '^cose\.'

## test: install dev extras and run the whole test suite (the 25 slowest tests listed last)
test: install-dev
	$(BIN)/python -m pytest -q --durations=25

## test-fast: skip the slow pipeline/server tests
test-fast: install-dev
	$(BIN)/python -m pytest -q -m "not slow"

## ui: MLflow UI on the project store (mlruns/), http://127.0.0.1:5000
ui: install
	cose ui

## lint: ruff, actionlint, hadolint, compose schema
lint: install-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q tests/test_lint.py

clean-results:
	rm -rf outputs results checkpoints
