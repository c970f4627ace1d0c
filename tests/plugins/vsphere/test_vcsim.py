"""The simulator's fixture: built once per source, and a missing toolchain fails the tests (a
missing vSphere test bed must never pass as skipped)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.plugins.vsphere import conftest
from tests.plugins.vsphere.conftest import build_simulator


def test_a_missing_go_fails_never_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(pytest.fail.Exception, match="needs Go: run scripts/system-packages"):
        build_simulator()


def test_a_missing_govmomi_source_fails_never_skips(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(conftest, "GOVMOMI", tmp_path / "absent")
    with pytest.raises(pytest.fail.Exception, match="needs govmomi's source"):
        build_simulator()


def test_the_build_is_cached_by_its_source() -> None:
    first = build_simulator()  # built (or found) by the session already: not built again
    assert first.is_file() and first.parent.parent.name == "blockferry-tests"
    assert build_simulator() == first
    source = conftest.MAIN.read_bytes()
    assert conftest.cached_binary(source, "go1.19") == conftest.cached_binary(source, "go1.19")
    # another source (or another Go) is another build, in a directory of its own
    assert conftest.cached_binary(source + b"\n// changed\n", "go1.19") != conftest.cached_binary(source, "go1.19")
    assert conftest.cached_binary(source, "go1.21") != conftest.cached_binary(source, "go1.19")
