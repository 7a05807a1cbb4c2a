"""`tetherlab demo --agents real --json`: the seed walkthrough with the real Claude Code (Alice,
Carol) and OpenCode (Bob) against the scripted model, and what each agent saw."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tetherlab.cluster.ops.localcluster import LocalCluster

from .harness import needs_agents

pytestmark = [pytest.mark.slow, pytest.mark.agents, needs_agents, pytest.mark.timeout(300)]


def test_real_agents_walkthrough_alice_continue_bob_stop_carol_continue(tmp_path: Path) -> None:
    LocalCluster(tmp_path / "c", nodes=3)  # initialise on free ports; the demo starts the nodes itself
    p = subprocess.run([sys.executable, "-m", "tetherlab.cluster.cli", "demo", "--agents", "real", "--dir",
                        str(tmp_path / "c"), "--json"], capture_output=True, timeout=280)
    assert p.returncode == 0, p.stderr.decode()[-6000:]
    out = json.loads(p.stdout)
    assert out["exit"] == {"alice": 0, "bob": 4, "carol": 0}
    assert out["alice"]["action"] == "continue"
    assert out["bob"]["action"] == "stop"
    conflict = out["bob"]["conflicts"][0]
    assert conflict["concept"] == "auth.session-store-contract" and conflict["holder_agent_id"].startswith("alice/")
    assert out["carol"]["action"] == "continue"
    saw = out["saw"]
    # The world slice reached Claude's context through ExitPlanMode's hook; Carol's holds billing only.
    assert "auth.session-store-contract" in saw["alice"]["world_slice_concepts"]
    assert saw["carol"]["world_slice_concepts"] and all(c.startswith("billing.") for c in
                                                        saw["carol"]["world_slice_concepts"])
    assert [r["error"] for r in saw["carol"]["tool_results"]] == [False, False]  # plan approved, file written
    assert any("print your plan before editing" in line for line in saw["bob"]["tether_said"])
