"""Changed-extent hints: which parts of a disk changed since its previous restore point.

Two formats are read, told apart by the first non-blank character:

* text: one ``OFFSET LENGTH`` pair of byte counts per line (decimal or ``0x`` hex); blank lines
  and ``#`` comments are ignored;
* JSON: what ``rbd diff --format json`` prints, a list of
  ``{"offset": N, "length": N, "exists": "true"|"false"}`` (both kinds are read again: an extent
  that no longer exists reads back as zeros).
"""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
from blockferry.datapath.extents import Extent, merge
from blockferry.errors import HintError


class _RbdExtent(msgspec.Struct):
    offset: int
    length: int
    exists: str | bool = "true"


_NUMBER = re.compile(r"^-?(0[xX][0-9a-fA-F]+|[0-9]+)$")


def _int(text: str, where: str) -> int:
    """Decimal (zero-padded or not) or 0x hex: what hint-writing tools print."""
    try:
        if not _NUMBER.match(text):
            raise ValueError(text)
        neg = text.startswith("-")
        digits = text.lstrip("-")
        v = int(digits[2:], 16) if digits[:2].lower() == "0x" else int(digits, 10)
        v = -v if neg else v
    except ValueError:
        raise HintError(f"{where}: {text!r} is not a whole number of bytes") from None
    if v < 0:
        raise HintError(f"{where}: {text!r} is negative")
    return v


def parse_hints(data: str, source: str = "hints") -> list[Extent]:
    """Extents from hint text, sorted and merged. HintError names the line of any fault."""
    stripped = data.lstrip()
    extents: list[Extent] = []
    if stripped.startswith("["):
        try:
            items = msgspec.json.decode(stripped.encode(), type=list[_RbdExtent])
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise HintError(f"{source}: not valid rbd diff JSON ({exc})") from None
        for i, it in enumerate(items):
            if it.offset < 0 or it.length < 0:
                raise HintError(f"{source}: entry {i} has a negative offset or length")
            extents.append((it.offset, it.length))
    else:
        for lineno, line in enumerate(data.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            where = f"{source} line {lineno}"
            if len(parts) != 2:
                raise HintError(f"{where}: expected 'OFFSET LENGTH', got {line!r}")
            extents.append((_int(parts[0], where), _int(parts[1], where)))
    return merge(extents)


#: the largest hint file read (a few million extents); more is not a hint file (``/dev/zero``
#: would otherwise be read until memory runs out)
MAX_HINT_BYTES = 256 << 20


def load_hints(path: str | Path) -> list[Extent]:
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_HINT_BYTES + 1)
        if len(raw) > MAX_HINT_BYTES:
            raise HintError(f"hint file {p} is larger than {MAX_HINT_BYTES >> 20} MiB: not a hint file")
        data = raw.decode()
    except FileNotFoundError:
        raise HintError(f"hint file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HintError(f"hint file {p} cannot be read ({exc})") from None
    return parse_hints(data, str(p))


def check_within(extents: list[Extent], size: int, source: str) -> None:
    for off, n in extents:
        if off + n > size:
            raise HintError(
                f"{source}: changed extent {off}+{n} ends beyond the disk ({size} bytes); "
                "are these hints for this disk?"
            )
