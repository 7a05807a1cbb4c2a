"""The pysyncobj adapter: durable journal and transport, LMDB snapshots, safe settings.

What this closes in pysyncobj as shipped (see docs/design.md):

- the log, term, vote and commit index live in LMDB (:class:`LmdbJournal`), and the one
  egress point, :meth:`DurableTransport.send`, fsyncs every pending promise before a message
  leaves the node (group commit), except a leader's append-entries: the leader writes its log in
  parallel with replication (:func:`flush_before_send`), flushes once per tick after its sends,
  and counts itself toward a commit only up to its durable index (patch
  ``leader_commit_durable``);
- the changes to pysyncobj itself are in ``pysyncobj_patches`` (installed explicitly first);
- Raft traffic is always encrypted and authenticated with the cluster secret, so a stranger's
  pickled payload is dropped before it is unpickled;
- a proposal without a leader fails at once (``commandsWaitLeader=False``), a leader that
  hears from no majority steps down after ``leader_fallback_timeout_s``, and nodes reconnect
  every ``connection_retry_s``;
- snapshots are consistent LMDB copies of the state, sent to followers that fell behind.

Everything in this class runs on pysyncobj's tick thread unless a method says otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import zlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pysyncobj.pickle as pysyncobj_pickle
from pysyncobj import SyncObj, SyncObjConf, SyncObjException, replicated
from pysyncobj.config import FAIL_REASON
from pysyncobj.node import TCPNode
from pysyncobj.pipe_notifier import PipeNotifier
from pysyncobj.transport import TCPTransport

from tetherlab.cluster.core.config import NodeConfig
from tetherlab.cluster.replica import pysyncobj_patches
from tetherlab.cluster.replica.files import Files, OsFiles
from tetherlab.cluster.replica.journal import LmdbJournal
from tetherlab.cluster.replica.store import Store, entry_from_json, entry_to_json

log = logging.getLogger("tetherlab.raft")

ROLE_NAMES = {0: "follower", 1: "candidate", 2: "leader"}
# An entry this large (a registry push) builds some 10^5 objects when applied: RaftIO.large_apply.
LARGE_APPLY_BYTES = 1 << 16
_STATUS_REFRESH_S = 0.05  # the status snapshot other threads read is at most this old
_STATE_SYNC_INTERVAL_S = 1.0  # bound on state writes a machine crash can lose (replayed from the log)
# A leader's lease is this fraction of the minimum election timeout after a majority heard it:
# the rest is room for the clocks of the nodes to run at slightly different rates.
LEASE_FRACTION = 0.9
# Patches a RaftNode relies on (pysyncobj_patches.install() applies them all).
REQUIRED_PATCHES = ("journal_factory", "frame_bound", "socket_timeouts", "bounded_read", "accept_limits",
                    "handshake_deadline", "accept_queue", "accept_unknown_peers", "removal_on_commit",
                    "snapshot_files", "load_dump_keeps_log", "snapshot_commit", "keep_committed_entries",
                    "next_index_monotonic", "older_snapshot_ignored", "compaction_guard", "snapshot_send_no_spin",
                    "pre_vote", "term_notice", "leader_stickiness", "leader_commit_durable",
                    "chunked_entries", "heavy_apply_sends_first", "heavy_apply_leader_waits", "stall_grace")


def defers_flush(so: Any, message: Any) -> bool:
    """A message that may leave before this node's pending journal writes are durable: only a
    leader's append-entries. It promises nothing about the leader's own disk (Raft lets the leader
    write its log in parallel with replication, provided it counts itself toward a commit only up
    to its durable index: patch ``leader_commit_durable``); the leader flushes once per tick after
    its sends (:meth:`RaftNode._tl_on_tick`), so its fsync overlaps the round trip and the
    followers' fsyncs. Everything else (votes, pre-votes, append answers, term notices) says
    something about this node's log, term or vote, and waits for the flush."""
    return isinstance(message, dict) and message.get("type") == "append_entries" and bool(so._isLeader())


