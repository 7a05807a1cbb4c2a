"""The life of one wrapped agent as a pure state machine: events in, actions out.

The runner (run.py) feeds :class:`Session` what happened (the session opened, a heartbeat was
answered, a verdict or a revocation arrived, a signal, the agent exited, an effect finished, the
clock ticked) and performs the actions it returns, in order. The machine reads no clock and does
no I/O: every event carries the monotonic time it refers to, so tests drive it over a fake clock.

It owns every decision of the shim's lifecycle:

- **Fail closed.** A confirmation is a quorum-backed reply that keeps *this* session alive: the
  opening, a verdict, or a heartbeat whose reply lists the session under ``confirmed``. It counts
  from when its request was *sent*. An ``unknown`` or ``lapsed`` session is never a confirmation:
  the master has forgotten or expired it, so the agent stops at once. When no confirmation is
  younger than the bound, the agent stops. The bound is ``min(F, TTL - margin)``, re-checked
  against the TTL every heartbeat reply carries, so a shim never outlives its session at the
  master even after the TTL was lowered while it ran.
- **Verdicts.** ``continue`` grants (the runner refreshes the world slice); ``stop`` and
  ``revert`` stop the agent; a revocation does the same, with a revert when asked.
- **The finale**, once the agent has exited, whatever ended it: revert (if asked) -> complete or
  abandon the intent it still holds -> close the session -> release -> exit. Exit waits for the
  revert and the close to report back, so exit code 5 means the stash exists and the tree is at
  its base; a revert that failed exits 4. Signals (SIGTERM, SIGHUP, SIGINT) stop the agent and
  abandon its intent before the exit; every exit after the opening closes the session.

Exit codes: the agent's own status when it ran to its end; 2 (the fail-closed margin cannot be
kept); 3 quorum unreachable, or the session lapsed or was forgotten; 4 stopped by a verdict; 5
stopped and reverted; 128 + N after signal N.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from tetherlab.cluster.core.exitcodes import EXIT_REVERTED, EXIT_STOPPED, EXIT_UNAVAILABLE, EXIT_USAGE

FAIL_CLOSED_MARGIN_S = 5.0  # F + margin must stay below the session TTL
FAIL_CLOSED_MIN_S = 0.5  # the bound never shrinks below this, whatever TTL is reported
NO_PLAN_REASON = ("Tetherlab: no accepted plan yet. Present your plan first (plan mode / ExitPlanMode, or a "
                  "TETHERLAB-PLAN block).")
PENDING_REASON = ("Tetherlab: your plan's verdict has not arrived yet; wait a moment and try this edit again "
                  "(do not present the plan again).")
UNREACHABLE_REASON = "Tetherlab: the master's quorum is unreachable; edits are blocked"
NOTES_MAX = 5  # news kept for the agent's next hook reply (soft conflicts, drift); older ones drop


class Phase(enum.Enum):
    OPENING = "opening"  # waiting for the session to open; the agent has not started
    RUNNING = "running"
    STOPPING = "stopping"  # the agent is being stopped; the finale starts when it has exited
    FINISHING = "finishing"  # the agent has exited; finale effects are under way
    DONE = "done"  # Exit was emitted


# --- events --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Opened:
    sent_s: float  # when open_session was sent
    ttl_s: float | None  # the session's TTL at the master, when the reply says


@dataclass(frozen=True)
class HeartbeatAnswered:
    sent_s: float
    reply: dict[str, Any]


@dataclass(frozen=True)
class SubmitStarted:
    """A plan is on its way to the master (hook decisions wait for its verdict)."""


@dataclass(frozen=True)
class VerdictReceived:
    sent_s: float
    verdict: dict[str, Any]
    summary: str = ""  # the plan's summary (a revert's stash message names it)


@dataclass(frozen=True)
class ChangesAnswered:
    """The master's answer to an in-flight change report: a verdict (``continue``, possibly with
    concepts the changes reached and were claimed for the intent, or ``stop``/``revert`` when they
    reached a concept someone else holds) and the intent's soft conflicts."""

    reply: dict[str, Any]


@dataclass(frozen=True)
class SubmitFailed:
    reason: str
    unavailable: bool  # no quorum-backed answer: the agent stops; else the plan was refused


@dataclass(frozen=True)
class Malformed:
    """A plan block the agent printed could not be read; the next denied edit says why."""

    reason: str


