"""A node's HTTP endpoint: health for load balancers, Prometheus metrics, and the read-only API.

- ``/livez``: the process serves (a local read); ``/readyz``: a leader is known and a
  linearizable read succeeds; ``/health``: the same in etcd's shape (503 and
  ``{"health": "false", "reason": "RAFT NO LEADER"}`` without a leader);
- ``/metrics``: Prometheus exposition;
- ``/v1/status``, ``/v1/concepts``, ``/v1/intents``, ``/v1/agents``: this node's applied state,
  paginated and bounded; ``?consistent=true`` reads after a read barrier. A bad parameter gets a
  400 naming it;
- ``/ui/``: the live world view (``ui.WorldView``).

``/ui/``, ``/v1/`` and ``/metrics`` follow one access rule (``access.AccessRule``): open on
loopback, a read token from anywhere else.

Isolation (docs/hardening.md): HTTP must never starve the SSH endpoint or Raft. The aiohttp
application runs on a thread and event loop of its own, so a burst of requests never queues in
front of the shims' requests, and behind bounds of its own (``[limits]``):

- connections are accepted here, at most ``http_accepts_per_s`` a second (the rest wait in the
  kernel's queue), and at most ``http_connections_max`` are held: a new one closes the oldest
  connection that never completed a request (a slowloris one), else the oldest idle keep-alive
  one, or is refused with a 503 when every connection is busy;
- a request's head must arrive within ``http_header_timeout_s`` of the connection opening or of
  the previous answer (408 and closed otherwise), and an idle keep-alive connection is closed
  after as long;
- requests are answered at most ``http_requests_per_s`` a second, all connections together: one
  over the pace waits its turn, or gets a 503 if that would take longer than the header timeout;
- ``/metrics``, ``/readyz``, ``/health`` and the non-consistent ``/v1`` lists are cached for
  ``http_cache_s`` (the most a cached answer lags the node's state): a flood of them costs one
  rendering per period. ``/v1/status``, ``/livez`` and ``?consistent=true`` are always fresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tetherlab.cluster.core.config import Address, LoadLimits
from tetherlab.cluster.core.engine.model import STATUSES
from tetherlab.cluster.node.access import AccessRule
from tetherlab.cluster.node.errors import Indeterminate, Unavailable
from tetherlab.cluster.node.metrics import NodeMetrics
from tetherlab.cluster.node.quotas import TokenBucket
from tetherlab.cluster.node.replica import Replica
from tetherlab.cluster.node.ui import WorldView

log = logging.getLogger("tetherlab.http")

READYZ_TIMEOUT_S = 2.0
API_LIMIT_DEFAULT = 100
API_LIMIT_MAX = 1000
REQUEST_BODY_MAX_BYTES = 64 * 1024
AFTER_MAX_CHARS = 512
HANDLERS_MAX = 8  # requests that wait on Raft (consistent reads, readiness) at once
CACHE_ENTRIES_MAX = 256  # distinct cached /v1 queries
LISTEN_BACKLOG = 256
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Rendered = tuple[int, str, bytes]  # status, content type, body


def _rendered(resp: web.Response) -> Rendered:
    return resp.status, resp.headers.get("Content-Type", "application/json"), bytes(resp.body or b"")


def _response(r: Rendered) -> web.Response:
    return web.Response(status=r[0], body=r[2], headers={"Content-Type": r[1]})


class _Cache:
    """Rendered answers by key, each good for ``ttl_s``; at most :data:`CACHE_ENTRIES_MAX`."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._items: dict[Any, tuple[float, Rendered]] = {}

    def get(self, key: Any, now: float) -> Rendered | None:
        hit = self._items.get(key)
        if hit is None or now >= hit[0]:
            return None
        return hit[1]

    def put(self, key: Any, now: float, value: Rendered) -> None:
        if len(self._items) >= CACHE_ENTRIES_MAX:
            for k in [k for k, (exp, _) in self._items.items() if exp <= now] or [next(iter(self._items))]:
                del self._items[k]
        self._items[key] = (now + self.ttl_s, value)


