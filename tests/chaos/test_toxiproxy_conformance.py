"""Conformance of the bundled toxiproxy-compatible server, driven through toxiproxy-python's own calls.

Every fault is observed on real TCP connections to an echo server on loopback. Timing assertions are
lower bounds (a toxic must delay at least this much), with upper bounds only where they tell "no toxic"
from "toxic" and are far from the toxic's delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import socketserver
import stat
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from toxiproxy import Proxy, Toxiproxy
from toxiproxy.api import APIConsumer
from toxiproxy.exceptions import InvalidToxic, NotFound, ProxyExists

from tetherlab.chaos.toxiproxy_server import (
    ThreadedToxiproxyServer,
    ensure_toxiproxy,
    spawn_bundled_server,
    start_server,
)

pytestmark = pytest.mark.timeout(60)

LOOPBACK = "127.0.0.1"
IO_TIMEOUT_S = 5.0


# --- An echo server on loopback -------------------------------------------------------------------


class _EchoHandler(socketserver.BaseRequestHandler):
    """Echoes what it receives, prefixed by the server's tag; closes after echoing data ending in BYE."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        tag: bytes = self.server.tag  # type: ignore[attr-defined]
        with contextlib.suppress(OSError):
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                sock.sendall(tag + data)
                if data.endswith(b"BYE"):
                    return


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, tag: bytes = b"") -> None:
        super().__init__((LOOPBACK, 0), _EchoHandler)
        self.tag = tag
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        host, port = self.server_address[:2]
        return f"{host}:{port}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def _host_port(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host, int(port)


def connect(proxy: Proxy) -> socket.socket:
    sock = socket.create_connection(_host_port(proxy.listen), timeout=IO_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        piece = sock.recv(size - len(data))
        if not piece:
            raise EOFError(f"connection closed after {len(data)} of {size} bytes")
        data += piece
    return data


def roundtrip(sock: socket.socket, payload: bytes = b"ping", tag: bytes = b"") -> float:
    """Send ``payload``, read its echo, return the seconds it took."""
    started = time.monotonic()
    sock.sendall(payload)
    assert recv_exactly(sock, len(tag) + len(payload)) == tag + payload
    return time.monotonic() - started


def read_until_closed(sock: socket.socket) -> tuple[bytes, str]:
    """Read to the end; return the data and how it ended: "eof" or "reset"."""
    data = b""
    while True:
        try:
            piece = sock.recv(65536)
        except ConnectionResetError:
            return data, "reset"
        if not piece:
            return data, "eof"
        data += piece


def assert_refused(proxy: Proxy) -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(_host_port(proxy.listen), timeout=IO_TIMEOUT_S).close()


def error_body(exc: pytest.ExceptionInfo[Exception]) -> dict[str, Any]:
    # toxiproxy-python passes the raw response body as the exception's argument.
    return json.loads(exc.value.args[0])


# --- Fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadedToxiproxyServer]:
    with ThreadedToxiproxyServer(LOOPBACK, 0, seed=7) as running:
        yield running


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoServer]:
    running = EchoServer()
    yield running
    running.stop()


@pytest.fixture
def client(server: ThreadedToxiproxyServer) -> Iterator[Toxiproxy]:
    toxiproxy = Toxiproxy()
    # toxiproxy-python keeps the API address in class attributes; point them at this server.
    toxiproxy.update_api_consumer(server.host, server.port)
    yield toxiproxy
    toxiproxy.update_api_consumer(server.host, server.port)
    toxiproxy.destroy_all()


def make_proxy(client: Toxiproxy, echo: EchoServer, name: str) -> Proxy:
    return client.create(upstream=echo.address, name=name, listen=f"{LOOPBACK}:0")


# --- Server and proxies ---------------------------------------------------------------------------


def test_running_and_version(client: Toxiproxy) -> None:
    assert client.running() is True  # a TCP connect to the API port
    version = json.loads(client.version())
    assert version["version"].startswith("2.")


