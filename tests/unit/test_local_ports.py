"""A local cluster's ports come from below the ephemeral range, so an outgoing connection cannot
take one between the probe that found it free and the node that binds it (two test processes
start clusters side by side)."""

from __future__ import annotations

from pathlib import Path

from tetherlab.cluster.ops.localcluster import free_base_port

NODES = 5  # the most any test starts


def test_every_port_of_a_probed_range_is_below_the_ephemeral_ports() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    highest = max(free_base_port(NODES) + 201 + NODES - 1 for _ in range(100))
    assert highest < low, f"port {highest} is in the ephemeral range ({low} up)"
