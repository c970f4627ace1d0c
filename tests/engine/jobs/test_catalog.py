"""Configuration validation: every refusal names the field and the reason."""

from __future__ import annotations

from typing import Any

import pytest
from blockferry.errors import FieldError
from blockferry.jobs.catalog import catalog_from_data, catalog_to_data, item_from_data, job_from_data, resolve


def base(**jobs: Any) -> dict[str, Any]:
    return {
        "repositories": [{"name": "main", "url": "/srv/repo"}],
        "proxies": [{"name": "p1", "max_tasks": 2}],
        "sources": [{"name": "vmdisk", "url": "/images/vm.img", "options": {"x": 1}}],
        "jobs": [{"name": "nightly", "repository": "main",
                  "objects": [{"name": "vm", "disks": [{"source": "vmdisk"}]}], **jobs}],
    }


def refusal(data: dict[str, Any]) -> FieldError:
    with pytest.raises(FieldError) as err:
        catalog_from_data(data)
    return err.value


def test_a_full_catalog_round_trips_with_every_job_field() -> None:
    data = base(schedule="daily 22:00", window="20:00-06:00", throttle="10MiB", retries=5, immutable_days=7,
                retention={"keep_last": 3}, copy_to=[{"url": "/srv/copy"}])
    cat, inits = catalog_from_data(data)
    job = cat.jobs[0]
    assert job.settings.throttle == 10 << 20 and job.settings.schedule == "daily 22:00"
    assert job.spec.retries == 5 and job.spec.immutable_days == 7 and job.spec.retention.keep_last == 3
    assert job.spec.copy_to[0].url == "/srv/copy"
    assert inits["main"].create
    again, _ = catalog_from_data(catalog_to_data(cat))
    assert again == cat


@pytest.mark.parametrize("change, field, words", [
    ({"repository": "nope"}, "jobs[0].repository", "no repository named 'nope'"),
    ({"schedule": "daily 25:00"}, "jobs[0].schedule", "not a time of day"),
    ({"window": "x"}, "jobs[0].window", "window"),
    ({"retries": -1}, "jobs[0].retries", ">= 0"),
    ({"retires": 2}, "jobs[0].retires", "unknown field"),
    ({"schedule": "after ghost"}, "jobs[0].schedule", "no job named 'ghost'"),
    ({"throttle": "fast"}, "jobs[0].throttle", ""),
])
def test_bad_jobs_name_the_field(change: dict[str, Any], field: str, words: str) -> None:
    err = refusal(base(**change))
    assert err.field == field
    assert words in err.reason


def test_nested_unknown_field_and_duplicate_names() -> None:
    data = base()
    data["jobs"][0]["objects"][0]["disks"][0]["sorce"] = "x"
    assert refusal(data).field == "jobs[0].objects[0].disks[0].sorce"
    data = base()
    data["proxies"].append({"name": "p1"})
    err = refusal(data)
    assert err.field == "proxies[1].name" and "two proxies" in err.reason
    data = base()
    data["proxies"][0]["max_tasks"] = 0
    assert refusal(data).field == "proxies[0].max_tasks"
    assert refusal({**base(), "extra": []}).field == "extra"


def test_chains_that_loop_are_refused() -> None:
    data = base(schedule="after b")
    data["jobs"] += [{"name": "b", "repository": "main", "objects": [{"name": "o", "disks": [{"source": "/x"}]}],
                      "schedule": "after nightly"}]
    err = refusal(data)
    assert "loop" in err.reason and err.field.endswith("schedule")


def test_named_sources_resolve_to_their_url_and_options() -> None:
    cat, _ = catalog_from_data(base())
    spec = resolve(cat.jobs[0], cat.sources)
    disk = spec.objects[0].disks[0]
    assert disk.source == "/images/vm.img" and disk.options == {"x": 1} and disk.name == "vmdisk"


def test_single_items_and_unknown_scheme() -> None:
    assert item_from_data("proxy", {"name": "p", "max_tasks": 3}).max_tasks == 3
    with pytest.raises(FieldError) as err:
        item_from_data("repo", {"name": "r", "url": "/x", "block_size": 12345})
    assert err.value.field == "block_size"
    with pytest.raises(FieldError) as err:
        job_from_data({"name": "j", "repository": "main", "objects": [
            {"name": "a", "disks": [{"source": "/x"}]}, {"name": "a", "disks": [{"source": "/y"}]}]})
    assert err.value.field == "objects[1].name"
    data = base()
    data["sources"][0]["url"] = "nosuch://host/disk"
    assert refusal(data).field == "sources[0].url"
