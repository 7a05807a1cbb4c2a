"""The concept registry: parsing ``.tetherlab/concepts.toml``, validation, JSON form, and the
indexes matching needs (alias phrases, symbols, path globs, dependents).

A ``Registry`` is immutable: a push builds a new one and swaps it in whole, so a failed push
leaves the current one untouched.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tetherlab.cluster.core.engine import text
from tetherlab.cluster.core.engine.globs import GlobError, GlobIndex, compile_glob
from tetherlab.cluster.core.errors import Problem, RegistryError

# Bounds keep one registry entry, and the Raft entry that carries it, a sane size.
CONCEPTS_MAX = 100_000
ID_MAX_CHARS = 128
TITLE_MAX_CHARS = 200
DESCRIPTION_MAX_CHARS = 4000
LIST_MAX_ITEMS = 64
PHRASE_MAX_CHARS = 200
PHRASE_MAX_WORDS = 12

POLICY_STOP = "stop"
POLICY_CONTINUE = "continue"
POLICIES = (POLICY_STOP, POLICY_CONTINUE)
# What an agent's in-flight changes reaching this concept without a claim (drift) do when the
# concept is held by someone else: stop (or revert) the drifting agent, or only warn both.
DRIFT_STOP = "stop"
DRIFT_WARN = "warn"
DRIFT_POLICIES = (DRIFT_STOP, DRIFT_WARN)

ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*(?:\.[a-z0-9][a-z0-9_-]*)*$")
SYMBOL_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:(?:\.|::)[A-Za-z_][A-Za-z0-9_]*)*$")

_LIST_FIELDS = ("paths", "symbols", "aliases", "depends_on")
_STR_FIELDS = ("title", "description", "dependents", "drift")
FIELDS = ("id", *_STR_FIELDS, *_LIST_FIELDS)


@dataclass(frozen=True)
class Concept:
    id: str
    title: str = ""
    description: str = ""
    paths: tuple[str, ...] = ()
    symbols: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    depends_on: tuple[str, ...] = ()
    # Whether depending on this concept while another intent modifies it stops (the default)
    # or continues with context; applies both ways round.
    dependents: str = POLICY_STOP
    drift: str = DRIFT_STOP

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "description": self.description,
            "paths": list(self.paths),
            "symbols": list(self.symbols),
            "aliases": list(self.aliases),
            "depends_on": list(self.depends_on),
            "dependents": self.dependents,
            # Only when not the default: records pushed before the field existed stay the same.
            **({"drift": self.drift} if self.drift != DRIFT_STOP else {}),
        }


def _check_concept(raw: Any, where: str, problems: list[Problem]) -> Concept | None:
    """One concept table to a Concept, appending a Problem per bad field."""
    if not isinstance(raw, Mapping):
        problems.append(Problem(where, "concept", f"must be a table, got {type(raw).__name__}"))
        return None
    cid = raw.get("id")
    if cid is None:
        problems.append(Problem(where, "id", "is missing"))
        return None
    if not isinstance(cid, str):
        problems.append(Problem(where, "id", f"must be a string, got {type(cid).__name__}"))
        return None
    name = cid
    ok = True
    if len(cid) > ID_MAX_CHARS or not ID_RE.match(cid):
        problems.append(
            Problem(name, "id", "must be dotted lowercase words like 'auth.session-store-contract'")
        )
        ok = False
    for key in sorted(set(raw) - set(FIELDS), key=str):
        problems.append(Problem(name, str(key), f"is not a concept field (fields: {', '.join(FIELDS)})"))
        ok = False
    values: dict[str, Any] = {}
    for f in _STR_FIELDS:
        v = raw.get(f, Concept.__dataclass_fields__[f].default)
        if not isinstance(v, str):
            problems.append(Problem(name, f, f"must be a string, got {type(v).__name__}"))
            ok = False
            continue
        values[f] = v
    if len(values.get("title", "")) > TITLE_MAX_CHARS:
        problems.append(Problem(name, "title", f"is longer than {TITLE_MAX_CHARS} characters"))
        ok = False
    if len(values.get("description", "")) > DESCRIPTION_MAX_CHARS:
        problems.append(Problem(name, "description", f"is longer than {DESCRIPTION_MAX_CHARS} characters"))
        ok = False
    if "dependents" in values and values["dependents"] not in POLICIES:
        problems.append(Problem(name, "dependents", f"must be one of {list(POLICIES)}, got {values['dependents']!r}"))
        ok = False
    if "drift" in values and values["drift"] not in DRIFT_POLICIES:
        problems.append(Problem(name, "drift", f"must be one of {list(DRIFT_POLICIES)}, got {values['drift']!r}"))
        ok = False
    for f in _LIST_FIELDS:
        v = raw.get(f, [])
        if not isinstance(v, list | tuple) or not all(isinstance(x, str) for x in v):
            problems.append(Problem(name, f, "must be a list of strings"))
            ok = False
            continue
        if len(v) > LIST_MAX_ITEMS:
            problems.append(Problem(name, f, f"has more than {LIST_MAX_ITEMS} entries"))
            ok = False
            continue
        values[f] = tuple(v)
    for glob in values.get("paths", ()):
        try:
            compile_glob(glob)
        except GlobError as e:
            problems.append(Problem(name, "paths", f"bad glob: {e}"))
            ok = False
    for sym in values.get("symbols", ()):
        if not SYMBOL_RE.match(sym):
            problems.append(
                Problem(name, "symbols", f"{sym!r} is not an identifier like 'SessionStore' or 'auth.get_session'")
            )
            ok = False
    for alias in values.get("aliases", ()):
        n = len(text.phrase_words(alias))
        if len(alias) > PHRASE_MAX_CHARS or n > PHRASE_MAX_WORDS or n == 0:
            problems.append(Problem(name, "aliases", f"{alias!r} must have 1 to {PHRASE_MAX_WORDS} words"))
            ok = False
    for dep in values.get("depends_on", ()):
        if dep == cid:
            problems.append(Problem(name, "depends_on", "a concept cannot depend on itself"))
            ok = False
    if not ok:
        return None
    return Concept(id=cid, **values)


def validate_concepts(raw_concepts: Iterable[Any]) -> tuple[Concept, ...]:
    """Validate concept tables (from TOML or JSON) and return them sorted by id; raises
    RegistryError listing every problem (each names the concept and the field)."""
    problems: list[Problem] = []
    concepts: dict[str, Concept] = {}
    seen: set[str] = set()
    raw_list = list(raw_concepts)
    if len(raw_list) > CONCEPTS_MAX:
        raise RegistryError([Problem("*", "concept", f"more than {CONCEPTS_MAX} concepts")])
    for i, raw in enumerate(raw_list):
        c = _check_concept(raw, f"#{i + 1}", problems)
        rid = raw.get("id") if isinstance(raw, Mapping) else None
        if isinstance(rid, str):
            if rid in seen:
                problems.append(Problem(rid, "id", f"duplicate id (concept #{i + 1} repeats it)"))
                continue
            seen.add(rid)
        if c is not None:
            concepts[c.id] = c
    for cid in sorted(concepts):
        for dep in concepts[cid].depends_on:
            if dep not in seen:
                problems.append(Problem(cid, "depends_on", f"unknown concept {dep!r}"))
    if not problems:
        cycle = _find_cycle(concepts)
        if cycle:
            problems.append(Problem(cycle[0], "depends_on", "dependency cycle: " + " -> ".join(cycle)))
    if problems:
        raise RegistryError(problems)
    return tuple(concepts[cid] for cid in sorted(concepts))


def _find_cycle(concepts: Mapping[str, Concept]) -> list[str] | None:
    """The first dependency cycle in id order, as a path that ends where it starts."""
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(concepts, white)
    for start in sorted(concepts):
        if color[start] != white:
            continue
        # Iterative DFS: registries are big enough that recursion depth could matter.
        stack: list[tuple[str, int]] = [(start, 0)]
        path: list[str] = [start]
        color[start] = grey
        while stack:
            node, i = stack[-1]
            deps = concepts[node].depends_on
            if i < len(deps):
                stack[-1] = (node, i + 1)
                nxt = deps[i]
                if color[nxt] == grey:
                    return [*path[path.index(nxt) :], nxt]
                if color[nxt] == white:
                    color[nxt] = grey
                    stack.append((nxt, 0))
                    path.append(nxt)
            else:
                color[node] = black
                stack.pop()
                path.pop()
    return None


def load_toml(source: str) -> list[Any]:
    """The raw ``[[concept]]`` tables of a ``concepts.toml`` text, not yet validated."""
    try:
        doc = tomllib.loads(source)
    except tomllib.TOMLDecodeError as e:
        raise RegistryError([Problem("*", "toml", f"not valid TOML: {e}")]) from None
    extra = sorted(set(doc) - {"concept"})
    if extra:
        raise RegistryError([Problem("*", k, "unknown top-level key (expected [[concept]] tables)") for k in extra])
    raw = doc.get("concept", [])
    if not isinstance(raw, list):
        raise RegistryError([Problem("*", "concept", "must be an array of tables: [[concept]]")])
    return raw


def parse_toml(source: str) -> tuple[Concept, ...]:
    """Parse and validate the text of ``.tetherlab/concepts.toml``."""
    return validate_concepts(load_toml(source))


# A marker key in the alias trie: never a word, since words are [a-z0-9]+.
_END = "$"


class Registry:
    """One version of the concept registry with its matching indexes, built once."""

    def __init__(self, concepts: Iterable[Concept], version: int) -> None:
        self.version = version
        self.concepts: dict[str, Concept] = {c.id: c for c in sorted(concepts, key=lambda c: c.id)}
        self.ids: list[str] = list(self.concepts)
        # Trie over normalised words: cost of a walk is bounded by the phrase length, however
        # many concepts share a first word.
        self.phrases: dict[str, Any] = {}
        self.symbols: dict[str, list[str]] = {}
        self.globs = GlobIndex()
        self.dependents_of: dict[str, list[str]] = {}
        for c in self.concepts.values():
            for phrase, kind in [*((a, "alias") for a in c.aliases), (c.id, "id")]:
                self._add_phrase(text.phrase_words(phrase), c.id, kind, phrase)
            for sym in c.symbols:
                norm = sym.replace("::", ".")
                self._add_symbol(norm, c.id)
                last = norm.rsplit(".", 1)[-1]
                # A bare last part counts only if it looks like code, or "get" would match prose.
                if last != norm and text.looks_like_code(last):
                    self._add_symbol(last, c.id)
            for glob in c.paths:
                self.globs.add(glob, c.id)
            for dep in c.depends_on:
                self.dependents_of.setdefault(dep, []).append(c.id)

    def _add_phrase(self, ws: tuple[str, ...], cid: str, kind: str, phrase: str) -> None:
        if not ws:
            return
        node = self.phrases
        for w in ws:
            node = node.setdefault(w, {})
        hits = node.setdefault(_END, [])
        if all(h[0] != cid for h in hits):
            hits.append((cid, kind, phrase))

    def _add_symbol(self, sym: str, cid: str) -> None:
        lst = self.symbols.setdefault(sym, [])
        if cid not in lst:
            lst.append(cid)

    def policy(self, cid: str) -> str:
        c = self.concepts.get(cid)
        return c.dependents if c is not None else POLICY_STOP

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "concepts": [c.to_json() for c in self.concepts.values()]}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Registry:
        return cls(validate_concepts(obj["concepts"]), int(obj["version"]))


def concept_from_json(obj: Mapping[str, Any]) -> Concept:
    """A stored concept record back to a Concept (trusted: it was validated when pushed)."""
    return Concept(
        id=obj["id"],
        title=obj["title"],
        description=obj["description"],
        paths=tuple(obj["paths"]),
        symbols=tuple(obj["symbols"]),
        aliases=tuple(obj["aliases"]),
        depends_on=tuple(obj["depends_on"]),
        dependents=obj["dependents"],
        drift=obj.get("drift", DRIFT_STOP),
    )


def match_phrases(reg: Registry, ws: tuple[str, ...]) -> list[tuple[int, int, list[tuple[str, str, str]]]]:
    """Leftmost-longest phrase matches in a word sequence: (start, end, [(concept, kind, phrase)])."""
    out: list[tuple[int, int, list[tuple[str, str, str]]]] = []
    root = reg.phrases
    i, n = 0, len(ws)
    while i < n:
        node = root.get(ws[i])
        best: tuple[int, list[tuple[str, str, str]]] | None = None
        j = i
        while node is not None:
            j += 1
            hits = node.get(_END)
            if hits:
                best = (j, hits)
            if j >= n:
                break
            node = node.get(ws[j])
        if best is not None:
            out.append((i, best[0], best[1]))
            i = best[0]
        else:
            i += 1
    return out
