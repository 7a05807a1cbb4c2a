"""The hooks one ``tether run`` gives the agent's git: trailers on every commit while a claim is
held, the repository's own hooks still running, and the push verified before it leaves. Real git,
no cluster (the verification command is a stand-in here; tests/cluster/test_git_fencing.py runs
the real one)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tetherlab.shim.githooks import RunHooks

AGENT = "alice/4b2e0000-0000-4000-8000-0000000000a1"


def git(repo: Path, *args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
    r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30,
                       env={**os.environ, **(env or {})})
    if check and r.returncode != 0:
        raise AssertionError(f"git {args}: {r.stderr}")
    return r.stdout + r.stderr


def new_repo(tmp: Path) -> Path:
    repo = tmp / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "a@example.com")
    git(repo, "config", "user.name", "A")
    (repo / "f.txt").write_text("x\n")
    git(repo, "add", "f.txt")
    git(repo, "commit", "-qm", "base")
    return repo


def commit(repo: Path, env: dict[str, str], name: str, *extra: str) -> str:
    (repo / name).write_text(name)
    git(repo, "add", name, env=env)
    git(repo, "commit", "-qm", f"add {name}", *extra, env=env)
    return git(repo, "log", "-1", "--format=%B")


def test_commits_carry_the_claim_only_while_it_is_held(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    hooks = RunHooks(repo, tmp_path / "hooks", None)
    env = hooks.install()
    assert "Tetherlab" not in commit(repo, env, "a")
    hooks.set_claim(AGENT, "i-7", 7)
    msg = commit(repo, env, "b")
    assert f"Tetherlab-Agent: {AGENT}" in msg and "Tetherlab-Intent: i-7" in msg and "Tetherlab-Fence: 7" in msg
    assert "Tetherlab-Fence: 7" in commit(repo, env, "c", "--no-verify")  # --no-verify skips commit-msg, not this
    hooks.set_claim(AGENT, "i-7", 9)
    git(repo, "commit", "--amend", "-qm", "amended", env=env)
    amended = git(repo, "log", "-1", "--format=%B")
    assert amended.count("Tetherlab-Fence") == 1 and "Tetherlab-Fence: 9" in amended
    hooks.clear_claim()
    assert "Tetherlab" not in commit(repo, env, "d")
    # the developer's own git, outside the agent's environment, never sees our hooks
    hooks.set_claim(AGENT, "i-7", 9)
    assert "Tetherlab" not in commit(repo, {}, "e")
    hooks.remove()
    assert not (tmp_path / "hooks").exists()
    assert git(repo, "config", "--get", "core.hooksPath", check=False).strip() == ""


def test_the_repositorys_own_hooks_keep_running_first(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    own = repo / ".husky"  # a repository that keeps its hooks in a tracked folder
    own.mkdir()
    git(repo, "config", "core.hooksPath", ".husky")
    (own / "prepare-commit-msg").write_text('#!/bin/sh\necho "Signed-off-by: A <a@example.com>" >> "$1"\n')
    (own / "pre-commit").write_text("#!/bin/sh\n[ ! -e forbidden ] || { echo forbidden file >&2; exit 1; }\n")
    for h in own.iterdir():
        h.chmod(0o755)
    hooks = RunHooks(repo, tmp_path / "hooks", None)
    env = hooks.install()
    hooks.set_claim(AGENT, "i-3", 3)
    msg = commit(repo, env, "a")
    assert "Signed-off-by: A" in msg and "Tetherlab-Intent: i-3" in msg
    (repo / "forbidden").write_text("x")
    git(repo, "add", "forbidden", env=env)
    out = git(repo, "commit", "-qm", "nope", env=env, check=False)
    assert "forbidden file" in out  # the repository's pre-commit still refuses
    assert not list((tmp_path / "hooks").glob("pre-rebase"))  # no wrapper for hooks it does not have


def test_a_push_is_verified_before_anything_is_sent(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    remote = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", str(remote))
    git(repo, "remote", "add", "origin", str(remote))
    seen = tmp_path / "seen"
    verify = tmp_path / "verify.sh"
    verify.write_text(f'#!/bin/sh\ncat > {seen}\necho "$@" >> {seen}\necho "tetherlab: refusing" >&2\nexit 1\n')
    verify.chmod(0o755)
    hooks = RunHooks(repo, tmp_path / "hooks", [str(verify), "--pre-push", "--cluster", "c.toml"])
    env = hooks.install()
    out = git(repo, "push", "origin", "main", env=env, check=False)
    assert "tetherlab: refusing" in out and "failed to push" in out
    assert git(remote, "rev-parse", "--verify", "-q", "main", check=False).strip() == ""
    text = seen.read_text()
    assert "refs/heads/main" in text and "--pre-push --cluster c.toml --repo" in text
    verify.write_text("#!/bin/sh\ncat > /dev/null\nexit 0\n")
    git(repo, "push", "-q", "origin", "main", env=env)
    assert git(remote, "rev-parse", "main").strip() == git(repo, "rev-parse", "HEAD").strip()


def test_an_environment_that_already_configures_git_keeps_its_entries(tmp_path: Path) -> None:
    hooks = RunHooks(tmp_path, tmp_path / "h", None)
    env = hooks.environment({"GIT_CONFIG_COUNT": "2", "GIT_CONFIG_KEY_0": "a.b", "GIT_CONFIG_VALUE_0": "1"})
    assert env == {"GIT_CONFIG_COUNT": "3", "GIT_CONFIG_KEY_2": "core.hooksPath",
                   "GIT_CONFIG_VALUE_2": str(tmp_path / "h")}