def flush_before_send(so: Any, message: Any) -> None:
    """The durability rule at the one egress point, for production's :class:`DurableTransport`
    and the simulator's transport alike (one function, so the simulator tests what runs)."""
    journal = getattr(so, "_tl_journal", None)
    if journal is not None and not defers_flush(so, message):
        journal.flush()


class LeaseStamps:
    """What a transport adds so a leader knows how recently each follower heard from it.

    Every append-entries carries the leader's send time (``tl_sent``, its own monotonic clock);
    the follower echoes it in the answer (``tl_echo``). An echo proves the follower accepted an
    append-entries sent at that moment, so it refuses votes until at least then plus the minimum
    election timeout (patch ``leader_stickiness``): that is the leader's lease, measured from the
    send, never from the answer's arrival (which would overstate it by the return trip)."""

    _syncObj: Any

    def _tl_stamp(self, message: Any) -> None:
        if not isinstance(message, dict):
            return
        so = self._syncObj
        kind = message.get("type")
        if kind == "append_entries":
            message["tl_sent"] = so._tl_clock()
        elif kind == "next_node_idx" and so._tl_echo is not None:
            message["tl_echo"] = so._tl_echo

    def _tl_receive(self, node: Any, message: Any, deliver: Callable[[Any, Any], None]) -> None:
        so = self._syncObj
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "next_node_idx":
            echo = message.get("tl_echo")
            if echo is not None and echo > so._tl_heard_by.get(node, float("-inf")):
                so._tl_heard_by[node] = echo
        if kind == "append_entries":
            so._tl_echo = message.get("tl_sent")
            try:
                deliver(node, message)
            finally:
                so._tl_echo = None
            return
        deliver(node, message)


class DurableTransport(LeaseStamps, TCPTransport):
    """pysyncobj's TCP transport with one rule added: nothing leaves before it is durable, except
    a leader's append-entries (:func:`flush_before_send`).

    It also times append-entries round trips per peer (first unanswered send to the answer)."""

    def send(self, node: Any, message: Any) -> bool:
        so = self._syncObj
        flush_before_send(so, message)
        if isinstance(message, dict) and message.get("type") == "append_entries":
            so._tl_rtt_pending.setdefault(node, time.monotonic())
        self._tl_stamp(message)
        return bool(super().send(node, message))

    def _onMessageReceived(self, node: Any, message: Any) -> None:
        if isinstance(message, dict) and message.get("type") == "next_node_idx":
            t0 = self._syncObj._tl_rtt_pending.pop(node, None)
            on_rtt = self._syncObj._tl_on_rtt
            if t0 is not None and on_rtt is not None:
                on_rtt(self._syncObj._tl_addr_to_id.get(node.address, node.address), time.monotonic() - t0)
        self._tl_receive(node, message, super()._onMessageReceived)


REGULAR_COMMAND = 0  # pysyncobj's _COMMAND_TYPE.REGULAR: a call of a replicated method


def payload_of(command: bytes) -> bytes | None:
    """The state-machine payload a log entry carries (the argument of ``RaftNode._tl_apply``),
    or None for pysyncobj's own entries (no-ops, membership and version changes)."""
    if not command or command[0] != REGULAR_COMMAND:
        return None
    call = pysyncobj_pickle.loads(command[1:])
    if isinstance(call, tuple) and len(call) >= 2 and call[1] and isinstance(call[1][0], bytes):
        return bytes(call[1][0])
    return None


class CoalescingNotifier(PipeNotifier):
    """pysyncobj's wake-up pipe, written once per burst: a proposal arriving while a wake-up is
    already pending adds nothing (the tick that wake-up causes takes every queued command).

    The flag drops only after the pipe is drained, inside the poll, so a proposal that skips its
    write is always followed by a tick that reads the queue."""

    def __init__(self, poller: Any) -> None:
        self._tl_armed = False
        super().__init__(poller, callback=self._tl_disarm)

    def notify(self) -> None:
        if self._tl_armed:
            return
        self._tl_armed = True
        try:
            super().notify()
        except BlockingIOError:
            pass  # the pipe is full: the tick thread is already awake

    def _tl_disarm(self) -> None:
        self._tl_armed = False


