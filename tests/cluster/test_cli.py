"""The CLI as users run it: `tetherlab up` in the foreground, `tetherlab status --json`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tetherlab.cluster.localcluster import free_base_port

pytestmark = pytest.mark.slow
TETHERLAB = [sys.executable, "-m", "tetherlab.cluster.cli"]


def status(directory: Path) -> tuple[int, dict]:
    p = subprocess.run([*TETHERLAB, "status", "--dir", str(directory), "--json"], capture_output=True, timeout=30)
    return p.returncode, json.loads(p.stdout) if p.stdout else {}


@pytest.mark.parametrize("nodes", [3, 1])
def test_up_runs_a_cluster_that_status_reports_and_ctrl_c_stops(tmp_path: Path, nodes: int) -> None:
    d = tmp_path / "c"
    base = free_base_port(nodes)
    up = subprocess.Popen([*TETHERLAB, "up", "--nodes", str(nodes), "--dir", str(d), "--base-port", str(base)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        st: dict = {}
        while time.monotonic() < deadline:
            code, st = status(d) if (d / "cluster.toml").exists() else (3, {})
            if code == 0 and st.get("leader") and len({n["commit_index"] for n in st["nodes"]}) == 1:
                break
            time.sleep(0.3)
        assert st.get("leader"), st
        assert len(st["nodes"]) == nodes
        for n in st["nodes"]:
            assert set(n) == {"id", "role", "term", "commit_index", "applied_index", "raft", "ssh", "http"}
            assert n["role"] in ("leader", "follower")
        assert len({n["commit_index"] for n in st["nodes"]}) == 1
        assert [n["role"] for n in st["nodes"]].count("leader") == 1
        assert (d / "cluster.toml").exists()
        assert oct((d / "cluster.secret").stat().st_mode & 0o777) == "0o600"
    finally:
        os.killpg(up.pid, signal.SIGINT)
        out, _ = up.communicate(timeout=30)
    text = out.decode()
    assert "leader:" in text and "all nodes stopped" in text, text
    assert up.returncode == 0
    code, st = status(d)
    assert code == 3 and all(n["role"] == "unreachable" for n in st["nodes"])


def test_status_without_a_cluster_file_is_a_usage_error(tmp_path: Path) -> None:
    p = subprocess.run([*TETHERLAB, "status", "--dir", str(tmp_path)], capture_output=True, timeout=30)
    assert p.returncode == 2
    assert b"cluster.toml" in p.stderr


def test_init_refuses_an_initialised_directory(tmp_path: Path) -> None:
    args = [*TETHERLAB, "init", "--dir", str(tmp_path / "c"), "--base-port", str(free_base_port(3))]
    assert subprocess.run(args, capture_output=True, timeout=30).returncode == 0
    p = subprocess.run(args, capture_output=True, timeout=30)
    assert p.returncode == 2 and b"initialised already" in p.stderr
