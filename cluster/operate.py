"""Deploying and operating a cluster: per-host bundles, backup, restore, disaster recovery.

``tetherlab init --hosts h1,h2,h3 --out DIR`` writes one bundle per host (``DIR/<host>/``:
``node.toml``, ``cluster.secret`` (0600), ``ssh_host_ed25519_key``), ``DIR/shim.toml`` for
developers' machines, ``DIR/admin/`` (``cluster.toml`` and the admin key) for the operator, and
``DIR/prometheus.yml`` scraping the three nodes. A bundle is copied to ``/etc/tetherlab`` and run
by the systemd unit in deploy/systemd/ with the same ``tetherlab master --config`` tests use.

Backups are snapshots of the state (a consistent LMDB copy, with the Raft index and registry
version in the header). A restore seeds every node of a new cluster with the snapshot and with a
log that starts right after the snapshot's index, so fencing tokens keep growing.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from tetherlab.cluster.config import (
    Address,
    ClusterSettings,
    ConfigError,
    NodeAddresses,
    NodeConfig,
    load_node_config,
    new_secret,
    render_node_config,
    write_private,
    write_text_atomic,
)
from tetherlab.cluster.journal import NOOP_COMMAND, LmdbJournal
from tetherlab.cluster.store import SnapshotError, StateStore, entry_to_json

DEFAULT_RAFT_PORT, DEFAULT_SSH_PORT, DEFAULT_HTTP_PORT = 7100, 7200, 7300
DEFAULT_DATA_DIR = "/var/lib/tetherlab"
REGULAR_COMMAND = 0  # pysyncobj's _COMMAND_TYPE.REGULAR: a call of the replicated apply method
SNAPSHOT_NAME = "snapshot.tls"


# --- bundles for three hosts ----------------------------------------------------------------


def init_hosts(hosts: list[str], out: Path, data_dir: str = DEFAULT_DATA_DIR, raft_port: int = DEFAULT_RAFT_PORT,
               ssh_port: int = DEFAULT_SSH_PORT, http_port: int = DEFAULT_HTTP_PORT, admin_key: Path | None = None,
               admin_name: str = "admin", remote: str = "", force: bool = False) -> dict[str, Any]:
    from tetherlab.cluster.cli import admin_key_line, write_client_files
    from tetherlab.cluster.keys import generate_key_pair

    hosts = [h.strip() for h in hosts if h.strip()]
    if len(hosts) < 1 or len(set(hosts)) != len(hosts):
        raise ConfigError(f"--hosts needs distinct host names or addresses, got {hosts}")
    out = out.resolve()
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out} is not empty (use --force to write into it)")
    out.mkdir(parents=True, exist_ok=True)
    admin_dir = out / "admin"
    admin_line, admin_private = admin_key_line(admin_dir, admin_key, admin_name)
    secret = new_secret()
    addrs = [NodeAddresses(f"n{i + 1}", Address(h, raft_port), Address(h, ssh_port), Address(h, http_port))
             for i, h in enumerate(hosts)]
    host_keys: dict[str, str] = {}
    for a, host in zip(addrs, hosts, strict=True):
        bundle = out / host
        bundle.mkdir(parents=True, exist_ok=True)
        write_private(bundle / "cluster.secret", secret)
        host_keys[a.id] = " ".join(generate_key_pair(bundle / "ssh_host_ed25519_key", f"tetherlab-{a.id}").split()[:2])
        # Paths relative to the config file: the bundle is copied to /etc/tetherlab as a whole.
        cfg = NodeConfig(node=a, peers=tuple(p for p in addrs if p.id != a.id), data_dir=Path(data_dir),
                         secret_file=Path("cluster.secret"), ssh_host_key=Path("ssh_host_ed25519_key"),
                         cluster=ClusterSettings(remote, (admin_line,), admin_name))
        write_text_atomic(bundle / "node.toml", render_node_config(cfg))
    write_client_files(admin_dir, addrs, host_keys, admin_private, admin_name)
    shutil.copy(admin_dir / "shim.toml", out / "shim.toml")
    static = "".join(f'      - targets: ["{a.http}"]\n        labels:\n          node: {a.id}\n' for a in addrs)
    write_text_atomic(out / "prometheus.yml", (
        "# Scrape configuration for this cluster (see deploy/prometheus/ for alert rules and docs/metrics.md).\n"
        "global:\n  scrape_interval: 15s\n  evaluation_interval: 15s\nrule_files:\n  - alerts.yml\n"
        f"scrape_configs:\n  - job_name: tetherlab\n    static_configs:\n{static}"))
    return {"out": str(out), "bundles": {h: str(out / h) for h in hosts}, "shim": str(out / "shim.toml"),
            "admin": str(admin_dir / "cluster.toml"), "nodes": [a.to_json() for a in addrs]}


# --- backup ---------------------------------------------------------------------------------


def backup_header(store: StateStore) -> dict[str, Any]:
    """What a backup says about itself: indexes, registry version, when and where from."""
    stats = store.engine_view(lambda e: e.stats())
    return {"kind": "backup", "created_unix": int(time.time()), "registry_version": stats.get("registry_version", 0),
            "active_intents": stats.get("active_intents", 0)}


def verify_backup(path: Path) -> dict[str, Any]:
    """The header of a backup file, after checking it opens as a state store."""
    header, _ = StateStore.read_snapshot_header(path)
    with tempfile.TemporaryDirectory(prefix="tetherlab-verify-") as tmp:
        s = StateStore(Path(tmp) / "state")
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
        store = StateStore(work)
        replayed = 0
        try:
            if (data_dir / "raft" / "data.mdb").exists():
                replayed = _replay_log(data_dir / "raft", store)
            return store.write_snapshot(out, {**backup_header(store), "kind": "offline", "from": str(data_dir),
                                              "replayed_log_entries": replayed})
        finally:
            store.close()


def _replay_log(raft_dir: Path, store: StateStore) -> int:
    """Apply the log's commands above the state's applied index, in order."""
    import pysyncobj.pickle as pickle

    with tempfile.TemporaryDirectory(prefix="tetherlab-log-") as tmp:
        shutil.copy(raft_dir / "data.mdb", Path(tmp) / "data.mdb")
        journal = LmdbJournal(tmp)
        applied = 0
        try:
            start = store.applied_index + 1
            first = journal[0][1] if len(journal) else start
            end = (journal[-1][1] + 1) if len(journal) else 0
            for command, idx, _term in journal.read_range(max(start, first), end):
                if not command or command[0] != REGULAR_COMMAND:
                    continue  # no-ops, membership and version entries carry no state
                call = pickle.loads(command[1:])
                if isinstance(call, tuple) and len(call) >= 2 and call[1] and isinstance(call[1][0], bytes):
                    store.apply(idx, call[1][0])
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
    store = StateStore(data / "state")
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
    from tetherlab.cluster.cli import DEFAULT_BASE_PORT, init_cluster

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
    header, _ = StateStore.read_snapshot_header(path)
    return json.dumps(header, sort_keys=True)
