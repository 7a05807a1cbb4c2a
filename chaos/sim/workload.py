"""What the simulated users do: agents behind shims, and an operator.

An :class:`Agent` is one developer's agent behind a shim, with the shim's rules (as in
``tether run`` and ``chaos/workload.py``): open a session; plan (modify one concept, sometimes
depend on another), submit, and on ``continue`` run for a while, then complete (sometimes
abandon); on ``stop`` back off and plan again. It heartbeats every F/4; a stop or revert
notice, a revocation or a lapsed session stops it at once; with no quorum-confirmed answer for
F seconds it stops (fails closed) and resumes only through a new verdict (a replan). Every call
and every run interval goes to the shared :class:`~tetherlab.chaos.history.Recorder`.

The :class:`Operator` holds the admin key and, at random: pushes registry versions, revokes
intents, revokes developer keys (and registers new ones for them), reads (intents and concepts
lists, which must be linearizable), and adds or removes cluster members.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from dataclasses import dataclass, field
from typing import Any

from tetherlab.chaos.history import Op, OpKind, Outcome, RunEnd, claims_of, heartbeat_stop
from tetherlab.chaos.sim.clients import (
    ClusterUnavailable,
    Indeterminate,
    RequestError,
    SimClient,
    SimKey,
    make_key,
)
from tetherlab.cluster import protocol as p

TOOL = "sim"
BASE_COMMIT = "abcdef1"

# Concepts and their dependents policy. Aliases are words no plan summary uses, so claims are
# exactly the explicit ones (and the depends_on the registry adds).
CONCEPTS: dict[str, str] = {"core.auth": "stop", "core.billing": "stop", "api.routes": "continue",
                            "api.search": "stop", "ui.cart": "stop"}
DEPENDS_ON = {"api.routes": ["core.auth"], "ui.cart": ["core.billing"]}


def registry_toml(version_tag: int) -> str:
    out = []
    for cid, policy in CONCEPTS.items():
        deps = DEPENDS_ON.get(cid, [])
        dep_line = f"depends_on = {deps!r}\n".replace("'", '"') if deps else ""
        out.append(f'[[concept]]\nid = "{cid}"\ntitle = "{cid} v{version_tag}"\n'
                   f'paths = ["src/{cid.replace(".", "/")}/"]\ndependents = "{policy}"\n{dep_line}')
    return "\n".join(out)


@dataclass
class AgentConfig:
    fail_closed_s: float = 2.0
    work_s: tuple[float, float] = (0.2, 1.5)
    long_work_s: tuple[float, float] = (2.0, 5.0)  # longer than F, so faults catch agents running
    long_work_probability: float = 0.25
    backoff_s: tuple[float, float] = (0.1, 0.6)
    submit_deadline_s: float = 4.0
    depend_probability: float = 0.4
    abandon_probability: float = 0.1
    concepts: tuple[str, ...] = tuple(CONCEPTS)


@dataclass
class KeyEvent:
    key_id: str
    kind: str  # add | revoke
    invoke_s: float
    complete_s: float
    outcome: Outcome


@dataclass
class ReadEvent:
    kind: str  # intents | concepts
    invoke_s: float
    complete_s: float
    intent_ids: frozenset[str] = frozenset()
    version: int = 0
    node: str = ""


@dataclass
class OpKey:
    """Which key made an acknowledged call, and when (for the revoked-key check)."""

    key_id: str
    agent_id: str
    kind: str
    invoke_s: float


@dataclass
class Journal:
    """What the operator and the agents did beyond the Recorder's ops and runs."""

    keys: list[KeyEvent] = field(default_factory=list)
    reads: list[ReadEvent] = field(default_factory=list)
    pushes: list[tuple[float, float, int]] = field(default_factory=list)  # invoke, complete, version
    acked_by_key: list[OpKey] = field(default_factory=list)
    acked_indexes: list[tuple[int, str, str]] = field(default_factory=list)  # raft index, agent, what
    revokes: list[tuple[str, float, Outcome]] = field(default_factory=list)  # intent id, invoked, outcome



