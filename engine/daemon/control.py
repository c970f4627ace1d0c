"""The control socket: a Unix socket listener that speaks :mod:`blockferry.daemon.protocol`.

Security: the socket is created with mode 0600 (0660 with a group) and every connection's peer
credentials (``SO_PEERCRED``: the connecting process's pid, uid and gid, given by the kernel) are
checked against the allowed users and groups before anything else is read. Root and the daemon's
own user are always allowed. There is no network listener.

Robustness: a frame larger than the limit closes the connection (the stream cannot be
resynchronised); a frame that does not decode, an unknown message type or bad parameters get an
error reply and the connection goes on; a client that does not read its replies for
``stall_timeout`` seconds is disconnected; events are offered to subscriptions without waiting
(see :mod:`blockferry.runtime.events`). No client can stall a job or crash the daemon: every error in a
connection ends that connection only.

No client can lock the others out: a frame begun must arrive whole within ``frame_timeout``
seconds, and a connection with no request in progress and no subscription is closed after
``idle_timeout`` seconds of silence. At most ``max_clients`` connections are served at once, and
at most ``max_clients_per_user`` of them for one user; the owner (root and the daemon's own
user) has a pool of ``max_clients`` of its own beside them, so whatever other users hold, the
owner can always get in.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.abc import SocketAttribute, SocketStream, TaskGroup
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.memory import MemoryObjectSendStream
from blockferry.daemon.protocol import (
    HEADER,
    MAX_FRAME,
    MAX_REQUEST,
    VERSIONS,
    Error,
    Event,
    FrameTooLargeError,
    Hello,
    Reply,
    Request,
    SubscribeParams,
    UnsubscribeParams,
    Welcome,
    decode_client,
    error_for,
    frame,
)
from blockferry.errors import BlockferryError, ConfigError
from blockferry.jobs.catalog import convert
from blockferry.log import get_logger
from blockferry.runtime.events import EventBus, Subscription

log = get_logger(actor="control")

Handler = Callable[["Connection", str, dict[str, Any]], Awaitable[Any]]


class Peer(msgspec.Struct, frozen=True):
    pid: int
    uid: int
    gid: int

    @property
    def user(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return str(self.uid)

    def groups(self) -> set[int]:
        """The peer's primary and supplementary groups (from /proc while it lives)."""
        gids = {self.gid}
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("Groups:"):
                        gids.update(int(g) for g in line.split()[1:])
        except OSError:
            pass
        return gids


def peer_of(sock: socket.socket) -> Peer:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Peer(*struct.unpack("3i", creds))


def resolve_user(u: str | int) -> int:
    if isinstance(u, int) or u.isdigit():
        return int(u)
    try:
        return pwd.getpwnam(u).pw_uid
    except KeyError:
        raise ConfigError(f"unknown user {u!r}") from None


def resolve_group(g: str | int) -> int:
    if isinstance(g, int) or g.isdigit():
        return int(g)
    try:
        return grp.getgrnam(g).gr_gid
    except KeyError:
        raise ConfigError(f"unknown group {g!r}") from None


class AccessPolicy:
    """Who may use the daemon: root, the daemon's own user, and the users and groups listed."""

    def __init__(self, users: Iterable[str | int] = (), groups: Iterable[str | int] = ()) -> None:
        self.uids = {0, os.getuid(), *(resolve_user(u) for u in users)}
        self.gids = {resolve_group(g) for g in groups}

    def __repr__(self) -> str:
        return f"<AccessPolicy uids={sorted(self.uids)} gids={sorted(self.gids)}>"

    @staticmethod
    def owner(peer: Peer) -> bool:
        """Root or the daemon's own user: they have connections of their own (see ControlServer)."""
        return peer.uid in (0, os.getuid())

    def refusal(self, peer: Peer) -> str | None:
        """None if ``peer`` may connect, else why not (for the error reply)."""
        if peer.uid in self.uids or (self.gids and self.gids & peer.groups()):
            return None
        users = ", ".join(_user_name(u) for u in sorted(self.uids))
        groups = ", ".join(_group_name(g) for g in sorted(self.gids)) or "none"
        return (f"user {peer.user} (uid {peer.uid}) is not allowed to use this blockferry daemon "
                f"(allowed users: {users}; allowed groups: {groups}); ask its administrator to add you "
                "to allowed_users or allowed_groups")


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


