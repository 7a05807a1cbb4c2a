"""Backup, restore and disaster recovery.

Backups are snapshots of the state (a consistent LMDB copy, with the Raft index and registry
version in the header). A restore seeds every node of a new cluster with the snapshot and with a
log that starts right after the snapshot's index, so fencing tokens keep growing.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

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


def offline_snapshot(data_dir: Path, out: Path) -> dict[str, Any]:
    """A snapshot of a stopped node's state for disaster recovery, with every command still in
    its log applied (like etcd's --force-new-cluster: what reached this node survives).

    Works on a copy: the survivor's own data directory is left exactly as it was."""
    state_dir = data_dir / "state"
    if not (state_dir / "data.mdb").exists():
        raise ConfigError(f"{state_dir} holds no state (is this a node's data directory?)")
    with tempfile.TemporaryDirectory(prefix="tetherlab-recover-") as tmp:
        work = Path(tmp) / "state"
        work.mkdir()
        shutil.copy(state_dir / "data.mdb", work / "data.mdb")
        store = LmdbStore(work)
        replayed = 0
        try:
            if (data_dir / "raft" / "data.mdb").exists():
                replayed = _replay_log(data_dir / "raft", store)
            return store.write_snapshot(out, {**backup_header(store), "kind": "offline", "from": str(data_dir),
                                              "replayed_log_entries": replayed})
        finally:
            store.close()


def _replay_log(raft_dir: Path, store: LmdbStore) -> int:
    """Apply the log's commands above the state's applied index, in order."""
    with tempfile.TemporaryDirectory(prefix="tetherlab-log-") as tmp:
        shutil.copy(raft_dir / "data.mdb", Path(tmp) / "data.mdb")
        journal = LmdbJournal(tmp)
        applied = 0
        try:
            start = store.applied_index + 1
            first = journal[0][1] if len(journal) else start
            end = (journal[-1][1] + 1) if len(journal) else 0
            for command, idx, _term in journal.read_range(max(start, first), end):
                payload = payload_of(command)
                if payload is not None:  # no-ops, membership and version entries carry no state
                    store.apply(idx, payload)
                    applied += 1
        finally:
            journal._destroy()
        return applied


# --- restore --------------------------------------------------------------------------------


def seed_node(cfg: NodeConfig, snapshot: Path, members: list[NodeAddresses]) -> dict[str, Any]:
    """Give a new node the snapshot's state and a log that starts right after it.

    The log is seeded with two no-ops at indexes L-1 and L (L = the snapshot's applied index),
    the commit index is L, and a snapshot file names them: pysyncobj then starts with L applied,
    and new entries (and fencing tokens) continue above L."""
    data = cfg.data_dir
    if (data / "raft").exists() or (data / "state").exists():
        raise ConfigError(f"{data} already holds a node's data: restore into a new directory")
    data.mkdir(parents=True, exist_ok=True)
    store = LmdbStore(data / "state")
    store.install_snapshot(snapshot, force=True)
    # The state is the backup's, key registry included: it stays bootstrapped, so the admins
    # registered in it (not a new key) administer the restored cluster.
    last_index = max(store.applied_index, 2)
    header = store.write_snapshot(data / SNAPSHOT_NAME, {
        "last": entry_to_json((NOOP_COMMAND, last_index, 1)),
        "prev": entry_to_json((NOOP_COMMAND, last_index - 1, 1)),
        "cluster": sorted(str(m.raft) for m in members),
        "node": cfg.id,
    })
    store.close()
    journal = LmdbJournal(data / "raft", cfg.raft.log_map_size_bytes, seed_index=last_index - 1, seed_term=1)
    journal.add(NOOP_COMMAND, last_index, 1)
    journal.setCurrentTerm(1, None)
    journal.setRaftCommitIndex(last_index)
    journal._destroy()
    return header


def restore(snapshot: Path, directory: Path, nodes: int = 3, host: str = "127.0.0.1",
            base_port: int | None = None, admin_key: Path | None = None) -> dict[str, Any]:
    if directory.exists() and any(directory.iterdir()):
        raise ConfigError(f"{directory} is not empty: restore into a new directory")
    """A new local cluster in ``directory`` whose state is the snapshot's."""
    header = verify_backup(snapshot)
    cluster = init_cluster(directory, nodes, host, base_port or DEFAULT_BASE_PORT, admin_key=admin_key)
    for n in cluster.nodes:
        seed_node(load_node_config(directory / n.id / "node.toml"), snapshot, list(cluster.nodes))
    return {"dir": str(directory.resolve()), "restored_index": header["applied_index"],
            "registry_version": header.get("registry_version"), "nodes": [n.to_json() for n in cluster.nodes]}


def restore_node(snapshot: Path, config: Path) -> dict[str, Any]:
    """Seed one deployed node (its node.toml names the members) from a backup; run it on every
    host of the new cluster with the same backup before starting the nodes."""
    header = verify_backup(snapshot)
    cfg = load_node_config(config)
    seed_node(cfg, snapshot, cfg.all_nodes())
    return {"dir": str(cfg.data_dir), "restored_index": header["applied_index"],
            "registry_version": header.get("registry_version"), "nodes": [n.to_json() for n in cfg.all_nodes()]}


def recover(config: Path, directory: Path, host: str = "127.0.0.1", base_port: int | None = None,
            admin_key: Path | None = None) -> dict[str, Any]:
    """Disaster recovery: a new single-node cluster from a surviving (stopped) node's data."""
    cfg = load_node_config(config)
    with tempfile.TemporaryDirectory(prefix="tetherlab-recover-") as tmp:
        snap = Path(tmp) / "survivor.tls"
        offline_snapshot(cfg.data_dir, snap)
        return restore(snap, directory, nodes=1, host=host, base_port=base_port, admin_key=admin_key)


def describe(path: Path) -> str:
    header, _ = LmdbStore.read_snapshot_header(path)
    return json.dumps(header, sort_keys=True)
