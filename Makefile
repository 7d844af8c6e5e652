# One-command setup: every target that runs code depends on the venv stamp, which (re)installs the
# project when pyproject.toml changes. Targets take RUN=<name> and ARGS="<hydra overrides>".
SHELL := /bin/bash
PY_BOOT ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
RUN ?=
ARGS ?=
RUN_ARG := $(if $(RUN),run_name=$(RUN),)
TRAIN := $(PY) -m common.train

.PHONY: install test test-full lint train-stage1 train-stage2 train-toy eval-hand data-hand demo-tracker \
        data-gesture cache-gesture train-vqvae train-fgd train-mambatalk infer-mambatalk render-gesture bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PY_BOOT) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-full: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

lint: $(STAMP)
	$(PY) -m ruff check common handpose gesture tests bench

train-toy: $(STAMP)
	$(TRAIN) experiment=toy $(RUN_ARG) $(ARGS)

bench: $(STAMP)
	$(PY) -m bench.run_all

clean:
	rm -rf outputs .pytest_cache
