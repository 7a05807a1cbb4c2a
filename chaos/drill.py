"""``tetherlab drill partition|kill|pause|latency|restart|schedule|flood``: fault drills with checked histories.

(``flood``, hostile load against the cluster's ports with the commit path measured beside it, is
its own tool: ``chaos/flood.py``, ``tetherlab drill flood --help``.)

A drill starts simulated agents (``chaos/workload.py``), applies faults (``chaos/nemesis.py``),
heals, makes a final write, takes every replica's state, and checks the history
(``chaos/checkers.py``). Live progress goes to stderr; the report to stdout (``--json``: one JSON
object). Exit status: 0 every check passed; 1 a check failed; 2 bad usage; 3 the drill could not
run here (no cluster, no leader, no way to apply the fault).

Where it runs:

- ``--netns``: a fresh 3-node cluster and the workload in a private network namespace made for
  the run (root, ``unshare``, ``nft``, ``ip``); partitions by nftables; with a latency fault (or
  ``--proxied``) every link runs through a bundled toxiproxy server and all network faults use it.
- ``--dir DIR`` (default ``.tetherlab``): the cluster there. If it runs already (``tetherlab up``),
  the drill attaches: partitions by nftables in the current namespace (a table of its own, deleted
  at the end); process faults are refused (the drill never signals nodes it did not start). If
  nothing runs there, the drill starts the cluster itself (``tetherlab init`` first if needed).
- ``--toxiproxy URL`` (with ``--dir`` for the cluster file and control sockets): a cluster whose
  links run through proxies named ``raft-<dialler>-<listener>`` and ``ssh-<node>``.

Every failure prints the seed and the exact command that replays the drill.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tetherlab.chaos import checkers, flood
from tetherlab.chaos.cluster import (
    DRILL_CONCEPTS,
    DRILL_REMOTE,
    DrillCluster,
    Target,
    developer_keys,
    drill_policies,
    rewrite_hosts,
    run_setup,
)
from tetherlab.chaos.history import Recorder
from tetherlab.chaos.nemesis import (
    AGENT_GROUPS,
    GROUP_A,
    NEMESES,
    AppliedFault,
    Fault,
    Nemesis,
    NemesisError,
    Net,
    build_schedule,
    random_fault,
)
from tetherlab.chaos.netns import (
    NftPartitioner,
    find_listener_pids,
    in_private_netns,
    netns_unavailable_reason,
    nft_unavailable_reason,
    reexec_in_netns,
    setup_private_netns,
)
from tetherlab.chaos.toxinet import ToxiproxyNet, create_proxies, make_proxied_layout
from tetherlab.chaos.toxiproxy_server import spawn_bundled_server
from tetherlab.chaos.workload import GROUP_SOURCE_IPS, SimAgent, Workload, WorkloadConfig
from tetherlab.cluster import protocol as p
from tetherlab.cluster.core.exitcodes import EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE
from tetherlab.cluster.ops.config import load_cluster_file, load_node_config
from tetherlab.cluster.ops.layout import DEFAULT_BASE_PORT, init_cluster
from tetherlab.shim.client import masters_from_cluster_file

DEFAULT_DIR = ".tetherlab"
LEADER_WAIT_S = 30.0
FINAL_WRITE_DEADLINE_S = 30.0
CONVERGE_MIN_S = 5.0
WORKLOAD_JOIN_S = 40.0
NEW_LEADER_BOUND_S = 10.0
NEW_LEADER_MIN_OBSERVE_S = 5.0  # a leader cut off this long must have been replaced
# Healing must bring every node back quickly: connection_timeout_s 3 + connection_retry_s 0.5, and
# an election, fit well within this.
REJOIN_BOUND_S = 10.0
GROUP_WAIT_S = 15.0
MONITOR_INTERVAL_S = 0.25
NETNS_HOSTS_BASE = 10  # node i (1-based) listens on 127.0.0.(10+i) inside a private namespace
NETNS_BASE_PORT = 21000
NETNS_PROXY_PORT_BASE = 20100
REEXEC_OVERHEAD_S = 240.0


# --- command line ------------------------------------------------------------------------------------


def _common(s: argparse.ArgumentParser, duration_default: float, duration_help: str) -> None:
    s.add_argument("--dir", default=DEFAULT_DIR, help=f"cluster directory (default {DEFAULT_DIR}); a running "
                                                      "cluster there is attached to, else the drill starts it")
    s.add_argument("--netns", action="store_true", help="run a fresh cluster and the workload in a private network "
                                                        "namespace made for this drill (root)")
    s.add_argument("--proxied", action="store_true", help="with --netns: run every link through toxiproxy and make "
                                                          "all network faults with it")
    s.add_argument("--toxiproxy", metavar="URL", help="the cluster's links run through proxies at this toxiproxy "
                                                      "API (raft-<a>-<b>, ssh-<node>)")
    s.add_argument("--duration", type=float, default=duration_default, help=duration_help)
    s.add_argument("--seed", type=int, help="seed of every random choice (default: drawn and printed)")
    s.add_argument("--agents", type=int, default=4, help="simulated agents (default 4)")
    s.add_argument("--fail-closed-s", type=float, default=5.0, help="F: the shims' fail-closed bound (default 5)")
    s.add_argument("--warmup-s", type=float, default=2.0, help="workload before the first fault (default 2)")
    s.add_argument("--session-ttl-s", type=int, default=30,
                   help="with --netns: the new cluster's session TTL (10..3600, at least F + 5; default 30)")
    s.add_argument("--json", action="store_true", help="print the report as one JSON object")
    s.add_argument("--quiet", action="store_true", help="no live progress on stderr")
    s.add_argument("--history", metavar="FILE", help="write the full history (ops and runs) as JSON")
    s.add_argument("--keep", action="store_true", help="keep the cluster directory of a --netns drill")
    s.add_argument("--settle-s", type=float, default=90.0,
                   help="after healing, wait at most this long for every node to catch up, and again for the "
                        "replicas to converge (default 90)")


def _add_commands(sub: Any) -> None:
    s = sub.add_parser("partition", help="cut the network (default: isolate the leader)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--isolate", metavar="WHO", help="leader, client (every shim), agents (one group of shims; the "
                                                    "other keeps contending), or a node id")
    g.add_argument("--split", choices=["2-1", "1-1-1", "agents"],
                   help="split the nodes (agents: 2/1, one group of shims on each side)")
    g.add_argument("--one-way", metavar="NODE", help="drop NODE's packets to the others (see --direction)")
    g.add_argument("--bridge", metavar="MIDDLE", help="the two other nodes cannot see each other (MIDDLE: a node "
                                                      "id or leader)")
    g.add_argument("--flap", metavar="NODE", help="cut and restore NODE's links every --period-s")
    s.add_argument("--direction", choices=["out", "in"], default="out", help="one-way: out = NODE's packets dropped")
    s.add_argument("--client", choices=["all", "majority", "minority"], default="all",
                   help="which side the shims reach (default all)")
    s.add_argument("--minority", default="leader", help="split 2-1: the lone node (default leader)")
    s.add_argument("--period-s", type=float, default=1.0, help="flap period (default 1)")
    _common(s, 10.0, "seconds the partition lasts (default 10)")
    s.set_defaults(drill="partition")

    s = sub.add_parser("kill", help="SIGKILL nodes, restart them after --duration")
    s.add_argument("--node", default="leader", help="leader or a node id (default leader)")
    s.add_argument("--nodes", help="several nodes, comma-separated (a majority: the cluster stops)")
    _common(s, 10.0, "seconds the nodes stay down (default 10)")
    s.set_defaults(drill="kill")

    s = sub.add_parser("pause", help="SIGSTOP a node, SIGCONT after --duration")
    s.add_argument("--node", default="leader", help="leader or a node id (default leader)")
    _common(s, 10.0, "seconds the node stays paused (default 10)")
    s.set_defaults(drill="pause")

    s = sub.add_parser("latency", help="latency with jitter on every link (toxiproxy)")
    s.add_argument("--latency-ms", type=int, default=100)
    s.add_argument("--jitter-ms", type=int, default=50)
    _common(s, 10.0, "seconds of latency (default 10)")
    s.set_defaults(drill="latency")

    s = sub.add_parser("restart", help="rolling restart (default) or full-cluster restart")
    s.add_argument("--full", action="store_true", help="SIGKILL every node, then start them all")
    _common(s, 2.0, "full restart: seconds the cluster stays down (default 2)")
    s.set_defaults(drill="restart")

    s = sub.add_parser("schedule", help="a seeded random schedule of faults")
    s.add_argument("--nemesis", help=f"comma-separated kinds (default: all this mode supports): {', '.join(NEMESES)}")
    s.add_argument("--fault-s", default="4,8", help="min,max seconds per fault (default 4,8)")
    s.add_argument("--gap-s", default="1,3", help="min,max seconds between faults (default 1,3)")
    _common(s, 60.0, "seconds of faults in total (default 60)")
    s.set_defaults(drill="schedule")

    flood.add_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tetherlab drill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_commands(p.add_subparsers(dest="drill_command", metavar="DRILL", required=True))
    p.set_defaults(func=run)
    return p


_FLAGS = ("netns", "proxied", "json", "quiet", "keep", "full")
_VALUED = ("dir", "toxiproxy", "duration", "seed", "agents", "fail_closed_s", "warmup_s", "settle_s", "history",
           "session_ttl_s",
           "isolate",
           "split", "one_way", "bridge", "flap", "direction", "client", "minority", "period_s", "node", "nodes",
           "latency_ms", "jitter_ms", "nemesis", "fault_s", "gap_s")


def canonical_argv(args: argparse.Namespace) -> list[str]:
    """The drill's arguments, every value explicit (the seed included): what replays it."""
    out = [args.drill]
    for name in _VALUED:
        v = getattr(args, name, None)
        if v is not None:
            out += [f"--{name.replace('_', '-')}", str(v)]
    for name in _FLAGS:
        if getattr(args, name, False):
            out.append(f"--{name}")
    return out


