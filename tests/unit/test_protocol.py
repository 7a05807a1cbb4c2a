"""The shim protocol (shim/protocol.py): framing, messages, and the per-connection state table.

Most tests wire a ClientConnection and a ServerConnection through ConnectionPair, a fake link
that carries bytes; the rest feed raw bytes to one side, as a misbehaving peer would.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tetherlab.cluster.protocol import (
    MAX_FRAME_BYTES,
    MAX_IN_FLIGHT,
    MESSAGE_TYPES,
    NEED_DATA,
    TRANSITIONS,
    Abandon,
    ClientConnection,
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
    ConnectionClosed,
    Error,
    ErrorCode,
    Event,
    FileReport,
    Heartbeat,
    Hello,
    HelloOk,
    Intent,
    IntentsList,
    IntentsRevoke,
    KeysAdd,
    KeysList,
    KeysRevoke,
    Kind,
    LocalProtocolError,
    Message,
    OpenSession,
    Ping,
    ProtocolViolation,
    Redirect,
    RemoteProtocolError,
    ReportChanges,
    Request,
    Result,
    Revoked,
    Role,
    ServerConnection,
    ShimReport,
    State,
    Status,
    SubmitIntent,
    SymbolReport,
    UiTokenIssue,
    UiTokenRevoke,
    UiTokensList,
    Unavailable,
    VerdictChanged,
    VerifyCommits,
    WorldSlice,
    decode,
    encode,
    negotiate,
    split_address,
    split_agent_id,
)

AGENT = "alice/4b2e0c1a-1111-4222-8333-0123456789ab"
BOB = "bob/00000000-0000-4000-8000-000000000000"


class ConnectionPair:
    """A client and a server joined by a fake link: what one side sends the other receives."""

    def __init__(self, **kwargs: Any) -> None:
        self.client = ClientConnection(**kwargs)
        self.server = ServerConnection(**kwargs)

    def to_server(self, *events: Message) -> list[Event]:
        self.server.receive_data(b"".join(self.client.send(e) for e in events))
        return self.server.events()

    def to_client(self, *events: Message | ProtocolViolation) -> list[Event]:
        self.client.receive_data(b"".join(self.server.send(e) for e in events))
        return self.client.events()

    def raw_to_server(self, data: bytes) -> list[Event]:
        self.server.receive_data(data)
        return self.server.events()

    def raw_to_client(self, data: bytes) -> list[Event]:
        self.client.receive_data(data)
        return self.client.events()

    def handshake(self) -> HelloOk:
        (hello,) = self.to_server(self.client.hello(client_name="tether", client_version="0.1.0"))
        assert isinstance(hello, Hello)
        reply = self.server.answer_hello(hello, node_id="n1", server_version="0.1.0")
        (ok,) = self.to_client(reply)
        assert isinstance(ok, HelloOk)
        return ok


def ready_pair(**kwargs: Any) -> ConnectionPair:
    pair = ConnectionPair(**kwargs)
    pair.handshake()
    return pair


def snapshot(conn: ClientConnection | ServerConnection) -> tuple[Any, ...]:
    return (conn.state, conn.in_flight, conn.version, conn.peer_closed)


def frame(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"


INTENT = Intent(
    summary="Refactor auth layer to use JWT instead of session cookies",
    steps=("Replace cookie-based session middleware with JWT verification", "Deprecate the in-memory session store"),
    files=("auth/session.py",),
    concepts=Concepts(modify=("auth.session-store-contract",), depend=("auth.jwt",)),
)

# One valid instance of every message type.
SAMPLES: list[Message] = [
    Hello(id=1, versions=(1, 2), client_name="tether", client_version="0.1.0", agent="claude-code 2.1"),
    Ping(id="p-1"),
    Status(id=2),
    OpenSession(
        id=3, agent_id=AGENT, tool="claude-code", machine="laptop", repo_remote="git@github.com:a/b.git",
        base_commit="0123abcd", ttl_s=30,
    ),
    Heartbeat(id=4, agent_ids=(AGENT, BOB)),
    SubmitIntent(id=5, agent_id=AGENT, tool="claude-code", intent=INTENT, trigger="initial"),
    Complete(id=6, agent_id=AGENT, intent_id="i-1"),
    Abandon(id=7, agent_id=AGENT, intent_id="i-1"),
    CloseSession(id=71, agent_id=AGENT),
    WorldSlice(id=8, agent_id=AGENT),
    KeysAdd(id=9, developer="alice", public_key="ssh-ed25519 AAAA alice@laptop", role="admin"),
    KeysList(id=10),
    KeysRevoke(id=11, key_id="k-1"),
    ConceptsPush(id=12, toml='[concept."auth.jwt"]\nsummary = "x"\n'),
    ConceptsPush(id=12, toml="[[concept]]", index_digest="ab" * 32),
    ConceptsIndex(id=12, digest="ab" * 32, seq=0, total=2, data="eJzLSM3JyQcABiwCFQ==", activate=False),
    ConceptsList(id=13),
    ConceptsShow(id=14, concept_id="auth.jwt"),
    IntentsList(id=15, all=True, limit=10, cursor="c-1"),
    IntentsRevoke(id=16, intent_id="i-1", revert=True),
    ClusterAdd(id=17, node_id="n4", raft="10.0.0.4:7100", ssh="10.0.0.4:7200", http="10.0.0.4:7300"),
    ClusterRemove(id=18, node_id="n1"),
    ShimReport(id=19, agent_id="alice/4b2e0000-0000-4000-8000-0000000091af", event="failed_closed",
               at_unix_ms=1_795_000_000_000, detail="no quorum for 5 s"),
    VerifyCommits(id=20, commits=(
        CommitClaim(commit="0123abcd" * 5, paths=("src/auth/session_store.py", "README.md"),
                    agent="alice/4b2e0000-0000-4000-8000-0000000091af", intent="i-42", fence=42),
        CommitClaim(commit="fedc" * 10, paths=()),
    )),
    UiTokenIssue(id=21, name="prometheus"),
    UiTokenRevoke(id=22, name="team-screen"),
    UiTokensList(id=23),
    ReportChanges(id=24, agent_id="alice/4b2e0000-0000-4000-8000-0000000091af", intent_id="i-42", files=(
        FileReport(path="src/auth/store.py", symbols=(SymbolReport(name="SessionStore.get", change="renamed",
                                                                   old_name="SessionStore.fetch"),),
                   hunks=((10, 24), (40, 41))),
        FileReport(path="docs/x.md", change="added"),
    ), truncated=True),
    ConflictsList(id=25, limit=50),
    HelloOk(id=1, version=1, node_id="n1", server_version="0.1.0"),
    Result(id=2, payload={"verdict": "continue", "context": "ok", "slice": [1, 2.5, None, True]}),
    Redirect(id=3, leader_id="n2", leader_address="[::1]:2222"),
    Unavailable(id=4, reason="no_quorum", retry_after_ms=250, message="2 of 3 nodes down"),
    Error(id=5, code="forbidden", message="agent bob/... belongs to another developer"),
    Error(code="bad_json", message="frame is not JSON"),
    VerdictChanged(agent_id=AGENT, intent_id="i-1", verdict={"verdict": "stop", "conflicts": []}),
    Revoked(agent_id=AGENT, reason="key revoked", intent_id="i-1", revert=False),
]


# --- Messages -----------------------------------------------------------------------------


def test_every_message_type_has_a_sample() -> None:
    assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.type)
def test_messages_round_trip_through_json(msg: Message) -> None:
    data = encode(msg)
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert decode(json.loads(data)) == msg


def test_the_seed_intent_decodes_as_a_submit_intent() -> None:
    seed = {
        "type": "submit_intent",
        "id": "r1",
        "agent_id": AGENT,
        "tool": "claude-code",
        "intent": {"summary": "Refactor auth layer", "steps": ["Replace middleware", "Deprecate the store"]},
        "trigger": "initial",
    }
    msg = decode(seed)
    assert isinstance(msg, SubmitIntent)
    assert msg.intent.steps == ("Replace middleware", "Deprecate the store")
    assert msg.intent.files is None and msg.intent.concepts is None


def test_construction_validates_and_normalises_lists() -> None:
    hb = Heartbeat(id=1, agent_ids=[AGENT])  # type: ignore[arg-type]
    assert hb.agent_ids == (AGENT,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        hb.id = 2  # type: ignore[misc]
    bad: list[tuple[Any, str]] = [
        (lambda: Ping(id=True), "'id'"),
        (lambda: Ping(id=-1), "'id'"),
        (lambda: Ping(id="x" * 65), "'id'"),
        (lambda: WorldSlice(id=1, agent_id="alice"), "'agent_id'"),
        (lambda: WorldSlice(id=1, agent_id="al ice/4b2e0c1a-1111-4222-8333-0123456789ab"), "'agent_id'"),
        (lambda: Heartbeat(id=1, agent_ids=()), "'agent_ids'"),
        (lambda: KeysAdd(id=1, developer="alice", public_key="k", role="root"), "'role'"),  # type: ignore[arg-type]
        (lambda: IntentsList(id=1, limit=0), "'limit'"),
        (lambda: Unavailable(id=1, reason="bored", retry_after_ms=1), "'reason'"),  # type: ignore[arg-type]
        (lambda: Redirect(id=1, leader_id="n2", leader_address="host:99999"), "'leader_address'"),
        (lambda: Result(id=1, payload={"x": float("nan")}), "'payload.x'"),
        (lambda: Result(id=1, payload={"x": {1, 2}}), "'payload.x'"),
        (lambda: Error(code="Bad Code", message="m"), "'code'"),
        (lambda: Hello(id=1, versions=(), client_name="t", client_version="1"), "'versions'"),
        (
            lambda: OpenSession(id=1, agent_id=AGENT, tool="t", machine="m\n", repo_remote="r", base_commit="abc1234"),
            "'machine'",
        ),
    ]
    for make, field_name in bad:
        with pytest.raises(LocalProtocolError) as info:
            make()
        assert info.value.code == ErrorCode.BAD_FIELD
        assert field_name in info.value.message


def test_decoding_refuses_what_construction_refuses() -> None:
    """decode() builds messages without running the constructor's checks a second time: each
    field's decoding and the cross-field rules must refuse the same values, naming the field."""
    bad_ids = [AGENT, AGENT, "alice", AGENT]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"type": "redirect", "id": 1, "leader_id": "n2", "leader_address": "host:99999"}, "'leader_address'"),
        ({"type": "heartbeat", "id": 1, "agent_ids": bad_ids}, "'agent_ids[2]'"),
        ({"type": "heartbeat", "id": 1, "agent_ids": [AGENT, "bob/\u0000"]}, "'agent_ids[1]'"),
        ({"type": "heartbeat", "id": 1, "agent_ids": []}, "'agent_ids'"),
        ({"type": "open_session", "id": 1, "agent_id": AGENT, "tool": "t", "machine": "m\x7f", "repo_remote": "r",
          "base_commit": "abc1234"}, "'machine'"),
        ({"type": "open_session", "id": 1, "agent_id": AGENT, "tool": "t", "machine": "café\x1b",
          "repo_remote": "r", "base_commit": "abc1234"}, "'machine'"),
        ({"type": "open_session", "id": 1, "agent_id": AGENT, "tool": "t", "machine": "caf\ud800",
          "repo_remote": "r", "base_commit": "abc1234"}, "'machine'"),
        ({"type": "submit_intent", "id": 1, "agent_id": AGENT, "tool": "t", "trigger": "initial",
          "intent": {"summary": "s", "steps": ["ok", "a\x00b"]}}, "'intent.steps[1]'"),
    ]
    for obj, field_name in cases:
        sender = Role.SERVER if obj["type"] == "redirect" else Role.CLIENT
        with pytest.raises(RemoteProtocolError) as info:
            decode(obj, sender=sender)
        assert info.value.code == ErrorCode.BAD_FIELD, obj
        assert field_name in info.value.message, (obj, info.value.message)
    # Text with newlines and non-ASCII characters is fine where a field is multi-line.
    ok = decode({"type": "submit_intent", "id": 1, "agent_id": AGENT, "tool": "t", "trigger": "initial",
                 "intent": {"summary": "résumé → tidy\n", "steps": ["a\tb\nc"]}}, sender=Role.CLIENT)
    assert isinstance(ok, SubmitIntent) and ok.intent.summary == "résumé → tidy\n"


