"""The nemesis menu, seeded schedules, and the executor that applies faults to a cluster.

Faults (``Fault.kind``):

====================  ==========================================================================
isolate-leader        the leader cut off from the other nodes (both directions)
isolate-node          one node cut off
isolate-client        the shims cut off from every node (they must fail closed)
split-2-1             a random 2/1 split of the nodes
split-1-1-1           every node alone
one-way               one node's packets to the others dropped (or the others' to it), not back
bridge                two nodes that cannot see each other, both seeing the third
flap                  one node's links cut and restored every ``period_s``
isolate-agents        one group of shims (agents-a) cut from every node while the other group
                      keeps contending for the same concepts (fail-closed against session lapse)
split-agents          a 2/1 split of the nodes with agents-a reaching only the minority and
                      agents-b only the majority
latency               latency with jitter on every link (toxiproxy)
kill                  SIGKILL one node (leader or random), restarted after the fault
kill-several          SIGKILL two nodes (a majority), restarted after the fault
pause                 SIGSTOP one node (leader or random), SIGCONT after the fault
rolling-restart       each node in turn: SIGTERM, start, wait until it caught up
full-restart          SIGKILL every node, start them all again
====================  ==========================================================================

Network partitions place the shims ("client") too: ``client`` = ``all`` (they reach every node),
``majority`` (only the larger side) or ``minority`` (only the smaller side: they must fail closed).

A schedule is a list of non-overlapping faults drawn from ``random.Random(seed)``: the same seed
gives the same kinds, targets (by role: "leader" is resolved when the fault starts), times and
durations. Network faults go through a ``Net`` (nftables or toxiproxy); process faults need a
cluster this drill started.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tetherlab.chaos.cluster import Target
from tetherlab.chaos.netns import CLIENT, Drops

NETWORK = ("isolate-leader", "isolate-node", "isolate-client", "split-2-1", "split-1-1-1", "one-way", "bridge",
           "flap")
AGENT_GROUPS = ("isolate-agents", "split-agents")  # need per-group shim locations (nftables)
LATENCY = ("latency",)
PROCESS = ("kill", "kill-several", "pause", "rolling-restart", "full-restart")
NEMESES = NETWORK + AGENT_GROUPS + LATENCY + PROCESS
GROUP_A, GROUP_B = "agents-a", "agents-b"
RESTART_WAIT_S = 20.0
LEADER = "leader"


class Net(Protocol):
    name: str
    supports_latency: bool
    supports_groups: bool

    def cut(self, drops: Drops) -> None: ...

    def set_latency(self, latency_ms: int, jitter_ms: int) -> None: ...

    def heal(self) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Fault:
    kind: str
    at_s: float  # offset from the start of the fault schedule
    duration_s: float
    params: tuple[tuple[str, Any], ...] = ()

    def param(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)

    def describe(self) -> str:
        ps = " ".join(f"{k}={v}" for k, v in self.params)
        return f"{self.kind}{' ' + ps if ps else ''} for {self.duration_s:.1f}s"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "at_s": round(self.at_s, 3), "duration_s": round(self.duration_s, 3),
                "params": dict(self.params)}


# --- drops (pure) -----------------------------------------------------------------------------------


def drops_between(a: Iterable[str], b: Iterable[str]) -> set[tuple[str, str]]:
    """Both directions between every member of ``a`` and every member of ``b``."""
    out: set[tuple[str, str]] = set()
    bs = list(b)
    for x in a:
        for y in bs:
            if x != y:
                out |= {(x, y), (y, x)}
    return out


def partition_drops(components: Sequence[Collection[str]], client_reaches: Collection[str] | None) -> Drops:
    """Cut nodes in different components from each other; the client reaches ``client_reaches``
    (None: every node)."""
    out: set[tuple[str, str]] = set()
    for i, a in enumerate(components):
        for b in components[i + 1:]:
            out |= drops_between(a, b)
    if client_reaches is not None:
        every = {n for c in components for n in c}
        out |= drops_between([CLIENT], every - set(client_reaches))
    return frozenset(out)


def client_side(placement: str, majority: Collection[str], minority: Collection[str]) -> Collection[str] | None:
    return {"all": None, "majority": majority, "minority": minority, "none": ()}[placement]


# --- schedules (pure) ------------------------------------------------------------------------------


def random_fault(rng: random.Random, kind: str, ids: Sequence[str], at_s: float, duration_s: float) -> Fault:
    """One fault of ``kind`` with its targets drawn from ``rng``."""
    params: dict[str, Any] = {}
    if kind in ("isolate-leader", "isolate-node", "split-2-1"):
        if kind == "isolate-node":
            params["node"] = rng.choice(list(ids))
        if kind == "split-2-1":
            params["minority"] = rng.choice([LEADER, *ids])
        params["client"] = rng.choice(["all", "majority", "minority"])
    elif kind == "split-agents":
        params["minority"] = rng.choice([LEADER, *ids])
    elif kind == "split-1-1-1":
        params["client"] = rng.choice(["all", *ids])
    elif kind == "one-way":
        params["node"] = rng.choice([LEADER, *ids])
        params["direction"] = rng.choice(["out", "in"])  # out: its packets to the others are dropped
    elif kind == "bridge":
        params["middle"] = rng.choice([LEADER, *ids])
    elif kind == "flap":
        params["node"] = rng.choice([LEADER, *ids])
        params["period_s"] = round(rng.uniform(0.3, 1.5), 2)
    elif kind == "latency":
        ms = rng.choice([25, 50, 100, 200])
        params["latency_ms"], params["jitter_ms"] = ms, ms // 2
    elif kind in ("kill", "pause"):
        params["node"] = rng.choice([LEADER, LEADER, *ids])
    elif kind == "kill-several":
        params["nodes"] = ",".join(sorted(rng.sample(list(ids), k=max(2, len(ids) // 2 + 1))))
    elif kind == "rolling-restart":
        order = list(ids)
        rng.shuffle(order)
        params["order"] = ",".join(order)
    elif kind == "full-restart":
        duration_s = round(rng.uniform(0.5, 3.0), 2)  # how long the cluster stays down
    elif kind not in ("isolate-client", "isolate-agents"):
        raise ValueError(f"unknown nemesis {kind!r}; known: {', '.join(NEMESES)}")
    return Fault(kind, round(at_s, 3), round(duration_s, 3), tuple(params.items()))


def build_schedule(seed: int, kinds: Sequence[str], total_s: float, ids: Sequence[str],
                   fault_s: tuple[float, float] = (4.0, 8.0), gap_s: tuple[float, float] = (1.0, 3.0),
                   max_faults: int = 100) -> list[Fault]:
    """Non-overlapping faults from ``kinds`` filling ``total_s`` seconds, all drawn from ``seed``.
    Every kind appears once (in a seeded order) before any repeats, so a schedule at least as long
    as the kinds covers them all."""
    rng = random.Random(seed)
    faults: list[Fault] = []
    t = 0.0
    bag: list[str] = []
    while t < total_s and len(faults) < max_faults:
        if not bag:
            bag = list(kinds)
            rng.shuffle(bag)
        kind = bag.pop()
        f = random_fault(rng, kind, ids, t, rng.uniform(*fault_s))
        faults.append(f)
        t += f.duration_s + rng.uniform(*gap_s)
    return faults


# --- execution ----------------------------------------------------------------------------------------


@dataclass
class AppliedFault:
    fault: Fault
    started_s: float  # monotonic
    ended_s: float | None = None
    targets: dict[str, Any] = field(default_factory=dict)
    leader_before: str | None = None
    leader_lost: bool = False  # the leader was cut off, killed or paused: a new one must be elected
    drops: Drops = frozenset()
    detail: str = ""

    def to_json(self, t0: float) -> dict[str, Any]:
        return {**self.fault.to_json(), "started_at_s": round(self.started_s - t0, 3),
                "ended_at_s": round(self.ended_s - t0, 3) if self.ended_s is not None else None,
                "targets": self.targets, "leader_before": self.leader_before, "leader_lost": self.leader_lost,
                "detail": self.detail}


class NemesisError(Exception):
    """Returned when a fault cannot be applied here (say, a kill on nodes this drill did not start)."""


class Nemesis:
    def __init__(self, target: Target, net: Net | None, log: Callable[[str], None], rng: random.Random) -> None:
        self.target = target
        self.net = net
        self.log = log
        self.rng = rng
        self.ids = target.ids
        self._paused: set[str] = set()
        self._killed: set[str] = set()
        self._latency = False

    def can_apply(self, kind: str) -> str | None:
        """None if ``kind`` can run against this cluster, else why not."""
        if kind in NETWORK + AGENT_GROUPS and self.net is None:
            return "no network fault mechanism here (need root with nftables, or --toxiproxy)"
        if kind in AGENT_GROUPS and self.net is not None and not self.net.supports_groups:
            return "cutting one group of shims needs nftables (every shim shares the toxiproxy ssh proxies)"
        if kind in LATENCY and (self.net is None or not self.net.supports_latency):
            return ("latency needs toxiproxy proxies on the links (this kernel has no tc netem): use --netns, "
                    "which then runs the cluster through proxies, or --toxiproxy URL")
        if kind in PROCESS and self.target.owned is None:
            return ("process faults need a cluster this drill started (run with --netns, or against a --dir "
                    "where no cluster runs); the drill never signals nodes someone else runs")
        return None

    def _resolve(self, who: str, leader: str | None) -> str:
        if who == LEADER:
            return leader if leader is not None else self.rng.choice(self.ids)
        return who

    def apply(self, f: Fault) -> AppliedFault:
        reason = self.can_apply(f.kind)
        if reason:
            raise NemesisError(f"{f.kind}: {reason}")
        leader = self.target.leader()
        a = AppliedFault(f, time.monotonic(), leader_before=leader)
        k = f.kind

        def others(n: str) -> list[str]:
            return [x for x in self.ids if x != n]

        if k in ("isolate-leader", "isolate-node", "split-2-1"):
            node = self._resolve(LEADER if k == "isolate-leader" else f.param("node", f.param("minority", LEADER)),
                                 leader)
            minority, majority = [node], others(node)
            a.drops = partition_drops([minority, majority], client_side(f.param("client", "all"), majority, minority))
            a.targets = {"minority": minority, "majority": majority, "client": f.param("client", "all")}
            a.leader_lost = node == leader
        elif k == "isolate-client":
            a.drops = partition_drops([self.ids], ())
            a.targets = {"client": "cut from every node"}
        elif k == "isolate-agents":
            a.drops = frozenset(drops_between([GROUP_A], self.ids))
            a.targets = {"cut": GROUP_A, "from": list(self.ids)}
        elif k == "split-agents":
            node = self._resolve(f.param("minority", LEADER), leader)
            minority, majority = [node], others(node)
            a.drops = frozenset(partition_drops([minority, majority], None)
                                | drops_between([GROUP_A], majority) | drops_between([GROUP_B], minority))
            a.targets = {"minority": minority, "majority": majority, GROUP_A: minority, GROUP_B: majority}
            a.leader_lost = node == leader
        elif k == "split-1-1-1":
            placement = f.param("client", "all")
            a.drops = partition_drops([[n] for n in self.ids], None if placement == "all" else [placement])
            a.targets = {"components": [[n] for n in self.ids], "client": placement}
        elif k == "one-way":
            node = self._resolve(f.param("node", LEADER), leader)
            out = f.param("direction", "out") == "out"
            a.drops = frozenset((node, o) if out else (o, node) for o in others(node))
            a.targets = {"node": node, "direction": "its packets to the others" if out else "the others' to it"}
        elif k == "bridge":
            middle = self._resolve(f.param("middle", LEADER), leader)
            x, y = others(middle)[:2]
            a.drops = frozenset(drops_between([x], [y]))
            a.targets = {"middle": middle, "sides": [x, y]}
        elif k == "flap":
            node = self._resolve(f.param("node", LEADER), leader)
            a.drops = partition_drops([[node], others(node)], None)
            a.targets = {"node": node, "period_s": f.param("period_s", 1.0)}
        elif k == "latency":
            assert self.net is not None
            self.net.set_latency(int(f.param("latency_ms", 50)), int(f.param("jitter_ms", 25)))
            self._latency = True
            a.targets = {"latency_ms": f.param("latency_ms"), "jitter_ms": f.param("jitter_ms")}
        elif k == "kill":
            node = self._resolve(f.param("node", LEADER), leader)
            self._kill([node])
            a.targets, a.leader_lost = {"nodes": [node]}, node == leader
        elif k == "kill-several":
            nodes = [self._resolve(n, leader) for n in str(f.param("nodes")).split(",")]
            self._kill(nodes)
            a.targets = {"nodes": nodes}
        elif k == "pause":
            node = self._resolve(f.param("node", LEADER), leader)
            assert self.target.owned is not None
            self.target.owned.signal(node, signal.SIGSTOP)
            self._paused.add(node)
            a.targets, a.leader_lost = {"nodes": [node]}, node == leader
        elif k == "rolling-restart":
            a.targets = {"order": str(f.param("order", ",".join(self.ids))).split(",")}
        elif k == "full-restart":
            self._kill(list(self.ids))
            a.targets = {"nodes": list(self.ids)}
        if a.drops:
            assert self.net is not None
            self.net.cut(a.drops)
            a.detail = "dropped: " + ", ".join(f"{s}->{d}" for s, d in sorted(a.drops))
        self.log(f"fault {f.describe()} -> {a.targets}")
        return a

    def hold(self, a: AppliedFault, stop: Callable[[], bool]) -> None:
        """Keep the fault in place for its duration (flapping toggles it; a rolling restart runs)."""
        f = a.fault
        if f.kind == "rolling-restart":
            self._rolling(a.targets["order"], stop)
            return
        end = a.started_s + f.duration_s
        if f.kind == "flap":
            on = True
            period = float(f.param("period_s", 1.0))
            while time.monotonic() < end and not stop():
                time.sleep(max(0.0, min(period, end - time.monotonic())))
                on = not on
                assert self.net is not None
                self.net.cut(a.drops if on else frozenset())
            return
        while time.monotonic() < end and not stop():
            time.sleep(min(0.1, max(0.0, end - time.monotonic())))

    def heal(self, a: AppliedFault) -> None:
        if a.drops and self.net is not None:
            self.net.cut(frozenset())
        if a.fault.kind == "latency" and self.net is not None:
            self.net.set_latency(0, 0)
            self._latency = False
        self._resume_all()
        self._restart_killed()
        a.ended_s = time.monotonic()
        self.log(f"healed {a.fault.kind}")

    def heal_all(self) -> None:
        """Whatever happens, leave the cluster whole: no cuts, no latency, everything running."""
        if self.net is not None:
            try:
                self.net.heal()
            except Exception as e:  # the drill reports it; later steps fail visibly if it matters
                self.log(f"network heal failed: {e}")
        self._resume_all()
        self._restart_killed()

    # -- processes --

    def _kill(self, nodes: Iterable[str]) -> None:
        owned = self.target.owned
        assert owned is not None
        for n in nodes:
            owned.kill(n)
            self._killed.add(n)

    def _resume_all(self) -> None:
        owned = self.target.owned
        for n in sorted(self._paused):
            if owned is not None:
                owned.signal(n, signal.SIGCONT)
        self._paused.clear()

    def _restart_killed(self) -> None:
        owned = self.target.owned
        if owned is None or not self._killed:
            return
        nodes = sorted(self._killed)
        self._killed.clear()
        for n in nodes:
            owned.start(n)
        for n in nodes:
            owned.wait_serving(n, RESTART_WAIT_S)

    def _rolling(self, order: Sequence[str], stop: Callable[[], bool]) -> None:
        owned = self.target.owned
        assert owned is not None
        for n in order:
            if stop():
                return
            owned.stop(n)  # SIGTERM, SIGKILL after its grace
            time.sleep(self.rng.uniform(0.2, 1.0))
            owned.start(n)
            owned.wait_serving(n, RESTART_WAIT_S)
            if not self.target.wait_caught_up(n):
                self.log(f"rolling restart: {n} did not catch up within the bound; going on")
            self.log(f"rolling restart: {n} back")
