"""``tetherlab drill flood``: hostile load against a cluster, with the commit path measured beside it.

One phase at a time, a stranger (or a client with a valid key) floods the cluster from a process
of its own, while this process keeps writing through the product's own path (a shim client over
SSH submitting intents to the leader) and watches every node (its control socket: no flood
reaches it; the RSS of its process).

Phases (``--phases``, default all, in this order):

- ``raft-idle``: connections to every Raft port that never send a byte;
- ``raft-slow``: connections to every Raft port announcing a plausible frame, then one byte a
  second;
- ``raft-random``: random bytes to every Raft port at once, in bursts of random sizes over fresh
  connections, for the whole phase (the report says when ``--raft-random-mib`` MiB had gone to
  each port);
- ``ssh-half-open``: TCP connections to every SSH port that never speak SSH;
- ``ssh-auth``: SSH connections with a valid developer key to the leader, each in a session
  that pings, held open; a fresh client's time to a first answer is measured beside them;
- ``http``: slowloris connections (a header line a second, never the end of the head) and rapid
  GETs of ``/metrics`` and the ``/v1`` lists, at once, against the leader;
- ``abuse``: a valid key misusing the protocol on the leader: replies never read, an oversized
  frame, pipelined pings far past the in-flight bound, a flood of sessions and of concurrent
  intents (against the quotas), requests past the rate limit.

Each phase fails on: a node that died; no quorum-backed leader for over ``--quorum-lost-s``
(5 s); no acknowledged write for over ``--write-stall-s`` (10 s); a node's anonymous memory
(RssAnon) growing by over ``--rss-growth-mib`` (docs/hardening.md says why 32 MiB). The writer's
throughput during the phase is reported beside its throughput just before it
(``--min-throughput-ratio`` makes that a check too; timing checks do not belong in CI).

Where it runs: ``--dir DIR`` (default ``.tetherlab``): a cluster running there is attached to
(its processes are never signalled); otherwise the drill initialises one if needed, starts it,
and stops it at the end. Only loopback targets are flooded: the drill refuses a cluster whose
addresses are not on 127.0.0.0/8.

Output: progress on stderr, the report on stdout (``--json``: one JSON object). Exit status: 0
every check passed, 1 a check failed, 2 bad usage, 3 the drill could not run here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import itertools
import json
import multiprocessing
import os
import random
import resource
import signal
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from tetherlab.chaos.cluster import DRILL_REMOTE, DrillCluster, Target, developer_keys, run_setup
from tetherlab.chaos.netns import find_listener_pids
from tetherlab.cluster import protocol as p
from tetherlab.cluster.core.exitcodes import EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE
from tetherlab.cluster.ops.client import ControlClient, node_status
from tetherlab.cluster.ops.layout import init_cluster
from tetherlab.cluster.ops.localcluster import free_base_port
from tetherlab.shim.client import MasterClient, masters_from_cluster_file

PHASES = ("raft-idle", "raft-slow", "raft-random", "ssh-half-open", "ssh-auth", "http", "abuse")
DEFAULT_DIR = ".tetherlab"
LEADER_WAIT_S = 30.0
MONITOR_INTERVAL_S = 0.2
CONTROL_TIMEOUT_S = 1.0
ATTACK_GRACE_S = 20.0  # an attacker process that overruns its phase by this much is killed
SETUP_WRITER_S = 30.0
WRITER_HEARTBEAT_S = 5.0
WRITER_REQUEST_S = 10.0
ACKS_MAX = 2_000_000  # writer acknowledgements kept (a few hours at full speed)
RECONNECT_PAUSE_S = 0.02  # a flood connection the node closed is reopened after this
RANDOM_BLOCK_BYTES = 4 << 20
DEVELOPERS = ("flood-writer", "flood-abuser")


# --- command line ----------------------------------------------------------------------------------------


def add_parser(sub: Any) -> argparse.ArgumentParser:
    s: argparse.ArgumentParser = sub.add_parser(
        "flood", help="hostile load (Raft, SSH, HTTP floods, protocol abuse) with the commit path measured",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--dir", default=DEFAULT_DIR, help=f"cluster directory (default {DEFAULT_DIR}); a running "
                                                      "cluster there is attached to, else the drill starts it")
    s.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, in order (default all: "
                                                              f"{','.join(PHASES)})")
    s.add_argument("--phase-s", type=float, default=6.0, help="seconds each flood lasts (default 6)")
    s.add_argument("--baseline-s", type=float, default=3.0,
                   help="seconds of writer throughput measured before each phase (default 3)")
    s.add_argument("--settle-s", type=float, default=1.5,
                   help="seconds still watched after each flood ends (default 1.5)")
    s.add_argument("--quorum-lost-s", type=float, default=5.0, help="fail a phase without a quorum-backed "
                                                                    "leader for longer (default 5)")
    s.add_argument("--write-stall-s", type=float, default=10.0, help="fail a phase without an acknowledged "
                                                                     "write for longer (default 10)")
    s.add_argument("--rss-growth-mib", type=float, default=32.0, help="fail a phase in which a node's anonymous "
                                                                      "memory grew by more (default 32)")
    s.add_argument("--min-throughput-ratio", type=float, help="also fail a phase whose writer throughput "
                                                              "fell below this fraction of its baseline")
    g = s.add_argument_group("flood sizes")
    g.add_argument("--raft-idle", type=int, default=500, help="idle connections per Raft port (default 500)")
    g.add_argument("--raft-slow", type=int, default=50, help="slow connections per Raft port (default 50)")
    g.add_argument("--raft-random-mib", type=int, default=64,
                   help="MiB of random bytes every Raft port must get at least (default 64)")
    g.add_argument("--raft-burst-mib", type=int, default=4,
                   help="largest burst of random bytes over one connection, MiB (default 4)")
    g.add_argument("--ssh-half-open", type=int, default=300, help="half-open connections per SSH port (default 300)")
    g.add_argument("--ssh-auth", type=int, default=60, help="authenticated SSH connections (default 60)")
    g.add_argument("--http-slowloris", type=int, default=200, help="slowloris connections (default 200)")
    g.add_argument("--http-gets", type=int, default=2000,
                   help="GETs at least, sent as fast as they are answered, for the phase or longer (default 2000)")
    g.add_argument("--http-parallel", type=int, default=32, help="connections the GETs use (default 32)")
    g.add_argument("--abuse-sessions", type=int, default=1500,
                   help="sessions the abuser tries to open (default 1500)")
    s.add_argument("--json", action="store_true", help="print the report as one JSON object")
    s.add_argument("--quiet", action="store_true", help="no live progress on stderr")
    s.set_defaults(func=run, drill="flood")
    return s


class UsageError(ValueError):
    """Returned for flags that name no phase or a bad value."""


def _phases(text: str) -> list[str]:
    out = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in out if x not in PHASES]
    if bad or not out:
        raise UsageError(f"--phases: unknown phase(s) {bad}; phases: {', '.join(PHASES)}")
    return out


# --- progress ----------------------------------------------------------------------------------------------


class Progress:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[flood {time.monotonic() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# --- the writer: the commit path, measured ----------------------------------------------------------------


class Writer(threading.Thread):
    """Submits intents in a closed loop through the shim client (SSH, the leader), one at a
    time; each acknowledged verdict is one committed write. Runs on its own event loop."""

    def __init__(self, cluster_file: Path, key: Path, developer: str, log: Progress) -> None:
        super().__init__(name="flood-writer", daemon=True)
        self.cluster_file, self.key, self.developer, self.log = cluster_file, key, developer, log
        self.acks: list[float] = []
        self.errors: Counter[str] = Counter()
        self.ready = threading.Event()
        self.failed: str | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # reported by the drill
            self.failed = f"{type(e).__name__}: {e}"
            self.ready.set()

    async def _main(self) -> None:
        client = MasterClient(masters_from_cluster_file(self.cluster_file), self.key, self.developer,
                              client_name="tetherlab-flood-writer")
        agent = f"{self.developer}/{uuid.uuid4()}"
        try:
            await client.call(p.OpenSession, SETUP_WRITER_S, agent_id=agent, tool="flood", machine="flood-host",
                              repo_remote=DRILL_REMOTE, base_commit="abcdef1")
            self.ready.set()
            intent = p.Intent(summary="flood writer probe", steps=("write one entry",))
            last_hb = time.monotonic()
            while not self._halt.is_set():
                try:
                    if time.monotonic() - last_hb >= WRITER_HEARTBEAT_S:
                        await client.heartbeat([agent], WRITER_REQUEST_S)
                        last_hb = time.monotonic()
                    await client.call(p.SubmitIntent, WRITER_REQUEST_S, idempotent=False, agent_id=agent,
                                      tool="flood", intent=intent, trigger="initial")
                    if len(self.acks) < ACKS_MAX:
                        self.acks.append(time.monotonic())
                except Exception as e:
                    self.errors[getattr(e, "code", type(e).__name__)] += 1
                    await asyncio.sleep(0.05)
                    if getattr(e, "code", "") == "session_lapsed":
                        await client.call(p.OpenSession, WRITER_REQUEST_S, agent_id=agent, tool="flood",
                                          machine="flood-host", repo_remote=DRILL_REMOTE, base_commit="abcdef1")
        finally:
            await client.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(WRITER_REQUEST_S + 5)

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        return write_window(list(self.acks), t0, t1)


def write_window(acks: list[float], t0: float, t1: float) -> dict[str, Any]:
    """Acknowledged writes in [t0, t1]: how many, how fast, and the longest time without one
    (the window's edges count: a writer silent from the start has stalled since the start)."""
    inside = [t for t in acks if t0 <= t <= t1]
    edges = [t0, *inside, t1]
    gap = max(b - a for a, b in itertools.pairwise(edges))
    span = max(1e-9, t1 - t0)
    return {"ops": len(inside), "ops_per_s": round(len(inside) / span, 1), "max_gap_s": round(gap, 2)}


# --- the monitor: leaders, quorum, memory ---------------------------------------------------------------


@dataclass
class Sample:
    at: float
    quorum_leader: str | None
    rss_kib: dict[str, int]
    alive: dict[str, bool]
    raft_unauthenticated: dict[str, int] = field(default_factory=dict)
    rss_total_kib: dict[str, int] = field(default_factory=dict)


class Monitor(threading.Thread):
    """Every node's status over its control socket (HTTP may be the thing flooded), and its
    process's RssAnon, every :data:`MONITOR_INTERVAL_S`."""

    def __init__(self, target: Target, pids: dict[str, int]) -> None:
        super().__init__(name="flood-monitor", daemon=True)
        self.target, self.pids = target, pids
        self.samples: list[Sample] = []
        self._halt = threading.Event()
        self._clients: dict[str, ControlClient] = {}
        self._lock = threading.Lock()

    def _status(self, nid: str) -> dict[str, Any] | None:
        path = self.target.control.get(nid)
        if path is None:
            return node_status(self.target.cluster.by_id()[nid], CONTROL_TIMEOUT_S)
        try:
            c = self._clients.get(nid)
            if c is None:
                c = self._clients[nid] = ControlClient(path, CONTROL_TIMEOUT_S)
            reply = c.call("status")
            return reply.get("result") if reply.get("ok") else None
        except (OSError, ValueError):
            self._clients.pop(nid, None)
            return None

    def sample(self) -> Sample:
        leader = None
        unauth: dict[str, int] = {}
        for nid in self.target.ids:
            st = self._status(nid)
            if st and st.get("role") == "leader" and st.get("quorum_backed"):
                leader = nid
            if st and isinstance(st.get("transport"), dict):
                unauth[nid] = int(st["transport"].get("unauthenticated_connections", 0))
        mem = {nid: proc_memory_kib(pid) for nid, pid in self.pids.items()}
        return Sample(time.monotonic(), leader, {k: v[0] for k, v in mem.items() if v is not None},
                      {nid: v is not None for nid, v in mem.items()}, unauth,
                      {k: v[1] for k, v in mem.items() if v is not None})

    def run(self) -> None:
        while not self._halt.is_set():
            s = self.sample()
            with self._lock:
                self.samples.append(s)
                if len(self.samples) > 100_000:
                    del self.samples[:50_000]
            self._halt.wait(MONITOR_INTERVAL_S)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        for c in self._clients.values():
            c.close()

    def between(self, t0: float, t1: float) -> list[Sample]:
        with self._lock:
            return [s for s in self.samples if t0 <= s.at <= t1]


def proc_memory_kib(pid: int) -> tuple[int, int] | None:
    """The process's (RssAnon, VmRSS) in KiB, or None if it is gone. RssAnon is its heap;
    VmRSS adds the LMDB file pages it touched, which writes grow whatever the flood."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":" in line)
        return int(fields["RssAnon"].split()[0]), int(fields["VmRSS"].split()[0])
    except (OSError, ValueError, IndexError, KeyError):
        return None


def quorum_lost_max_s(samples: list[Sample], t0: float, t1: float) -> float:
    """The longest stretch within [t0, t1] in which no node was a quorum-backed leader."""
    longest, since = 0.0, None
    for s in samples:
        if s.quorum_leader is None:
            since = s.at if since is None else since
        elif since is not None:
            longest, since = max(longest, s.at - since), None
    if since is not None:
        longest = max(longest, t1 - since)
    return longest


def leader_changes(samples: list[Sample]) -> int:
    seen = [s.quorum_leader for s in samples if s.quorum_leader is not None]
    return sum(1 for a, b in itertools.pairwise(seen) if a != b)


# --- the attacks (in a process of their own) --------------------------------------------------------------


@dataclass
class Spec:
    """What an attacker process needs: picklable."""

    phase: str
    duration_s: float
    raft: list[tuple[str, int]]
    ssh: list[tuple[str, int]]
    leader_ssh: tuple[str, int]
    leader_http: tuple[str, int]
    key: str
    developer: str
    sizes: dict[str, int] = field(default_factory=dict)


def _attack_main(spec: Spec, conn: Any) -> None:
    """The attacker process: say it is ready (its start-up must not count against the phase),
    wait for the word, run one phase, send back its counts."""
    with contextlib.suppress(ValueError, OSError):
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    conn.send("ready")
    if not conn.poll(LEADER_WAIT_S + 60) or conn.recv() != "go":
        return
    try:
        result = asyncio.run(ATTACKS[spec.phase](spec))
    except BaseException as e:
        result = {"error": f"{type(e).__name__}: {e}"}
    conn.send(result)
    conn.close()


class Held:
    """Connections kept open against a port: reopened when the node closes them."""

    def __init__(self) -> None:
        self.opened = 0
        self.closed_by_node = 0
        self.refused = 0
        self.open_now = 0
        self.max_open = 0
        self.lifetimes_s: list[float] = []

    def to_json(self) -> dict[str, Any]:
        life = sorted(self.lifetimes_s)
        return {"opened": self.opened, "closed_by_node": self.closed_by_node, "connect_failures": self.refused,
                "max_open_at_once": self.max_open,
                "lifetime_s_median": round(life[len(life) // 2], 2) if life else None,
                "lifetime_s_max": round(life[-1], 2) if life else None}


async def _hold(addr: tuple[str, int], until: float, held: Held, first: bytes = b"",
                drip: bytes = b"", drip_every_s: float = 1.0) -> None:
    """One connection slot against ``addr`` until ``until``: connect, send ``first``, then
    ``drip`` every ``drip_every_s``; reconnect whenever the node closes it."""
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(*addr), 5.0)
        except (OSError, TimeoutError):
            held.refused += 1
            await asyncio.sleep(0.2)
            continue
        held.opened += 1
        held.open_now += 1
        held.max_open = max(held.max_open, held.open_now)
        t0 = time.monotonic()
        try:
            if first:
                writer.write(first)
            while time.monotonic() < until:
                left = until - time.monotonic()
                wait = min(left, drip_every_s) if drip else left
                try:
                    data = await asyncio.wait_for(reader.read(65536), max(0.01, wait))
                except TimeoutError:
                    if drip:
                        writer.write(drip)
                        await writer.drain()
                    continue
                if not data:
                    held.closed_by_node += 1
                    held.lifetimes_s.append(time.monotonic() - t0)
                    break
        except (OSError, ConnectionError):
            held.closed_by_node += 1
            held.lifetimes_s.append(time.monotonic() - t0)
        finally:
            held.open_now -= 1
            writer.close()
        await asyncio.sleep(RECONNECT_PAUSE_S)


async def _hold_many(addrs: list[tuple[str, int]], per_addr: int, until: float, first: bytes = b"",
                     drip: bytes = b"", drip_every_s: float = 1.0) -> dict[str, Any]:
    helds = {f"{h}:{p_}": Held() for h, p_ in addrs}
    tasks = [asyncio.create_task(_hold((h, p_), until, held, first, drip, drip_every_s))
             for _ in range(per_addr) for (h, p_), held in zip(addrs, helds.values(), strict=True)]
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"per_target": {k: v.to_json() for k, v in helds.items()}}


async def attack_raft_idle(spec: Spec) -> dict[str, Any]:
    until = time.monotonic() + spec.duration_s
    return await _hold_many(spec.raft, spec.sizes["raft_idle"], until)


async def attack_raft_slow(spec: Spec) -> dict[str, Any]:
    # Plausible frames announced and then trickled a byte a second: pysyncobj would hold them
    # forever. Half announce 1 MiB (over the bound for a connection that has not authenticated),
    # half 1000 bytes (under it: only the handshake deadline ends them).
    until = time.monotonic() + spec.duration_s
    half = max(1, spec.sizes["raft_slow"] // 2)
    big, small = await asyncio.gather(*(
        _hold_many(spec.raft, half, until, first=n.to_bytes(4, "little", signed=True), drip=b"\x00",
                   drip_every_s=1.0) for n in (1 << 20, 1000)))
    return {"announcing_1_mib": big["per_target"], "announcing_1000_bytes": small["per_target"]}


def _random_port(addr: tuple[str, int], budget: int, until: float, block: bytes, seed: int,
                 burst_max: int) -> dict[str, Any]:
    """Bursts of random bytes of random sizes over fresh connections, until ``until``; half
    of them start with a plausible small frame length (so the node reads a frame and fails to
    authenticate it) instead of four random bytes."""
    rng = random.Random(seed)
    view = memoryview(block)
    sent = conns = resets = 0
    budget_at: float | None = None
    t0 = time.monotonic()
    while time.monotonic() < until:
        burst = rng.randint(min(4 << 10, burst_max), burst_max)
        try:
            s = socket.create_connection(addr, timeout=2.0)
        except OSError:
            time.sleep(0.05)
            continue
        conns += 1
        done = 0
        try:
            s.settimeout(2.0)
            if rng.random() < 0.5:
                done += s.send(rng.randint(16, 4000).to_bytes(4, "little", signed=True))
            while done < burst and time.monotonic() < until:
                off = rng.randrange(0, len(block) - 65536)
                done += s.send(view[off:off + min(65536, burst - done)])
        except OSError:
            resets += 1
        finally:
            s.close()
            sent += done
        if budget_at is None and sent >= budget:
            budget_at = time.monotonic() - t0
    return {"bytes_sent": sent, "connections": conns, "closed_by_node": resets,
            "first_budget_sent_s": round(budget_at, 2) if budget_at is not None else None}


async def attack_raft_random(spec: Spec) -> dict[str, Any]:
    until = time.monotonic() + spec.duration_s
    budget = spec.sizes["raft_random_mib"] << 20
    block = os.urandom(RANDOM_BLOCK_BYTES)
    loop = asyncio.get_running_loop()
    burst_max = max(1, spec.sizes["raft_burst_mib"]) << 20
    results = await asyncio.gather(*(loop.run_in_executor(None, _random_port, a, budget, until, block, i, burst_max)
                                     for i, a in enumerate(spec.raft)))
    return {"per_target": {f"{h}:{p_}": r for (h, p_), r in zip(spec.raft, results, strict=True)},
            "budget_mib": spec.sizes["raft_random_mib"],
            "budget_sent_to_every_port": all(r["first_budget_sent_s"] is not None for r in results)}


async def attack_ssh_half_open(spec: Spec) -> dict[str, Any]:
    until = time.monotonic() + spec.duration_s
    return await _hold_many(spec.ssh, spec.sizes["ssh_half_open"], until)


async def _ssh_connect(spec: Spec, addr: tuple[str, int]) -> Any:
    return await asyncio.wait_for(asyncssh.connect(
        addr[0], addr[1], username=spec.developer, client_keys=[spec.key], known_hosts=None, agent_path=None,
        password=None, kbdint_auth=False, gss_auth=False), 15.0)


class RawChannel:
    """A ``tetherlab`` subsystem session spoken in raw JSON lines, for abuse a real client refuses."""

    def __init__(self, proc: Any) -> None:
        self.proc = proc
        self.replies: Counter[str] = Counter()
        self.messages: dict[str, str] = {}  # one message per error code seen
        self.waiters: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, conn: Any, **kw: Any) -> RawChannel:
        proc = await conn.create_process(subsystem="tetherlab", encoding=None, **kw)
        ch = cls(proc)
        await ch.request({"type": "hello", "versions": [1], "client_name": "flood", "client_version": "1"}, 0)
        return ch

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            while line := await self.proc.stdout.readline():
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                kind = msg.get("type", "?")
                if kind == "error":
                    kind = f"error:{msg.get('code')}"
                    self.messages.setdefault(str(msg.get("code")), str(msg.get("message", "")))
                elif kind == "unavailable":
                    kind = f"unavailable:{msg.get('reason')}"
                self.replies[kind] += 1
                fut = self.waiters.pop(msg.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)

    def send(self, obj: dict[str, Any]) -> None:
        self.proc.stdin.write(json.dumps(obj).encode() + b"\n")

    async def request(self, obj: dict[str, Any], rid: Any, timeout_s: float = 15.0) -> dict[str, Any]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiters[rid] = fut
        self.send({**obj, "id": rid})
        return await asyncio.wait_for(fut, timeout_s)

    def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(Exception):
            self.proc.close()


async def attack_ssh_auth(spec: Spec) -> dict[str, Any]:
    until = time.monotonic() + spec.duration_s
    conns: list[Any] = []
    chans: list[RawChannel] = []
    failures: Counter[str] = Counter()

    async def one() -> None:
        try:
            c = await _ssh_connect(spec, spec.leader_ssh)
            conns.append(c)
            chans.append(await RawChannel.open(c))
        except Exception as e:
            failures[type(e).__name__] += 1

    await asyncio.gather(*(one() for _ in range(spec.sizes["ssh_auth"])))
    fresh: list[float] = []
    rid = 1
    while time.monotonic() < until:
        for ch in chans:
            rid += 1
            ch.send({"type": "ping", "id": rid})
        t0 = time.monotonic()  # a new client's first answer while the others hold on
        try:
            c = await _ssh_connect(spec, spec.leader_ssh)
            ch = await RawChannel.open(c)
            await ch.request({"type": "ping"}, 1)
            fresh.append(time.monotonic() - t0)
            ch.close()
            c.close()
        except Exception as e:
            failures[f"fresh:{type(e).__name__}"] += 1
        await asyncio.sleep(max(0.0, min(1.0, until - time.monotonic())))
    replies: Counter[str] = Counter()
    for ch in chans:
        replies.update(ch.replies)
        ch.close()
    for c in conns:
        c.close()
    fresh.sort()
    return {"connected": len(chans), "failures": dict(failures), "replies": dict(replies),
            "fresh_client_first_answer_s": {"median": round(fresh[len(fresh) // 2], 3) if fresh else None,
                                            "max": round(fresh[-1], 3) if fresh else None, "n": len(fresh)}}


async def _http_get_loop(addr: tuple[str, int], paths: list[str], until: float, want: int,
                         counts: Counter[str]) -> None:
    """Keep-alive GETs back to back on one connection (reconnecting when closed)."""
    i = 0
    while time.monotonic() < until or counts["answered"] < want:
        if time.monotonic() > until + 30:
            return
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(*addr), 5.0)
        except (OSError, TimeoutError):
            counts["connect_failures"] += 1
            await asyncio.sleep(0.05)
            continue
        try:
            while time.monotonic() < until or counts["answered"] < want:
                path = paths[i % len(paths)]
                i += 1
                writer.write(f"GET {path} HTTP/1.1\r\nHost: flood\r\n\r\n".encode())
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
                status = head.split(b" ", 2)[1].decode()
                length = 0
                close = False
                for line in head.split(b"\r\n"):
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v.strip())
                    elif k.strip().lower() == b"connection" and v.strip().lower() == b"close":
                        close = True
                await reader.readexactly(length)
                counts[status] += 1
                counts["answered"] += 1
                if close:
                    break
        except (OSError, ConnectionError, TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
            counts["broken"] += 1
        finally:
            writer.close()


async def attack_http(spec: Spec) -> dict[str, Any]:
    until = time.monotonic() + spec.duration_s
    addr = spec.leader_http
    slow = asyncio.create_task(_hold_many([addr], spec.sizes["http_slowloris"], until,  # 0: none
                                          first=b"GET /v1/status HTTP/1.1\r\nHost: flood\r\n",
                                          drip=b"X-Slow: 1\r\n", drip_every_s=1.0))
    await asyncio.sleep(0.5)  # the slowloris connections first, so the GETs meet them
    counts: Counter[str] = Counter()
    paths = ["/metrics", "/v1/intents", "/v1/agents?status=open", "/v1/concepts", "/v1/intents?status=active",
             "/v1/status"]
    t0 = time.monotonic()
    await asyncio.gather(*(_http_get_loop(addr, paths[i:] + paths[:i], until, spec.sizes["http_gets"], counts)
                           for i in range(spec.sizes["http_parallel"])))  # 0: none
    await asyncio.sleep(max(0.0, until - time.monotonic()))
    took = time.monotonic() - t0
    slow_res = await slow
    return {"gets": dict(counts), "gets_per_s": round(counts["answered"] / max(took, 1e-9), 1),
            "slowloris": slow_res["per_target"][f"{addr[0]}:{addr[1]}"]}


async def attack_abuse(spec: Spec) -> dict[str, Any]:
    until = time.monotonic() + spec.duration_s
    out: dict[str, Any] = {}
    conn = await _ssh_connect(spec, spec.leader_ssh)
    conns = [conn]
    chans: list[RawChannel] = []
    try:
        # 1. Replies never read: tiny bad lines whose answers are 60 times larger.
        unread = await conn.create_process(subsystem="tetherlab", encoding=None, window=64 * 1024)
        unread.stdin.write(b"x\n" * 200_000)
        # 2. An oversized frame, then a ping on the same channel.
        big = await RawChannel.open(conn)
        chans.append(big)
        big.send({"type": "ping", "id": "pad", "x": "y" * (300 * 1024)})
        pong = await big.request({"type": "ping"}, "after-big")
        out["oversized_frame"] = {"replies": dict(big.replies), "then_ping": pong.get("type")}
        # 3. Pings pipelined far past the in-flight bound.
        pipe = await RawChannel.open(conn)
        chans.append(pipe)
        for i in range(5000):
            pipe.send({"type": "ping", "id": i + 10})
        await pipe.request({"type": "ping"}, "last")
        out["pipelined_pings"] = dict(pipe.replies)
        # 4. Sessions until the quota refuses them (over four connections).
        extra = [await _ssh_connect(spec, spec.leader_ssh) for _ in range(3)]
        conns += extra
        sess = [await RawChannel.open(c) for c in conns]
        chans += sess
        agents: list[str] = []
        n = spec.sizes["abuse_sessions"]
        per = max(1, n // len(sess))

        async def open_many(ch: RawChannel, k: int) -> None:
            sem = asyncio.Semaphore(48)  # under the protocol's in-flight bound

            async def one(j: int) -> None:
                async with sem:
                    agent = f"{spec.developer}/{uuid.uuid4()}"
                    try:
                        r = await ch.request({"type": "open_session", "agent_id": agent, "tool": "flood",
                                              "machine": "flood", "repo_remote": DRILL_REMOTE,
                                              "base_commit": "abcdef1"}, f"s{k}-{j}", 30.0)
                    except TimeoutError:
                        return
                    if r.get("type") == "result":
                        agents.append(agent)

            await asyncio.gather(*(one(j) for j in range(per)))

        t0 = time.monotonic()
        await asyncio.gather(*(open_many(ch, k) for k, ch in enumerate(sess)))
        replies: Counter[str] = Counter()
        for ch in sess:
            replies.update(ch.replies)
        out["sessions"] = {"attempted": per * len(sess), "opened": len(agents), "replies": dict(replies),
                           "seconds": round(time.monotonic() - t0, 1)}
        # 5. Intents submitted all at once for every session (the in-flight quota).
        before: Counter[str] = Counter()
        for ch in sess:
            before.update(ch.replies)
        intent = {"summary": "flood abuse", "steps": ["x"]}

        async def submit(ch: RawChannel, agent: str, j: int) -> None:
            with contextlib.suppress(TimeoutError):
                await ch.request({"type": "submit_intent", "agent_id": agent, "tool": "flood", "intent": intent,
                                  "trigger": "initial"}, f"i{j}", 30.0)

        batch = agents[: 48 * len(sess)]
        await asyncio.gather(*(submit(sess[j % len(sess)], a, j) for j, a in enumerate(batch)))
        after: Counter[str] = Counter()
        for ch in sess:
            after.update(ch.replies)
        out["concurrent_intents"] = {"sent": len(batch), "replies": dict(after - before)}
        # 6. Requests past the rate limit, within the in-flight bound, until the phase ends.
        rate = sess[0]
        before = Counter(rate.replies)
        sent = 0
        while time.monotonic() < until:
            ids = [f"r{sent + i}" for i in range(48)]
            await asyncio.gather(*(rate.request({"type": "ping"}, rid) for rid in ids), return_exceptions=True)
            sent += len(ids)
        out["rate"] = {"sent": sent, "replies": dict(Counter(rate.replies) - before)}
        messages: dict[str, str] = {}
        for ch in chans:
            messages.update(ch.messages)
        out["refusal_messages"] = {k: v for k, v in messages.items() if k in ("quota_exceeded", "rate_limited")}
    finally:
        for ch in chans:
            ch.close()
        for c in conns:
            c.close()
    return out


ATTACKS = {
    "raft-idle": attack_raft_idle,
    "raft-slow": attack_raft_slow,
    "raft-random": attack_raft_random,
    "ssh-half-open": attack_ssh_half_open,
    "ssh-auth": attack_ssh_auth,
    "http": attack_http,
    "abuse": attack_abuse,
}


class Attacker:
    """The attack of one phase in a process of its own (so its CPU and GIL are not the
    writer's), started ahead of the phase and told when to go."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_attack_main, args=(spec, child), name=f"flood-{spec.phase}", daemon=True)
        self.proc.start()
        child.close()

    def wait_ready(self, timeout_s: float) -> bool:
        with contextlib.suppress(EOFError, OSError):
            return bool(self.conn.poll(timeout_s)) and self.conn.recv() == "ready"
        return False

    def go_and_wait(self) -> dict[str, Any]:
        spec = self.spec
        deadline = time.monotonic() + spec.duration_s + ATTACK_GRACE_S + (30 if spec.phase == "http" else 0)
        result: dict[str, Any] = {"error": "the attacker sent no result"}
        try:
            self.conn.send("go")
            while time.monotonic() < deadline:
                if self.conn.poll(0.2):
                    result = self.conn.recv()
                    break
                if not self.proc.is_alive():
                    break
            else:
                result = {"error": f"the attacker overran its phase by {ATTACK_GRACE_S:.0f} s and was stopped"}
        except (EOFError, OSError) as e:
            result = {"error": f"the attacker went away: {e}"}
        self.close()
        return result

    def close(self) -> None:
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()  # our own child, by its handle
            self.proc.join(5)
        self.conn.close()


# --- the drill ------------------------------------------------------------------------------------------


@dataclass
class Env:
    target: Target
    pids: dict[str, int]
    mode: str
    owned: DrillCluster | None = None


def _loopback_only(target: Target) -> None:
    for n in target.cluster.nodes:
        for a in (n.raft, n.ssh, n.http):
            try:
                ip = ipaddress.ip_address(socket.gethostbyname(a.host))
            except (OSError, ValueError):
                raise RuntimeError(f"cannot resolve {a.host} of node {n.id}") from None
            if not ip.is_loopback:
                raise RuntimeError(f"node {n.id} listens on {a} (not loopback): the flood drill only floods "
                                   "nodes on 127.0.0.0/8 of this host")


def environment(args: argparse.Namespace, log: Progress) -> Env:
    cdir = Path(args.dir).resolve()
    if not (cdir / "cluster.toml").exists():
        log(f"no cluster in {cdir}: initialising one")
        init_cluster(cdir, 3, "127.0.0.1", free_base_port(3), remote=DRILL_REMOTE)
    target = Target.attach(cdir)
    _loopback_only(target)
    running = target.running_nodes()
    if running:
        if len(running) < len(target.ids):
            raise RuntimeError(f"only {', '.join(running)} of {', '.join(target.ids)} answer in {cdir}")
        raft = {n.id: (socket.gethostbyname(n.raft.host), n.raft.port) for n in target.cluster.nodes}
        pids = find_listener_pids(raft)
        log(f"attaching to the cluster running in {cdir} (never signalled); processes {pids}")
        return Env(target, pids, "attached")
    log(f"starting the cluster in {cdir}")
    owned = DrillCluster(cdir)
    target = Target.attach(cdir, owned)
    owned.start()
    for nid in target.ids:
        owned.wait_serving(nid, 30.0)
    return Env(target, owned.pids(), "started", owned)


def _check(passed: bool, detail: str) -> dict[str, Any]:
    return {"passed": passed, "detail": detail}


@dataclass(frozen=True)
class Bounds:
    quorum_lost_s: float
    write_stall_s: float
    rss_growth_mib: float
    min_throughput_ratio: float | None = None
    raft_random_mib: int = 64


def judge(name: str, samples: list[Sample], t0: float, t1: float, rss0: dict[str, int], base: dict[str, Any],
          during: dict[str, Any], whole: dict[str, Any], attack: dict[str, Any],
          bounds: Bounds) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """One phase's checks and figures from what was watched (pure: the drill's verdict)."""
    lost = quorum_lost_max_s(samples, t0, t1)
    dead = sorted({nid for s in samples for nid, ok in s.alive.items() if not ok})
    growth = {nid: round((max((s.rss_kib.get(nid, 0) for s in samples), default=0) - kib) / 1024, 1)
              for nid, kib in rss0.items()}
    ratio = round(during["ops_per_s"] / base["ops_per_s"], 2) if base["ops_per_s"] else None
    checks = {
        "nodes_alive": _check(not dead, f"died: {', '.join(dead)}" if dead else "every node stayed up"),
        "quorum": _check(lost <= bounds.quorum_lost_s, f"longest stretch without a quorum-backed leader "
                                                       f"{lost:.1f} s (bound {bounds.quorum_lost_s:g} s)"),
        "writes": _check(whole["max_gap_s"] <= bounds.write_stall_s,
                         f"longest gap between acknowledged writes {whole['max_gap_s']:.1f} s "
                         f"(bound {bounds.write_stall_s:g} s)"),
        "memory": _check(all(g <= bounds.rss_growth_mib for g in growth.values()),
                         f"RssAnon growth MiB {growth} (bound {bounds.rss_growth_mib:g})"),
    }
    if not rss0:
        checks["memory"] = _check(True, "not measured: the nodes' processes are not visible here")
    if "error" in attack:
        checks["attack_ran"] = _check(False, str(attack["error"]))
    if bounds.min_throughput_ratio is not None:
        checks["throughput"] = _check(ratio is not None and ratio >= bounds.min_throughput_ratio,
                                      f"{ratio} of the baseline (bound {bounds.min_throughput_ratio})")
    if name == "raft-random" and "error" not in attack:
        checks["flood_volume"] = _check(bool(attack.get("budget_sent_to_every_port")),
                                        f"{bounds.raft_random_mib} MiB sent to every Raft port: "
                                        f"{attack.get('budget_sent_to_every_port')}")
    if name == "abuse" and "error" not in attack:
        msgs = attack.get("refusal_messages", {})
        named = all("[limits]." in m for m in msgs.values())
        checks["refusals_name_the_limit"] = _check(named, f"refusal messages: {msgs}" if msgs else
                                                   "no quota or rate refusal was needed")
    return checks, {"quorum_lost_max_s": lost, "rss_growth_mib": growth, "throughput_ratio": ratio}


class Flood:
    def __init__(self, args: argparse.Namespace, env: Env, log: Progress) -> None:
        self.args, self.env, self.log = args, env, log
        self.target = env.target

    def _spec(self, phase: str, leader: str, keys: dict[str, Path]) -> Spec:
        a = self.args
        by_id = self.target.cluster.by_id()
        hosts = {n.id: n for n in self.target.cluster.nodes}
        return Spec(
            phase=phase, duration_s=a.phase_s,
            raft=[(socket.gethostbyname(n.raft.host), n.raft.port) for n in hosts.values()],
            ssh=[(socket.gethostbyname(n.ssh.host), n.ssh.port) for n in hosts.values()],
            leader_ssh=(socket.gethostbyname(by_id[leader].ssh.host), by_id[leader].ssh.port),
            leader_http=(socket.gethostbyname(by_id[leader].http.host), by_id[leader].http.port),
            key=str(keys["flood-abuser"]), developer="flood-abuser",
            sizes={"raft_idle": a.raft_idle, "raft_slow": a.raft_slow, "raft_random_mib": a.raft_random_mib,
                   "raft_burst_mib": a.raft_burst_mib,
                   "ssh_half_open": a.ssh_half_open, "ssh_auth": a.ssh_auth, "http_slowloris": a.http_slowloris,
                   "http_gets": a.http_gets, "http_parallel": a.http_parallel, "abuse_sessions": a.abuse_sessions})

    def phase(self, name: str, writer: Writer, monitor: Monitor, keys: dict[str, Path]) -> dict[str, Any]:
        a, log = self.args, self.log
        leader = self.target.wait_leader(LEADER_WAIT_S)
        if leader is None:
            return {"name": name, "passed": False,
                    "checks": {"leader_before": _check(False, f"no quorum-backed leader within {LEADER_WAIT_S} s")}}
        attacker = Attacker(self._spec(name, leader, keys))
        if not attacker.wait_ready(60.0):
            attacker.close()
            return {"name": name, "passed": False,
                    "checks": {"attack_ran": _check(False, "the attacker process did not start")}}
        t_base = time.monotonic()
        time.sleep(a.baseline_s)
        t0 = time.monotonic()
        base = writer.window(t_base, t0)
        s0 = monitor.sample()
        rss0, total0 = s0.rss_kib, s0.rss_total_kib
        log(f"{name}: flooding (leader {leader}; writer {base['ops_per_s']} ops/s before)")
        attack = attacker.go_and_wait()
        t_flood_end = time.monotonic()
        time.sleep(a.settle_s)
        t1 = time.monotonic()
        samples = monitor.between(t0, t1)
        during = writer.window(t0, t_flood_end)
        whole = writer.window(t0, t1)
        bounds = Bounds(a.quorum_lost_s, a.write_stall_s, a.rss_growth_mib, a.min_throughput_ratio,
                        a.raft_random_mib)
        checks, fig = judge(name, samples, t0, t1, rss0, base, during, whole, attack, bounds)
        lost, growth, ratio = fig["quorum_lost_max_s"], fig["rss_growth_mib"], fig["throughput_ratio"]
        total_growth = {nid: round((max((s.rss_total_kib.get(nid, 0) for s in samples), default=0)
                                    - total0.get(nid, 0)) / 1024, 1) for nid in total0}
        unauth_max = {nid: max((s.raft_unauthenticated.get(nid, 0) for s in samples), default=0)
                      for nid in self.target.ids}
        passed = all(c["passed"] for c in checks.values())
        log(f"{name}: {'ok' if passed else 'FAILED'}; writer {during['ops_per_s']} ops/s (x{ratio}), longest gap "
            f"{whole['max_gap_s']} s, no-quorum {lost:.1f} s, RssAnon +{growth} MiB")
        return {"name": name, "leader_before": leader, "duration_s": round(t_flood_end - t0, 1),
                "attack": attack,
                "writer": {"baseline_ops_per_s": base["ops_per_s"], "ops_per_s": during["ops_per_s"],
                           "throughput_ratio": ratio, "max_gap_s": whole["max_gap_s"]},
                "quorum_lost_max_s": round(lost, 2), "leader_changes": leader_changes(samples),
                "rss_growth_mib": growth, "vmrss_growth_mib": total_growth,
                "raft_unauthenticated_max": unauth_max, "checks": checks, "passed": passed}

    def run(self, phases: list[str]) -> dict[str, Any]:
        t_start = time.monotonic()
        target, log = self.target, self.log
        leader = target.wait_leader(LEADER_WAIT_S)
        if leader is None:
            raise RuntimeError(f"no quorum-backed leader within {LEADER_WAIT_S:.0f} s")
        keys = developer_keys(target.dir, list(DEVELOPERS))
        run_setup(target, keys, log)
        monitor = Monitor(target, self.env.pids)
        monitor.start()
        assert target.cluster.path is not None
        writer = Writer(target.cluster.path, keys["flood-writer"], "flood-writer", log)
        writer.start()
        if not writer.ready.wait(SETUP_WRITER_S + 5) or writer.failed:
            monitor.stop()
            raise RuntimeError(f"the writer could not open its session: {writer.failed or 'timeout'}")
        results = []
        try:
            for name in phases:
                results.append(self.phase(name, writer, monitor, keys))
        finally:
            writer.stop()
            monitor.stop()
        a = self.args
        return {
            "command": "flood", "mode": self.env.mode, "phases": results,
            "bounds": {"quorum_lost_s": a.quorum_lost_s, "write_stall_s": a.write_stall_s,
                       "rss_growth_mib": a.rss_growth_mib, "min_throughput_ratio": a.min_throughput_ratio},
            "writer_errors": dict(writer.errors),
            "passed": all(r["passed"] for r in results),
            "duration_s": round(time.monotonic() - t_start, 1),
        }


def render(report: dict[str, Any]) -> str:
    lines = [f"drill flood (mode {report['mode']}): {'PASSED' if report['passed'] else 'FAILED'} "
             f"in {report['duration_s']} s"]
    for ph in report["phases"]:
        w = ph.get("writer", {})
        lines.append(f"  {ph['name']:<14} {'ok  ' if ph['passed'] else 'FAIL'} writer {w.get('ops_per_s')} ops/s "
                     f"(baseline {w.get('baseline_ops_per_s')}, x{w.get('throughput_ratio')}), longest gap "
                     f"{w.get('max_gap_s')} s, no-quorum {ph.get('quorum_lost_max_s')} s, leader changes "
                     f"{ph.get('leader_changes')}, RssAnon growth MiB {ph.get('rss_growth_mib')}")
        for k, v in ph["checks"].items():
            if not v["passed"]:
                lines.append(f"      FAIL {k}: {v['detail']}")
    if report.get("writer_errors"):
        lines.append(f"  writer errors: {report['writer_errors']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    log = Progress(args.quiet)
    try:
        phases = _phases(args.phases)
        for name in ("phase_s", "baseline_s", "quorum_lost_s", "write_stall_s", "rss_growth_mib"):
            if getattr(args, name) <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive")
    except UsageError as e:
        print(f"tetherlab drill flood: {e}", file=sys.stderr)
        return EXIT_USAGE
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    env: Env | None = None
    try:
        try:
            env = environment(args, log)
            report = Flood(args, env, log).run(phases)
        except (RuntimeError, OSError) as e:
            print(f"tetherlab drill flood: {e}", file=sys.stderr)
            return EXIT_UNAVAILABLE
    finally:
        if env is not None and env.owned is not None:
            env.owned.close()
    print(json.dumps(report) if args.json else render(report), flush=True)
    if not report["passed"]:
        failed = [f"{ph['name']}.{k}" for ph in report["phases"] for k, v in ph["checks"].items() if not v["passed"]]
        print(f"tetherlab drill flood: FAILED {', '.join(failed)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
