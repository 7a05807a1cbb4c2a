# Two entry points for a fresh machine: `make up` runs a local cluster, `make test` runs the suite.
# Each bootstraps what it needs: a virtual environment in .venv and the Debian packages tests use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODES ?= 3
DIR ?= .tetherlab
PYTEST_ARGS ?=

.PHONY: up test lint venv system-deps agents bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip "setuptools>=68" wheel
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Debian packages the tests drive for real (OpenSSH client, nftables, iproute2, Prometheus).
# Installed only when missing, and only where apt-get exists and we are root.
system-deps:
	@bash deploy/scripts/system-deps.sh

# The real coding agents (Claude Code, OpenCode) at pinned versions in .agents/, for tests/agents/.
# Needs npm; idempotent (a stamp keyed on the versions).
agents:
	@bash deploy/scripts/agents.sh

up: $(STAMP)
	$(BIN)/tetherlab up --nodes $(NODES) --dir $(DIR)

test: $(STAMP) system-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/tetherlab bench raft

clean:
	rm -rf $(VENV) .pytest_cache
