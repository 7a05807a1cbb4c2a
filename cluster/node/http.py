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
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tetherlab.cluster.core.config import Address
from tetherlab.cluster.core.engine.model import STATUSES
from tetherlab.cluster.node.access import AccessRule
from tetherlab.cluster.node.errors import Indeterminate, Unavailable
from tetherlab.cluster.node.metrics import NodeMetrics
from tetherlab.cluster.node.replica import Replica
from tetherlab.cluster.node.ui import WorldView

READYZ_TIMEOUT_S = 2.0
API_LIMIT_DEFAULT = 100
API_LIMIT_MAX = 1000
REQUEST_BODY_MAX_BYTES = 64 * 1024
AFTER_MAX_CHARS = 512


class HttpApi:
    def __init__(self, address: Address, node_id: str, replica: Replica, metrics: NodeMetrics,
                 status: Callable[[], dict[str, Any]], before_scrape: Callable[[], None],
                 access: AccessRule | None = None, world: WorldView | None = None) -> None:
        self.access = access
        self.world = world
        self.address = address
        self.node_id = node_id
        self.replica = replica
        self.metrics = metrics
        self.status = status
        self.before_scrape = before_scrape
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        middlewares = [self.access.middleware()] if self.access is not None else []
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

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.address.host, self.address.port, reuse_address=True)
        await site.start()

    async def stop(self) -> None:
        if self.world is not None:
            await self.world.stop()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _h_livez(self, request: web.Request) -> web.Response:
        # Open to anyone (load balancers, the world view of the other nodes): role, term and
        # indexes, nothing about who works on what.
        st = self.status()  # the node's status: its version too
        fields = ("role", "term", "leader", "quorum_backed", "commit_index", "applied_index", "version")
        return web.json_response({"live": True, "node": self.node_id, **{k: st.get(k) for k in fields}})

    async def _h_status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    async def _query(self, request: web.Request, allowed: dict[str, Any]) -> dict[str, Any] | web.Response:
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
        if consistent == "true":
            try:
                await self.replica.read_barrier()
            except (Unavailable, Indeterminate, TimeoutError):
                return web.json_response({"error": "no quorum-backed read possible now", "status": 503}, status=503)
        return out

    async def _h_concepts(self, request: web.Request) -> web.Response:
        q = await self._query(request, {"prefix": None})
        if isinstance(q, web.Response):
            return q
        if q["after"] is not None and not _after_ok_concept(q["after"]):
            return _bad_request("after must be a concept id")
        body = self.replica.store.engine_view(
            lambda e: e.list_concepts(prefix=q["prefix"] or "", limit=q["limit"], after=q["after"]))
        return web.json_response(body)

    async def _h_intents(self, request: web.Request) -> web.Response:
        q = await self._query(request, {"status": set(STATUSES)})
        if isinstance(q, web.Response):
            return q
        if q["after"] is not None and not re.fullmatch(r"i-\d{1,19}", q["after"]):
            return _bad_request("after must be an intent id like i-42")
        body = self.replica.store.engine_view(
            lambda e: e.list_intents(status=q["status"], limit=q["limit"], after=q["after"]))
        return web.json_response(body)

    async def _h_agents(self, request: web.Request) -> web.Response:
        q = await self._query(request, {"status": {"open", "lapsed"}})
        if isinstance(q, web.Response):
            return q
        body = self.replica.store.engine_view(
            lambda e: e.list_sessions(status=q["status"], limit=q["limit"], after=q["after"]))
        return web.json_response(body)

    async def readiness(self) -> tuple[bool, str]:
        """etcd's meaning: a leader is known and a linearizable read succeeds."""
        st = self.replica.status()
        if not st.get("leader"):
            return False, "RAFT NO LEADER"
        try:
            await self.replica.read_barrier(READYZ_TIMEOUT_S)
        except (Unavailable, Indeterminate, TimeoutError) as e:
            return False, f"LINEARIZABLE READ FAILED: {getattr(e, 'reason', 'timeout')}"
        return True, ""

    async def _h_readyz(self, request: web.Request) -> web.Response:
        ok, reason = await self.readiness()
        body = {"ready": ok, "node": self.node_id, "reason": reason}
        return web.json_response(body, status=200 if ok else 503)

    async def _h_health(self, request: web.Request) -> web.Response:
        ok, reason = await self.readiness()
        body = {"health": "true" if ok else "false", "reason": reason}
        return web.json_response(body, status=200 if ok else 503)

    async def _h_metrics(self, request: web.Request) -> web.Response:
        self.before_scrape()
        data = generate_latest(self.metrics.registry)
        return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _bad_request(message: str) -> web.Response:
    return web.json_response({"error": message, "status": 400}, status=400)


def _after_ok_concept(after: str) -> bool:
    return bool(re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,127}", after))
