"""Match once: the proposer's claims travel in the entry and replicas reuse them only while the
registry and code index they were computed against are still current (issue 13, item 2)."""

from __future__ import annotations

from typing import Any

import pytest

from tetherlab.cluster.core.engine import CommandError, Engine, decode_command, prematched
from tetherlab.cluster.core.engine.testing import Driver

V1 = [{"id": "pay.api", "aliases": ["payment api"], "paths": ["pay/"]},
      {"id": "ui.cart", "aliases": ["cart page"], "paths": ["ui/cart/"], "depends_on": ["pay.api"]}]
# Version 2 moves the alias: the same plan text now reaches the other concept.
V2 = [{"id": "pay.api", "aliases": ["billing api"], "paths": ["pay/"]},
      {"id": "ui.cart", "aliases": ["payment api", "cart page"], "paths": ["ui/cart/"], "depends_on": ["pay.api"]}]
PLAN = {"summary": "Change the payment api", "steps": ["Rename the payment api entry point"]}
AGENT = "ann/aaaa-1"


def _ready(d: Driver) -> None:
    assert d.init()["ok"] and d.push(concepts=V1)["ok"] and d.open(AGENT)["ok"]


def _intent(matched: dict[str, Any] | None = None, **body: Any) -> dict[str, Any]:
    cmd: dict[str, Any] = {"type": "intent", "agent_id": AGENT, "tool": "claude-code",
                           "intent": {**PLAN, **body}, "trigger": "initial"}
    if matched is not None:
        cmd["matched"] = matched
    return cmd


def _leader_match(d: Driver, obj: dict[str, Any]) -> dict[str, Any]:
    """The entry a leader would propose for ``obj`` with ``d``'s current state."""
    return prematched(decode_command(obj), d.engine.match_basis()).to_json()


def test_current_match_is_reused_and_answers_alike() -> None:
    plain, pre = Driver(), Driver()
    _ready(plain), _ready(pre)
    entry = _leader_match(pre, _intent())
    assert entry["matched"]["registry_version"] == 1
    assert pre.send(entry) == plain.send(_intent())
    assert (pre.engine.matches_reused, pre.engine.matches_made) == (1, 0)
    assert plain.engine.matches_made == 1
    assert pre.records() == plain.records()


def test_match_made_before_a_push_is_made_again_after_it() -> None:
    d = Driver()
    _ready(d)
    stale = _leader_match(d, _intent())  # matched against version 1...
    assert [c["concept"] for c in stale["matched"]["modify"]] == ["pay.api"]
    assert d.push(concepts=V2)["ok"]  # ...then version 2 commits first
    verdict = d.send(stale)
    assert d.engine.matches_made == 1 and d.engine.matches_reused == 0
    fresh = Engine.from_records(d.records())
    assert fresh.match_basis().registry_version == 2
    assert [c["concept"] for c in verdict["claims"]["modify"]] == ["ui.cart"]
    assert verdict["claims"]["registry_version"] == 2


def test_forged_claims_naming_unknown_concepts_are_not_trusted() -> None:
    d = Driver()
    _ready(d)
    forged = {"registry_version": 1, "index_version": 0, "modify": [{"concept": "no.such", "reasons": []}],
              "depend": [], "files": [], "symbols": []}
    verdict = d.send(_intent(matched=forged))
    assert d.engine.matches_made == 1
    assert [c["concept"] for c in verdict["claims"]["modify"]] == ["pay.api"]


def test_a_plan_the_matcher_refuses_is_proposed_unmatched_and_refused_in_order() -> None:
    d = Driver()
    _ready(d)
    obj = _intent(concepts={"modify": ["no.such"]})
    assert "matched" not in _leader_match(d, obj)
    assert d.send(obj)["error"]["code"] == "unknown_concept"


@pytest.mark.parametrize(("matched", "field"), [
    ("claims", "matched"),
    ({"registry_version": "1", "index_version": 0, "modify": [], "depend": []}, "matched.registry_version"),
    ({"registry_version": 1, "modify": [], "depend": []}, "matched.index_version"),
    ({"registry_version": 1, "index_version": 0, "modify": {}, "depend": []}, "matched.modify"),
    ({"registry_version": 1, "index_version": 0, "modify": [], "depend": [{"reasons": []}]}, "matched.depend[0]"),
])
def test_bad_matched_field_is_refused_naming_it(matched: Any, field: str) -> None:
    with pytest.raises(CommandError) as e:
        decode_command(_intent(matched=matched))
    assert field in e.value.message


def test_matched_without_an_intent_is_refused() -> None:
    with pytest.raises(CommandError, match="'matched' needs an intent"):
        decode_command({"type": "intent", "agent_id": AGENT, "tool": "t", "trigger": "complete",
                        "matched": {"registry_version": 1, "index_version": 0, "modify": [], "depend": []}})


def test_entries_without_a_match_keep_their_old_shape() -> None:
    assert "matched" not in decode_command(_intent()).to_json()


def test_the_mirror_catches_a_replica_trusting_a_stale_match(monkeypatch: pytest.MonkeyPatch) -> None:
    """The twin check the rule and stateful engine tests run (Driver(mirror=True)) fails when
    apply reuses claims computed against an older registry."""
    def trusting(self: Engine, cmd: Any) -> dict[str, Any]:
        if cmd.matched is not None:
            return dict(cmd.matched)
        return self.match_basis().match(cmd.intent)

    monkeypatch.setattr(Engine, "_claims_for", trusting)
    d = Driver(mirror=True)
    _ready(d)
    assert d.push(concepts=V2)["ok"]  # the twin's next intent carries a version-1 match
    with pytest.raises(AssertionError, match="prematched intent changed the answer"):
        d.send(_intent())
