"""Repository format v1 (engine/repo/format.py): validation, configs, chunk locations, manifests,
index deltas, pack trailers and task statistics."""

from __future__ import annotations

import zlib

import msgspec
import pytest
from blockferry.errors import ConfigError, CorruptionError, UnsupportedFormatError
from blockferry.repo.format import (
    COMPRESSION_LEVELS,
    DIGEST_SIZE,
    FORMAT_NAME,
    FORMAT_VERSION,
    HOLE,
    INDEX_RECORD,
    MAX_BLOCK_SIZE,
    PACK_FOOTER,
    PACK_FOOTER_MAGIC,
    PACK_RECORD,
    DiskRecord,
    Manifest,
    RepositoryConfig,
    TaskStats,
    check_block_size,
    check_compression,
    decode_config,
    decode_index,
    decode_manifest,
    encode_config,
    encode_index,
    encode_manifest,
    pack_loc,
    pack_trailer,
    parse_pack_footer,
    parse_pack_records,
    unpack_loc,
)
from blockferry.units import parse_size
from hypothesis import given, settings
from hypothesis import strategies as st

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


# -- block size ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [256 * KiB, 512 * KiB, 1 * MiB, 2 * MiB, 4 * MiB, 8 * MiB])
def test_block_size_powers_of_two_in_range_are_accepted(size: int) -> None:
    assert check_block_size(size) == size


@pytest.mark.parametrize(
    "size",
    [0, -MiB, 128 * KiB, 256 * KiB - 1, 3 * MiB, 1 * MiB + 1, 16 * MiB, 1.0 * MiB, "1MiB", None],
    ids=["zero", "negative", "128KiB", "256KiB-1", "3MiB", "1MiB+1", "16MiB", "float", "str", "None"],
)
def test_block_size_refused_with_a_message_saying_what_is_allowed(size: object) -> None:
    with pytest.raises(ConfigError) as ei:
        check_block_size(size)  # type: ignore[arg-type]
    msg = str(ei.value)
    assert "power of two" in msg
    assert "256 KiB" in msg and "8 MiB" in msg


# -- compression ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name,level", [("none", None), ("fast", 1), ("default", 3), ("high", 9)])
def test_compression_names_map_to_zstd_levels(name: str, level: int | None) -> None:
    assert check_compression(name) == name
    assert COMPRESSION_LEVELS[name] == level
    cfg = RepositoryConfig(id="x", created="now", block_size=MiB, compression=name)
    assert cfg.zstd_level == level


@pytest.mark.parametrize("name", ["zstd", "gzip", "", "Default", "max"])
def test_unknown_compression_refused_listing_the_known_names(name: str) -> None:
    with pytest.raises(ConfigError) as ei:
        check_compression(name)
    msg = str(ei.value)
    assert repr(name) in msg
    for known in ("none", "fast", "default", "high"):
        assert known in msg


