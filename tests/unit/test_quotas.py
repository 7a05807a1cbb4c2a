"""Per-developer work in flight (cluster/node/quotas.py ``InFlight``): its total is kept, not
summed, because the metrics scrape reads it from the HTTP thread."""

from __future__ import annotations

from tetherlab.cluster.node.quotas import InFlight


def test_in_flight_counts_per_key_and_in_total_and_never_below_zero() -> None:
    f = InFlight()
    assert f.try_acquire("alice", 2) and f.try_acquire("alice", 2) and not f.try_acquire("alice", 2)
    assert f.try_acquire("bob", 1)
    assert (f.of("alice"), f.of("bob"), f.total()) == (2, 1, 3)
    f.release("alice")
    f.release("carol")  # never acquired: changes nothing
    assert (f.of("alice"), f.total()) == (1, 2)
    f.release("alice")
    f.release("alice")  # one release too many: still nothing below zero
    f.release("bob")
    assert (f.of("alice"), f.of("bob"), f.total()) == (0, 0, 0)
    assert f._n == {}  # idle keys leave the map
