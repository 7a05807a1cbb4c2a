"""Soft conflicts and drift: the engine compares what agents' in-flight code touches with their
claims and with each other (core/engine/footprint.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tetherlab.cluster.core.engine.engine import Engine
from tetherlab.cluster.core.engine.testing import Driver

REGISTRY = """
[[concept]]
id = "auth.sessions"
title = "Session store"
paths = ["src/auth/"]
symbols = ["SessionStore"]

[[concept]]
id = "api.routes"
title = "Route handlers"
paths = ["src/api/"]
depends_on = ["auth.sessions"]

[[concept]]
id = "billing.invoices"
title = "Invoices"
paths = ["src/billing/"]

[[concept]]
id = "docs.guides"
title = "Guides"
paths = ["docs/"]
drift = "warn"
"""
ALICE = "alice/4b2e0000-0000-4000-8000-0000000000a1"
BOB = "bob/4b2e0000-0000-4000-8000-0000000000b0"
CAROL = "carol/4b2e0000-0000-4000-8000-0000000000c0"


def driver() -> Driver:
    d = Driver()
    d.init()
    assert d.push(toml=REGISTRY)["ok"]
    for a in (ALICE, BOB, CAROL):
        d.open(a)
    return d


def plan(d: Driver, agent: str, *modify: str, depend: tuple[str, ...] = ()) -> dict[str, Any]:
    v = d.intent(agent, f"work on {', '.join(modify) or 'nothing registered'}", modify=list(modify),
                 depend=list(depend))
    assert v["action"] == "continue", v
    return v


def report(d: Driver, agent: str, intent_id: str, *files: dict[str, Any]) -> dict[str, Any]:
    return d.send({"type": "report_changes", "agent_id": agent, "intent_id": intent_id, "files": list(files)})


def f(path: str, *symbols: str, change: str = "modified") -> dict[str, Any]:
    return {"path": path, "change": change, "symbols": [{"name": s} for s in symbols]}


def test_changes_within_the_claims_change_nothing_but_the_footprint() -> None:
    d = driver()
    v = plan(d, ALICE, "auth.sessions")
    r = report(d, ALICE, v["intent_id"], f("src/auth/store.py", "SessionStore.get"))
    assert r["action"] == "continue" and r["fencing_token"] == v["fencing_token"]
    assert r["drift"] == {"claimed": [], "warned": []} and r["soft_conflicts"] == []
    assert d.engine.get_intent(v["intent_id"])["footprint"]["concepts"] == {"auth.sessions": "src/auth/store.py"}


def test_reaching_a_free_concept_claims_it_with_a_new_fencing_token() -> None:
    d = driver()
    v = plan(d, ALICE, "auth.sessions")
    r = report(d, ALICE, v["intent_id"], f("src/auth/store.py"), f("src/billing/pay.py"))
    assert r["action"] == "continue" and r["drift"]["claimed"] == ["billing.invoices"]
    assert r["fencing_token"] > v["fencing_token"]
    assert "billing.invoices" in r["context"] and "now claimed" in r["context"]
    it = d.engine.get_intent(v["intent_id"])
    drift = next(c for c in it["claims"]["modify"] if c["concept"] == "billing.invoices")
    assert drift["reasons"][0] == {"kind": "drift", "detail": "src/billing/pay.py", "source": "changes"}
    # and the claim is real: another agent's plan on it is now stopped
    assert d.intent(BOB, "invoices", modify=["billing.invoices"])["action"] == "stop"


def test_reaching_a_concept_another_agent_modifies_reverts_the_drifting_agent_naming_the_holder() -> None:
    d = driver()
    va = plan(d, ALICE, "auth.sessions")
    vb = plan(d, BOB, "billing.invoices")
    r = report(d, ALICE, va["intent_id"], f("src/billing/pay.py"))
    assert r["action"] == "revert"
    assert r["conflicts"][0]["holder_agent_id"] == BOB and r["conflicts"][0]["concept"] == "billing.invoices"
    assert "Revert" in r["context"] and "src/billing/pay.py" in r["context"]
    assert d.engine.get_intent(va["intent_id"])["status"] == "reverted"
    assert d.engine.get_intent(vb["intent_id"])["status"] == "active"
    # Alice's concepts are free again
    assert plan(d, CAROL, "auth.sessions")["action"] == "continue"


def test_reaching_a_concept_another_agent_depends_on_stops_the_drifting_agent() -> None:
    d = driver()
    va = plan(d, ALICE, "billing.invoices")
    plan(d, BOB, "api.routes")  # depends on auth.sessions through the registry
    r = report(d, ALICE, va["intent_id"], f("src/auth/store.py"))
    assert r["action"] == "stop" and r["conflicts"][0]["holder_agent_id"] == BOB
    assert r["conflicts"][0]["kind"] == "modify_depended"


def test_a_concept_that_only_warns_on_drift_is_not_claimed_and_both_carry_on() -> None:
    d = driver()
    va = plan(d, ALICE, "auth.sessions")
    plan(d, BOB, "docs.guides")
    r = report(d, ALICE, va["intent_id"], f("docs/guide.md"))
    assert r["action"] == "continue" and r["drift"] == {"claimed": [], "warned": ["docs.guides"]}
    assert "Warning" in r["context"] and BOB in r["context"]
    assert [c["concept"] for c in d.engine.get_intent(va["intent_id"])["claims"]["modify"]] == ["auth.sessions"]


def test_two_agents_on_different_concepts_changing_one_shared_file_are_both_told() -> None:
    d = driver()
    va = plan(d, ALICE, "auth.sessions")
    vb = plan(d, BOB, "billing.invoices")
    report(d, ALICE, va["intent_id"], f("src/auth/store.py"), f("setup.cfg"))
    r = report(d, BOB, vb["intent_id"], f("src/billing/pay.py"), f("setup.cfg"))
    (mine,) = r["soft_conflicts"]
    assert mine["kind"] == "file" and mine["path"] == "setup.cfg" and mine["other_agent_id"] == ALICE
    assert "also changing setup.cfg" in r["context"]
    # Alice learns of it on her next heartbeat, and on every one while it lasts: a hedged or late
    # heartbeat reply may be dropped by her shim, which tells its agent of each conflict once.
    hb = d.heartbeat(ALICE, BOB)
    assert sorted(hb["soft"]) == sorted([ALICE, BOB])  # Bob heard in his report's reply; again here
    assert hb["soft"][ALICE]["soft_conflicts"][0]["other_agent_id"] == BOB
    writes = {ns for ns, _, _ in d.last_writes}
    assert d.heartbeat(ALICE)["soft"][ALICE] == hb["soft"][ALICE]
    assert "intents" in writes and "intents" not in {ns for ns, _, _ in d.last_writes}
    world = d.engine.world_slice(ALICE)
    assert world["soft_conflicts"][0]["path"] == "setup.cfg"
    # The verdicts stay continue; the pair is listed once.
    listed = d.engine.list_conflicts()
    assert len(listed["current"]) == 1 and {e["kind"] for e in listed["recent"]} == {"soft_file"}


def test_a_change_to_a_symbol_another_agent_relies_on_is_reported_to_both() -> None:
    d = driver()
    va = plan(d, ALICE, "billing.invoices", depend=("auth.sessions",))
    vb = d.intent(BOB, "rename the store method", modify=["auth.sessions"])
    assert vb["action"] == "stop"  # a concept-level conflict is a stop, not a soft conflict
    d2 = driver()
    d2.push(toml=REGISTRY.replace('paths = ["src/auth/"]', 'paths = ["src/auth/"]\ndependents = "continue"'))
    va = plan(d2, ALICE, "billing.invoices", depend=("auth.sessions",))
    vb = plan(d2, BOB, "auth.sessions")
    r = report(d2, BOB, vb["intent_id"], {"path": "src/auth/store.py", "change": "modified",
                                          "symbols": [{"name": "SessionStore.fetch", "change": "renamed",
                                                       "old_name": "SessionStore.get"}]})
    kinds = {(c["kind"], c["other_agent_id"]) for c in r["soft_conflicts"]}
    assert ("dependency", ALICE) in kinds
    hb = d2.heartbeat(ALICE)["soft"][ALICE]
    dep = next(c for c in hb["soft_conflicts"] if c["kind"] == "dependency")
    assert dep["symbol"] in ("SessionStore.fetch", "SessionStore.get") and dep["mirror"]
    assert "which your work relies on" in hb["context"]
    assert va["intent_id"] != vb["intent_id"]


def test_two_agents_changing_one_symbol_get_a_symbol_conflict() -> None:
    d = driver()
    va = plan(d, ALICE, "auth.sessions")
    vb = plan(d, BOB, "billing.invoices")
    report(d, ALICE, va["intent_id"], f("lib/util.py", "slugify"))
    r = report(d, BOB, vb["intent_id"], f("lib/util.py", "slugify"))
    assert {c["kind"] for c in r["soft_conflicts"]} == {"file", "symbol"}


def test_soft_conflicts_end_when_either_side_stops_overlapping_or_finishes() -> None:
    d = driver()
    va = plan(d, ALICE, "auth.sessions")
    vb = plan(d, BOB, "billing.invoices")
    report(d, ALICE, va["intent_id"], f("setup.cfg"))
    report(d, BOB, vb["intent_id"], f("setup.cfg"))
    report(d, ALICE, va["intent_id"], f("src/auth/x.py"))  # Alice reverted her change to setup.cfg
    assert d.engine.get_intent(vb["intent_id"]).get("soft", []) == []
    report(d, ALICE, va["intent_id"], f("setup.cfg"))
    assert d.engine.get_intent(vb["intent_id"])["soft"]
    d.end(ALICE)
    assert d.engine.get_intent(vb["intent_id"]).get("soft", []) == []
    assert d.engine.list_conflicts()["current"] == []


def test_reports_are_checked_and_a_bad_one_changes_nothing() -> None:
    d = driver()
    v = plan(d, ALICE, "auth.sessions")
    bad = [
        ({"path": "../etc/passwd"}, "bad_field"),
        ({"path": "a.py", "change": "exploded"}, "bad_field"),
        ({"path": "a.py", "hunks": [[5, 1]]}, "bad_field"),
        ({"path": "a.py", "contents": "secret"}, "unknown_field"),
    ]
    for file, code in bad:
        r = report(d, ALICE, v["intent_id"], file)
        assert r["error"]["code"] == code, (file, r)
        assert d.last_writes == []
    r = report(d, ALICE, v["intent_id"], *[f(f"x{i}.py") for i in range(600)])
    assert r["error"]["code"] == "too_large"
    assert report(d, ALICE, "i-999", f("a.py"))["error"]["code"] == "intent_mismatch"
    assert report(d, BOB, v["intent_id"], f("a.py"))["error"]["code"] == "intent_mismatch"


@pytest.mark.parametrize("order", [0, 1])
def test_replicas_rebuilt_from_records_agree_on_footprints(order: int) -> None:
    d = driver()
    va = plan(d, ALICE, "auth.sessions")
    vb = plan(d, BOB, "billing.invoices")
    steps = [lambda: report(d, ALICE, va["intent_id"], f("setup.cfg", "x")),
             lambda: report(d, BOB, vb["intent_id"], f("setup.cfg", "x"), f("src/billing/a.py"))]
    for s in steps if order == 0 else reversed(steps):
        s()
    rebuilt = d.rebuilt()
    assert rebuilt.dump_records() == d.engine.dump_records()
    assert rebuilt._index_view() == d.engine._index_view()


def _churn(d: Driver, rounds: int) -> tuple[str, str]:
    """Alice and Bob both change setup.cfg, alternately with and without it: a soft-conflict
    event every report."""
    va, vb = plan(d, ALICE, "auth.sessions"), plan(d, BOB, "billing.invoices")
    report(d, ALICE, va["intent_id"], f("setup.cfg"))
    for i in range(rounds):
        files = [f("src/billing/pay.py")] + ([f("setup.cfg")] if i % 2 == 0 else [])
        report(d, BOB, vb["intent_id"], *files)
    return va["intent_id"], vb["intent_id"]


def test_logging_a_conflict_event_writes_that_event_not_the_whole_log() -> None:
    d = driver()
    _, vb = _churn(d, 500)  # an event every other report: past CONFLICT_LOG_MAX (200), trimmed
    report(d, BOB, vb, f("src/billing/pay.py"), f("setup.cfg"))
    events = [(k, v) for ns, k, v in d.last_writes if ns == "conflicts"]
    assert events and len(events) <= 4, d.last_writes  # the new event(s) and the trimmed ones
    assert sum(len(v or b"") for _, v in events) < 2000
    assert not [w for w in d.last_writes if w[0] == "meta" and w[1] == "conflicts"]
    recent = d.engine.list_conflicts()["recent"]
    assert len(recent) == 200 and recent[0]["index"] == d.index
    rebuilt = d.rebuilt()
    assert rebuilt.dump_records() == d.engine.dump_records()
    assert rebuilt.list_conflicts() == d.engine.list_conflicts()


def test_a_state_with_the_one_record_conflict_log_loads_and_migrates_on_the_next_event() -> None:
    d = driver()
    _, vb = _churn(d, 30)
    before = d.engine.list_conflicts()
    # The layout written before per-event records: every event in meta/conflicts.
    events = [json.loads(v) for ns, _, v in d.records() if ns == "conflicts"]
    legacy = [r for r in d.records() if r[0] != "conflicts"]
    legacy.append(("meta", "conflicts", json.dumps({"events": events}).encode()))
    old = Engine.from_records(sorted(legacy), d.limits)
    assert old.list_conflicts() == before
    assert Engine.from_records(old.dump_records(), d.limits).list_conflicts() == before
    # The next event moves the log to per-event records and deletes the old one.
    d.engine, d.store = old, {(ns, k): v for ns, k, v in legacy}
    report(d, BOB, vb, f("src/billing/pay.py"), f("setup.cfg"))
    assert ("meta", "conflicts", None) in d.last_writes
    assert ("meta", "conflicts") not in d.store
    assert len([k for ns, k in d.store if ns == "conflicts"]) == len(events) + 1
    rebuilt = d.rebuilt()
    assert rebuilt.dump_records() == d.engine.dump_records()
    assert rebuilt.list_conflicts()["recent"][1:] == before["recent"]


def test_a_plainly_valid_report_decodes_as_the_checked_decoder_does() -> None:
    from tetherlab.cluster.core.engine import footprint as fp

    reports = [
        [f("src/a.py", "A.run", "b"), {"path": "./docs/x.md", "change": "added", "hunks": [[1, 4], [7, 7]]}],
        [{"path": "new.py", "change": "renamed", "old_path": "old.py",
          "symbols": [{"name": "f", "change": "renamed", "old_name": "g"}]}],
        [{"path": "z/"}, {"path": "a"}],
    ]
    for files in reports:
        plain = fp._decode_plain(files)
        try:
            checked: Any = fp._decode_checked(files)
        except Exception as e:
            checked = e
        assert plain is None or plain == checked, (files, plain, checked)
    assert fp._decode_plain(reports[0]) is not None and fp._decode_plain(reports[1]) is not None
    # Anything not plainly valid goes to the checked decoder, which names it.
    for files in ([{"path": "a.py", "hunks": [[True, 2]]}], [{"path": "a.py", "hunks": [[5, 1]]}],
                  [{"path": "a.py", "symbols": [{"name": " "}]}], [{"path": "a.py", "x": 1}],
                  [{"path": "a\x00.py"}], [{"path": "a.py"}, {"path": "./a.py"}]):
        assert fp._decode_plain(files) is None, files


# Mostly valid values (so whole reports often pass the plain decoder), one in five anything.
_odd = st.one_of(st.none(), st.booleans(), st.integers(-2, 9), st.sampled_from(
    ["", " ", "../e", "/abs", "f\x00", "g//h", "exploded", "x" * 1100, "\\w"]), st.lists(st.integers(), max_size=2))


def _mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.integers(0, 4).flatmap(lambda k: _odd if k == 0 else valid)


_path = _mostly(st.sampled_from(["a.py", "./b/c.py", "d/", "a.py/", "e f.md"]))
_name = _mostly(st.sampled_from(["A.run", "f", " g "]))
_num = _mostly(st.one_of(st.integers(0, 5), st.booleans()))
_sym = st.fixed_dictionaries({"name": _name}, optional={
    "change": _mostly(st.sampled_from(["modified", "renamed"])), "old_name": _name})
_file = _mostly(st.fixed_dictionaries({"path": _path}, optional={
    "change": _mostly(st.sampled_from(["modified", "added", "renamed", "deleted"])), "old_path": _path,
    "symbols": _mostly(st.lists(_mostly(_sym), max_size=3)),
    "hunks": _mostly(st.lists(_mostly(st.lists(_num, min_size=2, max_size=2)), max_size=3))}))


@settings(max_examples=1000, deadline=None)
@given(_mostly(st.lists(_file, max_size=4)))
def test_the_plain_decoder_agrees_with_the_checked_one_on_anything(files: list[Any]) -> None:
    from tetherlab.cluster.core.engine import footprint as fp

    plain = fp._decode_plain(files)
    if plain is not None:
        assert fp._decode_checked(files) == plain
