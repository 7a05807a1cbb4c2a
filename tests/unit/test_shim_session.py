"""The shim's session state machine (shim/session.py) over a fake clock: the fail-closed bound,
verdicts, replans, completion, revocation with revert, signals and the finale's order."""

from __future__ import annotations

from typing import Any

import pytest

from tetherlab.shim import session as s

AGENT = "alice/4b2e0c1a-1111-4222-8333-0123456789ab"
F = 5.0


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def advance(self, dt: float) -> float:
        self.t += dt
        return self.t


def started(f: float = F, ttl_s: float | None = 30.0) -> tuple[s.Session, Clock]:
    m, c = s.Session(AGENT, f), Clock()
    assert kinds(m.handle(s.Opened(c.t, ttl_s))) == ["StartAgent"]
    return m, c


def kinds(actions: list[s.Action]) -> list[str]:
    return [type(a).__name__ for a in actions if not isinstance(a, s.Say)]


def said(actions: list[s.Action]) -> list[str]:
    return [a.kind for a in actions if isinstance(a, s.Say)]


def continue_verdict(intent: str = "i-1") -> dict[str, Any]:
    return {"action": "continue", "intent_id": intent, "fencing_token": 7, "context": "go"}


def granted(m: s.Session, c: Clock, intent: str = "i-1") -> None:
    m.handle(s.SubmitStarted())
    acts = m.handle(s.VerdictReceived(c.t, continue_verdict(intent), "Rework invoices"))
    assert kinds(acts) == ["Grant"] and m.holding


def hb(confirmed: bool = True, **extra: Any) -> dict[str, Any]:
    return {"ok": True, "confirmed": [AGENT] if confirmed else [], "lapsed": [], "unknown": [], "notices": {},
            "session_ttl_ms": 30_000, **extra}


def finish(m: s.Session, acts: list[s.Action]) -> list[s.Action]:
    """Report every awaited effect of ``acts`` as done (ok), collecting what follows."""
    out = list(acts)
    for a in acts:
        if isinstance(a, s.Revert):
            out += finish(m, m.handle(s.EffectDone("revert", True)))
        elif isinstance(a, s.EndIntent):
            out += finish(m, m.handle(s.EffectDone("end", True, {"trigger": a.trigger})))
        elif isinstance(a, s.CloseSession):
            out += finish(m, m.handle(s.EffectDone("close", True)))
    return out


# --- fail closed -----------------------------------------------------------------------------------


def test_the_agent_stops_once_no_confirmation_is_younger_than_f() -> None:
    m, c = started()
    assert m.handle(s.Tick(c.advance(F))) == []  # exactly F: still confirmed
    acts = m.handle(s.Tick(c.advance(0.01)))
    assert kinds(acts) == ["RecordFailure", "StopAgent"] and said(acts)[0] == "fail_closed"
    assert m.edit_decision(c.t)[0] == "stop"
    acts = finish(m, m.handle(s.AgentExited(130)))
    assert acts[-1] == s.Exit(3)


def test_a_confirmation_counts_from_when_its_request_was_sent() -> None:
    m, c = started()
    sent = c.advance(3.0)
    c.advance(2.5)  # the reply took 2.5 s
    assert m.handle(s.HeartbeatAnswered(sent, hb())) == []
    assert m.handle(s.Tick(c.advance(2.4))) == []  # 4.9 s after it was sent
    assert kinds(m.handle(s.Tick(c.advance(0.2)))) == ["RecordFailure", "StopAgent"]


def test_a_late_reply_to_an_older_heartbeat_does_not_move_confirmation_back() -> None:
    m, c = started()
    old = c.advance(1.0)
    new = c.advance(1.0)
    m.handle(s.HeartbeatAnswered(new, hb()))
    m.handle(s.HeartbeatAnswered(old, hb()))
    assert m.last_confirmed_s == new


@pytest.mark.parametrize("reply", [
    hb(confirmed=False),  # answered, but this session is not among the confirmed
    {"ok": True, "confirmed": [], "lapsed": [], "unknown": [AGENT], "notices": {}},
    {"ok": True, "lapsed": [], "unknown": [AGENT], "notices": {}},  # a node without "confirmed"
])
def test_a_reply_that_does_not_confirm_this_session_is_no_confirmation(reply: dict[str, Any]) -> None:
    m, c = started()
    m.handle(s.HeartbeatAnswered(c.advance(4.0), reply))
    assert m.last_confirmed_s == 100.0


