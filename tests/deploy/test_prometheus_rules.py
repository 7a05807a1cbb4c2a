"""deploy/prometheus and deploy/grafana: promtool accepts the config and rules, the rule unit tests pass,
and the dashboard and alerts only use metric names that nodes export (docs/metrics.md documents them all).

The project has no YAML library among its dependencies, so the few facts read from the YAML files here
come from small line-based readers of the rule-file shape; promtool does the real parsing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
CONFIG = PROM_DIR / "prometheus.yml"
ALERTS = PROM_DIR / "alerts.yml"
ALERTS_TEST = PROM_DIR / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "tetherlab-dashboard.json"
METRICS_DOC = ROOT / "docs" / "metrics.md"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package `prometheus`; `make test` installs it)"
)

# What a node exports (cluster/metrics.py): name -> type. Histograms export _bucket, _sum and _count.
TETHERLAB_METRICS: dict[str, str] = {
    "tetherlab_has_leader": "gauge",
    "tetherlab_is_leader": "gauge",
    "tetherlab_has_quorum": "gauge",
    "tetherlab_raft_term": "gauge",
    "tetherlab_raft_commit_index": "gauge",
    "tetherlab_raft_applied_index": "gauge",
    "tetherlab_leader_changes_seen_total": "counter",
    "tetherlab_proposals_committed_total": "counter",
    "tetherlab_proposals_applied_total": "counter",
    "tetherlab_proposals_failed_total": "counter",
    "tetherlab_proposals_pending": "gauge",
    "tetherlab_journal_fsync_duration_seconds": "histogram",
    "tetherlab_apply_duration_seconds": "histogram",
    "tetherlab_snapshots_taken_total": "counter",
    "tetherlab_snapshots_installed_total": "counter",
    "tetherlab_peer_connected": "gauge",
    "tetherlab_peer_round_trip_time_seconds": "histogram",
    "tetherlab_lmdb_file_size_bytes": "gauge",
    "tetherlab_lmdb_used_bytes": "gauge",
    "tetherlab_lmdb_map_size_bytes": "gauge",
    "tetherlab_active_intents": "gauge",
    "tetherlab_open_sessions": "gauge",
    "tetherlab_verdicts_total": "counter",
    "tetherlab_conflicts_total": "counter",
    "tetherlab_verdict_duration_seconds": "histogram",
    "tetherlab_sessions_expired_total": "counter",
    "tetherlab_shims_failing_closed": "gauge",
    "tetherlab_ssh_connections": "gauge",
    "tetherlab_ssh_auth_failures_total": "counter",
    "tetherlab_ssh_redirects_total": "counter",
    "tetherlab_protocol_errors_total": "counter",
    "tetherlab_build_info": "gauge",
    # Hostile load and quotas (docs/hardening.md).
    "tetherlab_raft_unauthenticated_connections": "gauge",
    "tetherlab_raft_strangers_dropped_total": "counter",
    "tetherlab_raft_read_slices_cut_total": "counter",
    "tetherlab_ssh_unauthenticated_connections": "gauge",
    "tetherlab_ssh_connections_closed_by_limit_total": "counter",
    "tetherlab_ssh_backpressure_pauses_total": "counter",
    "tetherlab_quota_limit": "gauge",
    "tetherlab_quota_refusals_total": "counter",
    "tetherlab_intents_in_flight": "gauge",
    "tetherlab_http_connections": "gauge",
    "tetherlab_http_requests_total": "counter",
    "tetherlab_http_connections_closed_by_limit_total": "counter",
}

EXPECTED_ALERTS = {
    "TetherlabNoLeader",
    "TetherlabQuorumLost",
    "TetherlabFrequentLeaderChanges",
    "TetherlabHighFsyncDurations",
    "TetherlabHighApplyDurations",
    "TetherlabHighProposalFailures",
    "TetherlabNodeUnreachable",
    "TetherlabShimsFailingClosed",
    "TetherlabHighPeerRTT",
    "TetherlabLMDBNearlyFull",
}

_PROMQL_WORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "inf", "nan",
}


def _series_name_ok(name: str) -> bool:
    if name == "up" or name.startswith("process_"):
        return True
    if name in TETHERLAB_METRICS:
        return True
    base, _, suffix = name.rpartition("_")
    return TETHERLAB_METRICS.get(base) == "histogram" and suffix in ("bucket", "sum", "count")


def metric_names(expr: str) -> set[str]:
    """Series names a PromQL expression selects (a small lexer: enough for the expressions in this repo)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # string literals
    s = re.sub(r"\{[^{}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\[\]]*\]", " ", s)  # range and subquery durations
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", s)  # label lists
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", s):
        word = m.group(0)
        if word.lower() in _PROMQL_WORDS or re.match(r"\s*\(", s[m.end():]):  # keyword or function call
            continue
        names.add(word)
    return names


def test_metric_name_lexer_finds_series_and_skips_functions_labels_and_durations() -> None:
    expr = ('histogram_quantile(0.99, sum by (instance, le) (rate(a_bucket{instance=~"$instance", x="up"}'
            '[$__rate_interval]))) > 0.5 and on (job) b offset 5m or vector(0) unless c[5m:1m]')
    assert metric_names(expr) == {"a_bucket", "b", "c"}


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@needs_promtool
def test_promtool_check_config_accepts_the_scrape_config() -> None:
    p = _promtool("check", "config", str(CONFIG.relative_to(ROOT)))
    assert p.returncode == 0, p.stdout + p.stderr


@needs_promtool
def test_promtool_check_rules_accepts_the_alert_rules() -> None:
    p = _promtool("check", "rules", str(ALERTS.relative_to(ROOT)))
    assert p.returncode == 0, p.stdout + p.stderr


