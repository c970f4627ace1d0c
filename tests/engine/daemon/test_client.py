"""The client's handshake against daemons that refuse it or go away: a clear error with the
documented exit code, never an exception from the socket."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream
from blockferry.daemon.client import DaemonClosedError, DaemonError, NoDaemonError, connect
from blockferry.daemon.protocol import Error, frame

from tests.engine.daemon.test_daemon_process import DaemonProc


@contextmanager
def busy_cpus(n: int = 3) -> Iterator[None]:
    """``n`` processes spinning on the CPU (the daemon and the client then get their turns late,
    which is when a refusal used to overtake the client's hello)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.mark.anyio
async def test_a_refusal_that_closes_before_the_hello_is_sent_is_read(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The race made certain: the daemon has sent its refusal and closed before the client sends
    its hello (which then meets a closed socket, EPIPE)."""
    path = tmp_path / "refusing.sock"
    gone = anyio.Event()

    async def refuse(stream: SocketStream) -> None:
        async with stream:
            await stream.send(frame(Error(code="too_many_clients", message="the daemon already serves 1 clients")))
        gone.set()

    real_connect = anyio.connect_unix

    async def connect_then_wait(p: Any) -> Any:
        stream = await real_connect(p)
        with anyio.fail_after(5):
            await gone.wait()  # the daemon's side is closed now
        return stream

    listener = await anyio.create_unix_listener(path)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, refuse)
        monkeypatch.setattr(anyio, "connect_unix", connect_then_wait)
        with pytest.raises(DaemonError) as info:
            async with connect(path):
                pass
        monkeypatch.undo()
        tg.cancel_scope.cancel()
    assert info.value.code == "too_many_clients" and info.value.exit_code == 5
    assert "already serves 1 clients" in str(info.value)


@pytest.mark.anyio
async def test_a_daemon_that_closes_without_a_reason_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "mute.sock"

    async def hang_up(stream: SocketStream) -> None:
        await stream.aclose()

    listener = await anyio.create_unix_listener(path)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, hang_up)
        with pytest.raises(DaemonClosedError) as info:
            async with connect(path):
                pass
        tg.cancel_scope.cancel()
    assert isinstance(info.value, NoDaemonError) and info.value.exit_code == 6
    assert "closed the connection without a reason" in str(info.value)


@pytest.mark.anyio
async def test_not_a_daemon_or_no_socket_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NoDaemonError, match="no blockferry daemon listens"):
        async with connect(tmp_path / "none.sock"):
            pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(NoDaemonError):
        async with connect(tmp_path / "file"):
            pass
    with pytest.raises(NoDaemonError, match="cannot connect"):
        async with connect(tmp_path / ("x" * 200)):  # too long for AF_UNIX
            pass


@pytest.mark.anyio
async def test_refusals_under_load_always_arrive_as_the_daemons_reason(tmp_path: Path) -> None:
    """A daemon process at its client limit, CPUs busy: every further client gets the refusal
    itself (exit code 5), never a broken socket. Before the client read the refusal first, many
    such tries ended in anyio.BrokenResourceError (the daemon had closed before the hello)."""
    daemon = DaemonProc(tmp_path, "--max-clients", "1").start()
    outcomes: dict[str, int] = {}
    try:
        async with connect(daemon.socket) as held:  # the one client it serves
            with busy_cpus():
                for _ in range(40):
                    try:
                        async with connect(daemon.socket):
                            outcomes["welcomed"] = outcomes.get("welcomed", 0) + 1
                    except DaemonError as exc:
                        outcomes[exc.code] = outcomes.get(exc.code, 0) + 1
                        assert exc.exit_code == 5 and "max_clients" in str(exc)
            assert (await held.call("status"))["clients"]["refused"] == 40
    finally:
        daemon.signal(signal.SIGTERM)
    assert outcomes == {"too_many_clients": 40}
