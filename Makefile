# `make run` and `make test` set up everything they need on a fresh machine.
#   make run [PORT=9000] [CONFIG=my.toml]   the server; installs securechat's runtime only
#   make test                               also the test tools (ruff, mypy, pytest, ...)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# securechat and what it needs to run:
RUNTIME_STAMP := $(VENV)/.runtime-installed
# that plus the test tools (pyproject.toml's [dev] extra):
STAMP  := $(VENV)/.installed
# `securechat server` reads securechat.toml unless told otherwise (git ignores that
# file): `make run` uses it when there is one, else the example config.
CONFIG ?= $(if $(wildcard securechat.toml),securechat.toml,config.example.toml)
# Empty: the config file's [server] port (8000 in the example).
PORT   ?=
# setuptools reports an editable install with an informational "Editable installation"
# warning on every install; it is about nothing this project does.
PIP_INSTALL := $(BIN)/python -W 'ignore:Editable installation:UserWarning' -m pip install --quiet

# The suites `make test` runs a second time with servers on trio's SSLStream.send_all.
STOCK_PATH_SUITES := tests/test_transport.py tests/test_hostile.py tests/test_attack_reset.py \
	tests/test_attack_memory.py tests/test_attack_freeze.py tests/test_server.py

.PHONY: run test lint typecheck certs clean

run: $(RUNTIME_STAMP) certs/server.crt
	$(BIN)/securechat server --config $(CONFIG)$(if $(PORT), --port $(PORT))

test: $(STAMP)
	$(BIN)/ruff check securechat tests scripts benchmarks
	$(BIN)/ruff format --check securechat tests scripts benchmarks
	$(BIN)/mypy
	@command -v tmux >/dev/null || { echo "installing Debian's tmux for tests/test_terminal.py"; \
		apt-get install -y -qq tmux || { apt-get update -qq && apt-get install -y -qq tmux; }; }
	@command -v redis-server >/dev/null || { echo "installing Debian's redis-server for the cluster tests (they start private instances, never its service)"; \
		apt-get install -y -qq redis-server || { apt-get update -qq && apt-get install -y -qq redis-server; }; }
	@command -v chromium >/dev/null || { echo "installing Debian's chromium for tests/test_browser.py (Playwright drives it; it downloads no browser)"; \
		apt-get install -y -qq chromium || { apt-get update -qq && apt-get install -y -qq chromium; }; }
	@$(NGIRCD_INSTALL)
	$(BIN)/pytest
	@echo "the transport and hostile suites again on trio's own write path ([server] tls_fast_path = false)"
	$(BIN)/pytest --tls-stock-path -q -p no:cacheprovider $(STOCK_PATH_SUITES)

certs: certs/server.crt

certs/server.crt: | $(RUNTIME_STAMP)
	$(BIN)/securechat gen-certs --out certs --client alice --client bob

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "securechat needs Python >= 3.11 ($(PYTHON) is older)"; exit 1; }
	$(PYTHON) -m venv $(VENV) || { \
		echo "python3 -m venv failed; installing Debian's python3-venv"; \
		apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --upgrade pip

$(RUNTIME_STAMP): pyproject.toml | $(BIN)/python
	$(PIP_INSTALL) -e .
	touch $@

# The dev install includes the runtime: mark both done.
$(STAMP): pyproject.toml | $(BIN)/python
	$(PIP_INSTALL) -e '.[dev]'
	touch $(RUNTIME_STAMP) $@

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
# The peers scenario (and its tests) start private ngIRCd processes: Debian's
# package, with the system service it brings stopped and disabled. If apt fails,
# the peers scenario says so in one line and the rest runs.
NGIRCD_INSTALL = command -v ngircd >/dev/null || { \
	echo "installing Debian's ngircd for the peers scenario (it starts private instances; the package's service is stopped and disabled)"; \
	apt-get install -y -qq ngircd || { apt-get update -qq && apt-get install -y -qq ngircd; }; \
	systemctl disable --now ngircd.service >/dev/null 2>&1; \
	invoke-rc.d ngircd stop >/dev/null 2>&1; update-rc.d ngircd disable >/dev/null 2>&1; true; }

.PHONY: bench
bench: $(BENCH_STAMP)
	@command -v redis-server >/dev/null || { echo "installing Debian's redis-server for the cluster scenarios (they start private instances, never its service)"; \
		apt-get install -y -qq redis-server || { apt-get update -qq && apt-get install -y -qq redis-server; }; }
	@$(NGIRCD_INSTALL)
	$(BIN)/python -m benchmarks $(BENCH_ARGS)
	$(BIN)/python -m benchmarks.plot

$(BENCH_STAMP): pyproject.toml | $(STAMP)
	$(PIP_INSTALL) -e '.[bench]'
	touch $@
