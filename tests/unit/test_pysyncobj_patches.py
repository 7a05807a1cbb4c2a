"""Every change Tetherlab makes to pysyncobj, each proven by a test that fails without it
(``pysyncobj_patches.without(name)`` puts pysyncobj's own behaviour back for the block)."""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time
from typing import Any

import pysyncobj.syncobj as syncobj_mod
import pysyncobj.transport as transport_mod
import pytest
from cryptography.fernet import Fernet
from pysyncobj.poller import createPoller
from pysyncobj.tcp_connection import CONNECTION_STATE, TcpConnection
from pysyncobj.tcp_server import TcpServer
from pysyncobj.transport import TCPTransport, Transport

from tetherlab.cluster.replica import pysyncobj_patches as patches


@pytest.fixture(autouse=True)
def _installed() -> None:
    patches.install()


class _FakeConn:
    """The attributes of pysyncobj's TcpConnection that parsing and socket set-up touch."""

    def __init__(self, buffer: bytes = b"", sock: socket.socket | None = None) -> None:
        self._TcpConnection__readBuffer = buffer
        self._TcpConnection__socket = sock
        self._TcpConnection__keepalive = (1, 1, 3)
        self.encryptor = None
        self.recvRandKey = None
        self.disconnected = False

    def disconnect(self) -> None:
        self.disconnected = True


def _parse(conn: _FakeConn) -> Any:
    return TcpConnection._TcpConnection__processParseMessage(conn)  # type: ignore[attr-defined]


def test_install_refuses_another_pysyncobj_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(patches, "VERSION", "0.3.18")
    with pytest.raises(patches.PatchVersionError, match=r"0\.3\.17 exactly"):
        patches.install()


def test_every_patch_is_installed_and_named() -> None:
    assert set(patches.installed()) == {p.name for p in patches.PATCHES}
    assert all(p.why for p in patches.PATCHES)


def test_journal_factory_hands_pysyncobj_the_registered_journal() -> None:
    sentinel = object()
    key = patches.register_journal("lmdb:/nowhere/test-journal", sentinel)
    assert syncobj_mod.createJournal(key) is sentinel
    patches.register_journal(key, sentinel)
    patched = syncobj_mod.createJournal
    with patches.without("journal_factory"):
        assert syncobj_mod.createJournal is not patched
        assert syncobj_mod.createJournal(None) is not sentinel  # pysyncobj's memory journal


def test_frame_bound_drops_a_connection_announcing_a_huge_frame() -> None:
    huge = struct.pack("i", 2**31 - 1) + b"x" * 16
    conn = _FakeConn(huge)
    assert _parse(conn) is None and conn.disconnected
    with patches.without("frame_bound"):
        conn = _FakeConn(huge)
        assert _parse(conn) is None and not conn.disconnected  # pysyncobj waits for 2 GiB to arrive


def test_frame_bound_still_waits_for_a_plausible_frame() -> None:
    conn = _FakeConn(struct.pack("i", 1000) + b"x" * 10)
    assert _parse(conn) is None and not conn.disconnected


def test_socket_timeouts_make_the_kernel_give_up_fast() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        TcpConnection.setSockoptKeepalive(_FakeConn(sock=s))
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == patches.RAFT_TCP_USER_TIMEOUT_MS
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT) == patches.RAFT_TCP_SYN_RETRIES
    with patches.without("socket_timeouts"), socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        TcpConnection.setSockoptKeepalive(_FakeConn(sock=s))
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0


# --- hostile load: bounded_read, accept_limits, handshake_deadline, accept_queue --------------


