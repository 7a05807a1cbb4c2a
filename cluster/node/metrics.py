"""Prometheus metrics of one node (names documented in docs/metrics.md).

Counters and histograms are updated where things happen; gauges that mirror Raft and LMDB
state are read at scrape time by :class:`NodeCollector`, so a scrape never waits on Raft.
Each node process has its own registry (tests run several nodes' code in one process).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tetherlab.cluster import __version__
from tetherlab.cluster.replica.pysyncobj_patches import TransportStats

_FAST_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        for c in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            try:
                r.register(c)
            except ValueError:
                pass
        self.build_info = Gauge("tetherlab_build_info", "Build of this node (always 1).", ["version"], registry=r)
        self.build_info.labels(__version__).set(1)
        self.leader_changes = Counter(
            "tetherlab_leader_changes_seen", "Leader changes this node has seen.", registry=r
        )
        self.proposals_committed = Counter(
            "tetherlab_proposals_committed", "Proposals from this node that were committed.", registry=r
        )
        self.proposals_applied = Counter(
            "tetherlab_proposals_applied", "Log entries applied to this node's state.", registry=r
        )
        self.proposals_failed = Counter(
            "tetherlab_proposals_failed", "Proposals from this node that failed, by reason.", ["reason"], registry=r
        )
        self.proposals_pending = Gauge(
            "tetherlab_proposals_pending", "Proposals from this node waiting to be committed.", registry=r
        )
        self.fsync_seconds = Histogram(
            "tetherlab_journal_fsync_duration_seconds", "Raft journal group-commit fsync time.",
            buckets=_FAST_BUCKETS_S, registry=r,
        )
        self.gc_pause_seconds = Histogram(
            "tetherlab_gc_pause_seconds", "Garbage collections (every thread of the node waits), by generation.",
            ["generation"], buckets=_FAST_BUCKETS_S, registry=r,
        )
        self.apply_seconds = Histogram(
            "tetherlab_apply_duration_seconds", "Time to apply one log entry to the state.",
            buckets=_FAST_BUCKETS_S, registry=r,
        )
        self.peer_rtt_seconds = Histogram(
            "tetherlab_peer_round_trip_time_seconds", "Append-entries round trip to each peer.", ["peer"],
            buckets=_FAST_BUCKETS_S, registry=r,
        )
        # Coordination.
        self.verdicts = Counter("tetherlab_verdicts", "Verdicts returned, by action.", ["action"], registry=r)
        self.conflicts = Counter("tetherlab_conflicts", "Conflicts found, by kind.", ["kind"], registry=r)
        self.verdict_seconds = Histogram(
            "tetherlab_verdict_duration_seconds", "From intent received to verdict sent (leader).",
            buckets=_FAST_BUCKETS_S, registry=r,
        )
        self.sessions_expired = Counter("tetherlab_sessions_expired", "Agent sessions expired.", registry=r)
        self.proposer_matches = Counter(
            "tetherlab_proposer_matches", "Plans this node matched before proposing them, by where: 'worker' (the "
            "match worker process) or 'loop' (the event loop: worker off, starting, busy or failed).", ["where"],
            registry=r,
        )
        self.match_worker_up = Gauge(
            "tetherlab_match_worker_up", "1 while this node's match worker process is running and answering "
            "([matching] worker in the node file), else 0.", registry=r,
        )
        self.drifts = Counter(
            "tetherlab_drifts", "Agents' in-flight changes reaching concepts their plan did not claim, by outcome "
            "(claimed: added to the intent; warned; stopped; reverted).", ["outcome"], registry=r,
        )
        self.push_commits_verified = Counter(
            "tetherlab_push_commits_verified", "Commits judged by push-time verification, by result "
            "(accepted, refused, uncoordinated: accepted without a claim).", ["result"], registry=r,
        )
        self.shims_failing_closed = Gauge(
            "tetherlab_shims_failing_closed",
            "Shims that reported on reconnect they had failed closed, over the last 5 minutes.", registry=r,
        )
        # SSH.
        self.ssh_connections = Gauge("tetherlab_ssh_connections", "Open SSH connections.", registry=r)
        self.ssh_auth_failures = Counter(
            "tetherlab_ssh_auth_failures", "SSH authentication failures, by reason.", ["reason"], registry=r
        )
        self.ssh_redirects = Counter("tetherlab_ssh_redirects", "Redirects to the leader sent.", registry=r)
        self.protocol_errors = Counter(
            "tetherlab_protocol_errors", "Protocol errors answered, by code.", ["code"], registry=r
        )
        self.ssh_unauthenticated = Gauge(
            "tetherlab_ssh_unauthenticated_connections", "SSH connections that have not authenticated yet.", registry=r
        )
        self.ssh_connections_closed = Counter(
            "tetherlab_ssh_connections_closed_by_limit",
            "SSH connections closed by a [limits] bound, by reason (connections_max, unauthenticated_max, "
            "stalled_channel).", ["reason"], registry=r,
        )
        self.ssh_backpressure = Counter(
            "tetherlab_ssh_backpressure_pauses",
            "Times a channel stopped being read because the client was not reading its replies.", registry=r,
        )
        # Quotas ([limits]).
        self.quota_limit = Gauge("tetherlab_quota_limit", "The node's [limits] settings, by field.", ["limit"],
                                 registry=r)
        self.quota_refusals = Counter(
            "tetherlab_quota_refusals", "Requests refused by a [limits] quota, by the field that refused them.",
            ["limit"], registry=r,
        )
        self.intents_in_flight = Gauge(
            "tetherlab_intents_in_flight", "Intent requests (submit, complete, abandon) this node is working on.",
            registry=r,
        )
        # HTTP.
        self.http_connections = Gauge("tetherlab_http_connections", "Open HTTP connections.", registry=r)
        self.http_requests = Counter("tetherlab_http_requests", "HTTP requests answered, by status code.", ["code"],
                                     registry=r)
        self.http_connections_closed = Counter(
            "tetherlab_http_connections_closed_by_limit",
            "HTTP connections closed by a [limits] bound, by reason (connections_max, header_timeout, "
            "body_timeout, head_too_large, requests_per_s).", ["reason"], registry=r,
        )

    def attach(self, collector: Collector) -> None:
        self.registry.register(collector)


class NodeCollector(Collector):
    """Gauges read from a status snapshot and store sizes at scrape time."""

    def __init__(self, status: Callable[[], dict[str, Any]], sizes: Callable[[], dict[str, dict[str, int]]],
                 coordination: Callable[[], dict[str, int]]) -> None:
        self._status = status
        self._sizes = sizes
        self._coordination = coordination

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: its families are built at collect time

    def collect(self) -> Iterator[Metric]:
        st = self._status()
        role = st.get("role")

        def g(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield g("tetherlab_has_leader", "1 if this node knows a leader.", 1.0 if st.get("leader") else 0.0)
        yield g("tetherlab_is_leader", "1 if this node is the leader.", 1.0 if role == "leader" else 0.0)
        yield g("tetherlab_has_quorum",
                "1 if this node is a leader backed by a majority, or a follower of a leader it hears from.",
                1.0 if st.get("quorum_ok") else 0.0)
        yield g("tetherlab_raft_term", "Current Raft term.", float(st.get("term") or 0))
        yield g("tetherlab_raft_commit_index", "Raft commit index.", float(st.get("commit_index") or 0))
        yield g("tetherlab_raft_applied_index", "Raft applied index.", float(st.get("applied_index") or 0))
        yield _counter("tetherlab_snapshots_taken", "Snapshots this node took.", st.get("snapshots_taken", 0))
        yield _counter("tetherlab_snapshots_installed", "Snapshots this node installed from the leader.",
                       st.get("snapshots_installed", 0))
        peers = GaugeMetricFamily("tetherlab_peer_connected", "1 if the Raft link to the peer is up.", labels=["peer"])
        for pid, p in sorted((st.get("peers") or {}).items()):
            peers.add_metric([pid], 1.0 if p.get("connected") else 0.0)
        yield peers
        sizes = self._sizes()
        for metric, doc in (("file_size_bytes", "LMDB data file size."), ("used_bytes", "LMDB bytes in use."),
                            ("map_size_bytes", "LMDB map size (the most the file may grow to).")):
            fam = GaugeMetricFamily(f"tetherlab_lmdb_{metric}", doc, labels=["db"])
            for db, info in sorted(sizes.items()):
                fam.add_metric([db], float(info.get(metric, 0)))
            yield fam
        tr = st.get("transport") or {}
        yield g("tetherlab_raft_unauthenticated_connections",
                "Incoming Raft connections that have not authenticated with the cluster secret yet.",
                float(tr.get("unauthenticated_connections", 0)))
        dropped = CounterMetricFamily("tetherlab_raft_strangers_dropped",
                                      "Raft connections this node closed before they authenticated, by reason "
                                      f"({', '.join(TransportStats.REASONS)}).", labels=["reason"])
        for reason in TransportStats.REASONS:
            dropped.add_metric([reason], float(tr.get(reason, 0)))
        yield dropped
        yield _counter("tetherlab_raft_read_slices_cut",
                       "Raft socket reads stopped at the per-event slice so the tick could run.",
                       tr.get("slices_cut", 0))
        coord = self._coordination()
        yield g("tetherlab_active_intents", "Active intents.", float(coord.get("active_intents", 0)))
        yield g("tetherlab_open_sessions", "Open agent sessions.", float(coord.get("open_sessions", 0)))
        yield g("tetherlab_soft_conflicts", "Pairs of active intents whose in-flight changes overlap (a file, a "
                "symbol, or a symbol another relies on).", float(coord.get("soft_conflicts", 0)))
        matches = CounterMetricFamily("tetherlab_plan_matches",
                                      "Plans this node's engine applied, by where their claims came from: "
                                      "'reused' (the proposing leader's match, still current) or 'made' (matched "
                                      "here: the registry or code index changed in between, or no match came).",
                                      labels=["source"])
        matches.add_metric(["reused"], float(coord.get("matches_reused", 0)))
        matches.add_metric(["made"], float(coord.get("matches_made", 0)))
        yield matches


def _counter(name: str, doc: str, value: float) -> Metric:
    return CounterMetricFamily(name, doc, value=float(value))
