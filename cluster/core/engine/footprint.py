"""Footprints: what an agent's in-flight code actually touches, beside what its plan claimed.

While an agent holds ``continue``, its shim reports its working state since the intent's base:
each changed file (committed, staged, unstaged, untracked), and for languages with a parser the
symbols each change touches, with hunk line ranges. Never file contents. The engine maps the
report onto the registry (files by the concepts' ``paths``, symbols by their ``symbols``) and
compares it with the intent's claims and with every other active intent's footprint:

- **drift**: the footprint reaches a concept the intent did not claim to modify. A free concept
  is claimed for it (a replan made by the master, with a new fencing token); a concept another
  active intent holds in a conflicting way stops the drifting agent (reverts it when the holder
  modifies the concept: its changes there would have to be undone), unless the concept's
  ``drift = "warn"`` asks only for a warning;
- **soft conflicts**: two active intents changing the same file or the same symbol with no
  concept-level conflict, or one changing a symbol of a concept another active intent relies on.
  Both agents are told; verdicts stay ``continue``.

Pure: this module turns a report into a :class:`Footprint`; the engine decides and records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tetherlab.cluster.core.engine.globs import GlobError, normalise_path
from tetherlab.cluster.core.engine.registry import Registry
from tetherlab.cluster.core.engine.validate import check_int, check_str
from tetherlab.cluster.core.errors import CommandError

FILES_MAX = 512  # changed files in one report (a shim sends the ones it ranks first, says it truncated)
SYMBOLS_PER_FILE_MAX = 128
HUNKS_PER_FILE_MAX = 64
PATH_MAX_CHARS = 1024
SYMBOL_MAX_CHARS = 256
FILE_CHANGES = ("added", "modified", "deleted", "renamed")
SYMBOL_CHANGES = ("added", "removed", "modified", "renamed")
SOFT_PER_INTENT_MAX = 20  # soft conflicts kept on one intent (the most recent)

SOFT_FILE = "file"
SOFT_SYMBOL = "symbol"
SOFT_DEPENDENCY = "dependency"


@dataclass(frozen=True)
class SymbolChange:
    name: str  # as the parser names it: "SessionStore.get", "parse_args"
    change: str = "modified"
    old_name: str | None = None  # for a rename

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "change": self.change}
        if self.old_name is not None:
            out["old_name"] = self.old_name
        return out


@dataclass(frozen=True)
class FileChange:
    path: str
    change: str = "modified"
    old_path: str | None = None
    symbols: tuple[SymbolChange, ...] = ()
    hunks: tuple[tuple[int, int], ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "change": self.change,
                               "symbols": [s.to_json() for s in self.symbols],
                               "hunks": [list(h) for h in self.hunks]}
        if self.old_path is not None:
            out["old_path"] = self.old_path
        return out


def _path(value: Any, field: str) -> str:
    check_str(value, field, PATH_MAX_CHARS)
    try:
        return normalise_path(value).rstrip("/")
    except GlobError as e:
        raise CommandError("bad_field", f"field {field!r}: {e}") from None


_FILE_KEYS = frozenset(("path", "change", "old_path", "symbols", "hunks"))


def _plain_str(value: Any, max_chars: int) -> bool:
    """What check_str accepts, tested without building a field name (exact str only)."""
    return type(value) is str and len(value) <= max_chars and "\x00" not in value and bool(value.strip())


def _plain_path(value: Any) -> str | None:
    if not _plain_str(value, PATH_MAX_CHARS):
        return None
    try:
        return normalise_path(value).rstrip("/")
    except GlobError:
        return None


def _decode_plain(raw: Any) -> tuple[FileChange, ...] | None:
    """decode_files for a well-formed report, or None at the first thing that is not plainly
    valid (then the checked decoder runs and names it). Every replica decodes every report at
    apply, and the shim reports every few seconds per holding agent: naming each field of a valid
    report (an f-string per file, symbol and hunk bound) was a tenth of a report's apply."""
    if type(raw) is not list or len(raw) > FILES_MAX:
        return None
    out: list[FileChange] = []
    seen: set[str] = set()
    for f in raw:
        if type(f) is not dict or not f.keys() <= _FILE_KEYS:
            return None
        path = _plain_path(f.get("path"))
        change = f.get("change", "modified")
        if path is None or path in seen or type(change) is not str or change not in FILE_CHANGES:
            return None
        seen.add(path)
        old = f.get("old_path")
        if old is not None and (old := _plain_path(old)) is None:
            return None
        syms_raw = f.get("symbols", [])
        hunks_raw = f.get("hunks", [])
        if (type(syms_raw) is not list or len(syms_raw) > SYMBOLS_PER_FILE_MAX
                or type(hunks_raw) is not list or len(hunks_raw) > HUNKS_PER_FILE_MAX):
            return None
        syms: list[SymbolChange] = []
        for sym in syms_raw:
            if type(sym) is not dict:
                return None
            name, sc, old_name = sym.get("name"), sym.get("change", "modified"), sym.get("old_name")
            if (not _plain_str(name, SYMBOL_MAX_CHARS) or type(sc) is not str or sc not in SYMBOL_CHANGES
                    or (old_name is not None and not _plain_str(old_name, SYMBOL_MAX_CHARS))):
                return None
            syms.append(SymbolChange(name, sc, old_name))
        hunks: list[tuple[int, int]] = []
        for h in hunks_raw:
            if type(h) is not list or len(h) != 2:
                return None
            a, b = h
            if type(a) is not int or type(b) is not int or not 0 <= a <= b:
                return None
            hunks.append((a, b))
        out.append(FileChange(path, change, old, tuple(syms), tuple(hunks)))
    return tuple(sorted(out, key=lambda x: x.path))


