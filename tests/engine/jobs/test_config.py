"""Job configuration (engine/jobs/config.py): expand_disks turns a source whose plugin offers Expands
into one disk spec per disk; configuration structs built in code are held to the constraints of
their annotations, as data converted from TOML or the socket is."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from blockferry import registry
from blockferry.datapath.source import Expands
from blockferry.errors import ConfigError, FieldError, SourceError
from blockferry.jobs.catalog import job_from_data
from blockferry.jobs.config import (
    DiskSpec,
    JobSpec,
    ObjectSpec,
    ProxyConfig,
    RepositorySettings,
    expand_disks,
    validated,
)

from tests.conftest import registered


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


@pytest.mark.anyio
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


@pytest.mark.anyio
async def test_a_named_or_hinted_disk_is_not_expanded() -> None:
    with registered(registry.SOURCES, "vm", Vm()) as vm:
        specs = [DiskSpec(source="vm:one", name="root"), DiskSpec(source="vm:one", hints="/tmp/h")]
        assert await expand_disks(specs) == specs
    assert vm.asked == []


def spec(**kw: object) -> JobSpec:
    return JobSpec(name="j", repository="r", objects=[ObjectSpec(name="vm", disks=[DiskSpec(source="/d.img")])],
                   **kw)  # type: ignore[arg-type]


def test_a_valid_struct_passes_unchanged() -> None:
    s = spec(max_tasks=2, retries=0, immutable_days=7)
    assert validated(s) is s
    assert validated(ProxyConfig(name="p", max_tasks=1)).max_tasks == 1


@pytest.mark.parametrize("build, field", [
    (lambda: ProxyConfig(name="p", max_tasks=0), "max_tasks"),
    (lambda: RepositorySettings(name="r", url="/r", max_tasks=-1), "max_tasks"),
    (lambda: RepositorySettings(name="r", url="/r", min_free_bytes=-5), "min_free_bytes"),
    (lambda: spec(max_tasks=0), "max_tasks"),
    (lambda: spec(retries=-1), "retries"),
    (lambda: spec(retry_delay=float("nan")), "retry_delay"),
    (lambda: spec(retry_delay=float("inf")), "retry_delay"),
    (lambda: spec(immutable_days=0), "immutable_days"),
    (lambda: spec(immutable_days=100_000), "immutable_days"),
    (lambda: JobSpec(name="j", repository="r", objects=[]), "objects"),
    (lambda: JobSpec(name="j", repository="r", objects=[ObjectSpec(name="a\nb", disks=[DiskSpec(source="/d")])]),
     "objects[0].name"),
    (lambda: JobSpec(name="j", repository="r",
                     objects=[ObjectSpec(name="vm", disks=[DiskSpec(source="/d", name="x\r")])]),
     "objects[0].disks[0].name"),
])
def test_out_of_range_fields_built_in_code_are_refused(build: object, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        validated(build())  # type: ignore[operator]
    assert str(info.value).startswith(f"{field}: ")


def test_the_daemon_refuses_immutable_days_that_overflow_a_date() -> None:
    data = {"name": "j", "repository": "r", "objects": [{"name": "vm", "disks": [{"source": "/d"}]}]}
    with pytest.raises(FieldError) as info:
        job_from_data({**data, "immutable_days": 10**7})
    assert info.value.field == "immutable_days"
    assert job_from_data({**data, "immutable_days": 36500}).spec.immutable_days == 36500  # type: ignore[union-attr]
