"""Finding plugins (engine/registry.py): a plugin whose optional dependencies are missing is a
clear configuration error, not an ImportError's traceback."""

from __future__ import annotations

import importlib.metadata
from typing import Any

import pytest
from blockferry import registry
from blockferry.errors import ConfigError


class _BrokenEntryPoint:
    name = "s9"

    def load(self) -> Any:
        raise ModuleNotFoundError("No module named 'aiosomething'")


def test_a_plugin_that_cannot_be_imported_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    def entry_points(*, group: str, name: str | None = None) -> list[Any]:
        return [_BrokenEntryPoint()] if group == registry.BACKENDS and name in (None, "s9") else []

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    with pytest.raises(ConfigError) as ei:
        registry.backend_plugin("s9://bucket/repo")
    msg = str(ei.value)
    assert "plugin for scheme 's9' cannot be loaded" in msg and "aiosomething" in msg
    assert "blockferry[s9]" in msg
    assert (registry.BACKENDS, "s9") not in registry._loaded


def test_an_unknown_scheme_lists_the_installed_plugins() -> None:
    with pytest.raises(ConfigError, match=r"no source plugin for scheme 'nope' \(installed: .*file"):
        registry.source_plugin("nope://x")
