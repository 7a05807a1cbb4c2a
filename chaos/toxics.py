"""Toxics for the toxiproxy-compatible server: parsing, validation and per-connection behaviour.

A *toxic* (``ToxicSpec``) is what the HTTP API stores on a proxy. Every connection through the proxy
gets its own ``ToxicRuntime`` for each toxic in the matching direction, created when the connection
opens or when the toxic is added later, so that adding, updating and removing toxics reaches
connections that already exist, as it does in Shopify's toxiproxy.

Data moves through a direction as ``Chunk``s, each stamped with the moment it was read from the
socket. A runtime's ``on_chunk`` receives one chunk and a ``forward`` continuation that carries data to
the next toxic (and finally to the socket). Runtimes sleep, drop, split, truncate or end the stream;
they never buffer on their own, so the bounds of the connection (its read queue and its socket write
buffer) bound the memory of every toxic too.

Attribute names and units follow toxiproxy 2.x exactly: milliseconds everywhere except the slicer's
``delay``, which toxiproxy defines in microseconds, and ``bandwidth.rate`` in KB/s with 1 KB = 1000 bytes.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

UPSTREAM = "upstream"  # client -> server
DOWNSTREAM = "downstream"  # server -> client
STREAMS = (UPSTREAM, DOWNSTREAM)

# The attribute names of every supported toxic type and their defaults (toxiproxy's Go zero values).
TOXIC_ATTRIBUTES: dict[str, dict[str, int]] = {
    "latency": {"latency": 0, "jitter": 0},
    "bandwidth": {"rate": 0},
    "slow_close": {"delay": 0},
    "timeout": {"timeout": 0},
    "reset_peer": {"timeout": 0},
    "slicer": {"average_size": 0, "size_variation": 0, "delay": 0},
    "limit_data": {"bytes": 0},
}

# Attributes are durations or sizes; 2**31 - 1 ms is about 24.8 days, far beyond any drill, and keeps
# every value well inside what asyncio timers and slicing handle exactly.
MAX_ATTRIBUTE_VALUE = 2**31 - 1


class ApiError(Exception):
    """An error the HTTP API reports as ``{"error": message, "status": status}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def to_json(self) -> dict[str, Any]:
        return {"error": self.message, "status": self.status}


def bad_request(detail: str) -> ApiError:
    return ApiError(400, f"bad request body: {detail}")


ERR_INVALID_STREAM = "stream was invalid, can be either upstream or downstream"
ERR_INVALID_TOXIC_TYPE = "invalid toxic type"


class CloseDirection(Exception):
    """Raised by a toxic to end its direction: what was forwarded is flushed, then the socket closes."""


class ResetConnection(Exception):
    """Raised by a toxic to reset both sockets of the connection (SO_LINGER 0, so the kernel sends RST)."""


@dataclass(frozen=True, slots=True)
class Chunk:
    data: bytes
    # loop.time() when the bytes were read from the socket (or when an earlier toxic released them).
    # The latency toxic delays relative to this stamp, so queued chunks are delayed in parallel,
    # not one after another.
    stamp_s: float


Forward = Callable[[Chunk], Awaitable[None]]


def _parse_stream(raw: object) -> str:
    if not isinstance(raw, str) or raw.lower() not in STREAMS:
        raise ApiError(400, ERR_INVALID_STREAM)
    return raw.lower()


def _parse_toxicity(raw: object) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise bad_request("toxicity must be a number")
    toxicity = float(raw)
    if not 0.0 <= toxicity <= 1.0:
        raise bad_request("toxicity must be between 0 and 1")
    return toxicity


def parse_attributes(toxic_type: str, raw: object, base: Mapping[str, int] | None = None) -> dict[str, int]:
    """Validate ``raw`` attributes for ``toxic_type`` over ``base`` (the defaults, or current values).

    Unknown keys are ignored, as toxiproxy's JSON decoding ignores them; known keys must be
    non-negative integers (toxiproxy declares them int64 and rejects fractions and strings).
    """
    attributes = dict(base if base is not None else TOXIC_ATTRIBUTES[toxic_type])
    if raw is None:
        return attributes
    if not isinstance(raw, dict):
        raise bad_request("attributes must be an object")
    for key in TOXIC_ATTRIBUTES[toxic_type]:
        if key not in raw:
            continue
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad_request(f"attribute {key!r} of {toxic_type} must be an integer")
        if not 0 <= value <= MAX_ATTRIBUTE_VALUE:
            raise bad_request(f"attribute {key!r} of {toxic_type} must be between 0 and {MAX_ATTRIBUTE_VALUE}")
        attributes[key] = value
    return attributes


