"""The health record: chunks a verify found damaged, by point, kept in the repository so that
backups re-read (heal) them and restores know what is missing."""

from __future__ import annotations

import msgspec
from blockferry.log import get_logger

log = get_logger()


class DamagedChunk(msgspec.Struct, kw_only=True):
    chunk: str  #: hex id
    pack: str | None  #: the pack holding the bad copy (None: no copy at all)
    reason: str
    found: str  #: when a health check found it


class Health(msgspec.Struct, kw_only=True):
    """What the last health checks found damaged, until a backup stores a good copy."""

    version: int = 1
    checked: str
    damaged: list[DamagedChunk] = []
    points: list[str] = []  #: restore points that use a damaged chunk
