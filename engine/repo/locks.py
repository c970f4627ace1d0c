"""Repository locks: who holds one (host, pid and the process's start time) and whether that
holder is still alive, so a lock left by a killed process on this host can be broken safely."""

from __future__ import annotations

import os

import msgspec
from blockferry.log import get_logger

log = get_logger()


class LockInfo(msgspec.Struct, kw_only=True):
    host: str
    pid: int
    pid_start: str
    created: str
    purpose: str


def process_start(pid: int) -> str:
    """Start time of a process (tells a live lock holder from a reused pid); '' if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[19].decode()
    except (OSError, IndexError):
        return ""


def holder_alive(info: LockInfo) -> bool:
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not info.pid_start or process_start(info.pid) in ("", info.pid_start)
