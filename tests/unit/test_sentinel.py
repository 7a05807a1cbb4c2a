"""The sentinel scanner over headless agents' JSON-lines output (shim/sentinel.py)."""

from __future__ import annotations

import json

from tetherlab.shim.sentinel import JsonLines, MalformedBlock, PlanBlock, Scanner, assistant_texts

PLAN = {"summary": "Add refunds", "steps": ["write refunds.py"]}
BLOCK = f"Here is my plan.\n<<<TETHERLAB-PLAN\n{json.dumps(PLAN)}\nTETHERLAB-PLAN>>>\n"


def scan(chunks: list[bytes]) -> list[object]:
    decoder, scanner = JsonLines(), Scanner()
    events: list[object] = []
    for chunk in chunks:
        events += scanner.feed(decoder.feed(chunk))
    return events


def line(obj: object) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def test_opencode_json_text_events_are_unescaped_before_scanning() -> None:
    data = line({"type": "text", "timestamp": 1, "part": {"type": "text", "text": BLOCK}})
    for size in (1, 7, len(data)):  # any split of the stream
        assert scan([data[i : i + size] for i in range(0, len(data), size)]) == [PlanBlock(PLAN)]


def test_claude_stream_json_assistant_text_counts_and_echoes_do_not() -> None:
    assistant = {"type": "assistant", "message": {"content": [{"type": "text", "text": BLOCK},
                                                              {"type": "tool_use", "input": {"content": BLOCK}}]}}
    echoes = [{"type": "user", "message": {"content": [{"type": "tool_result", "content": BLOCK}]}},
              {"type": "result", "result": BLOCK},
              {"type": "stream_event", "event": {"delta": {"type": "text_delta", "text": BLOCK}}}]
    assert scan([line(assistant), *(line(e) for e in echoes)]) == [PlanBlock(PLAN)]


def test_plain_lines_and_a_plan_object_line_pass_unchanged() -> None:
    # A plan block's own JSON line is an object without "type": it is not an agent event.
    assert scan([BLOCK.encode()]) == [PlanBlock(PLAN)]
    assert JsonLines().feed(b"partial line without newline") == b"partial line without newline"
    assert JsonLines().feed(b"{not json}\n") == b"{not json}\n"


def test_reasons_never_quote_a_marker() -> None:
    events = Scanner().feed(b"<<<TETHERLAB-PLAN\n{oops\nTETHERLAB-PLAN>>>\n")
    assert len(events) == 1 and isinstance(events[0], MalformedBlock)
    assert "<<<TETHERLAB-PLAN" not in events[0].reason and "TETHERLAB-PLAN>>>" not in events[0].reason


def test_assistant_texts_is_bounded_in_depth() -> None:
    deep: object = {"type": "text", "text": "x"}
    for _ in range(100):
        deep = {"type": "wrapper", "inner": deep}
    assert assistant_texts(deep) == []
