"""The ``[limits]`` table of a node file: parsed, validated with errors naming the field, and
written back (only what differs from the defaults)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from tetherlab.cluster.core.config import ConfigError, LoadLimits, parse_node_config, render_node_config

PATH = Path("/etc/tetherlab/node.toml")


def _node(limits: dict[str, Any] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"node": {"id": "n1", "raft": "127.0.0.1:7101", "ssh": "127.0.0.1:7201",
                                     "http": "127.0.0.1:7301", "data_dir": "data", "secret_file": "s"}}
    if limits is not None:
        data["limits"] = limits
    return data


def test_defaults_when_the_table_is_absent() -> None:
    assert parse_node_config(_node(), PATH).limits == LoadLimits()


def test_values_are_read_and_written_back() -> None:
    cfg = parse_node_config(_node({"sessions_per_developer": 50, "requests_per_s_per_connection": 20,
                                   "request_burst_per_connection": 40, "http_header_timeout_s": 2}), PATH)
    assert cfg.limits.sessions_per_developer == 50
    assert cfg.limits.requests_per_s_per_connection == 20.0 and cfg.limits.http_header_timeout_s == 2.0
    text = render_node_config(cfg)
    assert "[limits]" in text and "sessions_per_developer = 50" in text
    assert "ssh_connections_max" not in text  # defaults are not written
    again = parse_node_config(tomllib.loads(text), PATH)
    assert again.limits == cfg.limits
    assert "[limits]" not in render_node_config(parse_node_config(_node(), PATH))


@pytest.mark.parametrize(("limits", "names"), [
    ({"sessions_per_developr": 5}, "[limits].sessions_per_developr"),
    ({"sessions_per_developer": 0}, "[limits].sessions_per_developer"),
    ({"sessions_per_developer": 2.5}, "[limits].sessions_per_developer"),
    ({"sessions_per_developer": True}, "[limits].sessions_per_developer"),
    ({"http_header_timeout_s": "5"}, "[limits].http_header_timeout_s"),
    ({"http_cache_s": -1}, "[limits].http_cache_s"),
    ({"http_cache_s": 600}, "[limits].http_cache_s"),
    ({"requests_per_s_per_connection": 100, "request_burst_per_connection": 10}, "request_burst_per_connection"),
    ({"ssh_connections_max": 10, "ssh_unauthenticated_max": 20}, "ssh_unauthenticated_max"),
])
def test_bad_values_name_the_field(limits: dict[str, Any], names: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_node_config(_node(limits), PATH)
    assert names in str(e.value) and str(PATH) in str(e.value)


def test_a_limits_value_that_is_not_a_table_is_refused() -> None:
    data = _node()
    data["limits"] = 5
    with pytest.raises(ConfigError, match=r"\[limits\] must be a table"):
        parse_node_config(data, PATH)