class _StreamSocket:
    """A socket whose peer has sent ``data``: reads return it in chunks, then EAGAIN."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.consumed = 0
        self.closed = False

    def _take(self, n: int) -> bytes:
        if self.consumed >= len(self.data):
            raise BlockingIOError(errno.EAGAIN, "no data")
        chunk = self.data[self.consumed:self.consumed + n]
        self.consumed += len(chunk)
        return bytes(chunk)

    def recv(self, n: int) -> bytes:
        return self._take(n)

    def recv_into(self, buf: memoryview, nbytes: int = 0) -> int:
        chunk = self._take(nbytes or len(buf))
        buf[:len(chunk)] = chunk
        return len(chunk)

    def getsockopt(self, *args: Any) -> int:
        return 0

    def close(self) -> None:
        self.closed = True


def _conn_over(data: bytes, encrypted: bool) -> tuple[TcpConnection, _StreamSocket]:
    """A pysyncobj connection in the CONNECTED state reading from a fake socket."""
    conn = TcpConnection(poller=createPoller("auto"))
    sock = _StreamSocket(data)
    conn._TcpConnection__socket = sock  # type: ignore[attr-defined]
    conn._TcpConnection__state = CONNECTION_STATE.CONNECTED  # type: ignore[attr-defined]
    conn.encryptor = Fernet(Fernet.generate_key()) if encrypted else None
    return conn, sock


def _read(conn: TcpConnection) -> None:
    conn._TcpConnection__tryReadBuffer()  # type: ignore[attr-defined]


def _buffered(conn: TcpConnection) -> int:
    return len(conn._TcpConnection__readBuffer)  # type: ignore[attr-defined]


def test_bounded_read_drops_a_stranger_before_buffering_its_frame() -> None:
    # A plausible 1 MiB frame from a connection that has not authenticated: nothing past the
    # header is read.
    flood = struct.pack("i", 1 << 20) + os.urandom(2 << 20)
    conn, sock = _conn_over(flood, encrypted=True)
    _read(conn)
    assert conn.state == CONNECTION_STATE.DISCONNECTED and sock.consumed == 4 and _buffered(conn) == 0
    with patches.without("bounded_read"):
        conn, sock = _conn_over(flood, encrypted=True)
        _read(conn)
        # pysyncobj reads everything the socket has into its buffer before looking at a frame.
        assert conn.state == CONNECTION_STATE.CONNECTED and _buffered(conn) == len(flood)


def test_bounded_read_reads_at_most_a_slice_per_event() -> None:
    frame = os.urandom(64 * 1024)
    stream = (struct.pack("i", len(frame)) + frame) * 128  # 8 MiB of plausible frames from a peer
    conn, sock = _conn_over(stream, encrypted=False)
    _read(conn)
    assert conn.state == CONNECTION_STATE.CONNECTED
    assert 0 < sock.consumed <= patches.RAFT_READ_SLICE_BYTES + 4 * 17
    assert _buffered(conn) % (len(frame) + 4) == 0  # whole frames only
    with patches.without("bounded_read"):
        conn, sock = _conn_over(stream, encrypted=False)
        _read(conn)
        assert sock.consumed == len(stream)  # one event drains the socket, however much arrives


def test_bounded_read_delivers_a_strangers_first_small_frame_alone() -> None:
    # The first frames of a handshake are read one per event: the bound can only rise once a
    # frame has passed pysyncobj's random-key check.
    small = struct.pack("i", 100) + b"x" * 100
    conn, sock = _conn_over(small * 3, encrypted=True)
    _read(conn)
    assert conn.state == CONNECTION_STATE.CONNECTED and sock.consumed == 104 and _buffered(conn) == 104
    assert not patches.is_authenticated(conn)


def test_bounded_read_lets_peers_that_authenticated_send_large_frames() -> None:
    """Two real pysyncobj nodes with a password: the handshake passes one frame per event, and
    a 48 KiB command (a frame far over the unauthenticated bound) replicates. (Not larger: one
    entry of 64 KiB or more goes through pysyncobj's chunked transmission, whose last-chunk test
    compares against the command's length instead of the pickled entry's.)"""
    from pysyncobj import SyncObj, SyncObjConf, replicated

    class Box(SyncObj):  # type: ignore[misc]
        def __init__(self, me: str, other: str) -> None:
            conf = SyncObjConf(password="s3cret-for-tests", autoTick=False, connectionRetryTime=0.1,
                               raftMinTimeout=0.3, raftMaxTimeout=0.6, appendEntriesPeriod=0.05)
            super().__init__(me, [other], conf)
            self.value = b""

        @replicated
        def put(self, value: bytes) -> None:
            self.value = value

    ports = _free_ports(2)
    a = Box(f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}")
    b = Box(f"127.0.0.1:{ports[1]}", f"127.0.0.1:{ports[0]}")
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and a._getLeader() is None:
            a.doTick(0.01)
            b.doTick(0.01)
        leader = a if a._isLeader() else b
        big = os.urandom(48 * 1024)
        leader.put(big)
        while time.monotonic() < deadline and not (a.value == big and b.value == big):
            a.doTick(0.01)
            b.doTick(0.01)
        assert a.value == big and b.value == big
    finally:
        a.destroy()
        b.destroy()
        a._doDestroy()
        b._doDestroy()


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class _Listener:
    """A loopback listening socket whose accepted connections become pysyncobj connections."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.clients: list[socket.socket] = []
        self.poller = createPoller("auto")

    def connection(self, source: str = "127.0.0.1") -> TcpConnection:
        c = socket.socket()
        c.bind((source, 0))
        c.connect(("127.0.0.1", self.port))
        self.clients.append(c)
        s, _ = self.sock.accept()
        s.setblocking(False)
        return TcpConnection(poller=self.poller, socket=s)

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.sock.close()


