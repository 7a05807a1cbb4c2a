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
