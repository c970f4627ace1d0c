"""The control protocol: what the daemon and its clients say on the Unix socket.

Every message is a frame: a 4-byte big-endian unsigned length, then that many bytes of msgpack
holding a map with a ``type`` key. The client speaks first (``hello``), the server answers
``welcome`` (or ``error`` and closes); then the client sends ``request``s, each with an id it
chooses, and the server answers each with a ``reply`` or an ``error`` carrying the same id, in
any order. After ``subscribe``, the server also pushes ``event``s. docs/protocol.md describes
every method; this module is the reference for the framing and the message shapes.
"""

from __future__ import annotations

import struct
from typing import Annotated, Any, Literal

import msgspec
from anyio.streams.buffered import BufferedByteReceiveStream
from blockferry.errors import (
    BlockferryError,
    ConfigError,
    ConflictError,
    FieldError,
    NotFoundError,
    RepositoryLockedError,
)

#: the versions this build speaks, newest last
VERSIONS = (1,)
VERSION = VERSIONS[-1]
HEADER = struct.Struct(">I")
#: the largest frame the server accepts from a client (bytes, without the 4-byte header)
MAX_REQUEST = 1 << 20
#: the largest frame the server sends (bytes, without the header); clients must accept this much
MAX_FRAME = 16 << 20


class ProtocolError(BlockferryError):
    """The peer broke the protocol: a frame too large, undecodable, or out of order."""


class UnknownMethodError(ProtocolError):
    """A request named a method the daemon does not have."""


class FrameTooLargeError(ProtocolError):
    """A frame announced more bytes than the receiver accepts."""


