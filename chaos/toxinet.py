"""Network faults through toxiproxy proxies, driven with toxiproxy-python's API client.

Proxy names follow one convention, so a drill can find the links of a deployed cluster:

- ``raft-<dialler>-<listener>``: the Raft link between two nodes. pysyncobj lets the node whose
  address string is greater dial, so the proxy sits on the dialling side: the dialler's config
  lists the listener at the proxy's address, and that address must still compare below the
  dialler's own (:func:`make_proxied_layout` picks ports that do).
- ``ssh-<node>``: shims' (and admin tools') SSH link to a node. Nodes list each other's SSH
  address as the proxy's, so redirects to the leader go through it too.

A cut of direction A -> B is a ``timeout`` toxic with timeout 0 (data silently dropped, the
connection held open: a blackhole) on the stream that carries A's bytes to B: ``upstream`` when A
dials, ``downstream`` when B does. Latency is a ``latency`` toxic (with jitter) on both streams of
every link. Only toxics named ``tl-*`` are ours; heal removes exactly those.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toxiproxy.api import APIConsumer  # type: ignore[import-untyped]
from toxiproxy.exceptions import NotFound  # type: ignore[import-untyped]

from tetherlab.chaos.netns import CLIENT, Drops
from tetherlab.chaos.toxiproxy_server import ToxiproxyHandle

API_TIMEOUT_S = 5.0
CUT = "tl-cut"
LATENCY = "tl-latency"
_RAFT = re.compile(r"^raft-([a-z0-9][a-z0-9_-]*?)-([a-z0-9][a-z0-9_]*)$")
_SSH = re.compile(r"^ssh-([a-z0-9][a-z0-9_-]*)$")


@dataclass(frozen=True)
class LinkProxy:
    name: str
    dialler: str  # node id, or CLIENT for ssh-* proxies
    listener: str

    def streams_cut(self, drops: Drops) -> set[str]:
        """Which of the proxy's streams carry a direction that ``drops`` cuts."""
        out = set()
        if (self.dialler, self.listener) in drops:
            out.add("upstream")
        if (self.listener, self.dialler) in drops:
            out.add("downstream")
        return out


def parse_proxy_name(name: str) -> LinkProxy | None:
    m = _RAFT.match(name)
    if m:
        return LinkProxy(name, m.group(1), m.group(2))
    m = _SSH.match(name)
    if m:
        return LinkProxy(name, CLIENT, m.group(1))
    return None


class ToxiproxyNet:
    """Cuts and latency on a cluster whose links run through toxiproxy proxies (see above)."""

    name = "toxiproxy"
    supports_latency = True
    supports_groups = False  # every shim shares the ssh-<node> proxies

    def __init__(self, url: str, log: Callable[[str], None] | None = None) -> None:
        handle = ToxiproxyHandle(url=url.rstrip("/"), kind="env")
        # toxiproxy-python keeps the API address in class attributes.
        APIConsumer.host, APIConsumer.port = handle.host, handle.port
        self._api = APIConsumer
        self._log = log or (lambda s: None)
        self.links = [lk for lk in (parse_proxy_name(n) for n in self._get("/proxies")) if lk is not None]
        if not self.links:
            raise RuntimeError(f"no raft-<a>-<b> or ssh-<node> proxies at {url}")
        self._cut: dict[str, set[str]] = {}
        self._latency: tuple[int, int] | None = None
        self.heal()  # leftovers of an earlier drill that died

    def _get(self, path: str) -> Any:
        return self._api.get(path, timeout=API_TIMEOUT_S).json()

    def _add(self, proxy: str, name: str, kind: str, stream: str, attributes: Mapping[str, int]) -> None:
        self._api.post(f"/proxies/{proxy}/toxics", json={"name": name, "type": kind, "stream": stream,
                                                         "toxicity": 1.0, "attributes": dict(attributes)},
                       timeout=API_TIMEOUT_S)

    def _remove(self, proxy: str, name: str) -> None:
        try:
            self._api.delete(f"/proxies/{proxy}/toxics/{name}", timeout=API_TIMEOUT_S)
        except NotFound:
            pass

    def cut(self, drops: Drops) -> None:
        for lk in self.links:
            want = lk.streams_cut(drops)
            have = self._cut.get(lk.name, set())
            for stream in sorted(have - want):
                self._remove(lk.name, f"{CUT}-{stream}")
            for stream in sorted(want - have):
                self._add(lk.name, f"{CUT}-{stream}", "timeout", stream, {"timeout": 0})
            self._cut[lk.name] = want

    def set_latency(self, latency_ms: int, jitter_ms: int) -> None:
        for lk in self.links:
            for stream in ("upstream", "downstream"):
                if self._latency is not None:
                    self._remove(lk.name, f"{LATENCY}-{stream}")
                if latency_ms > 0:
                    self._add(lk.name, f"{LATENCY}-{stream}", "latency", stream,
                              {"latency": latency_ms, "jitter": jitter_ms})
        self._latency = (latency_ms, jitter_ms) if latency_ms > 0 else None

    def heal(self) -> None:
        for lk in self.links:
            for t in self._get(f"/proxies/{lk.name}/toxics"):
                if str(t.get("name", "")).startswith("tl-"):
                    self._remove(lk.name, t["name"])
        self._cut = {}
        self._latency = None

    def close(self) -> None:
        try:
            self.heal()
        except Exception as e:  # the server may be gone already; nothing of ours is left then
            self._log(f"toxiproxy heal at close failed: {e}")


