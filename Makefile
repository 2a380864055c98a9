# LHV: the commands people run. See README.md.
PY ?= python3
STACK_ENV ?= .stack/env

.PHONY: setup test test-unit demo up down bench lint

setup:            ## install LHV and its test tools into the current Python
	$(PY) -m pip install -e '.[dev]'

test:             ## unit, property and integration tests (starts the local stack unless LHV_BOOTSTRAP_SERVERS is set)
	$(PY) -m pytest -q -p no:cacheprovider tests

test-unit:        ## only the tests that need no Kafka or S3
	$(PY) -m pytest -q -p no:cacheprovider tests/unit tests/property

demo:             ## the end-to-end demo on the local stack
	$(PY) -m worker.cli demo

up:               ## start the local stack (Kafka KRaft + SeaweedFS S3) and write $(STACK_ENV)
	$(PY) -m worker.cli stack up --env-file $(STACK_ENV)

down:             ## stop the local stack started by `make up`
	$(PY) -m worker.cli stack down --env-file $(STACK_ENV)

bench:            ## benchmarks against raw hnswlib in the same run
	$(PY) -m worker.cli bench

lint:
	ruff check . && ruff format --check . && mypy
