"""Concept registry: parsing, validation errors that name concept and field, JSON form, globs."""

from __future__ import annotations

import pytest

from tetherlab.cluster.core.engine import Concept, Registry, RegistryError, parse_toml, validate_concepts
from tetherlab.cluster.core.engine.globs import GlobError, GlobIndex, compile_glob

GOOD = """
[[concept]]
id = "auth.session-store-contract"
title = "Session store contract"
description = "How handlers read and write sessions."
paths = ["auth/session/**", "auth/store.py"]
symbols = ["auth.store.SessionStore"]
aliases = ["session store"]

[[concept]]
id = "http.routes"
depends_on = ["auth.session-store-contract"]
dependents = "continue"
"""


def test_parse_good_registry() -> None:
    concepts = parse_toml(GOOD)
    assert [c.id for c in concepts] == ["auth.session-store-contract", "http.routes"]
    store, routes = concepts
    assert store.paths == ("auth/session/**", "auth/store.py") and store.dependents == "stop"
    assert routes.depends_on == ("auth.session-store-contract",) and routes.dependents == "continue"


def test_registry_round_trips_through_json() -> None:
    reg = Registry(parse_toml(GOOD), version=4)
    again = Registry.from_json(reg.to_json())
    assert again.version == 4 and again.concepts == reg.concepts
    assert again.dependents_of == {"auth.session-store-contract": ["http.routes"]}


def one(body: str) -> str:
    return f"[[concept]]\n{body}\n"


# (registry text, concept named, field named, words in the message)
PROBLEMS = [
    (one('title = "no id"'), "#1", "id", "missing"),
    (one("id = 7"), "#1", "id", "must be a string"),
    (one('id = "Auth.Bad"'), "Auth.Bad", "id", "dotted lowercase"),
    (one('id = "a.b"') + one('id = "a.b"'), "a.b", "id", "duplicate"),
    (one('id = "a.b"\ndepends_on = ["x.y"]'), "a.b", "depends_on", "unknown concept 'x.y'"),
    (one('id = "a.b"\ndepends_on = ["a.b"]'), "a.b", "depends_on", "itself"),
    (one('id = "a.a"\ndepends_on = ["a.b"]') + one('id = "a.b"\ndepends_on = ["a.c"]')
     + one('id = "a.c"\ndepends_on = ["a.a"]'), "a.a", "depends_on", "a.a -> a.b -> a.c -> a.a"),
    (one('id = "a.b"\npaths = ["src/[abc"]'), "a.b", "paths", "unclosed"),
    (one('id = "a.b"\npaths = ["/abs/**"]'), "a.b", "paths", "relative"),
    (one('id = "a.b"\npaths = ["src/**x/y"]'), "a.b", "paths", "whole path segment"),
    (one('id = "a.b"\npaths = ["src/../y"]'), "a.b", "paths", "'..'"),
    (one('id = "a.b"\npaths = "src/**"'), "a.b", "paths", "list of strings"),
    (one('id = "a.b"\naliases = ["the"]'), "a.b", "aliases", "1 to"),
    (one('id = "a.b"\nsymbols = ["not a symbol"]'), "a.b", "symbols", "identifier"),
    (one('id = "a.b"\ndependents = "maybe"'), "a.b", "dependents", "must be one of"),
    (one('id = "a.b"\ntitle = 3'), "a.b", "title", "must be a string"),
    (one('id = "a.b"\ndepends = ["x.y"]'), "a.b", "depends", "not a concept field"),
    ("[[concept]\nid=", "*", "toml", "not valid TOML"),
    ('version = 1\n' + one('id = "a.b"'), "*", "version", "unknown top-level key"),
]


@pytest.mark.parametrize(("text", "concept", "field", "words"), PROBLEMS)
def test_validation_errors_name_concept_and_field(text: str, concept: str, field: str, words: str) -> None:
    with pytest.raises(RegistryError) as e:
        parse_toml(text)
    assert e.value.code == "invalid_registry"
    hits = [p for p in e.value.problems if p.concept == concept and p.field == field]
    assert hits, e.value.problems
    assert any(words in p.message for p in hits), hits
    assert f"concept {concept!r} field {field!r}" in e.value.message


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(RegistryError) as e:
        parse_toml(one('id = "a.b"\ntitle = 1\npaths = ["/x"]') + one('id = "c.d"\ndepends_on = ["z.z"]'))
    found = {(p.concept, p.field) for p in e.value.problems}
    assert found == {("a.b", "title"), ("a.b", "paths"), ("c.d", "depends_on")}
    assert e.value.to_json()["error"]["problems"][0]["concept"] == "a.b"


def test_concepts_validate_from_json_objects() -> None:
    cs = validate_concepts([Concept("b.b").to_json(), {"id": "a.a", "depends_on": ["b.b"]}])
    assert [c.id for c in cs] == ["a.a", "b.b"]


@pytest.mark.parametrize(
    ("glob", "path", "hit"),
    [
        ("auth/**", "auth/x/y.py", True),
        ("auth/**", "authx/y.py", False),
        ("auth/", "auth/y.py", True),
        ("**/*.sql", "db/m/001.sql", True),
        ("**/*.sql", "001.sql", True),
        ("src/*.py", "src/a/b.py", False),
        ("src/[ab]?.py", "src/a1.py", True),
        ("src/[!ab]?.py", "src/a1.py", False),
        ("a/**/z.py", "a/z.py", True),
        ("a/**/z.py", "a/b/c/z.py", True),
        ("exact/file.py", "exact/file.py", True),
    ],
)
def test_globs(glob: str, path: str, hit: bool) -> None:
    assert bool(compile_glob(glob).fullmatch(path)) is hit
    idx = GlobIndex()
    idx.add(glob, "c.x")
    assert (idx.match(path) == [("c.x", glob)]) is hit


def test_bad_glob_raises() -> None:
    with pytest.raises(GlobError):
        compile_glob("a/[")
