"""Logging: structlog with bound context, loaded only when something is emitted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import MiB, mixed_disk


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_quiet_runs_never_load_structlog() -> None:
    p = run(
        "import sys, blockferry.log as L\n"
        "L.quiet_cli_defaults('warning')\n"
        "log = L.get_logger(actor='a').bind(job='j')\n"
        "log.info('ignored', x=1)\n"
        "print('structlog' in sys.modules)\n"
        "log.warning('shown', x=2)\n"
        "print('structlog' in sys.modules)\n"
    )
    assert p.stdout.split() == ["False", "True"]
    assert "shown" in p.stderr and "x=2" in p.stderr and "job=j" in p.stderr and "ignored" not in p.stderr


def test_embedded_use_gets_a_quiet_default_and_keeps_an_existing_configuration() -> None:
    p = run(
        "import blockferry.log as L\n"
        "log = L.get_logger(actor='a')\n"
        "log.info('hidden')\n"
        "log.warning('visible')\n"
    )
    assert "visible" in p.stderr and "hidden" not in p.stderr
    p = run(
        "import structlog, blockferry.log as L\n"
        "structlog.configure(processors=[structlog.processors.JSONRenderer()])\n"
        "L.get_logger(actor='a').info('mine', k=3)\n"
    )
    assert json.loads(p.stdout) == {"actor": "a", "k": 3, "event": "mine"}


def test_verbose_cli_logs_json_lines_with_bound_fields(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    img = mixed_disk(tmp_path / "d.img", MiB)
    subprocess.run([sys.executable, "-m", "blockferry", "init", str(repo)], check=True, capture_output=True)
    p = subprocess.run([sys.executable, "-m", "blockferry", "-v", "--log-json", "backup", str(repo), str(img),
                        "--name", "vm", "-q"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    events = [json.loads(line) for line in p.stderr.splitlines() if line.startswith("{")]
    done = [e for e in events if e["event"] == "task_done"]
    assert done and done[0]["job"] == "backup vm" and done[0]["disk"] == "d.img" and done[0]["object"] == "vm"
    assert any(e["event"] == "point_committed" and e["level"] == "info" for e in events)
