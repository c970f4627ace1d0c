"""QMP timeouts mean what they say: a monitor that never answers costs the timeout once, not
twice (no QEMU needed: a socket that accepts and stays silent stands in for a hung monitor)."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import blockferry
import pytest
from anyio.abc import SocketStream
from blockferry.plugins.qemu import qmp
from blockferry.plugins.qemu.qmp import ChannelLost, QMPClient

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def silent_monitor(*, greet: bool = False) -> AsyncIterator[str]:
    """A QMP socket whose monitor accepts and then never answers (after a greeting, with ``greet``)."""
    path = Path(tempfile.mkdtemp(prefix="bf-qmp-")) / "vm.qmp"  # short: AF_UNIX paths are limited
    held: list[SocketStream] = []

    async def hang(stream: SocketStream) -> None:
        held.append(stream)
        if greet:
            await stream.send(b'{"QMP": {"version": {"qemu": {"major": 8, "minor": 2, "micro": 0}}}}\n')
        await anyio.sleep_forever()

    listener = await anyio.create_unix_listener(path)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, hang)
        yield str(path)
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("greet", [False, True], ids=["no-greeting", "no-capabilities"])
async def test_connecting_to_a_silent_monitor_takes_the_timeout_once(greet: bool) -> None:
    async with silent_monitor(greet=greet) as path:
        t0 = anyio.current_time()
        with pytest.raises(ChannelLost):
            await QMPClient.connect(path, timeout=0.6)
        took = anyio.current_time() - t0
    assert 0.55 <= took < 1.1, took


async def test_a_backup_of_a_hung_vm_fails_after_one_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Expanding the VM into its disks timed out, then opening it waited as long again."""
    monkeypatch.setattr(qmp, "QMP_TIMEOUT", 0.8)
    await blockferry.init_repository(str(tmp_path / "repo"))
    async with silent_monitor() as path, blockferry.open_repository(str(tmp_path / "repo")) as r:
        t0 = anyio.current_time()
        with pytest.raises(ChannelLost, match="within 0.8 s"):
            await r.backup([f"qemu:{path}"], name="vm")
        took = anyio.current_time() - t0
    assert 0.75 <= took < 1.5, took
