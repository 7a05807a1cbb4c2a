"""Small clients for a node's local control socket and its HTTP status endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tetherlab.cluster.core.config import ClusterFile, NodeAddresses
from tetherlab.cluster.node.sockets import usable_path

HTTP_TIMEOUT_S = 2.0


class ControlClient:
    """Blocking JSON-lines client of ``DATA_DIR/control.sock`` (one request at a time)."""

    def __init__(self, path: str | Path, timeout_s: float = 10.0) -> None:
        self.path = str(path)
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._buf = b""
        self._next_id = 0

    def _connect(self) -> socket.socket:
        if self._sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout_s)
            try:
                with usable_path(self.path) as path:
                    s.connect(path)
            except OSError:
                s.close()
                raise
            self._sock = s
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and return the whole reply ({"ok", "result"|"error"})."""
        self._next_id += 1
        req = {"id": self._next_id, "op": op, **fields}
        s = self._connect()
        try:
            s.sendall(json.dumps(req).encode() + b"\n")
            while b"\n" not in self._buf:
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError("node closed the control connection")
                self._buf += chunk
        except (OSError, ConnectionError):
            self.close()
            raise
        line, _, self._buf = self._buf.partition(b"\n")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def put(self, ns: str, key: str, value: str) -> dict[str, Any]:
        return self.call("put", ns=ns, key=key, value=value)

    def get(self, ns: str, key: str, linearizable: bool = True) -> dict[str, Any]:
        return self.call("get", ns=ns, key=key, linearizable=linearizable)


async def control_call_async(path: str | Path, op: str, timeout_s: float = 10.0, **fields: Any) -> dict[str, Any]:
    async with asyncio.timeout(timeout_s):
        with usable_path(path) as short:
            reader, writer = await asyncio.open_unix_connection(short)
    try:
        writer.write(json.dumps({"id": 1, "op": op, **fields}).encode() + b"\n")
        async with asyncio.timeout(timeout_s):
            line = await reader.readline()
        reply: dict[str, Any] = json.loads(line)
        return reply
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def http_get_json(addr: str, path: str, timeout_s: float = HTTP_TIMEOUT_S) -> tuple[int, Any]:
    url = f"http://{addr}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body)
        except ValueError:
            return e.code, {"error": body.decode(errors="replace")}


def node_status(node: NodeAddresses, timeout_s: float = HTTP_TIMEOUT_S) -> dict[str, Any] | None:
    """A node's /v1/status; from a machine the node does not open /v1 to (it needs a read
    token off loopback), the role, term, indexes and version of its open /livez."""
    try:
        code, body = http_get_json(str(node.http), "/v1/status", timeout_s)
        if code == 401:
            code, body = http_get_json(str(node.http), "/livez", timeout_s)
    except (OSError, ValueError):
        return None
    return body if code == 200 and isinstance(body, dict) else None


def cluster_status(cluster: ClusterFile, timeout_s: float = HTTP_TIMEOUT_S,
                   versions: dict[str, str] | None = None) -> dict[str, Any]:
    """Ask every node in parallel; the contract of ``tetherlab status --json``. Each reachable
    node's software version goes into ``versions`` when given."""
    with ThreadPoolExecutor(max_workers=max(1, len(cluster.nodes))) as pool:
        answers = list(pool.map(lambda n: node_status(n, timeout_s), cluster.nodes))
    nodes = []
    leader_votes: dict[str, int] = {}
    best_leader: tuple[int, str] | None = None
    for n, st in zip(cluster.nodes, answers, strict=True):
        entry: dict[str, Any] = {
            "id": n.id,
            "role": "unreachable",
            "term": None,
            "commit_index": None,
            "applied_index": None,
            "raft": str(n.raft),
            "ssh": str(n.ssh),
            "http": str(n.http),
        }
        if st is not None:
            entry.update(
                role=st.get("role", "unreachable"),
                term=st.get("term"),
                commit_index=st.get("commit_index"),
                applied_index=st.get("applied_index"),
            )
            if st.get("role") == "leader" and (best_leader is None or st["term"] > best_leader[0]):
                best_leader = (st["term"], n.id)
            if st.get("leader"):
                leader_votes[st["leader"]] = leader_votes.get(st["leader"], 0) + 1
        nodes.append(entry)
    leader = best_leader[1] if best_leader else None
    if versions is not None:
        versions.update({n.id: str(st.get("version")) for n, st in zip(cluster.nodes, answers, strict=True) if st})
    return {"leader": leader, "nodes": nodes}
