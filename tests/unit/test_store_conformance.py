"""The state store's contract, run against both implementations: LMDB (production) and the
in-memory twin (simulation, fast tests). Each test takes a factory that opens a store at a
path; reopening the same path (LMDB) or the same object after a sync (memory) must show the
same state."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tetherlab.cluster.core import statemachine as sm
from tetherlab.cluster.core.engine import commands as ec
from tetherlab.cluster.replica.lmdbstore import META_APPLIED, LmdbStore
from tetherlab.cluster.replica.memstore import MemoryStore
from tetherlab.cluster.replica.store import SnapshotError, Store

Factory = Callable[[Path], Any]


@pytest.fixture(params=["lmdb", "memory"])
def new_store(request: pytest.FixtureRequest) -> Factory:
    if request.param == "lmdb":
        return lambda path: LmdbStore(path)
    return lambda path: MemoryStore()


def put(ns: str, key: str, value: str) -> bytes:
    return sm.encode_command(sm.Put(ns, key, value))


def engine(cmd: ec.Command, now_ms: int = 1_000) -> bytes:
    return json.dumps({"op": "engine", "now_ms": now_ms, "cmd": cmd.to_json()}).encode()


def test_both_implement_the_store_interface(new_store: Factory, tmp_path: Path) -> None:
    s: Store = new_store(tmp_path / "s")
    assert s.applied_index == 0 and s.revision == 0
    assert s.get("a", "missing") is None and s.scan("a") == []


def test_replaying_the_log_changes_nothing_already_applied(new_store: Factory, tmp_path: Path) -> None:
    s = new_store(tmp_path / "s")
    log = [put("a", f"k{i % 7}", f"v{i}") for i in range(50)]
    for i, payload in enumerate(log, start=10):
        s.apply(i, payload)
    before = s.dump()
    for i, payload in enumerate(log, start=10):
        assert s.apply(i, payload).get("replayed") is True
    assert s.dump() == before
    assert s.applied_index == 59 and s.revision == 50


def test_bad_command_gets_an_error_and_changes_no_record(new_store: Factory, tmp_path: Path) -> None:
    s = new_store(tmp_path / "s")
    s.apply(1, put("a", "k", "v"))
    before = s.dump()["records"]
    r1 = s.apply(2, b"not json")
    r2 = s.apply(3, json.dumps({"op": "put", "ns": "a", "key": "k"}).encode())
    r3 = s.apply(4, json.dumps({"op": "engine", "now_ms": "soon", "cmd": {}}).encode())
    assert r1["error"]["code"] == "bad_json"
    assert r2["error"]["code"] == "missing_field" and "'value'" in r2["error"]["message"]
    assert r3["error"]["code"] == "bad_field" and "now_ms" in r3["error"]["message"]
    assert s.dump()["records"] == before
    assert s.applied_index == 4  # the log position is consumed either way


def test_kv_and_engine_entries_share_one_applied_index(new_store: Factory, tmp_path: Path) -> None:
    s = new_store(tmp_path / "s")
    s.apply(1, engine(ec.Init(remote="git@x:y/z.git", session_ttl_ms=30_000)))
    s.apply(2, put("keys", "k", "v"))
    assert s.applied_index == 2
    assert s.engine_view(lambda e: e.cluster_settings())["remote"] == "git@x:y/z.git"
    assert s.dump()["engine"]["meta"]["cluster"]["session_ttl_ms"] == 30_000
    listened: list[int] = []
    s.on_apply = lambda out: listened.append(out.index)
    s.apply(3, put("keys", "k2", "v"))
    s.apply(3, put("keys", "k2", "v"))  # a replay is not applied again, so nobody hears of it
    assert listened == [3]


def test_snapshot_install_replaces_only_older_state(new_store: Factory, tmp_path: Path) -> None:
    a = new_store(tmp_path / "a")
    a.apply(1, engine(ec.Init(remote="git@x:y/z.git", session_ttl_ms=30_000)))
    for i in range(2, 30):
        a.apply(i, put("n", f"k{i}", "x" * i))
    snap = tmp_path / "snap.tls"
    header = a.write_snapshot(snap, {"last": [], "prev": [], "cluster": []})
    assert header["applied_index"] == 29
    b = new_store(tmp_path / "b")
    b.apply(1, put("n", "other", "y"))
    assert b.install_snapshot(snap) is True
    assert b.dump() == a.dump()
    assert b.engine_view(lambda e: e.cluster_settings()) == a.engine_view(lambda e: e.cluster_settings())
    # A store already at or past the snapshot keeps its own state.
    a.apply(30, put("n", "late", "z"))
    assert a.install_snapshot(snap) is False
    assert a.get("n", "late") is not None


def test_a_file_that_is_not_a_snapshot_is_refused(new_store: Factory, tmp_path: Path) -> None:
    s = new_store(tmp_path / "s")
    bad = tmp_path / "bad"
    bad.write_bytes(b"hello, not a snapshot")
    with pytest.raises(SnapshotError):
        s.install_snapshot(bad)


def test_scan_pages_in_key_order(new_store: Factory, tmp_path: Path) -> None:
    s = new_store(tmp_path / "s")
    for i in range(25):
        s.apply(i + 1, put("p", f"k{i:02d}", "v"))
    s.apply(26, put("q", "k00", "other namespace"))
    page1 = s.scan("p", limit=10)
    page2 = s.scan("p", after=page1[-1][0], limit=10)
    page3 = s.scan("p", after=page2[-1][0], limit=10)
    keys = [k for k, _ in page1 + page2 + page3]
    assert keys == [f"k{i:02d}" for i in range(25)]


def test_a_synced_state_survives_reopening(tmp_path: Path) -> None:
    s = LmdbStore(tmp_path / "s")
    for i in range(1, 20):
        s.apply(i, put("a", f"k{i}", "v"))
    before = s.dump()
    s.close()
    assert LmdbStore(tmp_path / "s").dump() == before


def test_the_memory_twin_loses_exactly_what_was_not_synced() -> None:
    s = MemoryStore()
    s.apply(1, engine(ec.Init(remote="git@x:y/z.git", session_ttl_ms=30_000)))
    s.apply(2, put("a", "k", "durable"))
    s.sync()
    synced = s.dump()
    s.apply(3, put("a", "k", "volatile"))
    s.apply(4, put("a", "k2", "volatile"))
    s.crash()
    assert s.dump() == synced and s.applied_index == 2
    assert s.engine_view(lambda e: e.cluster_settings())["remote"] == "git@x:y/z.git"
    # the log replays what was lost, and the state converges again
    s.apply(3, put("a", "k", "volatile"))
    assert s.get("a", "k").value == "volatile"


def test_flush_applied_makes_every_applied_entry_durable(new_store: Factory, tmp_path: Path) -> None:
    s: Store = new_store(tmp_path / "s")
    for i in range(1, 4):
        s.apply(i, put("a", f"k{i}", "v"))
    s.flush_applied()
    assert s.applied_index == 3 and s.get("a", "k3") is not None
    if isinstance(s, MemoryStore):
        s.crash()
        assert s.applied_index == 3


def test_the_lmdb_state_is_fsynced_and_batched_per_tick(tmp_path: Path) -> None:
    # MDB_NOSYNC (sync=False) can corrupt the environment in a system crash; with sync and no
    # meta sync (MDB_NOMETASYNC) LMDB stays intact and at most the last transaction is undone.
    s = LmdbStore(tmp_path / "s", batch_applies=True)
    flags = s.env.flags()
    assert flags["sync"] and not flags["metasync"]
    seen: list[int] = []
    s.on_apply = lambda out: seen.append(out.index)
    for i in range(1, 4):
        s.apply(i, put("a", f"k{i}", "v"))
    # One open transaction: nothing committed (nor handed out) before the tick flushes it.
    assert s.applied_index == 0 and seen == []
    s.flush_applied()
    assert s.applied_index == 3 and seen == [1, 2, 3]
    s.close()
    assert LmdbStore(tmp_path / "s").applied_index == 3


def test_a_batch_writes_its_applied_index_once_and_still_skips_replays(tmp_path: Path) -> None:
    """Within a batch the applied index and revision live in memory (py-lmdb gives up the GIL in
    every call, so two calls fewer per entry count) and are written once, at the commit."""
    s = LmdbStore(tmp_path / "s", batch_applies=True)
    s.apply(1, put("a", "k0", "v"))
    s.flush_applied()
    log = [put("a", f"k{i % 7}", f"v{i}") for i in range(50)]
    for i, payload in enumerate(log, start=10):
        s.apply(i, payload)
    assert s._batch is not None and bytes(s._batch.txn.get(META_APPLIED, db=s._meta)) == b"1"  # not yet
    for i, payload in enumerate(log, start=10):  # a replay inside the same batch changes nothing
        assert s.apply(i, payload).get("replayed") is True
    s.flush_applied()
    assert s.applied_index == 59 and s.revision == 51
    s.close()
    again = LmdbStore(tmp_path / "s", batch_applies=True)
    assert again.applied_index == 59 and again.revision == 51
    assert again.apply(59, log[-1]).get("replayed") is True


def test_a_batch_is_committed_before_a_snapshot_is_written(tmp_path: Path) -> None:
    s = LmdbStore(tmp_path / "s", batch_applies=True)
    s.apply(1, put("a", "k", "v"))
    header = s.write_snapshot(tmp_path / "snap.tls", {"node": "n1"})
    assert header["applied_index"] == 1


def test_a_snapshot_header_matches_its_data_when_a_commit_lands_while_it_is_written(tmp_path: Path) -> None:
    """The tick thread commits outside the store's lock: a commit that lands after the header is
    read must not reach the copied data (a backup was refused: "header says 29, data says 30")."""
    s = LmdbStore(tmp_path / "s", batch_applies=True)
    s.apply(1, put("a", "k", "v1"))
    s.flush_applied()
    read_meta = s._meta_int
    landed: list[bool] = []

    def meta_then_commit(txn: Any, key: bytes) -> int:
        value = read_meta(txn, key)
        if key != META_APPLIED and not landed:  # the header has been read: another thread commits
            def commit() -> None:
                with s.env.begin(write=True) as w:
                    w.put(META_APPLIED, b"2", db=s._meta)
            t = threading.Thread(target=commit)
            t.start()
            t.join()
            landed.append(True)
        return value

    s._meta_int = meta_then_commit  # type: ignore[method-assign]
    header = s.write_snapshot(tmp_path / "snap.tls", {"node": "n1"})
    assert landed and header["applied_index"] == 1
    restored = LmdbStore(tmp_path / "r")
    assert restored.install_snapshot(tmp_path / "snap.tls", force=True)
    assert restored.applied_index == header["applied_index"]


def test_a_backup_on_another_thread_leaves_the_applying_threads_batch_to_it(tmp_path: Path) -> None:
    """LMDB's writer lock belongs to the thread that opened the batch: a backup (an executor
    thread) that committed it left the lock held, and the applier's next write transaction hung."""
    s = LmdbStore(tmp_path / "s", batch_applies=True)
    opened, go, done = threading.Event(), threading.Event(), threading.Event()

    def applier() -> None:  # the tick thread: a batch open across the backup
        s.apply(1, put("a", "k1", "v"))
        opened.set()
        go.wait(10)
        s.apply(2, put("a", "k2", "v"))
        s.flush_applied()
        done.set()

    t = threading.Thread(target=applier, daemon=True)  # daemon: a hung applier must not hang the suite
    t.start()
    assert opened.wait(10)
    header = s.write_snapshot(tmp_path / "backup.tls", {"node": "n1"})
    assert header["applied_index"] == 0  # the committed state; entry 1 is still in the applier's batch
    assert s.last_applied_index() == 1  # what a backup waits for the applier to commit
    assert not s.wait_committed(1, timeout_s=0.05)  # the batch is still open
    go.set()
    assert s.wait_committed(2, timeout_s=10)  # woken by the applier's commit
    assert done.wait(10), "the applying thread hung on its next write transaction"
    assert s.applied_index == 2


