"""Matching: an intent's text, files and explicit concepts to claims on registry concepts.

1. **Read the plan** (``plantext``): every token of the summary and steps gets a role, modify,
   depend or none, from the grammar of its clause ("Add X to Y", "wrap Z", "do not change W").
2. **Find what each mention names**:
   - code (``Console._caller_frame_info``, ``markup.escape``, ``RouterCore.matchRoute``, a
     ``Table`` written as a class name): the registry's ``symbols`` first, then the code index,
     which finds the file that defines it and the symbol that encloses it (a registered class
     claims its new and unregistered members), then that file's concepts by ``paths``;
   - paths (``src/router.ts``, ``router.ts``, ``package.json``): the file, then its concepts by
     ``paths``; a new file belongs to the concept whose glob covers it, or to the one concept
     that owns every file of the directory it is created in;
   - alias phrases and ids written out: several words anywhere; a single plain word only as the
     head of its noun phrase ("the table", not "lookup table" or "table row").
3. **Decide**: a concept with a modify mention is modified; one with only depend mentions is
   depended on. A file named only as the home of a symbol the same step names ("Add
   `Console.x` in `rich/console.py`") claims nothing by itself: the symbol's concept does.
   Every direct ``depends_on`` of a modified concept is a dependency.
4. **Explicit claims** (``concepts.modify`` / ``concepts.depend``) are the agent's word and
   win; a modify the text clearly shows (a file it edits) is added to them;
   disagreements are listed in ``checks`` with reasons.

Cost follows the plan's length and what it names: dict and trie look-ups per token, never a
scan of the registry or the index. The same registry, index and intent give the same claims.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from tetherlab.cluster.core.engine import plantext
from tetherlab.cluster.core.engine.codeindex import CodeIndex, Place, module_names
from tetherlab.cluster.core.engine.globs import GlobError, normalise_path
from tetherlab.cluster.core.engine.model import IntentBody
from tetherlab.cluster.core.engine.plantext import (
    ADDED,
    CODE,
    DEPEND,
    FOR_NAME,
    FRONTED_READ,
    MODIFY,
    NONE,
    PATH,
    TESTED,
    WORD,
    Token,
)
from tetherlab.cluster.core.engine.registry import Registry
from tetherlab.cluster.core.engine.text import stem
from tetherlab.cluster.core.errors import CommandError

# Reasons per claim kept in a verdict: enough to explain, bounded so verdicts stay small.
REASONS_PER_CLAIM_MAX = 8
IMPLIED_MAX = 200
CHECKS_MAX = 20
# A bare name defined under more concepts than this says nothing about where the plan works.
BARE_CONCEPTS_MAX = 1
# Matching reads this much of a plan's text (summary first, then the steps in order): a long
# agent plan is a few thousand characters; this bounds one verdict's work whatever is sent.
PLAN_CHARS_MAX = 10_000
_TRIE_END = "$"


def _reason(kind: str, detail: str, source: str) -> dict[str, str]:
    return {"kind": kind, "detail": detail, "source": source}


@dataclass
class _Evidence:
    modify: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    depend: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    strong_modify: set[str] = field(default_factory=set)  # by a file the plan edits
    symbols: dict[str, None] = field(default_factory=dict)
    files: dict[str, None] = field(default_factory=dict)

    def add(self, cid: str, role: str, reason: dict[str, str], strong: bool = False) -> None:
        if role not in (MODIFY, DEPEND):
            return
        table = self.modify if role == MODIFY else self.depend
        rs = table.setdefault(cid, [])
        if len(rs) < REASONS_PER_CLAIM_MAX and reason not in rs:
            rs.append(reason)
        if role == MODIFY and strong:
            self.strong_modify.add(cid)


@dataclass(frozen=True)
class _Mention:
    concepts: tuple[str, ...]
    reason: dict[str, str]
    role: str
    strong: bool
    home: tuple[str, ...] = ()  # files defining the symbol (code mentions)
    multiword: bool = False  # an alias of several words
    path: str = ""  # the file (path mentions)


def match_intent(reg: Registry | None, body: IntentBody, index: CodeIndex | None = None) -> dict[str, Any]:
    """Claims for an intent: ``{"registry_version", "modify": [{"concept",
    "reasons"}], "depend": [...], "files", "symbols", "checks"?}``. Raises CommandError for
    explicit concepts the registry does not have."""
    if reg is None:
        if body.modify or body.depend:
            first = (body.modify or body.depend)[0]
            raise CommandError("unknown_concept", f"concept {first!r} named but no concept registry has been pushed")
        return {"registry_version": 0, "modify": [], "depend": [], "files": list(body.files)[:IMPLIED_MAX],
                "symbols": []}
    for cid, kind in [*((c, MODIFY) for c in body.modify), *((c, DEPEND) for c in body.depend)]:
        if cid not in reg.concepts:
            raise CommandError(
                "unknown_concept",
                f"field 'intent.concepts.{kind}': concept {cid!r} is not in registry version {reg.version}",
            )
    ev = derive(reg, body, index)
    derived_modify = set(ev.modify)
    derived_depend = set(ev.depend) - derived_modify
    reasons: dict[str, list[dict[str, str]]] = {}
    for table in (ev.depend, ev.modify):
        for cid, rs in table.items():
            reasons.setdefault(cid, []).extend(r for r in rs if r not in reasons.get(cid, []))
    checks: list[dict[str, str]] = []
    explicit = bool(body.modify or body.depend)
    if explicit:
        modify = set(body.modify)
        depend = set(body.depend)
        for cid in body.modify:
            reasons.setdefault(cid, []).insert(0, _reason("explicit", cid, "concepts.modify"))
            if cid not in derived_modify:
                checks.append({"concept": cid, "declared": MODIFY,
                               "derived": DEPEND if cid in derived_depend else "none",
                               "note": "declared modify; the plan's text does not show a change to it"})
        for cid in body.depend:
            reasons.setdefault(cid, []).insert(0, _reason("explicit", cid, "concepts.depend"))
            if cid in derived_modify:
                checks.append({"concept": cid, "declared": DEPEND, "derived": MODIFY,
                               "note": "declared depend; the plan's text changes it: "
                                       + "; ".join(r["detail"] for r in ev.modify[cid][:2])})
        for cid in sorted(derived_modify - modify - depend):
            if cid in ev.strong_modify:
                modify.add(cid)  # the text shows the change: a path or a symbol it edits
                checks.append({"concept": cid, "declared": "none", "derived": MODIFY,
                               "note": "not declared; claimed anyway because the plan changes "
                                       + "; ".join(r["detail"] for r in ev.modify[cid][:2])})
            else:
                checks.append({"concept": cid, "declared": "none", "derived": MODIFY,
                               "note": "not declared; the plan's words suggest a change (not claimed)"})
    else:
        modify, depend = derived_modify, derived_depend
    for cid in sorted(modify):
        for dep in reg.concepts[cid].depends_on:
            if dep not in modify:
                depend.add(dep)
                reasons.setdefault(dep, []).append(_reason("depends_on", f"{cid} depends on {dep}", cid))
    depend -= modify
    files: dict[str, None] = dict.fromkeys(body.files)
    files.update(ev.files)
    symbols: dict[str, None] = dict(ev.symbols)
    for cid in sorted(modify):
        c = reg.concepts[cid]
        files.update(dict.fromkeys(c.paths))
        symbols.update(dict.fromkeys(c.symbols))
    out: dict[str, Any] = {
        "registry_version": reg.version,
        "modify": [{"concept": c, "reasons": reasons.get(c, [])[:REASONS_PER_CLAIM_MAX]} for c in sorted(modify)],
        "depend": [{"concept": c, "reasons": reasons.get(c, [])[:REASONS_PER_CLAIM_MAX]} for c in sorted(depend)],
        "files": sorted(files)[:IMPLIED_MAX],
        "symbols": sorted(symbols)[:IMPLIED_MAX],
    }
    if checks:
        out["checks"] = checks[:CHECKS_MAX]
    return out


# --- deriving claims from the text --------------------------------------------------------------


def derive(reg: Registry, body: IntentBody, index: CodeIndex | None) -> _Evidence:
    """Modify and depend evidence per concept from the plan's text and ``files``."""
    ev = _Evidence()
    texts = plantext.analyse(body.summary, body.steps, _interesting(reg, index), _may_name(reg, index),
                             chars_max=PLAN_CHARS_MAX)
    read_only = plantext.read_only(texts)
    tested: list[_Mention] = []
    for text in texts:
        toks = text.tokens
        mentions: list[_Mention] = []
        resolved: set[int] = set()
        for t in toks:
            if t.kind == CODE or (t.kind == WORD and _class_name(t)):
                m = _symbol_mention(reg, index, t, text.source)
                if m is not None:
                    mentions.append(m)
                    resolved.add(id(t))
                    ev.symbols[t.text] = None
            elif t.kind == PATH:
                m = _path_mention(reg, index, t, text.source)
                if m is not None:
                    mentions.append(m)
                    if m.role == MODIFY:
                        ev.files[m.path] = None
        # A name the code defines is matched as code; its words are not read again as a phrase.
        mentions.extend(_phrases(reg, toks, text.source, index, resolved))
        # A file named as the home of a symbol the same text changes adds nothing of its own.
        homes = {h for m in mentions if m.home and m.role == MODIFY for h in m.home}
        for m in mentions:
            if m.path and m.path in homes:
                continue
            role = m.role
            if role == FRONTED_READ:
                role = DEPEND if read_only else MODIFY
            if role == TESTED:
                tested.append(m)
                continue
            for cid in m.concepts:
                ev.add(cid, role, m.reason, m.strong)
    for i, f in enumerate(body.files):
        for cid, glob in reg.globs.match(f):
            ev.add(cid, MODIFY, _reason("path", f"{glob} matches {f}", f"files[{i}]"), strong=True)
    if not ev.modify:
        # A plan that only tests relies on what its tests assert (in a plan that changes code,
        # its tests are verification, not a claim).
        for m in tested:
            for cid in m.concepts:
                ev.add(cid, DEPEND, m.reason)
    return ev


