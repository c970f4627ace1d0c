"""Configuration structs built in code are held to the constraints of their annotations, as data
converted from TOML or the socket is."""

from __future__ import annotations

import pytest
from blockferry.errors import ConfigError, FieldError
from blockferry.jobs.catalog import job_from_data
from blockferry.jobs.config import DiskSpec, JobSpec, ObjectSpec, ProxyConfig, RepositorySettings, validated


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
