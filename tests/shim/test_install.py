"""`tether install` / `uninstall`: merging into Claude Code settings and writing the OpenCode plugin."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tetherlab.shim import install
from tetherlab.shim.hooks import HOOK_TIMEOUT_S

TETHER = "/opt/venv/bin/tether"
GUARDED = "/opt/venv/bin/tether hook claude-code || exit 2"
PLAIN = "/opt/venv/bin/tether hook claude-code"


def ours(command: str) -> dict[str, object]:
    return {"type": "command", "command": command, "timeout": HOOK_TIMEOUT_S}


EXPECTED_HOOKS = {
    "PreToolUse": [
        {"matcher": "ExitPlanMode", "hooks": [ours(GUARDED)]},
        {"matcher": "Edit|Write|MultiEdit|NotebookEdit|Bash|mcp__.*", "hooks": [ours(GUARDED)]},
    ],
    "SessionStart": [{"hooks": [ours(PLAIN)]}],
    "UserPromptSubmit": [{"hooks": [ours(PLAIN)]}],
    "PostToolUse": [{"matcher": "Edit|Write|MultiEdit|NotebookEdit|Bash|mcp__.*", "hooks": [ours(PLAIN)]}],
}

USER_SETTINGS: dict[str, object] = {
    "model": "opus",
    "permissions": {"allow": ["Bash(npm test)"], "deny": ["Read(.env)"]},
    "hooks": {
        "PreToolUse": [{"matcher": "Bash", "hooks": [{"type": "command", "command": "./lint-bash.sh"}]}],
        "PostToolUse": [{"matcher": "Edit", "hooks": [{"type": "command", "command": "prettier --write"}]}],
        "Stop": [],
    },
}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / ".git").mkdir()
    (tmp_path / "src").mkdir()
    return tmp_path


def settings_of(repo: Path) -> dict[str, object]:
    return json.loads((repo / ".claude" / "settings.json").read_text())


def write_settings(repo: Path, data: object) -> Path:
    path = repo / ".claude" / "settings.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=2))
    return path


# --- pure merge -------------------------------------------------------------------------


def test_merge_into_empty_settings() -> None:
    assert install.merge_claude_settings({}, TETHER) == {"hooks": EXPECTED_HOOKS}


def test_merge_keeps_every_existing_setting_and_hook() -> None:
    merged = install.merge_claude_settings(USER_SETTINGS, TETHER)
    assert merged["model"] == "opus" and merged["permissions"] == USER_SETTINGS["permissions"]
    hooks = merged["hooks"]
    assert isinstance(hooks, dict)
    assert hooks["PreToolUse"][0] == USER_SETTINGS["hooks"]["PreToolUse"][0]  # type: ignore[index]
    assert hooks["PreToolUse"][1:] == EXPECTED_HOOKS["PreToolUse"]
    assert hooks["PostToolUse"][0] == USER_SETTINGS["hooks"]["PostToolUse"][0]  # type: ignore[index]
    assert hooks["PostToolUse"][1:] == EXPECTED_HOOKS["PostToolUse"]
    assert hooks["Stop"] == []
    assert hooks["SessionStart"] == EXPECTED_HOOKS["SessionStart"]
    assert USER_SETTINGS["hooks"]["PreToolUse"] == [  # type: ignore[index]
        {"matcher": "Bash", "hooks": [{"type": "command", "command": "./lint-bash.sh"}]}
    ], "the input must not be modified"


def test_merge_is_idempotent_and_replaces_a_stale_path() -> None:
    once = install.merge_claude_settings(USER_SETTINGS, TETHER)
    assert install.merge_claude_settings(once, TETHER) == once
    moved = install.merge_claude_settings(once, "/new/bin/tether")
    commands = [h["command"] for groups in moved["hooks"].values() for g in groups for h in g["hooks"]]  # type: ignore[union-attr]
    assert not any(c.startswith("/opt/venv") for c in commands)
    assert commands.count("/new/bin/tether hook claude-code || exit 2") == 2
    assert install.remove_claude_settings(moved) == install.remove_claude_settings(once)


def test_merge_removes_duplicates_of_ours() -> None:
    doubled = {"hooks": {"SessionStart": [{"hooks": [ours(PLAIN), ours(PLAIN)]}]}}
    assert install.merge_claude_settings(doubled, TETHER)["hooks"] == EXPECTED_HOOKS


def test_remove_takes_only_ours() -> None:
    merged = install.merge_claude_settings(USER_SETTINGS, TETHER)
    assert install.remove_claude_settings(merged) == USER_SETTINGS
    assert install.remove_claude_settings(install.merge_claude_settings({}, TETHER)) == {}
    mixed = {"hooks": {"SessionStart": [{"hooks": [{"type": "command", "command": "echo hi"}, ours(PLAIN)]}]}}
    assert install.remove_claude_settings(mixed) == {
        "hooks": {"SessionStart": [{"hooks": [{"type": "command", "command": "echo hi"}]}]}
    }


@pytest.mark.parametrize("bad", [[], {"hooks": []}, {"hooks": {"PreToolUse": {}}}])
def test_merge_refuses_unexpected_shapes(bad: object) -> None:
    with pytest.raises(install.RefusedError):
        install.merge_claude_settings(bad, TETHER)  # type: ignore[arg-type]


def test_is_ours() -> None:
    assert install.is_ours(ours("'/a b/tether' hook claude-code || exit 2"))
    assert not install.is_ours({"type": "command", "command": "tether-lint"})
    assert not install.is_ours({"type": "http", "url": "http://x/tether/hook claude-code"})
    assert not install.is_ours("tether hook claude-code")


# --- files ------------------------------------------------------------------------------


def test_install_writes_repo_settings_and_is_idempotent(repo: Path) -> None:
    write_settings(repo, USER_SETTINGS)
    assert install.install("claude-code", repo=str(repo / "src"), tether=TETHER) == 0
    first = (repo / ".claude" / "settings.json").read_bytes()
    assert settings_of(repo) == install.merge_claude_settings(USER_SETTINGS, TETHER)
    assert install.install("claude-code", repo=str(repo), tether=TETHER) == 0
    assert (repo / ".claude" / "settings.json").read_bytes() == first
    assert install.uninstall("claude-code", repo=str(repo)) == 0
    assert settings_of(repo) == USER_SETTINGS


@pytest.mark.parametrize("text", ["{not json", "", '{"hooks": [1]}', "[]"])
def test_install_refuses_bad_file_and_leaves_it(repo: Path, text: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_settings(repo, text)
    assert install.install("claude-code", repo=str(repo), tether=TETHER) == 2
    assert install.uninstall("claude-code", repo=str(repo)) == 2
    assert path.read_text() == text
    assert "refused" in capsys.readouterr().err
    assert [p.name for p in path.parent.iterdir()] == ["settings.json"], "no temp files left behind"


def test_atomic_write_keeps_mode_and_symlink(tmp_path: Path) -> None:
    real = tmp_path / "dotfiles" / "settings.json"
    real.parent.mkdir()
    real.write_text('{"model": "x"}')
    os.chmod(real, 0o600)
    home = tmp_path / "home"
    (home / ".claude").mkdir(parents=True)
    link = home / ".claude" / "settings.json"
    link.symlink_to(real)
    assert install.install_claude(link, TETHER)
    assert link.is_symlink()
    assert json.loads(real.read_text())["model"] == "x"
    assert stat.S_IMODE(real.stat().st_mode) == 0o600


def test_global_install_uses_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    assert install.install("claude-code", global_=True, tether=TETHER) == 0
    assert json.loads((tmp_path / ".claude" / "settings.json").read_text())["hooks"] == EXPECTED_HOOKS
    assert install.install("opencode", global_=True) == 0
    assert (tmp_path / ".config" / "opencode" / "plugins" / "tetherlab.js").is_file()


def test_find_repo_walks_up(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    assert install.find_repo(repo / "src") == repo.resolve()
    lone = tmp_path_factory.mktemp("lone")
    assert install.find_repo(lone) in (lone.resolve(), *lone.resolve().parents)


def test_cli_install_writes_the_fast_hook_command(repo: Path) -> None:
    """The hook module, run by tether's own interpreter with -I -S: no console script, no
    site-packages, no package finder on every tool call."""
    tether = Path(sys.executable).parent / "tether"
    if not tether.exists():
        pytest.skip("tether console script not installed")
    for _ in range(2):
        proc = subprocess.run(
            [str(tether), "install", "claude-code", "--dir", str(repo)], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
    hooks = settings_of(repo)["hooks"]
    assert isinstance(hooks, dict)
    commands = {h["command"] for groups in hooks.values() for g in groups for h in g["hooks"]}
    python = tether.read_text().splitlines()[0].removeprefix("#!")  # the console script's interpreter
    launcher = f"{python} -I -S {Path(install.__file__).resolve().with_name('hooks.py')}"
    assert commands == {f"{launcher} claude-code || exit 2  # tether hook claude-code",
                        f"{launcher} claude-code  # tether hook claude-code"}
    # The command works as a hook: outside `tether run` it denies (fail closed) in Claude's format.
    payload = json.dumps({"hook_event_name": "PreToolUse", "tool_name": "Write", "tool_input": {}})
    env = {k: v for k, v in os.environ.items() if k != "TETHER_SOCK"}
    for command in commands:
        ran = subprocess.run(["sh", "-c", command], input=payload, capture_output=True, text=True, env=env, timeout=30)
        assert ran.returncode == 0, ran.stderr
        assert json.loads(ran.stdout)["hookSpecificOutput"]["permissionDecision"] == "deny"
    assert sum(len(groups) for groups in hooks.values()) == 5
    proc = subprocess.run([str(tether), "uninstall", "claude-code", "--dir", str(repo)], capture_output=True, text=True)
    assert proc.returncode == 0 and settings_of(repo) == {}
    write_settings(repo, "{oops")
    proc = subprocess.run([str(tether), "install", "claude-code", "--dir", str(repo)], capture_output=True, text=True)
    assert proc.returncode == 2 and "not valid JSON" in proc.stderr


# --- OpenCode ---------------------------------------------------------------------------


def test_opencode_install_copies_plugin(repo: Path) -> None:
    target = repo / ".opencode" / "plugins" / "tetherlab.js"
    assert install.install("opencode", repo=str(repo)) == 0
    assert target.read_text() == install.plugin_source()
    assert install.PLUGIN_MARKER in target.read_text()
    assert install.install("opencode", repo=str(repo)) == 0
    target.write_text(f"// old version\n// {install.PLUGIN_MARKER}\n")
    assert install.install("opencode", repo=str(repo)) == 0
    assert target.read_text() == install.plugin_source(), "our older plugin is upgraded"
    assert install.uninstall("opencode", repo=str(repo)) == 0
    assert not target.exists()
    assert install.uninstall("opencode", repo=str(repo)) == 0


def test_opencode_refuses_foreign_plugin(repo: Path) -> None:
    target = repo / ".opencode" / "plugins" / "tetherlab.js"
    target.parent.mkdir(parents=True)
    target.write_text("export default async () => ({})\n")
    assert install.install("opencode", repo=str(repo)) == 2
    assert install.uninstall("opencode", repo=str(repo)) == 2
    assert target.read_text() == "export default async () => ({})\n"
