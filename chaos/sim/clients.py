"""Clients of the simulated cluster: their connections to nodes, and the request loop.

A client holds one connection (the SSH connection of production) to one node at a time. Opening
it authenticates the client's key against that node's key registry at that moment (the same
``authenticate`` function the SSH endpoint calls). Requests and replies travel with delays; a
connection breaks when its node crashes, when the node drops a revoked key's connections, or
at random (a network reset): what was in flight is then of unknown outcome.

:meth:`SimClient.request` follows the rules of the shim's ``MasterClient.request``: follow a
redirect to the leader, rotate to another node with bounded backoff on ``unavailable`` or a
broken connection, give up at the deadline (``ClusterUnavailable``); a broken connection after a
write was sent is ``Indeterminate`` unless the request is idempotent.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tetherlab.chaos.sim.node import ClientPeer, Proc, SimNode
from tetherlab.cluster import protocol as p
from tetherlab.cluster.node.service import Identity, authenticate

CONNECT_TIMEOUT_S = 1.0
REQUEST_TIMEOUT_S = 8.0  # per attempt (the node answers unavailable by PROPOSE_TIMEOUT_S = 5 s)
BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 0.5
REDIRECTS_MAX = 8


class RequestError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class ClusterUnavailable(Exception):
    """No quorum-backed leader answered before the deadline."""


class Indeterminate(Exception):
    """The connection broke after a write was sent: it may or may not have been applied."""


@dataclass(frozen=True)
class SimKey:
    """A public key the simulated clients present (deterministic: derived from a name)."""

    name: str
    line: str  # "ssh-ed25519 BASE64 comment"
    fingerprint: str  # OpenSSH SHA256 fingerprint, as the key registry stores it


def make_key(name: str) -> SimKey:
    private = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"tetherlab-sim:{name}".encode()).digest())
    raw = private.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    blob = base64.b64decode(raw.split()[1])
    fp = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return SimKey(name, f"{raw} {name}@sim", fp)


class Link:
    """One client connection to one node's process."""

    def __init__(self, client: SimClient, node: SimNode, proc: Proc, identity: Identity) -> None:
        self.client = client
        self.node = node
        self.proc = proc
        self.identity = identity
        self.peer = ClientPeer()
        self.waiting: dict[int, asyncio.Future[p.Message]] = {}
        self.tasks: dict[asyncio.Task[Any], None] = {}  # ordered: a seed replays
        self.open = True

    def broken(self, why: str) -> None:
        """The connection died (either end): fail what waits, stop serving it."""
        if not self.open:
            return
        self.open = False
        self.proc.links.pop(self, None)
        for t in list(self.tasks):
            t.cancel()
        world = self.client.world
        waiting, self.waiting = self.waiting, {}
        # The client learns of it one trip later (a reset on the wire).
        world.sim.after(world.client_delay(), _fail_all, waiting, why)


def _fail_all(waiting: dict[int, asyncio.Future[p.Message]], why: str) -> None:
    for fut in waiting.values():
        if not fut.done():
            fut.set_exception(ConnectionError(why))


