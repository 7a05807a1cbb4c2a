"""What one client may take of a node: the quotas of ``[limits]`` (docs/hardening.md).

Pure bookkeeping: every method takes the time as an argument, so the service's tests drive it
with a fake clock. The service (``service.py``) asks before it works and refuses with
``quota_exceeded`` or ``rate_limited`` and a message naming the ``[limits]`` field.

- :class:`TokenBucket`: requests per second per connection (``requests_per_s_per_connection``,
  burst ``request_burst_per_connection``);
- :class:`InFlight`: intent requests (submit, complete, abandon) of one developer the leader is
  working on (``intents_in_flight_per_developer``);
- :class:`SessionQuota`: open sessions per developer (``sessions_per_developer``), counted from
  the applied state at most every :data:`SESSION_RECOUNT_S`, plus the opens under way and those
  that succeeded since, so a burst of opens cannot overshoot between recounts.
"""

from __future__ import annotations

from collections.abc import Callable

from tetherlab.cluster.core.config import LoadLimits

SESSION_RECOUNT_S = 1.0  # a recount walks every session: at most this often


class TokenBucket:
    """``rate_per_s`` tokens a second, at most ``burst`` saved up; one request takes one."""

    __slots__ = ("_at", "_tokens", "burst", "rate_per_s")

    def __init__(self, rate_per_s: float, burst: int, now: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._tokens = float(burst)
        self._at = now

    def take(self, now: float) -> bool:
        elapsed = max(0.0, now - self._at)
        self._at = now
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate_per_s)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class InFlight:
    """Work in progress per key; entries leave the map at zero, so it holds only busy keys."""

    def __init__(self) -> None:
        self._n: dict[str, int] = {}
        # Kept beside the map: read from other threads (the metrics scrape runs on the HTTP
        # thread), where iterating a map the loop is changing is not safe.
        self._total = 0

    def try_acquire(self, key: str, limit: int) -> bool:
        n = self._n.get(key, 0)
        if n >= limit:
            return False
        self._n[key] = n + 1
        self._total += 1
        return True

    def release(self, key: str) -> None:
        n = self._n.get(key, 0)
        if n <= 0:
            return
        self._total -= 1
        if n > 1:
            self._n[key] = n - 1
        else:
            self._n.pop(key, None)

    def of(self, key: str) -> int:
        return self._n.get(key, 0)

    def total(self) -> int:
        return self._total


class SessionQuota:
    """Open sessions per developer: the applied state's count (taken at most every
    ``recount_s``), plus the opens under way, plus those that succeeded since the count.
    Conservative: an open may be counted twice until the next recount, never zero times."""

    def __init__(self, recount_s: float = SESSION_RECOUNT_S) -> None:
        self.recount_s = recount_s
        self._counts: dict[str, int] = {}
        self._since: dict[str, int] = {}  # opens that succeeded since the count (maybe in it too)
        self._pending: dict[str, int] = {}  # opens under way
        self._at: float | None = None

    def count(self, developer: str, now: float, recount: Callable[[], dict[str, int]]) -> int:
        if self._at is None or now - self._at >= self.recount_s:
            self._counts, self._since, self._at = dict(recount()), {}, now
        return self._counts.get(developer, 0) + self._since.get(developer, 0) + self._pending.get(developer, 0)

    def begin(self, developer: str) -> None:
        self._pending[developer] = self._pending.get(developer, 0) + 1

    def end(self, developer: str, opened: bool) -> None:
        n = self._pending.get(developer, 0) - 1
        if n > 0:
            self._pending[developer] = n
        else:
            self._pending.pop(developer, None)
        if opened:
            self._since[developer] = self._since.get(developer, 0) + 1


class Quotas:
    """The service's quotas, from the node's ``[limits]``."""

    def __init__(self, limits: LoadLimits) -> None:
        self.limits = limits
        self.intents = InFlight()
        self.sessions = SessionQuota()

    def bucket(self, now: float) -> TokenBucket:
        return TokenBucket(self.limits.requests_per_s_per_connection, self.limits.request_burst_per_connection, now)