def test_an_unknown_session_stops_the_agent_at_once_and_abandons_nothing() -> None:
    m, c = started()
    granted(m, c)
    acts = m.handle(s.HeartbeatAnswered(c.advance(1.0), {"ok": True, "confirmed": [], "lapsed": [],
                                                         "unknown": [AGENT], "notices": {}}))
    assert kinds(acts) == ["StopAgent"] and "no session" in m.stopping  # type: ignore[operator]
    acts = finish(m, m.handle(s.AgentExited(130)))
    assert kinds(acts) == ["CloseSession", "Release", "Exit"] and acts[-1] == s.Exit(3)


def test_a_lapsed_session_stops_the_agent() -> None:
    m, c = started()
    acts = m.handle(s.HeartbeatAnswered(c.advance(1.0), {"ok": True, "confirmed": [], "lapsed": [AGENT],
                                                         "unknown": [], "notices": {}}))
    assert kinds(acts) == ["StopAgent"] and m.stopping == "the session lapsed at the master"


def test_the_margin_is_rechecked_against_the_ttl_in_every_heartbeat_reply() -> None:
    m, c = started(f=5.0, ttl_s=30.0)
    assert m.bound_s == 5.0
    acts = m.handle(s.HeartbeatAnswered(c.advance(0.5), hb(session_ttl_ms=8_000)))  # lowered while running
    assert said(acts) == ["warning"] and m.bound_s == 3.0
    assert kinds(m.handle(s.Tick(c.advance(3.01)))) == ["RecordFailure", "StopAgent"]


def test_a_ttl_that_leaves_no_margin_at_the_opening_refuses_and_closes() -> None:
    m, c = s.Session(AGENT, 5.0), Clock()
    acts = m.handle(s.Opened(c.t, 10.0))
    assert said(acts) == ["error"] and kinds(acts) == ["CloseSession"]
    assert finish(m, acts)[-1] == s.Exit(2)


# --- verdicts, replans, completion -------------------------------------------------------------------


def test_edits_wait_for_a_pending_verdict_then_follow_it() -> None:
    m, c = started()
    assert m.edit_decision(c.t) == ("deny", s.NO_PLAN_REASON)
    m.handle(s.SubmitStarted())
    decision, reason = m.edit_decision(c.t)
    assert decision == "pending" and "Present your plan" not in reason
    m.handle(s.VerdictReceived(c.t, continue_verdict(), "x"))
    assert m.edit_decision(c.t) == ("allow", "")


def test_replan_keeps_the_intent_and_a_stop_on_replan_stops() -> None:
    m, c = started()
    assert m.submit_trigger() == "initial"
    granted(m, c)
    assert m.submit_trigger() == "replan"
    m.handle(s.SubmitStarted())
    stop = {"action": "stop", "intent_id": "i-1", "conflicts": [
        {"holder_agent_id": "bob/x", "holder_summary": "y", "concept": "billing", "kind": "modify"}]}
    acts = m.handle(s.VerdictReceived(c.t, stop))
    assert kinds(acts) == ["StopAgent"] and "bob/x" in m.stopping and "billing" in m.stopping  # type: ignore[operator]
    assert m.submit_trigger() is None
    acts = finish(m, m.handle(s.AgentExited(130)))
    assert kinds(acts) == ["CloseSession", "Release", "Exit"] and acts[-1] == s.Exit(4)


def test_a_refused_plan_is_reported_to_the_next_edit() -> None:
    m, c = started()
    m.handle(s.SubmitStarted())
    assert m.handle(s.SubmitFailed("the master refused the plan (unknown_concept): x", unavailable=False)) == []
    decision, reason = m.edit_decision(c.t)
    assert decision == "deny" and "unknown_concept" in reason


def test_no_verdict_for_want_of_a_quorum_stops_the_agent() -> None:
    m, _c = started()
    m.handle(s.SubmitStarted())
    acts = m.handle(s.SubmitFailed("no leader", unavailable=True))
    assert kinds(acts) == ["StopAgent"]
    assert finish(m, m.handle(s.AgentExited(0)))[-1] == s.Exit(3)