def test_create_list_get_destroy(client: Toxiproxy, echo: EchoServer) -> None:
    proxy = make_proxy(client, echo, "crud")
    host, port = _host_port(proxy.listen)
    assert host == LOOPBACK and port != 0  # the bound port is reported, not ":0"
    assert proxy.upstream == echo.address
    assert proxy.enabled is True

    listed = client.proxies()
    assert set(listed) == {"crud"}
    assert listed["crud"].listen == proxy.listen
    shown = APIConsumer.get("/proxies/crud").json()
    assert shown == {
        "name": "crud",
        "listen": proxy.listen,
        "upstream": echo.address,
        "enabled": True,
        "toxics": [],
    }
    with connect(proxy) as sock:
        roundtrip(sock, b"hello through the proxy")

    assert client.destroy(proxy) is True
    assert client.get_proxy("crud") is None
    assert_refused(proxy)


def test_populate(client: Toxiproxy, echo: EchoServer) -> None:
    created = client.populate([{"name": "pop_a", "upstream": echo.address, "listen": f"{LOOPBACK}:0"}])
    assert [p.name for p in created] == ["pop_a"]

    response = APIConsumer.post(
        "/populate",
        json=[
            {"name": "pop_a", "upstream": echo.address, "listen": created[0].listen},  # unchanged: kept
            {"name": "pop_b", "upstream": echo.address, "listen": f"{LOOPBACK}:0", "enabled": False},
        ],
    )
    assert response.status_code == 201
    proxies = {p["name"]: p for p in response.json()["proxies"]}
    assert proxies["pop_a"]["listen"] == created[0].listen
    assert proxies["pop_b"]["enabled"] is False
    assert set(client.proxies()) == {"pop_a", "pop_b"}

    with pytest.raises(InvalidToxic):  # 400: every entry is checked before anything changes
        APIConsumer.post("/populate", json=[{"name": "pop_c", "upstream": echo.address}, {"name": "x"}])
    assert "pop_c" not in client.proxies()


def test_disable_closes_connections_and_refuses_new_ones(client: Toxiproxy, echo: EchoServer) -> None:
    proxy = make_proxy(client, echo, "onoff")
    with connect(proxy) as open_conn:
        roundtrip(open_conn)
        proxy.disable()
        assert client.proxies()["onoff"].enabled is False
        _, ended = read_until_closed(open_conn)  # the open connection is closed
        assert ended in ("eof", "reset")
    assert_refused(proxy)

    proxy.enable()
    assert client.proxies()["onoff"].listen == proxy.listen  # same port again
    with connect(proxy) as sock:
        roundtrip(sock)

    with proxy.down():
        assert_refused(proxy)
    with connect(proxy) as sock:
        roundtrip(sock)


def test_update_upstream(client: Toxiproxy, echo: EchoServer) -> None:
    other = EchoServer(tag=b"B:")
    try:
        proxy = make_proxy(client, echo, "moving")
        updated = APIConsumer.post("/proxies/moving", json={"upstream": other.address}).json()
        assert updated["upstream"] == other.address and updated["enabled"] is True
        with connect(proxy) as sock:
            roundtrip(sock, b"where", tag=b"B:")
    finally:
        other.stop()


def test_reset_reenables_and_removes_toxics(client: Toxiproxy, echo: EchoServer) -> None:
    first = make_proxy(client, echo, "reset_a")
    second = make_proxy(client, echo, "reset_b")
    first.add_toxic(type="latency", attributes={"latency": 1000})
    first.add_toxic(type="timeout", stream="upstream", attributes={"timeout": 0})
    second.disable()
    assert len(first.toxics()) == 2

    assert client.reset() is True
    proxies = client.proxies()
    assert all(p.enabled for p in proxies.values())
    assert first.toxics() == {} and second.toxics() == {}
    for proxy in (first, second):
        with connect(proxy) as sock:
            assert roundtrip(sock) < 0.9


