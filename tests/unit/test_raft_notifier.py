"""The tick thread's wake-up pipe is written once per burst of proposals, and never skipped when
no wake-up is pending (a skipped one would leave a proposal waiting for the next poll timeout)."""

from __future__ import annotations

import os

from pysyncobj.poller import createPoller

from tetherlab.cluster.replica.raft import CoalescingNotifier, compaction_stagger


def _pending_bytes(n: CoalescingNotifier) -> int:
    r = n._PipeNotifier__pipeR  # type: ignore[attr-defined]
    try:
        return len(os.read(r, 4096))
    except BlockingIOError:
        return 0


def test_a_burst_writes_the_pipe_once() -> None:
    poller = createPoller("select")
    n = CoalescingNotifier(poller)
    for _ in range(100):
        n.notify()
    assert _pending_bytes(n) == 1


def test_a_notify_after_the_tick_drained_the_pipe_writes_again() -> None:
    poller = createPoller("select")
    n = CoalescingNotifier(poller)
    n.notify()
    poller.poll(0.0)  # the tick thread's poll: drains the pipe, then re-arms
    assert _pending_bytes(n) == 0
    n.notify()
    assert _pending_bytes(n) == 1, "a proposal after the drain must wake the tick thread again"


def test_members_snapshot_at_different_log_lengths() -> None:
    """Staggered compaction thresholds: fixed per node id, under a quarter more, none for the
    small thresholds tests and the simulator use."""
    extra = {n: compaction_stagger(n, 20_000) for n in ("n1", "n2", "n3")}
    assert len(set(extra.values())) == 3 and all(0 <= e < 5000 for e in extra.values())
    assert extra == {n: compaction_stagger(n, 20_000) for n in ("n1", "n2", "n3")}
    assert compaction_stagger("n1", 40) == 0
