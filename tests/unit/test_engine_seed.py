"""The seed's walkthrough: three laptops, one feature."""

from __future__ import annotations

from tetherlab.cluster.core.engine.testing import Driver

REGISTRY = """
[[concept]]
id = "auth.session-store-contract"
title = "Session store contract"
description = "How request handlers read and write the user's session."
aliases = ["session store", "in-memory session store", "session store contract"]
symbols = ["auth.store.SessionStore", "get_session"]
paths = ["auth/session/**"]

[[concept]]
id = "auth.middleware"
title = "Auth middleware"
aliases = ["auth layer", "session middleware", "auth middleware"]
paths = ["auth/middleware.py"]
depends_on = ["auth.session-store-contract"]

[[concept]]
id = "auth.jwt"
title = "JWT issuing and verification"
aliases = ["jwt", "json web token"]
paths = ["auth/jwt/**"]

[[concept]]
id = "http.routes"
title = "Route handlers"
aliases = ["route handler"]
paths = ["app/routes/**"]
depends_on = ["auth.session-store-contract"]

[[concept]]
id = "db.schema"
title = "Database schema"
aliases = ["database schema"]
paths = ["db/migrations/**"]

[[concept]]
id = "billing.invoices"
title = "Invoices"
aliases = ["invoice generation", "invoices"]
paths = ["billing/invoices/**"]
depends_on = ["db.schema"]

[[concept]]
id = "billing.api"
title = "Billing API"
aliases = ["billing api"]
paths = ["billing/api/**"]
depends_on = ["billing.invoices"]

[[concept]]
id = "search.index"
title = "Search index"
aliases = ["search index"]
"""

ALICE = "alice/4b2e7c1e-5d7a-4f0e-9a3b-0c1d2e3f91af"
BOB = "bob/0f6c2a44-1b2d-4c3e-8f90-a1b2c3d4e5f6"
CAROL = "carol/9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d"
DAVE = "dave/11111111-2222-4333-8444-555555555555"

ALICE_PLAN = {
    "summary": "Refactor auth layer to use JWT instead of session cookies",
    "steps": [
        "Replace cookie-based session middleware with JWT verification",
        "Deprecate the in-memory session store",
    ],
}


def walkthrough() -> tuple[Driver, dict, dict, dict]:
    d = Driver()
    assert d.init()["ok"]
    assert d.push(toml=REGISTRY)["version"] == 1
    for agent, tool in ((ALICE, "claude-code"), (BOB, "opencode"), (CAROL, "claude-code"), (DAVE, "opencode")):
        assert d.open(agent, tool=tool)["ok"]
    # Someone finished invoice work earlier: it shows up in Carol's slice as recent history.
    d.intent(DAVE, "Add tax lines to invoice generation", tool="opencode")
    d.end(DAVE, "complete", tool="opencode")
    alice = d.intent(ALICE, ALICE_PLAN["summary"], ALICE_PLAN["steps"], tool="claude-code")
    d.advance(60_000)
    bob = d.intent(
        BOB,
        "Add account settings route handlers",
        ["Build the settings route handler on top of the session store contract", "Add GET and POST endpoints"],
        tool="opencode",
    )
    carol = d.intent(CAROL, "Add a credit-note option to invoice generation", ["Update invoices to allow credit notes"])
    return d, alice, bob, carol


def test_alice_continues_holding_the_session_store_contract() -> None:
    _, alice, _, _ = walkthrough()
    assert alice["action"] == "continue"
    modified = {c["concept"] for c in alice["claims"]["modify"]}
    assert "auth.session-store-contract" in modified
    assert alice["fencing_token"] is not None and alice["intent_id"] == f"i-{alice['fencing_token']}"
    why = next(c for c in alice["claims"]["modify"] if c["concept"] == "auth.session-store-contract")["reasons"]
    assert {"kind": "alias", "detail": "in-memory session store", "source": "steps[1]"} in why


def test_bob_is_stopped_with_a_conflict_naming_alice_and_the_contract() -> None:
    _, _, bob, _ = walkthrough()
    assert bob["action"] == "stop"
    assert bob["fencing_token"] is None
    conflict = next(c for c in bob["conflicts"] if c["concept"] == "auth.session-store-contract")
    assert conflict == {
        "concept": "auth.session-store-contract",
        "kind": "depend_on_modified",
        "holder_agent_id": ALICE,
        "holder_summary": ALICE_PLAN["summary"],
        "since": 1_000_000,
    }
    assert ALICE in bob["context"] and "auth.session-store-contract" in bob["context"]
    assert {c["concept"] for c in bob["claims"]["depend"]} == {"auth.session-store-contract"}


def test_carol_continues_and_her_world_slice_has_her_concepts_and_neighbours_only() -> None:
    d, _, _, carol = walkthrough()
    assert carol["action"] == "continue"
    world = d.engine.world_slice(CAROL)
    ids = [c["id"] for c in world["concepts"]]
    # Her concept, what it depends on, what depends on it; no auth.*, no search.*.
    assert sorted(ids) == ["billing.api", "billing.invoices", "db.schema"]
    roles = {c["id"]: c["role"] for c in world["concepts"]}
    assert roles == {"billing.invoices": "modify", "db.schema": "depend", "billing.api": "neighbour"}
    invoices = next(c for c in world["concepts"] if c["id"] == "billing.invoices")
    assert invoices["active"] == []  # her own intent is not listed as someone else's
    assert [h["summary"] for h in invoices["recent"]] == ["Add tax lines to invoice generation"]
    text = repr(world)
    assert "auth." not in text and "search.index" not in text and ALICE not in text


def test_bob_can_go_once_alice_completes() -> None:
    d, alice, _, _ = walkthrough()
    done = d.end(ALICE)
    assert done["action"] == "continue" and done["intent_id"] == alice["intent_id"]
    again = d.intent(BOB, "Add account settings route handlers",
                     ["Build the settings route handler on top of the session store contract"], tool="opencode")
    assert again["action"] == "continue"
    assert again["fencing_token"] > alice["fencing_token"]


def test_every_replica_rebuilding_from_the_records_reaches_the_same_state() -> None:
    d, *_ = walkthrough()
    rebuilt = d.rebuilt()
    assert rebuilt.dump_records() == d.engine.dump_records() == d.records()
    assert rebuilt._index_view() == d.engine._index_view()
    assert rebuilt.world_slice(CAROL) == d.engine.world_slice(CAROL)
