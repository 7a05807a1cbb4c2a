"""``tetherlab bench matching``: it fetches the pinned archives with pip and npm (cached in
.cache/matching, checked against their sha256), builds the code indexes, scores every labelled
plan, and fails when matching regresses below the targets. The archives come from PyPI and npm,
which CI reaches; the first run downloads them, later runs use the cache."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tetherlab.chaos.bench import matching as bench
from tetherlab.cluster.core.engine.codeindex import CodeIndex
from tetherlab.cluster.core.engine.matching import match_intent
from tetherlab.cluster.core.engine.model import IntentBody
from tetherlab.cluster.core.engine.registry import Registry
from tetherlab.cluster.core.exitcodes import EXIT_FAILED, EXIT_OK

pytestmark = pytest.mark.timeout(600)


def run(capsys: pytest.CaptureFixture[str], argv: list[str], matcher: bench.Matcher = bench.default_matcher,
        ) -> tuple[int, dict[str, Any]]:
    code = bench.main([*argv, "--json"], matcher=matcher)
    return code, json.loads(capsys.readouterr().out)


def test_a_bounded_run_reports_the_figures(capsys: pytest.CaptureFixture[str]) -> None:
    code, r = run(capsys, ["--limit", "8", "--no-check", "--worst", "3"])
    assert code == EXIT_OK
    for mode in ("plain", "explicit"):
        assert set(r[mode]) == {"rich", "tanstack-router-core", "overall"}
        overall = r[mode]["overall"]["all"]
        assert overall["plans"] == 16
        assert set(overall["modify"]) == {"precision", "recall", "f1"} and 0 <= overall["exact"] <= 1
        assert set(r[mode]["overall"]) == {"dev", "held_out", "all"}
    assert len(r["worst"]) <= 3 and r["targets"] == bench.TARGETS


def test_the_matcher_meets_the_targets_and_a_regression_is_caught(capsys: pytest.CaptureFixture[str]) -> None:
    code, r = run(capsys, [])
    assert code == EXIT_OK, r["missed"]

    def claims_everything_it_mentions(reg: Registry, body: IntentBody, idx: CodeIndex | None) -> dict[str, Any]:
        # A planted regression: every mention claimed as modify, the way the old matcher read
        # "wraps", "raises" and "uses".
        out = match_intent(reg, body, idx)
        out["modify"] = sorted(out["modify"] + out["depend"], key=lambda c: c["concept"])
        out["depend"] = []
        return out

    code, r = run(capsys, [], matcher=claims_everything_it_mentions)
    assert code == EXIT_FAILED
    assert any(m.startswith("plain.modify.precision") for m in r["missed"])


def test_a_corrupt_archive_in_the_cache_is_not_trusted(tmp_path: Any) -> None:
    cb = bench.load_codebase(bench.DATA_DIR / "rich")
    fake = tmp_path / cb.source["archive"]
    fake.write_bytes(b"not the archive")
    with pytest.raises(bench.FetchError, match="offline"):
        bench.fetch_archive(cb.source, tmp_path, offline=True)
