"""The working state a shim reports (shim/changes.py), from a real git repository: committed,
staged, unstaged and untracked changes since the base, ignored files left out, hunks, and the
symbols each change touches (here with a small stand-in parser; the tree-sitter one is tested
with the code index)."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tetherlab.shim.changes import FILES_MAX, _merge, collect


@dataclass(frozen=True)
class Sym:
    name: str
    kind: str
    start: int
    end: int


def toy_parse(source: bytes, language: str) -> list[Sym]:
    """Top-level ``def``/``class`` blocks of Python, by indentation."""
    lines = source.decode().splitlines()
    starts = [(i + 1, m.group(1), m.group(2)) for i, ln in enumerate(lines)
              if (m := re.match(r"(def|class) (\w+)", ln))]
    out = []
    for k, (line, kind, name) in enumerate(starts):
        end = starts[k + 1][0] - 1 if k + 1 < len(starts) else len(lines)
        out.append(Sym(name, "function" if kind == "def" else "class", line, end))
    return out


def lang(path: str) -> str | None:
    return "python" if path.endswith(".py") else None


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          timeout=30).stdout


def repo_with_base(tmp: Path) -> tuple[Path, str]:
    repo = tmp / "r"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "a@b")
    git(repo, "config", "user.name", "a")
    (repo / ".gitignore").write_text("build/\n")
    (repo / "app.py").write_text("def load():\n    return 1\n\n\ndef save():\n    return 2\n")
    (repo / "old.py").write_text("def gone():\n    pass\n")
    (repo / "keep.txt").write_text("x\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "base")
    return repo, git(repo, "rev-parse", "HEAD").strip()


def test_every_kind_of_change_since_the_base_is_reported_without_contents(tmp_path: Path) -> None:
    repo, base = repo_with_base(tmp_path)
    (repo / "app.py").write_text("def load():\n    return 10\n\n\ndef save():\n    return 2\n")
    git(repo, "commit", "-qam", "agent commit")  # committed since the base
    (repo / "staged.py").write_text("def fresh():\n    pass\n")
    git(repo, "add", "staged.py")  # staged
    (repo / "keep.txt").write_text("y\n")  # unstaged
    (repo / "untracked.py").write_text("class Thing:\n    pass\n")  # untracked
    (repo / "build").mkdir()
    (repo / "build" / "out.py").write_text("ignored\n")  # ignored
    (repo / "old.py").unlink()
    rep = collect(repo, base, toy_parse, lang, exclude=["CLAUDE.md"])
    by = {f.path: f for f in rep.files}
    assert set(by) == {"app.py", "staged.py", "keep.txt", "untracked.py", "old.py"}
    assert by["app.py"].change == "modified" and by["app.py"].hunks == [(2, 2)]
    assert by["app.py"].symbols == [{"name": "load", "change": "modified"}]
    assert by["staged.py"].symbols == [{"name": "fresh", "change": "added"}]
    assert by["untracked.py"].change == "added" and by["untracked.py"].symbols[0]["name"] == "Thing"
    assert by["old.py"].change == "deleted" and by["old.py"].symbols == [{"name": "gone", "change": "removed"}]
    assert by["keep.txt"].symbols == []
    text = str(rep.to_json())
    assert "return 10" not in text and "pass" not in text  # paths, names and line numbers only


def test_a_renamed_function_is_reported_as_a_rename(tmp_path: Path) -> None:
    repo, base = repo_with_base(tmp_path)
    (repo / "app.py").write_text("def fetch():\n    return 1\n\n\ndef save():\n    return 2\n")
    (f,) = collect(repo, base, toy_parse, lang).files
    assert f.symbols == [{"name": "fetch", "change": "renamed", "old_name": "load"}]


def test_renamed_files_carry_their_old_path(tmp_path: Path) -> None:
    repo, base = repo_with_base(tmp_path)
    git(repo, "mv", "app.py", "application.py")
    (f,) = collect(repo, base, toy_parse, lang).files
    assert f.change == "renamed" and f.old_path == "app.py" and f.path == "application.py"
    assert f.to_json()["old_path"] == "app.py"


def test_reports_are_bounded(tmp_path: Path) -> None:
    repo, base = repo_with_base(tmp_path)
    for i in range(FILES_MAX + 5):
        (repo / f"f{i:04d}.txt").write_text("x\n")
    rep = collect(repo, base)
    assert rep.truncated and len(rep.files) == FILES_MAX
    assert _merge([(1, 1), (2, 3), (10, 12), (20, 20), (22, 25)], 2) == [(1, 12), (20, 25)]


def test_an_unchanged_state_has_an_unchanged_key(tmp_path: Path) -> None:
    repo, base = repo_with_base(tmp_path)
    (repo / "keep.txt").write_text("y\n")
    a, b = collect(repo, base), collect(repo, base)
    assert a.key() == b.key()
    (repo / "keep.txt").write_text("z\nzz\n")
    assert collect(repo, base).key() != a.key()
