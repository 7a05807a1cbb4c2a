"""Client of the master cluster over SSH, used by ``tether`` and the admin CLI.

It connects to any node of its list (pinning each node's host key), follows ``redirect`` to
the leader, cycles through the nodes with bounded backoff while no leader is known, keeps
sessions alive with heartbeats, and records when a quorum-backed leader last confirmed them
(``last_confirmed``), which is what the shim's fail-closed rule reads.

Outcomes: a ``Result`` payload; :class:`RequestError` for a refusal (the caller's fault);
:class:`ClusterUnavailable` when no quorum-backed leader answered within the deadline (nothing
was applied); :class:`Indeterminate` when the connection broke after a write was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from tetherlab.cluster import protocol as p
from tetherlab.cluster.ops.config import load_cluster_file

log = logging.getLogger("tetherlab.client")

CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 20.0  # per attempt: a write goes through Raft (the node answers unavailable by 5 s)
BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 0.5  # short: after a leader dies, shims re-attach within about an election
REDIRECTS_MAX = 8  # per request: more means the cluster is electing, so back off instead
CLIENT_NAME = "tetherlab-client"


class ClientError(Exception):
    """Base of the client's errors."""


class RequestError(ClientError):
    """The node refused the request: ``code`` is stable, ``message`` says what was wrong."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ClusterUnavailable(ClientError):
    """No quorum-backed leader answered before the deadline; nothing was applied."""


class Indeterminate(ClientError):
    """The connection broke after the request was sent: it may or may not have been applied."""


class HostKeyMismatch(ClientError):
    """A node presented a host key other than the pinned one: refused."""


@dataclass(frozen=True)
class Master:
    id: str
    host: str
    port: int
    host_key: str | None  # "type base64"; None disables pinning (tests only)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def masters_from_cluster_file(path: str | Path) -> list[Master]:
    cf = load_cluster_file(path)
    return [Master(n.id, n.ssh.host, n.ssh.port, cf.host_keys.get(n.id)) for n in cf.nodes]


class _Link:
    """One SSH connection to one node with the tetherlab subsystem open."""

    def __init__(self, master: Master, conn: asyncssh.SSHClientConnection, proc: asyncssh.SSHClientProcess,
                 on_notify: Callable[[p.Notification], None]) -> None:
        self.master = master
        self.conn = conn
        self.proc = proc
        self.proto = p.ClientConnection()
        self.waiting: dict[p.RequestId, asyncio.Future[p.Message]] = {}
        self.on_notify = on_notify
        self.reader = asyncio.get_running_loop().create_task(self._read())
        self.hello: p.HelloOk | None = None

    async def _read(self) -> None:
        try:
            while True:
                data = await self.proc.stdout.read(65536)
                self.proto.receive_data(data)
                for ev in self.proto.events():
                    if isinstance(ev, p.Reply) and ev.id in self.waiting:
                        fut = self.waiting.pop(ev.id)
                        if not fut.done():
                            fut.set_result(ev)
                    elif isinstance(ev, p.Notification):
                        self.on_notify(ev)
                    elif isinstance(ev, p.ProtocolViolation):
                        log.warning("node %s sent something bad: %s", self.master.id, ev.message)
                if not data:
                    break
        except (asyncssh.Error, ConnectionError, OSError):
            pass
        finally:
            self._fail_all()

    def _fail_all(self) -> None:
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionError(f"connection to {self.master.id} lost"))
        self.waiting.clear()

    @property
    def alive(self) -> bool:
        return not self.reader.done()

    async def call(self, req: p.Request, timeout_s: float) -> p.Message:
        fut: asyncio.Future[p.Message] = asyncio.get_running_loop().create_future()
        data = self.proto.send(req)
        self.waiting[req.id] = fut
        self.proc.stdin.write(data)
        try:
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            self.waiting.pop(req.id, None)

    def close(self) -> None:
        self.reader.cancel()
        with contextlib.suppress(Exception):
            self.conn.close()


class MasterClient:
    def __init__(self, masters: list[Master], key_path: str | Path, developer: str,
                 on_notify: Callable[[p.Notification], None] | None = None, client_name: str = CLIENT_NAME,
                 client_version: str = "0.1.0", agent: str | None = None) -> None:
        if not masters:
            raise ValueError("no master nodes configured")
        self.masters = list(masters)
        self.by_address = {m.address: m for m in masters}
        self.key = asyncssh.read_private_key(str(key_path))
        self.developer = developer
        self.on_notify = on_notify or (lambda n: None)
        self.client_name = client_name
        self.client_version = client_version
        self.agent = agent
        self._link: _Link | None = None
        self._lock = asyncio.Lock()  # one connect at a time
        self._rr = random.randrange(len(self.masters))  # spread shims over the nodes
        self._rng = random.Random()
        self.last_confirmed: float | None = None  # monotonic time of the last quorum-backed ack
        self.leader_id: str | None = None

    # --- connections ------------------------------------------------------------------------

    async def _open(self, m: Master) -> _Link:
        known: Any = ([asyncssh.import_public_key(m.host_key)], [], []) if m.host_key else None
        try:
            conn = await asyncio.wait_for(
                asyncssh.connect(
                    m.host, m.port, username=self.developer, client_keys=[self.key], known_hosts=known,
                    agent_path=None, password=None, kbdint_auth=False, gss_auth=False,
                    keepalive_interval=5, keepalive_count_max=3,
                ),
                CONNECT_TIMEOUT_S,
            )
        except asyncssh.HostKeyNotVerifiable as e:
            raise HostKeyMismatch(f"node {m.id} at {m.address} presented an unexpected host key: {e}") from None
        try:
            proc = await conn.create_process(subsystem="tetherlab", encoding=None)
            link = _Link(m, conn, proc, self.on_notify)
            hello = link.proto.hello(client_name=self.client_name, client_version=self.client_version,
                                     agent=self.agent)
            reply = await link.call(hello, CONNECT_TIMEOUT_S)
        except BaseException:
            conn.close()
            raise
        if isinstance(reply, p.Error):
            link.close()
            raise RequestError(reply.code, reply.message)
        assert isinstance(reply, p.HelloOk)
        link.hello = reply
        return link

    async def _connect(self, prefer: Master | None = None) -> _Link:
        async with self._lock:
            if self._link is not None and self._link.alive and (prefer is None or self._link.master == prefer):
                return self._link
            if self._link is not None:
                self._link.close()
                self._link = None
            m = prefer or self.masters[self._rr % len(self.masters)]
            self._link = await self._open(m)
            return self._link

    def _jitter(self, backoff_s: float) -> float:
        """Spread retries so shims that lost the same leader do not reconnect in lockstep."""
        return backoff_s * self._rng.uniform(0.5, 1.5)

    def _rotate(self) -> None:
        self._rr += 1
        if self._link is not None:
            self._link.close()
            self._link = None

    async def close(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None

    # --- requests ---------------------------------------------------------------------------

    async def request(self, make: Callable[[p.RequestId], p.Request], deadline_s: float = 30.0,
                      idempotent: bool = True) -> dict[str, Any]:
        """Send the request made by ``make(id)`` to the leader, following redirects and
        retrying elsewhere while the cluster has no leader, until ``deadline_s``."""
        deadline = time.monotonic() + deadline_s
        backoff = BACKOFF_INITIAL_S
        prefer: Master | None = None
        redirects = 0
        last_reason = "no node answered"
        while time.monotonic() < deadline:
            try:
                link = await self._connect(prefer)
            except HostKeyMismatch:
                raise
            except (OSError, asyncssh.Error, TimeoutError, RequestError) as e:
                last_reason = f"cannot reach a node: {e}"
                self._rotate()
                prefer = None
                await asyncio.sleep(min(self._jitter(backoff), max(0.0, deadline - time.monotonic())))
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            req = make(link.proto.next_id())
            sent = False
            try:
                sent = True
                reply = await link.call(req, min(REQUEST_TIMEOUT_S, max(0.1, deadline - time.monotonic())))
            except (ConnectionError, OSError, asyncssh.Error, TimeoutError) as e:
                self._rotate()
                prefer = None
                if sent and not idempotent:
                    raise Indeterminate(f"connection to {link.master.id} broke after sending {req.type}: {e}") from None
                last_reason = f"{link.master.id}: {e or type(e).__name__}"
                await asyncio.sleep(min(self._jitter(backoff), max(0.0, deadline - time.monotonic())))
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            if isinstance(reply, p.Result):
                self.leader_id = link.master.id
                return reply.payload
            if isinstance(reply, p.Redirect):
                target = self.by_address.get(reply.leader_address)
                redirects += 1
                if target is None:
                    last_reason = f"redirected to {reply.leader_address}, which is not in this client's node list"
                    self._rotate()
                elif redirects <= REDIRECTS_MAX:
                    prefer = target
                    continue
                await asyncio.sleep(min(self._jitter(backoff), max(0.0, deadline - time.monotonic())))
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            if isinstance(reply, p.Unavailable):
                last_reason = f"{link.master.id}: {reply.reason} {reply.message}".strip()
                self._rotate()
                prefer = None
                wait = max(backoff, reply.retry_after_ms / 1000)
                await asyncio.sleep(min(wait, BACKOFF_MAX_S, max(0.0, deadline - time.monotonic())))
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            if isinstance(reply, p.Error):
                raise RequestError(reply.code, reply.message)
            raise RequestError("unexpected_reply", f"unexpected {reply.type}")
        raise ClusterUnavailable(f"no quorum-backed leader answered within {deadline_s:.0f} s ({last_reason})")

    async def call(self, cls: type[p.Request], deadline_s: float = 30.0, idempotent: bool = True,
                   **fields: Any) -> dict[str, Any]:
        return await self.request(lambda rid: cls(id=rid, **fields), deadline_s, idempotent)

    async def heartbeat(self, agent_ids: list[str], deadline_s: float = 5.0) -> dict[str, Any]:
        """One heartbeat; on success a quorum-backed leader has confirmed the sessions."""
        sent_at = time.monotonic()
        payload = await self.call(p.Heartbeat, deadline_s, agent_ids=tuple(agent_ids))
        # Confirmed as of when we sent it, not when the answer arrived: conservative.
        self.last_confirmed = sent_at
        return payload
