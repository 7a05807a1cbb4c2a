#!/usr/bin/env bash
# Prints the interpreter `make venv` builds the virtual environment from: the distribution's
# /usr/bin/python3 when it is 3.11 or newer and can make a venv, else the first python3 on PATH.
#
# Why the distribution's first: Debian (and most distributions) build CPython with profile-guided
# and link-time optimisation, as python.org's installers do; an interpreter built from source
# without --enable-optimizations (pyenv's default) runs Python code markedly slower. On the
# benchmark host a 2,000,000-addition loop took 44 ms on Debian's 3.11 against 62 ms on pyenv's
# 3.11, and a node's CPU per verdict fell about 7% (docs/performance.md, twelfth round). The
# production install (deploy/systemd/README.md) uses the distribution's python3 too, so the suite
# and the benchmarks run what operators run. PYTHON=... on make's command line overrides this.
set -euo pipefail

usable() {
  "$1" -c 'import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1
}

# PYTHON_CANDIDATES (space-separated) replaces the list, for tests.
for candidate in ${PYTHON_CANDIDATES:-/usr/bin/python3 python3}; do
  if command -v "$candidate" >/dev/null 2>&1 && usable "$candidate"; then
    echo "$candidate"
    exit 0
  fi
done
echo "pick-python: no Python 3.11+ with venv support found (tried ${PYTHON_CANDIDATES:-/usr/bin/python3 python3})" >&2
echo python3  # let `python3 -m venv` say what is wrong
