"""The connections: ``ServerConnection`` (a node's side) and ``ClientConnection`` (a shim's)."""

from __future__ import annotations

from typing import Any, ClassVar

from tetherlab.cluster.protocol.errors import (
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    RequestId,
)
from tetherlab.cluster.protocol.fields import MAX_FRAME_BYTES, MAX_IN_FLIGHT, PROTOCOL_VERSIONS, preview
from tetherlab.cluster.protocol.framing import (
    NEED_DATA,
    ConnectionClosed,
    Event,
    FrameFault,
    LineReader,
    NeedData,
    ProtocolViolation,
    parse_frame,
)
from tetherlab.cluster.protocol.messages import (
    Error,
    Hello,
    HelloOk,
    Kind,
    Message,
    Reply,
    Request,
    Role,
    encode,
    negotiate,
)
from tetherlab.cluster.protocol.states import TRANSITIONS, State

# --- Connections --------------------------------------------------------------------------


class Connection:
    our_role: ClassVar[Role]
    their_role: ClassVar[Role]

    def __init__(
        self,
        *,
        versions: tuple[int, ...] = PROTOCOL_VERSIONS,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self.versions = tuple(versions)
        self.max_frame_bytes = max_frame_bytes
        self.max_in_flight = max_in_flight
        self._reader = LineReader(max_frame_bytes)
        self._state = State.AWAIT_HELLO
        # Requests the client sent that the server has not answered, with their type: both
        # sides keep the same set (one from sending, the other from receiving).
        self._in_flight: dict[RequestId, type[Request]] = {}
        self._hello_offer: tuple[int, ...] | None = None  # versions of the pending hello
        self._version: int | None = None

    @property
    def state(self) -> State:
        return self._state

    @property
    def version(self) -> int | None:
        """The negotiated protocol version, once hello_ok has passed."""
        return self._version

    @property
    def in_flight(self) -> frozenset[RequestId]:
        """Ids of requests sent and not yet answered."""
        return frozenset(self._in_flight)

    @property
    def peer_closed(self) -> bool:
        """The peer sent EOF; we may still answer what it asked, then close()."""
        return self._reader.eof

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` means EOF."""
        if self._state is State.CLOSED:
            return  # bytes that were in flight when we closed
        if self._reader.eof:
            if data:
                raise LocalProtocolError(ErrorCode.CONNECTION_CLOSED, "receive_data() after EOF")
            return
        self._reader.feed(bytes(data))

    def next_event(self) -> Event | NeedData:
        """The next event, or NEED_DATA. Never raises for anything the peer sent."""
        while True:
            if self._state is State.CLOSED:
                return ConnectionClosed()
            item = self._reader.next_frame()
            if item is None:
                return ConnectionClosed() if self._reader.eof else NEED_DATA
            if isinstance(item, FrameFault):
                return ProtocolViolation(item.code, item.message)
            if not item.strip():
                continue  # blank lines are allowed as keepalives
            try:
                msg = parse_frame(item, self.their_role)
                self._apply(msg, RemoteProtocolError)
            except RemoteProtocolError as exc:
                return ProtocolViolation(exc.code, exc.message, exc.id)
            return msg

    def events(self) -> list[Event]:
        """Every event available now, ending with ConnectionClosed if the peer closed."""
        out: list[Event] = []
        while not isinstance(event := self.next_event(), NeedData):
            out.append(event)
            if isinstance(event, ConnectionClosed):
                break
        return out

    def send(self, event: Message | ProtocolViolation | ConnectionClosed) -> bytes:
        """Validate ``event`` against the state table, bookkeep it, and return its frame."""
        if self._state is State.CLOSED:
            raise LocalProtocolError(ErrorCode.CONNECTION_CLOSED, "send() after close()")
        if isinstance(event, ConnectionClosed):
            self.close()
            return b""
        if isinstance(event, ProtocolViolation):
            if self.our_role is not Role.SERVER:
                raise LocalProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "only a server answers violations")
            # The offending frame never entered the bookkeeping, so its answer does not either.
            return self._frame(event.to_error())
        if not isinstance(event, Message):
            raise LocalProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"cannot send {type(event).__name__}")
        if event.sender is not self.our_role:
            raise LocalProtocolError(
                ErrorCode.UNEXPECTED_MESSAGE, f"a {self.our_role.value} may not send {event.type!r}", id_of(event)
            )
        data = self._frame(event)
        self._apply(event, LocalProtocolError)
        return data

    def close(self) -> None:
        """Stop sending; the caller closes the channel. Idempotent."""
        if self._state is not State.CLOSED:
            self._state = TRANSITIONS[(self._state, self.our_role, Kind.CLOSE)]

    def _frame(self, msg: Message) -> bytes:
        data = encode(msg)
        if len(data) - 1 > self.max_frame_bytes:
            raise LocalProtocolError(
                ErrorCode.FRAME_TOO_LARGE, f"{msg.type} is {len(data) - 1} bytes, over {self.max_frame_bytes}"
            )
        return data

    def _apply(self, msg: Message, fault: type[ProtocolError]) -> None:
        """Check ``msg`` against the table and the request bookkeeping, then commit. ``fault`` is
        LocalProtocolError for what we send and RemoteProtocolError for what we receive; on a
        fault nothing has changed."""
        rid = id_of(msg)
        new_state = TRANSITIONS.get((self._state, msg.sender, msg.kind))
        if new_state is None:
            if self._state is State.AWAIT_HELLO and msg.kind is Kind.REQUEST:
                raise fault(ErrorCode.NOT_HELLO, f"{msg.type!r} before the hello exchange finished", rid)
            raise fault(ErrorCode.UNEXPECTED_MESSAGE, f"{msg.type!r} is not allowed in state {self._state.value}", rid)
        version = self._version
        offer = self._hello_offer
        if isinstance(msg, Request):
            if msg.id in self._in_flight:
                raise fault(ErrorCode.DUPLICATE_ID, f"request id {preview(msg.id)} is still in flight", rid)
            if len(self._in_flight) >= self.max_in_flight:
                raise fault(ErrorCode.TOO_MANY_REQUESTS, f"{self.max_in_flight} requests already in flight", rid)
            if isinstance(msg, Hello):
                if offer is not None:
                    raise fault(ErrorCode.UNEXPECTED_MESSAGE, "a hello is already waiting for its answer", rid)
                offer = msg.versions
            self._in_flight[msg.id] = type(msg)
        elif isinstance(msg, Reply) and msg.id is not None:  # an Error with no id answers nothing
            asked = self._in_flight.get(msg.id)
            if asked is None:
                raise fault(ErrorCode.UNKNOWN_REPLY_ID, f"{msg.type} for id {preview(msg.id)}, not in flight", rid)
            # hello_ok answers only a hello, result/redirect/unavailable never do, error answers anything
            if (msg.kind is Kind.HELLO_OK) != (asked is Hello) and msg.kind is not Kind.ERROR:
                raise fault(ErrorCode.UNEXPECTED_MESSAGE, f"{msg.type} cannot answer {asked.type!r}", rid)
            if isinstance(msg, HelloOk):
                if offer is None or msg.version not in offer:
                    raise fault(ErrorCode.VERSION_MISMATCH, f"hello_ok chose version {msg.version}, "
                                f"not one of those offered {list(offer or ())}", rid)  # fmt: skip
                version = msg.version
            if asked is Hello:
                offer = None
            del self._in_flight[msg.id]
        self._state, self._version, self._hello_offer = new_state, version, offer


def id_of(msg: Message) -> RequestId | None:
    return getattr(msg, "id", None)


class ServerConnection(Connection):
    """The node's side of one SSH channel. Answer every request event (``Hello`` included)
    with exactly one reply carrying its id, and every ProtocolViolation with ``send(it)``."""

    our_role: ClassVar[Role] = Role.SERVER
    their_role: ClassVar[Role] = Role.CLIENT

    def answer_hello(self, hello: Hello, *, node_id: str, server_version: str) -> HelloOk | Error:
        """The reply to ``hello``: the highest common version, or an error naming both sides'."""
        version = negotiate(hello.versions, self.versions)
        if version is None:
            return Error(
                id=hello.id,
                code=ErrorCode.VERSION_MISMATCH,
                message=f"no common protocol version: client offers {list(hello.versions)}, "
                f"server supports {list(self.versions)}",
            )
        return HelloOk(id=hello.id, version=version, node_id=node_id, server_version=server_version)


class ClientConnection(Connection):
    """The shim's side: send ``Hello`` first, then requests; replies come back as events
    carrying the request's id (match them with your own id -> future map)."""

    our_role: ClassVar[Role] = Role.CLIENT
    their_role: ClassVar[Role] = Role.SERVER

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._next_id = 0

    def next_id(self) -> int:
        """A fresh request id (1, 2, 3, ...); never one in flight."""
        self._next_id += 1
        while self._next_id in self._in_flight:
            self._next_id += 1
        return self._next_id

    def hello(self, *, client_name: str, client_version: str, agent: str | None = None) -> Hello:
        """A Hello offering every version this connection speaks (then ``send()`` it)."""
        return Hello(
            id=self.next_id(), versions=self.versions, client_name=client_name,
            client_version=client_version, agent=agent,
        )  # fmt: skip
