"""A client of the daemon's control socket (what the CLI uses; usable from any anyio program).

::

    async with connect("/run/user/1000/blockferry/blockferry.sock") as client:
        await client.call("repo.add", name="main", url="/srv/repo")
        sid = (await client.call("job.run", name="nightly"))["session"]
        async with client.subscribe(["session"], session=sid) as events:
            async for event in events:
                ...

Requests may overlap: each waits for the reply with its id. A reader task owned by the
connection's task group routes replies and events; events go to a bounded buffer per
subscription (when the caller does not read them, the daemon skips events for us, as it does for
every slow subscriber).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.memory import MemoryObjectSendStream
from blockferry.daemon.protocol import (
    ERROR_CODES,
    MAX_FRAME,
    VERSIONS,
    Error,
    Event,
    Hello,
    Reply,
    Request,
    Welcome,
    decode_server,
    frame,
    read_frame,
)
from blockferry.errors import BlockferryError, plain_errors
from blockferry.runtime.actor import Completion


def default_paths() -> tuple[Path, Path]:
    """(socket, state directory): /run/blockferry and /var/lib/blockferry as root; else under
    $XDG_RUNTIME_DIR (or /tmp/blockferry-UID) and $XDG_STATE_HOME (or ~/.local/state)."""
    if os.geteuid() == 0:
        return Path("/run/blockferry/blockferry.sock"), Path("/var/lib/blockferry")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    run_dir = Path(runtime) / "blockferry" if runtime else Path(f"/tmp/blockferry-{os.getuid()}")
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return run_dir / "blockferry.sock", Path(state) / "blockferry"


def default_socket() -> Path:
    env = os.environ.get("BLOCKFERRY_SOCKET")
    return Path(env) if env else default_paths()[0]


class DaemonError(BlockferryError):
    """The daemon answered a request with an error: ``code`` (docs/protocol.md), ``field`` for
    invalid configuration; ``exit_code`` is the CLI's for that code."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.field = field
        self.exit_code = ERROR_CODES.get(code, 1)


class NoDaemonError(BlockferryError):
    """No daemon listens on the socket (or it cannot be reached)."""

    exit_code = 6


class DaemonClosedError(NoDaemonError):
    """The daemon closed the connection (or fell silent) before it answered the hello, without
    saying why."""


class Client:
    def __init__(self, stream: Any, welcome: Welcome, buffered: BufferedByteReceiveStream) -> None:
        self.stream = stream
        self._buffered = buffered
        self.welcome = welcome
        self._ids = itertools.count(1)
        self._pending: dict[int, Completion[Any]] = {}
        self._subs: dict[int, MemoryObjectSendStream[Event]] = {}
        self._early: dict[int, list[Event]] = {}
        self._send_lock = anyio.Lock()
        self.closed: BaseException | None = None

    def __repr__(self) -> str:
        return f"<Client {self.welcome.server} pid={self.welcome.pid} pending={len(self._pending)}>"

    async def call(self, method: str, **params: Any) -> Any:
        """Send a request and return its result; DaemonError for an error reply."""
        if self.closed is not None:
            raise NoDaemonError(f"the connection to the daemon is closed: {self.closed}")
        rid = next(self._ids)
        done: Completion[Any] = Completion()
        self._pending[rid] = done
        try:
            try:
                async with self._send_lock:
                    await self.stream.send(frame(Request(id=rid, method=method, params=params)))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                raise NoDaemonError("the daemon closed the connection") from exc
            return await done.wait()
        finally:
            self._pending.pop(rid, None)

    @asynccontextmanager
    async def subscribe(self, topics: list[str], *, job: str | None = None, session: int | None = None,
                        level: str = "info", buffer: int = 256) -> AsyncIterator[AsyncIterator[Event]]:
        """Subscribe; iterate the events until the block ends (then unsubscribe)."""
        send, receive = anyio.create_memory_object_stream[Event](buffer)
        params: dict[str, Any] = {"topics": topics, "level": level}
        if job is not None:
            params["job"] = job
        if session is not None:
            params["session"] = session
        result = await self.call("subscribe", **params)
        sid = result["subscription"]
        self._subs[sid] = send
        for ev in self._early.pop(sid, []):
            send.send_nowait(ev)
        try:
            async with receive:
                yield receive
        finally:
            self._subs.pop(sid, None)
            send.close()
            if self.closed is None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    try:
                        await self.call("unsubscribe", subscription=sid)
                    except BlockferryError:
                        pass

    async def _reader(self) -> None:
        buffered = self._buffered
        try:
            while True:
                msg = decode_server(await read_frame(buffered, MAX_FRAME))
                if isinstance(msg, Reply):
                    waiter = self._pending.get(msg.id)
                    if waiter is not None:
                        waiter.set_result(msg.result)
                elif isinstance(msg, Error):
                    err = DaemonError(msg.code, msg.message, msg.field)
                    if msg.id is not None and msg.id in self._pending:
                        self._pending[msg.id].set_error(err)
                    elif msg.id is None:
                        raise err
                elif isinstance(msg, Event):
                    sub = self._subs.get(msg.subscription)
                    if sub is None:  # arrived before subscribe() saw its reply
                        self._early.setdefault(msg.subscription, []).append(msg)
                        continue
                    try:
                        sub.send_nowait(msg)
                    except anyio.WouldBlock:
                        pass  # we are the slow subscriber: skip it
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        pass
        except BaseException as exc:
            self.closed = exc if not isinstance(exc, anyio.get_cancelled_exc_class()) else NoDaemonError("closed")
            reason = exc if isinstance(exc, DaemonError) else NoDaemonError(
                f"the daemon closed the connection ({type(exc).__name__})")
            for waiter in list(self._pending.values()):
                if not waiter.done:
                    waiter.set_error(reason)
            for sub in self._subs.values():
                sub.close()
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                raise


