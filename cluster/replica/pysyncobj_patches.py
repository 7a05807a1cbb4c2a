"""Every change Tetherlab makes to pysyncobj's behaviour, in one place, applied by :func:`install`.

pysyncobj is pinned to exactly :data:`PYSYNCOBJ_VERSION` (pyproject.toml): each patch below
replaces a name inside that version's modules, and :func:`install` refuses any other version.
Each patch is named, says why it exists, and has a test that fails without it
(tests/unit/test_pysyncobj_patches.py). Nothing here runs at import time: the node process,
the tools that read a journal offline and the tests call :func:`install` explicitly.

Patches:

- ``journal_factory``: pysyncobj builds its journal through the module-level name
  ``pysyncobj.syncobj.createJournal``; we hand it the LMDB journal registered for the node
  (its own FileJournal never fsyncs and keeps the log in a Python list).
- ``frame_bound``: pysyncobj buffers a frame of whatever length its 4-byte header announces
  before it can check the frame's authentication; refuse frames over
  :data:`RAFT_FRAME_MAX_BYTES` and drop the connection.
- ``socket_timeouts``: pysyncobj checks its connection timeout only on sockets that see
  events, so after a silent partition a connect whose SYNs were dropped waits out the kernel's
  SYN backoff (up to ~2 min) and a dead link with unacknowledged data stays "connected" for
  minutes; ``TCP_USER_TIMEOUT`` and ``TCP_SYNCNT`` make the kernel give up as fast as Raft needs.

Hostile-load patches (docs/hardening.md): a stranger who can reach a Raft port must not be able
to freeze the node's one Raft thread, grow its memory, or hold its sockets.

- ``bounded_read``: pysyncobj drains a readable socket in ``while __processRead()`` with
  ``readBuffer += incoming`` (a copy per 8 KiB) before it looks at any frame: 64 MiB of random
  bytes froze a node for tens of seconds. Read the 4-byte length first, check it, then read at
  most that many bytes into one buffer of that size; until a connection has proved it knows
  the cluster secret (a frame that passed pysyncobj's random-key check), frames are limited to
  :data:`RAFT_UNAUTH_FRAME_MAX_BYTES` and read one per event; and one event reads at most
  :data:`RAFT_READ_SLICE_BYTES` or :data:`RAFT_READ_SLICE_S`, so the tick always comes back.
- ``accept_limits``: at most :data:`RAFT_UNAUTH_CONNECTIONS_MAX` incoming connections that have
  not authenticated, and :data:`RAFT_UNAUTH_CONNECTIONS_PER_SOURCE_MAX` per source address; a
  new connection over a cap closes the oldest such one (a flood cannot lock a peer out: the
  peer's own handshake takes milliseconds).
- ``handshake_deadline``: an incoming connection that has not authenticated within
  :data:`RAFT_HANDSHAKE_DEADLINE_S` of being accepted is closed (pysyncobj checks its timeout
  only on sockets that see events, so an idle stranger was held forever).
- ``accept_queue``: listen with a backlog of :data:`RAFT_LISTEN_BACKLOG` (pysyncobj: 5), accept
  up to :data:`RAFT_ACCEPTS_PER_EVENT` connections per poll event (pysyncobj: 1) but at most
  :data:`RAFT_ACCEPTS_PER_S` a second (the listening socket leaves the poller until the next tick
  with room), so a connection flood neither crowds a reconnecting peer out of the accept queue
  nor spends the Raft thread on accepting.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pysyncobj.syncobj as _syncobj_mod
import pysyncobj.tcp_connection as _tcp_mod
import pysyncobj.transport as _transport_mod
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.tcp_connection import TcpConnection
from pysyncobj.tcp_server import SERVER_STATE, TcpServer
from pysyncobj.transport import TCPTransport
from pysyncobj.version import VERSION

log = logging.getLogger("tetherlab.raft")

PYSYNCOBJ_VERSION = "0.3.17"

# Frames are bounded by the append/snapshot batch sizes (64 KiB) plus one entry; anything
# announcing more than this is not one of ours.
RAFT_FRAME_MAX_BYTES = 16 * 1024 * 1024
RAFT_TCP_USER_TIMEOUT_MS = 3000  # unacknowledged data for this long kills the connection
RAFT_TCP_SYN_RETRIES = 1  # a connect attempt fails in ~3 s; pysyncobj retries every connection_retry_s
JOURNAL_KEY_PREFIX = "lmdb:"  # journalFile values naming a registered journal
# A connection's first frames (random keys, the peer's address, an admin command) are a few
# hundred bytes; nothing larger is read before the connection has authenticated.
RAFT_UNAUTH_FRAME_MAX_BYTES = 4096
RAFT_READ_SLICE_BYTES = 1 << 20  # one poll event reads at most this much from one connection
RAFT_READ_SLICE_S = 0.005  # ... and for at most this long, so the tick comes back
RAFT_UNAUTH_CONNECTIONS_MAX = 256  # incoming, not yet authenticated, per node
RAFT_UNAUTH_CONNECTIONS_PER_SOURCE_MAX = 64  # ... per source address
RAFT_HANDSHAKE_DEADLINE_S = 2.0  # a peer authenticates in a few round trips; a stranger is closed
RAFT_HANDSHAKE_SWEEP_S = 0.1  # how often the deadline is checked (on the tick)
RAFT_LISTEN_BACKLOG = 128
RAFT_ACCEPTS_PER_EVENT = 16
RAFT_ACCEPTS_PER_S = 200.0  # peers reconnect a few times a minute at most
_DROP_LOG_INTERVAL_S = 10.0  # dropped strangers are logged as one summary line per interval

_FRAME_LEN = struct.Struct("i")


@dataclass(frozen=True)
class Patch:
    name: str
    why: str
    apply: Callable[[], None]
    revert: Callable[[], None]  # puts pysyncobj's own behaviour back (tests prove each patch matters)


# --- journal_factory --------------------------------------------------------------------------

_JOURNALS: dict[str, Any] = {}
_JOURNALS_LOCK = threading.Lock()
_original_create_journal = _syncobj_mod.createJournal


def register_journal(key: str, journal: Any) -> str:
    """Make ``journal`` the one pysyncobj builds for ``journalFile=key`` (taken once)."""
    if not key.startswith(JOURNAL_KEY_PREFIX):
        raise ValueError(f"journal keys start with {JOURNAL_KEY_PREFIX!r}, got {key!r}")
    with _JOURNALS_LOCK:
        _JOURNALS[key] = journal
    return key


def _create_journal(journal_file: str | None = None) -> Any:
    if isinstance(journal_file, str) and journal_file.startswith(JOURNAL_KEY_PREFIX):
        with _JOURNALS_LOCK:
            return _JOURNALS.pop(journal_file)
    return _original_create_journal(journal_file)


def _install_journal_factory() -> None:
    _syncobj_mod.createJournal = _create_journal


def _revert_journal_factory() -> None:
    _syncobj_mod.createJournal = _original_create_journal


# --- frame_bound ------------------------------------------------------------------------------

_original_parse = TcpConnection._TcpConnection__processParseMessage  # type: ignore[attr-defined]


def _bounded_parse(conn: TcpConnection) -> Any:
    buf = conn._TcpConnection__readBuffer  # type: ignore[attr-defined]
    if len(buf) >= _FRAME_LEN.size:
        (n,) = _FRAME_LEN.unpack_from(buf)
        if n < 0 or n > RAFT_FRAME_MAX_BYTES:
            log.warning("dropping a raft connection that announced a %d-byte frame", n)
            conn.disconnect()
            return None
    return _original_parse(conn)


def _install_frame_bound() -> None:
    TcpConnection._TcpConnection__processParseMessage = _bounded_parse  # type: ignore[attr-defined]


def _revert_frame_bound() -> None:
    TcpConnection._TcpConnection__processParseMessage = _original_parse  # type: ignore[attr-defined]


# --- socket_timeouts --------------------------------------------------------------------------

_original_keepalive = TcpConnection.setSockoptKeepalive


def _raft_socket_options(conn: TcpConnection) -> None:
    _original_keepalive(conn)
    sock = conn._TcpConnection__socket  # type: ignore[attr-defined]
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, RAFT_TCP_USER_TIMEOUT_MS)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, RAFT_TCP_SYN_RETRIES)


def _install_socket_timeouts() -> None:
    TcpConnection.setSockoptKeepalive = _raft_socket_options  # type: ignore[method-assign]


def _revert_socket_timeouts() -> None:
    TcpConnection.setSockoptKeepalive = _original_keepalive  # type: ignore[method-assign]


# --- what the hostile-load patches did (read by the node's metrics) ----------------------------


class TransportStats:
    """Counts of strangers dropped by the patches below, per process (one node per process).

    ``dropped`` keys: ``frame_too_large`` (a frame over the bound for the connection's state),
    ``handshake_deadline`` (no authentication in time), ``evicted`` (closed to make room under
    an unauthenticated-connection cap)."""

    REASONS = ("frame_too_large", "handshake_deadline", "evicted")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.dropped: dict[str, int] = dict.fromkeys(self.REASONS, 0)
        self.slices_cut = 0  # poll events whose read stopped at the slice bound with data left
        self._logged: dict[str, int] = dict.fromkeys(self.REASONS, 0)
        self._last_log = 0.0

    def drop(self, reason: str, detail: str) -> None:
        with self._lock:
            self.dropped[reason] += 1
            now = time.monotonic()
            if now - self._last_log < _DROP_LOG_INTERVAL_S:
                return
            self._last_log = now
            since = {k: v - self._logged[k] for k, v in self.dropped.items() if v != self._logged[k]}
            self._logged = dict(self.dropped)
        # One line per interval whatever the flood's size: logging must not become the flood.
        log.warning("dropped raft connections from strangers (since the last report: %s); latest: %s",
                    since, detail)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {**self.dropped, "slices_cut": self.slices_cut}


TRANSPORT_STATS = TransportStats()


def unauthenticated_connections(transport: Any) -> int:
    """Incoming connections of ``transport`` that have not authenticated yet."""
    return len(getattr(transport, "_unknownConnections", ()))


# --- bounded_read -----------------------------------------------------------------------------

_original_try_read = TcpConnection._TcpConnection__tryReadBuffer  # type: ignore[attr-defined]
_FRAME_HEADER_BYTES = _FRAME_LEN.size


class _FrameReader:
    """Where one socket's current frame is read to: the header, then a buffer of exactly the
    announced size (allocated only once the size is known to be acceptable)."""

    __slots__ = ("armed", "authenticated", "frame", "head", "head_n", "n", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.head = bytearray(_FRAME_HEADER_BYTES)
        self.head_n = 0
        self.frame: bytearray | None = None  # header + body, once the header is accepted
        self.n = 0  # bytes of ``frame`` filled
        # The frame handed to pysyncobj last was parsed with its random-key check armed: if the
        # connection still exists at the next read, the sender knows the cluster secret.
        self.armed = False
        self.authenticated = False


def _reader_of(conn: Any, sock: socket.socket) -> _FrameReader:
    rx: _FrameReader | None = getattr(conn, "_tl_rx", None)
    if rx is None or rx.sock is not sock:  # a new socket (an outgoing connection reconnected)
        rx = _FrameReader(sock)
        conn._tl_rx = rx
    return rx


def is_authenticated(conn: Any) -> bool:
    """``conn``'s current socket has carried a frame that passed pysyncobj's random-key check."""
    rx: _FrameReader | None = getattr(conn, "_tl_rx", None)
    return rx is not None and rx.sock is conn._TcpConnection__socket and (rx.authenticated or rx.armed)


def _bounded_try_read(conn: Any) -> None:
    sock: socket.socket | None = conn._TcpConnection__socket
    if sock is None:
        return
    rx = _reader_of(conn, sock)
    if rx.armed:
        # pysyncobj parsed that frame since the last read; a failed check would have closed this
        # socket (and a new socket gets a new reader).
        rx.armed, rx.authenticated = False, True
    trusted = rx.authenticated or conn.encryptor is None  # without a password nothing can authenticate
    limit = RAFT_FRAME_MAX_BYTES if trusted else RAFT_UNAUTH_FRAME_MAX_BYTES
    frames: list[bytes] = []
    budget = RAFT_READ_SLICE_BYTES
    t_end = time.perf_counter() + RAFT_READ_SLICE_S
    while True:
        try:
            if rx.frame is None:
                got = sock.recv_into(memoryview(rx.head)[rx.head_n:])
            else:
                want = min(len(rx.frame) - rx.n, budget)  # > 0: complete frames are handed on at once
                got = sock.recv_into(memoryview(rx.frame)[rx.n:rx.n + want])
        except (BlockingIOError, InterruptedError):
            break
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                conn.disconnect()
                return
            break
        if got == 0:  # EOF
            conn.disconnect()
            return
        if rx.frame is None:
            rx.head_n += got
            if rx.head_n < _FRAME_HEADER_BYTES:
                continue
            (length,) = _FRAME_LEN.unpack(rx.head)
            if not 0 <= length <= limit:
                TRANSPORT_STATS.drop("frame_too_large", f"a {'peer' if trusted else 'stranger'} announced a "
                                     f"{length}-byte frame (bound {limit})")
                conn.disconnect()
                return
            rx.frame = bytearray(_FRAME_HEADER_BYTES + length)
            rx.frame[:_FRAME_HEADER_BYTES] = rx.head
            rx.n, rx.head_n = _FRAME_HEADER_BYTES, 0
        else:
            rx.n += got
            budget -= got
        if rx.n == len(rx.frame):
            frames.append(bytes(rx.frame))
            rx.frame, rx.n = None, 0
            if not trusted:
                # One frame at a time until authenticated: the next read learns whether it passed.
                rx.armed = conn.recvRandKey is not None
                break
        if budget <= 0 or time.perf_counter() >= t_end:
            TRANSPORT_STATS.slices_cut += 1
            break
    if frames:
        pending = conn._TcpConnection__readBuffer
        conn._TcpConnection__readBuffer = b"".join([pending, *frames]) if pending else b"".join(frames)
    conn._TcpConnection__lastReadTime = _tcp_mod.monotonicTime()


def _install_bounded_read() -> None:
    TcpConnection._TcpConnection__tryReadBuffer = _bounded_try_read  # type: ignore[attr-defined]


def _revert_bounded_read() -> None:
    TcpConnection._TcpConnection__tryReadBuffer = _original_try_read  # type: ignore[attr-defined]


# --- accept_limits ----------------------------------------------------------------------------

_original_new_incoming = TCPTransport._onNewIncomingConnection


def _accepted_at(conn: Any) -> float:
    t: float = getattr(conn, "_tl_accepted_at", 0.0)
    return t


def _limited_new_incoming(transport: Any, conn: Any) -> None:
    sock = conn._TcpConnection__socket
    try:
        source = str(sock.getpeername()[0])
    except (OSError, AttributeError, IndexError):
        source = ""
    conn._tl_source = source
    conn._tl_accepted_at = _transport_mod.monotonicTime()
    unknown = transport._unknownConnections
    same = [c for c in unknown if getattr(c, "_tl_source", None) == source]
    if len(same) >= RAFT_UNAUTH_CONNECTIONS_PER_SOURCE_MAX:
        TRANSPORT_STATS.drop("evicted", f"over {RAFT_UNAUTH_CONNECTIONS_PER_SOURCE_MAX} unauthenticated "
                             f"connections from {source}")
        min(same, key=_accepted_at).disconnect()
    if len(unknown) >= RAFT_UNAUTH_CONNECTIONS_MAX:
        TRANSPORT_STATS.drop("evicted", f"over {RAFT_UNAUTH_CONNECTIONS_MAX} unauthenticated connections")
        min(unknown, key=_accepted_at).disconnect()
    _original_new_incoming(transport, conn)


def _install_accept_limits() -> None:
    TCPTransport._onNewIncomingConnection = _limited_new_incoming  # type: ignore[method-assign]


def _revert_accept_limits() -> None:
    TCPTransport._onNewIncomingConnection = _original_new_incoming  # type: ignore[method-assign]


# --- handshake_deadline -----------------------------------------------------------------------

_original_transport_tick = TCPTransport._onTick


def _tick_with_deadline(transport: Any) -> None:
    _original_transport_tick(transport)
    now = _transport_mod.monotonicTime()
    if now < getattr(transport, "_tl_next_sweep", 0.0):
        return
    transport._tl_next_sweep = now + RAFT_HANDSHAKE_SWEEP_S
    for conn in list(transport._unknownConnections):
        t = getattr(conn, "_tl_accepted_at", None)
        if t is None:  # accepted without accept_limits: the deadline runs from first seen
            conn._tl_accepted_at = now
        elif now - t > RAFT_HANDSHAKE_DEADLINE_S:
            TRANSPORT_STATS.drop("handshake_deadline", f"no authentication within {RAFT_HANDSHAKE_DEADLINE_S} s "
                                 f"from {getattr(conn, '_tl_source', '?')}")
            conn.disconnect()
            transport._unknownConnections.discard(conn)  # already closed without its callback: unlist it too


def _install_handshake_deadline() -> None:
    TCPTransport._onTick = _tick_with_deadline  # type: ignore[method-assign]


def _revert_handshake_deadline() -> None:
    TCPTransport._onTick = _original_transport_tick  # type: ignore[method-assign]


# --- accept_queue -----------------------------------------------------------------------------

_original_bind = TcpServer.bind
_original_on_new_connection = TcpServer._TcpServer__onNewConnection  # type: ignore[attr-defined]


def _bind_with_backlog(server: Any) -> None:
    _original_bind(server)
    # Linux takes a second listen() on a listening socket as a new backlog.
    server._TcpServer__socket.listen(RAFT_LISTEN_BACKLOG)


class _AcceptPacer:
    """Accepts a second: :data:`RAFT_ACCEPTS_PER_S`, at most :data:`RAFT_ACCEPTS_PER_EVENT` at once."""

    __slots__ = ("at", "tokens")

    def __init__(self) -> None:
        self.tokens = float(RAFT_ACCEPTS_PER_EVENT)
        self.at = time.monotonic()

    def refill(self, now: float) -> float:
        self.tokens = min(float(RAFT_ACCEPTS_PER_EVENT), self.tokens + (now - self.at) * RAFT_ACCEPTS_PER_S)
        self.at = now
        return self.tokens


def _pacer_of(server: Any) -> _AcceptPacer:
    pacer: _AcceptPacer | None = getattr(server, "_tl_pacer", None)
    if pacer is None:
        pacer = server._tl_pacer = _AcceptPacer()
    return pacer


def _accept_batch(server: Any, descr: int, event: int) -> None:
    # pysyncobj's own handler accepts one connection (or unbinds on a real error): call it while
    # more are queued, up to the batch size and the pace.
    if event & POLL_EVENT_TYPE.READ:
        lsock = server._TcpServer__socket
        pacer = _pacer_of(server)
        probe = select.poll()
        probe.register(lsock.fileno(), select.POLLIN)
        for _ in range(RAFT_ACCEPTS_PER_EVENT):
            if pacer.refill(time.monotonic()) < 1.0:
                # Out of pace: stop listening until a tick finds room (resume_accepting). The
                # connections wait in the kernel's queue; a poller that kept reporting the
                # socket readable would spin.
                server._TcpServer__poller.unsubscribe(descr)
                server._tl_paused = True
                break
            pacer.tokens -= 1.0
            _original_on_new_connection(server, descr, POLL_EVENT_TYPE.READ)
            if server._TcpServer__state != SERVER_STATE.BINDED or not probe.poll(0):
                break
    if event & POLL_EVENT_TYPE.ERROR:
        _original_on_new_connection(server, descr, POLL_EVENT_TYPE.ERROR)


def resume_accepting(server: Any) -> None:
    """On a tick: listen again once the pace has room for an accept."""
    if not getattr(server, "_tl_paused", False) or server._TcpServer__state != SERVER_STATE.BINDED:
        return
    if _pacer_of(server).refill(time.monotonic()) >= 1.0:
        server._tl_paused = False
        server._TcpServer__poller.subscribe(server._TcpServer__fileno, server._TcpServer__onNewConnection,
                                            POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR)


_original_create_server = TCPTransport._createServer


def _create_server_with_resume(transport: Any) -> None:
    _original_create_server(transport)
    server = transport._server
    transport._syncObj.addOnTickCallback(lambda: resume_accepting(server))


def _install_accept_queue() -> None:
    TcpServer.bind = _bind_with_backlog  # type: ignore[method-assign]
    TcpServer._TcpServer__onNewConnection = _accept_batch  # type: ignore[attr-defined]
    TCPTransport._createServer = _create_server_with_resume  # type: ignore[method-assign]


def _revert_accept_queue() -> None:
    TcpServer.bind = _original_bind  # type: ignore[method-assign]
    TcpServer._TcpServer__onNewConnection = _original_on_new_connection  # type: ignore[attr-defined]
    TCPTransport._createServer = _original_create_server  # type: ignore[method-assign]


# --- install ----------------------------------------------------------------------------------

PATCHES: tuple[Patch, ...] = (
    Patch("journal_factory", "pysyncobj's own journal never fsyncs; nodes use the LMDB journal",
          _install_journal_factory, _revert_journal_factory),
    Patch("frame_bound", "a stranger must not make a node buffer a frame of any announced length",
          _install_frame_bound, _revert_frame_bound),
    Patch("socket_timeouts", "a node cut off by a silent partition must rejoin within seconds of healing",
          _install_socket_timeouts, _revert_socket_timeouts),
    Patch("bounded_read", "a stranger's bytes must not freeze the Raft thread or grow the node's memory",
          _install_bounded_read, _revert_bounded_read),
    Patch("accept_limits", "strangers must not hold an unbounded number of Raft connections",
          _install_accept_limits, _revert_accept_limits),
    Patch("handshake_deadline", "a connection that never authenticates must not be held forever",
          _install_handshake_deadline, _revert_handshake_deadline),
    Patch("accept_queue", "a connection flood must not crowd a reconnecting peer out of the accept queue",
          _install_accept_queue, _revert_accept_queue),
)

_installed: list[str] = []
_install_lock = threading.Lock()


class PatchVersionError(RuntimeError):
    """Returned when the installed pysyncobj is not the version these patches were written against."""


def install(only: tuple[str, ...] | None = None) -> list[str]:
    """Apply the patches (all of them, or the named ones), once; returns the names installed.

    Raises :class:`PatchVersionError` unless pysyncobj is exactly ``PYSYNCOBJ_VERSION``."""
    if VERSION != PYSYNCOBJ_VERSION:
        raise PatchVersionError(f"pysyncobj {VERSION} is installed; Tetherlab's patches are written against "
                                f"{PYSYNCOBJ_VERSION} exactly (see pyproject.toml)")
    with _install_lock:
        for patch in PATCHES:
            if (only is None or patch.name in only) and patch.name not in _installed:
                patch.apply()
                _installed.append(patch.name)
        return list(_installed)


def installed() -> list[str]:
    return list(_installed)


@contextlib.contextmanager
def without(name: str) -> Iterator[None]:
    """pysyncobj's own behaviour for ``name`` while the block runs (tests only: a patch's test
    must fail without it), then the patch again if it was installed."""
    patch = next((x for x in PATCHES if x.name == name), None)
    if patch is None:
        raise KeyError(f"no patch named {name!r}; patches: {[x.name for x in PATCHES]}")
    with _install_lock:
        was = name in _installed
        if was:
            patch.revert()
            _installed.remove(name)
    try:
        yield
    finally:
        with _install_lock:
            if was and name not in _installed:
                patch.apply()
                _installed.append(name)
