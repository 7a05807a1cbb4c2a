"""The checks every schedule ends with. Pure functions over what the schedule recorded.

From the chaos suite (``chaos/checkers.py``): no acknowledged write or verdict lost, mutual
exclusion over time, fencing tokens growing in grant order, agents stopped within their
fail-closed bound, convergence of every replica at one applied index after a final write.

Added for the simulator, which sees every replica's every apply:

- ``state_machine_safety``: no two replicas ever applied different commands at one Raft index
  (a replica that applied an entry that was not committed disagrees with the one that was);
- ``committed_only``: every command any replica applied is the committed one at its index in the
  final leader's log (as far as that log still holds it);
- ``model``: every replica's final state equals a fresh store that applied, in index order, the
  commands the cluster committed (so no replica skipped, repeated or half-applied anything);
- ``acked_indexes``: every index a client was told was applied is within every replica's state;
- ``linearizable_reads``: a read sees every intent and registry version acknowledged before it
  started;
- ``revoked_keys``: nothing is acknowledged to a key after its revocation was acknowledged;
- ``internal_errors``: no task of the node's code (or the simulator's) failed with an exception;
- ``durable_log_kept`` (checked as the schedule runs): a restarted node keeps every durable log
  entry after its snapshot (they are promises it made: acknowledgements, votes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tetherlab.chaos import checkers as ck
from tetherlab.chaos.history import History
from tetherlab.chaos.sim.workload import Journal
from tetherlab.cluster.replica.memstore import MemoryStore

DETAIL_MAX = ck.DETAIL_ITEMS_MAX


@dataclass(frozen=True)
class Violation:
    check: str
    detail: str


def _summ(name: str, problems: Sequence[str]) -> list[Violation]:
    if not problems:
        return []
    shown = "; ".join(problems[:DETAIL_MAX])
    more = f" (+{len(problems) - DETAIL_MAX} more)" if len(problems) > DETAIL_MAX else ""
    return [Violation(name, f"{len(problems)}: {shown}{more}")]


def check_state_machine_safety(conflicts: Sequence[str]) -> list[Violation]:
    return _summ("state_machine_safety", list(conflicts))


def check_committed_only(applied: Mapping[int, tuple[str, bytes]], final_log: Mapping[int, bytes]) -> list[Violation]:
    problems = [f"index {i}: {who} applied {payload[:60]!r}, the committed entry is {final_log[i][:60]!r}"
                for i, (who, payload) in sorted(applied.items()) if i in final_log and final_log[i] != payload]
    return _summ("committed_only", problems)


def model_dump(applied: Mapping[int, tuple[str, bytes]], up_to: int) -> dict[str, Any]:
    model = MemoryStore()
    for i in sorted(applied):
        if i > up_to:
            break
        model.apply(i, applied[i][1])
    return model.dump()


def check_model(applied: Mapping[int, tuple[str, bytes]], dumps: Mapping[str, Mapping[str, Any]]) -> list[Violation]:
    problems: list[str] = []
    cache: dict[int, dict[str, Any]] = {}
    for node, dump in sorted(dumps.items()):
        at = int(dump.get("applied_index") or 0)
        if at not in cache:
            cache[at] = model_dump(applied, at)
        if dump != cache[at]:
            diffs = ck.first_differences(cache[at], dump)
            problems.append(f"{node} at index {at} differs from the replayed log: {'; '.join(diffs)}")
    return _summ("model", problems)


def check_acked_indexes(acked: Sequence[tuple[int, str, str]],
                        dumps: Mapping[str, Mapping[str, Any]]) -> list[Violation]:
    problems: list[str] = []
    if not dumps:
        return []
    low = min(int(d.get("applied_index") or 0) for d in dumps.values())
    for index, agent, kind in acked:
        if index > low:
            problems.append(f"{kind} of {agent} acknowledged at index {index}, above what some replica holds ({low})")
    return _summ("acked_indexes", problems)


def check_reads(journal: Journal, history: History) -> list[Violation]:
    problems: list[str] = []
    acked_intents = sorted((o.complete_s, o.intent_id) for o in history.ops
                           if o.kind == "submit" and o.outcome == "ok" and o.intent_id)
    for r in journal.reads:
        if r.kind == "intents":
            missing = [iid for t, iid in acked_intents if t < r.invoke_s and iid not in r.intent_ids]
            if missing:
                problems.append(f"intents read at {r.invoke_s:.3f} misses {missing[:3]} acknowledged before it")
        elif r.kind == "concepts":
            before = [v for (_t0, t1, v) in journal.pushes if t1 < r.invoke_s]
            if before and r.version < max(before):
                problems.append(f"concepts read at {r.invoke_s:.3f} saw version {r.version}, "
                                f"version {max(before)} was acknowledged before it")
    return _summ("linearizable_reads", problems)


def check_revoked_keys(journal: Journal) -> list[Violation]:
    revoked_at: dict[str, float] = {}
    for k in journal.keys:
        if k.kind == "revoke" and k.outcome == "ok":
            revoked_at[k.key_id] = min(revoked_at.get(k.key_id, k.complete_s), k.complete_s)
    problems = [f"{o.kind} by {o.agent_id} with key {o.key_id[:20]} invoked at {o.invoke_s:.3f} was acknowledged, "
                f"the key's revocation at {revoked_at[o.key_id]:.3f}"
                for o in journal.acked_by_key if o.key_id in revoked_at and o.invoke_s > revoked_at[o.key_id]]
    return _summ("revoked_keys", problems)


def without_revoked(history: History, journal: Journal, dumps: Mapping[str, Mapping[str, Any]]) -> History:
    """Runs end, for mutual exclusion, when an operator revoked their intent: a revoke hands the
    concepts on at once, before the agent can hear of it (the operator's call, documented).

    Whether a revoke took effect is read from the final state (an intent ended "revoked by"),
    not from the operator's outcome: a revoke whose first attempt was applied late and whose
    retry was then refused (``not_active``) looks failed to the operator."""
    ended: dict[str, str] = {}
    for dump in dumps.values():
        for iid, rec in (dump.get("engine", {}).get("intents") or {}).items():
            ended.setdefault(iid, str(rec.get("ended_by") or ""))
    revoked: dict[str, float] = {}
    for intent_id, t, _outcome in journal.revokes:
        if ended.get(intent_id, "").startswith("revoked by"):
            revoked[intent_id] = min(revoked.get(intent_id, t), t)
    runs = [replace(r, end_s=max(r.start_s, min(r.end_s, revoked[r.intent_id]))) if r.intent_id in revoked else r
            for r in history.runs]
    return History(history.ops, runs, history.fail_closed_s)


def run_all(*, history: History, journal: Journal, dumps: Mapping[str, Mapping[str, Any]], members: Sequence[str],
            applied: Mapping[int, tuple[str, bytes]], conflicts: Sequence[str], final_log: Mapping[int, bytes],
            final_write_ok: bool, final_write_detail: str, policies: Mapping[str, str],
            internal_errors: Sequence[str], invariants: Sequence[tuple[str, str]] = ()) -> list[Violation]:
    out: list[Violation] = []
    by_check: dict[str, list[str]] = {}
    for check, detail in invariants:
        by_check.setdefault(check, []).append(detail)
    for check, details in sorted(by_check.items()):
        out += _summ(check, details)
    for name, res in (
        ("no_lost_acks", ck.check_no_lost_acks(history, dumps)),
        ("mutual_exclusion", ck.check_mutual_exclusion(without_revoked(history, journal, dumps), policies)),
        ("fencing_tokens", ck.check_fencing_tokens(history)),
        ("fail_closed", ck.check_fail_closed(history, slack_s=0.05)),
        ("convergence", ck.check_convergence(dumps, members, final_write_ok, final_write_detail)),
    ):
        if not res.passed:
            out.append(Violation(name, res.detail))
    out += check_state_machine_safety(conflicts)
    out += check_committed_only(applied, final_log)
    out += check_model(applied, dumps)
    out += check_acked_indexes(journal.acked_indexes, dumps)
    out += check_reads(journal, history)
    out += check_revoked_keys(journal)
    out += _summ("internal_errors", list(internal_errors))
    return out
