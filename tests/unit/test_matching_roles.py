"""Roles in a plan, on an invented codebase (nothing here comes from the labelled benchmark):
what a plan changes versus what it uses, calls, raises, wraps, extends, reads, tests or leaves
alone; ordinary words inside other phrases; names resolved through the code index."""

from __future__ import annotations

import pytest

from tetherlab.cluster.core.engine import plantext
from tetherlab.cluster.core.engine.codeindex import CodeIndex, Symbol
from tetherlab.cluster.core.engine.matching import match_intent
from tetherlab.cluster.core.engine.model import IntentBody
from tetherlab.cluster.core.engine.registry import Registry, parse_toml

REGISTRY = Registry(parse_toml('''
[[concept]]
id = "http.client"
paths = ["src/shop/client.py"]
symbols = ["Client"]
aliases = ["http client", "client"]

[[concept]]
id = "http.proxy"
paths = ["src/shop/proxy.py"]
symbols = ["ProxyTransport"]
aliases = ["proxy", "proxy support"]

[[concept]]
id = "errors"
paths = ["src/shop/errors.py"]
symbols = ["ShopError"]
aliases = ["exception hierarchy", "exception"]

[[concept]]
id = "cache.store"
paths = ["src/shop/cache/"]
symbols = ["CacheStore"]
aliases = ["response cache", "cache"]

[[concept]]
id = "status.codes"
paths = ["src/shop/status.py"]
aliases = ["status codes", "status"]

[[concept]]
id = "package.entry"
paths = ["src/shop/__init__.py"]
aliases = ["public api"]

[[concept]]
id = "build"
paths = ["package.json", "pyproject.toml"]
aliases = ["build config"]

[[concept]]
id = "docs"
paths = ["docs/"]
aliases = ["documentation"]
'''), version=1)

S = Symbol
INDEX = CodeIndex({
    "src/shop/__init__.py": [],
    "src/shop/client.py": [S("Client", "class", 1, 200), S("Client.send", "method", 10, 60),
                           S("Client._build_request", "method", 70, 90), S("DEFAULT_TIMEOUT", "variable", 1, 1)],
    "src/shop/proxy.py": [S("ProxyTransport", "class", 1, 80), S("ProxyTransport.handle", "method", 5, 40)],
    "src/shop/errors.py": [S("ShopError", "class", 1, 5), S("TimeoutError", "class", 6, 9)],
    "src/shop/cache/__init__.py": [],
    "src/shop/cache/store.py": [S("CacheStore", "class", 1, 50), S("CacheStore.get", "method", 5, 9)],
    "src/shop/status.py": [S("codes", "variable", 1, 70)],
    "src/shop/headers.py": [S("merge_headers", "function", 1, 20)],
    "package.json": [],
    "docs/index.md": [],
    "scripts/ci.sh": [],
})


def roles(summary: str, *steps: str, index: CodeIndex | None = INDEX) -> dict[str, str]:
    c = match_intent(REGISTRY, IntentBody(summary, steps), index)
    out = {x["concept"]: "modify" for x in c["modify"]}
    out.update({x["concept"]: "depend" for x in c["depend"]})
    return out


