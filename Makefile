PYTHON ?= python3
VENV ?= .venv
CONFIG ?= config.yaml

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CODE := gateway tests demo bench

.PHONY: install run test lint format parts bench screenshots clean

install: $(STAMP)

# Reinstall only when pyproject.toml changes; the editable install picks up code edits by itself.
$(STAMP): pyproject.toml
	@if [ ! -x $(BIN)/python ]; then \
		$(PYTHON) -m venv $(VENV) || { \
			rm -rf $(VENV); \
			if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
				apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv && \
				$(PYTHON) -m venv $(VENV); \
			else \
				echo "cannot create $(VENV): install the venv module for $(PYTHON) (Debian: python3-venv)" >&2; \
				exit 1; \
			fi; \
		}; \
	fi
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

run: install
	VENV=$(VENV) CONFIG=$(CONFIG) scripts/run-demo.sh

# Integration tests start real redis-server, redis-sentinel, nginx and chromium processes: each is installed
# when missing.
parts:
	scripts/install-parts.sh

lint: install
	$(BIN)/ruff check $(CODE)
	$(BIN)/ruff format --check $(CODE)
	$(BIN)/mypy --strict gateway

test: install parts lint
	$(BIN)/pytest

# The README's screenshots (docs/screenshots): the browser test, writing its steps there.
screenshots: install parts
	SCREENSHOTS_DIR=docs/screenshots $(BIN)/pytest tests/test_browser.py

# Load tests on 127.0.0.1: the gateway against bare aiohttp floors, under wrk; writes bench-results.json.
# BENCH_DURATION (default 10) and BENCH_WARMUP (default 2) are the seconds of each case's runs.
bench: install parts
	@command -v wrk >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y wrk; \
		else \
			echo "wrk not found: install wrk (Debian: apt-get install wrk)" >&2; \
			exit 1; \
		fi; \
	}
	$(BIN)/python -m bench.run

format: install
	$(BIN)/ruff format $(CODE)
	$(BIN)/ruff check --fix $(CODE)

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
