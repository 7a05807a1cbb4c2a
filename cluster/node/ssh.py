"""The SSH endpoint of a node: public-key authentication against the replicated key
registry, and the ``tetherlab`` subsystem speaking the shim protocol (shim/protocol.py).

This is a thin adapter: bytes from the channel go into a ``ServerConnection``; each request
event is handed to :class:`tetherlab.cluster.node.service.Service`; replies go back as bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from tetherlab.cluster import protocol as p
from tetherlab.cluster.core.config import Address
from tetherlab.cluster.node.keys import KEYS_NS, RegisteredKey, fingerprint
from tetherlab.cluster.node.metrics import NodeMetrics
from tetherlab.cluster.node.service import Identity, Peer, Service
from tetherlab.cluster.replica.store import Store

log = logging.getLogger("tetherlab.ssh")

SUBSYSTEM = "tetherlab"
READ_CHUNK_BYTES = 64 * 1024
SSH_CONNECTIONS_MAX = 4096  # beyond this, new connections are refused before authentication
LOGIN_TIMEOUT_S = 15.0
KEEPALIVE_INTERVAL_S = 5.0  # a shim behind a cut cable is noticed within interval x count
KEEPALIVE_COUNT_MAX = 3
DRAIN_TIMEOUT_S = 15.0


@dataclass(eq=False)  # kept in sets: identity, not value, equality
class _ConnInfo:
    identity: Identity | None = None
    channels: set[Channel] = field(default_factory=set)
    conn: asyncssh.SSHServerConnection | None = None


class _Server(asyncssh.SSHServer):
    def __init__(self, endpoint: SshEndpoint) -> None:
        self.ep = endpoint
        self.info = _ConnInfo()

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.info.conn = conn
        self.ep.connections.add(self.info)
        self.ep.metrics.ssh_connections.set(len(self.ep.connections))

    def connection_lost(self, exc: Exception | None) -> None:
        self.ep.connections.discard(self.info)
        self.ep.metrics.ssh_connections.set(len(self.ep.connections))

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
        fp = fingerprint(key)
        rec = self.ep.store.get(KEYS_NS, fp)
        if rec is None:
            self.ep.auth_failure("unknown_key")
            return False
        rk = RegisteredKey.decode(rec.value)
        if rk.developer != username:
            # The SSH user name is the developer the key belongs to (like a git host's user).
            self.ep.auth_failure("wrong_user")
            return False
        self.info.identity = Identity(rk.developer, rk.role, rk.id)
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
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        data, self._out = b"".join(self._out), []
        if data:
            with contextlib.suppress(Exception):
                self.process.stdout.write(data)

    async def run(self) -> None:
        identity = self.info.identity
        assert identity is not None
        service = self.ep.service
        try:
            while True:
                data = await self.process.stdin.read(READ_CHUNK_BYTES)
                self.proto.receive_data(data)
                # One event at a time: a pipelined request must be parsed after hello_ok is sent.
                while (event := self.proto.next_event()) is not p.NEED_DATA:
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


class SshEndpoint:
    def __init__(self, address: Address, host_key: Path | None, node_id: str, version: str, store: Store,
                 metrics: NodeMetrics) -> None:
        self.address = address
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

    async def start(self) -> None:
        if self.host_key is None:
            log.warning("no ssh_host_key configured: SSH endpoint disabled")
            return
        host_key = asyncssh.read_private_key(str(self.host_key))
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
            reuse_address=True,
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
