"""Table tests for every engine rule: verdicts, lifecycle, sessions, revoke, revert, records."""

from __future__ import annotations

import json

import pytest

from tetherlab.cluster.core.engine import (
    CommandError,
    Engine,
    Limits,
    decode_command,
)
from tetherlab.cluster.core.engine.testing import REMOTE, Driver

REGISTRY = """
[[concept]]
id = "core.contract"
aliases = ["core contract"]
paths = ["core/contract/**"]
symbols = ["core.Contract"]

[[concept]]
id = "core.soft"
aliases = ["soft api"]
dependents = "continue"

[[concept]]
id = "app.feature"
aliases = ["feature page"]
paths = ["app/feature/**"]
depends_on = ["core.contract"]

[[concept]]
id = "app.other"
aliases = ["other page"]
depends_on = ["core.soft"]

[[concept]]
id = "misc.x"
aliases = ["misc thing"]
"""

A, B, C = "ann/aaaa-1", "ben/bbbb-2", "cat/cccc-3"


def driver(**limits: int) -> Driver:
    d = Driver(Limits(**limits) if limits else None, mirror=True)
    assert d.init(ttl_ms=10_000)["ok"]
    assert d.push(toml=REGISTRY)["ok"]
    for a in (A, B, C):
        assert d.open(a)["ok"]
    return d


def concepts(verdict: dict, kind: str) -> list[str]:
    return [c["concept"] for c in verdict["claims"][kind]]


# --- verdict rules ---------------------------------------------------------------------------

# (first holder's claims, second intent's claims, expected action for the second, conflict kind)
RULES = [
    ({"modify": ["misc.x"]}, {"modify": ["misc.x"]}, "stop", "modify_modify"),
    ({"modify": ["core.contract"]}, {"depend": ["core.contract"]}, "stop", "depend_on_modified"),
    ({"depend": ["core.contract"]}, {"modify": ["core.contract"]}, "stop", "modify_depended"),
    ({"modify": ["core.soft"]}, {"depend": ["core.soft"]}, "continue", "depend_on_modified"),
    ({"depend": ["core.soft"]}, {"modify": ["core.soft"]}, "continue", "modify_depended"),
    ({"modify": ["core.soft"]}, {"modify": ["core.soft"]}, "stop", "modify_modify"),
    ({"depend": ["core.contract"]}, {"depend": ["core.contract"]}, "continue", None),
    ({"modify": ["app.feature"]}, {"modify": ["core.contract"]}, "stop", "modify_depended"),
    ({"modify": ["misc.x"]}, {"modify": ["app.feature"]}, "continue", None),
]


@pytest.mark.parametrize(("first", "second", "action", "kind"), RULES)
def test_verdict_rules(first: dict, second: dict, action: str, kind: str | None) -> None:
    d = driver()
    v1 = d.intent(A, "first", **first)
    assert v1["action"] == "continue"
    v2 = d.intent(B, "second", **second)
    assert v2["action"] == action
    if kind is None:
        assert v2["conflicts"] == []
    else:
        assert [(c["kind"], c["holder_agent_id"], c["holder_summary"]) for c in v2["conflicts"]] == [
            (kind, A, "first")
        ]
    if action == "continue" and kind is not None:
        assert "registry lets this proceed" in v2["context"]
    # The first holder is never disturbed by a later intent.
    assert d.engine.get_intent(v1["intent_id"])["status"] == "active"
    assert d.engine.get_intent(v2["intent_id"])["status"] == ("active" if action == "continue" else "stopped")


def test_stopped_intent_holds_no_claims() -> None:
    d = driver()
    d.intent(A, modify=["misc.x"])
    assert d.intent(B, modify=["misc.x", "core.contract"])["action"] == "stop"
    # core.contract was only wanted by the stopped intent: it is free.
    assert d.intent(C, modify=["core.contract"])["action"] == "continue"