def test_helpers() -> None:
    assert split_agent_id(AGENT) == ("alice", "4b2e0c1a-1111-4222-8333-0123456789ab")
    with pytest.raises(LocalProtocolError):
        split_agent_id("alice")
    assert split_address("node-1.example:2222") == ("node-1.example", 2222)
    assert split_address("[::1]:22") == ("::1", 22)
    for bad in ("host", "host:0", "host:65536", ":22", "a b:22"):
        with pytest.raises(LocalProtocolError):
            split_address(bad)
    assert negotiate((1, 2, 3), (2, 3, 4)) == 3
    assert negotiate((1,), (2,)) is None


def test_decode_blames_the_peer() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode({"type": "world_slice", "id": 7, "agent_id": 5})
    assert (info.value.code, info.value.id) == (ErrorCode.BAD_FIELD, 7)
    assert "'agent_id'" in info.value.message and "number" in info.value.message


# --- Hello --------------------------------------------------------------------------------


def test_hello_negotiates_the_highest_common_version() -> None:
    pair = ConnectionPair()
    pair.client = ClientConnection(versions=(1, 2, 3))
    pair.server = ServerConnection(versions=(1, 2))
    ok = pair.handshake()
    assert ok.version == 2
    assert pair.client.version == pair.server.version == 2
    assert pair.client.state is pair.server.state is State.READY
    assert pair.client.in_flight == pair.server.in_flight == frozenset()


