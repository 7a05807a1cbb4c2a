"""Benchmark of matching on labelled plans (``tetherlab bench matching [--json]``).

For each codebase folder of the labelled data (``tests/data/matching/*``: a registry, plans with
labels, and ``source.json`` pinning the code), it fetches the pinned archive with the ordinary
registry client (``pip download`` or ``npm pack``) into a cache folder (``.cache/matching`` by
default, ignored by git), checks its sha256, unpacks it, builds the code index from it, and
matches every plan twice: as a plain agent sends it (summary and steps only) and with the
agent's explicit claims. It prints precision, recall and F1 of modify and depend claims and the
exact-match rate (both sets right), per codebase and overall, separately for the development
part and the held-out part (every fourth plan of each codebase), and lists the worst plans.

Exit codes: 0 the figures meet the targets (plain text: modify precision and recall >= 0.9,
depend F1 >= 0.85; explicit claims: exact match >= 0.9; ``--no-check`` skips this); 1 they do
not; 2 bad usage or data; 3 the pinned archive could not be fetched.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tetherlab.cluster.core.engine.codeindex import CodeIndex
from tetherlab.cluster.core.engine.matching import match_intent
from tetherlab.cluster.core.engine.model import IntentBody
from tetherlab.cluster.core.engine.registry import Registry, parse_toml
from tetherlab.cluster.core.exitcodes import EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE
from tetherlab.cluster.ops.codeindex import build_index

ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = ROOT / "tests" / "data" / "matching"
CACHE_DIR = ROOT / ".cache" / "matching"
FETCH_TIMEOUT_S = 300.0
ARCHIVE_MAX_BYTES = 200 * 1024 * 1024
HELD_OUT_EVERY = 4  # plans at positions 3, 7, 11, ... of each codebase are held out
TARGETS = {"plain.modify.precision": 0.9, "plain.modify.recall": 0.9, "plain.depend.f1": 0.85,
           "explicit.exact": 0.9}

Matcher = Callable[[Registry, IntentBody, CodeIndex | None], dict[str, Any]]


class DataError(Exception):
    """The labelled data is malformed; the message names the file."""


class FetchError(Exception):
    """The pinned archive could not be fetched or does not match its sha256."""


@dataclass
class Codebase:
    name: str
    folder: Path
    source: dict[str, Any]
    registry: Registry
    plans: list[dict[str, Any]]


def load_codebase(folder: Path) -> Codebase:
    try:
        source = json.loads((folder / "source.json").read_text(encoding="utf-8"))
        registry = Registry(parse_toml((folder / "registry.toml").read_text(encoding="utf-8")), version=1)
        lines = (folder / "plans.jsonl").read_text(encoding="utf-8").splitlines()
        plans = [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError) as e:
        raise DataError(f"{folder}: {e}") from None
    return Codebase(folder.name, folder, source, registry, plans)


# --- the code ---------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_archive(src: dict[str, Any], cache: Path, offline: bool = False) -> Path:
    """The pinned archive in the cache, downloaded with pip or npm when missing; sha256-checked."""
    cache.mkdir(parents=True, exist_ok=True)
    want = src["sha256"]
    for p in sorted(cache.glob("*")):
        if p.is_file() and p.suffix in (".gz", ".tgz", ".zip") and p.stat().st_size <= ARCHIVE_MAX_BYTES \
                and _sha256(p) == want:
            return p
    if offline:
        raise FetchError(f"{src['archive']} (sha256 {want[:12]}…) is not in {cache} and --offline was given")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        if src["registry"] == "pypi":
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                   f"{src['package']}=={src['version']}", "-d", tmp]
        elif src["registry"] == "npm":
            if shutil.which("npm") is None:
                raise FetchError("npm is not installed: it fetches the npm archives (install Node.js and npm)")
            cmd = ["npm", "pack", "--silent", f"{src['package']}@{src['version']}", "--pack-destination", tmp]
        else:
            raise FetchError(f"unknown registry {src['registry']!r}")
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=FETCH_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", b"") or b""
            raise FetchError(f"{' '.join(cmd[:4])} … failed: {e} {detail.decode(errors='replace')[-500:]}") from None
        for p in sorted(Path(tmp).iterdir()):
            if p.is_file() and _sha256(p) == want:
                dest = cache / src["archive"]
                p.replace(dest)
                return dest
    raise FetchError(f"the downloaded {src['archive']} does not have the pinned sha256 {want}")


def unpack(archive: Path, dest: Path) -> None:
    """Unpack a .tar.gz/.tgz archive, refusing members that leave ``dest`` or are links."""
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar.getmembers():
            target = (dest / m.name).resolve()
            if not (m.isfile() or m.isdir()) or not str(target).startswith(str(dest.resolve()) + "/"):
                continue
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            f = tar.extractfile(m)
            if f is not None:
                target.write_bytes(f.read())


def code_index(cb: Codebase, cache: Path, offline: bool = False) -> CodeIndex:
    """The code index of a codebase's pinned source, built once and cached next to the archive."""
    src = cb.source
    cached = cache / f"{cb.name}-{src['sha256'][:16]}.index.json"
    if cached.exists():
        try:
            return CodeIndex.from_bytes(cached.read_bytes())
        except ValueError:
            cached.unlink()
    archive = fetch_archive(src, cache, offline)
    tree = cache / f"{cb.name}-{src['sha256'][:16]}"
    if not tree.exists():
        tmp = Path(tempfile.mkdtemp(dir=cache))
        unpack(archive, tmp)
        tmp.replace(tree)
    root = tree / src.get("archive_root", "")
    idx, _report = build_index(root)
    cached.write_bytes(idx.canonical())
    return idx


