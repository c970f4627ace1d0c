"""Reading a pack's own description of itself, whole or damaged.

A pack is ``header | chunks | records | footer`` (docs/format.md). :func:`read_trailer` returns
its records and says whether the pack's frame is whole: the header magic, the footer (magic,
count, checksum of the records) and records that tile the data from the header to the records
exactly, so that every byte of the pack is covered by some check (each chunk's bytes by its id).

When the frame is damaged, the records are still recovered where they can be: from the
footer's count while the records themselves fail their checksum, or, when the footer is
damaged, by looking back from the end for a run of records that tiles the data. The chunks are
self-verifying (a chunk's id is the hash of its block), so whoever uses recovered records keeps
only the chunks that decode to their id (:func:`check_chunks`).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import msgspec
import zstandard
from blockferry.errors import CorruptionError
from blockferry.repo.backend import Backend
from blockferry.repo.chunks import decode_chunk, decompressor, digest
from blockferry.repo.format import (
    FLAG_ZSTD,
    PACK_FOOTER,
    PACK_FOOTER_MAGIC,
    PACK_HEADER,
    PACK_RECORD,
)

#: a record: digest, offset, stored length, raw length, flags
Record = tuple[bytes, int, int, int, int]

#: how far back from the end a damaged footer's records are looked for (bytes): 64 Ki records
SCAN_BACK = PACK_FOOTER.size + PACK_RECORD.size * 65536

#: largest single read while checking chunks (bytes)
READ_SPAN = 8 << 20


class PackFrame(msgspec.Struct, kw_only=True):
    """What a pack says about itself."""

    records: list[Record]
    #: None: the header, footer and records are whole and tile the pack; else what is wrong
    problem: str | None = None
    #: where the records start (the end of the chunk data), as far as it is known
    data_end: int = 0

    @property
    def complete(self) -> bool:
        """Whether the records account for every byte of chunk data (always, for a whole
        frame): a damaged pack whose records do not may hold chunks nobody can name any more."""
        return self.problem is None or accounts(covering(self.records), self.data_end)


def tiles(records: list[Record], data_end: int) -> bool:
    """Whether the records' chunks lie back to back from the header to ``data_end``."""
    pos = len(PACK_HEADER)
    for _, off, n, _, _ in records:
        if off != pos or n <= 0:
            return False
        pos += n
    return pos == data_end


def accounts(records: Iterable[Record], end: int) -> bool:
    """Whether ``records`` (one per offset) lie back to back from the header and reach ``end``
    at least: every byte of chunk data up to there belongs to a known record."""
    pos = len(PACK_HEADER)
    for _, off, n, _, _ in sorted(records, key=lambda r: r[1]):
        if off != pos or n <= 0:
            return False
        pos += n
    return pos >= end


def _plausible(records: Iterable[Record], data_end: int) -> list[Record]:
    return [r for r in records if r[1] >= len(PACK_HEADER) and r[2] > 0 and r[1] + r[2] <= data_end]


def scan_back(tail: bytes, size: int) -> tuple[list[Record], int] | None:
    """Records ending just before a (damaged) footer that tile the data from the header: the run
    found looking back from the end of ``tail`` (the last bytes of a pack of ``size`` bytes)."""
    base = size - len(tail)
    end = len(tail) - PACK_FOOTER.size
    n = 1
    while end - n * PACK_RECORD.size >= 0:
        start = end - n * PACK_RECORD.size
        if base + start < len(PACK_HEADER):
            break
        _, off, _, _, _ = PACK_RECORD.unpack_from(tail, start)
        if off == len(PACK_HEADER):
            recs = list(PACK_RECORD.iter_unpack(tail[start:end]))
            if tiles(recs, base + start):
                return recs, base + start
        n += 1
    return None


async def read_trailer(backend: Backend, key: str, size: int) -> PackFrame:
    """The records of pack ``key`` (``size`` bytes) and whether its frame is whole (see the
    module's description). Read errors (RepositoryError, NotFoundError) propagate: an unreadable
    pack is not a damaged one."""
    if size < len(PACK_HEADER) + PACK_FOOTER.size:
        return PackFrame(records=[], problem=f"{key} is truncated ({size} bytes)")
    problems: list[str] = []
    header = await backend.get(key, 0, len(PACK_HEADER))
    if header != PACK_HEADER:
        problems.append("its header is damaged")
    footer = await backend.get(key, size - PACK_FOOTER.size, PACK_FOOTER.size)
    n, crc, magic = PACK_FOOTER.unpack(footer)
    start = size - PACK_FOOTER.size - n * PACK_RECORD.size
    if magic == PACK_FOOTER_MAGIC and start >= len(PACK_HEADER):
        raw = await backend.get(key, start, n * PACK_RECORD.size)
        recs = list(PACK_RECORD.iter_unpack(raw))
        if zlib.crc32(raw) != crc:
            problems.append("its chunk list fails its checksum")
        elif not tiles(recs, start):
            problems.append("its chunk list does not match its data")
        if not problems:
            return PackFrame(records=recs, data_end=start)
        if problems == ["its header is damaged"]:  # the records are whole: only the magic is gone
            return PackFrame(records=recs, problem=problems[0], data_end=start)
        # a damaged record, or a count that is wrong: the others still hold, and a run that
        # tiles may be found looking back from the end
        found = _plausible(recs, start)
        more = await _scan(backend, key, size)
        if more is not None:
            found = sorted(set(found) | set(more[0]), key=lambda r: r[1])
        return PackFrame(records=found, problem="; ".join(problems), data_end=start)
    problems.append("its footer is damaged")
    more = await _scan(backend, key, size)
    if more is None:
        return PackFrame(records=[], problem="; ".join(problems), data_end=size)
    return PackFrame(records=more[0], problem="; ".join(problems), data_end=more[1])


