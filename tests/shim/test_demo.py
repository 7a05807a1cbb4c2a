"""`tetherlab demo --json`: the seed walkthrough through real tether processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("git") is None, reason="needs git")]


def test_demo_shows_alice_continue_bob_stop_carol_continue(tmp_path: Path) -> None:
    from tetherlab.cluster.ops.localcluster import LocalCluster

    LocalCluster(tmp_path / "c", nodes=3)  # initialise on free ports; the demo starts the nodes itself
    p = subprocess.run([sys.executable, "-m", "tetherlab.cluster.cli", "demo", "--dir", str(tmp_path / "c"), "--json"],
                       capture_output=True, timeout=240)
    assert p.returncode == 0, p.stderr.decode()
    out = json.loads(p.stdout)
    assert out["alice"]["action"] == "continue"
    assert out["bob"]["action"] == "stop"
    conflict = out["bob"]["conflicts"][0]
    assert conflict["concept"] == "auth.session-store-contract"
    assert conflict["holder_agent_id"].startswith("alice/")
    assert conflict["holder_summary"] == "Refactor auth layer to use JWT instead of session cookies"
    assert out["carol"]["action"] == "continue"
    carol_world = out["world"]["carol"]
    assert carol_world and all(c.startswith("billing.") for c in carol_world)
