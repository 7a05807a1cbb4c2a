"""The state table: every allowed (state, sender, kind) and where it leads."""

from __future__ import annotations

import enum
from typing import Final

from tetherlab.cluster.protocol.messages import Kind, Role

# --- The state table ----------------------------------------------------------------------


class State(enum.Enum):
    AWAIT_HELLO = "await_hello"
    READY = "ready"
    CLOSED = "closed"


# Every allowed (state, sender, kind) and the state it leads to; anything absent is refused.
# Both connections consult the same table: what the client may send is exactly what the
# server may receive. Request ids are bookkept beside it (see Connection._apply).
_C, _S = Role.CLIENT, Role.SERVER
TRANSITIONS: Final[dict[tuple[State, Role, Kind], State]] = {
    (State.AWAIT_HELLO, _C, Kind.HELLO): State.AWAIT_HELLO,
    (State.AWAIT_HELLO, _S, Kind.HELLO_OK): State.READY,
    (State.AWAIT_HELLO, _S, Kind.ERROR): State.AWAIT_HELLO,  # version_mismatch: try again
    (State.READY, _C, Kind.REQUEST): State.READY,
    (State.READY, _S, Kind.REPLY): State.READY,
    (State.READY, _S, Kind.ERROR): State.READY,
    (State.READY, _S, Kind.NOTIFICATION): State.READY,
    (State.AWAIT_HELLO, _C, Kind.CLOSE): State.CLOSED,
    (State.AWAIT_HELLO, _S, Kind.CLOSE): State.CLOSED,
    (State.READY, _C, Kind.CLOSE): State.CLOSED,
    (State.READY, _S, Kind.CLOSE): State.CLOSED,
}
