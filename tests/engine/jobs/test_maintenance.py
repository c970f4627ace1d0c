"""Lifecycle jobs in the daemon: scheduled and chained prune, gc, verify and copy runs, recorded as
sessions of their kind; validation of their fields; the state database's migration."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any

import anyio
import pytest
from blockferry.api import open_repository
from blockferry.daemon.client import Client
from blockferry.daemon.client import DaemonError as RemoteError

from tests.conftest import MiB, same_file, write_disk
from tests.daemon_util import job, manual_clock, running_daemon, wait_session
from tests.engine.repo.test_verify import flip

pytestmark = pytest.mark.anyio


async def backups(c: Client, tmp_path: Path, n: int) -> tuple[Path, list[str], Path]:
    """A repository ``main``, a backup job ``b`` of one disk, ``n`` runs each with new content;
    (the disk, the points oldest first, a copy of the disk as the last point has it)."""
    await c.call("repo.add", name="main", url=str(tmp_path / "repo"))
    await c.call("proxy.add", name="p", max_tasks=2)
    disk = tmp_path / "vm.img"
    points = []
    for i in range(n):
        write_disk(disk, 2 * MiB, [(0, "random", 2 * MiB)], seed=i + 1)
        if i == 0:
            await c.call("job.add", **job("b", "main", disk))
        rec = await wait_session(c, (await c.call("job.run", name="b"))["session"])
        assert rec["state"] == "success"
        points.append(rec["result"]["objects"][0]["point"])
    last = tmp_path / "last.img"
    shutil.copyfile(disk, last)
    return disk, points, last


async def sessions_of(c: Client, n: int, **filters: Any) -> list[dict[str, Any]]:
    with anyio.fail_after(20):
        while True:
            rows = await c.call("session.list", **filters)
            if len(rows) >= n and all(r["state"] != "running" for r in rows):
                return rows[::-1]
            await anyio.sleep(0.02)


async def test_a_scheduled_prune_then_a_chained_gc_free_the_space(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, clock=manual_clock()) as (daemon, c):  # Monday 21:00
        _, points, last = await backups(c, tmp_path, 3)
        await c.call("job.add", name="prune-nightly", type="prune", repository="main",
                     retention={"keep_last": 1}, schedule="daily 22:00")
        await c.call("job.add", name="gc", type="gc", repository="main", schedule="after prune-nightly")
        listed = {j["name"]: j for j in await c.call("job.list")}
        assert listed["prune-nightly"]["type"] == "prune" and listed["prune-nightly"]["next_run"].endswith("22:00:00+00:00")
        await c.call("clock.advance", seconds=3600)
        rows = await sessions_of(c, 1, job="prune-nightly")
        prune_row = rows[-1]
        assert (prune_row["kind"], prune_row["trigger"], prune_row["state"]) == ("prune", "schedule", "success")
        assert prune_row["summary"].startswith("removed 2 of 3 point(s), kept 1")
        gc_row = (await sessions_of(c, 1, job="gc"))[-1]
        assert (gc_row["kind"], gc_row["trigger"], gc_row["state"]) == ("gc", "chain", "success")
        shown = await c.call("session.show", id=prune_row["id"])
        assert sorted(shown["result"]["pruned"]) == sorted(points[:2])  # exactly what the policy drops
        kept = [d for d in shown["result"]["report"]["decisions"] if d["keep"]]
        assert [(d["point"], d["reasons"]) for d in kept] == [(points[2], ["last 1"])]
        gc = (await c.call("session.show", id=gc_row["id"]))["result"]["report"]
        assert gc["state"] == "done" and gc["bytes_freed"] >= 4 * MiB * 0.9 and gc["packs_deleted"] >= 1
        # the daemon's own store saw it all: a backup now deduplicates against what is left only
        rec = await wait_session(c, (await c.call("job.run", name="b"))["session"])
        assert rec["state"] == "success" and rec["result"]["stats"]["written_bytes"] == 0
    async with open_repository(str(tmp_path / "repo")) as repo:
        assert sorted(p.id for p in await repo.points()) == sorted([points[2], rec["result"]["objects"][0]["point"]])
        await repo.restore(points[2], tmp_path / "out")
        assert (await repo.verify()).healthy
    assert same_file(tmp_path / "out" / "vm.img", last)


async def test_a_verify_job_names_the_damaged_point(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, clock=manual_clock()) as (daemon, c):
        _, points, _ = await backups(c, tmp_path, 1)
        await c.call("job.add", name="check", type="verify", repository="main", sample=50, schedule="every 1h")
        await c.call("clock.advance", seconds=3600)
        (row,) = await sessions_of(c, 1, job="check")
        assert (row["kind"], row["state"]) == ("verify", "success") and "50% sample" in row["summary"]
        flip(tmp_path / "repo")
        await c.call("job.set", name="check", changes={"sample": None})  # the full check
        rec = await wait_session(c, (await c.call("job.run", name="check"))["session"])
        assert rec["kind"] == "verify" and rec["state"] == "failed"
        assert rec["note"] == f"damage found: 1 chunk(s); damaged point(s): {points[0]}"
        assert rec["result"]["warnings"] == [f"point {points[0]} (vm) disk vm.img: 1 damaged block(s)"]
        assert rec["result"]["report"]["affected"][0]["point"] == points[0]
        # the daemon's store masks the damaged copy: the next backup stores the block again (heals)
        rec = await wait_session(c, (await c.call("job.run", name="b"))["session"])
        assert rec["state"] == "success" and rec["result"]["stats"]["written_bytes"] > 0
        rec = await wait_session(c, (await c.call("job.run", name="check"))["session"])
        assert rec["state"] == "success"


async def test_a_copy_job_copies_and_keeps_its_own_retention(tmp_path: Path) -> None:
    target = tmp_path / "copy"
    async with running_daemon(tmp_path, clock=manual_clock()) as (daemon, c):
        await c.call("repo.add", name="t", url=str(target))  # creates the target repository
        await c.call("repo.remove", name="t")
        _, points, last = await backups(c, tmp_path, 2)
        await c.call("job.add", name="offsite", type="copy", repository="main", to=str(target),
                     retention={"keep_last": 1, "keep_days": None})
        rec = await wait_session(c, (await c.call("job.run", name="offsite"))["session"])
        assert (rec["kind"], rec["target"], rec["state"]) == ("copy", str(target), "success")
        assert rec["result"]["copied"] == {str(target): points} and rec["result"]["pruned"] == [points[0]]
        (row,) = await c.call("session.list", job="offsite")
        assert row["summary"].startswith("copied 2 point(s) (0 already there)")
    async with open_repository(str(target)) as repo:
        assert [p.id for p in await repo.points()] == [points[1]]
        await repo.restore(points[1], tmp_path / "out")
    assert same_file(tmp_path / "out" / "vm.img", last)


async def test_gc_defers_its_sweep_under_an_earlier_writer_and_stops_on_request(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, clock=manual_clock()) as (daemon, c):
        _, points, _ = await backups(c, tmp_path, 2)
        await c.call("job.add", name="prune", type="prune", repository="main", retention={"keep_last": 1})
        await c.call("job.add", name="gc", type="gc", repository="main", rewrite_threshold=0.3)
        assert (await wait_session(c, (await c.call("job.run", name="prune"))["session"]))["state"] == "success"
        async with open_repository(str(tmp_path / "repo")) as other:  # another process's backup, say
            await other.store.lock("backup")
            rec = await wait_session(c, (await c.call("job.run", name="gc"))["session"])
            assert rec["state"] == "warning" and rec["note"].startswith("sweep deferred to the next run")
            await c.call("job.set", name="gc", changes={"wait": 60})
            sid = (await c.call("job.run", name="gc"))["session"]
            with anyio.fail_after(10):
                while not (await c.call("status"))["scheduler"]["running"][0]["progress"]["step"].startswith("waiting"):
                    await anyio.sleep(0.02)
            await c.call("job.stop", name="gc", reason="enough")
            rec = await wait_session(c, sid)
            assert (rec["state"], rec["note"]) == ("stopped", "enough")
        rec = await wait_session(c, (await c.call("job.run", name="gc"))["session"])  # finishes the plan
        assert rec["state"] == "success" and rec["result"]["report"]["bytes_freed"] > 0
    async with open_repository(str(tmp_path / "repo")) as repo:
        assert [p.id for p in await repo.points()] == [points[1]]
        assert (await repo.verify()).healthy


async def test_fields_that_do_not_fit_the_type_are_refused(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, clock=manual_clock()) as (daemon, c):
        await c.call("repo.add", name="main", url=str(tmp_path / "repo"))
        for params, field, reason in [
            ({"type": "gc", "sample": 5}, "sample", "a gc job does not take sample (only verify jobs do)"),
            ({"type": "verify", "sample": 0}, "sample", "Expected `float` > 0.0"),
            ({"type": "prune"}, "retention", "a prune job needs a retention policy"),
            ({"type": "copy"}, "to", "a copy job needs the target repository's URL"),
            ({"type": "gc", "throttle": 5}, "throttle", "a gc job does not take throttle (only backup jobs do)"),
            ({"type": "defrag"}, "type", "unknown job type 'defrag'"),
            ({"type": "gc", "repository": "nope"}, "repository", "no repository named 'nope'"),
        ]:
            with pytest.raises(RemoteError) as err:
                await c.call("job.add", **{"name": "x", "repository": "main", **params})
            assert err.value.field == field and reason in str(err.value), (params, str(err.value))
        await c.call("job.add", name="gc", type="gc", repository="main")
        with pytest.raises(RemoteError) as err:
            await c.call("job.set", name="gc", changes={"to": "/elsewhere"})
        assert err.value.field == "to"
        assert (await c.call("job.show", name="gc"))["type"] == "gc"


async def test_the_jobs_table_is_migrated_and_lifecycle_jobs_persist(tmp_path: Path) -> None:
    from blockferry.jobs.statedb import MIGRATIONS, SCHEMA_VERSION, StateDB

    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)
    for version, sql in MIGRATIONS[:2]:  # a database as blockferry left it before lifecycle jobs
        conn.executescript(sql)
        conn.execute(f"PRAGMA user_version = {version}")
    conn.execute("INSERT INTO repositories VALUES ('main', 0, ?)", ('{"name":"main","url":"/r"}',))
    conn.execute("INSERT INTO jobs VALUES ('b', 0, ?, '{}')",
                 ('{"name":"b","repository":"main","objects":[{"name":"vm","disks":[{"source":"/d"}]}]}',))
    conn.commit()
    conn.close()
    db = await StateDB.open(path)
    try:
        assert await db.schema_version() == SCHEMA_VERSION == 3
        cat = await db.load_catalog()
        assert [(j.name, j.type) for j in cat.jobs] == [("b", "backup")]
        from blockferry.jobs.catalog import catalog_from_data, catalog_to_data

        data = catalog_to_data(cat)
        data["jobs"].append({"name": "v", "type": "verify", "repository": "main", "sample": 10.0,
                             "schedule": "after b"})
        new, _ = catalog_from_data(data)
        await db.save_catalog(new)
        again = await db.load_catalog()
        assert again == new and again.jobs[1].type == "verify" and again.jobs[1].spec.sample == 10.0
    finally:
        await db.close()
