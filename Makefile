# `make run` and `make test` set up everything they need on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= config.example.toml

.PHONY: run test lint typecheck certs clean

run: $(STAMP) certs/server.crt
	$(BIN)/securechat server --config $(CONFIG)

test: $(STAMP)
	$(BIN)/ruff check securechat tests scripts benchmarks
	$(BIN)/ruff format --check securechat tests scripts benchmarks
	$(BIN)/mypy
	@command -v tmux >/dev/null || { echo "installing Debian's tmux for tests/test_terminal.py"; \
		apt-get install -y -qq tmux || { apt-get update -qq && apt-get install -y -qq tmux; }; }
	$(BIN)/pytest

certs: certs/server.crt

certs/server.crt: | $(STAMP)
	$(BIN)/securechat gen-certs --out certs --client alice --client bob

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "securechat needs Python >= 3.11 ($(PYTHON) is older)"; exit 1; }
	$(PYTHON) -m venv $(VENV) || { \
		echo "python3 -m venv failed; installing Debian's python3-venv"; \
		apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info

# TLS scan of a throw-away server with testssl.sh (installed from Debian if
# missing); fails on any MEDIUM+ finding. See scripts/scan.sh and docs/security.md.
.PHONY: scan
scan: $(STAMP)
	bash scripts/scan.sh

# Benchmarks (issue 5): a real server on loopback driven by load-generator
# processes; prints JSON lines and a table, writes benchmarks/results/, then
# the latency plot. BENCH_ARGS="fanout --quick" runs a part, reduced.
# See docs/performance.md.
BENCH_STAMP := $(VENV)/.bench-installed
BENCH_ARGS ?=

.PHONY: bench
bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks $(BENCH_ARGS)
	$(BIN)/python -m benchmarks.plot

$(BENCH_STAMP): pyproject.toml | $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	touch $@
