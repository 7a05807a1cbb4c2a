"""A local cluster's ports come from below the ephemeral range, so an outgoing connection cannot
take one between the probe that found it free and the node that binds it, and from a base no other
local cluster holds (two test processes start clusters side by side)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tetherlab.cluster.ops import localcluster
from tetherlab.cluster.ops.localcluster import free_base_port

NODES = 5  # the most any test starts


def test_every_port_of_a_probed_range_is_below_the_ephemeral_ports() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    highest = max(free_base_port(NODES) + 201 + NODES - 1 for _ in range(100))
    assert highest < low, f"port {highest} is in the ephemeral range ({low} up)"


# Two bases of their own, above every other test's (PORT_BASE_MAX) and below the ephemeral ports.
WINDOW = (32000, 32600)


def _bases(monkeypatch: pytest.MonkeyPatch, low: int = WINDOW[0], count: int = 2) -> None:
    """Only ``count`` bases from ``low`` are handed out."""
    monkeypatch.setattr(localcluster, "PORT_BASE_MIN", low)
    monkeypatch.setattr(localcluster, "PORT_BASE_MAX", low + count * localcluster.PORT_SPAN)


def test_a_base_another_process_holds_is_never_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """The defect this prevents: a test cluster whose nodes were all down for a restart had its
    ports free, another test process's probe took them, and its node could not listen."""
    _bases(monkeypatch)
    code = ("import sys\nfrom tetherlab.cluster.ops import localcluster as lc\n"
            f"lc.PORT_BASE_MIN, lc.PORT_BASE_MAX = {WINDOW}\n"
            "lease = lc.lease_base_port(3)\nprint(lease.base, flush=True)\nsys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        held = int(holder.stdout.readline())
        # Nothing listens on the held base's ports: a probe alone would hand it out.
        ours = localcluster.lease_base_port(3)
        try:
            assert ours.base != held
            with pytest.raises(RuntimeError, match="held by other local clusters"):
                localcluster.lease_base_port(3)
        finally:
            ours.release()
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
    # The holder is gone, and its lease with it.
    again = [localcluster.lease_base_port(3) for _ in range(2)]
    assert sorted(lease.base for lease in again) == list(range(*WINDOW, localcluster.PORT_SPAN))
    for lease in again:
        lease.release()


def test_a_local_cluster_holds_its_base_until_closed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _bases(monkeypatch, count=1)
    c = localcluster.LocalCluster(tmp_path / "c", nodes=3)  # not started: its ports are all free
    with pytest.raises(RuntimeError, match="no free port range"):
        localcluster.lease_base_port(3)
    c.close()
    localcluster.lease_base_port(3).release()


def test_bases_a_process_hands_out_by_number_stay_held_up_to_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(localcluster, "LEASES_KEPT", 1)
    first = free_base_port(3)
    with monkeypatch.context() as only_first:
        _bases(only_first, first, count=1)
        with pytest.raises(RuntimeError):
            free_base_port(3)  # still kept
    free_base_port(3)  # the first lapses
    _bases(monkeypatch, first, count=1)
    lease = localcluster.lease_base_port(3)
    assert lease.base == first
    lease.release()
