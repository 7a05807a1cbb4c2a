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
- ``auth_failures``: pysyncobj closes a connection whose frame fails decryption or the
  handshake's random-key check without a word ("Why no logging of security errors?", says its
  source): a node given another cluster secret never joined, and nothing said why. Such a close
  is counted (``failed_authentication``) and reported in the strangers' summary line, naming
  the other end.
- ``handshake_refused``: the node on the other side of such a close hears nothing either: its
  peers close its outgoing connections before answering the handshake. Those closes are
  counted per peer and reported in one warning line per interval.
- ``accept_queue``: listen with a backlog of :data:`RAFT_LISTEN_BACKLOG` (pysyncobj: 5), accept
  up to :data:`RAFT_ACCEPTS_PER_EVENT` connections per poll event (pysyncobj: 1) but at most
  :data:`RAFT_ACCEPTS_PER_S` a second (the listening socket leaves the poller until the next tick
  with room), so a connection flood neither crowds a reconnecting peer out of the accept queue
  nor spends the Raft thread on accepting.

Safety patches (issue 19; docs/design.md, "What pysyncobj gets wrong"), most found by the
deterministic simulator (``tetherlab sim``):

- ``accept_unknown_peers``: a node drops an incoming Raft connection from an address that is
  not in its member list. A member that missed the entry adding a node (it was down) then
  refuses that node's connection; if the new node leads, the lagging member never hears the
  leader and never learns the entry that would let it: it stays behind until leadership moves.
  Accept such a connection (it is authenticated by the cluster secret like any other) without
  making the peer a member: the log decides membership, and the member can then catch up.
- ``removal_on_commit``: pysyncobj applies a membership change when the entry enters the log
  (as Raft does) and, for a removal, drops its connection to the removed node at once. A node
  whose log holds an uncommitted entry removing the node that then leads can no longer answer
  that leader, so the leader never learns where their logs diverge and never repairs it: the
  node is stuck for good. The node leaves the member list at once, but its connection is
  dropped only when the removal is committed (applied), and a rolled-back removal reuses it.
- ``clock_and_rng``: pysyncobj reads time through ``monotonicTime`` and election timeouts through
  ``random``, module-level names of ``pysyncobj.syncobj``; route both through
  :func:`use_clock_and_rng` (the real ones unless a simulator sets its own), so a whole cluster
  can run in one process, deterministic for a seed.
- ``snapshot_files``: pysyncobj's Serializer opens, writes and renames snapshot files itself and
  never fsyncs a received one; route that I/O through a ``replica.files.Files`` (the real file
  system unless one is registered for the path) and make every rename durable (file fsynced
  before, directory fsynced after), so a crash leaves the old snapshot or the whole new one and
  the log is never compacted past a snapshot that is not on disk.
- ``load_dump_keeps_log`` (the compaction window): the snapshot is written and the log prefix
  deleted a tick later; pysyncobj's ``__loadDumpFile`` clears the journal down to the snapshot's
  two entries whenever the log does not start exactly there, so a crash between the two steps
  dropped fsynced, acknowledged entries after the snapshot. Keep every entry from the snapshot on
  when the log holds the snapshot's entries; only delete the prefix the crash left behind. The
  same for a snapshot received from the leader (Raft: retain the entries following it).
- ``snapshot_commit``: an append-entries carrying ``serialized`` (a snapshot chunk, or ``None``
  while the leader is snapshotting) skips log matching and then set the commit index to
  ``min(leaderCommit, own last index)``, committing (and applying) a deposed leader's divergent
  entries. Such a message may only commit what is verified: up to the applied index, which
  after a snapshot install is the snapshot's last entry.
- ``keep_committed_entries``: a follower deletes every entry after an append-entries' ``prevLogIdx``
  and re-adds the ones the message carries, even when they match; a leader whose view of the
  follower is behind (after a reset) makes it drop committed, applied entries. With a snapshot
  taken meanwhile, the compaction a tick later can then delete the whole log (an empty journal
  crashes every tick after). Entries up to the follower's commit index are the leader's (Log
  Matching): such a message is read as starting at the commit index, so nothing committed is
  ever deleted.
- ``next_index_monotonic``: a leader sets a follower's next index to whatever a success answer
  says, so a burst of late answers to old append-entries walks it back below entries already
  sent, and past the compacted log start: the leader then sends a whole snapshot the follower
  does not need. A success answer only ever moves the next index forward.
- ``older_snapshot_ignored``: a follower installs whatever snapshot arrives, even one older than
  what it has applied: the older file replaces its own snapshot, its log is cleared back to the
  older one and its applied index goes backwards (Raft: a snapshot the follower has already
  passed is ignored). Such a snapshot is dropped and acknowledged.
- ``compaction_guard``: compaction deletes the log up to the snapshot taken a tick earlier even
  if the log was replaced meanwhile (a snapshot installed from the leader): it could delete every
  entry, and an empty journal crashes every later tick. Compaction needs the log to hold the
  snapshot's last entry, else it waits for the next snapshot.
- ``snapshot_send_no_spin``: right after a snapshot (until the next tick notices it is done) the
  Serializer answers ``None`` to "next chunk", and the leader's append-entries loop then sends
  ``serialized: None`` to a follower that needs the snapshot, over and over, until a whole
  heartbeat period has passed on the clock. Without fork the snapshot is complete when
  ``serialize`` returns: send it.
