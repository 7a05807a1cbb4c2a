"""What `pip install tetherlab` puts in site-packages: every module of the source tree (the
folders are remapped to the ``tetherlab.`` namespace, so every package must be listed), the
files the code reads at run time, and no generic top-level names."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {"cluster": "tetherlab.cluster", "shim": "tetherlab.shim", "chaos": "tetherlab.chaos"}


def source_packages() -> set[str]:
    out = set()
    for folder, name in SOURCES.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            out.add(".".join([name, *rel.parts]))
    return out


def test_every_source_package_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert listed == source_packages()


@pytest.mark.slow
def test_the_wheel_holds_every_module_and_the_data_files(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    wheel = next(tmp_path.glob("tetherlab-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"tetherlab/{folder}/{p.relative_to(ROOT / folder).as_posix()}"
                for folder in SOURCES for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts}
    assert not expected - names, sorted(expected - names)
    assert "tetherlab/shim/opencode_plugin.js" in names
    assert {f"tetherlab/cluster/node/ui_static/{n}" for n in ("index.html", "app.js", "style.css")} <= names
    tops = {n.split("/")[0] for n in names if not n.startswith("tetherlab-")}
    assert tops == {"tetherlab"}, tops


def test_test_modules_have_unique_names() -> None:
    """pytest imports test files outside packages by their basename: two with one name collide
    (one of them fails to collect on a fresh clone)."""
    names: dict[str, Path] = {}
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        if (path.parent / "__init__.py").exists():
            continue  # inside a package: imported by its dotted name
        assert path.name not in names, f"{path} and {names[path.name]} share a name"
        names[path.name] = path
