"""Heartbeats renew sessions through one renewal record per heartbeat entry, not by rewriting each
session record (issue 13, item 4); a replica rebuilt from its records must hold the same times,
the same renewal bookkeeping, and so make the same expiry decisions."""

from __future__ import annotations

from tetherlab.cluster.core.engine import Engine, decode_command
from tetherlab.cluster.core.engine.testing import Driver

AGENTS = [f"dev{i}/0000000{i}-0000-4000-8000-000000000000" for i in range(4)]
TTL_MS = 10_000


def _driver() -> Driver:
    d = Driver()
    assert d.init(ttl_ms=TTL_MS)["ok"]
    for a in AGENTS:
        assert d.open(a)["ok"]
    return d


def _same_after_rebuild(d: Driver) -> Engine:
    dump = d.engine.dump_records()
    assert dump == d.records()
    rebuilt = Engine.from_records(dump)
    assert rebuilt.dump_records() == dump
    assert rebuilt._index_view() == d.engine._index_view()
    return rebuilt


def test_a_heartbeat_writes_one_renewal_record_and_no_session_record() -> None:
    d = _driver()
    d.advance(1_000)
    assert d.heartbeat(*AGENTS)["refreshed"] == 4
    written = {ns for ns, _, _ in d.last_writes}
    assert "sessions" not in written and "renewals" in written
    assert len([w for w in d.last_writes if w[0] == "renewals"]) == 1
    assert d.engine.get_session(AGENTS[0])["deadline_ms"] == d.now_ms + TTL_MS
    _same_after_rebuild(d)


def test_a_renewal_record_goes_once_every_agent_in_it_was_renewed_again() -> None:
    d = _driver()
    d.heartbeat(*AGENTS)
    first = d.index
    d.advance(1_000)
    d.heartbeat(*AGENTS[:2])
    assert ("renewals", f"{first:012d}") in {(ns, k) for ns, k, _ in d.records()}
    d.advance(1_000)
    d.heartbeat(*AGENTS[2:])
    assert ("renewals", f"{first:012d}", None) in d.last_writes
    assert len([r for r in d.records() if r[0] == "renewals"]) == 2
    _same_after_rebuild(d)


def test_a_rebuilt_replica_expires_exactly_what_the_live_one_does() -> None:
    d = _driver()
    for _ in range(5):
        d.advance(4_000)
        d.heartbeat(*AGENTS[:3])  # the fourth agent stops heartbeating
    rebuilt = _same_after_rebuild(d)
    d.advance(4_000)
    live = d.expire()
    index, now = d.index, d.now_ms
    again = rebuilt.apply(decode_command({"type": "expire", "now_ms": now}), index=index, now_ms=now).result
    assert live == again and live["lapsed"] == [AGENTS[3]]


def test_lapse_reopen_and_close_drop_the_old_renewal_everywhere() -> None:
    d = _driver()
    d.heartbeat(*AGENTS)
    d.advance(TTL_MS + 1)
    d.heartbeat(*AGENTS[1:])
    d.expire()  # the first agent lapses; its last renewal still lists it
    _same_after_rebuild(d)
    assert d.open(AGENTS[0])["ok"]  # reopened: the old renewal no longer speaks for it
    _same_after_rebuild(d)
    d.heartbeat(AGENTS[0])
    _same_after_rebuild(d)
    assert d.send({"type": "close_session", "agent_id": AGENTS[1]})["ok"]
    assert d.open(AGENTS[1])["ok"]
    _same_after_rebuild(d)
    d.advance(1_000)
    d.heartbeat(*AGENTS)
    assert len([r for r in d.records() if r[0] == "renewals"]) == 1
    _same_after_rebuild(d)
