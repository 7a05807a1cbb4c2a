"""``tetherlab bench cluster`` at a tiny size: the machinery runs end to end (real cluster,
SSH load generators, bare pysyncobj, etcd when installed, a failover, the hook) and the JSON
has the shape the issue names. Timing is not checked: this machine is shared."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from tetherlab.chaos.bench.cluster import add_bench_cluster_args, bench_cluster, compare, summary

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

KEYS = ("saturation_verdicts_per_s", "p99_ms_at_500", "etcd_verdicts_per_s", "bare_commits_per_s",
        "ratio_vs_etcd", "ratio_vs_bare", "failover_s", "hook_p50_ms", "scale_ratio", "cpu_ms_per_verdict",
        "etcd_cpu_ms_per_verdict", "cpu_ratio_vs_etcd")


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_bench_cluster_args(p)
    return p.parse_args(argv)


def test_tiny_run_has_the_issue_keys() -> None:
    args = _args(["--workers", "1", "--developers", "2", "--agents", "6", "--concepts", "50",
                  "--rates", "20,500", "--warmup", "0.2", "--duration", "0.8", "--concurrency", "2",
                  "--failover-runs", "1", "--failover-rate", "20", "--hook-calls", "3", "--no-install",
                  "--no-scale", "--report-interval", "0.3"])
    out = bench_cluster(args)
    json.dumps(out)  # --json prints it as is
    for k in KEYS:
        assert k in out, k
    d = out["details"]
    assert out["saturation_verdicts_per_s"] and out["saturation_verdicts_per_s"] > 0
    assert out["p99_ms_at_500"] is not None
    # Bare pysyncobj (no pre-vote) may hold an election on a busy machine, and its 0.8 s
    # saturation window can then complete nothing: one of its two phases must have served.
    bare = d["bare"]
    assert isinstance(out["bare_commits_per_s"], int | float)
    assert max(bare["saturation"]["verdicts_per_s"], bare["offered"]["500"]["verdicts_per_s"]) > 0
    assert (out["ratio_vs_bare"] is not None) == (out["bare_commits_per_s"] > 0)
    tl = d["tetherlab"]
    for phase in [*tl["offered"].values(), tl["saturation"]]:
        assert set(phase) >= {"verdicts_per_s", "p50_ms", "p99_ms", "p999_ms", "heartbeats_per_s", "rss_mb",
                              "reports_per_s", "reports_unchanged_per_s"}
        # A report may race its own agent's completion (not_active, intent_mismatch): nothing else.
        bad = {k: v for k, v in phase["errors"].items()
               if k not in ("report:not_active", "report:intent_mismatch", "report:no_active_intent")}
        assert not bad, phase["errors"]
        # Every verdict answered in the phase, warm-up included, in the second it was answered.
        assert len(phase["verdicts_by_second"]) >= 1  # 0.2 + 0.8 s, and any answered later
        assert sum(phase["verdicts_by_second"]) >= sum(phase["actions"].values())
    assert sum(ph["reports_per_s"] for ph in [*tl["offered"].values(), tl["saturation"]]) > 0
    assert all(ph["server_cpu_ms_per_verdict"] > 0 for ph in [*tl["offered"].values(), tl["saturation"]])
    assert out["cpu_ms_per_verdict"] == tl["saturation"]["server_cpu_ms_per_verdict"]
    assert all(ph["client_cpu_ms_per_verdict"] > 0 for ph in [*tl["offered"].values(), tl["saturation"]])
    assert out["client_cpu_ms_per_verdict"] == tl["saturation"]["client_cpu_ms_per_verdict"]
    assert len(tl["rss_mb"]) == 3
    fo = d["failover"]["runs"][0]
    assert fo["to_new_leader_s"] is not None and fo["to_first_verdict_s"] is not None
    assert out["failover_s"] == d["failover"]["median_to_first_verdict_s"]
    if "skipped" in d["etcd"]:
        assert out["etcd_verdicts_per_s"] is None
    else:
        assert out["etcd_verdicts_per_s"] and out["ratio_vs_etcd"] is not None
    assert d["hook"]["calls"] == 3 and out["hook_p50_ms"] is not None
    assert set(out["targets"]) >= {"saturation_verdicts_per_s", "failover_s", "hook_p50_ms"}
    probes = d["machine"]["host_loop_ms"]  # the host's speed on each core, before each phase and at the end
    assert set(probes) == {"before_tetherlab", "before_etcd", "at_end"}
    every = [ms for per_core in probes.values() for ms in per_core]
    assert all(len(per_core) == os.cpu_count() for per_core in probes.values()) and min(every) > 0
    assert out["host_loop_ms_min"] == min(every) and out["host_loop_ms_max"] == max(every)


def test_scale_ratio_and_compare() -> None:
    """scale_ratio is scale saturation over small saturation; --compare prints each figure's change
    and whether the target is met (pure: no cluster)."""
    details = {"tetherlab": {"saturation": {"verdicts_per_s": 1000.0, "server_cpu_ms_per_verdict": 1.5},
                             "offered": {"500": {"p99_ms": 20.0}}},
               "scale": {"saturation": {"verdicts_per_s": 850.0}, "offered": {"p99_ms": 30.0}},
               "etcd": {"saturation": {"verdicts_per_s": 500.0, "server_cpu_ms_per_verdict": 1.2}}}
    after = {**summary(details), "details": details}
    assert after["scale_ratio"] == 0.85 and after["ratio_vs_etcd"] == 2.0
    assert after["cpu_ratio_vs_etcd"] == 0.8
    assert after["targets"]["scale_ratio"]["met"] is True
    before = {**after, "saturation_verdicts_per_s": 500.0, "scale_ratio": 0.5}
    text = compare(before, after)
    sat = next(line for line in text.splitlines() if "saturation_verdicts_per_s" in line)
    assert "+500 (+100%)" in sat
    ratio = next(line for line in text.splitlines() if line.strip().startswith("scale_ratio"))
    assert "target met" in ratio
    assert "details" not in text
    worse = compare(after, {**after, "p99_ms_at_500": 40.0})
    assert "target <= 25.0 missed" in next(x for x in worse.splitlines() if "p99_ms_at_500" in x)
