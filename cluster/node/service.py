"""What a node does with each protocol request: authorisation, leader routing, and the
translation to replicated commands (key registry in the state machine's KV, coordination in
the engine). Transport-free: the SSH endpoint hands requests in and writes replies out.

Routing rule: only a quorum-backed leader answers anything but ``ping`` and ``status``; a
follower answers ``redirect`` to the leader's SSH address, and a node that knows no
quorum-backed leader answers ``unavailable``. Writes are acknowledged only once committed.

Quotas (``[limits]``, ``quotas.py``): every request of a connection first takes a token of its
rate bucket (``rate_limited`` without one); a new session needs room under the developer's
session quota, and an intent request a slot of the developer's in-flight quota
(``quota_exceeded``). Refusals name the ``[limits]`` field, and change nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from tetherlab.cluster import protocol as p
from tetherlab.cluster.core import statemachine as sm
from tetherlab.cluster.core.apply import Outcome
from tetherlab.cluster.core.config import LoadLimits
from tetherlab.cluster.core.engine import commands as ec
from tetherlab.cluster.core.engine.model import IntentBody
from tetherlab.cluster.core.errors import CommandError
from tetherlab.cluster.node.access import TOKENS_MAX, TOKENS_NS, token_hash
from tetherlab.cluster.node.clock import Clock
from tetherlab.cluster.node.errors import Indeterminate, Refused, Unavailable
from tetherlab.cluster.node.keys import KEYS_NS, KeyError_, RegisteredKey, make_registered
from tetherlab.cluster.node.matcher import InlineMatcher, Matcher
from tetherlab.cluster.node.metrics import NodeMetrics
from tetherlab.cluster.node.quotas import Quotas, TokenBucket
from tetherlab.cluster.node.replica import MEMBERS_NS, Replica, encode_command
from tetherlab.cluster.replica.store import Store

log = logging.getLogger("tetherlab.service")

RETRY_NO_LEADER_MS = 500
HEARTBEAT_BATCH_WINDOW_S = 0.02  # heartbeats arriving within this window share one log entry
FAILED_CLOSED_WINDOW_S = 300.0  # tetherlab_shims_failing_closed counts reports this recent
FAILED_CLOSED_MAX = 10_000
RETRY_TIMEOUT_MS = 1000
KEYS_LIST_MAX = 10_000
KEYS_OK_MAX = 10_000  # registered keys remembered by _check_key (more are read from the store each time)
BOOTSTRAPPED = ("meta", "bootstrapped")  # the record that says the cluster has a key registry


@dataclass
class Identity:
    """Who sent a request: the developer and role of the SSH key that authenticated."""

    developer: str
    role: str
    key_id: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(eq=False)
class Peer:
    """One client connection (an SSH channel): the sessions opened on it, for notifications."""

    agent_ids: set[str] = field(default_factory=set)
    rate: TokenBucket | None = None  # the connection's request budget (made on its first request)


class Connections(Protocol):
    """The clients connected to this node (the SSH endpoint, or a test's fake)."""

    def push(self, agent_id: str, msg: p.Message) -> int:
        """Send a notification to every connection holding ``agent_id``; how many got it."""
        ...

    def drop_key(self, key_id: str, reason: str) -> None:
        """Close every connection authenticated with ``key_id``."""
        ...


def authenticate(store: Store, username: str, key_id: str) -> Identity | str:
    """Who the public key with fingerprint ``key_id`` logs in as, from this node's key registry;
    or why it may not (``unknown_key``, ``wrong_user``). The SSH user name is the developer the
    key belongs to (like a git host's user)."""
    rec = store.get(KEYS_NS, key_id)
    if rec is None:
        return "unknown_key"
    rk = RegisteredKey.decode(rec.value)
    if rk.developer != username:
        return "wrong_user"
    return Identity(rk.developer, rk.role, rk.id)


@dataclass(frozen=True)
class ServiceSettings:
    node_id: str
    version: str
    remote: str = ""  # the git remote from the node config ("" = set by the first session)
    session_ttl_s: int = 30
    healthy_window_s: float = 1.0  # a member that answered the leader this recently is healthy
    limits: LoadLimits = field(default_factory=LoadLimits)


VERDICT_ACTIONS = ("continue", "stop", "revert")  # what tetherlab_verdicts counts


class Service:
    def __init__(self, replica: Replica, clock: Clock, settings: ServiceSettings, metrics: NodeMetrics,
                 connections: Connections, matcher: Matcher | None = None) -> None:
        self.replica = replica
        self.matcher: Matcher = matcher if matcher is not None else InlineMatcher()
        self.clock = clock
        self.settings = settings
        self.metrics = metrics
        self.connections = connections
        self._hb_pending: dict[str, None] = {}
        self._hb_waiters: list[asyncio.Future[dict[str, Any]]] = []
        self._hb_task: asyncio.Task[None] | None = None
        self.failed_closed: dict[str, float] = {}  # agent id -> when it reported (monotonic)
        # Keys _check_key found registered in this leader term: it ran two LMDB reads per request
        # (each dropping the GIL, a tenth of a busy leader). Cleared when an applied entry writes
        # a key or the bootstrap mark; a new term starts afresh, since a follower can take a
        # snapshot (holding a revocation) without applying the entries, so no listener hears it.
        self._keys_ok: set[str] = set()
        self._keys_ok_term: int | None = None
        self.new_secret: Callable[[], str] = lambda: secrets.token_urlsafe(32)  # tests substitute their own
        self.quotas = Quotas(settings.limits)
        for name in LoadLimits.__dataclass_fields__:
            metrics.quota_limit.labels(name).set(float(getattr(settings.limits, name)))
        # Read when scraped, not counted per request (an inc and a dec each took a lock).
        metrics.intents_in_flight.set_function(self.quotas.intents.total)
        # Labelled children resolved once (a labels() call per verdict was 1% of a busy leader).
        self._verdicts_by_action = {a: metrics.verdicts.labels(a) for a in VERDICT_ACTIONS}
        replica.add_apply_listener(self._on_applied)

    def _on_applied(self, out: Outcome) -> None:
        """A revoked key's connections end on every node, as each node applies the revoke."""
        for ns, key, rec in out.kv_writes:
            if ns == KEYS_NS or (ns, key) == BOOTSTRAPPED:
                self._keys_ok.clear()
            if ns == KEYS_NS and rec is None:
                self.connections.drop_key(key, "the SSH key was revoked")

    # --- engine plumbing --------------------------------------------------------------------

    async def engine(self, cmd: ec.Command) -> dict[str, Any]:
        """Commit one engine command stamped with this leader's clock; refusals raise Refused."""
        res = await self.replica.propose_engine(cmd, self.clock.now_ms())
        err = res.get("error")
        if err is not None:
            raise Refused(err.get("code", "refused"), err.get("message", "refused"))
        return res

    def _own(self, who: Identity, agent_id: str) -> None:
        """Agent ids are <developer>/<uuid>; a developer acts only for their own agents."""
        developer, _ = p.split_agent_id(agent_id)
        if developer != who.developer:
            raise Refused("forbidden", f"agent {agent_id!r} belongs to {developer!r}; you are {who.developer!r}")

    async def _ensure_initialised(self, remote: str) -> None:
        """The first session sets the cluster's git remote when init did not."""
        if self.replica.store.engine_view(lambda e: e.cluster_settings()) is not None:
            return
        await self.engine(ec.Init(remote=self.settings.remote or remote,
                                  session_ttl_ms=self.settings.session_ttl_s * 1000))

    async def handle(self, who: Identity, req: p.Request, channel: Peer | None = None) -> p.Message:
        if channel is not None and not self._take_rate(channel):
            lim = self.settings.limits
            self.metrics.quota_refusals.labels("requests_per_s_per_connection").inc()
            return p.Error(id=req.id, code=p.ErrorCode.RATE_LIMITED,
                           message=f"this connection sent more than [limits].requests_per_s_per_connection = "
                                   f"{lim.requests_per_s_per_connection:g} requests/s (burst "
                                   f"{lim.request_burst_per_connection}); slow down and retry")
        try:
            if isinstance(req, p.Ping):
                return p.Result(id=req.id, payload={"pong": True, "node": self.settings.node_id})
            if isinstance(req, p.Status):
                return p.Result(id=req.id, payload=self._public_status())
            if req.admin and not who.is_admin:
                raise Refused("forbidden", f"{req.type} needs an admin key; {who.developer}'s key is a {who.role} key")
            if who.role == "verifier" and not isinstance(req, p.VerifyCommits):
                raise Refused("forbidden", f"{who.developer}'s key is a verifier key: it may only verify commits")
            st = self.replica.status()
            routed = self._route(req, st)
            if routed is not None:
                return routed
            self._check_key(who, st.get("term"))
            handler = getattr(self, f"_h_{req.type}", None)
            if handler is None:
                raise Refused("not_implemented", f"{req.type} is not served by this node version")
            payload: dict[str, Any] = await handler(who, req, channel)
            return p.Result(id=req.id, payload=payload)
        except Refused as e:
            return p.Error(id=req.id, code=e.code, message=e.message)
        except Unavailable as e:
            reason = "no_leader" if e.reason in ("no_leader", "not_leader") else "no_quorum"
            return p.Unavailable(id=req.id, reason=reason, retry_after_ms=RETRY_NO_LEADER_MS,
                                 message=f"the cluster cannot commit now ({e.reason})")
        except Indeterminate as e:
            return p.Unavailable(id=req.id, reason="timeout", retry_after_ms=RETRY_TIMEOUT_MS,
                                 message=f"outcome unknown ({e.reason}); retrying is safe")
        except TimeoutError:
            return p.Unavailable(id=req.id, reason="timeout", retry_after_ms=RETRY_TIMEOUT_MS,
                                 message="no quorum-backed answer in time")

    def _take_rate(self, channel: Peer) -> bool:
        now = self.clock.monotonic()
        if channel.rate is None:
            channel.rate = self.quotas.bucket(now)
        return channel.rate.take(now)

    @contextlib.contextmanager
    def _session_slot(self, who: Identity, agent_id: str) -> Iterator[None]:
        """Room for one more open session of ``who``'s developer while the block opens it
        (reopening a session that is open is free)."""
        status = self.replica.store.engine_view(lambda e: (e.get_session(agent_id) or {}).get("status"))
        if status == "open":
            yield
            return
        limit = self.settings.limits.sessions_per_developer
        quota = self.quotas.sessions
        n = quota.count(who.developer, self.clock.monotonic(),
                        lambda: self.replica.store.engine_view(lambda e: e.open_sessions_by_developer()))
        if n >= limit:
            self.metrics.quota_refusals.labels("sessions_per_developer").inc()
            raise Refused(p.ErrorCode.QUOTA_EXCEEDED,
                          f"developer {who.developer!r} has the most open sessions "
                          f"[limits].sessions_per_developer = {limit} allows ({n} with those being opened); "
                          f"let some end (they lapse "
                          f"{self.settings.session_ttl_s} s after their last heartbeat) or ask an operator to "
                          "raise the limit")
        quota.begin(who.developer)
        opened = False
        try:
            yield
            opened = True
        finally:
            quota.end(who.developer, opened)

    @contextlib.contextmanager
    def _intent_slot(self, who: Identity) -> Iterator[None]:
        """One of the developer's in-flight intent requests, for the duration of the block."""
        limit = self.settings.limits.intents_in_flight_per_developer
        if not self.quotas.intents.try_acquire(who.developer, limit):
            self.metrics.quota_refusals.labels("intents_in_flight_per_developer").inc()
            raise Refused(p.ErrorCode.QUOTA_EXCEEDED,
                          f"developer {who.developer!r} already has {limit} intent requests in flight, the most "
                          "[limits].intents_in_flight_per_developer allows; wait for their verdicts")
        try:
            yield
        finally:
            self.quotas.intents.release(who.developer)

    def _check_key(self, who: Identity, term: int | None) -> None:
        """The key that authenticated the connection must still be registered now.

        The SSH layer checked it when the connection opened, against this node's state then; a
        revocation applied since (or a registry this node had not caught up on when it became
        leader: a quorum-backed leader has applied every earlier term's entries) ends it here.
        Before the cluster is bootstrapped there is no registry (and nobody can log in)."""
        if who.key_id in self._keys_ok and term == self._keys_ok_term:
            return
        store = self.replica.store
        if store.get(*BOOTSTRAPPED) is None:
            return
        if store.get(KEYS_NS, who.key_id) is None:
            raise Refused("key_revoked", f"the SSH key {who.key_id} is no longer registered")
        if term != self._keys_ok_term:
            self._keys_ok, self._keys_ok_term = set(), term
        if len(self._keys_ok) < KEYS_OK_MAX:
            self._keys_ok.add(who.key_id)

    def _public_status(self) -> dict[str, Any]:
        st = self.replica.status()
        return {
            "node": self.settings.node_id,
            "role": st.get("role"),
            "term": st.get("term"),
            "leader": st.get("leader"),
            "quorum_backed": bool(st.get("quorum_backed")),
            "version": self.settings.version,
            "remote": (self.replica.store.engine_view(lambda e: e.cluster_settings()) or {}).get("remote"),
        }

    def _route(self, req: p.Request, st: dict[str, Any]) -> p.Message | None:
        if st.get("quorum_backed"):
            return None
        leader = st.get("leader")
        if st.get("role") != "leader" and leader and leader != self.settings.node_id:
            addr = self.replica.ssh_address_of(leader)
            if addr is not None:
                self.metrics.ssh_redirects.inc()
                return p.Redirect(id=req.id, leader_id=leader, leader_address=addr)
        reason = "no_quorum" if st.get("role") == "leader" else "no_leader"
        return p.Unavailable(id=req.id, reason=reason, retry_after_ms=RETRY_NO_LEADER_MS,
                             message="this node knows no quorum-backed leader")

    # --- key registry (state machine KV, namespace "keys") -----------------------------------

    async def _h_keys_add(self, who: Identity, req: p.KeysAdd, ch: Peer | None) -> dict[str, Any]:
        try:
            rk = make_registered(req.developer, req.role, req.public_key)
        except KeyError_ as e:
            raise Refused("bad_key", str(e)) from None
        res = await self._propose_kv(
            sm.Txn((sm.Compare(KEYS_NS, rk.id, 0),), (sm.Put(KEYS_NS, rk.id, rk.encode()),))
        )
        if not res.get("succeeded"):
            existing = self.replica.store.get(KEYS_NS, rk.id)
            owner = RegisteredKey.decode(existing.value).developer if existing else "?"
            raise Refused("key_exists", f"key {rk.id} is already registered (to {owner})")
        log.info("key %s added for %s (%s) by %s", rk.id, rk.developer, rk.role, who.developer)
        return {"key": rk.to_json()}

    async def _h_keys_list(self, who: Identity, req: p.KeysList, ch: Peer | None) -> dict[str, Any]:
        await self.replica.read_barrier()
        records = self.replica.store.scan(KEYS_NS, limit=KEYS_LIST_MAX)
        keys = [RegisteredKey.decode(r.value).to_json() for _, r in records]
        return {"keys": keys}

    async def _h_keys_revoke(self, who: Identity, req: p.KeysRevoke, ch: Peer | None) -> dict[str, Any]:
        await self.replica.read_barrier()
        key_id = self._resolve_key_id(req.key_id)
        rec = self.replica.store.get(KEYS_NS, key_id)
        if rec is None:
            raise Refused("unknown_key", f"no registered key {req.key_id!r}")
        res = await self._propose_kv(
            sm.Txn((sm.Compare(KEYS_NS, key_id, rec.mod_revision),), (sm.Delete(KEYS_NS, key_id),))
        )
        if not res.get("succeeded"):
            raise Refused("conflict", f"key {key_id} changed while revoking it; try again")
        log.info("key %s revoked by %s", key_id, who.developer)
        return {"revoked": RegisteredKey.decode(rec.value).to_json()}

    def _resolve_key_id(self, given: str) -> str:
        """Accept the full fingerprint, or a unique prefix of it (with or without SHA256:)."""
        if self.replica.store.get(KEYS_NS, given) is not None:
            return given
        want = given if given.startswith("SHA256:") else "SHA256:" + given
        matches = [k for k, _ in self.replica.store.scan(KEYS_NS, limit=KEYS_LIST_MAX) if k.startswith(want)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise Refused("ambiguous_key", f"{given!r} matches {len(matches)} keys; give more of the fingerprint")
        raise Refused("unknown_key", f"no registered key {given!r}")

    # --- sessions and intents (engine) -------------------------------------------------------

    async def _h_open_session(self, who: Identity, req: p.OpenSession, ch: Peer | None) -> dict[str, Any]:
        self._own(who, req.agent_id)
        with self._session_slot(who, req.agent_id):
            await self._ensure_initialised(req.repo_remote)
            res = await self.engine(ec.OpenSession(agent_id=req.agent_id, developer=who.developer, tool=req.tool,
                                                   machine=req.machine, repo_remote=req.repo_remote,
                                                   base_commit=req.base_commit))
        if ch is not None:
            ch.agent_ids.add(req.agent_id)
        log.info("session opened", extra={"agent_id": req.agent_id})
        return res

    async def _h_heartbeat(self, who: Identity, req: p.Heartbeat, ch: Peer | None) -> dict[str, Any]:
        for a in req.agent_ids:
            self._own(who, a)
        res = await self._batched_heartbeat(req.agent_ids)
        mine = set(req.agent_ids)
        st = self.replica.status()
        lapsed = [a for a in res.get("lapsed", []) if a in mine]
        unknown = [a for a in res.get("unknown", []) if a in mine]
        gone = set(lapsed).union(unknown)
        # A shim counts only an id listed in "confirmed" as kept alive, and re-checks its
        # fail-closed margin against the TTL the renewal applied (it may have changed); taken from
        # the apply's result, so a heartbeat never waits for the store lock behind an apply.
        return {
            "ok": True,
            "confirmed": [a for a in dict.fromkeys(req.agent_ids) if a not in gone],
            "lapsed": lapsed,
            "unknown": unknown,
            "notices": {a: n for a, n in res.get("notices", {}).items() if a in mine},
            "soft": {a: n for a, n in res.get("soft", {}).items() if a in mine},
            "session_ttl_ms": res.get("session_ttl_ms"),
            "leader": self.settings.node_id,
            "term": st.get("term"),
        }

    async def _batched_heartbeat(self, agent_ids: tuple[str, ...]) -> dict[str, Any]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        for a in agent_ids:
            self._hb_pending[a] = None
        self._hb_waiters.append(fut)
        if self._hb_task is None or self._hb_task.done():
            self._hb_task = asyncio.get_running_loop().create_task(self._flush_heartbeats())
        return await fut

    async def _flush_heartbeats(self) -> None:
        while self._hb_waiters:
            await self.clock.sleep(HEARTBEAT_BATCH_WINDOW_S)
            ids, self._hb_pending = list(self._hb_pending), {}
            waiters, self._hb_waiters = self._hb_waiters, []
            merged: dict[str, Any] = {"lapsed": [], "unknown": [], "notices": {}, "soft": {}, "session_ttl_ms": None}
            error: BaseException | None = None
            step = ec.AGENT_IDS_PER_HEARTBEAT_MAX
            try:
                for i in range(0, len(ids), step):
                    res = await self.engine(ec.Heartbeat(agent_ids=tuple(ids[i : i + step])))
                    merged["lapsed"] += res.get("lapsed", [])
                    merged["unknown"] += res.get("unknown", [])
                    merged["notices"].update(res.get("notices", {}))
                    merged["soft"].update(res.get("soft", {}))
                    merged["session_ttl_ms"] = res.get("session_ttl_ms")
            except BaseException as e:  # handed to every waiter of this batch
                error = e
            for w in waiters:
                if not w.done():
                    if error is not None:
                        w.set_exception(error)
                    else:
                        w.set_result(merged)

    async def _h_submit_intent(self, who: Identity, req: p.SubmitIntent, ch: Peer | None) -> dict[str, Any]:
        self._own(who, req.agent_id)
        with self._intent_slot(who):
            return await self._submit_intent(who, req, ch)

    async def _submit_intent(self, who: Identity, req: p.SubmitIntent, ch: Peer | None) -> dict[str, Any]:
        t0 = self.clock.monotonic()
        try:
            body = IntentBody(
                summary=req.intent.summary, steps=req.intent.steps, files=req.intent.files or (),
                modify=req.intent.concepts.modify if req.intent.concepts else (),
                depend=req.intent.concepts.depend if req.intent.concepts else (),
            )
            cmd = ec.SubmitIntent(agent_id=req.agent_id, tool=req.tool, intent=body, trigger=req.trigger)
        except CommandError as e:
            raise Refused(e.code, e.message) from None
        # Match the plan here, once, outside the store lock: the entry carries the claims, and
        # replicas reuse them unless the registry or code index changed before it applied.
        basis = self.replica.store.engine_peek(lambda e: e.match_basis())
        cmd = await self.matcher.prematch(cmd, basis)
        verdict = await self.engine(cmd)
        self._count_verdict(verdict, self.clock.monotonic() - t0)
        if ch is not None:
            ch.agent_ids.add(req.agent_id)
        # Debug: one line per verdict cost 50 µs at info (a twentieth of a busy leader), and the
        # verdicts are in the state and the metrics anyway.
        log.debug("verdict %s for %s", verdict.get("action"), verdict.get("intent_id"),
                 extra={"agent_id": req.agent_id, "intent_id": verdict.get("intent_id")})
        return verdict

    def _count_verdict(self, verdict: dict[str, Any], seconds: float) -> None:
        m = self.metrics
        counter = self._verdicts_by_action.get(verdict.get("action"))
        if counter is not None:
            counter.inc()
            m.verdict_seconds.observe(seconds)
        for c in verdict.get("conflicts", []):
            m.conflicts.labels(c.get("kind", "unknown")).inc()

    async def _end(self, who: Identity, agent_id: str, intent_id: str, trigger: str) -> dict[str, Any]:
        self._own(who, agent_id)
        # The tool only labels the command (apply does not decide on it): read without waiting
        # for an apply in progress.
        tool = self.replica.store.engine_peek(lambda e: e.session_tool(agent_id)) or "unknown"
        with self._intent_slot(who):
            res = await self.engine(ec.SubmitIntent(agent_id=agent_id, tool=tool, intent=None, trigger=trigger,
                                                    intent_id=intent_id))
        self._count_verdict(res, 0.0)
        return res

    async def _h_complete(self, who: Identity, req: p.Complete, ch: Peer | None) -> dict[str, Any]:
        return await self._end(who, req.agent_id, req.intent_id, "complete")

    async def _h_abandon(self, who: Identity, req: p.Abandon, ch: Peer | None) -> dict[str, Any]:
        return await self._end(who, req.agent_id, req.intent_id, "abandon")

    async def _h_close_session(self, who: Identity, req: p.CloseSession, ch: Peer | None) -> dict[str, Any]:
        """The agent exited: its session ends now instead of lapsing a TTL later."""
        self._own(who, req.agent_id)
        res = await self.engine(ec.CloseSession(agent_id=req.agent_id))
        if ch is not None:
            ch.agent_ids.discard(req.agent_id)
        log.info("session closed", extra={"agent_id": req.agent_id})
        return res

    async def _h_world_slice(self, who: Identity, req: p.WorldSlice, ch: Peer | None) -> dict[str, Any]:
        self._own(who, req.agent_id)
        await self.replica.read_barrier()
        try:
            world: dict[str, Any] = self.replica.store.engine_view(lambda e: e.world_slice(req.agent_id))
        except CommandError as e:
            raise Refused(e.code, e.message) from None
        return world

    # --- registry and intents (admin) --------------------------------------------------------

    async def _h_concepts_push(self, who: Identity, req: p.ConceptsPush, ch: Peer | None) -> dict[str, Any]:
        try:
            cmd = ec.decode_command({"type": "push_registry", "toml": req.toml, "index_digest": req.index_digest})
        except CommandError as e:
            raise Refused(e.code, e.message) from None
        res = await self.engine(cmd)
        log.info("concept registry version %s pushed by %s", res.get("version"), who.developer)
        return res

    async def _h_concepts_index(self, who: Identity, req: p.ConceptsIndex, ch: Peer | None) -> dict[str, Any]:
        try:
            cmd = ec.InstallIndex(digest=req.digest, seq=req.seq, total=req.total, data=req.data,
                                  activate=req.activate)
        except CommandError as e:
            raise Refused(e.code, e.message) from None
        res = await self.engine(cmd)
        if res.get("active") and not res.get("unchanged"):
            log.info("code index version %s (%s) installed by %s", res.get("index_version"), req.digest[:12],
                     who.developer)
        return res

    async def _h_concepts_list(self, who: Identity, req: p.ConceptsList, ch: Peer | None) -> dict[str, Any]:
        await self.replica.read_barrier()
        out: dict[str, Any] = self.replica.store.engine_view(lambda e: e.list_concepts(limit=1000))
        return out

    async def _h_concepts_show(self, who: Identity, req: p.ConceptsShow, ch: Peer | None) -> dict[str, Any]:
        await self.replica.read_barrier()
        c = self.replica.store.engine_view(lambda e: e.get_concept(req.concept_id))
        if c is None:
            raise Refused("not_found", f"no concept {req.concept_id!r} in the registry")
        return {"concept": c}

    async def _h_intents_list(self, who: Identity, req: p.IntentsList, ch: Peer | None) -> dict[str, Any]:
        await self.replica.read_barrier()
        status = None if req.all else "active"
        out: dict[str, Any] = self.replica.store.engine_view(
            lambda e: e.list_intents(status=status, limit=req.limit, after=req.cursor))
        return out

    async def _h_intents_revoke(self, who: Identity, req: p.IntentsRevoke, ch: Peer | None) -> dict[str, Any]:
        res = await self.engine(ec.Revoke(intent_id=req.intent_id, by=who.developer, revert=req.revert))
        agent_id = res.get("agent_id")
        if agent_id:
            # Tell the agent's shim now if it is connected here; otherwise its next heartbeat
            # carries the notice.
            self.connections.push(agent_id, p.Revoked(agent_id=agent_id, reason=f"revoked by {who.developer}",
                                                      intent_id=req.intent_id, revert=req.revert))
        log.info("intent %s revoked (revert=%s) by %s", req.intent_id, req.revert, who.developer)
        return res

    # --- membership (admin) -----------------------------------------------------------------

    def _healthy_members(self) -> int:
        """Members that answered this leader within an election timeout, itself included."""
        st = self.replica.status()
        window = self.settings.healthy_window_s
        return 1 + sum(1 for p_ in (st.get("peers") or {}).values()
                       if p_.get("last_response_age_s") is not None and p_["last_response_age_s"] < window)

    async def _h_cluster_add(self, who: Identity, req: p.ClusterAdd, ch: Peer | None) -> dict[str, Any]:
        members = self.replica.members()
        if req.node_id in members:
            raise Refused("member_exists", f"node {req.node_id!r} is already a member")
        used = {a for m in members.values() for a in m.values()}
        for addr in (req.raft, req.ssh, req.http):
            if addr in used:
                raise Refused("address_in_use", f"address {addr} is already used by a member")
        size = len(members) + 1
        healthy = self._healthy_members()
        if healthy < size // 2 + 1:
            raise Refused("would_lose_quorum", f"only {healthy} of {len(members)} members answer; a {size}-node "
                                               f"cluster needs {size // 2 + 1}: heal the cluster first")
        record = json.dumps({"raft": req.raft, "ssh": req.ssh, "http": req.http})
        res = await self._propose_kv(sm.Txn((sm.Compare(MEMBERS_NS, req.node_id, 0),),
                                                     (sm.Put(MEMBERS_NS, req.node_id, record),)))
        if not res.get("succeeded"):
            raise Refused("member_exists", f"node {req.node_id!r} is being added already")
        try:
            await self.replica.change_membership(True, req.raft)
        except Exception:
            await self._propose_kv(sm.Delete(MEMBERS_NS, req.node_id))  # undo the record
            raise
        log.info("node %s (%s) added to the cluster by %s", req.node_id, req.raft, who.developer)
        return {"added": req.node_id, "members": sorted(self.replica.members())}

    async def _h_cluster_remove(self, who: Identity, req: p.ClusterRemove, ch: Peer | None) -> dict[str, Any]:
        members = self.replica.members()
        if req.node_id not in members:
            raise Refused("not_found", f"node {req.node_id!r} is not a member; members: {sorted(members)}")
        if len(members) <= 1:
            raise Refused("would_lose_quorum", "cannot remove the last member")
        if req.node_id == self.settings.node_id:
            # Raft cannot remove its own leader: hand leadership over, and let the client retry.
            self.replica.transfer_leadership()
            raise Refused("leader_moving", f"{req.node_id} is the leader: leadership is being handed over; "
                                           "retry the removal in a moment")
        size = len(members) - 1
        st = self.replica.status()
        target = (st.get("peers") or {}).get(req.node_id) or {}
        target_healthy = target.get("last_response_age_s") is not None and \
            target["last_response_age_s"] < self.settings.healthy_window_s
        healthy_after = self._healthy_members() - (1 if target_healthy else 0)
        if healthy_after < size // 2 + 1:
            raise Refused("would_lose_quorum", f"after removing {req.node_id} only {healthy_after} of {size} members "
                                               f"would answer; {size // 2 + 1} are needed")
        await self.replica.change_membership(False, members[req.node_id]["raft"])
        await self._propose_kv(sm.Delete(MEMBERS_NS, req.node_id))
        log.info("node %s removed from the cluster by %s", req.node_id, who.developer)
        return {"removed": req.node_id, "members": sorted(self.replica.members())}

    # --- push-time fencing ------------------------------------------------------------------------

    async def _h_verify_commits(self, who: Identity, req: p.VerifyCommits, ch: Peer | None) -> dict[str, Any]:
        await self.replica.read_barrier()  # judged on every grant acknowledged before the push
        commits = [c.to_json() for c in req.commits]
        try:
            out: dict[str, Any] = self.replica.store.engine_view(lambda e: e.verify_commits(commits))
        except CommandError as e:
            raise Refused(e.code, e.message) from None
        for r in out["results"]:
            result = "refused" if not r["ok"] else "uncoordinated" if r["uncoordinated"] else "accepted"
            self.metrics.push_commits_verified.labels(result).inc()
        refused = sum(not r["ok"] for r in out["results"])
        if refused:
            log.info("push verification by %s refused %d of %d commit(s)", who.developer, refused, len(commits))
        return out

    # --- read tokens for the HTTP view ------------------------------------------------------------

    async def _h_ui_token_issue(self, who: Identity, req: p.UiTokenIssue, ch: Peer | None) -> dict[str, Any]:
        token = "tlr_" + self.new_secret()
        record = json.dumps({"sha256": token_hash(token), "created_by": who.developer,
                             "created_ms": self.clock.now_ms()}, sort_keys=True)
        res = await self._propose_kv(sm.Txn((sm.Compare(TOKENS_NS, req.name, 0),),
                                            (sm.Put(TOKENS_NS, req.name, record),)))
        if not res.get("succeeded"):
            raise Refused("token_exists", f"a read token named {req.name!r} exists: revoke it first, or name "
                                          "the new one differently")
        log.info("read token %s issued by %s", req.name, who.developer)
        return {"name": req.name, "token": token}

    async def _h_ui_token_revoke(self, who: Identity, req: p.UiTokenRevoke, ch: Peer | None) -> dict[str, Any]:
        await self.replica.read_barrier()
        rec = self.replica.store.get(TOKENS_NS, req.name)
        if rec is None:
            raise Refused("not_found", f"no read token named {req.name!r}")
        res = await self._propose_kv(sm.Txn((sm.Compare(TOKENS_NS, req.name, rec.mod_revision),),
                                            (sm.Delete(TOKENS_NS, req.name),)))
        if not res.get("succeeded"):
            raise Refused("conflict", f"read token {req.name!r} changed while revoking it; try again")
        log.info("read token %s revoked by %s", req.name, who.developer)
        return {"revoked": req.name}

    async def _h_ui_tokens_list(self, who: Identity, req: p.UiTokensList, ch: Peer | None) -> dict[str, Any]:
        await self.replica.read_barrier()
        out = []
        for name, rec in self.replica.store.scan(TOKENS_NS, limit=TOKENS_MAX):
            meta = json.loads(rec.value)
            out.append({"name": name, "created_by": meta.get("created_by"), "created_ms": meta.get("created_ms")})
        return {"tokens": out}

    # --- in-flight changes: drift and soft conflicts -------------------------------------------

    async def _h_report_changes(self, who: Identity, req: p.ReportChanges, ch: Peer | None) -> dict[str, Any]:
        self._own(who, req.agent_id)
        try:
            cmd = ec.decode_command({"type": "report_changes", "agent_id": req.agent_id, "intent_id": req.intent_id,
                                     "files": [f.to_json() for f in req.files], "truncated": req.truncated})
        except CommandError as e:
            raise Refused(e.code, e.message) from None
        res = await self.engine(cmd)
        drift = res.get("drift") or {}
        m = self.metrics
        if drift.get("claimed"):
            m.drifts.labels("claimed").inc(len(drift["claimed"]))
        if drift.get("warned"):
            m.drifts.labels("warned").inc(len(drift["warned"]))
        if drift.get("blocked"):
            m.drifts.labels("reverted" if res.get("action") == "revert" else "stopped").inc()
            m.verdicts.labels(res["action"]).inc()
        return res

    async def _h_conflicts_list(self, who: Identity, req: p.ConflictsList, ch: Peer | None) -> dict[str, Any]:
        await self.replica.read_barrier()
        out: dict[str, Any] = self.replica.store.engine_view(lambda e: e.list_conflicts(req.limit))
        return out

    # --- shim reports -------------------------------------------------------------------------

    async def _h_shim_report(self, who: Identity, req: p.ShimReport, ch: Peer | None) -> dict[str, Any]:
        self._own(who, req.agent_id)
        now = self.clock.monotonic()
        self.failed_closed[req.agent_id] = now
        # Bounded: keep the window's reports, and at most FAILED_CLOSED_MAX of them.
        for a, t in list(self.failed_closed.items()):
            if now - t > FAILED_CLOSED_WINDOW_S:
                del self.failed_closed[a]
        while len(self.failed_closed) > FAILED_CLOSED_MAX:
            del self.failed_closed[next(iter(self.failed_closed))]
        log.warning("shim reports it failed closed at %d ms: %s", req.at_unix_ms, req.detail,
                    extra={"agent_id": req.agent_id})
        return {"ok": True}

    def failing_closed(self) -> int:
        now = self.clock.monotonic()
        return sum(1 for t in list(self.failed_closed.values()) if now - t <= FAILED_CLOSED_WINDOW_S)

    async def _propose_kv(self, cmd: sm.Command) -> dict[str, Any]:
        return await self.replica.propose(encode_command(cmd))
