"""The registry author's offline tools: ``tetherlab concepts index|lint|match`` (no cluster), the
lint checks each catching a planted problem, and the agent-facing texts (the instruction
section's concept list, ``Concepts:`` lines in plan-mode Markdown, claim checks in verdicts)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tetherlab.cluster.cli.main import main as tetherlab
from tetherlab.cluster.core.engine.codeindex import CodeIndex, Symbol
from tetherlab.cluster.core.engine.lint import lint
from tetherlab.cluster.core.engine.registry import Registry, parse_toml
from tetherlab.cluster.core.engine.testing import Driver
from tetherlab.cluster.core.exitcodes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from tetherlab.shim.sentinel import (
    CONCEPTS_IN_INSTRUCTIONS_MAX,
    SECTION_BEGIN,
    install_section,
    plan_from_markdown,
    render_instructions,
)

CLEAN = """
[[concept]]
id = "shop.cart"
title = "Cart"
paths = ["src/cart.py"]
symbols = ["Cart"]
aliases = ["shopping cart"]

[[concept]]
id = "shop.checkout"
title = "Checkout"
paths = ["src/checkout/"]
symbols = ["Checkout.pay"]
aliases = ["checkout flow"]
depends_on = ["shop.cart"]
"""
INDEX = CodeIndex({"src/cart.py": [Symbol("Cart", "class", 1, 40)],
                   "src/checkout/pay.py": [Symbol("Checkout", "class", 1, 90), Symbol("Checkout.pay", "method", 3, 9)]})


def checks(toml: str, index: CodeIndex | None = INDEX) -> set[tuple[str, str, str]]:
    return {(f.concept, f.check, f.value) for f in lint(Registry(parse_toml(toml), 1), index)}


def test_a_clean_registry_has_no_findings() -> None:
    assert checks(CLEAN) == set()


@pytest.mark.parametrize(
    ("extra", "finding"),
    [
        ('aliases = ["cart/items"]', ("x.y", "never_matches", "cart/items")),  # reads as a path
        ('aliases = ["package.json"]', ("x.y", "never_matches", "package.json")),  # reads as a file
        ('aliases = ["carts"]', ("x.y", "never_matches", "carts")),  # a plural names instances
        ('aliases = ["not found"]', ("x.y", "never_matches", "not found")),  # reads as a negation
        ('aliases = ["basket"]', ("x.y", "common_word", "basket")),
        ('aliases = ["export"]', ("x.y", "verb_word", "export")),
        ('aliases = ["shopping cart"]', ("x.y", "duplicate", "shopping cart")),
        ('symbols = ["Cart"]', ("x.y", "duplicate", "Cart")),
        ('paths = ["src/gone/"]', ("x.y", "no_file", "src/gone/")),
        ('symbols = ["Nowhere"]', ("x.y", "no_symbol", "Nowhere")),
        ('aliases = ["express lane"]', ("x.y", "no_files", "")),  # no path, no symbol in the code
    ],
)
def test_each_check_catches_its_problem(extra: str, finding: tuple[str, str, str]) -> None:
    toml = CLEAN + f'\n[[concept]]\nid = "x.y"\n{extra}\n'
    assert finding in checks(toml)


def test_code_checks_need_an_index() -> None:
    toml = CLEAN + '\n[[concept]]\nid = "x.y"\npaths = ["src/gone/"]\n'
    assert not {c for c in checks(toml, None) if c[1] in ("no_file", "no_files", "no_symbol")}


# --- the command line ---------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = tetherlab(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "repo"
    (r / "src" / "checkout").mkdir(parents=True)
    (r / "src" / "cart.py").write_text("class Cart:\n    def add(self, item):\n        self._items = [item]\n")
    (r / "src" / "checkout" / "pay.py").write_text("class Checkout:\n    def pay(self):\n        pass\n")
    (r / ".tetherlab").mkdir()
    (r / ".tetherlab" / "concepts.toml").write_text(CLEAN)
    subprocess.run(["git", "init", "-q", str(r)], check=True)
    return r


def test_index_lint_and_match_from_files(repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    idx = tmp_path / "index.json"
    code, out, _ = run(capsys, "concepts", "index", "--repo", str(repo), "--out", str(idx), "--json")
    report = json.loads(out)
    assert code == EXIT_OK and report["parsed"] == 2 and report["symbols"] >= 4
    assert CodeIndex.from_bytes(idx.read_bytes()).digest == report["digest"]

    registry = str(repo / ".tetherlab" / "concepts.toml")
    code, out, _ = run(capsys, "concepts", "lint", registry, "--index", str(idx), "--json")
    assert code == EXIT_OK and json.loads(out)["findings"] == []
    bad = tmp_path / "bad.toml"
    bad.write_text(CLEAN + '\n[[concept]]\nid = "x.y"\naliases = ["cart/items"]\n')
    code, out, _ = run(capsys, "concepts", "lint", str(bad), "--json")
    assert code == EXIT_FAILED and json.loads(out)["counts"]["never_matches"] == 1

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"summary": "Make `Cart._items` a deque", "steps": ["Use Checkout.pay unchanged"]}))
    code, out, _ = run(capsys, "concepts", "match", "--registry", registry, "--index", str(idx), "--plan", str(plan),
                       "--json")
    got = json.loads(out)
    assert code == EXIT_OK and set(got) >= {"modify", "depend", "files", "symbols"}
    assert [c["concept"] for c in got["modify"]] == ["shop.cart"]
    assert [c["concept"] for c in got["depend"]] == ["shop.checkout"]
    assert all(r["kind"] and r["detail"] and r["source"] for c in got["modify"] for r in c["reasons"])
    md = tmp_path / "plan.md"
    md.write_text("# Plan: checkout retries\n- Retry `Checkout.pay` on timeouts\n"
                  "Concepts: modify shop.checkout; depend shop.cart\n")
    code, out, _ = run(capsys, "concepts", "match", "--registry", registry, "--plan", str(md))
    assert code == EXIT_OK and "modify  shop.checkout" in out and "explicit" in out


@pytest.mark.parametrize(
    "argv",
    [
        ("concepts", "match", "--registry", "/nonexistent.toml", "--plan", "/nonexistent.json"),
        ("concepts", "lint", "/nonexistent.toml"),
        ("concepts", "index", "--repo", "/nonexistent", "--out", "/tmp/x.json"),
    ],
)
def test_bad_input_is_a_usage_error(argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, *argv)
    assert code == EXIT_USAGE and "tetherlab concepts" in err


def test_match_refuses_an_unknown_explicit_concept(repo: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"summary": "x", "concepts": {"modify": ["no.such"]}}))
    code, _, err = run(capsys, "concepts", "match", "--registry", str(repo / ".tetherlab" / "concepts.toml"),
                       "--plan", str(plan))
    assert code == EXIT_USAGE and "no.such" in err


# --- what agents read -------------------------------------------------------------------------------


def test_the_instruction_section_lists_the_repository_concepts(repo: Path) -> None:
    target = repo / "CLAUDE.md"
    assert install_section(target)
    text = target.read_text()
    assert SECTION_BEGIN in text and "`shop.cart`: Cart" in text and "`shop.checkout`: Checkout" in text
    assert "Concepts: modify" in text  # how to declare in plan mode
    many = [(f"a.c{i}", f"concept {i}") for i in range(500)]
    bounded = render_instructions(many)
    assert bounded.count("- `a.c") == CONCEPTS_IN_INSTRUCTIONS_MAX and "and 420 more" in bounded


def test_plan_mode_markdown_keeps_every_line_and_reads_a_concepts_line() -> None:
    plan = plan_from_markdown("# Plan: Fix totals\n**Context:** totals drift\n- Edit `src/cart.py`\n"
                              "## Verification\n- **Concepts:** modify `shop.cart`; depend shop.checkout\n")
    assert plan["steps"] == ["**Context:** totals drift", "Edit `src/cart.py`", "## Verification"]
    assert plan["concepts"] == {"modify": ["shop.cart"], "depend": ["shop.checkout"]}
    assert "files" not in plan  # the master reads which paths are changed from the text


def test_a_verdict_tells_the_agent_how_its_claims_compare() -> None:
    d = Driver()
    d.init()
    d.push(CLEAN)
    d.open("alice/a1")
    derived = d.intent("alice/a1", "Make `Cart.add` faster")
    assert "declare them in the plan" in derived["context"]
    d.end("alice/a1")
    declared = d.intent("alice/a1", "Make `Cart.add` faster", modify=["shop.checkout"])
    checks = declared["claims"]["checks"]
    assert {c["concept"] for c in checks} == {"shop.checkout", "shop.cart"}
    assert "Claim check" in declared["context"] and "shop.checkout" in declared["context"]
