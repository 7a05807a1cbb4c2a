"""jsoncodec.dumps writes what json.dumps wrote, so replicas and readers see the same bytes."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tetherlab.cluster.protocol import jsoncodec


def reference(obj: Any, sort_keys: bool) -> bytes:
    return json.dumps(obj, sort_keys=sort_keys, ensure_ascii=False, separators=(",", ":")).encode()


# Everything the hot paths carry except floats: text (any code point but lone surrogates),
# integers within and beyond 64 bits, booleans, null, lists and objects.
texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
scalars = st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | texts
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
                      max_leaves=25)


@settings(max_examples=400, deadline=None)
@given(values, st.booleans())
def test_same_bytes_as_the_standard_library(obj: Any, sort_keys: bool) -> None:
    assert jsoncodec.dumps(obj, sort_keys=sort_keys) == reference(obj, sort_keys)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=6))
def test_floats_read_back_as_the_same_numbers(xs: list[float]) -> None:
    back = json.loads(jsoncodec.dumps(xs))
    assert back == xs and all(math.copysign(1, a) == math.copysign(1, b) for a, b in zip(back, xs, strict=True))


def test_what_orjson_refuses_is_written_by_the_standard_library() -> None:
    for obj in [{"n": 2**64}, {1: "a", "b": 2}, [[[[[]]]]] * 2]:
        assert jsoncodec.dumps(obj) == reference(obj, False)
    deep: Any = []
    for _ in range(300):  # deeper than orjson writes
        deep = [deep]
    assert jsoncodec.dumps(deep) == reference(deep, False)


def test_a_lone_surrogate_is_still_an_error() -> None:
    with pytest.raises(UnicodeEncodeError):
        jsoncodec.dumps({"s": "\ud800"})


def test_key_order_is_kept_unless_sorted() -> None:
    assert jsoncodec.dumps({"b": 1, "a": 2}) == b'{"b":1,"a":2}'
    assert jsoncodec.dumps({"b": 1, "a": 2}, sort_keys=True) == b'{"a":2,"b":1}'


# --- reading: jsoncodec.loads is json.loads -------------------------------------------------------


def _read(f: Any, data: bytes) -> tuple[str, Any]:
    """What reading gives, compared exactly: the value's repr (an int is not a float, -0.0 is not
    0.0, NaN is NaN) or the exception's type and message."""
    try:
        return "value", repr(f(data))
    except Exception as e:
        return "error", (type(e).__name__, str(e))


anything = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),  # lone surrogates too
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=25)


@settings(max_examples=600, deadline=None)
@given(anything, st.booleans(), st.sampled_from([None, 1]), st.data())
def test_reading_gives_what_json_loads_gives(obj: Any, ascii_only: bool, indent: int | None,
                                             data: st.DataObject) -> None:
    text = json.dumps(obj, ensure_ascii=ascii_only, indent=indent).encode("utf-8", "surrogatepass")
    assert _read(jsoncodec.loads, text) == _read(json.loads, text)
    # and damaged text: a byte changed, dropped or cut off
    if text:
        at = data.draw(st.integers(0, len(text) - 1))
        for bad in (text[:at] + bytes([data.draw(st.integers(0, 255))]) + text[at + 1:], text[:at] + text[at + 1:],
                    text[:at]):
            assert _read(jsoncodec.loads, bad) == _read(json.loads, bad)


def test_reading_edges_where_orjson_alone_would_differ() -> None:
    deep = b"[" * 1000 + b"]" * 1000  # json's limit depends on the stack in use; orjson's is 1,024
    for text in [b"123456789012345678901234567890", b'{"a":18446744073709551616}', b"-9223372036854775809",
                 b'"\\ud800"', b"NaN", b"1e400", b"\xef\xbb\xbf{}", '{"a":1}'.encode("utf-16"), deep,
                 b'{"a":1,"a":2}', b"[1,2", b""]:
        assert _read(jsoncodec.loads, text) == _read(json.loads, text), text[:40]
    assert jsoncodec.loads(b'{"n":18446744073709551616}') == {"n": 2**64}  # not 1.8446744073709552e+19
