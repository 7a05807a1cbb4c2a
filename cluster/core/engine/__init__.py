"""The coordination engine: pure logic from an agent's plan to a verdict.

No sockets, disks, clocks or randomness: the replicated state machine (LMDB + Raft) feeds it
commands in log order and stores the records it returns, so every node reaches the same verdict.

Layout, one concern per module:
- ``errors``: ``CommandError`` (stable ``code`` + message naming the field) and
  ``RegistryError`` (a list of ``Problem``, each naming concept and field); ``CODES``.
- ``registry``: ``concepts.toml`` parsing and validation, ``Concept``, ``Registry`` with its
  indexes (alias-phrase trie, symbols, path globs, dependents).
- ``globs``, ``text``: path globs with a directory index; words, clauses, verb cues.
- ``plantext``: a plan's tokens, clauses and the role of each mention (modify, depend, none).
- ``codeindex``: the code index (files and the symbols they define), its look-ups and packing.
- ``matching``: an intent's text, files and explicit concepts to claims, each with reasons.
- ``lint``: registry checks for authors (``tetherlab concepts lint``).
- ``model``: intent bodies, intent and session records, the lifecycle table.
- ``commands``: the log's commands as frozen dataclasses; ``decode_command``.
- ``engine``: ``Engine.apply`` (verdicts, sessions, revoke, expiry), records and queries.
- ``world``: world slices and the context text agents read.
- ``testing``: ``Driver``, an in-memory twin of the replicated adapter.
- ``bench``: ``run_bench`` (``tetherlab bench engine``).
"""

from tetherlab.cluster.core.engine.commands import (
    CloseSession,
    Command,
    Expire,
    Heartbeat,
    Init,
    InstallIndex,
    LeaderElected,
    OpenSession,
    PushRegistry,
    Revoke,
    SubmitIntent,
    decode_command,
)
from tetherlab.cluster.core.engine.engine import (
    NAMESPACES,
    Applied,
    Engine,
    Limits,
    MatchBasis,
    needs_match,
    prematched,
    with_match,
)
from tetherlab.cluster.core.engine.matching import match_intent
from tetherlab.cluster.core.engine.model import IntentBody
from tetherlab.cluster.core.engine.registry import Concept, Registry, parse_toml, validate_concepts
from tetherlab.cluster.core.errors import CODES, CommandError, Problem, RegistryError

__all__ = [
    "CODES",
    "NAMESPACES",
    "Applied",
    "CloseSession",
    "Command",
    "CommandError",
    "Concept",
    "Engine",
    "Expire",
    "Heartbeat",
    "Init",
    "InstallIndex",
    "IntentBody",
    "LeaderElected",
    "Limits",
    "MatchBasis",
    "OpenSession",
    "Problem",
    "PushRegistry",
    "Registry",
    "RegistryError",
    "Revoke",
    "SubmitIntent",
    "decode_command",
    "match_intent",
    "needs_match",
    "parse_toml",
    "prematched",
    "validate_concepts",
    "with_match",
]
