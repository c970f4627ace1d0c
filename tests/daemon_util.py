"""Helpers for tests that run a daemon in-process (the subprocess ones are in
tests.engine.daemon.test_daemon_process.py)."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from blockferry.daemon.assembly import Daemon, DaemonOptions
from blockferry.daemon.client import Client, connect
from blockferry.jobs.calendars import Clock, ManualClock

START = dt.datetime(2026, 1, 5, 21, 0, tzinfo=dt.timezone.utc)  # a Monday


def manual_clock(start: dt.datetime = START) -> ManualClock:
    return ManualClock(start)


@asynccontextmanager
async def running_daemon(tmp_path: Path, *, clock: Clock | None = None,
                         **options: Any) -> AsyncIterator[tuple[Daemon, Client]]:
    """A daemon on ``tmp_path/d.sock`` with state in ``tmp_path/state``, and a connected client."""
    options.setdefault("socket", tmp_path / "d.sock")
    opts = DaemonOptions(state_dir=tmp_path / "state", progress_interval=0.05, **options)
    async with anyio.create_task_group() as tg:
        daemon: Daemon = await tg.start(Daemon(opts, clock=clock).run)
        try:
            async with connect(opts.socket) as client:
                yield daemon, client
        finally:
            daemon.shutdown()
            # a failing test must not cancel the daemon abruptly: let it stop cleanly first
            with anyio.CancelScope(shield=True), anyio.move_on_after(30):
                await daemon.stopped.wait()


async def wait_session(client: Client, sid: int, timeout: float = 20.0) -> dict[str, Any]:
    """The session once it is over."""
    with anyio.fail_after(timeout):
        while True:
            rec = await client.call("session.show", id=sid)
            if rec["state"] != "running":
                return rec
            await anyio.sleep(0.02)


def job(name: str, repo: str, *sources: Path, **extra: Any) -> dict[str, Any]:
    return {"name": name, "repository": repo, "retry_delay": 0.05,
            "objects": [{"name": s.stem, "disks": [{"source": str(s)}]} for s in sources], **extra}
