"""The Scheduler actor, driven through a daemon in-process on a manual clock: schedules, missed
runs, chaining, backup windows, overlapping runs."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import anyio
import pytest
from blockferry.daemon.client import Client

from tests.conftest import MiB, mixed_disk, write_disk
from tests.daemon_util import START, job, manual_clock, running_daemon, wait_session


async def sessions_until(c: Client, n: int, timeout: float = 20.0, **filters: Any) -> list[dict[str, Any]]:
    """The sessions (oldest first) once there are ``n`` of them and none runs."""
    with anyio.fail_after(timeout):
        while True:
            rows = await c.call("session.list", **filters)
            if len(rows) >= n and all(r["state"] != "running" for r in rows):
                return rows[::-1]
            await anyio.sleep(0.02)


async def setup(c: Client, tmp_path: Path, **jobs: dict[str, Any]) -> None:
    await c.call("repo.add", name="main", url=str(tmp_path / "repo"))
    await c.call("proxy.add", name="p", max_tasks=2)
    for name, extra in jobs.items():
        disk = tmp_path / f"{name}.img"
        if not disk.exists():
            mixed_disk(disk, size=MiB, seed=len(name))
        await c.call("job.add", **job(name, "main", disk, **extra))


@pytest.mark.anyio
async def test_daily_and_interval_schedules_run_when_due(tmp_path: Path) -> None:
    clock = manual_clock()  # Monday 21:00
    async with running_daemon(tmp_path, clock=clock) as (daemon, c):
        await setup(c, tmp_path, nightly={"schedule": "daily 22:00"}, often={"schedule": "every 15m"})
        jobs = {j["name"]: j for j in await c.call("job.list")}
        assert jobs["nightly"]["next_run"] == "2026-01-05T22:00:00+00:00"
        assert jobs["often"]["next_run"] == "2026-01-05T21:15:00+00:00"
        assert await c.call("session.list") == []
        await c.call("clock.advance", seconds=15 * 60)
        rows = await sessions_until(c, 1)
        assert [(r["job"], r["trigger"], r["state"]) for r in rows] == [("often", "schedule", "success")]
        await c.call("clock.advance", time="2026-01-05T22:00:00+00:00")  # a jump over two runs of "often"
        rows = await sessions_until(c, 4)
        assert sorted((r["job"], r["trigger"], r["state"]) for r in rows[1:]) == [
            ("nightly", "schedule", "success"), ("often", "schedule", "missed"), ("often", "schedule", "success")]
        assert [r["note"] for r in rows if r["state"] == "missed"] == [
            "2 scheduled run(s) missed (2026-01-05T21:30+00:00 to 2026-01-05T21:45+00:00)"]
        jobs = {j["name"]: j for j in await c.call("job.list")}
        assert jobs["nightly"]["next_run"] == "2026-01-06T22:00:00+00:00"


@pytest.mark.anyio
async def test_runs_missed_while_down_are_reported_and_one_runs(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, clock=manual_clock()) as (daemon, c):
        await setup(c, tmp_path, nightly={"schedule": "daily 22:00"}, quiet={"schedule": "daily 22:00",
                                                                              "run_missed": False})
    later = manual_clock(START + dt.timedelta(days=3, hours=2))  # Thursday 23:00: 4 runs of each missed
    async with running_daemon(tmp_path, clock=later) as (daemon, c):
        rows = await sessions_until(c, 3)
        missed = {r["job"]: r for r in rows if r["state"] == "missed"}
        assert set(missed) == {"nightly", "quiet"}
        assert "4 scheduled run(s) missed" in missed["nightly"]["note"] and "one runs now" in missed["nightly"]["note"]
        runs = [r for r in rows if r["state"] != "missed"]
        assert [(r["job"], r["trigger"], r["state"]) for r in runs] == [("nightly", "missed", "success")]
        assert {j["name"]: j["next_run"] for j in await c.call("job.list")} == {
            "nightly": "2026-01-09T22:00:00+00:00", "quiet": "2026-01-09T22:00:00+00:00"}


@pytest.mark.anyio
async def test_chained_jobs_run_after_success(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, clock=manual_clock()) as (daemon, c):
        await setup(c, tmp_path, first={}, second={"schedule": "after first"}, third={"schedule": "after second"})
        await c.call("job.run", name="first")
        rows = await sessions_until(c, 3)
        assert [(r["job"], r["trigger"], r["state"]) for r in rows] == [
            ("first", "manual", "success"), ("second", "chain", "success"), ("third", "chain", "success")]
        await c.call("job.run", name="second")  # a chain starts wherever it is entered
        rows = await sessions_until(c, 5)
        assert [r["job"] for r in rows[3:]] == ["second", "third"]


@pytest.mark.anyio
async def test_the_backup_window_skips_and_stops_runs(tmp_path: Path) -> None:
    write_disk(tmp_path / "slow.img", 8 * MiB, [(0, "random", 8 * MiB)])
    clock = manual_clock()  # 21:00
    async with running_daemon(tmp_path, clock=clock) as (daemon, c):
        await setup(c, tmp_path, slow={"schedule": "every 10m", "window": "21:05-21:25", "throttle": MiB})
        await c.call("clock.advance", seconds=10 * 60)  # 21:10, inside the window: it starts
        async with c.subscribe(["progress"], job="slow") as events:
            with anyio.fail_after(10):
                async for ev in events:
                    if ev.data["done_bytes"] > 0:
                        break
        status = (await c.call("status"))["scheduler"]["running"]
        assert status[0]["window_closes"] == "2026-01-05T21:25:00+00:00"
        await c.call("clock.advance", seconds=10 * 60)  # 21:20: still running, this run is skipped
        await c.call("clock.advance", seconds=6 * 60)  # 21:26: the window closed
        await sessions_until(c, 2)
        await c.call("clock.advance", seconds=4 * 60)  # 21:30: due, but outside the window
        rows = await sessions_until(c, 3)
        assert [(r["state"], r["note"]) for r in rows] == [
            ("stopped", "the backup window 21:05-21:25 closed"),
            ("skipped", "the previous run (session 1) was still running"),
            ("skipped", "outside the backup window 21:05-21:25")]
        # a manual run ignores the window
        await c.call("job.set", name="slow", changes={"throttle": 0})
        rec = await wait_session(c, (await c.call("job.run", name="slow"))["session"])
        assert rec["state"] == "success"


@pytest.mark.anyio
async def test_disabled_jobs_do_not_run_on_schedule(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, clock=manual_clock()) as (daemon, c):
        await setup(c, tmp_path, off={"schedule": "every 5m", "enabled": False}, on={"schedule": "every 5m"})
        await c.call("clock.advance", seconds=5 * 60)
        rows = await sessions_until(c, 1)
        assert [r["job"] for r in rows] == ["on"]
        await c.call("job.set", name="off", changes={"enabled": True})
        await c.call("clock.advance", seconds=5 * 60)
        rows = await sessions_until(c, 3)
        assert sorted(r["job"] for r in rows[1:]) == ["off", "on"]


@pytest.mark.anyio
async def test_periodic_copies_send_the_latest_points(tmp_path: Path) -> None:
    from blockferry.api import open_repository

    copy = tmp_path / "copy"
    async with running_daemon(tmp_path, clock=manual_clock()) as (daemon, c):
        await c.call("repo.add", name="copyrepo", url=str(copy))  # creates the target repository
        await c.call("repo.remove", name="copyrepo")
        await setup(c, tmp_path, j={"copy_to": [{"url": str(copy), "every_hours": 2, "retention": {"keep_last": 1}}]})
        rows = await sessions_until(c, 1)  # never copied: a first copy at once (nothing to copy yet)
        assert (rows[0]["kind"], rows[0]["state"], rows[0]["target"]) == ("copy", "success", str(copy))
        first = await wait_session(c, (await c.call("job.run", name="j"))["session"])
        second = await wait_session(c, (await c.call("job.run", name="j"))["session"])
        assert not first["result"]["copied"] and not second["result"]["copied"]  # not an immediate copy
        await c.call("clock.advance", seconds=3600)
        assert len(await c.call("session.list")) == 3  # not due yet
        await c.call("clock.advance", seconds=3600)
        rows = await sessions_until(c, 4)
        assert rows[-1]["kind"] == "copy" and rows[-1]["state"] == "success"
        shown = await c.call("session.show", id=rows[-1]["id"])
        assert shown["result"]["copied"] == {str(copy): [o["point"] for o in second["result"]["objects"]]}
    async with open_repository(str(copy)) as repo:
        assert [p.id for p in await repo.points()] == [second["result"]["objects"][0]["point"]]
    # a restarted daemon knows when the last copy was made
    async with running_daemon(tmp_path, clock=manual_clock(START + dt.timedelta(hours=3))) as (daemon, c):
        assert daemon.scheduler.copy_due[("j", str(copy))] == START + dt.timedelta(hours=4)
