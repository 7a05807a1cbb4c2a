"""The labelled matching benchmark in tests/data/matching/ is well-formed: every codebase folder
has a registry the project's parser accepts, a pinned source, and at least 60 plans whose
explicit and labelled concept ids all exist in that registry. Only reads files: no network,
no third-party code."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tetherlab.cluster.core.engine.model import IntentBody
from tetherlab.cluster.core.engine.registry import parse_toml

DATA = Path(__file__).resolve().parent.parent / "data" / "matching"
CODEBASES = sorted(p for p in DATA.iterdir() if p.is_dir())

MIN_PLANS = 60
MIN_CODEBASES = 2
CONCEPTS_RANGE = (25, 40)
PLAN_KEYS = {"id", "summary", "steps", "explicit", "labels", "notes", "style"}
STYLES = {"claude-code", "codex", "opencode", "terse", "long"}
SOURCE_KEYS = {"name", "language", "registry", "package", "version", "archive", "sha256", "fetch", "archive_root"}
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def _plans(folder: Path) -> list[dict[str, Any]]:
    lines = (folder / "plans.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _source(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "source.json").read_text(encoding="utf-8"))


def test_codebases_are_several_and_of_different_languages() -> None:
    assert len(CODEBASES) >= MIN_CODEBASES
    languages = {_source(folder)["language"] for folder in CODEBASES}
    assert len(languages) >= 2, languages


@pytest.mark.parametrize("folder", CODEBASES, ids=lambda p: p.name)
def test_source_is_pinned(folder: Path) -> None:
    src = _source(folder)
    assert set(src) >= SOURCE_KEYS, SOURCE_KEYS - set(src)
    assert src["name"] == folder.name
    assert src["registry"] in {"pypi", "npm"}
    assert SHA256_RE.match(src["sha256"]), src["sha256"]
    assert src["version"] in src["archive"] and src["version"] in src["fetch"]


@pytest.mark.parametrize("folder", CODEBASES, ids=lambda p: p.name)
def test_registry_parses(folder: Path) -> None:
    concepts = parse_toml((folder / "registry.toml").read_text(encoding="utf-8"))
    lo, hi = CONCEPTS_RANGE
    assert lo <= len(concepts) <= hi, len(concepts)


@pytest.mark.parametrize("folder", CODEBASES, ids=lambda p: p.name)
def test_plans_are_well_formed(folder: Path) -> None:
    ids = {c.id for c in parse_toml((folder / "registry.toml").read_text(encoding="utf-8"))}
    plans = _plans(folder)
    assert len(plans) >= MIN_PLANS, len(plans)
    seen: set[str] = set()
    problems: list[str] = []
    for plan in plans:
        pid = plan.get("id", "?")
        if set(plan) != PLAN_KEYS:
            problems.append(f"{pid}: keys {sorted(set(plan) ^ PLAN_KEYS)}")
            continue
        if pid in seen:
            problems.append(f"{pid}: duplicate id")
        seen.add(pid)
        if plan["style"] not in STYLES:
            problems.append(f"{pid}: style {plan['style']!r}")
        if not plan["summary"].strip() or not plan["notes"].strip():
            problems.append(f"{pid}: empty summary or notes")
        if not all(isinstance(s, str) and s.strip() for s in plan["steps"]):
            problems.append(f"{pid}: steps must be non-empty strings")
        for field in ("explicit", "labels"):
            claims = plan[field]
            if set(claims) != {"modify", "depend"}:
                problems.append(f"{pid}: {field} keys {sorted(claims)}")
                continue
            for kind in ("modify", "depend"):
                refs = claims[kind]
                problems += [f"{pid}: {field}.{kind} unknown concept {c!r}" for c in refs if c not in ids]
                if len(set(refs)) != len(refs):
                    problems.append(f"{pid}: {field}.{kind} repeats an id")
            both = set(claims["modify"]) & set(claims["depend"])
            if both:
                problems.append(f"{pid}: {field} lists {sorted(both)} under both modify and depend")
        # What a plain agent sends, and what a well-instructed one sends, are valid intents.
        IntentBody(summary=plan["summary"], steps=tuple(plan["steps"]))
        IntentBody(
            summary=plan["summary"],
            steps=tuple(plan["steps"]),
            modify=tuple(plan["explicit"]["modify"]),
            depend=tuple(plan["explicit"]["depend"]),
        )
    assert not problems, "\n".join(problems)
    assert any(not p["labels"]["modify"] and not p["labels"]["depend"] for p in plans), "no plan without claims"