class SimClient:
    def __init__(self, world: Any, developer: str, key: SimKey, rng: random.Random,
                 on_notify: Callable[[p.Message], None] | None = None) -> None:
        self.world = world
        self.developer = developer
        self.key = key
        self.rng = rng
        self.on_notify = on_notify or (lambda m: None)
        self.link: Link | None = None
        self._rr = rng.randrange(1000)
        self._ids = 0
        self.answered_key = ""  # the key of the connection that gave the last result

    # --- connections ----------------------------------------------------------------------------

    def _node_ids(self) -> list[str]:
        return self.world.client_node_ids()

    async def _open(self, node_id: str) -> Link:
        w = self.world
        fut: asyncio.Future[Link] = asyncio.get_running_loop().create_future()
        w.sim.after(w.client_delay(), self._arrive_connect, node_id, fut)
        return await asyncio.wait_for(fut, CONNECT_TIMEOUT_S)

    def _arrive_connect(self, node_id: str, fut: asyncio.Future[Link]) -> None:
        w = self.world
        node = w.nodes.get(node_id)
        proc = node.proc if node is not None else None
        if node is None or proc is None or not proc.alive:
            w.sim.after(w.client_delay(), _settle, fut, None, ConnectionRefusedError(f"{node_id} is down"))
            return
        if proc.paused:
            return  # the handshake stalls; the client's connect timeout ends it
        who = authenticate(proc.replica.store, self.developer, self.key.fingerprint)
        if isinstance(who, str):
            w.sim.after(w.client_delay(), _settle, fut, None, PermissionError(f"{node_id}: {who}"))
            return
        link = Link(self, node, proc, who)
        proc.links[link] = None
        w.sim.after(w.client_delay(), _settle, fut, link, None)

    async def _connect(self, prefer: str | None) -> Link:
        if self.link is not None and self.link.open and (prefer is None or self.link.node.id == prefer):
            return self.link
        self._close()
        ids = self._node_ids()
        node_id = prefer or ids[self._rr % len(ids)]
        self.link = await self._open(node_id)
        return self.link

    def _close(self) -> None:
        if self.link is not None:
            self.link.broken("closed by the client")
            self.link = None

    def _rotate(self) -> None:
        self._rr += 1
        self._close()

    def close(self) -> None:
        self._close()

    # --- requests ---------------------------------------------------------------------------------

    async def _call(self, link: Link, req: p.Request, timeout_s: float) -> p.Message:
        w = self.world
        fut: asyncio.Future[p.Message] = asyncio.get_running_loop().create_future()
        link.waiting[req.id] = fut
        if w.client_reset():
            w.sim.note(self.developer, f"connection to {link.node.id} reset")
            link.broken("connection reset")
        else:
            w.sim.after(w.client_delay(), _arrive_request, link, req)
        try:
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            link.waiting.pop(req.id, None)

    async def request(self, make: Callable[[int], p.Request], deadline_s: float, idempotent: bool) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_s
        backoff = BACKOFF_INITIAL_S
        prefer: str | None = None
        redirects = 0
        last = "no node answered"

        async def pause(wait_s: float) -> None:
            await asyncio.sleep(min(wait_s * self.rng.uniform(0.5, 1.5), max(0.0, deadline - loop.time())))

        while loop.time() < deadline:
            try:
                link = await self._connect(prefer)
            except (OSError, TimeoutError) as e:
                last = f"cannot reach a node: {e}"
                self._rotate()
                prefer = None
                await pause(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            self._ids += 1
            req = make(self._ids)
            try:
                reply = await self._call(link, req, min(REQUEST_TIMEOUT_S, max(0.1, deadline - loop.time())))
            except (ConnectionError, TimeoutError) as e:
                self._rotate()
                prefer = None
                if not idempotent:
                    raise Indeterminate(f"{link.node.id}: {e or type(e).__name__} after sending {req.type}") from None
                last = f"{link.node.id}: {e or type(e).__name__}"
                await pause(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            if isinstance(reply, p.Result):
                self.answered_key = link.identity.key_id
                return dict(reply.payload)
            if isinstance(reply, p.Redirect):
                redirects += 1
                if reply.leader_id in self.world.nodes and redirects <= REDIRECTS_MAX:
                    prefer = reply.leader_id
                    continue
                self._rotate()
                await pause(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            if isinstance(reply, p.Unavailable):
                last = f"{link.node.id}: {reply.reason}"
                self._rotate()
                prefer = None
                await pause(max(backoff, reply.retry_after_ms / 1000))
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            if isinstance(reply, p.Error):
                raise RequestError(reply.code, reply.message)
            raise RequestError("unexpected_reply", f"unexpected {reply.type}")
        raise ClusterUnavailable(f"no quorum-backed leader answered within {deadline_s:.1f} s ({last})")

    async def call(self, cls: type[p.Request], deadline_s: float, idempotent: bool, **fields: Any) -> dict[str, Any]:
        return await self.request(lambda rid: cls(id=rid, **fields), deadline_s, idempotent)


def _settle(fut: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    if fut.done():
        if exc is None and isinstance(value, Link):
            value.broken("the client gave up on this connection")
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


def _arrive_request(link: Link, req: p.Request) -> None:
    """The request reaches the node: its service handles it on the node's loop."""
    if not link.open or not link.proc.alive:
        return
    if link.proc.paused:
        link.node.world.defer_until_resumed(link.node, _arrive_request, link, req)
        return
    task = link.proc.spawn(_serve(link, req))
    link.tasks[task] = None
    task.add_done_callback(lambda t: link.tasks.pop(t, None))


async def _serve(link: Link, req: p.Request) -> None:
    reply = await link.proc.service.handle(link.identity, req, link.peer)
    w = link.client.world
    w.sim.after(w.client_delay(), _arrive_reply, link, req.id, reply)


def _arrive_reply(link: Link, rid: int, reply: p.Message) -> None:
    fut = link.waiting.get(rid)
    if fut is not None and not fut.done() and link.open:
        fut.set_result(reply)


class Connections:
    """The ``Connections`` of one node's service: its open client links."""

    def __init__(self, node: SimNode) -> None:
        self.node = node

    def _links(self) -> list[Link]:
        proc = self.node.proc
        return list(proc.links) if proc is not None else []

    def push(self, agent_id: str, msg: p.Message) -> int:
        sent = 0
        w = self.node.world
        for link in self._links():
            if agent_id in link.peer.agent_ids:
                w.sim.after(w.client_delay(), _notify, link, msg)
                sent += 1
        return sent

    def drop_key(self, key_id: str, reason: str) -> None:
        for link in self._links():
            if link.identity.key_id == key_id:
                self.node.sim.note(self.node.id, f"drop connection of revoked key {key_id[:16]}")
                link.broken(reason)


def _notify(link: Link, msg: p.Message) -> None:
    if link.open:
        link.client.on_notify(msg)
