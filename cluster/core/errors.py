"""The errors of layer ``core``, together, each with the case it is returned for.

:class:`CommandError` is the one error of the replicated state: a command that is malformed, or
that the current state refuses. It is the caller's fault and deterministic: ``apply`` never
raises it but returns ``{"error": {"code", "message"}}``, so every replica records the same
refusal for the same log entry. ``code`` is one of :data:`CODES`; the message names the field or
record at fault. :class:`RegistryError` is a refused concept registry, with every problem found.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Stable error codes and when each is returned; messages name the field or record at fault.
CODES: dict[str, str] = {
    # the key-value state machine
    "bad_json": "a command is not JSON",
    "unknown_op": "a KV command's 'op' is not one of put, delete, cas, barrier, txn",
    # both
    "bad_command": "the command is not a JSON object",
    "unknown_type": "the command's 'type' is not one of the command types",
    "missing_field": "a required field is absent",
    "unknown_field": "a field the command type does not take is present (often a typo)",
    "bad_field": "a field has the wrong type or an invalid value",
    "too_large": "a field is longer than its bound",
    "invalid_registry": "a pushed concept registry failed validation (see RegistryError.problems)",
    "registry_version_conflict": "push_registry's expected_version is not the current version",
    "not_initialised": "the cluster has no git remote yet: send 'init' first",
    "remote_already_set": "'init' names a different remote than the one the cluster coordinates",
    "remote_mismatch": "a session comes from a repository with another git remote",
    "agent_developer_mismatch": "an agent id is not scoped under the session's developer",
    "no_session": "the agent has no session: send 'open_session' first",
    "session_lapsed": "the agent's session lapsed: open a new one",
    "unknown_concept": "an intent names a concept the registry does not have",
    "invalid_index": "the chunks of a code index do not reassemble into a valid index with the announced digest",
    "unknown_index": "push_registry names a code index that has not been installed (install_index first)",
    "no_active_intent": "complete/abandon from an agent with no active or lapsed intent",
    "intent_mismatch": "the command's intent_id is not the agent's current intent",
    "unknown_intent": "no intent has that id (it may have been compacted away)",
    "not_active": "revoke of an intent that is already finished",
    "stale_index": "apply was called with a Raft index not above the last one applied",
    "internal": "the engine failed on a valid command (a bug); every replica refused it alike, nothing changed",
}


class CommandError(ValueError):
    """Returned when a command is malformed or refused; ``code`` is one of ``CODES``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def to_json(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


@dataclass(frozen=True)
class Problem:
    """One registry validation problem: which concept (id, or ``#n`` when it has none), which
    field, and what is wrong."""

    concept: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"concept {self.concept!r} field {self.field!r}: {self.message}"

    def to_json(self) -> dict[str, str]:
        return {"concept": self.concept, "field": self.field, "message": self.message}


# Enough to fix a registry in one pass without making the error itself unbounded.
PROBLEMS_MAX = 100


class RegistryError(CommandError):
    """Returned when a concept registry fails validation; ``problems`` lists every problem found
    (up to ``PROBLEMS_MAX``), each naming the concept and the field."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems[:PROBLEMS_MAX]
        lines = "; ".join(str(p) for p in self.problems)
        more = f" (and {len(problems) - PROBLEMS_MAX} more)" if len(problems) > PROBLEMS_MAX else ""
        super().__init__("invalid_registry", f"invalid concept registry: {lines}{more}")

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        out["error"]["problems"] = [p.to_json() for p in self.problems]
        return out