def test_version_mismatch_names_both_sides_and_lets_the_client_retry() -> None:
    pair = ConnectionPair()
    pair.client = ClientConnection(versions=(7, 8))
    (hello,) = pair.to_server(pair.client.hello(client_name="tether", client_version="9"))
    assert isinstance(hello, Hello)
    (err,) = pair.to_client(pair.server.answer_hello(hello, node_id="n1", server_version="0.1"))
    assert isinstance(err, Error) and err.code == ErrorCode.VERSION_MISMATCH
    assert "[7, 8]" in err.message and "[1]" in err.message
    assert pair.client.state is pair.server.state is State.AWAIT_HELLO
    assert pair.client.in_flight == pair.server.in_flight == frozenset()
    # a second hello with a version the server speaks succeeds on the same connection
    (hello2,) = pair.to_server(Hello(id=pair.client.next_id(), versions=(1,), client_name="t", client_version="9"))
    assert isinstance(hello2, Hello)
    assert isinstance(pair.to_client(pair.server.answer_hello(hello2, node_id="n1", server_version="0.1"))[0], HelloOk)
    assert pair.client.state is State.READY


# --- Error codes, table-driven -------------------------------------------------------------

HELLO_FRAME = frame({"type": "hello", "id": "h", "versions": [1], "client_name": "raw", "client_version": "1"})

