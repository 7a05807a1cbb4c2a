"""One simulated cluster: the nodes, the networks, the clients, and what they recorded.

:class:`World` wires :class:`~tetherlab.chaos.sim.node.SimNode` s over a
:class:`~tetherlab.chaos.sim.net.RaftNet` and hands the workload and the nemesis the handles
they need. It knows nothing of a particular schedule (see ``schedule.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tetherlab.chaos.history import Recorder
from tetherlab.chaos.sim.clients import Connections, SimKey, make_key
from tetherlab.chaos.sim.loop import Sim
from tetherlab.chaos.sim.net import RaftNet, SimTransport
from tetherlab.chaos.sim.node import Applied, SimNode
from tetherlab.cluster.core.config import Address, ClusterSettings, NodeAddresses, RaftTuning
from tetherlab.cluster.replica import pysyncobj_patches
from tetherlab.cluster.replica.raft import REQUIRED_PATCHES

REMOTE = "git@sim.example:acme/shop.git"
NODE_LOGGERS = ("tetherlab", "pysyncobj")


class _TraceHandler(logging.Handler):
    """The node code's log records, into the schedule's trace under the node that logged them."""

    def __init__(self, sim: Sim) -> None:
        super().__init__(logging.INFO)
        self.sim = sim

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sim.note(self.sim.current, f"log {record.levelname.lower()}: {record.getMessage()}")
        except Exception:  # a bad log call must not end the schedule
            pass
ADMIN = "admin"
RAFT_PORT = 4000
INVARIANT_RECORDS_MAX = 100


@dataclass
class WorldConfig:
    nodes: int = 3
    spare_nodes: int = 1  # node ids kept for membership additions
    session_ttl_s: int = 4
    fail_closed_s: float = 2.0
    compaction_min_entries: int = 40
    client_delay_s: tuple[float, float] = (0.0005, 0.004)
    client_reset_probability: float = 0.002
    tuning: RaftTuning = field(default_factory=RaftTuning)


class World:
    def __init__(self, seed: int, cfg: WorldConfig, trace: bool = True) -> None:
        if not pysyncobj_patches.installed():
            pysyncobj_patches.install()  # else as they are: a test may have taken one out (``without``)
        self.seed = seed
        self.cfg = cfg
        self.sim = Sim(seed, trace=trace)
        self._log_handler: _TraceHandler | None = None
        # The node loggers are the process's: put back as they were at close, or a later test in
        # the same process (one reading a node's warnings through pytest's caplog) hears nothing.
        self._saved_loggers = [(lg, lg.level, lg.propagate) for lg in map(logging.getLogger, NODE_LOGGERS)]
        for name in NODE_LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO if trace else logging.CRITICAL + 1)
            logging.getLogger(name).propagate = not trace
        if trace:
            self._log_handler = _TraceHandler(self.sim)
            for name in NODE_LOGGERS:
                logging.getLogger(name).addHandler(self._log_handler)
        self.stats: dict[str, int] = {"crashes": 0, "restarts": 0, "snapshots": 0}
        self.rng_client = self.sim.rng("client-net")
        pysyncobj_patches.use_clock_and_rng(lambda: self.sim.now, self.sim.rng("pysyncobj"))
        self.tuning = RaftTuning(**{**cfg.tuning.__dict__, "compaction_min_entries": cfg.compaction_min_entries})
        self.admin_key: SimKey = make_key("admin")
        self.settings = ClusterSettings(remote=REMOTE, bootstrap_admin_keys=(self.admin_key.line,),
                                        bootstrap_admin_developer=ADMIN, session_ttl_s=cfg.session_ttl_s)
        self.net = RaftNet(self.sim, self.tuning.connection_timeout_s, self.tuning.connection_retry_s,
                           on_deliver=self._on_deliver)
        self.net.trace_messages = trace
        self.transport_class: type = type("WorldTransport", (SimTransport,), {"net": self.net})
        self.applied = Applied()
        self.recorder = Recorder(cfg.fail_closed_s)
        total = cfg.nodes + cfg.spare_nodes
        self.addresses = [NodeAddresses(f"n{i}", Address(f"n{i}", RAFT_PORT + i), Address(f"n{i}", 22),
                                        Address(f"n{i}", 80)) for i in range(1, total + 1)]
        members = self.addresses[: cfg.nodes]
        self.nodes: dict[str, SimNode] = {}
        for a in self.addresses:
            self.nodes[a.id] = SimNode(self, a.id, a.raft.port, members, self.tuning, self.settings, self.applied)
        self.members: list[str] = [a.id for a in members]  # the Raft membership as the operators know it
        self._deferred: dict[str, list[tuple[Callable[..., Any], tuple[Any, ...]]]] = {}
        self.on_node_started: list[Callable[[SimNode], None]] = []
        self.invariants: list[tuple[str, str]] = []
        # The nodes run with the patches installed now (all of them, unless a test or an injection
        # took one out on purpose to show what goes wrong without it).
        installed = set(pysyncobj_patches.installed())
        self.required_patches: tuple[str, ...] = tuple(p for p in REQUIRED_PATCHES if p in installed)
        self.leader_flush_per_tick = True  # off only for the leader-unflushed-commit fault
        # How long applying an entry keeps a node busy (node id, payload): simulated applies take no
        # time unless a test says so (a large registry push takes seconds on a real node).
        self.apply_stall_s: Callable[[str, bytes], float] | None = None
        self.journal: Any = None  # the workload's Journal (set by the schedule)
        self._maintain()

    # --- network glue -------------------------------------------------------------------------------

    def _maintain(self) -> None:
        self.net.maintain()
        self.sim.after(0.1, self._maintain)

    def _on_deliver(self, addr: str) -> None:
        node = self.node_by_raft(addr)
        if node is not None:
            node.wake()

    def node_by_raft(self, addr: str) -> SimNode | None:
        for n in self.nodes.values():
            if n.raft_addr == addr:
                return n
        return None

    def connections_for(self, node: SimNode) -> Connections:
        return Connections(node)

    def client_delay(self) -> float:
        lo, hi = self.cfg.client_delay_s
        return lo + self.rng_client.random() * (hi - lo)

    def client_reset(self) -> bool:
        return self.rng_client.random() < self.cfg.client_reset_probability

    def client_node_ids(self) -> list[str]:
        return list(self.members)

    def defer_until_resumed(self, node: SimNode, fn: Callable[..., Any], *args: Any) -> None:
        self._deferred.setdefault(node.id, []).append((fn, args))

    def resume(self, node: SimNode) -> None:
        node.resume()
        for fn, args in self._deferred.pop(node.id, []):
            fn(*args)

    def on_node_down(self, node: SimNode) -> None:
        self._deferred.pop(node.id, None)

    def invariant(self, check: str, detail: str) -> None:
        """An invariant the simulator checks as it runs was broken (reported with the others)."""
        self.sim.note("CHECK", f"{check}: {detail}")
        if len(self.invariants) < INVARIANT_RECORDS_MAX:
            self.invariants.append((check, detail))

    # --- views ---------------------------------------------------------------------------------------

    def leaders(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.up and n.status().get("role") == "leader"]

    def serving_leader(self) -> SimNode | None:
        for n in self.nodes.values():
            if n.up and n.status().get("quorum_backed"):
                return n
        return None

    def close(self) -> None:
        if self._log_handler is not None:
            for name in NODE_LOGGERS:
                logging.getLogger(name).removeHandler(self._log_handler)
        for lg, level, propagate in self._saved_loggers:
            lg.setLevel(level)
            lg.propagate = propagate
        self.sim.close()
        pysyncobj_patches.use_clock_and_rng()
