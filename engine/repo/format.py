"""Repository format v1: the bytes a repository holds, and nothing about how they move.

Keys in the backend (see docs/format.md for the whole description):

* ``config`` — :class:`RepositoryConfig` as JSON, written once by ``init``.
* ``packs/XX/<32 hex>`` — pack files: a header, compressed chunks back to back, a trailer that
  lists the chunks (so the index can be rebuilt from packs alone), a footer.
* ``index/<32 hex>`` — index deltas: which chunk is where, for the packs sealed before a commit.
* ``points/<16 hex>`` — one manifest per restore point: for each disk, the chunk id of every block.
* ``locks/writer`` — the writer lock.

Chunk ids are BLAKE3-256 of the uncompressed block. A hole (an all-zero block) is stored as the
id of 32 zero bytes and takes no space.
"""

from __future__ import annotations

import datetime as _dt
import os
import struct
import zlib
from typing import Any

import msgspec
import zstandard
from blockferry.errors import ConfigError, CorruptionError, NotFoundError, UnsupportedFormatError
from blockferry.units import KiB, MiB

FORMAT_NAME = "blockferry-repository"
FORMAT_VERSION = 1
HASH_NAME = "blake3"
DIGEST_SIZE = 32
HOLE = bytes(DIGEST_SIZE)

MIN_BLOCK_SIZE = 256 * KiB
MAX_BLOCK_SIZE = 8 * MiB
DEFAULT_BLOCK_SIZE = 1 * MiB
DEFAULT_PACK_SIZE = 32 * MiB

#: named compression levels and the zstd level each maps to (None: stored as is). "default" is
#: zstd 3, the level borg and restic's "auto" aim at; "fast" trades ~2 % size for ~1.5x speed.
COMPRESSION_LEVELS: dict[str, int | None] = {"none": None, "fast": 1, "default": 3, "high": 9}

#: chunk flag: the stored bytes are a zstd frame (else the raw block)
FLAG_ZSTD = 1


def check_block_size(block_size: int) -> int:
    if (
        not isinstance(block_size, int)
        or block_size < MIN_BLOCK_SIZE
        or block_size > MAX_BLOCK_SIZE
        or block_size & (block_size - 1)
    ):
        raise ConfigError(
            f"block size {block_size} is not allowed: use a power of two from 256 KiB to 8 MiB (e.g. 1MiB)"
        )
    return block_size


def check_compression(name: str) -> str:
    if name not in COMPRESSION_LEVELS:
        raise ConfigError(f"unknown compression {name!r}: use one of {', '.join(COMPRESSION_LEVELS)}")
    return name


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def new_id(nbytes: int = 16) -> str:
    return os.urandom(nbytes).hex()  # (secrets.token_hex is the same, but imports hmac and OpenSSL)


class RepositoryConfig(msgspec.Struct, frozen=True, kw_only=True):
    """What ``init`` fixes for the life of a repository."""

    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION
    id: str
    created: str
    block_size: int
    compression: str
    hash: str = HASH_NAME
    pack_size: int = DEFAULT_PACK_SIZE
    #: every point stays immutable at least this many days
    immutable_days: int | None = None

    @property
    def zstd_level(self) -> int | None:
        return COMPRESSION_LEVELS[self.compression]


def encode_config(cfg: RepositoryConfig) -> bytes:
    return msgspec.json.format(msgspec.json.encode(cfg), indent=2) + b"\n"


def decode_config(data: bytes, where: str) -> RepositoryConfig:
    try:
        raw = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise CorruptionError(f"{where}: config is not valid JSON ({exc})") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("format"), str):
        raise CorruptionError(f"{where}: config is damaged (no format name)")
    if raw["format"] != FORMAT_NAME:  # another program's repository
        raise UnsupportedFormatError(f"{where}: not a blockferry repository config (format {raw['format']!r})")
    if raw.get("version") != FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"{where}: repository format version {raw.get('version')!r} is not supported by this "
            f"blockferry (it reads version {FORMAT_VERSION})"
        )
    try:
        cfg = msgspec.convert(raw, RepositoryConfig)
    except msgspec.ValidationError as exc:
        raise CorruptionError(f"{where}: config is damaged ({exc})") from exc
    if cfg.hash != HASH_NAME:
        raise UnsupportedFormatError(f"{where}: hash {cfg.hash!r} is not supported")
    try:  # init allows neither: the file was damaged or edited since
        check_block_size(cfg.block_size)
        check_compression(cfg.compression)
    except ConfigError as exc:
        raise CorruptionError(f"{where}: config is damaged ({exc})") from None
    return cfg


# -- statistics --------------------------------------------------------------------------------


