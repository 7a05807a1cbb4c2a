"""The drill checkers on hand-made histories: each one passes a clean history and fails the
violation it exists to catch (a checker that cannot fail is a defect). Also the pure helpers of
the partitioner and the schedules."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest

from tetherlab.chaos import checkers as ck
from tetherlab.chaos.history import History, Op, Recorder, Run
from tetherlab.chaos.nemesis import NEMESES, build_schedule, partition_drops
from tetherlab.chaos.netns import CLIENT, TcpEntry, classify, parse_proc_tcp
from tetherlab.chaos.toxinet import LinkProxy, parse_proxy_name

A = "dev0/00000000-0000-4000-8000-000000000001"
B = "dev1/00000000-0000-4000-8000-000000000002"
POLICIES = {"x": "stop", "y": "stop", "soft": "continue"}


def grant(agent: str, iid: str, token: int, t0: float, t1: float, modify: tuple[str, ...] = ("x",),
          depend: tuple[str, ...] = (), trigger: str = "initial") -> Op:
    return Op(agent, "submit", t0, t1, "ok", trigger=trigger, intent_id=iid, action="continue", fencing_token=token,
              modify=modify, depend=depend)


def hb(agent: str, t0: float, t1: float, outcome: str = "ok") -> Op:
    return Op(agent, "heartbeat", t0, t1, outcome)  # type: ignore[arg-type]


def run(agent: str, iid: str, token: int, start: float, end: float, modify: tuple[str, ...] = ("x",),
        depend: tuple[str, ...] = (), ended_by: str = "complete") -> Run:
    return Run(agent, iid, token, modify, depend, start, end, ended_by)  # type: ignore[arg-type]


def clean_history() -> History:
    """A grants x (token 10), runs, completes; then B grants x (token 14), runs; heartbeats throughout."""
    ops = [
        Op(A, "open", 0.0, 0.1, "ok"), Op(B, "open", 0.0, 0.1, "ok"),
        grant(A, "i-10", 10, 1.0, 1.1),
        hb(A, 2.0, 2.05), hb(B, 2.0, 2.05),
        Op(A, "submit", 2.5, 2.6, "ok", trigger="initial", intent_id="i-12", action="stop", fencing_token=None,
           modify=("x",)),
        Op(A, "complete", 3.1, 3.2, "ok", intent_id="i-10", action="continue", fencing_token=10),
        grant(B, "i-14", 14, 3.5, 3.6),
        hb(B, 4.0, 4.05), hb(B, 5.0, 5.05),
    ]
    runs = [run(A, "i-10", 10, 1.1, 3.0), run(B, "i-14", 14, 3.6, 5.5, ended_by="drill_end")]
    return History(ops, runs, fail_closed_s=5.0)


def dump_for(history: History) -> dict[str, Any]:
    intents: dict[str, Any] = {
        "i-10": {"status": "completed", "fencing_token": 10},
        "i-12": {"status": "stopped", "fencing_token": None},
        "i-14": {"status": "active", "fencing_token": 14},
    }
    return {"applied_index": 20, "revision": 20, "records": {},
            "engine": {"sessions": {A: {}, B: {}}, "intents": intents}}


# --- no lost acknowledgements ---------------------------------------------------------------------


def test_no_lost_acks_passes_when_every_replica_has_everything() -> None:
    h = clean_history()
    d = dump_for(h)
    r = ck.check_no_lost_acks(h, {"n1": d, "n2": copy.deepcopy(d)})
    assert r.passed, r.detail


def test_a_lost_intent_on_one_replica_fails() -> None:
    h = clean_history()
    d = dump_for(h)
    d2 = copy.deepcopy(d)
    del d2["engine"]["intents"]["i-14"]
    r = ck.check_no_lost_acks(h, {"n1": d, "n2": d2})
    assert not r.passed and "n2: intent i-14" in r.detail


def test_a_lagging_replica_is_left_to_convergence() -> None:
    h = clean_history()
    d = dump_for(h)
    behind = {"applied_index": 3, "revision": 3, "records": {}, "engine": {"sessions": {}, "intents": {}}}
    r = ck.check_no_lost_acks(h, {"n1": d, "n2": behind})
    assert r.passed and "n2 lagging" in r.detail
    d_lost = copy.deepcopy(d)
    del d_lost["engine"]["intents"]["i-10"]
    assert not ck.check_no_lost_acks(h, {"n1": d_lost, "n2": behind}).passed


def test_a_lost_completion_fails() -> None:
    h = clean_history()
    d = dump_for(h)
    d["engine"]["intents"]["i-10"]["status"] = "active"
    r = ck.check_no_lost_acks(h, {"n1": d})
    assert not r.passed and "completion of i-10" in r.detail


def test_a_lost_session_and_a_rolled_back_token_fail() -> None:
    h = clean_history()
    d = dump_for(h)
    del d["engine"]["sessions"][B]
    d["engine"]["intents"]["i-14"]["fencing_token"] = 12
    r = ck.check_no_lost_acks(h, {"n1": d})
    assert not r.passed
    assert "session of" in r.detail and "below the acknowledged 14" in r.detail


def test_a_stop_verdict_that_became_active_fails() -> None:
    h = clean_history()
    d = dump_for(h)
    d["engine"]["intents"]["i-12"]["status"] = "active"
    assert not ck.check_no_lost_acks(h, {"n1": d}).passed


def test_failed_and_indeterminate_ops_need_not_be_present() -> None:
    h = clean_history()
    h.ops.append(Op(A, "submit", 6.0, 7.0, "indeterminate", intent_id=None))
    h.ops.append(Op(B, "complete", 6.0, 7.0, "failed", intent_id="i-14"))
    assert ck.check_no_lost_acks(h, {"n1": dump_for(h)}).passed


def test_no_dumps_is_a_failure_not_a_pass() -> None:
    assert not ck.check_no_lost_acks(clean_history(), {}).passed


# --- mutual exclusion ---------------------------------------------------------------------------------


def test_mutual_exclusion_passes_for_sequential_runs() -> None:
    r = ck.check_mutual_exclusion(clean_history(), POLICIES)
    assert r.passed, r.detail


def test_overlapping_modify_modify_fails() -> None:
    h = clean_history()
    h.runs.append(run(B, "i-9", 9, 2.0, 2.5))  # B ran on x while A held it
    r = ck.check_mutual_exclusion(h, POLICIES)
    assert not r.passed and "overlapped 0.500 s on x" in r.detail


def test_modify_depend_overlap_fails_under_stop_and_passes_under_continue() -> None:
    h = History([], [run(A, "i-1", 1, 0.0, 2.0, modify=("x",)), run(B, "i-2", 2, 1.0, 3.0, modify=(), depend=("x",))])
    assert not ck.check_mutual_exclusion(h, POLICIES).passed
    soft = History([], [run(A, "i-1", 1, 0.0, 2.0, modify=("soft",)),
                        run(B, "i-2", 2, 1.0, 3.0, modify=(), depend=("soft",))])
    assert ck.check_mutual_exclusion(soft, POLICIES).passed


def test_depend_depend_and_same_agent_overlaps_are_allowed() -> None:
    h = History([], [run(A, "i-1", 1, 0.0, 2.0, modify=(), depend=("x",)),
                     run(B, "i-2", 2, 1.0, 3.0, modify=(), depend=("x",)),
                     run(A, "i-3", 3, 1.5, 2.5, modify=("y",))])
    assert ck.check_mutual_exclusion(h, POLICIES).passed


def test_touching_intervals_do_not_overlap_but_a_long_one_covering_a_later_start_does() -> None:
    h = History([], [run(A, "i-1", 1, 0.0, 1.0), run(B, "i-2", 2, 1.0, 2.0)])
    assert ck.check_mutual_exclusion(h, POLICIES).passed
    h2 = History([], [run(A, "i-1", 1, 0.0, 10.0), run(B, "i-2", 2, 1.0, 2.0), run(B, "i-3", 3, 8.0, 9.0)])
    r = ck.check_mutual_exclusion(h2, POLICIES)
    assert not r.passed and r.detail.startswith("2 overlapping")


# --- fencing tokens -------------------------------------------------------------------------------------


def test_fencing_tokens_pass_when_growing() -> None:
    r = ck.check_fencing_tokens(clean_history())
    assert r.passed, r.detail


def test_a_later_grant_with_a_smaller_token_fails() -> None:
    h = History([grant(A, "i-10", 10, 1.0, 1.1), grant(B, "i-8", 8, 2.0, 2.1)], [])
    r = ck.check_fencing_tokens(h)
    assert not r.passed and "i-8 granted token 8" in r.detail


def test_a_replan_must_raise_the_token_too() -> None:
    h = History([grant(A, "i-10", 10, 1.0, 1.1), grant(A, "i-10", 10, 2.0, 2.1, trigger="replan")], [])
    assert not ck.check_fencing_tokens(h).passed


def test_concurrent_grants_may_commit_in_either_order() -> None:
    # B asked before A's answer came back: real-time order does not constrain them.
    h = History([grant(A, "i-10", 10, 1.0, 2.0), grant(B, "i-8", 8, 1.5, 2.5)], [])
    assert ck.check_fencing_tokens(h).passed


def test_one_token_for_two_intents_fails() -> None:
    h = History([grant(A, "i-10", 10, 1.0, 1.1, modify=("x",)), grant(B, "i-11", 10, 5.0, 5.1, modify=("y",))], [])
    r = ck.check_fencing_tokens(h)
    assert not r.passed and "token 10 granted to both" in r.detail


# --- fail-closed bound ------------------------------------------------------------------------------------


def test_fail_closed_passes_with_steady_heartbeats() -> None:
    r = ck.check_fail_closed(clean_history())
    assert r.passed, r.detail


def test_a_late_stop_fails() -> None:
    # A's last confirmation was sent at 2.0; cut off after that, it kept running until 9.0 (F = 5).
    h = History([grant(A, "i-10", 10, 1.0, 1.1), hb(A, 2.0, 2.05), hb(A, 3.0, 8.0, "failed")],
                [run(A, "i-10", 10, 1.1, 9.0, ended_by="fail_closed")], fail_closed_s=5.0)
    r = ck.check_fail_closed(h)
    assert not r.passed and "7.00 s after its last quorum confirmation" in r.detail


def test_a_stop_just_within_the_bound_passes() -> None:
    h = History([grant(A, "i-10", 10, 1.0, 1.1), hb(A, 2.0, 2.05)],
                [run(A, "i-10", 10, 1.1, 7.2, ended_by="fail_closed")], fail_closed_s=5.0)
    assert ck.check_fail_closed(h).passed


def test_an_answer_counts_from_when_it_was_sent_and_only_once_it_arrived() -> None:
    # The heartbeat sent at 1.5 only arrived at 8.0: between 6.5 and 8.0 the shim could not know it.
    h = History([grant(A, "i-10", 10, 1.0, 1.1), hb(A, 1.5, 8.0)],
                [run(A, "i-10", 10, 1.1, 9.0)], fail_closed_s=5.0)
    assert not ck.check_fail_closed(h).passed


def test_running_without_any_confirmation_fails() -> None:
    h = History([], [run(A, "i-10", 10, 1.0, 2.0)], fail_closed_s=5.0)
    assert not ck.check_fail_closed(h).passed


# --- convergence -------------------------------------------------------------------------------------------


def test_convergence_passes_for_identical_replicas_and_a_final_write() -> None:
    d = dump_for(clean_history())
    r = ck.check_convergence({"n1": d, "n2": copy.deepcopy(d), "n3": copy.deepcopy(d)}, ["n1", "n2", "n3"], True,
                             "final write acknowledged")
    assert r.passed, r.detail


def test_diverged_replicas_fail_and_say_where() -> None:
    d = dump_for(clean_history())
    d2 = copy.deepcopy(d)
    d2["engine"]["intents"]["i-14"]["status"] = "lapsed"
    r = ck.check_convergence({"n1": d, "n2": d2}, ["n1", "n2"], True, "ok")
    assert not r.passed and "/engine/intents/i-14/status" in r.detail


def test_a_missing_replica_or_a_failed_final_write_fails() -> None:
    d = dump_for(clean_history())
    assert not ck.check_convergence({"n1": d}, ["n1", "n2"], True, "ok").passed
    r = ck.check_convergence({"n1": d}, ["n1"], False, "no quorum")
    assert not r.passed and "final write failed: no quorum" in r.detail


# --- leader recovery and progress ----------------------------------------------------------------------------


def test_leader_recovery() -> None:
    ok = [ck.LeaderLoss("isolate-leader", "n1", 1.2, 10.0)]
    assert ck.check_leader_recovery(ok, 10.0, 5.0).passed
    never = [ck.LeaderLoss("isolate-leader", "n1", None, 8.0)]
    assert not ck.check_leader_recovery(never, 10.0, 5.0).passed
    slow = [ck.LeaderLoss("kill", "n1", 12.0, 20.0)]
    assert not ck.check_leader_recovery(slow, 10.0, 5.0).passed
    short = [ck.LeaderLoss("pause", "n1", None, 0.5)]  # over before an election could finish
    assert ck.check_leader_recovery(short, 10.0, 5.0).passed


def test_rejoin() -> None:
    assert ck.check_rejoin(2.5, 10.0).passed
    assert not ck.check_rejoin(26.0, 10.0).passed
    assert not ck.check_rejoin(None, 10.0, "n3 behind").passed


def test_an_idle_history_is_not_a_pass() -> None:
    assert not ck.check_workload_progress(History([], [])).passed
    assert ck.check_workload_progress(clean_history()).passed


# --- recorder -----------------------------------------------------------------------------------------------


def test_recorder_keeps_runs_counts_and_bounds() -> None:
    rec = Recorder(5.0, max_ops=2)
    for i in range(3):
        rec.op(hb(A, float(i), float(i) + 0.1))
    rec.start_run(A, "i-1", 1, ["x"], [], 1.0)
    assert rec.running(A) and not rec.running(B)
    assert rec.end_run(A, 2.0, "complete") and not rec.end_run(A, 3.0, "complete")
    rec.start_run(B, "i-2", 2, ["y"], [], 4.0)
    rec.close_all(5.0)
    h = rec.history()
    assert len(h.ops) == 2 and rec.dropped_ops == 1 and h.counts()["ok"] == 2
    assert [(r.agent_id, r.end_s, r.ended_by) for r in h.runs] == [(A, 2.0, "complete"), (B, 5.0, "drill_end")]
    assert History.from_json(h.to_json()) == h


# --- pure helpers of the nemesis, the partitioner and the proxies ----------------------------------------


def test_partition_drops() -> None:
    d = partition_drops([["n1"], ["n2", "n3"]], None)
    assert d == {("n1", "n2"), ("n2", "n1"), ("n1", "n3"), ("n3", "n1")}
    d = partition_drops([["n1"], ["n2", "n3"]], ["n2", "n3"])
    assert (CLIENT, "n1") in d and ("n1", CLIENT) in d and (CLIENT, "n2") not in d


def test_schedules_are_seeded_and_cover_every_kind() -> None:
    ids = ["n1", "n2", "n3"]
    a = build_schedule(42, NEMESES, 200.0, ids)
    assert a == build_schedule(42, NEMESES, 200.0, ids)
    assert a != build_schedule(43, NEMESES, 200.0, ids)
    assert {f.kind for f in a} == set(NEMESES)
    ends = [(f.at_s, f.at_s + f.duration_s) for f in a]
    assert all(e1 <= s2 for (_, e1), (s2, _) in itertools.pairwise(ends))
    with pytest.raises(ValueError):
        build_schedule(1, ["nope"], 10.0, ids)


PROC_TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0B00007F:5209 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 100 1 0 100 0 0 10 0
   1: 0100007F:9C40 0C00007F:520A 01 00000000:00000000 00:00000000 00000000     0        0 201 1 0 20 4 30 10 -1
   2: 0100007F:9C41 0B00007F:5209 01 00000000:00000000 00:00000000 00000000     0        0 202 1 0 20 4 30 10 -1
   3: 0100007F:9C42 0B00007F:5209 02 00000000:00000000 00:00000000 00000000     0        0 203 1 0 20 4 30 10 -1
"""


