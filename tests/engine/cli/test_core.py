"""The ``blockferry`` command as a user runs it: output, --json, exit codes."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MiB, mixed_disk, same_file


def bf(*args: str, check: int | None = 0) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-m", "blockferry", *args], capture_output=True, text=True, timeout=120)
    if check is not None:
        assert p.returncode == check, (p.returncode, p.stdout, p.stderr)
    return p


def test_the_whole_cycle(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    a = mixed_disk(tmp_path / "a.img", 4 * MiB, seed=1)
    b = mixed_disk(tmp_path / "b.img", 4 * MiB, seed=2)
    out = bf("init", str(repo), "--block-size", "256KiB", "--compression", "fast").stdout
    assert "created repository" in out and "256.0 KiB" in out

    r = bf("backup", str(repo), str(a), str(b), "--name", "vm1")
    assert "vm1: restore point" in r.stdout and "bottleneck" in r.stdout and "session success" in r.stdout
    # not a terminal: progress comes as plain lines on stderr
    assert "vm1/a.img: running on proxy local" in r.stderr

    with open(b, "r+b") as f:
        f.seek(MiB)
        f.write(b"x" * 100)
    hints = tmp_path / "b.hints"
    hints.write_text(f"{MiB} 100\n")
    r = bf("backup", str(repo), str(a), str(b), "--name", "vm1", "--changed-extents", f"{b}={hints}", "--json")
    session = json.loads(r.stdout)
    assert session["state"] == "success"
    disk_b = session["objects"][0]["disks"][1]
    assert disk_b["plan"].startswith("incremental") and disk_b["stats"]["read_bytes"] == 256 * 1024
    assert set(disk_b["stats"]["bottleneck"]) == {"source", "proxy", "target"}

    points = json.loads(bf("points", str(repo), "--json").stdout)
    assert len(points) == 2 and points[1]["id"] == session["objects"][0]["point"]
    listing = bf("points", str(repo)).stdout
    assert "incremental" in listing and points[0]["id"] in listing

    bf("restore", str(repo), "latest", "--to", str(tmp_path / "out"), "--disk", "b.img")
    assert same_file(tmp_path / "out" / "b.img", b) and not (tmp_path / "out" / "a.img").exists()
    r = bf("restore", str(repo), points[0]["id"][:6], "--to", str(tmp_path / "old"), "--json")
    assert {x["disk"] for x in json.loads(r.stdout)} == {"a.img", "b.img"}
    assert same_file(tmp_path / "old" / "a.img", a)

    v = json.loads(bf("verify", str(repo), "--json").stdout)
    assert v["healthy"] and v["points"] == 2

    # damage a pack: verify says so, with exit code 3
    pack = next(p for p in (repo / "packs").rglob("*") if p.is_file())
    data = bytearray(pack.read_bytes())
    data[100] ^= 1
    pack.write_bytes(bytes(data))
    r = bf("verify", str(repo), check=3)
    assert "DAMAGED" in r.stdout and "affects point" in r.stdout


@pytest.mark.parametrize("args,code,message", [
    (["points", "{tmp}"], 2, "not a blockferry repository"),
    (["backup", "{repo}", "{tmp}/missing.img"], 2, "missing.img"),
    (["init", "{tmp}/r2", "--block-size", "100k"], 2, "256 KiB to 8 MiB"),
    (["restore", "{repo}", "latest", "--to", "{tmp}/o"], 2, "no restore points"),
    (["restore", "{repo}", "latest"], 2, "--to"),
    (["backup", "{repo}", "{tmp}/a.img", "--changed-extents", "nonsense"], 2, "SOURCE=FILE"),
])
def test_bad_input_gives_a_clear_error(tmp_path: Path, args: list[str], code: int, message: str) -> None:
    repo = tmp_path / "repo"
    bf("init", str(repo))
    mixed_disk(tmp_path / "a.img", MiB)
    r = bf(*[a.format(tmp=tmp_path, repo=repo) for a in args], check=code)
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_locked_repository_exit_code(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    bf("init", str(repo))
    img = mixed_disk(tmp_path / "a.img", MiB)
    (repo / "locks").mkdir()
    # a lock held by a live process on another host cannot be judged stale
    (repo / "locks" / "writer").write_text(json.dumps(
        {"host": "elsewhere", "pid": 1, "pid_start": "", "created": "2026-01-01", "purpose": "backup"}))
    r = bf("backup", str(repo), str(img), check=4)
    assert "locked by pid 1 on elsewhere" in r.stderr and "blockferry unlock" in r.stderr
    r = bf("unlock", str(repo))
    assert "removed the lock" in r.stdout
    bf("backup", str(repo), str(img))


def test_demo(tmp_path: Path) -> None:
    r = bf("demo", str(tmp_path / "demo"), "--size", "8MiB")
    assert "demo passed" in r.stdout and "bit-exact" in r.stdout


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_the_command_table_lists_what_each_module_adds() -> None:
    """A command the table misses would be unknown when it is the one being run."""
    from blockferry.cli.core import COMMAND_MODULES, CORE_COMMANDS, _Unbuilt, build_parser

    for module, names in COMMAND_MODULES.items():
        added: list[str] = []

        def record(name: str, fn: object, help: str) -> _Unbuilt:
            added.append(name)
            return _Unbuilt()

        importlib.import_module(module).register(record)
        assert tuple(added) == names, module
    every = set(CORE_COMMANDS).union(*COMMAND_MODULES.values())
    assert set(_commands(build_parser())) == every


@pytest.mark.parametrize("argv, command", [
    (["backup", "repo", "disk.img"], "backup"),
    (["-v", "--async-backend", "trio", "gc", "repo"], "gc"),
    (["--log-json", "-vv", "repo", "list"], "repo"),
    (["--async-backend=trio", "restore-image", "r", "p"], "restore-image"),
    (["nonsense", "x"], None),
    (["--help"], None),
    ([], None),
])
def test_only_the_command_being_run_is_built(argv: list[str], command: str | None) -> None:
    from blockferry.cli.core import build_parser, command_in

    assert command_in(argv) == command
    if command is not None:
        assert list(_commands(build_parser(command))) == [command]


def test_a_command_parses_the_same_alone_as_in_the_whole_parser() -> None:
    from blockferry.cli.core import build_parser

    argv = ["-v", "backup", "repo", "a.img", "b.img", "--name", "vm", "--changed-extents", "a.img=h", "-q"]
    whole = vars(build_parser().parse_args(argv))
    alone = vars(build_parser("backup").parse_args(argv))
    assert whole == alone and alone["changed_extents"] == ["a.img=h"]


def test_an_unknown_command_still_lists_them_all(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "blockferry", "bogus"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "invalid choice: 'bogus'" in r.stderr and "restore-image" in r.stderr


ARENAS = r"""
import ctypes, os, sys, threading
from blockferry.cli.core import one_malloc_arena
if sys.argv[1] == "cli":
    assert one_malloc_arena() is ("MALLOC_ARENA_MAX" not in os.environ)
