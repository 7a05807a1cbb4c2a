"""One simulated master node: its disks, and the production code that runs on them.

A :class:`SimNode` outlives its processes: its :class:`Disk` (the journal, state and file twins,
which keep what was durable across a crash) persists, and each start builds a fresh process
from the production classes: ``RaftReplica`` (pysyncobj's ``SyncObj`` via ``RaftNode``, with
``autoTick=False``, ticked by the simulator), the ``Service`` that answers protocol requests, and
the ``LeaderDuties``. Only I/O is simulated: the transport, the clock, the disks.

A crash happens at a durable step (a journal flush, an fsync, a rename, a state sync, a state
install) or between ticks: :class:`SimCrash` unwinds the node's stack from the step, the disks
keep only what was durable, the node's asyncio tasks are cancelled and its connections die.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tetherlab.chaos.sim.loop import Sim
from tetherlab.chaos.sim.net import SimRaftNode
from tetherlab.cluster.core.config import Address, ClusterSettings, NodeAddresses, NodeConfig, RaftTuning
from tetherlab.cluster.node.duties import LeaderDuties
from tetherlab.cluster.node.raftreplica import RaftReplica
from tetherlab.cluster.node.service import Peer, Service, ServiceSettings
from tetherlab.cluster.replica import pysyncobj_patches
from tetherlab.cluster.replica.files import MemoryFiles
from tetherlab.cluster.replica.memjournal import MemoryJournal
from tetherlab.cluster.replica.memstore import MemoryStore
from tetherlab.cluster.replica.raft import RaftIO, payload_of

EPOCH_MS = 1_800_000_000_000  # simulated wall clock at time 0
TICK_INTERVAL_S = 0.05  # pysyncobj's autoTickPeriod: the longest a node sleeps without events
WAKE_DELAY_S = 0.0003  # events within this of each other are handled in one tick (one poll returns them all)
FS_PREFIX = "simfs:/"


class SimCrash(BaseException):
    """The simulated machine crashed at this point: unwinds the node's stack (BaseException, so
    no ``except Exception`` in the node's code can swallow it)."""


class _Metric:
    """A prometheus metric that records nothing."""

    def labels(self, *args: Any, **kwargs: Any) -> _Metric:
        return self

    def inc(self, amount: float = 1.0) -> None:
        pass

    def dec(self, amount: float = 1.0) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass

    def set_function(self, f: Any) -> None:
        pass


