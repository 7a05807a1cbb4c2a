"""Registry checks for authors (``tetherlab concepts lint``): what is valid but will not work
the way the author means.

- **Aliases that can never match**, found by running the real matcher on a plan that uses the
  alias ("Change the ALIAS.") against a registry holding only that concept: an alias with a
  slash reads as a path, one that is a file name reads as a file, a plural single word reads as
  instances, one made of function words is nothing.
- **Single ordinary words** ("table", "client", "export"): they match only as the head of a noun
  phrase, never inside another phrase ("lookup table", "across clients"); a word that is also a
  verb is read as the verb at the start of a step.
- **Duplicates across concepts**: one alias, symbol or path glob in two concepts claims both.
- With a code index: **paths that match no file**, **symbols the code does not define**, and
  **concepts no file belongs to** (no path matches a file and no symbol is found).

Pure: the registry and the index are passed in; the command line reads the files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tetherlab.cluster.core.engine import plantext, text
from tetherlab.cluster.core.engine.codeindex import CodeIndex
from tetherlab.cluster.core.engine.globs import compile_glob
from tetherlab.cluster.core.engine.matching import match_intent
from tetherlab.cluster.core.engine.model import IntentBody
from tetherlab.cluster.core.engine.registry import Concept, Registry

# Findings listed per check: a registry with thousands of problems is reported in part.
FINDINGS_PER_CHECK_MAX = 500


@dataclass(frozen=True)
class Finding:
    concept: str
    field: str
    value: str
    check: str  # never_matches, common_word, verb_word, duplicate, no_file, no_symbol, no_files
    message: str

    def to_json(self) -> dict[str, str]:
        return {"concept": self.concept, "field": self.field, "value": self.value, "check": self.check,
                "message": self.message}


def lint(reg: Registry, index: CodeIndex | None = None) -> list[Finding]:
    """Every finding, in a stable order (by concept, then field)."""
    out: list[Finding] = []
    out += _aliases(reg)
    out += _duplicates(reg)
    if index is not None:
        out += _against_code(reg, index)
    return sorted(out, key=lambda f: (f.concept, f.field, f.value, f.check))


def _aliases(reg: Registry) -> list[Finding]:
    out: list[Finding] = []
    for c in reg.concepts.values():
        for alias in c.aliases:
            if len(out) >= FINDINGS_PER_CHECK_MAX:
                return out
            solo = Registry([Concept(id=c.id, aliases=(alias,))], 1)
            why = _never_matches(solo, alias)
            if why:
                out.append(Finding(c.id, "aliases", alias, "never_matches", f"alias {alias!r} can never match: {why}"))
                continue
            ws = text.words(alias)
            if len(ws) == 1 and alias.isalpha() and alias.islower():
                low = alias.lower()
                if low in plantext.VERB_CLASS:
                    out.append(Finding(c.id, "aliases", alias, "verb_word",
                                       f"alias {alias!r} is also a verb: at the start of a step (\"{alias} the ...\") "
                                       "it is read as the verb, not as this concept; prefer a phrase"))
                else:
                    out.append(Finding(c.id, "aliases", alias, "common_word",
                                       f"alias {alias!r} is a single ordinary word: it matches only as the head of a "
                                       f"noun phrase (\"the {alias}\"), not as a part of a longer one "
                                       f"(\"a lookup {alias}\", "
                                       f"\"the {alias} settings\") or in the plural; prefer a phrase people write "
                                       "for this concept"))
    return out


def _never_matches(solo: Registry, alias: str) -> str:
    if "/" in alias:
        return "it contains '/', so plans read it as a path (put files in 'paths')"
    if plantext.is_path(alias):  # the same test the tokenizer applies
        return "it is a file name, so plans read it as a path (put it in 'paths')"
    plans = (f"Change the {alias}.", f"Change {alias}.", f"Update `{alias}`.")
    for p in plans:
        got = match_intent(solo, IntentBody(p))
        if any(m["concept"] for m in got["modify"]):
            return ""
    ws = text.words(alias)
    if len(ws) == 1 and plantext.plural(alias.lower()):
        return "a single word in the plural names instances in plans (\"build routers\"), not the concept"
    if any(w in plantext.NEGATORS for w in alias.lower().split()):
        return "it contains a negation ('not', 'no'), which reads as one; write it hyphenated ('not-found')"
    if any(w in plantext.SUBORDINATORS for w in alias.lower().split()):
        return "it contains a word that opens a clause ('while', 'when', 'as'), which splits the phrase"
    if all(w in plantext.DETERMINERS or w in plantext.PREPOSITIONS or w in plantext.CONJUNCTIONS
           or w in plantext.PRONOUNS for w in ws):
        return "it is made of function words only"
    if len(ws) == 1 and alias[:1].isupper():
        return "a capitalised single word reads as the name of something else; list it in 'symbols' instead"
    return "the matcher does not read it as a noun phrase in a plan"


def _duplicates(reg: Registry) -> list[Finding]:
    out: list[Finding] = []
    seen: dict[tuple[str, str], str] = {}
    for c in reg.concepts.values():
        for f, values, norm in (("aliases", c.aliases, lambda a: " ".join(text.words(a))),
                                ("symbols", c.symbols, lambda s: s.replace("::", ".")),
                                ("paths", c.paths, lambda p: p.strip().rstrip("/"))):
            for v in values:
                key = (f, norm(v))
                first = seen.setdefault(key, c.id)
                if first != c.id and len(out) < FINDINGS_PER_CHECK_MAX:
                    out.append(Finding(c.id, f, v, "duplicate",
                                       f"{f[:-1]} {v!r} is also in concept {first!r}: a plan naming it claims both"))
    return out


def _against_code(reg: Registry, index: CodeIndex) -> list[Finding]:
    out: list[Finding] = []
    files = list(index.files)
    for c in reg.concepts.values():
        matched_files = 0
        for glob in c.paths:
            rx = compile_glob(glob)
            n = sum(1 for f in files if rx.fullmatch(f))
            matched_files += n
            if n == 0:
                out.append(Finding(c.id, "paths", glob, "no_file", f"path {glob!r} matches no file in the code index"))
        found_symbols = 0
        for sym in c.symbols:
            if index.defines(sym):
                found_symbols += 1
            else:
                out.append(Finding(c.id, "symbols", sym, "no_symbol",
                                   f"symbol {sym!r} is not defined anywhere in the code index"))
        if matched_files == 0 and found_symbols == 0:
            out.append(Finding(c.id, "paths", "", "no_files",
                               "no file belongs to this concept: none of its paths matches a file and none of its "
                               "symbols is defined in the code index"))
    return out


def summary(findings: list[Finding]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for f in findings:
        counts[f.check] = counts.get(f.check, 0) + 1
    return {"findings": [f.to_json() for f in findings], "counts": dict(sorted(counts.items()))}
