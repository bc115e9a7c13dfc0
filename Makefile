# Two entry points on a fresh machine: `make demo` (the main job on the embedded default) and
# `make test` (the test suite). Both create ./.venv and install requirements.txt into it first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt pytest==9.2.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q

# The CPU benchmark set on the SD-2.1-base architecture (random weights), ~12-15 min; see BENCHMARKS.md.
bench: $(STAMP)
	nice -n 5 env OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.bench --quick --out outputs/bench.json

clean:
	rm -rf outputs .pytest_cache
