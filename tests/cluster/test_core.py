"""The replicated core with real node processes on loopback: replication, crashes, restarts,
snapshots, a leader cut off from its majority, and strangers on the Raft port."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import struct
import time
import zlib
from pathlib import Path

import pytest

from tetherlab.cluster.ops.localcluster import LocalCluster

from conftest import BackgroundWriter, make_cluster, until_available

pytestmark = pytest.mark.slow


def put_many(c: LocalCluster, nid: str, n: int, prefix: str) -> list[str]:
    acked = []
    with c.client(nid) as cl:
        for i in range(n):
            r = until_available(lambda: cl.put("t", f"{prefix}{i}", f"value-{i}"))  # noqa: B023 (called at once)
            assert r["ok"], r
            acked.append(f"{prefix}{i}")
    return acked


def converge(c: LocalCluster, nids: list[str], timeout_s: float = 20.0) -> dict[str, dict[str, str]]:
    """Wait until the nodes report the same applied index, then return their records."""
    deadline = time.monotonic() + timeout_s
    while True:
        dumps = {n: c.dump(n) for n in nids}
        idx = {d["applied_index"] for d in dumps.values()}
        if len(idx) == 1 or time.monotonic() > deadline:
            return {n: {k: v["value"] for k, v in d["records"].get("t", {}).items()} for n, d in dumps.items()}
        time.sleep(0.1)


def test_writes_replicate_and_any_node_reads_them(cluster3: LocalCluster) -> None:
    leader = cluster3.wait_leader()
    follower = next(n for n in cluster3.ids if n != leader)
    put_many(cluster3, leader, 20, "L")
    put_many(cluster3, follower, 20, "F")  # a follower forwards to the leader
    for nid in cluster3.ids:
        with cluster3.client(nid) as cl:
            # Linearizable read right after the writes, on every node, including followers.
            r = until_available(lambda: cl.get("t", "F19"))
            assert r["ok"] and r["result"]["record"]["value"] == "value-19", (nid, r)
            r = until_available(lambda: cl.get("t", "L0"))
            assert r["ok"] and r["result"]["record"]["value"] == "value-0", (nid, r)
    dumps = converge(cluster3, cluster3.ids)
    assert dumps[cluster3.ids[0]] == dumps[cluster3.ids[1]] == dumps[cluster3.ids[2]]
    assert len(dumps[leader]) == 40


def test_sigkill_leader_elects_new_leader_and_loses_no_acknowledged_write(cluster3: LocalCluster) -> None:
    leader = cluster3.wait_leader()
    with BackgroundWriter(cluster3, ns="t", prefix="w", avoid=leader) as w:
        time.sleep(1.0)
        cluster3.kill(leader)
        t0 = time.monotonic()
        new_leader = cluster3.wait_leader(exclude=leader, timeout_s=15)
        elected_s = time.monotonic() - t0
        time.sleep(1.5)
    acked = w.acked
    assert new_leader != leader
    assert len(acked) > 10, "writes must go on after the new leader is elected"
    survivors = [n for n in cluster3.ids if n != leader]
    dumps = converge(cluster3, survivors)
    for n in survivors:
        missing = [k for k in acked if k not in dumps[n]]
        assert not missing, f"{n} lost acknowledged writes {missing[:5]} (elected after {elected_s:.1f}s)"
    # The killed node comes back and catches up.
    cluster3.start(leader)
    cluster3.wait_serving(leader)
    dumps = converge(cluster3, cluster3.ids)
    assert dumps[leader] == dumps[new_leader]


def test_restarted_node_catches_up_through_a_snapshot(tmp_path: Path) -> None:
    c = make_cluster(tmp_path, extra_toml="[raft]\ncompaction_min_entries = 40\n")
    try:
        leader = c.wait_leader()
        lagger = next(n for n in c.ids if n != leader)
        c.stop(lagger)
        acked = put_many(c, leader, 200, "s")
        # Compaction has run on the live nodes: the lagger's next index is gone from their logs.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            st = c.node_status(leader) or {}
            if st.get("snapshots_taken", 0) >= 1 and st["log"]["first_index"] > 5:
                break
            time.sleep(0.1)
        st = c.node_status(leader) or {}
        assert st.get("snapshots_taken", 0) >= 1, st
        c.start(lagger)
        c.wait_serving(lagger)
        dumps = converge(c, c.ids)
        assert all(k in dumps[lagger] for k in acked)
        assert dumps[lagger] == dumps[leader]
        deadline = time.monotonic() + 5
        lst: dict = {}
        while time.monotonic() < deadline and lst.get("snapshots_installed", 0) < 1:
            lst = c.node_status(lagger) or {}
            time.sleep(0.1)
        assert lst.get("snapshots_installed", 0) >= 1, lst
        # Writes after the snapshot install still replicate to it.
        put_many(c, leader, 5, "after")
        assert converge(c, c.ids)[lagger] == converge(c, c.ids)[leader]
    finally:
        c.close()


def test_full_cluster_restart_keeps_every_acknowledged_write(cluster3: LocalCluster) -> None:
    leader = cluster3.wait_leader()
    acked = put_many(cluster3, leader, 100, "r")
    for nid in cluster3.ids:
        cluster3.kill(nid)  # SIGKILL: nothing gets flushed on the way down
    cluster3.start()
    for nid in cluster3.ids:
        cluster3.wait_serving(nid)
    new_leader = cluster3.wait_leader()
    with cluster3.client(new_leader) as cl:
        r = cl.call("scan", ns="t", limit=1000)
    assert r["ok"], r
    keys = {k for k, _ in r["result"]["items"]}
    assert set(acked) <= keys
    dumps = converge(cluster3, cluster3.ids)
    assert dumps[cluster3.ids[0]] == dumps[cluster3.ids[1]] == dumps[cluster3.ids[2]]


def test_leader_cut_off_from_majority_stops_acknowledging_writes_and_reads(cluster3: LocalCluster) -> None:
    leader = cluster3.wait_leader()
    put_many(cluster3, leader, 3, "before")
    followers = [n for n in cluster3.ids if n != leader]
    for f in followers:
        cluster3.signal(f, signal.SIGSTOP)  # the majority is gone; the leader's TCP links stay up
    try:
        with cluster3.client(leader, timeout_s=15) as cl:
            w = cl.put("t", "during", "x")
            r = cl.get("t", "before0")
        assert not w["ok"] and w["error"]["code"] in ("unavailable", "indeterminate"), w
        assert not r["ok"] and r["error"]["code"] in ("unavailable", "indeterminate"), r
        # It steps down within about two election timeouts (plus our polling).
        deadline = time.monotonic() + 6
        role = None
        while time.monotonic() < deadline:
            role = (cluster3.node_status(leader) or {}).get("role")
            if role != "leader":
                break
            time.sleep(0.1)
        assert role != "leader"
        with cluster3.client(leader, timeout_s=15) as cl:
            w2 = cl.put("t", "after-stepdown", "x")
        assert not w2["ok"] and w2["error"]["code"] == "unavailable", w2
    finally:
        for f in followers:
            cluster3.signal(f, signal.SIGCONT)
    new_leader = cluster3.wait_leader(timeout_s=20)
    with cluster3.client(new_leader) as cl:
        assert until_available(lambda: cl.put("t", "healed", "x"))["ok"]
        assert cl.get("t", "during")["result"]["record"] is None or True  # indeterminate: either is allowed


def test_stranger_on_the_raft_port_is_ignored(cluster3: LocalCluster, tmp_path: Path) -> None:
    leader = cluster3.wait_leader()
    put_many(cluster3, leader, 5, "k")
    before = converge(cluster3, cluster3.ids)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    target = cluster3.cluster.by_id()[leader].raft
    payloads = [
        zlib.compress(pickle.dumps(Evil()), 3),                       # pysyncobj's framing, no encryption
        zlib.compress(pickle.dumps(["status"]), 3),                   # an admin utility message
        zlib.compress(pickle.dumps({"type": "append_entries", "term": 99}), 3),
        b"\xff" * 64,                                                 # garbage
    ]
    frames = [struct.pack("i", len(d)) + d for d in payloads]
    frames.append(struct.pack("i", 2**31 - 1) + b"\0" * 65536)  # announces a 2 GiB frame
    frames.append(struct.pack("i", -5) + b"\0" * 16)
    for frame in frames:
        with socket.create_connection((target.host, target.port), timeout=5) as s:
            try:
                s.sendall(frame)
            except ConnectionError:
                pass
            s.settimeout(2)
            try:
                s.recv(1024)
            except (TimeoutError, ConnectionError):
                pass
    time.sleep(0.5)
    assert not marker.exists(), "the node unpickled a stranger's payload"
    for nid in cluster3.ids:
        assert cluster3.alive(nid)
    assert cluster3.wait_leader() is not None
    assert converge(cluster3, cluster3.ids) == before
    with cluster3.client(leader) as cl:
        assert until_available(lambda: cl.put("t", "still-works", "y"))["ok"]


def test_node_refuses_to_start_without_the_secret(tmp_path: Path) -> None:
    c = LocalCluster(tmp_path / "c", nodes=1)
    (c.dir / "cluster.secret").unlink()
    c.start()
    p = c.procs["n1"]
    assert p.wait(30) == 2
    assert "secret" in c.log_tail("n1")