class TaskStats(msgspec.Struct, kw_only=True):
    """What one task (one disk) did. Bytes are raw (uncompressed) unless the name says otherwise;
    times are seconds."""

    disk_size: int = 0
    read_bytes: int = 0  #: read from the source
    zero_bytes: int = 0  #: in all-zero blocks or holes: never hashed, compressed or stored
    unchanged_bytes: int = 0  #: not read because the hints said unchanged (taken from the base)
    new_bytes: int = 0  #: in blocks stored anew
    dedup_bytes: int = 0  #: in non-zero blocks the repository already had
    compressed_bytes: int = 0  #: new_bytes after compression
    written_bytes: int = 0  #: written to the repository for this task (payload and pack framing)
    blocks_read: int = 0
    duration: float = 0.0
    source_busy: float = 0.0  #: time reading the source, summed over lanes
    proxy_busy: float = 0.0  #: time hashing and compressing, summed over lanes
    target_busy: float = 0.0  #: time writing to the repository
    lanes: int = 1  #: parallel read/process lanes of the task

    @property
    def processed_bytes(self) -> int:
        return self.read_bytes + self.unchanged_bytes + (self.zero_bytes if self.read_bytes == 0 else 0)

    def rate(self) -> float:
        """Bytes of disk covered per second."""
        return self.disk_size / self.duration if self.duration > 0 else 0.0

    def bottleneck(self) -> dict[str, float]:
        """Share of the task's time each stage was busy (1.0 = saturated), as backup products
        report it: ``source`` reading, ``proxy`` hashing and compressing, ``target`` writing."""
        if self.duration <= 0:
            return {"source": 0.0, "proxy": 0.0, "target": 0.0}
        lanes = max(1, self.lanes)
        return {
            "source": min(1.0, self.source_busy / (self.duration * lanes)),
            "proxy": min(1.0, self.proxy_busy / (self.duration * lanes)),
            "target": min(1.0, self.target_busy / self.duration),
        }

    def add(self, other: TaskStats) -> None:
        for f in self.__struct_fields__:
            if f not in ("duration", "lanes"):
                setattr(self, f, getattr(self, f) + getattr(other, f))


def stats_dict(st: TaskStats) -> dict[str, Any]:
    d = msgspec.to_builtins(st)
    d["rate"] = st.rate()
    d["bottleneck"] = st.bottleneck()
    return d


# -- restore points ----------------------------------------------------------------------------


