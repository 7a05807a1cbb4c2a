"""Every change Tetherlab makes to pysyncobj, each proven by a test that fails without it
(``pysyncobj_patches.without(name)`` puts pysyncobj's own behaviour back for the block)."""

from __future__ import annotations

import socket
import struct
from typing import Any

import pysyncobj.syncobj as syncobj_mod
import pytest
from pysyncobj.tcp_connection import TcpConnection

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
