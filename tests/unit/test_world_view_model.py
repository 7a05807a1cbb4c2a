"""The world view's server side over the in-memory replica: the snapshot, changes pushed as
server-sent events, the bound on clients, a slow client dropped, the graph layout, and the access
rule's decisions. (tests/cluster/test_world_view.py drives the page in a real browser.)"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tetherlab.cluster.core import statemachine as sm
from tetherlab.cluster.core.config import Address, NodeAddresses
from tetherlab.cluster.core.engine import commands as ec
from tetherlab.cluster.core.engine.registry import Registry, concept_from_json
from tetherlab.cluster.core.engine.view import graph
from tetherlab.cluster.node import ui
from tetherlab.cluster.node.access import AccessRule, is_loopback, token_hash
from tetherlab.cluster.node.fake import FakeReplica
from tetherlab.cluster.node.replica import encode_command, encode_engine

AGENT = "alice/4b2e0000-0000-4000-8000-0000000000a1"
BOB = "bob/4b2e0000-0000-4000-8000-0000000000b0"
REGISTRY = '[[concept]]\nid = "auth.sessions"\ntitle = "Sessions"\n\n' \
           '[[concept]]\nid = "api.routes"\ntitle = "Routes"\ndepends_on = ["auth.sessions"]\n'


async def engine(r: FakeReplica, cmd: dict[str, Any]) -> dict[str, Any]:
    return await r.propose(encode_engine(ec.decode_command(cmd), 1_000_000))


async def seeded() -> FakeReplica:
    r = FakeReplica()
    await engine(r, {"type": "init", "remote": "git@x:a/b.git"})
    await engine(r, {"type": "push_registry", "toml": REGISTRY})
    for a in (AGENT, BOB):
        await engine(r, {"type": "open_session", "agent_id": a, "developer": a.split("/")[0], "tool": "t",
                         "machine": "m", "repo_remote": "git@x:a/b.git", "base_commit": "abcdef1"})
    return r


def view(r: FakeReplica) -> ui.WorldView:
    me = NodeAddresses("n1", Address("127.0.0.1", 1), Address("127.0.0.1", 2), Address("127.0.0.1", 3))
    return ui.WorldView("n1", r, lambda: {**r.status(), "store": {"applied_index": r.store.applied_index}},
                        lambda: [me])


async def client(w: ui.WorldView) -> TestClient:
    app = web.Application()
    w.add_routes(app)
    c = TestClient(TestServer(app))
    await c.start_server()
    return c


async def read_event(resp: Any, timeout_s: float = 5.0) -> tuple[str, dict[str, Any]]:
    kind, data = "", ""
    while True:
        line = (await asyncio.wait_for(resp.content.readline(), timeout_s)).decode()
        if line.startswith("event: "):
            kind = line[7:].strip()
        elif line.startswith("data: "):
            data = line[6:].strip()
        elif line == "\n" and kind:
            return kind, json.loads(data)


def test_the_snapshot_has_the_graph_the_intents_their_sessions_and_health() -> None:
    async def body() -> None:
        r = await seeded()
        await engine(r, {"type": "intent", "agent_id": AGENT, "tool": "t", "trigger": "initial",
                         "intent": {"summary": "rework sessions", "steps": [], "concepts": {"modify": ["auth.sessions"],
                                                                                             "depend": []}}})
        c = await client(view(r))
        try:
            snap = await (await c.get("/ui/api/snapshot")).json()
            assert [i["summary"] for i in snap["intents"]] == ["rework sessions"]
            assert set(snap["sessions"]) == {AGENT}
            assert [x["id"] for x in snap["graph"]["concepts"]] == ["api.routes", "auth.sessions"]
            assert snap["health"]["leader"] == "n1" and snap["health"]["nodes"][0]["id"] == "n1"
            page = await c.get("/ui/")
            assert page.status == 200 and "Tetherlab" in await page.text()
            assert (await c.get("/ui/static/nope.js")).status == 404
            assert (await c.get("/ui/api/concept/NOT%20AN%20ID")).status == 400
            concept = await (await c.get("/ui/api/concept/auth.sessions")).json()
            assert concept["active"][0]["agent_id"] == AGENT
        finally:
            await c.close()

    asyncio.run(body())


def test_changes_after_the_snapshot_arrive_as_events() -> None:
    async def body() -> None:
        r = await seeded()
        w = view(r)
        c = await client(w)
        try:
            snap = await (await c.get("/ui/api/snapshot")).json()
            await engine(r, {"type": "intent", "agent_id": AGENT, "tool": "t", "trigger": "initial",
                             "intent": {"summary": "rework sessions", "steps": [],
                                        "concepts": {"modify": ["auth.sessions"], "depend": []}}})
            resp = await c.get(f"/ui/events?since={snap['through']}")
            kind, data = await read_event(resp)
            assert kind == "intents" and [i["summary"] for i in data["intents"]] == ["rework sessions"]
            # A conflicting plan is stopped: the next event carries the stop and its conflict.
            await engine(r, {"type": "intent", "agent_id": BOB, "tool": "t", "trigger": "initial",
                             "intent": {"summary": "routes on sessions", "steps": [],
                                        "concepts": {"modify": ["api.routes"], "depend": []}}})
            while True:
                kind, data = await read_event(resp)
                if kind == "intents":
                    break
            (stopped,) = data["intents"]
            assert stopped["status"] == "stopped" and stopped["conflicts"][0]["holder_agent_id"] == AGENT
            resp.close()
        finally:
            await c.close()
            await w.stop()

    asyncio.run(body())


def test_clients_are_bounded_and_a_slow_one_is_dropped(monkeypatch: Any) -> None:
    monkeypatch.setattr(ui, "CLIENTS_MAX", 2)
    monkeypatch.setattr(ui, "CLIENT_QUEUE_MAX", 2)

    async def body() -> None:
        r = await seeded()
        w = view(r)
        c = await client(w)
        try:
            a = await c.get("/ui/events")
            b = await c.get("/ui/events")
            third = await c.get("/ui/events")
            assert third.status == 503 and "at most 2" in (await third.json())["error"]
            for i in range(6):  # nobody reads `a` or `b`: their queues fill and they are dropped
                w._send("intents", json.dumps({"intents": [], "through": i}))
            assert w.dropped_clients == 2 and not w._clients
            a.close()
            b.close()
            again = await c.get("/ui/events")
            assert again.status == 200
            again.close()
        finally:
            await c.close()
            await w.stop()

    asyncio.run(body())


def test_the_layout_puts_a_concept_right_of_what_it_depends_on_and_bands_groups() -> None:
    concepts = [concept_from_json({"id": f"g{g}.c{i}", "title": "t", "description": "", "paths": [], "symbols": [],
                                   "aliases": [], "depends_on": [f"g{g}.c{i - 1}"] if i else [],
                                   "dependents": "stop"}) for g in range(3) for i in range(5)]
    out = graph(Registry(concepts, 1))
    pos = {c["id"]: c for c in out["concepts"]}
    assert all(pos[f"g0.c{i}"]["x"] > pos[f"g0.c{i - 1}"]["x"] for i in range(1, 5))
    assert [g["name"] for g in out["groups"]] == ["g0", "g1", "g2"]
    assert pos["g1.c0"]["y"] > pos["g0.c4"]["y"]
    big = graph(Registry([concept_from_json({"id": f"a.c{i}", "title": "", "description": "", "paths": [],
                                             "symbols": [], "aliases": [], "depends_on": [], "dependents": "stop"})
                          for i in range(10_000)], 1))
    assert len(big["concepts"]) == 10_000 and big["width"] > 0


def test_the_access_rule() -> None:
    r = FakeReplica()
    rule = AccessRule(r.store, [token_hash("configured")])
    assert is_loopback("127.0.0.1") and is_loopback("127.4.5.6") and is_loopback("::1")
    assert is_loopback("::ffff:127.0.0.1") and not is_loopback("10.0.0.1") and not is_loopback(None)
    assert rule.protected("/ui/") and rule.protected("/v1/intents") and rule.protected("/metrics")
    assert not rule.protected("/livez") and not rule.protected("/readyz") and not rule.protected("/uikit")
    assert rule.token_ok("configured") and not rule.token_ok("other") and not rule.token_ok(None)

    async def grant() -> None:
        await r.propose(encode_command(sm.Put("http_tokens", "t1", json.dumps({"sha256": token_hash("issued")}))))

    r.add_apply_listener(rule.on_applied)
    assert not rule.token_ok("issued")
    asyncio.run(grant())
    assert rule.token_ok("issued")
