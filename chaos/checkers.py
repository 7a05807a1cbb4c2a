"""Checkers over a drill's history and the replicas' final state. Pure functions.

Each returns a :class:`CheckResult` ``(passed, detail)``; the detail names the first violations
found (bounded), so a failing drill says what went wrong without a debugger.

- :func:`check_no_lost_acks`: every acknowledged open, intent and completion is in every
  replica's final state, as acknowledged.
- :func:`check_mutual_exclusion`: no two agents' run intervals overlap while they hold
  conflicting claims on one concept (modify/modify always; modify/depend when the concept's
  ``dependents`` policy is ``stop``).
- :func:`check_fencing_tokens`: fencing tokens grow with grants: per concept, a grant that began
  after another one was acknowledged carries a larger token; no two intents share a token.
- :func:`check_fail_closed`: no agent ran at a moment when its shim had gone longer than F
  without a quorum-confirmed acknowledgement (plus a small scheduling slack).
- :func:`check_convergence`: after healing every replica holds identical state, and a final
  write succeeded.
- :func:`check_leader_recovery`: every fault that took the leader away was followed by a new
  leader within a bound.
- :func:`check_rejoin`: once the faults end, every node catches up with the leader within a bound.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from tetherlab.chaos.history import History, Op, Run

DETAIL_ITEMS_MAX = 5  # violations spelled out per check; the count says how many there were
POLICY_STOP = "stop"
# The shim's watchdog wakes every 0.1 s and asyncio may be late under load: allowed on top of F.
FAIL_CLOSED_SLACK_S = 0.5


class CheckResult(NamedTuple):
    passed: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "detail": self.detail}


def _summarise(what: str, problems: Sequence[str], ok_detail: str) -> CheckResult:
    if not problems:
        return CheckResult(True, ok_detail)
    shown = "; ".join(problems[:DETAIL_ITEMS_MAX])
    more = f" (+{len(problems) - DETAIL_ITEMS_MAX} more)" if len(problems) > DETAIL_ITEMS_MAX else ""
    return CheckResult(False, f"{len(problems)} {what}: {shown}{more}")


# --- no acknowledged write lost ----------------------------------------------------------------


def check_no_lost_acks(history: History, dumps: Mapping[str, Mapping[str, Any]]) -> CheckResult:
    """Every ``ok`` open/submit/complete must be visible, as acknowledged, on every replica.

    A replica that has applied less than the most advanced one is lagging, not losing: it is left
    to :func:`check_convergence` and named in the detail here."""
    if not dumps:
        return CheckResult(False, "no replica state to compare with (no dumps)")
    top = max(int(d.get("applied_index") or 0) for d in dumps.values())
    lagging = sorted(n for n, d in dumps.items() if int(d.get("applied_index") or 0) < top)
    dumps = {n: d for n, d in dumps.items() if n not in lagging}
    problems: list[str] = []
    acked = 0
    # The latest acknowledged token per intent: a replan re-grants the same intent id.
    latest_token: dict[str, int] = {}
    for op in history.ops:
        if op.is_grant and op.intent_id and op.fencing_token is not None:
            latest_token[op.intent_id] = max(latest_token.get(op.intent_id, 0), op.fencing_token)
    for node, dump in sorted(dumps.items()):
        engine = dump.get("engine", {})
        sessions = engine.get("sessions", {})
        intents = engine.get("intents", {})
        for op in history.ops:
            if op.outcome != "ok":
                continue
            if op.kind == "open":
                acked += 1
                if op.agent_id not in sessions:
                    problems.append(f"{node}: session of {op.agent_id} opened at {op.complete_s:.3f} is missing")
            elif op.kind == "submit" and op.intent_id:
                acked += 1
                rec = intents.get(op.intent_id)
                if rec is None:
                    problems.append(f"{node}: intent {op.intent_id} ({op.action}, acknowledged to {op.agent_id}) "
                                    "is missing")
                    continue
                if op.is_grant:
                    have = rec.get("fencing_token")
                    want = latest_token[op.intent_id]
                    if have is None or have < want:
                        problems.append(f"{node}: intent {op.intent_id} has fencing token {have}, "
                                        f"below the acknowledged {want}")
                elif op.action == "stop" and rec.get("status") != "stopped":
                    problems.append(f"{node}: intent {op.intent_id} was acknowledged as stopped but is "
                                    f"{rec.get('status')}")
                elif op.action == "revert" and rec.get("status") != "reverted":
                    problems.append(f"{node}: intent {op.intent_id} was acknowledged as reverted but is "
                                    f"{rec.get('status')}")
            elif op.kind == "complete" and op.intent_id and op.action == "continue":
                acked += 1
                rec = intents.get(op.intent_id)
                status = rec.get("status") if rec is not None else "missing"
                if status != "completed":
                    problems.append(f"{node}: completion of {op.intent_id} acknowledged at {op.complete_s:.3f} "
                                    f"but the intent is {status}")
    lag = f" ({', '.join(lagging)} lagging behind index {top}: not compared)" if lagging else ""
    result = _summarise("acknowledged writes lost", problems,
                        f"{acked} acknowledgements found on all {len(dumps)} replicas{lag}")
    return CheckResult(result.passed, result.detail + (lag if problems else ""))


# --- mutual exclusion ----------------------------------------------------------------------------


def conflicting_concepts(a: Run, b: Run, policies: Mapping[str, str]) -> list[str]:
    """Concepts on which two runs' claims conflict (modify/modify; modify/depend under ``stop``)."""
    out = set(a.modify) & set(b.modify)
    for c in (set(a.modify) & set(b.depend)) | (set(a.depend) & set(b.modify)):
        if policies.get(c, POLICY_STOP) == POLICY_STOP:
            out.add(c)
    return sorted(out)


