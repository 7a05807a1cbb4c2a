"""The live world view in a real headless browser (Debian's Chromium through its ChromeDriver),
against a real cluster: both agents' intents show, a stop with its conflict appears shortly after
the verdict, and killing the leader shows the new one. Screenshots go to the test's directory
(and, with TETHERLAB_SCREENSHOTS=DIR, there too)."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tetherlab.cluster import protocol as p
from tetherlab.cluster.ops.keys import generate_key_pair
from tetherlab.cluster.ops.localcluster import LocalCluster
from tetherlab.shim.client import MasterClient, masters_from_cluster_file

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("chromium") is None or shutil.which("chromedriver") is None,
                                 reason="needs Debian's chromium and chromium-driver (make test installs them)")]
REMOTE = "git@example.com:acme/shop.git"
REGISTRY = """
[[concept]]
id = "auth.session-store-contract"
title = "Session store contract"
description = "The interface every session store implements."
paths = ["src/auth/session_store.py"]
aliases = ["session store"]

[[concept]]
id = "api.routes"
title = "Route handlers"
paths = ["src/api/routes/"]
aliases = ["route handlers"]
depends_on = ["auth.session-store-contract"]

[[concept]]
id = "billing.invoices"
title = "Invoices"
paths = ["src/billing/"]
aliases = ["invoices"]
"""


def browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    o = webdriver.ChromeOptions()
    o.binary_location = shutil.which("chromium") or "chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--window-size=1500,950"):
        o.add_argument(a)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"), options=o)


@pytest.fixture
def driver() -> Iterator[Any]:
    d = browser()
    try:
        yield d
    finally:
        d.quit()


def wait_for(pred: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = pred()
            if last:
                return last
        except Exception as e:  # the DOM moves under us while the page updates
            last = e
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


STALE_RETRIES = 50  # the live page redraws a panel a few times a second at most


def read(d: Any, by: str, selector: str, attr: str | None = None) -> str:
    """An element's text (or attribute), found again when the page redrew it between the find
    and the read (a stale element: it failed a fresh-clone run once)."""
    from selenium.common.exceptions import StaleElementReferenceException

    for _ in range(STALE_RETRIES):
        try:
            el = d.find_element(by, selector)
            return str(el.text if attr is None else el.get_attribute(attr))
        except StaleElementReferenceException:
            time.sleep(0.02)
    raise AssertionError(f"{selector} kept being redrawn while it was read")


def shot(d: Any, tmp: Path, name: str) -> Path:
    path = tmp / f"{name}.png"
    d.save_screenshot(str(path))
    extra = os.environ.get("TETHERLAB_SCREENSHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / path.name)
    return path


class Team:
    def __init__(self, c: LocalCluster, tmp: Path) -> None:
        self.c = c
        self.cf = c.dir / "cluster.toml"
        self.keys: dict[str, Path] = {}
        for dev in ("alice", "bob"):
            generate_key_pair(tmp / dev, dev)
            self.keys[dev] = tmp / dev
        asyncio.run(self._setup())

    async def _call(self, who: str, cls: type[p.Request], **fields: Any) -> dict[str, Any]:
        key = self.c.dir / "admin_ed25519" if who == "admin" else self.keys[who]
        client = MasterClient(masters_from_cluster_file(self.cf), key, who)
        try:
            return dict(await client.call(cls, 30, **fields))
        finally:
            await client.close()

    async def _setup(self) -> None:
        for dev, key in self.keys.items():
            await self._call("admin", p.KeysAdd, developer=dev, public_key=(key.parent / f"{dev}.pub").read_text())
        await self._call("admin", p.ConceptsPush, toml=REGISTRY)

    def agent(self, dev: str, summary: str) -> tuple[str, dict[str, Any]]:
        agent = f"{dev}/{uuid.uuid4()}"

        async def go() -> dict[str, Any]:
            await self._call(dev, p.OpenSession, agent_id=agent, tool="claude-code", machine=f"{dev}-laptop",
                             repo_remote=REMOTE, base_commit="abcdef1")
            return await self._call(dev, p.SubmitIntent, agent_id=agent, tool="claude-code", trigger="initial",
                                    intent=p.Intent(summary=summary, steps=("plan",)))

        return agent, asyncio.run(go())


def page_of(c: LocalCluster, nid: str) -> str:
    return f"http://{c.cluster.by_id()[nid].http}/ui/"


def test_two_agents_a_stop_and_a_failover_show_live(cluster3: LocalCluster, tmp_path: Path, driver: Any) -> None:
    from selenium.webdriver.common.by import By

    leader = cluster3.wait_leader()
    team = Team(cluster3, tmp_path)
    alice, va = team.agent("alice", "Deprecate the session store")
    _bob, vb = team.agent("bob", "Rework invoices")
    assert va["action"] == "continue" and vb["action"] == "continue"
    follower = next(n for n in cluster3.ids if n != leader)
    driver.get(page_of(cluster3, follower))  # served by a follower, which says how far behind it is
    panel = lambda: driver.find_element(By.ID, "panel-intents").text  # noqa: E731
    wait_for(lambda: va["intent_id"] in panel() and vb["intent_id"] in panel(), 20, "both intents")
    assert "Deprecate the session store" in panel() and "Rework invoices" in panel()
    assert f"served by {follower} (follower" in driver.find_element(By.ID, "served").text
    shot(driver, tmp_path, "world-view-intents")

    # A conflicting plan is stopped: the verdict, its conflict and the holder show within moments.
    _carol, vc = team.agent("bob", "Add route handlers on top of the session store")
    t_verdict = time.monotonic()
    assert vc["action"] == "stop"
    driver.find_element(By.CSS_SELECTOR, '#tabs button[data-tab="verdicts"]').click()
    item = f'#panel-verdicts [data-intent="{vc["intent_id"]}"]'
    wait_for(lambda: "held by alice/" in driver.find_element(By.CSS_SELECTOR, item).text, 20, "the stop")
    latency_s = time.monotonic() - t_verdict
    print(f"stop shown {latency_s:.2f} s after the verdict")
    text = read(driver, By.CSS_SELECTOR, item)
    assert "stopped" in text and "auth.session-store-contract" in text
    shot(driver, tmp_path, "world-view-verdicts")

    # A concept's page: description, holder, dependents.
    driver.get(page_of(cluster3, follower) + "#concept=auth.session-store-contract")
    detail = wait_for(lambda: driver.find_element(By.ID, "detail-body").text, 20, "the concept page")
    wait_for(lambda: alice[:14] in driver.find_element(By.ID, "detail-body").text, 20, "the holder")
    assert "The interface every session store implements." in read(driver, By.ID, "detail-body")
    assert "api.routes" in detail or "api.routes" in read(driver, By.ID, "detail-body")
    shot(driver, tmp_path, "world-view-concept")

    # The leader dies: the page, served by a survivor, shows the new leader.
    cluster3.kill(leader)
    new = wait_for(lambda: (lambda t: t if t and t != leader else None)(
        driver.find_element(By.CSS_SELECTOR, "#leader b").text), 30, "a new leader")
    assert new != leader and new in cluster3.ids
    assert read(driver, By.CSS_SELECTOR, f'[data-node="{leader}"]', "data-role") == "unreachable"
    shot(driver, tmp_path, "world-view-failover")
