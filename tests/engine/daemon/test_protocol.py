"""Framing and message shapes of the control protocol (docs/protocol.md)."""

from __future__ import annotations

import msgspec
import pytest
from blockferry.daemon.protocol import (
    HEADER,
    Error,
    Event,
    Hello,
    Reply,
    Request,
    UnknownMethodError,
    decode_client,
    decode_server,
    error_for,
    frame,
)
from blockferry.errors import ConflictError, FieldError, NotFoundError, RepositoryLockedError


def test_a_frame_is_a_big_endian_length_then_msgpack() -> None:
    data = frame(Request(id=7, method="status"))
    (n,) = HEADER.unpack(data[:4])
    assert n == len(data) - 4 and data[:4] == n.to_bytes(4, "big")
    # another language sees a plain map with a type key
    assert msgspec.msgpack.decode(data[4:]) == {"type": "request", "id": 7, "method": "status", "params": {}}


def test_plain_maps_decode_as_messages() -> None:
    raw = msgspec.msgpack.encode({"type": "hello", "versions": [1], "client": "x"})
    assert decode_client(raw) == Hello(versions=[1], client="x")
    ev = msgspec.msgpack.encode({"type": "event", "subscription": 1, "seq": 2, "topic": "progress", "data": {}})
    assert decode_server(ev) == Event(subscription=1, seq=2, topic="progress", data={})
    assert isinstance(decode_server(frame(Reply(id=1, result=[1, 2]))[4:]), Reply)


@pytest.mark.parametrize("raw", [b"", b"\xc1", msgspec.msgpack.encode({"type": "nope"}),
                                 msgspec.msgpack.encode({"type": "request", "id": "x", "method": "m"}),
                                 msgspec.msgpack.encode([1, 2, 3])])
def test_bad_payloads_raise_decode_errors(raw: bytes) -> None:
    with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
        decode_client(raw)


def test_errors_map_to_codes() -> None:
    assert error_for(FieldError("jobs[0].schedule", "bad"), 3) == Error(
        id=3, code="invalid", message="jobs[0].schedule: bad", field="jobs[0].schedule")
    assert error_for(ConflictError("taken"), 1).code == "conflict"
    assert error_for(NotFoundError("gone"), 1).code == "not_found"
    assert error_for(RepositoryLockedError("held"), 1).code == "locked"
    assert error_for(UnknownMethodError("x"), 1).code == "unknown_method"
    assert error_for(RuntimeError("boom"), 1).code == "failed"
