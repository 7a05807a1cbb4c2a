"""`tetherlab bench apply`: a bounded run prints its figures, and the leader's apply (taking the
commands it proposed) decodes nothing while the follower's decodes every entry."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tetherlab.chaos.bench import apply as bench_apply
from tetherlab.cluster.core import apply as core_apply


def test_a_bounded_run_prints_its_figures() -> None:
    p = subprocess.run([sys.executable, "-m", "tetherlab.cluster.cli", "bench", "apply", "--concepts", "100",
                        "--entries", "300", "--passes", "1", "--json"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["follower_us_per_entry"] > 0 and out["leader_us_per_entry"] > 0
    assert out["entries"] > 300  # the heartbeats come on top
    assert len(out["passes"]["leader_saved_pct"]) == 1
    assert "pass 1/1" in p.stderr  # progress


def test_only_the_follower_pass_decodes(monkeypatch: pytest.MonkeyPatch) -> None:
    log, setup = bench_apply.record(concepts=50, entries=200, seed=3)
    decodes = [0]
    real = core_apply.decode_engine_command

    def counting(obj: Any) -> Any:
        decodes[0] += 1
        return real(obj)

    monkeypatch.setattr(core_apply, "decode_engine_command", counting)
    bench_apply.apply_pass(log, setup, batch=70, as_leader=True)
    assert decodes[0] == setup  # the set-up entries only (applied as a follower would)
    decodes[0] = 0
    bench_apply.apply_pass(log, setup, batch=70, as_leader=False)
    assert decodes[0] == len(log)


def test_bad_sizes_are_refused_naming_the_flag() -> None:
    p = subprocess.run([sys.executable, "-m", "tetherlab.cluster.cli", "bench", "apply", "--passes", "0"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--passes must be at least 1" in p.stderr