class Agent:
    def __init__(self, world: Any, developer: str, key: SimKey, rng: random.Random, cfg: AgentConfig) -> None:
        self.world = world
        self.sim = world.sim
        self.developer = developer
        self.rng = rng
        self.cfg = cfg
        self.client = SimClient(world, developer, key, rng, on_notify=self._on_notify)
        self.agent_id = f"{developer}/{uuid.UUID(int=rng.getrandbits(128), version=4)}"
        self.rec = world.recorder
        self.log: Journal = world.journal
        self.last_confirmed: float | None = None
        self.held: dict[str, Any] | None = None
        self.need_session = True
        self.interrupted = asyncio.Event()
        self._watchdog: asyncio.TimerHandle | None = None
        self.stopping = False

    def now(self) -> float:
        return self.sim.now

    # --- calls -------------------------------------------------------------------------------------

    async def call(self, kind: OpKind, cls: type[p.Request], deadline_s: float, idempotent: bool,
                   **fields: Any) -> tuple[Outcome, dict[str, Any] | None, str]:
        t0 = self.now()
        payload: dict[str, Any] | None = None
        error = ""
        try:
            payload = await self.client.call(cls, deadline_s, idempotent, **fields)
            outcome: Outcome = "ok"
        except ClusterUnavailable as e:
            outcome, error = "failed", str(e)
        except RequestError as e:
            outcome, error = "failed", e.code
        except (Indeterminate, TimeoutError, ConnectionError) as e:
            outcome, error = "indeterminate", str(e)
        t1 = self.now()
        if outcome == "ok":
            self._confirmed(t0)
            self.log.acked_by_key.append(OpKey(self.client.answered_key, self.agent_id, kind, t0))
            if payload is not None and isinstance(payload.get("index"), int):
                self.log.acked_indexes.append((payload["index"], self.agent_id, kind))
        verdict = payload if kind in ("submit", "complete", "abandon") and payload is not None else {}
        modify, depend = claims_of(verdict) if verdict else ((), ())
        self.rec.op(Op(agent_id=self.agent_id, kind=kind, invoke_s=t0, complete_s=t1, outcome=outcome,
                       trigger=fields.get("trigger"), intent_id=verdict.get("intent_id") or fields.get("intent_id"),
                       action=verdict.get("action"), fencing_token=verdict.get("fencing_token"),
                       modify=modify, depend=depend, error=error[:200]))
        return outcome, payload, error

    # --- shim rules -------------------------------------------------------------------------------------

    def _confirmed(self, as_of: float) -> None:
        """A quorum-backed answer to a request sent at ``as_of``: the fail-closed clock restarts."""
        if self.last_confirmed is None or as_of > self.last_confirmed:
            self.last_confirmed = as_of
        self._arm_watchdog()

    def _arm_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.last_confirmed is not None:
            loop = asyncio.get_running_loop()
            self._watchdog = loop.call_at(self.last_confirmed + self.cfg.fail_closed_s, self._watchdog_fires)

    def _watchdog_fires(self) -> None:
        self._watchdog = None
        last = self.last_confirmed
        if self.rec.running(self.agent_id) and (last is None or self.now() - last >= self.cfg.fail_closed_s - 1e-9):
            self.stop_agent("fail_closed", forget=False)

    def stop_agent(self, why: RunEnd, forget: bool) -> None:
        if self.rec.end_run(self.agent_id, self.now(), why):
            self.sim.note(self.developer, f"agent stopped: {why}")
        if forget:
            self.held = None
        self.interrupted.set()

    def _on_notify(self, msg: p.Message) -> None:
        if isinstance(msg, p.Revoked) and msg.agent_id == self.agent_id:
            held = self.held["intent_id"] if self.held is not None else None
            if msg.intent_id is None or msg.intent_id == held:
                self.stop_agent("notice", forget=True)

    def start_running(self, verdict: dict[str, Any], body: p.Intent) -> None:
        modify, depend = claims_of(verdict)
        self.held = {"intent_id": verdict["intent_id"], "token": verdict["fencing_token"], "body": body}
        self.interrupted.clear()
        self.rec.start_run(self.agent_id, verdict["intent_id"], int(verdict["fencing_token"]), modify, depend,
                           self.now())
        self.sim.note(self.developer, f"agent runs {verdict['intent_id']} token {verdict['fencing_token']} "
                                      f"modify {list(modify)} depend {list(depend)}")

    def fresh(self) -> bool:
        last = self.last_confirmed
        return last is not None and self.now() - last < self.cfg.fail_closed_s

    async def heartbeats(self) -> None:
        interval = self.cfg.fail_closed_s / 4
        while not self.stopping:
            await asyncio.sleep(interval)
            if self.need_session or self.stopping:
                continue
            outcome, res, _ = await self.call("heartbeat", p.Heartbeat, max(0.5, self.cfg.fail_closed_s / 2), True,
                                              agent_ids=(self.agent_id,))
            if outcome != "ok" or res is None:
                continue
            why = heartbeat_stop(res, self.agent_id, self.held["intent_id"] if self.held is not None else None)
            if why is not None:
                self.stop_agent(why, forget=True)
                self.need_session = self.need_session or why == "lapsed"

    async def pause(self, span: tuple[float, float] | None = None) -> None:
        lo, hi = span or self.cfg.backoff_s
        await asyncio.sleep(self.rng.uniform(lo, hi))

    def plan(self) -> p.Intent:
        concepts = list(self.cfg.concepts)
        modify = self.rng.choice(concepts)
        others = [c for c in concepts if c != modify]
        depend = (self.rng.choice(others),) if others and self.rng.random() < self.cfg.depend_probability else ()
        n = self.rng.randrange(1_000_000)
        return p.Intent(summary=f"simulated task {n}", steps=("do the work",), files=None,
                        concepts=p.Concepts(modify=(modify,), depend=depend))

    async def open_session(self) -> None:
        while not self.stopping:
            outcome, _, _ = await self.call("open", p.OpenSession, 4.0, True, agent_id=self.agent_id, tool=TOOL,
                                            machine="sim-host", repo_remote=self.world.settings.remote,
                                            base_commit=BASE_COMMIT)
            if outcome == "ok":
                self.need_session = False
                return
            await self.pause()

    async def work(self) -> None:
        span = self.cfg.long_work_s if self.rng.random() < self.cfg.long_work_probability else self.cfg.work_s
        deadline = self.now() + self.rng.uniform(*span)
        while not self.stopping and self.rec.running(self.agent_id):
            left = deadline - self.now()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(self.interrupted.wait(), left)
            except TimeoutError:
                pass
        if self.stopping or not self.rec.running(self.agent_id) or self.held is None:
            return
        intent_id = self.held["intent_id"]
        self.rec.end_run(self.agent_id, self.now(), "complete")
        if self.rng.random() < self.cfg.abandon_probability:
            await self.call("abandon", p.Abandon, self.cfg.submit_deadline_s, True,  # type: ignore[arg-type]
                            agent_id=self.agent_id, intent_id=intent_id)
        else:
            await self.call("complete", p.Complete, self.cfg.submit_deadline_s, True, agent_id=self.agent_id,
                            intent_id=intent_id)
        self.held = None

    async def main(self) -> None:
        while not self.stopping:
            if self.need_session:
                self.held = None
                await self.open_session()
                continue
            if self.rec.running(self.agent_id):
                await self.work()
                continue
            if self.held is not None:
                # Stopped by fail-closed while holding an intent: resume only on a fresh verdict.
                if not self.fresh():
                    await self.pause((0.1, 0.2))
                    continue
                await self.submit(self.held["body"], "replan")
                continue
            await self.submit(self.plan(), "initial")

    async def submit(self, body: p.Intent, trigger: str) -> None:
        outcome, verdict, error = await self.call("submit", p.SubmitIntent, self.cfg.submit_deadline_s, False,
                                                  agent_id=self.agent_id, tool=TOOL, intent=body, trigger=trigger)
        if outcome == "ok" and verdict is not None:
            if verdict.get("action") == "continue":
                if self.stopping:
                    return
                if not self.fresh():
                    # The verdict took longer than F: the shim cannot vouch for the session now.
                    self.held = {"intent_id": verdict["intent_id"], "token": verdict["fencing_token"], "body": body}
                    return
                self.start_running(verdict, body)
                return
            self.held = None
        elif error in ("session_lapsed", "no_session"):
            self.need_session = True
            self.held = None
        await self.pause()

    def stop(self) -> None:
        """The schedule is over: the agent stops where it is."""
        self.stopping = True
        self.rec.end_run(self.agent_id, self.now(), "drill_end")
        if self._watchdog is not None:
            self._watchdog.cancel()
        self.interrupted.set()
        self.client.close()