class FailReason:
    """pysyncobj's failure codes sorted by what they tell a client."""

    NOT_APPLIED = {FAIL_REASON.QUEUE_FULL, FAIL_REASON.MISSING_LEADER, FAIL_REASON.NOT_LEADER,
                   FAIL_REASON.REQUEST_DENIED, FAIL_REASON.DISCARDED}
    NAMES = {
        FAIL_REASON.QUEUE_FULL: "queue_full",
        FAIL_REASON.MISSING_LEADER: "no_leader",
        FAIL_REASON.DISCARDED: "discarded",
        FAIL_REASON.NOT_LEADER: "not_leader",
        FAIL_REASON.LEADER_CHANGED: "leader_changed",
        FAIL_REASON.REQUEST_DENIED: "denied",
        FAIL_REASON.UNKNOWN_OUTCOME: "unknown_outcome",
    }


Callback = Callable[[Any, int], None]


def _exit_node(index: int) -> None:
    os._exit(70)


@dataclass
class RaftIO:
    """Everything a :class:`RaftNode` does I/O with. Production builds it from the node config
    (:meth:`RaftIO.production`); the simulator (``tetherlab.chaos.sim``) gives in-memory twins,
    its own transport, clock and tick loop, and runs the same RaftNode code."""

    journal: Any  # LmdbJournal, or the in-memory twin
    files: Files = field(default_factory=OsFiles)
    transport_class: type = DurableTransport
    auto_tick: bool = True  # pysyncobj's own tick thread; False: the caller drives doTick()
    clock: Callable[[], float] = time.monotonic
    node_class: type = TCPNode
    fatal: Callable[[int], None] = _exit_node  # a node that cannot apply entry N stops here
    encrypt: bool = True
    state_sync_thread: bool = True  # fsync the state once a second beside the tick thread
    wake: Callable[[], None] | None = None  # without a tick thread: ask the caller for a tick soon
    # The pysyncobj patches this node refuses to start without (a simulator taking one out on
    # purpose, to show its checks catch the bug, names what it still requires).
    required_patches: tuple[str, ...] = REQUIRED_PATCHES
    # A leader flushes its journal once per tick, after its sends. False only for the simulator's
    # leader-unflushed-commit fault (with patch leader_commit_durable off).
    leader_flush_per_tick: bool = True
    # Wraps the apply of an entry of LARGE_APPLY_BYTES or more. The node pauses CPython's cyclic
    # GC there (gcpolicy.GcPolicy.paused): it ran full collections over what such an apply builds,
    # again and again, half of a 10,000-concept push's apply.
    large_apply: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext

    @classmethod
    def production(cls, cfg: NodeConfig, on_fsync: Callable[[float], None] | None = None,
                   large_apply: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext) -> RaftIO:
        return cls(journal=LmdbJournal(cfg.data_dir / "raft", cfg.raft.log_map_size_bytes, on_fsync=on_fsync),
                   large_apply=large_apply)


