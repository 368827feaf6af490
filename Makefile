PYTHON ?= python3
VENV ?= .venv
CONFIG ?= config.yaml

BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev
SOAK_STAMP := $(VENV)/.installed-soak
CODE := gateway tests demo bench soak

.PHONY: install install-dev run test lint format parts bench soak screenshots clean

# `make run` needs only the package (the demo app uses nothing more); test, lint, bench and screenshots also need
# the dev extras (pytest, Playwright, schemathesis, mypy...: some 400 MB more).
install: $(RUN_STAMP)
install-dev: $(DEV_STAMP)

$(BIN)/python:
	@$(PYTHON) -m venv $(VENV) || { \
		rm -rf $(VENV); \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv && \
			$(PYTHON) -m venv $(VENV); \
		else \
			echo "cannot create $(VENV): install the venv module for $(PYTHON) (Debian: python3-venv)" >&2; \
			exit 1; \
		fi; \
	}
	$(BIN)/python -m pip install --upgrade pip

# Each stamp is redone only when pyproject.toml changes; the editable install picks up code edits by itself.
# The dev extras hold everything `make run` needs, so their install counts for both.
$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e .
	touch $@

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@ $(RUN_STAMP)

run: install
	@VENV=$(VENV) CONFIG=$(CONFIG) scripts/run-demo.sh

# Integration tests start real redis-server, redis-sentinel, nginx and chromium processes: each is installed
# when missing.
parts:
	scripts/install-parts.sh

lint: install-dev
	$(BIN)/ruff check $(CODE)
	$(BIN)/ruff format --check $(CODE)
	$(BIN)/mypy --strict gateway

test: install-dev parts lint
	$(BIN)/pytest

# The README's screenshots (docs/screenshots): the browser test, writing its steps there.
screenshots: install-dev parts
	SCREENSHOTS_DIR=docs/screenshots $(BIN)/pytest tests/test_browser.py

# Load tests on 127.0.0.1: the gateway against bare aiohttp floors, under wrk; writes bench-results.json.
# BENCH_DURATION (default 5) and BENCH_WARMUP (default 2) are the seconds of each run; BENCH_ROUNDS (default 3) how
# many times each case and its floor run, alternately (ratios are the medians of the rounds).
bench: install-dev parts
	@command -v wrk >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y wrk; \
		else \
			echo "wrk not found: install wrk (Debian: apt-get install wrk)" >&2; \
			exit 1; \
		fi; \
	}
	$(BIN)/python -m bench.run

# An hour of mixed traffic against real processes (two gateways, Redis with a replica and Sentinels, nginx in edge
# mode, a misbehaving app) while faults are injected; writes soak-results.json, soak-results.txt and docs/soak/*.png,
# and fails when a grant was redeemed twice or lost, a 5xx went unexplained, a fault's check failed, or RSS or fds
# grew by more than 10 %. SOAK_SECONDS (default 3600; 120 runs every fault once), SOAK_RATE (default 1).
$(SOAK_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[dev,soak]'
	touch $@

soak: install-dev parts $(SOAK_STAMP)
	$(BIN)/python -m soak

format: install-dev
	$(BIN)/ruff format $(CODE)
	$(BIN)/ruff check --fix $(CODE)

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