@asynccontextmanager
async def connect(path: str | os.PathLike[str], *, client: str = "blockferry-python",
                  timeout: float = 10.0) -> AsyncIterator[Client]:
    """Connect and shake hands; NoDaemonError if nobody listens, DaemonError if refused."""
    path = Path(path)
    try:
        stream = await anyio.connect_unix(path)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise NoDaemonError(f"no blockferry daemon listens on {path} (start one with 'blockferry daemon', "
                            "or give --socket / BLOCKFERRY_SOCKET)") from exc
    except PermissionError as exc:
        raise DaemonError("permission_denied", f"cannot connect to {path}: permission denied") from exc
    except OSError as exc:  # not a socket, a path too long for AF_UNIX...
        raise NoDaemonError(f"cannot connect to {path}: {exc.strerror or exc}") from exc
    async with stream:
        # A daemon that refuses us (not allowed, too many clients) sends the reason and closes
        # without reading: the hello may then meet a closed socket. Its reason is still there
        # to be read, and it is what the caller needs, so a failed send only ends the sending.
        try:
            await stream.send(frame(Hello(versions=list(VERSIONS), client=client)))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        buffered = BufferedByteReceiveStream(stream)
        try:
            with anyio.fail_after(timeout):
                first = decode_server(await read_frame(buffered, MAX_FRAME))
        except TimeoutError as exc:
            raise DaemonClosedError(f"the daemon on {path} did not answer within {timeout:g} s") from exc
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, anyio.ClosedResourceError,
                OSError) as exc:
            raise DaemonClosedError(f"the daemon on {path} closed the connection without a reason "
                                    "(see its log)") from exc
        except msgspec.DecodeError as exc:  # not a daemon speaking our protocol
            raise DaemonClosedError(f"{path} answered with something that is not the blockferry protocol") from exc
        if isinstance(first, Error):
            raise DaemonError(first.code, first.message, first.field)
        if not isinstance(first, Welcome):
            raise DaemonError("bad_request", f"expected welcome, got {type(first).__name__}")
        c = Client(stream, first, buffered)
        with plain_errors():  # the caller's own exception, not a group
            async with anyio.create_task_group() as tg:
                tg.start_soon(c._reader)
                try:
                    yield c
                finally:
                    # close first: the reader then ends with ClosedResourceError instead of being
                    # cancelled in a pending receive (on asyncio, anyio's UNIX streams can log an
                    # InvalidStateError when data arrives just as such a receive is cancelled)
                    with anyio.CancelScope(shield=True):
                        await stream.aclose()
                    tg.cancel_scope.cancel()


__all__ = ["Client", "DaemonClosedError", "DaemonError", "NoDaemonError", "connect", "default_paths",
           "default_socket"]
