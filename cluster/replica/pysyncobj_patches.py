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
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pysyncobj.syncobj as _syncobj_mod
from pysyncobj.tcp_connection import TcpConnection
from pysyncobj.version import VERSION

log = logging.getLogger("tetherlab.raft")

PYSYNCOBJ_VERSION = "0.3.17"

# Frames are bounded by the append/snapshot batch sizes (64 KiB) plus one entry; anything
# announcing more than this is not one of ours.
RAFT_FRAME_MAX_BYTES = 16 * 1024 * 1024
RAFT_TCP_USER_TIMEOUT_MS = 3000  # unacknowledged data for this long kills the connection
RAFT_TCP_SYN_RETRIES = 1  # a connect attempt fails in ~3 s; pysyncobj retries every connection_retry_s
JOURNAL_KEY_PREFIX = "lmdb:"  # journalFile values naming a registered journal

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


# --- install ----------------------------------------------------------------------------------

PATCHES: tuple[Patch, ...] = (
    Patch("journal_factory", "pysyncobj's own journal never fsyncs; nodes use the LMDB journal",
          _install_journal_factory, _revert_journal_factory),
    Patch("frame_bound", "a stranger must not make a node buffer a frame of any announced length",
          _install_frame_bound, _revert_frame_bound),
    Patch("socket_timeouts", "a node cut off by a silent partition must rejoin within seconds of healing",
          _install_socket_timeouts, _revert_socket_timeouts),
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
