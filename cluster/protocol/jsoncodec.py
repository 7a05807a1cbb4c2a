"""JSON encoding on the hot paths: orjson (C), byte-for-byte what the standard library writes.

Every request encodes a reply, every proposal a log entry and every applied entry its records;
``json.dumps`` was a tenth of a busy leader's CPU (docs/performance.md). orjson writes the same
bytes for everything these paths carry (strings, integers, booleans, null, lists, objects with
string keys), with two exceptions handled here:

- values orjson refuses (integers beyond 64 bits, non-string keys, lone surrogates) go to the
  standard library, so the result (or the error) is what it was;
- floats: orjson writes ``1e16`` where ``json`` writes ``1e+16``. Both read back as the same
  number, and every replica encodes with this module, so replicas still agree byte for byte.

Decoding (:func:`loads`) gives ``json.loads``'s result for every input: orjson reads what it
reads the same way (three to four times sooner), and everything else goes to the standard
library. orjson differs in one way that is not an error: integers beyond 64 bits come back as
floats, which would change a value silently, so text with a run of 19 digits or more (no longer
integer fits in 64 bits) is read by ``json``; so is text with more than ``BRACKETS_MAX``
brackets, which may nest deeper than ``json`` reads (its limit is Python's recursion limit, less
the stack in use; orjson's is 1,024). Where orjson refuses what ``json`` accepts (NaN,
lone surrogates, a byte-order mark, numbers out of a float's range, UTF-16), ``json`` reads it,
and every error raised is ``json``'s own (tests/unit/test_jsoncodec.py compares the two).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

BRACKETS_MAX = 256  # no deeper nesting than this can hit json's recursion limit
# Digits to "0", opening brackets to "[", the rest to " ": one pass finds a long digit run (a
# regular expression took five times as long) and counts the brackets.
_SHAPE = bytes(48 if 48 <= i <= 57 else 91 if i in (91, 123) else 32 for i in range(256))
_LONG_NUMBER = b"0" * 19


NOT_FAST: Any = object()  # what fast_loads returns for text it leaves to json


def fast_loads(data: bytes) -> Any:
    """orjson's reading of ``data`` where it is ``json.loads``'s, else ``NOT_FAST``."""
    shape = data.translate(_SHAPE)
    if _LONG_NUMBER not in shape and shape.count(b"[") <= BRACKETS_MAX:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # json decides, and names what is wrong its own way
    return NOT_FAST


def loads(data: bytes) -> Any:
    """``json.loads(data)``: the same value, or the same exception."""
    obj = fast_loads(data)
    return json.loads(data) if obj is NOT_FAST else obj


def dumps(obj: Any, *, sort_keys: bool = False) -> bytes:
    """Compact JSON (``separators=(",", ":")``, ``ensure_ascii=False``) as UTF-8 bytes."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS) if sort_keys else orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, sort_keys=sort_keys, ensure_ascii=False, separators=(",", ":")).encode()