class _Msg(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    pass


class Hello(_Msg, frozen=True, kw_only=True, tag="hello"):
    #: protocol versions the client speaks
    versions: list[int]
    #: free text naming the client, for the daemon's log
    client: str = ""


class Welcome(_Msg, frozen=True, kw_only=True, tag="welcome"):
    version: int  #: the version chosen (the highest both speak)
    server: str  #: "blockferry X.Y.Z"
    pid: int  #: the daemon's process id
    user: str  #: the user the daemon saw connecting
    max_request: int = MAX_REQUEST
    max_frame: int = MAX_FRAME


class Request(_Msg, frozen=True, kw_only=True, tag="request"):
    id: int  #: any integer the client picks; the reply carries it back
    method: str
    params: dict[str, Any] = msgspec.field(default_factory=dict)


class Reply(_Msg, frozen=True, kw_only=True, tag="reply"):
    id: int
    result: Any = None


class Error(_Msg, frozen=True, kw_only=True, tag="error"):
    #: the request's id, or None for an error about the connection or an undecodable frame
    id: int | None = None
    code: str
    message: str
    #: the field at fault, for ``invalid``
    field: str | None = None


class Event(_Msg, frozen=True, kw_only=True, tag="event"):
    subscription: int
    seq: int  #: 1, 2, 3... per subscription
    topic: str  #: progress, session, log
    data: Any
    #: events of this subscription dropped just before this one (the client was too slow)
    skipped: int = 0


ClientMessage = Hello | Request
ServerMessage = Welcome | Reply | Error | Event

#: error codes, and the exit code the CLI uses for each
ERROR_CODES: dict[str, int] = {
    "bad_request": 2,  # undecodable frame, unknown message type, bad params
    "frame_too_large": 2,
    "handshake_required": 2,
    "unsupported_version": 2,
    "unknown_method": 2,
    "invalid": 2,  # invalid configuration or arguments; ``field`` names what
    "not_found": 2,
    "conflict": 2,  # a name taken, a job already running, something still in use
    "locked": 4,  # a repository is locked by another process
    "failed": 1,  # the operation failed
    "too_large": 1,  # the reply would exceed MAX_FRAME
    "permission_denied": 5,
    "too_many_clients": 5,
    "timeout": 1,  # idle too long, or a frame begun and not finished in time (connection closed)
    "shutting_down": 5,
    "internal": 1,
}

_encoder = msgspec.msgpack.Encoder()
_client_decoder = msgspec.msgpack.Decoder(ClientMessage)
_server_decoder = msgspec.msgpack.Decoder(ServerMessage)


def frame(msg: Any) -> bytes:
    """The bytes of one frame holding ``msg``."""
    payload = _encoder.encode(msg)
    return HEADER.pack(len(payload)) + payload


def decode_client(payload: bytes) -> Hello | Request:
    """A client's message; msgspec.DecodeError / ValidationError if it is not one."""
    return _client_decoder.decode(payload)


def decode_server(payload: bytes) -> Welcome | Reply | Error | Event:
    return _server_decoder.decode(payload)


async def read_frame(stream: BufferedByteReceiveStream, limit: int) -> bytes:
    """The next frame's payload. FrameTooLargeError past ``limit`` (nothing more is read: the
    stream cannot be resynchronised); anyio.EndOfStream / IncompleteRead when the peer closes."""
    (n,) = HEADER.unpack(await stream.receive_exactly(HEADER.size))
    if n > limit:
        raise FrameTooLargeError(f"frame of {n} bytes exceeds the limit of {limit}")
    return await stream.receive_exactly(n) if n else b""


def error_for(exc: BaseException, request_id: int | None) -> Error:
    """The error reply for an engine error raised by a request's handler."""
    field = None
    if isinstance(exc, FieldError):
        code, field = "invalid", exc.field or None
    elif isinstance(exc, ConflictError):
        code = "conflict"
    elif isinstance(exc, NotFoundError):
        code = "not_found"
    elif isinstance(exc, ConfigError):
        code = "invalid"
    elif isinstance(exc, RepositoryLockedError):
        code = "locked"
    elif isinstance(exc, UnknownMethodError):
        code = "unknown_method"
    elif isinstance(exc, ProtocolError):
        code = "bad_request"
    else:
        code = "failed"
    return Error(id=request_id, code=code, message=str(exc) or type(exc).__name__, field=field)


# -- request parameters (one struct per method that takes any) -------------------------------------


class _Params(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class NameParams(_Params, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str


class SetParams(_Params, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    changes: dict[str, Any]


class StopParams(_Params, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    reason: str = "stopped by request"


class SessionListParams(_Params, frozen=True, kw_only=True, forbid_unknown_fields=True):
    job: str | None = None
    state: str | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 50


class SessionShowParams(_Params, frozen=True, kw_only=True, forbid_unknown_fields=True):
    id: int


Topic = Literal["progress", "session", "log"]


class SubscribeParams(_Params, frozen=True, kw_only=True, forbid_unknown_fields=True):
    topics: list[Topic]
    job: str | None = None
    session: int | None = None
    #: lowest log level sent on the ``log`` topic
    level: Literal["debug", "info", "warning", "error"] = "info"


class UnsubscribeParams(_Params, frozen=True, kw_only=True, forbid_unknown_fields=True):
    subscription: int


class ApplyParams(_Params, frozen=True, kw_only=True, forbid_unknown_fields=True):
    config: dict[str, Any]
    #: True: the configuration becomes exactly ``config``; False: its items are added or replace
    #: those of the same name, and the rest stays
    replace: bool = False


class SettingsParams(_Params, frozen=True, kw_only=True, forbid_unknown_fields=True):
    changes: dict[str, Any]


class ClockParams(_Params, frozen=True, kw_only=True, forbid_unknown_fields=True):
    seconds: float | None = None
    time: str | None = None


__all__ = [
    "ApplyParams", "ClientMessage", "ClockParams", "ERROR_CODES", "Error", "Event", "FrameTooLargeError", "HEADER",
    "Hello", "MAX_FRAME", "MAX_REQUEST", "NameParams", "ProtocolError", "Reply", "Request", "ServerMessage",
    "SessionListParams", "SessionShowParams", "SetParams", "SettingsParams", "StopParams", "SubscribeParams",
    "UnknownMethodError", "UnsubscribeParams", "VERSION", "VERSIONS", "Welcome", "decode_client", "decode_server", "error_for", "frame",
    "read_frame",
]
