"""The engine benchmark runs and reports its figures (a small size: the real run is manual)."""

from __future__ import annotations

from tetherlab.chaos.bench.engine import run_bench


def test_bench_reports_its_figures() -> None:
    r = run_bench(concepts=600, active_intents=200, verdicts=300, seed=3)
    assert set(r) >= {"verdicts_per_s", "p99_us", "concepts", "active_intents"}
    assert r["concepts"] == 600 and r["active_intents"] == 200
    assert r["verdicts_per_s"] > 0 and r["p99_us"] > 0
    assert "error" not in "".join(r["actions"])
