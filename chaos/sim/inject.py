"""Known-bad behaviours the simulator must catch (``tetherlab sim --inject NAME``).

Each re-enables one bug for one run: a pysyncobj patch taken out again, or a durability or
consistency rule of ours switched off. A simulator that runs a bounded number of seeds with one
of these and reports no violation cannot find that class of bug: CI fails then
(tests/chaos/test_sim.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from tetherlab.cluster.node.service import Service
from tetherlab.cluster.replica import pysyncobj_patches

INJECTIONS: dict[str, str] = {
    "compaction-window": "pysyncobj's own __loadDumpFile: a crash between snapshot and compaction clears the "
                         "journal down to the snapshot, dropping acknowledged entries (patch load_dump_keeps_log off)",
    "snapshot-uncommitted": "a snapshot message (serialized, or serialized: None) commits entries nobody matched "
                            "against the leader's log (patch snapshot_commit off)",
    "leader-unflushed-commit": "the leader counts its unflushed entries toward their commit: it sends them before its "
                               "own fsync (as it should) but neither flushes after its sends nor before it "
                               "applies (patch leader_commit_durable off)",
    "journal-nofsync": "the journal never fsyncs; the OS writes it back about once a second",
    "local-read": "every node answers reads from its own applied state: no leader check, no read barrier",
}

PATCH_OFF = {"compaction-window": "load_dump_keeps_log", "snapshot-uncommitted": "snapshot_commit",
             "leader-unflushed-commit": "leader_commit_durable"}
READS = frozenset({"intents_list", "concepts_list", "concepts_show", "keys_list", "world_slice"})


class Injected:
    def __init__(self, name: str) -> None:
        self.name = name
        self._stack = contextlib.ExitStack()
        self._ticks: list[Callable[[Any], None]] = []

    def tick(self, node: Any) -> None:
        """About once a simulated second per node."""
        for fn in self._ticks:
            fn(node)

    def close(self) -> None:
        self._stack.close()


def apply(name: str, world: Any) -> Injected:
    if name not in INJECTIONS:
        raise KeyError(f"no injection {name!r}; known: {', '.join(INJECTIONS)}")
    inj = Injected(name)
    if name in PATCH_OFF:
        inj._stack.enter_context(pysyncobj_patches.without(PATCH_OFF[name]))
        world.required_patches = tuple(p for p in world.required_patches if p != PATCH_OFF[name])
        # The nodes start later (the schedule's first event), without the patch.
    if name == "leader-unflushed-commit":
        # Without the patch the leader counts itself for entries it sent before its fsync; take
        # away the flushes that would make them durable by the time it commits and applies them.
        world.leader_flush_per_tick = False
        for node in world.nodes.values():
            node.disk.journal.flush_on_commit = False
    elif name == "journal-nofsync":
        for node in world.nodes.values():
            node.disk.journal.fsync_enabled = False
        inj._ticks.append(lambda node: node.disk.journal.writeback())
    elif name == "local-read":
        world.on_node_started.append(_local_reads)
    return inj


def _local_reads(node: Any) -> None:
    proc = node.proc
    service: Service = proc.service
    original_route = service._route

    def route(req: Any) -> Any:
        return None if req.type in READS else original_route(req)

    async def no_barrier(timeout_s: float = 0.0) -> None:
        return None

    service._route = route  # type: ignore[method-assign]
    proc.replica.read_barrier = no_barrier  # type: ignore[method-assign]