def decode_files(raw: Any) -> tuple[FileChange, ...]:
    """A report's ``files`` to FileChanges, every field checked and named when wrong."""
    plain = _decode_plain(raw)
    return plain if plain is not None else _decode_checked(raw)


def _decode_checked(raw: Any) -> tuple[FileChange, ...]:
    if not isinstance(raw, list | tuple):
        raise CommandError("bad_field", "field 'files' must be a list of changed files")
    if len(raw) > FILES_MAX:
        raise CommandError("too_large", f"field 'files' has more than {FILES_MAX} entries")
    out: list[FileChange] = []
    seen: set[str] = set()
    for i, f in enumerate(raw):
        where = f"files[{i}]"
        if isinstance(f, FileChange):
            f = f.to_json()
        if not isinstance(f, dict):
            raise CommandError("bad_field", f"field {where!r} must be an object")
        extra = sorted(set(f) - {"path", "change", "old_path", "symbols", "hunks"})
        if extra:
            raise CommandError("unknown_field", f"field {where!r} does not take {extra}")
        path = _path(f.get("path"), f"{where}.path")
        if path in seen:
            raise CommandError("bad_field", f"field {where!r}: {path} is listed twice")
        seen.add(path)
        change = f.get("change", "modified")
        if change not in FILE_CHANGES:
            raise CommandError("bad_field", f"field '{where}.change' must be one of {list(FILE_CHANGES)}")
        old = _path(f["old_path"], f"{where}.old_path") if f.get("old_path") is not None else None
        syms_raw = f.get("symbols", [])
        if not isinstance(syms_raw, list | tuple) or len(syms_raw) > SYMBOLS_PER_FILE_MAX:
            raise CommandError("too_large" if isinstance(syms_raw, list | tuple) else "bad_field",
                               f"field '{where}.symbols' must be a list of at most {SYMBOLS_PER_FILE_MAX} symbols")
        syms = []
        for j, s in enumerate(syms_raw):
            sw = f"{where}.symbols[{j}]"
            if not isinstance(s, dict):
                raise CommandError("bad_field", f"field {sw!r} must be an object")
            name = check_str(s.get("name"), f"{sw}.name", SYMBOL_MAX_CHARS)
            sc = s.get("change", "modified")
            if sc not in SYMBOL_CHANGES:
                raise CommandError("bad_field", f"field '{sw}.change' must be one of {list(SYMBOL_CHANGES)}")
            old_name = check_str(s["old_name"], f"{sw}.old_name", SYMBOL_MAX_CHARS) \
                if s.get("old_name") is not None else None
            syms.append(SymbolChange(name, sc, old_name))
        hunks_raw = f.get("hunks", [])
        if not isinstance(hunks_raw, list | tuple) or len(hunks_raw) > HUNKS_PER_FILE_MAX:
            raise CommandError("bad_field", f"field '{where}.hunks' must be a list of at most {HUNKS_PER_FILE_MAX} "
                                            "[start, end] line ranges")
        hunks = []
        for j, h in enumerate(hunks_raw):
            if not isinstance(h, list | tuple) or len(h) != 2:
                raise CommandError("bad_field", f"field '{where}.hunks[{j}]' must be [start, end]")
            a, b = check_int(h[0], f"{where}.hunks[{j}][0]"), check_int(h[1], f"{where}.hunks[{j}][1]")
            if b < a:
                raise CommandError("bad_field", f"field '{where}.hunks[{j}]' ends before it starts")
            hunks.append((a, b))
        out.append(FileChange(path, change, old, tuple(syms), tuple(hunks)))
    return tuple(sorted(out, key=lambda x: x.path))