# (name, needs hello first, raw bytes the client sends, expected code, expected id)
SERVER_RECEIVES: list[tuple[str, bool, bytes, str, Any]] = [
    ("garbage", True, b"hello there\n", ErrorCode.BAD_JSON, None),
    ("truncated json", True, b'{"type":"ping","id":1\n', ErrorCode.BAD_JSON, None),
    ("not utf-8", True, b'{"type":"ping","id":"\xff"}\n', ErrorCode.BAD_JSON, None),
    ("NaN", True, b'{"type":"ping","id":NaN}\n', ErrorCode.BAD_JSON, None),
    ("deeply nested", True, b"[" * 100_000 + b"\n", ErrorCode.BAD_JSON, None),
    ("huge integer", True, b'{"type":"ping","id":' + b"9" * 5000 + b"}\n", ErrorCode.BAD_JSON, None),
    ("array", True, b"[1, 2]\n", ErrorCode.NOT_OBJECT, None),
    ("string", True, b'"ping"\n', ErrorCode.NOT_OBJECT, None),
    ("too large", True, b"x" * (MAX_FRAME_BYTES + 1) + b"\n", ErrorCode.FRAME_TOO_LARGE, None),
    ("unknown type", True, frame({"type": "launch", "id": 1}), ErrorCode.UNKNOWN_TYPE, 1),
    ("no type", True, frame({"id": 2}), ErrorCode.MISSING_FIELD, 2),
    ("type not a string", True, frame({"type": 5, "id": 3}), ErrorCode.BAD_FIELD, 3),
    ("missing field", True, frame({"type": "world_slice", "id": 4}), ErrorCode.MISSING_FIELD, 4),
    ("missing id", True, frame({"type": "ping"}), ErrorCode.MISSING_FIELD, None),
    ("id is a bool", True, frame({"type": "ping", "id": True}), ErrorCode.BAD_FIELD, None),
    ("id is a float", True, frame({"type": "ping", "id": 1.5}), ErrorCode.BAD_FIELD, None),
    ("agent_id a number", True, frame({"type": "world_slice", "id": 5, "agent_id": 5}), ErrorCode.BAD_FIELD, 5),
    ("agent_id malformed", True, frame({"type": "world_slice", "id": 6, "agent_id": "x"}), ErrorCode.BAD_FIELD, 6),
    ("ttl_s a string", True,
     frame({"type": "open_session", "id": 7, "agent_id": AGENT, "tool": "t", "machine": "m", "repo_remote": "r",
            "base_commit": "abcdef0", "ttl_s": "30"}), ErrorCode.BAD_FIELD, 7),
    ("nested field", True,
     frame({"type": "submit_intent", "id": 8, "agent_id": AGENT, "tool": "t", "trigger": "initial",
            "intent": {"summary": "s", "steps": [], "concepts": {"modify": "auth"}}}), ErrorCode.BAD_FIELD, 8),
    ("nested missing", True,
     frame({"type": "submit_intent", "id": 9, "agent_id": AGENT, "tool": "t", "trigger": "initial",
            "intent": {"steps": []}}), ErrorCode.MISSING_FIELD, 9),
    ("bad trigger", True,
     frame({"type": "submit_intent", "id": 10, "agent_id": AGENT, "tool": "t", "trigger": "later",
            "intent": {"summary": "s", "steps": []}}), ErrorCode.BAD_FIELD, 10),
    ("unknown field", True, frame({"type": "ping", "id": 11, "force": True}), ErrorCode.UNKNOWN_FIELD, 11),
    ("reply from a client", True, frame({"type": "result", "id": 12, "payload": {}}), ErrorCode.UNEXPECTED_MESSAGE, 12),
    ("second hello", True, HELLO_FRAME.replace(b'"h"', b'"h2"'), ErrorCode.UNEXPECTED_MESSAGE, "h2"),
    ("request before hello", False, frame({"type": "ping", "id": 13}), ErrorCode.NOT_HELLO, 13),
    ("hello twice while pending", False, HELLO_FRAME + HELLO_FRAME.replace(b'"h"', b'"h3"'),
     ErrorCode.UNEXPECTED_MESSAGE, "h3"),
    ("duplicate id", True, frame({"type": "ping", "id": 14}) * 2, ErrorCode.DUPLICATE_ID, 14),
    ("flood", True, b"".join(frame({"type": "ping", "id": i}) for i in range(MAX_IN_FLIGHT + 1)),
     ErrorCode.TOO_MANY_REQUESTS, MAX_IN_FLIGHT),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "after_hello", "data", "code", "rid"), SERVER_RECEIVES, ids=[r[0] for r in SERVER_RECEIVES]
)
def test_server_turns_bad_input_into_an_error_and_carries_on(
    name: str, after_hello: bool, data: bytes, code: str, rid: Any
) -> None:
    pair = ready_pair() if after_hello else ConnectionPair()
    server = pair.server
    # the prefix of multi-frame cases (first hello, first duplicate, the 64 allowed pings) is fine
    *fine, last = pair.raw_to_server(data)
    assert all(isinstance(e, Message) for e in fine), fine
    before = snapshot(server)
    assert isinstance(last, ProtocolViolation), last
    assert (last.code, last.id) == (code, rid)
    assert last.message
    assert snapshot(server) == before  # nothing changed: the violation was reported, not applied
    # the answer is an error frame with the same code and id, and the bookkeeping ignores it
    reply = decode(json.loads(server.send(last)))
    assert isinstance(reply, Error) and (reply.code, reply.id) == (code, rid)
    assert snapshot(server) == before
    # and the connection carries on: finish the hello if needed, then a request goes through
    if server.state is State.AWAIT_HELLO:
        if not server.in_flight:
            (hello,) = pair.raw_to_server(HELLO_FRAME)
            assert isinstance(hello, Hello)
        server.send(HelloOk(id="h", version=1, node_id="n1", server_version="1"))
    for outstanding in server.in_flight:  # a flood leaves no free slot until some are answered
        server.send(Result(id=outstanding, payload={}))
    assert pair.raw_to_server(frame({"type": "ping", "id": "after"})) == [Ping(id="after")]


