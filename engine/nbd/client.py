"""An async NBD client on anyio streams (asyncio and trio), and the protocol's constants.

Written by hand against the NBD protocol document (``doc/proto.md`` of the NBD project): no
well-kept Python NBD client exists on PyPI. libnbd's Python binding is not on PyPI (it comes with
the distribution's libnbd, blocks a thread per call and would tie us to one event loop); the
packages named ``nbd``/``pynbd``/``python-nbd`` there are unmaintained, synchronous, and speak
neither structured replies nor metadata contexts.

What it does:

* the fixed newstyle handshake (``NBD_OPT_GO``, with a fallback to ``NBD_OPT_EXPORT_NAME``),
  structured replies, and metadata contexts (``base:allocation``, ``qemu:dirty-bitmap:NAME``);
* ``READ`` with data and hole chunks, ``BLOCK_STATUS``, ``WRITE``, ``WRITE_ZEROES``, ``TRIM``,
  ``FLUSH`` and a clean ``DISC``;
* several requests in flight on one connection, each split at the server's maximum block size.

No task runs in the background: whichever caller is waiting for a reply reads the socket for
everyone (the way httpcore's HTTP/2 connection reads for all its streams), handing each reply
chunk to the request it belongs to, straight into that request's buffers. Bytes are consumed
only between awaits, so a cancelled waiter never leaves half a reply behind; a cancelled
request stays registered until its reply arrives and is then discarded.

Errors become engine errors (``SourceError`` by default, or the class the caller chooses), with
the offset of the failed request and the server's message.
"""

from __future__ import annotations

import errno as _errno
import os
import struct
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import anyio
from anyio.abc import ByteStream
from anyio.streams.buffered import BufferedByteReceiveStream
from blockferry.errors import BlockferryError, ConfigError, SourceError
from blockferry.log import get_logger

log = get_logger(component="nbd")

KiB = 1 << 10
MiB = 1 << 20

# -- the protocol (all integers big-endian) -------------------------------------------------------

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
CLISERV_MAGIC = 0x00420281861253  # oldstyle handshake: not supported
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) and client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = FLAG_FIXED_NEWSTYLE
FLAG_C_NO_ZEROES = FLAG_NO_ZEROES

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# option replies
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR + 1
REP_ERR_POLICY = REP_ERR + 2
REP_ERR_INVALID = REP_ERR + 3
REP_ERR_PLATFORM = REP_ERR + 4
REP_ERR_TLS_REQD = REP_ERR + 5
REP_ERR_UNKNOWN = REP_ERR + 6
REP_ERR_SHUTDOWN = REP_ERR + 7
REP_ERR_BLOCK_SIZE_REQD = REP_ERR + 8
REP_ERR_TOO_BIG = REP_ERR + 9

# NBD_INFO_* in NBD_REP_INFO replies
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

# commands and their flags
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# structured reply chunks
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# base:allocation flags; qemu:dirty-bitmap:NAME uses bit 0 for "dirty"
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
STATE_DIRTY = 1 << 0

# errors on the wire (errno values fixed by the protocol, whatever the platform's)
EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = 1, 5, 12, 22, 28, 75, 95, 108
ERROR_NAMES = {EPERM: "EPERM", EIO: "EIO", ENOMEM: "ENOMEM", EINVAL: "EINVAL", ENOSPC: "ENOSPC",
               EOVERFLOW: "EOVERFLOW", ENOTSUP: "ENOTSUP", ESHUTDOWN: "ESHUTDOWN"}

REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, handle, length
OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
U16, U32, U64 = struct.Struct(">H"), struct.Struct(">I"), struct.Struct(">Q")

#: an upper bound on any one option reply or error message we accept (the spec caps strings at 4 KiB)
MAX_OPTION_REPLY = 1 * MiB
#: bytes asked of the socket per receive: larger asks cost trio a larger allocation per call, smaller
#: ones more trips through the event loop (256 KiB read 256 MiB fastest here on both backends)
RECEIVE_SIZE = 256 * KiB
#: a Unix socket path longer than this cannot be bound or connected (sun_path)
MAX_UNIX_PATH = 107


def errno_of(exc: BaseException) -> int:
    """The NBD error for an exception a server hits (EIO unless it knows better)."""
    if isinstance(exc, OSError) and exc.errno in (_errno.ENOSPC, _errno.EDQUOT):
        return ENOSPC
    if isinstance(exc, OSError) and exc.errno == _errno.EPERM:
        return EPERM
    return EIO