class DiskRecord(msgspec.Struct, kw_only=True):
    """One disk of a restore point: its full block map and where it came from."""

    name: str
    size: int
    source: str
    identity: dict[str, str] = {}
    metadata: dict[str, Any] = {}
    change_id: str | None = None
    base: str | None = None  #: point whose map this one started from (incrementals)
    hinted: bool = False  #: only hinted extents were read
    stats: TaskStats = msgspec.field(default_factory=TaskStats)
    blocks: bytes = b""  #: DIGEST_SIZE bytes per block, HOLE for zero blocks

    def block_count(self, block_size: int) -> int:
        return -(-self.size // block_size)


class Manifest(msgspec.Struct, kw_only=True):
    """A restore point: every disk of one object (a VM) at one moment, each a full map."""

    version: int = FORMAT_VERSION
    id: str
    object: str
    created: str
    block_size: int
    hash: str = HASH_NAME
    job: str | None = None
    disks: list[DiskRecord]
    stats: TaskStats = msgspec.field(default_factory=TaskStats)
    duration: float = 0.0
    #: until then (ISO 8601, UTC) neither retention, garbage collection nor a delete removes
    #: this point or its chunks
    immutable_until: str | None = None

    def disk(self, name: str) -> DiskRecord:
        for d in self.disks:
            if d.name == name:
                return d
        raise NotFoundError(f"point {self.id} has no disk {name!r} (it has: {', '.join(d.name for d in self.disks)})")


def new_point_id() -> str:
    return new_id(8)


_manifest_encoder = msgspec.msgpack.Encoder()
_manifest_decoder = msgspec.msgpack.Decoder(Manifest)


def _zc() -> zstandard.ZstdCompressor:
    return zstandard.ZstdCompressor(level=3, write_checksum=True)


def encode_manifest(m: Manifest) -> bytes:
    return _zc().compress(_manifest_encoder.encode(m))


def _unzstd(data: bytes, what: str) -> bytes:
    try:
        return zstandard.ZstdDecompressor().decompress(data)
    except zstandard.ZstdError as exc:
        raise CorruptionError(f"{what} is damaged ({exc})") from exc


def decode_manifest_as(data: bytes, what: str, kind: type[Any]) -> Any:
    """Decode a manifest into ``kind``, a struct with a subset of Manifest's fields (msgspec skips
    the rest, block maps included, without building them)."""
    raw = _unzstd(data, what)
    try:
        m = msgspec.msgpack.decode(raw, type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise CorruptionError(f"{what} is damaged ({exc})") from exc
    if m.version != FORMAT_VERSION:
        raise UnsupportedFormatError(f"{what} has format version {m.version}, this blockferry reads {FORMAT_VERSION}")
    return m


def decode_manifest(data: bytes, what: str) -> Manifest:
    raw = _unzstd(data, what)
    try:
        m = _manifest_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise CorruptionError(f"{what} is damaged ({exc})") from exc
    if m.version != FORMAT_VERSION:
        raise UnsupportedFormatError(f"{what} has format version {m.version}, this blockferry reads {FORMAT_VERSION}")
    try:
        check_block_size(m.block_size)
    except ConfigError:
        raise CorruptionError(f"{what}: block size {m.block_size} is not valid") from None
    for d in m.disks:
        if len(d.blocks) != d.block_count(m.block_size) * DIGEST_SIZE:
            raise CorruptionError(f"{what}: block map of disk {d.name} has the wrong length")
    return m


# -- chunk locations and the index -------------------------------------------------------------
#
# In memory a chunk's place is one int (the index of a repository holds millions of them, and a
# tuple of five ints costs three times as much): flags 4 bits, raw length 24, stored length 24,
# offset in the pack 32, then the pack's number in the store's pack table.

_M24 = (1 << 24) - 1
_M32 = (1 << 32) - 1


def pack_loc(pack_no: int, offset: int, length: int, raw_len: int, flags: int) -> int:
    # raw and stored lengths are at most MAX_BLOCK_SIZE (8 MiB = 2**23), so they fit 24 bits
    return flags | raw_len << 4 | length << 28 | offset << 52 | pack_no << 84


def unpack_loc(loc: int) -> tuple[int, int, int, int, int]:
    """(pack_no, offset, length, raw_len, flags)."""
    return loc >> 84, (loc >> 52) & _M32, (loc >> 28) & _M24, (loc >> 4) & _M24, loc & 15


INDEX_RECORD = struct.Struct("<32sIIIIB")  # digest, pack_no, offset, length, raw_len, flags


class IndexFile(msgspec.Struct, kw_only=True):
    version: int = FORMAT_VERSION
    packs: list[str]
    records: bytes  #: INDEX_RECORD.size bytes per chunk; pack_no indexes ``packs``


def encode_index(packs: list[str], records: bytes) -> bytes:
    return _zc().compress(msgspec.msgpack.encode(IndexFile(packs=packs, records=records)))


def decode_index(data: bytes, what: str) -> IndexFile:
    raw = _unzstd(data, what)
    try:
        f = msgspec.msgpack.decode(raw, type=IndexFile)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise CorruptionError(f"{what} is damaged ({exc})") from exc
    if f.version != FORMAT_VERSION:
        raise UnsupportedFormatError(f"{what} has format version {f.version}")
    if len(f.records) % INDEX_RECORD.size:
        raise CorruptionError(f"{what} is damaged (truncated records)")
    return f


# -- packs ---------------------------------------------------------------------------------------

PACK_HEADER = b"BFPACK01"
PACK_RECORD = struct.Struct("<32sIIIB")  # digest, offset, length, raw_len, flags
PACK_FOOTER = struct.Struct("<II8s")  # record count, crc32 of the records, magic
PACK_FOOTER_MAGIC = b"BFPKEND1"


def pack_trailer(records: bytes) -> bytes:
    """The records followed by the footer that closes a pack."""
    return records + PACK_FOOTER.pack(len(records) // PACK_RECORD.size, zlib.crc32(records), PACK_FOOTER_MAGIC)


def parse_pack_footer(footer: bytes, what: str) -> tuple[int, int]:
    """(record count, crc) from the last PACK_FOOTER.size bytes of a pack."""
    if len(footer) != PACK_FOOTER.size:
        raise CorruptionError(f"{what} is truncated")
    n, crc, magic = PACK_FOOTER.unpack(footer)
    if magic != PACK_FOOTER_MAGIC:
        raise CorruptionError(f"{what} has no valid footer")
    return n, crc


def parse_pack_records(records: bytes, crc: int, what: str) -> list[tuple[bytes, int, int, int, int]]:
    if zlib.crc32(records) != crc:
        raise CorruptionError(f"{what}: chunk list fails its checksum")
    return list(PACK_RECORD.iter_unpack(records))
