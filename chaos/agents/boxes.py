"""Where the real agents are, and a throwaway home for one agent run.

``make agents`` (deploy/scripts/agents.sh) installs Claude Code and OpenCode at pinned versions
into ``.agents/`` at the top of the repository (``AGENTS_DIR`` or ``TETHERLAB_AGENTS_DIR`` point
elsewhere). A :class:`Box` is a git repository, a HOME and XDG folders of its own, and the
environment that keeps an agent on loopback: its model is the scripted one
(:mod:`tetherlab.chaos.agents.model_server`), its npm registry a dead port.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tetherlab.chaos.agents.model_server import ModelServer

ROOT = Path(__file__).resolve().parents[2]  # the repository (an editable install)
REMOTE = "git@example.com:acme/shop.git"
CLAUDE_CODE_VERSION = "2.1.197"  # deploy/scripts/agents.sh pins the same
SUBPROCESS_TIMEOUT_S = 60


def agents_dir() -> Path:
    env = os.environ.get("TETHERLAB_AGENTS_DIR") or os.environ.get("AGENTS_DIR")
    return Path(env) if env else ROOT / ".agents"


def claude_path() -> Path:
    return agents_dir() / "bin" / "claude"


def opencode_path() -> Path:
    return agents_dir() / "bin" / "opencode"


def opencode_config() -> Path:
    return agents_dir() / "opencode-config"


def missing() -> str | None:
    """None when the real agents are usable, else why not."""
    if shutil.which("ssh-keygen") is None or shutil.which("git") is None:
        return "needs ssh-keygen and git"
    for path in (claude_path(), opencode_path(), opencode_config() / "package-lock.json"):
        if not path.exists():
            return f"the real agents are not installed ({path} missing): run `make agents`"
    return None


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.email=dev@tetherlab", "-c", "user.name=dev", *args],
                   check=True, capture_output=True, timeout=SUBPROCESS_TIMEOUT_S)


def make_repo(path: Path, remote: str = REMOTE, files: dict[str, str] | None = None) -> Path:
    """A git repository with one commit and ``origin`` set to ``remote``."""
    path.mkdir(parents=True)
    git(path, "init", "-q")
    git(path, "remote", "add", "origin", remote)
    for rel, text in (files or {"README.md": "shop\n"}).items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    git(path, "add", "-A")
    git(path, "commit", "-qm", "base")
    return path


@dataclass
class Box:
    """A throwaway home for one agent run, and the environment `tether run` gets."""

    repo: Path
    home: Path
    runtime: Path  # short: the hook socket lives here (AF_UNIX paths are limited to ~107 bytes)
    env: dict[str, str] = field(default_factory=dict)

    def close(self) -> None:
        shutil.rmtree(self.runtime, ignore_errors=True)


def make_box(repo: Path, home: Path, model: ModelServer) -> Box:
    home.mkdir(parents=True)
    runtime = Path(tempfile.mkdtemp(prefix="tl-", dir="/tmp"))
    env = {
        "PATH": f"{claude_path().parent}:{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "USER": home.name,
        "LANG": "C.UTF-8",
        "TERM": "xterm-256color",
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "XDG_STATE_HOME": str(home / ".local" / "state"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_RUNTIME_DIR": str(runtime),
        "ANTHROPIC_BASE_URL": model.url,
        "ANTHROPIC_API_KEY": "sk-ant-scripted-test-key-0123456789",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        "OPENCODE_DISABLE_MODELS_FETCH": "1",
        "OPENCODE_DISABLE_AUTOUPDATE": "1",
        # A registry fetch would be a bug: make it fail fast on loopback instead of leaving the machine.
        "NPM_CONFIG_REGISTRY": "http://127.0.0.1:9/",
        "NPM_CONFIG_OFFLINE": "true",
    }
    return Box(repo, home, runtime, env)


def tether_install(box: Box, agent: str) -> None:
    """`tether install AGENT` into the box's repository."""
    r = subprocess.run([sys.executable, "-m", "tetherlab.shim.cli", "install", agent, "--dir", str(box.repo)],
                       capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
                       env={**os.environ, "HOME": str(box.home)})
    if r.returncode != 0:
        raise RuntimeError(f"tether install {agent} failed: {r.stderr}")


def preseed_claude(box: Box) -> None:
    """Answer Claude Code's first-run dialogs ahead of time (onboarding, folder trust, custom API key)."""
    key = box.env["ANTHROPIC_API_KEY"]
    state = {
        "hasCompletedOnboarding": True,
        "lastOnboardingVersion": CLAUDE_CODE_VERSION,
        "numStartups": 1,
        "theme": "dark",
        "customApiKeyResponses": {"approved": [key[-20:]], "rejected": []},
        "projects": {str(box.repo): {"hasTrustDialogAccepted": True, "hasCompletedProjectOnboarding": True,
                                     "allowedTools": []}},
    }
    (box.home / ".claude.json").write_text(json.dumps(state))


def install_opencode(box: Box, model: ModelServer, plugin: bool = True) -> None:
    """The scripted provider in opencode.json, Tetherlab's plugin, and @opencode-ai/plugin pre-installed
    in both config folders (the repository's .opencode/ and $XDG_CONFIG_HOME/opencode), so that
    OpenCode does not npm-install it on every run."""
    config = {"$schema": "https://opencode.ai/config.json",
              "provider": {"scripted": {"npm": "@ai-sdk/openai-compatible", "name": "Scripted",
                                        "options": {"baseURL": model.url + "/v1", "apiKey": "x"},
                                        "models": {"m": {"name": "m", "tool_call": True}}}},
              "model": "scripted/m", "small_model": "scripted/m", "autoupdate": False, "share": "disabled"}
    (box.repo / "opencode.json").write_text(json.dumps(config, indent=2))
    if plugin:
        tether_install(box, "opencode")
    for folder in (box.repo / ".opencode", box.home / ".config" / "opencode"):
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("package.json", "package-lock.json"):
            shutil.copy(opencode_config() / name, folder / name)
        with contextlib.suppress(FileExistsError):
            (folder / "node_modules").symlink_to(opencode_config() / "node_modules")


# SDK mode: Claude Code headless with ExitPlanMode, stream-json on stdin and stdout.
CLAUDE_SDK = ["claude", "-p", "--input-format", "stream-json", "--output-format", "stream-json", "--verbose",
              "--permission-prompt-tool", "stdio", "--permission-mode", "plan"]


def sdk_user_message(prompt: str) -> dict[str, object]:
    return {"type": "user", "message": {"role": "user", "content": prompt}}


def sdk_allow(msg: dict[str, object]) -> dict[str, object] | None:
    """The answer to a ``can_use_tool`` control request: allow it, input unchanged; None for
    any other message."""
    request = msg.get("request")
    if msg.get("type") != "control_request" or not isinstance(request, dict) \
            or request.get("subtype") != "can_use_tool":
        return None
    return {"type": "control_response", "response": {
        "subtype": "success", "request_id": msg.get("request_id"),
        "response": {"behavior": "allow", "updatedInput": request.get("input", {})}}}
