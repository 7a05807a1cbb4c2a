"""Node and cluster configuration files (TOML).

A node config names the node, its three addresses, its peers, its data directory and the
path of the cluster secret. A cluster file (``DIR/cluster.toml``) lists every node's
addresses for clients (``tetherlab status``, the shim, the admin CLI).

Errors are raised as :class:`ConfigError` with the file and field that is wrong, so that an
operator can fix the file without reading a traceback.
"""

from __future__ import annotations

import os
import re
import secrets
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SECRET_BYTES = 32  # 256-bit cluster secret: PBKDF2 in pysyncobj uses a fixed salt, so the entropy must be here.
NODE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


class ConfigError(ValueError):
    """Returned when a configuration file is missing, unreadable, or names a bad value."""


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, what: str) -> Address:
        if not isinstance(text, str) or ":" not in text:
            raise ConfigError(f"{what}: expected HOST:PORT, got {text!r}")
        host, _, port_s = text.rpartition(":")
        host = host.strip("[]")
        try:
            port = int(port_s)
        except ValueError:
            raise ConfigError(f"{what}: port {port_s!r} is not a number") from None
        if not host or not 0 < port < 65536:
            raise ConfigError(f"{what}: expected HOST:PORT with a port in 1..65535, got {text!r}")
        return cls(host, port)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class NodeAddresses:
    id: str
    raft: Address
    ssh: Address
    http: Address

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "raft": str(self.raft), "ssh": str(self.ssh), "http": str(self.http)}


@dataclass(frozen=True)
class RaftTuning:
    """Timing that a fail-closed system needs (pysyncobj's defaults are far too lax)."""

    election_timeout_min_s: float = 0.6
    election_timeout_max_s: float = 1.2
    heartbeat_interval_s: float = 0.1
    # A leader that hears from no majority for this long steps down: about two election timeouts.
    leader_fallback_timeout_s: float = 2.0
    # A silent TCP link is declared dead after this long.
    connection_timeout_s: float = 3.0
    # Reconnect attempts after a partition heals (pysyncobj default is 5 s).
    connection_retry_s: float = 0.5
    # Log compaction: snapshot after this many entries (or this long since the last one).
    compaction_min_entries: int = 5000
    compaction_min_time_s: float = 300.0
    # LMDB map sizes: sparse files, so generous bounds cost nothing until used.
    log_map_size_bytes: int = 1 << 30
    state_map_size_bytes: int = 1 << 30

    @classmethod
    def from_toml(cls, data: dict[str, Any], where: str) -> RaftTuning:
        known = {f for f in cls.__dataclass_fields__}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                raise ConfigError(f"{where}: unknown field [raft].{key}")
            default = getattr(cls, key)
            if isinstance(default, int) and not isinstance(default, bool):
                if not isinstance(value, int) or value <= 0:
                    raise ConfigError(f"{where}: [raft].{key} must be a positive integer")
            elif not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"{where}: [raft].{key} must be a positive number of seconds")
            kwargs[key] = value
        tuning = cls(**kwargs)
        if tuning.election_timeout_min_s >= tuning.election_timeout_max_s:
            raise ConfigError(f"{where}: [raft] election_timeout_min_s must be below election_timeout_max_s")
        if tuning.heartbeat_interval_s >= tuning.election_timeout_min_s:
            raise ConfigError(f"{where}: [raft] heartbeat_interval_s must be below election_timeout_min_s")
        return tuning


@dataclass(frozen=True)
class NodeConfig:
    node: NodeAddresses
    peers: tuple[NodeAddresses, ...]
    data_dir: Path
    secret_file: Path
    raft: RaftTuning = field(default_factory=RaftTuning)
    path: Path | None = None

    @property
    def id(self) -> str:
        return self.node.id

    def all_nodes(self) -> list[NodeAddresses]:
        return sorted([self.node, *self.peers], key=lambda n: n.id)

    def read_secret(self) -> bytes:
        return read_secret(self.secret_file)