def test_engine_peek_sees_what_engine_view_sees(new_store: Factory, tmp_path: Path) -> None:
    s = new_store(tmp_path / "s")
    s.apply(1, engine(ec.Init(remote="git@x:y/z.git")))
    s.flush_applied()
    assert s.engine_peek(lambda e: e.cluster_settings()) == s.engine_view(lambda e: e.cluster_settings())


def test_reads_during_snapshot_installs_never_fail(tmp_path: Path) -> None:
    """get() reads without the store lock; a snapshot install closes the environment under it,
    and a read that meets the closed one is made again under the lock."""


    src = LmdbStore(tmp_path / "src")
    src.apply(1, put("a", "k", "v1"))
    src.sync()
    snap = tmp_path / "snap.tls"
    src.write_snapshot(snap, {"last": None})
    s = LmdbStore(tmp_path / "s")
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                s.get("a", "k")
            except BaseException as e:  # any failure is the finding
                errors.append(e)
                return

    t = threading.Thread(target=reader)
    t.start()
    try:
        for _ in range(30):
            assert s.install_snapshot(snap, force=True)
    finally:
        stop.set()
        t.join(10)
    assert errors == []
    assert s.get("a", "k") is not None


# --- when a tick's results may go out (Store.flush_applied's before_commit) ---------------------


