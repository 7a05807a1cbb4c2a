"""Make the development install (``pip install -e``, run by ``make venv``) start fast.

setuptools installs an editable package whose folders are remapped (``cluster/`` installs as
``tetherlab.cluster``, see ``[tool.setuptools] package-dir``) through an import-hook finder that
every interpreter start-up imports from a ``.pth`` file. That finder pulls in pathlib, re,
fnmatch and importlib.util: ~13 ms of every ``tether`` and ``tetherlab`` start (a 36 ms
``tether hook claude-code`` was 21 ms without it, measured with ``tetherlab bench cluster``'s
hook phase).

This script puts a plain path entry in its place: ``<venv>/tetherlab-src/tetherlab/<sub>`` are
symlinks to the source folders, so edits and new modules show at once, as with the finder, and
the ``.pth`` file names that directory instead of importing code. A regular (non-editable)
install has no finder and needs none of this. Idempotent; run by the Makefile after
``pip install -e``. Exit 0 done, 1 the editable install is missing or the result does not import.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def package_dirs(pyproject: Path) -> dict[str, str]:
    """``{"tetherlab.cluster": "cluster", ...}`` from pyproject.toml, the one place it is said."""
    data = tomllib.loads(pyproject.read_text())
    dirs: dict[str, str] = data["tool"]["setuptools"]["package-dir"]
    return dirs


def link(venv_site: Path, venv_root: Path, root: Path) -> Path:
    """Build the link tree and point the editable install's ``.pth`` at it; returns the tree."""
    pths = sorted(venv_site.glob("__editable__.tetherlab-*.pth"))
    if not pths:
        raise FileNotFoundError(f"no editable tetherlab install in {venv_site} (run `pip install -e .` first)")
    tree = venv_root / "tetherlab-src"
    for dotted, folder in package_dirs(root / "pyproject.toml").items():
        top, _, sub = dotted.partition(".")
        parent = tree / top
        parent.mkdir(parents=True, exist_ok=True)
        target = parent / sub
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to(root / folder, target_is_directory=True)
    for pth in pths:
        # pip's RECORD lists this file, so `pip uninstall` still removes it.
        pth.write_text(f"{tree}\n")
    return tree


def main(argv: list[str] | None = None) -> int:
    # Run by the virtual environment's own interpreter (the Makefile's $(BIN)/python).
    argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None).parse_args(argv)
    try:
        tree = link(Path(sysconfig.get_paths()["purelib"]), Path(sys.prefix), ROOT)
    except FileNotFoundError as e:
        print(f"dev_links: {e}", file=sys.stderr)
        return 1
    check = subprocess.run([sys.executable, "-c", "import sys, tetherlab.shim.cli, tetherlab.cluster.cli.main;"
                            " sys.exit(any('__editable__' in getattr(f, '__module__', '') for f in sys.meta_path))"],
                           capture_output=True, text=True)
    if check.returncode != 0:
        print(f"dev_links: the install does not import through {tree}: {check.stderr.strip()}", file=sys.stderr)
        return 1
    print(f"dev_links: tetherlab imports from {tree} (no import-hook finder at start-up)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