def test_truncated_frame_at_eof() -> None:
    pair = ready_pair()
    events = pair.raw_to_server(b'{"type":"ping","id":1}\n{"type":"pi')
    assert events == [Ping(id=1)]
    assert pair.raw_to_server(b"") == [
        ProtocolViolation(ErrorCode.TRUNCATED_FRAME, "EOF after 11 bytes of a frame"),
        ConnectionClosed(),
    ]
    assert pair.server.peer_closed
    # the server may still answer what the client asked before EOF, then closes
    assert pair.server.send(Result(id=1, payload={})).startswith(b'{"type":"result"')
    pair.server.close()
    assert pair.server.state is State.CLOSED
    assert pair.server.next_event() == ConnectionClosed()


# (raw bytes the server sends to a ready client with request 1 in flight, expected code)
CLIENT_RECEIVES: list[tuple[bytes, str]] = [
    (frame({"type": "result", "id": 99, "payload": {}}), ErrorCode.UNKNOWN_REPLY_ID),
    (frame({"type": "hello_ok", "id": 1, "version": 1, "node_id": "n", "server_version": "1"}),
     ErrorCode.UNEXPECTED_MESSAGE),
    (frame({"type": "ping", "id": 5}), ErrorCode.UNEXPECTED_MESSAGE),
    (frame({"type": "redirect", "id": 1, "leader_id": "n2", "leader_address": "nohost"}), ErrorCode.BAD_FIELD),
    (frame({"type": "unavailable", "id": 1, "reason": "no_quorum"}), ErrorCode.MISSING_FIELD),
    (frame({"type": "verdict_changed", "agent_id": AGENT, "intent_id": "i", "verdict": []}), ErrorCode.BAD_FIELD),
    (frame({"type": "revoked", "id": 1, "agent_id": AGENT, "reason": "r"}), ErrorCode.UNKNOWN_FIELD),
    (b"\x00\x01garbage\n", ErrorCode.BAD_JSON),
]  # fmt: skip


def test_client_reports_bad_replies_and_carries_on() -> None:
    pair = ready_pair()
    pair.client.send(Ping(id=1))
    before = snapshot(pair.client)
    for data, code in CLIENT_RECEIVES:
        (event,) = pair.raw_to_client(data)
        assert isinstance(event, ProtocolViolation) and event.code == code, (data, event)
        assert snapshot(pair.client) == before
    # the real reply still matches
    assert pair.raw_to_client(frame({"type": "result", "id": 1, "payload": {"pong": True}})) == [
        Result(id=1, payload={"pong": True})
    ]
    assert pair.client.in_flight == frozenset()


def test_client_refuses_hello_ok_with_a_version_it_did_not_offer() -> None:
    client = ClientConnection()
    client.send(Hello(id=1, versions=(1,), client_name="t", client_version="1"))
    client.receive_data(frame({"type": "hello_ok", "id": 1, "version": 2, "node_id": "n", "server_version": "1"}))
    (event,) = client.events()
    assert isinstance(event, ProtocolViolation) and event.code == ErrorCode.VERSION_MISMATCH
    assert client.state is State.AWAIT_HELLO and client.in_flight == {1}


def test_unsolicited_error_and_notifications_reach_the_client() -> None:
    pair = ready_pair()
    bad = pair.raw_to_server(b"junk\n")
    assert len(bad) == 1 and isinstance(bad[0], ProtocolViolation)
    notes = pair.to_client(
        bad[0],
        VerdictChanged(agent_id=AGENT, intent_id="i-1", verdict={"verdict": "stop"}),
        Revoked(agent_id=AGENT, reason="key revoked"),
    )
    assert [type(n) for n in notes] == [Error, VerdictChanged, Revoked]
    assert notes[0] == Error(code=ErrorCode.BAD_JSON, message=bad[0].message)