class NBDConnectionError(SourceError):
    """The connection to an NBD server failed, was lost, or the server broke the protocol. A
    later attempt (a new connection) may succeed."""

    transient = True


class NBDAddress:
    """Where an NBD server listens: a Unix socket path, or a TCP host and port."""

    __slots__ = ("path", "host", "port")

    def __init__(self, path: str | None = None, host: str | None = None, port: int = 10809) -> None:
        self.path = path
        self.host = host
        self.port = port

    def __repr__(self) -> str:
        return f"<NBDAddress {self.path or f'{self.host}:{self.port}'}>"

    def uri(self, export: str = "") -> str:
        if self.path is not None:
            return f"nbd+unix:///{export}?socket={self.path}"
        return f"nbd://{self.host}:{self.port}/{export}"

    async def connect(self) -> ByteStream:
        if self.path is not None:
            if len(os.fsencode(self.path)) > MAX_UNIX_PATH:
                raise ConfigError(f"{self.path}: a Unix socket path is limited to {MAX_UNIX_PATH} bytes")
            return await anyio.connect_unix(self.path)
        assert self.host is not None
        return await anyio.connect_tcp(self.host, self.port)


async def wait_until_listening(path: str, proc: Any, timeout: float = 20.0) -> bool:
    """Wait until a server process (an ``anyio.abc.Process``, e.g. ``qemu-nbd``, which says
    nothing when it is ready) accepts connections on the Unix socket ``path``. The socket file
    appears when it is bound, a moment before it listens, so readiness is a connection that
    succeeds (run such servers with ``--persistent``: the probe is a client that comes and goes).
    False if the process exited or the time ran out."""
    with anyio.move_on_after(timeout):
        while proc.returncode is None:
            if os.path.exists(path):
                try:
                    probe = await anyio.connect_unix(path)
                except OSError:
                    pass
                else:
                    await probe.aclose()
                    return True
            await anyio.sleep(0.02)
    return False


def parse_nbd_url(url: str) -> tuple[NBDAddress, str]:
    """``nbd+unix:///EXPORT?socket=PATH`` or ``nbd://HOST[:PORT]/EXPORT`` → (address, export)."""
    parts = urlsplit(url)
    export = unquote(parts.path[1:]) if parts.path.startswith("/") else unquote(parts.path)
    if parts.scheme == "nbd+unix":
        sock = parse_qs(parts.query).get("socket")
        if not sock:
            raise ConfigError(f"{url}: an nbd+unix URL needs ?socket=PATH")
        return NBDAddress(path=sock[0]), export
    if parts.scheme == "nbd":
        if not parts.hostname:
            raise ConfigError(f"{url}: an nbd URL needs a host (nbd://HOST[:PORT]/EXPORT)")
        return NBDAddress(host=parts.hostname, port=parts.port or 10809), export
    raise ConfigError(f"{url}: not an NBD URL (nbd+unix:///EXPORT?socket=PATH or nbd://HOST:PORT/EXPORT)")


def is_nbd_url(text: str) -> bool:
    return text.startswith(("nbd://", "nbd+unix://"))


class ExportInfo:
    """What the handshake learnt about the export."""

    __slots__ = ("name", "size", "flags", "min_block", "preferred_block", "max_block", "structured", "contexts")

    def __init__(self, name: str) -> None:
        self.name = name
        self.size = 0
        self.flags = 0
        self.min_block = 1
        self.preferred_block = 4096
        self.max_block = 32 * MiB  # the spec's default when the server does not say
        self.structured = False
        #: meta context name → id the server gave it
        self.contexts: dict[str, int] = {}

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TF_READ_ONLY)


# -- scatter lists ------------------------------------------------------------------------------


