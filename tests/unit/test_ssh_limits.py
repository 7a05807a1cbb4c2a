"""The SSH endpoint's bounds, in-process over the in-memory replica with real asyncssh on
loopback: the connection caps, and backpressure on a client that does not read its replies."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from tetherlab.cluster.core import statemachine as sm
from tetherlab.cluster.core.config import Address, LoadLimits
from tetherlab.cluster.node.clock import SystemClock
from tetherlab.cluster.node.fake import FakeReplica
from tetherlab.cluster.node.keys import KEYS_NS, make_registered
from tetherlab.cluster.node.metrics import NodeMetrics
from tetherlab.cluster.node.replica import encode_command
from tetherlab.cluster.node.service import Service, ServiceSettings
from tetherlab.cluster.node.ssh import CHANNEL_WRITE_HIGH_BYTES, READ_CHUNK_BYTES, SshEndpoint


class Rig:
    def __init__(self, tmp: Path, limits: LoadLimits) -> None:
        self.replica = FakeReplica("n1")
        self.metrics = NodeMetrics()
        host = asyncssh.generate_private_key("ssh-ed25519")
        (tmp / "host").write_bytes(host.export_private_key())
        self.key = asyncssh.generate_private_key("ssh-ed25519")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.ep = SshEndpoint(Address("127.0.0.1", self.port), tmp / "host", "n1", "test", self.replica.store,
                              self.metrics, limits)
        self.ep.service = Service(self.replica, SystemClock(), ServiceSettings("n1", "test", limits=limits),
                                  self.metrics, self.ep)

    async def start(self) -> None:
        rk = make_registered("alice", "developer", self.key.export_public_key().decode())
        await self.replica.propose(encode_command(sm.Put(KEYS_NS, rk.id, rk.encode())))
        await self.ep.start()

    async def connect(self) -> asyncssh.SSHClientConnection:
        return await asyncio.wait_for(asyncssh.connect(
            "127.0.0.1", self.port, username="alice", client_keys=[self.key], known_hosts=None, agent_path=None,
            password=None, kbdint_auth=False, gss_auth=False), 10)

    async def channel(self, conn: asyncssh.SSHClientConnection, **kw: Any) -> asyncssh.SSHClientProcess:
        proc = await conn.create_process(subsystem="tetherlab", encoding=None, **kw)
        proc.stdin.write(b'{"type":"hello","id":0,"versions":[1],"client_name":"t","client_version":"1"}\n')
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
        assert b"hello_ok" in line
        return proc

    def closed(self, reason: str) -> float:
        return self.metrics.registry.get_sample_value("tetherlab_ssh_connections_closed_by_limit_total",
                                                      {"reason": reason}) or 0.0


def run(tmp: Path, body: Callable[[Rig], Awaitable[None]], **limits: Any) -> None:
    async def main() -> None:
        rig = Rig(tmp, LoadLimits(**limits))
        await rig.start()
        try:
            await asyncio.wait_for(body(rig), 60)
        finally:
            await rig.ep.stop()

    asyncio.run(main())


async def _ping(rig: Rig) -> bool:
    conn = await rig.connect()
    try:
        proc = await rig.channel(conn)
        proc.stdin.write(b'{"type":"ping","id":1}\n')
        return b'"pong"' in await asyncio.wait_for(proc.stdout.readline(), 10)
    finally:
        conn.close()


async def _eof_within(reader: asyncio.StreamReader, timeout_s: float) -> bool:
    try:
        while await asyncio.wait_for(reader.read(4096), timeout_s):
            pass
        return True
    except TimeoutError:
        return False
    except ConnectionError:
        return True


def test_half_open_connections_over_the_cap_make_room_for_a_real_client(tmp_path: Path) -> None:
    async def body(r: Rig) -> None:
        half = [await asyncio.open_connection("127.0.0.1", r.port) for _ in range(3)]  # never speak SSH
        await asyncio.sleep(0.2)
        assert await _ping(r)  # the new connection closed the oldest half-open one
        assert await _eof_within(half[0][0], 5.0)
        assert not await _eof_within(half[2][0], 0.3)
        for _, w in half:
            w.close()
        assert r.closed("unauthenticated_max") >= 1
    run(tmp_path, body, ssh_unauthenticated_max=3, ssh_connections_max=10)


def test_connections_over_the_cap_are_closed_at_once(tmp_path: Path) -> None:
    async def body(r: Rig) -> None:
        held = [await r.connect() for _ in range(2)]
        with pytest.raises((asyncssh.Error, OSError, asyncio.IncompleteReadError)):
            await r.connect()
        assert r.closed("connections_max") == 1
        held[0].close()
        await held[0].wait_closed()
        await asyncio.sleep(0.1)
        assert await _ping(r)  # room again
        held[1].close()
    run(tmp_path, body, ssh_unauthenticated_max=2, ssh_connections_max=2)


def test_a_channel_whose_replies_are_not_read_is_not_read_either(tmp_path: Path) -> None:
    """2-byte bad lines answered by ~120-byte errors: a client that never reads would make the
    node buffer megabytes of replies; with backpressure the node stops reading it instead."""
    lines = 40_000

    async def body(r: Rig) -> None:
        conn = await r.connect()
        proc = await r.channel(conn, window=64 * 1024)  # the client takes at most 64 KiB unread
        proc.stdin.write(b"x\n" * lines)
        await asyncio.sleep(1.0)
        (ch,) = r.ep.channels()
        answered = r.metrics.registry.get_sample_value("tetherlab_protocol_errors_total", {"code": "bad_json"})
        assert ch._unsent_bytes() <= CHANNEL_WRITE_HIGH_BYTES + 4096
        assert answered is not None and answered < lines / 2  # it stopped reading the client
        assert r.metrics.registry.get_sample_value("tetherlab_ssh_backpressure_pauses_total") >= 1
        # Once the client reads, everything is answered.
        got = 0
        while got < lines:
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            assert b"bad_json" in line
            got += 1
        conn.close()

    run(tmp_path, body, requests_per_s_per_connection=1e6, request_burst_per_connection=1_000_000)
    assert lines * 2 > READ_CHUNK_BYTES  # the lines did not fit in one read


@pytest.fixture(autouse=True)
def _quiet_asyncssh() -> None:
    asyncssh.set_log_level("WARNING")
    with contextlib.suppress(Exception):
        asyncssh.set_debug_level(1)


def test_new_connections_are_accepted_at_a_bounded_rate(tmp_path: Path) -> None:
    async def body(r: Rig) -> None:
        held = [await asyncio.open_connection("127.0.0.1", r.port) for _ in range(20)]  # the kernel accepts all
        t0 = time.monotonic()
        await asyncio.sleep(0.5)
        elapsed = time.monotonic() - t0
        assert len(r.ep.connections) <= 2 + 10 * (elapsed + 0.3), len(r.ep.connections)
        for _, w in held:
            w.close()
        assert await _ping(r)
    run(tmp_path, body, ssh_accepts_per_s=10.0)