# --- Local misuse ---------------------------------------------------------------------------

LOCAL_MISUSE: list[tuple[str, Any, str]] = [
    ("client request before hello", lambda p: p.client.send(Ping(id=1)), ErrorCode.NOT_HELLO),
    ("server notification before hello",
     lambda p: p.server.send(Revoked(agent_id=AGENT, reason="r")), ErrorCode.UNEXPECTED_MESSAGE),
    ("client sends a reply", lambda p: p.client.send(Result(id=1, payload={})), ErrorCode.UNEXPECTED_MESSAGE),
    ("server sends a request", lambda p: p.server.send(Ping(id=1)), ErrorCode.UNEXPECTED_MESSAGE),
    ("server replies to nothing", lambda p: p.server.send(Result(id=1, payload={})), ErrorCode.UNEXPECTED_MESSAGE),
    ("client sends a violation", lambda p: p.client.send(ProtocolViolation("bad_json", "x")),
     ErrorCode.UNEXPECTED_MESSAGE),
]  # fmt: skip

READY_MISUSE: list[tuple[str, Any, str]] = [
    ("duplicate id", lambda p: [p.client.send(Ping(id=1)), p.client.send(Status(id=1))], ErrorCode.DUPLICATE_ID),
    ("flood", lambda p: [p.client.send(Ping(id=i)) for i in range(MAX_IN_FLIGHT + 1)], ErrorCode.TOO_MANY_REQUESTS),
    ("second hello", lambda p: p.client.send(p.client.hello(client_name="t", client_version="1")),
     ErrorCode.UNEXPECTED_MESSAGE),
    ("reply to an unknown id", lambda p: p.server.send(Result(id=42, payload={})), ErrorCode.UNKNOWN_REPLY_ID),
    ("hello_ok after hello", lambda p: p.server.send(HelloOk(id=1, version=1, node_id="n", server_version="1")),
     ErrorCode.UNEXPECTED_MESSAGE),
    ("frame too large", lambda p: p.client.send(ConceptsPush(id=1, toml="x" * MAX_FRAME_BYTES)),
     ErrorCode.FRAME_TOO_LARGE),
    ("send after close", lambda p: [p.client.close(), p.client.send(Ping(id=1))], ErrorCode.CONNECTION_CLOSED),
]  # fmt: skip


@pytest.mark.parametrize(("name", "act", "code"), LOCAL_MISUSE, ids=[m[0] for m in LOCAL_MISUSE])
def test_local_misuse_before_hello_raises(name: str, act: Any, code: str) -> None:
    pair = ConnectionPair()
    before = snapshot(pair.client), snapshot(pair.server)
    with pytest.raises(LocalProtocolError) as info:
        act(pair)
    assert info.value.code == code
    assert (snapshot(pair.client), snapshot(pair.server)) == before


@pytest.mark.parametrize(("name", "act", "code"), READY_MISUSE, ids=[m[0] for m in READY_MISUSE])
def test_local_misuse_when_ready_raises(name: str, act: Any, code: str) -> None:
    pair = ready_pair()
    with pytest.raises(LocalProtocolError) as info:
        act(pair)
    assert info.value.code == code


def test_server_must_answer_hello_with_an_offered_version_and_only_hello_with_hello_ok() -> None:
    pair = ConnectionPair()
    pair.to_server(Hello(id=1, versions=(1,), client_name="t", client_version="1"))
    with pytest.raises(LocalProtocolError) as info:
        pair.server.send(HelloOk(id=1, version=2, node_id="n", server_version="1"))
    assert info.value.code == ErrorCode.VERSION_MISMATCH
    with pytest.raises(LocalProtocolError):
        pair.server.send(Result(id=1, payload={}))  # only hello_ok or error answers a hello
    assert pair.server.state is State.AWAIT_HELLO and pair.server.in_flight == {1}


# --- Flood ----------------------------------------------------------------------------------


def test_flood_is_refused_past_max_in_flight_and_answers_free_slots() -> None:
    pair = ready_pair()
    flood = b"".join(frame({"type": "ping", "id": i}) for i in range(3 * MAX_IN_FLIGHT))
    events = pair.raw_to_server(flood)
    accepted = [e for e in events if isinstance(e, Ping)]
    refused = [e for e in events if isinstance(e, ProtocolViolation)]
    assert len(accepted) == MAX_IN_FLIGHT and len(refused) == 2 * MAX_IN_FLIGHT
    assert {r.code for r in refused} == {ErrorCode.TOO_MANY_REQUESTS}
    assert len(pair.server.in_flight) == MAX_IN_FLIGHT
    pair.server.send(Result(id=0, payload={}))
    assert pair.raw_to_server(frame({"type": "ping", "id": "next"})) == [Ping(id="next")]


def test_client_tracks_many_requests_and_matches_replies_in_any_order() -> None:
    pair = ready_pair()
    ids = [pair.client.next_id() for _ in range(MAX_IN_FLIGHT)]
    got = pair.to_server(*(Ping(id=i) for i in ids))
    assert len(got) == MAX_IN_FLIGHT
    replies = pair.to_client(*(Result(id=i, payload={"n": i}) for i in reversed(ids)))
    assert [r.id for r in replies if isinstance(r, Result)] == list(reversed(ids))
    assert pair.client.in_flight == pair.server.in_flight == frozenset()


