"""Error codes and the protocol's two exceptions: whose fault it is (h11's split)."""

from __future__ import annotations

import enum
from typing import TypeAlias


class ErrorCode(enum.StrEnum):
    """Stable codes carried by ``error`` replies, ``ProtocolViolation`` and the exceptions."""

    BAD_JSON = "bad_json"  # not UTF-8 or not JSON
    NOT_OBJECT = "not_object"  # JSON, but not an object
    FRAME_TOO_LARGE = "frame_too_large"  # a line over MAX_FRAME_BYTES
    TRUNCATED_FRAME = "truncated_frame"  # EOF in the middle of a line
    UNKNOWN_TYPE = "unknown_type"
    MISSING_FIELD = "missing_field"
    BAD_FIELD = "bad_field"  # wrong JSON type, out of range, bad format
    UNKNOWN_FIELD = "unknown_field"
    UNEXPECTED_MESSAGE = "unexpected_message"  # valid message, wrong direction or moment
    NOT_HELLO = "not_hello"  # a request before the hello exchange finished
    VERSION_MISMATCH = "version_mismatch"
    DUPLICATE_ID = "duplicate_id"  # the id of a request still unanswered
    TOO_MANY_REQUESTS = "too_many_requests"  # MAX_IN_FLIGHT unanswered already
    UNKNOWN_REPLY_ID = "unknown_reply_id"  # a reply to no outstanding request
    CONNECTION_CLOSED = "connection_closed"  # local only: send() after close()
    # Never produced by this module; reserved so the node's own errors use stable names too.
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    INTERNAL = "internal"
    # A quota of the node's [limits] refused the request; the message names the field.
    QUOTA_EXCEEDED = "quota_exceeded"  # do not retry at once: something must end first
    RATE_LIMITED = "rate_limited"  # over the connection's request rate: slow down, then retry


RequestId: TypeAlias = str | int


class ProtocolError(Exception):
    """Base of both protocol errors: a stable ``code``, a ``message`` naming what was wrong
    and, when the offending frame had a readable one, the request ``id``."""

    def __init__(self, code: str, message: str, id: RequestId | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.id = id


class LocalProtocolError(ProtocolError):
    """Raised when this side misuses the API: constructs an invalid message, sends a message
    the state table does not allow, or replies to a request that is not outstanding."""


class RemoteProtocolError(ProtocolError):
    """Raised by ``decode`` when the peer sent bad data; connections turn it into a
    ``ProtocolViolation`` event instead of raising."""
