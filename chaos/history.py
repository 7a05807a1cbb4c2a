"""What a drill observed: every client operation and every simulated agent's run intervals.

Pure data and a thread-safe recorder; no I/O and no clock (callers pass monotonic seconds), so
checkers can be tested on hand-made histories.

- An :class:`Op` is one client call as the workload made it (open, submit, heartbeat, complete):
  when it was invoked, when it returned, and its outcome. ``ok`` means the cluster answered with a
  result; ``failed`` means nothing was applied (no quorum-backed leader before the deadline, or a
  refusal); ``indeterminate`` means the request may or may not have been applied (timeouts are
  indeterminate, as in Jepsen).
- A :class:`Run` is the simulated shim's own record of when its agent ran holding which concepts:
  from the moment the ``continue`` verdict arrived until the shim stopped the agent (a stop or
  revert notice, a lapsed session, fail-closed after F seconds without a quorum-confirmed
  acknowledgement, completion, or the end of the drill).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Outcome = Literal["ok", "failed", "indeterminate"]
OpKind = Literal["open", "submit", "heartbeat", "complete"]
RunEnd = Literal["complete", "notice", "lapsed", "fail_closed", "drill_end", "refused"]
OUTCOMES: tuple[Outcome, ...] = ("ok", "failed", "indeterminate")


@dataclass(frozen=True)
class Op:
    """One client operation. Times are monotonic seconds."""

    agent_id: str
    kind: OpKind
    invoke_s: float
    complete_s: float
    outcome: Outcome
    trigger: str | None = None  # submit: initial | replan
    intent_id: str | None = None  # submit: the verdict's intent; complete: the intent named
    action: str | None = None  # submit/complete: the verdict's action (continue | stop | revert)
    fencing_token: int | None = None
    modify: tuple[str, ...] = ()  # the verdict's claims (submit)
    depend: tuple[str, ...] = ()
    error: str = ""

    @property
    def is_grant(self) -> bool:
        """A ``continue`` verdict on a plan: the agent may run holding its claims."""
        return self.kind == "submit" and self.outcome == "ok" and self.action == "continue"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["modify"], d["depend"] = list(self.modify), list(self.depend)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Op:
        return cls(**{**d, "modify": tuple(d.get("modify", ())), "depend": tuple(d.get("depend", ()))})


@dataclass(frozen=True)
class Run:
    """One interval during which a simulated agent ran, as its shim recorded it."""

    agent_id: str
    intent_id: str
    fencing_token: int
    modify: tuple[str, ...]
    depend: tuple[str, ...]
    start_s: float
    end_s: float
    ended_by: RunEnd

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["modify"], d["depend"] = list(self.modify), list(self.depend)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Run:
        return cls(**{**d, "modify": tuple(d["modify"]), "depend": tuple(d["depend"])})


@dataclass
class History:
    """Everything the checkers read from the client side of a drill."""

    ops: list[Op] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    fail_closed_s: float = 5.0

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        for op in self.ops:
            out[op.outcome] += 1
        return out

    def to_json(self) -> dict[str, Any]:
        return {"fail_closed_s": self.fail_closed_s, "ops": [o.to_json() for o in self.ops],
                "runs": [r.to_json() for r in self.runs]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> History:
        return cls([Op.from_json(o) for o in d["ops"]], [Run.from_json(r) for r in d["runs"]],
                   float(d["fail_closed_s"]))


@dataclass
class _OpenRun:
    intent_id: str
    fencing_token: int
    modify: tuple[str, ...]
    depend: tuple[str, ...]
    start_s: float


class Recorder:
    """Collects ops and runs from many asyncio tasks (and is read by a progress thread).

    Bounded: beyond ``max_ops`` operations new ones are counted but not kept, so a runaway
    workload cannot grow memory without limit (the checkers then say the history is truncated).
    """

    def __init__(self, fail_closed_s: float, max_ops: int = 200_000) -> None:
        self.fail_closed_s = fail_closed_s
        self.max_ops = max_ops
        self.dropped_ops = 0
        self._ops: list[Op] = []
        self._runs: list[Run] = []
        self._open: dict[str, _OpenRun] = {}
        self._counts: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self._events: dict[str, int] = {"fail_closed": 0, "resumed": 0, "notices": 0, "lapsed": 0}
        self._lock = threading.Lock()

    def op(self, op: Op) -> None:
        with self._lock:
            self._counts[op.outcome] += 1
            if len(self._ops) < self.max_ops:
                self._ops.append(op)
            else:
                self.dropped_ops += 1

    def start_run(self, agent_id: str, intent_id: str, token: int, modify: Iterable[str], depend: Iterable[str],
                  at_s: float) -> None:
        with self._lock:
            assert agent_id not in self._open, f"{agent_id} is already running"
            self._open[agent_id] = _OpenRun(intent_id, token, tuple(modify), tuple(depend), at_s)

    def end_run(self, agent_id: str, at_s: float, ended_by: RunEnd) -> bool:
        """Close the agent's open run; False when it was not running."""
        with self._lock:
            r = self._open.pop(agent_id, None)
            if r is None:
                return False
            self._runs.append(Run(agent_id, r.intent_id, r.fencing_token, r.modify, r.depend, r.start_s, at_s,
                                  ended_by))
            return True

    def running(self, agent_id: str) -> bool:
        with self._lock:
            return agent_id in self._open

    def running_agents(self) -> list[str]:
        with self._lock:
            return sorted(self._open)

    def event(self, name: str) -> None:
        with self._lock:
            self._events[name] = self._events.get(name, 0) + 1

    def close_all(self, at_s: float) -> None:
        for a in list(self._open):
            self.end_run(a, at_s, "drill_end")

    def snapshot_counts(self) -> tuple[dict[str, int], int, dict[str, int]]:
        """(outcome counts, agents running now, shim events) for live progress."""
        with self._lock:
            return dict(self._counts), len(self._open), dict(self._events)

    def history(self) -> History:
        with self._lock:
            return History(list(self._ops), list(self._runs), self.fail_closed_s)


# --- what simulated agents read from the master's answers (the drill's and the simulator's) ----


def claims_of(verdict: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The concepts a verdict claims: (modify, depend)."""
    c = verdict.get("claims") or {}
    return (tuple(x["concept"] for x in c.get("modify", [])), tuple(x["concept"] for x in c.get("depend", [])))


def heartbeat_stop(reply: dict[str, Any], agent_id: str, held_intent: str | None) -> str | None:
    """Why a heartbeat reply stops the agent: "notice" (a stop or revert of the intent it holds,
    or of its last one when it holds none), "lapsed" (its session lapsed or is unknown), or None.
    A notice about an intent the agent no longer holds (it moved on) stops nothing."""
    notice = (reply.get("notices") or {}).get(agent_id)
    if notice is not None and notice.get("action") in ("stop", "revert") and \
            (held_intent is None or notice.get("intent_id") == held_intent):
        return "notice"
    if agent_id in (reply.get("lapsed") or []) or agent_id in (reply.get("unknown") or []):
        return "lapsed"
    return None
