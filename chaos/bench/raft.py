"""``tetherlab bench raft``: the durable cluster against bare pysyncobj, in the same run.

Both clusters are three real processes on loopback and are driven by the same load
generator: ``clients`` processes, each keeping ``in_flight`` writes of ``payload_bytes``
pipelined on the leader's local control socket (closed loop, so the rate is the saturation
rate). The bare cluster is pysyncobj as shipped: memory journal, no fsync, no encryption,
its default timing, a dict as the state.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pysyncobj import SyncObj, SyncObjConf, replicated

from tetherlab.cluster.ops.localcluster import LocalCluster, free_base_port
from tetherlab.cluster.ops.procs import stop_processes

WARMUP_S = 1.5
REPLY_TIMEOUT_S = 30.0


# --- load generator ---------------------------------------------------------------------------


async def _drive(sock_path: str, in_flight: int, duration_s: float, payload: str, tag: str) -> dict[str, Any]:
    reader, writer = await asyncio.open_unix_connection(sock_path, limit=1 << 20)
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    ok = failed = 0
    next_id = 0
    t_start = time.perf_counter()
    t_measure = t_start + WARMUP_S
    t_end = t_measure + duration_s

    def send_one() -> None:
        nonlocal next_id
        next_id += 1
        sent_at[next_id] = time.perf_counter()
        req = {"id": next_id, "op": "put", "ns": "bench", "key": f"{tag}-{next_id % 5000}", "value": payload}
        writer.write(json.dumps(req).encode() + b"\n")

    for _ in range(in_flight):
        send_one()
    while sent_at:
        line = await asyncio.wait_for(reader.readline(), REPLY_TIMEOUT_S)
        if not line:
            break
        now = time.perf_counter()
        reply = json.loads(line)
        t0 = sent_at.pop(reply["id"], None)
        if t0 is not None and t0 >= t_measure and now <= t_end:
            if reply.get("ok"):
                ok += 1
                latencies.append(now - t0)
            else:
                failed += 1
        if now < t_end:
            send_one()
    writer.close()
    return {"ok": ok, "failed": failed, "latencies": latencies}


def _client_main(sock_path: str, in_flight: int, duration_s: float, payload: str, tag: str,
                 out: mp.Queue) -> None:  # type: ignore[type-arg]
    out.put(asyncio.run(_drive(sock_path, in_flight, duration_s, payload, tag)))


def drive(sock_path: str, clients: int, in_flight: int, duration_s: float, payload_bytes: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    payload = "x" * payload_bytes
    procs = [
        ctx.Process(target=_client_main, args=(sock_path, in_flight, duration_s, payload, f"c{i}", q))
        for i in range(clients)
    ]
    for p in procs:
        p.start()
    results = [q.get(timeout=duration_s + WARMUP_S + REPLY_TIMEOUT_S + 30) for _ in procs]
    for p in procs:
        p.join(10)
    lat = sorted(x for r in results for x in r["latencies"])
    ok = sum(r["ok"] for r in results)

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 2) if lat else float("nan")

    return {
        "commits_per_s": round(ok / duration_s, 1),
        "ok": ok,
        "failed": sum(r["failed"] for r in results),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
    }


# --- bare pysyncobj node ----------------------------------------------------------------------


def bare_node_main(self_addr: str, peers: list[str], sock_path: str) -> None:
    """A pysyncobj node as shipped (memory journal, no fsync, no password) behind the same
    control-socket protocol as ours, so the load generator is identical."""
    class Bare(SyncObj):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(self_addr, peers, SyncObjConf(bindAddress=self_addr))
            self.data: dict[str, str] = {}

        @replicated
        def put(self, key: str, value: str) -> int:
            self.data[key] = value
            return len(self.data)

    node = Bare()

    async def serve() -> None:
        loop = asyncio.get_running_loop()

        async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while line := await reader.readline():
                req = json.loads(line)
                if req.get("op") == "status":
                    leader = node._getLeader()
                    writer.write(json.dumps({"id": req["id"], "ok": True, "result": {
                        "leader": leader.address if leader else None, "self": self_addr}}).encode() + b"\n")
                    continue
                rid = req["id"]

                def done(res: Any, err: int, rid: Any = rid) -> None:
                    reply = {"id": rid, "ok": err == 0}
                    loop.call_soon_threadsafe(writer.write, json.dumps(reply).encode() + b"\n")

                node.put(req["key"], req["value"], callback=done)

        await asyncio.start_unix_server(conn, path=sock_path, limit=1 << 20)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()

    asyncio.run(serve())
    node.destroy()


def _bare_cluster(workdir: Path) -> tuple[list[subprocess.Popen[bytes]], list[str], list[str]]:
    base = free_base_port(3)
    addrs = [f"127.0.0.1:{base + 1 + i}" for i in range(3)]
    socks = [str(workdir / f"bare{i}.sock") for i in range(3)]
    procs = []
    for i, a in enumerate(addrs):
        peers = [p for p in addrs if p != a]
        code = ("import sys, json; from tetherlab.chaos.bench.raft import bare_node_main; "
                "bare_node_main(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3])")
        procs.append(subprocess.Popen([sys.executable, "-c", code, a, json.dumps(peers), socks[i]],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs, addrs, socks


def bare_leader_sock(addrs: list[str], socks: list[str], timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for a, s in zip(addrs, socks, strict=True):
            try:
                with socket.socket(socket.AF_UNIX) as c:
                    c.settimeout(1)
                    c.connect(s)
                    c.sendall(b'{"id": 1, "op": "status"}\n')
                    reply = json.loads(c.makefile().readline())
                if reply["result"]["leader"] == a:
                    return s
            except (OSError, ValueError, KeyError):
                pass
        time.sleep(0.2)
    raise TimeoutError("bare pysyncobj cluster elected no leader")


# --- the benchmark ----------------------------------------------------------------------------


def bench_raft(duration_s: float = 8.0, clients: int = 4, in_flight: int = 256, payload_bytes: int = 100,
               progress: bool = True) -> dict[str, Any]:
    def say(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="tetherlab-bench-") as tmp:
        work = Path(tmp)
        say(f"starting a durable 3-node cluster in {work / 'durable'}")
        c = LocalCluster(work / "durable", nodes=3)
        c.start()
        try:
            for nid in c.ids:
                c.wait_serving(nid)
            leader = c.wait_leader()
            say(f"durable: leader {leader}; {clients} clients x {in_flight} in flight, {payload_bytes}-byte writes, "
                f"{duration_s:.0f} s")
            durable = drive(str(c.control_path(leader)), clients, in_flight, duration_s, payload_bytes)
            fsyncs = (c.node_status(leader) or {}).get("fsyncs")
            say(f"durable: {durable['commits_per_s']:.0f} commits/s, p50 {durable['p50_ms']} ms, "
                f"p99 {durable['p99_ms']} ms")
        finally:
            c.close()
        say("starting a bare pysyncobj 3-node cluster (memory journal, no fsync, no encryption)")
        procs, addrs, socks = _bare_cluster(work)
        try:
            sock = bare_leader_sock(addrs, socks)
            bare = drive(sock, clients, in_flight, duration_s, payload_bytes)
            say(f"bare: {bare['commits_per_s']:.0f} commits/s, p50 {bare['p50_ms']} ms, p99 {bare['p99_ms']} ms")
        finally:
            stop_processes(procs, grace_s=5.0)
    ratio = durable["commits_per_s"] / bare["commits_per_s"] if bare["commits_per_s"] else float("nan")
    return {
        "durable_commits_per_s": durable["commits_per_s"],
        "bare_commits_per_s": bare["commits_per_s"],
        "ratio": round(ratio, 3),
        "p50_ms": durable["p50_ms"],
        "p99_ms": durable["p99_ms"],
        "bare_p50_ms": bare["p50_ms"],
        "bare_p99_ms": bare["p99_ms"],
        "durable_failed": durable["failed"],
        "leader_fsyncs": fsyncs,
        "clients": clients,
        "in_flight_per_client": in_flight,
        "payload_bytes": payload_bytes,
        "duration_s": duration_s,
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    """``tetherlab bench raft [--json] ...``: the durable cluster against bare pysyncobj."""
    p = argparse.ArgumentParser(prog="tetherlab bench raft", description=main.__doc__)
    p.add_argument("--json", action="store_true", help="print the result object on stdout")
    p.add_argument("--duration", type=float, default=8.0, help="seconds of load per phase")
    p.add_argument("--clients", type=int, default=4, help="client processes")
    p.add_argument("--in-flight", type=int, default=256, help="requests in flight per client")
    a = p.parse_args(argv)
    result = bench_raft(duration_s=a.duration, clients=a.clients, in_flight=a.in_flight, progress=not a.json)
    if a.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            if k != "details":
                print(f"{k:>28}: {v}")
    return 0
