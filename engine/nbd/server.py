"""An NBD server on anyio (asyncio and trio): what ``blockferry serve`` exports a restore point with.

Written by hand against the NBD protocol document, like the client in :mod:`blockferry.nbd.client`
(no maintained Python NBD server exists on PyPI; nbdkit's Python plugins run inside nbdkit's own
process and threads, not in our event loop next to the repository).

It speaks the fixed newstyle handshake (``NBD_OPT_GO``/``INFO``/``EXPORT_NAME``/``LIST``),
structured replies, the ``base:allocation`` metadata context, and ``READ``, ``WRITE``,
``WRITE_ZEROES``, ``TRIM``, ``FLUSH``, ``BLOCK_STATUS`` and ``DISC``. Each connection handles up
to ``max_inflight`` requests at once; beyond that it stops reading the socket (backpressure).

An export is any :class:`BlockDevice`. A read may fail for part of its range (a damaged chunk):
with structured replies the client gets the good data and an error chunk that names the offset
of the damage (``NBD_REPLY_TYPE_ERROR_OFFSET``), never wrong bytes.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import anyio
from anyio.abc import ByteStream, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream
from blockferry.errors import BlockferryError, ConfigError
from blockferry.log import get_logger
from blockferry.nbd.client import (
    CHUNK,
    CMD_BLOCK_STATUS,
    CMD_CACHE,
    CMD_DISC,
    CMD_FLAG_FUA,
    CMD_FLAG_REQ_ONE,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    EINVAL,
    EIO,
    EPERM,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    INFO_NAME,
    MAX_UNIX_PATH,
    NBDMAGIC,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META_CONTEXT,
    OPT_REPLY_MAGIC,
    OPT_SET_META_CONTEXT,
    OPT_STARTTLS,
    OPT_STRUCTURED_REPLY,
    OPTION,
    OPTION_REPLY,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_POLICY,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_META_CONTEXT,
    REP_SERVER,
    REPLY_FLAG_DONE,
    REPLY_TYPE_BLOCK_STATUS,
    REPLY_TYPE_ERROR,
    REPLY_TYPE_ERROR_OFFSET,
    REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA,
    REPLY_TYPE_OFFSET_HOLE,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    TF_CAN_MULTI_CONN,
    TF_HAS_FLAGS,
    TF_READ_ONLY,
    TF_SEND_FLUSH,
    TF_SEND_FUA,
    TF_SEND_TRIM,
    TF_SEND_WRITE_ZEROES,
    U16,
    U32,
    U64,
    MiB,
    errno_of,
)

log = get_logger(component="nbd-server")

BASE_ALLOCATION = "base:allocation"
_BASE_ALLOCATION_ID = 1
#: option payloads larger than this end the connection (names and queries are at most 4 KiB each)
_MAX_OPTION = 64 * 1024


class BlockDevice(Protocol):
    """What an export serves. Offsets and lengths are bytes; ranges are within ``size``."""

    size: int
    writable: bool

    async def read(self, offset: int, length: int) -> Sequence[tuple[int, int, Any]]:
        """Consecutive ``(offset, length, data)`` pieces covering the range: ``data`` is bytes-like,
        None where the range reads as zeros, or a BlockferryError (with the offset in its
        message) where it cannot be read."""
        ...

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``(length, flags)`` of ``base:allocation`` from ``offset`` (HOLE=1, ZERO=2); may cover
        less than asked, never nothing."""
        ...

    async def write(self, offset: int, data: bytes) -> None:
        ...

    async def write_zeroes(self, offset: int, length: int) -> None:
        ...

    async def flush(self) -> None:
        ...


class _Closed(Exception):
    """The client went away or broke the protocol: end this connection only."""