# Anything code-shaped, a path, a call, a number, or a capital inside a sentence.
_CODE_HINT = re.compile(r"[`/_(#$]|\w[.:]\w|\d|[a-z][A-Z]|[^.!?\s]\s+[A-Z]")
_WORDS = re.compile(r"[a-z0-9]+")
_CAPITALISED = re.compile(r"\b[A-Z][A-Za-z0-9]*")


def _may_name(reg: Registry, index: CodeIndex | None) -> Any:
    """A cheap test on a raw text: can it name anything at all? Texts of plain words none of
    which starts an alias or is a known class name are skipped without tokenising."""
    phrases = reg.phrases

    def check(raw: str) -> bool:
        if _CODE_HINT.search(raw):
            return True
        if any(w in reg.symbols or (index is not None and index.defines(w)) for w in _CAPITALISED.findall(raw)):
            return True
        return any(stem(w) in phrases or w in _ENTRY_FIRST for w in _WORDS.findall(raw.lower()))
    return check


def _interesting(reg: Registry, index: CodeIndex | None) -> plantext.Interesting:
    """Tokens that may name something: code, paths, words that start an alias, capitalised
    names (any, with a code index). Sentences without one need no grammar."""
    return plantext.Interesting(reg.phrases, None if index is not None else reg.symbols, _ENTRY_FIRST)


