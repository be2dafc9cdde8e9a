# The two commands: `make demo` and `make test`. Both set everything up from a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench peers clean

# Most of the suite waits on real servers and peers, so two workers halve it even on two cores
# (`make test TEST_WORKERS=0` runs it in one process).
TEST_WORKERS ?= 2

# uv installs the same packages as pip from the same index, about ten times faster (it matters for the
# "fresh clone to healthy in under a minute" promise); pip is the fallback when uv cannot be fetched.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q uv || echo "uv unavailable: installing with pip"

# setup.py compiles the gateway's hot modules (mypyc): edited, they are built again.
$(STAMP): $(BIN)/python pyproject.toml setup.py src/shipyard/gateway/proxy.py src/shipyard/gateway/upstream.py
	if [ -x $(BIN)/uv ]; then $(BIN)/uv pip install -q --python $(BIN)/python --reinstall-package shipyard -e '.[test,mediahub]'; \
	else $(BIN)/python -m pip install -q -e '.[test,mediahub]'; fi
	touch $(STAMP)

# `make demo` needs the package and the example's extras only, not the test tools (browsers' drivers, client suites),
# and skips the mypyc build of the gateway's hot path (SHIPYARD_PURE_PYTHON: the same code from source, ~30 s less
# on a fresh clone, a fifth more gateway CPU per request, invisible in the demo). `make test` installs the rest and
# the compiled build on top, and a later `make demo` reuses that.
DEMO_STAMP := $(VENV)/.installed-demo
$(DEMO_STAMP): $(BIN)/python pyproject.toml setup.py src/shipyard/gateway/proxy.py src/shipyard/gateway/upstream.py
	if [ -f $(STAMP) ] && [ -z "$$(find $(filter-out $(BIN)/python,$^) -newer $(STAMP))" ]; then :; \
	elif [ -x $(BIN)/uv ]; then SHIPYARD_PURE_PYTHON=1 $(BIN)/uv pip install -q --python $(BIN)/python --reinstall-package shipyard -e '.[mediahub]'; \
	else SHIPYARD_PURE_PYTHON=1 $(BIN)/python -m pip install -q -e '.[mediahub]'; fi
	touch $(DEMO_STAMP)

# Debian peers the tests and benchmarks run against (installed only when root and missing).
peers:
	@bash scripts/install-peers.sh

test: $(STAMP) peers
	$(BIN)/ruff check setup.py src tests bench examples
	$(BIN)/mypy
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup

lint: $(STAMP)
	$(BIN)/ruff check setup.py src tests bench examples
	$(BIN)/mypy

bench: $(STAMP) peers
	$(BIN)/python bench/kv.py

# `make demo DEMO_ARGS="--gateway-port 9080"` when a default port (8500, 8600, 8080) is taken.
demo: $(DEMO_STAMP)
	$(BIN)/python examples/demo.py $(DEMO_ARGS)

clean:
	rm -rf $(VENV) shipyard-data .pytest_cache build src/*.so src/shipyard/gateway/*.so