def test_modify_implies_depending_on_direct_dependencies() -> None:
    d = driver()
    v = d.intent(A, "Rework the feature page")
    assert concepts(v, "modify") == ["app.feature"]
    assert concepts(v, "depend") == ["core.contract"]
    reason = v["claims"]["depend"][0]["reasons"][0]
    assert reason == {"kind": "depends_on", "detail": "app.feature depends on core.contract", "source": "app.feature"}


def test_explicit_claims_win_over_derived() -> None:
    d = driver()
    v = d.intent(A, "Rewrite the core contract", depend=["core.contract"])
    assert concepts(v, "modify") == [] and concepts(v, "depend") == ["core.contract"]


def test_unknown_explicit_concept_is_refused_and_changes_nothing() -> None:
    d = driver()
    before = d.engine.dump_records()
    r = d.intent(A, modify=["nope.missing"])
    assert r["error"]["code"] == "unknown_concept" and "nope.missing" in r["error"]["message"]
    assert d.engine.dump_records() == before


# --- replan, complete, abandon ---------------------------------------------------------------


def test_replan_that_newly_conflicts_is_stopped_and_releases_its_old_claims() -> None:
    d = driver()
    a1 = d.intent(A, modify=["misc.x"])
    d.intent(B, modify=["core.contract"])
    a2 = d.intent(A, "now also the contract", modify=["misc.x", "core.contract"], trigger="replan")
    assert a2["action"] == "stop" and a2["intent_id"] == a1["intent_id"]
    assert a2["conflicts"][0]["concept"] == "core.contract"
    assert d.engine.get_intent(a1["intent_id"])["status"] == "stopped"
    assert d.intent(C, modify=["misc.x"])["action"] == "continue"


def test_replan_without_conflict_keeps_the_id_and_gets_a_new_fencing_token() -> None:
    d = driver()
    a1 = d.intent(A, modify=["misc.x"])
    a2 = d.intent(A, "moved on", modify=["core.soft"], trigger="replan", intent_id=a1["intent_id"])
    assert a2["action"] == "continue" and a2["intent_id"] == a1["intent_id"]
    assert a2["fencing_token"] > a1["fencing_token"]
    assert d.intent(B, modify=["misc.x"])["action"] == "continue"  # the old claim is released
    assert d.intent(C, modify=["core.soft"])["action"] == "stop"


@pytest.mark.parametrize("trigger", ["complete", "abandon"])
def test_complete_and_abandon_release_concepts(trigger: str) -> None:
    d = driver()
    a = d.intent(A, "the work", modify=["misc.x"])
    assert d.intent(B, modify=["misc.x"])["action"] == "stop"
    done = d.end(A, trigger)
    assert done["action"] == "continue" and done["intent_id"] == a["intent_id"]
    assert d.engine.get_intent(a["intent_id"])["status"] == ("completed" if trigger == "complete" else "abandoned")
    assert d.intent(B, modify=["misc.x"])["action"] == "continue"
    recent = d.engine.get_concept("misc.x")["recent"]
    assert [h["summary"] for h in recent] == (["the work"] if trigger == "complete" else [])


def test_complete_retry_gets_the_same_answer_and_without_intent_is_refused() -> None:
    d = driver()
    assert d.end(A)["error"]["code"] == "no_active_intent"
    d.intent(A, modify=["misc.x"])
    first = d.end(A)
    assert d.end(A) == first


def test_initial_while_active_supersedes_the_old_intent() -> None:
    d = driver()
    a1 = d.intent(A, modify=["misc.x"])
    a2 = d.intent(A, modify=["misc.x"])
    assert a2["action"] == "continue" and a2["intent_id"] != a1["intent_id"]
    assert d.engine.get_intent(a1["intent_id"])["status"] == "abandoned"


def test_intent_id_must_name_the_current_intent() -> None:
    d = driver()
    d.intent(A, modify=["misc.x"])
    r = d.intent(A, trigger="replan", intent_id="i-1")
    assert r["error"]["code"] == "intent_mismatch"


