"""The live world view: ``/ui/`` on every node's HTTP port (docs/world-view.md).

One read-only page: the concept graph with who holds what, active intents and agents, recent
verdicts with their conflicts, and the cluster's health. It loads a snapshot
(``/ui/api/snapshot``) and then follows changes pushed by server-sent events (``/ui/events``):

- one broadcaster per node computes, at most every ``UPDATE_INTERVAL_S``, the intents changed
  since the last round (from committed, applied state: a follower serves the view too and says
  how far behind the leader it is) and hands the same event to every client;
- at most ``CLIENTS_MAX`` clients, each with a bounded queue: a client that does not keep up is
  dropped (its page reconnects and reloads the snapshot), so one slow browser never grows the
  node's memory or delays the others;
- the cluster's health (every node's role, term and indexes, from the open ``/livez`` of each)
  is polled only while someone watches.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

import aiohttp
from aiohttp import web

from tetherlab.cluster.core.config import NodeAddresses
from tetherlab.cluster.node.replica import Replica

log = logging.getLogger("tetherlab.ui")

UPDATE_INTERVAL_S = 0.25  # events are at most this frequent (a burst of verdicts is one event)
HEALTH_INTERVAL_S = 1.0
PEER_TIMEOUT_S = 0.5  # a paused node must not hold up the others' health
CLIENTS_MAX = 64
CLIENT_QUEUE_MAX = 32  # events a client may lag behind before it is dropped (and resyncs)
KEEPALIVE_S = 15.0  # an SSE comment so proxies keep the stream open
DELTA_INTENTS_MAX = 2000  # changed intents in one event; beyond, clients reload the snapshot
RECENT_FINISHED = 200  # finished intents in a snapshot (the page keeps about as many)
STALE_HEARTBEAT_MS = 3000  # agents whose last heartbeat is older are listed in health events
STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
CONCEPT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
INTENT_ID_RE = re.compile(r"^i-[0-9]{1,19}$")


class WorldView:
    def __init__(self, node_id: str, replica: Replica, status: Callable[[], dict[str, Any]],
                 nodes: Callable[[], list[NodeAddresses]]) -> None:
        self.node_id = node_id
        self.replica = replica
        self.status = status
        self.nodes = nodes
        self._clients: set[asyncio.Queue[tuple[str, str]]] = set()
        self._task: asyncio.Task[None] | None = None
        self._through = 0
        self._health: dict[str, Any] = {}
        self._health_at = 0.0
        self._graph: tuple[int, str] | None = None  # (registry version, JSON) cached per version
        self._http: aiohttp.ClientSession | None = None
        self.dropped_clients = 0

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/ui", self._h_redirect)
        app.router.add_get("/ui/", self._h_static)
        app.router.add_get("/ui/static/{name}", self._h_static)
        app.router.add_get("/ui/api/snapshot", self._h_snapshot)
        app.router.add_get("/ui/api/concept/{id}", self._h_concept)
        app.router.add_get("/ui/api/intent/{id}", self._h_intent)
        app.router.add_get("/ui/events", self._h_events)

    async def stop(self) -> None:
        for q in list(self._clients):  # every open stream ends now, not at its next keepalive
            while not q.empty():
                q.get_nowait()
            q.put_nowait(("drop", ""))
        self._clients.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._http is not None:
            await self._http.close()

    # --- pages and data ------------------------------------------------------------------------------

    async def _h_redirect(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(request.rel_url.with_path("/ui/"))

    async def _h_static(self, request: web.Request) -> web.Response:
        name = request.match_info.get("name", "index.html")
        kind = STATIC_FILES.get(name)
        if kind is None:
            raise web.HTTPNotFound(text=f"no file {name!r}")
        body = resources.files("tetherlab.cluster.node").joinpath("ui_static", name).read_bytes()
        return web.Response(body=body, content_type=kind, headers={"Cache-Control": "no-cache"})

    def _graph_json(self) -> str:
        version = self.replica.store.engine_view(lambda e: e.registry.version if e.registry is not None else 0)
        if self._graph is None or self._graph[0] != version:
            self._graph = (version, json.dumps(self.replica.store.engine_view(lambda e: e.view_graph())))
        return self._graph[1]

    async def _h_snapshot(self, request: web.Request) -> web.Response:
        def take(e: Any) -> dict[str, Any]:
            active = e.view_intents(0, limit=100_000, active_only=True)
            recent = e.view_recent_finished(RECENT_FINISHED)
            agents = {i["agent_id"] for i in active["intents"]} | {i["agent_id"] for i in recent}
            return {"intents": [*recent, *active["intents"]], "through": active["through"],
                    "sessions": e.view_sessions(agents), "clock_ms": active["clock_ms"]}

        data = self.replica.store.engine_view(take)
        body = json.dumps({"node": self.node_id, "health": await self._health_now(), **data})
        # The graph is cached text: spliced in rather than parsed and dumped again per request.
        text = body[:-1] + ', "graph": ' + self._graph_json() + "}"
        resp = web.Response(text=text, content_type="application/json")
        resp.enable_compression()
        return resp

    async def _h_concept(self, request: web.Request) -> web.Response:
        cid = request.match_info["id"]
        if not CONCEPT_ID_RE.match(cid):
            return web.json_response({"error": f"{cid!r} is not a concept id", "status": 400}, status=400)
        c = self.replica.store.engine_view(lambda e: e.get_concept(cid))
        if c is None:
            return web.json_response({"error": f"no concept {cid!r} in the registry", "status": 404}, status=404)
        return web.json_response(c)

    async def _h_intent(self, request: web.Request) -> web.Response:
        iid = request.match_info["id"]
        if not INTENT_ID_RE.match(iid):
            return web.json_response({"error": f"{iid!r} is not an intent id like i-42", "status": 400}, status=400)

        def take(e: Any) -> dict[str, Any] | None:
            it = e.get_intent(iid)
            if it is None:
                return None
            return {"intent": it, "session": e.get_session(it["agent_id"])}

        out = self.replica.store.engine_view(take)
        if out is None:
            return web.json_response({"error": f"no intent {iid!r} (it may have been compacted away)",
                                      "status": 404}, status=404)
        return web.json_response(out)

    # --- live updates ---------------------------------------------------------------------------------

    async def _h_events(self, request: web.Request) -> web.StreamResponse:
        if len(self._clients) >= CLIENTS_MAX:
            return web.json_response({"error": f"this node serves at most {CLIENTS_MAX} live views; try another "
                                               "node or later", "status": 503}, status=503)
        try:
            since = int(request.query.get("since", "0"))
        except ValueError:
            return web.json_response({"error": "since must be an index", "status": 400}, status=400)
        q: asyncio.Queue[tuple[str, str]] = asyncio.Queue(CLIENT_QUEUE_MAX)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        # No await between computing the catch-up and registering the queue: every change is either
        # in the catch-up (from the client's snapshot to now) or in a later broadcast.
        if self._task is None or self._task.done():
            self._through = self._last_index()
            self._task = asyncio.get_running_loop().create_task(self._broadcast())
        catch_up = self._delta_json(since) if since < self._through else None
        self._clients.add(q)
        try:
            await resp.prepare(request)
            if catch_up is not None:
                await resp.write(_event("intents", catch_up))
            while True:
                try:
                    async with asyncio.timeout(KEEPALIVE_S):
                        kind, data = await q.get()
                except TimeoutError:
                    await resp.write(b": keepalive\n\n")
                    continue
                if kind == "drop":
                    break
                await resp.write(_event(kind, data))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(q)
        return resp

    def _delta_json(self, since: int) -> str:
        out = self.replica.store.engine_view(lambda e: e.view_intents(since, DELTA_INTENTS_MAX))
        if out["more"]:
            return json.dumps({"resync": True, "through": out["through"]})
        return json.dumps(out)

    def _last_index(self) -> int:
        last: int = self.replica.store.engine_view(lambda e: e.stats()["last_index"])
        return last

    async def _broadcast(self) -> None:
        """Runs while someone watches: one computation per round, the same event for everyone."""
        while self._clients:
            await asyncio.sleep(UPDATE_INTERVAL_S)
            try:
                if self._last_index() > self._through:
                    data = self._delta_json(self._through)
                    self._through = json.loads(data)["through"]
                    self._send("intents", data)
                if time.monotonic() - self._health_at >= HEALTH_INTERVAL_S:
                    self._send("health", json.dumps(await self._health_now()))
            except Exception:
                log.exception("world view update failed")  # the next round tries again

    def _send(self, kind: str, data: str) -> None:
        for q in list(self._clients):
            try:
                q.put_nowait((kind, data))
            except asyncio.QueueFull:
                self._clients.discard(q)
                self.dropped_clients += 1
                with contextlib.suppress(asyncio.QueueFull):
                    q.get_nowait()
                    q.put_nowait(("drop", ""))

    async def _health_now(self) -> dict[str, Any]:
        if time.monotonic() - self._health_at < HEALTH_INTERVAL_S and self._health:
            return self._health
        me = self.status()
        others = [n for n in self.nodes() if n.id != self.node_id]
        answers = await asyncio.gather(*(self._peer(n) for n in others))
        nodes = [{"id": self.node_id, "reachable": True, **_health_fields(me)}]
        nodes += [{"id": n.id, "reachable": a is not None, **_health_fields(a or {})}
                  for n, a in zip(others, answers, strict=True)]
        leader_commit = me.get("leader_commit_index") or me.get("commit_index") or 0
        applied = (me.get("store") or {}).get("applied_index", me.get("applied_index", 0)) or 0

        def stale(e: Any) -> list[dict[str, Any]]:
            now = e.stats()["clock_ms"]
            out = []
            for it in e.view_intents(0, limit=100_000, active_only=True)["intents"]:
                s = e.get_session(it["agent_id"])
                if s is not None and now - s["last_seen_ms"] > STALE_HEARTBEAT_MS:
                    out.append({"agent_id": it["agent_id"], "last_seen_ms": s["last_seen_ms"],
                                "status": s["status"]})
            return out[:100]

        self._health = {
            "served_by": self.node_id, "role": me.get("role"), "leader": me.get("leader"), "term": me.get("term"),
            "behind": max(0, int(leader_commit) - int(applied)), "nodes": sorted(nodes, key=lambda n: n["id"]),
            "stale_agents": self.replica.store.engine_view(stale), "at_ms": int(time.time() * 1000),
        }
        self._health_at = time.monotonic()
        return self._health

    async def _peer(self, n: NodeAddresses) -> dict[str, Any] | None:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PEER_TIMEOUT_S))
        try:
            async with self._http.get(f"http://{n.http}/livez") as r:
                if r.status != 200:
                    return None
                body: dict[str, Any] = await r.json()
                return body
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None


def _health_fields(st: dict[str, Any]) -> dict[str, Any]:
    return {k: st.get(k) for k in ("role", "term", "leader", "commit_index", "applied_index")}


def _event(kind: str, data: str) -> bytes:
    return f"event: {kind}\ndata: {data}\n\n".encode()
