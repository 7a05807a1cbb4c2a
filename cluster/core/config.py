"""Node and cluster configuration: the typed, validated model of the TOML files (pure).

A node config names the node, its three addresses, its peers, its data directory and the
path of the cluster secret. A cluster file (``DIR/cluster.toml``) lists every node's
addresses for clients (``tetherlab status``, the shim, the admin CLI).

Reading and writing the files is ``tetherlab.cluster.ops.config``'s job. Errors are raised as
:class:`ConfigError` with the file and field that is wrong, so that an
operator can fix the file without reading a traceback.
"""

from __future__ import annotations

import re
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
    # Log compaction: snapshot after this many entries (or this long since the last one). A
    # snapshot stops the node's Raft thread for 50-150 ms with a 5-25 MB state (docs/performance.md),
    # and the state is durable in LMDB without one (a restart replays only the entries after it), so
    # snapshots are for compacting the log and catching up slow followers: rare is fine.
    compaction_min_entries: int = 20_000
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
        # pysyncobj asserts these at start; say so in the operator's terms instead.
        if tuning.election_timeout_min_s <= 3 * tuning.heartbeat_interval_s:
            raise ConfigError(f"{where}: [raft] election_timeout_min_s must be more than 3 x heartbeat_interval_s")
        if tuning.connection_timeout_s < tuning.election_timeout_max_s:
            raise ConfigError(f"{where}: [raft] connection_timeout_s must be at least election_timeout_max_s")
        if tuning.leader_fallback_timeout_s <= tuning.heartbeat_interval_s:
            raise ConfigError(f"{where}: [raft] leader_fallback_timeout_s must be above heartbeat_interval_s")
        if tuning.compaction_min_entries < 2:
            raise ConfigError(f"{where}: [raft] compaction_min_entries must be at least 2")
        return tuning


@dataclass(frozen=True)
class LoadLimits:
    """What one client may take of a node (docs/hardening.md): quotas the service enforces, with
    refusals naming the field, and the front doors' own bounds. ``[limits]`` in the node file."""

    # Open agent sessions of one developer (a developer key acts only for its own developer's
    # agents, so this bounds one key and all of that developer's keys together).
    sessions_per_developer: int = 1000
    # submit_intent, complete and abandon requests of one developer the leader is working on.
    intents_in_flight_per_developer: int = 64
    # Requests one SSH channel may send per second (a token bucket), and the burst above it.
    requests_per_s_per_connection: float = 500.0
    request_burst_per_connection: int = 1000
    # SSH connections: all of them, and those that have not authenticated yet (over this, the
    # oldest unauthenticated one is closed to make room).
    ssh_connections_max: int = 4096
    ssh_unauthenticated_max: int = 256
    # New SSH connections accepted per second: a connection flood waits in the kernel's queue
    # instead of costing the node an SSH setup each (a handshake costs far more than this anyway).
    ssh_accepts_per_s: float = 500.0
    # HTTP: connections at once (over this, the oldest one still sending its request is
    # closed, or the new one refused), the time a request's head and body may take, and how
    # stale a cached /metrics or /v1 list may be.
    http_connections_max: int = 128  # above the world view's 64 live streams (busy for as long as they watch)
    # New HTTP connections accepted per second (a connection flood waits in the kernel's queue
    # instead of costing the node a setup and a teardown each).
    http_accepts_per_s: float = 200.0
    # HTTP requests answered per second, all connections together: more wait their turn (a
    # client on a keep-alive connection is slowed down, not refused), up to the header timeout.
    http_requests_per_s: float = 200.0
    http_header_timeout_s: float = 5.0
    http_cache_s: float = 1.0

    @classmethod
    def from_toml(cls, data: Any, where: str) -> LoadLimits:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: [limits] must be a table")
        known = set(cls.__dataclass_fields__)
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                raise ConfigError(f"{where}: unknown field [limits].{key}; known: {', '.join(sorted(known))}")
            default = getattr(cls, key)
            if isinstance(default, int):
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    raise ConfigError(f"{where}: [limits].{key} must be a positive whole number, got {value!r}")
            elif not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{where}: [limits].{key} must be a positive number, got {value!r}")
            kwargs[key] = float(value) if isinstance(default, float) else value
        limits = cls(**kwargs)
        if limits.request_burst_per_connection < limits.requests_per_s_per_connection:
            raise ConfigError(f"{where}: [limits].request_burst_per_connection must be at least "
                              "requests_per_s_per_connection (a second's worth)")
        if limits.ssh_unauthenticated_max > limits.ssh_connections_max:
            raise ConfigError(f"{where}: [limits].ssh_unauthenticated_max must not exceed ssh_connections_max")
        if limits.http_cache_s > 60:
            raise ConfigError(f"{where}: [limits].http_cache_s must be at most 60 seconds (it bounds staleness)")
        return limits