def _bare_transport() -> Any:
    """A TCPTransport with just the state incoming connections touch (no SyncObj, no server)."""
    t = TCPTransport.__new__(TCPTransport)
    Transport.__init__(t, None, None, [])
    t._syncObj = type("S", (), {"encryptor": None})()
    t._connections, t._unknownConnections = {}, set()
    t._nodes, t._readonlyNodes, t._nodeAddrToNode = set(), set(), {}
    t._ready, t._selfIsReadonlyNode, t._preventConnectNodes = True, False, set()
    return t


def _accept_all(t: Any, conns: list[TcpConnection]) -> None:
    for c in conns:
        t._onNewIncomingConnection(c)


def test_accept_limits_cap_unauthenticated_connections_per_source_and_node(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(patches, "RAFT_UNAUTH_CONNECTIONS_PER_SOURCE_MAX", 4)
    monkeypatch.setattr(patches, "RAFT_UNAUTH_CONNECTIONS_MAX", 6)
    lst = _Listener()
    try:
        t = _bare_transport()
        first = [lst.connection("127.0.0.1") for _ in range(5)]
        _accept_all(t, first)
        assert len(t._unknownConnections) == 4 and first[0] not in t._unknownConnections  # oldest closed
        assert first[0].state == CONNECTION_STATE.DISCONNECTED
        _accept_all(t, [lst.connection("127.0.0.2") for _ in range(3)])
        assert len(t._unknownConnections) == 6  # the node's cap
        with patches.without("accept_limits"):
            t = _bare_transport()
            _accept_all(t, [lst.connection("127.0.0.1") for _ in range(9)])
            assert len(t._unknownConnections) == 9
    finally:
        lst.close()


def test_handshake_deadline_closes_a_connection_that_never_authenticates(
        monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(transport_mod, "monotonicTime", lambda: now[0])
    lst = _Listener()
    try:
        t = _bare_transport()
        idle = lst.connection()
        t._onNewIncomingConnection(idle)
        t._onTick()
        now[0] += patches.RAFT_HANDSHAKE_DEADLINE_S / 2
        t._onTick()
        assert idle in t._unknownConnections
        now[0] += patches.RAFT_HANDSHAKE_DEADLINE_S
        t._onTick()
        assert idle not in t._unknownConnections and idle.state == CONNECTION_STATE.DISCONNECTED
        with patches.without("handshake_deadline"):
            t = _bare_transport()
            idle = lst.connection()
            t._onNewIncomingConnection(idle)
            for _ in range(3):
                t._onTick()
                now[0] += 100.0
            assert idle in t._unknownConnections and idle.state == CONNECTION_STATE.CONNECTED
    finally:
        lst.close()


def _listening_server() -> tuple[TcpServer, list[TcpConnection], Any]:
    poller = createPoller("auto")
    accepted: list[TcpConnection] = []
    server = TcpServer(poller, "127.0.0.1", 0, onNewConnection=accepted.append)
    server.bind()
    return server, accepted, poller


def _connected_within(server: TcpServer, n: int, wait_s: float) -> tuple[int, list[socket.socket]]:
    port = server._TcpServer__socket.getsockname()[1]  # type: ignore[attr-defined]
    clients = []
    for _ in range(n):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        clients.append(c)
    deadline = time.monotonic() + wait_s
    done: set[int] = set()
    while time.monotonic() < deadline and len(done) < n:
        _, writable, _ = select.select([], [c for c in clients if c.fileno() not in done], [], 0.05)
        done |= {c.fileno() for c in writable if c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0}
    return len(done), clients


def test_accept_queue_holds_a_burst_of_connections_and_accepts_them_in_batches_at_a_pace() -> None:
    server, accepted, poller = _listening_server()
    try:
        connected, clients = _connected_within(server, 40, 0.5)
        assert connected == 40  # nobody was accepted yet: the backlog held them all
        poller.poll(0.5)
        assert len(accepted) == patches.RAFT_ACCEPTS_PER_EVENT
        for _ in range(100):  # accept what the pace allows until the server stops listening
            if getattr(server, "_tl_paused", False):
                break
            poller.poll(0.01)
        assert server._tl_paused  # type: ignore[attr-defined]
        paused_at = len(accepted)
        assert paused_at < 40
        poller.poll(0.05)
        assert len(accepted) == paused_at  # no accept while paused (and no busy poll either)
        time.sleep(0.1)  # room for 20 more at 200/s
        patches.resume_accepting(server)
        poller.poll(0.5)
        assert len(accepted) > paused_at
    finally:
        server.unbind()
        for c in clients:
            c.close()
    with patches.without("accept_queue"):
        server, accepted, poller = _listening_server()
        try:
            connected, clients = _connected_within(server, 40, 0.5)
            assert connected < 10  # pysyncobj's backlog of 5: the rest wait for SYN retries
            poller.poll(0.5)
            assert len(accepted) == 1
        finally:
            server.unbind()
            for c in clients:
                c.close()