barrier = threading.Barrier(4)
kept = []
def work():
    barrier.wait()  # all alive at once: each would get an arena of its own
    kept.append([bytes(2000) for _ in range(200)])  # beyond pymalloc: glibc's malloc
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
ctypes.CDLL(None).malloc_stats()  # one "Arena N:" paragraph per arena, on stderr
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_stats")
@pytest.mark.parametrize("how", ["cli", "library"])
def test_the_command_keeps_one_malloc_arena_and_the_library_leaves_the_allocator_alone(how: str) -> None:
    def arenas(env: dict[str, str] | None = None) -> int:
        r = subprocess.run([sys.executable, "-c", ARENAS, how], capture_output=True, text=True, check=True, env=env)
        return r.stderr.count("Arena ")

    if how == "cli":
        assert arenas() == 1
        # a MALLOC_ARENA_MAX of the user's stands
        assert arenas({**os.environ, "MALLOC_ARENA_MAX": "3"}) == 3
    else:
        assert arenas() >= 3


LEAVE = r"""
import atexit, sys, threading, time
from blockferry.cli.core import leave
def late():
    time.sleep(0.2)
    print("thread done")
threading.Thread(target=late).start()  # not a daemon: waited for
atexit.register(lambda: print("atexit ran"))
print("buffered")  # a pipe: block-buffered, written only by the flush
leave(int(sys.argv[1]))
"""