@dataclass(frozen=True)
class Revoked:
    reason: str
    revert: bool


@dataclass(frozen=True)
class DonePrinted:
    summary: str | None


@dataclass(frozen=True)
class Tick:
    now_s: float


@dataclass(frozen=True)
class Signalled:
    signum: int
    name: str


@dataclass(frozen=True)
class AgentExited:
    status: int  # already mapped: a signal N is 128 + N


@dataclass(frozen=True)
class EffectDone:
    kind: str  # "revert" | "end" | "close"
    ok: bool
    result: dict[str, Any] = field(default_factory=dict)


Event = (Opened | HeartbeatAnswered | SubmitStarted | VerdictReceived | ChangesAnswered | SubmitFailed | Malformed
         | Revoked | DonePrinted | Tick | Signalled | AgentExited | EffectDone)


# --- actions -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Say:
    """An event for the developer (``--json`` prints it as one JSON line)."""

    kind: str
    message: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StartAgent:
    pass


@dataclass(frozen=True)
class StopAgent:
    reason: str


@dataclass(frozen=True)
class RecordFailure:
    detail: str


@dataclass(frozen=True)
class Grant:
    """A continue verdict: the world slice is refreshed (and issue 14's git hooks go here)."""

    verdict: dict[str, Any]


@dataclass(frozen=True)
class Revert:
    intent_id: str | None
    summary: str


@dataclass(frozen=True)
class EndIntent:
    trigger: str  # "complete" | "abandon"
    intent_id: str
    summary: str | None = None


@dataclass(frozen=True)
class CloseSession:
    pass


@dataclass(frozen=True)
class Release:
    """The last effect before exit: the runner's own clean-up point (issue 14 unhooks here)."""


@dataclass(frozen=True)
class Exit:
    code: int


Action = Say | StartAgent | StopAgent | RecordFailure | Grant | Revert | EndIntent | CloseSession | Release | Exit

# Effects the runner must finish, in order, even while tether is exiting.
ORDERED = (RecordFailure, Grant, Revert, EndIntent, CloseSession, Release, Exit)


@dataclass
class _Stop:
    reason: str
    code: int
    revert: bool = False


def why(verdict: dict[str, Any]) -> str:
    """A verdict in one line: the action, the intent, and who holds what."""
    parts = []
    for c in verdict.get("conflicts", [])[:3]:
        parts.append(f"{c.get('holder_agent_id')} ({c.get('holder_summary')!r}) holds {c.get('concept')} "
                     f"[{c.get('kind')}]")
    head = f"{verdict.get('action')} on {verdict.get('intent_id')}"
    if parts:
        return head + ": " + "; ".join(parts)
    return head + (": " + verdict["context"] if verdict.get("context") else "")