@dataclass(slots=True)
class ToxicSpec:
    """A toxic as the API stores and shows it."""

    name: str
    type: str
    stream: str
    toxicity: float
    attributes: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "stream": self.stream,
            "toxicity": self.toxicity,
            "attributes": dict(self.attributes),
        }

    @classmethod
    def from_request(cls, body: object, existing_names: Callable[[str], bool]) -> ToxicSpec:
        """Parse a ``POST /proxies/{p}/toxics`` body, checking in toxiproxy's order.

        The order (body, stream, default name, type, duplicate name, attributes) decides which
        error a client sees when a body is wrong in several ways, so it is kept the same.
        """
        if not isinstance(body, dict):
            raise bad_request("expected a JSON object")
        stream = _parse_stream(body.get("stream", DOWNSTREAM))
        toxic_type = body.get("type")
        if not isinstance(toxic_type, str):
            toxic_type = ""
        name = body.get("name")
        if name is None or name == "":
            name = f"{toxic_type}_{stream}"
        if not isinstance(name, str):
            raise bad_request("name must be a string")
        if toxic_type not in TOXIC_ATTRIBUTES:
            raise ApiError(400, ERR_INVALID_TOXIC_TYPE)
        if existing_names(name):
            raise ApiError(409, "toxic already exists")
        toxicity = _parse_toxicity(body.get("toxicity", 1.0))
        attributes = parse_attributes(toxic_type, body.get("attributes"))
        return cls(name=name, type=toxic_type, stream=stream, toxicity=toxicity, attributes=attributes)

    def updated(self, body: object) -> ToxicSpec:
        """Parse a ``POST /proxies/{p}/toxics/{t}`` body: new attributes over the current ones, and toxicity."""
        if not isinstance(body, dict):
            raise bad_request("expected a JSON object")
        toxicity = _parse_toxicity(body["toxicity"]) if "toxicity" in body else self.toxicity
        attributes = parse_attributes(self.type, body.get("attributes"), base=self.attributes)
        return ToxicSpec(self.name, self.type, self.stream, toxicity, attributes)


class ToxicRuntime:
    """One toxic acting on one direction of one connection. The base class passes data through."""

    type_name: ClassVar[str] = ""

    def __init__(self, spec: ToxicSpec, rng: random.Random, close_link: Callable[[], None]) -> None:
        self.spec = spec
        self._rng = rng
        self._close_link = close_link
        self._loop = asyncio.get_running_loop()
        self.removed = False
        # Toxicity is drawn once per connection (and again when the toxic is updated), as in
        # toxiproxy: a toxic with toxicity 0.3 affects about 30 % of connections, all of their data.
        self.active = self._roll()
        # Set to wake a sleeping toxic early when it is updated or removed; replaced after each use.
        self._wake = asyncio.Event()

    def _roll(self) -> bool:
        return self._rng.random() < self.spec.toxicity

    @property
    def running(self) -> bool:
        return self.active and not self.removed

    def start(self) -> None:
        """Called once the runtime is attached to a live connection."""

    def update(self, spec: ToxicSpec) -> None:
        self.spec = spec
        self.active = self._roll()
        self._interrupt()
        self.start()

    def remove(self) -> None:
        self.removed = True
        self._interrupt()

    def dispose(self) -> None:
        """The connection ended: release timers. Unlike ``remove``, this never acts on the connection."""

    def _interrupt(self) -> None:
        wake, self._wake = self._wake, asyncio.Event()
        wake.set()

    async def pause(self, seconds: float) -> bool:
        """Sleep ``seconds``; return False if woken early by an update or removal."""
        if seconds <= 0:
            return True
        wake = self._wake
        try:
            await asyncio.wait_for(wake.wait(), timeout=seconds)
        except TimeoutError:
            return True
        return False

    def attr(self, key: str) -> int:
        return self.spec.attributes[key]

    async def on_chunk(self, chunk: Chunk, forward: Forward) -> None:
        await forward(chunk)

    async def on_eof(self) -> None:
        """The source of this direction closed; return to let the close through."""


class LatencyToxic(ToxicRuntime):
    type_name = "latency"

    async def on_chunk(self, chunk: Chunk, forward: Forward) -> None:
        latency_ms = self.attr("latency")
        jitter_ms = self.attr("jitter")
        delay_ms = latency_ms + (self._rng.randint(-jitter_ms, jitter_ms) if jitter_ms else 0)
        release_at_s = chunk.stamp_s + max(0, delay_ms) / 1000.0
        await self.pause(release_at_s - self._loop.time())
        # Restamp so that a later latency toxic in the chain adds its delay on top of this one.
        await forward(Chunk(chunk.data, max(release_at_s, chunk.stamp_s)))