# -- parse_size ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("1MiB", MiB),
        ("256k", 256 * KiB),
        ("256KiB", 256 * KiB),
        ("4M", 4 * MiB),
        ("4mb", 4 * MiB),
        ("1.5G", 3 * GiB // 2),
        ("2 GiB", 2 * GiB),
        ("1T", 1 << 40),
        ("4194304", 4194304),
        ("512b", 512),
        (" 8MiB ", 8 * MiB),
        (4096, 4096),
        (0, 0),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    got = parse_size(text)
    assert got == expected
    assert type(got) is int


@pytest.mark.parametrize("text", ["", "abc", "MiB", "1XB", "1 MiB extra", "1.2.3M", "nan", "0x10", "1kk"])
def test_parse_size_refuses_garbage(text: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_size(text)
    assert repr(text) in str(ei.value)


@pytest.mark.parametrize("text", ["inf", "infinity", "1e400"])
def test_parse_size_refuses_infinity_with_config_error(text: str) -> None:
    # the CLI turns only ConfigError into a usage message: anything else is a traceback
    with pytest.raises(ConfigError):
        parse_size(text)


@pytest.mark.parametrize("text", ["-1", "-1MiB", "-0.5G"])
def test_parse_size_refuses_negative_sizes(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_size(text)


# -- repository config ---------------------------------------------------------------------------


def _config(**kw: object) -> RepositoryConfig:
    base: dict[str, object] = dict(id="0123456789abcdef" * 2, created="2024-11-21T10:00:00+00:00",
                                   block_size=2 * MiB, compression="high", pack_size=16 * MiB)
    base.update(kw)
    return RepositoryConfig(**base)  # type: ignore[arg-type]


def test_config_json_round_trip() -> None:
    cfg = _config()
    data = encode_config(cfg)
    raw = msgspec.json.decode(data)
    assert raw["format"] == FORMAT_NAME and raw["version"] == FORMAT_VERSION
    back = decode_config(data, "config")
    assert back == cfg
    assert back.zstd_level == 9


def test_decode_config_refuses_another_format() -> None:
    raw = msgspec.to_builtins(_config())
    raw["format"] = "restic-repository"
    with pytest.raises(UnsupportedFormatError, match="not a blockferry repository"):
        decode_config(msgspec.json.encode(raw), "r/config")


def test_decode_config_refuses_non_object_json() -> None:
    with pytest.raises(CorruptionError):  # damage, exit 3, like every other damage to the config
        decode_config(b"[1, 2, 3]", "r/config")


@pytest.mark.parametrize("version", [0, 2, 99, "1", None])
def test_decode_config_refuses_unknown_version(version: object) -> None:
    raw = msgspec.to_builtins(_config())
    raw["version"] = version
    with pytest.raises(UnsupportedFormatError) as ei:
        decode_config(msgspec.json.encode(raw), "r/config")
    assert "r/config" in str(ei.value)
    assert repr(version) in str(ei.value)


@pytest.mark.parametrize("data", [b"", b"{", b"not json", b'{"format": "blockferry-repository",'])
def test_decode_config_refuses_invalid_json_as_corruption(data: bytes) -> None:
    with pytest.raises(CorruptionError) as ei:
        decode_config(data, "r/config")
    assert "r/config" in str(ei.value)


def test_decode_config_refuses_damaged_fields_and_bad_values() -> None:
    raw = msgspec.to_builtins(_config())
    del raw["block_size"]
    with pytest.raises(CorruptionError):
        decode_config(msgspec.json.encode(raw), "c")
    with pytest.raises(CorruptionError):  # init allows neither: edited or damaged since
        decode_config(encode_config(_config(block_size=3 * MiB)), "c")
    with pytest.raises(CorruptionError):
        decode_config(encode_config(_config(compression="brotli")), "c")
    with pytest.raises(UnsupportedFormatError):
        decode_config(encode_config(_config(hash="sha256")), "c")


# -- chunk locations -----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    pack_no=st.integers(0, 2**32),
    offset=st.integers(0, 2**32 - 1),
    length=st.integers(0, MAX_BLOCK_SIZE),
    raw_len=st.integers(0, MAX_BLOCK_SIZE),
    flags=st.integers(0, 15),
)
def test_pack_loc_round_trip(pack_no: int, offset: int, length: int, raw_len: int, flags: int) -> None:
    loc = pack_loc(pack_no, offset, length, raw_len, flags)
    assert isinstance(loc, int) and loc >= 0
    assert unpack_loc(loc) == (pack_no, offset, length, raw_len, flags)


def test_pack_loc_extremes_are_distinct() -> None:
    a = pack_loc(2**32, 2**32 - 1, MAX_BLOCK_SIZE, MAX_BLOCK_SIZE, 15)
    b = pack_loc(2**32 - 1, 2**32 - 1, MAX_BLOCK_SIZE, MAX_BLOCK_SIZE, 15)
    assert a != b
    assert unpack_loc(a) == (2**32, 2**32 - 1, MAX_BLOCK_SIZE, MAX_BLOCK_SIZE, 15)
    assert unpack_loc(pack_loc(0, 0, 0, 0, 0)) == (0, 0, 0, 0, 0)


# -- manifests -----------------------------------------------------------------------------------


def _disk(name: str, size: int, block_size: int) -> DiskRecord:
    n = -(-size // block_size)
    blocks = b"".join((bytes([i % 251 + 1]) * DIGEST_SIZE) if i % 3 else HOLE for i in range(n))
    return DiskRecord(name=name, size=size, source=f"/vm/{name}.img", identity={"inode": "12"},
                      metadata={"format": "raw", "n": 3}, change_id="c1", base="abcd", hinted=True,
                      stats=TaskStats(disk_size=size, read_bytes=size // 2, duration=1.5), blocks=blocks)


def _manifest() -> Manifest:
    bs = 256 * KiB
    return Manifest(
        id="0011223344556677", object="vm1", created="2024-11-21T10:00:00+00:00", block_size=bs, job="nightly",
        disks=[_disk("sda", 10 * bs, bs), _disk("sdb", 3 * bs + 17, bs), _disk("empty", 0, bs)],
        stats=TaskStats(disk_size=13 * bs + 17, new_bytes=4096), duration=2.25,
    )


def test_manifest_round_trip() -> None:
    m = _manifest()
    assert len(m.disks[1].blocks) == 4 * DIGEST_SIZE  # a partial last block counts
    data = encode_manifest(m)
    back = decode_manifest(data, "points/0011223344556677")
    assert back == m
    assert back.disk("sdb").blocks == m.disks[1].blocks
    assert back.disks[0].stats.read_bytes == m.disks[0].stats.read_bytes


@pytest.mark.parametrize("cut", [0, 1, 10, -1, -5])
def test_decode_manifest_refuses_truncated_bytes(cut: int) -> None:
    data = encode_manifest(_manifest())
    damaged = data[:cut]
    with pytest.raises(CorruptionError) as ei:
        decode_manifest(damaged, "points/x")
    assert "points/x" in str(ei.value)


def test_decode_manifest_refuses_garbled_bytes() -> None:
    data = bytearray(encode_manifest(_manifest()))
    data[len(data) // 2] ^= 0xFF  # the frame's checksum catches it
    with pytest.raises(CorruptionError):
        decode_manifest(bytes(data), "points/x")
    with pytest.raises(CorruptionError):
        decode_manifest(b"this is not a zstd frame at all", "points/x")


def test_decode_manifest_refuses_valid_frame_with_wrong_content() -> None:
    import zstandard

    bad = zstandard.ZstdCompressor().compress(msgspec.msgpack.encode({"id": 5, "hello": "world"}))
    with pytest.raises(CorruptionError):
        decode_manifest(bad, "points/x")


@pytest.mark.parametrize("delta", [-DIGEST_SIZE, DIGEST_SIZE, -1])
def test_decode_manifest_refuses_block_map_of_wrong_length(delta: int) -> None:
    m = _manifest()
    d = m.disks[0]
    d.blocks = d.blocks[:delta] if delta < 0 else d.blocks + HOLE
    with pytest.raises(CorruptionError, match="sda"):
        decode_manifest(encode_manifest(m), "points/x")


def test_decode_manifest_refuses_another_version() -> None:
    m = _manifest()
    m.version = 2
    with pytest.raises(UnsupportedFormatError):
        decode_manifest(encode_manifest(m), "points/x")


@pytest.mark.parametrize("block_size", [0, -MiB])
def test_decode_manifest_refuses_nonsense_block_size_as_corruption(block_size: int) -> None:
    # a well-formed frame whose content is nonsense is still a damaged manifest
    m = Manifest(id="x", object="vm", created="now", block_size=block_size,
                 disks=[DiskRecord(name="sda", size=10, source="/vm/sda.img")])
    with pytest.raises(CorruptionError):
        decode_manifest(encode_manifest(m), "points/x")


# -- index deltas --------------------------------------------------------------------------------


def _records(n: int) -> bytes:
    return b"".join(
        INDEX_RECORD.pack(bytes([i + 1]) * DIGEST_SIZE, i % 3, i * 1000, 500 + i, MiB, i % 2) for i in range(n)
    )


def test_index_round_trip() -> None:
    packs = ["a" * 32, "b" * 32, "c" * 32]
    recs = _records(7)
    f = decode_index(encode_index(packs, recs), "index/1")
    assert f.packs == packs
    assert f.records == recs
    assert f.version == FORMAT_VERSION
    got = list(INDEX_RECORD.iter_unpack(f.records))
    assert got[3] == (bytes([4]) * DIGEST_SIZE, 0, 3000, 503, MiB, 1)


def test_index_empty_round_trip() -> None:
    f = decode_index(encode_index([], b""), "index/1")
    assert f.packs == [] and f.records == b""


@pytest.mark.parametrize("cut", [1, INDEX_RECORD.size - 1, INDEX_RECORD.size + 3])
def test_index_refuses_truncated_records(cut: int) -> None:
    recs = _records(3)[:-cut]
    with pytest.raises(CorruptionError, match="truncated"):
        decode_index(encode_index(["a" * 32], recs), "index/1")


def test_index_refuses_damaged_bytes() -> None:
    data = encode_index(["a" * 32], _records(2))
    with pytest.raises(CorruptionError):
        decode_index(data[: len(data) // 2], "index/1")
    with pytest.raises(CorruptionError):
        decode_index(b"garbage", "index/1")


# -- pack trailers -------------------------------------------------------------------------------


def _pack_records(n: int) -> tuple[list[tuple[bytes, int, int, int, int]], bytes]:
    items = [(bytes([7 * i % 256]) * DIGEST_SIZE, 8 + i * 4096, 4000 + i, MiB, 1) for i in range(n)]
    return items, b"".join(PACK_RECORD.pack(*it) for it in items)


@pytest.mark.parametrize("n", [0, 1, 5])
def test_pack_trailer_round_trip(n: int) -> None:
    items, recs = _pack_records(n)
    trailer = pack_trailer(recs)
    assert trailer.startswith(recs)
    assert trailer.endswith(PACK_FOOTER_MAGIC)
    count, crc = parse_pack_footer(trailer[-PACK_FOOTER.size:], "packs/ab/x")
    assert count == n
    assert crc == zlib.crc32(recs)
    body = trailer[-PACK_FOOTER.size - count * PACK_RECORD.size: -PACK_FOOTER.size]
    assert parse_pack_records(body, crc, "packs/ab/x") == items


@pytest.mark.parametrize("bit", [0, 7, 100, 8 * PACK_RECORD.size * 3 - 1])
def test_pack_records_flipped_bit_caught_by_crc(bit: int) -> None:
    _, recs = _pack_records(3)
    trailer = pack_trailer(recs)
    _, crc = parse_pack_footer(trailer[-PACK_FOOTER.size:], "p")
    damaged = bytearray(recs)
    damaged[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(CorruptionError, match="checksum"):
        parse_pack_records(bytes(damaged), crc, "packs/ab/x")


def test_pack_footer_refuses_truncation_and_bad_magic() -> None:
    _, recs = _pack_records(2)
    footer = pack_trailer(recs)[-PACK_FOOTER.size:]
    with pytest.raises(CorruptionError, match="truncated"):
        parse_pack_footer(footer[1:], "p")
    with pytest.raises(CorruptionError, match="footer"):
        parse_pack_footer(footer[:-1] + b"X", "p")


# -- task statistics -----------------------------------------------------------------------------


def test_task_stats_add_sums_counters_but_not_duration_or_lanes() -> None:
    a = TaskStats(disk_size=10, read_bytes=5, zero_bytes=1, unchanged_bytes=2, new_bytes=3, dedup_bytes=4,
                  compressed_bytes=2, written_bytes=3, blocks_read=6, duration=2.0, source_busy=1.0,
                  proxy_busy=0.5, target_busy=0.25, lanes=2)
    b = TaskStats(disk_size=20, read_bytes=7, zero_bytes=2, unchanged_bytes=1, new_bytes=5, dedup_bytes=1,
                  compressed_bytes=4, written_bytes=6, blocks_read=3, duration=9.0, source_busy=2.0,
                  proxy_busy=1.5, target_busy=0.75, lanes=8)
    a.add(b)
    assert (a.disk_size, a.read_bytes, a.zero_bytes, a.unchanged_bytes) == (30, 12, 3, 3)
    assert (a.new_bytes, a.dedup_bytes, a.compressed_bytes, a.written_bytes, a.blocks_read) == (8, 5, 6, 9, 9)
    assert (a.source_busy, a.proxy_busy, a.target_busy) == (3.0, 2.0, 1.0)
    assert a.duration == 2.0
    assert a.lanes == 2
    # b is untouched
    assert b.read_bytes == 7 and b.duration == 9.0


def test_bottleneck_zero_duration() -> None:
    assert TaskStats(source_busy=5.0).bottleneck() == {"source": 0.0, "proxy": 0.0, "target": 0.0}


def test_bottleneck_divides_source_and_proxy_by_lanes_but_not_target() -> None:
    s = TaskStats(duration=10.0, lanes=4, source_busy=20.0, proxy_busy=8.0, target_busy=5.0)
    b = s.bottleneck()
    assert b["source"] == pytest.approx(0.5)
    assert b["proxy"] == pytest.approx(0.2)
    assert b["target"] == pytest.approx(0.5)


def test_bottleneck_shares_capped_at_one() -> None:
    s = TaskStats(duration=1.0, lanes=1, source_busy=3.0, proxy_busy=2.0, target_busy=7.0)
    assert s.bottleneck() == {"source": 1.0, "proxy": 1.0, "target": 1.0}


def test_bottleneck_lanes_zero_counts_as_one() -> None:
    s = TaskStats(duration=4.0, lanes=0, source_busy=2.0, proxy_busy=1.0)
    assert s.bottleneck()["source"] == pytest.approx(0.5)
    assert s.bottleneck()["proxy"] == pytest.approx(0.25)


@settings(max_examples=100, deadline=None)
@given(
    duration=st.floats(0.001, 1e4),
    lanes=st.integers(1, 16),
    source=st.floats(0, 1e5),
    proxy=st.floats(0, 1e5),
    target=st.floats(0, 1e5),
)
def test_bottleneck_shares_in_unit_interval(duration: float, lanes: int, source: float, proxy: float,
                                            target: float) -> None:
    s = TaskStats(duration=duration, lanes=lanes, source_busy=source, proxy_busy=proxy, target_busy=target)
    b = s.bottleneck()
    assert set(b) == {"source", "proxy", "target"}
    for v in b.values():
        assert 0.0 <= v <= 1.0
    assert b["target"] == pytest.approx(min(1.0, target / duration))
    assert b["source"] == pytest.approx(min(1.0, source / (duration * lanes)))
    assert b["proxy"] == pytest.approx(min(1.0, proxy / (duration * lanes)))