# --- a local cluster whose links run through proxies ------------------------------------------------


@dataclass(frozen=True)
class ProxySpec:
    name: str
    listen: str
    upstream: str


def make_proxied_layout(cluster_dir: Path, nodes: Sequence[Any], proxy_port_base: int) -> list[ProxySpec]:
    """Rewrite an initialised cluster's files so every Raft link and every SSH link runs through a
    proxy (named as above), and return the proxies to create. ``nodes`` are the cluster file's
    NodeAddresses. Proxy ports count up from ``proxy_port_base``, which must be below every raft
    port and have as many digits, so a dialler's proxy address compares below its own."""
    specs: list[ProxySpec] = []
    port = proxy_port_base
    raft_of = {n.id: n.raft for n in nodes}
    for n in nodes:
        assert len(str(port)) == len(str(n.raft.port)) and port < n.raft.port, "proxy ports must sort below"
    peer_raft: dict[tuple[str, str], str] = {}  # (config owner, peer) -> address to write
    for a in nodes:
        for b in nodes:
            if a.id != b.id and str(a.raft) > str(b.raft):  # a dials b
                listen = f"{a.raft.host}:{port}"
                port += 1
                assert listen < str(a.raft)
                specs.append(ProxySpec(f"raft-{a.id}-{b.id}", listen, str(raft_of[b.id])))
                peer_raft[(a.id, b.id)] = listen
    ssh_proxy: dict[str, str] = {}
    for n in nodes:
        listen = f"127.0.0.1:{port}"
        port += 1
        specs.append(ProxySpec(f"ssh-{n.id}", listen, str(n.ssh)))
        ssh_proxy[n.id] = listen
    for a in nodes:
        cfg = cluster_dir / a.id / "node.toml"
        text = cfg.read_text()
        for b in nodes:
            if b.id == a.id:
                continue
            if (a.id, b.id) in peer_raft:
                text = text.replace(f'raft = "{b.raft}"', f'raft = "{peer_raft[(a.id, b.id)]}"')
            text = text.replace(f'ssh = "{b.ssh}"', f'ssh = "{ssh_proxy[b.id]}"')
        cfg.write_text(text)
    for name in ("cluster.toml", "shim.toml"):
        f = cluster_dir / name
        if f.exists():
            text = f.read_text()
            for n in nodes:
                text = text.replace(f'ssh = "{n.ssh}"', f'ssh = "{ssh_proxy[n.id]}"')
            f.write_text(text)
    return specs


def create_proxies(url: str, specs: Sequence[ProxySpec]) -> None:
    handle = ToxiproxyHandle(url=url.rstrip("/"), kind="env")
    APIConsumer.host, APIConsumer.port = handle.host, handle.port
    for s in specs:
        APIConsumer.post("/proxies", json={"name": s.name, "listen": s.listen, "upstream": s.upstream,
                                           "enabled": True}, timeout=API_TIMEOUT_S)