# --- revoke and revert -----------------------------------------------------------------------


def test_revoke_without_revert_stops_and_the_agent_is_told_on_its_next_command() -> None:
    d = driver()
    a = d.intent(A, modify=["misc.x"])
    r = d.revoke(a["intent_id"], reason="wrong approach")
    assert r == {"ok": True, "intent_id": a["intent_id"], "agent_id": A, "status": "stopped"}
    assert d.heartbeat(A)["notices"][A]["action"] == "stop"
    told = d.intent(A, "keep going", modify=["misc.x"], trigger="replan")
    assert told["action"] == "stop" and "wrong approach" in told["context"]
    assert d.intent(B, modify=["misc.x"])["action"] == "continue"  # revoked claims are free
    assert d.intent(A, "fresh plan", modify=["core.soft"])["action"] == "continue"  # told once


def test_revoke_with_revert_gives_revert() -> None:
    d = driver()
    a = d.intent(A, modify=["misc.x"])
    assert d.revoke(a["intent_id"], revert=True)["status"] == "reverted"
    v = d.end(A)
    assert v["action"] == "revert" and v["intent_id"] == a["intent_id"]
    assert v["fencing_token"] == a["fencing_token"]
    assert d.revoke(a["intent_id"])["error"]["code"] == "not_active"
    assert d.revoke("i-999")["error"]["code"] == "unknown_intent"


def test_revert_after_lapse_once_another_intent_claims_the_concepts() -> None:
    d = driver()
    a = d.intent(A, "my change", modify=["misc.x"])
    d.advance(5_000)
    d.heartbeat(B, C)
    d.advance(6_000)  # A's deadline (10 s TTL) has passed; B and C heartbeated
    ex = d.expire()
    assert ex["lapsed"] == [A] and ex["intents_lapsed"] == [a["intent_id"]]
    assert d.engine.get_intent(a["intent_id"])["status"] == "lapsed"
    b = d.intent(B, "take over", modify=["misc.x"])
    assert b["action"] == "continue"
    assert d.engine.get_intent(a["intent_id"])["status"] == "reverted"
    assert d.intent(A, modify=["core.soft"])["error"]["code"] == "session_lapsed"
    assert d.open(A)["notice"]["action"] == "revert"
    v = d.end(A)
    assert v["action"] == "revert"
    assert v["conflicts"][0]["holder_agent_id"] == B and v["conflicts"][0]["concept"] == "misc.x"
    assert B in v["context"]


def test_lapsed_intent_nobody_claimed_can_still_complete() -> None:
    d = driver()
    a = d.intent(A, modify=["misc.x"])
    d.advance(20_000)
    d.expire()
    d.open(A)
    v = d.end(A)
    assert v["action"] == "continue" and d.engine.get_intent(a["intent_id"])["status"] == "completed"


def test_lapsed_intent_can_resume_by_replan() -> None:
    d = driver()
    a = d.intent(A, modify=["misc.x"])
    d.advance(20_000)
    d.expire()
    d.open(A)
    d.open(B)
    v = d.intent(A, modify=["misc.x"], trigger="replan")
    assert v["action"] == "continue" and v["intent_id"] == a["intent_id"]
    assert d.intent(B, modify=["misc.x"])["action"] == "stop"


def test_depending_on_a_relaxed_concept_does_not_revert_a_lapsed_intent() -> None:
    d = driver()
    a = d.intent(A, depend=["core.soft"])
    d.advance(20_000)
    d.expire()
    d.open(B)
    assert d.intent(B, modify=["core.soft"])["action"] == "continue"
    assert d.engine.get_intent(a["intent_id"])["status"] == "lapsed"


# --- sessions and time -----------------------------------------------------------------------


