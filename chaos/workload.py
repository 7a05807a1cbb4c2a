"""Simulated agents: each a MasterClient behind shim-like logic, contending on a small registry.

Every agent (its own developer and SSH key) opens a session, then loops: plan (modify one of the
drill's concepts, sometimes depend on another, by explicit claims so contention is certain),
submit, and on ``continue`` "run" for a while and complete; on ``stop`` back off and plan again.
Its shim side mirrors ``tether run``:

- heartbeats every ``heartbeat_interval_s`` (deadline F/2); a stop or revert notice, or a lapsed
  session, stops the agent at once;
- a watchdog stops the agent (fail closed) when no quorum-confirmed answer arrived for F seconds;
  a confirmation counts as of when its request was sent (conservative, as the real client does);
- an agent stopped by fail-closed resumes only through a new verdict: once a heartbeat is
  confirmed again it replans the same intent and runs again only on ``continue``.

Everything is recorded in a :class:`~tetherlab.chaos.history.Recorder`. Bounded: each call has a
deadline, every wait a timeout, and the whole workload stops when told (or at ``max_ops``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from tetherlab.chaos.history import Op, OpKind, Outcome, Recorder, RunEnd, claims_of, heartbeat_stop
from tetherlab.cluster import protocol as p
from tetherlab.shim.client import ClusterUnavailable, Indeterminate, Master, MasterClient, RequestError

WATCHDOG_INTERVAL_S = 0.1
CALL_GRACE_S = 5.0  # on top of a call's own deadline: a hard bound if the client itself hangs
STOP_TIMEOUT_S = 20.0
TOOL = "drill"
BASE_COMMIT = "abcdef1"
# Agents alternate between two groups; each group connects from its own loopback source address,
# so the partitioner can cut one group's shims and not the other's (see chaos/netns.py).
GROUPS = ("agents-a", "agents-b")
GROUP_SOURCE_IPS = {"agents-a": "127.0.0.101", "agents-b": "127.0.0.102"}

# The source address of the current agent's SSH connections. MasterClient does not take one, so
# asyncssh.connect is wrapped once (in the drill process only) to bind it when this is set; tasks
# inherit it from the agent that created them.
_SOURCE_IP: contextvars.ContextVar[str | None] = contextvars.ContextVar("drill_source_ip", default=None)
_installed = False


def _bind_source_addresses() -> None:
    global _installed
    if _installed:
        return

    original = asyncssh.connect

    def connect(*args: Any, **kwargs: Any) -> Any:
        ip = _SOURCE_IP.get()
        if ip is not None and "local_addr" not in kwargs:
            kwargs["local_addr"] = (ip, 0)
        return original(*args, **kwargs)

    asyncssh.connect = connect
    _installed = True


@dataclass(frozen=True)
class WorkloadConfig:
    agents: int = 4
    fail_closed_s: float = 5.0
    heartbeat_interval_s: float = 1.0
    work_s: tuple[float, float] = (0.5, 2.5)  # how long an agent runs once granted, mostly
    long_work_s: tuple[float, float] = (4.0, 12.0)  # sometimes longer than F, so cuts catch agents running
    long_work_probability: float = 0.3
    backoff_s: tuple[float, float] = (0.2, 1.0)  # pause after a stop verdict or a failed call
    submit_deadline_s: float = 8.0
    open_deadline_s: float = 8.0
    depend_probability: float = 0.4
    max_ops: int = 100_000


def agent_id_for(developer: str, rng: random.Random) -> str:
    return f"{developer}/{uuid.UUID(int=rng.getrandbits(128), version=4)}"



class SimAgent:
    def __init__(self, developer: str, key: Path, masters: Sequence[Master], remote: str, concepts: Sequence[str],
                 cfg: WorkloadConfig, recorder: Recorder, rng: random.Random, group: str | None = None) -> None:
        self.developer = developer
        self.group = group
        self.rng = rng
        self.agent_id = agent_id_for(developer, rng)
        self.client = MasterClient(list(masters), key, developer, client_name="tetherlab-drill")
        self.remote = remote
        self.concepts = list(concepts)
        self.cfg = cfg
        self.rec = recorder
        self.last_confirmed: float | None = None  # as of when the confirmed request was sent
        self.held: dict[str, Any] | None = None  # the granted intent: {intent_id, token, modify, depend, body}
        self.need_session = True
        self.interrupted = asyncio.Event()
        self.ops = 0

    # --- calls -------------------------------------------------------------------------------

    async def call(self, kind: OpKind, cls: type[p.Request], deadline_s: float, idempotent: bool,
                   **fields: Any) -> tuple[Outcome, dict[str, Any] | None, str]:
        self.ops += 1
        t0 = time.monotonic()
        payload: dict[str, Any] | None = None
        error = ""
        try:
            if kind == "heartbeat":
                payload = await asyncio.wait_for(self.client.heartbeat([self.agent_id], deadline_s),
                                                 deadline_s + CALL_GRACE_S)
            else:
                payload = await asyncio.wait_for(self.client.call(cls, deadline_s, idempotent, **fields),
                                                 deadline_s + CALL_GRACE_S)
            outcome: Outcome = "ok"
        except ClusterUnavailable as e:
            outcome, error = "failed", str(e)
        except RequestError as e:
            outcome, error = "failed", e.code
        except Indeterminate as e:
            outcome, error = "indeterminate", str(e)
        except (TimeoutError, OSError, ConnectionError) as e:
            outcome, error = "indeterminate", f"{type(e).__name__}: {e}"
        except Exception as e:  # a client bug must not end the drill; the op is unknown
            outcome, error = "indeterminate", f"{type(e).__name__}: {e}"
        t1 = time.monotonic()
        if outcome == "ok":
            self.last_confirmed = max(self.last_confirmed or t0, t0)
        verdict = payload if kind in ("submit", "complete") and payload is not None else {}
        modify, depend = claims_of(verdict) if verdict else ((), ())
        self.rec.op(Op(
            agent_id=self.agent_id, kind=kind, invoke_s=t0, complete_s=t1, outcome=outcome,
            trigger=fields.get("trigger"),
            intent_id=verdict.get("intent_id") or fields.get("intent_id"),
            action=verdict.get("action"), fencing_token=verdict.get("fencing_token"),
            modify=modify, depend=depend, error=error[:300]))
        return outcome, payload, error

    # --- shim logic ----------------------------------------------------------------------------

    def stop_agent(self, why: RunEnd, forget: bool) -> None:
        """The shim stops the agent now; ``forget``: the intent is gone (notice, lapse)."""
        if self.rec.end_run(self.agent_id, time.monotonic(), why):
            self.rec.event(why if why != "notice" else "notices")
        elif why in ("notice", "lapsed"):
            self.rec.event("notices" if why == "notice" else "lapsed")
        if forget:
            self.held = None
        self.interrupted.set()

    def start_running(self, verdict: dict[str, Any], body: p.Intent) -> None:
        modify, depend = claims_of(verdict)
        self.held = {"intent_id": verdict["intent_id"], "token": verdict["fencing_token"], "body": body}
        self.interrupted.clear()
        self.rec.start_run(self.agent_id, verdict["intent_id"], int(verdict["fencing_token"]), modify, depend,
                           time.monotonic())

    async def heartbeats(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.cfg.heartbeat_interval_s)
            if stop.is_set() or self.need_session:
                continue
            outcome, res, _ = await self.call("heartbeat", p.Heartbeat, max(0.5, self.cfg.fail_closed_s / 2), True)
            if outcome != "ok" or res is None:
                continue  # the watchdog decides when silence has lasted too long
            why = heartbeat_stop(res, self.agent_id, self.held["intent_id"] if self.held is not None else None)
            if why is not None:
                self.stop_agent(why, forget=True)
                self.need_session = self.need_session or why == "lapsed"

    async def watchdog(self, stop: asyncio.Event) -> None:
        f = self.cfg.fail_closed_s
        while not stop.is_set():
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            last = self.last_confirmed
            if self.rec.running(self.agent_id) and (last is None or time.monotonic() - last > f):
                self.stop_agent("fail_closed", forget=False)

    async def open_session(self, stop: asyncio.Event) -> bool:
        while not stop.is_set():
            outcome, _, _ = await self.call("open", p.OpenSession, self.cfg.open_deadline_s, True,
                                            agent_id=self.agent_id, tool=TOOL, machine="drill-host",
                                            repo_remote=self.remote, base_commit=BASE_COMMIT)
            if outcome == "ok":
                self.need_session = False
                return True
            await self.pause(stop)
        return False

    async def pause(self, stop: asyncio.Event, span: tuple[float, float] | None = None) -> None:
        lo, hi = span or self.cfg.backoff_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), self.rng.uniform(lo, hi))

    def plan(self) -> p.Intent:
        modify = self.rng.choice(self.concepts)
        others = [c for c in self.concepts if c != modify]
        depend = (self.rng.choice(others),) if others and self.rng.random() < self.cfg.depend_probability else ()
        n = self.rng.randrange(1_000_000)
        return p.Intent(summary=f"simulated task {n}", steps=("do the work",), files=None,
                        concepts=p.Concepts(modify=(modify,), depend=depend))

    async def work(self, stop: asyncio.Event) -> None:
        """Run until the work is done, the shim stops the agent, or the drill ends."""
        span = self.cfg.long_work_s if self.rng.random() < self.cfg.long_work_probability else self.cfg.work_s
        work_s = self.rng.uniform(*span)
        deadline = time.monotonic() + work_s
        while not stop.is_set() and self.rec.running(self.agent_id):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.interrupted.wait(), min(left, 0.5))
        if stop.is_set() or not self.rec.running(self.agent_id) or self.held is None:
            return
        # The agent finished: it stops working, then the shim reports completion.
        intent_id = self.held["intent_id"]
        self.rec.end_run(self.agent_id, time.monotonic(), "complete")
        await self.call("complete", p.Complete, self.cfg.submit_deadline_s, True, agent_id=self.agent_id,
                        intent_id=intent_id)
        self.held = None

    async def main(self, stop: asyncio.Event) -> None:
        while not stop.is_set() and self.ops < self.cfg.max_ops:
            if self.need_session:
                self.held = None
                if not await self.open_session(stop):
                    return
            if self.rec.running(self.agent_id):
                await self.work(stop)
                continue
            if self.held is not None:
                # Stopped by fail-closed while holding an intent: resume only on a fresh verdict,
                # once the cluster confirms us again.
                last = self.last_confirmed
                if last is None or time.monotonic() - last > self.cfg.fail_closed_s:
                    await self.pause(stop, (0.1, 0.2))
                    continue
                await self._submit(stop, self.held["body"], "replan")
                if self.rec.running(self.agent_id):
                    self.rec.event("resumed")
                continue
            await self._submit(stop, self.plan(), "initial")

    async def _submit(self, stop: asyncio.Event, body: p.Intent, trigger: str) -> None:
        outcome, verdict, error = await self.call("submit", p.SubmitIntent, self.cfg.submit_deadline_s, False,
                                                  agent_id=self.agent_id, tool=TOOL, intent=body, trigger=trigger)
        if outcome == "ok" and verdict is not None:
            if verdict.get("action") == "continue":
                if stop.is_set():
                    # Granted as the drill ends: the agent never starts; give the claim back.
                    await self.call("complete", p.Complete, self.cfg.submit_deadline_s, True,
                                    agent_id=self.agent_id, intent_id=verdict["intent_id"])
                    return
                last = self.last_confirmed
                if last is None or time.monotonic() - last > self.cfg.fail_closed_s:
                    # The verdict took longer than F to arrive: the shim cannot vouch for the session
                    # now, so the agent does not start; it replans once confirmed again.
                    self.held = {"intent_id": verdict["intent_id"], "token": verdict["fencing_token"], "body": body}
                    return
                self.start_running(verdict, body)
                return
            self.held = None  # stopped or reverted: this intent is over
        elif error in ("session_lapsed", "no_session"):
            self.need_session = True
            self.held = None
        await self.pause(stop)

    async def finish(self) -> None:
        """At the end of the drill: the agent stops; the shim completes what it held (bounded)."""
        was_running = self.rec.end_run(self.agent_id, time.monotonic(), "drill_end")
        if was_running and self.held is not None:
            await self.call("complete", p.Complete, 5.0, True, agent_id=self.agent_id,
                            intent_id=self.held["intent_id"])
        self.held = None
        await self.client.close()

    async def run(self, stop: asyncio.Event) -> None:
        if self.group is not None:
            _bind_source_addresses()
            _SOURCE_IP.set(GROUP_SOURCE_IPS[self.group])
        tasks = [asyncio.create_task(self.main(stop)), asyncio.create_task(self.heartbeats(stop)),
                 asyncio.create_task(self.watchdog(stop))]
        await stop.wait()
        # Give in-flight calls their deadline to finish, so their outcome is recorded.
        done, pending = await asyncio.wait(tasks, timeout=self.cfg.submit_deadline_s + CALL_GRACE_S)
        for t in pending:
            t.cancel()
        for t in done:
            if not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.finish(), STOP_TIMEOUT_S)


class Workload:
    """N simulated agents of different developers; ``run`` until ``stop`` is set."""

    def __init__(self, keys: dict[str, Path], masters: Sequence[Master], remote: str, concepts: Sequence[str],
                 cfg: WorkloadConfig, recorder: Recorder, seed: int, grouped: bool = True) -> None:
        devs = sorted(keys)[: cfg.agents]
        self.agents = [SimAgent(dev, keys[dev], masters, remote, concepts, cfg, recorder,
                                random.Random(f"{seed}:{i}"), GROUPS[i % len(GROUPS)] if grouped else None)
                       for i, dev in enumerate(devs)]

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(*(a.run(stop) for a in self.agents), return_exceptions=False)
