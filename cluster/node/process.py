"""One master node process: the wiring of a Raft replica and its front doors.

``tetherlab master --config FILE.toml`` runs :func:`run_node`. A :class:`MasterNode` is:

- a :class:`~tetherlab.cluster.node.raftreplica.RaftReplica` (pysyncobj over the LMDB journal
  and store; pysyncobj ticks on its own thread, results come back through the event loop);
- the :class:`~tetherlab.cluster.node.service.Service` (what each protocol request does), behind
  the SSH endpoint; the leader's duties; the HTTP endpoint; the local control socket;
- metrics, and the clock (:class:`~tetherlab.cluster.node.clock.SystemClock`).

Everything here only connects parts; each part is tested on its own (the service and the
duties over an in-memory replica and a fake clock).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from tetherlab.cluster import __version__
from tetherlab.cluster.core.config import Address, NodeAddresses, NodeConfig
from tetherlab.cluster.core.exitcodes import EXIT_FAILED, EXIT_OK
from tetherlab.cluster.node.access import AccessRule
from tetherlab.cluster.node.clock import SystemClock
from tetherlab.cluster.node.control import ControlServer
from tetherlab.cluster.node.duties import LeaderDuties
from tetherlab.cluster.node.errors import StartupError
from tetherlab.cluster.node.gcpolicy import GcPauses, GcPolicy
from tetherlab.cluster.node.heap import keep_heap
from tetherlab.cluster.node.http import HttpApi
from tetherlab.cluster.node.matcher import ProcessMatcher
from tetherlab.cluster.node.metrics import NodeCollector, NodeMetrics
from tetherlab.cluster.node.raftreplica import RaftReplica
from tetherlab.cluster.node.replica import MEMBERS_NS
from tetherlab.cluster.node.service import Service, ServiceSettings
from tetherlab.cluster.node.sockets import bind_error
from tetherlab.cluster.node.ssh import SshEndpoint
from tetherlab.cluster.node.ui import WorldView
from tetherlab.cluster.replica import pysyncobj_patches
from tetherlab.cluster.replica.lmdbstore import LmdbStore

log = logging.getLogger("tetherlab.node")
BACKUP_CATCH_UP_TIMEOUT_S = 10.0  # for the state's commit to reach the backup's Raft index
# How often the garbage-collection policy is asked: well under FREEZE_EVERY_S, so a sleep that
# wakes a little early does not put off a freeze by a whole interval.
GC_TICK_S = 0.25


def backup_header(store: LmdbStore) -> dict[str, Any]:
    """What a backup says about itself: indexes, registry version, when."""
    stats = store.engine_view(lambda e: e.stats())
    return {"kind": "backup", "created_unix": int(time.time()), "registry_version": stats.get("registry_version", 0),
            "active_intents": stats.get("active_intents", 0)}


class MasterNode:
    def __init__(self, cfg: NodeConfig, secret: bytes) -> None:
        self.cfg = cfg
        self.started_at = time.time()
        self.loop = asyncio.get_running_loop()
        self.version = __version__
        self.clock = SystemClock()
        self.metrics = NodeMetrics()
        self.gc = GcPolicy()
        self.replica = RaftReplica(cfg, secret, self.metrics, large_apply=self.gc.paused)
        self.store = self.replica.store
        self.metrics.attach(NodeCollector(self.replica.status, self._lmdb_sizes, self._coordination_stats))
        self._leader_seen: str | None = None
        self.ssh = SshEndpoint(cfg.node.ssh, cfg.ssh_host_key, cfg.id, self.version, self.store, self.metrics,
                               cfg.limits)
        self.matcher = ProcessMatcher(cfg.match_worker, queued=self.replica.proposals_in_flight,
                                      on_match=lambda where: self.metrics.proposer_matches.labels(where).inc(),
                                      on_up=lambda up: self.metrics.match_worker_up.set(1 if up else 0))
        self.service = Service(
            self.replica, self.clock,
            ServiceSettings(node_id=cfg.id, version=self.version, remote=cfg.cluster.remote,
                            session_ttl_s=cfg.cluster.session_ttl_s, healthy_window_s=cfg.raft.election_timeout_min_s,
                            limits=cfg.limits),
            self.metrics, self.ssh, self.matcher)
        self.ssh.service = self.service
        self.duties = LeaderDuties(self.replica, self.clock, cfg.cluster, self.metrics,
                                   on_lost_leadership=self.replica.fail_pending)
        self.access = AccessRule(self.store, cfg.http.read_token_sha256)
        self.replica.add_apply_listener(self.access.on_applied)
        self.world = WorldView(cfg.id, self.replica, self.status, self._members_addresses)
        self.http = HttpApi(cfg.node.http, cfg.id, self.replica, self.metrics, self.status, self._before_scrape,
                            self.access, self.world, cfg.limits)
        self.control = ControlServer(cfg.data_dir / "control.sock", self.replica, self.status, self._backup,
                                     self.replica.compact, self.clock.now_ms)
        self._duties: asyncio.Task[None] | None = None
        by_generation = [self.metrics.gc_pause_seconds.labels(str(g)) for g in range(3)]  # resolved once
        self.gc_pauses = GcPauses(lambda g, s: by_generation[min(g, 2)].observe(s))
        self._gc_task: asyncio.Task[None] | None = None

    def _members_addresses(self) -> list[NodeAddresses]:
        """Every member's addresses, those added online included (for the world view's health)."""
        by_id = {n.id: n for n in self.cfg.all_nodes()}
        out = []
        for nid in self.replica.members():
            if nid in by_id:
                out.append(by_id[nid])
            else:
                rec = self.store.get(MEMBERS_NS, nid)
                if rec is not None:
                    m = json.loads(rec.value)
                    out.append(NodeAddresses(nid, Address.parse(m["raft"], "raft"), Address.parse(m["ssh"], "ssh"),
                                             Address.parse(m["http"], "http")))
        return out

    def _lmdb_sizes(self) -> dict[str, dict[str, int]]:
        return {"log": self.replica.raft.tl_log_sizes(), "state": self.store.size_info()}

    def _coordination_stats(self) -> dict[str, int]:
        stats: dict[str, int] = self.store.engine_view(lambda e: e.stats())
        return stats

    def _before_scrape(self) -> None:
        self.status()  # notes leader changes between scrapes too
        self.metrics.shims_failing_closed.set(self.service.failing_closed())

    def status(self) -> dict[str, Any]:
        st = dict(self.replica.status())
        leader = st.get("leader")
        if leader is not None and leader != self._leader_seen:
            if self._leader_seen is not None:
                self.metrics.leader_changes.inc()
            self._leader_seen = leader
        st.update(
            {
                "version": self.version,
                "raft": str(self.cfg.node.raft),
                "ssh": str(self.cfg.node.ssh),
                "http": str(self.cfg.node.http),
                "uptime_s": round(time.time() - self.started_at, 1),
                "store": {"applied_index": self.store.applied_index, "revision": self.store.revision},
            }
        )
        st.pop("at_monotonic", None)
        return st

    async def _backup(self, path: Path) -> dict[str, Any]:
        # The read barrier before this (control.py) can be answered before its batch is committed
        # to LMDB (an engine-only batch's results go out first), and the copy is of the committed
        # state: wait until that has caught up with everything applied by now.
        target = self.store.last_applied_index()
        if not await self.loop.run_in_executor(None, self.store.wait_committed, target, BACKUP_CATCH_UP_TIMEOUT_S):
            raise TimeoutError(f"the state's commit did not reach Raft index {target} within "
                               f"{BACKUP_CATCH_UP_TIMEOUT_S:.0f} s; nothing was written")
        hdr = {**backup_header(self.store), "node": self.cfg.id,
               "raft_commit_index": self.replica.commit_index(),
               "members": [n.to_json() for n in self.cfg.all_nodes()]}
        header: dict[str, Any] = await self.loop.run_in_executor(None, self.store.write_snapshot, path, hdr)
        return header

    async def start(self) -> None:
        """Listen on every address, or raise :class:`StartupError` naming the one that failed (a
        node that cannot listen would look alive and never serve)."""
        raft = self.cfg.node.raft
        if not await self.replica.wait_listening():
            why = bind_error(raft.host, raft.port) or "pysyncobj could not bind it (it is free now)"
            raise StartupError(f"cannot listen on the Raft address {raft}: {why}")
        for what, where, start in (("HTTP address", str(self.cfg.node.http), self.http.start),
                                   ("control socket", str(self.control.path), self.control.start),
                                   ("SSH address", str(self.cfg.node.ssh), self.ssh.start)):
            try:
                await start()
            except OSError as e:
                raise StartupError(f"cannot listen on the {what} {where}: {e.strerror or e}") from None
        self.matcher.start()
        self._duties = self.loop.create_task(self.duties.run())
        self.gc.start(self.clock.monotonic())  # the state is loaded: freeze it
        self.gc_pauses.install()
        self._gc_task = self.loop.create_task(self._gc_housekeeping())

    async def _gc_housekeeping(self) -> None:
        while True:
            await asyncio.sleep(GC_TICK_S)
            self.gc.tick(self.clock.monotonic())

    async def stop(self) -> None:
        if self._duties is not None:
            self._duties.cancel()
        self.gc_pauses.remove()
        if self._gc_task is not None:
            self._gc_task.cancel()
        await self.ssh.stop()
        await self.matcher.close()
        self.control.close()
        await self.http.stop()
        await self.replica.stop()


async def _serve(cfg: NodeConfig, secret: bytes, ready_file: Path | None) -> None:
    node = MasterNode(cfg, secret)
    try:
        await node.start()
    except StartupError:
        await node.stop()  # the Raft thread and whatever listens already
        raise
    log.info("node %s serving: raft %s, http %s (data %s)", cfg.id, cfg.node.raft, cfg.node.http, cfg.data_dir)
    if ready_file is not None:
        ready_file.write_text(json.dumps({"pid": os.getpid(), "id": cfg.id}))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("node %s stopping", cfg.id)
    await node.stop()


def run_node(cfg: NodeConfig, secret: bytes, ready_file: Path | None = None) -> int:
    pysyncobj_patches.install()
    keep_heap()
    try:
        asyncio.run(_serve(cfg, secret, ready_file))
    except StartupError as e:
        log.error("node %s cannot start: %s", cfg.id, e)
        return EXIT_FAILED
    return EXIT_OK
