"""One schedule: a seed decides the cluster, the workload, every fault and every delay.

Phases (simulated seconds):

1. **faults** (``fault_phase_s``): the nodes start, the operator registers the agents' keys and
   the registry, the agents work; faults arrive at random moments (see :data:`FAULTS`): network
   partitions (symmetric, one-way, the leader cut off), connection resets, slow links, process
   pauses, crashes between ticks, crashes at the k-th durable step from now (inside a journal
   flush, a snapshot write, a rename, a compaction, a snapshot install, a state sync), forced
   snapshots, leadership transfers, clock skews, membership changes;
2. **heal**: every fault ends, every node restarts, the workload goes on for ``heal_phase_s``;
3. **settle**: the agents and the operator stop, a final write is made, the replicas must
   converge within ``settle_s_max``;
4. **check**: ``checks.run_all``.
"""

from __future__ import annotations

import asyncio
import random
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tetherlab.chaos.history import History
from tetherlab.chaos.sim import checks, inject
from tetherlab.chaos.sim.clients import ClusterUnavailable, Indeterminate, RequestError, SimClient, make_key
from tetherlab.chaos.sim.loop import SimError
from tetherlab.chaos.sim.net import LinkProfile
from tetherlab.chaos.sim.node import SimNode
from tetherlab.chaos.sim.workload import CONCEPTS, Agent, AgentConfig, Journal, Operator, OperatorConfig, registry_toml
from tetherlab.chaos.sim.world import World, WorldConfig
from tetherlab.cluster import protocol as p
from tetherlab.cluster.replica.raft import payload_of

FAULTS = ("partition", "one_way", "isolate_leader", "lag", "reset", "slow", "pause", "crash", "crash_leader",
          "crash_at_step", "crash_after_step", "compact", "transfer", "skew")
# Durable steps a crash is aimed after: a snapshot's rename and its directory fsync (then comes the
# compaction), a received snapshot's rename (then its install), a state install, a journal flush.
CRASH_AFTER = ("rename", "fsync_dir", "state_install", "journal_flush", "state_sync")


@dataclass
class ScheduleConfig:
    nodes: int = 3
    agents: int = 4
    fault_phase_s: float = 6.0
    heal_phase_s: float = 1.5
    settle_s_max: float = 20.0
    faults_per_s: tuple[float, float] = (0.3, 2.0)  # drawn per schedule: some calm, some stormy
    membership: bool = True
    inject: str | None = None
    apply_stalls: bool = False  # nodes stall in applies (Schedule._apply_stall)


@dataclass
class ScheduleResult:
    seed: int
    nodes: int
    violations: list[checks.Violation]
    stats: dict[str, Any] = field(default_factory=dict)
    trace: list[tuple[float, str, str]] = field(default_factory=list)
    wall_s: float = 0.0


