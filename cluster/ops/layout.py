"""A cluster's layout on disk: what ``tetherlab init`` writes.

- :func:`init_cluster`: a local cluster in one directory (``DIR/nK/node.toml``, host keys, the
  cluster secret, an admin key, ``cluster.toml`` for the admin CLI, ``shim.toml`` for shims);
- :func:`init_hosts`: one bundle per host for a deployed cluster (``--hosts h1,h2,h3 --out DIR``):
  ``DIR/<host>/`` (``node.toml``, ``cluster.secret`` (0600), ``ssh_host_ed25519_key``), ``DIR/shim.toml``
  for developers' machines, ``DIR/admin/`` for the operator, ``DIR/prometheus.yml`` and the read
  token it scrapes with, ``DIR/prometheus.token`` (0600). A bundle
  is copied to ``/etc/tetherlab`` and run by the systemd unit in deploy/systemd/.
"""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path
from typing import Any

from tetherlab.cluster.core.config import (
    Address,
    ClusterFile,
    ClusterSettings,
    ConfigError,
    HttpSettings,
    NodeAddresses,
    NodeConfig,
    render_cluster_file,
    render_node_config,
)
from tetherlab.cluster.node.access import token_hash
from tetherlab.cluster.node.keys import KeyError_, make_registered
from tetherlab.cluster.ops.config import (
    load_cluster_file,
    load_node_config,
    new_secret,
    write_private,
    write_text_atomic,
)
from tetherlab.cluster.ops.keys import generate_key_pair, public_line_of

DEFAULT_DIR = ".tetherlab"
DEFAULT_BASE_PORT = 7100
DEFAULT_RAFT_PORT, DEFAULT_SSH_PORT, DEFAULT_HTTP_PORT = 7100, 7200, 7300
DEFAULT_DATA_DIR = "/var/lib/tetherlab"


def admin_key_line(directory: Path, admin_key: Path | None, admin_name: str) -> tuple[str, Path | None]:
    """The first admin's public key line, and the private key the admin CLI should use: a new
    key in ``directory`` when none is given; else the given private key, or the private key
    beside a given ``.pub`` file (None when only a public key is known)."""
    if admin_key is None:
        private = directory / "admin_ed25519"
        directory.mkdir(parents=True, exist_ok=True)
        return generate_key_pair(private, f"{admin_name}@tetherlab"), private
    try:
        text = admin_key.read_text()
        try:
            line = make_registered(admin_name, "admin", text).public_key
            beside = admin_key.with_suffix("") if admin_key.suffix == ".pub" else None
            return line, beside.resolve() if beside is not None and beside.exists() else None
        except KeyError_:
            return make_registered(admin_name, "admin", public_line_of(admin_key)).public_key, admin_key.resolve()
    except (OSError, KeyError_, ValueError) as e:
        raise ConfigError(f"--admin-key {admin_key}: not a public or private SSH key ({e})") from None


def write_client_files(directory: Path, addrs: list[NodeAddresses], host_keys: dict[str, str],
                       admin_key: Path | None, admin_name: str) -> Path:
    """``cluster.toml`` (admin CLI: nodes, pinned host keys, admin key) and ``shim.toml``
    (developers: nodes and pinned host keys)."""
    cluster_path = directory / "cluster.toml"
    if admin_key is not None and admin_key.resolve().is_relative_to(directory.resolve()):
        admin_key = admin_key.resolve().relative_to(directory.resolve())  # the directory can move
    write_text_atomic(cluster_path, render_cluster_file(addrs, admin_key, host_keys, developer=admin_name))
    write_text_atomic(directory / "shim.toml", render_cluster_file(
        addrs, None, host_keys,
        header="# Tetherlab shim configuration: copy to developers' machines (~/.config/tetherlab/shim.toml).\n"
               "# Each node's SSH host key is pinned; add `developer = \"NAME\"` and `key = \"PATH\"`.\n"))
    return cluster_path


def init_cluster(directory: Path, nodes: int, host: str = "127.0.0.1", base_port: int = DEFAULT_BASE_PORT,
                 force: bool = False, admin_key: Path | None = None, admin_name: str = "admin",
                 remote: str = "", session_ttl_s: int = 30) -> ClusterFile:
    """A local cluster in one directory: one config and SSH host key per node, the cluster
    secret (0600), an admin key (unless one is given), ``cluster.toml`` and ``shim.toml``."""
    if nodes < 1 or nodes > 99:
        raise ConfigError(f"--nodes must be between 1 and 99, got {nodes}")
    directory = directory.resolve()
    if (directory / "cluster.toml").exists() and not force:
        raise ConfigError(f"{directory / 'cluster.toml'} exists: this directory is initialised already "
                          "(use --force to overwrite)")
    directory.mkdir(parents=True, exist_ok=True)
    admin_line, admin_private = admin_key_line(directory, admin_key, admin_name)
    secret_path = directory / "cluster.secret"
    write_private(secret_path, new_secret())
    addrs = [
        NodeAddresses(
            id=f"n{i + 1}",
            raft=Address(host, base_port + 1 + i),
            ssh=Address(host, base_port + 101 + i),
            http=Address(host, base_port + 201 + i),
        )
        for i in range(nodes)
    ]
    host_keys: dict[str, str] = {}
    for a in addrs:
        node_dir = directory / a.id
        node_dir.mkdir(exist_ok=True)
        host_key = node_dir / "ssh_host_ed25519_key"
        host_keys[a.id] = " ".join(generate_key_pair(host_key, f"tetherlab-{a.id}").split()[:2])
        cfg = NodeConfig(
            node=a,
            peers=tuple(p for p in addrs if p.id != a.id),
            data_dir=node_dir / "data",
            secret_file=secret_path,
            ssh_host_key=host_key,
            cluster=ClusterSettings(remote, (admin_line,), admin_name, session_ttl_s=session_ttl_s),
        )
        write_text_atomic(node_dir / "node.toml", render_node_config(cfg))
    return load_cluster_file(write_client_files(directory, addrs, host_keys, admin_private, admin_name))


