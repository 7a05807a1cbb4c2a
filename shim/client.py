"""Client of the master cluster over SSH, used by ``tether`` and the admin CLI.

It connects to any node of its list (pinning each node's host key), follows ``redirect`` to
the leader, cycles through the nodes with bounded backoff while no leader is known, and keeps
sessions alive with heartbeats.

A paused or black-holed node must not use up a deadline while a quorum is reachable: every step
(waiting for a connection, connecting, each request) is bounded by the caller's deadline; a node
that timed out is tried last for ``SUSPECT_S``; one connection per node, each opened on its own,
so a stuck node does not hold up the others; and a heartbeat is *hedged*: when no answer has come
``hedge_after_s`` after it was sent, another attempt starts on another node (one that is not
being waited on, redirects to such a node included), and the first answer wins.

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

CONNECT_TIMEOUT_S = 5.0  # per connection attempt, and never past the caller's deadline
REQUEST_TIMEOUT_S = 20.0  # per attempt: a write goes through Raft (the node answers unavailable by 5 s)
BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 0.5  # short: after a leader dies, shims re-attach within about an election
REDIRECTS_MAX = 8  # per request: more means the cluster is electing, so back off instead
CLIENT_NAME = "tetherlab-client"
SUSPECT_S = 10.0  # a node that timed out is tried after every other node for this long
# AES-GCM first: one AEAD call per packet where asyncssh's ChaCha20-Poly1305 builds three cipher
# objects (about 2.4 vs 14 microseconds per 400-byte packet here); the rest as asyncssh ranks them.
ENCRYPTION_ALGS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
                   "aes256-ctr", "aes192-ctr", "aes128-ctr"]
HEDGE_AFTER_S = 0.5  # a heartbeat unanswered this long is sent again through another node


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


class ClientClosed(ClientError):
    """The client was closed: it opens no connection and sends nothing more."""


# Errors that end a hedged heartbeat at once: asking another node would not change them.
_FINAL = (RequestError, HostKeyMismatch, ClientClosed)


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
        # Requests sent in one loop iteration leave in one channel write: one SSH packet, one
        # cipher call and one syscall for all of them here, and one packet to decrypt at the node.
        self._out: list[bytes] = []
        self._flush_scheduled = False

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

    def _send(self, data: bytes) -> None:
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = b"".join(self._out)
        self._out.clear()
        if not data or not self.alive:
            return
        try:
            self.proc.stdin.write(data)
        except (asyncssh.Error, ConnectionError, OSError) as e:
            log.debug("writing to %s failed: %s", self.master.id, e)
            # The reader's finally fails every waiting request as a lost connection: the callers
            # treat it as any broken link (retry, or Indeterminate for a write).
            self.reader.cancel()

    def _fail_all(self) -> None:
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionError(f"connection to {self.master.id} lost"))
        self.waiting.clear()

    @property
    def alive(self) -> bool:
        return not self.reader.done()

    async def call(self, req: p.Request, timeout_s: float) -> p.Message:
        if not self.alive:  # its reader has failed what was waiting; _flush would drop this request
            raise ConnectionError(f"connection to {self.master.id} lost")
        fut: asyncio.Future[p.Message] = asyncio.get_running_loop().create_future()
        data = self.proto.send(req)
        self.waiting[req.id] = fut
        self._send(data)
        try:
            # Not wait_for: on Python 3.11 it returns the reply when a cancellation arrives with it,
            # and the cancelled caller carries on (after close(), opening connections no one closes).
            async with asyncio.timeout(timeout_s):
                return await fut
        finally:
            self.waiting.pop(req.id, None)

    def close(self) -> None:
        self._out.clear()
        self.reader.cancel()
        with contextlib.suppress(Exception):
            self.conn.close()


class _Hedge:
    """Which node each attempt of one hedged request is waiting on: the others avoid it."""

    def __init__(self) -> None:
        self.waiting_on: dict[int, str] = {}

    def avoid(self, chain: int) -> set[str]:
        return {node for c, node in self.waiting_on.items() if c != chain}


class MasterClient:
    def __init__(self, masters: list[Master], key_path: str | Path, developer: str,
                 on_notify: Callable[[p.Notification], None] | None = None, client_name: str = CLIENT_NAME,
                 client_version: str = "0.1.0", agent: str | None = None) -> None:
        if not masters:
            raise ValueError("no master nodes configured")
        self.masters = list(masters)
        self.by_address = {m.address: m for m in masters}
        self.by_id = {m.id: m for m in masters}
        self.key = asyncssh.read_private_key(str(key_path))
        self.developer = developer
        self.on_notify = on_notify or (lambda n: None)
        self.client_name = client_name
        self.client_version = client_version
        self.agent = agent
        self._links: dict[str, _Link] = {}  # at most one per node
        self._closed = False  # set by close(): no connection is opened after it
        self._locks: dict[str, asyncio.Lock] = {}  # one connect at a time, per node
        self._suspect_until: dict[str, float] = {}  # node id -> monotonic time
        self._rr = random.randrange(len(self.masters))  # spread shims over the nodes
        self._rng = random.Random()
        self.last_confirmed: float | None = None  # monotonic time of the last quorum-backed heartbeat reply
        self.leader_id: str | None = None

    # --- connections ------------------------------------------------------------------------

    async def _open(self, m: Master, timeout_s: float) -> _Link:
        known: Any = ([asyncssh.import_public_key(m.host_key)], [], []) if m.host_key else None
        deadline = time.monotonic() + timeout_s
        try:
            async with asyncio.timeout(timeout_s):  # not wait_for (see _Link.call)
                conn = await asyncssh.connect(
                    m.host, m.port, username=self.developer, client_keys=[self.key], known_hosts=known,
                    agent_path=None, password=None, kbdint_auth=False, gss_auth=False,
                    keepalive_interval=5, keepalive_count_max=3, encryption_algs=ENCRYPTION_ALGS,
                )
        except asyncssh.HostKeyNotVerifiable as e:
            raise HostKeyMismatch(f"node {m.id} at {m.address} presented an unexpected host key: {e}") from None
        link: _Link | None = None
        try:
            async with asyncio.timeout(max(0.01, deadline - time.monotonic())):
                proc = await conn.create_process(subsystem="tetherlab", encoding=None)
                link = _Link(m, conn, proc, self.on_notify)
                hello = link.proto.hello(client_name=self.client_name, client_version=self.client_version,
                                         agent=self.agent)
                reply = await link.call(hello, max(0.01, deadline - time.monotonic()))
        except BaseException:
            if link is not None:
                link.close()  # its reader too, not only the connection
            else:
                conn.close()
            raise
        assert link is not None
        if isinstance(reply, p.Error):
            link.close()
            raise RequestError(reply.code, reply.message)
        assert isinstance(reply, p.HelloOk)
        link.hello = reply
        return link

    async def _link_to(self, m: Master, timeout_s: float) -> _Link:
        """The connection to ``m``, opened if needed; waiting for another opener counts too."""
        link = self._links.get(m.id)
        if link is not None and link.alive:
            return link  # the common case: no lock, no timer
        async with asyncio.timeout(timeout_s):
            lock = self._locks.setdefault(m.id, asyncio.Lock())
            async with lock:
                link = self._links.get(m.id)
                if link is not None and link.alive:
                    return link
                if link is not None:
                    link.close()
                    del self._links[m.id]
                if self._closed:
                    raise ClientClosed("the client is closed")
                link = await self._open(m, timeout_s)
                if self._closed:  # closed while this connection was being opened: nobody else would close it
                    link.close()
                    raise ClientClosed("the client was closed while connecting")
                self._links[m.id] = link
                return link

    def _drop(self, m: Master, suspect: bool) -> None:
        link = self._links.pop(m.id, None)
        if link is not None:
            link.close()
        if suspect:
            self._suspect_until[m.id] = time.monotonic() + SUSPECT_S
        if self.leader_id == m.id:
            self.leader_id = None
        self._rr += 1

    def _suspect(self, node_id: str) -> bool:
        return self._suspect_until.get(node_id, 0.0) > time.monotonic()

    def _next_node(self, avoid: set[str]) -> Master:
        """The known leader if it is answering, else the next node in turn; suspects last."""
        leader = self.by_id.get(self.leader_id or "")
        if leader is not None and leader.id not in avoid and not self._suspect(leader.id):
            return leader  # the common case, without building the turn
        n = len(self.masters)
        turn = [self.masters[(self._rr + i) % n] for i in range(n)]
        if leader is not None:
            turn.remove(leader)
            turn.insert(0, leader)
        for ok in (lambda m: m.id not in avoid and not self._suspect(m.id), lambda m: m.id not in avoid):
            for m in turn:
                if ok(m):
                    return m
        return turn[0]

    def _jitter(self, backoff_s: float) -> float:
        """Spread retries so shims that lost the same leader do not reconnect in lockstep."""
        return backoff_s * self._rng.uniform(0.5, 1.5)

    async def close(self) -> None:
        """Close every connection; requests still running end with ClientClosed."""
        self._closed = True
        for link in self._links.values():
            link.close()
        self._links.clear()

    # --- requests ---------------------------------------------------------------------------

    async def request(self, make: Callable[[p.RequestId], p.Request], deadline_s: float = 30.0,
                      idempotent: bool = True) -> dict[str, Any]:
        """Send the request made by ``make(id)`` to the leader, following redirects and
        retrying elsewhere while the cluster has no leader, until ``deadline_s``."""
        return await self._request(make, time.monotonic() + deadline_s, deadline_s, idempotent, None, 0)

    async def _request(self, make: Callable[[p.RequestId], p.Request], deadline: float, deadline_s: float,
                       idempotent: bool, hedge: _Hedge | None, chain: int) -> dict[str, Any]:
        backoff = BACKOFF_INITIAL_S
        prefer: Master | None = None
        redirects = 0
        last_reason = "no node answered"

        async def pause() -> None:
            nonlocal backoff
            await asyncio.sleep(min(self._jitter(backoff), max(0.0, deadline - time.monotonic())))
            backoff = min(backoff * 2, BACKOFF_MAX_S)

        try:
            while (left := deadline - time.monotonic()) > 0:
                avoid = hedge.avoid(chain) if hedge is not None else set()
                m = prefer or self._next_node(avoid)
                prefer = None
                if hedge is not None:
                    hedge.waiting_on[chain] = m.id
                try:
                    link = await self._link_to(m, min(CONNECT_TIMEOUT_S, left))
                except HostKeyMismatch:
                    raise
                except (OSError, asyncssh.Error, TimeoutError, RequestError) as e:
                    last_reason = f"cannot reach {m.id}: {e or type(e).__name__}"
                    self._drop(m, suspect=isinstance(e, TimeoutError))
                    await pause()
                    continue
                req = make(link.proto.next_id())
                try:
                    reply = await link.call(req, max(0.01, min(REQUEST_TIMEOUT_S, deadline - time.monotonic())))
                except (ConnectionError, OSError, asyncssh.Error, TimeoutError) as e:
                    self._drop(m, suspect=isinstance(e, TimeoutError))
                    if not idempotent:
                        raise Indeterminate(f"connection to {m.id} broke after sending {req.type}: "
                                            f"{e or type(e).__name__}") from None
                    last_reason = f"{m.id}: {e or type(e).__name__}"
                    await pause()
                    continue
                if isinstance(reply, p.Result):
                    self.leader_id = m.id
                    self._suspect_until.pop(m.id, None)
                    return reply.payload
                if isinstance(reply, p.Redirect):
                    target = self.by_address.get(reply.leader_address)
                    redirects += 1
                    if target is None:
                        last_reason = f"redirected to {reply.leader_address}, which is not in this client's node list"
                        self._rr += 1
                    elif target.id in avoid or self._suspect(target.id):
                        # The leader this node names is the one not answering: wait for an election.
                        last_reason = f"{m.id} names {target.id} as leader, which is not answering"
                        self._rr += 1
                    elif redirects <= REDIRECTS_MAX:
                        prefer = target
                        continue
                    await pause()
                    continue
                if isinstance(reply, p.Unavailable):
                    last_reason = f"{m.id}: {reply.reason} {reply.message}".strip()
                    if self.leader_id == m.id:
                        self.leader_id = None
                    self._rr += 1
                    backoff = max(backoff, min(reply.retry_after_ms / 1000, BACKOFF_MAX_S))
                    await pause()
                    continue
                if isinstance(reply, p.Error):
                    raise RequestError(reply.code, reply.message)
                raise RequestError("unexpected_reply", f"unexpected {reply.type}")
        finally:
            if hedge is not None:
                hedge.waiting_on.pop(chain, None)
        raise ClusterUnavailable(f"no quorum-backed leader answered within {deadline_s:.1f} s ({last_reason})")

    async def call(self, cls: type[p.Request], deadline_s: float = 30.0, idempotent: bool = True,
                   **fields: Any) -> dict[str, Any]:
        return await self.request(lambda rid: cls(id=rid, **fields), deadline_s, idempotent)

    async def heartbeat(self, agent_ids: list[str], deadline_s: float = 5.0,
                        hedge_after_s: float = HEDGE_AFTER_S) -> dict[str, Any]:
        """One heartbeat, hedged across nodes; the payload of the first quorum-backed reply. Which
        sessions it kept alive is in the payload (``confirmed``, ``lapsed``, ``unknown``)."""
        sent_at = time.monotonic()
        deadline = sent_at + deadline_s
        ids = tuple(agent_ids)
        hedge = _Hedge()
        tasks: set[asyncio.Task[dict[str, Any]]] = set()
        reasons: list[str] = []
        loop = asyncio.get_running_loop()
        try:
            for chain in range(len(self.masters) * 2):  # bounded: a few hedges per node at most
                if chain == 0 or len(tasks) < len(self.masters):
                    tasks.add(loop.create_task(self._request(lambda rid: p.Heartbeat(id=rid, agent_ids=ids), deadline,
                                                             deadline_s, True, hedge, chain)))
                left = deadline - time.monotonic()
                if left <= 0 or not tasks:
                    break
                done, _ = await asyncio.wait(tasks, timeout=min(hedge_after_s, left),
                                             return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    tasks.discard(t)
                    err = t.exception()
                    if err is None:
                        self.last_confirmed = max(self.last_confirmed or sent_at, sent_at)
                        return t.result()
                    if isinstance(err, _FINAL):
                        raise err
                    reasons.append(str(err))
            while tasks and (left := deadline - time.monotonic()) > 0:
                done, _ = await asyncio.wait(tasks, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    tasks.discard(t)
                    err = t.exception()
                    if err is None:
                        self.last_confirmed = max(self.last_confirmed or sent_at, sent_at)
                        return t.result()
                    if isinstance(err, _FINAL):
                        raise err
                    reasons.append(str(err))
        finally:
            for t in tasks:
                t.cancel()
        raise ClusterUnavailable(reasons[-1] if reasons else
                                 f"no quorum-backed leader answered within {deadline_s:.1f} s")
