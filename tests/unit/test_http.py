"""The node's HTTP endpoint in-process over the in-memory replica: its answers, and the bounds
that keep a flood of HTTP from starving the node (connection cap, head/body deadline, caches)."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from tetherlab.cluster.core.config import Address, LoadLimits
from tetherlab.cluster.node.fake import FakeReplica
from tetherlab.cluster.node.http import HttpApi
from tetherlab.cluster.node.metrics import NodeMetrics


class Rig:
    def __init__(self, limits: LoadLimits) -> None:
        self.replica = FakeReplica("n1")
        self.metrics = NodeMetrics()
        self.scrapes = 0
        self.api = HttpApi(Address("127.0.0.1", 0), "n1", self.replica, self.metrics, self.replica.status,
                           self._before_scrape, limits=limits)

    def _before_scrape(self) -> None:
        self.scrapes += 1

    def get(self, path: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        c = http.client.HTTPConnection("127.0.0.1", self.api.port, timeout=5)
        try:
            c.request(method, path, headers=headers or {})
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def raw(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.api.port), timeout=5)


def run(body: Callable[[Rig], Awaitable[None]], **limits: Any) -> None:
    async def main() -> None:
        rig = Rig(LoadLimits(**limits))
        await rig.api.start()
        try:
            await body(rig)
        finally:
            await rig.api.stop()

    asyncio.run(main())


def _closed_within(s: socket.socket, timeout_s: float) -> tuple[bool, bytes]:
    """Read until the server closes (True) or ``timeout_s`` passes (False)."""
    s.settimeout(timeout_s)
    got = b""
    try:
        while chunk := s.recv(4096):
            got += chunk
        return True, got
    except TimeoutError:
        return False, got
    except ConnectionResetError:
        return True, got


def test_endpoints_answer_and_bad_requests_name_what_is_wrong() -> None:
    async def body(r: Rig) -> None:
        code, data = await asyncio.to_thread(r.get, "/livez")
        assert code == 200 and json.loads(data)["live"] is True and json.loads(data)["node"] == "n1"
        code, data = await asyncio.to_thread(r.get, "/v1/status")
        assert code == 200 and json.loads(data)["role"] == "leader"
        code, data = await asyncio.to_thread(r.get, "/v1/intents?status=active&limit=5")
        assert code == 200 and json.loads(data) == {"intents": [], "next": None}
        for bad in ("/v1/concepts?limit=0", "/v1/intents?after=x", "/v1/agents?nope=1", "/v1/concepts?consistent=2"):
            code, data = await asyncio.to_thread(r.get, bad)
            assert code == 400 and json.loads(data)["error"], bad
        assert (await asyncio.to_thread(r.get, "/nope"))[0] == 404
        assert (await asyncio.to_thread(r.get, "/livez", "POST"))[0] == 405
        assert await asyncio.to_thread(r.get, "/livez", "HEAD") == (200, b"")
        code, data = await asyncio.to_thread(r.get, "/readyz")
        assert code == 200 and json.loads(data)["ready"] is True
        code, data = await asyncio.to_thread(r.get, "/metrics")
        assert code == 200 and b"tetherlab_http_connections" in data
    run(body)


def test_a_consistent_read_waits_for_a_barrier_on_the_nodes_loop() -> None:
    async def body(r: Rig) -> None:
        before = r.replica.barriers
        for _ in range(3):
            assert (await asyncio.to_thread(r.get, "/v1/agents?consistent=true"))[0] == 200
        assert r.replica.barriers == before + 3  # never cached
        r.replica.set_role("follower", leader=None)
        code, data = await asyncio.to_thread(r.get, "/v1/agents?consistent=true")
        assert code == 503 and "quorum" in json.loads(data)["error"]
    run(body)


def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    async def body(r: Rig) -> None:
        def three() -> list[int]:
            c = http.client.HTTPConnection("127.0.0.1", r.api.port, timeout=5)
            out = []
            for path in ("/livez", "/v1/status", "/metrics"):
                c.request("GET", path)
                resp = c.getresponse()
                resp.read()
                out.append(resp.status)
            c.close()
            return out

        assert await asyncio.to_thread(three) == [200, 200, 200]
    run(body)


def test_a_slowloris_connection_is_closed_at_the_head_deadline() -> None:
    async def body(r: Rig) -> None:
        def slow() -> tuple[bool, bytes, float]:
            s = r.raw()
            t0 = time.monotonic()
            s.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
            for _ in range(3):  # a header line now and then, never the blank line that ends the head
                time.sleep(0.1)
                s.sendall(b"X-a: b\r\n")
            closed, got = _closed_within(s, 3.0)
            s.close()
            return closed, got, time.monotonic() - t0

        closed, got, took = await asyncio.to_thread(slow)
        assert closed and got.startswith(b"HTTP/1.1 408") and took < 2.0
        idle = await asyncio.to_thread(r.raw)  # connects and sends nothing at all
        closed, _ = await asyncio.to_thread(_closed_within, idle, 3.0)
        idle.close()
        assert closed
        assert r.metrics.registry.get_sample_value("tetherlab_http_connections_closed_by_limit_total",
                                                   {"reason": "header_timeout"}) == 2
    run(body, http_header_timeout_s=0.5)


def test_at_the_connection_cap_the_oldest_waiting_connection_makes_room() -> None:
    async def body(r: Rig) -> None:
        held = [await asyncio.to_thread(r.raw) for _ in range(4)]
        for s in held:
            s.sendall(b"GET /livez HTTP/1.1\r\n")  # heads that never finish
        await asyncio.sleep(0.1)
        assert (await asyncio.to_thread(r.get, "/livez"))[0] == 200  # a real client still gets in
        closed, _ = await asyncio.to_thread(_closed_within, held[0], 2.0)
        assert closed  # the oldest one made room
        still_open, _ = await asyncio.to_thread(_closed_within, held[3], 0.2)
        assert not still_open
        for s in held:
            s.close()
        assert r.metrics.registry.get_sample_value("tetherlab_http_connections_closed_by_limit_total",
                                                   {"reason": "connections_max"}) == 1
    run(body, http_connections_max=4, http_header_timeout_s=30.0)


def test_metrics_and_lists_are_rendered_at_most_once_per_cache_window() -> None:
    async def body(r: Rig) -> None:
        def burst(path: str, n: int) -> set[bytes]:
            c = http.client.HTTPConnection("127.0.0.1", r.api.port, timeout=5)
            bodies = set()
            for _ in range(n):
                c.request("GET", path)
                bodies.add(c.getresponse().read())
            c.close()
            return bodies

        await asyncio.to_thread(burst, "/metrics", 50)
        assert r.scrapes == 1
        barriers = r.replica.barriers
        await asyncio.to_thread(burst, "/readyz", 50)
        assert r.replica.barriers == barriers + 1  # readiness probes share one barrier per window
        await asyncio.sleep(0.6)
        await asyncio.to_thread(burst, "/metrics", 5)
        assert r.scrapes == 2
    run(body, http_cache_s=0.5)


def test_a_head_over_the_bound_is_refused() -> None:
    async def body(r: Rig) -> None:
        code, _ = await asyncio.to_thread(r.get, "/livez", "GET", {"X-Big": "a" * 9000})
        assert code in (400, 431)
    run(body)


def test_slowloris_churn_at_the_cap_does_not_evict_a_client_that_completed_requests() -> None:
    async def body(r: Rig) -> None:
        def scenario() -> list[int]:
            c = http.client.HTTPConnection("127.0.0.1", r.api.port, timeout=5)
            c.request("GET", "/livez")
            first = c.getresponse()
            first.read()
            slow = []
            for _ in range(8):  # twice the cap of connections that never finish their head
                s = r.raw()
                s.sendall(b"GET /livez HTTP/1.1\r\n")
                slow.append(s)
                time.sleep(0.02)
            c.request("GET", "/v1/status")  # the same keep-alive connection, still open
            second = c.getresponse()
            second.read()
            c.close()
            for s in slow:
                s.close()
            return [first.status, second.status]

        assert await asyncio.to_thread(scenario) == [200, 200]
    run(body, http_connections_max=4, http_header_timeout_s=30.0)


def test_new_connections_are_accepted_at_a_bounded_rate() -> None:
    async def body(r: Rig) -> None:
        socks = [await asyncio.to_thread(r.raw) for _ in range(20)]  # the kernel completes every handshake
        t0 = time.monotonic()
        await asyncio.sleep(0.5)
        elapsed = time.monotonic() - t0
        # The node took on at most its burst plus the rate's share of the wait (and some slack).
        assert len(r.api._conns) <= 2 + 10 * (elapsed + 0.3), len(r.api._conns)
        for s in socks:
            s.close()
    run(body, http_accepts_per_s=10.0, http_header_timeout_s=30.0)


def test_requests_are_paced_to_the_configured_rate() -> None:
    async def body(r: Rig) -> None:
        def burst(n: int) -> float:
            c = http.client.HTTPConnection("127.0.0.1", r.api.port, timeout=10)
            t0 = time.monotonic()
            for _ in range(n):
                c.request("GET", "/livez")
                assert c.getresponse().read()
            c.close()
            return time.monotonic() - t0

        took = await asyncio.to_thread(burst, 30)
        # A quarter second's burst at once, then one request per 1/20 s: never faster than that.
        assert took >= (30 - 5) / 20 - 0.05, took
    run(body, http_requests_per_s=20.0)
