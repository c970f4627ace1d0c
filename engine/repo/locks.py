"""Repository locks: who holds one (host, pid and the process's start time) and whether that
holder is still alive, so a lock left by a killed process on this host can be broken safely."""

from __future__ import annotations

import msgspec
from blockferry.log import get_logger
from blockferry.processes import pid_alive, process_start

log = get_logger()


class LockInfo(msgspec.Struct, kw_only=True):
    host: str
    pid: int
    pid_start: str
    created: str
    purpose: str


def holder_alive(info: LockInfo) -> bool:
    if not pid_alive(info.pid):
        return False
    return not info.pid_start or process_start(info.pid) in ("", info.pid_start)