def test_a_done_block_completes_once_and_a_clean_exit_then_only_closes() -> None:
    m, c = started()
    granted(m, c)
    acts = m.handle(s.DonePrinted("finished"))
    assert acts == [s.EndIntent("complete", "i-1", "finished")]
    assert m.handle(s.DonePrinted("again")) == []
    m.handle(s.EffectDone("end", True, {"trigger": "complete"}))
    assert m.edit_decision(c.t)[0] == "deny"  # the intent is finished: a new plan first
    acts = finish(m, m.handle(s.AgentExited(0)))
    assert kinds(acts) == ["CloseSession", "Release", "Exit"] and acts[-1] == s.Exit(0)


@pytest.mark.parametrize(("status", "trigger"), [(0, "complete"), (1, "abandon")])
def test_exiting_while_holding_completes_or_abandons_then_closes(status: int, trigger: str) -> None:
    m, c = started()
    granted(m, c)
    acts = finish(m, m.handle(s.AgentExited(status)))
    assert kinds(acts) == ["EndIntent", "CloseSession", "Release", "Exit"]
    assert acts[0] == s.EndIntent(trigger, "i-1") and acts[-1] == s.Exit(status)


# --- revoke with revert ------------------------------------------------------------------------------


def test_a_revert_exits_5_only_after_the_revert_reported_success() -> None:
    m, c = started()
    granted(m, c)
    acts = m.handle(s.Revoked("revoked by admin", revert=True))
    assert kinds(acts) == ["StopAgent"]
    acts = m.handle(s.AgentExited(130))
    assert kinds(acts) == ["Revert", "CloseSession"]  # no complete or abandon: the master took the intent
    assert acts[0] == s.Revert("i-1", "Rework invoices")
    assert m.handle(s.EffectDone("close", True)) == []  # still waiting for the revert
    assert m.handle(s.EffectDone("revert", True)) == [s.Release(), s.Exit(5)]


def test_a_failed_revert_exits_4() -> None:
    m, c = started()
    granted(m, c)
    m.handle(s.Revoked("x", revert=True))
    m.handle(s.AgentExited(130))
    m.handle(s.EffectDone("revert", False))
    assert m.handle(s.EffectDone("close", True))[-1] == s.Exit(4)


def test_a_revert_asked_while_stopping_for_another_reason_is_still_done() -> None:
    m, c = started()
    granted(m, c)
    m.handle(s.Signalled(15, "SIGTERM"))
    assert m.handle(s.Revoked("x", revert=True)) == []
    assert kinds(m.handle(s.AgentExited(143))) == ["Revert", "CloseSession"]


def test_a_revert_that_arrives_after_the_agent_exited_is_done_before_exit() -> None:
    m, c = started()
    granted(m, c)
    acts = m.handle(s.AgentExited(0))
    assert kinds(acts) == ["EndIntent", "CloseSession"]
    assert kinds(m.handle(s.Revoked("x", revert=True))) == ["Revert"]
    m.handle(s.EffectDone("end", False))
    m.handle(s.EffectDone("close", True))
    assert m.handle(s.EffectDone("revert", True)) == [s.Release(), s.Exit(5)]


# --- signals -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("signum", "name"), [(15, "SIGTERM"), (1, "SIGHUP"), (2, "SIGINT")])
def test_a_signal_stops_the_agent_abandons_the_intent_and_closes(signum: int, name: str) -> None:
    m, c = started()
    granted(m, c)
    acts = m.handle(s.Signalled(signum, name))
    assert kinds(acts) == ["StopAgent"]
    assert m.handle(s.Signalled(signum, name)) == []  # a second signal changes nothing
    acts = finish(m, m.handle(s.AgentExited(128 + signum)))
    assert kinds(acts) == ["EndIntent", "CloseSession", "Release", "Exit"]
    assert acts[0] == s.EndIntent("abandon", "i-1") and acts[-1] == s.Exit(128 + signum)


def test_a_signal_before_the_session_opened_closes_it_without_starting_the_agent() -> None:
    m, c = s.Session(AGENT, F), Clock()
    assert m.handle(s.Signalled(15, "SIGTERM")) == []
    acts = finish(m, m.handle(s.Opened(c.t, 30.0)))
    assert kinds(acts) == ["CloseSession", "Release", "Exit"] and acts[-1] == s.Exit(143)


def test_nothing_happens_after_exit() -> None:
    m, c = started()
    finish(m, m.handle(s.AgentExited(0)))
    assert m.phase is s.Phase.DONE
    for ev in (s.Tick(c.advance(100)), s.Revoked("x", True), s.Signalled(15, "SIGTERM"), s.AgentExited(1)):
        assert m.handle(ev) == []


