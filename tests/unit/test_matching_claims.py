"""Matching: from an intent's text, files and explicit concepts to claims with reasons."""

from __future__ import annotations

import pytest

from tetherlab.cluster.core.engine import CommandError, IntentBody, Registry, match_intent, parse_toml

REG = Registry(
    parse_toml(
        """
[[concept]]
id = "auth.session-store-contract"
aliases = ["session store", "in-memory session store"]
symbols = ["auth.store.SessionStore", "get_session"]
paths = ["auth/session/**"]

[[concept]]
id = "http.routes"
aliases = ["route handler"]
paths = ["app/routes/**"]
depends_on = ["auth.session-store-contract"]

[[concept]]
id = "billing.invoices"
aliases = ["invoice generation", "invoices"]
symbols = ["InvoiceBuilder"]
"""
    ),
    version=3,
)


def claims(summary: str, *steps: str, **kw: object) -> dict:
    return match_intent(REG, IntentBody(summary, tuple(steps), **kw))  # type: ignore[arg-type]


def kinds(c: dict) -> dict[str, str]:
    out = {x["concept"]: "modify" for x in c["modify"]}
    out.update({x["concept"]: "depend" for x in c["depend"]})
    return out


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Deprecate the in-memory session store", {"auth.session-store-contract": "modify"}),
        ("Replace the session stores", {"auth.session-store-contract": "modify"}),  # plural folded
        ("Build handlers on top of the session store", {"auth.session-store-contract": "depend"}),
        ("Read the user from the session store", {"auth.session-store-contract": "depend"}),
        ("Session store cleanup", {"auth.session-store-contract": "modify"}),  # no verb: modify
        ("Call `get_session` in each handler", {"auth.session-store-contract": "depend"}),
        # A new or unlisted member of a registered class belongs to the class's concept.
        ("Rename SessionStore.get to fetch", {"auth.session-store-contract": "modify"}),
        # Subclassing relies on the class; it does not change it.
        ("Subclass auth.store.SessionStore for redis", {"auth.session-store-contract": "depend"}),
        ("Refactor InvoiceBuilder", {"billing.invoices": "modify"}),
        ("Edit auth/session/cookies.py", {"auth.session-store-contract": "modify"}),
        ("Use the billing module; update invoice generation", {"billing.invoices": "modify"}),  # new clause
        ("Rework auth.session-store-contract by id", {"auth.session-store-contract": "modify"}),
        ("Nothing relevant at all", {}),
    ],
)
def test_text_to_claims(text: str, expected: dict[str, str]) -> None:
    assert kinds(claims(text)) == expected


def test_every_claim_says_why() -> None:
    c = claims("Add a route handler", "Use `get_session`", files=("app/routes/x.py",))
    routes = c["modify"][0]
    assert routes["concept"] == "http.routes"
    assert {r["kind"] for r in routes["reasons"]} == {"alias", "path"}
    store = c["depend"][0]
    assert {"kind": "symbol", "detail": "get_session", "source": "steps[0]"} in store["reasons"]
    assert {r["kind"] for r in store["reasons"]} == {"symbol", "depends_on"}
    assert c["registry_version"] == 3
    assert "app/routes/x.py" in c["files"] and "app/routes/**" in c["files"]
    assert c["symbols"] == ["get_session"]


def test_modify_beats_depend_and_explicit_beats_both() -> None:
    c = claims("Read from the session store", "Then rewrite the session store")
    assert kinds(c) == {"auth.session-store-contract": "modify"}
    c = claims("Rewrite the session store", modify=(), depend=("auth.session-store-contract",))
    assert kinds(c) == {"auth.session-store-contract": "depend"}
    assert c["depend"][0]["reasons"][0] == {
        "kind": "explicit", "detail": "auth.session-store-contract", "source": "concepts.depend"
    }


def test_unknown_explicit_concept_is_an_error_naming_it() -> None:
    with pytest.raises(CommandError) as e:
        claims("x", modify=("no.such",))
    assert e.value.code == "unknown_concept" and "no.such" in e.value.message
    with pytest.raises(CommandError):
        match_intent(None, IntentBody("x", modify=("a.b",)))


def test_matching_is_deterministic() -> None:
    body = IntentBody("Refactor invoices on top of the session store", ("Add a route handler",))
    first = match_intent(REG, body)
    assert all(match_intent(Registry(list(REG.concepts.values()), 3), body) == first for _ in range(3))


def test_no_registry_yields_only_files() -> None:
    c = match_intent(None, IntentBody("x", files=("a.py",)))
    assert c == {"registry_version": 0, "modify": [], "depend": [], "files": ["a.py"], "symbols": []}


def test_alias_index_cost_does_not_scan_the_registry() -> None:
    # 20,000 aliases sharing a first word: a walk still only follows the text's own words.
    concepts = [{"id": f"x.c{i}", "aliases": [f"widget {i}"]} for i in range(20_000)]
    from tetherlab.cluster.core.engine import validate_concepts

    big = Registry(validate_concepts(concepts), 1)
    c = match_intent(big, IntentBody("Fix widget 1234 and widget 77"))
    assert [x["concept"] for x in c["modify"]] == ["x.c1234", "x.c77"]