def test_proc_tcp_parsing_and_classification() -> None:
    entries = parse_proc_tcp(PROC_TCP)
    assert entries[0] == TcpEntry(("127.0.0.11", 0x5209), ("0.0.0.0", 0), 0x0A, 100)
    listeners = {("127.0.0.11", 0x5209): "n1", ("127.0.0.12", 0x520A): "n2"}
    owners = {201: "n3", 202: "n3"}  # 203 (a SYN from another process) belongs to the client side
    fwd, rev = classify(entries, listeners, owners, frozenset({("n3", "n1"), ("n1", CLIENT)}))
    assert fwd == {("127.0.0.1", 0x9C40, "127.0.0.12", 0x520A), ("127.0.0.1", 0x9C42, "127.0.0.11", 0x5209)}
    assert rev == {("127.0.0.1", 0x9C40, "127.0.0.12", 0x520A), ("127.0.0.1", 0x9C41, "127.0.0.11", 0x5209)}


def test_proxy_names_and_streams() -> None:
    assert parse_proxy_name("raft-n3-n1") == LinkProxy("raft-n3-n1", "n3", "n1")
    assert parse_proxy_name("ssh-n2") == LinkProxy("ssh-n2", CLIENT, "n2")
    assert parse_proxy_name("postgres") is None
    lk = LinkProxy("raft-n3-n1", "n3", "n1")
    assert lk.streams_cut(frozenset({("n3", "n1")})) == {"upstream"}
    assert lk.streams_cut(frozenset({("n1", "n3")})) == {"downstream"}
