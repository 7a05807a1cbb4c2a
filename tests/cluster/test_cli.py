"""The CLI as users run it: `tetherlab up` in the foreground, `tetherlab status --json`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tetherlab.cluster.ops.localcluster import free_base_port

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


def test_killing_the_leader_under_up_fails_over_and_the_node_comes_back(tmp_path: Path) -> None:
    """`make up` demonstrates failover: the others keep running, a new leader is shown, and the
    killed node is restarted after a short delay (said on screen)."""
    d = tmp_path / "c"
    up = subprocess.Popen([*TETHERLAB, "up", "--nodes", "3", "--dir", str(d), "--base-port", str(free_base_port(3))],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(up.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()

    def wait_for(pred: object, timeout_s: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout_s
        st: dict = {}
        while time.monotonic() < deadline:
            _, st = status(d) if (d / "cluster.toml").exists() else (3, {})
            if pred(st):  # type: ignore[operator]
                return st
            time.sleep(0.3)
        raise AssertionError(f"timed out; status {st}; output:\n{''.join(lines)}")

    try:
        st = wait_for(lambda s: bool(s.get("leader")))
        old = st["leader"]
        pids = {m.group(1): int(m.group(2)) for m in (re.search(r"started (n\d) \(pid (\d+)\)", ln) for ln in lines)
                if m}
        os.kill(pids[old], signal.SIGKILL)  # a child of the `up` we started, by the PID it printed
        st = wait_for(lambda s: s.get("leader") not in (None, old))
        assert sum(n["role"] != "unreachable" for n in st["nodes"]) >= 2
        wait_for(lambda s: all(n["role"] in ("leader", "follower") for n in s.get("nodes", [])))
        text = "".join(lines)
        assert re.search(rf"node {old} \(pid {pids[old]}\) exited with status -9; restarting it in \d+ s", text), text
        assert f"restarted {old} (pid " in text and f"leader: {st['leader']}" in text, text
        assert up.poll() is None  # `up` itself kept running
    finally:
        os.killpg(up.pid, signal.SIGINT)
        up.wait(timeout=30)
    assert up.returncode == 0