class BandwidthToxic(ToxicRuntime):
    type_name = "bandwidth"
    # Big chunks are sent in pieces of at most this much time at the given rate, so that a 64 KiB
    # read does not leave as one burst followed by a long silence (toxiproxy does the same).
    PIECE_S: ClassVar[float] = 0.1

    def __init__(self, spec: ToxicSpec, rng: random.Random, close_link: Callable[[], None]) -> None:
        super().__init__(spec, rng, close_link)
        # The loop time before which the next byte may not be sent; carried across chunks so that
        # many small chunks are limited as precisely as one big one.
        self._next_send_s = 0.0

    async def on_chunk(self, chunk: Chunk, forward: Forward) -> None:
        rate_kb_s = self.attr("rate")
        if rate_kb_s <= 0:  # toxiproxy treats 0 as unlimited
            await forward(chunk)
            return
        bytes_per_s = rate_kb_s * 1000.0
        piece_bytes = max(1, int(bytes_per_s * self.PIECE_S))
        data = chunk.data
        for offset in range(0, len(data), piece_bytes):
            if self.removed:
                await forward(Chunk(data[offset:], chunk.stamp_s))
                return
            piece = data[offset : offset + piece_bytes]
            now_s = self._loop.time()
            await self.pause(self._next_send_s - now_s)
            await forward(Chunk(piece, chunk.stamp_s))
            self._next_send_s = max(self._next_send_s, now_s) + len(piece) / bytes_per_s


class SlowCloseToxic(ToxicRuntime):
    type_name = "slow_close"

    async def on_eof(self) -> None:
        await self.pause(self.attr("delay") / 1000.0)


class TimeoutToxic(ToxicRuntime):
    """Drops all data; closes the connection after ``timeout`` ms, or never when it is 0 (a blackhole)."""

    type_name = "timeout"

    def __init__(self, spec: ToxicSpec, rng: random.Random, close_link: Callable[[], None]) -> None:
        super().__init__(spec, rng, close_link)
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._cancel_timer()
        timeout_ms = self.attr("timeout")
        if self.active and timeout_ms > 0:
            self._timer = self._loop.call_later(timeout_ms / 1000.0, self._close_link)

    def dispose(self) -> None:
        self._cancel_timer()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def remove(self) -> None:
        was_running = self.running
        super().remove()
        self._cancel_timer()
        # Data that went into this toxic was dropped, so the byte stream of the connection is no
        # longer intact; toxiproxy therefore closes the connection when a timeout toxic is removed,
        # and so do we. New connections flow normally.
        if was_running:
            self._close_link()

    async def on_chunk(self, chunk: Chunk, forward: Forward) -> None:
        if self.removed:
            await forward(chunk)
        # Otherwise the data is dropped on the ground.


class ResetPeerToxic(ToxicRuntime):
    """On the first data in its direction, waits ``timeout`` ms and resets the connection (TCP RST)."""

    type_name = "reset_peer"

    async def on_chunk(self, chunk: Chunk, forward: Forward) -> None:
        await self.pause(self.attr("timeout") / 1000.0)
        if self.removed:
            await forward(chunk)
            return
        raise ResetConnection()


class SlicerToxic(ToxicRuntime):
    type_name = "slicer"

    async def on_chunk(self, chunk: Chunk, forward: Forward) -> None:
        average_size = self.attr("average_size")
        size_variation = self.attr("size_variation")
        delay_us = self.attr("delay")  # microseconds, as toxiproxy defines it
        data = chunk.data
        if average_size <= 0:
            await forward(chunk)
            return
        offset = 0
        while offset < len(data):
            if self.removed:
                await forward(Chunk(data[offset:], chunk.stamp_s))
                return
            variation = self._rng.randint(-size_variation, size_variation) if size_variation else 0
            size = max(1, average_size + variation)
            await forward(Chunk(data[offset : offset + size], chunk.stamp_s))
            offset += size
            if offset < len(data):
                await self.pause(delay_us / 1_000_000.0)


class LimitDataToxic(ToxicRuntime):
    """Lets ``bytes`` bytes through in its direction, then closes the connection."""

    type_name = "limit_data"

    def __init__(self, spec: ToxicSpec, rng: random.Random, close_link: Callable[[], None]) -> None:
        super().__init__(spec, rng, close_link)
        # Kept across updates of the toxic, as toxiproxy keeps its per-connection state.
        self._sent_bytes = 0

    async def on_chunk(self, chunk: Chunk, forward: Forward) -> None:
        limit_bytes = self.attr("bytes")
        remaining_bytes = max(0, limit_bytes - self._sent_bytes)
        piece = chunk.data[:remaining_bytes]
        if piece:
            await forward(Chunk(piece, chunk.stamp_s))
            self._sent_bytes += len(piece)
        if self._sent_bytes >= limit_bytes and not self.removed:
            raise CloseDirection()


RUNTIME_TYPES: dict[str, type[ToxicRuntime]] = {
    cls.type_name: cls
    for cls in (
        LatencyToxic,
        BandwidthToxic,
        SlowCloseToxic,
        TimeoutToxic,
        ResetPeerToxic,
        SlicerToxic,
        LimitDataToxic,
    )
}
assert set(RUNTIME_TYPES) == set(TOXIC_ATTRIBUTES)


def new_runtime(spec: ToxicSpec, rng: random.Random, close_link: Callable[[], None]) -> ToxicRuntime:
    return RUNTIME_TYPES[spec.type](spec, rng, close_link)
