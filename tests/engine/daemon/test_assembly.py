"""The daemon in-process: configuration through the protocol, runs and sessions, stopping,
throttling, locks, reload."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from blockferry.api import open_repository
from blockferry.daemon.assembly import Daemon, DaemonOptions, LockedError
from blockferry.daemon.client import DaemonError
from blockferry.runtime.settings import EngineSettings

from tests.conftest import MiB, mixed_disk, write_disk
from tests.daemon_util import job, running_daemon, wait_session


@pytest.mark.anyio
async def test_configure_run_and_read_the_session(tmp_path: Path) -> None:
    a, b = mixed_disk(tmp_path / "a.img"), mixed_disk(tmp_path / "b.img", seed=1)
    async with running_daemon(tmp_path) as (daemon, c):
        await c.call("repo.add", name="main", url=str(tmp_path / "repo"))  # created: the location was empty
        await c.call("proxy.add", name="p1", max_tasks=2)
        await c.call("proxy.add", name="p2", max_tasks=2)
        await c.call("job.add", **job("pair", "main", a, b))
        assert [j["name"] for j in await c.call("job.list")] == ["pair"]
        sid = (await c.call("job.run", name="pair"))["session"]
        with pytest.raises(DaemonError) as err:  # one run at a time
            await c.call("job.run", name="pair")
        assert err.value.code == "conflict"
        rec = await wait_session(c, sid)
        assert rec["state"] == "success" and rec["trigger"] == "manual"
        objects = rec["result"]["objects"]
        assert [o["state"] for o in objects] == ["done", "done"] and all(o["point"] for o in objects)
        assert {d["proxy"] for o in objects for d in o["disks"]} <= {"p1", "p2"}
        stats = rec["result"]["stats"]
        assert stats["read_bytes"] > 0 and set(stats["bottleneck"]) == {"source", "proxy", "target"}
        listed = await c.call("session.list")
        assert listed[0]["id"] == sid and listed[0]["points"] == [o["point"] for o in objects]
    async with open_repository(str(tmp_path / "repo")) as repo:
        assert {p.object for p in await repo.points()} == {"a", "b"}
        assert (await repo.verify()).healthy


@pytest.mark.anyio
async def test_invalid_configuration_changes_nothing(tmp_path: Path) -> None:
    a = mixed_disk(tmp_path / "a.img", size=MiB)
    async with running_daemon(tmp_path) as (daemon, c):
        await c.call("repo.add", name="main", url=str(tmp_path / "repo"))
        before = await c.call("config.get")
        bad = {"repositories": [{"name": "second", "url": str(tmp_path / "repo2")}],
               "jobs": [job("j", "second", a, schedule="daily 25:00")]}
        with pytest.raises(DaemonError) as err:
            await c.call("config.apply", config=bad)
        assert err.value.code == "invalid" and err.value.field == "jobs[0].schedule"
        assert await c.call("config.get") == before
        assert "second" not in daemon.server.repositories and not (tmp_path / "repo2").exists()
        with pytest.raises(DaemonError) as err:
            await c.call("job.add", **job("j", "main", a, retries=-2))
        assert err.value.field == "retries"
        with pytest.raises(DaemonError) as err:
            await c.call("repo.add", name="r", url=str(tmp_path / "empty"), create=False)
        assert err.value.code == "invalid" and err.value.field == "url"
        with pytest.raises(DaemonError) as err:
            await c.call("repo.add", name="main", url=str(tmp_path / "other"))
        assert err.value.code == "conflict"
        await c.call("job.add", **job("j", "main", a))
        with pytest.raises(DaemonError) as err:  # a job still uses it
            await c.call("repo.remove", name="main")
        assert err.value.field == "jobs[0].repository"
        assert (await c.call("config.get"))["jobs"][0]["name"] == "j"
        # a named source: jobs use it by name; it cannot go while they do
        await c.call("source.add", name="vmdisk", url=str(a))
        await c.call("proxy.add", name="p")
        await c.call("job.add", name="k", repository="main", objects=[{"name": "vm", "disks": [{"source": "vmdisk"}]}])
        with pytest.raises(DaemonError) as err:
            await c.call("source.remove", name="vmdisk")
        assert err.value.code == "conflict" and "k" in str(err.value)
        rec = await wait_session(c, (await c.call("job.run", name="k"))["session"])
        assert rec["state"] == "success" and rec["result"]["objects"][0]["disks"][0]["source"] == str(a)


@pytest.mark.anyio
async def test_configuration_persists_and_a_seed_file_merges(tmp_path: Path) -> None:
    a = mixed_disk(tmp_path / "a.img", size=MiB)
    seed = tmp_path / "seed.toml"
    seed.write_text(f'[[repositories]]\nname = "main"\nurl = "{tmp_path / "repo"}"\n\n'
                    '[[proxies]]\nname = "seeded"\nmax_tasks = 3\n')
    async with running_daemon(tmp_path, seed=seed) as (daemon, c):
        await c.call("job.add", **job("j", "main", a, throttle="1MiB", schedule="every 4h"))
        assert [p["name"] for p in await c.call("proxy.list")] == ["seeded"]
    seed.write_text(seed.read_text().replace("max_tasks = 3", "max_tasks = 5"))
    async with running_daemon(tmp_path, seed=seed) as (daemon, c):
        cfg = await c.call("config.get")
        assert cfg["jobs"][0]["throttle"] == MiB and cfg["jobs"][0]["schedule"] == "every 4h"
        assert cfg["proxies"] == [{"name": "seeded", "max_tasks": 5, "transports": ["file"], "reach": []}]
        assert daemon.server.proxies["seeded"].max_tasks == 5
        seed.write_text(seed.read_text() + '\n[[proxies]]\nname = "late"\n')
        await c.call("config.reload")
        assert [p["name"] for p in await c.call("proxy.list")] == ["seeded", "late"]
        assert "late" in daemon.server.proxies
        await c.call("proxy.remove", name="late")
        assert "late" not in daemon.server.proxies
        await c.call("job.set", name="j", changes={"schedule": "daily 03:00"})
        assert (await c.call("job.show", name="j"))["schedule"] == "daily 03:00"


@pytest.mark.anyio
async def test_stop_mid_job_leaves_the_repository_consistent(tmp_path: Path) -> None:
    disks = [write_disk(tmp_path / f"d{i}.img", 8 * MiB, [(0, "random", 8 * MiB)], seed=i) for i in range(3)]
    async with running_daemon(tmp_path) as (daemon, c):
        await c.call("repo.add", name="main", url=str(tmp_path / "repo"))
        await c.call("proxy.add", name="p", max_tasks=1)
        await c.call("job.add", **job("slow", "main", *disks, throttle=8 * MiB))  # about 3 s in all
        async with c.subscribe(["session", "progress"], job="slow") as events:
            sid = (await c.call("job.run", name="slow"))["session"]
            with anyio.fail_after(10):
                async for ev in events:  # wait for some data to move
                    if ev.topic == "progress" and ev.data["done_bytes"] > 0:
                        break
            assert (await c.call("job.stop", name="slow"))["session"] == sid
            rec = await wait_session(c, sid)
        assert rec["state"] == "stopped" and rec["note"] == "stopped by request"
        assert any(o["state"] != "done" for o in rec["result"]["objects"])
        st = (await c.call("status"))["server"]
        assert st["jobs"] == [] and st["waiting_tasks"] == 0 and all(p["load"] == 0 for p in st["proxies"])
        done = [o["point"] for o in rec["result"]["objects"] if o["point"]]
    async with open_repository(str(tmp_path / "repo")) as repo:
        assert sorted(p.id for p in await repo.points()) == sorted(done)  # no half point
        assert (await repo.verify()).healthy


@pytest.mark.anyio
async def test_throttle_limits_a_job_and_the_daemon(tmp_path: Path) -> None:
    disk = write_disk(tmp_path / "d.img", 4 * MiB, [(0, "random", 3 * MiB)])
    async with running_daemon(tmp_path) as (daemon, c):
        await c.call("repo.add", name="main", url=str(tmp_path / "repo"))
        await c.call("proxy.add", name="p", max_tasks=2)
        await c.call("settings.set", changes={"throttle": "4MiB"})
        assert daemon.throttle.rate == 4 * MiB
        await c.call("job.add", **job("j", "main", disk, throttle=2 * MiB))
        t0 = anyio.current_time()
        rec = await wait_session(c, (await c.call("job.run", name="j"))["session"])
        elapsed = anyio.current_time() - t0
        assert rec["state"] == "success"
        assert elapsed >= 1.0  # 3 MiB at 2 MiB/s, less one burst
        assert daemon.throttle.statistics().consumed >= 3 * MiB  # the daemon-wide bucket saw every byte


@pytest.mark.anyio
async def test_a_second_daemon_refuses_the_same_state_dir_or_socket(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as (daemon, c):
        with pytest.raises(LockedError, match="state directory"):
            await Daemon(DaemonOptions(socket=tmp_path / "other.sock", state_dir=tmp_path / "state")).run()
        with pytest.raises(LockedError, match="socket"):
            await Daemon(DaemonOptions(socket=tmp_path / "d.sock", state_dir=tmp_path / "state2")).run()
        assert (await c.call("status"))["socket"] == str(tmp_path / "d.sock")  # the first goes on


@pytest.mark.anyio
async def test_shutdown_mid_job_records_a_stopped_session(tmp_path: Path) -> None:
    disk = write_disk(tmp_path / "d.img", 8 * MiB, [(0, "random", 8 * MiB)])
    async with running_daemon(tmp_path) as (daemon, c):
        await c.call("repo.add", name="main", url=str(tmp_path / "repo"))
        await c.call("proxy.add", name="p")
        await c.call("job.add", **job("j", "main", disk, throttle=2 * MiB))
        sid = (await c.call("job.run", name="j"))["session"]
    async with running_daemon(tmp_path) as (daemon, c):
        rec = await c.call("session.show", id=sid)
        assert rec["state"] == "stopped" and "shutting down" in rec["note"]
        await c.call("job.set", name="j", changes={"throttle": 0})
        rec = await wait_session(c, (await c.call("job.run", name="j"))["session"])
        assert rec["state"] == "success"  # the repository lock was released on the way out


@pytest.mark.anyio
async def test_failed_objects_are_retried_in_the_same_session(tmp_path: Path) -> None:
    disk = write_disk(tmp_path / "d.img", 8 * MiB, [(0, "random", 8 * MiB)])
    # small batches and no read-ahead to speak of, so the reader is still at work when the disk shrinks
    engine = EngineSettings(batch_bytes=MiB, lanes=1, stream_batches=1, inflight_batches=2)
    async with running_daemon(tmp_path, engine=engine) as (daemon, c):
        await c.call("repo.add", name="main", url=str(tmp_path / "repo"))
        await c.call("proxy.add", name="p")
        await c.call("job.add", **job("j", "main", disk, retries=3, retry_delay=0.2, throttle=4 * MiB))
        async with c.subscribe(["progress"], job="j") as events:
            sid = (await c.call("job.run", name="j"))["session"]
            with anyio.fail_after(10):
                async for ev in events:
                    if ev.data["done_bytes"] > 0:
                        break
        with open(disk, "r+b") as f:  # the disk shrinks under the reader: a transient failure
            f.truncate(2 * MiB)
        rec = await wait_session(c, sid)
        obj = rec["result"]["objects"][0]
        assert rec["state"] == "success" and obj["attempts"] >= 2 and obj["point"], (obj, rec["result"]["warnings"])
        assert len(await c.call("session.list")) == 1  # one session, several attempts
    async with open_repository(str(tmp_path / "repo")) as repo:
        assert len(await repo.points()) == 1


@pytest.mark.anyio
async def test_a_job_with_no_proxy_configured_fails_saying_so(tmp_path: Path) -> None:
    """Not a run that waits for ever at 0 B: the session fails, naming what is missing."""
    a = mixed_disk(tmp_path / "a.img", size=MiB)
    async with running_daemon(tmp_path) as (daemon, c):
        await c.call("repo.add", name="main", url=str(tmp_path / "repo"))
        await c.call("job.add", **job("j", "main", a, retries=0))
        sid = (await c.call("job.run", name="j"))["session"]
        with anyio.fail_after(20):
            rec = await wait_session(c, sid)
        assert rec["state"] == "failed"
        assert "no proxy is configured" in rec["result"]["objects"][0]["error"]
        # with one, the same job runs
        await c.call("proxy.add", name="p")
        rec = await wait_session(c, (await c.call("job.run", name="j"))["session"])
        assert rec["state"] == "success"


@pytest.mark.anyio
async def test_a_socket_path_too_long_is_a_clear_error(tmp_path: Path) -> None:
    from blockferry.errors import ConfigError

    opts = DaemonOptions(socket=tmp_path / ("s" * 120), state_dir=tmp_path / "state")
    with pytest.raises(ConfigError, match="cannot listen"):
        await Daemon(opts).run()
    await Daemon(DaemonOptions(socket=tmp_path / "ok.sock", state_dir=tmp_path / "state")).run(
        task_status=_Stopper())  # the locks were released: a daemon can start on that state directory


class _Stopper:
    """A task_status that stops the daemon as soon as it has started."""

    def started(self, daemon: Daemon) -> None:
        daemon.shutdown()