@needs_promtool
def test_promtool_unit_tests_for_the_alert_rules_pass() -> None:
    p = _promtool("test", "rules", str(ALERTS_TEST.relative_to(ROOT)))
    assert p.returncode == 0, p.stdout + p.stderr


@needs_promtool
def test_scrape_config_lists_three_nodes_and_loads_the_alerts() -> None:
    text = re.sub(r"#.*", "", CONFIG.read_text())  # the comments show examples for real hosts
    targets = [t.strip().strip('"') for group in re.findall(r"targets:\s*\[([^\]]*)\]", text) for t in group.split(",")]
    assert targets == ["127.0.0.1:7301", "127.0.0.1:7302", "127.0.0.1:7303"]
    assert re.search(r"^\s*- job_name:\s*tetherlab\s*$", text, flags=re.MULTILINE)
    p = _promtool("check", "config", str(CONFIG.relative_to(ROOT)))
    assert "alerts.yml" in p.stdout and "1 rule files found" in p.stdout, p.stdout + p.stderr


def _field(block: str, key: str) -> str | None:
    """The value of `key:` in a YAML block: inline, or a block scalar (| or >) made of the deeper-indented lines."""
    m = re.search(rf"^( *){key}:[ ]*(.*)$", block, flags=re.MULTILINE)
    if m is None:
        return None
    indent, value = len(m.group(1)), m.group(2).strip()
    if not value.startswith(("|", ">")):
        return value.strip("'\"")
    lines = []
    for line in block[m.end() + 1:].splitlines():
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        lines.append(line.strip())
    return "\n".join(lines).strip()


def _alert_rules() -> list[dict[str, str | None]]:
    rules = []
    for block in re.split(r"^ *- alert: *", ALERTS.read_text(), flags=re.MULTILINE)[1:]:
        name = block.splitlines()[0].strip()
        rules.append({"alert": name, **{k: _field(block, k) for k in (
            "expr", "severity", "summary", "description", "runbook_url")}})
    return rules


def _alert_test_cases() -> list[tuple[str, bool]]:
    """(alertname, expects it firing) for every alert_rule_test case in alerts_test.yml."""
    text = ALERTS_TEST.read_text()
    cases = []
    for m in re.finditer(r"alertname:\s*(\w+)(.*?)(?=alertname:|\Z)", text, flags=re.DOTALL):
        exp = re.search(r"exp_alerts:\s*(\S+)", m.group(2))
        cases.append((m.group(1), exp is not None and exp.group(1).startswith("-")))
    return cases


def test_every_alert_has_severity_summary_description_runbook_and_unit_tests() -> None:
    rules = _alert_rules()
    assert {r["alert"] for r in rules} == EXPECTED_ALERTS
    cases = _alert_test_cases()
    assert len(cases) >= 2 * len(EXPECTED_ALERTS)
    for r in rules:
        name = r["alert"]
        assert r["severity"] in ("critical", "warning"), name
        assert r["summary"] and r["description"] and r["expr"], name
        assert r["runbook_url"] == f"docs/runbooks.md#{str(name).lower()}", name
        assert (name, True) in cases, f"{name}: no test case where it fires"
        assert (name, False) in cases, f"{name}: no test case where it stays silent"


def test_alert_expressions_use_only_exported_metrics() -> None:
    for r in _alert_rules():
        unknown = {n for n in metric_names(str(r["expr"])) if not _series_name_ok(n)}
        assert not unknown, f"{r['alert']}: unknown metrics {sorted(unknown)}"


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # panels inside collapsed rows
    return out


def _dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in _panels(dashboard) for t in p.get("targets", [])]


def test_dashboard_parses_and_uses_the_datasource_and_instance_variables() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["instance"]["type"] == "query"
    assert variables["instance"]["datasource"]["uid"] == "${DS_PROMETHEUS}"
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in _panels(dashboard):
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
            assert '$instance"' in t["expr"], f"{p['title']}: not filtered by $instance: {t['expr']}"


def test_dashboard_expressions_use_only_exported_metrics_and_cover_them_all() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    seen = set()
    for title, expr in _dashboard_exprs(dashboard):
        names = metric_names(expr)
        unknown = {n for n in names if not _series_name_ok(n)}
        assert not unknown, f"panel {title!r}: unknown metrics {sorted(unknown)} in {expr}"
        seen |= {re.sub(r"_(bucket|sum|count)$", "", n) if n not in TETHERLAB_METRICS else n for n in names}
    missing = set(TETHERLAB_METRICS) - seen
    assert not missing, f"metrics with no dashboard panel: {sorted(missing)}"


@needs_promtool
def test_dashboard_expressions_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every panel query (Grafana's variables replaced by plausible values)."""
    dashboard = json.loads(DASHBOARD.read_text())
    rules = []
    for i, (_, expr) in enumerate(_dashboard_exprs(dashboard)):
        concrete = expr.replace("$__rate_interval", "1m").replace("$instance", ".+")
        assert "$" not in concrete, f"unhandled Grafana variable in {expr}"
        rules.append({"record": f"tetherlab_dashboard:panel_{i}", "expr": concrete})
    path = tmp_path / "dashboard_rules.yml"  # JSON is YAML
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    p = _promtool("check", "rules", str(path))
    assert p.returncode == 0, p.stdout + p.stderr


def test_metrics_doc_covers_every_metric_and_every_alert() -> None:
    doc = METRICS_DOC.read_text()
    for name in TETHERLAB_METRICS:
        assert f"`{name}" in doc, f"docs/metrics.md does not document {name}"
    headings = set(re.findall(r"^###\s+(\w+)\s*$", doc, flags=re.MULTILINE))
    missing = EXPECTED_ALERTS - headings
    assert not missing, f"docs/metrics.md has no runbook section for {sorted(missing)}"
