"""A node whose data directory is deeper than a Unix socket path may be still serves its control
socket (it failed to start with "AF_UNIX path too long"), and the clients reach it; and
``bind_error`` says why an address cannot be listened on."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path
from typing import Any

import pytest

from tetherlab.cluster.node.control import ControlServer
from tetherlab.cluster.node.fake import FakeReplica
from tetherlab.cluster.node.sockets import SUN_PATH_MAX_BYTES, bind_error, usable_path
from tetherlab.cluster.ops.client import ControlClient, control_call_async


def _deep(tmp_path: Path) -> Path:
    d = tmp_path / ("d" * 60) / ("e" * 60)
    d.mkdir(parents=True)
    assert len(str(d / "control.sock")) > SUN_PATH_MAX_BYTES
    return d / "control.sock"


async def _backup(path: Path) -> dict[str, Any]:
    return {}


def test_a_short_path_is_used_as_it_is(tmp_path: Path) -> None:
    with usable_path(tmp_path / "s.sock") as p:
        assert p == str(tmp_path / "s.sock")


def test_the_control_socket_of_a_deep_data_dir_serves_both_clients(tmp_path: Path) -> None:
    sock = _deep(tmp_path)

    async def go() -> None:
        server = ControlServer(sock, FakeReplica(), lambda: {"role": "leader"}, _backup, lambda: None, lambda: 0)
        await server.start()
        try:
            assert stat.S_ISSOCK(sock.stat().st_mode) and sock.stat().st_mode & 0o777 == 0o600
            reply = await control_call_async(sock, "status")
            assert reply["ok"] and reply["result"] == {"role": "leader"}, reply
            blocking = await asyncio.to_thread(lambda: ControlClient(sock).call("status"))
            assert blocking["ok"], blocking
        finally:
            server.close()

    asyncio.run(go())


def test_a_missing_directory_is_named(tmp_path: Path) -> None:
    missing = _deep(tmp_path).parent / "x" / "y.sock"
    with pytest.raises(OSError, match="cannot open the directory"), usable_path(missing):
        pass


def test_bind_error_names_a_taken_port_and_passes_a_free_one() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert bind_error("127.0.0.1", port) == "Address already in use"
    assert bind_error("127.0.0.1", port) is None
