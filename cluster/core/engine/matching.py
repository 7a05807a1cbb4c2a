"""Matching: an intent's words, files and explicit concepts to claims on registry concepts.

Rules, in order:
- Alias phrases (and a concept's own id written out) found in the summary and steps, symbols
  that look like code (``SessionStore``, ``auth.get_session``, anything in backticks), and path
  mentions, each matched against the registry's indexes. The verb before a mention decides
  modify or depend ("deprecate the session store" modifies, "on top of the session store"
  depends); with no verb yet, modify.
- Explicit ``files`` match path globs and are modified.
- Derived modify beats derived depend; explicit ``concepts.modify`` / ``concepts.depend`` beat
  anything derived.
- Every direct ``depends_on`` of a modified concept is a dependency (direct only: a concept's
  contract shields its dependents from changes further down).

Cost is proportional to the text's length and the concepts it names, not to registry size.
The same registry version and intent always give the same claims.
"""

from __future__ import annotations

from typing import Any

from tetherlab.cluster.core.engine import text
from tetherlab.cluster.core.engine.globs import GlobError, normalise_path
from tetherlab.cluster.core.engine.model import IntentBody
from tetherlab.cluster.core.engine.registry import Registry, match_phrases
from tetherlab.cluster.core.errors import CommandError

# Reasons per claim kept in a verdict: enough to explain, bounded so verdicts stay small.
REASONS_PER_CLAIM_MAX = 8
IMPLIED_MAX = 200

MODIFY = text.MODIFY
DEPEND = text.DEPEND


def _reason(kind: str, detail: str, source: str) -> dict[str, str]:
    return {"kind": kind, "detail": detail, "source": source}


class _Acc:
    """Accumulates (concept -> kind, reasons) with the precedence rules."""

    def __init__(self) -> None:
        self.kind: dict[str, str] = {}
        self.explicit: set[str] = set()
        self.reasons: dict[str, list[dict[str, str]]] = {}

    def add(self, cid: str, kind: str, reason: dict[str, str], *, explicit: bool = False) -> None:
        rs = self.reasons.setdefault(cid, [])
        if len(rs) < REASONS_PER_CLAIM_MAX and reason not in rs:
            rs.append(reason)
        if explicit:
            if cid not in self.explicit:
                self.explicit.add(cid)
                self.kind[cid] = kind
            return
        if cid in self.explicit:
            return
        if self.kind.get(cid) != MODIFY:
            self.kind[cid] = kind


def match_intent(reg: Registry | None, body: IntentBody) -> dict[str, Any]:
    """Claims for an intent: ``{"registry_version", "modify": [{"concept", "reasons"}],
    "depend": [...], "files", "symbols"}``. Raises CommandError for explicit concepts the
    registry does not have."""
    acc = _Acc()
    mentioned_symbols: list[str] = []
    mentioned_files: list[str] = []
    if reg is not None:
        for cid, kind in [*((c, MODIFY) for c in body.modify), *((c, DEPEND) for c in body.depend)]:
            if cid not in reg.concepts:
                raise CommandError(
                    "unknown_concept",
                    f"field 'intent.concepts.{kind}': concept {cid!r} is not in registry version {reg.version}",
                )
            acc.add(cid, kind, _reason("explicit", cid, f"concepts.{kind}"), explicit=True)
        texts = [("summary", body.summary), *((f"steps[{i}]", s) for i, s in enumerate(body.steps))]
        for source, t in texts:
            for clause in text.clauses(t):
                for start, _end, hits in match_phrases(reg, clause.words):
                    cue = clause.cues[start]
                    for cid, how, phrase in hits:
                        acc.add(cid, cue, _reason(how, phrase, source))
                for m in clause.mentions:
                    if m.kind == "symbol":
                        _match_symbol(reg, m, source, acc, mentioned_symbols)
                    else:
                        try:
                            path = normalise_path(m.text)
                        except GlobError:
                            continue
                        path = path.rstrip("/")
                        hit = reg.globs.match(path)
                        for cid, glob in hit:
                            acc.add(cid, m.cue, _reason("path", f"{glob} matches {path}", source))
                        if hit and m.cue == MODIFY:
                            mentioned_files.append(path)
        for i, f in enumerate(body.files):
            for cid, glob in reg.globs.match(f):
                acc.add(cid, MODIFY, _reason("path", f"{glob} matches {f}", f"files[{i}]"))
    elif body.modify or body.depend:
        first = (body.modify or body.depend)[0]
        raise CommandError("unknown_concept", f"concept {first!r} named but no concept registry has been pushed")

    modify = sorted(c for c, k in acc.kind.items() if k == MODIFY)
    if reg is not None:
        for cid in modify:
            for dep in reg.concepts[cid].depends_on:
                if acc.kind.get(dep) != MODIFY:
                    acc.add(dep, DEPEND, _reason("depends_on", f"{cid} depends on {dep}", cid))
    depend = sorted(c for c, k in acc.kind.items() if k == DEPEND)

    files: dict[str, None] = dict.fromkeys([*body.files, *mentioned_files])
    symbols: dict[str, None] = dict.fromkeys(mentioned_symbols)
    if reg is not None:
        for cid in modify:
            c = reg.concepts[cid]
            files.update(dict.fromkeys(c.paths))
            symbols.update(dict.fromkeys(c.symbols))
    return {
        "registry_version": reg.version if reg is not None else 0,
        "modify": [{"concept": c, "reasons": acc.reasons[c]} for c in modify],
        "depend": [{"concept": c, "reasons": acc.reasons[c]} for c in depend],
        "files": sorted(files)[:IMPLIED_MAX],
        "symbols": sorted(symbols)[:IMPLIED_MAX],
    }


def _match_symbol(reg: Registry, m: text.Mention, source: str, acc: _Acc, mentioned: list[str]) -> None:
    sym = m.text.replace("::", ".").rstrip("()")
    hits = reg.symbols.get(sym)
    if hits is None and "." in sym:
        hits = reg.symbols.get(sym.rsplit(".", 1)[-1])
    if not hits:
        return
    if sym not in mentioned:
        mentioned.append(sym)
    for cid in hits:
        acc.add(cid, m.cue, _reason("symbol", sym, source))
