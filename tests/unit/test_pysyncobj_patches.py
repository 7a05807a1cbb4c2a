"""Every change Tetherlab makes to pysyncobj, each proven by a test that fails without it
(``pysyncobj_patches.without(name)`` puts pysyncobj's own behaviour back for the block)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import select
import socket
import struct
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pysyncobj.pickle as pysyncobj_pickle
import pysyncobj.syncobj as syncobj_mod
import pysyncobj.transport as transport_mod
import pytest
from cryptography.fernet import Fernet
from pysyncobj.config import SERIALIZER_STATE
from pysyncobj.poller import createPoller
from pysyncobj.serializer import Serializer
from pysyncobj.tcp_connection import CONNECTION_STATE, TcpConnection
from pysyncobj.tcp_server import TcpServer
from pysyncobj.transport import TCPTransport, Transport

from tetherlab.chaos.sim.world import World, WorldConfig
from tetherlab.cluster.core import statemachine as sm
from tetherlab.cluster.replica import pysyncobj_patches as patches
from tetherlab.cluster.replica.files import MemoryFiles
from tetherlab.cluster.replica.journal import NOOP_COMMAND
from tetherlab.cluster.replica.memstore import MemoryStore
from tetherlab.cluster.replica.store import entry_to_json


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


def test_auth_failures_a_frame_under_another_secret_is_reported_naming_the_peer(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A node given another cluster.secret: pysyncobj closed its connections without a word."""
    import pickle
    import zlib

    def frame_under(key: bytes) -> bytes:
        data = Fernet(key).encrypt_at_time(zlib.compress(pickle.dumps(("rand-key", "hello"))), int(time.time()))
        return struct.pack("i", len(data)) + data

    def other_secret_closes(lst: _Listener) -> tuple[TcpConnection, str]:
        conn = lst.connection()
        conn.encryptor = Fernet(Fernet.generate_key())
        client = lst.clients[-1]
        client.sendall(frame_under(Fernet.generate_key()))
        deadline = time.monotonic() + 10
        while _buffered(conn) == 0 and time.monotonic() < deadline:
            _read(conn)
        assert conn._TcpConnection__processParseMessage() is None  # type: ignore[attr-defined]
        assert conn.state == CONNECTION_STATE.DISCONNECTED
        return conn, "{}:{}".format(*client.getsockname())

    lst = _Listener()
    try:
        monkeypatch.setattr(patches, "TRANSPORT_STATS", patches.TransportStats())
        with caplog.at_level(logging.WARNING):
            _, peer = other_secret_closes(lst)
        assert patches.TRANSPORT_STATS.dropped["failed_authentication"] == 1
        assert f"{peer} sent a frame that failed the cluster secret's check" in caplog.text, caplog.text
        with patches.without("auth_failures"):
            monkeypatch.setattr(patches, "TRANSPORT_STATS", patches.TransportStats())
            other_secret_closes(lst)
            assert patches.TRANSPORT_STATS.dropped["failed_authentication"] == 0  # closed, and nobody told
    finally:
        lst.close()


