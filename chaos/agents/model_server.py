"""A scripted model for driving the real coding agents offline.

One aiohttp server on 127.0.0.1 (an ephemeral port) speaks two wire formats:

- the Anthropic Messages API, ``POST /v1/messages`` (Claude Code): streaming SSE
  (message_start, content_block_start / content_block_delta with ``text_delta`` or
  ``input_json_delta`` / content_block_stop, message_delta with the stop_reason,
  message_stop) or one JSON message when the request does not ask for a stream;
  ``POST /v1/messages/count_tokens`` answers a fixed count;
- OpenAI-compatible chat completions, ``POST /v1/chat/completions`` (OpenCode's
  ``@ai-sdk/openai-compatible`` provider): streaming chunks with ``tool_calls`` deltas,
  ``finish_reason`` "tool_calls" or "stop", then ``data: [DONE]``; or one JSON completion.

What the model says follows a *script*: a list of turns, each some text and/or tool calls.
The rule that picks a turn is deterministic and stateless, so a retried request gets the
same answer: a request is matched to a script by a marker (a string that must appear in
the conversation's first user message; the script without a marker is the default), and
gets turn number k where k is the number of assistant messages already in the request.
Past the end of its script the model ends the conversation with ``Script.done_text``.
Requests that offer no tools (OpenCode's title request, Claude Code's side queries) are
not part of a conversation: they get ``side_text`` and do not consume a turn.

Every request is recorded (path, query, headers of interest, parsed body) so a test can
assert what the model saw: a tool_result with ``is_error`` and a deny reason, a hook's
additionalContext, the world slice. Bounded: at most ``max_requests`` are served (later
ones get HTTP 429 and set ``overflowed``), and a body above ``max_body_bytes`` gets 413.

Usage::

    with ModelServer() as model:
        model.script([tool_call("Write", file_path="a.py", content="x"), text("done")])
        ... run the agent against model.url ...
        assert model.tool_results()  # what came back to the model
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from aiohttp import web

MAX_REQUESTS_DEFAULT = 200
MAX_BODY_BYTES_DEFAULT = 8 * 1024 * 1024
GATE_TIMEOUT_DEFAULT_S = 30.0
GATE_POLL_S = 0.05
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
MODEL_NAME = "scripted-model"


@dataclass(frozen=True)
class ToolCall:
    name: str
    input: dict[str, Any]


@dataclass(frozen=True)
class Turn:
    """One assistant message: optional text, then zero or more tool calls (in that order).
    With a ``gate``, the answer waits until ``gate()`` is true (at most ``gate_timeout_s``;
    then it is sent anyway and the request is marked ``gate_timed_out``): a test can hold the
    model until, say, tether has printed its verdict."""

    text: str = ""
    tools: tuple[ToolCall, ...] = ()
    gate: Callable[[], bool] | None = None
    gate_timeout_s: float = GATE_TIMEOUT_DEFAULT_S


def text(message: str) -> Turn:
    return Turn(text=message)


def tool_call(name: str, text_before: str = "", **tool_input: Any) -> Turn:
    return Turn(text=text_before, tools=(ToolCall(name, tool_input),))


def tool_calls(*calls: ToolCall, text_before: str = "") -> Turn:
    return Turn(text=text_before, tools=tuple(calls))


def gated(turn: Turn, until: Callable[[], bool], timeout_s: float = GATE_TIMEOUT_DEFAULT_S) -> Turn:
    """``turn``, answered only once ``until()`` holds (bounded by ``timeout_s``)."""
    return replace(turn, gate=until, gate_timeout_s=timeout_s)


@dataclass
class Script:
    turns: list[Turn]
    marker: str | None = None
    done_text: str = "Done."


@dataclass
class Recorded:
    """One request as the server received it."""

    index: int
    at_s: float  # time.monotonic()
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Any  # parsed JSON, or None
    api: str  # "anthropic" | "openai" | "other"
    script_marker: str | None = None
    turn: int | None = None  # the turn served, None for side requests and past the end
    side: bool = False
    gate_timed_out: bool = False

    def text(self) -> str:
        """All of the body as one JSON string: for substring assertions."""
        return json.dumps(self.body, ensure_ascii=False)


@dataclass
class _Choice:
    turn: Turn
    marker: str | None
    index: int | None
    side: bool
    stop_reason: str = field(default="end_turn")


# --- reading a conversation ---------------------------------------------------------------


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, dict):
                if isinstance(block.get("text"), str):
                    parts.append(block["text"])
                elif "content" in block:
                    parts.append(_content_text(block["content"]))
            elif isinstance(block, str):
                parts.append(block)
        return "\n".join(parts)
    return ""


def first_user_text(body: dict[str, Any]) -> str:
    for m in body.get("messages") or []:
        if isinstance(m, dict) and m.get("role") == "user":
            return _content_text(m.get("content"))
    return ""


def assistant_count(body: dict[str, Any]) -> int:
    return sum(1 for m in body.get("messages") or [] if isinstance(m, dict) and m.get("role") == "assistant")


def tool_results(body: Any) -> list[dict[str, Any]]:
    """Tool results the agent sent back to the model, normalised to {tool_use_id, is_error, text}."""
    out: list[dict[str, Any]] = []
    if not isinstance(body, dict):
        return out
    for m in body.get("messages") or []:
        if not isinstance(m, dict):
            continue
        if m.get("role") == "tool":  # OpenAI format
            out.append({"tool_use_id": m.get("tool_call_id"), "is_error": None,
                        "text": _content_text(m.get("content"))})
        elif m.get("role") == "user" and isinstance(m.get("content"), list):  # Anthropic format
            for block in m["content"]:
                if isinstance(block, dict) and block.get("type") == "tool_result":
                    out.append({"tool_use_id": block.get("tool_use_id"), "is_error": bool(block.get("is_error")),
                                "text": _content_text(block.get("content"))})
    return out


# --- the server ---------------------------------------------------------------------------


class ModelServer:
    def __init__(self, max_requests: int = MAX_REQUESTS_DEFAULT, max_body_bytes: int = MAX_BODY_BYTES_DEFAULT,
                 side_text: str = "Scripted title") -> None:
        self.max_requests = max_requests
        self.max_body_bytes = max_body_bytes
        self.side_text = side_text
        self.requests: list[Recorded] = []
        self.overflowed = False
        self._scripts: dict[str | None, Script] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.port: int | None = None

    # --- public API -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL without a path: ANTHROPIC_BASE_URL; add /v1 for an OpenAI baseURL."""
        if self.port is None:
            raise RuntimeError("the model server is not started")
        return f"http://127.0.0.1:{self.port}"

    def script(self, turns: list[Turn], marker: str | None = None, done_text: str = "Done.") -> None:
        """Set the script for conversations whose first user message contains ``marker``
        (None: every other conversation)."""
        with self._lock:
            self._scripts[marker] = Script(list(turns), marker, done_text)

    def start(self) -> ModelServer:
        self._thread = threading.Thread(target=self._serve, name="model-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise TimeoutError(f"the model server did not start within {START_TIMEOUT_S} s")
        if self._error is not None:
            raise RuntimeError(f"the model server failed to start: {self._error}")
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(STOP_TIMEOUT_S)
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(loop.stop)
        thread.join(STOP_TIMEOUT_S)
        self._loop = self._thread = None

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- queries for tests ----------------------------------------------------------------

    def conversation(self, marker: str | None = None) -> list[Recorded]:
        """Requests that were part of the conversation of the script with this marker."""
        with self._lock:
            return [r for r in self.requests if not r.side and r.api != "other" and r.script_marker == marker]

    def tool_results(self, marker: str | None = None) -> list[dict[str, Any]]:
        """Every tool result of the conversation, from its latest request (which holds them all)."""
        conv = self.conversation(marker)
        return tool_results(conv[-1].body) if conv else []

    def saw(self, needle: str, marker: str | None = None) -> bool:
        """Whether any request of the conversation contains ``needle`` (system prompt included)."""
        return any(needle in r.text() for r in self.conversation(marker))

    def wait_requests(self, count: int, timeout_s: float, marker: str | None = None) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if len(self.conversation(marker)) >= count:
                return True
            time.sleep(0.05)
        return False

    def summary(self) -> str:
        """One line per request, for assertion messages."""
        lines = []
        for r in list(self.requests):
            lines.append(f"#{r.index} {r.method} {r.path} api={r.api} marker={r.script_marker} turn={r.turn} "
                         f"side={r.side} results={[(t['is_error'], t['text'][:120]) for t in tool_results(r.body)]}")
        return "\n".join(lines)

    # --- choosing a turn ------------------------------------------------------------------

    def _choose(self, body: dict[str, Any]) -> _Choice:
        if not body.get("tools"):
            return _Choice(Turn(text=self.side_text), None, None, side=True)
        first = first_user_text(body)
        with self._lock:
            script = next((s for m, s in self._scripts.items() if m is not None and m in first), None) \
                or self._scripts.get(None)
        if script is None:
            return _Choice(Turn(text="No script for this conversation."), None, None, side=False)
        k = assistant_count(body)
        if k < len(script.turns):
            turn = script.turns[k]
            return _Choice(turn, script.marker, k, side=False, stop_reason="tool_use" if turn.tools else "end_turn")
        return _Choice(Turn(text=script.done_text), script.marker, None, side=False)

    # --- serving --------------------------------------------------------------------------

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._startup())
        except BaseException as e:
            self._error = e
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _startup(self) -> None:
        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return web.json_response({"error": {"type": "request_too_large", "message": "body too large"}}, status=413)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        path = request.path.rstrip("/")
        api = "anthropic" if path.endswith("/v1/messages") else "openai" if path.endswith("/chat/completions") \
            else "other"
        with self._lock:
            if len(self.requests) >= self.max_requests:
                self.overflowed = True
                return web.json_response({"error": {"type": "rate_limit_error",
                                                    "message": "scripted model: request budget used up"}},
                                         status=429)
            rec = Recorded(len(self.requests), time.monotonic(), request.method, path, request.query_string,
                           {k: v for k, v in request.headers.items() if k.lower() in ("user-agent", "anthropic-beta",
                                                                                       "anthropic-version")},
                           body, api)
            self.requests.append(rec)
        if api == "other":
            if path.endswith("/count_tokens"):
                return web.json_response({"input_tokens": 100})
            return web.json_response({"error": {"type": "not_found", "message": f"no {path} here"}}, status=404)
        if not isinstance(body, dict):
            return web.json_response({"error": {"type": "invalid_request_error", "message": "body is not JSON"}},
                                     status=400)
        choice = self._choose(body)
        rec.script_marker, rec.turn, rec.side = choice.marker, choice.index, choice.side
        gate = choice.turn.gate
        if gate is not None:
            deadline = time.monotonic() + choice.turn.gate_timeout_s
            while not gate():
                if time.monotonic() >= deadline:
                    rec.gate_timed_out = True
                    break
                await asyncio.sleep(GATE_POLL_S)
        stream = bool(body.get("stream"))
        if api == "anthropic":
            if stream:
                return await self._anthropic_stream(request, choice)
            return web.json_response(self._anthropic_message(choice))
        if stream:
            return await self._openai_stream(request, choice)
        return web.json_response(self._openai_completion(choice))

    def _tool_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):06d}"

    # --- Anthropic ------------------------------------------------------------------------

    def _anthropic_blocks(self, turn: Turn) -> list[dict[str, Any]]:
        blocks: list[dict[str, Any]] = []
        if turn.text:
            blocks.append({"type": "text", "text": turn.text})
        for call in turn.tools:
            blocks.append({"type": "tool_use", "id": self._tool_id("toolu_scripted_"), "name": call.name,
                           "input": call.input})
        return blocks

    def _anthropic_message(self, choice: _Choice) -> dict[str, Any]:
        return {"id": self._tool_id("msg_scripted_"), "type": "message", "role": "assistant", "model": MODEL_NAME,
                "content": self._anthropic_blocks(choice.turn), "stop_reason": choice.stop_reason,
                "stop_sequence": None, "usage": {"input_tokens": 100, "output_tokens": 20}}

    async def _anthropic_stream(self, request: web.Request, choice: _Choice) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)

        async def send(event: str, data: dict[str, Any]) -> None:
            await resp.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())

        message = self._anthropic_message(choice)
        await send("message_start", {"type": "message_start", "message": {
            **message, "content": [], "stop_reason": None, "usage": {"input_tokens": 100, "output_tokens": 1}}})
        for i, block in enumerate(message["content"]):
            if block["type"] == "text":
                await send("content_block_start", {"type": "content_block_start", "index": i,
                                                   "content_block": {"type": "text", "text": ""}})
                await send("content_block_delta", {"type": "content_block_delta", "index": i,
                                                   "delta": {"type": "text_delta", "text": block["text"]}})
            else:
                await send("content_block_start", {"type": "content_block_start", "index": i, "content_block": {
                    "type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}})
                args = json.dumps(block["input"])
                half = len(args) // 2  # two deltas: the client must join partial JSON
                for part in (args[:half], args[half:]):
                    await send("content_block_delta", {"type": "content_block_delta", "index": i,
                                                       "delta": {"type": "input_json_delta", "partial_json": part}})
            await send("content_block_stop", {"type": "content_block_stop", "index": i})
        await send("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": choice.stop_reason, "stop_sequence": None},
                                     "usage": {"output_tokens": 20}})
        await send("message_stop", {"type": "message_stop"})
        await resp.write_eof()
        return resp

    # --- OpenAI-compatible ----------------------------------------------------------------

    def _openai_calls(self, turn: Turn) -> list[dict[str, Any]]:
        return [{"id": self._tool_id("call_scripted_"), "type": "function",
                 "function": {"name": c.name, "arguments": json.dumps(c.input)}} for c in turn.tools]

    def _openai_completion(self, choice: _Choice) -> dict[str, Any]:
        calls = self._openai_calls(choice.turn)
        message: dict[str, Any] = {"role": "assistant", "content": choice.turn.text or None}
        if calls:
            message["tool_calls"] = calls
        return {"id": self._tool_id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()),
                "model": MODEL_NAME, "choices": [{"index": 0, "message": message,
                                                  "finish_reason": "tool_calls" if calls else "stop"}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}

    async def _openai_stream(self, request: web.Request, choice: _Choice) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        cid, created = self._tool_id("chatcmpl-"), int(time.time())

        async def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict[str, int] | None = None) -> None:
            data: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created,
                                    "model": MODEL_NAME, "choices": [{"index": 0, "delta": delta,
                                                                      "finish_reason": finish}]}
            if usage:
                data["usage"] = usage
            await resp.write(f"data: {json.dumps(data)}\n\n".encode())

        await chunk({"role": "assistant", "content": ""})
        if choice.turn.text:
            await chunk({"content": choice.turn.text})
        calls = self._openai_calls(choice.turn)
        for i, call in enumerate(calls):
            args = call["function"]["arguments"]
            half = len(args) // 2
            await chunk({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                         "function": {"name": call["function"]["name"], "arguments": args[:half]}}]})
            await chunk({"tool_calls": [{"index": i, "function": {"arguments": args[half:]}}]})
        await chunk({}, "tool_calls" if calls else "stop",
                    {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120})
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


@contextlib.contextmanager
def running(**kwargs: Any) -> Iterator[ModelServer]:
    server = ModelServer(**kwargs).start()
    try:
        yield server
    finally:
        server.stop()