def _str(data: dict[str, Any], key: str, where: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: missing or empty string field {key!r}")
    return value


def _node_addresses(data: dict[str, Any], where: str) -> NodeAddresses:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table")
    node_id = _str(data, "id", where)
    if not NODE_ID_RE.match(node_id):
        raise ConfigError(f"{where}: node id {node_id!r} must match {NODE_ID_RE.pattern}")
    return NodeAddresses(
        id=node_id,
        raft=Address.parse(_str(data, "raft", where), f"{where}.raft"),
        ssh=Address.parse(_str(data, "ssh", where), f"{where}.ssh"),
        http=Address.parse(_str(data, "http", where), f"{where}.http"),
    )


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None


def load_node_config(path: str | Path) -> NodeConfig:
    path = Path(path)
    data = _load_toml(path)
    where = str(path)
    node = _node_addresses(data.get("node", {}), f"{where}: [node]")
    node_table = data["node"]
    base = path.parent
    data_dir = Path(_str(node_table, "data_dir", f"{where}: [node]"))
    secret_file = Path(_str(node_table, "secret_file", f"{where}: [node]"))
    peers_raw = data.get("peer", [])
    if not isinstance(peers_raw, list):
        raise ConfigError(f"{where}: [[peer]] must be an array of tables")
    peers = tuple(_node_addresses(p, f"{where}: [[peer]] #{i + 1}") for i, p in enumerate(peers_raw))
    ids = [node.id, *[p.id for p in peers]]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{where}: node ids must be unique, got {ids}")
    raft_addrs = [str(node.raft), *[str(p.raft) for p in peers]]
    if len(set(raft_addrs)) != len(raft_addrs):
        raise ConfigError(f"{where}: raft addresses must be unique, got {raft_addrs}")
    tuning = RaftTuning.from_toml(data.get("raft", {}), where)
    return NodeConfig(
        node=node,
        peers=peers,
        data_dir=data_dir if data_dir.is_absolute() else (base / data_dir),
        secret_file=secret_file if secret_file.is_absolute() else (base / secret_file),
        raft=tuning,
        path=path,
    )


@dataclass(frozen=True)
class ClusterFile:
    nodes: tuple[NodeAddresses, ...]
    admin_key: Path | None = None
    path: Path | None = None

    def by_id(self) -> dict[str, NodeAddresses]:
        return {n.id: n for n in self.nodes}


def load_cluster_file(path: str | Path) -> ClusterFile:
    path = Path(path)
    data = _load_toml(path)
    raw = data.get("node", [])
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{path}: expected at least one [[node]] table")
    nodes = tuple(_node_addresses(n, f"{path}: [[node]] #{i + 1}") for i, n in enumerate(raw))
    admin = data.get("admin_key")
    admin_path = None
    if isinstance(admin, str) and admin:
        admin_path = Path(admin) if Path(admin).is_absolute() else path.parent / admin
    return ClusterFile(nodes=nodes, admin_key=admin_path, path=path)


# --- writing -------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        s = str(value).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{s}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_table(header: str, items: dict[str, Any]) -> str:
    lines = [header]
    lines += [f"{k} = {_toml_value(v)}" for k, v in items.items()]
    return "\n".join(lines) + "\n"


def render_node_config(cfg: NodeConfig) -> str:
    parts = [
        "# Tetherlab node configuration: run with `tetherlab master --config THIS_FILE`.\n",
        _toml_table(
            "[node]",
            {**cfg.node.to_json(), "data_dir": cfg.data_dir, "secret_file": cfg.secret_file},
        ),
    ]
    for peer in cfg.peers:
        parts.append(_toml_table("[[peer]]", peer.to_json()))
    defaults = RaftTuning()
    changed = {
        k: getattr(cfg.raft, k)
        for k in RaftTuning.__dataclass_fields__
        if getattr(cfg.raft, k) != getattr(defaults, k)
    }
    if changed:
        parts.append(_toml_table("[raft]", changed))
    return "\n".join(parts)


def render_cluster_file(nodes: list[NodeAddresses], admin_key: Path | None = None) -> str:
    parts = ["# Tetherlab cluster: every node's addresses, for clients (status, shim, admin CLI).\n"]
    if admin_key is not None:
        parts.append(f"admin_key = {_toml_value(admin_key)}\n")
    for n in nodes:
        parts.append(_toml_table("[[node]]", n.to_json()))
    return "\n".join(parts)


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file readable by its owner only, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def new_secret() -> bytes:
    return secrets.token_hex(SECRET_BYTES).encode() + b"\n"


def read_secret(path: Path) -> bytes:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"cluster secret {path} does not exist: the node refuses to start without it") from None
    if st.st_mode & 0o077:
        mode = oct(st.st_mode & 0o777)
        raise ConfigError(f"cluster secret {path} is readable by group or others (mode {mode}); chmod 600 it")
    secret = path.read_bytes().strip()
    if len(secret) < SECRET_BYTES:
        raise ConfigError(f"cluster secret {path} is too short: need at least {SECRET_BYTES} bytes of entropy")
    return secret
