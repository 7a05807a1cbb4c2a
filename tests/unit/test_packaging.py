"""What `pip install tetherlab` puts in site-packages: every module of the source tree (the
folders are remapped to the ``tetherlab.`` namespace, so every package must be listed), the
files the code reads at run time, and no generic top-level names."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path
from typing import Any

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


def _dev_links() -> Any:
    spec = importlib.util.spec_from_file_location("dev_links", ROOT / "deploy" / "scripts" / "dev_links.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dev_links_point_the_editable_install_at_the_source_folders(tmp_path: Path) -> None:
    site, venv = tmp_path / "site", tmp_path / "venv"
    site.mkdir()
    pth = site / "__editable__.tetherlab-0.1.0.pth"
    pth.write_text("import __editable___tetherlab_0_1_0_finder; __editable___tetherlab_0_1_0_finder.install()\n")
    tree = _dev_links().link(site, venv, ROOT)
    assert pth.read_text() == f"{tree}\n"  # a path entry: nothing imported at start-up
    for folder, name in SOURCES.items():
        assert (tree / name.replace(".", "/")).resolve() == ROOT / folder
    r = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path.insert(0, {str(tree)!r}); "
                        "import tetherlab.shim.hooks as h, os; print(os.path.realpath(h.__file__))"],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == str(ROOT / "shim" / "hooks.py"), r.stderr


def test_the_dev_install_starts_without_an_import_hook() -> None:
    """`make venv` runs deploy/scripts/dev_links.py after `pip install -e`: setuptools' finder
    for the remapped folders costs ~13 ms of every `tether` start (the hook runs on every tool
    call). A regular install has no finder, so there is nothing to check."""
    site = Path(sysconfig.get_paths()["purelib"])
    if not list(site.glob("__editable__.tetherlab-*.pth")):
        pytest.skip("tetherlab is not installed editable here")
    r = subprocess.run([sys.executable, "-c", "import sys, tetherlab.shim.cli; "
                        "print([getattr(f, '__module__', '') for f in sys.meta_path])"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "__editable__" not in r.stdout, f"an import-hook finder runs at start-up ({r.stdout.strip()}): run make venv"


def _pick_python(candidates: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(ROOT / "deploy/scripts/pick-python.sh")], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHON_CANDIDATES": " ".join(candidates)}, timeout=60)


def test_make_venv_takes_the_first_interpreter_that_is_new_enough_and_can_make_a_venv(tmp_path: Path) -> None:
    old = tmp_path / "python-old"  # answers like a Python 3.10
    old.write_text("#!/bin/sh\nexit 1\n")
    old.chmod(0o755)
    missing = tmp_path / "no-such-python"
    out = _pick_python([str(missing), str(old), sys.executable])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == sys.executable
    none = _pick_python([str(missing), str(old)])
    assert "no Python 3.11+ with venv support" in none.stderr
    assert none.stdout.strip() == "python3"


def test_make_venv_prefers_the_distributions_interpreter() -> None:
    """What the Makefile picks by default: /usr/bin/python3 where it is usable (an optimised build,
    as deployments use), else python3 on PATH."""
    out = subprocess.run(["bash", str(ROOT / "deploy/scripts/pick-python.sh")], capture_output=True, text=True,
                         timeout=60)
    usable = subprocess.run(["/usr/bin/python3", "-c", "import sys, ensurepip, venv; "
                             "sys.exit(sys.version_info < (3, 11))"], capture_output=True).returncode == 0 \
        if Path("/usr/bin/python3").exists() else False
    assert out.stdout.strip() == ("/usr/bin/python3" if usable else "python3")
