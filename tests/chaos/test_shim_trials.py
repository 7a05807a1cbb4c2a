"""chaos/shim_trials.py keeps working: one revert and one SIGTERM trial (the 50- and 20-trial
runs are measurements, run by hand: see the module's docstring)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("git") is None or shutil.which("ssh-keygen") is None,
                                                   reason="needs git and ssh-keygen")]


@pytest.mark.parametrize("kind", ["revert", "sigterm"])
def test_one_trial_meets_its_goal(kind: str) -> None:
    r = subprocess.run([sys.executable, "-m", "tetherlab.chaos.shim_trials", kind, "--trials", "1", "--json"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["summary"]["met_goal"] == 1, out
