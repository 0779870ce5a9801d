# Quick start targets (see README). Each one sets up .venv once, reinstalls the project only
# when pyproject.toml changed (stamp files in .venv), then runs.
VENV ?= .venv
PY := $(VENV)/bin/python
# On CPU machines this exact torch is on disk; other versions download several GB.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
STAMP := $(VENV)/.kvhandoff

.PHONY: venv demo demo-model demo-model-mpi test lint gpu-check clean

$(STAMP)-venv:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)" numpy
	touch $@

venv: $(STAMP)-venv

$(STAMP)-demo: pyproject.toml $(STAMP)-venv
	$(PY) -m pip install -q -e '.[mpi]'
	touch $@

$(STAMP)-test: pyproject.toml $(STAMP)-venv
	$(PY) -m pip install -q "$(TORCH_SPEC)" -e '.[mpi,test,dev,hf,nixl]'
	touch $@ $(STAMP)-demo $(STAMP)-demo-model

demo: $(STAMP)-demo
	$(VENV)/bin/kvhandoff demo

# The real-model demo: a small random-initialised Llama (the hf extra: transformers).
$(STAMP)-demo-model: pyproject.toml $(STAMP)-venv
	$(PY) -m pip install -q -e '.[mpi,hf]'
	touch $@

demo-model: $(STAMP)-demo-model
	$(VENV)/bin/kvhandoff demo --model

demo-model-mpi: $(STAMP)-demo-model
	PATH="$(abspath $(VENV))/bin:$$PATH" mpiexec -n 4 $(VENV)/bin/kvhandoff demo --model --backend mpi

test: $(STAMP)-test
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)-test
	$(VENV)/bin/ruff check sessions collectives cuda_ext engine kvcache analysis demo scenarios cli tests benchmarks
	$(VENV)/bin/mypy sessions collectives cuda_ext engine kvcache analysis demo scenarios cli

# The GPU checks in one run, each step with its own time limit (under 8 minutes on one GPU);
# writes gpu-check.md (and gpu-check.md.log). On a machine without a GPU it says so, exits 0.
# Offline, with kvhandoff installed into an interpreter that has the machine's CUDA torch:
# `make gpu-check GPU_CHECK_DEPS= PY=python3` (no set-up, no download).
GPU_CHECK_DEPS ?= $(STAMP)-test
gpu-check: $(GPU_CHECK_DEPS)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) tests/gpu/gpu_check.py --out gpu-check.md

clean:
	rm -rf $(VENV) build *.egg-info