class _Scatter:
    """A list of buffers seen as one byte range (positions are relative to its start)."""

    __slots__ = ("views", "starts", "total")

    def __init__(self, buffers: Sequence[Any]) -> None:
        self.views = [memoryview(b).cast("B") for b in buffers]
        self.starts: list[int] = []
        pos = 0
        for v in self.views:
            self.starts.append(pos)
            pos += len(v)
        self.total = pos

    def _locate(self, pos: int) -> int:
        # bisect by hand: starts is sorted; empty buffers share a start with the next one
        lo, hi = 0, len(self.starts) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.starts[mid] <= pos:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def write(self, pos: int, data: memoryview) -> None:
        i = self._locate(pos)
        k = 0
        while k < len(data):
            v = self.views[i]
            at = pos + k - self.starts[i]
            n = min(len(v) - at, len(data) - k)
            if n > 0:
                v[at:at + n] = data[k:k + n]
                k += n
            i += 1

    def zero(self, pos: int, length: int) -> None:
        zeros = memoryview(bytes(min(length, MiB)))
        while length > 0:
            n = min(length, len(zeros))
            self.write(pos, zeros[:n])
            pos += n
            length -= n

    def read(self, pos: int, length: int) -> memoryview:
        """The bytes at ``pos`` as one view (a copy only when they span buffers)."""
        i = self._locate(pos)
        at = pos - self.starts[i]
        if at + length <= len(self.views[i]):
            return self.views[i][at:at + length]
        out = bytearray(length)
        k = 0
        while k < length:
            v = self.views[i]
            at = pos + k - self.starts[i]
            n = min(len(v) - at, length - k)
            out[k:k + n] = v[at:at + n]
            k += n
            i += 1
        return memoryview(out)


# -- requests ----------------------------------------------------------------------------------


class _Request:
    """One request in flight. ``sink``/``base`` say where a read's data goes."""

    __slots__ = ("handle", "cmd", "offset", "length", "sink", "base", "finished", "error", "error_offset",
                 "covered", "status", "abandoned")

    def __init__(self, handle: int, cmd: int, offset: int, length: int, sink: _Scatter | None = None,
                 base: int = 0) -> None:
        self.handle = handle
        self.cmd = cmd
        self.offset = offset
        self.length = length
        self.sink = sink
        self.base = base
        self.finished = False
        self.error: tuple[int, str] | None = None
        self.error_offset: int | None = None
        self.covered = 0  #: bytes of a read that data or hole chunks filled
        self.status: dict[int, list[tuple[int, int]]] = {}  #: context id → (length, flags) pairs
        self.abandoned = False  #: the caller is gone: discard what arrives


_NAMES = {CMD_READ: "read", CMD_WRITE: "write", CMD_FLUSH: "flush", CMD_TRIM: "trim",
          CMD_WRITE_ZEROES: "write-zeroes", CMD_BLOCK_STATUS: "block-status", CMD_CACHE: "cache"}