class ControlServer:
    """Listens on ``path`` and serves each connection in its own task; ``handler(conn, method,
    params)`` answers requests (``subscribe`` and ``unsubscribe`` are handled here)."""

    def __init__(self, path: Path, *, handler: Handler, bus: EventBus, access: AccessPolicy,
                 mode: int = 0o600, group: int | None = None, max_clients: int = 64,
                 max_clients_per_user: int = 16, stall_timeout: float = 30.0, handshake_timeout: float = 10.0,
                 frame_timeout: float = 10.0, idle_timeout: float = 600.0, max_inflight: int = 16,
                 server_name: str = "blockferry") -> None:
        for name, value in (("max_clients", max_clients), ("max_clients_per_user", max_clients_per_user),
                            ("max_inflight", max_inflight)):
            if value < 1:
                raise ConfigError(f"{name} must be 1 or more, not {value}")
        for name, value in (("stall_timeout", stall_timeout), ("handshake_timeout", handshake_timeout),
                            ("frame_timeout", frame_timeout), ("idle_timeout", idle_timeout)):
            if not value > 0:  # NaN too
                raise ConfigError(f"{name} must be more than 0 seconds, not {value}")
        self.path = path
        self.handler = handler
        self.bus = bus
        self.access = access
        self.mode = mode
        self.group = group
        self.max_clients = max_clients
        self.max_clients_per_user = max_clients_per_user
        self.stall_timeout = stall_timeout
        self.handshake_timeout = handshake_timeout
        self.frame_timeout = frame_timeout
        self.idle_timeout = idle_timeout
        self.max_inflight = max_inflight
        self.server_name = server_name
        self.connections: set[Connection] = set()
        self.accepted = 0
        self.refused = 0
        self.timed_out = 0
        self._scope: anyio.CancelScope | None = None

    def __repr__(self) -> str:
        return f"<ControlServer {self.path} clients={len(self.connections)}>"

    async def run(self, *, task_status: anyio.abc.TaskStatus[Any] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind the socket, report started, serve until cancelled or :meth:`close`; the socket
        file is removed on the way out."""
        try:
            listener = await anyio.create_unix_listener(self.path, mode=self.mode)
        except OSError as exc:  # a path too long for AF_UNIX (108 bytes), a read-only directory...
            raise ConfigError(f"cannot listen on {self.path}: {exc.strerror or exc}") from exc
        try:
            if self.group is not None:
                os.chown(self.path, -1, self.group)
            with anyio.CancelScope() as self._scope:
                task_status.started(self)
                async with listener:
                    await listener.serve(self._serve)
        finally:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def close(self) -> None:
        """Stop accepting and drop every connection."""
        if self._scope is not None:
            self._scope.cancel()

    def statistics(self) -> dict[str, Any]:
        return {"clients": len(self.connections), "accepted": self.accepted, "refused": self.refused,
                "max_clients": self.max_clients, "max_clients_per_user": self.max_clients_per_user,
                "timed_out": self.timed_out}

    def _full(self, peer: Peer) -> str | None:
        """Why one more connection of ``peer`` is one too many, or None."""
        owner = self.access.owner(peer)
        pool = [c for c in self.connections if c.owner == owner]
        if len(pool) >= self.max_clients:
            return (f"the daemon already serves {self.max_clients} clients (max_clients)"
                    + (" of its owner" if owner else "") + "; try again later")
        if not owner and sum(c.peer.uid == peer.uid for c in pool) >= self.max_clients_per_user:
            return (f"the daemon already serves {self.max_clients_per_user} clients of user {peer.user} "
                    "(max_clients_per_user); close some, or try again later")
        return None

    async def _serve(self, stream: SocketStream) -> None:
        async with stream:
            try:
                peer = peer_of(stream.extra(SocketAttribute.raw_socket))
            except OSError:
                return
            refusal = self.access.refusal(peer)
            code = "permission_denied"
            if refusal is None:
                refusal = self._full(peer)
                code = "too_many_clients"
            if refusal is not None:
                self.refused += 1
                log.warning("client_refused", pid=peer.pid, uid=peer.uid, reason=code)
                with anyio.move_on_after(1):
                    try:
                        await stream.send(frame(Error(code=code, message=refusal)))
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                        pass
                return
            self.accepted += 1
            conn = Connection(self, stream, peer)
            self.connections.add(conn)
            try:
                await conn.run()
            except Exception as exc:  # a connection's failure must never reach the listener
                log.warning("connection_failed", pid=peer.pid, error=repr(exc))
            finally:
                self.connections.discard(conn)


class _Close(Exception):
    """End the connection after flushing what is queued."""


class Connection:
    """One client. A reader task decodes requests and starts a handler per request (at most
    ``max_inflight`` at once, then it stops reading); a writer task sends what handlers and
    subscriptions queue, in order."""

    def __init__(self, server: ControlServer, stream: SocketStream, peer: Peer) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer
        self.client = ""
        self.subscriptions: dict[int, Subscription] = {}
        self.requests = 0
        self.owner = server.access.owner(peer)
        #: requests being handled, and when the connection last did anything (for the idle timeout)
        self.inflight = 0
        self.last_active = anyio.current_time()
        self._out: MemoryObjectSendStream[bytes] | None = None
        self.log = log.bind(pid=peer.pid, uid=peer.uid)

    def __repr__(self) -> str:
        return f"<Connection pid={self.peer.pid} uid={self.peer.uid} {self.client!r}>"

    async def run(self) -> None:
        out, pending = anyio.create_memory_object_stream[bytes](64)
        self._out = out
        try:
            async with anyio.create_task_group() as tg:
                writer_done = anyio.Event()
                tg.start_soon(self._writer, pending, writer_done)
                tg.start_soon(self._watch_idle, out, writer_done)
                try:
                    await self._reader(tg, out)
                except _Close:
                    pass
                await self._flush(out, writer_done)  # what is queued (a fatal error), then the writer stops
                self._shutdown()
                with anyio.move_on_after(1):
                    await writer_done.wait()
                tg.cancel_scope.cancel()
        finally:
            for sub in self.subscriptions.values():
                self.server.bus.unsubscribe(sub)
            self.subscriptions.clear()

    def _shutdown(self) -> None:
        """Shut the socket down both ways: a receive or send in progress then ends by itself
        (end of stream, broken pipe). Cancelling it instead, or closing the socket under it,
        races with the event loop's readiness callback (on asyncio, anyio's UNIX streams then
        raise InvalidStateError when data arrives at that moment); the tasks are cancelled only
        once they are out of the socket."""
        try:
            self.stream.extra(SocketAttribute.raw_socket).shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    @staticmethod
    async def _flush(out: MemoryObjectSendStream[bytes], writer_done: anyio.Event) -> None:
        out.close()
        with anyio.move_on_after(2):
            await writer_done.wait()

    async def _watch_idle(self, out: MemoryObjectSendStream[bytes], writer_done: anyio.Event) -> None:
        """Close the connection once it has had no request in progress, no subscription and no
        frame for ``idle_timeout`` seconds: an idle client must not hold a slot for ever."""
        timeout = self.server.idle_timeout
        while True:
            idle = not self.inflight and not self.subscriptions
            left = self.last_active + timeout - anyio.current_time()
            if idle and left <= 0:
                break
            await anyio.sleep(left if idle and left > 0 else timeout)
        self.server.timed_out += 1
        self.log.info("connection_closed", code="timeout", reason="idle")
        try:
            await self._send(Error(code="timeout", message=f"closed after {timeout:g} s without a request"))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        await self._flush(out, writer_done)
        self._shutdown()  # the reader sees the end of the stream and the connection ends

    async def _writer(self, pending: Any, done: anyio.Event) -> None:
        try:
            async with pending:
                async for data in pending:
                    with anyio.move_on_after(self.server.stall_timeout) as scope:
                        await self.stream.send(data)
                    if scope.cancelled_caught:
                        self.log.warning("client_stalled", timeout=self.server.stall_timeout)
                        self._shutdown()
                        return
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            self._shutdown()  # the client went away: the reader sees it too
        finally:
            done.set()

    async def _send(self, msg: Any) -> None:
        data = frame(msg)
        if len(data) - 4 > MAX_FRAME and isinstance(msg, Reply):
            data = frame(Error(id=msg.id, code="too_large",
                               message=f"the reply would take {len(data)} bytes, more than {MAX_FRAME}"))
        assert self._out is not None
        await self._out.send(data)

    async def _reader(self, tg: TaskGroup, out: MemoryObjectSendStream[bytes]) -> None:
        buffered = BufferedByteReceiveStream(self.stream)
        try:
            with anyio.fail_after(self.server.handshake_timeout):
                hello = await self._next(buffered)
        except TimeoutError:
            await self._fatal(Error(code="handshake_required", message="no hello within "
                                    f"{self.server.handshake_timeout:g} s"))
        if hello is None:
            return
        if not isinstance(hello, Hello):
            await self._fatal(Error(id=getattr(hello, "id", None), code="handshake_required",
                                    message="the first message must be a hello"))
        common = set(hello.versions) & set(VERSIONS)
        if not common:
            await self._fatal(Error(code="unsupported_version", message=f"this daemon speaks protocol "
                                    f"version(s) {', '.join(map(str, VERSIONS))}, the client {hello.versions}"))
        self.client = hello.client[:200]
        await self._send(Welcome(version=max(common), server=self.server.server_name, pid=os.getpid(),
                                 user=self.peer.user, max_request=MAX_REQUEST, max_frame=MAX_FRAME))
        limiter = anyio.Semaphore(self.server.max_inflight)
        while True:
            msg = await self._next(buffered)
            if msg is None:
                return
            if isinstance(msg, Hello):
                await self._send(Error(code="bad_request", message="hello was already received"))
                continue
            await limiter.acquire()
            self.requests += 1
            self.inflight += 1
            tg.start_soon(self._request, msg, limiter, tg)

    async def _next(self, buffered: BufferedByteReceiveStream) -> Hello | Request | None:
        """The next well-formed message; None when the client has gone. Answers undecodable
        frames itself and goes on."""
        while True:
            try:
                payload = await self._frame(buffered)
            except FrameTooLargeError as exc:
                await self._fatal(Error(code="frame_too_large", message=str(exc)))
            except TimeoutError:
                self.server.timed_out += 1
                await self._fatal(Error(code="timeout", message="a frame was begun but did not arrive whole within "
                                        f"{self.server.frame_timeout:g} s"))
            except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError,
                    anyio.ClosedResourceError, OSError):
                return None
            try:
                return decode_client(payload)
            except Exception as exc:  # DecodeError, ValidationError, RecursionError on deep nesting
                await self._send(Error(code="bad_request", message=f"undecodable message: {_short(exc)}"))

    async def _frame(self, buffered: BufferedByteReceiveStream) -> bytes:
        """The next frame's payload: waiting for its first byte takes as long as it takes (the
        idle watch decides), the rest must follow within ``frame_timeout`` (TimeoutError)."""
        first = await buffered.receive_exactly(1)
        self.last_active = anyio.current_time()
        with anyio.fail_after(self.server.frame_timeout):
            (n,) = HEADER.unpack(first + await buffered.receive_exactly(HEADER.size - 1))
            if n > MAX_REQUEST:
                raise FrameTooLargeError(f"frame of {n} bytes exceeds the limit of {MAX_REQUEST}")
            payload = await buffered.receive_exactly(n) if n else b""
        self.last_active = anyio.current_time()
        return payload

    async def _fatal(self, error: Error) -> None:
        self.log.info("connection_closed", code=error.code, reason=error.message)
        await self._send(error)
        raise _Close

    async def _request(self, req: Request, limiter: anyio.Semaphore, tg: TaskGroup) -> None:
        try:
            try:
                if req.method == "subscribe":
                    result = self._subscribe(req.params, tg)
                elif req.method == "unsubscribe":
                    result = self._unsubscribe(req.params)
                else:
                    result = await self.server.handler(self, req.method, req.params)
                reply: Reply | Error = Reply(id=req.id, result=result)
            except BlockferryError as exc:
                reply = error_for(exc, req.id)
            except Exception as exc:  # a bug: report it, keep the daemon (and this client) going
                self.log.exception("request_failed", method=req.method)
                reply = Error(id=req.id, code="internal", message=f"internal error: {_short(exc)}")
            try:
                await self._send(reply)
            except msgspec.EncodeError as exc:
                await self._send(Error(id=req.id, code="internal", message=f"reply not encodable: {_short(exc)}"))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # the connection is closing
        finally:
            self.inflight -= 1
            self.last_active = anyio.current_time()
            limiter.release()

    # -- subscriptions ---------------------------------------------------------------------------

    def _subscribe(self, params: dict[str, Any], tg: TaskGroup) -> dict[str, int]:
        p = convert(params, SubscribeParams)
        if len(self.subscriptions) >= 16:
            raise ConfigError("at most 16 subscriptions per connection")
        sub = self.server.bus.subscribe(list(p.topics), job=p.job, session=p.session, level=p.level)
        self.subscriptions[sub.id] = sub
        tg.start_soon(self._forward, sub)
        return {"subscription": sub.id}

    def _unsubscribe(self, params: dict[str, Any]) -> dict[str, bool]:
        p = convert(params, UnsubscribeParams)
        sub = self.subscriptions.pop(p.subscription, None)
        if sub is not None:
            self.server.bus.unsubscribe(sub)
        return {"unsubscribed": sub is not None}

    async def _forward(self, sub: Subscription) -> None:
        """Move a subscription's events to the writer; while the writer is behind, the
        subscription's buffer fills and the bus drops (and counts) what does not fit."""
        seq = 0
        try:
            async for topic, data, skipped in sub.receive:
                seq += 1
                await self._send(Event(subscription=sub.id, seq=seq, topic=topic, data=data, skipped=skipped))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."


__all__ = ["AccessPolicy", "Connection", "ControlServer", "Peer", "peer_of", "resolve_group", "resolve_user"]
