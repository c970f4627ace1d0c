"""expand_disks: a source whose plugin offers Expands becomes one disk spec per disk."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from blockferry import registry
from blockferry.datapath.source import Expands
from blockferry.errors import SourceError
from blockferry.jobs.config import DiskSpec, expand_disks

from tests.conftest import registered

pytestmark = pytest.mark.anyio


class Plain:
    """A source plugin without Expands."""

    scheme = "plain"

    def disk_name(self, url: str) -> str:
        return url.partition(":")[2]

    async def open(self, url: str, options: Mapping[str, Any]) -> Any:
        raise AssertionError("expanding never opens a disk")


class Vm(Plain):
    """``vm:NAME`` stands for two disks, ``vm:NAME#DISK`` for one; ``vm:down`` cannot say now."""

    scheme = "vm"

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def expand(self, url: str) -> list[str]:
        self.asked.append(url)
        if url == "vm:down":
            raise SourceError("vm:down: not running")
        return [url] if "#" in url else [f"{url}#a", f"{url}#b"]


async def test_only_plugins_that_offer_expands_expand() -> None:
    assert isinstance(Vm(), Expands) and not isinstance(Plain(), Expands)
    with registered(registry.SOURCES, "vm", Vm()) as vm, registered(registry.SOURCES, "plain", Plain()):
        specs = [DiskSpec(source="vm:one", options={"agent": "x"}), DiskSpec(source="plain:disk"),
                 DiskSpec(source="vm:two#a"), DiskSpec(source="vm:down")]
        out = await expand_disks(specs)
    opts = {"agent": "x"}
    assert out == [DiskSpec(source="vm:one#a", options=opts), DiskSpec(source="vm:one#b", options=opts),
                   DiskSpec(source="plain:disk"), DiskSpec(source="vm:two#a"), DiskSpec(source="vm:down")]
    assert vm.asked == ["vm:one", "vm:two#a", "vm:down"]


async def test_a_named_or_hinted_disk_is_not_expanded() -> None:
    with registered(registry.SOURCES, "vm", Vm()) as vm:
        specs = [DiskSpec(source="vm:one", name="root"), DiskSpec(source="vm:one", hints="/tmp/h")]
        assert await expand_disks(specs) == specs
    assert vm.asked == []
