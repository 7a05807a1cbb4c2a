"""Metrics, health endpoints and a real Prometheus scraping a real cluster."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tetherlab.cluster.ops.client import http_get_json
from tetherlab.cluster.ops.localcluster import LocalCluster

from conftest import until_available

pytestmark = pytest.mark.slow


def metrics_text(c: LocalCluster, nid: str) -> str:
    addr = c.cluster.by_id()[nid].http
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as r:
        return r.read().decode()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (make test installs it)")
def test_every_nodes_metrics_pass_promtool_check_metrics(cluster3: LocalCluster) -> None:
    leader = cluster3.wait_leader()
    with cluster3.client(leader) as cl:
        for i in range(20):
            assert until_available(lambda: cl.put("m", f"k{i}", "v"))["ok"]  # noqa: B023 (called at once)
    for nid in cluster3.ids:
        text = metrics_text(cluster3, nid)
        p = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
        assert p.returncode == 0, (nid, p.stdout.decode(), p.stderr.decode())
        assert "tetherlab_has_leader 1.0" in text
        assert "tetherlab_journal_fsync_duration_seconds_bucket" in text
        assert "tetherlab_gc_pause_seconds_bucket{generation=\"0\"" in text
        assert 'tetherlab_lmdb_map_size_bytes{db="log"}' in text
    leader_text = metrics_text(cluster3, leader)
    assert "tetherlab_is_leader 1.0" in leader_text
    assert "tetherlab_peer_round_trip_time_seconds_count" in leader_text


def _readyz_until(addr: str, want: int, timeout_s: float) -> tuple[int, dict[str, object]]:
    """/readyz asked until it answers ``want`` (or the time is up): its answer is cached for a
    moment, and on a busy machine a follower's read barrier can miss a heartbeat or two."""
    deadline = time.monotonic() + timeout_s
    code, body = 0, {}
    while time.monotonic() < deadline:
        code, body = http_get_json(addr, "/readyz", timeout_s=10)
        if code == want:
            break
        time.sleep(0.2)
    return code, body


def test_health_endpoints_follow_quorum(cluster3: LocalCluster) -> None:
    leader = cluster3.wait_leader()
    for nid in cluster3.ids:
        addr = str(cluster3.cluster.by_id()[nid].http)
        assert http_get_json(addr, "/livez")[0] == 200
        code, body = _readyz_until(addr, 200, 30)
        assert code == 200, body
        assert http_get_json(addr, "/health") == (200, {"health": "true", "reason": ""})
    # Two of three gone: the survivor is a minority and must say so.
    others = [n for n in cluster3.ids if n != leader]
    survivor = others[0]
    cluster3.kill(leader)
    cluster3.kill(others[1])
    addr = str(cluster3.cluster.by_id()[survivor].http)
    code, body = _readyz_until(addr, 503, 15)
    assert code == 503 and body["reason"], body
    hcode, hbody = http_get_json(addr, "/health", timeout_s=10)
    assert hcode == 503 and hbody["health"] == "false" and hbody["reason"]
    assert http_get_json(addr, "/livez")[0] == 200  # alive, just not ready
    cluster3.start(leader)
    cluster3.start(others[1])
    code, body = _readyz_until(addr, 200, 30)
    assert code == 200, body


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return list(body["data"]["result"])


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed (make test installs it)")
def test_real_prometheus_sees_every_node_and_the_leader_change(cluster3: LocalCluster, tmp_path: Path) -> None:
    leader = cluster3.wait_leader()
    targets = [str(n.http) for n in cluster3.cluster.nodes]
    by_addr = {str(n.http): n.id for n in cluster3.cluster.nodes}
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: tetherlab\n    static_configs:\n"
        f"      - targets: {json.dumps(targets)}\n"
    )
    port = _free_port()
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        series: list[dict] = []
        while time.monotonic() < deadline:
            try:
                series = _query(port, "tetherlab_has_leader")
            except OSError:
                series = []
            if len(series) == 3 and all(s["value"][1] == "1" for s in series):
                break
            time.sleep(0.5)
        assert sorted(s["metric"]["instance"] for s in series) == sorted(targets), series
        cluster3.kill(leader)
        new_leader = cluster3.wait_leader(exclude=leader)
        deadline = time.monotonic() + 30
        seen: list[str] = []
        while time.monotonic() < deadline:
            seen = [by_addr[s["metric"]["instance"]] for s in _query(port, "tetherlab_is_leader == 1")]
            down = [by_addr[s["metric"]["instance"]] for s in _query(port, "up == 0")]
            if seen == [new_leader] and down == [leader]:
                break
            time.sleep(0.5)
        assert seen == [new_leader]
        changes = _query(port, "max(increase(tetherlab_leader_changes_seen_total[1m]))")
        assert changes and float(changes[0]["value"][1]) >= 1, changes
    finally:
        prom.terminate()
        try:
            prom.wait(10)
        except subprocess.TimeoutExpired:
            prom.kill()


def test_read_only_api_paginates_and_rejects_bad_parameters(cluster3: LocalCluster, tmp_path: Path) -> None:
    import sys

    leader = cluster3.wait_leader()
    registry = "".join(f'[[concept]]\nid = "area.c{i:03d}"\ntitle = "Concept {i}"\n\n' for i in range(250))
    (tmp_path / "concepts.toml").write_text(registry)
    for _ in range(50):  # the bootstrap admin key lands just after the first election
        p = subprocess.run([sys.executable, "-m", "tetherlab.cluster.cli", "concepts", "push",
                            str(tmp_path / "concepts.toml"), "--dir", str(cluster3.dir)], capture_output=True,
                           timeout=60)
        if p.returncode == 0:
            break
        time.sleep(0.2)
    assert p.returncode == 0, p.stderr
    addr = str(cluster3.cluster.by_id()[leader].http)
    seen: list[str] = []
    after = None
    pages = 0
    while True:
        q = "/v1/concepts?limit=100&consistent=true" + (f"&after={after}" if after else "")
        code, body = http_get_json(addr, q)
        assert code == 200, body
        seen += [c["id"] for c in body["concepts"]]
        pages += 1
        after = body["next"]
        if after is None or pages > 10:
            break
    assert pages == 3 and len(seen) == 250 and seen == sorted(seen)
    assert http_get_json(addr, "/v1/intents")[0] == 200
    assert http_get_json(addr, "/v1/agents?status=open")[0] == 200
    for bad in ("/v1/concepts?limit=0", "/v1/concepts?limit=abc", "/v1/concepts?limit=5000",
                "/v1/intents?status=bogus", "/v1/intents?after=x", "/v1/agents?nope=1",
                "/v1/concepts?consistent=maybe"):
        code, body = http_get_json(addr, bad)
        assert code == 400 and body["error"], (bad, body)