def check_mutual_exclusion(history: History, policies: Mapping[str, str]) -> CheckResult:
    """No two agents may run at once while holding conflicting claims on one concept."""
    problems: list[str] = []
    runs = sorted(history.runs, key=lambda r: r.start_s)
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            if b.start_s >= a.end_s:
                break  # sorted by start: no later run overlaps a either
            if a.agent_id == b.agent_id:
                continue
            hit = conflicting_concepts(a, b, policies)
            if hit:
                overlap = min(a.end_s, b.end_s) - b.start_s
                problems.append(
                    f"{a.agent_id} ({a.intent_id}, token {a.fencing_token}, ran {a.start_s:.3f}-{a.end_s:.3f}) and "
                    f"{b.agent_id} ({b.intent_id}, token {b.fencing_token}, ran {b.start_s:.3f}-{b.end_s:.3f}) "
                    f"overlapped {overlap:.3f} s on {', '.join(hit)}")
    return _summarise("overlapping conflicting runs", problems,
                      f"{len(runs)} runs, no conflicting overlap")


# --- fencing tokens ---------------------------------------------------------------------------------


def check_fencing_tokens(history: History) -> CheckResult:
    """Grants in real-time order carry growing tokens, per concept; tokens are unique per intent."""
    grants = sorted((o for o in history.ops if o.is_grant and o.fencing_token is not None),
                    key=lambda o: o.invoke_s)
    problems: list[str] = []
    owner: dict[int, str] = {}
    for g in grants:
        assert g.fencing_token is not None and g.intent_id is not None
        prev = owner.setdefault(g.fencing_token, g.intent_id)
        if prev != g.intent_id:
            problems.append(f"token {g.fencing_token} granted to both {prev} and {g.intent_id}")
    by_concept: dict[str, list[Op]] = {}
    for g in grants:
        for c in {*g.modify, *g.depend}:
            by_concept.setdefault(c, []).append(g)
    for c, gs in sorted(by_concept.items()):
        # g1 acknowledged before g2 was even asked for: g2 must carry a larger token.
        for g2 in gs:
            for g1 in gs:
                if g1.complete_s < g2.invoke_s and (g2.fencing_token or 0) <= (g1.fencing_token or 0):
                    problems.append(
                        f"on {c}: {g2.intent_id} granted token {g2.fencing_token} at {g2.complete_s:.3f} after "
                        f"{g1.intent_id} had been granted token {g1.fencing_token} at {g1.complete_s:.3f}")
    return _summarise("fencing-token violations", problems,
                      f"{len(grants)} grants, tokens grow in grant order")


# --- fail-closed bound -----------------------------------------------------------------------------


def _confirmations(history: History) -> dict[str, list[tuple[float, float]]]:
    """Per agent, (known at, confirmed as of) for every quorum-confirmed answer: the shim learns at
    completion that the cluster confirmed it as of when the request was sent."""
    out: dict[str, list[tuple[float, float]]] = {}
    for op in history.ops:
        if op.outcome == "ok":
            out.setdefault(op.agent_id, []).append((op.complete_s, op.invoke_s))
    for v in out.values():
        v.sort()
    return out


def check_fail_closed(history: History, slack_s: float = FAIL_CLOSED_SLACK_S) -> CheckResult:
    """At every moment an agent ran, its shim's last confirmation was at most F (+ slack) old."""
    f = history.fail_closed_s
    conf = _confirmations(history)
    problems: list[str] = []
    worst = 0.0
    for r in history.runs:
        events = conf.get(r.agent_id, [])
        # Staleness grows linearly between answers, so it peaks just before each answer and at the end.
        points = [t for t, _ in events if r.start_s < t <= r.end_s] + [r.end_s]
        for p in points:
            known = [c for t, c in events if t < p or (p == r.end_s and t <= p)]
            last = max(known) if known else None
            if last is None:
                problems.append(f"{r.agent_id} ran {r.intent_id} at {p:.3f} with no confirmation at all")
                break
            stale = p - last
            worst = max(worst, stale)
            if stale > f + slack_s:
                problems.append(f"{r.agent_id} was still running {r.intent_id} at {p:.3f}, {stale:.2f} s after its "
                                f"last quorum confirmation (F = {f:.1f} s; ended by {r.ended_by})")
                break
    return _summarise("agents ran past their fail-closed bound", problems,
                      f"{len(history.runs)} runs; longest unconfirmed stretch while running {worst:.2f} s "
                      f"(F = {f:.1f} s)")


