"""``tetherlab bench worldview``: the live world view at scale, in a real headless browser.

The real engine (in the in-memory replica) holds ``--concepts`` concepts (100 groups, with
dependencies, the engine benchmark's registry) and ``--intents`` active intents, each of a
different agent with a session; the node's world view serves it on loopback and Debian's
Chromium loads the page. Measured: the snapshot's size and server time, the page's time to show
everything, one full redraw of the graph and of the lists, a redraw while panning, the time a
verdict takes to reach the page, and the page's JavaScript heap. Printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import statistics
import threading
import time
import uuid
from typing import Any

import aiohttp
from aiohttp import web

try:  # a test extra (pip install 'tetherlab[test]'): main() says so when it is missing
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
except ImportError:  # pragma: no cover
    webdriver = None  # type: ignore[assignment]

from tetherlab.chaos.bench.engine import concept_record
from tetherlab.chaos.bench.figures import print_figures
from tetherlab.cluster.core.config import Address, NodeAddresses
from tetherlab.cluster.core.engine import commands as ec
from tetherlab.cluster.node.fake import FakeReplica
from tetherlab.cluster.node.replica import encode_engine
from tetherlab.cluster.node.ui import WorldView
from tetherlab.cluster.tools.demo import AGENTS
from tetherlab.cluster.tools.demo import REGISTRY as DEMO_REGISTRY

REMOTE = "git@example.com:bench/repo.git"
PAGE_TIMEOUT_S = 120.0


async def _populate(r: FakeReplica, concepts: int, intents: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    now = 1_700_000_000_000

    async def cmd(obj: dict[str, Any]) -> dict[str, Any]:
        return await r.propose(encode_engine(ec.decode_command(obj), now))

    await cmd({"type": "init", "remote": REMOTE})
    await cmd({"type": "push_registry", "concepts": [concept_record(k, rng) for k in range(concepts)]})
    agents = []
    for k in range(intents):
        agent = f"dev{k % 50:02d}/{uuid.UUID(int=rng.getrandbits(128), version=4)}"
        agents.append(agent)
        await cmd({"type": "open_session", "agent_id": agent, "developer": agent.split("/")[0], "tool": "claude-code",
                   "machine": f"m{k % 50}", "repo_remote": REMOTE, "base_commit": "abcdef1"})
        # The first 5000 concepts depend on nothing, so every one of these intents is granted.
        dom = f"d{k % 100:02d}"
        v = await cmd({"type": "intent", "agent_id": agent, "tool": "claude-code", "trigger": "initial",
                       "intent": {"summary": f"Rework component {k}", "steps": ["step one", "step two"],
                                  "concepts": {"modify": [f"{dom}.c{k}"], "depend": []}}})
        assert v.get("action") == "continue", v
    return agents


async def _populate_demo(r: FakeReplica) -> None:
    """The seed walkthrough's world, for a screenshot people can read: Alice holds the session
    store contract, Bob was stopped on it, Carol and Dan work elsewhere."""
    now = int(time.time() * 1000) - 600_000

    async def cmd(obj: dict[str, Any], at: int) -> dict[str, Any]:
        return await r.propose(encode_engine(ec.decode_command(obj), at))

    await cmd({"type": "init", "remote": REMOTE}, now)
    await cmd({"type": "push_registry", "toml": DEMO_REGISTRY}, now)
    plans = [("alice", "claude-code", AGENTS["alice"]["plan"]), ("carol", "claude-code", AGENTS["carol"]["plan"]),
             ("dan", "opencode", {"summary": "Rebuild the search index nightly",
                                  "steps": ["Schedule the search index"]}),
             ("bob", "opencode", AGENTS["bob"]["plan"])]
    agents = []
    for i, (dev, tool, plan) in enumerate(plans):
        agent = f"{dev}/{uuid.uuid4()}"
        agents.append(agent)
        at = now + 120_000 * (i + 1)
        await cmd({"type": "open_session", "agent_id": agent, "developer": dev, "tool": tool,
                   "machine": f"{dev}-laptop", "repo_remote": REMOTE, "base_commit": "abcdef1"}, at)
        await cmd({"type": "intent", "agent_id": agent, "tool": tool, "trigger": "initial", "intent": plan}, at)
    await cmd({"type": "heartbeat", "agent_ids": agents}, int(time.time() * 1000))  # everyone is alive now


def run(concepts: int, intents: int, seed: int, progress: bool, screenshot: str | None = None,
        demo: bool = False) -> dict[str, Any]:
    say = (lambda m: print(f"  {m}", flush=True)) if progress else (lambda m: None)
    out: dict[str, Any] = {"concepts": concepts, "active_intents": intents}
    loop = asyncio.new_event_loop()
    replica = FakeReplica()
    t0 = time.monotonic()
    loop.run_until_complete(_populate_demo(replica) if demo else _populate(replica, concepts, intents, seed))
    say(f"engine populated in {time.monotonic() - t0:.1f} s")
    me = NodeAddresses("n1", Address("127.0.0.1", 1), Address("127.0.0.1", 2), Address("127.0.0.1", 3))
    view = WorldView("n1", replica,
                     lambda: {**replica.status(), "store": {"applied_index": replica.store.applied_index}},
                     lambda: [me])
    app = web.Application()
    view.add_routes(app)
    runner = web.AppRunner(app, access_log=None)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}/ui/"
    try:
        t1 = time.monotonic()
        snap = asyncio.run_coroutine_threadsafe(_fetch(port), loop).result(60)
        out["snapshot_bytes"] = snap
        out["snapshot_server_s"] = round(time.monotonic() - t1, 3)
        o = webdriver.ChromeOptions()
        o.binary_location = shutil.which("chromium") or "chromium"
        for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--window-size=1500,950"):
            o.add_argument(a)
        d = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"), options=o)
        try:
            t2 = time.monotonic()
            d.get(url)
            deadline = time.monotonic() + PAGE_TIMEOUT_S
            while time.monotonic() < deadline:
                perf = d.execute_script("return window.tetherlab && window.tetherlab.perf")
                if perf and perf["firstRenderAt"]:
                    break
                time.sleep(0.05)
            out["page_ready_s"] = round(time.monotonic() - t2, 2)
            perf = d.execute_script("return window.tetherlab.perf")
            out["page_snapshot_fetch_ms"] = round(perf["snapshotMs"], 1)
            out["lists_render_ms"] = round(perf["listsMs"], 1)
            out["graph_draw_ms"] = round(perf["drawMs"], 1)
            pans = []
            for i in range(10):
                d.execute_script(f"window.tetherlab.view.x -= {40 + i}; window.tetherlab.dirty = true;")
                time.sleep(0.05)
                pans.append(d.execute_script("return window.tetherlab.perf.drawMs"))
            out["pan_redraw_ms_median"] = round(statistics.median(pans), 1)
            d.execute_script("window.tetherlab.view.scale = 0.02; window.tetherlab.dirty = true;")
            time.sleep(0.2)
            out["whole_graph_redraw_ms"] = round(d.execute_script("return window.tetherlab.perf.drawMs"), 1)
            heap = d.execute_script("return performance.memory ? performance.memory.usedJSHeapSize : null")
            out["js_heap_mb"] = round(heap / 2**20, 1) if heap else None
            # A verdict reaches the page: a new agent's stop on a held concept (not in the demo world).
            agent = f"late/{uuid.uuid4()}"

            async def stop() -> str:
                now = 1_700_000_100_000
                await replica.propose(encode_engine(ec.decode_command({
                    "type": "open_session", "agent_id": agent, "developer": "late", "tool": "t", "machine": "m",
                    "repo_remote": REMOTE, "base_commit": "abcdef1"}), now))
                v = await replica.propose(encode_engine(ec.decode_command({
                    "type": "intent", "agent_id": agent, "tool": "t", "trigger": "initial",
                    "intent": {"summary": "late conflicting work", "steps": [],
                               "concepts": {"modify": ["d00.c0"], "depend": []}}}), now))
                return str(v["intent_id"])

            if not demo:
                t3 = time.monotonic()
                iid = asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
                while time.monotonic() - t3 < 30:
                    if d.execute_script(f"return window.tetherlab.intents.has('{iid}')"):
                        break
                    time.sleep(0.02)
                out["verdict_to_page_s"] = round(time.monotonic() - t3, 2)
            if screenshot:
                d.execute_script("window.tetherlab.view.scale = 1; window.tetherlab.view.x = 30; "
                                 "window.tetherlab.view.y = 20; window.tetherlab.dirty = true;")
                d.execute_script('document.querySelector(\'#tabs button[data-tab="verdicts"]\').click()')
                time.sleep(0.5)
                d.save_screenshot(screenshot)
                out["screenshot"] = screenshot
        finally:
            d.quit()
    finally:
        for coro in (view.stop(), runner.shutdown(), runner.cleanup()):
            with contextlib.suppress(TimeoutError, Exception):
                asyncio.run_coroutine_threadsafe(coro, loop).result(5)  # best effort: the process ends anyway
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    return out


async def _fetch(port: int) -> int:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/ui/api/snapshot") as r:
        return len(await r.read())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tetherlab bench worldview", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concepts", type=int, default=10_000)
    p.add_argument("--intents", type=int, default=5_000, help="active intents (at most half the concepts)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.add_argument("--screenshot", metavar="FILE.png", help="save a screenshot of the page (verdicts tab)")
    p.add_argument("--demo", action="store_true", help="the seed walkthrough's small world instead (for screenshots)")
    a = p.parse_args(argv)
    if a.intents > min(5000, a.concepts):
        p.error("--intents must be at most min(5000, --concepts) (each modifies its own independent concept)")
    if webdriver is None:
        print("tetherlab bench worldview: needs selenium (pip install 'tetherlab[test]')", flush=True)
        return 2
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        print("tetherlab bench worldview: needs Debian's chromium and chromium-driver", flush=True)
        return 2
    result = run(a.concepts, a.intents, a.seed, progress=not a.json, screenshot=a.screenshot, demo=a.demo)
    print_figures(result, a.json, 24)
    return 0