def _class_name(t: Token) -> bool:
    """A capitalised word written as a name ("the Table", "Panel title"), not a sentence's
    first word (a verb or an ordinary capital)."""
    return t.text[:1].isupper() and not t.text.isupper() and not t.verb and (not t.first or t.topic)


def _role(t: Token) -> str:
    role = t.role if t.role in (MODIFY, DEPEND, TESTED, FRONTED_READ, FOR_NAME, ADDED) else NONE
    if role == FOR_NAME:
        role = MODIFY if t.kind == CODE or (t.kind == WORD and _class_name(t)) else NONE
    if role != NONE and not t.head and t.next_artefact and t.kind != PATH:
        return NONE  # "Panel examples", "TableSuite benchmarks": about those artefacts
    return role


def _symbol_mention(reg: Registry, index: CodeIndex | None, t: Token, source: str) -> _Mention | None:
    role = _role(t)
    if role == NONE:
        return None
    concepts, detail, home = resolve_symbol(reg, index, t.text, bare_code=t.kind == CODE)
    if not concepts:
        return None
    if role == ADDED:
        # An existing name added somewhere is referenced; a new member of a class changes it.
        exists = t.text in reg.symbols or (index is not None and bool(index.resolve(t.text))
                                           and "member of" not in detail and _defined_exactly(index, t.text))
        role = DEPEND if exists else MODIFY
    if t.kind == WORD and not (t.text in reg.symbols or home):
        return None
    # Not "strong": a name is a weaker sign of an edit than a file path (see match_intent).
    return _Mention(tuple(concepts), _reason("symbol", detail, source), role, False, home=tuple(home))