def test_heartbeats_are_batched_and_keep_sessions_alive() -> None:
    d = driver()
    d.advance(8_000)
    hb = d.heartbeat(A, B, "zed/unknown")
    assert (hb["refreshed"], hb["unknown"], hb["lapsed"]) == (2, ["zed/unknown"], [])
    d.advance(8_000)
    assert d.expire()["lapsed"] == [C]
    assert d.heartbeat(C)["lapsed"] == [C]


def test_a_plan_a_completion_or_an_abandon_keeps_the_session_alive_like_a_heartbeat() -> None:
    # The shim starts its agent on a continue verdict and counts the verdict as a confirmation:
    # the session must last a TTL from the verdict, or it could lapse just after the grant and
    # the agent would run while its concepts went to someone else (found by the simulator).
    d = driver()
    d.advance(9_000)  # heartbeats did not get through; A's session has 1 s left
    v = d.intent(A, modify=["misc.x"])
    assert v["action"] == "continue"
    d.advance(9_000)
    assert A not in d.expire()["lapsed"]
    d.advance(9_000)
    assert d.end(A)["action"] == "continue"
    d.advance(9_000)
    assert A not in d.expire()["lapsed"]
    d.advance(1_001)
    assert A in d.expire()["lapsed"]


def test_a_refused_plan_does_not_keep_the_session_alive() -> None:
    d = driver()
    d.advance(9_000)
    assert d.intent(A, modify=["no.such"])["error"]["code"] == "unknown_concept"
    d.advance(1_001)
    assert A in d.expire()["lapsed"]


def test_a_new_leader_extends_every_session_by_one_ttl_before_expiring() -> None:
    d = driver()
    d.intent(A, modify=["misc.x"])
    d.advance(60_000)  # no heartbeat got through while there was no leader
    assert d.leader_elected()["extended"] == 3
    assert d.expire()["lapsed"] == []
    d.advance(10_001)
    assert d.expire()["lapsed"] == [A, B, C]


def test_expiry_uses_the_commands_clock_which_never_goes_back() -> None:
    d = driver()
    r = d.send({"type": "expire", "now_ms": 10**12})
    assert r["lapsed"] == [A, B, C]
    assert d.engine.stats()["clock_ms"] == 10**12
    d.send({"type": "expire", "now_ms": 5})
    assert d.engine.stats()["clock_ms"] == 10**12


def test_lapsed_sessions_are_forgotten_after_the_retention() -> None:
    d = driver(session_retain_ms=60_000)
    a = d.intent(A, modify=["misc.x"])
    d.advance(11_000)
    d.expire()
    d.advance(61_000)
    assert A in d.expire()["forgotten"]
    assert d.engine.get_session(A) is None
    assert d.engine.get_intent(a["intent_id"])["status"] == "abandoned"


def test_close_session_abandons_the_current_intent() -> None:
    d = driver()
    a = d.intent(A, modify=["misc.x"])
    assert d.send({"type": "close_session", "agent_id": A}) == {"ok": True, "abandoned": a["intent_id"]}
    assert d.intent(A)["error"]["code"] == "no_session"


@pytest.mark.parametrize(
    "remote", ["https://github.com/acme/shop", "ssh://git@github.com/acme/shop.git", "git@GitHub.com:acme/shop/"]
)
def test_spellings_of_the_same_remote_are_accepted(remote: str) -> None:
    d = driver()
    assert d.open("dan/dddd-4", remote=remote)["ok"]


def test_session_from_another_remote_is_refused_naming_both() -> None:
    d = driver()
    r = d.open("dan/dddd-4", remote="git@github.com:acme/other.git")
    assert r["error"]["code"] == "remote_mismatch"
    assert REMOTE in r["error"]["message"] and "acme/other.git" in r["error"]["message"]
    r = d.init(remote="git@github.com:acme/other.git")
    assert r["error"]["code"] == "remote_already_set"


def test_nothing_before_init() -> None:
    d = Driver()
    assert d.open(A)["error"]["code"] == "not_initialised"