# --- scoring ----------------------------------------------------------------------------------


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, got: set[str], want: set[str]) -> None:
        self.tp += len(got & want)
        self.fp += len(got - want)
        self.fn += len(want - got)

    def figures(self) -> dict[str, float]:
        p = self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0
        r = self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        return {"precision": round(p, 3), "recall": round(r, 3), "f1": round(f1, 3)}


@dataclass
class Score:
    modify: Counts = field(default_factory=Counts)
    depend: Counts = field(default_factory=Counts)
    plans: int = 0
    exact: int = 0

    def add(self, got: dict[str, set[str]], want: dict[str, set[str]]) -> None:
        self.modify.add(got["modify"], want["modify"])
        self.depend.add(got["depend"], want["depend"])
        self.plans += 1
        self.exact += got == want

    def to_json(self) -> dict[str, Any]:
        return {"plans": self.plans, "modify": self.modify.figures(), "depend": self.depend.figures(),
                "exact": round(self.exact / self.plans, 3) if self.plans else 1.0}


def default_matcher(reg: Registry, body: IntentBody, idx: CodeIndex | None) -> dict[str, Any]:
    return match_intent(reg, body, idx)


def _claims(out: dict[str, Any]) -> dict[str, set[str]]:
    return {"modify": {c["concept"] for c in out["modify"]}, "depend": {c["concept"] for c in out["depend"]}}


def evaluate(cbs: list[tuple[Codebase, CodeIndex | None]], matcher: Matcher = default_matcher,
             worst: int = 10, worst_part: str = "all") -> dict[str, Any]:
    """Scores per mode (plain, explicit), per codebase and part (dev, held_out, all), overall."""
    scores: dict[str, dict[str, dict[str, Score]]] = {}
    errors: list[dict[str, Any]] = []
    for cb, idx in cbs:
        for i, plan in enumerate(cb.plans):
            part = "held_out" if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else "dev"
            want = {k: set(plan["labels"][k]) for k in ("modify", "depend")}
            for mode in ("plain", "explicit"):
                ex = plan["explicit"] if mode == "explicit" else {"modify": [], "depend": []}
                body = IntentBody(plan["summary"], tuple(plan["steps"]), modify=tuple(ex["modify"]),
                                  depend=tuple(ex["depend"]))
                got = _claims(matcher(cb.registry, body, idx))
                for c in (cb.name, "overall"):
                    for pt in (part, "all"):
                        scores.setdefault(mode, {}).setdefault(c, {}).setdefault(pt, Score()).add(got, want)
                if mode == "plain" and got != want and worst_part in ("all", part):
                    diff = {f"{k}{s}": sorted(a) for k in ("modify", "depend")
                            for s, a in (("+", got[k] - want[k]), ("-", want[k] - got[k])) if a}
                    cost = sum(2 * len(v) if k.startswith("modify") else len(v) for k, v in diff.items())
                    errors.append({"plan": plan["id"], "part": part, "cost": cost, "diff": diff,
                                   "summary": plan["summary"][:100]})
    errors.sort(key=lambda e: (-e["cost"], e["plan"]))
    out: dict[str, Any] = {
        m: {c: {pt: per[c][pt].to_json() for pt in ("dev", "held_out", "all") if pt in per[c]}
            for c in [*sorted(k for k in per if k != "overall"), "overall"] if c in per}
        for m, per in scores.items()}
    out["worst"] = errors[:worst]
    out["wrong_plans"] = len(errors)
    return out


