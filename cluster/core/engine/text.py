"""Plain-text analysis for matching: words, clauses, verb cues and code-shaped mentions.

Everything here is cheap and deterministic (regexes and dict look-ups, no models): the same
text gives the same tokens on every replica, whatever its locale.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

# Articles carry no meaning in a phrase, so "the session store" matches alias "session store".
STOPWORDS = frozenset({"a", "an", "the"})

_WORD = re.compile(r"[a-z0-9]+")
# Sentence ends and semicolons separate clauses; commas do not ("on top of X, Y and Z").
_CLAUSE = re.compile(r"[;!?\n]+|\.(?=\s|$)")
_TOKEN = re.compile(
    r"`(?P<tick>[^`\n]{1,200})`"
    r"|(?P<path>(?:\./)?[A-Za-z0-9_.*-]+(?:/[A-Za-z0-9_.*-]+)+/?)"
    r"|(?P<ident>[A-Za-z_][A-Za-z0-9_]*(?:(?:\.|::)[A-Za-z_][A-Za-z0-9_]*)*)"
    r"|(?P<num>[0-9]+)"
)


def stem(word: str) -> str:
    """A light plural fold, applied to text and aliases alike: "stores" and "store" meet."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def words(text: str) -> list[str]:
    """Normalised words of a phrase: lowercase, split on anything not a letter or digit,
    articles dropped, plurals folded."""
    return [stem(w) for w in _WORD.findall(text.lower()) if w not in STOPWORDS]


@lru_cache(maxsize=1 << 16)
def phrase_words(phrase: str) -> tuple[str, ...]:
    """:func:`words` of a registry phrase (an alias, an id), memoised: a push validates its
    aliases and then indexes the same phrases, and the next push repeats most of them."""
    return tuple(words(phrase))


def _forms(*verbs: str) -> set[str]:
    out: set[str] = set()
    for v in verbs:
        base = v[:-1] if v.endswith("e") else v
        out.update({stem(v), v + "s" if not v.endswith("s") else v, base + "ing", base + "ed"})
        out.add(stem(v + "s"))
    return out


# Verbs that say the plan changes the thing named after them...
MODIFY_CUES = frozenset(
    _forms(
        "add", "change", "refactor", "replace", "deprecate", "remove", "delete", "rename",
        "rewrite", "implement", "migrate", "fix", "update", "modify", "move", "extract",
        "introduce", "drop", "split", "merge", "redesign", "create", "build", "write", "edit",
        "convert", "restructure", "optimize", "optimise", "port", "adjust", "extend", "patch",
        "retire", "overhaul", "rework", "simplify", "harden", "reimplement", "swap",
    )
)
# ...and words that say it only relies on it.
DEPEND_CUES = frozenset(
    _forms("use", "read", "call", "consume", "query", "import", "depend", "rely", "need", "require")
    | {"via", "against", "atop", "through"}
)
# Multi-word cues, as normalised word tuples; all of them say "relies on".
DEPEND_CUE_PHRASES: frozenset[tuple[str, ...]] = frozenset(
    {
        ("on", "top", "of"), ("build", "on"), ("built", "on"), ("based", "on"), ("on", "top"),
        ("build", "upon"), ("built", "upon"), ("talk", "to"), ("integrate", "with"),
    }
)
_CUE_PHRASE_LENGTHS = sorted({len(p) for p in DEPEND_CUE_PHRASES}, reverse=True)
_CUE_PHRASE_LAST = frozenset(p[-1] for p in DEPEND_CUE_PHRASES)

MODIFY = "modify"
DEPEND = "depend"


@dataclass(frozen=True)
class Mention:
    """Something code-shaped in the text: a symbol or a file path, with the cue before it."""

    kind: str  # "symbol" or "path"
    text: str
    cue: str  # MODIFY or DEPEND


@dataclass(frozen=True)
class Clause:
    words: tuple[str, ...]
    cues: tuple[str, ...]  # cues[i]: the verb cue in force before words[i]
    mentions: tuple[Mention, ...]


def looks_like_code(ident: str) -> bool:
    # Prose: plain words, a capital at a sentence start, acronyms ("JWT"). Code: SessionStore,
    # getSession, get_session, auth.store, a::b.
    if "." in ident or ":" in ident or "_" in ident:
        return True
    return not ident.isupper() and any(c.isupper() for c in ident[1:])


@lru_cache(maxsize=1 << 16)
def _token(raw: str) -> tuple[tuple[str, ...], bool]:
    """One identifier-like token: its normalised words and whether it looks like code. Memoised:
    plans reuse a small vocabulary, and this is the hot path of matching."""
    return tuple(words(raw)), looks_like_code(raw)


def clauses(text: str) -> list[Clause]:
    """Split text into clauses and each into words, the cue in force before each word, and
    code-shaped mentions. With no cue yet in a clause, the default is ``modify``: a plan mostly
    names what it changes, and over-claiming is the safe error."""
    out: list[Clause] = []
    for part in _CLAUSE.split(text):
        ws: list[str] = []
        pending: list[tuple[str, str, int]] = []  # (kind, text, word position)
        for m in _TOKEN.finditer(part):
            ident = m.group("ident")
            if ident is not None:
                tws, code = _token(ident)
                if code:
                    pending.append(("symbol", ident, len(ws)))
                ws.extend(tws)
                continue
            tick, path, num = m.group("tick"), m.group("path"), m.group("num")
            if tick is not None:
                pending.append(("path" if "/" in tick else "symbol", tick.strip(), len(ws)))
                ws.extend(words(tick) if "/" not in tick else ())
            elif path is not None:
                pending.append(("path", path, len(ws)))
            elif num is not None:
                ws.append(num)
        if not ws and not pending:
            continue
        cues = _cues(ws)
        mentions = tuple(Mention(kind, t, cues[pos]) for kind, t, pos in pending)
        out.append(Clause(tuple(ws), tuple(cues[: len(ws)]), mentions))
    return out


def _cues(ws: list[str]) -> list[str]:
    """The cue in force before each word, plus one more entry for the end of the clause."""
    cues: list[str] = []
    current = MODIFY
    for i, w in enumerate(ws):
        cues.append(current)
        if w in MODIFY_CUES:
            current = MODIFY
        elif w in DEPEND_CUES:
            current = DEPEND
        elif w in _CUE_PHRASE_LAST:
            for n in _CUE_PHRASE_LENGTHS:
                if i + 1 >= n and tuple(ws[i + 1 - n : i + 1]) in DEPEND_CUE_PHRASES:
                    current = DEPEND
                    break
    cues.append(current)
    return cues