# --- Framing ------------------------------------------------------------------------------


def test_frame_of_exactly_the_limit_is_accepted_and_one_byte_more_is_not() -> None:
    pair = ready_pair()
    body = b'{"type":"ping","id":1}'
    exact = body + b" " * (MAX_FRAME_BYTES - len(body))
    assert pair.raw_to_server(exact + b"\n") == [Ping(id=1)]
    (event,) = pair.raw_to_server(b" " + exact.replace(b":1}", b":2}") + b"\n")
    assert isinstance(event, ProtocolViolation) and event.code == ErrorCode.FRAME_TOO_LARGE


def test_oversized_frame_split_across_many_chunks_is_reported_once_and_not_buffered() -> None:
    pair = ready_pair()
    events: list[Event] = []
    chunk = b"y" * 1000
    for _ in range(4 * MAX_FRAME_BYTES // len(chunk)):
        pair.server.receive_data(chunk)
        events += pair.server.events()
        assert len(pair.server._reader._partial) <= MAX_FRAME_BYTES  # white-box: memory stays bounded
    events += pair.raw_to_server(b'yyy\n{"type":"ping","id":1}\n')
    assert [type(e) for e in events] == [ProtocolViolation, Ping]
    assert isinstance(events[0], ProtocolViolation) and events[0].code == ErrorCode.FRAME_TOO_LARGE


def test_blank_lines_are_ignored() -> None:
    pair = ready_pair()
    assert pair.raw_to_server(b'\n\r\n  \n{"type":"ping","id":1}\r\n\n') == [Ping(id=1)]


def conversation() -> bytes:
    """Everything a (partly misbehaving) client might send in one session."""
    parts = [encode(m) for m in SAMPLES if isinstance(m, Request)]
    parts.insert(3, b"garbage\n")
    parts.insert(5, frame({"type": "nope", "id": "z"}))
    parts.insert(7, b"\xe2\x82\xac" * 10 + b"\n")
    return b"".join(parts)


def feed_server(chunks: list[bytes]) -> list[Event]:
    server = ServerConnection()
    events: list[Event] = []
    for chunk in chunks:
        if chunk:  # b"" would mean EOF
            server.receive_data(chunk)
            events += server.events()
    return events


def test_bytes_split_at_every_position_give_the_same_events() -> None:
    data = conversation()
    whole = feed_server([data])
    assert sum(isinstance(e, ProtocolViolation) for e in whole) >= 3
    assert sum(isinstance(e, Hello) for e in whole) == 1
    for i in range(len(data) + 1):
        assert feed_server([data[:i], data[i:]]) == whole, i
    assert feed_server([data[i : i + 1] for i in range(len(data))]) == whole


def test_transition_table_only_lets_clients_ask_and_servers_answer() -> None:
    for (state, sender, kind), _ in TRANSITIONS.items():
        assert state is not State.CLOSED
        if kind in (Kind.HELLO, Kind.REQUEST):
            assert sender is Role.CLIENT
        elif kind is not Kind.CLOSE:
            assert sender is Role.SERVER


# --- Property tests ------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
known_keys = st.sampled_from(
    ["id", "type", "agent_id", "agent_ids", "intent", "trigger", "versions", "payload", "tool", "toml", "limit"]
)
message_like = st.builds(
    lambda tag, fields, rid: {**fields, "type": tag, "id": rid},
    st.sampled_from([*MESSAGE_TYPES, "bogus"]),
    st.dictionaries(known_keys | st.text(max_size=6), json_values, max_size=5),
    st.integers(0, 8) | st.text(max_size=3) | json_values,
)
fragments = st.one_of(
    st.binary(max_size=64),
    message_like.map(lambda o: json.dumps(o).encode() + b"\n"),
    st.sampled_from([encode(m) for m in SAMPLES]),
    st.just(b"\n"),
)


def check_invariants(conn: ClientConnection | ServerConnection, event: Event, before: tuple[Any, ...]) -> None:
    assert isinstance(event, Message | ProtocolViolation | ConnectionClosed)
    assert conn.state in (State.AWAIT_HELLO, State.READY)
    assert len(conn.in_flight) <= MAX_IN_FLIGHT
    assert (conn.version is None) == (conn.state is State.AWAIT_HELLO)
    if isinstance(event, ProtocolViolation):
        assert snapshot(conn) == before
        assert isinstance(event.to_error(), Error)  # every violation can be answered
        if isinstance(conn, ServerConnection):
            assert conn.send(event).endswith(b"\n")


def drive(conn: ClientConnection | ServerConnection, chunks: list[bytes], eof: bool) -> None:
    for chunk in [*chunks, b""] if eof else chunks:
        conn.receive_data(chunk)
        while True:
            before = snapshot(conn)
            event = conn.next_event()
            if event is NEED_DATA:
                break
            assert not isinstance(event, type(NEED_DATA))
            check_invariants(conn, event, before)
            if isinstance(event, ConnectionClosed):
                assert eof
                break


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=st.lists(st.binary(min_size=1, max_size=200), max_size=20), eof=st.booleans(), hello_first=st.booleans())
def test_random_bytes_never_raise_and_leave_state_consistent(chunks: list[bytes], eof: bool, hello_first: bool) -> None:
    for conn in (ServerConnection(), ClientConnection()):
        if hello_first and isinstance(conn, ServerConnection):
            conn.receive_data(HELLO_FRAME)
            assert isinstance(conn.next_event(), Hello)
        drive(conn, chunks, eof)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(fragments, max_size=30), cuts=st.lists(st.integers(0, 4000), max_size=6), eof=st.booleans())