def test_handshake_refused_the_node_with_another_secret_says_its_peers_close_it(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Two real pysyncobj nodes with different passwords: the one that dials is refused before any
    frame reaches it, so only this patch can tell its operator."""
    from pysyncobj import SyncObj, SyncObjConf

    def refused_within(seconds: float) -> dict[str, int]:
        monkeypatch.setattr(patches, "HANDSHAKES_REFUSED", patches.HandshakeRefusals())
        ports = _free_ports(2)
        addrs = [f"127.0.0.1:{p}" for p in ports]
        nodes = [SyncObj(addrs[i], [addrs[1 - i]],
                         SyncObjConf(password=f"secret-{i}", autoTick=False, connectionRetryTime=0.1,
                                     raftMinTimeout=0.3, raftMaxTimeout=0.6, appendEntriesPeriod=0.05))
                 for i in range(2)]
        try:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                for n in nodes:
                    n.doTick(0.01)
        finally:
            for n in nodes:
                n.destroy()
                n._doDestroy()
        return dict(patches.HANDSHAKES_REFUSED.by_peer)

    with caplog.at_level(logging.WARNING):
        refused = refused_within(2.0)
    assert refused and all(p.startswith("127.0.0.1:") for p in refused), refused
    peer = next(iter(refused))
    assert "closed our connection before answering the handshake" in caplog.text and peer in caplog.text
    with patches.without("handshake_refused"):
        assert refused_within(1.0) == {}  # refused just the same, and nobody told


def test_handshake_refused_one_close_is_a_peer_restarting_not_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    r = patches.HandshakeRefusals()
    with caplog.at_level(logging.WARNING):
        r.note("10.0.0.1:7100")
        r.note("10.0.0.2:7100")
        assert "handshake" not in caplog.text  # a rolling restart closes one handshake per peer
        r.note("10.0.0.1:7100")
        r.note("10.0.0.1:7100")
    assert "'10.0.0.1:7100': 3" in caplog.text and r.by_peer == {"10.0.0.1:7100": 3, "10.0.0.2:7100": 1}


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


# --- the patches the simulator needed (issue 19) ------------------------------------------------------
#
# Most need a small cluster: the simulator's World runs the real RaftNode/pysyncobj code on
# simulated time, network and disks, and a test reaches into one node to stage the exact case.


def _world(nodes: int = 3, seed: int = 7, **cfg: Any) -> World:
    w = World(seed, WorldConfig(nodes=nodes, spare_nodes=0, **cfg), trace=False)
    for nid in w.members:
        w.sim.after(0.0, w.nodes[nid].start)
    return w


def _until(w: World, pred: Callable[[], bool], limit_s: float = 10.0) -> bool:
    end = w.sim.now + limit_s
    while w.sim.now < end:
        w.sim.run(w.sim.now + 0.05)
        if pred():
            return True
    return False


def _raft(w: World, nid: str) -> Any:
    proc = w.nodes[nid].proc
    assert proc is not None
    return proc.replica.raft


def _leader(w: World) -> str:
    assert _until(w, lambda: w.serving_leader() is not None), "no leader"
    node = w.serving_leader()
    assert node is not None
    return node.id


def _put(w: World, nid: str, i: int) -> list[Any]:
    out: list[Any] = []
    _raft(w, nid).tl_submit(sm.encode_command(sm.Put("t", f"k{i}", "v")), lambda res, err: out.append((res, err)))
    return out


def _node_of(w: World, at: str, other: str) -> Any:
    """pysyncobj's Node object for ``other`` as node ``at`` knows it."""
    return next(n for n in _raft(w, at).otherNodes if n.address == w.nodes[other].raft_addr)


def test_clock_and_rng_give_pysyncobj_a_simulated_clock_and_random_source() -> None:
    patches.use_clock_and_rng(lambda: 123.0, random.Random(5))
    try:
        assert syncobj_mod.monotonicTime() == 123.0
        assert syncobj_mod.random.random() == random.Random(5).random()
        with patches.without("clock_and_rng"):
            assert syncobj_mod.monotonicTime() != 123.0
    finally:
        patches.use_clock_and_rng()
    assert syncobj_mod.monotonicTime() != 123.0  # the real clock again


def test_snapshot_files_route_pysyncobj_snapshots_through_files_and_make_renames_durable() -> None:
    files = MemoryFiles()
    patches.register_files("mem:/t/", files)

    def write(path: str, data: Any) -> None:
        with files.open(path, "wb") as f:
            f.write(b"snapshot " + repr(data).encode())

    try:
        ser = Serializer("mem:/t/snap", 1 << 16, False, write, lambda p: None, None)
        ser.serialize(("d", "last", "prev", "cluster"), 5)
        assert ser.checkSerializing()[0] == SERIALIZER_STATE.SUCCESS
        assert syncobj_mod.os.path.isfile("mem:/t/snap")
        files.crash()  # the machine dies right after: the new snapshot is whole and in place
        files.revive()
        with files.open("mem:/t/snap", "rb") as f:
            assert f.read().startswith(b"snapshot ")
        with patches.without("snapshot_files"):
            ser = Serializer("mem:/t/snap2", 1 << 16, False, write, lambda p: None, None)
            ser.serialize(("d", "last", "prev", "cluster"), 6)
            # pysyncobj's own rename works on the real file system, where "mem:/t" does not exist.
            assert ser.checkSerializing()[0] == SERIALIZER_STATE.FAILED
            assert not syncobj_mod.os.path.isfile("mem:/t/snap")
    finally:
        patches.unregister_files("mem:/t/")


def _compaction_window(w: World) -> tuple[int, int, list[Any]]:
    """A one-node cluster (``tetherlab up --nodes 1``) crashed between writing a snapshot and
    compacting its log; then restarted and written to. Returns (durable last index before the
    restart, last index after it, the new write's callback results)."""
    leader = _leader(w)
    node = w.nodes[leader]
    for i in range(20):
        _put(w, leader, i)
        w.sim.run(w.sim.now + 0.02)
    # Writes arrive in the tick that takes the snapshot (they are appended first, then the state
    # is snapshotted without them); the next tick commits them (a journal flush: durable), applies
    # them (the state's flush: durable) and deletes the log prefix (not flushed yet); the machine
    # dies before the next journal flush (the third durable step after the snapshot's).
    for i in range(20, 26):
        _put(w, leader, i)
    node.disk.crash_after = ("fsync_dir", 3)
    _raft(w, leader).forceLogCompaction()
    node.wake()
    assert _until(w, lambda: node.proc is None, 2.0), "the node did not crash in the window"
    before = node.disk.journal.durable_last_index()
    w.sim.after(0.0, node.start)
    w.sim.run(w.sim.now + 0.01)
    after = node.disk.journal.last_index or 0
    assert _until(w, lambda: w.serving_leader() is not None)
    done = _put(w, leader, 99)
    _until(w, lambda: bool(done), 3.0)
    return before, after, done


def test_load_dump_keeps_log_a_crash_between_snapshot_and_compaction_loses_nothing() -> None:
    # The reproduction: pysyncobj's __loadDumpFile cleared the journal down to the
    # snapshot, the state was then ahead of the log, and new writes were acknowledged but
    # skipped as "replayed" (never applied).
    w = _world(nodes=1, compaction_min_entries=10_000)
    try:
        before, after, done = _compaction_window(w)
        assert after >= before
        store = w.nodes["n1"].disk.store
        assert done and done[0][1] == 0 and store.get("t", "k99") is not None
        assert store.applied_index == done[0][0]["index"]
    finally:
        w.close()
    with patches.without("load_dump_keeps_log"):
        w = _world(nodes=1, compaction_min_entries=10_000)
        try:
            before, after, done = _compaction_window(w)
            assert after < before  # acknowledged entries after the snapshot are gone
            store = w.nodes["n1"].disk.store
            # ... and the next write is acknowledged (ok, with an index) yet never applied.
            assert done and done[0][1] == 0 and done[0][0].get("replayed") is not False
            assert store.get("t", "k99") is None
        finally:
            w.close()


def _follower(w: World) -> tuple[str, str]:
    leader = _leader(w)
    for i in range(5):
        _put(w, leader, i)
    _until(w, lambda: all(_raft(w, n).raftLastApplied == _raft(w, leader).raftLastApplied for n in w.members), 3.0)
    return leader, next(n for n in w.members if n != leader)


def test_snapshot_commit_a_snapshot_message_commits_nothing_unmatched() -> None:
    def stage(w: World) -> tuple[Any, int, int]:
        leader, f = _follower(w)
        raft = _raft(w, f)
        last = raft._SyncObj__raftLog[-1][1]
        for i in range(1, 4):  # a deposed leader's divergent entries, never committed
            raft._SyncObj__raftLog.add(sm.encode_command(sm.Put("t", "x", "divergent")), last + i, 0)
        commit = raft.raftCommitIndex
        chunk = {"type": "append_entries", "term": raft.raftCurrentTerm, "commit_index": last + 100,
                 "serialized": (b"TLSNAP partial", True, False)}
        raft._SyncObj__onMessageReceived(_node_of(w, f, leader), chunk)
        return raft, commit, last

    w = _world()
    try:
        raft, commit, _ = stage(w)
        assert raft.raftCommitIndex == commit
    finally:
        w.close()
    with patches.without("snapshot_commit"):
        w = _world()
        try:
            raft, commit, last = stage(w)
            assert raft.raftCommitIndex == last + 3  # pysyncobj commits the divergent entries
        finally:
            w.close()


def test_keep_committed_entries_a_repeated_append_does_not_delete_committed_entries() -> None:
    def stage(w: World) -> tuple[Any, int]:
        leader, f = _follower(w)
        raft = _raft(w, f)
        log = raft._SyncObj__raftLog
        last, commit = log[-1][1], raft.raftCommitIndex
        assert commit == last
        prev = commit - 3
        entries = [log[i - log[0][1]] for i in (prev + 1, prev + 2)]
        msg = {"type": "append_entries", "term": raft.raftCurrentTerm, "commit_index": commit,
               "prevLogIdx": prev, "prevLogTerm": log[prev - log[0][1]][2], "entries": entries}
        raft._SyncObj__onMessageReceived(_node_of(w, f, leader), msg)
        return raft, last

    w = _world()
    try:
        raft, last = stage(w)
        assert raft._SyncObj__raftLog[-1][1] == last
    finally:
        w.close()
    with patches.without("keep_committed_entries"):
        w = _world()
        try:
            raft, last = stage(w)
            assert raft._SyncObj__raftLog[-1][1] == last - 1  # a committed, applied entry deleted
        finally:
            w.close()


def test_next_index_monotonic_a_late_answer_does_not_move_the_next_index_back() -> None:
    def stage(w: World) -> int:
        leader, f = _follower(w)
        raft = _raft(w, leader)
        node = _node_of(w, leader, f)
        raft._SyncObj__raftNextIndex[node] = 50
        raft._SyncObj__raftMatchIndex[node] = 0
        raft._SyncObj__onMessageReceived(node, {"type": "next_node_idx", "next_node_idx": 10, "reset": False,
                                                "success": True})
        return int(raft._SyncObj__raftNextIndex[node])

    w = _world()
    try:
        assert stage(w) == 50
    finally:
        w.close()
    with patches.without("next_index_monotonic"):
        w = _world()
        try:
            assert stage(w) == 10
        finally:
            w.close()


def test_older_snapshot_ignored_a_follower_does_not_go_back_to_an_older_snapshot() -> None:
    def stage(w: World) -> tuple[Any, int]:
        leader, f = _follower(w)
        raft = _raft(w, f)
        applied = raft.raftLastApplied
        old = MemoryStore(files=w.nodes[f].disk.files)
        old.write_snapshot(Path(f"simfs:/{f}/older.tls"), {
            "last": entry_to_json((NOOP_COMMAND, 3, 1)), "prev": entry_to_json((NOOP_COMMAND, 2, 1)),
            "cluster": sorted(w.nodes[n].raft_addr for n in w.members), "node": leader})
        with w.nodes[f].disk.files.open(f"simfs:/{f}/older.tls", "rb") as fh:
            data = fh.read()
        node = _node_of(w, f, leader)
        for chunk in ((data, True, False), (b"", False, True)):
            raft._SyncObj__onMessageReceived(node, {"type": "append_entries", "term": raft.raftCurrentTerm,
                                                    "commit_index": applied, "serialized": chunk})
        return raft, applied

    w = _world()
    try:
        raft, applied = stage(w)
        assert raft.raftLastApplied == applied
    finally:
        w.close()
    with patches.without("older_snapshot_ignored"):
        w = _world()
        try:
            raft, applied = stage(w)
            assert raft.raftLastApplied == 3  # pysyncobj went back to the older snapshot
        finally:
            w.close()


def test_compaction_guard_compaction_never_deletes_a_log_that_lost_its_snapshot() -> None:
    def stage(w: World) -> Any:
        _, f = _follower(w)
        raft = _raft(w, f)
        beyond = raft._SyncObj__raftLog[-1][1] + 5  # the snapshot it was for was replaced meanwhile
        raft._SyncObj__deleteEntriesTo(beyond)
        return raft

    w = _world()
    try:
        assert len(stage(w)._SyncObj__raftLog) > 0
    finally:
        w.close()
    with patches.without("compaction_guard"):
        w = _world()
        try:
            assert len(stage(w)._SyncObj__raftLog) == 0  # an empty journal: every later tick raises
        finally:
            w.close()


def test_snapshot_send_no_spin_a_finished_snapshot_is_sent_not_none() -> None:
    files = MemoryFiles()
    patches.register_files("mem:/s/", files)
    try:
        with files.open("mem:/s/snap", "wb") as f:
            f.write(b"x" * 10)
        ser = Serializer("mem:/s/snap", 1 << 16, False, lambda p, d: None, lambda p: None, None)
        ser._Serializer__pid = -1  # serialized in-process a moment ago, not yet noticed by a tick
        assert ser.getTransmissionData("peer") == (b"x" * 10, True, False)
        with patches.without("snapshot_send_no_spin"):
            ser2 = Serializer("mem:/s/snap", 1 << 16, False, lambda p, d: None, lambda p: None, None)
            ser2._Serializer__pid = -1
            assert ser2.getTransmissionData("peer") is None  # the leader's loop then spins on None
    finally:
        patches.unregister_files("mem:/s/")


def _isolate(w: World, nid: str, on: bool) -> None:
    a = w.nodes[nid].raft_addr
    for other in w.nodes.values():
        if other.id != nid:
            for s, d in ((a, other.raft_addr), (other.raft_addr, a)):
                (w.net.block if on else w.net.unblock)(s, d)


def test_pre_vote_a_node_cut_off_does_not_bump_its_term() -> None:
    def stage(w: World) -> tuple[int, int]:
        _, f = _follower(w)
        before = _raft(w, f).raftCurrentTerm
        _isolate(w, f, True)
        w.sim.run(w.sim.now + 5.0)
        return before, _raft(w, f).raftCurrentTerm

    w = _world()
    try:
        before, after = stage(w)
        assert after == before
    finally:
        w.close()
    with patches.without("pre_vote"):
        w = _world()
        try:
            before, after = stage(w)
            assert after > before + 1  # an election per timeout, each a new term
        finally:
            w.close()


def test_leader_stickiness_a_paused_follower_does_not_depose_a_healthy_leader() -> None:
    w = _world()
    try:
        leader, f = _follower(w)
        term = _raft(w, leader).raftCurrentTerm
        w.nodes[f].pause()
        w.sim.run(w.sim.now + 2.0)  # its election timer runs out while it sleeps
        w.sim.after(0.0, w.resume, w.nodes[f])
        w.sim.run(w.sim.now + 2.0)
        now = w.serving_leader()
        assert now is not None and (now.id, _raft(w, leader).raftCurrentTerm) == (leader, term)
    finally:
        w.close()


def test_leader_stickiness_a_node_that_hears_the_leader_refuses_votes() -> None:
    def stage(w: World) -> tuple[int, int]:
        leader, f = _follower(w)
        voter = next(n for n in w.members if n not in (leader, f))
        raft = _raft(w, voter)
        term = raft.raftCurrentTerm
        last = raft._SyncObj__raftLog[-1]
        # A candidate whose log is as good as the voter's, asking while the leader is alive.
        raft._SyncObj__onMessageReceived(_node_of(w, voter, f), {
            "type": "request_vote", "term": term + 1, "last_log_index": last[1], "last_log_term": last[2]})
        return term, raft.raftCurrentTerm

    w = _world()
    try:
        term, now = stage(w)
        assert now == term
    finally:
        w.close()
    with patches.without("leader_stickiness"):
        w = _world()
        try:
            term, now = stage(w)
            assert now == term + 1  # it follows the candidate: the leader's followers scatter
        finally:
            w.close()


def test_leader_stickiness_still_lets_a_leadership_transfer_through() -> None:
    w = _world()
    try:
        leader, _ = _follower(w)
        _raft(w, leader).transferLeadership()
        assert _until(w, lambda: (w.serving_leader() or w.nodes[leader]).id != leader, 3.0)
    finally:
        w.close()


def test_term_notice_a_node_whose_term_got_ahead_rejoins() -> None:
    def stage(w: World) -> bool:
        leader, f = _follower(w)
        raft = _raft(w, f)
        raft._SyncObj__setCurrentTerm(raft.raftCurrentTerm + 5, None)  # an election it could not finish
        for i in range(5, 10):
            _put(w, (w.serving_leader() or w.nodes[leader]).id, i)
        return _until(w, lambda: w.serving_leader() is not None and
                      _raft(w, f).raftLastApplied == _raft(w, w.serving_leader().id).raftLastApplied  # type: ignore[union-attr]
                      and _raft(w, f).raftLastApplied > 0 and _raft(w, f)._getLeader() is not None, 8.0)

    w = _world()
    try:
        assert stage(w)
    finally:
        w.close()
    with patches.without("term_notice"):
        w = _world()
        try:
            assert not stage(w)  # it ignores the leader (lower term) and nobody grants it a vote
        finally:
            w.close()


class _FakeIncoming:
    def __init__(self) -> None:
        self.sendRandKey = None
        self.disconnected = False
        self.on_message: Any = None

    def setOnMessageReceivedCallback(self, cb: Any) -> None:
        self.on_message = cb

    def disconnect(self) -> None:
        self.disconnected = True


def _recording_transport() -> tuple[TCPTransport, list[Any]]:
    t = TCPTransport.__new__(TCPTransport)
    t._syncObj = types.SimpleNamespace(encryptor=None)
    t._nodeAddrToNode, t._connections, t._unknownConnections = {}, {}, set()
    t._readonlyNodes, t._readonlyNodesCounter, t._onUtilityMessageCallbacks = set(), 0, {}
    connected: list[Any] = []
    t._onNodeConnectedCallback = connected.append
    t._onReadonlyNodeConnectedCallback = None
    t._onMessageReceivedCallback = None
    return t, connected


def test_accept_unknown_peers_a_node_accepts_a_new_member_it_has_not_heard_of() -> None:
    t, connected = _recording_transport()
    conn = _FakeIncoming()
    t._unknownConnections.add(conn)
    t._onIncomingMessageReceived(conn, "10.0.0.9:7100")
    assert not conn.disconnected and [n.address for n in connected] == ["10.0.0.9:7100"]
    with patches.without("accept_unknown_peers"):
        t, connected = _recording_transport()
        conn = _FakeIncoming()
        t._onIncomingMessageReceived(conn, "10.0.0.9:7100")
        assert conn.disconnected and not connected


def test_removal_on_commit_a_node_keeps_answering_until_a_removal_is_committed() -> None:
    def stage(w: World) -> tuple[bool, bool]:
        leader, f = _follower(w)
        target = next(n for n in w.members if n not in (leader, f))
        raft = _raft(w, f)
        log = raft._SyncObj__raftLog
        last = log[-1]
        removal = b"\x02" + pysyncobj_pickle.dumps(["rem", w.nodes[target].raft_addr, _node_of(w, f, target)])
        msg = {"type": "append_entries", "term": raft.raftCurrentTerm, "commit_index": raft.raftCommitIndex,
               "prevLogIdx": last[1], "prevLogTerm": last[2], "entries": [(removal, last[1] + 1, last[2])]}
        raft._SyncObj__onMessageReceived(_node_of(w, f, leader), msg)  # appended, not committed
        transport = raft._SyncObj__transport
        addr = w.nodes[target].raft_addr
        return addr in {n.address for n in raft.otherNodes}, transport.peer_is_connected(addr)

    w = _world()
    try:
        member, connected = stage(w)
        assert not member and connected  # out of the member list, still reachable
    finally:
        w.close()
    with patches.without("removal_on_commit"):
        w = _world()
        try:
            member, connected = stage(w)
            assert not member and not connected
        finally:
            w.close()


# --- issue 13: leader_commit_durable, chunked_entries ---------------------------------------------


def test_leader_commit_durable_a_leader_counts_itself_only_for_entries_it_flushed() -> None:
    # The leader sends before its own fsync. Stage the moment a follower has acknowledged an entry
    # the leader has not flushed yet (a 3-node cluster: the leader and that follower are a majority
    # only if the leader counts itself for it).
    def stage(w: World) -> tuple[Any, int, Any]:
        leader, f = _follower(w)
        raft = _raft(w, leader)
        journal = w.nodes[leader].disk.journal
        last = raft._SyncObj__raftLog[-1][1]
        journal.add(NOOP_COMMAND, last + 1, raft.raftCurrentTerm)
        assert journal.durable_last_index() == last
        for n in raft.otherNodes:
            raft._SyncObj__raftMatchIndex[n] = last + 1 if n.address == w.nodes[f].raft_addr else last
        raft._onTick(0.0)  # one tick: its commit is computed first, its flush comes after its sends
        return raft, last, journal

    w = _world()
    try:
        raft, last, journal = stage(w)
        assert raft.raftCommitIndex == last  # the leader did not count itself for last + 1
        assert raft.raftLastApplied <= last  # so nothing beyond its durable log is applied (or snapshotted)
        assert journal.durable_last_index() == last + 1  # the tick's own flush, after the sends
        raft._onTick(0.0)
        assert raft.raftCommitIndex == last + 1  # now durable on two of three nodes: committed
    finally:
        w.close()
    with patches.without("leader_commit_durable"):
        w = _world()
        try:
            raft, last, _ = stage(w)
            assert raft.raftCommitIndex == last + 1  # pysyncobj counted the leader's unflushed entry
        finally:
            w.close()


def test_leader_commit_durable_a_single_node_commits_once_its_entries_are_flushed() -> None:
    w = _world(nodes=1)
    try:
        leader = _leader(w)
        done = _put(w, leader, 1)
        assert _until(w, lambda: bool(done), 1.0) and done[0][1] == 0
        assert w.nodes[leader].disk.journal.durable_last_index() >= done[0][0]["index"]
    finally:
        w.close()


def test_only_a_leaders_append_entries_leave_before_the_flush() -> None:
    from tetherlab.cluster.replica.raft import defers_flush

    leader = types.SimpleNamespace(_isLeader=lambda: True)
    follower = types.SimpleNamespace(_isLeader=lambda: False)
    assert defers_flush(leader, {"type": "append_entries"})
    for kind in ("next_node_idx", "request_vote", "response_vote", patches.PRE_VOTE_RESPONSE, patches.TERM_NOTICE,
                 "apply_command_response"):
        assert not defers_flush(leader, {"type": kind})
    assert not defers_flush(follower, {"type": "append_entries"})


def test_a_leader_that_steps_down_flushes_before_it_answers_anything() -> None:
    # Entries a leader sent before its fsync are pending when it steps down (leader fallback: no
    # new term, so no setCurrentTerm flush). Its next message, whatever it is, makes them durable
    # first: no answer of a follower ever relies on an unflushed entry.
    w = _world()
    try:
        leader, f = _follower(w)
        raft = _raft(w, leader)
        journal = w.nodes[leader].disk.journal
        last = raft._SyncObj__raftLog[-1][1]
        journal.add(NOOP_COMMAND, last + 1, raft.raftCurrentTerm)
        raft._SyncObj__sendAppendEntries()  # a leader's append-entries: no flush first
        assert journal.durable_last_index() == last
        raft._SyncObj__setState(0)  # follower
        raft._SyncObj__sendNextNodeIdx(_node_of(w, leader, f), success=True)
        assert journal.durable_last_index() == last + 1
    finally:
        w.close()


def _raft_pair(tmp_path: Path) -> list[Any]:
    """Two production RaftNodes (LMDB journal, encrypted TCP on loopback, tick threads), requiring
    the patches that are installed (a test may have taken one out)."""
    import dataclasses

    from tetherlab.cluster.core.config import Address, NodeAddresses, NodeConfig, RaftTuning
    from tetherlab.cluster.replica.raft import RaftIO, RaftNode

    ports = _free_ports(2)
    addrs = [NodeAddresses(f"n{i}", Address("127.0.0.1", p), Address("127.0.0.1", 1), Address("127.0.0.1", 1))
             for i, p in enumerate(ports)]
    nodes = []
    for a in addrs:
        cfg = NodeConfig(node=a, peers=tuple(x for x in addrs if x is not a), data_dir=tmp_path / a.id,
                         secret_file=tmp_path / "secret", raft=RaftTuning(election_timeout_min_s=0.4,
                                                                          election_timeout_max_s=0.8))
        io = dataclasses.replace(RaftIO.production(cfg), required_patches=tuple(patches.installed()))
        nodes.append(RaftNode(cfg, b"s" * 32, MemoryStore(), io=io))
    return nodes


def _payload_for_command_bytes(raft: Any, command_bytes: int) -> bytes:
    """A payload whose log entry (pysyncobj's command for ``_tl_apply(payload)``) is exactly that long."""
    func_id = next(v for k, v in raft._methodToID.items() if "_tl_apply" in str(k))

    def command_len(n: int) -> int:
        return 1 + len(pysyncobj_pickle.dumps((func_id, (b"x" * n,))))

    n = command_bytes - (command_len(command_bytes) - command_bytes)
    assert command_len(n) == command_bytes
    head, tail = b'{"op":"padding","pad":"', b'"}'  # ASCII: pysyncobj pickles bytes as a latin-1 str
    return head + b"x" * (n - len(head) - len(tail)) + tail


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_chunked_entries_a_large_entry_near_a_chunk_boundary_replicates_cleanly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An entry of exactly twice the batch size: its pickle (longer by its framing) needs a third chunk,
    # and pysyncobj marked the second one 'finish' too (it compared with the data's length).
    batch = 1 << 16
    pysyncobj_log = logging.getLogger("pysyncobj")
    monkeypatch.setattr(pysyncobj_log, "level", logging.ERROR)  # the simulator's worlds silence it
    monkeypatch.setattr(pysyncobj_log, "disabled", False)

    def replicate(path: Path) -> tuple[bool, list[str]]:
        errors = _Errors()
        pysyncobj_log.addHandler(errors)
        a, b = _raft_pair(path)
        try:
            end = time.monotonic() + 10
            while not (a._isLeader() or b._isLeader()) and time.monotonic() < end:
                time.sleep(0.02)
            leader, follower = (a, b) if a._isLeader() else (b, a)
            payload = _payload_for_command_bytes(leader, 2 * batch)
            done: list[Any] = []
            leader.tl_submit(payload, lambda res, err: done.append((res, err)))
            while not done and time.monotonic() < end:
                time.sleep(0.02)
            assert done and done[0][1] == 0, done
            index = done[0][0]["index"]
            entry = leader._SyncObj__raftLog[-1]
            assert entry[1] == index and len(entry[0]) == 2 * batch  # the boundary case itself
            while follower.raftLastApplied < index and time.monotonic() < end:
                time.sleep(0.02)
            same = follower.raftLastApplied >= index and follower._SyncObj__raftLog[-1] == entry
            return same, errors.messages
        finally:
            a.tl_destroy(5.0)
            b.tl_destroy(5.0)
            pysyncobj_log.removeHandler(errors)

    same, errors = replicate(tmp_path / "patched")
    assert same and errors == []
    with patches.without("chunked_entries"):
        _, errors = replicate(tmp_path / "pysyncobj")
    # The follower unpickled the truncated first 'finish' and its tick raised (the entry still
    # arrived with the real last chunk, after a stalled tick).
    assert "failed _onTick in _autoTickThread" in errors


def _statements(fn: Any) -> list[str]:
    """``fn``'s body as normalised lines (no docstring or comments), so that a copy of a SyncObj
    method reads like the original."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0].body  # type: ignore[attr-defined]
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    src = "\n".join(ast.unparse(stmt) for stmt in body)
    for old, new in (("self.__", "self._SyncObj__"), ("monotonicTime()", "_now()"), ("_RAFT_STATE.", "_"),
                     ("_syncobj_mod.", ""), ("xrange(", "range(")):
        src = src.replace(old, new)
    return [line.strip() for line in src.splitlines()]


def test_the_copied_pysyncobj_methods_differ_only_where_their_patches_say() -> None:
    # leader_commit_durable (with heavy_apply_sends_first) and chunked_entries replace two pysyncobj
    # 0.3.17 methods by copies (no smaller wrapper can reach the lines they change); anything else
    # differing is a mistake.
    import difflib

    def changed(original: Any, copy: Any) -> list[str]:
        diff = difflib.unified_diff(_statements(original), _statements(copy), lineterm="", n=0)
        return [d for d in diff if d[:1] in "+-" and d[:3] not in ("+++", "---")]

    assert changed(patches._original_send_append_entries, patches._send_append_entries) == [
        "-elif pos + batchSizeBytes >= len(entries[0][0]):", "+elif pos + batchSizeBytes >= len(entry):"]
    tick = changed(patches._original_on_tick, patches._patched_tick)
    assert tick[-6:] == [
        "+_leader_commit(self)",
        # heavy_apply_leader_waits: no step-down while followers apply a heavy entry.
        "-if count <= (len(self._SyncObj__otherNodes) + 1) / 2:",
        "+if count <= (len(self._SyncObj__otherNodes) + 1) / 2 and (not _followers_busy(self)):",
        # heavy_apply_sends_first: one send, between the leader's branch and the apply.
        "+if 'heavy_apply_sends_first' in _active and self._SyncObj__raftState == _LEADER and "
        "_heavy_apply_ahead(self):",
        "+self._SyncObj__sendAppendEntries()",
        "+self._SyncObj__dict__['_tlp_heavy_tick_at'] = _now()"]
    assert all(d.startswith("-") for d in tick[:-6])
    # What left _onTick is _leader_commit, less the leader's count of itself.
    moved = difflib.unified_diff([d[1:] for d in tick[:-6]], _statements(patches._leader_commit), lineterm="", n=0)
    assert [d for d in moved if d[:1] in "+-" and d[:3] not in ("+++", "---")] == [
        "+durable = durable_index(self) if 'leader_commit_durable' in _active else "
        "self._SyncObj__getCurrentLogIndex()", "-count = 1", "+count = 1 if commitIdx <= durable else 0"]


# --- heavy_apply_sends_first, stall_grace ---------------------------------------------------------

HEAVY_BYTES = 1 << 16  # one append-entries batch (64 KiB): a large registry push is many


def _heavy_entry_terms(leader_stall_s: float, follower_stall_s: float) -> tuple[int, list[int]]:
    """A healthy cluster applies one heavy entry; applying it keeps the leader busy for
    ``leader_stall_s`` and each follower for ``follower_stall_s`` (both above the maximum election
    timeout, 1.2 s). The term before, and every node's term a few seconds after."""
    w = _world()
    try:
        leader, _ = _follower(w)
        term = _raft(w, leader).raftCurrentTerm

        def cost(nid: str, payload: bytes) -> float:
            if len(payload) < HEAVY_BYTES:
                return 0.0
            return leader_stall_s if nid == leader else follower_stall_s

        w.apply_stall_s = cost
        done: list[Any] = []
        _raft(w, leader).tl_submit(sm.encode_command(sm.Put("t", "big", "v" * (HEAVY_BYTES - 30))),
                                   lambda res, err: done.append(err))
        assert _until(w, lambda: bool(done), 8.0) and done == [0]
        w.sim.run(w.sim.now + 6.0)  # time for a node that applies it after an election
        applied = [_raft(w, n).raftLastApplied for n in w.members]
        assert min(applied) == max(applied), applied
        return term, [_raft(w, n).raftCurrentTerm for n in w.members]
    finally:
        w.close()


def test_a_heavy_entry_applied_for_longer_than_an_election_timeout_keeps_the_leader() -> None:
    term, after = _heavy_entry_terms(leader_stall_s=2.2, follower_stall_s=2.0)
    assert after == [term] * 3


def test_heavy_apply_sends_first_followers_learn_the_commit_before_the_leader_applies() -> None:
    # Without it the leader applies first and sends afterwards: its followers hear nothing for
    # the whole apply, and one campaigns.
    with patches.without("heavy_apply_sends_first"):
        term, after = _heavy_entry_terms(leader_stall_s=2.2, follower_stall_s=2.0)
    assert max(after) > term


def test_stall_grace_a_follower_busy_applying_gives_the_leader_a_fresh_timeout() -> None:
    # The followers finish first (the leader has more to do): without the grace their expired
    # timers start an election before the leader's next heartbeat arrives.
    with patches.without("stall_grace"):
        term, after = _heavy_entry_terms(leader_stall_s=2.2, follower_stall_s=2.0)
    assert max(after) > term


def test_heavy_apply_leader_waits_for_followers_that_apply_longer_than_its_fallback_timeout() -> None:
    # Followers decode and validate what the leader applies from its decoded command: they take
    # longer. Silent for 4 s (the fallback timeout is 2 s) after the leader's 1 s apply.
    term, after = _heavy_entry_terms(leader_stall_s=1.0, follower_stall_s=4.0)
    assert after == [term] * 3
    with patches.without("heavy_apply_leader_waits"):
        term, after = _heavy_entry_terms(leader_stall_s=1.0, follower_stall_s=4.0)
    assert max(after) > term  # the leader stepped down, and an election followed


def test_stall_grace_is_given_once_per_leader_message_so_a_dead_leader_is_replaced() -> None:
    # The leader dies and its followers keep stalling (a busy host): each stall alone would earn a
    # fresh timeout; they still elect a new leader, after at most one grace.
    w = _world()
    try:
        leader, _ = _follower(w)
        term = _raft(w, leader).raftCurrentTerm
        w.nodes[leader].crash("test")
        end = w.sim.now + 6.0
        while w.sim.now < end:
            for n in w.members:
                if n != leader:
                    w.nodes[n].stall(0.3)  # 0.3 s stalls, 0.1 s apart: each one over the threshold
            w.sim.run(w.sim.now + 0.4)
        others = [n for n in w.members if n != leader]
        assert any(w.nodes[n].status().get("role") == "leader" for n in others)
        assert all(_raft(w, n).raftCurrentTerm > term for n in others)
    finally:
        w.close()


def test_a_large_entry_is_applied_inside_the_nodes_large_apply_hook() -> None:
    # RaftIO.large_apply (the node pauses the cyclic GC there): entered for an entry of
    # LARGE_APPLY_BYTES or more, on every node, and for nothing smaller.
    from tetherlab.cluster.replica.raft import LARGE_APPLY_BYTES

    w = _world()
    try:
        leader, _ = _follower(w)
        entered: list[str] = []
        for n in w.members:
            def hook(n: str = n) -> Any:
                entered.append(n)
                return contextlib.nullcontext()
            _raft(w, n)._tl_io.large_apply = hook
        done: list[Any] = []
        for value in ("v" * (LARGE_APPLY_BYTES - 30), "small"):
            _raft(w, leader).tl_submit(sm.encode_command(sm.Put("t", "k", value)), lambda res, err: done.append(err))
        assert _until(w, lambda: len(done) == 2, 5.0) and done == [0, 0]
        w.sim.run(w.sim.now + 1.0)
        assert sorted(entered) == sorted(w.members)
    finally:
        w.close()


# --- pickle_protocol -------------------------------------------------------------------------------


def test_pickle_protocol_commands_and_messages_carry_bytes_as_bytes() -> None:
    import pickle

    command = (7, (b'{"cmd": "a log entry\\u00e9"}',), {})
    data = pysyncobj_pickle.dumps(command)
    assert data[:2] == b"\x80\x05" and b"_codecs" not in data  # protocol 5: a bytes opcode, no latin-1 detour
    assert pysyncobj_pickle.loads(data) == command
    old = pickle.dumps(command, 2)  # what older nodes wrote (and older logs hold): still read
    assert b"_codecs" in old and pysyncobj_pickle.loads(old) == command
    with patches.without("pickle_protocol"):
        assert pysyncobj_pickle.dumps(command)[:2] == b"\x80\x02"
