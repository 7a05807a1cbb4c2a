"""The agent's working state since its intent's base, as the master wants it: which files
changed (committed, staged, unstaged and untracked, respecting ``.gitignore``), which symbols each
change touches, and the changed line ranges. Never file contents: only paths, symbol names and
line numbers leave the machine.

Symbols come from a parser given as a function (``tetherlab.cluster.ops.codeparse`` with its
tree-sitter grammars: Python, TypeScript/JavaScript, Go, Rust); a change touches the symbols
whose line ranges overlap its hunks, in the new text (added or modified) and in the base's text
(removed). A file whose only removed symbol and only added symbol are of one kind reports a
rename.

Everything is bounded: files per report, symbols and hunks per file, the size of a file parsed,
the bytes git may print; what does not fit is dropped and the report says it is truncated.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

FILES_MAX = 512
SYMBOLS_PER_FILE_MAX = 128
HUNKS_PER_FILE_MAX = 64
PARSE_BYTES_MAX = 1024 * 1024  # larger files report paths and hunks, no symbols
GIT_OUTPUT_MAX_BYTES = 8 * 1024 * 1024
GIT_TIMEOUT_S = 20.0
_HUNK = re.compile(rb"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


class ParsedSymbol(Protocol):
    name: str
    kind: str
    start: int
    end: int


Parse = Callable[[bytes, str], Sequence[ParsedSymbol]]  # (source, language) -> symbols
LanguageOf = Callable[[str], "str | None"]


@dataclass
class FileChanges:
    path: str
    change: str  # added | modified | deleted | renamed
    old_path: str | None = None
    hunks: list[tuple[int, int]] = field(default_factory=list)  # new-side line ranges
    old_hunks: list[tuple[int, int]] = field(default_factory=list)  # base-side line ranges
    symbols: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "change": self.change, "symbols": self.symbols[:SYMBOLS_PER_FILE_MAX],
                               "hunks": [list(h) for h in _merge(self.hunks, HUNKS_PER_FILE_MAX)]}
        if self.old_path is not None:
            out["old_path"] = self.old_path
        return out


@dataclass
class Report:
    files: list[FileChanges]
    truncated: bool

    def to_json(self) -> dict[str, Any]:
        return {"files": [f.to_json() for f in self.files], "truncated": self.truncated}

    def key(self) -> tuple[Any, ...]:
        """What the master would see: equal keys need no new report."""
        return tuple((f.path, f.change, f.old_path, tuple(map(tuple, _merge(f.hunks, HUNKS_PER_FILE_MAX))),
                      tuple((s["name"], s["change"]) for s in f.symbols)) for f in self.files), self.truncated


class GitError(RuntimeError):
    """Returned when git cannot describe the working state."""


def _git(repo: Path, *args: str, check: bool = True) -> bytes:
    r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, timeout=GIT_TIMEOUT_S)
    if check and r.returncode != 0:
        raise GitError(f"git {' '.join(args)}: {r.stderr.decode(errors='replace').strip()}")
    return r.stdout[:GIT_OUTPUT_MAX_BYTES]


def _merge(ranges: Iterable[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """Sorted, overlapping or adjacent ranges joined; past ``limit``, the closest ones join."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    while len(out) > limit:
        gaps = [(out[i + 1][0] - out[i][1], i) for i in range(len(out) - 1)]
        _, i = min(gaps)
        out[i : i + 2] = [(out[i][0], out[i + 1][1])]
    return out


