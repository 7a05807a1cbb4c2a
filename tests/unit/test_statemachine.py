"""The pure state machine: commands, records, revisions, and clear errors."""

from __future__ import annotations

import pytest

from tetherlab.cluster.core import statemachine as sm


def run(cmds: list[sm.Command]) -> tuple[dict[tuple[str, str], sm.Record], int, list[dict]]:
    state: dict[tuple[str, str], sm.Record] = {}
    rev = 0
    results = []
    for c in cmds:
        out = sm.apply(c, revision=rev, read=lambda ns, k: state.get((ns, k)))
        for ns, k, rec in out.writes:
            if rec is None:
                state.pop((ns, k), None)
            else:
                state[(ns, k)] = rec
        rev = out.revision
        results.append(out.result)
    return state, rev, results


def test_put_then_put_bumps_version_and_revision() -> None:
    state, rev, _ = run([sm.Put("a", "k", "1"), sm.Put("a", "k", "2"), sm.Put("b", "k", "x")])
    assert rev == 3
    assert state[("a", "k")] == sm.Record("2", create_revision=1, mod_revision=2, version=2)
    assert state[("b", "k")].create_revision == 3


def test_delete_of_missing_key_changes_nothing() -> None:
    state, rev, results = run([sm.Delete("a", "k")])
    assert (state, rev) == ({}, 0)
    assert results[0]["deleted"] is False


@pytest.mark.parametrize(
    ("expected", "succeeds"),
    [(0, False), (1, True), (2, False)],
)
def test_compare_and_set_on_mod_revision(expected: int, succeeds: bool) -> None:
    state, rev, results = run([sm.Put("a", "k", "1"), sm.CompareAndSet("a", "k", expected, "2")])
    assert results[1]["succeeded"] is succeeds
    assert state[("a", "k")].value == ("2" if succeeds else "1")
    assert rev == (2 if succeeds else 1)


def test_compare_and_set_create_only_and_delete() -> None:
    state, _, results = run([
        sm.CompareAndSet("a", "k", 0, "new"),
        sm.CompareAndSet("a", "k", 0, "again"),
        sm.CompareAndSet("a", "k", 1, None),
    ])
    assert [r["succeeded"] for r in results] == [True, False, True]
    assert state == {}


def test_barrier_changes_nothing() -> None:
    state, rev, _ = run([sm.Barrier()])
    assert (state, rev) == ({}, 0)


@pytest.mark.parametrize(
    ("obj", "code", "needle"),
    [
        ([], "bad_command", "JSON object"),
        ({"op": "nope"}, "unknown_op", "nope"),
        ({"op": "put", "ns": "a", "key": "k"}, "missing_field", "'value'"),
        ({"op": "put", "ns": "", "key": "k", "value": "v"}, "bad_field", "'ns'"),
        ({"op": "put", "ns": "a", "key": 5, "value": "v"}, "bad_field", "'key'"),
        ({"op": "put", "ns": "a", "key": "k", "value": "v" * (sm.VALUE_MAX_BYTES + 1)}, "too_large", "'value'"),
        ({"op": "cas", "ns": "a", "key": "k", "expected_revision": -1}, "bad_field", "expected_revision"),
        ({"op": "put", "ns": "a", "key": "k", "value": "v", "x": 1}, "bad_field", "'x'"),
        ({"op": "delete", "ns": "a\x00", "key": "k"}, "bad_field", "NUL"),
    ],
)
def test_bad_commands_get_errors_naming_the_field(obj: object, code: str, needle: str) -> None:
    with pytest.raises(sm.CommandError) as e:
        sm.decode_command(obj)
    assert e.value.code == code
    assert needle in e.value.message


def test_encode_decode_round_trip() -> None:
    for c in [sm.Put("a", "k", "v"), sm.Delete("a", "k"), sm.CompareAndSet("a", "k", 3, None), sm.Barrier()]:
        import json

        assert sm.decode_command(json.loads(sm.encode_command(c))) == c


def test_txn_applies_success_branch_atomically_at_one_revision() -> None:
    txn = sm.Txn(
        compare=(sm.Compare("meta", "boot", 0),),
        success=(sm.Put("meta", "boot", "1"), sm.Put("keys", "a", "admin")),
        failure=(sm.Put("meta", "tried", "again"),),
    )
    state, rev, results = run([txn, txn])
    assert [r["succeeded"] for r in results] == [True, False]
    assert state[("keys", "a")].mod_revision == state[("meta", "boot")].mod_revision == 1
    assert state[("meta", "tried")].value == "again"
    assert rev == 2


def test_txn_round_trips_and_rejects_nested_txn() -> None:
    import json

    txn = sm.Txn((sm.Compare("a", "k", 3),), (sm.Delete("a", "k"),), (sm.Put("a", "x", "y"),))
    assert sm.decode_command(json.loads(sm.encode_command(txn))) == txn
    with pytest.raises(sm.CommandError, match="put or delete"):
        sm.decode_command({"op": "txn", "compare": [], "success": [{"op": "barrier"}]})
