"""The benchmark runner's own helpers (the figures themselves are measured by ``python -m bench``,
never in tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.runner import efficiency, make_venv, median_of


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


def test_efficiency_pairs_each_ceiling_with_the_full_backup_that_followed_it() -> None:
    # the machine slowed down in the second pair: both runs took longer, their ratio did not
    runs = [{"wall": w, "cpu": 1.0, "rss": 1} for w in (4.0, 6.0, 4.4)]
    ceilings = [{"seconds": 3.0}, {"seconds": 4.5}, {"seconds": 3.3}]
    out = efficiency(ceilings, median_of(runs))
    assert out["efficiency_pairs"] == pytest.approx([0.75, 0.75, 0.75])
    assert out["efficiency"] == pytest.approx(0.75)
    assert out["ceiling"]["seconds"] == 3.3 and out["ceiling"]["all_seconds"] == [3.0, 4.5, 3.3]
    assert out["efficiency_of_medians"] == pytest.approx(3.3 / 4.4)


def test_efficiency_refuses_unpaired_runs() -> None:
    with pytest.raises(ValueError):
        efficiency([{"seconds": 3.0}], {"wall": 4.0, "walls": [4.0, 5.0]})
