"""The memory of checked values (agent ids) must never let through a value the check refuses,
must keep naming the bad item, and must stay bounded."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tetherlab.cluster.core.engine import commands as ec
from tetherlab.cluster.core.errors import CommandError
from tetherlab.cluster.protocol import messages as p
from tetherlab.cluster.protocol.errors import LocalProtocolError, RemoteProtocolError
from tetherlab.cluster.protocol.fields import AGENT
from tetherlab.cluster.protocol.memo import Passed


def _id(dev: str = "alice") -> str:
    return f"{dev}/{uuid.uuid4()}"


class _Tag(str):
    pass


def test_only_added_plain_strings_are_remembered() -> None:
    m = Passed(max_items=4)
    m.add("a")
    assert "a" in m and "b" not in m
    assert _Tag("a") not in m  # a subclass may behave differently: checked again
    assert 1 not in m and None not in m and ["a"] not in m


def test_the_memory_is_bounded() -> None:
    m = Passed(max_items=3)
    for v in "abcdefg":
        m.add(v)
        assert len(m) <= 3
    assert "g" in m
    with pytest.raises(ValueError):
        Passed(max_items=0)


# Refused by the protocol and by the engine (whose id rule is looser: any name after the "/").
# Fixed values: parallel test workers must collect the same test ids.
BAD_IDS: list[Any] = ["no-slash", 7, None, "al ice/1889b3a2-f03a-4d18-984d-cd8448c14ad5", "alice/" + "0" * 300,
                      "/x", ""]


def _refused_twice(check: Any, value: Any, error: type[Exception]) -> bool:
    """The second time is where a memory that remembered a failure would let the value in."""
    for _ in range(2):
        try:
            check(value)
        except error:
            continue
        return False
    return True


@pytest.mark.parametrize("bad", BAD_IDS)
def test_a_refused_agent_id_stays_refused(bad: Any) -> None:
    assert _refused_twice(lambda v: AGENT.check(v, "agent_id"), bad, LocalProtocolError)
    assert _refused_twice(lambda v: ec.Heartbeat(agent_ids=(v,)), bad, CommandError)
    assert _refused_twice(p.split_agent_id, bad, LocalProtocolError)
    assert _refused_twice(lambda v: AGENT.check(v, "agent_id"), "alice/not-a-uuid", LocalProtocolError)


def test_remembered_ids_still_let_the_bad_one_be_named() -> None:
    good = [_id() for _ in range(5)]
    ec.Heartbeat(agent_ids=tuple(good))  # remembered now
    p.decode({"type": "heartbeat", "id": 1, "agent_ids": good})
    with pytest.raises(CommandError, match=r"agent_ids\[5\]"):
        ec.Heartbeat(agent_ids=(*good, "nope"))
    with pytest.raises(RemoteProtocolError, match=r"agent_ids\[5\]"):
        p.decode({"type": "heartbeat", "id": 1, "agent_ids": [*good, "nope"]})


def test_remembered_ids_split_the_same_way() -> None:
    a = _id("bob.dev")
    first = p.split_agent_id(a)
    assert p.split_agent_id(a) == first == ("bob.dev", a.split("/")[1])


def test_a_memory_that_remembers_before_checking_is_caught() -> None:
    """The planted bug (remember every value, then check) is what the refusal test catches."""
    planted = Passed()

    def remember_first(value: Any) -> str:
        if value in planted:
            return value  # type: ignore[no-any-return]
        if isinstance(value, str):
            planted.add(value)
        return AGENT.check(value, "agent_id")  # type: ignore[no-any-return]

    assert not _refused_twice(remember_first, "planted-no-slash", LocalProtocolError)