def collect(repo: Path, base: str, parse: Parse | None = None, language_of: LanguageOf | None = None,
            exclude: Iterable[str] = ()) -> Report:
    """The working state of ``repo`` against ``base`` (a commit)."""
    skip = set(exclude)
    files: dict[str, FileChanges] = {}
    fields = _git(repo, "diff", "--name-status", "-M", "-z", base, "--").split(b"\x00")
    i = 0
    while i < len(fields) - 1:
        status = fields[i].decode()
        if not status:
            break
        if status.startswith(("R", "C")):
            old, new = fields[i + 1].decode(errors="replace"), fields[i + 2].decode(errors="replace")
            files[new] = FileChanges(new, "renamed" if status.startswith("R") else "added", old)
            i += 3
            continue
        path = fields[i + 1].decode(errors="replace")
        kind = {"A": "added", "D": "deleted"}.get(status[0], "modified")
        files[path] = FileChanges(path, kind)
        i += 2
    for raw in _git(repo, "ls-files", "--others", "--exclude-standard", "-z").split(b"\x00"):
        if raw:
            path = raw.decode(errors="replace")
            files.setdefault(path, FileChanges(path, "added"))
    chosen = sorted((f for p, f in files.items() if p not in skip), key=lambda f: f.path)
    truncated = len(chosen) > FILES_MAX
    chosen = chosen[:FILES_MAX]
    for f in chosen:
        _hunks(repo, base, f)
        if parse is not None and language_of is not None:
            _symbols(repo, base, f, parse, language_of)
    return Report(chosen, truncated)


def _hunks(repo: Path, base: str, f: FileChanges) -> None:
    if f.change == "added" and f.old_path is None:
        try:
            n = (repo / f.path).read_bytes()[:PARSE_BYTES_MAX].count(b"\n") + 1
        except OSError:
            return
        f.hunks = [(1, n)]
        return
    paths = [f.old_path, f.path] if f.old_path else [f.path]
    out = _git(repo, "diff", "-U0", "--no-color", "-M", base, "--", *paths, check=False)
    for line in out.splitlines():
        m = _HUNK.match(line)
        if not m:
            continue
        a, b = int(m.group(1)), int(m.group(2) or 1)
        c, d = int(m.group(3)), int(m.group(4) or 1)
        if b:
            f.old_hunks.append((a, a + b - 1))
        if d:
            f.hunks.append((c, c + d - 1))


def _overlaps(s: ParsedSymbol, ranges: list[tuple[int, int]]) -> bool:
    return any(s.start <= b and a <= s.end for a, b in ranges)


def _symbols(repo: Path, base: str, f: FileChanges, parse: Parse, language_of: LanguageOf) -> None:
    language = language_of(f.path)
    if language is None:
        return
    new: Sequence[ParsedSymbol] = []
    old: Sequence[ParsedSymbol] = []
    if f.change != "deleted":
        try:
            src = (repo / f.path).read_bytes()
        except OSError:
            src = b""
        if 0 < len(src) <= PARSE_BYTES_MAX:
            new = parse(src, language)
    if f.change != "added" or f.old_path:
        old_src = _git(repo, "show", f"{base}:{f.old_path or f.path}", check=False)
        if 0 < len(old_src) <= PARSE_BYTES_MAX:
            old = parse(old_src, language)
    new_names = {s.name: s for s in new}
    old_names = {s.name: s for s in old}
    touched_new = [s for s in new if _overlaps(s, f.hunks)]
    touched_old = [s for s in old if _overlaps(s, f.old_hunks)]
    added = [s for s in touched_new if s.name not in old_names]
    removed = [s for s in touched_old if s.name not in new_names]
    modified = sorted({s.name for s in touched_new if s.name in old_names} |
                      {s.name for s in touched_old if s.name in new_names})
    out: list[dict[str, Any]] = []
    top_added = [s for s in added if not any(o is not s and o.start <= s.start and s.end <= o.end and o.name in
                                                 {a.name for a in added} for o in added)]
    top_removed = [s for s in removed if not any(o is not s and o.start <= s.start and s.end <= o.end and o.name in
                                                     {r.name for r in removed} for o in removed)]
    if len(top_added) == 1 and len(top_removed) == 1 and top_added[0].kind == top_removed[0].kind:
        out.append({"name": top_added[0].name, "change": "renamed", "old_name": top_removed[0].name})
        added = [s for s in added if s is not top_added[0]]
        removed = [s for s in removed if s is not top_removed[0]]
    out += [{"name": s.name, "change": "added"} for s in added]
    out += [{"name": s.name, "change": "removed"} for s in removed]
    out += [{"name": n, "change": "modified"} for n in modified]
    f.symbols = out[:SYMBOLS_PER_FILE_MAX]
