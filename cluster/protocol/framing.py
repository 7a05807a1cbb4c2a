"""Line framing, and the events that are not messages."""

from __future__ import annotations

import enum
import json
from collections import deque
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from tetherlab.cluster.protocol import jsoncodec
from tetherlab.cluster.protocol.errors import ErrorCode, RemoteProtocolError, RequestId
from tetherlab.cluster.protocol.messages import Error, Message, Role, decode

# --- Events that are not messages ---------------------------------------------------------


@dataclass(frozen=True)
class ProtocolViolation:
    """The peer sent something bad; nothing changed. A server answers it with
    ``send(violation)``; a client may log it and carry on or reconnect."""

    code: str
    message: str
    id: RequestId | None = None

    def to_error(self) -> Error:
        return Error(id=self.id, code=self.code, message=self.message)


@dataclass(frozen=True)
class ConnectionClosed:
    """The peer sent EOF (after every frame before it was delivered), or we closed."""


class NeedData(enum.Enum):
    NEED_DATA = "need_data"


NEED_DATA: Final = NeedData.NEED_DATA

Event: TypeAlias = Message | ProtocolViolation | ConnectionClosed


# --- Framing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameFault:
    code: ErrorCode
    message: str


class LineReader:
    """Splits bytes into lines, keeping at most ``max_frame_bytes`` of a partial line. A line
    over the bound is reported once and its remaining bytes dropped as they arrive, so an
    endless line costs no memory."""

    def __init__(self, max_frame_bytes: int) -> None:
        self._max = max_frame_bytes
        self._partial = bytearray()
        self._discarding = False
        self._frames: deque[bytes | FrameFault] = deque()  # bounded by what the caller fed
        self.eof = False

    def _too_large(self) -> FrameFault:
        return FrameFault(ErrorCode.FRAME_TOO_LARGE, f"frame is larger than {self._max} bytes; discarded")

    def feed(self, data: bytes) -> None:
        if not data:
            if self._partial and not self._discarding:
                self._frames.append(
                    FrameFault(ErrorCode.TRUNCATED_FRAME, f"EOF after {len(self._partial)} bytes of a frame")
                )
            self._partial.clear()
            self.eof = True
            return
        start = 0
        while start < len(data):
            nl = data.find(b"\n", start)
            end = len(data) if nl == -1 else nl
            if not self._discarding:
                if len(self._partial) + (end - start) > self._max:
                    self._frames.append(self._too_large())
                    self._partial.clear()
                    self._discarding = True
                else:
                    self._partial += data[start:end]
            if nl == -1:
                break
            if self._discarding:
                self._discarding = False  # the oversized line ends here
            else:
                self._frames.append(bytes(self._partial))
                self._partial.clear()
            start = nl + 1

    def next_frame(self) -> bytes | FrameFault | None:
        return self._frames.popleft() if self._frames else None


def parse_frame(line: bytes, sender: Role) -> Message:
    obj = jsoncodec.fast_loads(line)  # a valid frame, as the checks below would read it
    if obj is jsoncodec.NOT_FAST:
        obj = _parse_json(line)
    return decode(obj, sender=sender)


def _parse_json(line: bytes) -> Any:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError(ErrorCode.BAD_JSON, f"frame is not UTF-8 (byte {exc.start})") from None
    try:
        return _DECODER.decode(text)
    except RecursionError:
        raise RemoteProtocolError(ErrorCode.BAD_JSON, "frame nests too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and ints too long to convert
        raise RemoteProtocolError(ErrorCode.BAD_JSON, f"frame is not JSON: {exc}") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# One decoder for every frame: json.loads with an argument builds a new one per call.
_DECODER: Final = json.JSONDecoder(parse_constant=_refuse_constant)