@dataclass(frozen=True)
class ClusterSettings:
    """What the whole cluster agrees on at birth: the git remote it coordinates and the first
    admin key (registered once, by the first leader, in the replicated key registry)."""

    remote: str = ""
    bootstrap_admin_keys: tuple[str, ...] = ()
    bootstrap_admin_developer: str = "admin"
    # Agent sessions lapse after this long without a heartbeat. Shims stop their agent after
    # fail_closed_s without a confirmed heartbeat, which must stay below this minus a margin.
    session_ttl_s: int = 30
    # Push-time verification of commits that carry no Tetherlab claim: "accept" (and report) or
    # "refuse" (every commit must come from an agent under tether).
    uncoordinated_commits: str = "accept"


MATCH_WORKER_MODES = ("auto", "on", "off")
HEX64_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class HttpSettings:
    """``[http]``: who may read ``/ui/``, ``/v1/`` and ``/metrics`` from a non-loopback address
    besides holders of tokens an admin issued (docs/world-view.md): the SHA-256 of read tokens
    known from the start (the deploy bundle's Prometheus token)."""

    read_token_sha256: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeConfig:
    node: NodeAddresses
    peers: tuple[NodeAddresses, ...]
    data_dir: Path
    secret_file: Path
    raft: RaftTuning = field(default_factory=RaftTuning)
    path: Path | None = None
    ssh_host_key: Path | None = None
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    limits: LoadLimits = field(default_factory=LoadLimits)
    # [matching] worker: where the leader matches plans: "auto" (a worker process once matching
    # is a visible share of the event loop, on 4 CPUs or more), "on" or "off" (the event loop).
    match_worker: str = "auto"

    @property
    def id(self) -> str:
        return self.node.id

    def all_nodes(self) -> list[NodeAddresses]:
        return sorted([self.node, *self.peers], key=lambda n: n.id)


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


def parse_node_config(data: dict[str, Any], path: Path) -> NodeConfig:
    """A node config from its parsed TOML; relative paths are relative to ``path``'s folder."""
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
    limits = LoadLimits.from_toml(data.get("limits", {}), where)
    matching = data.get("matching", {})
    if not isinstance(matching, dict):
        raise ConfigError(f"{where}: [matching] must be a table")
    unknown = sorted(set(matching) - {"worker"})
    if unknown:
        raise ConfigError(f"{where}: [matching] has unknown key(s) {unknown}; known: worker")
    match_worker = matching.get("worker", "auto")
    if match_worker not in MATCH_WORKER_MODES:
        raise ConfigError(f"{where}: [matching].worker must be one of {', '.join(MATCH_WORKER_MODES)}, "
                          f"got {match_worker!r}")
    host_key = node_table.get("ssh_host_key")
    if host_key is not None and (not isinstance(host_key, str) or not host_key):
        raise ConfigError(f"{where}: [node].ssh_host_key must be a path")
    cl = data.get("cluster", {})
    if not isinstance(cl, dict):
        raise ConfigError(f"{where}: [cluster] must be a table")
    remote = cl.get("remote", "")
    admin_keys = cl.get("bootstrap_admin_keys", [])
    admin_dev = cl.get("bootstrap_admin_developer", "admin")
    if not isinstance(remote, str):
        raise ConfigError(f"{where}: [cluster].remote must be a string")
    if not isinstance(admin_keys, list) or not all(isinstance(k, str) for k in admin_keys):
        raise ConfigError(f"{where}: [cluster].bootstrap_admin_keys must be a list of public key lines")
    if not isinstance(admin_dev, str) or not admin_dev:
        raise ConfigError(f"{where}: [cluster].bootstrap_admin_developer must be a name")
    ttl = cl.get("session_ttl_s", 30)
    if not isinstance(ttl, int) or isinstance(ttl, bool) or not 10 <= ttl <= 3600:
        raise ConfigError(f"{where}: [cluster].session_ttl_s must be a whole number of seconds in 10..3600")
    uncoordinated = cl.get("uncoordinated_commits", "accept")
    if uncoordinated not in ("accept", "refuse"):
        raise ConfigError(f"{where}: [cluster].uncoordinated_commits must be \"accept\" or \"refuse\", "
                          f"got {uncoordinated!r}")

    http = data.get("http", {})
    if not isinstance(http, dict):
        raise ConfigError(f"{where}: [http] must be a table")
    unknown = sorted(set(http) - {"read_token_sha256"})
    if unknown:
        raise ConfigError(f"{where}: [http] does not take {unknown}")
    hashes = http.get("read_token_sha256", [])
    if not isinstance(hashes, list) or not all(isinstance(h, str) and HEX64_RE.match(h) for h in hashes):
        raise ConfigError(f"{where}: [http].read_token_sha256 must be a list of SHA-256 hex digests "
                          "(64 lowercase hex characters each)")

    def _abs(p: str) -> Path:
        return Path(p) if Path(p).is_absolute() else base / p

    return NodeConfig(
        node=node,
        peers=peers,
        data_dir=_abs(str(data_dir)),
        secret_file=_abs(str(secret_file)),
        raft=tuning,
        path=path,
        ssh_host_key=_abs(host_key) if host_key else None,
        match_worker=match_worker,
        cluster=ClusterSettings(remote, tuple(admin_keys), admin_dev, ttl, uncoordinated),
        http=HttpSettings(tuple(hashes)),
        limits=limits,
    )


