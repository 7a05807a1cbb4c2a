"""The node's garbage-collection policy (cluster/node/gcpolicy.py), on a fake ``gc`` and on the
real one in a child process."""

from __future__ import annotations

import gc
import itertools
import subprocess
import sys
import textwrap
from typing import Any

from tetherlab.cluster.node.gcpolicy import FREEZE_EVERY_S, THAW_EVERY_S, GcPauses, GcPolicy


class FakeGc:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def collect(self, generation: int = 2) -> int:
        self.calls.append(f"collect{generation}")
        return 0

    def freeze(self) -> None:
        self.calls.append("freeze")

    def unfreeze(self) -> None:
        self.calls.append("unfreeze")

    def isenabled(self) -> bool:
        return "disable" not in self.calls[-1:]

    def disable(self) -> None:
        self.calls.append("disable")

    def enable(self) -> None:
        self.calls.append("enable")


def test_paused_stops_automatic_collections_for_the_block_only() -> None:
    g = FakeGc()
    p = GcPolicy(g)
    with p.paused():
        assert g.calls == ["disable"]
    assert g.calls == ["disable", "enable"]
    g.calls.clear()
    try:
        with p.paused():
            raise ValueError("an apply that fails")
    except ValueError:
        pass
    assert g.calls == ["disable", "enable"]  # back on, whatever the block did
    g.calls = ["disable"]  # someone else had switched it off: it stays off
    with p.paused():
        pass
    assert g.calls == ["disable", "disable"]


def test_paused_on_the_real_collector() -> None:
    assert gc.isenabled()
    with GcPolicy().paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_collects_before_freezing_freezes_periodically_and_thaws_now_and_then() -> None:
    g = FakeGc()
    p = GcPolicy(g)
    p.start(1000.0)
    assert g.calls == ["collect2", "freeze"]  # garbage is freed, not frozen
    g.calls.clear()
    assert p.tick(1000.0 + FREEZE_EVERY_S / 2) is None and g.calls == []
    # Between thaws only the young generations are collected: a full collection would scan all
    # that was made since the last freeze (the pause this policy is for).
    assert p.tick(1000.0 + FREEZE_EVERY_S) == "freeze" and g.calls == ["collect1", "freeze"]
    g.calls.clear()
    now = 1000.0 + FREEZE_EVERY_S
    while now < 1000.0 + THAW_EVERY_S - FREEZE_EVERY_S:
        now += FREEZE_EVERY_S
        assert p.tick(now) == "freeze"
    g.calls.clear()
    assert p.tick(1000.0 + THAW_EVERY_S) == "thaw"
    assert g.calls == ["unfreeze", "collect2", "freeze"]  # what died frozen is freed within a thaw period
    assert p.tick(1000.0 + THAW_EVERY_S + FREEZE_EVERY_S / 2) is None


def test_the_node_asks_the_policy_often_enough_to_freeze_on_time() -> None:
    # A tick every FREEZE_EVERY_S would miss a freeze whenever the sleep woke a moment early,
    # doubling the interval (and the full collections between freezes, docs/performance.md).
    from tetherlab.cluster.node.process import GC_TICK_S

    assert GC_TICK_S <= FREEZE_EVERY_S / 2
    p, g = GcPolicy(FakeGc()), 0.0
    p.start(0.0)
    freezes = []
    while g < 30.0:
        g += GC_TICK_S * 0.999  # the event loop's sleeps may end a little early
        if p.tick(g) == "freeze":
            freezes.append(g)
    gaps = [b - a for a, b in itertools.pairwise(freezes)]
    assert max(gaps) < FREEZE_EVERY_S + GC_TICK_S


def test_on_the_real_collector_frozen_state_is_not_scanned_and_thawed_garbage_is_freed() -> None:
    code = textwrap.dedent("""
        import gc, time
        from tetherlab.cluster.node.gcpolicy import GcPolicy
        state = [{"i": i, "l": [i]} for i in range(300_000)]   # a large long-lived state
        def full():
            t = time.perf_counter(); gc.collect(); return time.perf_counter() - t
        before = min(full() for _ in range(3))
        p = GcPolicy()
        p.start(0.0)
        after = min(full() for _ in range(3))
        more = [{"i": i, "l": [i]} for i in range(300_000)]    # as much again, made after the start
        t = time.perf_counter(); p.tick(20.0); freeze_pause = time.perf_counter() - t
        class Node:
            pass
        a, b = Node(), Node()
        a.other, b.other = b, a                                # a cycle, frozen by the next freeze
        p.tick(1000.0)                                         # (a thaw first: 1000 s > THAW_EVERY_S)
        p.tick(1000.0 + 20.0)
        import weakref
        ref = weakref.ref(a)
        del a, b
        gc.collect()
        frozen_survived = ref() is not None                    # frozen: not collected
        p.tick(1000.0 + 20.0 + 900.0)                          # the thaw collects it
        print(before, after, frozen_survived, ref() is None, freeze_pause)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    before, after, frozen_survived, freed, freeze_pause = out.stdout.split()
    assert float(after) < float(before) / 5, (before, after)
    # The periodic freeze does not scan what was made since the last one (a full collect would).
    assert float(freeze_pause) < float(before) / 5, (before, freeze_pause)
    assert frozen_survived == "True" and freed == "True"


def test_every_collection_is_timed_by_generation() -> None:
    seen: list[tuple[int, float]] = []
    ticks = iter([1.0, 1.004, 2.0, 2.25])
    callbacks: list[Any] = []
    pauses = GcPauses(lambda g, s: seen.append((g, s)), callbacks=callbacks, clock=lambda: next(ticks))
    pauses.install()
    pauses.install()  # once only
    assert callbacks == [pauses]
    for cb in callbacks:
        cb("start", {"generation": 0})
        cb("stop", {"generation": 0, "collected": 3, "uncollectable": 0})
        cb("start", {"generation": 2})
        cb("stop", {"generation": 2, "collected": 0, "uncollectable": 0})
    assert [(g, round(s, 3)) for g, s in seen] == [(0, 0.004), (2, 0.25)]
    pauses.remove()
    pauses.remove()
    assert callbacks == []


def test_a_real_collection_reaches_the_observer() -> None:
    seen: list[int] = []
    pauses = GcPauses(lambda g, s: seen.append(g))
    pauses.install()
    try:
        gc.collect()
    finally:
        pauses.remove()
    assert 2 in seen and pauses not in gc.callbacks