def _batched(kind: str, path: Path) -> Any:
    return LmdbStore(path, batch_applies=True) if kind == "lmdb" else MemoryStore()


def _durable_index(s: Any) -> int:
    """How far a crash now would keep the state: LMDB's committed meta, the twin's synced copy."""
    return s.applied_index if isinstance(s, LmdbStore) else s._durable.applied


def _told_at_commit(s: Any, payloads: list[bytes]) -> tuple[list[int], int, bool]:
    """Applies ``payloads`` as one tick and flushes: (entries told to on_apply by the time the
    results went out, the durable index then, whether record keys/k1 could be read then)."""
    told: list[int] = []
    s.on_apply = lambda out: told.append(out.index)
    seen: dict[str, Any] = {}
    for i, payload in enumerate(payloads, start=1):
        s.apply(i, payload)

    def results_out() -> None:
        seen["told"], seen["durable"] = list(told), _durable_index(s)
        seen["readable"] = s.get("keys", "k1") is not None  # from this thread: a reader's own transaction

    s.flush_applied(results_out)
    return seen["told"], seen["durable"], seen["readable"]


@pytest.mark.parametrize("kind", ["lmdb", "memory"])
def test_an_engine_only_batch_is_answered_before_its_commit(kind: str, tmp_path: Path) -> None:
    s = _batched(kind, tmp_path / "s")
    told, durable, _ = _told_at_commit(s, [engine(ec.Init(remote="git@x:y/z.git")),
                                           engine(ec.Init(remote="git@x:y/z.git"))])
    assert durable == 0  # the fsync overlaps the replies; a crash replays both from the log
    if kind == "lmdb":
        assert told == [1, 2]  # listeners hear of every entry before the results go out
    assert _durable_index(s) == 2  # and the commit still happens in the same flush


