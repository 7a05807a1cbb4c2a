"""A toxiproxy-compatible server in Python (asyncio + aiohttp).

Shopify's toxiproxy is a Go program that no package registry reachable from here ships, so Tetherlab
bundles this server, which speaks the same HTTP API (the part toxiproxy-python 0.1.1 and the toxiproxy
CLI drive) and applies the same toxics to real TCP connections. ``ensure_toxiproxy`` prefers, in order,
``TOXIPROXY_URL``, a real ``toxiproxy-server`` on PATH, and this server.

Run it::

    python -m tetherlab.chaos.toxiproxy_server --listen 127.0.0.1:8474

It prints one line, ``toxiproxy-compatible server ready url=http://HOST:PORT``, once the API accepts
requests (``--listen 127.0.0.1:0`` picks a free port and the line tells which).

In-process use: ``ToxiproxyServer`` (async start/stop, in the caller's event loop) or
``ThreadedToxiproxyServer`` (its own loop in a thread, for synchronous code such as toxiproxy-python,
whose blocking HTTP calls would otherwise stall the loop that has to answer them).

Behaviour that follows toxiproxy 2.x on purpose:
- Proxy JSON ``{"name", "listen", "upstream", "enabled", "toxics"}``, where ``listen`` is the bound
  address, so ``127.0.0.1:0`` reports its port, and re-enabling re-binds that same port.
- ``POST /proxies/{p}`` with ``enabled: false`` closes the listener and every connection; changing
  ``listen`` or ``upstream`` restarts the proxy (connections are closed).
- A connection ends as a whole when either side closes (no TCP half-close), as in toxiproxy.
- Toxics are added to, updated on and removed from open connections; toxicity is drawn per connection;
  removing a ``timeout`` toxic closes the connections it had been dropping data of.
- ``User-Agent: Mozilla/...`` requests get 403, so a web page cannot drive the API from a browser.

Every queue and buffer is bounded (see the constants below); so are proxies per server, toxics per
proxy and connections per proxy, so a runaway test cannot make the server grow without limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from aiohttp import web
from toxiproxy import Toxiproxy  # type: ignore[import-untyped]

from tetherlab.chaos.toxics import (
    DOWNSTREAM,
    UPSTREAM,
    ApiError,
    Chunk,
    CloseDirection,
    ResetConnection,
    ToxicRuntime,
    ToxicSpec,
    bad_request,
    new_runtime,
)

log = logging.getLogger("tetherlab.chaos.toxiproxy")

# The toxiproxy API version this server mirrors. /version also names the implementation so that a
# caller can tell it from the Go server.
API_VERSION = "2.12.0"
IMPLEMENTATION = "tetherlab-python"
READY_PREFIX = "toxiproxy-compatible server ready url="
DEFAULT_API_HOST = "127.0.0.1"
DEFAULT_API_PORT = 8474

# --- Bounds -----------------------------------------------------------------------------------------
# Largest request body the API accepts; a populate of MAX_PROXIES proxies is far below it.
MAX_BODY_BYTES = 1024 * 1024
# Proxies per server and toxics per proxy: a drill needs a few dozen of each at most.
MAX_PROXIES = 512
MAX_TOXICS_PER_PROXY = 32
# Connections per proxy; further clients are accepted and closed at once, so a connection storm
# cannot exhaust file descriptors or memory.
MAX_CONNECTIONS_PER_PROXY = 1024
# Bytes per socket read; one chunk is what a toxic handles at a time.
READ_CHUNK_BYTES = 16 * 1024
# Chunks queued per direction between the socket reader and the toxic chain. When it is full the
# reader stops reading and TCP flow control pushes back on the sender. With READ_CHUNK_BYTES this is
# at most 512 KiB per direction; it must be deep enough that latency does not also cap throughput.
QUEUE_CHUNKS = 32
# asyncio StreamReader buffer limit and the write-buffer high-water mark above which drain() waits.
STREAM_LIMIT_BYTES = 64 * 1024
WRITE_HIGH_WATER_BYTES = 64 * 1024
# Time allowed to open the upstream connection before the client is closed.
UPSTREAM_CONNECT_TIMEOUT_S = 10.0
# Time allowed to flush written data to a peer on a graceful close before the socket is aborted: a
# peer that stopped reading must not keep a connection slot forever.
FLUSH_GRACE_S = 5.0
# Once one direction of a connection has ended, the other gets this long to deliver what it holds
# (delayed by latency or slow_close, say) before the connection is torn down.
LINK_CLOSE_GRACE_S = 60.0
# Time allowed for a proxy's connections to finish after they were told to stop.
PROXY_STOP_TIMEOUT_S = 5.0
# Listen backlog of each proxy.
PROXY_BACKLOG = 128


# --- Addresses --------------------------------------------------------------------------------------


def split_host_port(address: str, *, what: str) -> tuple[str, int]:
    """Split ``host:port`` or ``[v6]:port``; raise a 400 ApiError when it is not one."""
    if not isinstance(address, str) or ":" not in address:
        raise ApiError(400, f"{what} address must be host:port, got {address!r}")
    host, _, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ApiError(400, f"{what} address has an invalid port: {address!r}") from None
    if not 0 <= port <= 65535:
        raise ApiError(400, f"{what} address has an invalid port: {address!r}")
    return host, port


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def bind_listener(address: str, *, backlog: int = PROXY_BACKLOG) -> socket.socket:
    """Bind one TCP socket to ``address``.

    The name is resolved to a single address first (IPv4 preferred), because letting asyncio bind
    ``localhost:0`` would open one socket per address family, each on a different random port.
    """
    host, port = split_host_port(address, what="listen")
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host or "0.0.0.0", port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ApiError(400, f"cannot resolve listen address {address!r}: {exc}") from None
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        # So that re-enabling a proxy can re-bind its port while old connections sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def socket_address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return join_host_port(host, port)


# --- Connections ------------------------------------------------------------------------------------

CloseMode = Literal["graceful", "abort", "reset"]


def _set_linger_zero(writer: asyncio.StreamWriter | None) -> None:
    """Make the next close of the socket send RST and drop unsent data (SO_LINGER on, 0 s)."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class Link:
    """One client connection through a proxy: the client socket, the upstream socket, two directions.

    Each direction is a reader task (socket -> bounded queue, stamping chunks) and a pump task
    (queue -> this direction's toxics -> the other socket, with drain() for backpressure).
    """

    def __init__(
        self,
        proxy: Proxy,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
    ) -> None:
        self.proxy = proxy
        self._client_reader = client_reader
        self._client_writer = client_writer
        self._upstream_writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self.task: asyncio.Task[Any] | None = None
        peer = client_writer.get_extra_info("peername")
        self.name = join_host_port(str(peer[0]), int(peer[1])) if peer else "?"
        # Toxics of each direction, in the order they were added (new toxics go last, as in toxiproxy).
        self._runtimes: dict[str, list[ToxicRuntime]] = {UPSTREAM: [], DOWNSTREAM: []}
        for spec in proxy.toxics.values():
            self.attach(spec)

    # Toxic changes, called by the proxy for every open connection.

    def attach(self, spec: ToxicSpec) -> None:
        runtime = new_runtime(spec, self.proxy.rng, self._close_from_toxic)
        self._runtimes[spec.stream].append(runtime)
        runtime.start()

    def update(self, spec: ToxicSpec) -> None:
        for runtime in self._runtimes[spec.stream]:
            if runtime.spec.name == spec.name:
                runtime.update(spec)

    def detach(self, spec: ToxicSpec) -> None:
        runtimes = self._runtimes[spec.stream]
        for runtime in list(runtimes):
            if runtime.spec.name == spec.name:
                runtimes.remove(runtime)
                runtime.remove()

    def _close_from_toxic(self) -> None:
        self.shutdown("graceful")

    # Lifecycle.

    def shutdown(self, mode: CloseMode) -> None:
        """Close both sockets now: ``graceful`` flushes what was written, ``abort`` drops it (a plain
        close, FIN), ``reset`` sends RST. Safe to call more than once and from the link's own tasks."""
        if self._closing and mode == "graceful":
            return
        self._closing = True
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        for writer in (self._client_writer, self._upstream_writer):
            if writer is None:
                continue
            transport = writer.transport
            if mode == "reset":
                _set_linger_zero(writer)
                transport.abort()
            elif mode == "abort":
                transport.abort()
            elif not transport.is_closing():
                transport.close()
                # A peer that stopped reading must not hold the socket open forever.
                asyncio.get_running_loop().call_later(FLUSH_GRACE_S, transport.abort)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = split_host_port(self.proxy.upstream, what="upstream")
        try:
            try:
                upstream_reader, upstream_writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port, limit=STREAM_LIMIT_BYTES),
                    timeout=UPSTREAM_CONNECT_TIMEOUT_S,
                )
            except (OSError, TimeoutError) as exc:
                log.info("proxy %s: cannot reach upstream %s: %s", self.proxy.name, self.proxy.upstream, exc)
                return
            self._upstream_writer = upstream_writer
            if self._closing:
                return
            for writer in (self._client_writer, upstream_writer):
                writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER_BYTES)
            to_upstream: asyncio.Queue[Chunk | None] = asyncio.Queue(maxsize=QUEUE_CHUNKS)
            to_downstream: asyncio.Queue[Chunk | None] = asyncio.Queue(maxsize=QUEUE_CHUNKS)
            self._tasks = [
                loop.create_task(self._read(self._client_reader, to_upstream)),
                loop.create_task(self._read(upstream_reader, to_downstream)),
            ]
            pumps = [
                loop.create_task(self._pump(UPSTREAM, to_upstream, upstream_writer)),
                loop.create_task(self._pump(DOWNSTREAM, to_downstream, self._client_writer)),
            ]
            self._tasks.extend(pumps)
            _, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            if pending:
                await asyncio.wait(pending, timeout=LINK_CLOSE_GRACE_S)
        finally:
            self._closing = True
            for runtimes in self._runtimes.values():
                for runtime in runtimes:
                    runtime.dispose()
            for task in self._tasks:
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            for writer in (self._client_writer, self._upstream_writer):
                if writer is not None and not writer.transport.is_closing():
                    writer.transport.abort()

    async def _read(self, reader: asyncio.StreamReader, queue: asyncio.Queue[Chunk | None]) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await reader.read(READ_CHUNK_BYTES)
                if not data:
                    break
                await queue.put(Chunk(data, loop.time()))
        except (ConnectionError, OSError):
            pass
        await queue.put(None)  # end of stream

    async def _pump(self, stream: str, queue: asyncio.Queue[Chunk | None], writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                chunk = await queue.get()
                # A snapshot, so that toxics added or removed meanwhile apply from the next chunk on.
                runtimes = tuple(self._runtimes[stream])
                if chunk is None:
                    for runtime in runtimes:
                        if runtime.running:
                            await runtime.on_eof()
                    break
                await self._through(chunk, runtimes, 0, writer)
        except CloseDirection:
            pass
        except ResetConnection:
            self.shutdown("reset")
            return
        except (ConnectionError, OSError):
            pass
        # Closing this socket also ends the opposite direction, which reads from it: like toxiproxy,
        # a connection ends as a whole, after each direction delivered what it already holds.
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), timeout=FLUSH_GRACE_S)
        except (TimeoutError, ConnectionError, OSError):
            writer.transport.abort()

    async def _through(
        self, chunk: Chunk, runtimes: Sequence[ToxicRuntime], index: int, writer: asyncio.StreamWriter
    ) -> None:
        while index < len(runtimes) and not runtimes[index].running:
            index += 1
        if index == len(runtimes):
            writer.write(chunk.data)
            await writer.drain()
            return
        forward: Callable[[Chunk], Awaitable[None]] = functools.partial(
            self._through, runtimes=runtimes, index=index + 1, writer=writer
        )
        await runtimes[index].on_chunk(chunk, forward)