class NBDServer:
    """Serves ``exports`` (name → device); ``default`` names the export a client gets when it
    asks for the empty name."""

    def __init__(self, exports: Mapping[str, BlockDevice], *, default: str | None = None,
                 max_block: int = 32 * MiB, max_inflight: int = 16, description: str = "blockferry") -> None:
        if default is not None and default not in exports:
            raise ConfigError(f"default export {default!r} is not among {', '.join(exports)}")
        self.exports = dict(exports)
        self.default = default
        self.max_block = max_block
        self.max_inflight = max_inflight
        self.description = description
        self.connections = 0  #: open now
        self.served = 0  #: ever accepted
        self.requests = 0
        self.log = log

    def __repr__(self) -> str:
        return f"<NBDServer exports={list(self.exports)} connections={self.connections} requests={self.requests}>"

    def statistics(self) -> dict[str, int]:
        return {"connections": self.connections, "served": self.served, "requests": self.requests}

    async def serve_unix(self, path: str, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen on a Unix socket at ``path`` (replacing a stale socket file) until cancelled;
        the socket file is removed on the way out."""
        if len(os.fsencode(path)) > MAX_UNIX_PATH:
            raise ConfigError(f"{path}: a Unix socket path is limited to {MAX_UNIX_PATH} bytes")
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ConfigError(f"cannot replace {path}: {exc.strerror}") from exc
        try:
            listener = await anyio.create_unix_listener(path)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {path}: {exc.strerror}") from exc
        try:
            async with listener, anyio.create_task_group() as tg:
                task_status.started()
                await listener.serve(self.handle, task_group=tg)
        finally:
            try:
                os.unlink(path)
            except OSError:
                pass

    async def handle(self, stream: ByteStream) -> None:
        """One client connection, from handshake to disconnect."""
        self.connections += 1
        self.served += 1
        conn = _Connection(self, stream)
        try:
            await conn.run()
        except _Closed as exc:
            self.log.debug("nbd_client_gone", reason=str(exc))
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, anyio.ClosedResourceError,
                ConnectionError):
            self.log.debug("nbd_client_gone", reason="connection closed")
        except Exception as exc:  # a bug met by one client ends its connection, never the server
            self.log.error("nbd_connection_failed", error=repr(exc), exc_info=exc)
        finally:
            self.connections -= 1
            with anyio.CancelScope(shield=True):
                await stream.aclose()


class _Connection:
    def __init__(self, server: NBDServer, stream: ByteStream) -> None:
        self.server = server
        self.stream = stream
        self.rx = BufferedByteReceiveStream(stream)
        self.structured = False
        self.no_zeroes = False
        self.contexts: set[int] = set()  # negotiated meta contexts (ids)
        self.name: str | None = None
        self.device: BlockDevice | None = None
        self.send_lock = anyio.Lock()

    # -- handshake -------------------------------------------------------------------------------

    async def run(self) -> None:
        await self.stream.send(NBDMAGIC + U64.pack(IHAVEOPT) + U16.pack(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (cflags,) = U32.unpack(await self.rx.receive_exactly(4))
        if cflags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            raise _Closed(f"unknown client flags {cflags:#x}")
        self.no_zeroes = bool(cflags & FLAG_C_NO_ZEROES)
        while self.device is None:
            magic, opt, length = OPTION.unpack(await self.rx.receive_exactly(OPTION.size))
            if magic != IHAVEOPT:
                raise _Closed("bad option magic")
            if length > _MAX_OPTION:
                raise _Closed(f"an option of {length} bytes")
            data = await self.rx.receive_exactly(length) if length else b""
            if not await self._option(opt, data):
                return
        await self._transmission()

    async def _reply(self, opt: int, typ: int, data: bytes = b"") -> None:
        await self.stream.send(OPTION_REPLY.pack(OPT_REPLY_MAGIC, opt, typ, len(data)) + data)

    def _lookup(self, name: str) -> tuple[str, BlockDevice] | None:
        if name == "" and self.server.default is not None:
            name = self.server.default
        dev = self.server.exports.get(name)
        return None if dev is None else (name, dev)

    def _flags(self, dev: BlockDevice) -> int:
        flags = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_CAN_MULTI_CONN  # one shared device: every connection sees every write
        if dev.writable:
            flags |= TF_SEND_WRITE_ZEROES | TF_SEND_TRIM | TF_SEND_FUA
        else:
            flags |= TF_READ_ONLY
        return flags

    async def _option(self, opt: int, data: bytes) -> bool:
        """Handle one option; False ends the connection."""
        if opt == OPT_EXPORT_NAME:
            found = self._lookup(data.decode("utf-8", "replace"))
            if found is None:
                raise _Closed(f"unknown export {data!r}")  # the protocol has no way to refuse it
            self.name, dev = found
            out = U64.pack(dev.size) + U16.pack(self._flags(dev))
            await self.stream.send(out if self.no_zeroes else out + bytes(124))
            self.device = dev
            return True
        if opt == OPT_ABORT:
            await self._reply(opt, REP_ACK)
            return False
        if opt == OPT_LIST:
            if data:
                await self._reply(opt, REP_ERR_INVALID, b"LIST takes no data")
                return True
            for name in self.server.exports:
                raw = name.encode()
                await self._reply(opt, REP_SERVER, U32.pack(len(raw)) + raw)
            await self._reply(opt, REP_ACK)
            return True
        if opt == OPT_STARTTLS:
            await self._reply(opt, REP_ERR_POLICY, b"TLS is not supported: use a Unix socket")
            return True
        if opt == OPT_STRUCTURED_REPLY:
            if data:
                await self._reply(opt, REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data")
                return True
            self.structured = True
            await self._reply(opt, REP_ACK)
            return True
        if opt in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
            await self._meta_context(opt, data)
            return True
        if opt in (OPT_INFO, OPT_GO):
            return await self._info(opt, data)
        await self._reply(opt, REP_ERR_UNSUP, b"option not supported")
        return True

    async def _meta_context(self, opt: int, data: bytes) -> None:
        if not self.structured:
            await self._reply(opt, REP_ERR_INVALID, b"negotiate structured replies first")
            return
        try:
            (nlen,) = U32.unpack_from(data, 0)
            name = data[4:4 + nlen].decode()
            (count,) = U32.unpack_from(data, 4 + nlen)
            pos, queries = 8 + nlen, []
            for _ in range(count):
                (qlen,) = U32.unpack_from(data, pos)
                queries.append(data[pos + 4:pos + 4 + qlen].decode())
                pos += 4 + qlen
        except (struct.error, UnicodeDecodeError):
            await self._reply(opt, REP_ERR_INVALID, b"malformed meta context request")
            return
        if self._lookup(name) is None:
            await self._reply(opt, REP_ERR_UNKNOWN, f"no export {name!r}".encode())
            return
        listing = opt == OPT_LIST_META_CONTEXT
        matched = any(q == BASE_ALLOCATION or (listing and q in ("base:", "")) for q in queries) or (listing and not queries)
        if not listing:
            self.contexts = {_BASE_ALLOCATION_ID} if matched else set()
        if matched:
            await self._reply(opt, REP_META_CONTEXT, U32.pack(0 if listing else _BASE_ALLOCATION_ID) + BASE_ALLOCATION.encode())
        await self._reply(opt, REP_ACK)

    async def _info(self, opt: int, data: bytes) -> bool:
        try:
            (nlen,) = U32.unpack_from(data, 0)
            name = data[4:4 + nlen].decode()
            (count,) = U16.unpack_from(data, 4 + nlen)
            wanted = [U16.unpack_from(data, 6 + nlen + 2 * i)[0] for i in range(count)]
        except (struct.error, UnicodeDecodeError):
            await self._reply(opt, REP_ERR_INVALID, b"malformed INFO/GO request")
            return True
        found = self._lookup(name)
        if found is None:
            await self._reply(opt, REP_ERR_UNKNOWN, f"no export {name!r} (exports: {', '.join(self.server.exports)})".encode())
            return True
        real, dev = found
        await self._reply(opt, REP_INFO, U16.pack(INFO_EXPORT) + U64.pack(dev.size) + U16.pack(self._flags(dev)))
        # block sizes are always worth saying: clients then split reads at our maximum
        await self._reply(opt, REP_INFO, U16.pack(INFO_BLOCK_SIZE) + struct.pack(">III", 1, 4096, self.server.max_block))
        if INFO_NAME in wanted:
            await self._reply(opt, REP_INFO, U16.pack(INFO_NAME) + real.encode())
        await self._reply(opt, REP_ACK)
        if opt == OPT_GO:
            self.name, self.device = real, dev
        return True

    # -- transmission ----------------------------------------------------------------------------

    async def _transmission(self) -> None:
        server = self.server
        log = server.log.bind(export=self.name)
        log.debug("nbd_client_attached", structured=self.structured)
        limit = anyio.Semaphore(server.max_inflight)
        async with anyio.create_task_group() as tg:
            while True:
                # a place first, then the next request: a busy server stops reading (backpressure)
                await limit.acquire()
                try:
                    header = await self.rx.receive_exactly(REQUEST.size)
                except (anyio.IncompleteRead, anyio.EndOfStream):
                    limit.release()
                    break
                magic, flags, cmd, handle, offset, length = REQUEST.unpack(header)
                if magic != REQUEST_MAGIC:
                    limit.release()
                    raise _Closed(f"bad request magic {magic:#x}")
                payload = b""
                if cmd == CMD_WRITE:
                    if length > server.max_block:
                        limit.release()
                        raise _Closed(f"a write of {length} bytes, more than the {server.max_block} allowed")
                    payload = await self.rx.receive_exactly(length) if length else b""
                if cmd == CMD_DISC:
                    limit.release()
                    break
                server.requests += 1
                tg.start_soon(self._request, limit, flags, cmd, handle, offset, length, payload)
        log.debug("nbd_client_detached")

    async def _request(self, limit: anyio.Semaphore, flags: int, cmd: int, handle: int, offset: int, length: int,
                       payload: bytes) -> None:
        try:
            await self._serve(flags, cmd, handle, offset, length, payload)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError):
            pass  # the client left; the read loop ends the connection
        finally:
            limit.release()

    async def _serve(self, flags: int, cmd: int, handle: int, offset: int, length: int, payload: bytes) -> None:
        dev = self.device
        assert dev is not None
        if cmd == CMD_READ:
            await self._read(handle, offset, length)
            return
        if offset + length > dev.size:
            await self._error(handle, EINVAL, f"offset {offset}+{length} is past the end ({dev.size})", offset)
            return
        try:
            if cmd in (CMD_WRITE, CMD_WRITE_ZEROES, CMD_TRIM):
                if not dev.writable:
                    await self._error(handle, EPERM, "the export is read-only", offset)
                    return
                if cmd == CMD_WRITE:
                    await dev.write(offset, payload)
                else:
                    # TRIM leaves the contents unspecified; zeros are a valid choice
                    await dev.write_zeroes(offset, length)
                if flags & CMD_FLAG_FUA:
                    await dev.flush()
            elif cmd == CMD_FLUSH:
                try:
                    await dev.flush()
                except (BlockferryError, OSError) as exc:
                    await self._error(handle, errno_of(exc), str(exc), None)  # a flush has no offset
                    return
            elif cmd == CMD_BLOCK_STATUS:
                if not self.structured or _BASE_ALLOCATION_ID not in self.contexts:
                    await self._error(handle, EINVAL, "no meta context was negotiated", offset)
                    return
                ext = await dev.extents(offset, length)
                if flags & CMD_FLAG_REQ_ONE:
                    ext = ext[:1]
                body = U32.pack(_BASE_ALLOCATION_ID) + b"".join(struct.pack(">II", n, f) for n, f in ext)
                await self._send(CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, handle,
                                            len(body)) + body)
                return
            elif cmd == CMD_CACHE:
                pass
            else:
                await self._error(handle, EINVAL, f"unknown command {cmd}", offset)
                return
        except BlockferryError as exc:
            await self._error(handle, EIO, str(exc), getattr(exc, "offset", offset))
            return
        except OSError as exc:
            self.server.log.warning("nbd_request_failed", command=cmd, offset=offset, error=repr(exc))
            await self._error(handle, errno_of(exc), exc.strerror or str(exc), offset)
            return
        await self._ok(handle)

    async def _read(self, handle: int, offset: int, length: int) -> None:
        dev = self.device
        assert dev is not None
        if length > self.server.max_block or offset + length > dev.size:
            await self._error(handle, EINVAL, f"a read of {length} bytes at {offset} is not allowed", offset)
            return
        try:
            pieces = await dev.read(offset, length)
        except BlockferryError as exc:
            pieces = [(offset, length, exc)]
        if not self.structured:
            bad = next((p for p in pieces if isinstance(p[2], BaseException)), None)
            if bad is not None:
                self.server.log.warning("nbd_read_failed", offset=bad[0], error=str(bad[2]))
                await self._send(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, EIO, handle))
                return
            async with self.send_lock:
                await self.stream.send(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle))
                for _, n, data in pieces:
                    await self.stream.send(bytes(n) if data is None else data)
            return
        async with self.send_lock:
            for off, n, data in pieces:
                if data is None:
                    await self.stream.send(CHUNK.pack(STRUCTURED_REPLY_MAGIC, 0, REPLY_TYPE_OFFSET_HOLE, handle, 12)
                                           + struct.pack(">QI", off, n))
                elif isinstance(data, BaseException):
                    self.server.log.warning("nbd_read_failed", offset=off, error=str(data))
                    await self.stream.send(_error_chunk(handle, EIO, str(data), off, flags=0))
                else:
                    await self.stream.send(CHUNK.pack(STRUCTURED_REPLY_MAGIC, 0, REPLY_TYPE_OFFSET_DATA, handle, 8 + n)
                                           + U64.pack(off))
                    await self.stream.send(data)
            await self.stream.send(CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0))

    async def _send(self, data: bytes) -> None:
        async with self.send_lock:
            await self.stream.send(data)

    async def _ok(self, handle: int) -> None:
        if self.structured:
            await self._send(CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0))
        else:
            await self._send(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle))

    async def _error(self, handle: int, code: int, message: str, offset: int | None) -> None:
        if self.structured:
            await self._send(_error_chunk(handle, code, message, offset, flags=REPLY_FLAG_DONE))
        else:
            await self._send(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, code, handle))


def _error_chunk(handle: int, code: int, message: str, offset: int | None, *, flags: int) -> bytes:
    """An error chunk; with an offset (reads, writes, block status) the client learns where."""
    msg = message.encode("utf-8", "replace")[:4096]
    body = U32.pack(code) + U16.pack(len(msg)) + msg
    if offset is None:
        return CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, REPLY_TYPE_ERROR, handle, len(body)) + body
    body += U64.pack(offset)
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, REPLY_TYPE_ERROR_OFFSET, handle, len(body)) + body


__all__ = ["BASE_ALLOCATION", "BlockDevice", "NBDServer"]