def test_random_frames_never_raise_and_leave_state_consistent(parts: list[bytes], cuts: list[int], eof: bool) -> None:
    data = b"".join(parts)
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    server = ServerConnection()
    server.receive_data(HELLO_FRAME)
    hello = server.next_event()
    assert isinstance(hello, Hello)
    server.send(server.answer_hello(hello, node_id="n", server_version="1"))
    drive(server, chunks, eof)
    # a ready client with requests 2..5 in flight, so some sample replies match
    client = ClientConnection()
    client.send(client.hello(client_name="t", client_version="1"))
    client.receive_data(frame({"type": "hello_ok", "id": 1, "version": 1, "node_id": "n", "server_version": "1"}))
    assert isinstance(client.next_event(), HelloOk)
    for i in range(2, 6):
        client.send(Ping(id=i))
    drive(client, chunks, eof)


def test_every_protocol_error_code_has_a_test_row() -> None:
    covered = {row[3] for row in SERVER_RECEIVES} | {row[1] for row in CLIENT_RECEIVES}
    covered |= {row[2] for row in LOCAL_MISUSE + READY_MISUSE}
    covered |= {ErrorCode.TRUNCATED_FRAME, ErrorCode.VERSION_MISMATCH}  # tests of their own above
    # The node's own codes, tested where the node produces them (tests/unit/test_service.py).
    reserved_for_the_node = {ErrorCode.FORBIDDEN, ErrorCode.NOT_FOUND, ErrorCode.INTERNAL, ErrorCode.QUOTA_EXCEEDED,
                             ErrorCode.RATE_LIMITED}
    assert covered == set(ErrorCode) - reserved_for_the_node


_json_leaves = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4)
                | st.sampled_from(["\ud800", "x\udfff", (1, 2), b"b", {1, 2}]))
_json_values = st.recursive(_json_leaves, lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(st.text(max_size=3) | st.sampled_from(["\ud801", 7]), inner, max_size=3),
                            max_leaves=12)


def _nested(depth: int, leaf: Any) -> Any:
    for i in range(depth):
        leaf = [leaf] if i % 2 else {"k": leaf}
    return leaf


def _full_check_passes(v: Any) -> bool:
    from tetherlab.cluster.protocol import fields

    try:
        fields._check_plain_json(v, "payload", fields.MAX_JSON_DEPTH)
    except LocalProtocolError:
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(_json_values, st.integers(min_value=0, max_value=40))
def test_the_quick_plain_json_check_never_accepts_what_the_full_one_refuses(value: Any, depth: int) -> None:
    from tetherlab.cluster.protocol import fields

    v = _nested(depth, value)
    full_ok = _full_check_passes(v)
    assert not fields._plain_json(v, fields.MAX_JSON_DEPTH) or full_ok
    # and the spec the messages use answers as the full check does
    if isinstance(v, dict):
        try:
            fields.JsonObject().check(v, "payload")
            assert full_ok
        except LocalProtocolError:
            assert not full_ok


def test_payloads_nested_past_the_limit_are_refused_even_at_a_scalar() -> None:
    for leaf in (1, "s", None, True, 1.5):
        with pytest.raises(LocalProtocolError, match="nests deeper"):
            Result(id=1, payload=_nested(33, leaf))
        Result(id=1, payload=_nested(31, leaf))


_plain_leaves = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                 | st.text(max_size=4).filter(lambda s: not any("\ud800" <= c <= "\udfff" for c in s)))
_plain_values = st.recursive(_plain_leaves, lambda inner: st.lists(inner, max_size=3)
                             | st.dictionaries(st.text(max_size=3).filter(lambda s: not any(
                                 "\ud800" <= c <= "\udfff" for c in s)), inner, max_size=3), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(_plain_values, st.integers(min_value=0, max_value=40))
def test_the_quick_plain_json_check_accepts_all_plain_json_within_the_depth(value: Any, depth: int) -> None:
    # The other direction: for plain values (exact types, no surrogates) the quick check is the
    # full one, at every depth around the limit, so replies never fall to the slow path for nothing.
    from tetherlab.cluster.protocol import fields

    v = _nested(depth, value)
    assert fields._plain_json(v, fields.MAX_JSON_DEPTH) == _full_check_passes(v)