class Session:
    def __init__(self, agent_id: str, fail_closed_s: float, margin_s: float = FAIL_CLOSED_MARGIN_S) -> None:
        self.agent_id = agent_id
        self.fail_closed_s = fail_closed_s  # as configured
        self.margin_s = margin_s
        self.ttl_s: float | None = None
        self.phase = Phase.OPENING
        self.last_confirmed_s: float | None = None
        self.verdict: dict[str, Any] | None = None
        self.intent_id: str | None = None
        self.summary = ""
        self.holding = False  # a continue verdict whose intent was not completed or abandoned yet
        self.pending_submits = 0
        self.malformed: str | None = None
        self.stop: _Stop | None = None
        self.exit_status: int | None = None
        self.signalled: int | None = None  # a signal that arrived before the agent started
        self.revert_started = False
        self.reverted: bool | None = None
        self.end_started = False
        self.close_started = False
        self._awaiting: set[str] = set()
        self.exit_code: int | None = None
        self.soft: list[dict[str, Any]] = []  # the intent's soft conflicts, as last told by the master
        self.notes: list[str] = []  # news for the agent, told once with its next hook reply (bounded)

    # --- queries ---------------------------------------------------------------------------------

    @property
    def bound_s(self) -> float:
        """The fail-closed bound in force: F, shrunk if the TTL no longer leaves the margin."""
        if self.ttl_s is None:
            return self.fail_closed_s
        return max(FAIL_CLOSED_MIN_S, min(self.fail_closed_s, self.ttl_s - self.margin_s))

    def confirmed_at(self, now_s: float) -> bool:
        """Whether a quorum-backed confirmation is younger than the bound."""
        return self.last_confirmed_s is not None and now_s - self.last_confirmed_s <= self.bound_s

    @property
    def stopping(self) -> str | None:
        return self.stop.reason if self.stop is not None else None

    def submit_trigger(self) -> str | None:
        """The trigger for the next plan, or None while the agent is being stopped."""
        if self.phase not in (Phase.RUNNING,) or self.stop is not None:
            return None
        if self.intent_id is None or not self.holding:
            return "initial"
        return "replan"

    def edit_decision(self, now_s: float) -> tuple[str, str]:
        """For a tool call that may change files: ``("allow", "")``, ``("deny", reason)``,
        ``("stop", reason)``, or ``("pending", reason)`` while a plan's verdict is on its way
        (the caller waits for it, bounded, then asks again; ``reason`` is its answer on timeout)."""
        if self.stop is not None or self.phase in (Phase.FINISHING, Phase.DONE):
            return "stop", f"Tetherlab stopped this agent: {self.stopping or 'it is exiting'}"
        if not self.confirmed_at(now_s):
            return "deny", UNREACHABLE_REASON
        if self.holding:
            return "allow", ""
        if self.pending_submits:
            return "pending", PENDING_REASON
        if self.malformed:
            return "deny", (f"Tetherlab: {self.malformed}. Present your plan first (plan mode / ExitPlanMode, or a "
                            "TETHERLAB-PLAN block).")
        return "deny", NO_PLAN_REASON

    # --- the transition function ------------------------------------------------------------------

    def handle(self, ev: Event) -> list[Action]:
        if self.phase is Phase.DONE:
            return []
        handler = getattr(self, f"_on_{type(ev).__name__}")
        out: list[Action] = handler(ev)
        return out

    def _on_Opened(self, ev: Opened) -> list[Action]:
        if self.phase is not Phase.OPENING:
            return []
        self._confirm(ev.sent_s)
        self.ttl_s = ev.ttl_s
        if self.signalled is not None:
            self.phase = Phase.FINISHING
            self.exit_code = 128 + self.signalled
            return self._wrap_up()
        if ev.ttl_s is not None and self.fail_closed_s + self.margin_s >= ev.ttl_s:
            self.phase = Phase.FINISHING
            self.exit_code = int(EXIT_USAGE)
            return [Say("error", f"--fail-closed-s {self.fail_closed_s:g} plus a {self.margin_s:g} s margin must "
                                 f"stay below the session TTL of {ev.ttl_s:.0f} s"), *self._wrap_up()]
        self.phase = Phase.RUNNING
        return [StartAgent()]

    def _on_HeartbeatAnswered(self, ev: HeartbeatAnswered) -> list[Action]:
        reply = ev.reply
        a = self.agent_id
        lapsed = reply.get("lapsed") or []
        unknown = reply.get("unknown") or []
        confirmed = reply.get("confirmed")
        if isinstance(confirmed, list):
            ok = a in confirmed
        else:  # a node from before "confirmed": its reply is quorum-backed; lapsed/unknown say the rest
            ok = reply.get("ok") is True and a not in lapsed and a not in unknown
        out: list[Action] = []
        if ok:
            self._confirm(ev.sent_s)
            ttl_ms = reply.get("session_ttl_ms")
            if isinstance(ttl_ms, int) and not isinstance(ttl_ms, bool) and ttl_ms > 0:
                out += self._new_ttl(ttl_ms / 1000)
        notice = (reply.get("notices") or {}).get(a)
        if isinstance(notice, dict):
            out += self._verdict(notice)
        soft = (reply.get("soft") or {}).get(a)
        if isinstance(soft, dict) and soft.get("intent_id") == self.intent_id and self.stop is None:
            out += self._soft_news(soft.get("soft_conflicts"), str(soft.get("context", "")))
        if a in unknown:
            out += self._stop_with("the master has no session for this agent (it was forgotten, e.g. after a "
                                   "restore from an older backup); its concepts may be granted to others",
                                   int(EXIT_UNAVAILABLE), forgotten=True)
        elif a in lapsed:
            out += self._stop_with("the session lapsed at the master", int(EXIT_UNAVAILABLE))
        return out

    def _new_ttl(self, ttl_s: float) -> list[Action]:
        before = self.bound_s
        self.ttl_s = ttl_s
        after = self.bound_s
        if after < before:
            return [Say("warning", f"the session TTL is now {ttl_s:g} s: the fail-closed bound shrinks from "
                                   f"{before:g} s to {after:g} s so that this agent stops before its session "
                                   "could lapse", {"ttl_s": ttl_s, "fail_closed_s": after})]
        return []

    def _on_SubmitStarted(self, ev: SubmitStarted) -> list[Action]:
        self.pending_submits += 1
        return []

    def _on_VerdictReceived(self, ev: VerdictReceived) -> list[Action]:
        self.pending_submits = max(0, self.pending_submits - 1)
        self._confirm(ev.sent_s)
        self.malformed = None
        if ev.verdict.get("action") == "continue" and ev.summary:
            self.summary = ev.summary
        return self._verdict(ev.verdict)

    def _on_ChangesAnswered(self, ev: ChangesAnswered) -> list[Action]:
        reply = ev.reply
        action = reply.get("action")
        if self.phase is not Phase.RUNNING or self.stop is not None or action is None:
            return []
        if reply.get("intent_id") not in (None, self.intent_id):
            return []  # an answer about an intent the agent has since replaced
        if action in ("stop", "revert"):
            return self._verdict(reply)
        out: list[Action] = []
        drift = reply.get("drift") or {}
        if drift.get("claimed"):
            # A replan made by the master: the claims and the fencing token changed.
            out += self._verdict(reply)
            self._note(str(reply.get("context", "")))
        else:
            self.verdict = {**(self.verdict or {}), **{k: reply[k] for k in ("conflicts",) if k in reply}}
            if drift.get("warned"):
                self._note(str(reply.get("context", "")))
                out.append(Say("drift_warning", str(reply.get("context", "")), {"concepts": drift["warned"]}))
        out += self._soft_news(reply.get("soft_conflicts"), str(reply.get("context", "")))
        return out

    def _soft_news(self, soft: Any, context: str) -> list[Action]:
        """The soft conflicts now; the agent and the developer hear about new ones once."""
        if not isinstance(soft, list):
            return []
        key = [(c.get("kind"), c.get("other_intent_id"), c.get("path"), c.get("symbol")) for c in soft
               if isinstance(c, dict)]
        before = {(c.get("kind"), c.get("other_intent_id"), c.get("path"), c.get("symbol")) for c in self.soft}
        self.soft = [c for c in soft if isinstance(c, dict)]
        if not any(k not in before for k in key):
            return []
        self._note(context)
        return [Say("soft_conflict", context, {"soft_conflicts": self.soft})]

    def _note(self, text: str) -> None:
        if text and text not in self.notes:
            self.notes = [*self.notes, text][-NOTES_MAX:]

    def take_notes(self) -> str:
        """What the agent has not been told yet (the runner adds it to the next hook reply)."""
        text, self.notes = "\n".join(self.notes), []
        return text

    def _on_SubmitFailed(self, ev: SubmitFailed) -> list[Action]:
        self.pending_submits = max(0, self.pending_submits - 1)
        if ev.unavailable:
            return self._stop_with(f"no verdict from a quorum-backed master ({ev.reason})", int(EXIT_UNAVAILABLE))
        self.malformed = ev.reason
        return []

    def _on_Malformed(self, ev: Malformed) -> list[Action]:
        self.malformed = ev.reason
        return []

    def _verdict(self, verdict: dict[str, Any]) -> list[Action]:
        action = verdict.get("action")
        self.verdict = verdict
        self.intent_id = verdict.get("intent_id") or self.intent_id
        out: list[Action] = [Say("verdict", f"verdict {action} for {self.intent_id}: {verdict.get('context', '')}",
                                 {"verdict": verdict})]
        if action == "continue":
            self.holding = True
            if self.phase is Phase.RUNNING and self.stop is None:
                out.append(Grant(verdict))
        elif action in ("stop", "revert"):
            self.holding = False  # the master took the intent back: nothing to complete or abandon
            out += self._stop_with(why(verdict), int(EXIT_REVERTED if action == "revert" else EXIT_STOPPED),
                                   revert=action == "revert")
        return out

    def _on_Revoked(self, ev: Revoked) -> list[Action]:
        self.holding = False
        return self._stop_with(f"intent revoked: {ev.reason}", int(EXIT_REVERTED if ev.revert else EXIT_STOPPED),
                               revert=ev.revert)

    def _on_DonePrinted(self, ev: DonePrinted) -> list[Action]:
        if self.phase is not Phase.RUNNING or not self.holding or self.end_started or self.intent_id is None:
            return []
        self.end_started = True
        return [EndIntent("complete", self.intent_id, ev.summary)]

    def _on_Tick(self, ev: Tick) -> list[Action]:
        if self.phase is not Phase.RUNNING or self.stop is not None or self.confirmed_at(ev.now_s):
            return []
        bound = self.bound_s
        return [Say("fail_closed", f"the master's quorum is unreachable: no confirmed heartbeat for {bound:.1f} s; "
                                   "stopping the agent"),
                RecordFailure(f"no quorum-confirmed heartbeat for {bound:.1f} s"),
                *self._stop_with("the master's quorum is unreachable", int(EXIT_UNAVAILABLE))]

    def _on_Signalled(self, ev: Signalled) -> list[Action]:
        if self.phase is Phase.OPENING:
            self.signalled = ev.signum  # the finale runs once the opening is answered
            return []
        return self._stop_with(f"tether received {ev.name}", 128 + ev.signum)

    def _on_AgentExited(self, ev: AgentExited) -> list[Action]:
        if self.phase not in (Phase.RUNNING, Phase.STOPPING):
            return []
        self.exit_status = ev.status
        self.phase = Phase.FINISHING
        out: list[Action] = []
        if self.stop is not None and self.stop.revert:
            out += self._start_revert()
        if self.holding and self.intent_id is not None and not self.end_started:
            self.end_started = True
            trigger = "complete" if self.stop is None and ev.status == 0 else "abandon"
            self._awaiting.add("end")
            out.append(EndIntent(trigger, self.intent_id))
        return out + self._wrap_up()

    def _on_EffectDone(self, ev: EffectDone) -> list[Action]:
        if ev.kind == "revert":
            self.reverted = ev.ok
        elif ev.kind == "end" and ev.ok:
            self.holding = False
            if self.verdict is not None:
                self.verdict = {**self.verdict, "action": ev.result.get("trigger", "complete")}
        self._awaiting.discard(ev.kind)
        return self._maybe_exit()

    # --- helpers -----------------------------------------------------------------------------------

    def _confirm(self, sent_s: float) -> None:
        if self.last_confirmed_s is None or sent_s > self.last_confirmed_s:
            self.last_confirmed_s = sent_s

    def _stop_with(self, reason: str, code: int, revert: bool = False, forgotten: bool = False) -> list[Action]:
        if forgotten:
            self.holding = False  # the master has nothing left to complete or abandon
        if self.phase is Phase.RUNNING and self.stop is None:
            self.phase = Phase.STOPPING
            self.stop = _Stop(reason, code, revert)
            return [Say("stopping", f"stopping the agent: {reason}", {"reason": reason, "revert": revert}),
                    StopAgent(reason)]
        if not revert:
            return []
        # A revert asked for while the agent is already being stopped, or has exited, is still done.
        if self.stop is None:
            self.stop = _Stop(reason, code, True)
        elif not self.stop.revert:
            self.stop.revert, self.stop.code = True, code
        if self.phase is Phase.FINISHING and not self.revert_started:
            return self._start_revert()
        return []

    def _start_revert(self) -> list[Action]:
        self.revert_started = True
        self._awaiting.add("revert")
        return [Revert(self.intent_id, self.summary)]

    def _wrap_up(self) -> list[Action]:
        out: list[Action] = []
        if not self.close_started:
            self.close_started = True
            self._awaiting.add("close")
            out.append(CloseSession())
        return out + self._maybe_exit()

    def _maybe_exit(self) -> list[Action]:
        if self.phase is not Phase.FINISHING or self._awaiting:
            return []
        self.phase = Phase.DONE
        if self.exit_code is None:
            self.exit_code = self._final_code()
        return [Release(), Exit(self.exit_code)]

    def _final_code(self) -> int:
        if self.stop is None:
            return self.exit_status if self.exit_status is not None else 0
        if self.stop.revert:
            return int(EXIT_REVERTED) if self.reverted else int(EXIT_STOPPED)
        return self.stop.code
