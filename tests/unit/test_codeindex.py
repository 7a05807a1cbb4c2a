"""The code index: tree-sitter symbol extraction per language, the index's look-ups, its JSON
and packed forms, and the bounds and checks that refuse a bad one."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tetherlab.cluster.core.engine.codeindex import (
    INDEX_MAX_BYTES,
    CodeIndex,
    CodeIndexError,
    Place,
    Symbol,
    module_names,
    pack,
    unpack,
)
from tetherlab.cluster.ops.codeindex import build_index
from tetherlab.cluster.ops.codeparse import language_for, parse_symbols

PY = b'''
import os

DEFAULT = 3

class Console:
    """Doc."""
    width: int = 80

    def __init__(self):
        self._lock = None
        self.a, self.b = 1, 2

    def print(self, x):
        def inner():
            pass
        return x

    @property
    def size(self):
        return 1

def get_console():
    return Console()

if os.name == "nt":
    def windows_only():
        pass
'''

TS = b'''
export interface RouterOptions {
  caseSensitive?: boolean
  basepath: string
}
export type LRUCache<K, V> = { get: (k: K) => V | undefined; clear: () => void }
export class RouterCore<T> implements X {
  options: RouterOptions
  matchRoutes = (loc: string) => { return [] }
  load(): void {}
}
export function createLRUCache() {}
export const isServer = typeof window === 'undefined'
const helper = () => 1
enum Kind { A, B }
'''

GO = b'''
package client

type Client struct {
    Timeout int
}

type Doer interface {
    Do() error
}

func (c *Client) Do() error { return nil }

func New() *Client { return &Client{} }

const MaxRetries = 3
'''

RUST = b'''
pub struct Client { timeout: u32 }
impl Client {
    pub fn send(&self) {}
}
pub trait Transport { fn handle(&self); }
pub mod pool { pub fn get() {} }
const LIMIT: u32 = 3;
'''


def names(source: bytes, lang: str) -> dict[str, tuple[str, int, int]]:
    return {s.name: (s.kind, s.start_line, s.end_line) for s in parse_symbols(source, lang)}


def test_python_symbols_are_qualified_with_line_ranges() -> None:
    got = names(PY, "python")
    assert got["Console"][0] == "class" and got["Console"][1] == 6
    assert got["Console.print"] == ("method", 14, 17)
    assert got["Console._lock"][0] == "attribute"  # self._lock in a method
    assert {"Console.a", "Console.b", "Console.width", "Console.size"} <= set(got)
    assert got["get_console"][0] == "function" and got["DEFAULT"][0] == "variable"
    assert "windows_only" in got  # defined under a module-level if
    assert "inner" not in got and "Console.print.inner" not in got  # locals are not the module's symbols


def test_typescript_symbols_cover_classes_interfaces_types_and_fields() -> None:
    got = names(TS, "typescript")
    assert got["RouterOptions"][0] == "interface" and "RouterOptions.caseSensitive" in got
    assert got["LRUCache"][0] == "type" and {"LRUCache.get", "LRUCache.clear"} <= set(got)
    assert got["RouterCore"][0] == "class"
    assert {"RouterCore.options", "RouterCore.matchRoutes", "RouterCore.load"} <= set(got)
    assert got["createLRUCache"][0] == "function" and got["helper"][0] == "function"
    assert got["isServer"][0] == "variable" and got["Kind"][0] == "enum"


def test_go_and_rust_symbols() -> None:
    go = names(GO, "go")
    assert {"Client", "Client.Timeout", "Doer", "Doer.Do", "Client.Do", "New", "MaxRetries"} <= set(go)
    rs = names(RUST, "rust")
    assert {"Client", "Client.timeout", "Client.send", "Transport", "Transport.handle", "pool", "pool.get",
            "LIMIT"} <= set(rs)


def test_languages_by_suffix() -> None:
    assert language_for("a/b.py") == "python" and language_for("x.tsx") == "tsx"
    assert language_for("x.mjs") == "javascript" and language_for("x.go") == "go" and language_for("x.rs") == "rust"
    assert language_for("README.md") is None and language_for("Makefile") is None


def test_a_file_with_syntax_errors_still_yields_what_can_be_placed() -> None:
    got = names(b"def ok():\n    pass\n\ndef broken(:\n    pass\nclass Fine:\n    pass\n", "python")
    assert "ok" in got and "Fine" in got


# --- look-ups ---------------------------------------------------------------------------------


def sym(name: str, kind: str = "function", start: int = 1, end: int = 1) -> Symbol:
    return Symbol(name, kind, start, end)


INDEX = CodeIndex({
    "rich/console.py": [sym("Console", "class", 1, 100), sym("Console.print", "method", 10, 20),
                        sym("Console._caller_frame_info", "method", 30, 40), sym("Console._live_stack", "attribute"),
                        sym("ConsoleOptions", "class", 101, 150)],
    "rich/markup.py": [sym("escape"), sym("render")],
    "rich/live.py": [sym("Live", "class", 1, 50), sym("Live.render", "method")],
    "rich/__init__.py": [sym("print")],
    "rich/json.py": [sym("JSON", "class")],
    "src/index.ts": [],
    "src/ssr/headers.ts": [sym("mergeHeaders")],
    "docs/guide.md": [],
})


def at(places: list[Place]) -> set[tuple[str, str | None]]:
    return {(p.path, p.symbol.name if p.symbol else None) for p in places}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Console._caller_frame_info", {("rich/console.py", "Console._caller_frame_info")}),  # qualified private
        ("console._live_stack", {("rich/console.py", "Console._live_stack")}),  # module, then a member of a class
        ("markup.escape", {("rich/markup.py", "escape")}),  # module.func
        ("rich.markup.escape", {("rich/markup.py", "escape")}),  # dotted module path
        ("ConsoleOptions.with_width", {("rich/console.py", "ConsoleOptions")}),  # new member: the class
        ("self.Console.print", {("rich/console.py", "Console.print")}),  # receivers dropped
        ("escape", {("rich/markup.py", "escape")}),  # a bare name defined once
        ("render", {("rich/markup.py", "render"), ("rich/live.py", "Live.render")}),  # every definition
        ("json.loads", set()),  # the stdlib's json, not rich/json.py: loads is not defined there
        ("escape.nothing", set()),  # a function is not a container
        ("test_live_screen", {("rich/live.py", None)}),  # a test named after its module
        ("nope", set()),
    ],
)
def test_resolve(text: str, expected: set[tuple[str, str | None]]) -> None:
    assert at(INDEX.resolve(text)) == expected


def test_module_names_and_entries_and_paths() -> None:
    assert module_names("rich/console.py") == ["console", "rich.console"]
    assert module_names("rich/__init__.py") == ["rich"]
    assert module_names("src/ssr/headers.ts") == ["headers", "src.ssr.headers"]
    assert module_names("docs/guide.md") == []
    assert INDEX.entry_files() == ["rich/__init__.py", "src/index.ts"]  # the shallowest package entries
    assert INDEX.find_suffix("ssr/headers.ts") == ["src/ssr/headers.ts"]
    assert INDEX.find_suffix("headers.ts") == ["src/ssr/headers.ts"]
    assert INDEX.has_dir("src/ssr") and INDEX.has_dir("src") and not INDEX.has_dir("lib")
    assert INDEX.enclosing("rich/console.py", sym("Console.print", "method", 10, 20))[0].name == "Console"


def test_a_name_defined_in_too_many_places_resolves_to_nothing() -> None:
    many = CodeIndex({f"m{i}.py": [sym("C", "class"), sym("C.update", "method")] for i in range(20)})
    assert many.resolve("update") == []
    assert many.defines("update")  # lint still knows it exists


# --- JSON, packing, bounds --------------------------------------------------------------------


def test_json_round_trip_and_digest_are_canonical() -> None:
    again = CodeIndex.from_json(json.loads(json.dumps(INDEX.to_json())))
    assert again.digest == INDEX.digest and again.to_json() == INDEX.to_json()
    digest, chunks = pack(INDEX, chunk_chars=64)
    assert len(chunks) > 1 and digest == INDEX.digest
    assert unpack(chunks, digest).to_json() == INDEX.to_json()


@pytest.mark.parametrize(
    ("obj", "needle"),
    [
        ({"format": 2, "files": {}}, "format"),
        ({"format": 1, "files": {"/abs.py": []}}, "relative"),
        ({"format": 1, "files": {"a/../b.py": []}}, "'..'"),
        ({"format": 1, "files": {"a.py": [["x y", "function", 1, 1]]}}, "not a symbol name"),
        ({"format": 1, "files": {"a.py": [["x", "function", 5, 2]]}}, "line range"),
        ({"format": 1, "files": {"a.py": [["x", "function", 1]]}}, "[name, kind, start, end]"),
        ({"format": 1, "files": {}, "extra": 1}, "unknown field"),
    ],
)
def test_a_bad_index_is_refused_with_a_reason(obj: dict, needle: str) -> None:
    with pytest.raises(CodeIndexError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        CodeIndex.from_json(obj)


def test_unpack_checks_the_digest_and_bounds_decompression() -> None:
    digest, chunks = pack(INDEX)
    with pytest.raises(CodeIndexError, match="digest"):
        unpack(chunks, "0" * 64)
    with pytest.raises(CodeIndexError, match="base64"):
        unpack(["not base64!"], digest)
    import base64
    import zlib
    bomb = base64.b64encode(zlib.compress(b" " * (INDEX_MAX_BYTES + 10))).decode()
    with pytest.raises(CodeIndexError, match="larger than"):
        unpack([bomb], digest)


# --- building from a checkout ----------------------------------------------------------------


def test_build_index_from_a_git_checkout_lists_tracked_files_only(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "__init__.py").write_text("from .core import Engine\n")
    (repo / "pkg" / "core.py").write_text("class Engine:\n    def run(self):\n        pass\n")
    (repo / "README.md").write_text("hi\n")
    (repo / ".gitignore").write_text("dist/\n")
    (repo / "dist").mkdir()
    (repo / "dist" / "core.py").write_text("class Engine: pass\n")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    idx, report = build_index(repo)
    assert set(idx.files) == {".gitignore", "README.md", "pkg/__init__.py", "pkg/core.py"}
    assert at(idx.resolve("Engine.run")) == {("pkg/core.py", "Engine.run")}
    assert report.parsed == 2 and not report.truncated
    walked, _ = build_index(repo / "pkg")  # not a git work tree: walked
    assert set(walked.files) == {"__init__.py", "core.py"}


def test_the_parser_feeds_in_flight_change_reports(tmp_path: Path) -> None:
    """Issue 15's change reports take the parser as a function: the tree-sitter one fits."""
    from tetherlab.shim.changes import collect

    repo = tmp_path / "r"
    repo.mkdir()

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    git("config", "user.email", "a@b")
    git("config", "user.name", "a")
    (repo / "svc.ts").write_text("export class Svc {\n  run(): number {\n    return 1\n  }\n  stop() {}\n}\n")
    git("add", "-A")
    git("commit", "-qm", "base")
    base = git("rev-parse", "HEAD").strip()
    (repo / "svc.ts").write_text("export class Svc {\n  run(): number {\n    return 2\n  }\n  stop() {}\n}\n")
    rep = collect(repo, base, parse_symbols, language_for)
    (f,) = rep.files
    assert {s["name"] for s in f.symbols} >= {"Svc.run"} and "Svc.stop" not in {s["name"] for s in f.symbols}
