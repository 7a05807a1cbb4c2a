"""What agents read: the world slice for their concepts, and the context text of verdicts.

A world slice covers the intent's own concepts and their direct neighbours in the dependency
graph (what they depend on, and what depends on them), each with its details, the other
agents' active intents on it and its last completed intents. Nothing about other concepts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tetherlab.cluster.core.engine.model import (
    DEPEND_ON_MODIFIED,
    MODIFY_DEPENDED,
    MODIFY_MODIFY,
    REVERTED,
    Intent,
)

if TYPE_CHECKING:
    from tetherlab.cluster.core.engine.registry import Registry

# A slice is read by an agent with a context window: bound it.
SLICE_CONCEPTS_MAX = 100
CONTEXT_MAX_CHARS = 1500
SUMMARY_IN_CONTEXT_MAX_CHARS = 160


def build_slice(
    reg: Registry | None,
    it: Intent,
    active_on: Callable[[str], list[tuple[Intent, str]]],
    history: Callable[[str], list[dict[str, Any]] | None],
) -> dict[str, Any]:
    roles: dict[str, str] = {}
    for c in it.modifies:
        roles[c] = "modify"
    for c in it.depends:
        roles.setdefault(c, "depend")
    neighbours: set[str] = set()
    if reg is not None:
        for c in roles:
            concept = reg.concepts.get(c)
            if concept is not None:
                neighbours.update(concept.depends_on)
            neighbours.update(reg.dependents_of.get(c, ()))
    order = sorted(roles) + sorted(neighbours - set(roles))
    concepts: list[dict[str, Any]] = []
    for cid in order[:SLICE_CONCEPTS_MAX]:
        concept = reg.concepts.get(cid) if reg is not None else None
        entry: dict[str, Any] = concept.to_json() if concept is not None else {"id": cid, "missing": True}
        entry["role"] = roles.get(cid, "neighbour")
        entry["active"] = [
            {
                "intent_id": other.intent_id,
                "agent_id": other.agent_id,
                "tool": other.tool,
                "summary": other.body.summary,
                "kind": kind,
                "since": other.created_ms,
            }
            for other, kind in active_on(cid)
            if other.agent_id != it.agent_id
        ]
        entry["recent"] = list(history(cid) or [])
        concepts.append(entry)
    return {
        "agent_id": it.agent_id,
        "intent_id": it.intent_id,
        "status": it.status,
        "registry_version": reg.version if reg is not None else 0,
        "concepts": concepts,
        "truncated": len(order) > SLICE_CONCEPTS_MAX,
        # What your in-flight code overlaps with (another agent's file or symbol, or a symbol a
        # concept someone relies on), and the concepts your changes reached.
        "soft_conflicts": list(it.soft),
        "footprint_concepts": sorted((it.footprint or {}).get("concepts", {})),
    }


# --- context texts ---------------------------------------------------------------------------


def _short(summary: str) -> str:
    s = " ".join(summary.split())
    return s if len(s) <= SUMMARY_IN_CONTEXT_MAX_CHARS else s[: SUMMARY_IN_CONTEXT_MAX_CHARS - 1] + "…"


def _clip(text: str) -> str:
    return text if len(text) <= CONTEXT_MAX_CHARS else text[: CONTEXT_MAX_CHARS - 1] + "…"


def _describe(c: dict[str, Any]) -> str:
    who = f'{c["holder_agent_id"]} ("{_short(c["holder_summary"])}")'
    if c["kind"] == MODIFY_MODIFY:
        return f"{who} is already modifying {c['concept']}"
    if c["kind"] == DEPEND_ON_MODIFIED:
        return f"{who} is mid-flight modifying {c['concept']}, which your plan depends on"
    assert c["kind"] == MODIFY_DEPENDED
    return f"{who} depends on {c['concept']}, which your plan modifies"


def _holdings(it: Intent) -> str:
    parts = []
    if it.modifies:
        parts.append("modify " + ", ".join(it.modifies))
    if it.depends:
        parts.append("depend on " + ", ".join(it.depends))
    return "; ".join(parts) if parts else "no registry concepts"


# Disagreements between an agent's declared concepts and the plan's text, in a verdict's context.
CHECKS_IN_CONTEXT_MAX = 3


def _claims_note(it: Intent) -> str:
    """What the agent should know about its claims: the declared-vs-derived disagreements, or,
    when it declared nothing, how to declare (claims derived from words can be wrong)."""
    checks = it.claims.get("checks") or []
    if checks:
        notes = "; ".join(f"{c['concept']}: {c['note']}" for c in checks[:CHECKS_IN_CONTEXT_MAX])
        return f" Claim check: {notes}."
    if not (it.body.modify or it.body.depend):
        return (" These claims were derived from your plan's words; declare them in the plan "
                '("concepts": {"modify": [...], "depend": [...]}, or a "Concepts: modify ...; depend ..." line) '
                "with the concept ids from your instructions or .tetherlab/world.md.")
    return ""


def context_for_continue(it: Intent, relaxed: list[dict[str, Any]]) -> str:
    text = f"Continue: intent {it.intent_id} holds {_holdings(it)} (fencing token {it.fencing_token})."
    if relaxed:
        lines = "; ".join(_describe(c) for c in relaxed)
        text += f" Note: {lines}. The registry lets this proceed; expect that concept to change under you."
    else:
        text += " No other active intent touches these concepts."
    return _clip(text + _claims_note(it))


def context_for_stop(it: Intent, blocking: list[dict[str, Any]]) -> str:
    lines = "; ".join(_describe(c) for c in blocking)
    return _clip(
        f"Stop: do not write code for this plan. {lines}. Wait until that work completes, "
        "or re-plan around it, then send a new intent." + _claims_note(it)
    )


def context_for_end(it: Intent) -> str:
    return _clip(f"Recorded: intent {it.intent_id} is {it.status}; its concepts are released.")


def context_for_notice(it: Intent) -> str:
    """For a stop/revert the agent did not ask for (operator revoke, or lapse then claim)."""
    if it.status == REVERTED:
        why = it.ended_by
        if it.conflicts:
            c = it.conflicts[0]
            why = f"your session lapsed and {c['holder_agent_id']} has since claimed {c['concept']}"
        return _clip(
            f"Revert: intent {it.intent_id} was invalidated ({why}). Discard the changes made for it, "
            "then send a new intent."
        )
    return _clip(f"Stop: intent {it.intent_id} was stopped ({it.ended_by}). Do not continue this plan.")


def describe_soft(c: dict[str, Any]) -> str:
    """One soft conflict, as an agent reads it."""
    who = f'{c["other_agent_id"]} ("{_short(c["other_summary"])}")'
    if c["kind"] == "file":
        return f"{who} is also changing {c['path']}"
    if c["kind"] == "symbol":
        return f"{who} is also changing {c['symbol']} in {c['path']}"
    if c.get("mirror"):
        return f"{who} is changing {c['symbol']} ({c['concept']}), which your work relies on"
    return f"your change to {c['symbol']} ({c['concept']}) touches what {who} relies on"


def context_for_changes(it: Intent, claimed: list[str], warned: list[dict[str, Any]]) -> str:
    parts = []
    if claimed:
        parts.append(f"Your changes reached {', '.join(claimed)}, which your plan did not claim; they are now "
                     f"claimed for intent {it.intent_id} (fencing token {it.fencing_token}).")
    if warned:
        parts.append("Warning: " + "; ".join(_describe(w) for w in warned[:3]) + " (your changes reached it; the "
                     "registry only warns for this concept).")
    if it.soft:
        parts.append("Heads up: " + "; ".join(describe_soft(c) for c in it.soft[:3]) + ". Coordinate before you "
                     "change the same code further.")
    return _clip(" ".join(parts) if parts else f"Changes recorded for intent {it.intent_id}; nothing overlaps.")


def context_for_drift(it: Intent, blocking: list[dict[str, Any]], revert: bool) -> str:
    b = blocking[0]
    reached = f"your changes reached {b['concept']} (through {b['path']}), which your plan did not claim"
    if revert:
        return _clip(f"Revert: {reached}, and {_describe(b)}. Discard the changes made for intent {it.intent_id}, "
                     "then send a new intent that stays within your claims or waits for that work.")
    return _clip(f"Stop: {reached}, and {_describe(b)}. Do not continue this plan; re-plan around it.")
