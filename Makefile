# LHV: the commands people run. See README.md.
#
# Every target runs in a virtual environment: the active one ($VIRTUAL_ENV), else the
# project's .venv, created with $(PY) on first use (a system Python refuses pip installs:
# PEP 668). LHV and its test tools are installed into it once, and again only when
# pyproject.toml changes (the stamp file), so a second `make test` starts at once.
PY ?= python3
STACK_ENV ?= .stack/env
VENV ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.lhv-installed

.PHONY: setup test test-unit demo up down bench bench-large bench-shards bench-replicas bench-standby lint

setup: $(STAMP)   ## create .venv (unless one is active) and install LHV with its test tools

$(STAMP): pyproject.toml
	@if ! "$(PYTHON)" -m pip --version > /dev/null 2>&1; then \
	  if [ -n "$(VIRTUAL_ENV)" ]; then \
	    echo "the active virtual environment $(VIRTUAL_ENV) has no pip: deactivate it, or run python -m ensurepip in it" >&2; exit 1; \
	  fi; \
	  "$(PY)" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2> /dev/null || { \
	    echo "LHV needs Python 3.11 or later; $(PY) is $$("$(PY)" --version 2>&1): run with PY=python3.11 (or later)" >&2; exit 1; }; \
	  rm -rf "$(VENV)"; \
	  echo "creating $(VENV) with $$("$(PY)" --version 2>&1)"; \
	  "$(PY)" -m venv "$(VENV)" || { rm -rf "$(VENV)"; \
	    echo "$(PY) cannot create a virtual environment: on Debian or Ubuntu, sudo apt-get install python3-venv" >&2; exit 1; }; \
	fi
	@echo "installing LHV and its test tools into $(VENV) (hnswlib and annoy compile: g++ and python3-dev)"
	"$(PYTHON)" -m pip install --disable-pip-version-check -q -e '.[dev]'
	@touch "$@"

test: $(STAMP)    ## unit, property and integration tests (starts the local stack unless LHV_BOOTSTRAP_SERVERS is set)
	"$(PYTHON)" -m pytest -q -p no:cacheprovider tests

test-unit: $(STAMP)   ## only the tests that need no Kafka or S3
	"$(PYTHON)" -m pytest -q -p no:cacheprovider tests/unit tests/property

demo: $(STAMP)    ## the end-to-end demo on the local stack
	"$(PYTHON)" -m worker.cli demo

up: $(STAMP)      ## start the local stack (Kafka KRaft + SeaweedFS S3) and write $(STACK_ENV)
	"$(PYTHON)" -m worker.cli stack up --env-file $(STACK_ENV)

down: $(STAMP)    ## stop the local stack started by `make up`
	"$(PYTHON)" -m worker.cli stack down --env-file $(STACK_ENV)

bench: $(STAMP)   ## benchmarks against raw hnswlib in the same run
	"$(PYTHON)" -m worker.cli bench

bench-shards: $(STAMP)   ## a sharded index (S=2, 2 worker processes) against S=1 and raw hnswlib (BENCH_ARGS="--quick")
	"$(PYTHON)" bench/bench_shards.py $(BENCH_ARGS)

bench-replicas: $(STAMP)   ## one index with 0, 1, 2 read replicas against raw hnswlib (BENCH_ARGS="--quick")
	"$(PYTHON)" bench/replicas.py $(BENCH_ARGS)

bench-large: $(STAMP)   ## one large index (1M x 128) on one worker: checkpoints, kill -9, memory, churn
	"$(PYTHON)" bench/bench_large.py

bench-standby: $(STAMP)   ## kill -9 of an owner to the first answer, with and without a warm standby (BENCH_ARGS="--quick", or "--n 1000000")
	"$(PYTHON)" bench/standby.py $(BENCH_ARGS)

lint: $(STAMP)
	"$(VENV)/bin/ruff" check . && "$(VENV)/bin/ruff" format --check . && "$(VENV)/bin/mypy"