class HttpApi:
    def __init__(self, address: Address, node_id: str, replica: Replica, metrics: NodeMetrics,
                 status: Callable[[], dict[str, Any]], before_scrape: Callable[[], None],
                 access: AccessRule | None = None, world: WorldView | None = None,
                 limits: LoadLimits | None = None) -> None:
        self.access = access
        self.world = world
        self.address = address
        self.node_id = node_id
        self.replica = replica
        self.metrics = metrics
        self.status = status
        self.before_scrape = before_scrape
        self.limits = limits or LoadLimits()
        self.port = address.port  # the bound port (the one picked, for port 0)
        self._cache = _Cache(self.limits.http_cache_s)
        # Requests are paced with GCRA: each takes the next slot of 1/rate; a quarter second's
        # worth goes at once.
        self._interval_s = 1.0 / self.limits.http_requests_per_s
        self._slack_s = max(self._interval_s, 0.25)
        self._tat = 0.0
        self._main_loop: asyncio.AbstractEventLoop | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._conns: dict[_Guard, None] = {}  # oldest first
        self._by_transport: dict[Any, _Guard] = {}
        self._handlers: asyncio.Semaphore | None = None

    def app(self) -> web.Application:
        middlewares: list[Any] = [self._pace]
        if self.access is not None:
            middlewares.append(self.access.middleware())
        app = web.Application(client_max_size=REQUEST_BODY_MAX_BYTES, middlewares=middlewares)
        if self.world is not None:
            self.world.add_routes(app)
        app.router.add_get("/livez", self._h_livez)
        app.router.add_get("/readyz", self._h_readyz)
        app.router.add_get("/health", self._h_health)
        app.router.add_get("/metrics", self._h_metrics)
        app.router.add_get("/v1/status", self._h_status)
        app.router.add_get("/v1/concepts", self._h_concepts)
        app.router.add_get("/v1/intents", self._h_intents)
        app.router.add_get("/v1/agents", self._h_agents)
        return app

    # --- lifecycle (called on the node's loop) ---------------------------------------------------

    async def start(self) -> None:
        self._main_loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._thread_main, name="http", daemon=True)
        self._thread.start()
        started = await self._main_loop.run_in_executor(None, self._started.wait, START_TIMEOUT_S)
        if self._start_error is not None:
            raise self._start_error
        if not started:
            raise RuntimeError(f"the HTTP endpoint did not start within {START_TIMEOUT_S} s")

    async def stop(self) -> None:
        loop, stop, thread = self._loop, self._stop, self._thread
        if loop is None or stop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):  # its loop has ended already
            loop.call_soon_threadsafe(stop.set)
        await asyncio.get_running_loop().run_in_executor(None, thread.join, STOP_TIMEOUT_S)

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # reported to start(); the node does not run without HTTP
            self._start_error = e
            self._started.set()

    async def _serve(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._handlers = asyncio.Semaphore(HANDLERS_MAX)
        # The guard closes idle and slow connections at the header timeout (with a 408 and a count);
        # aiohttp's own keep-alive timer is only a backstop behind it.
        runner = web.AppRunner(self.app(), access_log=None,
                               keepalive_timeout=self.limits.http_header_timeout_s + 1.0)
        await runner.setup()
        infos = await loop.getaddrinfo(self.address.host, self.address.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]
        lsock = socket.socket(family, socket.SOCK_STREAM)
        try:
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lsock.bind(sockaddr)
            lsock.listen(LISTEN_BACKLOG)
            lsock.setblocking(False)
            self.port = lsock.getsockname()[1]
            server = runner.server
            assert server is not None
            acceptor = loop.create_task(self._accept(lsock, server))
            self._started.set()
            await self._stop.wait()
            acceptor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await acceptor
        finally:
            lsock.close()
            if self.world is not None:
                with contextlib.suppress(Exception):
                    await self.world.stop()
            for g in list(self._conns):
                g.abort()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await runner.cleanup()

    async def _accept(self, lsock: socket.socket, server: Callable[[], asyncio.Protocol]) -> None:
        """Accept at most ``http_accepts_per_s``: a connection flood waits in the kernel's queue
        (and overflows there) instead of costing this thread a setup and a teardown each."""
        loop = asyncio.get_running_loop()
        rate = self.limits.http_accepts_per_s
        bucket = TokenBucket(rate, max(1, int(rate // 4)), time.monotonic())
        while True:
            try:
                sock, _ = await loop.sock_accept(lsock)
            except OSError as e:  # out of descriptors, for one: wait, do not spin
                log.warning("HTTP accept failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            while not bucket.take(time.monotonic()):
                await asyncio.sleep(1.0 / rate)
            try:
                sock.setblocking(False)
                await loop.connect_accepted_socket(lambda: _Guard(self, server()), sock)
            except OSError:
                sock.close()

    # --- connections and pace (HTTP thread) ---------------------------------------------------------

    def _admit(self, guard: _Guard) -> bool:
        """Room for ``guard``: at the cap, the oldest connection that never completed a request
        goes (a slowloris one), else the oldest idle keep-alive one; all busy: refused."""
        if len(self._conns) >= self.limits.http_connections_max:
            self.metrics.http_connections_closed.labels("connections_max").inc()
            idle = next((g for g in self._conns if not g.busy and not g.served), None) or \
                next((g for g in self._conns if not g.busy), None)
            if idle is None:
                return False
            self._forget(idle)
            idle.abort()
        self._conns[guard] = None
        self._by_transport[guard.transport] = guard
        self.metrics.http_connections.set(len(self._conns))
        return True

    def _forget(self, guard: _Guard) -> None:
        self._conns.pop(guard, None)
        self._by_transport.pop(guard.transport, None)
        self.metrics.http_connections.set(len(self._conns))

    def reserve(self) -> float | None:
        """Seconds this request waits for its turn, or None when that would pass the header
        timeout (the node is answering ``http_requests_per_s`` already)."""
        now = time.monotonic()
        tat = max(self._tat, now)
        delay = max(0.0, tat - now - self._slack_s)
        if delay > self.limits.http_header_timeout_s:
            return None
        self._tat = tat + self._interval_s
        return delay

    @web.middleware
    async def _pace(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        guard = self._by_transport.get(request.transport)
        if guard is not None:
            guard.begin()
        try:
            delay = self.reserve()
            if delay is None:
                self.metrics.http_connections_closed.labels("requests_per_s").inc()
                self.metrics.http_requests.labels("503").inc()
                return web.json_response({"error": "too many HTTP requests; retry shortly", "status": 503},
                                         status=503, headers={"Connection": "close", "Retry-After": "1"})
            if delay > 0:
                await asyncio.sleep(delay)
            resp = await handler(request)
            self.metrics.http_requests.labels(str(resp.status)).inc()
            return resp
        except web.HTTPException as e:
            self.metrics.http_requests.labels(str(e.status)).inc()
            raise
        finally:
            if guard is not None:
                guard.end()

    async def _on_main_loop(self, coro: Awaitable[Any]) -> Any:
        """Run ``coro`` (a replica call) on the node's loop, which owns the replica; in-process
        tests that never started the thread run it where they are."""
        main = self._main_loop
        if main is None or main is asyncio.get_running_loop():
            return await coro
        fut = asyncio.run_coroutine_threadsafe(coro, main)  # type: ignore[arg-type]
        return await asyncio.wrap_future(fut)

    async def _waiting(self, coro: Awaitable[Any]) -> Any:
        """A call that waits on Raft, at most :data:`HANDLERS_MAX` at once."""
        if self._handlers is None:
            self._handlers = asyncio.Semaphore(HANDLERS_MAX)
        async with self._handlers:
            return await self._on_main_loop(coro)

    async def _cached(self, key: Any, render: Callable[[], Awaitable[web.Response]]) -> web.Response:
        hit = self._cache.get(key, time.monotonic())
        if hit is not None:
            return _response(hit)
        resp = await render()
        if resp.status < 500:
            self._cache.put(key, time.monotonic(), _rendered(resp))
        return resp

    # --- handlers (HTTP thread) ----------------------------------------------------------------------

    async def _h_livez(self, request: web.Request) -> web.Response:
        # Open to anyone (load balancers, the world view of the other nodes): role, term and
        # indexes, nothing about who works on what.
        st = self.status()  # the node's status: its version too
        fields = ("role", "term", "leader", "quorum_backed", "commit_index", "applied_index", "version")
        return web.json_response({"live": True, "node": self.node_id, **{k: st.get(k) for k in fields}})

    async def _h_status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    def _query(self, request: web.Request, allowed: dict[str, Any]) -> dict[str, Any] | web.Response:
        """Validated query parameters, or a 400 response naming the bad one."""
        q = request.query
        unknown = sorted(set(q) - set(allowed) - {"limit", "after", "consistent"})
        if unknown:
            return _bad_request(f"unknown query parameter(s) {unknown}; allowed: "
                                f"{sorted({'limit', 'after', 'consistent', *allowed})}")
        out: dict[str, Any] = {}
        try:
            limit = int(q.get("limit", API_LIMIT_DEFAULT))
        except ValueError:
            return _bad_request(f"limit must be an integer, got {q.get('limit')!r}")
        if not 1 <= limit <= API_LIMIT_MAX:
            return _bad_request(f"limit must be between 1 and {API_LIMIT_MAX}, got {limit}")
        out["limit"] = limit
        after = q.get("after")
        if after is not None and (not after or len(after) > AFTER_MAX_CHARS):
            return _bad_request("after must be a cursor from the previous page's 'next'")
        out["after"] = after
        for name, choices in allowed.items():
            v = q.get(name)
            if v is not None and choices is not None and v not in choices:
                return _bad_request(f"{name} must be one of {sorted(choices)}, got {v!r}")
            out[name] = v
        consistent = q.get("consistent", "false")
        if consistent not in ("true", "false"):
            return _bad_request("consistent must be true or false")
        out["consistent"] = consistent == "true"
        return out

    async def _list(self, name: str, request: web.Request, allowed: dict[str, Any],
                    check_after: Callable[[str], str | None],
                    query: Callable[[dict[str, Any]], Callable[[Any], Any]]) -> web.Response:
        q = self._query(request, allowed)
        if isinstance(q, web.Response):
            return q
        if q["after"] is not None and (problem := check_after(q["after"])):
            return _bad_request(problem)

        async def render() -> web.Response:
            return web.json_response(self.replica.store.engine_view(query(q)))

        if q["consistent"]:
            try:
                await self._waiting(self.replica.read_barrier())
            except (Unavailable, Indeterminate, TimeoutError):
                return web.json_response({"error": "no quorum-backed read possible now", "status": 503}, status=503)
            return await render()
        return await self._cached((name, tuple(sorted((k, str(v)) for k, v in q.items()))), render)

    async def _h_concepts(self, request: web.Request) -> web.Response:
        return await self._list(
            "concepts", request, {"prefix": None},
            lambda a: None if _after_ok_concept(a) else "after must be a concept id",
            lambda q: lambda e: e.list_concepts(prefix=q["prefix"] or "", limit=q["limit"], after=q["after"]))

    async def _h_intents(self, request: web.Request) -> web.Response:
        return await self._list(
            "intents", request, {"status": set(STATUSES)},
            lambda a: None if re.fullmatch(r"i-\d{1,19}", a) else "after must be an intent id like i-42",
            lambda q: lambda e: e.list_intents(status=q["status"], limit=q["limit"], after=q["after"]))

    async def _h_agents(self, request: web.Request) -> web.Response:
        return await self._list(
            "agents", request, {"status": {"open", "lapsed"}}, lambda a: None,
            lambda q: lambda e: e.list_sessions(status=q["status"], limit=q["limit"], after=q["after"]))

    async def readiness(self) -> tuple[bool, str]:
        """etcd's meaning: a leader is known and a linearizable read succeeds."""
        st = self.replica.status()
        if not st.get("leader"):
            return False, "RAFT NO LEADER"
        try:
            await self._waiting(self.replica.read_barrier(READYZ_TIMEOUT_S))
        except (Unavailable, Indeterminate, TimeoutError) as e:
            return False, f"LINEARIZABLE READ FAILED: {getattr(e, 'reason', 'timeout')}"
        return True, ""

    async def _cached_readiness(self) -> tuple[bool, str]:
        if not self.replica.status().get("leader"):
            return False, "RAFT NO LEADER"  # cheap to know, and must not linger once a leader is known

        async def render() -> web.Response:
            ok, reason = await self.readiness()
            # Cached as data whatever the answer: a flood of probes must not become a flood of barriers.
            return web.json_response([ok, reason])

        ok, reason = json.loads((await self._cached("readiness", render)).body or b"[false, \"\"]")
        return bool(ok), str(reason)

    async def _h_readyz(self, request: web.Request) -> web.Response:
        ok, reason = await self._cached_readiness()
        body = {"ready": ok, "node": self.node_id, "reason": reason}
        return web.json_response(body, status=200 if ok else 503)

    async def _h_health(self, request: web.Request) -> web.Response:
        ok, reason = await self._cached_readiness()
        body = {"health": "true" if ok else "false", "reason": reason}
        return web.json_response(body, status=200 if ok else 503)

    async def _h_metrics(self, request: web.Request) -> web.Response:
        async def render() -> web.Response:
            self.before_scrape()
            return web.Response(body=generate_latest(self.metrics.registry),
                                headers={"Content-Type": CONTENT_TYPE_LATEST})

        return await self._cached("metrics", render)


class _Guard(asyncio.Protocol):
    """One HTTP connection: aiohttp's protocol inside, the node's bounds around it (the
    connection cap, and the deadline for each request's head)."""

    def __init__(self, api: HttpApi, inner: asyncio.Protocol) -> None:
        self.api = api
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.busy = False  # a request is being answered
        self.served = 0  # requests answered on this connection
        self.partial = False  # bytes of a request that has not started yet
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self.api._admit(self):
            self.api.metrics.http_requests.labels("503").inc()
            body = b'{"error": "too many HTTP connections; retry shortly", "status": 503}'
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"  # type: ignore[attr-defined]
                            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            transport.close()
            return
        self.inner.connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if not self.busy:
            self.partial = True
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.api._forget(self)
        with contextlib.suppress(Exception):
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def begin(self) -> None:
        self.busy, self.partial = True, False
        self._disarm()

    def end(self) -> None:
        self.busy = False
        self.served += 1
        self._arm()

    def abort(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def _arm(self) -> None:
        """The next request's head must arrive within the deadline from now."""
        self._disarm()
        assert self.api._loop is not None
        self._timer = self.api._loop.call_later(self.api.limits.http_header_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self.busy or self.transport is None or self.transport.is_closing():
            return
        if self.served and not self.partial:
            self.transport.close()  # an idle keep-alive connection
            return
        self.api.metrics.http_connections_closed.labels("header_timeout").inc()
        self.api.metrics.http_requests.labels("408").inc()
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        self.transport.close()


def _bad_request(message: str) -> web.Response:
    return web.json_response({"error": message, "status": 400}, status=400)


def _after_ok_concept(after: str) -> bool:
    return bool(re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,127}", after))
