#!/usr/bin/env bash
# Installs Debian's etcd-server (the baseline of `tetherlab bench cluster`) when it is missing.
# Does nothing when etcd is present; without root or apt-get it says so and exits 0, and the
# benchmark then skips its etcd baseline with a note.
set -euo pipefail

if command -v etcd >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
  echo "install-etcd: etcd missing and cannot be installed (need root and apt-get)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
timeout 600 apt-get update -qq >/dev/null || echo "install-etcd: apt-get update failed" >&2
timeout 900 apt-get install -y -qq --no-install-recommends etcd-server >/dev/null \
  || echo "install-etcd: could not install etcd-server" >&2
# The package's service is not what the benchmark runs: it starts its own members on loopback.
if command -v systemctl >/dev/null 2>&1; then
  systemctl disable --now etcd >/dev/null 2>&1 || true
fi