def buffered_env(buffered: bool = True) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return env if buffered else {**env, "PYTHONUNBUFFERED": "1"}


@pytest.mark.parametrize("code", [0, 3])
def test_leaving_waits_for_threads_runs_atexit_flushes_and_keeps_the_exit_code(code: int) -> None:
    r = subprocess.run([sys.executable, "-c", LEAVE, str(code)], capture_output=True, text=True, timeout=60,
                       env=buffered_env())
    assert r.returncode == code, r.stderr
    assert r.stdout.splitlines() == ["buffered", "thread done", "atexit ran"]


def test_leaving_with_nobody_reading_the_output_says_so_without_a_traceback() -> None:
    rd, wr = os.pipe()
    os.close(rd)  # the reader is gone before anything is written
    try:
        r = subprocess.run([sys.executable, "-c", LEAVE, "0"], stdout=wr, stderr=subprocess.PIPE, text=True, timeout=60,
                           env=buffered_env())
    finally:
        os.close(wr)
    assert r.returncode == 1
    assert "the output was closed" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("buffered", [True, False], ids=["at-exit", "while-running"])
def test_a_listing_cut_short_by_its_reader_ends_quietly(tmp_path: Path, buffered: bool) -> None:
    repo = tmp_path / "repo"
    bf("init", str(repo))
    img = mixed_disk(tmp_path / "a.img", MiB, seed=3)
    for _ in range(3):
        bf("backup", str(repo), str(img), "--name", "vm", "-q")
    rd, wr = os.pipe()
    os.close(rd)
    try:
        # buffered, the lines fill no buffer and the flush at exit meets the closed pipe;
        # unbuffered, the command's first line does
        r = subprocess.run([sys.executable, "-m", "blockferry", "points", str(repo)], stdout=wr,
                           stderr=subprocess.PIPE, text=True, timeout=120, env=buffered_env(buffered))
    finally:
        os.close(wr)
    assert r.returncode == 1 and "the output was closed" in r.stderr and "Traceback" not in r.stderr


def test_only_an_unread_stdout_counts_as_the_output_closed() -> None:
    from blockferry.cli.core import stdout_unread

    code = "import sys; from blockferry.cli.core import stdout_unread; sys.exit(3 if stdout_unread() else 4)"
    rd, wr = os.pipe()
    try:
        read = subprocess.run([sys.executable, "-c", code], stdout=wr, timeout=60)
        os.close(rd)
        rd = -1
        gone = subprocess.run([sys.executable, "-c", code], stdout=wr, timeout=60)
    finally:
        os.close(wr)
        if rd >= 0:
            os.close(rd)
    assert (read.returncode, gone.returncode) == (4, 3)
    assert stdout_unread() is False  # pytest's captured stdout: not a pipe with a reader gone


def test_a_broken_pipe_that_is_not_the_output_stays_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    import blockferry.cli.core as cli

    def broken(*args: object, **kwargs: object) -> int:
        raise BrokenPipeError(32, "a socket of the command's own")

    monkeypatch.setattr(cli.anyio, "run", broken)
    # an error of its own (exit 1, said in one line), not the output closed; never a traceback
    assert cli.main(["points", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "unexpected BrokenPipeError: [Errno 32] a socket of the command's own" in err
    assert "output was closed" not in err and "Traceback" not in err
