"""End to end: a real ``blockferry daemon`` process, driven by the CLI, stopped by signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MiB, mixed_disk, write_disk

BIN = [sys.executable, "-m", "blockferry"]


class DaemonProc:
    def __init__(self, tmp: Path, *extra: str) -> None:
        self.socket = tmp / "run" / "bf.sock"
        self.state = tmp / "state"
        self.env = {**os.environ, "BLOCKFERRY_SOCKET": str(self.socket)}
        self.args = [*BIN, "daemon", "--socket", str(self.socket), "--state-dir", str(self.state), "-q",
                     "--progress-interval", "0.1", *extra]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProc:
        self.proc = subprocess.Popen(self.args, env=self.env, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.proc.stderr.read().decode()}")  # type: ignore[union-attr]
            if self.socket.exists() and self.cli("status").returncode == 0:
                return self
            time.sleep(0.05)
        raise AssertionError("the daemon did not start")

    def cli(self, *args: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([*BIN, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"{args} exited {p.returncode}: {p.stdout}{p.stderr}")
        return p

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json", check=True).stdout)

    def signal(self, sig: int, timeout: float = 20) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def wait_running(self, job: str, timeout: float = 20) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for run in self.json("status")["scheduler"]["running"]:
                if run["job"] == job and run["progress"] and run["progress"]["done_bytes"] > 0:
                    return int(run["session"])
            time.sleep(0.05)
        raise AssertionError(f"job {job} did not start moving data")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProc]:
    d = DaemonProc(tmp_path).start()
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.signal(signal.SIGTERM)


def test_a_new_user_s_session(tmp_path: Path, daemon: DaemonProc) -> None:
    """What the README walks through: a repository, two proxies of two tasks, a job over two
    disk images, run it, watch it, read its statistics, and a schedule."""
    a, b = mixed_disk(tmp_path / "vm1-disk0.img", 4 * MiB), mixed_disk(tmp_path / "vm1-disk1.img", 4 * MiB, seed=3)
    daemon.cli("repo", "add", "main", str(tmp_path / "repo"), check=True)
    daemon.cli("proxy", "add", "p1", "--max-tasks", "2", check=True)
    daemon.cli("proxy", "add", "p2", "--max-tasks", "2", check=True)
    daemon.cli("job", "add", "vm1", "--repo", "main", "--object", "vm1", str(a), str(b), "--schedule", "daily 22:00",
               check=True)
    jobs = daemon.json("job", "list")
    assert jobs[0]["name"] == "vm1" and jobs[0]["schedule"] == "daily 22:00" and jobs[0]["next_run"]
    assert [p["max_tasks"] for p in daemon.json("proxy", "list")] == [2, 2]
    run = daemon.cli("job", "run", "vm1", "--wait", check=True)
    assert "object vm1: done" in run.stdout and "bottleneck" in run.stdout
    sessions = daemon.json("session", "list")
    assert sessions[0]["state"] == "success" and sessions[0]["objects_done"] == 1 and len(sessions[0]["points"]) == 1
    shown = daemon.json("session", "show", str(sessions[0]["id"]))
    assert {d["name"] for d in shown["result"]["objects"][0]["disks"]} == {"vm1-disk0.img", "vm1-disk1.img"}
    assert shown["result"]["stats"]["bottleneck"]
    text = daemon.cli("session", "list", check=True).stdout
    assert "vm1" in text and "success" in text
    status = daemon.cli("status", check=True).stdout
    assert "proxy p1: 0/2" in status and "job vm1: daily 22:00" in status
    # the embedded one-shot commands still work beside the daemon (between runs the lock is free)
    points = subprocess.run([*BIN, "points", str(tmp_path / "repo"), "--json"], capture_output=True, text=True)
    assert points.returncode == 0 and len(json.loads(points.stdout)) == 1


def test_watch_shows_progress_and_refusals_have_exit_codes(tmp_path: Path, daemon: DaemonProc) -> None:
    disk = write_disk(tmp_path / "big.img", 8 * MiB, [(0, "random", 8 * MiB)])
    daemon.cli("repo", "add", "main", str(tmp_path / "repo"), check=True)
    daemon.cli("proxy", "add", "p", check=True)
    daemon.cli("job", "add", "slow", "--repo", "main", str(disk), "--throttle", "4MiB", check=True)
    bad = daemon.cli("job", "add", "bad", "--repo", "main", str(disk), "--schedule", "sometimes")
    assert bad.returncode == 2 and "schedule:" in bad.stderr
    assert daemon.cli("job", "run", "nosuch").returncode == 2
    daemon.cli("job", "run", "slow", check=True)
    watch = daemon.cli("session", "watch", "--job", "slow")
    assert watch.returncode == 0, watch.stderr
    assert "job slow" in watch.stderr and "%" in watch.stderr  # progress lines
    assert "session 1: job slow (manual) success" in watch.stdout
    no_daemon = subprocess.run([*BIN, "status", "--socket", str(tmp_path / "none.sock")], capture_output=True,
                               text=True)
    assert no_daemon.returncode == 6 and "no blockferry daemon" in no_daemon.stderr


def test_sigterm_mid_job_stops_cleanly(tmp_path: Path, daemon: DaemonProc) -> None:
    disks = [write_disk(tmp_path / f"d{i}.img", 8 * MiB, [(0, "random", 8 * MiB)], seed=i) for i in range(2)]
    daemon.cli("repo", "add", "main", str(tmp_path / "repo"), check=True)
    daemon.cli("proxy", "add", "p", "--max-tasks", "1", check=True)
    daemon.cli("job", "add", "j", "--repo", "main", *map(str, disks), "--throttle", "4MiB", check=True)
    daemon.cli("job", "run", "j", check=True)
    daemon.wait_running("j")
    assert daemon.signal(signal.SIGTERM) == 0
    assert not daemon.socket.exists()
    daemon.start()
    rec = daemon.json("session", "show", "1")
    assert rec["state"] == "stopped" and "shutting down" in rec["note"]
    done = [o["point"] for o in rec["result"]["objects"] if o["point"]]
    points = subprocess.run([*BIN, "points", str(tmp_path / "repo"), "--json"], capture_output=True, text=True)
    assert sorted(p["id"] for p in json.loads(points.stdout)) == sorted(done)  # no half point
    verify = subprocess.run([*BIN, "verify", str(tmp_path / "repo")], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_kill_9_mid_job_then_restart(tmp_path: Path, daemon: DaemonProc) -> None:
    disk = write_disk(tmp_path / "d.img", 8 * MiB, [(0, "random", 8 * MiB)])
    daemon.cli("repo", "add", "main", str(tmp_path / "repo"), check=True)
    daemon.cli("proxy", "add", "p", check=True)
    daemon.cli("job", "add", "j", "--repo", "main", str(disk), "--throttle", "4MiB", check=True)
    daemon.cli("job", "run", "j", check=True)
    sid = daemon.wait_running("j")
    assert daemon.signal(signal.SIGKILL) == -signal.SIGKILL
    daemon.start()  # the stale socket and locks of the dead daemon are no obstacle
    rec = daemon.json("session", "show", str(sid))
    assert rec["state"] == "failed" and "stopped while the session ran" in rec["note"]
    daemon.cli("job", "set", "j", "throttle=0", check=True)
    run = daemon.cli("job", "run", "j", "--wait", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["state"] == "success"
    lines = [json.loads(line) for line in (daemon.state / "daemon.log").read_text().splitlines()]
    assert any(e.get("event") == "session_failed_at_start" and e.get("session") == sid for e in lines)
    # lines of the job's actors carry the job, its session, and the object and disk they are about
    disk_lines = [e for e in lines if e.get("disk") and e.get("session") == sid + 1]
    assert disk_lines and all(e["job"] == "j" and e["object"] == "d" and "actor" in e for e in disk_lines)


def test_a_second_daemon_refuses_and_logs_are_json(tmp_path: Path, daemon: DaemonProc) -> None:
    other = subprocess.run([*BIN, "daemon", "--socket", str(daemon.socket), "--state-dir", str(tmp_path / "s2"), "-q"],
                           capture_output=True, text=True, timeout=30)
    assert other.returncode == 2 and "another blockferry daemon" in other.stderr
    other = subprocess.run([*BIN, "daemon", "--socket", str(tmp_path / "x.sock"), "--state-dir", str(daemon.state),
                            "-q"], capture_output=True, text=True, timeout=30)
    assert other.returncode == 2 and "state directory" in other.stderr
    assert daemon.cli("status").returncode == 0
    log = (daemon.state / "daemon.log").read_text().splitlines()
    started = [json.loads(line) for line in log if '"daemon_started"' in line]
    assert started and started[0]["actor"] == "daemon" and started[0]["level"] == "info"


def test_sighup_reloads_the_seed_file(tmp_path: Path) -> None:
    seed = tmp_path / "seed.toml"
    seed.write_text('[[proxies]]\nname = "a"\n')
    d = DaemonProc(tmp_path, "--config", str(seed)).start()
    try:
        assert [p["name"] for p in d.json("proxy", "list")] == ["a"]
        seed.write_text('[[proxies]]\nname = "a"\n\n[[proxies]]\nname = "b"\nmax_tasks = 2\n')
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while [p["name"] for p in d.json("proxy", "list")] != ["a", "b"]:
            assert time.monotonic() < deadline, "SIGHUP did not reload"
            time.sleep(0.05)
    finally:
        assert d.signal(signal.SIGTERM) == 0


def test_scheduled_run_on_a_manual_clock(tmp_path: Path) -> None:
    disk = mixed_disk(tmp_path / "d.img", MiB)
    d = DaemonProc(tmp_path, "--manual-clock", "2026-01-05T21:59:00+00:00").start()
    try:
        d.cli("repo", "add", "main", str(tmp_path / "repo"), check=True)
        d.cli("job", "add", "nightly", "--repo", "main", str(disk), "--schedule", "daily 22:00", check=True)
        d.cli("proxy", "add", "p", check=True)
        assert d.json("session", "list") == []
        d.cli("clock", "60", check=True)
        deadline = time.monotonic() + 20
        while not (rows := d.json("session", "list")) or rows[0]["state"] == "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert rows[0]["trigger"] == "schedule" and rows[0]["state"] == "success"
    finally:
        assert d.signal(signal.SIGTERM) == 0


def test_lifecycle_jobs_from_the_cli(tmp_path: Path) -> None:
    """Prune, then a chained gc, on a schedule; a verify run by hand; a refused flag named."""
    d = DaemonProc(tmp_path, "--manual-clock", "2026-01-05T21:00:00+00:00").start()
    try:
        disk = tmp_path / "vm.img"
        d.cli("repo", "add", "main", str(tmp_path / "repo"), check=True)
        d.cli("proxy", "add", "p", check=True)
        for seed in (1, 2):
            write_disk(disk, 2 * MiB, [(0, "random", 2 * MiB)], seed=seed)
            if seed == 1:
                d.cli("job", "add", "b", str(disk), "--repo", "main", check=True)
            d.cli("job", "run", "b", "--wait", "-q", check=True)
        bad = d.cli("job", "add", "g", "--type", "gc", "--repo", "main", "--sample", "5")
        assert bad.returncode != 0 and "sample" in bad.stderr and "only verify jobs" in bad.stderr
        d.cli("job", "add", "prune-nightly", "--type", "prune", "--repo", "main", "--keep-last", "1",
              "--schedule", "daily 22:00", check=True)
        d.cli("job", "add", "gc", "--type", "gc", "--repo", "main", "--schedule", "after prune-nightly", check=True)
        d.cli("job", "add", "check", "--type", "verify", "--repo", "main", "--sample", "100", check=True)
        listed = d.cli("job", "list", check=True).stdout
        assert "prune-nightly" in listed and "prune" in listed and "verify" in listed
        d.cli("clock", "3600", check=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            rows = {r["job"]: r for r in d.json("session", "list")}
            if rows.get("gc", {}).get("state") not in (None, "running"):
                break
            time.sleep(0.05)
        assert (rows["prune-nightly"]["kind"], rows["prune-nightly"]["state"]) == ("prune", "success")
        assert (rows["gc"]["kind"], rows["gc"]["trigger"], rows["gc"]["state"]) == ("gc", "chain", "success")
        shown = d.cli("session", "show", str(rows["gc"]["id"]), check=True).stdout
        assert "gc: done:" in shown and "freed" in shown
        out = d.cli("job", "run", "check", "--wait", "-q", check=True).stdout
        assert "verify: checked" in out and "healthy" in out
        assert "prune" in d.cli("session", "list", check=True).stdout
    finally:
        d.signal(signal.SIGTERM)