def _defined_exactly(index: CodeIndex, name: str) -> bool:
    n = name.replace("::", ".")
    return any(p.symbol is not None and (p.symbol.name == n or (p.symbol.last == n.rsplit(".", 1)[-1]
                                         and "." not in n)) for p in index.resolve(n))


def resolve_symbol(reg: Registry, index: CodeIndex | None, text: str,
                   bare_code: bool = True) -> tuple[list[str], str, list[str]]:
    """The concepts a code name belongs to, a detail for the reason, and the files defining it."""
    name = text.replace("::", ".").strip(".")
    parts = [p for p in name.split(".") if p]
    while len(parts) > 1 and parts[0] in ("self", "this", "cls"):
        parts = parts[1:]
    if not parts:
        return [], name, []
    name = ".".join(parts)
    hit = reg.symbols.get(name)
    home: list[str] = []
    places: list[Place] = index.resolve(name) if index is not None else []
    home = sorted({p.path for p in places})
    if hit:
        return list(hit), name, home
    if places:
        found: dict[str, str] = {}
        for p in places:
            for cid, how in place_concepts(reg, index, p):  # type: ignore[arg-type]
                found.setdefault(cid, how)
        if len(parts) == 1 and len(found) > BARE_CONCEPTS_MAX:
            return [], name, home  # a bare name defined all over the code: ambiguous
        if found:
            sym = places[0].symbol
            where = places[0].path + (f" ({sym.name})" if sym is not None and sym.name != name else "")
            return sorted(found), f"{name} in {where}", home
        return [], name, home
    # No index, or a name it does not have: a registered prefix ("ConsoleOptions.with_width").
    for k in range(len(parts) - 1, 0, -1):
        hit = reg.symbols.get(".".join(parts[:k]))
        if hit and parts[k - 1][:1].isupper():
            return list(hit), f"{name} (member of {'.'.join(parts[:k])})", home
    if len(parts) > 1:
        last = parts[-1]
        hit = reg.symbols.get(last)
        if hit and plantext.looks_like_code(last) and index is None:
            return list(hit), name, home
    return [], name, home


def place_concepts(reg: Registry, index: CodeIndex, place: Place) -> list[tuple[str, str]]:
    """The concepts of a defined symbol: the registry's symbols win (the symbol, or the class
    that encloses it, however the registry spells it: ``Console``, ``markup.escape``), then the
    concepts whose ``paths`` match its file."""
    if place.symbol is not None:
        candidates = [place.symbol, *index.enclosing(place.path, place.symbol)]
        mods = module_names(place.path)
        for s in candidates:
            for key in (s.name, *(f"{m}.{s.name}" for m in mods)):
                hit = reg.symbols.get(key)
                if hit:
                    return [(cid, "symbol") for cid in hit]
    return [(cid, "path") for cid, _glob in reg.globs.match(place.path)]


