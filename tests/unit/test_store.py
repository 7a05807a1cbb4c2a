"""The LMDB state store: idempotent apply, errors that change nothing, snapshots."""

from __future__ import annotations

import json
from pathlib import Path

from tetherlab.cluster import statemachine as sm
from tetherlab.cluster.store import StateStore


def put(ns: str, key: str, value: str) -> bytes:
    return sm.encode_command(sm.Put(ns, key, value))


def test_replaying_the_log_changes_nothing_already_applied(tmp_path: Path) -> None:
    s = StateStore(tmp_path / "s")
    log = [put("a", f"k{i % 7}", f"v{i}") for i in range(50)]
    for i, payload in enumerate(log, start=10):
        s.apply(i, payload)
    before = s.dump()
    for i, payload in enumerate(log, start=10):
        assert s.apply(i, payload).get("replayed") is True
    assert s.dump() == before
    s.close()
    s2 = StateStore(tmp_path / "s")
    assert s2.dump() == before
    assert s2.applied_index == 59


def test_bad_command_gets_an_error_and_changes_no_record(tmp_path: Path) -> None:
    s = StateStore(tmp_path / "s")
    s.apply(1, put("a", "k", "v"))
    before = s.dump()["records"]
    r1 = s.apply(2, b"not json")
    r2 = s.apply(3, json.dumps({"op": "put", "ns": "a", "key": "k"}).encode())
    assert r1["error"]["code"] == "bad_json"
    assert r2["error"]["code"] == "missing_field" and "'value'" in r2["error"]["message"]
    assert s.dump()["records"] == before
    assert s.applied_index == 3  # the log position is consumed either way


def test_snapshot_install_replaces_only_older_state(tmp_path: Path) -> None:
    a = StateStore(tmp_path / "a")
    for i in range(1, 30):
        a.apply(i, put("n", f"k{i}", "x" * i))
    snap = tmp_path / "snap.tls"
    header = a.write_snapshot(snap, {"last": [], "prev": [], "cluster": []})
    assert header["applied_index"] == 29
    b = StateStore(tmp_path / "b")
    b.apply(1, put("n", "other", "y"))
    assert b.install_snapshot(snap) is True
    assert b.dump() == a.dump()
    # A store already at or past the snapshot keeps its own state.
    a.apply(30, put("n", "late", "z"))
    assert a.install_snapshot(snap) is False
    assert a.get("n", "late") is not None


def test_scan_pages_in_key_order(tmp_path: Path) -> None:
    s = StateStore(tmp_path / "s")
    for i in range(25):
        s.apply(i + 1, put("p", f"k{i:02d}", "v"))
    s.apply(26, put("q", "k00", "other namespace"))
    page1 = s.scan("p", limit=10)
    page2 = s.scan("p", after=page1[-1][0], limit=10)
    page3 = s.scan("p", after=page2[-1][0], limit=10)
    keys = [k for k, _ in page1 + page2 + page3]
    assert keys == [f"k{i:02d}" for i in range(25)]