# --- convergence -------------------------------------------------------------------------------------


def _diff_paths(a: Any, b: Any, path: str, out: list[str], limit: int) -> None:
    if len(out) >= limit:
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                out.append(f"{path}/{k} only on {'second' if k in b else 'first'}")
            else:
                _diff_paths(a[k], b[k], f"{path}/{k}", out, limit)
            if len(out) >= limit:
                return
    elif a != b:
        out.append(f"{path}: {str(a)[:60]} != {str(b)[:60]}")


def first_differences(a: Any, b: Any, limit: int = 3) -> list[str]:
    """Where two JSON values differ, as paths (at most ``limit``)."""
    out: list[str] = []
    _diff_paths(a, b, "", out, limit)
    return out


def check_convergence(dumps: Mapping[str, Mapping[str, Any]], expected_nodes: Sequence[str],
                      final_write_ok: bool, final_write_detail: str) -> CheckResult:
    """Every replica's state equal (same applied index, same records), and a final write acknowledged."""
    problems: list[str] = []
    missing = [n for n in expected_nodes if n not in dumps]
    if missing:
        problems.append(f"no state from {', '.join(missing)}")
    items = sorted(dumps.items())
    if items:
        first_id, first = items[0]
        for nid, d in items[1:]:
            if d != first:
                diffs: list[str] = []
                _diff_paths(first, d, "", diffs, 3)
                problems.append(f"{nid} differs from {first_id}: {'; '.join(diffs)}")
    if not final_write_ok:
        problems.append(f"the final write failed: {final_write_detail}")
    index = items[0][1].get("applied_index") if items else None
    return _summarise("convergence problems", problems,
                      f"{len(dumps)} replicas identical at applied index {index}; {final_write_detail}")


# --- leader recovery (liveness) ----------------------------------------------------------------------


@dataclass(frozen=True)
class LeaderLoss:
    """A fault that took the leader away: how long until another node led (None: never seen)."""

    fault: str
    old_leader: str
    time_to_new_leader_s: float | None
    observed_for_s: float  # how long the fault lasted: a short fault may end before an election


def check_leader_recovery(losses: Sequence[LeaderLoss], bound_s: float, min_observe_s: float) -> CheckResult:
    """A leader cut off for at least ``min_observe_s`` must have been replaced, within ``bound_s``."""
    problems: list[str] = []
    for loss in losses:
        t = loss.time_to_new_leader_s
        if t is None and loss.observed_for_s >= min_observe_s:
            problems.append(f"{loss.fault}: no new leader in {loss.observed_for_s:.1f} s after {loss.old_leader} "
                            "was cut off")
        elif t is not None and t > bound_s:
            problems.append(f"{loss.fault}: new leader only after {t:.1f} s (bound {bound_s:.0f} s)")
    times = [f"{x.time_to_new_leader_s:.2f}s" for x in losses if x.time_to_new_leader_s is not None]
    return _summarise("slow leader recoveries", problems,
                      f"{len(losses)} leader losses; new leader after {', '.join(times) or 'n/a'}")


# --- the workload did something ---------------------------------------------------------------------


def check_workload_progress(history: History) -> CheckResult:
    """The other checks are vacuous on an idle history: some plans must have been granted and
    completed, and runs recorded."""
    grants = sum(1 for o in history.ops if o.is_grant)
    completions = sum(1 for o in history.ops if o.kind == "complete" and o.outcome == "ok")
    if grants == 0 or completions == 0 or not history.runs:
        return CheckResult(False, f"the workload made too little progress to check: {grants} grants, "
                                  f"{completions} completions, {len(history.runs)} runs")
    return CheckResult(True, f"{grants} grants, {completions} completions, {len(history.runs)} runs")


# --- every node back after healing ---------------------------------------------------------------------


def check_rejoin(rejoin_s: float | None, bound_s: float, note: str = "") -> CheckResult:
    """Every node caught up with the leader within ``bound_s`` of the faults ending."""
    if rejoin_s is None:
        return CheckResult(False, f"not every node caught up after healing: {note or 'never observed'}")
    if rejoin_s > bound_s:
        return CheckResult(False, f"the last node caught up only {rejoin_s:.1f} s after healing "
                                  f"(bound {bound_s:.0f} s)")
    return CheckResult(True, f"every node caught up {rejoin_s:.1f} s after healing")
