"""Backup, restore and disaster recovery.

Backups are snapshots of the state (a consistent LMDB copy, with the Raft index and registry
version in the header). A restore seeds every node of a new cluster with the snapshot and with a
log that starts in a new *index epoch*, past every Raft index (and so every fencing token, which
is the index of a grant) the old cluster could have issued, not merely past the backup's index:
the old cluster went on granting after the backup was taken. An epoch is ``2**EPOCH_SHIFT``
indexes; the restored log starts at the next epoch boundary above the highest index known (or
above ``above_index``, when the operator knows the old cluster's last index and it is higher).
The gap is recorded in the replicated state (``meta/restore``).

Disaster recovery from one survivor replays the survivor's log into its state: entries up to its
commit index at their own indexes; the entries after it, which the lost majority may have
replaced with others at the same indexes (and handed out as the same fencing tokens), at new
indexes past the gap, so no token of the recovered cluster can equal one the old cluster issued.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tetherlab.cluster.core import statemachine as sm
from tetherlab.cluster.core.config import (
    ConfigError,
    NodeAddresses,
    NodeConfig,
)
from tetherlab.cluster.node.process import backup_header
from tetherlab.cluster.ops.config import load_node_config
from tetherlab.cluster.ops.layout import DEFAULT_BASE_PORT, init_cluster
from tetherlab.cluster.replica.journal import NOOP_COMMAND, LmdbJournal
from tetherlab.cluster.replica.lmdbstore import LmdbStore
from tetherlab.cluster.replica.raft import payload_of
from tetherlab.cluster.replica.store import SnapshotError, entry_to_json

SNAPSHOT_NAME = "snapshot.tls"
EPOCH_SHIFT = 40  # 2**40 indexes per epoch: years of writes at the highest rate a cluster sustains
RESTORE_NS, RESTORE_KEY = "meta", "restore"  # the record of the gap, in the restored state


def restored_log_start(highest_index: int, above_index: int = 0) -> int:
    """The first index a restored cluster may use: the next epoch boundary above every index the
    old cluster is known to have reached (``highest_index``), and above ``above_index``."""
    if highest_index < 0 or above_index < 0:
        raise ValueError("Raft indexes are not negative")
    return max(((highest_index >> EPOCH_SHIFT) + 1) << EPOCH_SHIFT, above_index + 1)


# --- backup ---------------------------------------------------------------------------------


def verify_backup(path: Path) -> dict[str, Any]:
    """The header of a backup file, after checking it opens as a state store."""
    header, _ = LmdbStore.read_snapshot_header(path)
    with tempfile.TemporaryDirectory(prefix="tetherlab-verify-") as tmp:
        s = LmdbStore(Path(tmp) / "state")
        s.install_snapshot(path, force=True)
        if s.applied_index != header["applied_index"]:
            raise SnapshotError(f"{path}: header says index {header['applied_index']}, data says {s.applied_index}")
        s.close()
    return header


def offline_snapshot(data_dir: Path, out: Path, above_index: int = 0) -> dict[str, Any]:
    """A snapshot of a stopped node's state for disaster recovery, with every command still in
    its log applied (like etcd's --force-new-cluster: what reached this node survives): the
    committed ones at their own indexes, the others renumbered past the gap (see the module).

    Works on a copy: the survivor's own data directory is left exactly as it was."""
    state_dir = data_dir / "state"
    if not (state_dir / "data.mdb").exists():
        raise ConfigError(f"{state_dir} holds no state (is this a node's data directory?)")
    with tempfile.TemporaryDirectory(prefix="tetherlab-recover-") as tmp:
        work = Path(tmp) / "state"
        work.mkdir()
        shutil.copy(state_dir / "data.mdb", work / "data.mdb")
        store = LmdbStore(work)
        replay = {"replayed_log_entries": 0, "renumbered_log_entries": 0, "highest_index": store.applied_index,
                  "epoch_start": None}
        try:
            if (data_dir / "raft" / "data.mdb").exists():
                replay = _replay_log(data_dir / "raft", store, above_index)
            return store.write_snapshot(out, {**backup_header(store), "kind": "offline", "from": str(data_dir),
                                              **replay})
        finally:
            store.close()


def _replay_log(raft_dir: Path, store: LmdbStore, above_index: int = 0) -> dict[str, Any]:
    """Apply the log's commands above the state's applied index, in order: up to the log's commit
    index at their indexes, the rest at new indexes from the next epoch on."""
    with tempfile.TemporaryDirectory(prefix="tetherlab-log-") as tmp:
        shutil.copy(raft_dir / "data.mdb", Path(tmp) / "data.mdb")
        journal = LmdbJournal(tmp)
        applied = renumbered = 0
        try:
            start = store.applied_index + 1
            first = journal[0][1] if len(journal) else start
            last = journal[-1][1] if len(journal) else 0
            commit = min(journal.getRaftCommitIndex(), last)
            uncertain: list[bytes] = []
            for command, idx, _term in journal.read_range(max(start, first), last + 1):
                payload = payload_of(command)
                if payload is None:  # no-ops, membership and version entries carry no state
                    continue
                if idx <= commit:
                    store.apply(idx, payload)
                    applied += 1
                else:
                    uncertain.append(payload)
            highest = max(last, store.applied_index)
            epoch_start = restored_log_start(highest, above_index)
            for i, payload in enumerate(uncertain):
                store.apply(epoch_start + i, payload)
                renumbered += 1
        finally:
            journal._destroy()
        return {"replayed_log_entries": applied, "renumbered_log_entries": renumbered, "highest_index": highest,
                "epoch_start": epoch_start, "commit_index": commit}


# --- restore --------------------------------------------------------------------------------


def restore_start(header: dict[str, Any], above_index: int = 0) -> int:
    """Where the restored log starts (the index of the ``meta/restore`` record; new entries and
    fencing tokens follow it), from a backup's header."""
    if header.get("kind") == "offline" and header.get("epoch_start"):
        # A recovery snapshot is already past the gap (its renumbered entries are in the new epoch).
        return max(int(header["applied_index"]) + 1, int(header["epoch_start"]), above_index + 1)
    highest = max(int(header["applied_index"]), int(header.get("raft_commit_index") or 0),
                  int(header.get("highest_index") or 0))
    return restored_log_start(highest, above_index)


def restore_record(header: dict[str, Any], start: int, kind: str) -> dict[str, Any]:
    """The gap, as recorded in the restored state (the same on every node: nothing of this host)."""
    return {"kind": kind, "from_index": int(header["applied_index"]), "start_index": start,
            "gap": start - int(header["applied_index"]) - 1,
            "highest_index_known": int(header.get("highest_index") or header.get("raft_commit_index") or 0),
            "backup_created_unix": header.get("created_unix")}


def seed_node(cfg: NodeConfig, snapshot: Path, members: list[NodeAddresses], start: int,
              record: dict[str, Any]) -> dict[str, Any]:
    """Give a new node the snapshot's state and a log that starts at ``start``.

    The gap is recorded by the entry at ``start`` (a ``meta/restore`` record, applied to the
    state); the log is seeded with no-ops at ``start - 1`` and ``start``, the commit index is
    ``start``, and a snapshot file names them: pysyncobj then starts with ``start`` applied, and
    new entries (and fencing tokens) continue above it."""
    data = cfg.data_dir
    if (data / "raft").exists() or (data / "state").exists():
        raise ConfigError(f"{data} already holds a node's data: restore into a new directory")
    if start < 2:
        raise ValueError(f"a restored log starts at index 2 or above, not {start}")
    data.mkdir(parents=True, exist_ok=True)
    store = LmdbStore(data / "state")
    store.install_snapshot(snapshot, force=True)
    if store.applied_index >= start:
        raise ConfigError(f"the backup holds index {store.applied_index}; the restored log cannot start at {start}")
    # The state is the backup's, key registry included: it stays bootstrapped, so the admins
    # registered in it (not a new key) administer the restored cluster.
    store.apply(start, sm.encode_command(sm.Put(RESTORE_NS, RESTORE_KEY, json.dumps(record, sort_keys=True))))
    header = store.write_snapshot(data / SNAPSHOT_NAME, {
        "last": entry_to_json((NOOP_COMMAND, start, 1)),
        "prev": entry_to_json((NOOP_COMMAND, start - 1, 1)),
        "cluster": sorted(str(m.raft) for m in members),
        "node": cfg.id,
    })
    store.close()
    journal = LmdbJournal(data / "raft", cfg.raft.log_map_size_bytes, seed_index=start - 1, seed_term=1)
    journal.add(NOOP_COMMAND, start, 1)
    journal.setCurrentTerm(1, None)
    journal.setRaftCommitIndex(start)
    journal._destroy()
    return header


def restore(snapshot: Path, directory: Path, nodes: int = 3, host: str = "127.0.0.1",
            base_port: int | None = None, admin_key: Path | None = None, above_index: int = 0) -> dict[str, Any]:
    """A new local cluster in ``directory`` whose state is the snapshot's."""
    if directory.exists() and any(directory.iterdir()):
        raise ConfigError(f"{directory} is not empty: restore into a new directory")
    header = verify_backup(snapshot)
    start = restore_start(header, above_index)
    record = restore_record(header, start, "recover" if header.get("kind") == "offline" else "restore")
    cluster = init_cluster(directory, nodes, host, base_port or DEFAULT_BASE_PORT, admin_key=admin_key)
    for n in cluster.nodes:
        seed_node(load_node_config(directory / n.id / "node.toml"), snapshot, list(cluster.nodes), start, record)
    return {"dir": str(directory.resolve()), "restored_index": header["applied_index"], "log_start_index": start,
            "gap": record["gap"], "registry_version": header.get("registry_version"),
            "nodes": [n.to_json() for n in cluster.nodes]}


def restore_node(snapshot: Path, config: Path, above_index: int = 0) -> dict[str, Any]:
    """Seed one deployed node (its node.toml names the members) from a backup; run it on every
    host of the new cluster with the same backup (and ``above_index``) before starting the nodes."""
    header = verify_backup(snapshot)
    cfg = load_node_config(config)
    start = restore_start(header, above_index)
    record = restore_record(header, start, "recover" if header.get("kind") == "offline" else "restore")
    seed_node(cfg, snapshot, cfg.all_nodes(), start, record)
    return {"dir": str(cfg.data_dir), "restored_index": header["applied_index"], "log_start_index": start,
            "gap": record["gap"], "registry_version": header.get("registry_version"),
            "nodes": [n.to_json() for n in cfg.all_nodes()]}


def recover(config: Path, directory: Path, host: str = "127.0.0.1", base_port: int | None = None,
            admin_key: Path | None = None, above_index: int = 0) -> dict[str, Any]:
    """Disaster recovery: a new single-node cluster from a surviving (stopped) node's data."""
    cfg = load_node_config(config)
    with tempfile.TemporaryDirectory(prefix="tetherlab-recover-") as tmp:
        snap = Path(tmp) / "survivor.tls"
        offline_snapshot(cfg.data_dir, snap, above_index)
        return restore(snap, directory, nodes=1, host=host, base_port=base_port, admin_key=admin_key,
                       above_index=above_index)


def describe(path: Path) -> str:
    header, _ = LmdbStore.read_snapshot_header(path)
    return json.dumps(header, sort_keys=True)
