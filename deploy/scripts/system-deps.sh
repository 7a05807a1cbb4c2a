#!/usr/bin/env bash
# Installs the Debian packages that the test suite uses for real, when they are missing
# (and Node.js with npm, which `make agents` needs to install the real coding agents).
# Safe to run repeatedly; does nothing when everything is present or apt-get is unavailable.
set -euo pipefail

want=()
command -v ssh >/dev/null 2>&1 || want+=(openssh-client)
command -v ssh-keygen >/dev/null 2>&1 || want+=(openssh-client)
command -v nft >/dev/null 2>&1 || want+=(nftables)
command -v ip >/dev/null 2>&1 || want+=(iproute2)
command -v prometheus >/dev/null 2>&1 || want+=(prometheus)
command -v promtool >/dev/null 2>&1 || want+=(prometheus)
# The world view's browser tests drive Debian's Chromium through its ChromeDriver.
command -v chromium >/dev/null 2>&1 || want+=(chromium)
command -v chromedriver >/dev/null 2>&1 || want+=(chromium-driver)
command -v tmux >/dev/null 2>&1 || want+=(tmux)  # the real agents' interactive tests (a terminal)
command -v node >/dev/null 2>&1 || want+=(nodejs)  # make agents installs Claude Code and OpenCode with npm
command -v npm >/dev/null 2>&1 || want+=(npm)

if [ ${#want[@]} -eq 0 ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
  echo "system-deps: missing ${want[*]} and cannot install them (need root and apt-get); tests that need them will skip" >&2
  exit 0
fi
mapfile -t uniq < <(printf '%s\n' "${want[@]}" | sort -u)
echo "system-deps: installing ${uniq[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# Bounded: a registry that does not answer must not hang CI for its whole budget.
timeout 600 apt-get update -qq >/dev/null || echo "system-deps: apt-get update failed" >&2
timeout 900 apt-get install -y -qq --no-install-recommends "${uniq[@]}" >/dev/null \
  || echo "system-deps: could not install ${uniq[*]}; tests that need them will skip" >&2
