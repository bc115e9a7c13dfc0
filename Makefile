# Two entry points on a fresh machine: `make demo` (the main job on the embedded default) and
# `make test` (the test suite). Both create ./.venv and install requirements.txt into it first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench format clean

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt pytest==9.2.0 ruff==0.17.6
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# Lint first (seconds), then the suite.
test: $(STAMP)
	$(BIN)/ruff check .
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q

# The CPU benchmark set on the SD-2.1-base architecture (random weights), ~12-15 min; see BENCHMARKS.md.
bench: $(STAMP)
	nice -n 5 env OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.bench --quick --out outputs/bench.json

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf outputs .pytest_cache