@dataclass
class OperatorConfig:
    interval_s: tuple[float, float] = (0.3, 1.5)
    weights: dict[str, float] = field(default_factory=lambda: {
        "read_intents": 3.0, "read_concepts": 1.0, "push": 1.0, "revoke_intent": 1.5, "revoke_key": 0.6,
        "membership": 0.0})


class Operator:
    def __init__(self, world: Any, rng: random.Random, cfg: OperatorConfig, agents: list[Agent]) -> None:
        self.world = world
        self.sim = world.sim
        self.rng = rng
        self.cfg = cfg
        self.agents = agents
        self.client = SimClient(world, "admin", world.admin_key, rng)
        self.log: Journal = world.journal
        self.version_tag = 0
        self.known_intents: list[str] = []
        self.stopping = False
        self.keys_made = 0
        self.membership_busy = False

    def now(self) -> float:
        return self.sim.now

    async def _call(self, cls: type[p.Request], deadline_s: float, idempotent: bool,
                    **fields: Any) -> tuple[Outcome, dict[str, Any] | None]:
        try:
            return "ok", await self.client.call(cls, deadline_s, idempotent, **fields)
        except (ClusterUnavailable, RequestError):
            return "failed", None
        except (Indeterminate, TimeoutError, ConnectionError):
            return "indeterminate", None

    async def push(self) -> bool:
        self.version_tag += 1
        t0 = self.now()
        outcome, res = await self._call(p.ConceptsPush, 4.0, False, toml=registry_toml(self.version_tag))
        if outcome == "ok" and res is not None:
            self.log.pushes.append((t0, self.now(), int(res.get("version", 0))))
            return True
        return False

    async def setup(self) -> None:
        """Register every agent's key, then the first registry (retried until they stick)."""
        for agent in self.agents:
            while not self.stopping:
                try:
                    await self.client.call(p.KeysAdd, 4.0, True, developer=agent.developer,
                                           public_key=agent.client.key.line)
                    break
                except RequestError as e:
                    if e.code == "key_exists":
                        break
                except (ClusterUnavailable, Indeterminate, TimeoutError, ConnectionError):
                    pass
                await asyncio.sleep(0.2)
        while not self.stopping and not await self.push():
            await asyncio.sleep(0.3)

    async def run(self) -> None:
        await self.setup()
        names = sorted(self.cfg.weights)
        weights = [self.cfg.weights[n] for n in names]
        while not self.stopping:
            await asyncio.sleep(self.rng.uniform(*self.cfg.interval_s))
            if self.stopping:
                return
            action = self.rng.choices(names, weights)[0]
            await getattr(self, f"_do_{action}")()

    async def _do_push(self) -> None:
        await self.push()

    async def _do_read_intents(self) -> None:
        t0 = self.now()
        outcome, res = await self._call(p.IntentsList, 4.0, True, all=True, limit=1000)
        if outcome == "ok" and res is not None:
            ids = [i["intent_id"] for i in res.get("intents", [])]
            active = [i["intent_id"] for i in res.get("intents", []) if i.get("status") == "active"]
            self.known_intents = active
            self.log.reads.append(ReadEvent("intents", t0, self.now(), intent_ids=frozenset(ids)))

    async def _do_read_concepts(self) -> None:
        t0 = self.now()
        outcome, res = await self._call(p.ConceptsList, 4.0, True)
        if outcome == "ok" and res is not None:
            self.log.reads.append(ReadEvent("concepts", t0, self.now(), version=int(res.get("version", 0))))

    async def _do_revoke_intent(self) -> None:
        if not self.known_intents:
            return
        intent_id = self.rng.choice(self.known_intents)
        t0 = self.now()
        outcome, _ = await self._call(p.IntentsRevoke, 4.0, True, intent_id=intent_id, revert=self.rng.random() < 0.5)
        self.sim.note("operator", f"revoke {intent_id}: {outcome}")
        self.log.revokes.append((intent_id, t0, outcome))

    async def _do_revoke_key(self) -> None:
        agent = self.rng.choice(self.agents)
        old = agent.client.key
        t0 = self.now()
        outcome, _ = await self._call(p.KeysRevoke, 4.0, True, key_id=old.fingerprint)
        self.log.keys.append(KeyEvent(old.fingerprint, "revoke", t0, self.now(), outcome))
        if outcome != "ok":
            return
        # The developer gets a new key (their agent carries on with it once it is registered).
        self.keys_made += 1
        new = make_key(f"{agent.developer}-{self.world.seed}-{self.keys_made}")
        for _ in range(5):
            t1 = self.now()
            outcome, _ = await self._call(p.KeysAdd, 4.0, True, developer=agent.developer, public_key=new.line)
            self.log.keys.append(KeyEvent(new.fingerprint, "add", t1, self.now(), outcome))
            if outcome == "ok":
                agent.client.key = new
                agent.client.close()
                return
            await asyncio.sleep(0.3)

    async def _do_membership(self) -> None:
        await self.world.membership_change(self)

    def stop(self) -> None:
        self.stopping = True
        self.client.close()