def _path_mention(reg: Registry, index: CodeIndex | None, t: Token, source: str) -> _Mention | None:
    role = _role(t)
    if role == NONE:
        return None
    concepts, path, detail = resolve_path(reg, index, t.text)
    if not concepts:
        return None
    return _Mention(tuple(concepts), _reason("path", detail, source), role, True, path=path)


def resolve_path(reg: Registry, index: CodeIndex | None, raw: str) -> tuple[list[str], str, str]:
    """The concepts of a file or directory the plan names, with the path it resolved to."""
    try:
        p = normalise_path(raw).rstrip("/")
    except GlobError:
        return [], raw, raw
    if not p:
        return [], raw, raw
    is_dir = raw.rstrip().endswith("/")
    if index is not None and not index.has_file(p) and not index.has_dir(p):
        found = index.find_suffix(p)
        if len(found) == 1:
            p = found[0]
    hits = reg.globs.match(p) or (reg.globs.match(p + "/-") if is_dir or (index and index.has_dir(p)) else [])
    if hits:
        concepts = sorted({cid for cid, _ in hits})
        return concepts, p, f"{hits[0][1]} matches {p}"
    if index is not None and not index.has_file(p):
        # A new file: the one concept that owns every file of its directory, if any.
        d = p.rsplit("/", 1)[0] if "/" in p else ""
        owner = _dir_owner(reg, index, d)
        if owner:
            return [owner], p, f"{p} is new in {d or '.'}/, which belongs to {owner}"
    return [], p, p


def _dir_owner(reg: Registry, index: CodeIndex, d: str) -> str | None:
    files = index.dir_files(d)
    if not files or len(files) > 200:
        return None
    owners: set[str] | None = None
    for f in files:
        cs = {cid for cid, _ in reg.globs.match(f)}
        owners = cs if owners is None else owners & cs
        if not owners:
            return None
    return min(owners) if owners and len(owners) == 1 else None


# --- alias phrases ------------------------------------------------------------------------------


# How plans name a package's entry module (``pkg/__init__.py``, ``src/index.ts``).
ENTRY_PHRASES: frozenset[tuple[str, ...]] = frozenset({
    ("package", "entry"), ("package", "entry", "point"), ("entry", "module"), ("package", "root"),
    ("top", "level", "package"), ("package", "index"), ("index", "module"), ("main", "entry"), ("barrel", "file"),
    ("public", "entry")})


_ENTRY_FIRST = frozenset(p[0] for p in ENTRY_PHRASES)


def _phrases(reg: Registry, toks: list[Token], source: str, index: CodeIndex | None,
             resolved: set[int]) -> list[_Mention]:
    """Alias phrases and written-out ids, leftmost-longest, over runs of words not broken by
    punctuation (parentheses are skipped, so "wide (CJK) characters" reads "wide characters")."""
    out: list[_Mention] = []
    phrases = reg.phrases
    for run in _runs(toks):
        if not any(t.hit for t in run) or not any(w in phrases or w in _ENTRY_FIRST for t in run for w in t.norm):
            continue  # nothing here starts a phrase
        seq: list[tuple[str, int, Token]] = []  # (word, sub-position, token)
        for t in run:
            for k, w in enumerate(t.norm):
                seq.append((w, k, t))
        if index is not None:
            out.extend(_entry_mentions(reg, index, seq, source))
        i, n = 0, len(seq)
        while i < n:
            node = reg.phrases.get(seq[i][0])
            best: tuple[int, list[tuple[str, str, str]]] | None = None
            j = i
            while node is not None:
                j += 1
                hits = node.get(_TRIE_END)
                if hits:
                    best = (j, hits)
                if j >= n:
                    break
                nxt = node.get(seq[j][0])
                if nxt is None and j + 1 <= n:
                    # The last word of a phrase may carry "-ing": "hash scrolling" ~ "hash scroll".
                    for base in plantext.ing_bases(seq[j][0]):
                        cand = node.get(base)
                        if cand is not None and cand.get(_TRIE_END) and j > i:
                            best = (j + 1, cand[_TRIE_END])
                            break
                node = nxt
            if best is None:
                i += 1
                continue
            end, hits = best
            span = seq[i:end]
            m = None if all(id(t) in resolved for _, _, t in span) else _phrase_mention(span, hits, source)
            if m is not None:
                out.append(m)
            i = end
    return out


