# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv if missing
# (pinned by constraints.txt) and are idempotent: the install re-runs only when setup.cfg,
# setup.py or constraints.txt change. `make test-fast`: the edit loop (tests not marked slow).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python
DEMO_WORKDIR ?= workdir/demo
PYTEST_WORKERS ?= 2
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.jax_cache
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: demo test test-fast install install-test install-tpu install-cuda bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.stamp-base: setup.cfg setup.py pyproject.toml constraints.txt | $(PY)
	$(PIP) install -q -c constraints.txt -e .
	touch $@

# libtpu goes beside the venv's packages, not among them: `idgbr plan`'s TPU tests compile for
# TPU chips with it (through TPU_LIBRARY_PATH), and no other JAX process, the demo's included,
# tries to start a TPU with it.
LIBTPU_DIR := $(VENV)/libtpu-plan
$(VENV)/.stamp-test: setup.cfg setup.py pyproject.toml constraints.txt $(VENV)/.stamp-base
	$(PIP) install -q -c constraints.txt -e '.[test,torch]'
	$(PIP) install -q --no-deps -c constraints.txt --upgrade --target $(LIBTPU_DIR) libtpu
	touch $@

install: $(VENV)/.stamp-base
install-test: export TPU_LIBRARY_PATH ?= $(CURDIR)/$(LIBTPU_DIR)/libtpu/libtpu.so
test: $(VENV)/.stamp-test
# Accelerator hosts: the same pins plus jax's TPU / CUDA 12 build (see launch/ for pods).
install-tpu: $(VENV)/.stamp-base
	$(PIP) install -q -c constraints.txt -e '.[tpu]'
install-cuda: $(VENV)/.stamp-base
	$(PIP) install -q -c constraints.txt -e '.[cuda12]'

demo: $(VENV)/.stamp-base
	$(VENV)/bin/idgbr demo --workdir=$(DEMO_WORKDIR)

# Two runs: everything else in parallel, then the multi-process jobs alone (their processes must
# reach each collective within gloo's connect timeout, which a loaded 2-core box can exceed).
test: export TPU_LIBRARY_PATH ?= $(CURDIR)/$(LIBTPU_DIR)/libtpu/libtpu.so
test: $(VENV)/.stamp-test
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) -m "not multiprocess" --durations=12 tests
	$(PY) -m pytest -q -m multiprocess --durations=5 tests

# The edit loop: the suite without the tests marked `slow` (CI runs `make test`, all of them).
test-fast: export TPU_LIBRARY_PATH ?= $(CURDIR)/$(LIBTPU_DIR)/libtpu/libtpu.so
test-fast: $(VENV)/.stamp-test
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) -m "not slow" --durations=12 tests

bench: $(VENV)/.stamp-test
	$(PY) bench/bench_metrics.py
	$(PY) bench/bench_stage2.py

clean:
	rm -rf $(VENV) .jax_cache workdir
