# Two entry points: `make demo` and `make test`. Both create .venv and install everything first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install bench-deps clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# Exact pin: pip takes the local CPU wheel; a looser pin would pull the CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mtrec demo

# Lint, format and type checks first (what CI runs), then the suite.
test: $(STAMP)
	$(BIN)/ruff check mtrec tests benchmarks configs
	$(BIN)/ruff format --check mtrec tests benchmarks configs
	$(BIN)/mypy mtrec
	$(BIN)/python -m pytest tests

# Peers for benchmarks/, installed without their dependencies so torch stays the CPU build.
bench-deps: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps torch-rechub==0.9.0 LibMTL==1.1.5
	$(BIN)/python -m pip install -q pandas

clean:
	rm -rf $(VENV) .mtrec_cache
