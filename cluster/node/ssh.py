"""The SSH endpoint of a node: public-key authentication against the replicated key
registry, and the ``tetherlab`` subsystem speaking the shim protocol (shim/protocol.py).

This is a thin adapter: bytes from the channel go into a ``ServerConnection``; each request
event is handed to :class:`tetherlab.cluster.node.service.Service`; replies go back as bytes.

Bounds against one client starving the rest (docs/hardening.md): new connections are accepted
at most ``[limits].ssh_accepts_per_s`` a second (:class:`_PacedListener`); at most
``ssh_connections_max`` connections (more are closed at once) and
``ssh_unauthenticated_max`` that have not authenticated (a new one closes the oldest); a channel
whose client does not read its replies is not read either (backpressure: its unsent replies
stay under :data:`CHANNEL_WRITE_HIGH_BYTES`), and is closed after :data:`STALLED_CHANNEL_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from tetherlab.cluster import protocol as p
from tetherlab.cluster.core.config import Address, LoadLimits
from tetherlab.cluster.node.keys import fingerprint
from tetherlab.cluster.node.metrics import NodeMetrics
from tetherlab.cluster.node.quotas import TokenBucket
from tetherlab.cluster.node.service import Identity, Peer, Service, authenticate
from tetherlab.cluster.replica.store import Store

log = logging.getLogger("tetherlab.ssh")

SUBSYSTEM = "tetherlab"
READ_CHUNK_BYTES = 64 * 1024
SSH_CONNECTIONS_MAX = LoadLimits.ssh_connections_max  # default; beyond it new connections are closed at once
CHANNEL_WRITE_HIGH_BYTES = 256 * 1024  # unsent replies over this: stop reading the channel
CHANNEL_WRITE_LOW_BYTES = 64 * 1024  # ... until they are down to this
STALLED_CHANNEL_S = 60.0  # a client that reads none of its replies for this long is cut off
LISTEN_BACKLOG = 256
LOGIN_TIMEOUT_S = 15.0
KEEPALIVE_INTERVAL_S = 5.0  # a shim behind a cut cable is noticed within interval x count
KEEPALIVE_COUNT_MAX = 3
DRAIN_TIMEOUT_S = 15.0


@dataclass(eq=False)  # kept in sets: identity, not value, equality
class _ConnInfo:
    identity: Identity | None = None
    channels: set[Channel] = field(default_factory=set)
    conn: asyncssh.SSHServerConnection | None = None
    opened_at: float = 0.0  # monotonic
    authenticated: bool = False


class _Server(asyncssh.SSHServer):
    def __init__(self, endpoint: SshEndpoint) -> None:
        self.ep = endpoint
        self.info = _ConnInfo()

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.info.conn = conn
        self.info.opened_at = time.monotonic()
        self.ep.admit(self.info)

    def connection_lost(self, exc: Exception | None) -> None:
        self.ep.forget(self.info)

    def auth_completed(self) -> None:
        self.info.authenticated = True
        self.ep.unauthenticated.discard(self.info)
        self.ep.metrics.ssh_unauthenticated.set(len(self.ep.unauthenticated))

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # This node's registry may lag (a follower, or a new leader catching up): every request a
        # quorum-backed leader serves checks the key again (Service._check_key).
        who = authenticate(self.ep.store, username, fingerprint(key))
        if isinstance(who, str):
            self.ep.auth_failure(who)
            return False
        self.info.identity = who
        return True


class Channel(Peer):
    """One ``tetherlab`` subsystem session: a protocol connection and its in-flight requests."""

    def __init__(self, endpoint: SshEndpoint, process: asyncssh.SSHServerProcess, info: _ConnInfo) -> None:
        super().__init__()
        self.ep = endpoint
        self.process = process
        self.info = info
        self.proto = p.ServerConnection()
        self.tasks: set[asyncio.Task[None]] = set()
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_scheduled = False

    def write(self, msg: p.Message | p.ProtocolViolation) -> None:
        if self.proto.state is p.State.CLOSED:
            return
        try:
            data = self.proto.send(msg)
        except p.LocalProtocolError as e:
            log.warning("not sending %s: %s", type(msg).__name__, e)
            return
        if isinstance(msg, p.ProtocolViolation | p.Error):
            self.ep.metrics.protocol_errors.labels(msg.code).inc()
        # Replies finished in one loop iteration go out in one channel write.
        self._out.append(data)
        self._out_bytes += len(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        data, self._out, self._out_bytes = b"".join(self._out), [], 0
        if data:
            with contextlib.suppress(Exception):
                self.process.stdout.write(data)

    def _ssh_buffered(self) -> int:
        return int(self.process.channel.get_write_buffer_size())

    def _unsent_bytes(self) -> int:
        return self._ssh_buffered() + self._out_bytes

    async def _backpressure(self) -> bool:
        """Stop reading while the client leaves its replies unread; False: it stalled too long."""
        if self._unsent_bytes() <= CHANNEL_WRITE_HIGH_BYTES:
            return True
        self._flush()
        self.ep.metrics.ssh_backpressure.inc()
        try:
            async with asyncio.timeout(STALLED_CHANNEL_S):
                await self.process.stdout.drain()
        except TimeoutError:
            log.warning("closing an SSH channel of %s: its replies went unread for %.0f s",
                        self.info.identity.developer if self.info.identity else "?", STALLED_CHANNEL_S)
            self.ep.metrics.ssh_connections_closed.labels("stalled_channel").inc()
            return False
        return True

    async def run(self) -> None:
        identity = self.info.identity
        assert identity is not None
        service = self.ep.service
        with contextlib.suppress(Exception):
            self.process.channel.set_write_buffer_limits(CHANNEL_WRITE_HIGH_BYTES, CHANNEL_WRITE_LOW_BYTES)
        try:
            while True:
                if not await self._backpressure():
                    return
                data = await self.process.stdin.read(READ_CHUNK_BYTES)
                self.proto.receive_data(data)
                # asyncssh's buffer grows only when _flush writes to it, after this loop step (or
                # in a pause below): read once here, not once per event.
                ssh_buffered = self._ssh_buffered()
                # One event at a time: a pipelined request must be parsed after hello_ok is sent.
                while (event := self.proto.next_event()) is not p.NEED_DATA:
                    # Checked per event: one chunk of tiny bad lines answers with far more bytes.
                    if ssh_buffered + self._out_bytes > CHANNEL_WRITE_HIGH_BYTES:
                        if not await self._backpressure():
                            return
                        ssh_buffered = self._ssh_buffered()
                    if isinstance(event, p.ConnectionClosed):
                        await self._drain()
                        return
                    if isinstance(event, p.ProtocolViolation):
                        self.write(event)
                    elif isinstance(event, p.Hello):
                        self.write(self.proto.answer_hello(
                            event, node_id=self.ep.node_id, server_version=self.ep.version))
                    elif isinstance(event, p.Request):
                        task = asyncio.get_running_loop().create_task(self._handle(service, identity, event))
                        self.tasks.add(task)
                        task.add_done_callback(self.tasks.discard)
                if not data:
                    await self._drain()
                    return
        except (asyncssh.BreakReceived, asyncssh.SignalReceived, asyncssh.TerminalSizeChanged):
            return
        except (ConnectionError, asyncssh.Error):
            return
        finally:
            for t in list(self.tasks):
                t.cancel()

    async def _drain(self) -> None:
        """The peer sent EOF: answer what it asked before closing (bounded by the requests' own
        timeouts)."""
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=DRAIN_TIMEOUT_S)

    async def _handle(self, service: Service, identity: Identity, req: p.Request) -> None:
        reply = await service.handle(identity, req, self)
        self.write(reply)


class _PacedListener:
    """The SSH port, accepted here at most ``rate_per_s`` a second and handed to asyncssh.

    asyncssh's ``tunnel`` option takes any object with ``create_server(factory, host, port)``
    and serves the connections that object hands the factory's protocols: that lets this node
    own the accept loop, so a connection flood waits (and overflows) in the kernel's queue
    instead of costing an SSH connection's setup and teardown each."""

    def __init__(self, rate_per_s: float) -> None:
        self.rate_per_s = rate_per_s
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    async def create_server(self, factory: Callable[[str, int], asyncio.BaseProtocol], host: str,
                            port: int) -> _PacedListener:
        loop = asyncio.get_running_loop()
        family, _, _, _, addr = (await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                        flags=socket.AI_PASSIVE))[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._task = loop.create_task(self._accept(sock, factory, host, port))
        return self

    async def _accept(self, lsock: socket.socket, factory: Callable[[str, int], asyncio.BaseProtocol],
                      host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        bucket = TokenBucket(self.rate_per_s, max(1, int(self.rate_per_s // 4)), time.monotonic())
        while True:
            try:
                sock, _ = await loop.sock_accept(lsock)
            except OSError as e:  # out of descriptors, for one: wait, do not spin
                log.warning("SSH accept failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            while not bucket.take(time.monotonic()):
                await asyncio.sleep(1.0 / self.rate_per_s)
            try:
                sock.setblocking(False)
                await loop.connect_accepted_socket(lambda: factory(host, port), sock)
            except OSError:
                sock.close()

    def get_port(self) -> int:
        return int(self._sock.getsockname()[1]) if self._sock is not None else 0

    def get_addresses(self) -> list[tuple[str, int]]:
        return [self._sock.getsockname()] if self._sock is not None else []

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._sock is not None:
            self._sock.close()

    async def wait_closed(self) -> None:
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class SshEndpoint:
    def __init__(self, address: Address, host_key: Path | None, node_id: str, version: str, store: Store,
                 metrics: NodeMetrics, limits: LoadLimits | None = None) -> None:
        self.address = address
        self.limits = limits or LoadLimits()
        self.unauthenticated: set[_ConnInfo] = set()
        self.host_key = host_key
        self.node_id = node_id
        self.version = version
        self.store = store  # the replicated key registry, read locally
        self.metrics = metrics
        self.service: Service  # set by the node before start()
        self.connections: set[_ConnInfo] = set()
        self._server: asyncssh.SSHAcceptor | None = None

    def auth_failure(self, reason: str) -> None:
        self.metrics.ssh_auth_failures.labels(reason).inc()

    def admit(self, info: _ConnInfo) -> None:
        """A new connection: over the connection cap it is closed at once; over the cap of those
        not yet authenticated, the oldest such one is closed to make room (a flood of half-open
        connections cannot lock a shim out for the login timeout)."""
        loop = asyncio.get_running_loop()
        assert info.conn is not None
        if len(self.connections) >= self.limits.ssh_connections_max:
            self.metrics.ssh_connections_closed.labels("connections_max").inc()
            loop.call_soon(info.conn.abort)  # after asyncssh has finished setting it up
            return
        if len(self.unauthenticated) >= self.limits.ssh_unauthenticated_max:
            oldest = min(self.unauthenticated, key=lambda i: i.opened_at)
            self.unauthenticated.discard(oldest)
            self.metrics.ssh_connections_closed.labels("unauthenticated_max").inc()
            if oldest.conn is not None:
                loop.call_soon(oldest.conn.abort)
        self.connections.add(info)
        self.unauthenticated.add(info)
        self.metrics.ssh_connections.set(len(self.connections))
        self.metrics.ssh_unauthenticated.set(len(self.unauthenticated))

    def forget(self, info: _ConnInfo) -> None:
        self.connections.discard(info)
        self.unauthenticated.discard(info)
        self.metrics.ssh_connections.set(len(self.connections))
        self.metrics.ssh_unauthenticated.set(len(self.unauthenticated))

    async def start(self) -> None:
        if self.host_key is None:
            log.warning("no ssh_host_key configured: SSH endpoint disabled")
            return
        host_key = asyncssh.read_private_key(str(self.host_key))
        # asyncssh logs four INFO lines per connection: a connection flood would become a log
        # (and disk) flood. The node's own metrics count what matters (docs/hardening.md).
        logging.getLogger("asyncssh").setLevel(logging.WARNING)
        self._server = await asyncssh.create_server(
            lambda: _Server(self),
            self.address.host,
            self.address.port,
            server_host_keys=[host_key],
            process_factory=self._process,
            encoding=None,
            allow_scp=False,
            agent_forwarding=False,
            x11_forwarding=False,
            login_timeout=LOGIN_TIMEOUT_S,
            keepalive_interval=KEEPALIVE_INTERVAL_S,
            keepalive_count_max=KEEPALIVE_COUNT_MAX,
            tunnel=_PacedListener(self.limits.ssh_accepts_per_s),
        )

    async def _process(self, process: asyncssh.SSHServerProcess) -> None:
        conn = process.channel.get_connection()
        info = next((i for i in self.connections if i.conn is conn), None)
        if process.subsystem != SUBSYSTEM or info is None or info.identity is None:
            process.stderr.write(f"tetherlab: only the '{SUBSYSTEM}' subsystem is served here "
                                 f"(ssh -s HOST {SUBSYSTEM})\n".encode())
            process.exit(1)
            return
        ch = Channel(self, process, info)
        info.channels.add(ch)
        try:
            await ch.run()
        finally:
            info.channels.discard(ch)
            with contextlib.suppress(Exception):
                process.exit(0)

    def drop_key(self, key_id: str, reason: str) -> None:
        """A revoked key's connections end now (on every node, as each applies the revoke)."""
        for info in list(self.connections):
            if info.identity is not None and info.identity.key_id == key_id and info.conn is not None:
                log.info("closing SSH connection of revoked key %s", key_id)
                for ch in list(info.channels):
                    for agent_id in sorted(ch.agent_ids):
                        ch.write(p.Revoked(agent_id=agent_id, reason=reason))
                info.conn.close()

    def channels(self) -> list[Channel]:
        return [ch for info in self.connections for ch in info.channels]

    def push(self, agent_id: str, msg: p.Message) -> int:
        sent = 0
        for ch in self.channels():
            if agent_id in ch.agent_ids:
                ch.write(msg)
                sent += 1
        return sent

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        for info in list(self.connections):
            if info.conn is not None:
                info.conn.close()
