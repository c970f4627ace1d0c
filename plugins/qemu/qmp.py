"""Clients for QEMU's two JSON control channels, on anyio streams: QMP (the VM's monitor) and the
QEMU guest agent (inside the guest, reached through a chardev socket on the host).

Why not a library: ``qemu.qmp`` (the QEMU project's own, on PyPI) is built on asyncio's event
loop and runs a reader task of its own, so it cannot run under trio and would leave a task
outside our task groups; the guest agent has no maintained Python client at all. Both protocols
are a few lines of JSON, so they are written here: one command at a time, whoever sends a
command reads its answer, and events met on the way are kept (a bounded number) for
:meth:`QMPClient.wait_event`. No task runs in the background.

Errors become :class:`~blockferry.errors.SourceError` naming the socket and the command.
"""

from __future__ import annotations

import os
import random
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import msgspec
from anyio.abc import ByteStream
from anyio.streams.buffered import BufferedByteReceiveStream
from blockferry.errors import ConfigError, SourceError
from blockferry.log import get_logger

log = get_logger(component="qmp")

#: the longest line QEMU may send (query-named-block-nodes of a VM with many disks is large)
MAX_LINE = 64 << 20
#: events kept while nobody waits for them; older ones are dropped
MAX_EVENTS = 1000
_MAX_UNIX_PATH = 107
#: seconds a QMP connection (connect, greeting, capabilities) and each of its commands may take
QMP_TIMEOUT = 30.0


class QMPError(SourceError):
    """QEMU refused a command. ``error_class`` is QMP's class (``GenericError``,
    ``DeviceNotFound``...), ``desc`` its description."""

    def __init__(self, message: str, error_class: str = "", desc: str = "") -> None:
        super().__init__(message)
        self.error_class = error_class
        self.desc = desc


class ChannelLost(SourceError):
    """The socket closed, or QEMU did not answer in time. A later attempt may succeed."""

    transient = True


async def _connect_unix(path: str, what: str, timeout: float) -> ByteStream:
    if len(os.fsencode(path)) > _MAX_UNIX_PATH:
        raise ConfigError(f"{path}: a Unix socket path is limited to {_MAX_UNIX_PATH} bytes")
    try:
        with anyio.fail_after(timeout):
            return await anyio.connect_unix(path)
    except TimeoutError:
        raise ChannelLost(f"{path}: the {what} did not accept a connection within {timeout:g} s") from None
    except FileNotFoundError:
        raise SourceError(f"{path}: no such {what} socket") from None
    except ConnectionRefusedError:
        raise SourceError(f"{path}: nothing listens on this {what} socket (is the VM running?)") from None
    except OSError as exc:
        raise SourceError(f"{path}: cannot connect to the {what} ({exc.strerror or exc})") from exc


class _JsonLines:
    """A JSON-lines channel over a Unix socket."""

    def __init__(self, stream: ByteStream, path: str, what: str, timeout: float) -> None:
        self._stream = stream
        self._rx = BufferedByteReceiveStream(stream)
        self.path = path
        self.what = what
        self.timeout = timeout
        self._lock = anyio.Lock()
        self._closed = False

    async def _send(self, obj: Any) -> None:
        try:
            with anyio.CancelScope(shield=True), anyio.fail_after(self.timeout):  # never half a line
                await self._stream.send(msgspec.json.encode(obj) + b"\n")
        except TimeoutError:
            raise ChannelLost(f"{self.path}: the {self.what} stopped reading") from None
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise ChannelLost(f"{self.path}: the {self.what} closed the connection") from exc

    async def _line(self, deadline: float) -> Any:
        """The next message (a partial line survives a cancellation in the buffer)."""
        try:
            with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
                raw = await self._rx.receive_until(b"\n", MAX_LINE)
        except TimeoutError:
            raise
        except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
                OSError) as exc:
            raise ChannelLost(f"{self.path}: the {self.what} closed the connection") from exc
        except anyio.DelimiterNotFound:
            raise ChannelLost(f"{self.path}: the {self.what} sent a line longer than {MAX_LINE} bytes") from None
        try:
            return msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise ChannelLost(f"{self.path}: the {self.what} sent something that is not JSON ({exc})") from None

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            with anyio.CancelScope(shield=True):
                await self._stream.aclose()