- ``pre_vote``: a node whose election timer fires first asks whether it could win (a pre-vote at
  term + 1 that changes no one's term or vote) and starts an election only with a majority, so
  a node that was paused or cut off cannot depose a healthy leader by bumping the term.
- ``term_notice``: pysyncobj's answers to append-entries carry no term, and a node ignores
  append-entries from a lower term silently; a node whose term got ahead (an election it could
  not finish) then never rejoins once pre-vote and stickiness stop it from disrupting the leader.
  It answers a stale leader with its term, and a node told of a higher term adopts it (as Raft
  requires of any message with a higher term) and steps down.
- ``leader_stickiness`` (CheckQuorum-like): a node that heard from a leader within the minimum
  election timeout (or is the leader) refuses votes and pre-votes, except for a leadership
  transfer the leader asked for (its campaign is marked ``tl_transfer``).

Performance (issue 13):

- ``leader_commit_durable``: a leader sends its append-entries before its own fsync (the journal
  is flushed once per tick, after the sends: ``raft.flush_before_send``), so its fsync overlaps the
  round trip and the followers' fsyncs. Raft allows that only if the leader counts itself toward
  a commit for the entries it has made durable; pysyncobj's leader commit counts the leader for
  every index of its log. It counts the leader up to its journal's ``durable_last_index()``.
- ``chunked_entries``: an entry of at least ``appendEntriesBatchSizeBytes`` (64 KiB) goes out in
  chunks of its pickle, and pysyncobj marks a chunk ``finish`` when it reaches the entry's *data*
  length; for data within the pickle's framing (54 bytes in protocol 2, fewer in 5) under a
  multiple of the batch size (from twice it: concept pushes reach 256 KiB) the follower gets a
  premature ``finish``, unpickles a truncated entry and its tick raises (the entry arrives with
  the real last chunk, after a stalled tick). The chunk that ends the pickle is the last.
- ``pickle_protocol``: pysyncobj pickles every command, log entry and Raft message with pickle
  protocol 2, which has no opcode for bytes: each payload went through a latin-1 string and
  ``_codecs.encode``, both ways, at five times the cost of :data:`PICKLE_PROTOCOL` (8% of a busy
  leader's GIL). Every Python a node runs on reads protocol 5, and entries or messages written
  with protocol 2 (older nodes, older logs) still load: pickle reads the protocol from the data.

Liveness under long applies (issue 13: a 10,000-concept registry push applies for over a second):

- ``heavy_apply_sends_first``: a leader applies what it committed before its tick sends, so its
  followers learn a new commit index only after the apply; a long one kept them idle and silent
  past an election timeout. When a committed entry of at least ``appendEntriesBatchSizeBytes``
  waits to be applied, the leader sends first: its followers apply alongside it.
- ``heavy_apply_leader_waits``: a follower answers nothing while it applies, and a leader that hears
  from no majority for ``leaderFallbackTimeout`` steps down: followers decode and validate a push
  the leader applies from its decoded command, so they took 2 to 3 times as long, and a push of
  30,000 concepts made the leader step down (about 5 s without a leader). For
  ``FOLLOWERS_BUSY_FACTOR`` times its own heavy apply's duration, the leader does not.
- ``stall_grace``: a follower's tick checks the election timer before it reads what arrived, so
  one that spent a second applying (or was stopped) campaigned on an expired timer. A tick that
  starts more than ``STALL_GRACE_FRACTION`` of the minimum election timeout after the previous
  one gives the leader a fresh timeout first, once per message heard from the leader.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import logging
import os
import pickle as _std_pickle
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pysyncobj.pickle as _pysyncobj_pickle
import pysyncobj.serializer as _serializer_mod
import pysyncobj.syncobj as _syncobj_mod
import pysyncobj.tcp_connection as _tcp_mod
import pysyncobj.transport as _transport_mod
from pysyncobj.node import TCPNode
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.syncobj import SyncObj
from pysyncobj.tcp_connection import TcpConnection
from pysyncobj.tcp_server import SERVER_STATE, TcpServer
from pysyncobj.transport import TCPTransport, TransportNotReadyError
from pysyncobj.version import VERSION

from tetherlab.cluster.replica.files import Files, OsFiles
from tetherlab.cluster.replica.store import read_snapshot_header

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


# --- frame_bound and auth_failures: both wrap pysyncobj's frame parser ------------------------

_original_parse = TcpConnection._TcpConnection__processParseMessage  # type: ignore[attr-defined]
_parse_patches: set[str] = set()  # which of the two are installed: one wrapper serves both


def _patched_parse(conn: TcpConnection) -> Any:
    if "frame_bound" in _parse_patches:
        buf = conn._TcpConnection__readBuffer  # type: ignore[attr-defined]
        if len(buf) >= _FRAME_LEN.size:
            (n,) = _FRAME_LEN.unpack_from(buf)
            if n < 0 or n > RAFT_FRAME_MAX_BYTES:
                log.warning("dropping a raft connection that announced a %d-byte frame", n)
                conn.disconnect()
                return None
    if "auth_failures" not in _parse_patches:
        return _original_parse(conn)
    sock = conn._TcpConnection__socket  # type: ignore[attr-defined]
    message = _original_parse(conn)
    # Only a failed check closes the socket in there (an incomplete frame returns None and keeps it).
    if message is None and sock is not None and conn._TcpConnection__socket is None:  # type: ignore[attr-defined]
        rx: _FrameReader | None = getattr(conn, "_tl_rx", None)
        peer = rx.peer if rx is not None and rx.sock is sock else _peer_name(sock)
        TRANSPORT_STATS.drop("failed_authentication",
                             f"{peer} sent a frame that failed the cluster secret's check (a stranger, or a "
                             f"node configured with another cluster.secret)")
    return message


def _parse_patch(name: str) -> tuple[Callable[[], None], Callable[[], None]]:
    def set_to(on: bool) -> None:
        (_parse_patches.add if on else _parse_patches.discard)(name)
        TcpConnection._TcpConnection__processParseMessage = (  # type: ignore[attr-defined]
            _patched_parse if _parse_patches else _original_parse)

    return (lambda: set_to(True)), (lambda: set_to(False))


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


class _Summary:
    """Counts by key, reported at most once per ``interval_s`` with what changed since the last
    report: one log line per interval whatever the flood's size (logging must not become it)."""

    def __init__(self, interval_s: float, keys: tuple[str, ...] = ()) -> None:
        self.interval_s = interval_s
        self.counts: dict[str, int] = dict.fromkeys(keys, 0)
        self._logged: dict[str, int] = dict(self.counts)
        self._last = 0.0

    def count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def due(self, now: float) -> dict[str, int] | None:
        """The counts since the last report when a report is due now, else None."""
        if now - self._last < self.interval_s:
            return None
        self._last = now
        since = {k: v - self._logged.get(k, 0) for k, v in self.counts.items() if v != self._logged.get(k, 0)}
        self._logged = dict(self.counts)
        return since


class TransportStats:
    """Counts of strangers dropped by the patches below, per process (one node per process).

    ``dropped`` keys: ``frame_too_large`` (a frame over the bound for the connection's state),
    ``handshake_deadline`` (no authentication in time), ``evicted`` (closed to make room under
    an unauthenticated-connection cap), ``failed_authentication`` (a frame that failed the
    cluster secret's check: a stranger, or a node configured with another secret)."""

    REASONS = ("frame_too_large", "handshake_deadline", "evicted", "failed_authentication")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._summary = _Summary(_DROP_LOG_INTERVAL_S, self.REASONS)
        self.dropped: dict[str, int] = self._summary.counts
        self.slices_cut = 0  # poll events whose read stopped at the slice bound with data left

    def drop(self, reason: str, detail: str) -> None:
        with self._lock:
            self._summary.count(reason)
            since = self._summary.due(time.monotonic())
        if since is None:
            return
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

    __slots__ = ("armed", "authenticated", "frame", "head", "head_n", "n", "peer", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.peer = _peer_name(sock)  # once per socket: a report after it is closed names it
        self.head = bytearray(_FRAME_HEADER_BYTES)
        self.head_n = 0
        self.frame: bytearray | None = None  # header + body, once the header is accepted
        self.n = 0  # bytes of ``frame`` filled
        # The frame handed to pysyncobj last was parsed with its random-key check armed: if the
        # connection still exists at the next read, the sender knows the cluster secret.
        self.armed = False
        self.authenticated = False


def _peer_name(sock: Any) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except (OSError, AttributeError, TypeError, ValueError):
        return "an unknown address"
    return f"{host}:{port}"


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


# --- handshake_refused --------------------------------------------------------------------------

_original_outgoing_connected = TCPTransport._onOutgoingConnected
_original_outgoing_message = TCPTransport._onOutgoingMessageReceived
_original_transport_disconnected = TCPTransport._onDisconnected
_REFUSED_LOG_INTERVAL_S = 10.0  # one line per interval, however many peers refuse
# A peer stopping may close one handshake; a peer with another secret closes every one (about
# two a second): warn once a peer has closed this many within the window.
_REFUSED_WARN_MIN = 3
_REFUSED_WINDOW_S = 30.0


class HandshakeRefusals:
    """Outgoing Raft connections the peer closed before answering the handshake, per peer
    address. The node whose secret differs from its peers' sees only this: they close its
    connections before it reads anything that could fail its own check."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._summary = _Summary(_REFUSED_LOG_INTERVAL_S)
        self.by_peer: dict[str, int] = self._summary.counts  # peers are the members: a bounded set
        self._recent: dict[str, collections.deque[float]] = {}

    def note(self, peer: str) -> None:
        with self._lock:
            self._summary.count(peer)
            now = time.monotonic()
            recent = self._recent.setdefault(peer, collections.deque(maxlen=_REFUSED_WARN_MIN))
            recent.append(now)
            if len(recent) < _REFUSED_WARN_MIN or now - recent[0] > _REFUSED_WINDOW_S:
                return
            since = self._summary.due(now)
        if since is None:
            return
        log.warning("raft peers closed our connection before answering the handshake (since the last report: "
                    "%s): they are restarting, or their cluster.secret differs from ours", since)


HANDSHAKES_REFUSED = HandshakeRefusals()


def _outgoing_connected(self: Any, conn: Any) -> None:
    if self._syncObj.encryptor:
        conn._tl_handshake_open = True  # until the peer's first frame arrives
    _original_outgoing_connected(self, conn)


def _outgoing_message(self: Any, conn: Any, message: Any) -> None:
    conn._tl_handshake_open = False
    _original_outgoing_message(self, conn, message)


def _transport_disconnected(self: Any, conn: Any) -> None:
    if getattr(conn, "_tl_handshake_open", False):
        conn._tl_handshake_open = False
        node = self._connToNode(conn)
        HANDSHAKES_REFUSED.note(node.address if node is not None else "an unknown peer")
    _original_transport_disconnected(self, conn)


def _install_handshake_refused() -> None:
    TCPTransport._onOutgoingConnected = _outgoing_connected  # type: ignore[method-assign]
    TCPTransport._onOutgoingMessageReceived = _outgoing_message  # type: ignore[method-assign]
    TCPTransport._onDisconnected = _transport_disconnected  # type: ignore[method-assign]


def _revert_handshake_refused() -> None:
    TCPTransport._onOutgoingConnected = _original_outgoing_connected  # type: ignore[method-assign]
    TCPTransport._onOutgoingMessageReceived = _original_outgoing_message  # type: ignore[method-assign]
    TCPTransport._onDisconnected = _original_transport_disconnected  # type: ignore[method-assign]


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


# --- accept_unknown_peers ----------------------------------------------------------------------

_original_incoming = TCPTransport._onIncomingMessageReceived


def _looks_like_address(message: Any) -> bool:
    if not isinstance(message, str) or message == "readonly" or ":" not in message or len(message) > 300:
        return False
    port = message.rsplit(":", 1)[1]
    return port.isdigit() and 0 < int(port) < 65536


def _incoming_accepting_unknown(self: Any, conn: Any, message: Any) -> None:
    encrypted_ready = not self._syncObj.encryptor or conn.sendRandKey
    if encrypted_ready and _looks_like_address(message) and message not in self._nodeAddrToNode:
        node = TCPNode(message)
        self._unknownConnections.discard(conn)
        self._connections[node] = conn
        conn.setOnMessageReceivedCallback(functools.partial(self._onMessageReceived, node))
        self._onNodeConnected(node)
        return
    _original_incoming(self, conn, message)


def _install_accept_unknown_peers() -> None:
    TCPTransport._onIncomingMessageReceived = _incoming_accepting_unknown  # type: ignore[method-assign]


def _revert_accept_unknown_peers() -> None:
    TCPTransport._onIncomingMessageReceived = _original_incoming  # type: ignore[method-assign]


# --- removal_on_commit -------------------------------------------------------------------------

_original_change_cluster = SyncObj._SyncObj__doChangeCluster  # type: ignore[attr-defined]
_original_apply_command = SyncObj._SyncObj__doApplyCommand  # type: ignore[attr-defined]


def _change_cluster_dropping_on_commit(self: Any, request: Any, reverse: bool = False) -> Any:
    pending: dict[Any, Any] = self.__dict__.setdefault("_tlp_pending_drops", {})
    kind = request[0]
    node_id = request[1]
    removing = (kind == "rem" and not reverse) or (kind == "add" and reverse)
    if self.__dict__.get("_tlp_applying") and kind == "rem" and not reverse and node_id in pending:
        self._SyncObj__transport.dropNode(pending.pop(node_id))  # the removal is committed now
        return True
    if not removing and node_id in pending:
        # A removal rolled back (a truncated entry): the node is back, on the connection it kept.
        node = pending.pop(node_id)
        self._SyncObj__otherNodes.add(node)
        self._SyncObj__raftNextIndex[node] = self._SyncObj__getCurrentLogIndex() + 1
        self._SyncObj__raftMatchIndex[node] = 0
        return True
    if kind == "rem" and not reverse and not self.__dict__.get("_tlp_applying"):
        transport = self._SyncObj__transport
        dropped: list[Any] = []
        transport.dropNode = dropped.append  # keep the connection: the entry is not committed yet
        try:
            done = _original_change_cluster(self, request, reverse)
        finally:
            del transport.dropNode
        for node in dropped:
            pending[node.id] = node
        return done
    return _original_change_cluster(self, request, reverse)


def _apply_command_marked(self: Any, command: Any) -> Any:
    self.__dict__["_tlp_applying"] = True
    try:
        return _original_apply_command(self, command)
    finally:
        self.__dict__["_tlp_applying"] = False


def _install_removal_on_commit() -> None:
    SyncObj._SyncObj__doChangeCluster = _change_cluster_dropping_on_commit  # type: ignore[attr-defined]
    SyncObj._SyncObj__doApplyCommand = _apply_command_marked  # type: ignore[attr-defined]


def _revert_removal_on_commit() -> None:
    SyncObj._SyncObj__doChangeCluster = _original_change_cluster  # type: ignore[attr-defined]
    SyncObj._SyncObj__doApplyCommand = _original_apply_command  # type: ignore[attr-defined]


# --- clock_and_rng ----------------------------------------------------------------------------

_original_monotonic = _syncobj_mod.monotonicTime
_original_random_module = _syncobj_mod.random


class _ClockAndRng:
    def __init__(self) -> None:
        self.monotonic: Callable[[], float] = _original_monotonic
        self.rng: Any = random


_CLOCK = _ClockAndRng()


def use_clock_and_rng(monotonic: Callable[[], float] | None = None, rng: Any = None) -> None:
    """Give pysyncobj this clock and this random source (``None``: the real ones).

    One process-wide setting: a simulator runs every node on one thread and sets it once."""
    _CLOCK.monotonic = monotonic or _original_monotonic
    _CLOCK.rng = rng or random


def _routed_monotonic() -> float:
    return _CLOCK.monotonic()


class _RoutedRandom:
    """Stands in for the ``random`` module inside pysyncobj.syncobj."""

    def random(self) -> float:
        return float(_CLOCK.rng.random())

    def __getattr__(self, name: str) -> Any:
        return getattr(_CLOCK.rng, name)


def _install_clock_and_rng() -> None:
    _syncobj_mod.monotonicTime = _routed_monotonic
    _syncobj_mod.random = _RoutedRandom()  # type: ignore[assignment]


def _revert_clock_and_rng() -> None:
    _syncobj_mod.monotonicTime = _original_monotonic
    _syncobj_mod.random = _original_random_module


# --- snapshot_files ---------------------------------------------------------------------------

_FILES: dict[str, Files] = {}  # path prefix -> the files behind it
_OS_FILES = OsFiles()
_original_atomic_replace = _serializer_mod.atomicReplace


def register_files(prefix: str, files: Files) -> None:
    """pysyncobj's snapshot I/O on paths starting with ``prefix`` goes to ``files``."""
    _FILES[prefix] = files


def unregister_files(prefix: str) -> None:
    _FILES.pop(prefix, None)


def files_for(path: str) -> Files:
    best: tuple[int, Files] | None = None
    for prefix, files in _FILES.items():
        if path.startswith(prefix) and (best is None or len(prefix) > best[0]):
            best = (len(prefix), files)
    return best[1] if best is not None else _OS_FILES


def _serializer_open(path: str, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
    return files_for(str(path)).open(str(path), mode)


def durable_replace(src: str, dst: str) -> None:
    """Rename ``src`` over ``dst`` so that a crash leaves the old file or the whole new one."""
    files = files_for(dst)
    files.fsync_path(src)
    files.replace(src, dst)
    files.fsync_dir(os.path.dirname(dst))


class _PathProxy:
    """``os.path`` inside pysyncobj.syncobj, with ``isfile`` asking the registered files."""

    def __getattr__(self, name: str) -> Any:
        return getattr(os.path, name)

    @staticmethod
    def isfile(path: Any) -> bool:
        return files_for(str(path)).isfile(str(path))


class _OsProxy:
    path = _PathProxy()

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def _install_snapshot_files() -> None:
    _serializer_mod.open = _serializer_open  # type: ignore[attr-defined]  # shadows the builtin
    _serializer_mod.atomicReplace = durable_replace
    _syncobj_mod.os = _OsProxy()  # type: ignore[assignment]


def _revert_snapshot_files() -> None:
    if "open" in vars(_serializer_mod):
        del _serializer_mod.open  # type: ignore[attr-defined]
    _serializer_mod.atomicReplace = _original_atomic_replace
    _syncobj_mod.os = os


# --- load_dump_keeps_log -------------------------------------------------------------------------

_original_load_dump = SyncObj._SyncObj__loadDumpFile  # type: ignore[attr-defined]
_sync_log = logging.getLogger("pysyncobj.syncobj")


def _keep_log_after(log: Any, prev: Any, last: Any) -> bool:
    """If the log holds the snapshot's two entries, drop only what precedes them; True if kept."""
    if len(log) < 2:
        return False
    first = log[0][1]
    pos = last[1] - first
    if pos < 1 or pos >= len(log) or tuple(log[pos]) != tuple(last) or tuple(log[pos - 1]) != tuple(prev):
        return False
    if pos > 1:
        log.deleteEntriesTo(pos - 1)  # the compaction the crash interrupted
    return True


def _load_dump_keeping_log(self: Any, clearJournal: bool) -> None:
    # pysyncobj 0.3.17's __loadDumpFile, except for the journal condition (see the docstring).
    try:
        data = self._SyncObj__serializer.deserialize()
        if data[0] is not None:
            if self._SyncObj__consumers:
                self_data, consumers_data = data[0][0], data[0][1:]
            else:
                self_data, consumers_data = data[0], []
            for k, v in self_data.items():
                self.__dict__[k] = v
            for i, consumer in enumerate(self._SyncObj__consumers):
                consumer._deserialize(consumers_data[i])
        log = self._SyncObj__raftLog
        last, prev = data[1], data[2]
        # A received snapshot (clearJournal) keeps the log after it too when the log holds its last
        # entry (Raft: "retain log entries following it"): they are acknowledged entries as well.
        if not _keep_log_after(log, prev, last):
            log.clear()
            log.add(*prev)
            log.add(*last)
        self._SyncObj__raftLastApplied = last[1]
        current = log[-1][1]
        if self._SyncObj__raftCommitIndex > current:
            _sync_log.warning("raftCommitIndex (%d) exceeds journal end (%d) after loading dump; clamping",
                              self._SyncObj__raftCommitIndex, current)
            self._SyncObj__raftCommitIndex = current
            log.setRaftCommitIndex(current)
        if self._SyncObj__conf.dynamicMembershipChange:
            self._SyncObj__updateClusterConfiguration([n for n in data[3] if n != self._SyncObj__selfNode])
        self._SyncObj__onSetCodeVersion(0)
    except Exception:
        _sync_log.exception("failed to load full dump")


def _install_load_dump_keeps_log() -> None:
    SyncObj._SyncObj__loadDumpFile = _load_dump_keeping_log  # type: ignore[attr-defined]


def _revert_load_dump_keeps_log() -> None:
    SyncObj._SyncObj__loadDumpFile = _original_load_dump  # type: ignore[attr-defined]


# --- compaction_guard --------------------------------------------------------------------------------

_original_delete_entries_to = SyncObj._SyncObj__deleteEntriesTo  # type: ignore[attr-defined]


def _delete_entries_to_guarded(self: Any, toIDx: int) -> None:
    log = self._SyncObj__raftLog
    if not len(log) or log[-1][1] < toIDx + 1:
        _sync_log.info("compaction up to %d skipped: the log (to %s) no longer holds that snapshot", toIDx,
                       log[-1][1] if len(log) else None)
        return
    _original_delete_entries_to(self, toIDx)


def _install_compaction_guard() -> None:
    SyncObj._SyncObj__deleteEntriesTo = _delete_entries_to_guarded  # type: ignore[attr-defined]


def _revert_compaction_guard() -> None:
    SyncObj._SyncObj__deleteEntriesTo = _original_delete_entries_to  # type: ignore[attr-defined]


# --- snapshot_send_no_spin -------------------------------------------------------------------------

_original_get_transmission = _serializer_mod.Serializer.getTransmissionData


def _get_transmission_data(self: Any, transmissionID: Any) -> Any:
    pid = self._Serializer__pid
    if pid < 0:  # -1 done, -2 failed: in-process, so the file on disk is whole (the new or the old one)
        self._Serializer__pid = 0
        try:
            return _original_get_transmission(self, transmissionID)
        finally:
            self._Serializer__pid = pid
    return _original_get_transmission(self, transmissionID)


def _install_snapshot_send_no_spin() -> None:
    _serializer_mod.Serializer.getTransmissionData = _get_transmission_data  # type: ignore[method-assign]


def _revert_snapshot_send_no_spin() -> None:
    _serializer_mod.Serializer.getTransmissionData = _original_get_transmission  # type: ignore[method-assign]


# --- snapshot_commit, pre_vote, leader_stickiness: one message hook and one tick hook -------------
#
# Each of these patches is a flag read by the two hooks below, so any one of them can be reverted
# on its own (``without``) while the others stay.

_FOLLOWER, _CANDIDATE, _LEADER = 0, 1, 2
_active: set[str] = set()
_original_on_message = SyncObj._SyncObj__onMessageReceived  # type: ignore[attr-defined]
_original_on_tick = SyncObj._onTick
PRE_VOTE_REQUEST = "tl_pre_vote"
PRE_VOTE_RESPONSE = "tl_pre_vote_response"
TRANSFER_FLAG = "tl_transfer"
TERM_NOTICE = "tl_term_notice"


def _now() -> float:
    return float(_syncobj_mod.monotonicTime())


def heard_from_leader_recently(so: Any) -> bool:
    """This node is the leader, or accepted an append-entries within the minimum election timeout."""
    if so._SyncObj__raftState == _LEADER:
        return True
    heard = so.__dict__.get("_tlp_leader_heard_at")
    return heard is not None and _now() - heard < so._SyncObj__conf.raftMinTimeout


def _log_up_to_date(so: Any, message: dict[str, Any]) -> bool:
    my_term, my_idx = so._SyncObj__getCurrentLogTerm(), so._SyncObj__getCurrentLogIndex()
    theirs = (message["last_log_term"], message["last_log_index"])
    return theirs >= (my_term, my_idx)


def _on_message(self: Any, node: Any, message: Any) -> None:
    kind = message.get("type") if isinstance(message, dict) else None
    if kind == "next_node_idx" and node not in self._SyncObj__raftMatchIndex \
            and _active & {"accept_unknown_peers", "removal_on_commit"}:
        return  # an answer from a node that is not (or no longer) a member: pysyncobj would raise KeyError
    if kind == "next_node_idx" and "next_index_monotonic" in _active and message.get("success") \
            and not message.get("reset") and self._SyncObj__raftState == _LEADER:
        before = self._SyncObj__raftNextIndex.get(node)
        _original_on_message(self, node, message)
        if before is not None and self._SyncObj__raftNextIndex.get(node, before) < before:
            self._SyncObj__raftNextIndex[node] = before
        return
    if kind == "append_entries" and message["term"] >= self._SyncObj__raftCurrentTerm:
        self.__dict__["_tlp_leader_heard_at"] = _now()
        self.__dict__.pop("_tlp_prevote_won", None)  # a leader exists: no election after all
    if kind == "append_entries" and "term_notice" in _active and message["term"] < self._SyncObj__raftCurrentTerm:
        self._SyncObj__transport.send(node, {"type": TERM_NOTICE, "term": self._SyncObj__raftCurrentTerm})
        return
    if kind == TERM_NOTICE:
        if "term_notice" in _active and message["term"] > self._SyncObj__raftCurrentTerm:
            _adopt_term(self, message["term"])
        return
    if kind in (PRE_VOTE_REQUEST, PRE_VOTE_RESPONSE):
        if "pre_vote" in _active or "leader_stickiness" in _active:
            _on_pre_vote_message(self, node, message)
        return
    if kind == "request_vote" and "leader_stickiness" in _active and not message.get(TRANSFER_FLAG) \
            and heard_from_leader_recently(self):
        return  # CheckQuorum: a live leader is not deposed by a node that merely stopped hearing it
    if kind == "append_entries" and "prevLogIdx" not in message and "snapshot_commit" in _active:
        _on_snapshot_message(self, node, message)
        return
    if kind == "append_entries" and "keep_committed_entries" in _active and "transmission" not in message \
            and message["term"] >= self._SyncObj__raftCurrentTerm:
        message = _from_commit_index(self, message)
    _original_on_message(self, node, message)


def _from_commit_index(self: Any, message: dict[str, Any]) -> dict[str, Any]:
    commit = self._SyncObj__raftCommitIndex
    prev = message.get("prevLogIdx")
    log = self._SyncObj__raftLog
    if prev is None or prev >= commit or not len(log):
        return message
    first, last = log[0][1], log[-1][1]
    if not first <= prev <= commit <= last:
        return message
    entries = message.get("entries") or []
    return {**message, "prevLogIdx": commit, "prevLogTerm": log[commit - first][2],
            "entries": [e for e in entries if e[1] > commit]}


def _on_snapshot_message(self: Any, node: Any, message: dict[str, Any]) -> None:
    accepted = message["term"] >= self._SyncObj__raftCurrentTerm
    leader_commit = message["commit_index"]
    if accepted and "older_snapshot_ignored" in _active and _incoming_snapshot_is_old(self, message):
        # The leader's bookkeeping, term and timers as for any append-entries, but no install.
        _original_on_message(self, node, {**message, "serialized": None,
                                          "commit_index": self._SyncObj__raftCommitIndex})
        self._SyncObj__sendNextNodeIdx(node, success=True)
        return
    _original_on_message(self, node, {**message, "commit_index": self._SyncObj__raftCommitIndex})
    if not accepted:
        return
    self._SyncObj__leaderCommitIndex = leader_commit
    # Nothing in this message matched the log against the leader's: only what this node has
    # applied (after an install, the snapshot's last entry) is known to be committed.
    target = min(leader_commit, self._SyncObj__raftLastApplied, self._SyncObj__getCurrentLogIndex())
    if target > self._SyncObj__raftCommitIndex:
        self._SyncObj__raftCommitIndex = target
        self._SyncObj__raftLog.setRaftCommitIndex(target)


def _incoming_snapshot_is_old(self: Any, message: dict[str, Any]) -> bool:
    """The last chunk of a snapshot whose last entry this node has already applied: the rest of
    it is in the serializer's incoming file, which is discarded."""
    serialized = message.get("serialized")
    if serialized is None or not serialized[2]:
        return False
    serializer = self._SyncObj__serializer
    incoming = serializer._Serializer__incomingTransmissionFile
    path = f"{self._SyncObj__conf.fullDumpFile}.1.tmp"
    if incoming is None:
        return False
    incoming.flush()
    files = files_for(path)
    try:
        header = read_snapshot_header(Path(path), files=files)[0]
        last = int(header["last"][1])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return False  # not one of ours: pysyncobj's own path decides
    if last > self._SyncObj__raftLastApplied:
        return False
    incoming.close()
    serializer._Serializer__incomingTransmissionFile = None
    _sync_log.info("ignoring a snapshot up to %d: this node applied up to %d", last,
                   self._SyncObj__raftLastApplied)
    return True


def _on_pre_vote_message(self: Any, node: Any, message: dict[str, Any]) -> None:
    if message["type"] == PRE_VOTE_REQUEST:
        granted = (message["term"] > self._SyncObj__raftCurrentTerm and _log_up_to_date(self, message)
                   and not ("leader_stickiness" in _active and heard_from_leader_recently(self)))
        self._SyncObj__transport.send(node, {"type": PRE_VOTE_RESPONSE, "term": message["term"], "granted": granted,
                                             "voter_term": self._SyncObj__raftCurrentTerm})
        return
    voter_term = message.get("voter_term", 0)
    if voter_term > self._SyncObj__raftCurrentTerm:
        # A refusal from a later term: adopt it (as any Raft message with a higher term would make
        # this node do), or two nodes stuck in different terms could refuse each other forever.
        _adopt_term(self, voter_term)
        return
    rnd = self.__dict__.get("_tlp_round")
    if not message.get("granted") or rnd is None or rnd["term"] != message["term"] \
            or self._SyncObj__raftCurrentTerm + 1 != message["term"] \
            or self._SyncObj__raftState == _LEADER:
        return
    rnd["grants"].add(node.id)
    if len(rnd["grants"]) + 1 > (len(self._SyncObj__otherNodes) + 1) / 2:
        self.__dict__["_tlp_round"] = None
        self.__dict__["_tlp_prevote_won"] = True
        self._SyncObj__raftElectionDeadline = 0  # the next tick starts the real election


def _adopt_term(self: Any, term: int) -> None:
    self._SyncObj__setCurrentTerm(term, None)
    self._SyncObj__setState(_FOLLOWER)
    self._SyncObj__raftLeader = None
    self.__dict__["_tlp_round"] = None


def _start_election(self: Any, transfer: bool) -> None:
    # pysyncobj 0.3.17's election start (in _onTick), with a transfer campaign marked as such.
    self._SyncObj__raftElectionDeadline = _now() + self._SyncObj__generateRaftTimeout()
    self._SyncObj__transferInProgress = False
    self._SyncObj__raftLeader = None
    self._SyncObj__setState(_CANDIDATE)
    self._SyncObj__setCurrentTerm(self._SyncObj__raftCurrentTerm + 1, self._SyncObj__selfNode.id)
    self._SyncObj__votesCount = 1
    vote = {
        "type": "request_vote",
        "term": self._SyncObj__raftCurrentTerm,
        "last_log_index": self._SyncObj__getCurrentLogIndex(),
        "last_log_term": self._SyncObj__getCurrentLogTerm(),
    }
    if transfer:
        vote[TRANSFER_FLAG] = True
    for other in self._SyncObj__otherNodes:
        self._SyncObj__transport.send(other, dict(vote))
    self._SyncObj__onLeaderChanged()
    if self._SyncObj__votesCount > (len(self._SyncObj__otherNodes) + 1) / 2:
        self._SyncObj__onBecomeLeader()


def _on_tick(self: Any, timeToWait: float = 0.0) -> None:
    if "stall_grace" in _active:
        _grace_after_stall(self)
    if "_tlp_heavy_tick_at" in self.__dict__:
        _note_heavy_apply(self, _now())
    if ("pre_vote" in _active or "leader_stickiness" in _active) and self._SyncObj__selfNode is not None \
            and self._SyncObj__raftState in (_FOLLOWER, _CANDIDATE) and self._SyncObj__transport.ready \
            and self._SyncObj__raftElectionDeadline < _now() and self._SyncObj__connectedToAnyone():
        if self._SyncObj__transferInProgress:
            _start_election(self, transfer="leader_stickiness" in _active)
        elif "pre_vote" not in _active or self.__dict__.pop("_tlp_prevote_won", False):
            _start_election(self, transfer=False)
        else:
            _start_pre_vote(self)
    if _active & {"leader_commit_durable", "heavy_apply_sends_first"}:
        _patched_tick(self, timeToWait)
    else:
        _original_on_tick(self, timeToWait)


def _start_pre_vote(self: Any) -> None:
    self._SyncObj__raftElectionDeadline = _now() + self._SyncObj__generateRaftTimeout()
    term = self._SyncObj__raftCurrentTerm + 1
    if not self._SyncObj__otherNodes:  # a single node wins its own pre-vote
        _start_election(self, transfer=False)
        return
    self.__dict__["_tlp_round"] = {"term": term, "grants": set()}
    req = {"type": PRE_VOTE_REQUEST, "term": term, "last_log_index": self._SyncObj__getCurrentLogIndex(),
           "last_log_term": self._SyncObj__getCurrentLogTerm()}
    for other in self._SyncObj__otherNodes:
        self._SyncObj__transport.send(other, dict(req))


def _hooks_needed() -> bool:
    return bool(_active)


def _set_active(name: str, on: bool) -> None:
    if on:
        _active.add(name)
        SyncObj._SyncObj__onMessageReceived = _on_message  # type: ignore[attr-defined]
        SyncObj._onTick = _on_tick  # type: ignore[method-assign]
    else:
        _active.discard(name)
        if not _hooks_needed():
            SyncObj._SyncObj__onMessageReceived = _original_on_message  # type: ignore[attr-defined]
            SyncObj._onTick = _original_on_tick  # type: ignore[method-assign]


def _flag(name: str, also: tuple[Callable[[], None], Callable[[], None]] | None = None,
          ) -> tuple[Callable[[], None], Callable[[], None]]:
    def apply() -> None:
        _set_active(name, True)
        if also is not None:
            also[0]()

    def revert() -> None:
        _set_active(name, False)
        if also is not None:
            also[1]()

    return apply, revert

# --- leader_commit_durable ------------------------------------------------------------------------


def durable_index(so: Any) -> int:
    """The last log index ``so``'s journal has made durable (pysyncobj's own journals know no such
    thing: their last index, which is what pysyncobj assumes)."""
    log = so._SyncObj__raftLog
    last = int(log[-1][1])
    durable = getattr(log, "durable_last_index", None)
    return last if durable is None else min(int(durable()), last)


def _leader_commit(self: Any) -> None:
    # pysyncobj 0.3.17's leader commit (the first half of _onTick's leader branch), with the one
    # change: the leader counts itself for an index only once its journal made it durable.
    durable = durable_index(self) if "leader_commit_durable" in _active else self._SyncObj__getCurrentLogIndex()
    commitIdx = self._SyncObj__raftCommitIndex
    nextCommitIdx = self._SyncObj__raftCommitIndex
    while commitIdx < self._SyncObj__getCurrentLogIndex():
        commitIdx += 1
        count = 1 if commitIdx <= durable else 0
        for node in self._SyncObj__otherNodes:
            if self._SyncObj__raftMatchIndex[node] >= commitIdx:
                count += 1
        if count <= (len(self._SyncObj__otherNodes) + 1) / 2:
            break
        entries = self._SyncObj__getEntries(commitIdx, 1)
        if not entries:
            continue
        commitTerm = entries[0][2]
        if commitTerm != self._SyncObj__raftCurrentTerm:
            continue
        nextCommitIdx = commitIdx
    if self._SyncObj__raftCommitIndex != nextCommitIdx:
        self._SyncObj__raftCommitIndex = nextCommitIdx
        self._SyncObj__raftLog.setRaftCommitIndex(self._SyncObj__raftCommitIndex)


def _patched_tick(self: Any, timeToWait: float = 0.0) -> None:
    """pysyncobj 0.3.17's ``SyncObj._onTick`` statement for statement, except the leader's commit
    (:func:`_leader_commit`) and a send before a heavy apply (:func:`_heavy_apply_ahead`). Both sit
    inline in _onTick, between the election and the apply, so no smaller wrapper can change them."""
    if not self._SyncObj__transport.ready:
        try:
            self._SyncObj__transport.tryGetReady()
        except TransportNotReadyError:
            pass
    if not self._SyncObj__transport.ready:
        _syncobj_mod.time.sleep(timeToWait)
        self._SyncObj__applyLogEntries()
        return

    if self._SyncObj__needLoadDumpFile:
        # pysyncobj's module-level names (time, os, pickle), as the other patches route them.
        if self._SyncObj__conf.fullDumpFile is not None and \
                _syncobj_mod.os.path.isfile(self._SyncObj__conf.fullDumpFile):
            self._SyncObj__loadDumpFile(clearJournal=False)
        self._SyncObj__needLoadDumpFile = False

    workTime = _now() - self._SyncObj__startTime
    if workTime > self._SyncObj__numOneSecondDumps:
        self._SyncObj__numOneSecondDumps += 1
        self._SyncObj__raftLog.onOneSecondTimer()

    if self._SyncObj__raftState in (_FOLLOWER, _CANDIDATE) and self._SyncObj__selfNode is not None:  # noqa: SIM102
        if self._SyncObj__raftElectionDeadline < _now() and self._SyncObj__connectedToAnyone():
            self._SyncObj__raftElectionDeadline = _now() + self._SyncObj__generateRaftTimeout()
            self._SyncObj__transferInProgress = False
            self._SyncObj__raftLeader = None
            self._SyncObj__setState(_CANDIDATE)
            self._SyncObj__setCurrentTerm(self._SyncObj__raftCurrentTerm + 1, self._SyncObj__selfNode.id)
            self._SyncObj__votesCount = 1
            for node in self._SyncObj__otherNodes:
                self._SyncObj__transport.send(node, {
                    "type": "request_vote",
                    "term": self._SyncObj__raftCurrentTerm,
                    "last_log_index": self._SyncObj__getCurrentLogIndex(),
                    "last_log_term": self._SyncObj__getCurrentLogTerm(),
                })
            self._SyncObj__onLeaderChanged()
            if self._SyncObj__votesCount > (len(self._SyncObj__otherNodes) + 1) / 2:
                self._SyncObj__onBecomeLeader()

    if self._SyncObj__raftState == _LEADER:
        _leader_commit(self)
        self._SyncObj__leaderCommitIndex = self._SyncObj__raftCommitIndex
        deadline = _now() - self._SyncObj__conf.leaderFallbackTimeout
        count = 1
        for node in self._SyncObj__otherNodes:
            if self._SyncObj__lastResponseTime[node] > deadline:
                count += 1
        if count <= (len(self._SyncObj__otherNodes) + 1) / 2 and not _followers_busy(self):
            self._SyncObj__setState(_FOLLOWER)
            self._SyncObj__raftLeader = None

    if "heavy_apply_sends_first" in _active and self._SyncObj__raftState == _LEADER and _heavy_apply_ahead(self):
        # The new commit index (and a heartbeat) goes out before the long apply, not after it.
        self._SyncObj__sendAppendEntries()
        self.__dict__["_tlp_heavy_tick_at"] = _now()  # the next tick learns how long the apply took

    needSendAppendEntries = self._SyncObj__applyLogEntries()

    if self._SyncObj__raftState == _LEADER:  # noqa: SIM102
        if _now() > self._SyncObj__newAppendEntriesTime or needSendAppendEntries:
            self._SyncObj__sendAppendEntries()

    if not self._SyncObj__onReadyCalled and self._SyncObj__raftLastApplied == self._SyncObj__leaderCommitIndex:
        if self._SyncObj__conf.onReady:
            self._SyncObj__conf.onReady()
        self._SyncObj__onReadyCalled = True

    self._checkCommandsToApply()
    self._SyncObj__tryLogCompaction()

    with self._SyncObj__onTickCallbacksLock:
        for callback in self._SyncObj__onTickCallbacks:
            callback()

    self._poller.poll(timeToWait)


# --- heavy_apply_sends_first, heavy_apply_leader_waits, stall_grace ------------------------------

# A tick that starts this long after the previous one (as a fraction of the minimum election
# timeout) follows a stall: a long apply, a snapshot, a paused process. Normal ticks are at most
# the poll period (50 ms) plus a few milliseconds of work apart.
STALL_GRACE_FRACTION = 0.25


def _heavy_apply_ahead(self: Any) -> bool:
    """Committed entries wait to be applied and one of them is large (at least an append-entries
    batch, 64 KiB: a registry push): applying it may take longer than an election timeout."""
    applied, commit = self._SyncObj__raftLastApplied, self._SyncObj__raftCommitIndex
    if commit <= applied:
        return False
    limit = self._SyncObj__conf.appendEntriesBatchSizeBytes
    return any(len(e[0]) >= limit for e in self._SyncObj__getEntries(applied + 1, commit - applied))


# Followers decode and validate a heavy entry the leader proposed from its decoded command, and
# then apply it as the leader did: a 10,000-concept push took them 2 to 3 times the leader's time.
FOLLOWERS_BUSY_FACTOR = 4.0


def _note_heavy_apply(self: Any, now: float) -> None:
    """The tick after a heavy apply: its followers are applying the same entries, silent, for up to
    FOLLOWERS_BUSY_FACTOR times as long as the leader took (heavy_apply_leader_waits; measured
    from heavy_apply_sends_first's send, so it needs that patch too)."""
    started = self.__dict__.pop("_tlp_heavy_tick_at", None)
    if started is not None and "heavy_apply_leader_waits" in _active:
        self.__dict__["_tlp_followers_busy_until"] = now + FOLLOWERS_BUSY_FACTOR * (now - started)


def _followers_busy(self: Any) -> bool:
    """A leader that hears from no majority does not step down while its followers apply a heavy
    entry it sent them (they answer when done)."""
    return "heavy_apply_leader_waits" in _active and _now() < self.__dict__.get("_tlp_followers_busy_until", 0.0)


def _grace_after_stall(self: Any) -> None:
    """A follower whose last tick ended long ago could not listen meanwhile (it was applying what
    the leader applies too, or its process was stopped): it gives the leader a fresh election
    timeout before it campaigns, as etcd's tick-counted timeouts do (a stalled node drops ticks).
    Once per message from the leader, so a dead leader's followers campaign after at most one."""
    d = self.__dict__
    now = _now()
    last = d.get("_tlp_tick_at")
    d["_tlp_tick_at"] = now
    if last is None or now - last <= self._SyncObj__conf.raftMinTimeout * STALL_GRACE_FRACTION:
        return
    if self._SyncObj__raftState != _FOLLOWER:
        return
    heard = d.get("_tlp_leader_heard_at")
    if heard is None or heard <= d.get("_tlp_grace_at", float("-inf")):
        return
    d["_tlp_grace_at"] = now
    deadline = now + self._SyncObj__generateRaftTimeout()
    if deadline > self._SyncObj__raftElectionDeadline:
        self._SyncObj__raftElectionDeadline = deadline


# --- chunked_entries -------------------------------------------------------------------------------

_original_send_append_entries = SyncObj._SyncObj__sendAppendEntries  # type: ignore[attr-defined]


def _send_append_entries(self: Any) -> None:
    """pysyncobj 0.3.17's ``SyncObj.__sendAppendEntries`` statement for statement, except which
    chunk of a large entry is the last: pysyncobj marks ``finish`` when ``pos + batch`` reaches the
    entry's *data* length, but the chunks slice the entry's *pickle*, which is longer by its framing
    (54 bytes in protocol 2); an entry whose pickle crosses a chunk boundary its data does not (data
    within that framing under a multiple of the batch size, from twice it) gets two ``finish``
    chunks, and the follower unpickles the truncated first one (its tick raises). Here the
    pickle's length decides."""
    self._SyncObj__newAppendEntriesTime = _now() + self._SyncObj__conf.appendEntriesPeriod
    startTime = _now()
    batchSizeBytes = self._SyncObj__conf.appendEntriesBatchSizeBytes
    for node in self._SyncObj__otherNodes | self._SyncObj__readonlyNodes:
        if node not in self._SyncObj__connectedNodes:
            self._SyncObj__serializer.cancelTransmisstion(node)
            continue
        sendSingle = True
        sendingSerialized = False
        nextNodeIndex = self._SyncObj__raftNextIndex[node]
        while nextNodeIndex <= self._SyncObj__getCurrentLogIndex() or sendSingle or sendingSerialized:
            if nextNodeIndex > self._SyncObj__raftLog[0][1]:
                prevLogIdx, prevLogTerm = self._SyncObj__getPrevLogIndexTerm(nextNodeIndex)
                entries = []
                if nextNodeIndex <= self._SyncObj__getCurrentLogIndex():
                    entries = self._SyncObj__getEntries(nextNodeIndex, None, batchSizeBytes)
                    self._SyncObj__raftNextIndex[node] = entries[-1][1] + 1
                if len(entries) == 1 and len(entries[0][0]) >= batchSizeBytes:
                    entry = _syncobj_mod.pickle.dumps(entries[0])
                    for pos in range(0, len(entry), batchSizeBytes):
                        currData = entry[pos:pos + batchSizeBytes]
                        if pos == 0:
                            transmission = "start"
                        elif pos + batchSizeBytes >= len(entry):  # pysyncobj: len(entries[0][0])
                            transmission = "finish"
                        else:
                            transmission = "process"
                        message = {
                            "type": "append_entries",
                            "transmission": transmission,
                            "data": currData,
                            "term": self._SyncObj__raftCurrentTerm,
                            "commit_index": self._SyncObj__raftCommitIndex,
                            "prevLogIdx": prevLogIdx,
                            "prevLogTerm": prevLogTerm,
                        }
                        self._SyncObj__transport.send(node, message)
                        if node not in self._SyncObj__connectedNodes:
                            break
                else:
                    message = {
                        "type": "append_entries",
                        "term": self._SyncObj__raftCurrentTerm,
                        "commit_index": self._SyncObj__raftCommitIndex,
                        "entries": entries,
                        "prevLogIdx": prevLogIdx,
                        "prevLogTerm": prevLogTerm,
                    }
                    self._SyncObj__transport.send(node, message)
                    if node not in self._SyncObj__connectedNodes:
                        break
            else:
                transmissionData = self._SyncObj__serializer.getTransmissionData(node)
                message = {
                    "type": "append_entries",
                    "term": self._SyncObj__raftCurrentTerm,
                    "commit_index": self._SyncObj__raftCommitIndex,
                    "serialized": transmissionData,
                }
                self._SyncObj__transport.send(node, message)
                if node not in self._SyncObj__connectedNodes:
                    break
                if transmissionData is not None:
                    isLast = transmissionData[2]
                    if isLast:
                        self._SyncObj__raftNextIndex[node] = self._SyncObj__raftLog[1][1] + 1
                        sendingSerialized = False
                    else:
                        sendingSerialized = True
                else:
                    sendingSerialized = False
            nextNodeIndex = self._SyncObj__raftNextIndex[node]
            sendSingle = False
            delta = _now() - startTime
            if delta > self._SyncObj__conf.appendEntriesPeriod:
                break


def _install_chunked_entries() -> None:
    SyncObj._SyncObj__sendAppendEntries = _send_append_entries  # type: ignore[attr-defined]


def _revert_chunked_entries() -> None:
    SyncObj._SyncObj__sendAppendEntries = _original_send_append_entries  # type: ignore[attr-defined]

# --- pickle_protocol ---------------------------------------------------------------------------------

PICKLE_PROTOCOL = 5
_PROTOCOL_NAME = "__protocol"  # pysyncobj.pickle's module-level name (no class, so not mangled)
_original_protocol = getattr(_pysyncobj_pickle, _PROTOCOL_NAME)
assert PICKLE_PROTOCOL <= _std_pickle.HIGHEST_PROTOCOL  # Python 3.8 and later


def _install_pickle_protocol() -> None:
    setattr(_pysyncobj_pickle, _PROTOCOL_NAME, PICKLE_PROTOCOL)


def _revert_pickle_protocol() -> None:
    setattr(_pysyncobj_pickle, _PROTOCOL_NAME, _original_protocol)

# --- install ----------------------------------------------------------------------------------

PATCHES: tuple[Patch, ...] = (
    Patch("journal_factory", "pysyncobj's own journal never fsyncs; nodes use the LMDB journal",
          _install_journal_factory, _revert_journal_factory),
    Patch("frame_bound", "a stranger must not make a node buffer a frame of any announced length",
          *_parse_patch("frame_bound")),
    Patch("socket_timeouts", "a node cut off by a silent partition must rejoin within seconds of healing",
          _install_socket_timeouts, _revert_socket_timeouts),
    Patch("bounded_read", "a stranger's bytes must not freeze the Raft thread or grow the node's memory",
          _install_bounded_read, _revert_bounded_read),
    Patch("accept_limits", "strangers must not hold an unbounded number of Raft connections",
          _install_accept_limits, _revert_accept_limits),
    Patch("handshake_deadline", "a connection that never authenticates must not be held forever",
          _install_handshake_deadline, _revert_handshake_deadline),
    Patch("auth_failures", "a connection closed for failing the cluster secret's check must be reported",
          *_parse_patch("auth_failures")),
    Patch("handshake_refused", "a node whose peers close its connections mid-handshake must say so",
          _install_handshake_refused, _revert_handshake_refused),
    Patch("accept_queue", "a connection flood must not crowd a reconnecting peer out of the accept queue",
          _install_accept_queue, _revert_accept_queue),
    Patch("accept_unknown_peers", "a member that missed a node's addition must still hear it when it leads",
          *_flag("accept_unknown_peers", (_install_accept_unknown_peers, _revert_accept_unknown_peers))),
    Patch("removal_on_commit", "a node must keep answering the leader until a removal it holds is committed",
          *_flag("removal_on_commit", (_install_removal_on_commit, _revert_removal_on_commit))),
    Patch("clock_and_rng", "a simulator gives pysyncobj its clock and random source (real ones by default)",
          _install_clock_and_rng, _revert_clock_and_rng),
    Patch("snapshot_files", "snapshot files go through replica.files, and every rename is durable",
          _install_snapshot_files, _revert_snapshot_files),
    Patch("load_dump_keeps_log", "a crash between snapshot and compaction must not drop acknowledged entries",
          _install_load_dump_keeps_log, _revert_load_dump_keeps_log),
    Patch("snapshot_commit", "a snapshot message must not commit entries nobody matched against the leader",
          *_flag("snapshot_commit")),
    Patch("keep_committed_entries", "a follower must not delete committed entries a stale append-entries repeats",
          *_flag("keep_committed_entries")),
    Patch("next_index_monotonic", "late answers must not make a leader resend what a follower has",
          *_flag("next_index_monotonic")),
    Patch("older_snapshot_ignored", "a follower must not go back to a snapshot older than its state",
          *_flag("older_snapshot_ignored")),
    Patch("compaction_guard", "compaction must not delete a log that no longer holds its snapshot",
          _install_compaction_guard, _revert_compaction_guard),
    Patch("snapshot_send_no_spin", "a leader must not spin sending 'serialized: None' while a snapshot is done",
          _install_snapshot_send_no_spin, _revert_snapshot_send_no_spin),
    Patch("pre_vote", "a node that cannot win an election must not bump the term and depose the leader",
          *_flag("pre_vote")),
    Patch("term_notice", "a node whose term got ahead must be able to rejoin: it tells a stale leader its term",
          *_flag("term_notice")),
    Patch("leader_stickiness", "a node that hears a live leader refuses votes (transfers excepted)",
          *_flag("leader_stickiness")),
    Patch("leader_commit_durable", "a leader that sends before its own fsync counts itself only for durable entries",
          *_flag("leader_commit_durable")),
    Patch("chunked_entries", "the last chunk of a large entry is the one that ends its pickle, not its data",
          _install_chunked_entries, _revert_chunked_entries),
    Patch("pickle_protocol", "commands and Raft messages are pickled with protocol 5, not 2 (bytes went "
          "through latin-1 strings both ways)", _install_pickle_protocol, _revert_pickle_protocol),
    Patch("heavy_apply_sends_first", "a leader about to apply a large entry sends the commit first, so its "
          "followers apply alongside instead of waiting silent", *_flag("heavy_apply_sends_first")),
    Patch("heavy_apply_leader_waits", "a leader does not step down for the silence of followers applying a "
          "large entry it sent them", *_flag("heavy_apply_leader_waits")),
    Patch("stall_grace", "a follower that could not listen (a long apply, a stopped process) gives the leader "
          "a fresh election timeout before it campaigns", *_flag("stall_grace")),
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
