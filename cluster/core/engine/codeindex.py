"""The code index: the files of the coordinated repository and the symbols each defines, as
matching reads them.

Pure data and look-ups. It is built elsewhere (``tetherlab.cluster.ops.codeindex`` parses the
files with tree-sitter), travels as canonical JSON (``to_json`` / ``from_json``, validated and
bounded), and every replica holds the same one, so matching stays deterministic. Each look-up
costs what the looked-up name costs (dict probes bounded by its parts), never a scan of the
index.

JSON form::

    {"format": 1, "files": {"rich/console.py": [["Console", "class", 1, 2600],
                                                ["Console.print", "method", 1630, 1750], ...],
                            "docs/index.rst": []}}

Symbol names are qualified within their file (``Console.print``, ``RouterCore.matchRoutes``);
lines are 1-based and inclusive. Files the parser does not read (docs, JSON) are listed with no
symbols, so paths can still be checked against them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

INDEX_FORMAT = 1
# Bounds: an index is held in memory on every replica and shipped through the Raft log.
FILES_MAX = 50_000
SYMBOLS_MAX = 400_000
SYMBOLS_PER_FILE_MAX = 5_000
PATH_MAX_CHARS = 500
NAME_MAX_CHARS = 200
KIND_MAX_CHARS = 32
INDEX_MAX_BYTES = 32 * 1024 * 1024
# How an index travels through the Raft log: its canonical JSON, zlib-compressed, base64, cut
# into chunks. Tools cut INDEX_CHUNK_CHARS (one chunk fits a protocol frame with room to spare);
# one command may carry up to INDEX_CHUNK_MAX_CHARS (a whole index proposed from a local file
# through the control socket's engine_file operation).
INDEX_CHUNK_CHARS = 160 * 1024
INDEX_CHUNK_MAX_CHARS = 16 * 1024 * 1024
INDEX_CHUNKS_MAX = 256
DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
_B64_RE = re.compile(r"^[A-Za-z0-9+/=]*$")
# A name defined in more places than this says nothing about where a plan works.
PLACES_MAX = 8

_PATH_RE = re.compile(r"^[^/\x00\\][^\x00\\]*$")
_NAME_RE = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$]*(?:\.[A-Za-z_$#][A-Za-z0-9_$]*)*$")
# Kinds that have members: a new member of one resolves to it.
CONTAINERS = frozenset({"class", "interface", "type", "struct", "enum", "trait", "union", "module"})
# Receivers that name an instance, not a module or a class: "self._lock", "this.options".
RECEIVERS = frozenset({"self", "cls", "this", "super"})
# File names whose module is their directory: a Python package, a JS/TS package entry, Rust.
_ENTRY_STEMS = frozenset({"__init__", "index", "mod", "lib"})
_EXTENSIONS = re.compile(r"\.(?:py|pyi|ts|tsx|mts|cts|js|jsx|mjs|cjs|go|rs)$")


class CodeIndexError(ValueError):
    """A code index that is malformed or too large; the message names what is wrong."""


@dataclass(frozen=True)
class Symbol:
    name: str  # qualified within its file: "Console.print"
    kind: str  # class, function, method, variable, type, interface, field, ...
    start_line: int
    end_line: int

    @property
    def last(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    # The names in-flight change reports read (shim.changes' ParsedSymbol).
    @property
    def start(self) -> int:
        return self.start_line

    @property
    def end(self) -> int:
        return self.end_line

    def contains(self, other: Symbol) -> bool:
        return self.start_line <= other.start_line and other.end_line <= self.end_line and self != other


@dataclass(frozen=True)
class Place:
    """Where a mention resolves: a file, and the symbol in it (None: the file itself)."""

    path: str
    symbol: Symbol | None


def module_names(path: str) -> list[str]:
    """The names a plan may use for a file as a module: its stem (``console``), its dotted path
    (``rich.console``), and for package entries their directory (``rich``)."""
    m = _EXTENSIONS.search(path)
    if m is None:
        return []
    parts = path[: m.start()].split("/")
    out: list[str] = []
    if parts[-1] in _ENTRY_STEMS and len(parts) > 1:
        parts = parts[:-1]
    out.append(parts[-1])
    if len(parts) > 1:
        out.append(".".join(parts))
    return out


class CodeIndex:
    """One version of the code index with its look-up tables, built once."""

    def __init__(self, files: Mapping[str, Sequence[Symbol]]) -> None:
        self.files: dict[str, tuple[Symbol, ...]] = {p: tuple(files[p]) for p in sorted(files)}
        self._qual: dict[str, list[Place]] = {}
        self._last: dict[str, list[Place]] = {}
        self._modules: dict[str, list[str]] = {}
        self._dirs: dict[str, list[str]] = {}
        self._in_file: dict[tuple[str, str], Symbol] = {}
        self._members: dict[tuple[str, str], Symbol] = {}  # (file, member's last name) -> first such member
        self._entries: list[str] = []
        self._by_base: dict[str, list[str]] = {}
        for path, syms in self.files.items():
            self._by_base.setdefault(path.rsplit("/", 1)[-1], []).append(path)
            d = path.rsplit("/", 1)[0] if "/" in path else ""
            self._dirs.setdefault(d, []).append(path)
            for name in module_names(path):
                self._modules.setdefault(name, []).append(path)
            for s in syms:
                place = Place(path, s)
                self._qual.setdefault(s.name, []).append(place)
                if s.last != s.name:
                    self._last.setdefault(s.last, []).append(place)
                self._in_file.setdefault((path, s.name), s)
                if s.last != s.name:
                    self._members.setdefault((path, s.last), s)
        # Parents of listed directories exist too ("src/" when only "src/ssr/x.ts" is listed).
        for d in list(self._dirs):
            while "/" in d:
                d = d.rsplit("/", 1)[0]
                self._dirs.setdefault(d, [])
        shallowest: int | None = None
        for path in self.files:
            stem = path.rsplit("/", 1)[-1]
            if _EXTENSIONS.search(stem) and _EXTENSIONS.sub("", stem) in ("__init__", "index", "lib"):
                depth = path.count("/")
                if shallowest is None or depth < shallowest:
                    shallowest, self._entries = depth, [path]
                elif depth == shallowest:
                    self._entries.append(path)
        self._digest: str | None = None

    # --- look-ups --------------------------------------------------------------------------------

    @property
    def symbol_count(self) -> int:
        return sum(len(s) for s in self.files.values())

    def has_file(self, path: str) -> bool:
        return path in self.files

    def has_dir(self, path: str) -> bool:
        return path.rstrip("/") in self._dirs

    def dir_files(self, path: str) -> list[str]:
        """Files directly in a directory ("" is the root)."""
        return self._dirs.get(path.rstrip("/"), [])

    def find_suffix(self, path: str) -> list[str]:
        """Files whose path ends with ``path`` at a segment boundary ("router.ts",
        "ssr/headers.ts"), at most PLACES_MAX of them."""
        base = path.rsplit("/", 1)[-1]
        cands = self._by_base.get(base, [])
        if "/" in path:
            cands = [c for c in cands if c == path or c.endswith("/" + path)]
        return cands[:PLACES_MAX]

    def entry_files(self) -> list[str]:
        """The package entry modules nearest the root (``pkg/__init__.py``, ``src/index.ts``)."""
        return list(self._entries)

    def defines(self, name: str) -> bool:
        """Whether any file defines ``name`` (qualified, or as a member's last part), however
        many times: for lint, not for matching."""
        n = name.replace("::", ".")
        return n in self._qual or n in self._last or bool(self.resolve(n))

    def symbol_in(self, path: str, name: str) -> Symbol | None:
        return self._in_file.get((path, name))

    def enclosing(self, path: str, sym: Symbol) -> list[Symbol]:
        """Symbols of the same file whose qualified name is a prefix of ``sym``'s, innermost
        first: for ``Console.print`` the class ``Console``."""
        out: list[Symbol] = []
        parts = sym.name.split(".")
        for k in range(len(parts) - 1, 0, -1):
            s = self._in_file.get((path, ".".join(parts[:k])))
            if s is not None:
                out.append(s)
        return out

    def resolve(self, text: str) -> list[Place]:
        """Where a name from a plan is defined: ``Console.print`` (a qualified symbol),
        ``markup.escape`` or ``rich.markup.escape`` (a module and a symbol in it),
        ``Console.new_method`` (the longest known prefix: the class), ``console._live_stack`` (a
        module and a member of a class in it), ``_caller_frame_info`` (a bare name, when it is
        defined in at most PLACES_MAX places). Unknown names resolve to nothing."""
        parts = [p for p in text.replace("::", ".").split(".") if p]
        while parts and parts[0] in RECEIVERS:
            parts = parts[1:]
        if not parts or len(parts) > 12:
            return []
        name = ".".join(parts)
        hit = self._qual.get(name)
        if hit and len(parts) > 1:
            return _bounded(hit)
        if len(parts) > 1:
            # A module, then a symbol in it, or a member of a class in it.
            for k in range(len(parts) - 1, 0, -1):
                files = self._modules.get(".".join(parts[:k]))
                if not files:
                    continue
                rest = parts[k:]
                found: list[Place] = []
                for f in files[:PLACES_MAX]:
                    found.extend(self._in_module(f, rest))
                if found:
                    return _bounded(found)
            # A known class (or other container) and a member the index does not have yet.
            for k in range(len(parts) - 1, 0, -1):
                hit = [p for p in self._qual.get(".".join(parts[:k]), ()) if p.symbol and p.symbol.kind in CONTAINERS]
                if hit:
                    return _bounded(hit)
            return []
        # A bare name: every definition, top-level or member; matching decides if it is clear.
        found = [*self._qual.get(name, ()), *self._last.get(name, ())]
        if not found:
            # A module's own name ("useSearch" for src/useSearch.ts), or a test named after its
            # module by convention ("test_live_screen" tests rich/live.py).
            files = self._modules.get(name, [])
            if not files and name.startswith("test_"):
                words = name[5:].split("_")
                for k in range(len(words), 0, -1):
                    files = self._modules.get("_".join(words[:k]), [])
                    if files:
                        break
            found = [Place(f, None) for f in files]
        return _bounded(found)

    def _in_module(self, path: str, rest: list[str]) -> list[Place]:
        for k in range(len(rest), 0, -1):
            s = self._in_file.get((path, ".".join(rest[:k])))
            if s is not None:
                return [Place(path, s)]
        # A member of a class in the module: "console._live_stack" -> Console._live_stack.
        member = self._members.get((path, rest[0]))
        return [Place(path, member)] if member is not None else []

    def modules(self, name: str) -> list[str]:
        return self._modules.get(name, [])

    # --- JSON ------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "format": INDEX_FORMAT,
            "files": {p: [[s.name, s.kind, s.start_line, s.end_line] for s in syms] for p, syms in self.files.items()},
        }

    def canonical(self) -> bytes:
        return canonical_bytes(self.to_json())

    @property
    def digest(self) -> str:
        """sha256 of the canonical JSON: the identity replicas and tools agree on."""
        if self._digest is None:
            self._digest = hashlib.sha256(self.canonical()).hexdigest()
        return self._digest

    @classmethod
    def from_json(cls, obj: Any) -> CodeIndex:
        """Validate and load; raises CodeIndexError naming the first problem."""
        if not isinstance(obj, Mapping):
            raise CodeIndexError("a code index must be a JSON object")
        if obj.get("format") != INDEX_FORMAT:
            raise CodeIndexError(f"code index format must be {INDEX_FORMAT}, got {obj.get('format')!r}")
        extra = sorted(set(obj) - {"format", "files"})
        if extra:
            raise CodeIndexError(f"code index has unknown field(s) {extra}")
        files = obj.get("files")
        if not isinstance(files, Mapping):
            raise CodeIndexError("code index field 'files' must be an object of path -> symbols")
        if len(files) > FILES_MAX:
            raise CodeIndexError(f"code index lists more than {FILES_MAX} files")
        out: dict[str, list[Symbol]] = {}
        total = 0
        for path, syms in files.items():
            if not isinstance(path, str) or len(path) > PATH_MAX_CHARS or not _PATH_RE.match(path):
                raise CodeIndexError(f"code index path {path!r} must be relative, with '/', at most {PATH_MAX_CHARS}")
            if any(seg in ("", ".", "..") for seg in path.split("/")):
                raise CodeIndexError(f"code index path {path!r} has an empty, '.' or '..' segment")
            if not isinstance(syms, list) or len(syms) > SYMBOLS_PER_FILE_MAX:
                raise CodeIndexError(f"code index file {path!r}: symbols must be a list of at most "
                                     f"{SYMBOLS_PER_FILE_MAX}")
            total += len(syms)
            if total > SYMBOLS_MAX:
                raise CodeIndexError(f"code index has more than {SYMBOLS_MAX} symbols")
            lst: list[Symbol] = []
            for s in syms:
                if (not isinstance(s, list) or len(s) != 4 or not isinstance(s[0], str) or not isinstance(s[1], str)
                        or not all(isinstance(x, int) and not isinstance(x, bool) for x in s[2:])):
                    raise CodeIndexError(f"code index file {path!r}: symbol {s!r} must be [name, kind, start, end]")
                name, kind, start, end = s
                if len(name) > NAME_MAX_CHARS or not _NAME_RE.match(name):
                    raise CodeIndexError(f"code index file {path!r}: {name!r} is not a symbol name")
                if len(kind) > KIND_MAX_CHARS or not 1 <= start <= end:
                    raise CodeIndexError(f"code index file {path!r}: symbol {name!r} has a bad kind or line range")
                lst.append(Symbol(name, kind, start, end))
            out[path] = lst
        return cls(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> CodeIndex:
        if len(data) > INDEX_MAX_BYTES:
            raise CodeIndexError(f"code index is larger than {INDEX_MAX_BYTES} bytes")
        try:
            obj = json.loads(data)
        except ValueError as e:
            raise CodeIndexError(f"code index is not JSON: {e}") from None
        return cls.from_json(obj)


def pack(index: CodeIndex, chunk_chars: int = INDEX_CHUNK_CHARS) -> tuple[str, list[str]]:
    """The index's digest and its chunks for ``install_index`` commands."""
    data = base64.b64encode(zlib.compress(index.canonical(), 9)).decode("ascii")
    chunks = [data[i : i + chunk_chars] for i in range(0, len(data), chunk_chars)] or [""]
    if len(chunks) > INDEX_CHUNKS_MAX:
        raise CodeIndexError(f"the code index needs {len(chunks)} chunks; at most {INDEX_CHUNKS_MAX} are allowed")
    return index.digest, chunks


def unpack(chunks: list[str], digest: str) -> CodeIndex:
    """Reassemble, decompress (bounded), check the digest and validate; raises CodeIndexError."""
    try:
        packed = base64.b64decode("".join(chunks).encode("ascii"), validate=True)
    except (binascii.Error, ValueError):
        raise CodeIndexError("code index chunks are not base64") from None
    d = zlib.decompressobj()
    try:
        data = d.decompress(packed, INDEX_MAX_BYTES + 1)
    except zlib.error as e:
        raise CodeIndexError(f"code index chunks are not zlib data: {e}") from None
    if len(data) > INDEX_MAX_BYTES or d.unconsumed_tail:
        raise CodeIndexError(f"code index is larger than {INDEX_MAX_BYTES} bytes")
    got = hashlib.sha256(data).hexdigest()
    if got != digest:
        raise CodeIndexError(f"code index digest is {got}, not the announced {digest}")
    idx = CodeIndex.from_bytes(data)
    if idx.digest != digest:
        raise CodeIndexError("code index JSON is not in canonical form (sorted keys, no spaces)")
    return idx


def check_chunk(data: str) -> None:
    if len(data) > INDEX_CHUNK_MAX_CHARS:
        raise CodeIndexError(f"an index chunk is longer than {INDEX_CHUNK_MAX_CHARS} characters")
    if not _B64_RE.match(data):
        raise CodeIndexError("an index chunk must be base64 text")


def canonical_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _bounded(places: Iterable[Place]) -> list[Place]:
    out = list(dict.fromkeys(places))
    return out if len(out) <= PLACES_MAX else []
