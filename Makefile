# Quick start targets (see README). Each one sets up .venv idempotently, then runs.
VENV ?= .venv
PY := $(VENV)/bin/python
# On CPU machines this exact torch is on disk; other versions download several GB.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: venv demo test lint clean

venv:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)" numpy

demo: venv
	$(PY) -m pip install -q -e '.[mpi]'
	$(VENV)/bin/kvhandoff demo

test: venv
	$(PY) -m pip install -q -e '.[mpi,test,dev]'
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check sessions collectives cuda_ext engine tests benchmarks
	$(VENV)/bin/mypy sessions collectives cuda_ext engine

clean:
	rm -rf $(VENV) build *.egg-info
