"""The benchmark runner's own helpers (the figures themselves are measured by ``python -m bench``,
never in tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.runner import make_venv


def base_of(venv: Path) -> str:
    return subprocess.run([str(venv / "bin" / "python"), "-c", "import sys; print(sys.base_prefix, sys.version)"],
                          check=True, capture_output=True, text=True).stdout.strip()


def test_a_venv_made_from_another_python_is_made_anew(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    other = venv / "bin" / "python"
    other.write_text("#!/bin/sh\necho /opt/other-python 3.11.0\n")
    other.chmod(0o755)
    (venv / "left-by-the-other").write_text("")

    assert make_venv(venv) is True
    assert base_of(venv) == f"{sys.base_prefix} {sys.version}"
    assert not (venv / "left-by-the-other").exists()
    # made from this interpreter: kept as it is
    (venv / "kept").write_text("")
    assert make_venv(venv) is False
    assert (venv / "kept").exists()