# --- Proxies ----------------------------------------------------------------------------------------


class Proxy:
    def __init__(
        self,
        name: str,
        listen: str,
        upstream: str,
        *,
        rng: random.Random,
        max_connections: int = MAX_CONNECTIONS_PER_PROXY,
    ) -> None:
        self.name = name
        # The requested address until the first bind, then the bound one, so that re-enabling
        # re-binds the same port (clients and configs keep working), as toxiproxy does.
        self.listen = listen
        self.upstream = upstream
        self.enabled = False
        self.rng = rng
        self.toxics: dict[str, ToxicSpec] = {}
        self._max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._links: set[Link] = set()

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "listen": self.listen,
            "upstream": self.upstream,
            "enabled": self.enabled,
            "toxics": [spec.to_json() for spec in self.ordered_toxics()],
        }

    def ordered_toxics(self) -> list[ToxicSpec]:
        # toxiproxy lists the upstream chain, then the downstream chain, each in order of addition.
        return [s for s in self.toxics.values() if s.stream == UPSTREAM] + [
            s for s in self.toxics.values() if s.stream == DOWNSTREAM
        ]

    @property
    def connection_count(self) -> int:
        return len(self._links)

    async def start(self) -> None:
        if self.enabled:
            return
        try:
            sock = await bind_listener(self.listen)
        except OSError as exc:
            raise ApiError(500, f"listen {self.listen}: {exc.strerror or exc}") from None
        self.listen = socket_address(sock)
        self._server = await asyncio.start_server(self._on_client, sock=sock, limit=STREAM_LIMIT_BYTES)
        self.enabled = True
        log.info("proxy %s listening on %s -> %s", self.name, self.listen, self.upstream)

    async def stop(self) -> None:
        """Stop listening (new connections are refused) and close every connection."""
        self.enabled = False
        server, self._server = self._server, None
        if server is not None:
            server.close()
        links = list(self._links)
        for link in links:
            link.shutdown("abort")
        tasks = [link.task for link in links if link.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=PROXY_STOP_TIMEOUT_S)
        if server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), timeout=PROXY_STOP_TIMEOUT_S)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.enabled or len(self._links) >= self._max_connections:
            if self.enabled:
                log.warning("proxy %s: %d connections open, refusing another", self.name, len(self._links))
            writer.transport.abort()
            return
        link = Link(self, reader, writer)
        link.task = asyncio.current_task()
        self._links.add(link)
        try:
            await link.run()
        finally:
            self._links.discard(link)

    def add_toxic(self, spec: ToxicSpec) -> None:
        self.toxics[spec.name] = spec
        for link in list(self._links):
            link.attach(spec)

    def update_toxic(self, spec: ToxicSpec) -> None:
        self.toxics[spec.name] = spec
        for link in list(self._links):
            link.update(spec)

    def remove_toxic(self, name: str) -> None:
        spec = self.toxics.pop(name)
        for link in list(self._links):
            link.detach(spec)

    def remove_all_toxics(self) -> None:
        for name in list(self.toxics):
            self.remove_toxic(name)


