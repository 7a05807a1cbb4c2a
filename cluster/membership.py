"""Files for a node added online to a local cluster: its config, host key, and the client
files (``cluster.toml``, ``shim.toml``) that list it. Deployed clusters write the new host's
bundle by hand (see docs/operator-guide.md)."""

from __future__ import annotations

from pathlib import Path

from tetherlab.cluster.config import (
    Address,
    ConfigError,
    NodeAddresses,
    NodeConfig,
    load_cluster_file,
    load_node_config,
    render_node_config,
    write_text_atomic,
)


def prepare_local_node(directory: Path, node_id: str, raft: str, ssh: str, http: str) -> Path:
    """Write DIR/<id>/node.toml (peers: every node of cluster.toml) and its host key, and add it
    to cluster.toml and shim.toml. Returns the config path; start the node with it."""
    from tetherlab.cluster.cli import write_client_files
    from tetherlab.cluster.keys import generate_key_pair

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
                     cluster=template.cluster)
    path = node_dir / "node.toml"
    write_text_atomic(path, render_node_config(cfg))
    write_client_files(directory, [*cluster.nodes, new], {**cluster.host_keys, node_id: host_line},
                       cluster.admin_key, cluster.developer or "admin")
    return path


def forget_local_node(directory: Path, node_id: str) -> None:
    """Drop a removed node from cluster.toml and shim.toml (its directory is kept)."""
    from tetherlab.cluster.cli import write_client_files

    cluster = load_cluster_file(directory / "cluster.toml")
    nodes = [n for n in cluster.nodes if n.id != node_id]
    keys = {k: v for k, v in cluster.host_keys.items() if k != node_id}
    write_client_files(directory, nodes, keys, cluster.admin_key, cluster.developer or "admin")


