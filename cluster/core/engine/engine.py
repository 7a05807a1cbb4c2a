"""The coordination engine: the state machine behind every verdict.

``Engine.apply`` takes one command in Raft order and returns its result and the records it
changed; it does no I/O, reads no clock (time is the leader's, stamped into the log) and draws
no random numbers, so every replica computes the same verdict for the same log.

State is a set of records, namespaced as the adapter stores them:

- ``meta/cluster``: the coordinated git remote and the session TTL (set by ``init``);
- ``meta/clock``: the latest leader time and Raft index applied (time never goes backwards);
- ``registry/current`` and ``concepts/<id>``: the concept registry, one record per concept;
- ``sessions/<agent_id>``: one per agent;
- ``intents/<intent_id>``: active intents and a bounded history of finished ones;
- ``history/<concept_id>``: the last few completed intents that modified the concept;
- ``grants/<concept_id>``: the latest modify grant on the concept (intent, agent, fencing token):
  what push-time verification checks a commit's token against (``verify_commits``).
- ``index/current`` and ``index/chunk/<n>``: the code index matching resolves names with (its
  packed chunks, as ``install_index`` delivered them); ``index/staging`` and
  ``index/staging/<n>``: an index still arriving, or complete and waiting for a registry push.

Indexes (concept -> modifying intent, concept -> depending intents, and the same for lapsed
intents) live only in memory and are rebuilt by ``from_records``; they make a verdict's cost
follow the concepts it touches, not the number of intents or concepts.
"""

from __future__ import annotations

import bisect
import heapq
import json
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tetherlab.cluster.core.engine import view, world
from tetherlab.cluster.core.engine.codeindex import CodeIndex, CodeIndexError, unpack
from tetherlab.cluster.core.engine.commands import (
    CloseSession,
    Command,
    Expire,
    Heartbeat,
    Init,
    InstallIndex,
    LeaderElected,
    OpenSession,
    PushRegistry,
    ReportChanges,
    Revoke,
    SubmitIntent,
    check_matched,
)
from tetherlab.cluster.core.engine.footprint import (
    SOFT_DEPENDENCY,
    SOFT_FILE,
    SOFT_PER_INTENT_MAX,
    SOFT_SYMBOL,
    Footprint,
)
from tetherlab.cluster.core.engine.footprint import build as build_footprint
from tetherlab.cluster.core.engine.matching import match_intent
from tetherlab.cluster.core.engine.model import (
    ABANDONED,
    ACTIVE,
    COMPLETED,
    CONTINUE,
    DEPEND_ON_MODIFIED,
    HOLDING,
    LAPSED,
    MODIFY_DEPENDED,
    MODIFY_MODIFY,
    REVERT,
    REVERTED,
    SESSION_LAPSED,
    SESSION_OPEN,
    STATUSES,
    STOP,
    STOPPED,
    TRANSITIONS,
    Intent,
    IntentBody,
    Session,
    canonical_remote,
)
from tetherlab.cluster.core.engine.registry import DRIFT_WARN, POLICY_STOP, Registry, concept_from_json
from tetherlab.cluster.core.errors import CommandError
from tetherlab.cluster.protocol import jsoncodec

NS_META = "meta"
NS_REGISTRY = "registry"
NS_CONCEPTS = "concepts"
NS_SESSIONS = "sessions"
NS_INTENTS = "intents"
NS_HISTORY = "history"
NS_GRANTS = "grants"
NS_INDEX = "index"
# Heartbeats: one record per heartbeat entry ({"at_ms", "deadline_ms", "agents"}) instead of a
# rewrite of every session it renews; deleted once every agent in it was renewed again.
NS_RENEWALS = "renewals"
# The recent drift and soft-conflict events, one record each (key: the event's sequence number),
# so logging one writes one small record instead of re-encoding the whole bounded log.
NS_CONFLICTS = "conflicts"
NAMESPACES = (NS_META, NS_REGISTRY, NS_CONCEPTS, NS_SESSIONS, NS_INTENTS, NS_HISTORY, NS_GRANTS, NS_INDEX,
              NS_RENEWALS, NS_CONFLICTS)
KEY_STAGING = "staging"
UNCOORDINATED_ACCEPT = "accept"
UNCOORDINATED_REFUSE = "refuse"
VERIFY_COMMITS_MAX = 256  # commits judged in one query
VERIFY_PATHS_MAX = 4096  # paths of one commit judged in one query (a client splits bigger ones)
KEY_CLUSTER = "cluster"
KEY_CLOCK = "clock"
# meta/conflicts: the whole event log in one record, as states written before NS_CONFLICTS hold
# it; read on load and replaced by per-event records when the next event is logged.
KEY_CONFLICTS = "conflicts"
KEY_CURRENT = "current"

# Bounds (every replica must use the same values: they shape the records).
HISTORY_PER_CONCEPT = 5
FINISHED_INTENTS_MAX = 10_000
# A lapsed session is kept this long so its agent can reconnect and learn what happened.
SESSION_RETAIN_MS = 24 * 3600 * 1000
# Conflicts listed in one verdict; the decision itself always considers every holder.
CONFLICTS_MAX = 20
LIST_LIMIT_MAX = 1000
CONFLICT_LOG_MAX = 200  # drift and soft-conflict events kept for `tetherlab conflicts list`

Write = tuple[str, str, bytes | None]


@dataclass(frozen=True)
class Applied:
    """What one command did: its JSON result (a verdict, another result, or ``{"error"}``) and
    every record it changed, as (namespace, key, value or None for a delete), sorted."""

    result: dict[str, Any]
    writes: list[Write]


def _encode(obj: Any) -> bytes:
    return jsoncodec.dumps(obj, sort_keys=True)


def _conflict_key(seq: int) -> str:
    return f"{seq:012d}"  # sorts as it counts


def _chunk_key(kind: str, seq: int) -> str:
    return f"{kind}/{seq:05d}"


def _index_of(intent_id: str) -> int:
    return int(intent_id[2:])


def _renewal_key(index: int) -> str:
    return f"{index:012d}"


@dataclass(frozen=True)
class MatchBasis:
    """The registry and code index a plan is matched against, and their versions."""

    registry: Registry | None
    code: CodeIndex | None
    index_version: int

    @property
    def registry_version(self) -> int:
        return self.registry.version if self.registry is not None else 0

    def match(self, body: IntentBody) -> dict[str, Any]:
        """``match_intent``'s claims plus the code index version (raises CommandError)."""
        claims = match_intent(self.registry, body, self.code)
        claims["index_version"] = self.index_version
        return claims


def needs_match(cmd: SubmitIntent) -> bool:
    """Whether a proposer has a plan to match for ``cmd`` (one with a new plan, not yet matched)."""
    return cmd.intent is not None and cmd.trigger in ("initial", "replan") and cmd.matched is None


def with_match(cmd: SubmitIntent, claims: dict[str, Any]) -> SubmitIntent:
    """``cmd`` carrying the proposer's claims (``SubmitIntent.matched``). Only what is new is
    checked (as ``SubmitIntent`` checks ``matched``): the rest of ``cmd`` was checked when it was
    built, and ``dataclasses.replace`` ran every field's check again for each plan a leader
    matched (its agent id, tool and trigger: 2% of a busy leader's GIL)."""
    check_matched(claims, cmd.intent, cmd.trigger)
    out = object.__new__(type(cmd))
    out.__dict__.update(cmd.__dict__, matched=claims)  # frozen: no __setattr__, and no __init__
    return out


def prematched(cmd: SubmitIntent, basis: MatchBasis) -> SubmitIntent:
    """``cmd`` carrying the proposer's match (``SubmitIntent.matched``), or ``cmd`` itself when
    there is nothing to match or matching refuses (apply then refuses the same way, in order)."""
    if not needs_match(cmd):
        return cmd
    assert cmd.intent is not None
    try:
        claims = basis.match(cmd.intent)
    except CommandError:
        return cmd
    return with_match(cmd, claims)


@dataclass(frozen=True)
class Limits:
    history_per_concept: int = HISTORY_PER_CONCEPT
    finished_intents_max: int = FINISHED_INTENTS_MAX
    session_retain_ms: int = SESSION_RETAIN_MS


