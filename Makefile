# Two entry points for a fresh machine: `make up` runs a local cluster, `make test` runs the suite.
# Each bootstraps what it needs: a virtual environment in .venv and the Debian packages tests use.

# The distribution's optimised interpreter when it is new enough (see the script for why).
PYTHON ?= $(shell bash deploy/scripts/pick-python.sh)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODES ?= 3
DIR ?= .tetherlab
PYTEST_ARGS ?=
# Test processes (pytest-xdist): about half the suite waits (drills, deadlines, real agents), so
# two processes on two cores finish in about 16 minutes instead of 22. One file runs in one
# process (module fixtures are set up once). TEST_JOBS=0 runs everything in this process.
TEST_JOBS ?= 2

.PHONY: up test lint venv system-deps agents test-agents-prereq bench clean

$(STAMP): pyproject.toml deploy/scripts/dev_links.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip "setuptools>=68" wheel
	$(BIN)/pip install --quiet -e '.[test]'
	# A path entry for the remapped source folders instead of setuptools' import hook (13 ms a start).
	$(BIN)/python deploy/scripts/dev_links.py
	touch $(STAMP)

venv: $(STAMP)

# Debian packages the tests drive for real (OpenSSH client, nftables, iproute2, Prometheus).
# Installed only when missing, and only where apt-get exists and we are root.
system-deps:
	@bash deploy/scripts/system-deps.sh

# The real coding agents (Claude Code, OpenCode) at pinned versions in .agents/ (ignored by git),
# for tests/agents/ and `tetherlab demo --agents real`. Needs npm; idempotent (a stamp keyed on
# the versions). `make test` runs it and fails when it cannot install them; SKIP_AGENTS=1 runs the
# suite without them (the real-agent tests then skip, saying so).
SKIP_AGENTS ?=
agents:
	@bash deploy/scripts/agents.sh

test-agents-prereq: system-deps
	@if [ -n "$(SKIP_AGENTS)" ]; then echo "make test: SKIP_AGENTS set: the real-agent tests will skip" >&2; \
	else $(MAKE) --no-print-directory agents; fi

up: $(STAMP)
	$(BIN)/tetherlab up --nodes $(NODES) --dir $(DIR)

test: $(STAMP) system-deps test-agents-prereq
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/tetherlab bench raft

clean:
	rm -rf $(VENV) .pytest_cache
