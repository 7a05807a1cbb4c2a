"""Field checks shared by commands and records: each raises CommandError naming the field."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from tetherlab.cluster.core.errors import CommandError

T = TypeVar("T")


def check_str(value: Any, field: str, max_chars: int, *, empty_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise CommandError("bad_field", f"field {field!r} must be a string, got {type(value).__name__}")
    if not empty_ok and not value.strip():
        raise CommandError("bad_field", f"field {field!r} must not be empty")
    if len(value) > max_chars:
        raise CommandError("too_large", f"field {field!r} is longer than {max_chars} characters")
    if "\x00" in value:
        raise CommandError("bad_field", f"field {field!r} must not contain NUL")
    return value


def check_int(value: Any, field: str, *, minimum: int = 0) -> int:
    # bool is an int in Python; a JSON true is not a number here.
    if not isinstance(value, int) or isinstance(value, bool):
        raise CommandError("bad_field", f"field {field!r} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise CommandError("bad_field", f"field {field!r} must be >= {minimum}, got {value}")
    return value


def check_bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise CommandError("bad_field", f"field {field!r} must be true or false, got {type(value).__name__}")
    return value


def check_str_list(value: Any, field: str, max_items: int, max_chars: int) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise CommandError("bad_field", f"field {field!r} must be a list of strings, got {type(value).__name__}")
    if len(value) > max_items:
        raise CommandError("too_large", f"field {field!r} has more than {max_items} entries")
    return check_each(value, field, lambda v, name: check_str(v, name, max_chars))


def check_each(values: Iterable[Any], field: str, check: Callable[[Any, str], T]) -> tuple[T, ...]:
    """``check(value, name)`` of every item; the item's name ("steps[3]") is built only to
    name a bad one (a heartbeat carries hundreds of items, nearly always good)."""
    try:
        return tuple([check(v, field) for v in values])
    except CommandError:
        return tuple(check(v, f"{field}[{i}]") for i, v in enumerate(values))