class NullMetrics:
    """NodeMetrics' shape, recording nothing (prometheus objects per node would cost more than
    the whole schedule)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Metric()


class SimClock:
    """The node's clock (``node.clock.Clock``): monotonic time is simulated time; ``now_ms`` is
    the wall clock read at start (with this incarnation's skew) advanced by monotonic time, as
    ``SystemClock`` does."""

    def __init__(self, sim: Sim, skew_ms: int) -> None:
        self.sim = sim
        self.skew_ms = skew_ms

    def monotonic(self) -> float:
        return self.sim.now

    def now_ms(self) -> int:
        return EPOCH_MS + int(self.sim.now * 1000) + self.skew_ms

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class Applied:
    """Every entry any replica applied (index -> payload, first seen), and who disagreed."""

    def __init__(self) -> None:
        self.first: dict[int, tuple[str, bytes]] = {}
        self.conflicts: list[str] = []

    def record(self, node: str, index: int, payload: bytes) -> None:
        seen = self.first.get(index)
        if seen is None:
            self.first[index] = (node, payload)
        elif seen[1] != payload and len(self.conflicts) < 20:
            self.conflicts.append(f"index {index}: {seen[0]} applied {seen[1][:80]!r}, {node} applied {payload[:80]!r}")


class SimStore(MemoryStore):
    """The memory store, telling the simulator what it applies (not what it skips as a replay)."""

    def __init__(self, node_id: str, applied: Applied, files: MemoryFiles, step: Callable[[str], None]) -> None:
        super().__init__(files=files, step=step)
        self.node_id = node_id
        self.applied_log = applied

    on_applied: Callable[[bytes], None] | None = None  # the node's hook: what applying this cost

    def apply(self, index: int, payload: bytes) -> dict[str, Any]:
        if index <= self.applied_index:
            return super().apply(index, payload)
        self.applied_log.record(self.node_id, index, bytes(payload))
        result = super().apply(index, payload)
        if self.on_applied is not None:
            self.on_applied(payload)
        return result


class Disk:
    """A node's durable media: journal, state and files, with crash points at every durable step."""

    def __init__(self, sim: Sim, node_id: str, applied: Applied, seed_index: int = 1, seed_term: int = 0) -> None:
        self.sim = sim
        self.node_id = node_id
        self.armed = False  # crash points fire only while the simulator runs this node's code
        self.crash_in_steps: int | None = None  # crash at the n-th durable step from now
        self.crash_after: tuple[str, int] | None = None  # (step name, n): count n steps after that step
        self.steps = 0
        self.files = MemoryFiles(step=self._step)
        self.journal = MemoryJournal(seed_index=seed_index, seed_term=seed_term, step=self._step)
        self.store = SimStore(node_id, applied, self.files, self._step)

    def _step(self, name: str) -> None:
        self.steps += 1
        if self.sim.tracing:
            self.sim.note(self.node_id, f"disk: {name}")
        if self.armed and self.crash_in_steps is not None:
            self.crash_in_steps -= 1
            if self.crash_in_steps <= 0:
                self.crash_in_steps = None
                raise SimCrash(f"crash before {name}")
        if self.crash_after is not None and name == self.crash_after[0]:
            # This step completes; the crash comes n durable steps later (n = 1: the very next).
            self.crash_in_steps, self.crash_after = self.crash_after[1], None

    def crash(self) -> None:
        self.journal.crash()
        self.store.crash()
        self.files.crash()

    def revive(self) -> None:
        self.journal.revive()
        self.files.revive()


class Proc:
    """One running incarnation of a node."""

    def __init__(self, node: SimNode) -> None:
        self.node = node
        self.alive = True
        self.paused = False
        # Dicts, not sets: iteration follows insertion, never memory addresses (a seed replays).
        self.tasks: dict[asyncio.Task[Any], None] = {}
        self.tick_pending = False
        self.ticks = 0
        self.last_tick_at = float("-inf")
        self.boot_last = 0  # the last index of the durable log when this process started
        self.links: dict[Any, None] = {}  # open client links (the SSH connections)
        self.replica: RaftReplica
        self.service: Service
        self.duties: LeaderDuties

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks[task] = None
        task.add_done_callback(lambda t: self.tasks.pop(t, None))
        return task


class SimNode:
    def __init__(self, world: Any, node_id: str, raft_port: int, members: list[NodeAddresses],
                 tuning: RaftTuning, settings: ClusterSettings, applied: Applied) -> None:
        self.world = world
        self.sim: Sim = world.sim
        self.id = node_id
        self.addrs = NodeAddresses(node_id, Address(node_id, raft_port), Address(node_id, 22), Address(node_id, 80))
        self.raft_addr = str(self.addrs.raft)
        self.members = list(members)  # the members this node's config names (its peers at first start)
        self.tuning = tuning
        self.settings = settings
        self.disk = Disk(self.sim, node_id, applied)
        self.disk.store.on_applied = self._applied
        pysyncobj_patches.register_files(f"{FS_PREFIX}{node_id}/", self.disk.files)
        self.proc: Proc | None = None
        self.incarnation = 0
        self.skew_ms = 0
        self.removed = False  # removed from the cluster by a membership change: stays down

    @property
    def up(self) -> bool:
        return self.proc is not None and self.proc.alive

    def config(self) -> NodeConfig:
        peers = tuple(m for m in self.members if m.id != self.id)
        return NodeConfig(node=self.addrs, peers=peers, data_dir=Path(f"{FS_PREFIX}{self.id}"),
                          secret_file=Path("/nonexistent"), raft=self.tuning, cluster=self.settings)

    # --- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        assert self.proc is None
        self.incarnation += 1
        self.disk.revive()
        proc = Proc(self)
        proc.boot_last = self.disk.journal.durable_last_index()
        self.proc = proc
        w = self.world
        cfg = self.config()
        clock = SimClock(self.sim, self.skew_ms)
        io = RaftIO(journal=self.disk.journal, files=self.disk.files, transport_class=w.transport_class,
                    auto_tick=False, clock=clock.monotonic, node_class=SimRaftNode, fatal=self._fatal,
                    encrypt=False, state_sync_thread=False, wake=self.wake,
                    required_patches=w.required_patches, leader_flush_per_tick=w.leader_flush_per_tick)
        self.sim.note(self.id, f"start (incarnation {self.incarnation}, skew {self.skew_ms} ms)")
        self.disk.armed = True
        self.sim.current = self.id
        try:
            proc.replica = RaftReplica(cfg, b"", NullMetrics(), store=self.disk.store, io=io)  # type: ignore[arg-type]
        except SimCrash as e:
            self._crashed(str(e))
            return
        finally:
            self.disk.armed = False
        metrics: Any = NullMetrics()
        proc.service = Service(proc.replica, clock, ServiceSettings(
            node_id=self.id, version="sim", remote=self.settings.remote, session_ttl_s=self.settings.session_ttl_s,
            healthy_window_s=self.tuning.election_timeout_min_s), metrics, w.connections_for(self))
        proc.duties = LeaderDuties(proc.replica, clock, self.settings, metrics,
                                   on_lost_leadership=proc.replica.fail_pending)
        proc.spawn(proc.duties.run())
        for fn in w.on_node_started:
            fn(self)
        self._periodic_tick(proc)

    def _fatal(self, index: int) -> None:
        raise SimCrash(f"node stopped: cannot apply entry {index}")

    def crash(self, why: str, reset: bool = True) -> None:
        """The machine dies now (between ticks): what was not durable is lost."""
        if self.proc is None:
            return
        self._crashed(why, reset)

    def _crashed(self, why: str, reset: bool = True) -> None:
        proc = self.proc
        if proc is None:
            return
        self.sim.note(self.id, f"CRASH: {why}")
        self.world.stats["crashes"] += 1
        proc.alive = False
        self.proc = None
        self.disk.crash()
        self.world.net.detach(self.raft_addr, reset)
        for task in list(proc.tasks):
            task.cancel()
        pending = getattr(getattr(proc, "replica", None), "_pending", {})
        for fut in list(pending):
            if not fut.done():
                fut.cancel()
        for link in list(proc.links):
            link.broken("the node crashed")
        self.world.on_node_down(self)

    def pause(self) -> None:
        if self.proc is not None and not self.proc.paused:
            self.sim.note(self.id, "pause")
            self.proc.paused = True
            self.world.net.pause(self.raft_addr)

    def resume(self) -> None:
        if self.proc is not None and self.proc.paused:
            self.sim.note(self.id, "resume")
            self.proc.paused = False
            # pysyncobj's tick checks its election timer before it polls the sockets: a process that
            # wakes from SIGSTOP looks at its (expired) timer before it reads what queued up.
            self.tick()
            self.world.net.resume(self.raft_addr)
            self.wake()

    def _applied(self, payload: bytes) -> None:
        cost = self.world.apply_stall_s
        seconds = cost(self.id, payload) if cost is not None else 0.0
        if seconds > 0:
            self.stall(seconds)

    def stall(self, seconds: float) -> None:
        """The process works for ``seconds`` from here, inside its tick (a long apply): what it
        sends in the rest of the tick leaves when the work ends, what arrives meanwhile waits, and
        at the end the tick's poll reads it before the next tick (unlike :meth:`resume`)."""
        proc = self.proc
        if proc is None or proc.paused:
            return
        self.sim.note(self.id, f"stall {seconds:.3f} s")
        proc.paused = True
        self.world.net.pause(self.raft_addr)
        self.world.net.hold_sends(self.raft_addr, self.sim.now + seconds)
        self.sim.after(seconds, self._unstall, proc)

    def _unstall(self, proc: Proc) -> None:
        if self.proc is not proc or not proc.paused:
            return
        self.sim.note(self.id, "stall over")
        proc.paused = False
        self.world.net.resume(self.raft_addr)
        self.tick()

    # --- driving pysyncobj ------------------------------------------------------------------------------

    def _periodic_tick(self, proc: Proc) -> None:
        """pysyncobj's tick loop: a tick after every batch of events, and at least every
        TICK_INTERVAL_S (its poll timeout, counted from the last tick)."""
        if self.proc is not proc:
            return
        due = proc.last_tick_at + TICK_INTERVAL_S
        if self.sim.now + 1e-9 < due:
            self.sim.at(due, self._periodic_tick, proc)
            return
        self.tick()
        self.sim.after(TICK_INTERVAL_S, self._periodic_tick, proc)

    def wake(self) -> None:
        """Tick this node as soon as possible (a message arrived, a proposal was queued)."""
        proc = self.proc
        if proc is None or proc.tick_pending:
            return
        proc.tick_pending = True
        self.sim.after(WAKE_DELAY_S, self._wake_tick, proc)

    def _wake_tick(self, proc: Proc) -> None:
        proc.tick_pending = False
        if self.proc is proc:
            self.tick()

    def tick(self) -> None:
        proc = self.proc
        if proc is None or proc.paused:
            return
        self.disk.armed = True
        self.sim.current = self.id
        proc.last_tick_at = self.sim.now
        proc.replica.raft._SyncObj__transport.sent_in_tick = 0  # type: ignore[attr-defined]
        try:
            proc.replica.raft.doTick(0.0)
            proc.ticks += 1
            if proc.ticks == 1:
                self._check_boot(proc)
        except SimCrash as e:
            self._crashed(str(e))
        finally:
            self.disk.armed = False

    def _check_boot(self, proc: Proc) -> None:
        """A restart loads the snapshot and the log; it may drop entries the snapshot covers, never
        an entry after it: those are promises this node made (acknowledgements, votes)."""
        last = self.disk.journal.last_index or 0
        covered = proc.replica.raft.raftLastApplied  # the snapshot's last index once it is loaded
        if last < proc.boot_last and covered < proc.boot_last:
            self.world.invariant("durable_log_kept",
                                 f"{self.id} restarted with a durable log up to {proc.boot_last} and kept only "
                                 f"up to {last} (snapshot up to {covered}): entries {max(last, covered) + 1}.."
                                 f"{proc.boot_last} are gone")

    def run_armed(self, fn: Callable[[], Any], what: str) -> None:
        """Run a disk operation of this node's process (a state sync) with crash points armed."""
        proc = self.proc
        if proc is None or proc.paused:
            return
        self.disk.armed = True
        try:
            fn()
        except SimCrash as e:
            self._crashed(f"{e} ({what})")
        finally:
            self.disk.armed = False

    # --- inspection --------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        if self.proc is None:
            return {"role": "down"}
        st = self.proc.replica.status()
        return st if st else {"role": "starting"}

    def log_entries(self) -> list[tuple[bytes, int, int]]:
        return list(self.disk.journal[0:]) if len(self.disk.journal) else []

    def committed_payloads(self) -> dict[int, bytes]:
        """index -> payload of this node's log entries up to its commit index."""
        commit = self.disk.journal.getRaftCommitIndex()
        out: dict[int, bytes] = {}
        for cmd, idx, _term in self.log_entries():
            if idx > commit:
                break
            payload = payload_of(cmd)
            if payload is not None:
                out[idx] = payload
        return out


class ClientPeer(Peer):
    """The service's view of one client connection (notifications for its agents)."""