def compaction_stagger(node_id: str, min_entries: int) -> int:
    """Extra entries before this node snapshots: up to a quarter more, fixed per node id.

    Every node's log grows alike, so with one threshold all of them snapshot at the same index,
    and while they do (each stops its Raft thread for tens of milliseconds) no follower can
    acknowledge and nothing commits. Staggered, a follower's snapshot costs the leader nothing:
    the other follower still makes the majority. Small thresholds (tests, the simulator) are
    left exact."""
    if min_entries < 1000:
        return 0
    return zlib.crc32(node_id.encode()) % (min_entries // 4)


class RaftNode(SyncObj):
    """One Raft member whose state machine is a :class:`Store`.

    Properties are deliberately avoided: SyncObj's constructor calls ``getattr`` on every
    attribute name to find replicated methods, before our fields exist.
    """

    def __init__(
        self,
        cfg: NodeConfig,
        secret: bytes,
        store: Store,
        on_fsync: Callable[[float], None] | None = None,
        on_state_changed: Callable[[str, str], None] | None = None,
        on_rtt: Callable[[str, float], None] | None = None,
        on_apply_seconds: Callable[[float], None] | None = None,
        io: RaftIO | None = None,
        on_results_ready: Callable[[], None] | None = None,
    ) -> None:
        io = io or RaftIO.production(cfg, on_fsync)
        missing = set(io.required_patches) - set(pysyncobj_patches.installed())
        if missing:
            raise RuntimeError(f"pysyncobj_patches.install() must run before a RaftNode starts "
                               f"(missing {sorted(missing)})")
        self._tl_io = io
        self._tl_cfg = cfg
        self._tl_store = store
        self._tl_files = io.files
        self._tl_clock = io.clock
        self._tl_on_state_changed = on_state_changed
        self._tl_on_rtt = on_rtt
        self._tl_on_apply_seconds = on_apply_seconds
        # Hands this tick's results out: before the state's commit when Store.flush_applied allows.
        self._tl_on_results_ready = on_results_ready
        self._tl_rtt_pending: dict[Any, float] = {}
        self._tl_heard_by: dict[Any, float] = {}  # follower -> latest leader send time it echoed
        self._tl_echo: float | None = None
        self._tl_addr_to_id = {str(n.raft): n.id for n in cfg.all_nodes()}
        self._tl_journal = io.journal
        self._tl_snapshot_file = cfg.data_dir / "snapshot.tls"
        self._tl_notifier: CoalescingNotifier | None = None
        self._tl_last_sent: tuple[int | None, int] = (None, -1)
        self._tl_syncer: threading.Thread | None = None
        self._tl_stopping = threading.Event()
        self._tl_status: dict[str, Any] = {}
        self._tl_status_at = float("-inf")
        self._tl_leader_changes = 0
        self._tl_last_leader: str | None = None
        self._tl_snapshots_taken = 0
        self._tl_snapshots_installed = 0
        self._tl_ready = threading.Event()
        key = pysyncobj_patches.register_journal(
            f"{pysyncobj_patches.JOURNAL_KEY_PREFIX}{cfg.data_dir / 'raft'}#{id(self._tl_journal)}", self._tl_journal)
        t = cfg.raft
        conf = SyncObjConf(
            password=secret.decode() if io.encrypt else None,
            autoTick=io.auto_tick,
            commandsWaitLeader=False,
            raftMinTimeout=t.election_timeout_min_s,
            raftMaxTimeout=t.election_timeout_max_s,
            appendEntriesPeriod=t.heartbeat_interval_s,
            leaderFallbackTimeout=t.leader_fallback_timeout_s,
            connectionTimeout=t.connection_timeout_s,
            connectionRetryTime=t.connection_retry_s,
            logCompactionMinEntries=t.compaction_min_entries + compaction_stagger(cfg.id, t.compaction_min_entries),
            logCompactionMinTime=t.compaction_min_time_s,
            journalFile=key,
            fullDumpFile=str(self._tl_snapshot_file),
            serializer=self._tl_serialize,
            deserializer=self._tl_deserialize,
            dynamicMembershipChange=True,
            onStateChanged=self._tl_state_changed,
            # Bounded queue of proposals waiting for the tick thread.
            commandsQueueSize=20000,
            # Dead peers are noticed by TCP within about 3 s even when packets are silently dropped.
            tcp_keepalive=(1, 1, 3),
            # Listen on the configured address only (pysyncobj would bind 0.0.0.0).
            bindAddress=str(cfg.node.raft),
            bindRetryTime=0.2,
            maxBindRetries=25,
        )
        super().__init__(io.node_class(str(cfg.node.raft)), [io.node_class(str(p.raft)) for p in cfg.peers], conf,
                         nodeClass=io.node_class, transportClass=io.transport_class)
        self.addOnTickCallback(self._tl_on_tick)

    # --- tick thread ------------------------------------------------------------------------

    def _tl_on_tick(self) -> None:
        # The entries applied this tick are committed to the state in one transaction (one fsync);
        # their results go out in on_results_ready, before that commit when only engine records
        # changed (Store.flush_applied), so the replies overlap the fsync.
        self._tl_store.flush_applied(self._tl_on_results_ready)
        if self._tl_notifier is None and self._tl_io.auto_tick:
            self._tl_notifier = CoalescingNotifier(self._poller)
        # Send new entries as soon as they are in the log, not on the next heartbeat: the
        # batch is whatever arrived in this tick, and it shares one fsync.
        # A new commit index goes out at once too, so followers apply (and answer reads) without
        # waiting for the next heartbeat.
        sent = (self._tl_journal.last_index, self.raftCommitIndex)
        if self._isLeader() and sent != self._tl_last_sent:
            self._tl_last_sent = sent
            self._SyncObj__sendAppendEntries()  # type: ignore[attr-defined]
        if self._isLeader() and self._tl_io.leader_flush_per_tick:
            # The leader's entries went out before its own fsync (flush_before_send): this one
            # overlaps the round trip, and the next tick's commit counts the leader up to here.
            self._tl_journal.flush()
        now = self._tl_clock()
        if self._tl_syncer is None and self._tl_io.state_sync_thread:
            # The state's periodic fsync runs beside the Raft thread, never inside it.
            self._tl_syncer = threading.Thread(target=self._tl_sync_state, name="state-sync", daemon=True)
            self._tl_syncer.start()
        if now - self._tl_status_at >= _STATUS_REFRESH_S:
            self._tl_status_at = now
            self._tl_status = self._tl_compute_status(now)
            self._tl_ready.set()

    def _tl_compute_status(self, now: float) -> dict[str, Any]:
        state = self._SyncObj__raftState  # type: ignore[attr-defined]
        role = ROLE_NAMES.get(state, "unknown")
        deadline = self._SyncObj__raftElectionDeadline  # type: ignore[attr-defined]
        leader = self._getLeader()
        # pysyncobj keeps a dead leader's name until it can start an election (which it never
        # does while it reaches nobody): a follower only vouches for a leader it still hears.
        if role == "follower" and deadline <= now:
            leader = None
        leader_addr = leader.address if leader is not None else None
        leader_id = self._tl_addr_to_id.get(leader_addr) if leader_addr else None
        if leader_id != self._tl_last_leader and leader_id is not None:
            self._tl_leader_changes += 1
        self._tl_last_leader = leader_id
        peers: dict[str, dict[str, Any]] = {}
        last_resp: dict[Any, float] = dict(self._SyncObj__lastResponseTime)  # type: ignore[attr-defined]
        match: dict[Any, int] = dict(self._SyncObj__raftMatchIndex)  # type: ignore[attr-defined]
        acks = 1
        lease_s = self._tl_cfg.raft.election_timeout_min_s * LEASE_FRACTION
        for node in self.otherNodes:
            pid = self._tl_addr_to_id.get(node.address, node.address)
            resp = last_resp.get(node)
            # A follower that echoes no send time runs an older version (a rolling upgrade): its
            # last answer stands in, as it did before leases were measured from the send.
            heard = self._tl_heard_by.get(node, resp)
            fresh = role == "leader" and heard is not None and now - heard < lease_s
            acks += 1 if fresh else 0
            peers[pid] = {
                "address": node.address,
                "connected": self.isNodeConnected(node),
                "match_index": match.get(node) if role == "leader" else None,
                "last_response_age_s": round(now - resp, 3) if (role == "leader" and resp) else None,
            }
        members = len(self.otherNodes) + 1
        # A leader serves once it has applied every entry of earlier terms: its term's first
        # entry (pysyncobj's no-op) is applied. Before that its state may miss acknowledged
        # writes (a key revocation, say) that it holds in its log but has not applied.
        term_start = self._SyncObj__noopIDx  # type: ignore[attr-defined]
        caught_up = role == "leader" and term_start is not None and self.raftLastApplied >= term_start
        quorum_backed = caught_up and acks * 2 > members
        # A follower is in touch with a leader while its election timer keeps being reset.
        following = role == "follower" and leader_id is not None and deadline > now
        return {
            "id": self._tl_cfg.id,
            "role": role,
            "term": self.raftCurrentTerm,
            "leader": leader_id,
            "leader_raft": leader_addr,
            "commit_index": self.raftCommitIndex,
            # The leader's commit index as this node last heard it: a follower is this far behind.
            "leader_commit_index": self._SyncObj__leaderCommitIndex,  # type: ignore[attr-defined]
            "applied_index": self.raftLastApplied,
            "term_start_index": term_start if role == "leader" else None,
            "log": self._tl_journal.stats(),
            "peers": peers,
            # A leader is quorum-backed while it has caught up with its term and a majority
            # accepted an append-entries it sent less than a lease ago: those followers refuse
            # votes until an election timeout after hearing it, so no other leader can exist yet.
            "quorum_backed": quorum_backed,
            "quorum_ok": quorum_backed or following,
            "has_quorum_connections": self.hasQuorum,
            "leader_changes": self._tl_leader_changes,
            "snapshots_taken": self._tl_snapshots_taken,
            "snapshots_installed": self._tl_snapshots_installed,
            "fsyncs": self._tl_journal.fsyncs,
            # Strangers on the Raft port (pysyncobj_patches: bounded_read, accept_limits, ...).
            "transport": {
                "unauthenticated_connections": pysyncobj_patches.unauthenticated_connections(
                    self._SyncObj__transport),  # type: ignore[attr-defined]
                **pysyncobj_patches.TRANSPORT_STATS.snapshot(),
            },
            "at_monotonic": now,
        }

    def _tl_state_changed(self, old: int, new: int) -> None:
        log.info("raft role %s -> %s (term %d)", ROLE_NAMES.get(old), ROLE_NAMES.get(new), self.raftCurrentTerm)
        if self._tl_on_state_changed is not None:
            self._tl_on_state_changed(ROLE_NAMES.get(old, "?"), ROLE_NAMES.get(new, "?"))

    @replicated
    def _tl_apply(self, payload: bytes) -> Any:
        # The entry being applied is at raftLastApplied + 1 (pysyncobj bumps it afterwards).
        index = self.raftLastApplied + 1
        try:
            t0 = time.perf_counter()
            if len(payload) >= LARGE_APPLY_BYTES:
                with self._tl_io.large_apply():
                    res = self._tl_store.apply(index, payload)
            else:
                res = self._tl_store.apply(index, payload)
            if self._tl_on_apply_seconds is not None:
                self._tl_on_apply_seconds(time.perf_counter() - t0)
            return res
        except Exception:
            # core.apply answers every deterministic failure of a command itself (a refusal every
            # replica makes alike); what reaches here is a failure of this node (disk full,
            # corruption, out of memory). It must not carry on with a state that differs from its
            # peers': stop, and let the supervisor restart it (it replays the entry).
            log.critical("cannot apply raft entry %d; stopping the node", index, exc_info=True)
            self._tl_io.fatal(index)
            raise

    def _tl_serialize(self, filename: str, data: Any) -> None:
        last, prev, cluster = data
        header = {
            "last": entry_to_json(last),
            "prev": entry_to_json(prev),
            "cluster": sorted(n.address for n in cluster),
            "node": self._tl_cfg.id,
        }
        t0 = self._tl_clock()  # the node's clock: the simulator's own, so its traces replay exactly
        self._tl_store.write_snapshot(Path(filename), header)
        self._tl_snapshots_taken += 1
        # The Raft thread sends and answers nothing meanwhile: operators see how long that was.
        log.info("snapshot taken at raft index %d in %.0f ms", last[1], (self._tl_clock() - t0) * 1000)

    def _tl_deserialize(self, filename: str) -> tuple[Any, Any, Any]:
        # A received snapshot is durable before pysyncobj reads it (patch snapshot_files).
        path = Path(filename)
        header = self._tl_store.read_snapshot_header(path)[0]
        if self._tl_store.install_snapshot(path):
            self._tl_snapshots_installed += 1
            log.info("installed snapshot up to raft index %d", header["last"][1])
        cluster = {self._tl_io.node_class(a) for a in header["cluster"]}
        return entry_from_json(header["last"]), entry_from_json(header["prev"]), cluster

    def _tl_sync_state(self) -> None:
        while not self._tl_stopping.wait(_STATE_SYNC_INTERVAL_S):
            try:
                self._tl_store.sync_unlocked()  # type: ignore[attr-defined]
            except Exception:  # the env may be mid-swap (snapshot install): next round
                log.debug("state sync skipped", exc_info=True)

    # --- any thread -------------------------------------------------------------------------

    def tl_submit(self, payload: bytes, callback: Callback) -> None:
        """Queue a command; ``callback(result, fail_code)`` runs on the tick thread."""
        self._tl_apply(payload, callback=callback)
        self.tl_wake()

    def tl_wake(self) -> None:
        """Wake the tick thread so queued work goes out now, not at the next poll timeout."""
        if self._tl_io.wake is not None:
            self._tl_io.wake()
            return
        notifier = self._tl_notifier
        if notifier is not None:
            notifier.notify()

    def tl_status(self) -> dict[str, Any]:
        return self._tl_status

    def tl_now(self) -> float:
        """This node's monotonic clock (the one its status is stamped with)."""
        return self._tl_clock()

    def tl_name_member(self, raft_addr: str, node_id: str) -> None:
        """Know the member at ``raft_addr`` as ``node_id`` (members added online)."""
        self._tl_addr_to_id[raft_addr] = node_id

    def tl_member_id(self, raft_addr: str) -> str:
        """The id of the member at ``raft_addr`` (the address itself when unknown)."""
        return self._tl_addr_to_id.get(raft_addr, raft_addr)

    def tl_log_sizes(self) -> dict[str, int]:
        """The LMDB log environment's file size, used bytes and map size."""
        env = self._tl_journal.env
        info, stat = env.info(), env.stat()
        data_file = self._tl_journal.path / "data.mdb"
        return {
            "file_size_bytes": data_file.stat().st_size if data_file.exists() else 0,
            "used_bytes": (info["last_pgno"] + 1) * stat["psize"],
            "map_size_bytes": info["map_size"],
        }

    def tl_listening(self) -> bool:
        """Block until pysyncobj has bound the Raft listener (True) or given up (False) after
        ``maxBindRetries`` tries ``bindRetryTime`` apart (about 5 s). It then keeps retrying
        without a word, so the node would never hear its peers: its start asks this first."""
        try:
            self.waitBinded()
        except SyncObjException:
            return False
        return True

    def tl_wait_ready(self, timeout_s: float) -> bool:
        return self._tl_ready.wait(timeout_s)

    def tl_destroy(self, timeout_s: float) -> bool:
        """Stop the tick thread (it flushes and closes the journal); False if it did not stop."""
        self._tl_stopping.set()
        self.destroy()
        thread: threading.Thread | None = self._SyncObj__thread  # type: ignore[attr-defined]
        if thread is not None:
            thread.join(timeout_s)
            return not thread.is_alive()
        return True

    def tl_compact(self) -> None:
        self.forceLogCompaction()
