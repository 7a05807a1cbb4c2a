"""Building the code index of a repository checkout (``tetherlab concepts index``).

Lists the repository's files (``git ls-files`` in a git work tree, so build outputs and other
ignored files stay out; otherwise a walk that skips VCS, dependency and build folders), parses
those a grammar reads with ``ops.codeparse`` and returns a ``core`` ``CodeIndex``. Bounded: at
most ``FILES_MAX`` files and ``SYMBOLS_MAX`` symbols; files above ``PARSE_MAX_BYTES`` are listed
but not parsed; what was left out is reported, never silently dropped.
"""

from __future__ import annotations

import fnmatch
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tetherlab.cluster.core.engine.codeindex import FILES_MAX, PATH_MAX_CHARS, SYMBOLS_MAX, CodeIndex, Symbol
from tetherlab.cluster.ops.codeparse import language_for, parse_symbols

PARSE_MAX_BYTES = 2 * 1024 * 1024
GIT_TIMEOUT_S = 60.0
# Folders a walk never enters: VCS data, dependencies, caches and build outputs.
SKIP_DIRS = frozenset({
    ".git", ".hg", ".svn", "node_modules", "__pycache__", ".venv", "venv", ".tox", ".nox", ".mypy_cache",
    ".pytest_cache", ".ruff_cache", "dist", "build", "out", "coverage", "target", ".next", ".cache",
    ".tetherlab", ".idea", ".vscode",
})


class IndexBuildError(Exception):
    """The repository cannot be indexed (not a directory, unreadable); the message says why."""


@dataclass
class BuildReport:
    files: int = 0
    parsed: int = 0
    symbols: int = 0
    skipped_large: list[str] = field(default_factory=list)
    truncated: bool = False  # FILES_MAX or SYMBOLS_MAX reached

    def to_json(self) -> dict[str, object]:
        return {"files": self.files, "parsed": self.parsed, "symbols": self.symbols,
                "skipped_large": self.skipped_large[:20], "skipped_large_count": len(self.skipped_large),
                "truncated": self.truncated}


def list_files(root: Path, exclude: tuple[str, ...] = ()) -> list[str]:
    """Repository-relative paths with '/', sorted: tracked files in a git work tree, else a walk."""
    if not root.is_dir():
        raise IndexBuildError(f"{root} is not a directory")
    paths: list[str] | None = None
    if (root / ".git").exists():
        try:
            out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
                                  "--exclude-standard"], capture_output=True, timeout=GIT_TIMEOUT_S, check=True)
            paths = [p for p in out.stdout.decode("utf-8", errors="replace").split("\0") if p]
        except (OSError, subprocess.SubprocessError):
            paths = None  # no git, or not a work tree after all: walk instead
    if paths is None:
        paths = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
            rel = Path(dirpath).relative_to(root).as_posix()
            for f in filenames:
                paths.append(f if rel == "." else f"{rel}/{f}")
    keep = [p for p in paths if len(p) <= PATH_MAX_CHARS and not any(fnmatch.fnmatch(p, g) for g in exclude)]
    return sorted(set(keep))


def build_index(root: Path, exclude: tuple[str, ...] = ()) -> tuple[CodeIndex, BuildReport]:
    """Index the files under ``root`` (paths relative to it, as the registry's globs are)."""
    report = BuildReport()
    files: dict[str, list[Symbol]] = {}
    total = 0
    for rel in list_files(root, exclude):
        if len(files) >= FILES_MAX:
            report.truncated = True
            break
        syms: list[Symbol] = []
        lang = language_for(rel)
        if lang is not None:
            path = root / rel
            try:
                if path.is_symlink() or not path.is_file():
                    continue
                if path.stat().st_size > PARSE_MAX_BYTES:
                    report.skipped_large.append(rel)
                else:
                    syms = parse_symbols(path.read_bytes(), lang)
                    report.parsed += 1
            except OSError as e:
                raise IndexBuildError(f"cannot read {path}: {e.strerror}") from None
        if total + len(syms) > SYMBOLS_MAX:
            syms = syms[: max(0, SYMBOLS_MAX - total)]
            report.truncated = True
        total += len(syms)
        files[rel] = syms
    report.files, report.symbols = len(files), total
    return CodeIndex(files), report