# --- HTTP API ---------------------------------------------------------------------------------------


def _json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


def _error_response(error: ApiError, **extra: Any) -> web.Response:
    return _json_response({**error.to_json(), **extra}, status=error.status)


async def _read_json(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return json.loads(raw) if raw.strip() else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(str(exc)) from None


def _optional_str(body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_request(f"{key} must be a string")
    return value


def _optional_bool(body: Mapping[str, Any], key: str) -> bool | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise bad_request(f"{key} must be a boolean")
    return value


@dataclass(frozen=True, slots=True)
class _ProxyInput:
    name: str
    listen: str
    upstream: str
    enabled: bool


def _parse_proxy_input(body: object, *, position: str = "") -> _ProxyInput:
    if not isinstance(body, dict):
        raise bad_request("expected a JSON object")
    name = _optional_str(body, "name") or ""
    upstream = _optional_str(body, "upstream") or ""
    listen = _optional_str(body, "listen") or "127.0.0.1:0"
    enabled = _optional_bool(body, "enabled")
    if not name:
        raise ApiError(400, f"missing required field: name{position}")
    if not upstream:
        raise ApiError(400, f"missing required field: upstream{position}")
    split_host_port(listen, what="listen")
    split_host_port(upstream, what="upstream")
    return _ProxyInput(name, listen, upstream, True if enabled is None else enabled)


class ToxiproxyServer:
    """The HTTP API and every proxy, in the current event loop."""

    def __init__(
        self,
        host: str = DEFAULT_API_HOST,
        port: int = DEFAULT_API_PORT,
        *,
        seed: int | None = None,
        max_connections_per_proxy: int = MAX_CONNECTIONS_PER_PROXY,
    ) -> None:
        self.host = host
        self.port = port
        self.rng = random.Random(seed)
        self.proxies: dict[str, Proxy] = {}
        self._max_connections = max_connections_per_proxy
        # Serializes changes to proxies: handlers await while binding and closing, and two requests
        # interleaving there could, for example, create the same name twice.
        self._lock = asyncio.Lock()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{join_host_port(self.host, self.port)}"

    async def start(self) -> ToxiproxyServer:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._middleware])
        self._add_routes(app)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        sock = await bind_listener(join_host_port(self.host, self.port))
        self.host, self.port = sock.getsockname()[:2]
        await web.SockSite(self._runner, sock).start()
        log.info("toxiproxy API listening on %s", self.url)
        return self

    async def stop(self) -> None:
        async with self._lock:
            for proxy in list(self.proxies.values()):
                await proxy.stop()
            self.proxies.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> ToxiproxyServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # Routing.

    def _add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/version", self._version)
        r.add_post("/reset", self._reset)
        r.add_get("/proxies", self._proxy_index)
        r.add_post("/proxies", self._proxy_create)
        r.add_post("/populate", self._populate)
        r.add_get("/proxies/{proxy}", self._proxy_show)
        r.add_post("/proxies/{proxy}", self._proxy_update)
        r.add_patch("/proxies/{proxy}", self._proxy_update)
        r.add_delete("/proxies/{proxy}", self._proxy_delete)
        r.add_get("/proxies/{proxy}/toxics", self._toxic_index)
        r.add_post("/proxies/{proxy}/toxics", self._toxic_create)
        r.add_get("/proxies/{proxy}/toxics/{toxic}", self._toxic_show)
        r.add_post("/proxies/{proxy}/toxics/{toxic}", self._toxic_update)
        r.add_patch("/proxies/{proxy}/toxics/{toxic}", self._toxic_update)
        r.add_delete("/proxies/{proxy}/toxics/{toxic}", self._toxic_delete)

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        # As toxiproxy does: refuse browsers, so a web page cannot make the browser drive this API
        # (simple cross-origin POSTs need no preflight).
        if request.headers.get("User-Agent", "").startswith("Mozilla/"):
            return web.Response(status=403, text="User agent not allowed\n")
        try:
            return await handler(request)
        except ApiError as error:
            return _error_response(error)
        except web.HTTPRequestEntityTooLarge:
            return _error_response(bad_request(f"body larger than {MAX_BODY_BYTES} bytes"))

    def _get_proxy(self, request: web.Request) -> Proxy:
        proxy = self.proxies.get(request.match_info["proxy"])
        if proxy is None:
            raise ApiError(404, "proxy not found")
        return proxy

    # Handlers.

    async def _version(self, request: web.Request) -> web.Response:
        return _json_response({"version": API_VERSION, "implementation": IMPLEMENTATION})

    async def _reset(self, request: web.Request) -> web.Response:
        async with self._lock:
            for proxy in self.proxies.values():
                await proxy.start()
                proxy.remove_all_toxics()
        return web.Response(status=204)

    async def _proxy_index(self, request: web.Request) -> web.Response:
        return _json_response({name: proxy.to_json() for name, proxy in self.proxies.items()})

    async def _proxy_create(self, request: web.Request) -> web.Response:
        spec = _parse_proxy_input(await _read_json(request))
        async with self._lock:
            if spec.name in self.proxies:
                raise ApiError(409, "proxy already exists")
            proxy = await self._new_proxy(spec)
        return _json_response(proxy.to_json(), status=201)

    async def _new_proxy(self, spec: _ProxyInput) -> Proxy:
        if len(self.proxies) >= MAX_PROXIES:
            raise ApiError(400, f"too many proxies (this server allows {MAX_PROXIES})")
        proxy = Proxy(spec.name, spec.listen, spec.upstream, rng=self.rng, max_connections=self._max_connections)
        if spec.enabled:
            await proxy.start()  # raises before the proxy is registered, as toxiproxy does
        self.proxies[spec.name] = proxy
        return proxy

    async def _populate(self, request: web.Request) -> web.Response:
        try:
            proxies = await self._populate_all(await _read_json(request))
        except ApiError as error:
            return _error_response(error, proxies=[])
        return _json_response({"proxies": [proxy.to_json() for proxy in proxies]}, status=201)

    async def _populate_all(self, body: object) -> list[Proxy]:
        if not isinstance(body, list):
            raise bad_request("expected a JSON array of proxies")
        # Validate everything before changing anything, as toxiproxy does.
        specs: list[_ProxyInput] = []
        for index, item in enumerate(body):
            spec = _parse_proxy_input(item, position=f" at proxy {index + 1}")
            if any(s.name == spec.name for s in specs):
                raise bad_request(f"duplicate proxy name {spec.name!r}")
            specs.append(spec)
        result: list[Proxy] = []
        async with self._lock:
            for spec in specs:
                existing = self.proxies.get(spec.name)
                if existing is not None:
                    if existing.listen == spec.listen and existing.upstream == spec.upstream:
                        result.append(existing)  # unchanged, kept with its toxics and connections
                        continue
                    await existing.stop()
                    del self.proxies[spec.name]
                result.append(await self._new_proxy(spec))
        return result

    async def _proxy_show(self, request: web.Request) -> web.Response:
        return _json_response(self._get_proxy(request).to_json())

    async def _proxy_update(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        if not isinstance(body, dict):
            raise bad_request("expected a JSON object")
        async with self._lock:
            proxy = self._get_proxy(request)
            listen = _optional_str(body, "listen") or proxy.listen
            upstream = _optional_str(body, "upstream") or proxy.upstream
            enabled = _optional_bool(body, "enabled")
            enabled = proxy.enabled if enabled is None else enabled
            split_host_port(listen, what="listen")
            split_host_port(upstream, what="upstream")
            if listen != proxy.listen or upstream != proxy.upstream:
                was_enabled = proxy.enabled
                await proxy.stop()
                proxy.listen, proxy.upstream = listen, upstream
                if was_enabled and enabled:
                    await proxy.start()
            if enabled and not proxy.enabled:
                await proxy.start()
            elif not enabled and proxy.enabled:
                await proxy.stop()
        return _json_response(proxy.to_json())

    async def _proxy_delete(self, request: web.Request) -> web.Response:
        async with self._lock:
            proxy = self._get_proxy(request)
            del self.proxies[proxy.name]
            await proxy.stop()
        return web.Response(status=204)

    async def _toxic_index(self, request: web.Request) -> web.Response:
        return _json_response([spec.to_json() for spec in self._get_proxy(request).ordered_toxics()])

    async def _toxic_create(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        async with self._lock:
            proxy = self._get_proxy(request)
            spec = ToxicSpec.from_request(body, lambda name: name in proxy.toxics)
            if len(proxy.toxics) >= MAX_TOXICS_PER_PROXY:
                raise ApiError(400, f"too many toxics (this server allows {MAX_TOXICS_PER_PROXY} per proxy)")
            proxy.add_toxic(spec)
        return _json_response(spec.to_json())

    def _get_toxic(self, proxy: Proxy, request: web.Request) -> ToxicSpec:
        spec = proxy.toxics.get(request.match_info["toxic"])
        if spec is None:
            raise ApiError(404, "toxic not found")
        return spec

    async def _toxic_show(self, request: web.Request) -> web.Response:
        proxy = self._get_proxy(request)
        return _json_response(self._get_toxic(proxy, request).to_json())

    async def _toxic_update(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        async with self._lock:
            proxy = self._get_proxy(request)
            spec = self._get_toxic(proxy, request).updated(body)
            proxy.update_toxic(spec)
        return _json_response(spec.to_json())

    async def _toxic_delete(self, request: web.Request) -> web.Response:
        async with self._lock:
            proxy = self._get_proxy(request)
            self._get_toxic(proxy, request)
            proxy.remove_toxic(request.match_info["toxic"])
        return web.Response(status=204)

    async def populate_from_file(self, path: Path) -> list[Proxy]:
        """Create the proxies of a toxiproxy ``-config`` JSON file (a list of proxies)."""
        return await self._populate_all(json.loads(path.read_text()))


async def start_server(
    host: str = DEFAULT_API_HOST, port: int = DEFAULT_API_PORT, *, seed: int | None = None
) -> ToxiproxyServer:
    """Start the server in the running event loop; ``await handle.stop()`` stops it."""
    return await ToxiproxyServer(host, port, seed=seed).start()


class ThreadedToxiproxyServer:
    """The server on its own event loop in a daemon thread, for synchronous callers.

    ::

        with ThreadedToxiproxyServer("127.0.0.1", 0) as server:
            Toxiproxy().update_api_consumer(server.host, server.port)
    """

    def __init__(
        self,
        host: str = DEFAULT_API_HOST,
        port: int = 0,
        *,
        seed: int | None = None,
        max_connections_per_proxy: int = MAX_CONNECTIONS_PER_PROXY,
        start_timeout_s: float = 10.0,
    ) -> None:
        self._server = ToxiproxyServer(host, port, seed=seed, max_connections_per_proxy=max_connections_per_proxy)
        self._start_timeout_s = start_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return self._server.host

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def server(self) -> ToxiproxyServer:
        return self._server

    def start(self) -> ThreadedToxiproxyServer:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="toxiproxy-server", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._server.start(), loop).result(self._start_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def call(self, coro: Awaitable[Any], timeout_s: float = 30.0) -> Any:
        """Run a coroutine on the server's loop and return its result (for tests and tools)."""
        assert self._loop is not None, "server not started"

        async def wrapper() -> Any:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(timeout_s)

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None
        try:
            if loop.is_running():
                asyncio.run_coroutine_threadsafe(self._server.stop(), loop).result(30.0)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10.0)
            if not thread.is_alive():
                loop.close()

    def __enter__(self) -> ThreadedToxiproxyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- Subprocesses and ensure_toxiproxy -------------------------------------------------------------


def _wait_for_api(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Poll GET /version until it answers, the process exits, or the time runs out."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"toxiproxy server exited with status {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/version", timeout=1.0) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError) as exc:
            last_error = exc
        time.sleep(0.05)
    raise TimeoutError(f"toxiproxy server at {url} not ready after {timeout_s} s: {last_error}")


def _stop_process(process: subprocess.Popen[bytes], *, timeout_s: float = 5.0) -> None:
    """Stop one process we started: close its stdin (our servers exit on that), then SIGTERM, then SIGKILL."""
    actions: list[Callable[[], None] | None] = [process.terminate, process.kill]
    if process.stdin is not None:
        with contextlib.suppress(OSError):
            process.stdin.close()
        actions.insert(0, None)  # first give it the chance to exit on its own
    for action in actions:
        if action is not None and process.poll() is None:
            action()
        try:
            process.wait(timeout=timeout_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _free_loopback_port(host: str) -> int:
    # Only for the Go server, which cannot report a port it picked itself. The port could be taken
    # between this check and the bind; then the server fails to start and we say so.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class ToxiproxyHandle:
    """Where the toxiproxy API is, and the process we started for it, if any."""

    url: str
    # "env": TOXIPROXY_URL, nothing started; "toxiproxy-server": the Go server; "bundled": this module.
    kind: Literal["env", "toxiproxy-server", "bundled"]
    process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return urllib.parse.urlsplit(self.url).hostname or DEFAULT_API_HOST

    @property
    def port(self) -> int:
        return urllib.parse.urlsplit(self.url).port or DEFAULT_API_PORT

    @property
    def started(self) -> bool:
        return self.process is not None

    def configure_client(self) -> Any:
        """Point toxiproxy-python (whose API address is global, class-level state) at this server."""
        client = Toxiproxy()
        client.update_api_consumer(self.host, self.port)
        return client

    def stop(self) -> None:
        """Stop the server if this handle started it; a server found through TOXIPROXY_URL is left alone."""
        process, self.process = self.process, None
        if process is not None:
            _stop_process(process)

    def __enter__(self) -> ToxiproxyHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def spawn_bundled_server(
    host: str = DEFAULT_API_HOST,
    port: int = 0,
    *,
    seed: int | None = None,
    ready_timeout_s: float = 15.0,
    stderr: int | IO[Any] | None = None,
    python: str = sys.executable,
) -> ToxiproxyHandle:
    """Run this server as a subprocess and wait for its ready line.

    The child exits when its stdin closes, so it does not outlive us even if we die without
    stopping it. Its stdout carries only the ready line; logs go to ``stderr`` (inherited by default).
    """
    command = [
        python,
        "-m",
        "tetherlab.chaos.toxiproxy_server",
        "--listen",
        join_host_port(host, port),
        "--stop-on-stdin-eof",
    ]
    if seed is not None:
        command += ["--seed", str(seed)]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
    assert process.stdout is not None
    try:
        line = _read_line(process, process.stdout, ready_timeout_s)
        if not line.startswith(READY_PREFIX):
            raise RuntimeError(f"unexpected first line from the toxiproxy server: {line!r}")
        url = line[len(READY_PREFIX) :].strip()
    except BaseException:
        _stop_process(process)
        raise
    finally:
        process.stdout.close()
    return ToxiproxyHandle(url=url, kind="bundled", process=process)


def _read_line(process: subprocess.Popen[bytes], stream: IO[bytes], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    buffer = b""
    fd = stream.fileno()
    # A ready line is a few dozen bytes; anything much longer is not one.
    while b"\n" not in buffer and len(buffer) < 4096:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"toxiproxy server printed no ready line within {timeout_s} s")
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            continue
        data = os.read(fd, 4096)
        if not data:
            process.wait(timeout=5.0)
            raise RuntimeError(f"toxiproxy server exited with status {process.returncode} before it was ready")
        buffer += data
    return buffer.split(b"\n", 1)[0].decode(errors="replace")


def spawn_toxiproxy_binary(
    binary: str,
    host: str = DEFAULT_API_HOST,
    port: int | None = None,
    *,
    ready_timeout_s: float = 15.0,
    stderr: int | IO[Any] | None = subprocess.DEVNULL,
) -> ToxiproxyHandle:
    """Run a real ``toxiproxy-server`` (``-host``/``-port`` flags) and wait until its API answers."""
    port = port or _free_loopback_port(host)
    process = subprocess.Popen(
        [binary, "-host", host, "-port", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,  # its log is not read, so it must not fill a pipe
        stderr=stderr,
    )
    url = f"http://{join_host_port(host, port)}"
    try:
        _wait_for_api(url, process, ready_timeout_s)
    except BaseException:
        _stop_process(process)
        raise
    return ToxiproxyHandle(url=url, kind="toxiproxy-server", process=process)


def ensure_toxiproxy(
    *,
    host: str = DEFAULT_API_HOST,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    binary: str = "toxiproxy-server",
    seed: int | None = None,
    stderr: int | IO[Any] | None = None,
) -> ToxiproxyHandle:
    """Return a handle with the toxiproxy API URL to use.

    In order: ``TOXIPROXY_URL`` if set (nothing is started); a ``toxiproxy-server`` found on PATH,
    started as a subprocess; this bundled server, started as a subprocess. ``handle.stop()`` stops
    only what was started here. ``port=None`` picks a free port.
    """
    environ = os.environ if env is None else env
    url = environ.get("TOXIPROXY_URL", "").strip()
    if url:
        if "://" not in url:
            url = f"http://{url}"
        return ToxiproxyHandle(url=url.rstrip("/"), kind="env")
    found = shutil.which(binary, path=environ.get("PATH"))
    if found:
        return spawn_toxiproxy_binary(found, host, port, stderr=subprocess.DEVNULL if stderr is None else stderr)
    return spawn_bundled_server(host, port or 0, seed=seed, stderr=stderr)


# --- Command line -----------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tetherlab.chaos.toxiproxy_server",
        description="A toxiproxy-compatible server (HTTP API and TCP proxies with toxics).",
    )
    parser.add_argument("--listen", help=f"API address host:port (default {DEFAULT_API_HOST}:{DEFAULT_API_PORT})")
    # toxiproxy-server's own flags, so this can stand in where its command line is expected.
    parser.add_argument("-host", "--host", dest="host", help="API host (toxiproxy-server style)")
    parser.add_argument("-port", "--port", dest="port", type=int, help="API port (toxiproxy-server style)")
    parser.add_argument("-config", "--config", dest="config", type=Path, help="JSON file of proxies to create")
    parser.add_argument("-seed", "--seed", dest="seed", type=int, help="seed for jitter, toxicity and slicing")
    parser.add_argument(
        "--stop-on-stdin-eof", action="store_true", help="exit when stdin closes (used when run as a child)"
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level on stderr (default WARNING)")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    host, port = DEFAULT_API_HOST, DEFAULT_API_PORT
    if args.listen:
        host, port = split_host_port(args.listen, what="API listen")
    if args.host:
        host = args.host
    if args.port is not None:
        port = args.port
    server = ToxiproxyServer(host, port, seed=args.seed)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if args.stop_on_stdin_eof:
        # A blocking read in a daemon thread: it returns when the parent closes the pipe or dies.
        def watch_stdin() -> None:
            with contextlib.suppress(OSError, ValueError):
                while sys.stdin.buffer.read(4096):
                    pass
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True).start()
    try:
        if args.config:
            await server.populate_from_file(args.config)
        print(f"{READY_PREFIX}{server.url}", flush=True)
        await stop.wait()
    finally:
        await server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    try:
        asyncio.run(_serve(args))
    except ApiError as error:
        print(f"toxiproxy server: {error.message}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"toxiproxy server: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
