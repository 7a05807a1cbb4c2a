"""The shim protocol, sans-I/O: bytes in, events out; events in, bytes out.

Shims (`tether`, the admin CLI) talk to a node over the SSH subsystem ``tetherlab``, one JSON
object per line. This module is the whole protocol and does no I/O, reads no clock and draws
no random numbers, so the node's SSH endpoint and the shim client drive the same code (the
h11 pattern)::

    conn.receive_data(chunk)           # b"" means the peer sent EOF
    while (event := conn.next_event()) is not NEED_DATA:
        ...                            # a Message, a ProtocolViolation or ConnectionClosed
    transport.write(conn.send(reply))  # validated, bookkept, framed

Layout (one module per concern, imported in this order): ``errors`` (codes and exceptions);
``fields`` (limits and field specs); ``messages`` (frozen dataclasses validated on construction,
and ``decode``, the one place where a bad field becomes the peer's fault); ``framing`` (lines and
non-message events); ``states`` (the state table); ``connection`` (the two connections). This
package imports nothing else of Tetherlab's; its public names are re-exported here.

Wire format
    One JSON object per line, UTF-8, ``\\n``-terminated, at most ``MAX_FRAME_BYTES`` bytes
    without the newline. Blank lines are ignored. Every object has a ``type``. Requests carry
    an ``id`` (a string of 1..MAX_ID_CHARS characters or an integer 0..2**53-1) and get exactly
    one reply with the same id. Notifications carry no id. Optional fields may be omitted or
    null; unknown fields are refused (``unknown_field``) so a typo is never silently ignored.

Conversation
    client: hello {versions, client_name, client_version, agent?}
    server: hello_ok {version, node_id, server_version} | error version_mismatch
    then any number of requests, up to ``MAX_IN_FLIGHT`` unanswered at once, answered in any
    order by result {payload} | redirect {leader_id, leader_address} |
    unavailable {reason, retry_after_ms, message} | error {code, message}; and the server may
    push verdict_changed / revoked at any time after hello_ok.

Client requests (fields; ``?`` = optional, default in brackets)
    ping {} · status {}
    open_session {agent_id, tool, machine, repo_remote, base_commit, ttl_s?}
    heartbeat {agent_ids: [agent_id, ...]}
    submit_intent {agent_id, tool, intent: {summary, steps: [str], files?: [str],
                   concepts?: {modify: [str], depend: [str]}}, trigger: initial|replan|complete|abandon}
    complete {agent_id, intent_id} · abandon {agent_id, intent_id} · world_slice {agent_id}
    close_session {agent_id}   (the agent exited; an intent it still holds is abandoned)
    admin: keys_add {developer, public_key, role? [developer]} · keys_list {} · keys_revoke {key_id}
           concepts_push {toml, index_digest?} · concepts_index {digest, seq, total, data, activate? [true]}
           concepts_list {} · concepts_show {concept_id}
           intents_list {all? [false], limit? [100], cursor?} · intents_revoke {intent_id, revert? [false]}

Bad input from the peer never raises: it becomes a ``ProtocolViolation`` event with a stable
``code`` (see ``ErrorCode``) and the connection's state is left exactly as it was. The server
answers a violation by sending it back (``server.send(violation)`` frames it as an ``error``).
Misusing the API (sending a reply nobody asked for, a request before hello, ...) raises
``LocalProtocolError``.
"""

from __future__ import annotations

