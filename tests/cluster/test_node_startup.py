"""A node that cannot listen on one of its addresses refuses to start, naming the address and
why, instead of running deaf (a taken Raft port: it said "serving" and never heard its peers) or
dying with a traceback (a taken SSH or HTTP port)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tetherlab.cluster.ops.layout import init_cluster
from tetherlab.cluster.ops.localcluster import free_base_port

pytestmark = pytest.mark.slow
START_BOUND_S = 60  # pysyncobj's bind retries take about 5 s; a busy machine may take longer


@pytest.mark.parametrize(("what", "offset"), [("Raft address", 1), ("SSH address", 101), ("HTTP address", 201)])
def test_a_taken_port_stops_the_node_with_a_clear_error(tmp_path: Path, what: str, offset: int) -> None:
    base = free_base_port(1)
    init_cluster(tmp_path / "c", 1, "127.0.0.1", base)
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", base + offset))
        squatter.listen()
        p = subprocess.run([sys.executable, "-m", "tetherlab.cluster.cli", "master", "--config",
                            str(tmp_path / "c" / "n1" / "node.toml")], capture_output=True, timeout=START_BOUND_S)
    err = p.stderr.decode()
    assert p.returncode == 1, err
    assert f"cannot listen on the {what} 127.0.0.1:{base + offset}: Address already in use" in err, err
    assert "Traceback" not in err, err
