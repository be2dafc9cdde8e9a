# The two commands: `make demo` and `make test`. Both set everything up from a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench peers clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test,mediahub]'
	touch $(STAMP)

# Debian peers the tests and benchmarks run against (installed only when root and missing).
peers:
	@bash scripts/install-peers.sh

test: $(STAMP) peers
	$(BIN)/ruff check src tests bench examples
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples

bench: $(STAMP) peers
	$(BIN)/python bench/kv.py

demo: $(STAMP)
	$(BIN)/python examples/demo.py

clean:
	rm -rf $(VENV) shipyard-data .pytest_cache