from tetherlab.cluster.protocol.connection import (
    ClientConnection,
    ServerConnection,
)
from tetherlab.cluster.protocol.errors import (
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    RequestId,
)
from tetherlab.cluster.protocol.fields import (
    DEFAULT_LIST_LIMIT,
    MAX_FRAME_BYTES,
    MAX_ID_CHARS,
    MAX_IN_FLIGHT,
    MAX_INT_ID,
    MAX_JSON_DEPTH,
    MAX_LIST_ITEMS,
    MAX_LIST_LIMIT,
    MAX_NAME_CHARS,
    MAX_PATH_CHARS,
    MAX_PUBLIC_KEY_CHARS,
    MAX_RETRY_AFTER_MS,
    MAX_TEXT_CHARS,
    MAX_TTL_S,
    MAX_URL_CHARS,
    MAX_VERSIONS,
    PROTOCOL_VERSIONS,
)
from tetherlab.cluster.protocol.framing import (
    NEED_DATA,
    ConnectionClosed,
    Event,
    NeedData,
    ProtocolViolation,
)
from tetherlab.cluster.protocol.messages import (
    KEY_ROLES,
    MAX_COMMIT_PATHS,
    MESSAGE_TYPES,
    SHIM_EVENTS,
    TRIGGERS,
    UNAVAILABLE_REASONS,
    Abandon,
    CloseSession,
    ClusterAdd,
    ClusterRemove,
    CommitClaim,
    Complete,
    Concepts,
    ConceptsIndex,
    ConceptsList,
    ConceptsPush,
    ConceptsShow,
    ConflictsList,
    Error,
    FileReport,
    Heartbeat,
    Hello,
    HelloOk,
    Intent,
    IntentsList,
    IntentsRevoke,
    KeyRole,
    KeysAdd,
    KeysList,
    KeysRevoke,
    Kind,
    Message,
    Notification,
    OpenSession,
    Ping,
    Redirect,
    Reply,
    ReportChanges,
    Request,
    Result,
    Revoked,
    Role,
    ShimReport,
    Status,
    SubmitIntent,
    SymbolReport,
    Trigger,
    UiTokenIssue,
    UiTokenRevoke,
    UiTokensList,
    Unavailable,
    UnavailableReason,
    VerdictChanged,
    VerifyCommits,
    WorldSlice,
    decode,
    encode,
    negotiate,
    split_address,
    split_agent_id,
)
from tetherlab.cluster.protocol.states import (
    TRANSITIONS,
    State,
)

__all__ = [
    "DEFAULT_LIST_LIMIT",
    "KEY_ROLES",
    "MAX_COMMIT_PATHS",
    "MAX_FRAME_BYTES",
    "MAX_ID_CHARS",
    "MAX_INT_ID",
    "MAX_IN_FLIGHT",
    "MAX_JSON_DEPTH",
    "MAX_LIST_ITEMS",
    "MAX_LIST_LIMIT",
    "MAX_NAME_CHARS",
    "MAX_PATH_CHARS",
    "MAX_PUBLIC_KEY_CHARS",
    "MAX_RETRY_AFTER_MS",
    "MAX_TEXT_CHARS",
    "MAX_TTL_S",
    "MAX_URL_CHARS",
    "MAX_VERSIONS",
    "MESSAGE_TYPES",
    "NEED_DATA",
    "PROTOCOL_VERSIONS",
    "SHIM_EVENTS",
    "TRANSITIONS",
    "TRIGGERS",
    "UNAVAILABLE_REASONS",
    "Abandon",
    "ClientConnection",
    "CloseSession",
    "ClusterAdd",
    "ClusterRemove",
    "CommitClaim",
    "Complete",
    "Concepts",
    "ConceptsIndex",
    "ConceptsList",
    "ConceptsPush",
    "ConceptsShow",
    "ConflictsList",
    "ConnectionClosed",
    "Error",
    "ErrorCode",
    "Event",
    "FileReport",
    "Heartbeat",
    "Hello",
    "HelloOk",
    "Intent",
    "IntentsList",
    "IntentsRevoke",
    "KeyRole",
    "KeysAdd",
    "KeysList",
    "KeysRevoke",
    "Kind",
    "LocalProtocolError",
    "Message",
    "NeedData",
    "Notification",
    "OpenSession",
    "Ping",
    "ProtocolError",
    "ProtocolViolation",
    "Redirect",
    "RemoteProtocolError",
    "Reply",
    "ReportChanges",
    "Request",
    "RequestId",
    "Result",
    "Revoked",
    "Role",
    "ServerConnection",
    "ShimReport",
    "State",
    "Status",
    "SubmitIntent",
    "SymbolReport",
    "Trigger",
    "UiTokenIssue",
    "UiTokenRevoke",
    "UiTokensList",
    "Unavailable",
    "UnavailableReason",
    "VerdictChanged",
    "VerifyCommits",
    "WorldSlice",
    "decode",
    "encode",
    "negotiate",
    "split_address",
    "split_agent_id",
]
