"""A bounded memory of strings that passed a check, so a value seen again (an agent id in every
heartbeat, about a hundred of them a second per developer) is not checked again.

Each check keeps its own instance: a value is remembered only by the check it passed. The set
is cleared when full (a bound, not a cache policy: the ids that matter come back within a
heartbeat interval and are remembered again). Set operations are atomic under the GIL, so the
event loop and the Raft thread may share one.
"""

from __future__ import annotations

MEMO_MAX_ITEMS = 65_536  # about 8 MB of 45-character agent ids at most


class Passed:
    """``value in memo`` is True only for a ``str`` (not a subclass) added since the last clear."""

    __slots__ = ("_seen", "max_items")

    def __init__(self, max_items: int = MEMO_MAX_ITEMS) -> None:
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        self._seen: set[str] = set()
        self.max_items = max_items

    def __contains__(self, value: object) -> bool:
        return type(value) is str and value in self._seen

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, value: str) -> None:
        """Remember ``value`` if it is a plain ``str`` (a subclass may compare differently)."""
        if type(value) is not str:
            return
        if len(self._seen) >= self.max_items:
            self._seen.clear()
        self._seen.add(value)