class NBDClient:
    """One connection to one export. Create with :meth:`connect`; close with :meth:`aclose`.

    Safe for concurrent use by many tasks: requests are pipelined (at most ``max_inflight`` at
    once) and each read or write is split into requests of at most ``request_size`` bytes (never
    more than the server's maximum block size).
    """

    def __init__(self, stream: ByteStream, info: ExportInfo, *, where: str, request_size: int = 4 * MiB,
                 max_inflight: int = 16, timeout: float = 60.0, error: type[BlockferryError] = SourceError,
                 leftover: bytes = b"") -> None:
        self._stream = stream
        self.info = info
        self.where = where
        self.error_class = error
        self.request_size = max(info.min_block, min(request_size, info.max_block))
        self.max_inflight = max_inflight
        self.timeout = timeout
        self._send_lock = anyio.Lock()
        self._recv_lock = anyio.Lock()
        self._pending: dict[int, _Request] = {}
        self._next_handle = 1
        self._broken: str | None = None
        self._closed = False
        # the reply parser's state: bytes of the header being gathered, what they are for
        self._hdr = bytearray()
        self._need = 4
        self._stage = "magic"
        self._cur: _Request | None = None
        self._chunk: tuple[int, int, int] = (0, 0, 0)  # flags, type, length of the current chunk
        self._data_left = 0  # payload bytes still to route to the current request
        self._data_pos = 0  # where they go, relative to the request's offset
        self.stats = {"requests": 0, "bytes_read": 0, "bytes_written": 0, "peak_inflight": 0}
        if leftover:
            self._feed(leftover)

    def __repr__(self) -> str:
        state = "broken" if self._broken else ("closed" if self._closed else "open")
        return (f"<NBDClient {self.where} export={self.info.name!r} size={self.info.size} {state} "
                f"inflight={len(self._pending)}>")

    @property
    def size(self) -> int:
        return self.info.size

    # -- connecting ------------------------------------------------------------------------------

    @classmethod
    async def connect(cls, address: NBDAddress | str, export: str = "", *, meta_contexts: Sequence[str] = (),
                      error: type[BlockferryError] = SourceError, timeout: float = 60.0,
                      request_size: int = 4 * MiB, max_inflight: int = 16) -> NBDClient:
        """Connect and negotiate. ``address`` is an :class:`NBDAddress` or an NBD URL (then
        ``export`` comes from the URL). Asks for structured replies and ``meta_contexts``; the
        contexts the server granted are in ``client.info.contexts``."""
        if isinstance(address, str):
            address, export = parse_nbd_url(address)
        where = address.uri(export)
        try:
            with anyio.fail_after(timeout):
                stream = await address.connect()
        except TimeoutError:
            raise NBDConnectionError(f"{where}: no answer within {timeout:g} s") from None
        except OSError as exc:
            raise error(f"{where}: cannot connect ({exc.strerror or exc})") from exc
        try:
            with anyio.fail_after(timeout):
                info, leftover = await _handshake(stream, export, list(meta_contexts), where, error)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            if isinstance(exc, TimeoutError):
                raise NBDConnectionError(f"{where}: the handshake did not finish within {timeout:g} s") from None
            if isinstance(exc, (anyio.EndOfStream, anyio.BrokenResourceError, OSError)):
                raise NBDConnectionError(f"{where}: the server closed the connection during the handshake") from exc
            raise
        log.debug("nbd_connected", where=where, size=info.size, flags=info.flags, max_block=info.max_block,
                  contexts=info.contexts, structured=info.structured)
        return cls(stream, info, where=where, error=error, timeout=timeout, request_size=request_size,
                   max_inflight=max_inflight, leftover=leftover)

    # -- public operations ------------------------------------------------------------------------

    async def read_into(self, offset: int, buffers: Sequence[Any]) -> int:
        """Fill ``buffers`` from ``offset``; returns the bytes read (short only at the end of the
        export). Holes arrive as zeros."""
        scatter = _Scatter(buffers)
        end = min(offset + scatter.total, self.info.size)
        if end <= offset:
            return 0
        align = self.info.min_block
        if align > 1 and (offset % align or end % align):
            # widen to the server's minimum block size, through a bounce buffer
            a, b = offset // align * align, min(-(-end // align) * align, self.info.size)
            bounce = bytearray(b - a)
            await self.read_into(a, [bounce])
            scatter.write(0, memoryview(bounce)[offset - a:end - a])
            return end - offset
        reqs: list[_Request] = []
        try:
            pos = offset
            while pos < end:
                n = min(self.request_size, end - pos)
                reqs.append(await self._submit(CMD_READ, pos, n, sink=scatter, base=pos - offset))
                pos += n
            for r in reqs:
                await self._wait(r)
            for r in reqs:
                self._check(r)
        except NBDConnectionError as exc:
            # qemu-nbd, for one, drops the connection when a sparse read fails: still say where
            err = NBDConnectionError(f"{exc} (while reading {end - offset} bytes at offset {offset})")
            err.offset = offset  # type: ignore[attr-defined]
            raise err from exc
        finally:
            for r in reqs:
                if not r.finished:
                    r.abandoned = True  # its data must never land in buffers the caller reuses
        self.stats["bytes_read"] += end - offset
        return end - offset

    async def pread(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        n = await self.read_into(offset, [buf])
        return bytes(buf[:n])

    async def block_status(self, context: str, offset: int = 0, length: int | None = None) -> list[tuple[int, int, int]]:
        """``(offset, length, flags)`` extents of ``context`` covering ``offset .. offset+length``
        (default: to the end of the export), merged where the flags repeat."""
        ctx = self.info.contexts.get(context)
        if ctx is None:
            raise self.error_class(f"{self.where}: the server did not grant the meta context {context!r} "
                                   f"(granted: {', '.join(self.info.contexts) or 'none'})")
        end = self.info.size if length is None else min(self.info.size, offset + length)
        out: list[tuple[int, int, int]] = []
        pos = offset
        while pos < end:
            # the length field is 32 bits; servers may answer for less than asked
            n = min(end - pos, (1 << 32) - self.info.max_block)
            r = await self._submit(CMD_BLOCK_STATUS, pos, n)
            await self._wait(r)
            self._check(r)
            pairs = r.status.get(ctx)
            if not pairs:
                raise NBDConnectionError(f"{self.where}: block status at offset {pos} came without context {context!r}")
            for ln, flags in pairs:
                ln = min(ln, end - pos)
                if ln <= 0:
                    break
                if out and out[-1][2] == flags and out[-1][0] + out[-1][1] == pos:
                    o, l0, f = out[-1]
                    out[-1] = (o, l0 + ln, f)
                else:
                    out.append((pos, ln, flags))
                pos += ln
        return out

    async def write(self, offset: int, data: Any, *, fua: bool = False) -> None:
        """Write ``data`` (bytes-like) at ``offset``, in pieces sent back to back."""
        self._check_writable("write")
        view = memoryview(data).cast("B")
        reqs: list[_Request] = []
        try:
            pos = 0
            while pos < len(view):
                n = min(self.request_size, len(view) - pos)
                reqs.append(await self._submit(CMD_WRITE, offset + pos, n, payload=view[pos:pos + n],
                                               flags=CMD_FLAG_FUA if fua else 0))
                pos += n
            for r in reqs:
                await self._wait(r)
            for r in reqs:
                self._check(r)
        finally:
            for r in reqs:
                r.abandoned = r.abandoned or not r.finished
        self.stats["bytes_written"] += len(view)

    async def write_zeroes(self, offset: int, length: int, *, punch: bool = True) -> None:
        """Make ``length`` bytes at ``offset`` read as zeros; ``punch`` lets the server deallocate
        them. Falls back to writing zeros when the server lacks WRITE_ZEROES."""
        self._check_writable("write zeroes")
        if not self.info.flags & TF_SEND_WRITE_ZEROES:
            zeros = bytes(min(length, self.request_size))
            pos = 0
            while pos < length:
                n = min(len(zeros), length - pos)
                await self.write(offset + pos, memoryview(zeros)[:n])
                pos += n
            return
        reqs: list[_Request] = []
        try:
            pos = 0
            step = 1 << 30  # one request need not carry the data: large pieces are fine
            while pos < length:
                n = min(step, length - pos)
                reqs.append(await self._submit(CMD_WRITE_ZEROES, offset + pos, n, flags=0 if punch else CMD_FLAG_NO_HOLE))
                pos += n
            for r in reqs:
                await self._wait(r)
            for r in reqs:
                self._check(r)
        finally:
            for r in reqs:
                r.abandoned = r.abandoned or not r.finished

    async def flush(self) -> None:
        if not self.info.flags & TF_SEND_FLUSH:
            return
        r = await self._submit(CMD_FLUSH, 0, 0)
        await self._wait(r)
        self._check(r)

    async def aclose(self) -> None:
        """Disconnect cleanly (``NBD_CMD_DISC``) and close the socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            if self._broken is None:
                try:
                    with anyio.move_on_after(5):
                        async with self._send_lock:
                            await self._stream.send(REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    pass
            await self._stream.aclose()
        self._fail_pending("the connection was closed")

    # -- requests ---------------------------------------------------------------------------------

    def _check_writable(self, what: str) -> None:
        if self.info.read_only:
            raise self.error_class(f"{self.where}: cannot {what}: the export is read-only")

    def _check(self, r: _Request) -> None:
        if r.error is None:
            if r.cmd == CMD_READ and r.covered != r.length and self.info.structured:
                raise NBDConnectionError(f"{self.where}: the reply to a read at offset {r.offset} covered "
                                         f"{r.covered} of {r.length} bytes")
            return
        code, message = r.error
        at = r.error_offset if r.error_offset is not None else r.offset
        name = ERROR_NAMES.get(code, f"error {code}")
        text = f"{self.where}: {_NAMES.get(r.cmd, 'request')} error at offset {at}: {name}"
        if message:
            text += f" ({message})"
        exc = self.error_class(text)
        exc.offset = at  # type: ignore[attr-defined]
        exc.nbd_errno = code  # type: ignore[attr-defined]
        raise exc

    async def _submit(self, cmd: int, offset: int, length: int, *, sink: _Scatter | None = None, base: int = 0,
                      payload: memoryview | None = None, flags: int = 0) -> _Request:
        if self._closed:
            raise self.error_class(f"{self.where}: the connection is closed")
        # at most max_inflight requests: waiting for a free place reads replies, so it progresses
        while len(self._pending) >= self.max_inflight:
            self._raise_if_broken()
            async with self._recv_lock:
                if len(self._pending) >= self.max_inflight:
                    await self._pump()
        self._raise_if_broken()
        handle = self._next_handle
        self._next_handle += 1
        r = _Request(handle, cmd, offset, length, sink, base)
        self._pending[handle] = r
        self.stats["requests"] += 1
        self.stats["peak_inflight"] = max(self.stats["peak_inflight"], len(self._pending))
        header = REQUEST.pack(REQUEST_MAGIC, flags, cmd, handle, offset, length)
        try:
            # a request is sent whole or the connection is unusable: never let a cancellation cut
            # one in half (the timeout still bounds a server that stopped reading)
            with anyio.CancelScope(shield=True):
                with anyio.fail_after(self.timeout):
                    async with self._send_lock:
                        if payload is None:
                            await self._stream.send(header)
                        else:
                            await self._stream.send(header)
                            await self._stream.send(payload)  # type: ignore[arg-type]  # any buffer works
        except TimeoutError:
            self._break(f"the server did not accept a request within {self.timeout:g} s")
            raise NBDConnectionError(f"{self.where}: {self._broken}") from None
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self._break(f"the connection was lost ({exc!r})")
            raise NBDConnectionError(f"{self.where}: {self._broken}") from exc
        return r

    async def _wait(self, r: _Request) -> None:
        try:
            while not r.finished:
                self._raise_if_broken()
                async with self._recv_lock:
                    if not r.finished:
                        await self._pump()
        except BaseException:
            if not r.finished:
                r.abandoned = True
            raise

    async def _pump(self) -> None:
        """Receive once and route what came (the caller holds the receive lock)."""
        try:
            with anyio.fail_after(self.timeout):
                data = await self._stream.receive(RECEIVE_SIZE)
        except TimeoutError:
            self._break(f"no reply within {self.timeout:g} s")
            raise NBDConnectionError(f"{self.where}: {self._broken}") from None
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self._break("the server closed the connection")
            raise NBDConnectionError(f"{self.where}: {self._broken}") from exc
        try:
            self._feed(data)
        except NBDConnectionError as exc:
            self._break(str(exc))
            raise

    def _raise_if_broken(self) -> None:
        if self._broken is not None:
            raise NBDConnectionError(f"{self.where}: {self._broken}")

    def _break(self, reason: str) -> None:
        if self._broken is None:
            self._broken = reason
            log.warning("nbd_connection_broken", where=self.where, reason=reason, inflight=len(self._pending))
        self._fail_pending(reason)

    def _fail_pending(self, reason: str) -> None:
        for r in self._pending.values():
            if not r.finished:
                r.finished = True
                r.abandoned = True
                r.error = r.error or (ESHUTDOWN, reason)
        self._pending.clear()

    # -- the reply parser (synchronous: nothing is lost to a cancellation) --------------------------

    def _protocol_error(self, what: str) -> NBDConnectionError:
        return NBDConnectionError(f"{self.where}: protocol error: {what}")

    def _feed(self, data: bytes) -> None:
        view = memoryview(data)
        pos, total = 0, len(view)
        while pos < total:
            if self._data_left:
                n = min(self._data_left, total - pos)
                self._route(view[pos:pos + n])
                pos += n
                if self._data_left == 0:
                    self._chunk_done()
                continue
            take = min(self._need - len(self._hdr), total - pos)
            self._hdr += view[pos:pos + take]
            pos += take
            if len(self._hdr) == self._need:
                self._advance()

    def _expect(self, stage: str, need: int) -> None:
        self._stage = stage
        self._need = need
        self._hdr = bytearray()
        if need == 0:
            self._advance()

    def _advance(self) -> None:
        """A header (or fixed part) is complete: parse it and say what comes next."""
        hdr, stage = bytes(self._hdr), self._stage
        if stage == "magic":
            (magic,) = U32.unpack(hdr)
            if magic == SIMPLE_REPLY_MAGIC:
                self._hdr = bytearray(hdr)
                self._stage, self._need = "simple", SIMPLE_REPLY.size
            elif magic == STRUCTURED_REPLY_MAGIC:
                self._hdr = bytearray(hdr)
                self._stage, self._need = "chunk", CHUNK.size
            else:
                raise self._protocol_error(f"bad reply magic {magic:#x}")
            return
        if stage == "simple":
            _, err, handle = SIMPLE_REPLY.unpack(hdr)
            r = self._request(handle)
            self._cur = r
            if err:
                r.error = (err, "")
            self._chunk = (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0)
            if r.cmd == CMD_READ and not err and r.length:
                # a simple reply's data follows the header: as long as the read asked
                r.covered = r.length
                self._data_pos, self._data_left = 0, r.length
                self._hdr = bytearray()
                return
            self._chunk_done()
            return
        if stage == "chunk":
            _, flags, typ, handle, length = CHUNK.unpack(hdr)
            r = self._request(handle)
            self._cur = r
            self._chunk = (flags, typ, length)
            if typ == REPLY_TYPE_NONE:
                if length:
                    raise self._protocol_error("a NONE chunk with a payload")
                self._chunk_done()
            elif typ == REPLY_TYPE_OFFSET_DATA:
                if length < 9:
                    raise self._protocol_error("a data chunk shorter than its offset")
                self._expect("data-offset", 8)
            elif typ == REPLY_TYPE_OFFSET_HOLE:
                if length != 12:
                    raise self._protocol_error("a hole chunk of the wrong length")
                self._expect("hole", 12)
            else:
                if length > MAX_OPTION_REPLY * 64:
                    raise self._protocol_error(f"a chunk of {length} bytes")
                self._expect("payload", length)
            return
        cur = self._cur
        assert cur is not None
        r = cur
        flags, typ, length = self._chunk
        if stage == "data-offset":
            (off,) = U64.unpack(hdr)
            n = length - 8
            if r.cmd != CMD_READ or off < r.offset or off + n > r.offset + r.length:
                raise self._protocol_error(f"data for offset {off} outside the read at {r.offset}")
            r.covered += n
            self._data_pos, self._data_left = off - r.offset, n
            self._hdr = bytearray()
            return
        if stage == "hole":
            off, n = struct.unpack(">QI", hdr)
            if r.cmd != CMD_READ or off < r.offset or off + n > r.offset + r.length:
                raise self._protocol_error(f"a hole at offset {off} outside the read at {r.offset}")
            r.covered += n
            if not r.abandoned and r.sink is not None:
                r.sink.zero(r.base + off - r.offset, n)
            self._chunk_done()
            return
        if stage == "payload":
            if typ == REPLY_TYPE_BLOCK_STATUS:
                if length < 12 or (length - 4) % 8:
                    raise self._protocol_error("a block status chunk of the wrong length")
                (ctx,) = U32.unpack_from(hdr, 0)
                pairs = [struct.unpack_from(">II", hdr, i) for i in range(4, length, 8)]
                r.status[ctx] = pairs
            elif typ & (1 << 15):
                if length < 6:
                    raise self._protocol_error("an error chunk too short")
                code, mlen = struct.unpack_from(">IH", hdr, 0)
                message = hdr[6:6 + mlen].decode("utf-8", "replace")
                if r.error is None:
                    r.error = (code or EIO, message)
                    if typ == REPLY_TYPE_ERROR_OFFSET and length >= 6 + mlen + 8:
                        (r.error_offset,) = U64.unpack_from(hdr, 6 + mlen)
            # other chunk types are unknown and not errors: ignored, as the spec allows
            self._chunk_done()
            return
        raise self._protocol_error(f"parser in an unknown state {stage!r}")  # pragma: no cover

    def _route(self, data: memoryview) -> None:
        r = self._cur
        assert r is not None
        if not r.abandoned and r.sink is not None:
            r.sink.write(r.base + self._data_pos, data)
        self._data_pos += len(data)
        self._data_left -= len(data)

    def _chunk_done(self) -> None:
        r = self._cur
        assert r is not None
        flags = self._chunk[0]
        self._cur = None
        self._expect("magic", 4)
        if flags & REPLY_FLAG_DONE:
            self._complete(r)

    def _request(self, handle: int) -> _Request:
        r = self._pending.get(handle)
        if r is None:
            raise self._protocol_error(f"a reply for handle {handle}, which no request has")
        return r

    def _complete(self, r: _Request) -> None:
        r.finished = True
        self._pending.pop(r.handle, None)


# -- the handshake -------------------------------------------------------------------------------


async def _handshake(stream: ByteStream, export: str, contexts: list[str], where: str,
                     error: type[BlockferryError]) -> tuple[ExportInfo, bytes]:
    rx = BufferedByteReceiveStream(stream)
    if await rx.receive_exactly(8) != NBDMAGIC:
        raise NBDConnectionError(f"{where}: not an NBD server")
    (magic,) = U64.unpack(await rx.receive_exactly(8))
    if magic == CLISERV_MAGIC:
        raise NBDConnectionError(f"{where}: the server speaks only the oldstyle handshake, which is not supported")
    if magic != IHAVEOPT:
        raise NBDConnectionError(f"{where}: unexpected handshake magic {magic:#x}")
    (hflags,) = U16.unpack(await rx.receive_exactly(2))
    if not hflags & FLAG_FIXED_NEWSTYLE:
        raise NBDConnectionError(f"{where}: the server does not speak the fixed newstyle handshake")
    no_zeroes = bool(hflags & FLAG_NO_ZEROES)
    await stream.send(U32.pack(FLAG_C_FIXED_NEWSTYLE | (FLAG_C_NO_ZEROES if no_zeroes else 0)))
    info = ExportInfo(export)
    name = export.encode()

    async def option(opt: int, data: bytes = b"") -> None:
        await stream.send(OPTION.pack(IHAVEOPT, opt, len(data)) + data)

    async def reply(opt: int) -> tuple[int, bytes]:
        magic, got, typ, length = OPTION_REPLY.unpack(await rx.receive_exactly(OPTION_REPLY.size))
        if magic != OPT_REPLY_MAGIC or got != opt:
            raise NBDConnectionError(f"{where}: bad option reply (magic {magic:#x}, option {got})")
        if length > MAX_OPTION_REPLY:
            raise NBDConnectionError(f"{where}: an option reply of {length} bytes")
        return typ, (await rx.receive_exactly(length) if length else b"")

    def refused(what: str, typ: int, data: bytes) -> BlockferryError:
        msg = data.decode("utf-8", "replace")
        return error(f"{where}: the server refused {what}" + (f": {msg}" if msg else f" (reply {typ - REP_ERR})"))

    await option(OPT_STRUCTURED_REPLY)
    typ, data = await reply(OPT_STRUCTURED_REPLY)
    info.structured = typ == REP_ACK
    if contexts and info.structured:
        q = b"".join(U32.pack(len(c.encode())) + c.encode() for c in contexts)
        await option(OPT_SET_META_CONTEXT, U32.pack(len(name)) + name + U32.pack(len(contexts)) + q)
        while True:
            typ, data = await reply(OPT_SET_META_CONTEXT)
            if typ == REP_META_CONTEXT:
                (ctx_id,) = U32.unpack_from(data, 0)
                info.contexts[data[4:].decode()] = ctx_id
            elif typ == REP_ACK:
                break
            elif typ & REP_ERR:
                raise refused(f"meta contexts {contexts}", typ, data)

    await option(OPT_GO, U32.pack(len(name)) + name + U16.pack(1) + U16.pack(INFO_BLOCK_SIZE))
    got_export = False
    while True:
        typ, data = await reply(OPT_GO)
        if typ == REP_INFO and len(data) >= 2:
            (kind,) = U16.unpack_from(data, 0)
            if kind == INFO_EXPORT and len(data) >= 12:
                info.size, info.flags = struct.unpack_from(">QH", data, 2)
                got_export = True
            elif kind == INFO_BLOCK_SIZE and len(data) >= 14:
                info.min_block, info.preferred_block, info.max_block = struct.unpack_from(">III", data, 2)
        elif typ == REP_ACK:
            break
        elif typ == REP_ERR_UNSUP:
            # an old server: NBD_OPT_EXPORT_NAME ends the handshake without a reply header
            await option(OPT_EXPORT_NAME, name)
            info.size, info.flags = struct.unpack(">QH", await rx.receive_exactly(10))
            if not no_zeroes:
                await rx.receive_exactly(124)
            got_export = True
            break
        elif typ & REP_ERR:
            raise refused(f"export {export!r}", typ, data)
    if not got_export:
        raise NBDConnectionError(f"{where}: the server did not describe the export")
    return info, bytes(rx.buffer)