def init_hosts(hosts: list[str], out: Path, data_dir: str = DEFAULT_DATA_DIR, raft_port: int = DEFAULT_RAFT_PORT,
               ssh_port: int = DEFAULT_SSH_PORT, http_port: int = DEFAULT_HTTP_PORT, admin_key: Path | None = None,
               admin_name: str = "admin", remote: str = "", force: bool = False) -> dict[str, Any]:
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
    # Prometheus scrapes /metrics from another host: a read token the nodes know from the start.
    prom_token = "tlr_" + secrets.token_urlsafe(32)
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
                         cluster=ClusterSettings(remote, (admin_line,), admin_name),
                         http=HttpSettings((token_hash(prom_token),)))
        write_text_atomic(bundle / "node.toml", render_node_config(cfg))
    write_client_files(admin_dir, addrs, host_keys, admin_private, admin_name)
    write_private(out / "prometheus.token", prom_token.encode() + b"\n")
    shutil.copy(admin_dir / "shim.toml", out / "shim.toml")
    static = "".join(f'      - targets: ["{a.http}"]\n        labels:\n          node: {a.id}\n' for a in addrs)
    write_text_atomic(out / "prometheus.yml", (
        "# Scrape configuration for this cluster (see deploy/prometheus/ for alert rules and docs/metrics.md).\n"
        "global:\n  scrape_interval: 15s\n  evaluation_interval: 15s\nrule_files:\n  - alerts.yml\n"
        "scrape_configs:\n  - job_name: tetherlab\n"
        "    # /metrics needs a read token off loopback (docs/world-view.md); this one is known to every node.\n"
        "    authorization:\n      type: Bearer\n      credentials_file: prometheus.token\n"
        f"    static_configs:\n{static}"))
    return {"out": str(out), "bundles": {h: str(out / h) for h in hosts}, "shim": str(out / "shim.toml"),
            "admin": str(admin_dir / "cluster.toml"), "nodes": [a.to_json() for a in addrs],
            "prometheus_token": str(out / "prometheus.token")}


# --- nodes added or removed online (local clusters) --------------------------------------------


def prepare_local_node(directory: Path, node_id: str, raft: str, ssh: str, http: str) -> Path:
    """Write DIR/<id>/node.toml (peers: every node of cluster.toml) and its host key, and add it
    to cluster.toml and shim.toml. Returns the config path; start the node with it."""
    cluster = load_cluster_file(directory / "cluster.toml")
    if node_id in cluster.by_id():
        raise ConfigError(f"{directory / 'cluster.toml'} already has a node {node_id!r}")
    new = NodeAddresses(node_id, Address.parse(raft, "--raft"), Address.parse(ssh, "--ssh"),
                        Address.parse(http, "--http"))
    template = load_node_config(directory / cluster.nodes[0].id / "node.toml")
    node_dir = directory / node_id
    node_dir.mkdir(exist_ok=True)
    host_key = node_dir / "ssh_host_ed25519_key"
    host_line = " ".join(generate_key_pair(host_key, f"tetherlab-{node_id}").split()[:2])
    cfg = NodeConfig(node=new, peers=tuple(cluster.nodes), data_dir=node_dir / "data",
                     secret_file=template.secret_file, raft=template.raft, ssh_host_key=host_key,
                     cluster=template.cluster, limits=template.limits)
    path = node_dir / "node.toml"
    write_text_atomic(path, render_node_config(cfg))
    write_client_files(directory, [*cluster.nodes, new], {**cluster.host_keys, node_id: host_line},
                       cluster.admin_key, cluster.developer or "admin")
    return path


def forget_local_node(directory: Path, node_id: str) -> None:
    """Drop a removed node from cluster.toml and shim.toml (its directory is kept)."""
    cluster = load_cluster_file(directory / "cluster.toml")
    nodes = [n for n in cluster.nodes if n.id != node_id]
    keys = {k: v for k, v in cluster.host_keys.items() if k != node_id}
    write_client_files(directory, nodes, keys, cluster.admin_key, cluster.developer or "admin")