def _kv_answered_after_commit(s: Any) -> bool:
    _, durable, readable = _told_at_commit(s, [engine(ec.Init(remote="git@x:y/z.git")), put("keys", "k1", "v")])
    return durable == 2 and readable


@pytest.mark.parametrize("kind", ["lmdb", "memory"])
def test_a_batch_that_writes_a_record_is_answered_after_its_commit(kind: str, tmp_path: Path) -> None:
    # Records are read from the store by other threads: a revoked key must be gone before the
    # revoking admin hears it is done.
    assert _kv_answered_after_commit(_batched(kind, tmp_path / "s"))


def test_a_store_that_always_answers_early_is_caught(tmp_path: Path) -> None:
    class AlwaysEarly(LmdbStore):  # the planted bug: ignores what the batch wrote
        def flush_applied(self, before_commit: Callable[[], None] | None = None) -> None:
            if before_commit is not None:
                before_commit()
            super().flush_applied()

    assert not _kv_answered_after_commit(AlwaysEarly(tmp_path / "s", batch_applies=True))


@pytest.mark.parametrize("kind", ["lmdb", "memory"])
def test_without_a_hook_the_flush_only_commits(kind: str, tmp_path: Path) -> None:
    s = _batched(kind, tmp_path / "s")
    s.apply(1, put("a", "k", "v"))
    s.flush_applied()
    assert _durable_index(s) == 1


