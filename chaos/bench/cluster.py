"""``tetherlab bench cluster``: the whole path under load, beside bare pysyncobj and etcd.

One run (about three minutes on a 2-core machine):

1. a local three-node Tetherlab cluster, driven through SSH, the shim protocol, Raft and LMDB
   by simulated developers in ``--workers`` load-generator processes (one SSH connection per
   developer, many agents each): sessions, intents over a registry with hot and free concepts,
   heartbeats once a second, completions (see :mod:`tetherlab.chaos.bench.load`); measured at
   fixed offered loads (open loop) and at saturation (closed loop);
2. failover: the leader SIGKILLed under load, ``--failover-runs`` times;
3. the same workload on bare pysyncobj running the same engine, and on a three-member etcd
   cluster (:mod:`tetherlab.chaos.bench.baselines`);
4. ``tether hook claude-code`` latency, as a real subprocess against a fake shim socket;
5. scale (``--no-scale`` skips it): 10,000 concepts, 5,000 active intents held by 5,000
   heartbeating agents, 1,000 more agents doing the measured work.

``--profile DIR`` samples the leader, a follower and a load generator with py-spy during the
saturation phase (and the leader during the scale saturation) and prints where the time goes;
``--profile-gil`` samples only the thread that holds the GIL. Progress goes to stderr; ``--json`` prints
the result object on stdout.

Run it as ``tetherlab bench cluster``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tetherlab.chaos.bench import load as bl
from tetherlab.chaos.bench.baselines import EtcdCluster, ensure_etcd
from tetherlab.chaos.bench.figures import print_figures
from tetherlab.cluster import protocol as p
from tetherlab.cluster.core.engine.registry import load_toml
from tetherlab.cluster.ops.config import load_cluster_file
from tetherlab.cluster.ops.keys import generate_key_pair
from tetherlab.cluster.ops.localcluster import LocalCluster
from tetherlab.cluster.ops.procs import start_node_process
from tetherlab.shim.client import MasterClient, masters_from_cluster_file

PHASE_TIMEOUT_S = 120.0
HB_INTERVAL_S = [bl.HEARTBEAT_INTERVAL_S]
UNCHANGED_REPORTS = [False]  # --report-unchanged
REPORT_INTERVAL_S = [bl.REPORT_INTERVAL_S]
LEADER_POLL_S = 0.02
TARGETS = {
    "saturation_verdicts_per_s": (">=", 2000.0),
    "p99_ms_at_500": ("<=", 25.0),
    "ratio_vs_bare": (">=", 1.0),
    "ratio_vs_etcd": (">=", 1.5),
    "scale_ratio": (">=", 0.8),
    "failover_s": ("<=", 3.0),
    "hook_p50_ms": ("<=", 30.0),
}


def _say(msg: str) -> None:
    print(f"[bench cluster {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(p * len(xs)))] * 1000, 2)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


HOST_LOOP_ADDITIONS = 2_000_000  # about 75 ms a pass on this machine when its host is quiet
HOST_LOOP_PASSES = 3


def host_loop_ms(additions: int = HOST_LOOP_ADDITIONS, passes: int = HOST_LOOP_PASSES) -> float:
    """The best of ``passes`` timings of a plain Python loop on one core, in ms."""
    best_s = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        total = 0
        for i in range(additions):
            total += i
        best_s = min(best_s, time.perf_counter() - t0)
    return round(best_s * 1000, 1)


def host_speed_ms() -> list[float]:
    """``host_loop_ms`` on every core at once (one process each), slowest last: how fast this
    host runs Python right now. A shared host's speed moves by half within an hour, and one
    core can lag the other, without showing as load or steal: runs are comparable only at
    similar figures."""
    cpus = os.cpu_count() or 1
    with mp.get_context("spawn").Pool(cpus) as pool:
        return sorted(pool.starmap(host_loop_ms, [()] * cpus))


def _probe_host(out: dict[str, Any], when: str) -> None:
    ms = host_speed_ms()
    out["machine"].setdefault("host_loop_ms", {})[when] = ms
    _say(f"host speed ({when}): a {HOST_LOOP_ADDITIONS:,}-addition Python loop takes {ms} ms on each core")


# --- process observation ----------------------------------------------------------------------------


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def cpu_s(pid: int, children: bool = True) -> float:
    """CPU seconds of ``pid`` and (by default) of its live children (a node's match worker)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0
    if children:
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            kids = []
        own += sum(cpu_s(int(k), children=False) for k in kids)
    return own


# --- the Tetherlab cluster under test ----------------------------------------------------------------


class BenchCluster(LocalCluster):
    def _spawn(self, nid: str) -> subprocess.Popen[bytes]:
        # The nodes log as they do by default (info): what operators run is what is measured.
        return start_node_process(self.config_path(nid), self.dir / nid / "node.log", [])

    def pid(self, nid: str) -> int:
        return self.procs[nid].pid

    def bench_engine(self, nid: str, cmd: dict[str, Any]) -> dict[str, Any]:
        path = self.dir / "bench-engine-cmd.json"
        path.write_text(json.dumps(cmd))
        with self.client(nid, timeout_s=120.0) as c:
            # A 10,000-concept registry (~3 MB) fits neither the shim protocol's frame nor a control
            # line: the control socket's engine_file op proposes it; everything measured goes via SSH.
            reply: dict[str, Any] = c.call("engine_file", path=str(path))
        return reply

    def wait_new_leader(self, old: str, timeout_s: float = 30.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for nid in self.ids:
                if nid == old:
                    continue
                st = self.node_status(nid)
                if st and st.get("role") == "leader" and st.get("quorum_backed"):
                    return nid
            time.sleep(LEADER_POLL_S)
        raise TimeoutError("no new leader")

    def metric(self, nid: str, name: str) -> float | None:
        node = self.cluster.by_id()[nid]
        try:
            with urllib.request.urlopen(f"http://{node.http}/metrics", timeout=5) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith(name + " ") or line.startswith(name + "{"):
                        return float(line.rsplit(" ", 1)[1])
        except (OSError, ValueError):
            return None
        return None


def _developer_keys(directory: Path, names: list[str]) -> dict[str, str]:
    keys = {}
    for n in names:
        path = directory / "keys" / n
        generate_key_pair(path, f"{n}@bench")
        keys[n] = str(path)
    return keys


async def _admin_setup(cluster_file: Path, keys: dict[str, str], registry_toml: str | None) -> None:
    cf = load_cluster_file(cluster_file)
    admin = MasterClient(masters_from_cluster_file(cluster_file), cf.admin_key, cf.developer or "admin")
    try:
        for dev, path in keys.items():
            await admin.call(p.KeysAdd, 30, idempotent=False, developer=dev,
                             public_key=Path(path + ".pub").read_text().strip())
        if registry_toml is not None:
            await admin.call(p.ConceptsPush, 60, idempotent=False, toml=registry_toml)
    finally:
        await admin.close()


# --- load-generator processes -------------------------------------------------------------------------


class Workers:
    """``n`` load-generator processes, each with its share of the developers."""

    def __init__(self, backend: dict[str, Any], developers: dict[str, list[str]], workload: bl.Workload,
                 n: int, passive: set[str] | None = None) -> None:
        ctx = mp.get_context("spawn")
        names = list(developers)
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        self.pids: list[int] = []
        wl = {k: getattr(workload, k) for k in ("concepts", "hot", "hot_p", "depend_p", "first")}
        for i in range(n):
            mine = {d: developers[d] for d in names[i::n]}
            if not mine:
                continue
            parent, child = ctx.Pipe()
            spec = {"backend": backend, "developers": mine, "workload": wl, "index": i,
                    "passive": sorted(set(mine) & (passive or set()))}
            proc = ctx.Process(target=bl.worker_main, args=(child, spec), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        for c in self.conns:
            if not c.poll(60):
                raise TimeoutError("a load generator did not start")
            msg = c.recv()
            if "error" in msg:
                raise RuntimeError(f"load generator failed to start: {msg['error']}")
            self.pids.append(msg["pid"])

    def send(self, req: dict[str, Any]) -> None:
        for c in self.conns:
            c.send(req)

    def collect(self, timeout_s: float = PHASE_TIMEOUT_S) -> list[dict[str, Any]]:
        out = []
        for c in self.conns:
            if not c.poll(timeout_s):
                raise TimeoutError("a load generator did not finish its phase")
            msg = c.recv()
            if "error" in msg:
                raise RuntimeError(f"load generator failed: {msg['error']}")
            out.append(msg)
        return out

    def run(self, req: dict[str, Any], timeout_s: float = PHASE_TIMEOUT_S) -> list[dict[str, Any]]:
        self.send(req)
        return self.collect(timeout_s)

    def close(self) -> None:
        for c in self.conns:
            with contextlib.suppress(Exception):
                c.send({"op": "exit"})
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    lat = [x for r in results for x in r["verdict_lat"]]
    ini = [x for r in results for x in r["initial_lat"]]
    hb = [x for r in results for x in r["hb_lat"]]
    dur = results[0]["duration_s"]
    actions: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    for r in results:
        actions.update(r["actions"])
        errors.update(r["errors"])
    verdicts = sum(actions.values())
    by_second = [sum(c) for c in itertools.zip_longest(*(r["by_second"] for r in results), fillvalue=0)]
    return {
        "verdicts_per_s": round(verdicts / dur, 1),
        "p50_ms": _pct(lat, 0.50),
        "p99_ms": _pct(lat, 0.99),
        "p999_ms": _pct(lat, 0.999),
        "initial_p50_ms": _pct(ini, 0.50),
        "initial_p99_ms": _pct(ini, 0.99),
        "heartbeats_per_s": round(sum(r["hb_agents"] for r in results) / dur, 1),
        "heartbeat_rpcs_per_s": round(sum(r["hb_rpcs"] for r in results) / dur, 1),
        "heartbeat_p99_ms": _pct(hb, 0.99),
        "reports_per_s": round(sum(r.get("reports", 0) for r in results) / dur, 1),
        # due reports an agent did not send: its state was already acknowledged (tether run's rule)
        "reports_unchanged_per_s": round(sum(r.get("reports_unchanged", 0) for r in results) / dur, 1),
        "report_p99_ms": _pct([x for r in results for x in r.get("report_lat", [])], 0.99),
        "actions": dict(sorted(actions.items())),
        "errors": dict(errors),
        "dropped": sum(r["dropped"] for r in results),
        "client_cpu_s": round(sum(r["cpu_s"] for r in results), 2),
        "verdicts_by_second": by_second,  # from the phase's start, warm-up included
        **({"etcd_txn_retries": sum(r["etcd_retries"] for r in results)}
           if any(r["etcd_retries"] for r in results) else {}),
    }


def _developers(prefix: str, n_dev: int, agents_per_dev: int) -> dict[str, list[str]]:
    names = [f"{prefix}{i}" for i in range(n_dev)]
    return {d: [bl.new_agent_id(d) for _ in range(agents_per_dev)] for d in names}


def run_load(workers: Workers, server_pids: list[int], rate: float | None, warmup_s: float, duration_s: float,
             concurrency: int, label: str, **extra: Any) -> dict[str, Any]:
    cpu0 = [cpu_s(p) for p in server_pids]
    client0 = sum(cpu_s(p) for p in workers.pids)
    per_worker_rate = rate / len(workers.conns) if rate else None
    req = {"op": "load", "rate": per_worker_rate, "warmup_s": warmup_s, "duration_s": duration_s,
           "concurrency": concurrency, "hb_interval_s": HB_INTERVAL_S[0], "report_interval_s": REPORT_INTERVAL_S[0],
           "unchanged_reports": UNCHANGED_REPORTS[0], **extra}
    res = merge(workers.run(req))
    wall = warmup_s + duration_s
    used = [cpu_s(p) - c for p, c in zip(server_pids, cpu0, strict=True)]
    res["server_cpu_pct"] = [round(100 * u / wall) for u in used]
    # What a verdict costs the servers in CPU (heartbeats and reports included): unlike the
    # rates, it hardly moves with what else the machine is running.
    done = res["verdicts_per_s"] * wall
    res["server_cpu_ms_per_verdict"] = round(1000 * sum(used) / done, 3) if done else None
    # The simulated shims share the machine: what they spend per verdict is CPU the servers lack.
    client_used = sum(cpu_s(p) for p in workers.pids) - client0
    res["client_cpu_ms_per_verdict"] = round(1000 * client_used / done, 3) if done else None
    res["rss_mb"] = [rss_mb(p) for p in server_pids]
    res["offered_per_s"] = rate
    res["loadavg"] = loadavg()
    _say(f"{label}: {res['verdicts_per_s']:.0f} verdicts/s, p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms, "
         f"p999 {res['p999_ms']} ms, {res['heartbeats_per_s']:.0f} heartbeats/s, {res['reports_per_s']:.0f} reports/s "
         f"({res['reports_unchanged_per_s']:.0f}/s unchanged, not sent), "
         f"errors {res['errors'] or 0}, "
         f"server cpu% {res['server_cpu_pct']}, load generators cpu% {round(100 * client_used / wall)}, "
         f"loadavg {res['loadavg']}, verdicts by second {res['verdicts_by_second']}")
    return res


# --- profiling ------------------------------------------------------------------------------------------


def start_profiles(out_dir: Path, targets: dict[str, int], seconds: float,
                   gil_only: bool = False) -> list[subprocess.Popen[bytes]]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists() and not shutil.which("py-spy"):
        _say("py-spy not found (pip install py-spy): no profile")
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for name, pid in targets.items():
        procs.append(subprocess.Popen(
            [spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "97", "--nonblocking", "-t",
             *(["--gil"] if gil_only else []), "-f", "raw", "-o", str(out_dir / f"{name}.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


@contextlib.contextmanager
def profiled(args: argparse.Namespace, out: dict[str, Any], targets: dict[str, int]) -> Iterator[None]:
    """With ``--profile``: py-spy each of ``targets`` (name -> pid) while the block runs a phase,
    then put their summaries in ``out["profile"]``."""
    if not args.profile:
        yield
        return
    procs = start_profiles(Path(args.profile), targets, args.warmup + args.duration, gil_only=args.profile_gil)
    try:
        yield
    finally:
        for pr in procs:
            pr.wait(30)
    summaries = out.setdefault("profile", {})
    for name in targets:
        summaries[name] = summarise_profile(Path(args.profile) / f"{name}.txt")


def summarise_profile(path: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares per function, and per thread, from py-spy's raw output."""
    self_c: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = stack.split(";")
        total += count
        thread = frames[0] if frames and frames[0].startswith(("thread", "process")) else "?"
        threads[thread[:60]] += count
        frames = [f for f in frames if not f.startswith(("thread", "process"))]

        def short(f: str) -> str:
            f = f.replace(str(Path(sys.prefix)), "")
            return f.split(" (")[0] + " (" + f.split(" (")[1].split("/")[-1] if " (" in f else f

        if frames:
            self_c[short(frames[-1])] += count
        for f in {short(f) for f in frames}:
            incl[f] += count
    if not total:
        return {}

    def share(c: collections.Counter[str]) -> list[list[Any]]:
        return [[k, round(100 * v / total, 1)] for k, v in c.most_common(top)]

    return {"samples": total, "self_pct": share(self_c), "inclusive_pct": share(incl), "threads_pct": share(threads)}


# --- hook latency -----------------------------------------------------------------------------------------


def hook_latency(calls: int, workdir: Path) -> dict[str, Any]:
    """Runs the installed ``tether hook claude-code`` ``calls`` times with a PreToolUse payload
    against a fake shim socket that answers ``allow`` at once."""
    tether = Path(sys.executable).parent / "tether"
    exe = str(tether) if tether.exists() else shutil.which("tether")
    if exe is None:
        return {"skipped": "no tether executable found"}
    sock_path = str(workdir / "hook.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    srv.listen(16)
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with c:
                f = c.makefile("rb")
                f.readline()
                c.sendall(b'{"decision":"allow","reason":"","context":""}\n')

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    payload = json.dumps({"session_id": "bench", "transcript_path": "/tmp/t.jsonl", "cwd": str(workdir),
                          "permission_mode": "default", "hook_event_name": "PreToolUse", "tool_name": "Edit",
                          "tool_input": {"file_path": "src/a.py", "old_string": "a", "new_string": "b"},
                          "tool_use_id": "toolu_1"}).encode()
    env = {**os.environ, "TETHER_SOCK": sock_path}
    times: list[float] = []
    codes: collections.Counter[int] = collections.Counter()
    try:
        for _ in range(calls):
            t0 = time.perf_counter()
            r = subprocess.run([exe, "hook", "claude-code"], input=payload, capture_output=True, env=env, timeout=30)
            times.append(time.perf_counter() - t0)
            codes[r.returncode] += 1
    finally:
        stop.set()
        srv.close()
        t.join(2)
    return {"calls": calls, "p50_ms": _pct(times, 0.5), "p99_ms": _pct(times, 0.99),
            "exit_codes": dict(codes), "executable": exe}


# --- phases ------------------------------------------------------------------------------------------------


def tetherlab_phase(work: Path, args: argparse.Namespace, out: dict[str, Any]) -> None:
    wl = bl.Workload(concepts=args.concepts)
    devs = _developers("dev", args.developers, args.agents)
    c = BenchCluster(work / "tetherlab", nodes=3)
    c.start()
    workers: Workers | None = None
    try:
        for nid in c.ids:
            c.wait_serving(nid)
        leader = c.wait_leader()
        keys = _developer_keys(work, list(devs))
        toml = bl.registry_toml(args.concepts)
        _say(f"tetherlab: leader {leader}; registering {len(keys)} developer keys, pushing {args.concepts} concepts "
             f"({len(toml) // 1024} KiB TOML)")
        asyncio.run(_admin_setup(c.dir / "cluster.toml", keys, toml))
        workers = Workers({"kind": "tetherlab", "keys": keys, "cluster_file": str(c.dir / "cluster.toml")},
                          devs, wl, args.workers)
        t0 = time.monotonic()
        n = sum(r["sessions"] for r in workers.run({"op": "open"}))
        _say(f"tetherlab: {n} sessions opened in {time.monotonic() - t0:.1f} s")
        pids = [c.pid(nid) for nid in c.ids]
        out["tetherlab"] = {"offered": {}, "nodes": c.ids, "leader": leader}
        for rate in args.rates:
            out["tetherlab"]["offered"][str(rate)] = run_load(
                workers, pids, rate, args.warmup, args.duration, args.concurrency, f"tetherlab @{rate}/s")
        follower = next(n for n in c.ids if n != leader)
        with profiled(args, out, {"leader": c.pid(leader), "follower": c.pid(follower), "loadgen": workers.pids[0]}):
            sat = run_load(workers, pids, None, args.warmup, args.duration, args.concurrency, "tetherlab saturation")
        out["tetherlab"]["saturation"] = sat
        out["tetherlab"]["active_intents"] = c.metric(leader, "tetherlab_active_intents")
        out["tetherlab"]["rss_mb"] = dict(zip(c.ids, [rss_mb(p) for p in pids], strict=True))
        if args.failover_runs:
            out["failover"] = failover_runs(c, workers, args)
    finally:
        if workers is not None:
            workers.close()
        c.close()


def failover_runs(c: BenchCluster, workers: Workers, args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    for i in range(args.failover_runs):
        leader = c.wait_leader()
        pre_s, post_s = 2.0, 6.0
        workers.send({"op": "load", "rate": args.failover_rate / len(workers.conns), "warmup_s": 0.0,
                      "duration_s": pre_s + post_s, "concurrency": args.concurrency, "hb_interval_s": 0.25,
                      "timeline": True})
        time.sleep(pre_s)
        kill_t = time.monotonic()
        c.kill(leader)
        new = c.wait_new_leader(leader)
        t_leader = time.monotonic() - kill_t
        results = workers.collect()
        reattach: list[float] = []
        first_verdict: float | None = None
        for r in results:
            for oks in r["hb_ok"].values():
                after = [t for t, node in oks if t > kill_t and node != leader]
                reattach.append(min(after) - kill_t if after else float("inf"))
            for times in r["verdict_times"].values():
                after = [t for t, node in times if t > kill_t and node != leader]
                if after:
                    fv = min(after) - kill_t
                    first_verdict = fv if first_verdict is None else min(first_verdict, fv)
        run = {"killed": leader, "new_leader": new, "to_new_leader_s": round(t_leader, 3),
               "to_all_reattached_s": round(max(reattach), 3) if reattach else None,
               "to_first_verdict_s": round(first_verdict, 3) if first_verdict is not None else None,
               "errors": dict(merge(results)["errors"])}
        _say(f"failover {i + 1}: {run}")
        runs.append(run)
        c.start(leader)
        c.wait_serving(leader)
        time.sleep(2.0)  # let it catch up before the next kill

    def med(key: str) -> float | None:
        xs = [r[key] for r in runs if r[key] is not None]
        return round(statistics.median(xs), 3) if xs else None

    return {"runs": runs, "median_to_new_leader_s": med("to_new_leader_s"),
            "median_to_all_reattached_s": med("to_all_reattached_s"),
            "median_to_first_verdict_s": med("to_first_verdict_s"),
            "note": "heartbeats every 0.25 s in this phase (tether run sends one a second)"}


def bare_phase(work: Path, args: argparse.Namespace, out: dict[str, Any]) -> None:
    wl = bl.Workload(concepts=args.concepts)
    devs = _developers("dev", args.developers, args.agents)
    bc = __import__("tetherlab.chaos.bench.baselines", fromlist=["BareCluster"]).BareCluster(
        work / "bare", as_shipped=args.bare_as_shipped)
    bc.start()
    workers: Workers | None = None
    try:
        sock = bc.leader_sock()

        async def setup() -> None:
            b = bl.BareBackend("admin", sock)
            await b.start()
            try:
                await b.cmd({"type": "init", "remote": bl.REMOTE})

                await b.cmd({"type": "push_registry", "concepts": load_toml(bl.registry_toml(args.concepts))})
            finally:
                await b.close()

        asyncio.run(setup())
        workers = Workers({"kind": "bare", "sock": sock}, devs, wl, args.workers)
        n = sum(r["sessions"] for r in workers.run({"op": "open"}))
        _say(f"bare pysyncobj: {n} sessions opened")
        pids = bc.pids()
        out["bare"] = {"offered": {}, "as_shipped": args.bare_as_shipped}
        if 500 in args.rates:
            out["bare"]["offered"]["500"] = run_load(workers, pids, 500, args.warmup, args.duration,
                                                     args.concurrency, "bare @500/s")
        out["bare"]["saturation"] = run_load(workers, pids, None, args.warmup, args.duration, args.concurrency,
                                             "bare saturation")
    finally:
        if workers is not None:
            workers.close()
        bc.stop()


def etcd_phase(work: Path, args: argparse.Namespace, out: dict[str, Any]) -> None:
    binary, note = ensure_etcd(install=not args.no_install)
    if binary is None:
        _say(note)
        out["etcd"] = {"skipped": note}
        return
    wl = bl.Workload(concepts=args.concepts)
    devs = _developers("dev", args.developers, args.agents)
    ec = EtcdCluster(work / "etcd", binary)
    ec.start()
    workers: Workers | None = None
    try:
        ec.wait_healthy()
        workers = Workers({"kind": "etcd", "endpoints": ec.endpoints}, devs, wl, args.workers)
        n = sum(r["sessions"] for r in workers.run({"op": "open"}))
        _say(f"etcd: {n} sessions (leases) opened")
        pids = ec.pids()
        out["etcd"] = {"offered": {}, "version": subprocess.run([binary, "--version"], capture_output=True,
                                                                 text=True).stdout.splitlines()[0]}
        if 500 in args.rates:
            out["etcd"]["offered"]["500"] = run_load(workers, pids, 500, args.warmup, args.duration,
                                                     args.concurrency, "etcd @500/s")
        out["etcd"]["saturation"] = run_load(workers, pids, None, args.warmup, args.duration, args.concurrency,
                                             "etcd saturation")
    finally:
        if workers is not None:
            workers.close()
        ec.stop()


def scale_phase(work: Path, args: argparse.Namespace, out: dict[str, Any]) -> None:
    """10,000 concepts; 5,000 agents each holding an active intent on a concept of its own
    (heartbeated, otherwise idle); 1,000 agents doing the measured work on the other 5,000."""
    concepts, holders, active_agents = args.scale_concepts, args.scale_holders, args.scale_agents
    c = BenchCluster(work / "scale", nodes=3)
    c.start()
    workers: Workers | None = None
    try:
        for nid in c.ids:
            c.wait_serving(nid)
        leader = c.wait_leader()
        n_hold_dev = max(1, holders // 250)
        hold_devs = _developers("hold", n_hold_dev, holders // n_hold_dev)
        work_devs = _developers("work", 10, active_agents // 10)
        keys = _developer_keys(work / "scale-keys", [*hold_devs, *work_devs])
        asyncio.run(_admin_setup(c.dir / "cluster.toml", keys, None))
        t0 = time.monotonic()
        res = c.bench_engine(leader, {"type": "push_registry", "concepts": bl.registry_concepts(concepts)})
        assert res.get("ok"), res
        _say(f"scale: {concepts} concepts pushed in {time.monotonic() - t0:.1f} s")
        all_devs = {**hold_devs, **work_devs}
        workers = Workers({"kind": "tetherlab", "keys": keys, "cluster_file": str(c.dir / "cluster.toml")},
                          all_devs, bl.Workload(concepts=concepts, first=holders), args.workers,
                          passive=set(hold_devs))
        t0 = time.monotonic()
        n = sum(r["sessions"] for r in workers.run({"op": "open"}))
        granted = sum(r.get("granted", 0) for r in workers.run({"op": "hold", "holders": _hold_bases(hold_devs)}))
        _say(f"scale: {n} sessions opened, {granted} holder intents granted "
             f"in {time.monotonic() - t0:.1f} s")
        pids = [c.pid(nid) for nid in c.ids]
        active_at_start = c.metric(leader, "tetherlab_active_intents")
        sc: dict[str, Any] = {"concepts": concepts, "holder_agents": holders, "working_agents": active_agents,
                              "active_intents_at_start": active_at_start}
        sc["offered"] = run_load(workers, pids, args.scale_rate, args.warmup, args.duration, args.concurrency,
                                 f"scale @{args.scale_rate}/s")
        now_leader = c.wait_leader()
        if now_leader != leader:
            _say(f"scale: the leader changed before the saturation phase ({leader} -> {now_leader})")
            sc["leader_changed"] = [leader, now_leader]
            leader = now_leader
        # The scale leader beside the small one's: what grows with the state.
        with profiled(args, out, {"scale-leader": c.pid(leader)}):
            sc["saturation"] = run_load(workers, pids, None, args.warmup, args.duration, args.concurrency,
                                        "scale saturation")
        sc["active_intents_at_end"] = c.metric(leader, "tetherlab_active_intents")
        sc["open_sessions"] = c.metric(leader, "tetherlab_open_sessions")
        sc["rss_mb"] = dict(zip(c.ids, [rss_mb(p) for p in pids], strict=True))
        out["scale"] = sc
    finally:
        if workers is not None:
            workers.close()
        c.close()


def _hold_bases(hold_devs: dict[str, list[str]]) -> dict[str, int]:
    base, out = 0, {}
    for dev, agents in hold_devs.items():
        out[dev] = base
        base += len(agents)
    return out


# --- the whole run -------------------------------------------------------------------------------------------


def summary(out: dict[str, Any]) -> dict[str, Any]:
    tl = out.get("tetherlab", {})
    sat = tl.get("saturation", {}).get("verdicts_per_s")
    bare = out.get("bare", {}).get("saturation", {}).get("verdicts_per_s")
    etcd = out.get("etcd", {}).get("saturation", {}).get("verdicts_per_s")
    at500 = tl.get("offered", {}).get("500", {})
    fo = out.get("failover", {})
    scale_sat = out.get("scale", {}).get("saturation", {}).get("verdicts_per_s")
    probes = [ms for per_core in out.get("machine", {}).get("host_loop_ms", {}).values() for ms in per_core]
    s = {
        "saturation_verdicts_per_s": sat,
        "p99_ms_at_500": at500.get("p99_ms"),
        "etcd_verdicts_per_s": etcd,
        "bare_commits_per_s": bare,
        "ratio_vs_etcd": round(sat / etcd, 3) if sat and etcd else None,
        "ratio_vs_bare": round(sat / bare, 3) if sat and bare else None,
        "failover_s": fo.get("median_to_first_verdict_s"),
        "hook_p50_ms": out.get("hook", {}).get("p50_ms"),
        "failover_all_reattached_s": fo.get("median_to_all_reattached_s"),
        # Cost must not grow with registry size or active intents: scale saturation over small.
        "scale_ratio": round(scale_sat / sat, 3) if sat and scale_sat else None,
        "scale_verdicts_per_s": scale_sat,
        # CPU of all three servers per verdict at saturation, and etcd's over Tetherlab's (> 1:
        # Tetherlab spends less CPU on a verdict than etcd does).
        "cpu_ms_per_verdict": tl.get("saturation", {}).get("server_cpu_ms_per_verdict"),
        "etcd_cpu_ms_per_verdict": out.get("etcd", {}).get("saturation", {}).get("server_cpu_ms_per_verdict"),
        # The same for the load generators (the simulated shims or etcd clients) on this machine.
        "client_cpu_ms_per_verdict": tl.get("saturation", {}).get("client_cpu_ms_per_verdict"),
        "etcd_client_cpu_ms_per_verdict": out.get("etcd", {}).get("saturation", {}).get("client_cpu_ms_per_verdict"),
        "scale_p99_ms": out.get("scale", {}).get("offered", {}).get("p99_ms"),
        "scale_rss_mb_max": max((v for v in out.get("scale", {}).get("rss_mb", {}).values() if v), default=None),
        # The host's speed at the fastest and slowest probe (host_loop_ms): compare runs only
        # when these are alike.
        "host_loop_ms_min": min(probes, default=None),
        "host_loop_ms_max": max(probes, default=None),
    }
    tl_cpu, etcd_cpu = s["cpu_ms_per_verdict"], s["etcd_cpu_ms_per_verdict"]
    s["cpu_ratio_vs_etcd"] = round(etcd_cpu / tl_cpu, 3) if tl_cpu and etcd_cpu else None
    s["targets"] = {}
    for k, (op, v) in TARGETS.items():
        got = s.get(k)
        s["targets"][k] = {"target": f"{op} {v}", "value": got,
                           "met": None if got is None else (got >= v if op == ">=" else got <= v)}
    return s


def bench_cluster(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "loadavg_at_start": loadavg(), "python": sys.version.split()[0]},
        "workload": {"developers": args.developers, "agents_per_developer": args.agents, "workers": args.workers,
                     "concepts": args.concepts, "closed_loop_concurrency_per_developer": args.concurrency,
                     "warmup_s": args.warmup, "duration_s": args.duration,
                     "report_interval_s": args.report_interval, "unchanged_reports": args.report_unchanged},
    }
    HB_INTERVAL_S[0] = args.heartbeat_interval
    REPORT_INTERVAL_S[0] = args.report_interval
    UNCHANGED_REPORTS[0] = args.report_unchanged
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tetherlab-benchcluster-") as tmp:
        work = Path(tmp)
        skip = set(args.skip or [])
        if "tetherlab" not in skip:
            _probe_host(out, "before_tetherlab")
            tetherlab_phase(work, args, out)
        if "bare" not in skip:
            bare_phase(work, args, out)
        if "etcd" not in skip:
            _probe_host(out, "before_etcd")
            _guarded("etcd", etcd_phase, work, args, out)
        if "hook" not in skip:
            out["hook"] = hook_latency(args.hook_calls, work)
            _say(f"hook: {out['hook']}")
        if args.scale:
            _probe_host(out, "before_scale")
            _guarded("scale", scale_phase, work, args, out)
    _probe_host(out, "at_end")
    out["machine"]["loadavg_at_end"] = loadavg()
    out["elapsed_s"] = round(time.monotonic() - t0, 1)
    return {**summary(out), "details": out}


def _guarded(name: str, phase: Any, work: Path, args: argparse.Namespace, out: dict[str, Any]) -> None:
    """Runs an optional phase; a failure is reported in the result instead of losing the run."""
    try:
        phase(work, args, out)
    except Exception as e:
        _say(f"{name} phase failed: {type(e).__name__}: {e}")
        out[name] = {**out.get(name, {}), "failed": f"{type(e).__name__}: {e}"}


def add_bench_cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("bench cluster")
    g.add_argument("--workers", type=int, default=2, help="load-generator processes (default 2)")
    g.add_argument("--developers", type=int, default=8, help="simulated developers, one connection each")
    g.add_argument("--agents", type=int, default=100, help="agents per developer")
    g.add_argument("--concepts", type=int, default=2000, help="registry size of the default run")
    g.add_argument("--rates", type=lambda s: [int(x) for x in s.split(",")], default=[100, 250, 500],
                   help="offered loads, verdicts/s (default 100,250,500)")
    g.add_argument("--warmup", type=float, default=2.0, help="seconds before each measurement")
    g.add_argument("--duration", type=float, default=8.0, help="seconds measured per phase")
    g.add_argument("--concurrency", type=int, default=24, help="closed loop: commands in flight per developer")
    g.add_argument("--heartbeat-interval", type=float, default=bl.HEARTBEAT_INTERVAL_S,
                   help="seconds between one developer's heartbeats (default: tether run's 1 s)")
    g.add_argument("--report-interval", type=float, default=bl.REPORT_INTERVAL_S,
                   help="seconds between one holding agent's change reports (default: tether run's 5 s; 0: none)")
    g.add_argument("--report-unchanged", action="store_true",
                   help="agents report every interval even when their changes are the ones last acknowledged "
                        "(tether run sends only a changed report; this adds the idle scale holders' repeated "
                        "reports, the load benchmarked before the thirteenth round)")
    g.add_argument("--failover-runs", type=int, default=3)
    g.add_argument("--failover-rate", type=float, default=200.0)
    g.add_argument("--hook-calls", type=int, default=60)
    g.add_argument("--skip", action="append", choices=["tetherlab", "bare", "etcd", "hook"])
    g.add_argument("--bare-as-shipped", action="store_true",
                   help="bare pysyncobj with its own tick timing (default: with RaftNode's two latency fixes)")
    g.add_argument("--no-install", action="store_true", help="do not apt-get install etcd-server when missing")
    g.add_argument("--profile", metavar="DIR", help="py-spy the leader, a follower and a load generator")
    g.add_argument("--profile-gil", action="store_true",
                   help="with --profile: sample only the thread holding the GIL (where a node's one GIL goes, "
                        "not where its threads wait for it)")
    g.add_argument("--no-scale", dest="scale", action="store_false",
                   help="skip the scale scenario (10,000 concepts, 5,000 active intents; about 40 s)")
    g.add_argument("--scale-concepts", type=int, default=10_000)
    g.add_argument("--scale-holders", type=int, default=5_000)
    g.add_argument("--scale-agents", type=int, default=1_000)
    g.add_argument("--scale-rate", type=float, default=250.0)


def main(argv: list[str] | None = None) -> int:
    """``tetherlab bench cluster [--json] ...``."""
    p = argparse.ArgumentParser(prog="tetherlab bench cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the result object on stdout")
    p.add_argument("--compare", metavar="FILE",
                   help="an earlier run's --json output: print how this run differs from it (to stderr with --json)")
    add_bench_cluster_args(p)
    args = p.parse_args(argv)
    if args.profile_gil and not args.profile:
        p.error("--profile-gil needs --profile DIR (where the profiles go)")
    earlier: dict[str, Any] | None = None
    if args.compare:  # read it first: a bad file should fail before a three-minute run, not after
        try:
            earlier = json.loads(Path(args.compare).read_text())
        except (OSError, ValueError) as e:
            print(f"tetherlab bench cluster: --compare {args.compare}: {e}", file=sys.stderr)
            return 2
        if not isinstance(earlier, dict):
            print(f"tetherlab bench cluster: --compare {args.compare}: not a bench cluster result object",
                  file=sys.stderr)
            return 2
    result = bench_cluster(args)
    print_figures(result, args.json, 28, skip=("details",))
    if earlier is not None:
        print(compare(earlier, result), file=sys.stderr if args.json else sys.stdout)
    return 0


def compare(before: dict[str, Any], after: dict[str, Any]) -> str:
    """The top-level figures of two runs side by side, with the change; targets marked."""
    keys = [k for k in after if k not in ("details", "targets")]
    keys += [k for k in before if k not in keys and k not in ("details", "targets")]
    lines = [f"{'':>28}  {'before':>12}  {'after':>12}  change"]
    for k in keys:
        b, a = before.get(k), after.get(k)
        change = ""
        if isinstance(b, int | float) and isinstance(a, int | float) and not isinstance(b, bool):
            change = f"{a - b:+.3g}" + (f" ({100 * (a - b) / b:+.0f}%)" if b else "")
        mark = ""
        if k in TARGETS and isinstance(a, int | float):
            op, v = TARGETS[k]
            mark = "  target met" if (a >= v if op == ">=" else a <= v) else f"  target {op} {v} missed"
        lines.append(f"{k:>28}  {_fmt(b):>12}  {_fmt(a):>12}  {change}{mark}")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


