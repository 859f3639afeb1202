# routet2i — one-command set-up. `make demo` and `make test` work on a fresh CPU-only machine with only
# package registries reachable: the venv takes the torch CPU build ($(TORCH_SPEC)) before anything else can
# pull a multi-GB CUDA build. GPU users: install their CUDA torch into .venv first (any version in the
# project's range), `make` then keeps it.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo wheel test lint format bench results proto clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

$(STAMP): pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || { echo "installing $(TORCH_SPEC) (CPU build where the machine has it)"; $(PIP) install -q "$(TORCH_SPEC)"; }
	$(PIP) install -q -e '.[all,dev]'
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/routet2i dev demo --prompts examples/demo_prompts.txt --out demo-out

# dist/routet2i-VERSION-py3-none-any.whl: the one wheel (device, workstation and cloud code; the extras pick
# the dependencies). Copy it to a device and `pip install 'routet2i-*.whl[edge]'` (or `[edge-gpu]`).
DIST ?= dist
wheel: | $(PY)
	rm -rf build $(DIST)/routet2i-*.whl  # build/: setuptools never drops files deleted from the tree
	$(PIP) wheel --no-deps --no-build-isolation -q -w $(DIST) .
	@ls $(DIST)/routet2i-*.whl

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

proto: $(STAMP)
	$(PY) proto/generate.py

test: $(STAMP) lint
	$(PY) proto/generate.py --check
	@if [ -x scripts/ensure_postgres.sh ]; then \
	  url=$$(scripts/ensure_postgres.sh) && export ROUTET2I_TEST_PG_URL="$$url" \
	    || echo "PostgreSQL unavailable: postgres tests will skip"; \
	fi; \
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/pytest -m "not slow and not gpu" $(PYTEST_ARGS)

bench: $(STAMP)
	@for f in bench/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

results: $(STAMP)
	$(PY) bench/results.py

clean:
	rm -rf build dist *.egg-info demo-out .pytest_cache .ruff_cache
