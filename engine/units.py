"""Quantities shared by every layer: binary size units, parsing sizes, formatting them for people,
and the annotated number types that configuration structs validate with."""

from __future__ import annotations

import math
from typing import Annotated

import msgspec
from blockferry.errors import ConfigError

KiB = 1 << 10


MiB = 1 << 20


GiB = 1 << 30

def parse_size(text: str | int) -> int:
    """``1MiB``, ``256k``, ``4M`` or plain bytes to bytes (binary units)."""
    if isinstance(text, int):
        return text
    t = text.strip().lower().replace(" ", "")
    units = {"": 1, "b": 1, "k": KiB, "kb": KiB, "kib": KiB, "m": MiB, "mb": MiB, "mib": MiB, "g": GiB, "gb": GiB,
             "gib": GiB, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}
    num = t.rstrip("kmgtib")
    try:
        value = float(num) * units[t[len(num):]]
    except (KeyError, ValueError):
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"not a size: {text!r} (examples: 1MiB, 256KiB, 4194304)")
    return int(value)


Positive = Annotated[int, msgspec.Meta(ge=1)]


NonNegative = Annotated[int, msgspec.Meta(ge=0)]


Seconds = Annotated[float, msgspec.Meta(ge=0)]


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