class Schedule:
    def __init__(self, seed: int, cfg: ScheduleConfig, trace: bool = False) -> None:
        self.seed = seed
        self.cfg = cfg
        self.rng = _rng(seed, "plan")
        wcfg = WorldConfig(nodes=cfg.nodes, compaction_min_entries=self.rng.choice((4, 8, 16, 40, 200)))
        self.world = w = World(seed, wcfg, trace=trace)
        w.journal = Journal()
        w.membership_change = self.membership_change
        w.on_node_down = self._on_node_down  # type: ignore[method-assign]
        self.sim = w.sim
        self.fault_rng = self.sim.rng("faults")
        self.healing = False
        self.injected = inject.apply(cfg.inject, w) if cfg.inject else None
        if cfg.apply_stalls:
            self.stall_rng = self.sim.rng("apply-stalls")  # its own stream: the other draws stay
            w.apply_stall_s = self._apply_stall
        self.agents: list[Agent] = []
        self.tasks: list[asyncio.Task[Any]] = []
        self.operator: Operator | None = None
        self.final_write: tuple[bool, str] = (False, "not attempted")

    # --- the run ------------------------------------------------------------------------------------

    def run(self) -> ScheduleResult:
        t0 = time.perf_counter()
        w, cfg, sim = self.world, self.cfg, self.sim
        violations: list[checks.Violation] = []
        try:
            self._run_phases()
            violations = self._check()
        except SimError as e:
            violations = [checks.Violation("livelock", str(e))]
        except Exception as e:  # the node's code (or the simulator's) raised out of a tick: report it
            tb = traceback.extract_tb(e.__traceback__)[-4:]
            where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(tb))
            violations = [checks.Violation("internal_errors", f"{type(e).__name__}: {e} at {where}")]
        finally:
            w.close()
            if self.injected is not None:
                self.injected.close()
        return ScheduleResult(self.seed, cfg.nodes, violations, self._stats(), list(sim.trace),
                              time.perf_counter() - t0)

    def _run_phases(self) -> None:
        w, cfg, sim = self.world, self.cfg, self.sim
        for nid in w.members:
            sim.after(0.0, w.nodes[nid].start)
        for nid in w.members:
            self._state_syncs(w.nodes[nid])
        sim.after(0.0, self._start_workload)
        self._plan_faults()
        sim.at(cfg.fault_phase_s, self._heal)
        sim.at(cfg.fault_phase_s + cfg.heal_phase_s, self._stop_workload)
        sim.run(cfg.fault_phase_s + cfg.heal_phase_s)
        deadline = sim.now + cfg.settle_s_max
        while sim.now < deadline:
            sim.run(min(deadline, sim.now + 0.25))
            if self._settled():
                break

    def _stop_workload(self) -> None:
        for a in self.agents:
            a.stop()
        if self.operator is not None:
            self.operator.stop()
        self._spawn_final_write()

    def _start_workload(self) -> None:
        w = self.world
        acfg = AgentConfig(fail_closed_s=w.cfg.fail_closed_s)
        for i in range(self.cfg.agents):
            dev = f"dev{i}"
            agent = Agent(w, dev, make_key(f"{dev}-{self.seed}"), _rng(self.seed, f"agent{i}"), acfg)
            self.agents.append(agent)
        weights = OperatorConfig().weights
        if self.cfg.membership and self.rng.random() < 0.4:
            weights = {**weights, "membership": 0.8}
        self.operator = Operator(w, _rng(self.seed, "operator"), OperatorConfig(weights=weights), self.agents)
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self.operator.run())]
        for a in self.agents:
            self.tasks += [loop.create_task(a.main()), loop.create_task(a.heartbeats())]

    def _state_syncs(self, node: SimNode) -> None:
        """About once a second per node: what an injected fault does in the background (the OS
        writing back an unsynced journal)."""
        if self.injected is None:
            return

        def tick() -> None:
            if self.injected is not None:
                self.injected.tick(node)
            self.sim.after(self.fault_rng.uniform(0.5, 1.5), tick)
        self.sim.after(self.fault_rng.uniform(0.0, 1.0), tick)

    # --- faults -------------------------------------------------------------------------------------

    def _plan_faults(self) -> None:
        lo, hi = self.cfg.faults_per_s
        rate = self.rng.uniform(lo, hi)
        t = 0.5
        while True:
            t += self.rng.expovariate(rate)
            if t >= self.cfg.fault_phase_s - 0.3:
                break
            kind = self.rng.choice(FAULTS)
            self.sim.at(t, self._fault, kind)

    def _alive(self) -> list[SimNode]:
        return [self.world.nodes[n] for n in self.world.members if self.world.nodes[n].up]

    def _fault(self, kind: str) -> None:
        r, w, sim = self.fault_rng, self.world, self.sim
        members = [w.nodes[n] for n in w.members]
        if not members:
            return
        duration = r.uniform(0.2, 3.0)
        sim.note("nemesis", kind)
        if kind == "lag":
            # A follower cut off long enough that the others compact past it: it catches up by snapshot.
            followers = [n for n in members if n.up and n.status().get("role") != "leader"]
            if not followers:
                return
            node = r.choice(followers)
            duration = r.uniform(1.0, 4.0)
            rest = [n for n in w.nodes.values() if n is not node]
            for b in rest:
                w.net.block(node.raft_addr, b.raft_addr)
                w.net.block(b.raft_addr, node.raft_addr)
            sim.note("nemesis", f"lag {node.id} for {duration:.2f}s")
            sim.after(duration, self._unpartition, [node.raft_addr], [n.raft_addr for n in rest])
        elif kind == "partition":
            k = r.randint(1, max(1, len(members) // 2))
            side = r.sample(members, k)
            rest = [n for n in w.nodes.values() if n not in side]
            for a in side:
                for b in rest:
                    w.net.block(a.raft_addr, b.raft_addr)
                    w.net.block(b.raft_addr, a.raft_addr)
            sim.note("nemesis", f"partition {[n.id for n in side]} for {duration:.2f}s")
            sim.after(duration, self._unpartition, [n.raft_addr for n in side], [n.raft_addr for n in rest])
        elif kind in ("one_way", "isolate_leader"):
            if kind == "isolate_leader":
                duration = r.uniform(0.3, 4.0)
                leaders = w.leaders()
                if not leaders:
                    return
                a = leaders[0]
                others = [n for n in members if n is not a]
                dirs = [(a.raft_addr, b.raft_addr) for b in others] if r.random() < 0.5 else \
                    [(a.raft_addr, b.raft_addr) for b in others] + [(b.raft_addr, a.raft_addr) for b in others]
            else:
                a, b = r.sample(members, 2) if len(members) > 1 else (members[0], members[0])
                dirs = [(a.raft_addr, b.raft_addr)]
            for s, d in dirs:
                w.net.block(s, d)
            sim.note("nemesis", f"block {dirs} for {duration:.2f}s")
            sim.after(duration, self._unblock, dirs)
        elif kind == "reset":
            a, b = r.sample(members, 2) if len(members) > 1 else (members[0], members[0])
            w.net.reset(a.raft_addr, b.raft_addr)
        elif kind == "slow":
            node = r.choice(members)
            prof = LinkProfile(base_s=0.002, jitter_s=0.02, spike_probability=0.2, spike_s=r.uniform(0.05, 0.8))
            keys = [(node.raft_addr, m.raft_addr) for m in members] + [(m.raft_addr, node.raft_addr) for m in members]
            for k in keys:
                w.net.profiles[k] = prof
            sim.after(duration, self._unslow, keys)
        elif kind == "pause":
            node = r.choice(members)
            node.pause()
            sim.after(duration, w.resume, node)
        elif kind in ("crash", "crash_leader"):
            targets = w.leaders() if kind == "crash_leader" else [n for n in members if n.up]
            if targets:
                node = r.choice(targets)
                node.crash(f"nemesis {kind}", reset=r.random() < 0.5)
        elif kind == "crash_after_step":
            node = r.choice(members)
            node.disk.crash_after = (r.choice(CRASH_AFTER), r.randint(1, 3))
            sim.note("nemesis", f"{node.id} crashes {node.disk.crash_after[1]} durable step(s) after its next "
                                f"{node.disk.crash_after[0]}")
            if node.disk.crash_after[0] in ("rename", "fsync_dir") and node.up and r.random() < 0.5:
                node.proc.replica.raft.forceLogCompaction()  # type: ignore[union-attr]
                node.wake()
        elif kind == "crash_at_step":
            node = r.choice(members)
            node.disk.crash_in_steps = r.randint(1, 16)
            sim.note("nemesis", f"{node.id} crashes at its durable step {node.disk.crash_in_steps} from now")
        elif kind == "compact":
            node = r.choice(members)
            if node.up:
                node.proc.replica.raft.forceLogCompaction()  # type: ignore[union-attr]
                node.wake()
        elif kind == "transfer":
            for node in w.leaders():
                node.proc.replica.raft.transferLeadership()  # type: ignore[union-attr]
        elif kind == "skew":
            node = r.choice(members)
            node.skew_ms = r.randint(-500, 500)  # applies from its next start (SystemClock anchors there)

    def _apply_stall(self, node_id: str, payload: bytes) -> float:
        """How long applying ``payload`` keeps a node busy: a registry push 0.3 to 3 s (on a real
        node a 10,000-concept one took over a second), any other entry now and then up to 1.5 s
        (a collection, a slow disk); both past the election timeouts (0.6 to 1.2 s)."""
        r = self.stall_rng
        if b'"push_registry"' in payload:
            return r.uniform(0.3, 3.0)
        return r.uniform(0.05, 1.5) if r.random() < 0.01 else 0.0

    def _unpartition(self, side: list[str], rest: list[str]) -> None:
        for a in side:
            for b in rest:
                self.world.net.unblock(a, b)
                self.world.net.unblock(b, a)

    def _unblock(self, dirs: list[tuple[str, str]]) -> None:
        for s, d in dirs:
            self.world.net.unblock(s, d)

    def _unslow(self, keys: list[tuple[str, str]]) -> None:
        for k in keys:
            self.world.net.profiles.pop(k, None)

    def _on_node_down(self, node: SimNode) -> None:
        self.world._deferred.pop(node.id, None)
        if node.removed:
            return
        delay = self.fault_rng.uniform(0.05, 2.5) if not self.healing else 0.05
        self.sim.after(delay, self._restart, node)

    def _restart(self, node: SimNode) -> None:
        if node.proc is None and not node.removed:
            self.world.stats["restarts"] += 1
            node.start()

    def _heal(self) -> None:
        w = self.world
        self.healing = True
        self.sim.note("nemesis", "heal")
        w.net.heal_all()
        w.net.profiles.clear()
        for node in w.nodes.values():
            node.disk.crash_in_steps = None
            node.disk.crash_after = None
            if node.proc is not None and node.proc.paused:
                w.resume(node)
            if node.proc is None and node.id in w.members and not node.removed:
                self.sim.after(0.0, self._restart, node)

    # --- membership (the operator's action) -------------------------------------------------------------

    async def membership_change(self, operator: Operator) -> None:
        w = self.world
        if len(w.members) <= self.cfg.nodes:
            spare = next((n for n in w.nodes.values() if n.id not in w.members and not n.removed
                          and n.incarnation == 0), None)
            if spare is None:
                return
            a = spare.addrs
            outcome, _ = await operator._call(p.ClusterAdd, 6.0, False, node_id=a.id, raft=str(a.raft),
                                                ssh=str(a.ssh), http=str(a.http))
            self.sim.note("operator", f"cluster add {a.id}: {outcome}")
            if outcome == "failed":
                return
            spare.members = [w.addresses[[x.id for x in w.addresses].index(m)] for m in w.members] + [a]
            w.members.append(a.id)
            self._state_syncs(spare)
            spare.start()
        else:
            leader = w.serving_leader()
            target = self.fault_rng.choice(list(w.members))
            outcome = "failed"
            for _ in range(4):
                outcome, _ = await operator._call(p.ClusterRemove, 6.0, False, node_id=target)
                if outcome != "failed":
                    break
                await asyncio.sleep(1.0)  # leader_moving: leadership is handed over, then retry
            self.sim.note("operator", f"cluster remove {target} (leader {leader.id if leader else None}): {outcome}")
            if outcome == "ok":
                w.members.remove(target)
                node = w.nodes[target]
                node.removed = True
                node.crash("removed from the cluster")

    # --- settle and check ------------------------------------------------------------------------------

    def _spawn_final_write(self) -> None:
        self.tasks.append(asyncio.get_running_loop().create_task(self._final_write()))

    async def _final_write(self) -> None:
        client = SimClient(self.world, "admin", self.world.admin_key, _rng(self.seed, "final"))
        try:
            res = await client.call(p.ConceptsPush, self.cfg.settle_s_max - 2.0, True, toml=registry_toml(999))
            self.final_write = (True, f"final write at index {res.get('index')}")
        except (ClusterUnavailable, RequestError, Indeterminate, TimeoutError, ConnectionError) as e:
            self.final_write = (False, f"final write failed: {e}")
        finally:
            client.close()
        self.sim.note("schedule", self.final_write[1])

    def _settled(self) -> bool:
        if not self.final_write[0]:
            return False
        w = self.world
        leader = w.serving_leader()
        if leader is None:
            return False
        nodes = [w.nodes[n] for n in self._final_members()]
        if not all(n.up for n in nodes):
            return False
        commit = leader.status().get("commit_index")
        return all(n.status().get("applied_index") == commit for n in nodes) and \
            len({n.disk.store.applied_index for n in nodes}) == 1

    def _final_members(self) -> list[str]:
        leader = self.world.serving_leader()
        if leader is None or leader.proc is None:
            return list(self.world.members)
        raft = leader.proc.replica.raft
        addrs = {raft.selfNode.address, *(n.address for n in raft.otherNodes)}
        return sorted(n.id for n in self.world.nodes.values() if n.raft_addr in addrs)

    def _check(self) -> list[checks.Violation]:
        w = self.world
        members = self._final_members()
        dumps = {n: w.nodes[n].disk.store.dump() for n in members if w.nodes[n].up}
        history: History = w.recorder.history()
        final_log: dict[int, bytes] = {}
        leader = w.serving_leader()
        if leader is not None:
            commit = leader.status().get("commit_index") or 0
            for cmd, idx, _term in leader.log_entries():
                if idx <= commit:
                    payload = payload_of(cmd)
                    if payload is not None:
                        final_log[idx] = payload
        errors = list(w.sim.loop.errors)
        return checks.run_all(history=history, journal=w.journal, dumps=dumps, members=members,
                              applied=w.applied.first, conflicts=w.applied.conflicts, final_log=final_log,
                              final_write_ok=self.final_write[0] and self._settled(),
                              final_write_detail=self.final_write[1], policies=CONCEPTS, internal_errors=errors,
                              invariants=w.invariants)

    def _stats(self) -> dict[str, Any]:
        w = self.world
        h = w.recorder.history()
        return {**w.stats, "sim_s": round(self.sim.now, 2), "events": self.sim.events_run,
                "raft_messages": w.net.delivered, "ops": len(h.ops), "runs": len(h.runs),
                "grants": sum(1 for o in h.ops if o.is_grant),
                "applied_max": max((n.disk.store.applied_index for n in w.nodes.values()), default=0),
                "snapshots": sum(n.disk.files.fsyncs for n in w.nodes.values())}


def _rng(seed: int, name: str) -> random.Random:
    return random.Random(f"{seed}:{name}")


def run_seed(seed: int, nodes: int = 3, inject_name: str | None = None, trace: bool = False,
             apply_stalls: bool = False) -> ScheduleResult:
    cfg = ScheduleConfig(nodes=nodes, inject=inject_name, apply_stalls=apply_stalls)
    return Schedule(seed, cfg, trace=trace).run()