def replay_command(args: argparse.Namespace) -> str:
    return "tetherlab drill " + " ".join(shlex.quote(a) for a in canonical_argv(args))


def _pair(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition(",")
    return float(lo), float(hi or lo)


def faults_for(args: argparse.Namespace, ids: Sequence[str], allowed: Callable[[str], str | None]) -> list[Fault]:
    """The faults a drill applies, from its arguments and seed."""
    rng = random.Random(args.seed)
    d = args.duration
    c = args.drill
    if c == "partition":
        ps: dict[str, Any] = {"client": args.client}
        if args.split == "2-1":
            return [Fault("split-2-1", 0.0, d, (("minority", args.minority), ("client", args.client)))]
        if args.split == "agents":
            return [Fault("split-agents", 0.0, d, (("minority", args.minority),))]
        if args.split == "1-1-1":
            return [Fault("split-1-1-1", 0.0, d, (("client", "all"),))]
        if args.one_way:
            return [Fault("one-way", 0.0, d, (("node", args.one_way), ("direction", args.direction)))]
        if args.bridge:
            return [Fault("bridge", 0.0, d, (("middle", args.bridge),))]
        if args.flap:
            return [Fault("flap", 0.0, d, (("node", args.flap), ("period_s", args.period_s)))]
        who = args.isolate or "leader"
        if who == "client":
            return [Fault("isolate-client", 0.0, d)]
        if who == "agents":
            return [Fault("isolate-agents", 0.0, d)]
        if who == "leader":
            return [Fault("isolate-leader", 0.0, d, tuple(ps.items()))]
        return [Fault("isolate-node", 0.0, d, (("node", who), *ps.items()))]
    if c == "kill":
        if args.nodes:
            return [Fault("kill-several", 0.0, d, (("nodes", args.nodes),))]
        return [Fault("kill", 0.0, d, (("node", args.node),))]
    if c == "pause":
        return [Fault("pause", 0.0, d, (("node", args.node),))]
    if c == "latency":
        return [Fault("latency", 0.0, d, (("latency_ms", args.latency_ms), ("jitter_ms", args.jitter_ms)))]
    if c == "restart":
        if args.full:
            return [Fault("full-restart", 0.0, d)]
        return [random_fault(rng, "rolling-restart", ids, 0.0, d)]
    kinds = [k.strip() for k in args.nemesis.split(",")] if args.nemesis else [k for k in NEMESES if not allowed(k)]
    unknown = [k for k in kinds if k not in NEMESES]
    if unknown:
        raise ValueError(f"unknown nemesis {', '.join(unknown)}; known: {', '.join(NEMESES)}")
    if not kinds:
        raise RuntimeError("no nemesis can run against this cluster here (see --netns, --toxiproxy)")
    return build_schedule(args.seed, kinds, d, ids, _pair(args.fault_s), _pair(args.gap_s))


# --- the run ------------------------------------------------------------------------------------------


class Progress:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[drill {time.monotonic() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


class Monitor(threading.Thread):
    """Watches the leader (HTTP status, which faults never cut) and prints live progress."""

    def __init__(self, target: Target, recorder: Recorder, log: Progress, current: Callable[[], str]) -> None:
        super().__init__(name="drill-monitor", daemon=True)
        self.target, self.rec, self.log, self.current = target, recorder, log, current
        self.timeline: list[tuple[float, str | None]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        last_print = 0.0
        last_ops = 0
        while not self._halt.is_set():
            try:
                lead = self.target.status(0.5).get("leader")
            except Exception:
                lead = None
            now = time.monotonic()
            if not self.timeline or self.timeline[-1][1] != lead:
                self.timeline.append((now, lead))
            if now - last_print >= 1.0:
                counts, running, ev = self.rec.snapshot_counts()
                total = sum(counts.values())
                rate = (total - last_ops) / (now - last_print) if last_print else 0.0
                last_ops, last_print = total, now
                self.log(f"leader={lead or '-'} faults=[{self.current()}] ops/s={rate:.1f} ok={counts['ok']} "
                         f"failed={counts['failed']} indet={counts['indeterminate']} running={running} "
                         f"fail_closed={ev.get('fail_closed', 0)} resumed={ev.get('resumed', 0)}")
            self._halt.wait(MONITOR_INTERVAL_S)

    def stop(self) -> None:
        self._halt.set()
        self.join(5.0)

    def leader_changes(self) -> int:
        seen = [lead for _, lead in self.timeline if lead is not None]
        return sum(1 for a, b in itertools.pairwise(seen) if a != b)

    def new_leader_after(self, t: float, old: str | None) -> float | None:
        for at, lead in self.timeline:
            if at >= t and lead is not None and lead != old:
                return at - t
        return None


@dataclass
class Env:
    """Where the drill runs and what it may do there."""

    target: Target
    net: Net | None
    mode: str
    mechanisms: dict[str, str]
    cleanup: list[Callable[[], None]] = field(default_factory=list)


def _log_err(msg: str) -> None:
    print(f"tetherlab drill: {msg}", file=sys.stderr, flush=True)


def _nft_net(target: Target, pids: Callable[[], dict[str, int]], log: Callable[[str], None]) -> Net:
    listeners = {}
    for n in target.cluster.nodes:
        cfg_path = target.dir / n.id / "node.toml"
        raft, ssh = n.raft, n.ssh
        if cfg_path.exists():  # the node's own addresses (the cluster file may name proxies)

            own = load_node_config(cfg_path).node
            raft, ssh = own.raft, own.ssh
        listeners[n.id] = [(socket.gethostbyname(raft.host), raft.port), (socket.gethostbyname(ssh.host), ssh.port)]

    return NftPartitioner(listeners, pids, log, {ip: g for g, ip in GROUP_SOURCE_IPS.items()})


def _fresh_netns_cluster(args: argparse.Namespace, proxied: bool, log: Progress) -> Env:
    """A new cluster in this private namespace: node i on 127.0.0.(10+i); proxied if asked."""
    setup_private_netns()
    work = Path(tempfile.mkdtemp(prefix="tetherlab-drill-"))
    cdir = work / "cluster"
    cf = init_cluster(cdir, 3, "127.0.0.1", NETNS_BASE_PORT, remote=DRILL_REMOTE, session_ttl_s=args.session_ttl_s)
    rewrite_hosts(cdir, cf.nodes, {n.id: f"127.0.0.{NETNS_HOSTS_BASE + i + 1}" for i, n in enumerate(cf.nodes)})
    cleanup: list[Callable[[], None]] = []
    mechanisms = {"partitions": "nftables in a private network namespace (connection-owner allow-sets)",
                  "latency": "unavailable: no tc netem in this kernel; use --proxied"}
    toxi_url = None
    if proxied:

        nodes = load_cluster_file(cdir / "cluster.toml").nodes
        specs = make_proxied_layout(cdir, nodes, NETNS_PROXY_PORT_BASE)
        handle = spawn_bundled_server("127.0.0.1", 0, seed=args.seed, stderr=open(work / "toxiproxy.log", "ab"))  # noqa: SIM115
        cleanup.append(handle.stop)
        create_proxies(handle.url, specs)
        toxi_url = handle.url
        mechanisms = {"partitions": "toxiproxy timeout toxics (blackhole) on every link, in a private namespace",
                      "latency": "toxiproxy latency toxics with jitter on every link"}
    owned = DrillCluster(cdir, die_with_runner=True)
    target = Target.attach(cdir, owned)
    owned.start()
    cleanup.insert(0, owned.close)
    if not args.keep:
        cleanup.append(lambda: shutil.rmtree(work, ignore_errors=True))
    else:
        log(f"cluster directory kept: {cdir}")
    net: Net
    net = ToxiproxyNet(toxi_url, log) if toxi_url is not None else _nft_net(target, owned.pids, log)
    return Env(target, net, "netns" + ("+proxied" if proxied else ""), mechanisms, cleanup)


def _local_env(args: argparse.Namespace, log: Progress) -> Env:
    cdir = Path(args.dir).resolve()
    cleanup: list[Callable[[], None]] = []
    if not (cdir / "cluster.toml").exists():
        log(f"no cluster in {cdir}: initialising one")
        init_cluster(cdir, 3, "127.0.0.1", DEFAULT_BASE_PORT, remote=DRILL_REMOTE)
    target = Target.attach(cdir)
    running = target.running_nodes()
    net: Net | None = None
    mechanisms: dict[str, str] = {}
    if args.toxiproxy:

        net = ToxiproxyNet(args.toxiproxy, log)
        mechanisms = {"partitions": f"toxiproxy timeout toxics at {args.toxiproxy}",
                      "latency": f"toxiproxy latency toxics at {args.toxiproxy}"}
    if running:
        if len(running) < len(target.ids):
            raise RuntimeError(f"only {', '.join(running)} of {', '.join(target.ids)} answer in {cdir}: start the "
                               "whole cluster (or stop it, and the drill runs its own)")
        log(f"attaching to the cluster running in {cdir} (its processes are never signalled)")
        mode = "attached"
        if net is None and not nft_unavailable_reason():
            raft = {n.id: (socket.gethostbyname(n.raft.host), n.raft.port) for n in target.cluster.nodes}
            found = find_listener_pids(raft)
            if set(found) != set(raft):
                # Without every node's process, its sockets would count as the shims' side.
                raise RuntimeError(f"cannot find the processes of {', '.join(sorted(set(raft) - set(found)))} "
                                   "(their raft ports are not listened on here): partitions need them")
            net = _nft_net(target, lambda: found, log)
            mechanisms = {"partitions": "nftables in this namespace: a table of our own (connection-owner "
                                        "allow-sets on the nodes' raft and SSH ports), deleted at the end",
                          "latency": "unavailable (no tc netem here): use --toxiproxy or --netns --proxied"}
    else:
        log(f"starting the cluster in {cdir}")
        owned = DrillCluster(cdir)
        target = Target.attach(cdir, owned)
        owned.start()
        cleanup.append(owned.close)
        mode = "started"
        if net is None and not nft_unavailable_reason():
            net = _nft_net(target, owned.pids, log)
            mechanisms = {"partitions": "nftables in this namespace: a table of our own, deleted at the end",
                          "latency": "unavailable (no tc netem here): use --toxiproxy or --netns --proxied"}
    if net is None:
        mechanisms.setdefault("partitions", f"unavailable: {nft_unavailable_reason()}")
    return Env(target, net, mode, mechanisms, cleanup)


class Drill:
    def __init__(self, args: argparse.Namespace, env: Env, faults: list[Fault], log: Progress) -> None:
        self.args, self.env, self.faults, self.log = args, env, faults, log
        self.target = env.target
        self.recorder = Recorder(args.fail_closed_s)
        self.applied: list[AppliedFault] = []
        self.current = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_evt: asyncio.Event | None = None
        self._ready = threading.Event()
        self._wl_error: BaseException | None = None

    # -- workload thread --

    def _workload_thread(self, workload: Workload) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop_evt = asyncio.Event()
            self._ready.set()
            await workload.run(self._stop_evt)

        try:
            asyncio.run(main())
        except BaseException as e:
            self._wl_error = e
            self._ready.set()

    def _stop_workload(self, thread: threading.Thread) -> None:
        if self._loop is not None and self._stop_evt is not None:
            self._loop.call_soon_threadsafe(self._stop_evt.set)
        thread.join(WORKLOAD_JOIN_S)
        if thread.is_alive():
            self.log("the workload did not stop within its bound")

    def _wait_group_running(self, workload: Workload) -> None:
        """Cutting one group of shims only tests something while one of them holds claims: wait
        (bounded) until an agent of that group runs."""
        group = {a.agent_id for a in workload.agents if a.group == GROUP_A}
        deadline = time.monotonic() + GROUP_WAIT_S
        while time.monotonic() < deadline and not group & set(self.recorder.running_agents()):
            time.sleep(0.05)

    def _wait_rejoined(self, leader: str | None, t_healed: float) -> tuple[float | None, str]:
        """Seconds from healing until every node has applied what the leader had applied when
        the faults ended (bounded by --settle-s); (None, why) if that never happened."""
        target = self.target
        if leader is None:
            return None, "no leader after healing"
        want = target.applied_index(leader)
        deadline = t_healed + self.args.settle_s
        behind: dict[str, int] = {}
        while time.monotonic() < deadline:
            behind = {n: i for n in target.ids if (i := target.applied_index(n)) < want}
            if not behind:
                return time.monotonic() - t_healed, ""
            time.sleep(0.1)
        return None, f"nodes {behind} still behind index {want} {self.args.settle_s:.0f} s after healing"

    # -- final write --

    async def _final_write(self, keys: dict[str, Path], remote: str) -> tuple[bool, str]:
        assert self.target.cluster.path is not None
        dev = sorted(keys)[0]
        cfg = WorkloadConfig(agents=1, fail_closed_s=self.args.fail_closed_s)
        agent = SimAgent(dev, keys[dev], masters_from_cluster_file(self.target.cluster.path), remote,
                         list(DRILL_CONCEPTS), cfg, self.recorder, random.Random(f"{self.args.seed}:final"))
        deadline = time.monotonic() + FINAL_WRITE_DEADLINE_S
        try:
            outcome = "failed"
            while outcome != "ok" and time.monotonic() < deadline:
                outcome, _, err = await agent.call("open", p.OpenSession, 8.0, True, agent_id=agent.agent_id,
                                                   tool="drill", machine="drill-host", repo_remote=remote,
                                                   base_commit="abcdef1")
            if outcome != "ok":
                return False, f"open_session never acknowledged ({err})"
            body = p.Intent(summary="final write after healing", steps=("check",), files=None, concepts=None)
            outcome, verdict, err = await agent.call("submit", p.SubmitIntent, 10.0, False, agent_id=agent.agent_id,
                                                     tool="drill", intent=body, trigger="initial")
            if outcome != "ok" or verdict is None:
                return False, f"submit_intent {outcome} ({err})"
            outcome, _, err = await agent.call("complete", p.Complete, 10.0, True, agent_id=agent.agent_id,
                                               intent_id=verdict["intent_id"])
            if outcome != "ok":
                return False, f"complete {outcome} ({err})"
            return True, f"final write acknowledged ({verdict['intent_id']})"
        finally:
            await agent.client.close()

    # -- the drill --

    def run(self) -> dict[str, Any]:
        args, target, log = self.args, self.target, self.log
        t_start = time.monotonic()
        for n in target.ids:
            if target.owned is not None:
                target.owned.wait_serving(n, 30.0)
        leader = target.wait_leader(LEADER_WAIT_S)
        if leader is None:
            raise RuntimeError(f"no quorum-backed leader within {LEADER_WAIT_S:.0f} s: {target.status()}")
        log(f"leader {leader}; mode {self.env.mode}; partitions: {self.env.mechanisms.get('partitions')}")
        devs = [f"drill{i}" for i in range(max(1, args.agents))]
        keys = developer_keys(target.dir, devs)
        run_setup(target, keys, log)
        remote = target.remote()

        assert target.cluster.path is not None
        cfg = WorkloadConfig(agents=args.agents, fail_closed_s=args.fail_closed_s)
        workload = Workload(keys, masters_from_cluster_file(target.cluster.path), remote, list(DRILL_CONCEPTS), cfg,
                            self.recorder, args.seed)
        monitor = Monitor(target, self.recorder, log, lambda: self.current)
        monitor.start()
        wl = threading.Thread(target=self._workload_thread, args=(workload,), name="drill-workload", daemon=True)
        wl.start()
        self._ready.wait(10.0)
        nemesis = Nemesis(target, self.env.net, log, random.Random(f"{args.seed}:nemesis"))
        errors: list[str] = []
        try:
            time.sleep(max(0.0, args.warmup_s))
            t_faults = time.monotonic()
            for f in self.faults:
                wait = t_faults + f.at_s - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if f.kind in AGENT_GROUPS:
                    self._wait_group_running(workload)
                try:
                    a = nemesis.apply(f)
                except NemesisError as e:
                    errors.append(str(e))
                    log(str(e))
                    continue
                self.applied.append(a)
                self.current = f.describe()
                try:
                    nemesis.hold(a, lambda: self._wl_error is not None)
                finally:
                    nemesis.heal(a)
                    self.current = ""
        finally:
            nemesis.heal_all()
        t_healed = time.monotonic()
        healed_leader = target.wait_leader(LEADER_WAIT_S)
        log(f"healed; leader {healed_leader or 'none'}; letting the shims recover")
        rejoin_s, rejoin_note = self._wait_rejoined(healed_leader, t_healed)
        log(f"every node caught up {rejoin_s:.1f} s after healing" if rejoin_s is not None else rejoin_note)
        time.sleep(max(0.0, t_healed + args.fail_closed_s + 2.0 - time.monotonic()))
        self._stop_workload(wl)
        t_end = time.monotonic()
        final_ok, final_detail = asyncio.run(asyncio.wait_for(self._final_write(keys, remote),
                                                              FINAL_WRITE_DEADLINE_S + 30))
        log(final_detail)
        dumps, note = target.converged_dumps(max(CONVERGE_MIN_S, args.settle_s), log)
        log(f"replica state: {note}")
        monitor.stop()
        self.recorder.close_all(t_end)
        history = self.recorder.history()
        if args.history:
            Path(args.history).write_text(json.dumps(history.to_json()))
        losses = [checkers.LeaderLoss(a.fault.describe(), a.leader_before or "?",
                                      monitor.new_leader_after(a.started_s, a.leader_before),
                                      (a.ended_s or t_end) - a.started_s)
                  for a in self.applied if a.leader_lost]
        results = {
            "no_lost_acks": checkers.check_no_lost_acks(history, dumps),
            "mutual_exclusion": checkers.check_mutual_exclusion(history, drill_policies()),
            "fencing_tokens": checkers.check_fencing_tokens(history),
            "fail_closed": checkers.check_fail_closed(history),
            "convergence": checkers.check_convergence(dumps, target.ids, final_ok, final_detail),
            "workload_progress": checkers.check_workload_progress(history),
            "rejoin_after_heal": checkers.check_rejoin(rejoin_s, REJOIN_BOUND_S, rejoin_note),
        }
        if losses:
            results["leader_recovery"] = checkers.check_leader_recovery(losses, NEW_LEADER_BOUND_S,
                                                                        NEW_LEADER_MIN_OBSERVE_S)
        if errors:
            results["faults_applied"] = checkers.CheckResult(False, "; ".join(errors))
        if self._wl_error is not None:
            results["workload"] = checkers.CheckResult(False, f"the workload crashed: {self._wl_error!r}")
        counts = history.counts()
        by_kind: dict[str, dict[str, int]] = {}
        for op in history.ops:
            by_kind.setdefault(op.kind, {"ok": 0, "failed": 0, "indeterminate": 0})[op.outcome] += 1
        _, _, events = self.recorder.snapshot_counts()
        ttl = [x.time_to_new_leader_s for x in losses if x.time_to_new_leader_s is not None]
        passed = all(r.passed for r in results.values())
        return {
            "seed": args.seed,
            "command": args.drill,
            "replay": replay_command(args),
            "mode": self.env.mode,
            "mechanisms": self.env.mechanisms,
            "faults": [a.to_json(t_faults) for a in self.applied],
            "leader_changes": monitor.leader_changes(),
            "leaders": [{"at_s": round(t - t_faults, 2), "leader": lead} for t, lead in monitor.timeline][:200],
            "time_to_new_leader_s": round(max(ttl), 3) if ttl else None,
            "rejoin_after_heal_s": round(rejoin_s, 2) if rejoin_s is not None else None,
            "ops": {**counts, "by_kind": by_kind, "dropped": self.recorder.dropped_ops},
            "shims": {"runs": len(history.runs), "fail_closed": events.get("fail_closed", 0),
                      "resumed": events.get("resumed", 0), "stop_notices": events.get("notices", 0),
                      "lapsed": events.get("lapsed", 0)},
            "checks": {k: v.to_json() for k, v in results.items()},
            "passed": passed,
            "duration_s": round(time.monotonic() - t_start, 1),
        }


def render(report: dict[str, Any]) -> str:
    lines = [f"drill {report['command']} (seed {report['seed']}, mode {report['mode']}): "
             f"{'PASSED' if report['passed'] else 'FAILED'} in {report['duration_s']} s"]
    for k, v in report["mechanisms"].items():
        lines.append(f"  {k}: {v}")
    lines.append("faults:")
    for f in report["faults"]:
        lines.append(f"  {f['started_at_s']:7.2f}s  {f['kind']:<16} {f['targets']}  (leader before: "
                     f"{f['leader_before']}, ended {f['ended_at_s']}s)")
    lines.append(f"leader changes: {report['leader_changes']}; time to new leader: {report['time_to_new_leader_s']} s")
    o = report["ops"]
    lines.append(f"ops: ok {o['ok']}, failed {o['failed']}, indeterminate {o['indeterminate']}  {o['by_kind']}")
    s = report["shims"]
    lines.append(f"shims: {s['runs']} runs, {s['fail_closed']} stopped by fail-closed, {s['resumed']} resumed, "
                 f"{s['stop_notices']} stop notices, {s['lapsed']} lapsed")
    lines.append("checks:")
    for k, v in report["checks"].items():
        lines.append(f"  {'ok  ' if v['passed'] else 'FAIL'} {k}: {v['detail']}")
    if not report["passed"]:
        lines.append(f"replay: {report['replay']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "big") >> 1
    # SIGTERM unwinds like Ctrl-C, so the rules and the nodes this drill made are removed.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    log = Progress(args.quiet)
    ttl_s = getattr(args, "session_ttl_s", 30)
    if not 10 <= ttl_s <= 3600 or ttl_s < args.fail_closed_s + 5:
        _log_err(f"--session-ttl-s must be 10..3600 and at least --fail-closed-s + 5 "
                 f"({args.fail_closed_s:g} + 5); got {ttl_s}")
        return EXIT_USAGE
    if args.netns and not in_private_netns():
        reason = netns_unavailable_reason()
        if reason:
            _log_err(f"--netns is not possible here: {reason}")
            return EXIT_UNAVAILABLE
        planned = args.duration + args.warmup_s + args.fail_closed_s + 2 * args.settle_s
        return reexec_in_netns("tetherlab.chaos.drill", canonical_argv(args), planned * 2 + REEXEC_OVERHEAD_S)
    # Latency needs proxies (no tc netem here): a --netns drill that asks for it runs proxied.
    wants_latency = args.drill == "latency" or (args.drill == "schedule" and "latency" in (args.nemesis or ""))
    proxied = bool(args.proxied) or (args.netns and wants_latency)
    log(f"seed {args.seed}; replay: {replay_command(args)}")
    env: Env | None = None
    report: dict[str, Any] | None = None
    try:
        try:
            env = _fresh_netns_cluster(args, proxied, log) if args.netns else _local_env(args, log)
            nem = Nemesis(env.target, env.net, log, random.Random(0))
            faults = faults_for(args, env.target.ids, nem.can_apply)
        except ValueError as e:
            _log_err(str(e))
            return EXIT_USAGE
        except (RuntimeError, OSError) as e:
            _log_err(str(e))
            return EXIT_UNAVAILABLE
        refused = [f"{f.kind}: {r}" for f in faults if (r := nem.can_apply(f.kind))]
        if refused and args.drill != "schedule":
            _log_err("; ".join(refused))
            return EXIT_UNAVAILABLE
        log("schedule: " + "; ".join(f"+{f.at_s:.1f}s {f.describe()}" for f in faults))
        try:
            report = Drill(args, env, faults, log).run()
        except RuntimeError as e:
            _log_err(f"{e} (seed {args.seed}; replay: {replay_command(args)})")
            return EXIT_UNAVAILABLE
    finally:
        if env is not None:
            if env.net is not None:
                try:
                    env.net.close()
                except Exception as e:
                    _log_err(f"could not remove the drill's network rules: {e}")
            for fn in env.cleanup:
                try:
                    fn()
                except Exception as e:
                    _log_err(f"cleanup: {e}")
    print(json.dumps(report) if args.json else render(report), flush=True)
    if not report["passed"]:
        failed = [k for k, v in report["checks"].items() if not v["passed"]]
        _log_err(f"FAILED checks {', '.join(failed)}; seed {args.seed}; replay: {report['replay']}")
        return EXIT_FAILED
    return EXIT_OK


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

