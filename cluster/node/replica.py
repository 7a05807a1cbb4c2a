"""What the node's front doors need from consensus: the :class:`Replica` interface.

Two implementations:

- :class:`~tetherlab.cluster.node.raftreplica.RaftReplica`: pysyncobj over the LMDB journal and
  store (production);
- :class:`~tetherlab.cluster.node.fake.FakeReplica`: one in-memory replica built on ``core``,
  whose role, leader and failures a test sets, so the service is tested in milliseconds.

A replica proposes commands and returns their results once committed and applied here; reads
of its applied state are local, and linearizable after :meth:`Replica.read_barrier`. Its
``status()`` says whether this node is a quorum-backed leader, which decides who answers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from tetherlab.cluster.core import statemachine as sm
from tetherlab.cluster.core.apply import Outcome
from tetherlab.cluster.core.engine.commands import Command as EngineCommand
from tetherlab.cluster.protocol import jsoncodec
from tetherlab.cluster.replica.store import Store

PROPOSE_TIMEOUT_S = 5.0  # a write not committed by then is reported as indeterminate
READ_TIMEOUT_S = 5.0
MEMBERS_NS = "members"  # nodes added online: their addresses, replicated

ApplyListener = Callable[[Outcome], None]


class Replica(Protocol):
    node_id: str
    store: Store  # this node's applied state: reads are local (see read_barrier)

    def status(self) -> dict[str, Any]:
        """``role``, ``term``, ``leader`` (an id or None), ``quorum_backed`` (a leader a majority
        answered within an election timeout), ``quorum_ok``, ``commit_index``,
        ``applied_index``, ``peers`` (id -> ``last_response_age_s`` etc.)."""
        ...

    async def propose(self, payload: bytes, timeout_s: float = PROPOSE_TIMEOUT_S) -> dict[str, Any]:
        """Commit one entry and return its result as applied here. Raises ``Unavailable``
        (nothing applied) or ``Indeterminate`` (outcome unknown)."""
        ...

    async def propose_engine(self, cmd: EngineCommand, now_ms: int,
                             timeout_s: float = PROPOSE_TIMEOUT_S) -> dict[str, Any]:
        """:meth:`propose` the engine command ``cmd`` stamped with ``now_ms`` (this leader's
        clock); this node's own apply takes ``cmd`` instead of decoding the entry again
        (:func:`engine_entry`). Both implementations do exactly that."""
        ...

    async def read_barrier(self, timeout_s: float = READ_TIMEOUT_S) -> None:
        """Return once every write acknowledged before this call is applied here."""
        ...

    def members(self) -> dict[str, dict[str, str]]:
        """Current Raft members by id, with their ``raft`` and ``ssh`` addresses."""
        ...

    def ssh_address_of(self, node_id: str) -> str | None: ...

    async def change_membership(self, add: bool, raft_addr: str, timeout_s: float = PROPOSE_TIMEOUT_S) -> None:
        """Add or remove one member, committed (one change at a time)."""
        ...

    def transfer_leadership(self) -> None:
        """Hand leadership to the most caught-up follower (a leader only)."""
        ...

    def add_apply_listener(self, fn: ApplyListener) -> None:
        """Call ``fn(outcome)`` on the event loop for every entry applied here."""
        ...


def encode_command(cmd: sm.Command) -> bytes:
    return sm.encode_command(cmd)


def encode_engine(cmd: EngineCommand, now_ms: int) -> bytes:
    """An engine command stamped with the proposing leader's clock."""
    return jsoncodec.dumps({"op": "engine", "now_ms": now_ms, "cmd": cmd.to_json()})


def engine_entry(store: Store, cmd: EngineCommand, now_ms: int) -> bytes:
    """``encode_engine``'s bytes, remembered with ``cmd`` until this node applies them
    (``Store.proposed``): its apply then skips decoding what it has just encoded."""
    payload = encode_engine(cmd, now_ms)
    store.proposed.put(payload, now_ms, cmd)
    return payload