@pytest.mark.parametrize(
    ("summary", "steps", "expected"),
    [
        # The object of a change verb is changed; what it is changed with is used.
        ("Add retry support to `Client.send`", (), {"http.client": "modify"}),
        ("Raise ShopError when the body is empty in Client.send", (), {"http.client": "modify", "errors": "depend"}),
        ("Fix the timeout in `Client.send` using ProxyTransport", (),
         {"http.client": "modify", "http.proxy": "depend"}),
        # Extends, wraps, subclasses: relied on, not changed.
        ("Create src/shop/backends/memory.py with a MemoryStore that wraps CacheStore", (), {}),
        ("Add a MemoryStore extending CacheStore in src/shop/backends/memory.py", (), {"cache.store": "depend"}),
        ("Add an AdminClient subclass of Client", (), {"http.client": "depend"}),
        # Negation and leaving alone.
        ("Fix `Client._build_request` without touching the ProxyTransport class", (), {"http.client": "modify"}),
        ("Speed up the response cache", ("Do not change ProxyTransport",), {"cache.store": "modify"}),
        ("Update Client.send", ("Leave src/shop/proxy.py alone",), {"http.client": "modify"}),
        # New files land on the concept of the directory they are created in.
        ("Create `src/shop/cache/memory.py`", (), {"cache.store": "modify"}),
        ("Create `docs/proxies.md` describing the proxy support", (), {"docs": "modify", "http.proxy": "depend"}),
        # Qualified and private names, files written as names.
        ("Inline `client._build_request`", (), {"http.client": "modify"}),
        ("Bump the version in package.json", (), {"build": "modify"}),
        # Ordinary words inside other phrases, and used as verbs or plurals, name nothing.
        ("Cache the pnpm store in the CI workflow", (), {}),
        ("Check the exit status of scripts/ci.sh", (), {}),
        ("Normalise headers across clients in src/shop/headers.py", (), {}),
        ("Prepare the next release", (), {}),
        ("Keep track of redirects in Client.send", (), {"http.client": "modify"}),
        ("Strip the Proxy-Authorization header on redirects in Client.send", (), {"http.client": "modify"}),
        ("Catch any exception the transport raises in Client.send", (), {"http.client": "modify"}),
        ("Support merging query parameters in `Client.send`", (), {"http.client": "modify"}),
        ("Add a `query()` method to Client", (), {"http.client": "modify"}),
        # Exports: the entry changes, the exported name is relied on.
        ("Export CacheStore from the package entry", (), {"package.entry": "modify", "cache.store": "depend"}),
        ("Add CacheStore to `__all__` in src/shop/__init__.py", (),
         {"package.entry": "modify", "cache.store": "depend"}),
        # Topics and titles.
        ("ProxyTransport: support SOCKS5", (), {"http.proxy": "modify"}),
        ("The http client should retry on 503", (), {"http.client": "modify"}),
        # Read-only and test-only plans depend on what they read or test.
        ("Investigate the timeout handling in Client.send", ("No code changes.",), {"http.client": "depend"}),
        ("Add tests for Client.send timeouts", (), {"http.client": "depend"}),
        ("Add retries to Client.send", ("Add tests for ProxyTransport",), {"http.client": "modify"}),
        # First person, "let's", gerunds and the future passive also say what changes.
        ("We will add a retry loop to Client.send", (), {"http.client": "modify"}),
        ("I'll update `ProxyTransport.handle`", (), {"http.proxy": "modify"}),
        ("Let's make the response cache bounded", (), {"cache.store": "modify"}),
        ("Adding a retry loop to Client.send", (), {"http.client": "modify"}),
        ("ProxyTransport will be removed", (), {"http.proxy": "modify"}),
        ("Replace the dict in CacheStore with an LRU from src/shop/headers.py", (), {"cache.store": "modify"}),
        # Statements about the code as it is are context.
        ("Add a max size to the response cache", ("Headers are merged by merge_headers in src/shop/headers.py",),
         {"cache.store": "modify"}),
        ("Add a max size to the response cache", ("ProxyTransport calls Client.send for every hop",),
         {"cache.store": "modify"}),
    ],
)
def test_roles(summary: str, steps: tuple[str, ...], expected: dict[str, str]) -> None:
    assert roles(summary, *steps) == expected


def test_the_index_resolves_what_the_registry_does_not_name() -> None:
    plan = "Rename `_build_request` to `_prepare`"
    assert roles(plan, index=None) == {}
    assert roles(plan) == {"http.client": "modify"}
    assert roles("Tune DEFAULT_TIMEOUT") == {"http.client": "modify"}


def test_reasons_say_how_each_claim_was_found() -> None:
    c = match_intent(REGISTRY, IntentBody("Raise ShopError in `Client._build_request`"), INDEX)
    (mod,) = c["modify"]
    assert mod["concept"] == "http.client"
    assert mod["reasons"][0]["kind"] == "symbol" and "src/shop/client.py" in mod["reasons"][0]["detail"]
    (dep,) = c["depend"]
    assert dep == {"concept": "errors", "reasons": [{"kind": "symbol", "detail": "ShopError", "source": "summary"}]}


def test_explicit_claims_win_and_disagreements_are_reported() -> None:
    body = IntentBody("Fix the timeout in `Client.send`", ("Update docs/timeouts.md",), modify=("http.proxy",))
    c = match_intent(REGISTRY, body, INDEX)
    kinds = {x["concept"] for x in c["modify"]}
    # The declared proxy is kept; a file the text edits is added; a name it changes is reported.
    assert kinds == {"http.proxy", "docs"}
    notes = {x["concept"]: x for x in c["checks"]}
    assert notes["http.proxy"]["derived"] == "none"
    assert notes["docs"]["declared"] == "none" and "claimed anyway" in notes["docs"]["note"]
    assert notes["http.client"]["derived"] == "modify" and "not claimed" in notes["http.client"]["note"]


def test_analysis_is_deterministic_and_bounded_by_the_text() -> None:
    text = "Add retry support to `Client.send` and raise ShopError; " * 50
    a = plantext.analyse(text, ["x"] * 3)
    b = plantext.analyse(text, ["x"] * 3)
    assert [(t.text, t.role) for t in a[0].tokens] == [(t.text, t.role) for t in b[0].tokens]


def test_a_verdict_reads_a_bounded_amount_of_text() -> None:
    from tetherlab.cluster.core.engine.matching import PLAN_CHARS_MAX

    filler = "Add a retry loop and keep the behaviour stable. " * 40
    steps = [filler[:1900]] * (PLAN_CHARS_MAX // 1900 + 2) + ["Rework ProxyTransport"]
    assert roles("Plan", *steps) == {}  # past the bound: not read
    assert roles("Plan", *steps[:2], "Rework ProxyTransport") == {"http.proxy": "modify"}
