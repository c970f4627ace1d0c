"""The import directions of docs/architecture.md hold: import-linter's contracts (in
pyproject.toml) are checked on the package as it installs, ``blockferry`` with its actors and
plugins inside it.

import-linter reads one package tree from disk, and the editable install of the test
environment maps ``blockferry``, ``blockferry.actors`` and ``blockferry.plugins`` to three
folders; so the sources are staged as one tree (as the wheel lays them out) and linted there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")
ONLY_SOURCES = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


def stage(to: Path) -> Path:
    pkg = to / "blockferry"
    shutil.copytree(ROOT / "engine", pkg, ignore=ONLY_SOURCES)
    shutil.copytree(ROOT / "actors", pkg / "actors", ignore=ONLY_SOURCES)
    shutil.copytree(ROOT / "plugins", pkg / "plugins", ignore=ONLY_SOURCES)
    return to


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([str(LINT), "--no-cache", str(ROOT / "pyproject.toml")], capture_output=True, text=True,
                          env=env, cwd=tree, timeout=300)


def test_the_import_contracts_are_kept(tmp_path: Path) -> None:
    r = lint(stage(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Contracts: 4 kept, 0 broken." in r.stdout, r.stdout


def test_a_lower_layer_importing_a_higher_one_breaks_the_contracts(tmp_path: Path) -> None:
    tree = stage(tmp_path)
    store = tree / "blockferry" / "repo" / "store.py"
    store.write_text(store.read_text() + "\nfrom blockferry.actors import job  # noqa\n")
    r = lint(tree)
    assert r.returncode != 0
    assert "blockferry.repo.store -> blockferry.actors.job" in r.stdout, r.stdout
