"""Path globs for concept ``paths``: gitignore-like syntax, compiled once per registry, and an
index by literal leading directories so a file is tested only against globs that could match.

Syntax: ``*`` and ``?`` within one path segment, ``[abc]`` / ``[!abc]`` classes, ``**`` as a
whole segment for any number of segments, and a trailing ``/`` meaning everything below.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

GLOB_MAX_CHARS = 512
_WILD = re.compile(r"[*?\[]")


class GlobError(ValueError):
    """Returned when a glob is malformed; the message says why."""


def normalise_path(path: str) -> str:
    """A repository-relative path as matching sees it; raises GlobError for paths outside it."""
    p = path.strip()
    while p.startswith("./"):
        p = p[2:]
    if not p:
        raise GlobError("empty path")
    if p.startswith("/") or "\\" in p:
        raise GlobError(f"path {path!r} must be relative to the repository root, with '/' separators")
    if any(seg in ("..", "") for seg in p.rstrip("/").split("/")):
        raise GlobError(f"path {path!r} has an empty or '..' segment")
    return p


def _segment_regex(seg: str, glob: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(seg):
        c = seg[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = seg.find("]", i + 2 if seg[i + 1 : i + 2] in ("!", "^") else i + 1)
            if end < 0:
                raise GlobError(f"glob {glob!r} has an unclosed '['")
            body = seg[i + 1 : end]
            neg = body[:1] in ("!", "^")
            body = body[1:] if neg else body
            if not body:
                raise GlobError(f"glob {glob!r} has an empty character class")
            out.append("[" + ("^" if neg else "") + body.replace("\\", "\\\\").replace("/", "") + "]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


@lru_cache(maxsize=1 << 17)
def compile_glob(glob: str) -> re.Pattern[str]:
    """Compile a glob to an anchored regex; raises GlobError naming what is wrong. Memoised:
    validation and the registry's index compile the same globs."""
    if not isinstance(glob, str) or not glob.strip():
        raise GlobError("empty glob")
    if len(glob) > GLOB_MAX_CHARS:
        raise GlobError(f"glob is longer than {GLOB_MAX_CHARS} characters")
    g = glob.strip()
    while g.startswith("./"):
        g = g[2:]
    if g.startswith("/") or "\\" in g:
        raise GlobError(f"glob {glob!r} must be relative to the repository root, with '/' separators")
    if g.endswith("/"):
        g += "**"
    segs = g.split("/")
    parts: list[str] = []
    for seg in segs:
        if seg in ("", ".", ".."):
            raise GlobError(f"glob {glob!r} has an empty, '.' or '..' segment")
        if "**" in seg and seg != "**":
            raise GlobError(f"glob {glob!r}: '**' must be a whole path segment")
        parts.append("**" if seg == "**" else _segment_regex(seg, glob))
    rx = ""
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        if p == "**":
            rx += ".*" if last else "(?:[^/]+/)*"
        else:
            rx += p + ("" if last else "/")
    return re.compile(rx)


def literal_prefix(glob: str) -> tuple[str, ...]:
    """The leading segments of a glob that have no wildcard (its fixed directories)."""
    g = glob.strip()
    while g.startswith("./"):
        g = g[2:]
    segs = g.rstrip("/").split("/")
    out: list[str] = []
    for seg in segs[:-1] if not g.endswith("/") else segs:
        if _WILD.search(seg):
            break
        out.append(seg)
    return tuple(out)


@dataclass
class _Node:
    children: dict[str, _Node] = field(default_factory=dict)
    globs: list[tuple[re.Pattern[str], str, str]] = field(default_factory=list)  # (rx, glob, concept)


class GlobIndex:
    """Globs filed under their literal leading directories: matching a file walks its own
    directories and tests only the globs filed along that walk, so cost follows path depth and
    the globs that share its directories, not the size of the registry."""

    def __init__(self) -> None:
        self._root = _Node()

    def add(self, glob: str, concept: str) -> None:
        node = self._root
        for seg in literal_prefix(glob):
            node = node.children.setdefault(seg, _Node())
        node.globs.append((compile_glob(glob), glob, concept))

    def match(self, path: str) -> list[tuple[str, str]]:
        """(concept, glob) pairs whose glob matches ``path``, in a stable order."""
        out: list[tuple[str, str]] = []
        node: _Node | None = self._root
        segs = path.split("/")
        depth = 0
        while node is not None:
            for rx, glob, concept in node.globs:
                if rx.fullmatch(path):
                    out.append((concept, glob))
            if depth >= len(segs) - 1:
                break
            node = node.children.get(segs[depth])
            depth += 1
        return out
