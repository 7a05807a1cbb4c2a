"""Membership changes online: add a fourth node and remove one while a client keeps writing."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tetherlab.cluster.ops.config import load_cluster_file
from tetherlab.cluster.ops.localcluster import LocalCluster

from conftest import BackgroundWriter

pytestmark = pytest.mark.slow
TL = [sys.executable, "-m", "tetherlab.cluster.cli"]


def tl(c: LocalCluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TL, *args, "--dir", str(c.dir)], capture_output=True, timeout=120)


def test_add_a_fourth_node_and_remove_one_while_writing(cluster3: LocalCluster) -> None:
    c = cluster3
    leader = c.wait_leader()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and "keys" not in c.dump(leader)["records"]:
        time.sleep(0.1)  # the bootstrap admin key
    with BackgroundWriter(c, pause_s=0.01) as w:
        time.sleep(1.0)
        base = int(str(c.cluster.nodes[0].raft).rsplit(":", 1)[1]) - 1
        add = tl(c, "cluster", "add", "n4", "--raft", f"127.0.0.1:{base + 4}", "--ssh", f"127.0.0.1:{base + 104}",
                 "--http", f"127.0.0.1:{base + 204}", "--json")
        assert add.returncode == 0, add.stderr.decode()
        assert "n4" in json.loads(add.stdout)["members"]
        c.cluster = load_cluster_file(c.dir / "cluster.toml")
        assert "n4" in c.ids
        c.start("n4")
        c.wait_serving("n4")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the new node catches up
            lead = c.node_status(c.wait_leader()) or {}
            mine = c.node_status("n4") or {}
            if mine.get("applied_index", 0) >= lead.get("commit_index", 1) - 5 and mine.get("leader"):
                break
            time.sleep(0.2)
        assert (c.node_status("n4") or {}).get("leader"), c.node_status("n4")
        # Removing a node now is safe: four members, all healthy.
        leader = c.wait_leader()
        victim = next(n for n in c.ids if n not in (leader, "n4"))
        rm = tl(c, "cluster", "remove", victim, "--json")
        assert rm.returncode == 0, rm.stderr.decode()
        assert victim not in json.loads(rm.stdout)["members"]
        c.stop(victim)
        time.sleep(1.5)
    acked, gaps = w.acked, w.gaps_s
    survivors = [n for n in c.ids if n != victim]
    assert len(acked) > 50
    # Quorum was never lost: acknowledged writes never paused for an election's length.
    assert max(gaps) < 5.0, f"writes paused for {max(gaps):.1f}s"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        dumps = {n: c.dump(n) for n in survivors}
        if len({d["applied_index"] for d in dumps.values()}) == 1:
            break
        time.sleep(0.2)
    for n, d in dumps.items():
        missing = [k for k in acked if k not in d["records"].get("w", {})]
        assert not missing, f"{n} lost {missing[:5]}"
    assert dumps[survivors[0]]["records"] == dumps[survivors[-1]]["records"]
    # A change that would lose quorum is refused: with n4 stopped, 2 of 3 answer; removing another
    # healthy node would leave 1 of 2.
    c.stop("n4")
    time.sleep(1.5)
    other = next(n for n in survivors if n not in ("n4", c.wait_leader()))
    refused = tl(c, "cluster", "remove", other)
    assert refused.returncode == 1 and b"would_lose_quorum" in refused.stderr, refused.stderr


def test_rolling_restart_keeps_a_quorum_and_every_write(cluster3: LocalCluster) -> None:
    c = cluster3
    c.wait_leader()
    with BackgroundWriter(c) as w:
        for nid in c.ids:  # one node at a time, waiting for it to rejoin before the next
            c.stop(nid)
            c.start(nid)
            c.wait_serving(nid)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not (c.node_status(nid) or {}).get("leader"):
                time.sleep(0.1)
            assert c.wait_leader(timeout_s=20)
    acked = w.acked
    assert len(acked) > 20
    stored = c.dump(c.wait_leader())["records"].get("w", {})
    missing = [k for k in acked if k not in stored]
    assert not missing, f"lost acknowledged writes {missing[:5]}"
