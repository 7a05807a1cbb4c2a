"""Fencing tokens never repeat across restore and recover (issue 19).

A fencing token is the Raft index of the entry that granted an intent. The old cluster went on
granting after a backup was taken, and a recovered survivor may hold entries the lost majority
replaced (and handed out as the same tokens): a restored log starts in a new index epoch, past
every index the old cluster could have reached, the gap recorded in the state; the survivor's
uncommitted entries are renumbered into that epoch. Real LMDB files, no processes."""

from __future__ import annotations

import json
from pathlib import Path

import pysyncobj.pickle as pickle

from tetherlab.cluster.core import statemachine as sm
from tetherlab.cluster.core.engine import commands as ec
from tetherlab.cluster.core.engine.model import IntentBody
from tetherlab.cluster.ops import backup
from tetherlab.cluster.ops.config import load_node_config
from tetherlab.cluster.ops.layout import init_cluster
from tetherlab.cluster.replica.journal import NOOP_COMMAND, LmdbJournal
from tetherlab.cluster.replica.lmdbstore import LmdbStore

REMOTE = "git@x:acme/shop.git"
EPOCH = 1 << backup.EPOCH_SHIFT


def engine(cmd: ec.Command, now_ms: int = 1_000) -> bytes:
    return json.dumps({"op": "engine", "now_ms": now_ms, "cmd": cmd.to_json()}).encode()


def _raft_entry(payload: bytes) -> bytes:
    """A log entry as pysyncobj writes a call of RaftNode._tl_apply."""
    return b"\x00" + pickle.dumps((0, (payload,)))


def _grant(agent: str) -> bytes:
    body = IntentBody(summary="work", steps=("do it",), files=(), modify=("billing",), depend=())
    return engine(ec.SubmitIntent(agent_id=agent, tool="t", intent=body, trigger="initial"))


def _seeded_store(path: Path, upto: int) -> LmdbStore:
    s = LmdbStore(path)
    s.apply(1, engine(ec.Init(remote=REMOTE, session_ttl_ms=30_000)))
    s.apply(2, engine(ec.PushRegistry(concepts=({"id": "billing", "title": "Billing"},))))
    s.apply(3, engine(ec.OpenSession(agent_id="ann/1", developer="ann", tool="t", machine="m", repo_remote=REMOTE,
                                     base_commit="abcdef1")))
    for i in range(4, upto + 1):
        s.apply(i, sm.encode_command(sm.Put("t", f"k{i}", "v")))
    return s


def test_a_restored_log_starts_in_the_next_epoch() -> None:
    assert backup.restored_log_start(0) == EPOCH
    assert backup.restored_log_start(41) == EPOCH
    assert backup.restored_log_start(EPOCH + 5) == 2 * EPOCH
    assert backup.restored_log_start(41, above_index=3 * EPOCH) == 3 * EPOCH + 1


def test_restore_seeds_every_node_past_the_old_clusters_tokens_and_records_the_gap(tmp_path: Path) -> None:
    s = _seeded_store(tmp_path / "old", 20)
    snap = tmp_path / "backup.tls"
    s.write_snapshot(snap, {"kind": "backup", "created_unix": 1, "raft_commit_index": 25})
    s.close()
    res = backup.restore(snap, tmp_path / "new", nodes=3, base_port=47100)
    start = res["log_start_index"]
    assert start == EPOCH and res["gap"] == EPOCH - 21
    for nid in ("n1", "n2", "n3"):
        data = tmp_path / "new" / nid / "data"
        state = LmdbStore(data / "state")
        record = json.loads(state.get("meta", "restore").value)
        assert (record["from_index"], record["start_index"], record["kind"]) == (20, start, "restore")
        assert state.applied_index == start and state.get("t", "k20") is not None
        state.close()
        j = LmdbJournal(data / "raft")
        assert (j[0][1], j[-1][1], j.getRaftCommitIndex()) == (start - 1, start, start)
        j._destroy()
    # The next grant of the restored cluster carries a token above any the old one gave.
    state = LmdbStore(tmp_path / "new" / "n1" / "data" / "state")
    verdict = state.apply(start + 1, _grant("ann/1"))
    assert verdict["action"] == "continue" and verdict["fencing_token"] > 25
    state.close()


def test_recover_renumbers_the_survivors_uncommitted_entries_past_the_gap(tmp_path: Path) -> None:
    # A survivor applied up to 10; its log holds 11..14, committed (as far as it knows) up to 12.
    data = tmp_path / "survivor"
    s = _seeded_store(data / "state", 10)
    s.close()
    j = LmdbJournal(data / "raft", seed_index=9, seed_term=1)
    j.add(NOOP_COMMAND, 10, 1)
    for idx, payload in [(11, sm.encode_command(sm.Put("t", "c11", "v"))),
                         (12, sm.encode_command(sm.Put("t", "c12", "v"))),
                         (13, _grant("ann/1")),  # a grant the lost majority may have replaced at 13
                         (14, sm.encode_command(sm.Put("t", "u14", "v")))]:
        j.add(_raft_entry(payload), idx, 1)
    j.setRaftCommitIndex(12)
    j._destroy()
    header = backup.offline_snapshot(data, tmp_path / "offline.tls")
    assert (header["replayed_log_entries"], header["renumbered_log_entries"]) == (2, 2)
    assert header["epoch_start"] == EPOCH and header["applied_index"] == EPOCH + 1
    check = LmdbStore(tmp_path / "check")
    check.install_snapshot(tmp_path / "offline.tls", force=True)
    intents = check.engine_view(lambda e: e.list_intents(status="active"))["intents"]
    assert [i["intent_id"] for i in intents] == [f"i-{EPOCH}"]  # not i-13: that token may be someone else's
    assert check.get("t", "c12") is not None and check.get("t", "u14") is not None
    check.close()
    assert backup.restore_start(header) == EPOCH + 2
    res = backup.restore(tmp_path / "offline.tls", tmp_path / "new", nodes=1, base_port=47200)
    assert res["log_start_index"] == EPOCH + 2


def test_a_seeded_node_log_starts_at_the_restore_index(tmp_path: Path) -> None:
    s = _seeded_store(tmp_path / "old", 8)
    snap = tmp_path / "backup.tls"
    s.write_snapshot(snap, {"kind": "backup", "created_unix": 1})
    s.close()
    cluster = init_cluster(tmp_path / "new", 1, base_port=47300)
    cfg = load_node_config(tmp_path / "new" / cluster.nodes[0].id / "node.toml")
    start = backup.restore_start(backup.verify_backup(snap))
    backup.seed_node(cfg, snap, list(cluster.nodes), start, {"kind": "restore"})
    # (tests/deploy/test_operate.py starts restored and recovered nodes for real)
    j = LmdbJournal(cfg.data_dir / "raft")
    assert j[-1][1] == start
    j._destroy()