def test_connections_per_proxy_are_bounded(echo: EchoServer) -> None:
    with ThreadedToxiproxyServer(LOOPBACK, 0, max_connections_per_proxy=2) as small:
        toxiproxy = Toxiproxy()
        toxiproxy.update_api_consumer(small.host, small.port)
        proxy = make_proxy(toxiproxy, echo, "bounded")
        with connect(proxy) as one, connect(proxy) as two:
            roundtrip(one)
            roundtrip(two)
            with connect(proxy) as three:
                three.sendall(b"ping")
                assert read_until_closed(three) in ((b"", "eof"), (b"", "reset"))
        toxiproxy.destroy_all()


# --- Errors ---------------------------------------------------------------------------------------


def test_not_found(client: Toxiproxy, echo: EchoServer) -> None:
    ghost = Proxy(name="ghost", upstream=echo.address, enabled=True, listen=f"{LOOPBACK}:1")
    with pytest.raises(NotFound) as exc:
        ghost.destroy()
    assert error_body(exc) == {"error": "proxy not found", "status": 404}
    with pytest.raises(NotFound):
        ghost.add_toxic(type="latency")
    with pytest.raises(NotFound):
        ghost.disable()

    proxy = make_proxy(client, echo, "real")
    with pytest.raises(NotFound) as exc:
        proxy.destroy_toxic("nope")
    assert error_body(exc) == {"error": "toxic not found", "status": 404}


def test_conflicts(client: Toxiproxy, echo: EchoServer) -> None:
    proxy = make_proxy(client, echo, "dup")
    with pytest.raises(ProxyExists):
        make_proxy(client, echo, "dup")  # toxiproxy-python checks the list first
    with pytest.raises(ProxyExists) as exc:  # and the server says 409 on its own
        APIConsumer.post("/proxies", json={"name": "dup", "upstream": echo.address, "listen": f"{LOOPBACK}:0"})
    assert error_body(exc) == {"error": "proxy already exists", "status": 409}

    proxy.add_toxic(type="latency", attributes={"latency": 1})
    with pytest.raises(ProxyExists) as exc:
        proxy.add_toxic(type="latency", attributes={"latency": 2})  # same default name latency_downstream
    assert error_body(exc) == {"error": "toxic already exists", "status": 409}


@pytest.mark.parametrize(
    ("toxic", "message"),
    [
        ({"type": "no_such_toxic"}, "invalid toxic type"),
        ({"type": "latency", "stream": "sideways"}, "stream was invalid"),
        ({"type": "latency", "attributes": {"latency": "slow"}}, "bad request body"),
        ({"type": "latency", "attributes": {"latency": -5}}, "bad request body"),
        ({"type": "latency", "toxicity": 2}, "bad request body"),
    ],
)
def test_invalid_toxics(client: Toxiproxy, echo: EchoServer, toxic: dict[str, Any], message: str) -> None:
    proxy = make_proxy(client, echo, "picky")
    with pytest.raises(InvalidToxic) as exc:
        proxy.add_toxic(**toxic)
    body = error_body(exc)
    assert body["status"] == 400 and body["error"].startswith(message)
    assert proxy.toxics() == {}


def test_bad_proxy_bodies(client: Toxiproxy) -> None:
    with pytest.raises(InvalidToxic) as exc:
        APIConsumer.post("/proxies", data="{not json")
    assert error_body(exc)["status"] == 400
    with pytest.raises(InvalidToxic) as exc:
        APIConsumer.post("/proxies", json={"name": "no_upstream"})
    assert error_body(exc) == {"error": "missing required field: upstream", "status": 400}
    with pytest.raises(InvalidToxic):
        APIConsumer.post("/proxies", json={"name": "bad", "upstream": "no-port-here"})
    assert client.proxies() == {}


# --- Toxics, observed on real connections ---------------------------------------------------------


