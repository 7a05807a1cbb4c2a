"""What only a quorum-backed leader does, on its own initiative.

Checked every ``LEADER_DUTY_INTERVAL_S``:

- bootstrap the cluster once in its lifetime: the first admin key(s) and the git remote from the
  node config, in one txn guarded by ``meta/bootstrapped`` (a revoked admin key is never re-added);
- keep the engine's settings in line with the config (the remote, the session TTL);
- at the start of each term, extend every session by one TTL (``LeaderElected``) before anything
  can expire: an election must not lapse sessions whose heartbeats could not get through;
- then sweep expired sessions every ``EXPIRE_INTERVAL_S`` (``Expire``).

A leader that loses its quorum-backing fails its pending proposals at once (clients retry
elsewhere) and, once leader again, starts a new term's duties from the top.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from tetherlab.cluster.core import statemachine as sm
from tetherlab.cluster.core.config import ClusterSettings
from tetherlab.cluster.core.engine import commands as ec
from tetherlab.cluster.node.clock import Clock
from tetherlab.cluster.node.errors import Indeterminate, Refused, Unavailable
from tetherlab.cluster.node.keys import KEYS_NS, KeyError_, make_registered
from tetherlab.cluster.node.metrics import NodeMetrics
from tetherlab.cluster.node.replica import Replica, encode_command

log = logging.getLogger("tetherlab.node")

LEADER_DUTY_INTERVAL_S = 0.25
EXPIRE_INTERVAL_S = 1.0


class LeaderDuties:
    def __init__(self, replica: Replica, clock: Clock, settings: ClusterSettings, metrics: NodeMetrics,
                 on_lost_leadership: Callable[[str], None] | None = None) -> None:
        self.replica = replica
        self.clock = clock
        self.settings = settings
        self.metrics = metrics
        self.on_lost_leadership = on_lost_leadership
        self.elected_term: int | None = None
        self._last_expire = 0.0
        self._bootstrapped = False

    async def run(self) -> None:
        while True:
            await self.clock.sleep(LEADER_DUTY_INTERVAL_S)
            try:
                await self.step()
            except (Unavailable, Indeterminate):
                self.elected_term = None  # leadership moved or wobbled; extend again when it settles
            except Exception:
                log.exception("leader duty failed")

    async def step(self) -> None:
        """One round of duties (``run`` calls it every ``LEADER_DUTY_INTERVAL_S``)."""
        st = self.replica.status()
        if not st.get("quorum_backed"):
            if self.elected_term is not None and self.on_lost_leadership is not None:
                self.on_lost_leadership("this node lost its quorum-backed leadership")
            self.elected_term = None
            return
        await self._bootstrap_once()
        meta: dict[str, Any] = self.replica.store.engine_view(lambda e: e.cluster_settings() or {})
        ttl_ms = self.settings.session_ttl_s * 1000
        policy = self.settings.uncoordinated_commits
        changed = meta and (meta.get("session_ttl_ms") != ttl_ms
                            or meta.get("uncoordinated_commits", "accept") != policy)
        if (not meta and self.settings.remote) or changed:
            # First remote from the config, or the configured session TTL or commit policy changed.
            await self._engine(ec.Init(remote=meta.get("remote") or self.settings.remote, session_ttl_ms=ttl_ms,
                                       uncoordinated_commits=policy))
        if self.elected_term != st.get("term"):
            await self._engine(ec.LeaderElected(now_ms=self.clock.now_ms()))
            self.elected_term = st.get("term")
            self._last_expire = self.clock.monotonic()
            log.info("leader duties start", extra={"term": self.elected_term})
        elif self.clock.monotonic() - self._last_expire >= EXPIRE_INTERVAL_S:
            self._last_expire = self.clock.monotonic()
            res = await self._engine(ec.Expire(now_ms=self.clock.now_ms()))
            if res.get("lapsed"):
                self.metrics.sessions_expired.inc(len(res["lapsed"]))
                log.info("sessions lapsed: %s", ", ".join(res["lapsed"]))

    async def _engine(self, cmd: ec.Command) -> dict[str, Any]:
        res = await self.replica.propose_engine(cmd, self.clock.now_ms())
        err = res.get("error")
        if err is not None:
            raise Refused(err.get("code", "refused"), err.get("message", "refused"))
        return res

    async def _bootstrap_once(self) -> None:
        if self._bootstrapped or self.replica.store.get("meta", "bootstrapped") is not None:
            self._bootstrapped = True
            return
        ops: list[sm.Put | sm.Delete] = [sm.Put("meta", "bootstrapped", "1")]
        for line in self.settings.bootstrap_admin_keys:
            try:
                rk = make_registered(self.settings.bootstrap_admin_developer, "admin", line)
            except KeyError_ as e:
                log.error("a bootstrap admin key in the node config is not usable: %s", e)
                continue
            ops.append(sm.Put(KEYS_NS, rk.id, rk.encode()))
        if self.settings.remote:
            ops.append(sm.Put("meta", "remote", self.settings.remote))
        res = await self.replica.propose(encode_command(sm.Txn((sm.Compare("meta", "bootstrapped", 0),), tuple(ops))))
        self._bootstrapped = True
        if res.get("succeeded"):
            log.info("cluster bootstrapped: %d admin key(s) registered", len(ops) - 1)