def _entry_mentions(reg: Registry, index: CodeIndex, seq: list[tuple[str, int, Token]],
                    source: str) -> list[_Mention]:
    words = [w for w, _, _ in seq]
    out: list[_Mention] = []
    for i in range(len(words)):
        for n in (3, 2):
            if i + n <= len(words) and tuple(words[i : i + n]) in ENTRY_PHRASES:
                role = _role(seq[i + n - 1][2])
                for f in index.entry_files():
                    cs = sorted({cid for cid, _ in reg.globs.match(f)})
                    if cs and role != NONE:
                        out.append(_Mention(tuple(cs), _reason("path", f"{' '.join(words[i:i + n])}: {f}", source),
                                            role, True, path=f))
                break
    return out


def _runs(toks: list[Token]) -> list[list[Token]]:
    """Runs of word-bearing tokens between punctuation; parenthesised runs stand alone."""
    runs: list[list[Token]] = []
    cur: list[Token] = []
    inner: list[Token] = []
    depth = 0
    for t in toks:
        if t.kind == plantext.PUNCT and t.text == "(":
            depth += 1
            continue
        if t.kind == plantext.PUNCT and t.text == ")":
            depth = max(0, depth - 1)
            if depth == 0 and inner:
                runs.append(inner)
                inner = []
            continue
        target = inner if depth else cur
        if t.kind in (WORD, plantext.NUM) or (t.kind == CODE and t.norm):
            target.append(t)
        elif depth == 0 and cur:
            runs.append(cur)
            cur = []
    for r in (cur, inner):
        if r:
            runs.append(r)
    return runs


def _phrase_mention(span: list[tuple[str, int, Token]], hits: list[tuple[str, str, str]],
                    source: str) -> _Mention | None:
    tokens = list(dict.fromkeys(t for _, _, t in span))
    last = tokens[-1]
    single = len(span) == 1
    if single and last.kind == WORD:
        t = last
        # A single plain word names a concept only as a whole word, the head of its phrase,
        # not after a noun that makes it part of another thing ("lookup table"), and not as
        # a verb ("rewrite the help text").
        if len(t.norm) != 1 or not t.head or t.compound or t.verb or t.anaphor or t.next_of:
            return None
        if t.text[:1].isupper() and not t.text.isupper() and not t.first:
            return None  # a capitalised name mid-sentence ("Exception", "Proxy") is something else's name
        if t.owned:
            return None  # "its renderable", "PyCharm's console": a part of something else
        if t.generic:
            return None  # "any exception", "every client": any instance, not the concept
        if plantext.plural(t.low):
            return None  # a plural names instances ("build routers", "the tables"), not the concept
    if all(t.kind == CODE for t in tokens):
        # A name in code is matched as code, not as words, unless the alias is that very name
        # ("useSearch", "UNICODE_VERSION", "staleTime").
        names = {p.replace(" ", "").lower() for _cid, _kind, p in hits if plantext.looks_like_code(p)}
        if len(tokens) != 1 or tokens[0].text.lower() not in names:
            return None
    if span[0][1] != 0 or span[-1][1] != len(span[-1][2].norm) - 1:
        return None  # the phrase must cover whole words ("Proxy-Authorization" is not "proxy")
    role = _role(last)
    if role == NONE:
        return None
    phrase = hits[0][2]  # as the registry writes it
    concepts = tuple(dict.fromkeys(cid for cid, _kind, _p in hits))
    how = hits[0][1]
    return _Mention(concepts, _reason(how, phrase, source), role, False, multiword=not single)