def test_latency_reaches_open_connections_and_goes_away(client: Toxiproxy, echo: EchoServer) -> None:
    proxy = make_proxy(client, echo, "slow")
    with connect(proxy) as sock:
        roundtrip(sock)
        proxy.add_toxic(type="latency", attributes={"latency": 300})  # downstream by default
        assert roundtrip(sock) >= 0.29
        proxy.add_toxic(type="latency", stream="upstream", attributes={"latency": 200, "jitter": 0})
        assert roundtrip(sock) >= 0.49

        toxics = proxy.toxics()
        assert set(toxics) == {"latency_downstream", "latency_upstream"}
        assert toxics["latency_downstream"].attributes == {"latency": 300, "jitter": 0}
        assert toxics["latency_upstream"].stream == "upstream"
        assert toxics["latency_upstream"].toxicity == 1.0

        # Update in place (POST /proxies/{p}/toxics/{t}): attributes merge over the current ones.
        updated = APIConsumer.post(
            "/proxies/slow/toxics/latency_downstream", json={"attributes": {"jitter": 50}}
        ).json()
        assert updated["attributes"] == {"latency": 300, "jitter": 50}
        assert roundtrip(sock) >= 0.2 + 0.25

        assert proxy.destroy_toxic("latency_downstream") is True
        assert proxy.destroy_toxic("latency_upstream") is True
        assert roundtrip(sock) < 0.2


def test_toxicity_zero_leaves_connections_alone(client: Toxiproxy, echo: EchoServer) -> None:
    proxy = make_proxy(client, echo, "lucky")
    proxy.add_toxic(type="latency", toxicity=0.0, attributes={"latency": 1000})
    with connect(proxy) as sock:
        assert roundtrip(sock) < 0.9


def test_timeout_zero_is_a_blackhole(client: Toxiproxy, echo: EchoServer) -> None:
    proxy = make_proxy(client, echo, "hole")
    with connect(proxy) as sock:
        roundtrip(sock)
        proxy.add_toxic(type="timeout", attributes={"timeout": 0})
        sock.sendall(b"anyone there?")
        sock.settimeout(0.6)
        with pytest.raises(TimeoutError):  # no data, and no close either
            sock.recv(100)
        sock.settimeout(IO_TIMEOUT_S)
        # Data was dropped, so (as toxiproxy does) removing the toxic closes the connection.
        proxy.destroy_toxic("timeout_downstream")
        _, ended = read_until_closed(sock)
        assert ended in ("eof", "reset")
    with connect(proxy) as sock:
        roundtrip(sock)


def test_timeout_closes_after_its_delay(client: Toxiproxy, echo: EchoServer) -> None:
    proxy = make_proxy(client, echo, "cutoff")
    proxy.add_toxic(type="timeout", stream="upstream", attributes={"timeout": 300})
    with connect(proxy) as sock:
        started = time.monotonic()
        sock.sendall(b"dropped")
        data, ended = read_until_closed(sock)
        assert time.monotonic() - started >= 0.29
        assert data == b"" and ended in ("eof", "reset")


def test_reset_peer_resets(client: Toxiproxy, echo: EchoServer) -> None:
    proxy = make_proxy(client, echo, "rst")
    proxy.add_toxic(type="reset_peer", attributes={"timeout": 0})
    with connect(proxy) as sock:
        sock.sendall(b"hello")
        assert read_until_closed(sock) == (b"", "reset")

    proxy.destroy_toxic("reset_peer_downstream")
    proxy.add_toxic(type="reset_peer", name="late_rst", attributes={"timeout": 250})
    with connect(proxy) as sock:
        started = time.monotonic()
        sock.sendall(b"hello")
        assert read_until_closed(sock) == (b"", "reset")
        assert time.monotonic() - started >= 0.24


def test_limit_data_closes_after_n_bytes(client: Toxiproxy, echo: EchoServer) -> None:
    proxy = make_proxy(client, echo, "limited")
    proxy.add_toxic(type="limit_data", attributes={"bytes": 10})
    with connect(proxy) as sock:
        sock.sendall(b"x" * 100)
        data, ended = read_until_closed(sock)
    assert data == b"x" * 10
    assert ended == "eof"


def test_bandwidth_slows(client: Toxiproxy, echo: EchoServer) -> None:
    proxy = make_proxy(client, echo, "narrow")
    payload = os.urandom(20_000)
    with connect(proxy) as sock:
        assert roundtrip(sock, payload) < 0.5  # unlimited first
        proxy.add_toxic(type="bandwidth", attributes={"rate": 20})  # 20 KB/s: 20 kB take ~1 s
        assert roundtrip(sock, payload) >= 0.6