async def _scan(backend: Backend, key: str, size: int) -> tuple[list[Record], int] | None:
    tail_len = min(size, SCAN_BACK)
    tail = await backend.get(key, size - tail_len, tail_len)
    return scan_back(tail, size)


def check_chunks(stored: bytes | memoryview, base: int, items: Iterable[Record]) -> tuple[list[Record], list[tuple[Record, str]]]:
    """Split ``items`` (whose bytes lie in ``stored``, read from offset ``base``) into those
    that decode to their id and those that do not (with the reason)."""
    good: list[Record] = []
    bad: list[tuple[Record, str]] = []
    view = memoryview(stored)
    for rec in items:
        digest, off, n, raw_len, flags = rec
        chunk = view[off - base: off - base + n]
        if len(chunk) != n:
            bad.append((rec, "the pack is truncated"))
            continue
        try:
            decode_chunk(chunk, raw_len, flags, digest)
        except CorruptionError as exc:
            bad.append((rec, str(exc)))
        else:
            good.append(rec)
    return good, bad


def spans(items: list[Record], limit: int = READ_SPAN) -> list[list[Record]]:
    """``items`` sorted by offset, grouped into reads of at most ``limit`` bytes (one item may be
    longer on its own)."""
    out: list[list[Record]] = []
    for it in sorted(items, key=lambda r: (r[1], r[2])):
        if not out or it[1] + it[2] - out[-1][0][1] > limit:
            out.append([])
        out[-1].append(it)
    return out


async def read_span(backend: Backend, key: str, span: list[Record]) -> tuple[int, bytes]:
    """(offset, bytes) covering the chunks of ``span`` (a truncated pack gives fewer bytes)."""
    base = span[0][1]
    end = max(r[1] + r[2] for r in span)
    return base, await backend.get(key, base, end - base)


def content_id(stored: bytes | memoryview, raw_len: int, flags: int) -> bytes | None:
    """The id of the block a stored chunk holds (the hash of what it decodes to), when its
    record's id was damaged; None if it does not decode to ``raw_len`` bytes."""
    if flags & FLAG_ZSTD:
        try:
            data = decompressor().decompress(stored, max_output_size=raw_len)
        except zstandard.ZstdError:
            return None
    else:
        data = bytes(stored)
    return digest(data) if len(data) == raw_len and raw_len > 0 else None


def covering(records: Iterable[Record]) -> list[Record]:
    """One record per offset (the first seen), by offset."""
    by_off: dict[int, Record] = {}
    for r in records:
        by_off.setdefault(r[1], r)
    return [by_off[k] for k in sorted(by_off)]


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def scan_chunks(data: bytes | memoryview, end: int, known: Iterable[Record], block_size: int,
                tails: set[int], live: set[bytes]) -> list[Record]:
    """Chunks of a pack whose records are gone, found by walking its data from the header
    (``data`` is the pack from offset 0, ``end`` where its chunk data ends at most): a known
    record is stepped over; a zstd frame is self-delimiting; a raw chunk is a block
    (``block_size``, or a disk's last, shorter block: ``tails``). A chunk found is named by what
    it decodes to and kept when a point uses it (``live``). The walk stops where nothing fits."""
    view = memoryview(data)
    at = {r[1]: r for r in known}
    end = min(end, len(view))
    pos = len(PACK_HEADER)
    found: list[Record] = []
    while pos < end:
        rec = at.get(pos)
        if rec is not None and rec[2] > 0:
            pos += rec[2]
            continue
        if bytes(view[pos:pos + 4]) == ZSTD_MAGIC:
            d = zstandard.ZstdDecompressor().decompressobj()
            piece = view[pos:min(end, pos + block_size + 4096)]
            try:
                out = d.decompress(piece)
            except zstandard.ZstdError:
                out = b""
            if out and getattr(d, "eof", True):
                n = len(piece) - len(d.unused_data)
                cid = digest(out)
                if cid in live:
                    found.append((cid, pos, n, len(out), FLAG_ZSTD))
                pos += n
                continue
        for n in (block_size, *sorted(tails, reverse=True)):
            if 0 < n and pos + n <= end and (cid := digest(view[pos:pos + n])) in live:
                found.append((cid, pos, n, n, 0))
                pos += n
                break
        else:
            break
    return found