@dataclass(frozen=True)
class ClusterFile:
    """A client's view of the cluster: node addresses, pinned SSH host keys, and (for the
    admin CLI) the admin key. The shim configuration has the same shape without the key."""

    nodes: tuple[NodeAddresses, ...]
    admin_key: Path | None = None
    path: Path | None = None
    host_keys: dict[str, str] = field(default_factory=dict)  # node id -> "type base64"
    developer: str = ""

    def by_id(self) -> dict[str, NodeAddresses]:
        return {n.id: n for n in self.nodes}


def parse_cluster_file(data: dict[str, Any], path: Path) -> ClusterFile:
    """A cluster file from its parsed TOML; relative key paths are relative to ``path``'s folder."""
    raw = data.get("node", [])
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{path}: expected at least one [[node]] table")
    nodes = tuple(_node_addresses(n, f"{path}: [[node]] #{i + 1}") for i, n in enumerate(raw))
    host_keys = {}
    for i, n in enumerate(raw):
        hk = n.get("host_key")
        if hk is not None:
            if not isinstance(hk, str) or not hk.startswith(("ssh-", "ecdsa-")):
                raise ConfigError(f"{path}: [[node]] #{i + 1}.host_key must be an OpenSSH public key line")
            host_keys[n["id"]] = hk
    admin = data.get("admin_key") or data.get("key")
    admin_path = None
    if isinstance(admin, str) and admin:
        admin_path = Path(admin) if Path(admin).is_absolute() else path.parent / admin
    developer = data.get("developer", "")
    if not isinstance(developer, str):
        raise ConfigError(f"{path}: developer must be a string")
    return ClusterFile(nodes=nodes, admin_key=admin_path, path=path, host_keys=host_keys, developer=developer)


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
            {**cfg.node.to_json(), "data_dir": cfg.data_dir, "secret_file": cfg.secret_file,
             **({"ssh_host_key": cfg.ssh_host_key} if cfg.ssh_host_key else {})},
        ),
        _toml_table(
            "[cluster]",
            {"remote": cfg.cluster.remote, "bootstrap_admin_keys": list(cfg.cluster.bootstrap_admin_keys),
             "bootstrap_admin_developer": cfg.cluster.bootstrap_admin_developer,
             "session_ttl_s": cfg.cluster.session_ttl_s,
             **({"uncoordinated_commits": cfg.cluster.uncoordinated_commits}
                if cfg.cluster.uncoordinated_commits != "accept" else {})},
        ),
    ]
    if cfg.match_worker != "auto":
        parts.append(_toml_table("[matching]", {"worker": cfg.match_worker}))
    if cfg.http.read_token_sha256:
        parts.append(_toml_table("[http]", {"read_token_sha256": list(cfg.http.read_token_sha256)}))
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
    default_limits = LoadLimits()
    limits = {k: getattr(cfg.limits, k) for k in LoadLimits.__dataclass_fields__
              if getattr(cfg.limits, k) != getattr(default_limits, k)}
    if limits:
        parts.append(_toml_table("[limits]", limits))
    return "\n".join(parts)


def render_cluster_file(nodes: list[NodeAddresses], admin_key: Path | None = None,
                        host_keys: dict[str, str] | None = None, header: str = "", developer: str = "") -> str:
    parts = [header or "# Tetherlab cluster: every node's addresses, for clients (status, shim, admin CLI).\n"]
    top = ""
    if admin_key is not None:
        top += f"admin_key = {_toml_value(admin_key)}\n"
    if developer:
        top += f"developer = {_toml_value(developer)}\n"
    if top:
        parts.append(top)
    for n in nodes:
        extra = {"host_key": host_keys[n.id]} if host_keys and n.id in host_keys else {}
        parts.append(_toml_table("[[node]]", {**n.to_json(), **extra}))
    return "\n".join(parts)
