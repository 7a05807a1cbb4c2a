"""The production :class:`~tetherlab.cluster.node.replica.Replica`: pysyncobj over LMDB.

pysyncobj ticks on its own thread; this adapter owns the bridge to the asyncio loop:

- proposals: each waits on a future; results come back from the tick thread in one batch per
  tick, with the tick's applied entries (one cross-thread wake-up, not one per command);
- the read barrier: a no-op through the log, batched (readers arriving while one is in flight
  join the next: the in-flight one may sit in the log before a write they must see);
- membership: pysyncobj's dynamic membership, and the ``members`` namespace that records the
  addresses of nodes added online;
- apply listeners: every applied entry is handed to the loop for whoever listens (metrics,
  key revocation closing SSH connections, membership, the world view), in log order, before
  the results of the same tick.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from tetherlab.cluster.core import statemachine as sm
from tetherlab.cluster.core.apply import Outcome
from tetherlab.cluster.core.config import NodeConfig
from tetherlab.cluster.core.engine.commands import Command as EngineCommand
from tetherlab.cluster.node.deadlines import Expired, Expiry
from tetherlab.cluster.node.errors import Indeterminate, Unavailable
from tetherlab.cluster.node.metrics import NodeMetrics
from tetherlab.cluster.node.replica import (
    MEMBERS_NS,
    PROPOSE_TIMEOUT_S,
    READ_TIMEOUT_S,
    ApplyListener,
    engine_entry,
)
from tetherlab.cluster.replica.lmdbstore import LmdbStore
from tetherlab.cluster.replica.raft import FailReason, RaftIO, RaftNode
from tetherlab.cluster.replica.store import Store

log = logging.getLogger("tetherlab.node")

STOP_TIMEOUT_S = 5.0  # bound on waiting for the Raft thread at shutdown
# The Raft thread refreshes the status every 50 ms; one this old means the thread is stalled, and
# what it last saw (a majority answering) vouches for nothing now.
STATUS_STALE_S = 1.0
MEMBERS_MAX = 1000
LISTEN_TIMEOUT_S = 15.0  # pysyncobj gives up binding after 25 tries 0.2 s apart; this bounds the wait anyway

_Result = tuple[asyncio.Future[dict[str, Any]], Any, int]


class RaftReplica:
    def __init__(self, cfg: NodeConfig, secret: bytes, metrics: NodeMetrics, store: Store | None = None,
                 io: RaftIO | None = None,
                 large_apply: Callable[[], AbstractContextManager[Any]] | None = None) -> None:
        """Production opens the LMDB store and journal under ``cfg.data_dir`` (``large_apply``:
        :attr:`RaftIO.large_apply`); the simulator passes its in-memory store and a
        :class:`RaftIO` of twins."""
        self.cfg = cfg
        self.node_id = cfg.id
        self.loop = asyncio.get_running_loop()
        self.metrics = metrics
        if store is None:
            cfg.data_dir.mkdir(parents=True, exist_ok=True)
            store = LmdbStore(cfg.data_dir / "state", cfg.raft.state_map_size_bytes, batch_applies=True)
        self.store = store
        # Before the Raft node exists: its tick thread may apply (a replay) as soon as it starts.
        # Ordered (a dict, not a set): failing them goes in proposal order, the same on every run.
        self._pending: dict[asyncio.Future[dict[str, Any]], None] = {}
        self._results: collections.deque[_Result] = collections.deque()
        self._applied: collections.deque[Outcome] = collections.deque()
        self._listeners: list[ApplyListener] = []
        self.store.on_apply = self._on_apply
        m = metrics
        # Read when scraped: an inc and a dec per proposal (each a lock) cost more than the count.
        m.proposals_pending.set_function(self.proposals_in_flight)
        if io is None and large_apply is not None:
            io = RaftIO.production(cfg, m.fsync_seconds.observe, large_apply=large_apply)
        self.raft = RaftNode(
            cfg,
            secret,
            self.store,
            on_fsync=m.fsync_seconds.observe,
            on_state_changed=self._on_role_changed,
            on_rtt=lambda peer, s: m.peer_rtt_seconds.labels(peer).observe(s),
            on_apply_seconds=m.apply_seconds.observe,
            io=io,
            on_results_ready=self._deliver_results,
        )
        self.raft.addOnTickCallback(self._deliver_results)
        self._ssh_by_id = {n.id: str(n.ssh) for n in cfg.all_nodes()}
        self._load_members()
        self._barrier_running = False
        self._barrier_next: list[asyncio.Future[None]] = []
        self._expiry = Expiry(self.loop)

    # --- tick thread ----------------------------------------------------------------------------

    def _on_apply(self, out: Outcome) -> None:
        self.metrics.proposals_applied.inc()
        if self._listeners or self._touches_members(out):
            self._applied.append(out)  # handed to the loop with this tick's results

    @staticmethod
    def _touches_members(out: Outcome) -> bool:
        return any(ns == MEMBERS_NS for ns, _, _ in out.kv_writes)

    def _dispatch_applied(self, applied: list[Outcome], results: list[_Result]) -> None:  # event loop
        # Listeners see the entries first (a key revocation closes its connections before the
        # revoking admin hears it is done), in log order.
        for out in applied:
            if self._touches_members(out):
                self._load_members()
            for fn in list(self._listeners):
                try:
                    fn(out)
                except Exception:
                    log.exception("apply listener failed")
        _resolve_all(results)

    def _on_role_changed(self, old: str, new: str) -> None:
        log.info("role %s -> %s", old, new, extra={"term": self.raft.raftCurrentTerm})

    def _deliver_results(self) -> None:
        """Once per tick: the entries applied and the proposals answered in it reach the loop in
        one cross-thread wake-up, when the store's flush says they may (Store.flush_applied), and
        again as a tick callback for whatever is left (a proposal refused without an apply)."""
        applied = _drain(self._applied)
        batch = _drain(self._results)
        if batch or applied:
            self.loop.call_soon_threadsafe(self._dispatch_applied, applied, batch)

    # --- Replica --------------------------------------------------------------------------------

    def add_apply_listener(self, fn: ApplyListener) -> None:
        self._listeners.append(fn)

    def status(self) -> dict[str, Any]:
        st = self.raft.tl_status()
        at = st.get("at_monotonic")
        now = self.raft.tl_now()  # the clock the status was stamped with
        if at is not None and now - at > STATUS_STALE_S:
            return {**st, "quorum_backed": False, "quorum_ok": False, "stalled_s": round(now - at, 3)}
        return st

    async def propose(self, payload: bytes, timeout_s: float = PROPOSE_TIMEOUT_S) -> dict[str, Any]:
        fut: asyncio.Future[dict[str, Any]] = self.loop.create_future()

        def done(res: Any, err: int) -> None:  # tick thread: delivered in one batch per tick
            self._results.append((fut, res, err))

        m = self.metrics
        self._pending[fut] = None
        fut.add_done_callback(lambda f: self._pending.pop(f, None))
        self.raft.tl_submit(payload, done)
        self._expiry.add(fut, timeout_s)
        try:
            res = await fut
            m.proposals_committed.inc()
            return res
        except Expired:
            m.proposals_failed.labels("timeout").inc()
            raise Indeterminate("timeout") from None
        except (Unavailable, Indeterminate) as e:
            m.proposals_failed.labels(e.reason).inc()
            raise

    async def propose_engine(self, cmd: EngineCommand, now_ms: int,
                             timeout_s: float = PROPOSE_TIMEOUT_S) -> dict[str, Any]:
        return await self.propose(engine_entry(self.store, cmd, now_ms), timeout_s)

    def proposals_in_flight(self) -> int:
        """Proposals made on this node still waiting for their outcome."""
        return len(self._pending)

    async def read_barrier(self, timeout_s: float = READ_TIMEOUT_S) -> None:
        fut: asyncio.Future[None] = self.loop.create_future()
        # A reader that gave up (its own timeout) leaves the future behind: its outcome is read
        # here, so asyncio does not report an exception nobody retrieved.
        fut.add_done_callback(_retrieve)
        self._barrier_next.append(fut)
        if not self._barrier_running:
            self.loop.create_task(self._run_barriers(timeout_s))
        async with asyncio.timeout(timeout_s + 1.0):
            await asyncio.shield(fut)

    async def _run_barriers(self, timeout_s: float) -> None:
        self._barrier_running = True
        try:
            while self._barrier_next:
                batch, self._barrier_next = self._barrier_next, []
                try:
                    await self.propose(sm.encode_command(sm.Barrier()), timeout_s)
                except (Unavailable, Indeterminate) as e:
                    for f in batch:
                        if not f.done():
                            f.set_exception(Unavailable(e.reason) if isinstance(e, Unavailable) else e)
                    continue
                for f in batch:
                    if not f.done():
                        f.set_result(None)
        finally:
            self._barrier_running = False

    def fail_pending(self, reason: str) -> None:
        """A leader that lost its majority will not commit what it holds: say so now (the
        outcome is unknown: another leader may still commit it), so clients retry elsewhere
        instead of waiting out their timeouts."""
        for fut in list(self._pending):
            if not fut.done():
                fut.set_exception(Indeterminate(reason))

    def _load_members(self) -> None:
        """Nodes added online are in the replicated ``members`` namespace, not in node.toml."""
        for nid, rec in self.store.scan(MEMBERS_NS, limit=MEMBERS_MAX):
            m = json.loads(rec.value)
            self._ssh_by_id[nid] = m["ssh"]
            self.raft.tl_name_member(m["raft"], nid)

    def members(self) -> dict[str, dict[str, str]]:
        out = {}
        raft_addrs = [str(self.cfg.node.raft), *(n.address for n in self.raft.otherNodes)]
        by_id = {n.id: n for n in self.cfg.all_nodes()}
        for addr in raft_addrs:
            nid = self.raft.tl_member_id(addr)
            cfgn = by_id.get(nid)
            out[nid] = {"raft": addr, "ssh": self._ssh_by_id.get(nid, str(cfgn.ssh) if cfgn else "")}
        return out

    def ssh_address_of(self, node_id: str) -> str | None:
        return self._ssh_by_id.get(node_id)

    async def change_membership(self, add: bool, raft_addr: str, timeout_s: float = PROPOSE_TIMEOUT_S) -> None:
        fut: asyncio.Future[dict[str, Any]] = self.loop.create_future()

        def done(res: Any, err: int) -> None:  # tick thread
            self.loop.call_soon_threadsafe(_resolve, fut, {"ok": True}, err)

        if add:
            self.raft.addNodeToCluster(raft_addr, callback=done)
        else:
            self.raft.removeNodeFromCluster(raft_addr, callback=done)
        self.raft.tl_wake()
        try:
            async with asyncio.timeout(timeout_s):
                await fut
        except TimeoutError:
            raise Indeterminate("timeout") from None

    def transfer_leadership(self) -> None:
        self.raft.transferLeadership()
        self.raft.tl_wake()

    # --- node-local operations --------------------------------------------------------------------

    async def wait_listening(self) -> bool:
        """Whether the Raft listener is bound (pysyncobj's bind retries end within about 5 s)."""
        try:
            async with asyncio.timeout(LISTEN_TIMEOUT_S):
                return await self.loop.run_in_executor(None, self.raft.tl_listening)
        except TimeoutError:
            return False

    def compact(self) -> None:
        self.raft.tl_compact()

    def commit_index(self) -> int:
        return int(self.raft.raftCommitIndex)

    async def stop(self) -> None:
        await self.loop.run_in_executor(None, self.raft.tl_destroy, STOP_TIMEOUT_S)
        self.store.close()


def _resolve(fut: asyncio.Future[dict[str, Any]], res: Any, err: int) -> None:
    if fut.done():
        return
    if err == 0:
        fut.set_result(res if isinstance(res, dict) else {"ok": True})
    elif err in FailReason.NOT_APPLIED:
        fut.set_exception(Unavailable(FailReason.NAMES.get(err, str(err))))
    else:
        fut.set_exception(Indeterminate(FailReason.NAMES.get(err, str(err))))


def _drain(q: collections.deque[Any]) -> list[Any]:
    out = []
    while q:  # appends from other threads are safe meanwhile
        out.append(q.popleft())
    return out


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _resolve_all(batch: list[_Result]) -> None:
    for fut, res, err in batch:
        _resolve(fut, res, err)
