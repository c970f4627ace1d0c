"""Process liveness on this host (engine/processes.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from blockferry.processes import pid_alive, process_start


def test_a_live_process_and_a_gone_one() -> None:
    assert pid_alive(os.getpid())
    assert process_start(os.getpid()) != ""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not pid_alive(child.pid)  # reaped: the pid names nothing now
    assert process_start(child.pid) == ""


def test_a_process_of_another_user_counts_as_alive() -> None:
    assert pid_alive(1)  # init: alive whoever asks (EPERM for a non-root caller)
