# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv if missing
# (pinned by constraints.txt) and are idempotent: the install re-runs only when setup.cfg or
# constraints.txt change.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python
DEMO_WORKDIR ?= workdir/demo
PYTEST_WORKERS ?= 2
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.jax_cache
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: demo test install install-test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.stamp-base: setup.cfg pyproject.toml constraints.txt | $(PY)
	$(PIP) install -q -c constraints.txt -e .
	touch $@

$(VENV)/.stamp-test: setup.cfg pyproject.toml constraints.txt $(VENV)/.stamp-base
	$(PIP) install -q -c constraints.txt -e '.[test,torch]'
	touch $@

install: $(VENV)/.stamp-base
install-test: $(VENV)/.stamp-test

demo: $(VENV)/.stamp-base
	$(VENV)/bin/idgbr demo --workdir=$(DEMO_WORKDIR)

test: $(VENV)/.stamp-test
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --durations=12 tests

bench: $(VENV)/.stamp-test
	$(PY) bench/bench_metrics.py
	$(PY) bench/bench_stage2.py

clean:
	rm -rf $(VENV) .jax_cache workdir