def _engine_log() -> list[bytes]:
    """Entries that write the same engine records again and again (the clock on every entry,
    a session on every heartbeat), open and close sessions (records deleted after being put)."""
    agents = [f"ann/4b2e0c1a-1111-4222-8333-{i:012d}" for i in range(3)]
    log = [engine(ec.Init(remote="git@x:y/z.git", session_ttl_ms=30_000))]
    for a in agents:
        log.append(engine(ec.OpenSession(agent_id=a, developer="ann", tool="t", machine="m",
                                         repo_remote="git@x:y/z.git", base_commit="abcdef1"), 1_100))
    for t in range(20):
        log.append(engine(ec.Heartbeat(agent_ids=tuple(agents)), 1_200 + 10 * t))
    log.append(engine(ec.CloseSession(agent_id=agents[1]), 1_500))
    return log


def test_a_batch_puts_each_engine_record_once_and_commits_what_unbatched_applies_write(tmp_path: Path) -> None:
    log = _engine_log()
    plain = LmdbStore(tmp_path / "plain")  # one transaction per entry
    batched = LmdbStore(tmp_path / "batched", batch_applies=True)
    for i, payload in enumerate(log, start=1):
        plain.apply(i, payload)
        batched.apply(i, payload)
    assert batched._batch is not None
    # Each record once, with its last value (the clock, the sessions: written by nearly every entry).
    writes = sum(len(o.engine_writes) for o in batched._batch.outcomes)
    assert len(batched._batch.engine) < writes / 2
    batched.flush_applied()
    want = plain.dump()
    assert batched.dump() == want
    assert "ann/4b2e0c1a-1111-4222-8333-000000000001" not in str(want["engine"].get("sessions"))  # closed
    batched.close()
    assert LmdbStore(tmp_path / "batched").dump() == want  # and so it reopens


def _sessions(e: Any) -> list[str]:
    return sorted(key for ns, key, _ in e.dump_records() if ns == "sessions")


def test_an_engine_rebuilt_in_the_middle_of_a_batch_keeps_the_batchs_earlier_entries(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in the engine refuses the entry and rebuilds the engine from the open transaction:
    the batch's engine records must be in it by then, or the rebuilt engine forgets them."""
    log = _engine_log()[:4]  # init and three sessions
    s = LmdbStore(tmp_path / "s", batch_applies=True)
    for i, payload in enumerate(log, start=1):
        s.apply(i, payload)
    sessions_before = s.engine_view(_sessions)
    real = type(s.engine).apply

    def bug(self: Any, cmd: Any, *, index: int, now_ms: int) -> Any:
        raise TypeError("a bug")

    monkeypatch.setattr(type(s.engine), "apply", bug)
    assert s.apply(5, engine(ec.Heartbeat(agent_ids=("ann/4b2e0c1a-1111-4222-8333-000000000000",))))[
        "error"]["code"] == "internal"
    monkeypatch.setattr(type(s.engine), "apply", real)
    assert len(sessions_before) == 3
    assert s.engine_view(_sessions) == sessions_before
    s.flush_applied()
    assert s.applied_index == 5


def test_a_dump_holds_every_write_whose_result_is_out(tmp_path: Path) -> None:
    """An engine-only batch's results go out before its commit (the fsync overlaps the replies). A
    dump taken in that window read the committed state without them: a partition drill, dumping
    right after its final write was acknowledged, found the acknowledged completion missing on
    every replica. The dump now waits for that commit, and the applied index a backup waits for
    counts the batch being committed."""
    log = _engine_log()
    s = LmdbStore(tmp_path / "s", batch_applies=True)
    for i, payload in enumerate(log[:-1], start=1):
        s.apply(i, payload)
    s.flush_applied()
    s.apply(len(log), log[-1])  # the session close: engine-only, so told before its commit
    seen: dict[str, Any] = {}

    def dumper() -> None:
        seen["dump"] = s.dump()

    def told() -> None:  # results are out; the commit follows when this returns
        seen["last_applied"] = s.last_applied_index()
        t = threading.Thread(target=dumper)
        t.start()
        t.join(1.0)  # without the wait, the dump is done (and stale) by now
        seen["thread"] = t

    s.flush_applied(before_commit=told)
    seen["thread"].join(10.0)
    assert seen["last_applied"] == len(log)
    assert seen["dump"]["applied_index"] == len(log)
    assert "ann/4b2e0c1a-1111-4222-8333-000000000001" not in str(seen["dump"]["engine"].get("sessions"))
    s.close()
