"""JSON encoding on the hot paths: orjson (C), byte-for-byte what the standard library writes.

Every request encodes a reply, every proposal a log entry and every applied entry its records;
``json.dumps`` was a tenth of a busy leader's CPU (docs/performance.md). orjson writes the same
bytes for everything these paths carry (strings, integers, booleans, null, lists, objects with
string keys), with two exceptions handled here:

- values orjson refuses (integers beyond 64 bits, non-string keys, lone surrogates) go to the
  standard library, so the result (or the error) is what it was;
- floats: orjson writes ``1e16`` where ``json`` writes ``1e+16``. Both read back as the same
  number, and every replica encodes with this module, so replicas still agree byte for byte.

Decoding stays with ``json.loads``: orjson reads integers beyond 64 bits as floats, which would
change a value silently.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps(obj: Any, *, sort_keys: bool = False) -> bytes:
    """Compact JSON (``separators=(",", ":")``, ``ensure_ascii=False``) as UTF-8 bytes."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS) if sort_keys else orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, sort_keys=sort_keys, ensure_ascii=False, separators=(",", ":")).encode()