class QMPClient(_JsonLines):
    """One QMP connection. ``async with await QMPClient.connect(path) as qmp: await qmp.execute(...)``."""

    def __init__(self, stream: ByteStream, path: str, timeout: float) -> None:
        super().__init__(stream, path, "QMP monitor", timeout)
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.greeting: dict[str, Any] = {}
        self._ids = random.Random().getrandbits(32) << 20

    def __repr__(self) -> str:
        return f"<QMPClient {self.path} events={len(self.events)}>"

    async def __aenter__(self) -> QMPClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    @classmethod
    async def connect(cls, path: str, *, timeout: float | None = None) -> QMPClient:
        """Connect, read the greeting, leave capabilities negotiation mode: all of it within
        ``timeout`` seconds (default :data:`QMP_TIMEOUT`), which is also each later command's."""
        timeout = QMP_TIMEOUT if timeout is None else timeout
        deadline = anyio.current_time() + timeout
        stream = await _connect_unix(path, "QMP monitor", timeout)
        qmp = cls(stream, path, timeout)
        try:
            try:
                greeting = await qmp._line(deadline)
            except TimeoutError:
                raise ChannelLost(f"{path}: no QMP greeting within {timeout:g} s (is it a QMP socket, "
                                  "and is another client holding it?)") from None
            if not isinstance(greeting, dict) or "QMP" not in greeting:
                raise SourceError(f"{path}: not a QMP socket (it said {str(greeting)[:80]!r})")
            qmp.greeting = greeting["QMP"]
            await qmp.execute("qmp_capabilities", timeout=max(1e-3, deadline - anyio.current_time()))
        except BaseException:
            await qmp.aclose()
            raise
        return qmp

    @property
    def version(self) -> tuple[int, int, int]:
        v = self.greeting.get("version", {}).get("qemu", {})
        return (v.get("major", 0), v.get("minor", 0), v.get("micro", 0))

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None, *,
                      timeout: float | None = None) -> Any:
        """Run one command and return its ``return`` value; QMPError if QEMU refused it."""
        self._ids += 1
        msg_id = self._ids
        msg: dict[str, Any] = {"execute": command, "id": msg_id}
        if arguments:
            msg["arguments"] = dict(arguments)
        deadline = anyio.current_time() + (timeout or self.timeout)
        async with self._lock:
            await self._send(msg)
            log.debug("qmp_command", socket=self.path, command=command)
            while True:
                try:
                    reply = await self._line(deadline)
                except TimeoutError:
                    raise ChannelLost(f"{self.path}: no answer to {command} within {timeout or self.timeout:g} s") from None
                if "event" in reply:
                    self.events.append(reply)
                    continue
                if reply.get("id") != msg_id:
                    continue  # the answer to a command whose caller was cancelled
                if "error" in reply:
                    err = reply["error"]
                    raise QMPError(f"{self.path}: {command} failed: {err.get('desc', err)}",
                                   err.get("class", ""), err.get("desc", ""))
                return reply.get("return")

    async def wait_event(self, name: str, match: Callable[[dict[str, Any]], bool] | None = None, *,
                         timeout: float | None = None) -> dict[str, Any]:
        """The first event ``name`` (whose ``data`` passes ``match``) seen since the last call
        that took one, waiting up to ``timeout`` seconds for it."""

        def take() -> dict[str, Any] | None:
            for ev in self.events:
                if ev.get("event") == name and (match is None or match(ev.get("data") or {})):
                    self.events.remove(ev)
                    return ev
            return None

        deadline = anyio.current_time() + (timeout or self.timeout)
        async with self._lock:
            while True:
                ev = take()
                if ev is not None:
                    return ev
                try:
                    msg = await self._line(deadline)
                except TimeoutError:
                    raise ChannelLost(f"{self.path}: no {name} event within {timeout or self.timeout:g} s") from None
                if "event" in msg:
                    self.events.append(msg)


class GuestAgent(_JsonLines):
    """A connection to the QEMU guest agent (``qemu-ga``) through its host-side socket.

    The agent's answers carry no id, so every exchange starts with ``guest-sync-delimited``: the
    agent answers it after a 0xFF byte, and anything older (the late answer to a command we gave
    up on) is skipped.
    """

    def __init__(self, stream: ByteStream, path: str, timeout: float) -> None:
        super().__init__(stream, path, "guest agent", timeout)
        self._synced = False

    def __repr__(self) -> str:
        return f"<GuestAgent {self.path}>"

    @classmethod
    async def connect(cls, path: str, *, timeout: float = 10.0) -> GuestAgent:
        stream = await _connect_unix(path, "guest agent", timeout)
        return cls(stream, path, timeout)

    async def _sync(self, deadline: float) -> None:
        token = random.Random().getrandbits(31)
        await self._send({"execute": "guest-sync-delimited", "arguments": {"id": token}})
        while True:
            # skip to the 0xFF the agent sends before the answer, then read the answer
            with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
                await self._rx.receive_until(b"\xff", MAX_LINE)
            reply = await self._line(deadline)
            if isinstance(reply, dict) and reply.get("return") == token:
                self._synced = True
                return

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None, *,
                      timeout: float | None = None) -> Any:
        """Run one agent command; QMPError if the agent refused it, TimeoutError if it did not
        answer within ``timeout`` seconds (the channel must then be synced again)."""
        deadline = anyio.current_time() + (timeout or self.timeout)
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = dict(arguments)
        async with self._lock:
            try:
                if not self._synced:
                    await self._sync(deadline)
                await self._send(msg)
                reply = await self._line(deadline)
            except (TimeoutError, anyio.get_cancelled_exc_class()):
                self._synced = False  # a late answer may still come: sync before the next command
                raise
            except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
                raise ChannelLost(f"{self.path}: the guest agent closed the connection") from exc
        if isinstance(reply, dict) and "error" in reply:
            err = reply["error"]
            raise QMPError(f"{self.path}: guest agent {command} failed: {err.get('desc', err)}",
                           err.get("class", ""), err.get("desc", ""))
        return reply.get("return") if isinstance(reply, dict) else None
