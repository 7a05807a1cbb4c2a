"""The import contract: the layers of README.md's layout table import downwards only.

Layers, bottom first; a module may import its own layer and the layers before it:

    protocol < core < replica < node < ops < shim < tools < cli

and, beside them:

- nothing imports ``cli`` (``tetherlab.cluster.cli``, and ``tetherlab.shim.cli`` which is the
  ``tether`` command's parser); no product module imports ``tetherlab.chaos`` (drills,
  simulation, benchmarks);
- ``core`` and ``protocol`` import none of the I/O libraries, and read no clock or random source;
- ``shim`` imports nothing of ``node`` or ``replica``;
- no module imports another module's private (``_name``) names;
- imports inside functions only in ``cli`` (start-up time) and the hook path.

Each rule is checked on the real source tree by :func:`violations`; ``test_each_rule_catches_*``
plants a violation in a throwaway tree to prove the checker can fail.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {"tetherlab.cluster": ROOT / "cluster", "tetherlab.shim": ROOT / "shim", "tetherlab.chaos": ROOT / "chaos"}

LAYERS: list[tuple[str, tuple[str, ...]]] = [  # bottom first
    ("protocol", ("tetherlab.cluster.protocol",)),
    ("core", ("tetherlab.cluster.core",)),
    ("replica", ("tetherlab.cluster.replica",)),
    ("node", ("tetherlab.cluster.node",)),
    ("ops", ("tetherlab.cluster.ops",)),
    ("shim", ("tetherlab.shim",)),
    ("tools", ("tetherlab.cluster.tools",)),
    ("cli", ("tetherlab.cluster.cli", "tetherlab.shim.cli")),
]
OUTSIDE = ("tetherlab.chaos",)  # test and measurement infrastructure
PACKAGE_ROOTS = ("tetherlab.cluster",)  # the root __init__: the version only, importable by all
IO_LIBRARIES = ("asyncio", "lmdb", "pysyncobj", "aiohttp", "asyncssh", "socket", "subprocess", "threading",
                "time", "random", "secrets", "uuid", "datetime", "os", "prometheus_client")
PURE_LAYERS = ("protocol", "core")
INNER_IMPORTS_ALLOWED = ("cli",)  # by layer; and the hook path:
HOOK_PATH = ("tetherlab.shim.hooks",)


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    tree: ast.Module


def layer_of(module: str) -> str | None:
    best: tuple[int, str] | None = None
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            matches = module == prefix or module.startswith(prefix + ".")
            if matches and (best is None or len(prefix) > best[0]):
                best = (len(prefix), name)
    if best is not None:
        return best[1]
    if any(module == o or module.startswith(o + ".") for o in OUTSIDE):
        return "outside"
    return None


def rank(layer: str) -> int:
    return [n for n, _ in LAYERS].index(layer)


def load(sources: dict[str, Path]) -> list[Module]:
    out = []
    for package, root in sources.items():
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            out.append(Module(name, path, ast.parse(path.read_text(), str(path))))
    return out


def _imports(mod: Module) -> list[tuple[ast.AST, str, list[str], bool]]:
    """(node, imported module, imported names, inside a function) for every import."""
    found: list[tuple[ast.AST, str, list[str], bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append((child, alias.name, [], in_function))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against this package
                    pkg = mod.name.split(".")
                    if mod.path.name != "__init__.py":
                        pkg = pkg[:-1]
                    pkg = pkg[: len(pkg) - (child.level - 1)]
                    base = ".".join([*pkg, base]) if base else ".".join(pkg)
                names = [a.name for a in child.names]
                # "from package import module" imports a module: judge it as that module
                found.append((child, base, names, in_function))
            visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    visit(mod.tree, False)
    return found


def _targets(base: str, names: list[str], known: set[str]) -> list[str]:
    subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
    return subs or [base]


def violations(modules: list[Module]) -> list[str]:
    known = {m.name for m in modules}
    out: list[str] = []
    for mod in modules:
        layer = layer_of(mod.name)
        if layer is None and mod.name not in PACKAGE_ROOTS:
            out.append(f"{mod.name}: belongs to no layer (add it to LAYERS)")
            continue
        for node, base, names, in_function in _imports(mod):
            where = f"{mod.path.relative_to(mod.path.parents[1]) if len(mod.path.parents) > 1 else mod.path}" \
                    f":{getattr(node, 'lineno', 0)}"
            top = base.split(".")[0]
            if layer in PURE_LAYERS and (top in IO_LIBRARIES or base in IO_LIBRARIES):
                out.append(f"{where}: {mod.name} ({layer}) imports {base}: {layer} does no I/O and reads no clock")
            if in_function and layer not in INNER_IMPORTS_ALLOWED and mod.name not in HOOK_PATH:
                out.append(f"{where}: {mod.name} imports {base} inside a function (only cli and the hook path may)")
            if not base.startswith("tetherlab."):
                continue
            for private in [n for n in names if n.startswith("_") and n != "__version__"]:
                out.append(f"{where}: {mod.name} imports the private name {private} from {base}")
            for target in _targets(base, names, known):
                tl = layer_of(target)
                if target in PACKAGE_ROOTS or tl is None:
                    continue
                if tl == "cli" and layer != "cli":
                    out.append(f"{where}: {mod.name} imports {target}: nothing imports cli")
                elif tl == "outside" and layer != "outside" and layer != "cli":
                    out.append(f"{where}: {mod.name} ({layer}) imports {target}: no product module imports chaos")
                elif layer == "shim" and tl in ("node", "replica"):
                    out.append(f"{where}: {mod.name} (shim) imports {target} ({tl}): shim imports nothing of "
                               "node or replica")
                elif layer not in ("outside", "cli") and tl != "outside" and rank(tl) > rank(layer):
                    out.append(f"{where}: {mod.name} ({layer}) imports {target} ({tl}): layers import downwards only")
    return out


def test_the_source_tree_keeps_the_contract() -> None:
    problems = violations(load(SOURCES))
    assert not problems, "\n".join(problems)


# --- the checker can fail: one planted violation per rule -----------------------------------------


def _tree(tmp: Path, files: dict[str, str]) -> list[Module]:
    for rel, text in files.items():
        p = tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return load({"tetherlab.cluster": tmp / "cluster", "tetherlab.shim": tmp / "shim",
                 "tetherlab.chaos": tmp / "chaos"})


def _planted(tmp: Path, rel: str, text: str) -> list[str]:
    base = {"cluster/__init__.py": "", "cluster/core/__init__.py": "", "cluster/node/__init__.py": "",
            "cluster/replica/__init__.py": "", "cluster/cli/__init__.py": "", "cluster/cli/main.py": "",
            "cluster/protocol/__init__.py": "", "shim/__init__.py": "", "chaos/__init__.py": "",
            "cluster/node/service.py": "", "cluster/replica/store.py": "x = 1\n_hidden = 2\n"}
    return violations(_tree(tmp, {**base, rel: text}))


def test_each_rule_catches_an_upward_import(tmp_path: Path) -> None:
    assert any("downwards only" in v for v in _planted(
        tmp_path, "cluster/core/x.py", "from tetherlab.cluster.node import service\n"))


def test_each_rule_catches_an_import_of_cli(tmp_path: Path) -> None:
    assert any("nothing imports cli" in v for v in _planted(
        tmp_path, "cluster/node/x.py", "from tetherlab.cluster.cli import main\n"))


def test_each_rule_catches_product_code_importing_chaos(tmp_path: Path) -> None:
    assert any("imports chaos" in v for v in _planted(tmp_path, "cluster/node/x.py", "import tetherlab.chaos\n"))


def test_each_rule_catches_io_in_core(tmp_path: Path) -> None:
    assert any("does no I/O" in v for v in _planted(tmp_path, "cluster/core/x.py", "import time\n"))
    assert any("does no I/O" in v for v in _planted(tmp_path, "cluster/protocol/y.py", "import lmdb\n"))


def test_each_rule_catches_the_shim_importing_the_node(tmp_path: Path) -> None:
    assert any("shim imports nothing" in v for v in _planted(
        tmp_path, "shim/x.py", "from tetherlab.cluster.replica import store\n"))


def test_each_rule_catches_a_private_name_import(tmp_path: Path) -> None:
    assert any("private name" in v for v in _planted(
        tmp_path, "cluster/node/x.py", "from tetherlab.cluster.replica.store import _hidden\n"))


def test_each_rule_catches_an_import_inside_a_function(tmp_path: Path) -> None:
    assert any("inside a function" in v for v in _planted(
        tmp_path / "a", "cluster/node/x.py", "def f():\n    import json\n    return json\n"))
    assert not _planted(tmp_path / "b", "cluster/cli/y.py", "def f():\n    import json\n    return json\n")


def test_each_rule_catches_a_module_outside_every_layer(tmp_path: Path) -> None:
    assert any("no layer" in v for v in _planted(tmp_path, "cluster/stray.py", "x = 1\n"))