class Engine:
    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._cluster: dict[str, Any] | None = None
        self._clock_ms = 0
        self._last_index = 0
        self._registry: Registry | None = None
        self._sessions: dict[str, Session] = {}
        self._intents: dict[str, Intent] = {}
        self._history: dict[str, list[dict[str, Any]]] = {}
        self._grants: dict[str, dict[str, Any]] = {}  # concept -> the latest modify grant on it
        # Footprints of active intents (core/engine/footprint.py): path and path::symbol -> intents.
        self._foot_files: dict[str, dict[str, None]] = {}
        self._foot_syms: dict[str, dict[str, None]] = {}
        # intent -> the active intents whose soft conflicts name it (a report updates both sides
        # without scanning every intent)
        self._soft_by: dict[str, dict[str, None]] = {}
        self._conflict_log: list[dict[str, Any]] = []  # recent drifts and soft conflicts, bounded
        self._conflict_seq0 = 0  # the sequence number (NS_CONFLICTS key) of _conflict_log[0]
        self._conflicts_legacy = False  # loaded from one meta/conflicts record, not yet migrated
        # Finished (and lapsed) intents, oldest first: compaction pops from the front. An
        # OrderedDict, not a dict: once there are finished_intents_max, every finish evicts the
        # oldest, and a dict finds its first key by skipping the deleted slots before it (5 µs an
        # eviction at 10,000 in a microbenchmark, against 0.6 µs), on every replica.
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._mod: dict[str, str] = {}
        self._dep: dict[str, dict[str, None]] = {}
        self._lmod: dict[str, dict[str, None]] = {}
        self._ldep: dict[str, dict[str, None]] = {}
        self._counts: dict[str, int] = dict.fromkeys(STATUSES, 0)
        self._dirty: dict[tuple[str, str], None] = {}
        self._finished_now: list[str] = []
        # The code index: the active one ({"version", "digest", "files", "symbols"} and its
        # chunks), and one being delivered ({"digest", "total", "complete"} and chunks by seq).
        self._code: CodeIndex | None = None
        self._index_meta: dict[str, Any] | None = None
        self._index_chunks: list[str] = []
        self._staging: dict[str, Any] | None = None
        self._staging_chunks: dict[int, str] = {}
        # Session renewals (heartbeats): the renewal records by index, how many agents each still
        # renews, the latest renewal of each agent, and, for sessions whose times a renewal moved
        # past their session record, the (last_seen_ms, deadline_ms) that record holds.
        self._renewals: dict[int, dict[str, Any]] = {}
        self._renew_live: dict[int, int] = {}
        self._renew_ref: dict[str, int] = {}
        self._session_rec: dict[str, tuple[int, int]] = {}
        # Plans matched at apply vs proposer matches reused (not state: counters for operators).
        self.matches_made = 0
        self.matches_reused = 0

    # --- apply ---------------------------------------------------------------------------------

    def apply(self, cmd: Command, *, index: int, now_ms: int) -> Applied:
        """Apply one command decided at Raft ``index``; ``now_ms`` is the leader's clock stamped
        into the entry (``leader_elected`` and ``expire`` carry their own). Never raises for bad
        input: a refused command returns ``{"error": ...}`` and changes nothing."""
        if index <= self._last_index:
            err = CommandError("stale_index", f"index {index} is not above the last applied {self._last_index}")
            return Applied(err.to_json(), [])
        stamped = cmd.now_ms if isinstance(cmd, LeaderElected | Expire) else now_ms
        # The leader's clock may step back across an election; state time never does.
        now = max(self._clock_ms, stamped)
        self._dirty = {}
        self._finished_now = []
        try:
            result = self._HANDLERS[type(cmd)](self, cmd, index, now)
        except CommandError as e:
            # Handlers check everything before they change anything.
            assert not self._dirty, f"{type(cmd).__name__} changed state before refusing"
            return Applied(e.to_json(), [])
        self._compact()
        self._last_index = index
        self._clock_ms = now
        self._touch(NS_META, KEY_CLOCK)
        self._sessions_written(index)
        writes = [(ns, key, self._record(ns, key)) for ns, key in sorted(self._dirty)]
        self._dirty = {}
        return Applied(result, writes)

    def _touch(self, ns: str, key: str) -> None:
        self._dirty[(ns, key)] = None

    # --- session renewals ----------------------------------------------------------------------

    def _sessions_written(self, index: int) -> None:
        """Session records this command writes carry their live times; a session deleted, new or
        reopened here is no longer renewed by any earlier renewal record."""
        for a in [k[1] for k in self._dirty if k[0] == NS_SESSIONS]:
            self._session_rec.pop(a, None)
            s = self._sessions.get(a)
            if s is None or s.opened_index == index:
                self._unref_renewal(a)

    def _unref_renewal(self, agent: str) -> None:
        j = self._renew_ref.pop(agent, None)
        if j is None:
            return
        self._renew_live[j] -= 1
        if self._renew_live[j] == 0:
            del self._renew_live[j]
            del self._renewals[j]
            self._touch(NS_RENEWALS, _renewal_key(j))

    def _renew(self, s: Session, at_ms: int, deadline_ms: int) -> None:
        """Move a session's times forward without rewriting its record (which keeps the old ones)."""
        new = (max(s.last_seen_ms, at_ms), max(s.deadline_ms, deadline_ms))
        old = (s.last_seen_ms, s.deadline_ms)
        if new != old:
            self._session_rec.setdefault(s.agent_id, old)
            s.last_seen_ms, s.deadline_ms = new

    # --- records -------------------------------------------------------------------------------

    def _record(self, ns: str, key: str) -> bytes | None:
        """The current value of one record, encoded; None when it does not exist."""
        obj: Any = None
        if ns == NS_INTENTS:
            i = self._intents.get(key)
            obj = i.to_json() if i is not None else None
        elif ns == NS_SESSIONS:
            s = self._sessions.get(key)
            obj = s.to_json() if s is not None else None
            rec = self._session_rec.get(key)
            if obj is not None and rec is not None:
                obj["last_seen_ms"], obj["deadline_ms"] = rec
        elif ns == NS_RENEWALS:
            obj = self._renewals.get(int(key))
        elif ns == NS_HISTORY:
            obj = self._history.get(key)
        elif ns == NS_GRANTS:
            obj = self._grants.get(key)
        elif ns == NS_CONFLICTS:
            j = int(key) - self._conflict_seq0
            obj = self._conflict_log[j] if 0 <= j < len(self._conflict_log) else None
        elif ns == NS_META and key == KEY_CONFLICTS:
            obj = {"events": self._conflict_log} if self._conflicts_legacy else None
        elif ns == NS_CONCEPTS:
            c = self._registry.concepts.get(key) if self._registry is not None else None
            obj = c.to_json() if c is not None else None
        elif ns == NS_REGISTRY and key == KEY_CURRENT:
            if self._registry is not None:
                obj = {"version": self._registry.version, "concepts": len(self._registry.concepts)}
        elif ns == NS_INDEX:
            obj = self._index_record(key)
        elif ns == NS_META and key == KEY_CLUSTER:
            obj = self._cluster
        elif ns == NS_META and key == KEY_CLOCK:
            obj = {"now_ms": self._clock_ms, "index": self._last_index}
        return _encode(obj) if obj is not None else None

    def _keys(self) -> list[tuple[str, str]]:
        keys: list[tuple[str, str]] = [(NS_META, KEY_CLOCK)] if self._last_index else []
        if self._cluster is not None:
            keys.append((NS_META, KEY_CLUSTER))
        if self._registry is not None:
            keys.append((NS_REGISTRY, KEY_CURRENT))
            keys.extend((NS_CONCEPTS, c) for c in self._registry.concepts)
        if self._index_meta is not None:
            keys.append((NS_INDEX, KEY_CURRENT))
            keys.extend((NS_INDEX, _chunk_key("chunk", k)) for k in range(len(self._index_chunks)))
        if self._staging is not None:
            keys.append((NS_INDEX, KEY_STAGING))
            keys.extend((NS_INDEX, _chunk_key(KEY_STAGING, k)) for k in self._staging_chunks)
        keys.extend((NS_SESSIONS, a) for a in self._sessions)
        keys.extend((NS_RENEWALS, _renewal_key(j)) for j in self._renewals)
        keys.extend((NS_INTENTS, i) for i in self._intents)
        keys.extend((NS_HISTORY, c) for c in self._history)
        keys.extend((NS_GRANTS, c) for c in self._grants)
        if self._conflicts_legacy:
            keys.append((NS_META, KEY_CONFLICTS))
        else:
            keys.extend((NS_CONFLICTS, self._conflict_key_at(j)) for j in range(len(self._conflict_log)))
        return sorted(keys)

    def dump_records(self) -> list[tuple[str, str, bytes]]:
        """Every persistent record, sorted by (namespace, key)."""
        out: list[tuple[str, str, bytes]] = []
        for ns, key in self._keys():
            v = self._record(ns, key)
            assert v is not None
            out.append((ns, key, v))
        return out

    @classmethod
    def from_records(cls, records: Iterable[tuple[str, str, bytes]], limits: Limits | None = None) -> Engine:
        """Rebuild an engine, indexes included, from exactly the records it wrote."""
        e = cls(limits)
        concepts = []
        version: int | None = None
        chunks: dict[int, str] = {}
        conflicts: dict[int, dict[str, Any]] = {}
        for ns, key, raw in records:
            obj = json.loads(raw)
            if ns == NS_INDEX:
                if key == KEY_CURRENT:
                    e._index_meta = obj
                elif key == KEY_STAGING:
                    e._staging = obj
                elif key.startswith("chunk/"):
                    chunks[int(key.rsplit("/", 1)[1])] = obj
                else:
                    e._staging_chunks[int(key.rsplit("/", 1)[1])] = obj
            elif ns == NS_META and key == KEY_CLOCK:
                e._clock_ms, e._last_index = obj["now_ms"], obj["index"]
            elif ns == NS_META and key == KEY_CLUSTER:
                e._cluster = obj
            elif ns == NS_REGISTRY and key == KEY_CURRENT:
                version = obj["version"]
            elif ns == NS_CONCEPTS:
                concepts.append(concept_from_json(obj))
            elif ns == NS_SESSIONS:
                e._sessions[key] = Session.from_json(obj)
            elif ns == NS_RENEWALS:
                e._renewals[int(key)] = obj
            elif ns == NS_INTENTS:
                e._intents[key] = Intent.from_json(obj)
            elif ns == NS_HISTORY:
                e._history[key] = obj
            elif ns == NS_GRANTS:
                e._grants[key] = obj
            elif ns == NS_CONFLICTS:
                conflicts[int(key)] = obj
            elif ns == NS_META and key == KEY_CONFLICTS:
                e._conflict_log, e._conflicts_legacy = obj["events"], True
            else:
                raise ValueError(f"unknown record {ns}/{key}")
        if conflicts and not e._conflicts_legacy:
            # Written in sequence and trimmed from the oldest: the keys are consecutive.
            e._conflict_seq0 = min(conflicts)
            e._conflict_log = [conflicts[k] for k in sorted(conflicts)]
        for j in sorted(e._renewals):
            # An agent's latest renewal after its session was (re)opened is its reference; times
            # only ever move forward, so applying every such renewal in order gives the live ones.
            rec = e._renewals[j]
            e._renew_live[j] = 0
            for a in rec["agents"]:
                s = e._sessions.get(a)
                if s is None or j <= s.opened_index:
                    continue
                prev = e._renew_ref.get(a)
                if prev is not None:
                    e._renew_live[prev] -= 1
                e._renew_ref[a] = j
                e._renew_live[j] += 1
                e._renew(s, rec["at_ms"], rec["deadline_ms"])
        if version is not None:
            e._registry = Registry(concepts, version)
        if e._index_meta is not None:
            e._index_chunks = [chunks[k] for k in sorted(chunks)]
            e._code = unpack(e._index_chunks, e._index_meta["digest"])
        for iid in sorted(e._intents, key=_index_of):
            it = e._intents[iid]
            e._counts[it.status] += 1
            if it.status in HOLDING:
                e._index(it)
        finished = [(it.finished_index, iid) for iid, it in e._intents.items() if it.finished_index is not None]
        e._finished = OrderedDict((iid, None) for _, iid in sorted(finished, key=lambda p: (p[0], _index_of(p[1]))))
        e._sessions = dict(sorted(e._sessions.items()))
        return e

    # --- indexes -------------------------------------------------------------------------------

    def _index(self, it: Intent) -> None:
        if it.status == ACTIVE:
            for c in it.modifies:
                assert c not in self._mod, f"two active intents modify {c}"
                self._mod[c] = it.intent_id
            for c in it.depends:
                self._dep.setdefault(c, {})[it.intent_id] = None
            fp = Footprint.from_json(it.footprint)
            for path in fp.files:
                self._foot_files.setdefault(path, {})[it.intent_id] = None
            for key in fp.symbol_keys():
                self._foot_syms.setdefault(key, {})[it.intent_id] = None
            for x in it.soft:
                self._soft_by.setdefault(x["other_intent_id"], {})[it.intent_id] = None
        else:
            for c in it.modifies:
                self._lmod.setdefault(c, {})[it.intent_id] = None
            for c in it.depends:
                self._ldep.setdefault(c, {})[it.intent_id] = None

    def _unindex(self, it: Intent) -> None:
        if it.status == ACTIVE:
            for c in it.modifies:
                if self._mod.get(c) == it.intent_id:
                    del self._mod[c]
            fp = Footprint.from_json(it.footprint)
            deps: list[tuple[dict[str, dict[str, None]], list[str]]] = [
                (self._dep, it.depends), (self._foot_files, list(fp.files)), (self._foot_syms, fp.symbol_keys()),
                (self._soft_by, [x["other_intent_id"] for x in it.soft])]
        elif it.status == LAPSED:
            deps = [(self._lmod, it.modifies), (self._ldep, it.depends)]
        else:
            return
        for idx, concepts in deps:
            for c in concepts:
                holders = idx.get(c)
                if holders is not None:
                    holders.pop(it.intent_id, None)
                    if not holders:
                        del idx[c]

    def _set_status(self, it: Intent, status: str) -> None:
        """The one place an intent changes status: checks the transition table, keeps the
        indexes and counts in step."""
        assert status in TRANSITIONS[it.status], f"{it.intent_id}: {it.status} -> {status} is not allowed"
        if it.status == ACTIVE and status != ACTIVE:
            self._drop_soft_refs(it)
        self._unindex(it)
        self._counts[it.status] -= 1
        it.status = status
        self._counts[status] += 1
        if status in HOLDING:
            self._index(it)
        self._touch(NS_INTENTS, it.intent_id)

    def _finish(self, it: Intent, status: str, index: int, now: int, ended_by: str = "") -> None:
        self._set_status(it, status)
        it.updated_index = index
        it.finished_index, it.finished_ms = index, now
        it.ended_by = ended_by
        self._finished[it.intent_id] = None  # _compact puts it at the end, in the replicas' order
        self._finished_now.append(it.intent_id)
        if status == COMPLETED:
            for c in it.modifies:
                entries = self._history.setdefault(c, [])
                entries.append(
                    {
                        "intent_id": it.intent_id,
                        "agent_id": it.agent_id,
                        "tool": it.tool,
                        "summary": it.body.summary,
                        "finished_ms": now,
                    }
                )
                del entries[: -self.limits.history_per_concept]
                self._touch(NS_HISTORY, c)

    def _compact(self) -> None:
        # Intents finished by one command share a finished_index: order them by id, the order
        # from_records rebuilds, or replicas that restarted would compact different intents.
        if self._finished_now:
            now = sorted((i for i in set(self._finished_now) if i in self._finished), key=_index_of)
            self._finished_now = []
            for iid in now:
                self._finished.move_to_end(iid)
        while len(self._finished) > self.limits.finished_intents_max:
            iid, _ = self._finished.popitem(last=False)
            it = self._intents.pop(iid)
            # A lapsed intent this old loses its chance to be resumed or told it was reverted.
            self._unindex(it)
            self._counts[it.status] -= 1
            self._touch(NS_INTENTS, iid)

    # --- conflicts -----------------------------------------------------------------------------

    def _policy(self, concept: str) -> str:
        return self._registry.policy(concept) if self._registry is not None else POLICY_STOP

    def _conflict(self, concept: str, kind: str, holder: Intent) -> dict[str, Any]:
        return {
            "concept": concept,
            "kind": kind,
            "holder_agent_id": holder.agent_id,
            "holder_summary": holder.body.summary,
            "since": holder.created_ms,
        }

    def _holders(self, ids: dict[str, None] | None, exclude: str | None) -> list[str]:
        """At most CONFLICTS_MAX holders, earliest first: the listing needs no more, and the
        decision only needs to know there is one."""
        if not ids:
            return []
        if len(ids) <= CONFLICTS_MAX + 1:
            return sorted((i for i in ids if i != exclude), key=_index_of)[:CONFLICTS_MAX]
        return heapq.nsmallest(CONFLICTS_MAX, (i for i in ids if i != exclude), key=_index_of)

    def _check(
        self, modify: list[str], depend: list[str], exclude: str | None
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Conflicts with active intents, split into blocking and relaxed (registry allows)."""
        blocking: list[dict[str, Any]] = []
        relaxed: list[dict[str, Any]] = []
        for c in modify:
            h = self._mod.get(c)
            if h is not None and h != exclude:
                blocking.append(self._conflict(c, MODIFY_MODIFY, self._intents[h]))
            holders = self._holders(self._dep.get(c), exclude)
            if holders:
                out = blocking if self._policy(c) == POLICY_STOP else relaxed
                out.extend(self._conflict(c, MODIFY_DEPENDED, self._intents[h]) for h in holders)
        for c in depend:
            h = self._mod.get(c)
            if h is not None and h != exclude:
                out = blocking if self._policy(c) == POLICY_STOP else relaxed
                out.append(self._conflict(c, DEPEND_ON_MODIFIED, self._intents[h]))
        return blocking[:CONFLICTS_MAX], relaxed[:CONFLICTS_MAX]

    def _invalidated(self, modify: list[str], depend: list[str], exclude: str | None) -> dict[str, str]:
        """Lapsed intents a grant of these claims invalidates: lapsed id -> concept."""
        hit: dict[str, str] = {}
        for c in modify:
            for lid in self._lmod.get(c, {}):
                hit.setdefault(lid, c)
            if self._policy(c) == POLICY_STOP:
                for lid in self._ldep.get(c, {}):
                    hit.setdefault(lid, c)
        for c in depend:
            if self._policy(c) == POLICY_STOP:
                for lid in self._lmod.get(c, {}):
                    hit.setdefault(lid, c)
        hit.pop(exclude or "", None)
        return dict(sorted(hit.items(), key=lambda p: _index_of(p[0])))

    # --- verdicts ------------------------------------------------------------------------------

    @staticmethod
    def _verdict(action: str, it: Intent, conflicts: list[dict[str, Any]], context: str) -> dict[str, Any]:
        return {
            "action": action,
            "intent_id": it.intent_id,
            "fencing_token": it.fencing_token,
            "claims": it.claims,
            "conflicts": conflicts,
            "context": context,
        }

    def _notice(self, s: Session) -> dict[str, Any] | None:
        """The stop/revert verdict an agent has not been told yet, if any."""
        it = self._intents.get(s.intent_id) if s.intent_id else None
        if it is None or it.notified or it.status not in (STOPPED, REVERTED):
            return None
        action = REVERT if it.status == REVERTED else STOP
        return self._verdict(action, it, it.conflicts, world.context_for_notice(it))

    # --- handlers ------------------------------------------------------------------------------

    def _init(self, cmd: Init, index: int, now: int) -> dict[str, Any]:
        canon = canonical_remote(cmd.remote)
        if self._cluster is not None and self._cluster["remote_canonical"] != canon:
            raise CommandError(
                "remote_already_set",
                f"this cluster coordinates git remote {self._cluster['remote']!r}; cannot switch to {cmd.remote!r}",
            )
        if self._cluster is None:
            self._cluster = {"remote": cmd.remote, "remote_canonical": canon, "init_index": index}
        self._cluster["session_ttl_ms"] = cmd.session_ttl_ms
        if cmd.uncoordinated_commits != UNCOORDINATED_ACCEPT or "uncoordinated_commits" in self._cluster:
            self._cluster["uncoordinated_commits"] = cmd.uncoordinated_commits
        self._touch(NS_META, KEY_CLUSTER)
        return {"ok": True, "remote": self._cluster["remote"], "session_ttl_ms": cmd.session_ttl_ms,
                "uncoordinated_commits": cmd.uncoordinated_commits}

    def _push_registry(self, cmd: PushRegistry, index: int, now: int) -> dict[str, Any]:
        current = self._registry.version if self._registry is not None else 0
        if cmd.expected_version is not None and cmd.expected_version != current:
            raise CommandError(
                "registry_version_conflict",
                f"registry is at version {current}, push expected version {cmd.expected_version}",
            )
        staged = self._staged_index(cmd.index_digest) if cmd.index_digest is not None else None
        new = Registry(cmd.concepts, current + 1)
        if staged is not None:
            self._activate_index(staged)
        old = self._registry.concepts if self._registry is not None else {}
        changed = [c for c in new.concepts if old.get(c) != new.concepts[c]]
        removed = [c for c in old if c not in new.concepts]
        self._registry = new
        for c in changed + removed:
            self._touch(NS_CONCEPTS, c)
        for c in removed:
            if self._history.pop(c, None) is not None:
                self._touch(NS_HISTORY, c)
            if self._grants.pop(c, None) is not None:
                self._touch(NS_GRANTS, c)
        self._touch(NS_REGISTRY, KEY_CURRENT)
        return {"ok": True, "version": new.version, "concepts": len(new.concepts),
                "changed": len(changed), "removed": len(removed),
                "index_version": self._index_meta["version"] if self._index_meta is not None else 0}

    # --- the code index ---------------------------------------------------------------------------

    def _index_record(self, key: str) -> Any:
        if key == KEY_CURRENT:
            return self._index_meta
        if key == KEY_STAGING:
            return self._staging
        kind, _, n = key.rpartition("/")
        seq = int(n)
        if kind == "chunk":
            return self._index_chunks[seq] if seq < len(self._index_chunks) else None
        return self._staging_chunks.get(seq)

    def _install_index(self, cmd: InstallIndex, index: int, now: int) -> dict[str, Any]:
        if self._index_meta is not None and self._index_meta["digest"] == cmd.digest:
            return {"ok": True, "digest": cmd.digest, "complete": True, "active": True,
                    "index_version": self._index_meta["version"], "unchanged": True}
        fresh = self._staging is None or self._staging["digest"] != cmd.digest
        if not fresh and self._staging is not None and self._staging["total"] != cmd.total:
            raise CommandError("bad_field", f"index {cmd.digest[:12]} is being sent in {self._staging['total']} "
                                            f"chunks, not {cmd.total}")
        chunks = {} if fresh else dict(self._staging_chunks)
        chunks[cmd.seq] = cmd.data
        complete = len(chunks) == cmd.total
        built: CodeIndex | None = None
        if complete:
            try:
                built = unpack([chunks[k] for k in range(cmd.total)], cmd.digest)
            except CodeIndexError as e:
                raise CommandError("invalid_index", f"code index {cmd.digest[:12]}: {e}") from None
        # Checked; now change state.
        if fresh:
            self._drop_staging()
        self._staging = {"digest": cmd.digest, "total": cmd.total, "complete": complete}
        self._staging_chunks = chunks
        self._touch(NS_INDEX, KEY_STAGING)
        self._touch(NS_INDEX, _chunk_key(KEY_STAGING, cmd.seq))
        out: dict[str, Any] = {"ok": True, "digest": cmd.digest, "received": len(chunks), "total": cmd.total,
                               "complete": complete, "active": False}
        if complete and cmd.activate:
            assert built is not None
            self._activate_index(built)
            out.update(active=True, index_version=self._index_meta["version"] if self._index_meta else 0,
                       files=len(built.files), symbols=built.symbol_count)
        return out

    def _activate_index(self, built: CodeIndex) -> None:
        """The complete staged index becomes the active one (its chunks move with it)."""
        assert self._staging is not None and self._staging["complete"]
        old = len(self._index_chunks)
        chunks = [self._staging_chunks[k] for k in range(self._staging["total"])]
        version = (self._index_meta["version"] if self._index_meta is not None else 0) + 1
        self._drop_staging()
        self._code = built
        self._index_chunks = chunks
        self._index_meta = {"version": version, "digest": built.digest, "files": len(built.files),
                            "symbols": built.symbol_count, "chunks": len(chunks)}
        self._touch(NS_INDEX, KEY_CURRENT)
        for k in range(max(old, len(chunks))):
            self._touch(NS_INDEX, _chunk_key("chunk", k))

    def _drop_staging(self) -> None:
        if self._staging is not None:
            self._touch(NS_INDEX, KEY_STAGING)
        for k in self._staging_chunks:
            self._touch(NS_INDEX, _chunk_key(KEY_STAGING, k))
        self._staging = None
        self._staging_chunks = {}

    def _staged_index(self, digest: str) -> CodeIndex | None:
        """The complete staged index with this digest, rebuilt (None: it is the active one)."""
        if self._index_meta is not None and self._index_meta["digest"] == digest:
            return None
        st = self._staging
        if st is None or st["digest"] != digest or not st["complete"]:
            raise CommandError("unknown_index", f"no complete code index {digest[:12]}…: send it with install_index "
                                                "first")
        return unpack([self._staging_chunks[k] for k in range(st["total"])], digest)

    @property
    def code_index(self) -> CodeIndex | None:
        return self._code

    def index_info(self) -> dict[str, Any]:
        """The active index's version, digest and size, and any index still arriving."""
        out: dict[str, Any] = dict(self._index_meta) if self._index_meta is not None else {"version": 0}
        if self._staging is not None:
            out["staging"] = {**self._staging, "received": len(self._staging_chunks)}
        return out

    def _ttl(self) -> int:
        assert self._cluster is not None
        ttl: int = self._cluster["session_ttl_ms"]
        return ttl

    def _open_session(self, cmd: OpenSession, index: int, now: int) -> dict[str, Any]:
        if self._cluster is None:
            raise CommandError("not_initialised", "the cluster has no git remote yet: send 'init' first")
        if canonical_remote(cmd.repo_remote) != self._cluster["remote_canonical"]:
            raise CommandError(
                "remote_mismatch",
                f"this cluster coordinates git remote {self._cluster['remote']!r}, but agent "
                f"{cmd.agent_id!r} runs in a repository whose remote is {cmd.repo_remote!r}",
            )
        s = self._sessions.get(cmd.agent_id)
        deadline = now + self._ttl()
        if s is None:
            s = Session(cmd.agent_id, cmd.developer, cmd.tool, cmd.machine, cmd.repo_remote, cmd.base_commit,
                        SESSION_OPEN, index, now, now, deadline)
            self._sessions[cmd.agent_id] = s
        else:
            s.tool, s.machine, s.repo_remote, s.base_commit = cmd.tool, cmd.machine, cmd.repo_remote, cmd.base_commit
            if s.status == SESSION_LAPSED:
                s.status, s.lapsed_ms, s.opened_index, s.opened_ms = SESSION_OPEN, None, index, now
            s.last_seen_ms, s.deadline_ms = now, max(s.deadline_ms, deadline)
        self._touch(NS_SESSIONS, cmd.agent_id)
        it = self._intents.get(s.intent_id) if s.intent_id else None
        return {
            "ok": True,
            "session": s.to_json(),
            "intent": it.summary_json() if it is not None else None,
            "notice": self._notice(s),
        }

    def _close_session(self, cmd: CloseSession, index: int, now: int) -> dict[str, Any]:
        s = self._sessions.get(cmd.agent_id)
        if s is None:
            raise CommandError("no_session", f"agent {cmd.agent_id!r} has no session")
        it = self._intents.get(s.intent_id) if s.intent_id else None
        abandoned = None
        if it is not None and it.status in HOLDING:
            self._finish(it, ABANDONED, index, now, "session closed")
            abandoned = it.intent_id
        del self._sessions[cmd.agent_id]
        self._touch(NS_SESSIONS, cmd.agent_id)
        return {"ok": True, "abandoned": abandoned}

    def _heartbeat(self, cmd: Heartbeat, index: int, now: int) -> dict[str, Any]:
        # The hottest apply at scale (thousands of agents a second on every replica): the TTL is
        # read once, an intent is looked up once, and _notice runs only for an untold verdict.
        lapsed: list[str] = []
        unknown: list[str] = []
        notices: dict[str, Any] = {}
        soft: dict[str, Any] = {}
        renewed: list[str] = []
        deadline = -1  # now + the TTL, once there is a session to renew (no TTL before init)
        sessions, intents, renew = self._sessions, self._intents, self._renew
        for a in cmd.agent_ids:
            s = sessions.get(a)
            if s is None:
                unknown.append(a)
                continue
            if s.status == SESSION_LAPSED:
                lapsed.append(a)
                continue
            if deadline < 0:
                deadline = now + self._ttl()
            renew(s, now, deadline)
            renewed.append(a)
            it = intents.get(s.intent_id) if s.intent_id else None
            if it is None:
                continue
            if not it.notified and it.status in (STOPPED, REVERTED):
                notices[a] = self._notice(s)
            news = it.soft_changed_index > it.soft_told_index
            if it.status == ACTIVE and (it.soft or news):
                # Someone else's changes overlap this agent's: in every heartbeat reply while they
                # do (a hedged heartbeat's reply, or a late one, may never reach the shim; the shim
                # tells its agent of each conflict once). An emptied list goes out once.
                soft[a] = {"intent_id": it.intent_id, "soft_conflicts": list(it.soft),
                           "context": world.context_for_changes(it, [], [])}
                if news:
                    it.soft_told_index = it.soft_changed_index
                    self._touch(NS_INTENTS, it.intent_id)
        if renewed:
            renew_ref, unref = self._renew_ref, self._unref_renewal
            for a in renewed:
                unref(a)
                renew_ref[a] = index
            self._renewals[index] = {"at_ms": now, "deadline_ms": deadline, "agents": renewed}
            self._renew_live[index] = len(renewed)
            self._touch(NS_RENEWALS, _renewal_key(index))
        # The TTL in force at this renewal: the shim re-checks its fail-closed bound against it.
        ttl_ms = self._cluster["session_ttl_ms"] if self._cluster is not None else None
        return {"ok": True, "refreshed": len(renewed), "lapsed": lapsed, "unknown": unknown, "notices": notices,
                "soft": soft, "session_ttl_ms": ttl_ms}

    def _leader_elected(self, cmd: LeaderElected, index: int, now: int) -> dict[str, Any]:
        # Heartbeats sent while there was no leader never reached the log: give every session
        # one full TTL from the new leader's clock before anything can expire.
        extended = 0
        if self._cluster is not None:
            for a, s in self._sessions.items():
                if s.status == SESSION_OPEN and s.deadline_ms < now + self._ttl():
                    s.deadline_ms = now + self._ttl()
                    self._touch(NS_SESSIONS, a)
                    extended += 1
        return {"ok": True, "extended": extended}

    def _expire(self, cmd: Expire, index: int, now: int) -> dict[str, Any]:
        lapsed: list[str] = []
        intents: list[str] = []
        forgotten: list[str] = []
        # Runs once a second on every replica over thousands of sessions: only the due ones are
        # sorted (the order of the lapses is part of the result). Due: open past its deadline, or
        # lapsed past retention; nothing below changes another session, so the status decides.
        retain_ms = self.limits.session_retain_ms
        due = sorted(a for a, s in self._sessions.items()
                     if (s.deadline_ms < now if s.status == SESSION_OPEN
                         else s.status == SESSION_LAPSED and (s.lapsed_ms or 0) + retain_ms < now))
        for a in due:
            s = self._sessions[a]
            it = self._intents.get(s.intent_id) if s.intent_id else None
            if s.status == SESSION_OPEN:
                s.status, s.lapsed_ms = SESSION_LAPSED, now
                self._touch(NS_SESSIONS, a)
                lapsed.append(a)
                if it is not None and it.status == ACTIVE:
                    self._finish(it, LAPSED, index, now, "session lapsed")
                    intents.append(it.intent_id)
            else:
                if it is not None and it.status == LAPSED:
                    self._finish(it, ABANDONED, index, now, "session lapsed and was forgotten")
                del self._sessions[a]
                self._touch(NS_SESSIONS, a)
                forgotten.append(a)
        return {"ok": True, "lapsed": lapsed, "intents_lapsed": intents, "forgotten": forgotten}

    def _revoke(self, cmd: Revoke, index: int, now: int) -> dict[str, Any]:
        it = self._intents.get(cmd.intent_id)
        if it is None:
            raise CommandError("unknown_intent", f"no intent {cmd.intent_id!r}")
        if it.status not in HOLDING:
            raise CommandError("not_active", f"intent {cmd.intent_id!r} is already {it.status}")
        status = REVERTED if cmd.revert else STOPPED
        why = f"revoked by {cmd.by}" + (f": {cmd.reason}" if cmd.reason else "")
        self._finish(it, status, index, now, why)
        it.conflicts = []
        it.notified = False
        return {"ok": True, "intent_id": it.intent_id, "agent_id": it.agent_id, "status": status}

    def _submit(self, cmd: SubmitIntent, index: int, now: int) -> dict[str, Any]:
        result = self._submit_checked(cmd, index, now)
        # An agent that plans, completes or abandons is alive: its shim counts the answer as a
        # confirmation (it starts running on a verdict), so the session must last a TTL from here
        # too, like a heartbeat. Otherwise a verdict could arrive just before the session lapses
        # and the agent would run while its concepts went to someone else.
        s = self._sessions[cmd.agent_id]
        s.last_seen_ms = now
        s.deadline_ms = max(s.deadline_ms, now + self._ttl())
        self._touch(NS_SESSIONS, cmd.agent_id)
        return result

    def _submit_checked(self, cmd: SubmitIntent, index: int, now: int) -> dict[str, Any]:
        s = self._sessions.get(cmd.agent_id)
        if s is None:
            raise CommandError("no_session", f"agent {cmd.agent_id!r} has no session: send 'open_session' first")
        if s.status != SESSION_OPEN:
            raise CommandError("session_lapsed", f"the session of agent {cmd.agent_id!r} lapsed: open a new one")
        cur = self._intents.get(s.intent_id) if s.intent_id else None
        if cmd.intent_id is not None and (cur is None or cur.intent_id != cmd.intent_id):
            have = cur.intent_id if cur is not None else None
            raise CommandError(
                "intent_mismatch",
                f"agent {cmd.agent_id!r} names intent {cmd.intent_id!r}; its current intent is {have!r}",
            )
        notice = self._notice(s)
        if notice is not None and cur is not None:
            # The agent learns of the stop/revert it missed; this command is not applied.
            cur.notified = True
            self._touch(NS_INTENTS, cur.intent_id)
            return notice
        if cmd.trigger in ("complete", "abandon"):
            return self._end(cmd, cur, index, now)
        return self._plan(cmd, s, cur, index, now)

    def _end(self, cmd: SubmitIntent, cur: Intent | None, index: int, now: int) -> dict[str, Any]:
        status = COMPLETED if cmd.trigger == "complete" else ABANDONED
        if cur is not None and cur.status == status:
            return self._verdict(CONTINUE, cur, [], world.context_for_end(cur))  # a retry: same answer
        if cur is None or cur.status not in HOLDING:
            have = f"its last intent {cur.intent_id} is {cur.status}" if cur is not None else "it has none"
            raise CommandError(
                "no_active_intent", f"agent {cmd.agent_id!r} has no active intent to {cmd.trigger}: {have}"
            )
        if cmd.intent is not None and cmd.intent.summary != cur.body.summary:
            cur.body = cmd.intent  # the final word on what was done, for the history
        self._finish(cur, status, index, now, f"{cmd.trigger} by agent")
        cur.conflicts = []
        return self._verdict(CONTINUE, cur, [], world.context_for_end(cur))

    def _plan(self, cmd: SubmitIntent, s: Session, cur: Intent | None, index: int, now: int) -> dict[str, Any]:
        assert cmd.intent is not None
        claims = self._claims_for(cmd)  # may refuse: before any change
        modify = [c["concept"] for c in claims["modify"]]
        depend = [c["concept"] for c in claims["depend"]]
        holding = cur if cur is not None and cur.status in HOLDING else None
        exclude = holding.intent_id if holding is not None else None
        blocking, relaxed = self._check(modify, depend, exclude)
        same = holding is not None and cmd.trigger == "replan"
        if holding is not None and not same:
            self._finish(holding, ABANDONED, index, now, f"superseded by i-{index}")
        if same:
            assert holding is not None
            it = holding
            assert ACTIVE in TRANSITIONS[it.status]
            self._unindex(it)  # the old plan's claims; the new ones are indexed once granted
            if it.status == LAPSED:
                self._finished.pop(it.intent_id, None)
                it.finished_index = it.finished_ms = None
            self._counts[it.status] -= 1
            self._counts[ACTIVE] += 1
            it.status = ACTIVE
            it.body, it.tool = cmd.intent, cmd.tool
        else:
            it = Intent(f"i-{index}", cmd.agent_id, cmd.tool, cmd.intent, ACTIVE, cmd.trigger, index, now, index)
            self._intents[it.intent_id] = it
            self._counts[ACTIVE] += 1
            s.intent_id = it.intent_id
            self._touch(NS_SESSIONS, s.agent_id)
        it.trigger, it.updated_index = cmd.trigger, index
        it.claims, it.registry_version = claims, claims["registry_version"]
        self._touch(NS_INTENTS, it.intent_id)
        if blocking:
            it.conflicts = (blocking + relaxed)[:CONFLICTS_MAX]
            self._finish(it, STOPPED, index, now, "stopped by conflict")
            return self._verdict(STOP, it, it.conflicts, world.context_for_stop(it, blocking))
        it.fencing_token, it.granted_ms = index, now
        it.conflicts = relaxed
        it.notified = True
        self._index(it)
        for c in modify:
            self._grants[c] = {"intent_id": it.intent_id, "agent_id": it.agent_id, "fencing_token": index,
                               "granted_ms": now}
            self._touch(NS_GRANTS, c)
        self._revert_invalidated(it, modify, depend, index, now)
        return self._verdict(CONTINUE, it, relaxed, world.context_for_continue(it, relaxed))

    def _claims_for(self, cmd: SubmitIntent) -> dict[str, Any]:
        """The proposer's match when it was computed against the current registry and code index
        (every replica decides this alike, from replicated state), else a match made here."""
        assert cmd.intent is not None
        basis = self.match_basis()
        m = cmd.matched
        if (m is not None and m["registry_version"] == basis.registry_version
                and m["index_version"] == basis.index_version and self._known_concepts(m)):
            self.matches_reused += 1
            return {k: (list(v) if isinstance(v, list | tuple) else v) for k, v in m.items()}
        self.matches_made += 1
        return basis.match(cmd.intent)

    def _known_concepts(self, m: Mapping[str, Any]) -> bool:
        reg = self._registry
        names = [c["concept"] for k in ("modify", "depend") for c in m[k]]
        return all(reg is not None and c in reg.concepts for c in names) if names else True

    def match_basis(self) -> MatchBasis:
        """What matching reads (immutable objects: a push replaces them), for a proposer to match
        a plan outside the store lock and put the claims in the entry (``SubmitIntent.matched``)."""
        return MatchBasis(self._registry, self._code,
                          self._index_meta["version"] if self._index_meta is not None else 0)

    def _revert_invalidated(self, it: Intent, modify: list[str], depend: list[str], index: int, now: int) -> None:
        """A grant takes concepts from intents whose sessions lapsed: they are reverted."""
        for lid, concept in self._invalidated(modify, depend, it.intent_id).items():
            lapsed = self._intents[lid]
            self._finish(lapsed, REVERTED, index, now, f"claimed by {it.intent_id} while its session had lapsed")
            if concept in lapsed.modifies:
                kind = MODIFY_MODIFY if concept in modify else MODIFY_DEPENDED
            else:
                kind = DEPEND_ON_MODIFIED
            lapsed.conflicts = [self._conflict(concept, kind, it)]
            lapsed.notified = False

    # --- footprints: drift and soft conflicts ----------------------------------------------------

    def _report_changes(self, cmd: ReportChanges, index: int, now: int) -> dict[str, Any]:
        s = self._sessions.get(cmd.agent_id)
        if s is None:
            raise CommandError("no_session", f"agent {cmd.agent_id!r} has no session: send 'open_session' first")
        it = self._intents.get(s.intent_id) if s.intent_id else None
        if it is None or it.intent_id != cmd.intent_id:
            have = it.intent_id if it is not None else None
            raise CommandError("intent_mismatch", f"agent {cmd.agent_id!r} reports changes for {cmd.intent_id!r}; "
                                                  f"its current intent is {have!r}")
        if it.status != ACTIVE:
            notice = self._notice(s)
            if notice is not None:
                it.notified = True
                self._touch(NS_INTENTS, it.intent_id)
                return notice
            raise CommandError("not_active", f"intent {it.intent_id} is {it.status}: its changes are not tracked")
        fp = build_footprint(self._registry, cmd.files)
        # Drift: concepts the code reaches that the intent did not claim to modify. A concept
        # whose registry entry only warns, and that someone else holds, is not claimed.
        unclaimed = [c for c in fp.concepts if c not in it.modifies]
        warned: list[dict[str, Any]] = []
        free: list[str] = []
        for c in unclaimed:
            if self._registry is not None and self._registry.concepts[c].drift == DRIFT_WARN:
                deps = [d for d in self._registry.concepts[c].depends_on if d not in it.modifies]
                block, _ = self._check([c], deps, it.intent_id)
                if block:
                    warned.extend({**b, "drift": c, "path": fp.concepts[c]} for b in block)
                    continue
            free.append(c)
        claims: dict[str, list[dict[str, Any]]] = {k: list(it.claims.get(k, [])) for k in ("modify", "depend")}
        blocking: list[dict[str, Any]] = []
        relaxed: list[dict[str, Any]] = []
        if free:
            # A replan made by the master: the reached concepts join the claims, and the whole set is
            # checked as any replan is (the registry may have changed since the last grant).
            for c in free:
                claims["modify"].append({"concept": c, "reasons": [{"kind": "drift", "detail": fp.concepts[c],
                                                                    "source": "changes"}]})
                claims["depend"] = [d for d in claims["depend"] if d["concept"] != c]
                for dep in (self._registry.concepts[c].depends_on if self._registry is not None else ()):
                    if dep not in {x["concept"] for x in claims["modify"] + claims["depend"]}:
                        claims["depend"].append({"concept": dep, "reasons": [
                            {"kind": "depends_on", "detail": f"{c} depends on {dep}", "source": c}]})
            claims["modify"].sort(key=lambda x: x["concept"])
            claims["depend"].sort(key=lambda x: x["concept"])
            blocking, relaxed = self._check([x["concept"] for x in claims["modify"]],
                                            [x["concept"] for x in claims["depend"]], it.intent_id)
            for bl in blocking:
                bl.setdefault("path", fp.concepts.get(bl["concept"], ""))
        self._unindex(it)
        it.footprint = fp.to_json()
        it.updated_index = index
        self._touch(NS_INTENTS, it.intent_id)
        if blocking:
            # Its changes there would have to be undone when the holder modifies a reached concept.
            revert = any(b["kind"] == MODIFY_MODIFY and b["concept"] in free for b in blocking)
            it.conflicts = blocking[:CONFLICTS_MAX]
            self._index(it)
            self._finish(it, REVERTED if revert else STOPPED, index, now,
                         f"its changes reached {blocking[0]['concept']}, held by {blocking[0]['holder_agent_id']}")
            self._log_conflicts([{"kind": "drift_revert" if revert else "drift_stop", "intent_id": it.intent_id,
                                  "agent_id": it.agent_id, "concept": b["concept"], "path": b["path"],
                                  "other_agent_id": b["holder_agent_id"]} for b in blocking[:3]], index, now)
            action = REVERT if revert else STOP
            return {**self._verdict(action, it, it.conflicts, world.context_for_drift(it, blocking, revert)),
                    "drift": {"blocked": sorted({b["concept"] for b in blocking})}}
        if free:
            it.claims = {**it.claims, **claims}
            it.fencing_token, it.granted_ms = index, now
            it.conflicts = relaxed[:CONFLICTS_MAX]
            for c in it.modifies:
                self._grants[c] = {"intent_id": it.intent_id, "agent_id": it.agent_id, "fencing_token": index,
                                   "granted_ms": now}
                self._touch(NS_GRANTS, c)
            self._log_conflicts([{"kind": "drift_claimed", "intent_id": it.intent_id, "agent_id": it.agent_id,
                                  "concept": c, "path": fp.concepts[c]} for c in free], index, now)
        if warned:
            self._log_conflicts([{"kind": "drift_warned", "intent_id": it.intent_id, "agent_id": it.agent_id,
                                  "concept": w["concept"], "path": w["path"], "other_agent_id": w["holder_agent_id"]}
                                 for w in warned[:3]], index, now)
        self._index(it)
        if free:
            self._revert_invalidated(it, it.modifies, it.depends, index, now)
        self._refresh_soft(it, fp, index, now)
        out = self._verdict(CONTINUE, it, (relaxed + warned)[:CONFLICTS_MAX],
                            world.context_for_changes(it, free, warned))
        out["drift"] = {"claimed": free, "warned": sorted({w["concept"] for w in warned})}
        out["soft_conflicts"] = it.soft
        it.soft_told_index = max(it.soft_told_index, it.soft_changed_index)
        return out

    def _refresh_soft(self, it: Intent, fp: Footprint, index: int, now: int) -> None:
        """Recompute this intent's soft conflicts from its footprint, and the other side of each."""
        found: dict[tuple[str, str, str], dict[str, Any]] = {}

        def add(other_id: str, kind: str, what: str, extra: dict[str, Any]) -> None:
            if other_id == it.intent_id or other_id not in self._intents:
                return
            found.setdefault((other_id, kind, what), {"kind": kind, **extra})

        for path in fp.files:
            for other in self._foot_files.get(path, {}):
                add(other, SOFT_FILE, path, {"path": path})
        for key in fp.symbol_keys():
            path, _, sym = key.partition("::")
            for other in self._foot_syms.get(key, {}):
                add(other, SOFT_SYMBOL, key, {"path": path, "symbol": sym})
        if self._registry is not None:
            for path, f in fp.files.items():
                for sym in f["symbols"]:
                    for cid in f["concepts"]:
                        for other in self._dep.get(cid, {}):
                            add(other, SOFT_DEPENDENCY, f"{cid}:{sym}",
                                {"path": path, "symbol": sym, "concept": cid})
        mine: list[dict[str, Any]] = []
        touched_others: dict[str, list[dict[str, Any]]] = {}
        for (other_id, _kind, _what), c in sorted(found.items()):
            o = self._intents[other_id]
            mine.append({**c, "other_intent_id": other_id, "other_agent_id": o.agent_id,
                         "other_summary": o.body.summary})
            theirs = {**c, "other_intent_id": it.intent_id, "other_agent_id": it.agent_id,
                      "other_summary": it.body.summary}
            if c["kind"] == SOFT_DEPENDENCY:
                theirs["kind"] = SOFT_DEPENDENCY
                theirs["mirror"] = True  # the other side: someone changes what you rely on
            touched_others.setdefault(other_id, []).append(theirs)
        new_pairs = {(m["other_intent_id"], m["kind"], m.get("symbol", m["path"])) for m in mine} - \
            {(m["other_intent_id"], m["kind"], m.get("symbol", m["path"])) for m in it.soft}
        if mine != it.soft:
            self._set_soft(it, mine[-SOFT_PER_INTENT_MAX:], index)
        # The other side of every pair: replace what this intent contributed to their lists.
        for oid in sorted(set(touched_others) | {x["other_intent_id"] for x in mine} |
                          set(self._soft_by.get(it.intent_id, {})), key=_index_of):
            o = self._intents.get(oid)
            if o is None or o.status != ACTIVE:
                continue
            kept = [x for x in o.soft if x["other_intent_id"] != it.intent_id]
            updated = (kept + touched_others.get(oid, []))[-SOFT_PER_INTENT_MAX:]
            if updated != o.soft:
                self._set_soft(o, updated, index)
                self._touch(NS_INTENTS, oid)
        if new_pairs:
            self._log_conflicts([{"kind": f"soft_{k}", "intent_id": it.intent_id, "agent_id": it.agent_id,
                                  "other_intent_id": oid, "other_agent_id": self._intents[oid].agent_id, "what": w}
                                 for oid, k, w in sorted(new_pairs)][:5], index, now)

    def _set_soft(self, o: Intent, soft: list[dict[str, Any]], index: int) -> None:
        """The one place an intent's soft conflicts change: keeps ``_soft_by`` in step."""
        if o.status == ACTIVE:
            for x in o.soft:
                refs = self._soft_by.get(x["other_intent_id"])
                if refs is not None:
                    refs.pop(o.intent_id, None)
                    if not refs:
                        del self._soft_by[x["other_intent_id"]]
            for x in soft:
                self._soft_by.setdefault(x["other_intent_id"], {})[o.intent_id] = None
        o.soft = soft
        o.soft_changed_index = index

    def _drop_soft_refs(self, it: Intent) -> None:
        """An intent leaves ACTIVE: its soft conflicts end for the others too."""
        for oid in sorted({x["other_intent_id"] for x in it.soft} | set(self._soft_by.get(it.intent_id, {})),
                          key=_index_of):
            o = self._intents.get(oid)
            if o is None:
                continue
            kept = [y for y in o.soft if y["other_intent_id"] != it.intent_id]
            if kept != o.soft:
                self._set_soft(o, kept, it.updated_index)
                self._touch(NS_INTENTS, o.intent_id)

    def _log_conflicts(self, events: list[dict[str, Any]], index: int, now: int) -> None:
        if not events:
            return
        log = self._conflict_log
        if self._conflicts_legacy:
            # First event since a state written with one meta/conflicts record: that record goes,
            # and every kept event gets its own.
            self._conflicts_legacy = False
            self._touch(NS_META, KEY_CONFLICTS)
            for j in range(len(log)):
                self._touch(NS_CONFLICTS, self._conflict_key_at(j))
        for e in events:
            self._touch(NS_CONFLICTS, self._conflict_key_at(len(log)))
            log.append({"index": index, "at_ms": now, **e})
        drop = len(log) - CONFLICT_LOG_MAX
        if drop > 0:
            for j in range(drop):
                self._touch(NS_CONFLICTS, self._conflict_key_at(j))
            del log[:drop]
            self._conflict_seq0 += drop

    def _conflict_key_at(self, j: int) -> str:
        """The NS_CONFLICTS key of ``_conflict_log[j]``."""
        return _conflict_key(self._conflict_seq0 + j)

    _HANDLERS: dict[type, Callable[[Engine, Any, int, int], dict[str, Any]]] = {
        Init: _init,
        PushRegistry: _push_registry,
        InstallIndex: _install_index,
        OpenSession: _open_session,
        CloseSession: _close_session,
        Heartbeat: _heartbeat,
        SubmitIntent: _submit,
        Revoke: _revoke,
        LeaderElected: _leader_elected,
        Expire: _expire,
        ReportChanges: _report_changes,
    }

    # --- queries (read-only) ---------------------------------------------------------------------

    def cluster_settings(self) -> dict[str, Any] | None:
        """``{"remote", "remote_canonical", "session_ttl_ms", "init_index"}`` once ``init`` ran."""
        return dict(self._cluster) if self._cluster is not None else None

    def verify_commits(self, commits: list[dict[str, Any]]) -> dict[str, Any]:
        """Push-time fencing: may each commit land? Read-only; ``commits`` are
        ``{"commit", "paths", "agent"?, "intent"?, "fence"?}`` (the trailers its author's shim
        wrote). The rules, in docs/git-fencing.md:

        - a touched concept (by the commit's paths and the registry's globs) that an active intent
          other than the commit's own modifies refuses the commit, naming the holder;
        - with trailers, the named intent must have been granted a modify on every touched
          concept, not been revoked, and no later modify grant on a touched concept may exist
          (the claim was lost and given to someone else);
        - without trailers, a commit that touches no held concept is uncoordinated: accepted or
          refused by the cluster's ``uncoordinated_commits`` setting.
        """
        if len(commits) > VERIFY_COMMITS_MAX:
            raise CommandError("too_large", f"at most {VERIFY_COMMITS_MAX} commits per verification")
        policy = (self._cluster or {}).get("uncoordinated_commits", UNCOORDINATED_ACCEPT)
        out = [self._verify_one(c, policy) for c in commits]
        return {"results": out, "registry_version": self._registry.version if self._registry else 0,
                "uncoordinated_commits": policy}

    def _verify_one(self, c: dict[str, Any], policy: str) -> dict[str, Any]:
        paths = c.get("paths") or []
        if len(paths) > VERIFY_PATHS_MAX:
            raise CommandError("too_large", f"commit {c.get('commit')}: at most {VERIFY_PATHS_MAX} paths per query")
        touched: dict[str, str] = {}  # concept -> the first path that touches it
        if self._registry is not None:
            for path in paths:
                for cid, _glob in self._registry.globs.match(path):
                    touched.setdefault(cid, path)
        reasons: list[dict[str, Any]] = []
        intent_id, fence, agent = c.get("intent"), c.get("fence"), c.get("agent")
        trailers = [x is not None for x in (agent, intent_id, fence)]
        if any(trailers) and not all(trailers):
            reasons.append({"code": "bad_trailers", "message": "the commit carries some Tetherlab trailers but not "
                            "all three (Tetherlab-Agent, Tetherlab-Intent, Tetherlab-Fence)"})
        claimed = self._intents.get(intent_id) if all(trailers) else None
        if all(trailers):
            if claimed is None:
                pass  # compacted away long ago: only the tokens below can still be checked
            elif claimed.agent_id != agent:
                reasons.append({"code": "trailer_mismatch", "message": f"intent {intent_id} belongs to "
                                f"{claimed.agent_id}, not to {agent}"})
            elif claimed.fencing_token is None or not claimed.created_index <= fence <= claimed.fencing_token:
                # A replan regrants with a new token: commits made under an earlier grant of the
                # same intent carry an older one, between its creation and its latest grant.
                reasons.append({"code": "not_granted", "message": f"intent {intent_id} was never granted with "
                                f"fencing token {fence}"})
            elif claimed.status in (STOPPED, REVERTED):
                reasons.append({"code": "claim_revoked", "message": f"intent {intent_id} is {claimed.status} "
                                f"({claimed.ended_by})"})
        for cid, path in touched.items():
            holder_id = self._mod.get(cid)
            grant = self._grants.get(cid)
            if holder_id is not None and holder_id != intent_id:
                h = self._intents[holder_id]
                reasons.append({"code": "held_by_other", "concept": cid, "path": path,
                                "holder_agent_id": h.agent_id, "holder_intent_id": h.intent_id,
                                "holder_summary": h.body.summary,
                                "message": f"{path} belongs to {cid}, which {h.agent_id} ({h.intent_id}) is "
                                           f"modifying: {h.body.summary}"})
            elif all(trailers) and grant is not None and grant["fencing_token"] > fence \
                    and grant["intent_id"] != intent_id:
                reasons.append({"code": "claim_superseded", "concept": cid, "path": path,
                                "holder_agent_id": grant["agent_id"], "holder_intent_id": grant["intent_id"],
                                "message": f"{cid} was granted to {grant['agent_id']} ({grant['intent_id']}, "
                                           f"fencing token {grant['fencing_token']}) after this commit's token "
                                           f"{fence}"})
            elif claimed is not None and claimed.fencing_token == fence and cid not in claimed.modifies:
                reasons.append({"code": "not_claimed", "concept": cid, "path": path,
                                "message": f"{path} belongs to {cid}, which intent {intent_id} did not claim to "
                                           f"modify"})
        uncoordinated = not any(trailers)
        ok = not reasons and (not uncoordinated or policy == UNCOORDINATED_ACCEPT)
        if not reasons and uncoordinated and policy != UNCOORDINATED_ACCEPT:
            reasons.append({"code": "uncoordinated", "message": "the commit carries no Tetherlab trailers and this "
                            "cluster refuses uncoordinated commits"})
        return {"commit": c.get("commit"), "ok": ok, "uncoordinated": uncoordinated,
                "concepts": sorted(touched), "reasons": reasons}

    @property
    def registry(self) -> Registry | None:
        return self._registry

    def get_intent(self, intent_id: str) -> dict[str, Any] | None:
        it = self._intents.get(intent_id)
        return it.to_json() if it is not None else None

    def session_tool(self, agent_id: str) -> str | None:
        s = self._sessions.get(agent_id)
        return s.tool if s is not None else None

    def get_session(self, agent_id: str) -> dict[str, Any] | None:
        s = self._sessions.get(agent_id)
        return s.to_json() if s is not None else None

    def world_slice(self, ref: str) -> dict[str, Any]:
        """The world as one agent needs it: ``ref`` is an intent id or an agent id (its latest
        intent). Raises CommandError(unknown_intent) when there is no such intent."""
        it = self._intents.get(ref)
        if it is None:
            s = self._sessions.get(ref)
            it = self._intents.get(s.intent_id) if s is not None and s.intent_id else None
        if it is None:
            raise CommandError("unknown_intent", f"no intent for {ref!r}")
        return world.build_slice(self._registry, it, self._active_on, self._history.get)

    def _active_on(self, concept: str) -> list[tuple[Intent, str]]:
        out: list[tuple[Intent, str]] = []
        h = self._mod.get(concept)
        if h is not None:
            out.append((self._intents[h], "modify"))
        out.extend((self._intents[i], "depend") for i in self._holders(self._dep.get(concept), None))
        return out

    def list_intents(self, status: str | None = None, limit: int = 100, after: str | None = None) -> dict[str, Any]:
        """Intents in id (Raft) order, optionally of one status; ``after`` is the cursor."""
        limit = max(1, min(limit, LIST_LIMIT_MAX))
        try:
            start = _index_of(after) if after else 0
        except ValueError:
            raise CommandError("bad_field", f"cursor 'after' must be an intent id like 'i-42', got {after!r}") from None
        ids = sorted((i for i in self._intents if _index_of(i) > start), key=_index_of)
        out: list[dict[str, Any]] = []
        for iid in ids:
            it = self._intents[iid]
            if status is None or it.status == status:
                out.append(it.summary_json())
                if len(out) == limit:
                    break
        nxt = out[-1]["intent_id"] if len(out) == limit else None
        return {"intents": out, "next": nxt}

    def list_concepts(self, prefix: str = "", limit: int = 100, after: str | None = None) -> dict[str, Any]:
        """Concept ids with titles, in id order, optionally under a dotted prefix."""
        if self._registry is None:
            return {"version": 0, "concepts": [], "next": None}
        limit = max(1, min(limit, LIST_LIMIT_MAX))
        ids = self._registry.ids
        lo = 0
        if after is not None or prefix:
            lo = bisect.bisect_right(ids, after) if after is not None else bisect.bisect_left(ids, prefix)
            lo = max(lo, bisect.bisect_left(ids, prefix))
        out: list[dict[str, Any]] = []
        for cid in ids[lo:]:
            if not cid.startswith(prefix):
                break
            c = self._registry.concepts[cid]
            out.append({"id": cid, "title": c.title, "dependents": c.dependents})
            if len(out) == limit:
                break
        return {"version": self._registry.version, "concepts": out,
                "next": out[-1]["id"] if len(out) == limit else None}

    def get_concept(self, concept_id: str) -> dict[str, Any] | None:
        """A concept's details, who is on it now, what depends on it, and its recent history."""
        if self._registry is None or concept_id not in self._registry.concepts:
            return None
        out = self._registry.concepts[concept_id].to_json()
        out["dependents_of"] = self._registry.dependents_of.get(concept_id, [])
        out["active"] = [{**it.summary_json(), "kind": kind} for it, kind in self._active_on(concept_id)]
        out["recent"] = list(self._history.get(concept_id, []))
        return out

    def list_sessions(self, status: str | None = None, limit: int = 100, after: str | None = None) -> dict[str, Any]:
        limit = max(1, min(limit, LIST_LIMIT_MAX))
        out: list[dict[str, Any]] = []
        for a in sorted(self._sessions):
            if after is not None and a <= after:
                continue
            s = self._sessions[a]
            if status is None or s.status == status:
                out.append(s.to_json())
                if len(out) == limit:
                    break
        return {"sessions": out, "next": out[-1]["agent_id"] if len(out) == limit else None}

    def list_conflicts(self, limit: int = LIST_LIMIT_MAX) -> dict[str, Any]:
        """Soft conflicts between active intents now (each pair once), and the recent drift and
        soft-conflict events, newest first (``tetherlab conflicts list``)."""
        current: list[dict[str, Any]] = []
        seen: set[tuple[str, ...]] = set()
        for it in sorted(self._intents.values(), key=lambda i: _index_of(i.intent_id)):
            if it.status != ACTIVE:
                continue
            for c in it.soft:
                pair = tuple(sorted((it.intent_id, c["other_intent_id"])))
                key = (*pair, c["kind"], c.get("symbol") or c["path"])
                if key in seen:
                    continue
                seen.add(key)
                current.append({**c, "intent_id": it.intent_id, "agent_id": it.agent_id,
                                "summary": it.body.summary, "message": world.describe_soft(c)})
        recent = list(reversed(self._conflict_log))[: max(1, min(limit, LIST_LIMIT_MAX))]
        return {"current": current[:limit], "recent": recent}

    def view_intents(self, since_index: int = 0, limit: int = LIST_LIMIT_MAX,
                     active_only: bool = False) -> dict[str, Any]:
        """Intents changed after Raft index ``since_index``, oldest change first, as the world view
        shows them; ``through`` is the index the caller has seen up to (ask again from there)."""
        limit = max(1, min(limit, 10 * LIST_LIMIT_MAX))
        changed = [it for it in self._intents.values() if it.updated_index > since_index
                   and (not active_only or it.status in HOLDING)]
        changed.sort(key=lambda it: (it.updated_index, _index_of(it.intent_id)))
        more = len(changed) > limit
        page = changed[:limit]
        through = page[-1].updated_index if more else max(since_index, self._last_index)
        return {"intents": [view.intent_view(it) for it in page], "through": through, "more": more,
                "clock_ms": self._clock_ms}

    def view_recent_finished(self, limit: int) -> list[dict[str, Any]]:
        """The most recently finished intents, oldest first (the view's recent verdicts)."""
        ids = list(self._finished)[-max(0, min(limit, LIST_LIMIT_MAX)):] if limit > 0 else []
        return [view.intent_view(self._intents[i]) for i in ids]

    def view_sessions(self, agent_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The sessions of these agents (the ones the view lists), keyed by agent id."""
        return {a: self._sessions[a].to_json() for a in agent_ids if a in self._sessions}

    def view_graph(self) -> dict[str, Any]:
        return view.graph(self._registry)

    def open_sessions_by_developer(self) -> dict[str, int]:
        """Open sessions per developer (the node's per-developer session quota)."""
        out: dict[str, int] = {}
        for s in self._sessions.values():
            if s.status == SESSION_OPEN:
                out[s.developer] = out.get(s.developer, 0) + 1
        return out

    def stats(self) -> dict[str, Any]:
        """Counts for metrics."""
        open_sessions = sum(1 for s in self._sessions.values() if s.status == SESSION_OPEN)
        soft = sum(len(it.soft) for it in self._intents.values() if it.status == ACTIVE) // 2
        return {
            "active_intents": self._counts[ACTIVE],
            "intents_by_status": dict(self._counts),
            "open_sessions": open_sessions,
            "soft_conflicts": soft,  # pairs of active intents whose in-flight changes overlap
            "sessions": len(self._sessions),
            "concepts": len(self._registry.concepts) if self._registry is not None else 0,
            "registry_version": self._registry.version if self._registry is not None else 0,
            "index_version": self._index_meta["version"] if self._index_meta is not None else 0,
            "last_index": self._last_index,
            "clock_ms": self._clock_ms,
            "matches_made": self.matches_made,
            "matches_reused": self.matches_reused,
        }

    def _index_view(self) -> dict[str, Any]:
        """The in-memory indexes in a comparable form (tests check rebuilds against it)."""
        return {
            "mod": dict(sorted(self._mod.items())),
            "dep": {c: sorted(v) for c, v in sorted(self._dep.items())},
            "lmod": {c: sorted(v) for c, v in sorted(self._lmod.items())},
            "ldep": {c: sorted(v) for c, v in sorted(self._ldep.items())},
            "finished": list(self._finished),
            "counts": dict(self._counts),
            "foot_files": {k: sorted(v) for k, v in sorted(self._foot_files.items())},
            "foot_syms": {k: sorted(v) for k, v in sorted(self._foot_syms.items())},
            "soft_by": {k: sorted(v) for k, v in sorted(self._soft_by.items())},
            "session_times": {a: (s.last_seen_ms, s.deadline_ms) for a, s in sorted(self._sessions.items())},
            "renew_ref": dict(sorted(self._renew_ref.items())),
            "renew_live": dict(sorted(self._renew_live.items())),
            "session_rec": dict(sorted(self._session_rec.items())),
        }
