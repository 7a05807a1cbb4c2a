"""The errors of layer ``node``, each with the case it is returned for.

Whose fault it is decides what a client should do: :class:`Refused` is the caller's (fix the
request); :class:`Unavailable` is the cluster's, with nothing applied (retry, elsewhere if need
be); :class:`Indeterminate` means nobody can know yet whether the command was applied (retry
only what is safe to repeat).
"""

from __future__ import annotations


class Unavailable(Exception):
    """Returned when the cluster cannot take the request now (no leader, no quorum); nothing
    was applied, so the client may retry elsewhere."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Indeterminate(Exception):
    """Returned when the outcome is unknown (timeout, leader change after the proposal was
    accepted): the command may or may not be applied."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Refused(Exception):
    """Returned when a request is refused for the caller's fault (not authorised, unknown key,
    a command the state refuses); it becomes an ``error`` reply with a stable ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class StartupError(Exception):
    """Raised when the node cannot start: an address it must listen on is taken or not its own.
    A node that cannot listen would look alive and never serve; its message names the address."""
