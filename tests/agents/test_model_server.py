"""The scripted model server on its own (no agents needed): wire formats, turn choice, bounds."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tetherlab.chaos.agents.model_server import ModelServer, ToolCall, gated, text, tool_call, tool_calls

HTTP_TIMEOUT_S = 10.0


@pytest.fixture
def model() -> Iterator[ModelServer]:
    server = ModelServer(max_requests=8, max_body_bytes=64 * 1024).start()
    try:
        yield server
    finally:
        server.stop()


def post(url: str, body: dict[str, Any]) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def sse(raw: bytes) -> list[tuple[str, Any]]:
    events = []
    for block in raw.decode().split("\n\n"):
        name, data = "", ""
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
        if data:
            events.append((name, data if data == "[DONE]" else json.loads(data)))
    return events


def anthropic(messages: list[dict[str, Any]], stream: bool = True) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 100, "stream": stream, "messages": messages,
            "tools": [{"name": "Write", "input_schema": {"type": "object"}}]}


def test_anthropic_stream_follows_the_script_turn_by_assistant_count(model: ModelServer) -> None:
    model.script([tool_call("Write", text_before="plan", file_path="/r/a.py", content="x"), text("done")])
    status, raw = post(model.url + "/v1/messages?beta=true", anthropic([{"role": "user", "content": "go"}]))
    assert status == 200
    events = sse(raw)
    assert [n for n, _ in events] == ["message_start", "content_block_start", "content_block_delta",
                                      "content_block_stop", "content_block_start", "content_block_delta",
                                      "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert events[2][1]["delta"] == {"type": "text_delta", "text": "plan"}
    tool = events[4][1]["content_block"]
    assert tool["type"] == "tool_use" and tool["name"] == "Write"
    partial = "".join(d["delta"]["partial_json"] for n, d in events if d.get("delta", {}).get("type") ==
                      "input_json_delta")
    assert json.loads(partial) == {"file_path": "/r/a.py", "content": "x"}
    assert events[8][1]["delta"]["stop_reason"] == "tool_use"
    # The next request holds one assistant message, so it gets turn 1; with two, the end text.
    convo = [{"role": "user", "content": "go"}, {"role": "assistant", "content": [tool]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool["id"], "is_error": True,
                                           "content": "denied: because"}]}]
    _, raw = post(model.url + "/v1/messages", anthropic(convo, stream=False))
    assert json.loads(raw)["content"] == [{"type": "text", "text": "done"}]
    _, raw = post(model.url + "/v1/messages", anthropic([*convo, {"role": "assistant", "content": "done"},
                                                         {"role": "user", "content": "more"}], stream=False))
    assert json.loads(raw)["content"][0]["text"] == "Done." and json.loads(raw)["stop_reason"] == "end_turn"
    assert model.tool_results() == [{"tool_use_id": tool["id"], "is_error": True, "text": "denied: because"}]
    assert [r.turn for r in model.conversation()] == [0, 1, None]


def test_openai_stream_has_tool_call_deltas_and_done(model: ModelServer) -> None:
    model.script([tool_calls(ToolCall("write", {"filePath": "a", "content": "x"}), ToolCall("read", {"filePath": "b"}),
                             text_before="plan")])
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "go"}],
            "tools": [{"type": "function", "function": {"name": "write"}}]}
    status, raw = post(model.url + "/v1/chat/completions", body)
    assert status == 200
    chunks = [d for _, d in sse(raw)]
    assert chunks[-1] == "[DONE]"
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    calls: dict[int, dict[str, str]] = {}
    for c in chunks[:-1]:
        for tc in c["choices"][0]["delta"].get("tool_calls", []):
            entry = calls.setdefault(tc["index"], {"name": "", "args": ""})
            entry["name"] += tc.get("function", {}).get("name", "")
            entry["args"] += tc.get("function", {}).get("arguments", "")
    assert [(v["name"], json.loads(v["args"])) for _, v in sorted(calls.items())] == [
        ("write", {"filePath": "a", "content": "x"}), ("read", {"filePath": "b"})]
    # A request without tools (OpenCode's title) is a side request: it consumes no turn.
    _, raw = post(model.url + "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "t"}]})
    assert json.loads(raw)["choices"][0]["message"]["content"] == "Scripted title"
    assert [r.side for r in model.requests] == [False, True]


def test_markers_pick_the_script(model: ModelServer) -> None:
    model.script([text("alice speaking")], marker="[alice]")
    model.script([text("anyone else")])
    for prompt, want in (("[alice] do it", "alice speaking"), ("do it", "anyone else")):
        _, raw = post(model.url + "/v1/messages", anthropic([{"role": "user", "content": prompt}], stream=False))
        assert json.loads(raw)["content"][0]["text"] == want
    assert len(model.conversation("[alice]")) == 1 and len(model.conversation()) == 1


def test_a_gated_turn_waits_for_its_gate(model: ModelServer) -> None:
    gate = threading.Event()
    model.script([gated(text("after"), gate.is_set, timeout_s=5)])
    threading.Timer(0.3, gate.set).start()
    t0 = time.monotonic()
    _, raw = post(model.url + "/v1/messages", anthropic([{"role": "user", "content": "go"}], stream=False))
    assert time.monotonic() - t0 >= 0.3 and json.loads(raw)["content"][0]["text"] == "after"
    assert not model.requests[-1].gate_timed_out


def test_requests_and_bodies_are_bounded(model: ModelServer) -> None:
    model.script([text("x")])
    status, _ = post(model.url + "/v1/messages", anthropic([{"role": "user", "content": "y" * 100_000}]))
    assert status == 413
    for _ in range(10):
        status, _ = post(model.url + "/v1/messages", anthropic([{"role": "user", "content": "go"}], stream=False))
    assert status == 429 and model.overflowed and len(model.requests) == 8