def symbol_concepts(reg: Registry, name: str) -> list[str]:
    """Concepts a changed symbol belongs to by the registry's ``symbols``: the full dotted name,
    then the class of a ``Class.method``, then the bare last part."""
    norm = name.replace("::", ".")
    for candidate in (norm, norm.split(".", 1)[0] if "." in norm else None, norm.rsplit(".", 1)[-1]):
        if candidate and candidate in reg.symbols:
            return list(reg.symbols[candidate])
    return []


@dataclass(frozen=True)
class Footprint:
    """One report mapped onto the registry: per file its concepts and symbols."""

    files: dict[str, dict[str, Any]]  # path -> {"change", "symbols": [names], "concepts": [ids]}
    concepts: dict[str, str]  # concept -> the first path (or path::symbol) that reaches it

    def to_json(self) -> dict[str, Any]:
        return {"files": self.files, "concepts": dict(sorted(self.concepts.items()))}

    @classmethod
    def from_json(cls, obj: dict[str, Any] | None) -> Footprint:
        obj = obj or {}
        return cls(dict(obj.get("files", {})), dict(obj.get("concepts", {})))

    def symbol_keys(self) -> list[str]:
        """``path::symbol`` of every changed symbol (renames count under both names)."""
        return sorted({f"{p}::{s}" for p, f in self.files.items() for s in f["symbols"]})


def build(reg: Registry | None, files: tuple[FileChange, ...]) -> Footprint:
    out: dict[str, dict[str, Any]] = {}
    reached: dict[str, str] = {}
    for fc in files:
        paths = [fc.path] + ([fc.old_path] if fc.old_path else [])
        concepts: dict[str, None] = {}
        names: dict[str, None] = {}
        for s in fc.symbols:
            names[s.name] = None
            if s.old_name:
                names[s.old_name] = None
        if reg is not None:
            for p in paths:
                for cid, _glob in reg.globs.match(p):
                    concepts.setdefault(cid, None)
                    reached.setdefault(cid, p)
            for n in names:
                for cid in symbol_concepts(reg, n):
                    concepts.setdefault(cid, None)
                    reached.setdefault(cid, f"{fc.path}::{n}")
        out[fc.path] = {"change": fc.change, "symbols": sorted(names), "concepts": sorted(concepts)}
        if fc.old_path:
            out[fc.path]["old_path"] = fc.old_path
    return Footprint(out, reached)
