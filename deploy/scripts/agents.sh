#!/usr/bin/env bash
# Installs the real coding agents that tests/agents/ drives, at pinned exact versions, into
# .agents/ at the top of the repository (ignored by git):
#
#   .agents/bin/claude            Claude Code's native binary (@anthropic-ai/claude-code)
#   .agents/bin/opencode          OpenCode's native binary (opencode-ai)
#   .agents/opencode-config/      package.json, package-lock.json and node_modules naming
#                                 @opencode-ai/plugin: tests copy the first two and link the
#                                 third into each OpenCode config folder, so that OpenCode does
#                                 not npm-install the plugin package on every run (13-20 s, and
#                                 a registry fetch)
#   .agents/versions.env          the pinned versions and platform, for tests and reports
#
# npm's postinstall scripts only copy each platform's native binary over a stub, so they are
# skipped (--ignore-scripts) and the binaries are linked from the platform packages instead.
# Idempotent: a stamp keyed on the versions and the platform makes a second run a no-op.
# Usage: deploy/scripts/agents.sh [--force]      (AGENTS_DIR overrides the destination)
set -euo pipefail

CLAUDE_CODE_VERSION=2.1.197
OPENCODE_VERSION=1.18.33
OPENCODE_PLUGIN_VERSION=1.18.33
NPM_TIMEOUT_S=900

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
dest=${AGENTS_DIR:-$root/.agents}
force=0
[ "${1:-}" = "--force" ] && force=1

say() { echo "agents: $*" >&2; }
die() { echo "agents: error: $*" >&2; exit 1; }

if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
  die "npm and node are needed to install Claude Code and OpenCode (Node.js 18 or newer): on Debian/Ubuntu \
'apt-get install nodejs npm', elsewhere https://nodejs.org; then run 'make agents' again"
fi

# --- the platform's native packages ---------------------------------------------------------
os=$(uname -s)
machine=$(uname -m)
case "$machine" in
  x86_64 | amd64) arch=x64 ;;
  aarch64 | arm64) arch=arm64 ;;
  *) die "unsupported CPU $machine (Claude Code and OpenCode ship x64 and arm64 binaries)" ;;
esac
musl=""
if [ "$os" = Linux ] && { [ -f /etc/alpine-release ] || ldd --version 2>&1 | grep -qi musl; }; then
  musl="-musl"
fi
case "$os" in
  Linux)
    platform="linux-$arch$musl"
    claude_pkg="@anthropic-ai/claude-code-linux-$arch$musl"
    baseline=""
    if [ "$arch" = x64 ] && ! grep -qw avx2 /proc/cpuinfo 2>/dev/null; then baseline="-baseline"; fi
    opencode_pkg="opencode-linux-$arch$baseline$musl"
    ;;
  Darwin)
    platform="darwin-$arch"
    claude_pkg="@anthropic-ai/claude-code-darwin-$arch"
    opencode_pkg="opencode-darwin-$arch"
    ;;
  *) die "unsupported OS $os (Linux or macOS)" ;;
esac

stamp_text="claude-code=$CLAUDE_CODE_VERSION opencode=$OPENCODE_VERSION plugin=$OPENCODE_PLUGIN_VERSION \
platform=$platform claude_pkg=$claude_pkg opencode_pkg=$opencode_pkg"
stamp="$dest/.installed"

if [ "$force" = 0 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_text" ] \
  && [ -x "$dest/bin/claude" ] && [ -x "$dest/bin/opencode" ] && [ -f "$dest/opencode-config/package-lock.json" ]; then
  say "up to date in $dest (Claude Code $CLAUDE_CODE_VERSION, OpenCode $OPENCODE_VERSION, $platform)"
  exit 0
fi

started=$(date +%s)
stage="$dest.tmp.$$"
trap 'rm -rf "$stage"' EXIT
rm -rf "$stage"
mkdir -p "$stage/npm" "$stage/opencode-config" "$stage/bin"

npm_install() {  # DIR: install DIR/package.json exactly, without scripts, bounded in time
  (cd "$1" && timeout "$NPM_TIMEOUT_S" npm install --ignore-scripts --omit=optional --no-audit --no-fund \
    --loglevel=error) || die "npm install in $1 failed (registry unreachable, or a version missing?)"
}

say "installing Claude Code $CLAUDE_CODE_VERSION and OpenCode $OPENCODE_VERSION for $platform into $dest"
cat >"$stage/npm/package.json" <<EOF
{
  "private": true,
  "description": "The real coding agents for tests/agents (written by deploy/scripts/agents.sh)",
  "dependencies": {
    "@anthropic-ai/claude-code": "$CLAUDE_CODE_VERSION",
    "$claude_pkg": "$CLAUDE_CODE_VERSION",
    "opencode-ai": "$OPENCODE_VERSION",
    "$opencode_pkg": "$OPENCODE_VERSION"
  }
}
EOF
npm_install "$stage/npm"
say "agents downloaded ($(( $(date +%s) - started )) s)"

claude_bin="npm/node_modules/$claude_pkg/claude"
opencode_bin="npm/node_modules/$opencode_pkg/bin/opencode"
[ -x "$stage/$claude_bin" ] || die "$claude_pkg did not provide $claude_bin"
[ -x "$stage/$opencode_bin" ] || die "$opencode_pkg did not provide $opencode_bin"
ln -s "../$claude_bin" "$stage/bin/claude"
ln -s "../$opencode_bin" "$stage/bin/opencode"

say "installing @opencode-ai/plugin $OPENCODE_PLUGIN_VERSION for OpenCode's config folders"
# The same package.json OpenCode writes itself; its lock file names the plugin as a root dependency.
cat >"$stage/opencode-config/package.json" <<EOF
{
  "dependencies": {
    "@opencode-ai/plugin": "$OPENCODE_PLUGIN_VERSION"
  }
}
EOF
npm_install "$stage/opencode-config"

got_claude=$("$stage/bin/claude" --version 2>/dev/null | awk '{print $1}') || true
got_opencode=$("$stage/bin/opencode" --version 2>/dev/null) || true
[ "$got_claude" = "$CLAUDE_CODE_VERSION" ] || die "bin/claude --version says '$got_claude', want $CLAUDE_CODE_VERSION"
[ "$got_opencode" = "$OPENCODE_VERSION" ] || die "bin/opencode --version says '$got_opencode', want $OPENCODE_VERSION"

cat >"$stage/versions.env" <<EOF
CLAUDE_CODE_VERSION=$CLAUDE_CODE_VERSION
OPENCODE_VERSION=$OPENCODE_VERSION
OPENCODE_PLUGIN_VERSION=$OPENCODE_PLUGIN_VERSION
PLATFORM=$platform
EOF
echo "$stamp_text" >"$stage/.installed"

rm -rf "$dest"
mv "$stage" "$dest"
trap - EXIT
size=$(du -sh "$dest" 2>/dev/null | cut -f1)
say "done in $(( $(date +%s) - started )) s: $dest/bin/claude ($got_claude), $dest/bin/opencode ($got_opencode), $size on disk"