# --- registry pushes -------------------------------------------------------------------------


def test_registry_version_bumps_and_a_failed_push_changes_nothing() -> None:
    d = driver()
    before = d.engine.dump_records()
    bad = d.push(toml=REGISTRY + '\n[[concept]]\nid = "bad.one"\ndepends_on = ["nope"]\n')
    assert bad["error"]["code"] == "invalid_registry"
    assert d.push(toml=REGISTRY, expected_version=7)["error"]["code"] == "registry_version_conflict"
    assert d.engine.dump_records() == before
    assert d.push(toml=REGISTRY, expected_version=1)["version"] == 2


def test_push_writes_only_changed_concepts() -> None:
    d = driver()
    d.index += 1
    cmd = decode_command({"type": "push_registry", "toml": REGISTRY.replace('"misc thing"', '"misc stuff"')})
    applied = d.engine.apply(cmd, index=d.index, now_ms=d.now_ms)
    assert [w[:2] for w in applied.writes] == [("concepts", "misc.x"), ("meta", "clock"), ("registry", "current")]


# --- commands, errors, records ---------------------------------------------------------------

COMMANDS = [
    {"type": "init", "remote": REMOTE, "session_ttl_ms": 5000},
    {"type": "push_registry", "concepts": [{"id": "a.b", "title": "", "description": "", "paths": [], "symbols": [],
                                           "aliases": ["ab"], "depends_on": [], "dependents": "stop"}],
     "expected_version": None},
    {"type": "open_session", "agent_id": A, "developer": "ann", "tool": "t", "machine": "m",
     "repo_remote": REMOTE, "base_commit": "c"},
    {"type": "close_session", "agent_id": A},
    {"type": "heartbeat", "agent_ids": [A, B]},
    {"type": "intent", "agent_id": A, "tool": "t",
     "intent": {"summary": "s", "steps": ["x"], "files": ["a/b.py"], "concepts": {"modify": ["a.b"], "depend": []}},
     "trigger": "initial"},
    {"type": "intent", "agent_id": A, "tool": "t", "trigger": "complete", "intent_id": "i-3"},
    {"type": "revoke", "intent_id": "i-3", "by": "ops", "revert": True, "reason": "r"},
    {"type": "leader_elected", "now_ms": 5},
    {"type": "expire", "now_ms": 6},
]


@pytest.mark.parametrize("obj", COMMANDS, ids=[c["type"] for c in COMMANDS])
def test_commands_round_trip_through_json(obj: dict) -> None:
    cmd = decode_command(obj)
    again = json.loads(json.dumps(cmd.to_json()))
    assert decode_command(again) == cmd
    assert again["type"] == obj["type"]


BAD = [
    ([], "bad_command", "JSON object"),
    ({"type": "nope"}, "unknown_type", "nope"),
    ({"type": "expire"}, "missing_field", "now_ms"),
    ({"type": "expire", "now_ms": 1, "extra": 2}, "unknown_field", "extra"),
    ({"type": "expire", "now_ms": True}, "bad_field", "now_ms"),
    ({"type": "heartbeat", "agent_ids": ["no-slash"]}, "bad_field", "agent_ids[0]"),
    ({"type": "open_session", "agent_id": "ann/x", "developer": "bob", "tool": "t", "machine": "m",
      "repo_remote": "r", "base_commit": "c"}, "agent_developer_mismatch", "bob"),
    ({"type": "intent", "agent_id": A, "tool": "t", "trigger": "initial"}, "missing_field", "intent"),
    ({"type": "intent", "agent_id": A, "tool": "t", "trigger": "go", "intent": {"summary": "s"}},
     "bad_field", "trigger"),
    ({"type": "intent", "agent_id": A, "tool": "t", "trigger": "initial", "intent": {"summary": ""}},
     "bad_field", "intent.summary"),
    ({"type": "intent", "agent_id": A, "tool": "t", "trigger": "initial", "intent": {"summary": "s", "steps": [3]}},
     "bad_field", "intent.steps[0]"),
    ({"type": "intent", "agent_id": A, "tool": "t", "trigger": "initial",
      "intent": {"summary": "s", "files": ["../etc/passwd"]}}, "bad_field", "intent.files"),
    ({"type": "intent", "agent_id": A, "tool": "t", "trigger": "initial",
      "intent": {"summary": "s", "concepts": {"modify": ["a.b"], "depend": ["a.b"]}}}, "bad_field", "both"),
    ({"type": "intent", "agent_id": A, "tool": "t", "trigger": "initial", "intent_id": "i-1",
      "intent": {"summary": "s"}}, "bad_field", "intent_id"),
    ({"type": "push_registry", "toml": "[[concept]]\nid = 3"}, "invalid_registry", "'id'"),
]