def test_a_continue_verdict_after_the_stop_began_grants_nothing_and_is_abandoned() -> None:
    m, c = started()
    m.handle(s.SubmitStarted())
    m.handle(s.Signalled(15, "SIGTERM"))
    acts = m.handle(s.VerdictReceived(c.t, continue_verdict()))
    assert kinds(acts) == []
    acts = finish(m, m.handle(s.AgentExited(143)))
    assert acts[0] == s.EndIntent("abandon", "i-1")


# --- in-flight changes: drift and soft conflicts ------------------------------------------------------


SOFT = {"kind": "file", "other_intent_id": "i-9", "other_agent_id": "bob/2", "path": "app.py",
        "other_summary": "Rework orders"}


def test_changes_that_drift_onto_a_free_concept_regrant_with_the_new_token() -> None:
    m, c = started()
    granted(m, c)
    reply = {"action": "continue", "intent_id": "i-1", "fencing_token": 12, "context": "now claimed: auth",
             "drift": {"claimed": ["auth"], "warned": []}, "soft_conflicts": []}
    acts = m.handle(s.ChangesAnswered(reply))
    grants = [a for a in acts if isinstance(a, s.Grant)]
    assert len(grants) == 1 and grants[0].verdict["fencing_token"] == 12  # the commit trailers follow it
    assert m.verdict is not None and m.verdict["fencing_token"] == 12 and m.holding
    assert "now claimed: auth" in m.take_notes() and m.take_notes() == ""  # told once


def test_changes_that_reach_a_held_concept_stop_or_revert_the_agent() -> None:
    for action, revert in (("stop", False), ("revert", True)):
        m, c = started()
        granted(m, c)
        acts = m.handle(s.ChangesAnswered({"action": action, "intent_id": "i-1", "context": "held by bob",
                                           "conflicts": [], "drift": {"blocked": ["billing"]}}))
        assert kinds(acts) == ["StopAgent"] and m.stop is not None and m.stop.revert is revert
        assert not m.holding


def test_an_answer_about_a_replaced_intent_is_ignored() -> None:
    m, c = started()
    granted(m, c, "i-2")
    assert m.handle(s.ChangesAnswered({"action": "stop", "intent_id": "i-1", "context": "old"})) == []
    assert m.stop is None


def test_soft_conflicts_are_told_once_whether_by_report_or_heartbeat() -> None:
    m, c = started()
    granted(m, c)
    plain = {"action": "continue", "intent_id": "i-1", "fencing_token": 7, "context": "bob/2 is also changing app.py",
             "drift": {"claimed": [], "warned": []}, "soft_conflicts": [SOFT]}
    acts = m.handle(s.ChangesAnswered(plain))
    assert said(acts) == ["soft_conflict"] and kinds(acts) == []  # no new grant: the token did not change
    assert m.soft == [SOFT] and "also changing app.py" in m.take_notes()
    assert said(m.handle(s.ChangesAnswered(plain))) == []  # the same overlap again: nothing new
    # A heartbeat brings a new one (someone else's changes now overlap).
    other = {**SOFT, "other_intent_id": "i-10", "other_agent_id": "carol/3"}
    acts = m.handle(s.HeartbeatAnswered(c.t, hb(soft={AGENT: {"intent_id": "i-1", "soft_conflicts": [SOFT, other],
                                                                "context": "carol/3 is also changing app.py"}})))
    assert said(acts) == ["soft_conflict"] and len(m.soft) == 2
    assert m.take_notes() == "carol/3 is also changing app.py"
    # The master repeats them in every heartbeat reply while they last: told once still.
    again = hb(soft={AGENT: {"intent_id": "i-1", "soft_conflicts": [other, SOFT], "context": "..."}})
    assert said(m.handle(s.HeartbeatAnswered(c.t, again))) == [] and m.take_notes() == ""


def test_notes_are_bounded() -> None:
    m, c = started()
    granted(m, c)
    for i in range(3 * s.NOTES_MAX):
        m.handle(s.ChangesAnswered({"action": "continue", "intent_id": "i-1", "fencing_token": 7 + i,
                                    "context": f"claimed c{i}", "drift": {"claimed": [f"c{i}"]}}))
    notes = m.take_notes().splitlines()
    assert len(notes) == s.NOTES_MAX and notes[-1] == f"claimed c{3 * s.NOTES_MAX - 1}"
