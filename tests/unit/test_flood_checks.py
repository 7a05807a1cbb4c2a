"""The flood drill's verdict (``chaos/flood.py``: ``judge`` and its helpers) on synthetic
observations: each check passes a healthy phase and fails the bug it is there to catch."""

from __future__ import annotations

from typing import Any

import pytest

from tetherlab.chaos.flood import (
    Bounds,
    Sample,
    _phases,
    judge,
    leader_changes,
    quorum_lost_max_s,
    write_window,
)

BOUNDS = Bounds(quorum_lost_s=5.0, write_stall_s=10.0, rss_growth_mib=32.0)
NODES = ("n1", "n2", "n3")


def healthy(t0: float = 0.0, t1: float = 20.0, leader: str | None = "n1", rss_kib: int = 100_000) -> list[Sample]:
    out = []
    t = t0
    while t <= t1:
        out.append(Sample(t, leader, dict.fromkeys(NODES, rss_kib), dict.fromkeys(NODES, True)))
        t += 0.2
    return out


def verdict(samples: list[Sample], acks: list[float] | None = None, attack: dict[str, Any] | None = None,
            name: str = "raft-idle", bounds: Bounds = BOUNDS) -> dict[str, dict[str, Any]]:
    acks = [i * 0.05 for i in range(400)] if acks is None else acks
    w = write_window(acks, 0.0, 20.0)
    checks, _ = judge(name, samples, 0.0, 20.0, dict.fromkeys(NODES, 100_000), {"ops_per_s": 20.0}, w, w,
                      attack or {}, bounds)
    return checks


def failed(checks: dict[str, dict[str, Any]]) -> set[str]:
    return {k for k, v in checks.items() if not v["passed"]}


def test_a_healthy_phase_passes_every_check() -> None:
    assert failed(verdict(healthy())) == set()


def test_quorum_lost_for_longer_than_the_bound_fails() -> None:
    samples = healthy()
    for s in samples:
        if 3.0 <= s.at <= 9.5:
            s.quorum_leader = None
    assert failed(verdict(samples)) == {"quorum"}
    assert quorum_lost_max_s(samples, 0.0, 20.0) == pytest.approx(6.6, abs=0.3)
    # A short election is not a loss.
    samples = healthy()
    for s in samples:
        if 3.0 <= s.at <= 4.0:
            s.quorum_leader = None
    assert failed(verdict(samples)) == set()


def test_quorum_lost_until_the_end_counts_to_the_end() -> None:
    samples = healthy()
    for s in samples:
        if s.at >= 14.0:
            s.quorum_leader = None
    assert quorum_lost_max_s(samples, 0.0, 20.0) == pytest.approx(6.0, abs=0.3)


def test_a_write_stall_fails_including_one_from_the_start() -> None:
    acks = [i * 0.05 for i in range(60)] + [15.0 + i * 0.05 for i in range(60)]  # nothing from 3 s to 15 s
    assert failed(verdict(healthy(), acks)) == {"writes"}
    assert write_window(acks, 0.0, 20.0)["max_gap_s"] == pytest.approx(12.05, abs=0.01)
    assert failed(verdict(healthy(), [11.0, 11.5])) == {"writes"}  # silent for the first 11 s
    assert write_window([], 0.0, 20.0) == {"ops": 0, "ops_per_s": 0.0, "max_gap_s": 20.0}


def test_a_dead_node_fails() -> None:
    samples = healthy()
    for s in samples[40:]:
        s.alive["n2"] = False
        s.rss_kib.pop("n2")
    checks = verdict(samples)
    assert failed(checks) == {"nodes_alive"} and "n2" in checks["nodes_alive"]["detail"]


def test_memory_growth_over_the_bound_fails() -> None:
    samples = healthy()
    samples[50].rss_kib["n3"] = 100_000 + 40 * 1024
    checks = verdict(samples)
    assert failed(checks) == {"memory"} and "'n3': 40.0" in checks["memory"]["detail"]


def test_an_attack_that_did_not_run_fails() -> None:
    assert failed(verdict(healthy(), attack={"error": "the attacker sent no result"})) == {"attack_ran"}
    partial = {"budget_sent_to_every_port": False}
    assert failed(verdict(healthy(), attack=partial, name="raft-random")) == {"flood_volume"}


def test_refusals_that_do_not_name_the_limit_fail() -> None:
    good = {"refusal_messages": {"quota_exceeded": "... [limits].sessions_per_developer = 10 ..."}}
    assert failed(verdict(healthy(), attack=good, name="abuse")) == set()
    bad = {"refusal_messages": {"rate_limited": "slow down"}}
    assert failed(verdict(healthy(), attack=bad, name="abuse")) == {"refusals_name_the_limit"}


def test_throughput_is_a_check_only_when_asked() -> None:
    slow = [i * 0.5 for i in range(40)]  # 2 ops/s against a baseline of 20
    assert failed(verdict(healthy(), slow)) == set()
    asked = Bounds(5.0, 10.0, 32.0, min_throughput_ratio=0.5)
    assert failed(verdict(healthy(), slow, bounds=asked)) == {"throughput"}


def test_leader_changes_are_counted_and_phases_are_validated() -> None:
    samples = healthy()
    for s in samples[30:]:
        s.quorum_leader = "n2"
    assert leader_changes(samples) == 1
    assert _phases("http,raft-idle") == ["http", "raft-idle"]
    with pytest.raises(ValueError, match="raft-idl"):
        _phases("raft-idl")
