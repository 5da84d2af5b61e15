# `make demo` and `make test` set everything up on a fresh machine: .venv in the repo root,
# installed once and again only when pyproject.toml or this Makefile change.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel this machine has on disk; on a GPU box: make TORCH=torch ...
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo methods test test-unit test-e2e bench bench-scale bench-screen bench-resume bench-topk bench-sweep bench-storage bench-lossmem bench-vocab bench-views bench-deit gpu-check cluster-up cluster-down clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" -e '.[dev,demo]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m jobs.demo

methods: $(STAMP)
	$(BIN)/python -m jobs.methods

test: $(STAMP)
	$(BIN)/python -m pytest

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

test-e2e: $(STAMP)
	$(BIN)/python -m pytest -m e2e

cluster-up: $(STAMP)
	PY=$(BIN)/python deploy/local/up.sh

cluster-down:
	deploy/local/down.sh

bench: $(STAMP)
	$(BIN)/python -m jobs.benchmarks.stages $(ARGS); s=$$?; $(BIN)/python -m jobs.benchmarks.scale; exit $$(( s || $$? ))

bench-scale: $(STAMP)
	$(BIN)/python -m jobs.benchmarks.scale $(ARGS)

bench-screen: $(STAMP)
	$(BIN)/python -m jobs.benchmarks.screen $(ARGS)

bench-resume: $(STAMP)
	$(BIN)/python -m jobs.benchmarks.resume

bench-topk: $(STAMP)
	$(BIN)/python -m jobs.benchmarks.topk $(ARGS)

bench-sweep: $(STAMP)
	$(BIN)/python -m jobs.benchmarks.sweep $(ARGS)

bench-storage: $(STAMP)
	$(BIN)/python -m jobs.benchmarks.storage

bench-lossmem: $(STAMP)
	$(BIN)/python -m jobs.benchmarks.lossmem $(ARGS)

bench-vocab: $(STAMP)
	$(BIN)/python -m jobs.benchmarks.vocab $(ARGS)

bench-views: $(STAMP)
	$(BIN)/python -m jobs.benchmarks.views $(ARGS)

bench-deit: $(STAMP)
	$(BIN)/python -m jobs.benchmarks.deit $(ARGS)

# On a GPU machine: its own python3 with torch, no .venv; WHEELS= a folder the other packages were
# installed into (deploy/gpu/wheels.sh fetches them here).
gpu-check:
	PYTHONPATH=$(CURDIR)$${WHEELS:+:$$WHEELS} $(PYTHON) -m jobs.benchmarks.gpu $(ARGS)

clean:
	rm -rf runs .pytest_cache
