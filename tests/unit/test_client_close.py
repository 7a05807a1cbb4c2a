"""The shim's cluster client after close() and under cancellation: no connection outlives it.

A request still running when its client is closed (a shim exiting while a heartbeat's hedge was
connecting) used to finish opening its connection and keep it, with a reader task nobody would
cancel; and on Python 3.11 ``asyncio.wait_for`` returns a reply that arrives together with a
cancellation, so a cancelled request carried on. Fakes stand in for SSH here; the real client is
exercised against real nodes in tests/cluster/test_ssh.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from tetherlab.cluster import protocol as p
from tetherlab.shim import client as sc
from tetherlab.shim.client import ClientClosed, Master, MasterClient


class FakeLink:
    def __init__(self) -> None:
        self.closed = False
        self.proto = p.ClientConnection()

    @property
    def alive(self) -> bool:
        return not self.closed

    async def call(self, req: p.Request, timeout_s: float) -> p.Message:
        return p.Result(id=req.id, payload={"pong": True})

    def close(self) -> None:
        self.closed = True


def make_client(tmp_path: Path) -> MasterClient:
    key = tmp_path / "key"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(key))
    return MasterClient([Master("n1", "127.0.0.1", 1, None)], key, "alice")


def test_a_connection_opened_while_the_client_closes_is_closed_and_the_request_ends(tmp_path: Path,
                                                                                  monkeypatch: Any) -> None:
    async def body() -> None:
        client = make_client(tmp_path)
        opened: list[FakeLink] = []
        connecting = asyncio.Event()

        async def slow_open(m: Master, timeout_s: float) -> Any:
            connecting.set()
            await asyncio.sleep(0.05)
            opened.append(FakeLink())
            return opened[-1]

        monkeypatch.setattr(client, "_open", slow_open)
        req = asyncio.get_running_loop().create_task(client.call(p.Ping, deadline_s=5.0))
        await connecting.wait()
        await client.close()
        with pytest.raises(ClientClosed):
            await req
        assert [link.closed for link in opened] == [True]
        with pytest.raises(ClientClosed):  # and nothing is opened afterwards
            await client.call(p.Ping, deadline_s=5.0)
        assert len(opened) == 1
    asyncio.run(body())


class FakeStream:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    async def read(self, n: int) -> bytes:
        await asyncio.Event().wait()  # nothing ever arrives: replies are set by the test
        return b""

    def write(self, data: bytes) -> None:
        self.written.append(data)


class FakeProc:
    def __init__(self) -> None:
        self.stdout = FakeStream()
        self.stdin = FakeStream()


class FakeConn:
    def close(self) -> None:
        pass


def test_a_cancelled_call_is_cancelled_even_when_its_reply_arrives_at_the_same_moment() -> None:
    async def body() -> None:
        link = sc._Link(Master("n1", "127.0.0.1", 1, None), FakeConn(), FakeProc(),  # type: ignore[arg-type]
                        lambda n: None)
        req = link.proto.hello(client_name="t", client_version="0", agent=None)  # the first request a link sends
        task = asyncio.get_running_loop().create_task(link.call(req, 5.0))
        await asyncio.sleep(0)  # the call is waiting for its reply
        link.waiting[req.id].set_result(p.Result(id=req.id, payload={"pong": True}))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        link.close()
    asyncio.run(body())



def test_requests_sent_in_one_loop_iteration_leave_in_one_channel_write() -> None:
    """Coalescing: frames go out in order in one write (one SSH packet, one cipher call); a failed
    write fails the requests it carried as a broken connection."""
    async def body() -> None:
        proc = FakeProc()
        link = sc._Link(Master("n1", "127.0.0.1", 1, None), FakeConn(), proc,  # type: ignore[arg-type]
                        lambda n: None)
        hello = link.proto.hello(client_name="t", client_version="0", agent=None)
        link.proto.send(hello)
        link.proto.receive_data(p.encode(p.HelloOk(id=hello.id, version=1, node_id="n1", server_version="0")))
        assert link.proto.events()
        loop = asyncio.get_running_loop()
        pings = [p.Ping(id=link.proto.next_id()) for _ in range(3)]
        tasks = [loop.create_task(link.call(r, 5.0)) for r in pings]
        await asyncio.sleep(0)  # every call has queued its frame
        assert proc.stdin.written == []  # not yet: the write waits for the end of the iteration
        await asyncio.sleep(0)
        assert len(proc.stdin.written) == 1
        frames = proc.stdin.written[0].splitlines()
        assert [json.loads(f)["id"] for f in frames] == [r.id for r in pings]

        def broken(data: bytes) -> None:
            raise BrokenPipeError("channel closed")

        proc.stdin.write = broken  # type: ignore[method-assign]
        late = loop.create_task(link.call(p.Ping(id=link.proto.next_id()), 5.0))
        with pytest.raises(ConnectionError):
            await late
        assert not link.alive
        for t in tasks:  # sent, unanswered: they end as a broken connection too
            assert isinstance(t.exception(), ConnectionError)
        async with asyncio.timeout(1):  # a call on the dead link fails at once, not at its timeout
            with pytest.raises(ConnectionError):
                await link.call(p.Ping(id=link.proto.next_id()), 5.0)
        link.close()
    asyncio.run(body())