def test_slow_close_delays_the_close(client: Toxiproxy, echo: EchoServer) -> None:
    proxy = make_proxy(client, echo, "lingering")
    with connect(proxy) as sock:
        roundtrip(sock, b"BYE")  # the echo server closes after this
        assert read_until_closed(sock) == (b"", "eof")

    proxy.add_toxic(type="slow_close", attributes={"delay": 500})
    with connect(proxy) as sock:
        roundtrip(sock, b"BYE")
        started = time.monotonic()
        assert read_until_closed(sock) == (b"", "eof")
        assert time.monotonic() - started >= 0.4


def test_slicer_slices(client: Toxiproxy, echo: EchoServer) -> None:
    proxy = make_proxy(client, echo, "sliced")
    # delay is in microseconds, as in toxiproxy: 20 ms between 10-byte slices.
    proxy.add_toxic(type="slicer", attributes={"average_size": 10, "size_variation": 0, "delay": 20_000})
    with connect(proxy) as sock:
        started = time.monotonic()
        sock.sendall(b"y" * 100)
        pieces: list[bytes] = []
        while sum(map(len, pieces)) < 100:
            pieces.append(sock.recv(100))
        elapsed = time.monotonic() - started
    assert b"".join(pieces) == b"y" * 100
    assert len(pieces) >= 2
    assert elapsed >= 0.15  # nine gaps of 20 ms


# --- Other ways to run the server -----------------------------------------------------------------


def test_async_start_server_in_process(echo: EchoServer) -> None:
    async def scenario() -> None:
        handle = await start_server(LOOPBACK, 0)
        try:
            toxiproxy = Toxiproxy()
            toxiproxy.update_api_consumer(handle.host, handle.port)
            # toxiproxy-python blocks, so it runs in a worker thread while this loop serves it.
            proxy = await asyncio.to_thread(make_proxy, toxiproxy, echo, "async")
            assert handle.proxies["async"].enabled

            def use() -> float:
                with connect(proxy) as sock:
                    return roundtrip(sock)

            await asyncio.to_thread(use)
        finally:
            await handle.stop()

    asyncio.run(scenario())


def test_subprocess_server(echo: EchoServer) -> None:
    handle = spawn_bundled_server(LOOPBACK, 0)
    try:
        assert handle.kind == "bundled" and handle.started
        toxiproxy = handle.configure_client()
        assert toxiproxy.running()
        proxy = make_proxy(toxiproxy, echo, "child")
        proxy.add_toxic(type="latency", attributes={"latency": 200})
        with connect(proxy) as sock:
            assert roundtrip(sock) >= 0.19
    finally:
        handle.stop()
    assert handle.process is None
    assert Toxiproxy().running() is False  # the child is gone, its port closed


def test_ensure_toxiproxy_uses_the_environment_first() -> None:
    handle = ensure_toxiproxy(env={"TOXIPROXY_URL": "http://127.0.0.1:1", "PATH": ""})
    assert (handle.url, handle.kind, handle.started) == ("http://127.0.0.1:1", "env", False)
    handle.stop()  # nothing was started, so nothing is stopped


def test_ensure_toxiproxy_falls_back_to_the_bundled_server(tmp_path: Path) -> None:
    with ensure_toxiproxy(env={"PATH": str(tmp_path)}) as handle:
        assert handle.kind == "bundled"
        assert handle.configure_client().running()
        process = handle.process
    assert process is not None and process.poll() is not None


def test_ensure_toxiproxy_prefers_toxiproxy_server_on_path(tmp_path: Path) -> None:
    # A stand-in "toxiproxy-server" that takes the Go server's -host/-port flags.
    fake = tmp_path / "toxiproxy-server"
    fake.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m tetherlab.chaos.toxiproxy_server "$@"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    with ensure_toxiproxy(env={"PATH": str(tmp_path)}) as handle:
        assert handle.kind == "toxiproxy-server" and handle.host == LOOPBACK
        assert handle.configure_client().running()
        process = handle.process
    assert process is not None and process.poll() is not None