def check(result: dict[str, Any], part: str = "all") -> list[str]:
    """The targets the overall figures miss, as readable lines (empty: all met)."""
    plain, explicit = result["plain"]["overall"][part], result["explicit"]["overall"][part]
    got = {"plain.modify.precision": plain["modify"]["precision"], "plain.modify.recall": plain["modify"]["recall"],
           "plain.depend.f1": plain["depend"]["f1"], "explicit.exact": explicit["exact"]}
    return [f"{k} {got[k]:.3f} < {v}" for k, v in TARGETS.items() if got[k] < v]


def render(result: dict[str, Any]) -> str:
    lines = []
    for mode in ("plain", "explicit"):
        lines.append(f"{mode} text" if mode == "plain" else "with explicit claims")
        lines.append(f"  {'codebase':<24}{'part':<10}{'plans':>6}  {'modify P/R/F1':<20}{'depend P/R/F1':<20}"
                     f"{'exact':>6}")
        for cb, parts in result[mode].items():
            for pt in ("dev", "held_out", "all"):
                s = parts.get(pt)
                if s is None:
                    continue
                m, d = s["modify"], s["depend"]
                lines.append(f"  {cb:<24}{pt:<10}{s['plans']:>6}  "
                             f"{m['precision']:.2f}/{m['recall']:.2f}/{m['f1']:.2f}{'':<6}"
                             f"{d['precision']:.2f}/{d['recall']:.2f}/{d['f1']:.2f}{'':<6}{s['exact']:>6.2f}")
    lines.append(f"worst plain-text plans ({result['wrong_plans']} not exactly right):")
    for e in result["worst"]:
        lines.append(f"  {e['plan']:<10} {e['part']:<9} {json.dumps(e['diff'])}  {e['summary']!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None, matcher: Matcher = default_matcher) -> int:
    p = argparse.ArgumentParser(prog="tetherlab bench matching",
                                description="matching on labelled plans: precision, recall, F1, exact match")
    p.add_argument("--data", default=str(DATA_DIR), help="folder of codebase folders (default %(default)s)")
    p.add_argument("--cache", default=str(CACHE_DIR), help="where archives and indexes are kept (default %(default)s)")
    p.add_argument("--codebase", action="append", default=[], metavar="NAME", help="only this codebase (repeatable)")
    p.add_argument("--limit", type=int, default=0, metavar="N", help="only the first N plans of each codebase")
    p.add_argument("--worst", type=int, default=10, metavar="N", help="list the N worst plans (default 10)")
    p.add_argument("--worst-part", choices=["all", "dev", "held_out"], default="all",
                   help="list worst plans from this part only (develop against dev)")
    p.add_argument("--no-index", action="store_true", help="match without the code index (registry only)")
    p.add_argument("--offline", action="store_true", help="use only archives already in the cache")
    p.add_argument("--no-check", action="store_true", help="exit 0 even when the figures miss the targets")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    data, cache = Path(a.data), Path(a.cache)
    try:
        folders = sorted(f for f in data.iterdir() if f.is_dir() and (not a.codebase or f.name in a.codebase))
        if not folders:
            raise DataError(f"no codebase folders in {data}" + (f" named {a.codebase}" if a.codebase else ""))
        cbs = [load_codebase(f) for f in folders]
    except (OSError, DataError) as e:
        print(f"tetherlab bench matching: {e}", file=sys.stderr)
        return EXIT_USAGE
    loaded: list[tuple[Codebase, CodeIndex | None]] = []
    for cb in cbs:
        if a.limit > 0:
            cb.plans = cb.plans[: a.limit]
        try:
            idx = None if a.no_index else code_index(cb, cache, a.offline)
        except (FetchError, OSError, tarfile.TarError) as e:
            print(f"tetherlab bench matching: {cb.name}: {e}", file=sys.stderr)
            return EXIT_UNAVAILABLE
        loaded.append((cb, idx))
    result = evaluate(loaded, matcher, a.worst, a.worst_part)
    missed = check(result)
    result["targets"] = TARGETS
    result["missed"] = missed
    out = io.StringIO()
    print(json.dumps(result) if a.json else render(result), file=out)
    if not a.json:
        print("targets met" if not missed else "targets missed: " + "; ".join(missed), file=out)
    sys.stdout.write(out.getvalue())
    return EXIT_OK if a.no_check or not missed else EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