@pytest.mark.parametrize(("obj", "code", "names"), BAD)
def test_bad_commands_are_refused_naming_the_field(obj: object, code: str, names: str) -> None:
    with pytest.raises(CommandError) as e:
        decode_command(obj)  # type: ignore[arg-type]
    assert e.value.code == code
    assert names in e.value.message


def test_apply_refuses_a_stale_index() -> None:
    d = driver()
    r = d.engine.apply(decode_command({"type": "expire", "now_ms": 1}), index=1, now_ms=1)
    assert r.result["error"]["code"] == "stale_index" and r.writes == []


def test_finished_intents_and_per_concept_history_are_bounded() -> None:
    d = driver(finished_intents_max=3, history_per_concept=2)
    ids = []
    for i in range(6):
        ids.append(d.intent(A, f"round {i}", modify=["misc.x"])["intent_id"])
        d.end(A)
    assert [i["intent_id"] for i in d.engine.list_intents()["intents"]] == ids[-3:]
    assert [h["summary"] for h in d.engine.get_concept("misc.x")["recent"]] == ["round 4", "round 5"]
    assert d.rebuilt().dump_records() == d.records()


def test_queries() -> None:
    d = driver()
    d.intent(A, modify=["misc.x"])
    d.intent(B, depend=["core.soft"])
    d.intent(C, modify=["misc.x"])
    page = d.engine.list_intents(limit=2)
    assert len(page["intents"]) == 2 and page["next"] is not None
    rest = d.engine.list_intents(limit=2, after=page["next"])
    assert [i["status"] for i in rest["intents"]] == ["stopped"] and rest["next"] is None
    assert [i["agent_id"] for i in d.engine.list_intents(status="active")["intents"]] == [A, B]
    assert [c["id"] for c in d.engine.list_concepts(prefix="core.")["concepts"]] == ["core.contract", "core.soft"]
    assert [c["id"] for c in d.engine.list_concepts(after="core.soft", limit=1)["concepts"]] == ["misc.x"]
    assert d.engine.get_concept("misc.x")["active"][0]["agent_id"] == A
    assert d.engine.get_concept("nope") is None
    assert [s["agent_id"] for s in d.engine.list_sessions(after=A)["sessions"]] == [B, C]
    stats = d.engine.stats()
    assert (stats["active_intents"], stats["open_sessions"], stats["concepts"]) == (2, 3, 5)
    with pytest.raises(CommandError):
        d.engine.world_slice("nobody/none")


def test_rebuilt_engine_behaves_the_same() -> None:
    d = driver()
    d.intent(A, modify=["misc.x"])
    d.intent(B, depend=["core.contract"])
    twin = Driver()
    twin.engine, twin.index, twin.now_ms, twin.store = d.rebuilt(), d.index, d.now_ms, dict(d.store)
    for x in (d, twin):
        x.intent(C, modify=["core.contract"])
        x.end(A)
    assert twin.records() == d.records() and twin.results[-2:] == d.results[-2:]
    assert isinstance(twin.engine, Engine)
