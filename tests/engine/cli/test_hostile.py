"""Every command of the CLI, with hostile input: bad numbers, NaN, negative and huge values,
missing files, locations that hold no repository, names with a newline. None may print a
traceback, and each exits with its documented code (2 bad input, 6 no daemon; 1 for a failure).

The commands are taken from the parser itself, so a command added later is covered too. They run
in-process through ``main`` (the same code as the executable, minus the process), which keeps
the few hundred runs fast; a few run as a real process at the end."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from blockferry.cli.core import Number, build_parser, main

from tests.conftest import MiB, mixed_disk

HOSTILE_NUMBERS = ["nan", "-1", "inf", "-inf", "1e400", "99999999999999999999999", "abc", "", "0x10", "1_0_"]


def leaves(parser: argparse.ArgumentParser,
           prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every runnable command: its words (``job add``) and its parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from leaves(sub, (*prefix, name))
            return
    yield prefix, parser


COMMANDS = dict(leaves(build_parser()))
DAEMON_CLIENT = {words for words, p in COMMANDS.items() if any("--socket" in a.option_strings for a in p._actions)
                 and words[0] not in ("daemon", "serve")}


def numeric_options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.type is not None and a.type is not str]


def test_every_numeric_option_is_range_checked() -> None:
    """An ``int`` or ``float`` type would let 0, -1 or nan through to the engine."""
    found = 0
    for words, parser in COMMANDS.items():
        for action in numeric_options(parser):
            assert isinstance(action.type, Number), (words, action.dest, action.type)
            found += 1
    assert found >= 30  # all of them are seen (the lifecycle, daemon and job options included)


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("hostile")
    notrepo = tmp / "notrepo"
    notrepo.mkdir()
    (notrepo / "junk.txt").write_text("not a repository\n")
    afile = tmp / "a-file"
    afile.write_text("x")
    return {"tmp": tmp, "notrepo": notrepo, "missing": tmp / "missing.img", "socket": tmp / "none.sock",
            "afile": afile}


def base_argv(words: tuple[str, ...], parser: argparse.ArgumentParser, places: dict[str, Path],
              suffix: str = "") -> list[str]:
    """The command with every positional and required option filled with something that does
    not exist or holds no repository (each text ending with ``suffix``)."""
    argv = list(words)
    values = {"repo": str(places["notrepo"]), "source": str(places["notrepo"]), "target": str(places["tmp"] / "t"),
              "sources": str(places["missing"]), "point": "latest", "points": "latest", "file": str(places["missing"]),
              "name": "x", "changes": "a=1", "id": "1", "seconds": "1", "dir": str(places["afile"] / "demo"),
              "url": str(places["missing"]), "path": str(places["notrepo"])}
    for action in parser._actions:
        if action.option_strings:
            if action.required:
                argv += [action.option_strings[0], "r" if action.dest == "repo" else str(places["tmp"] / "s.sock")]
            continue
        if action.dest in ("help",) or isinstance(action, argparse._SubParsersAction):
            continue
        assert action.dest in values, f"no hostile value for {words} {action.dest}: add one"
        argv.append(values[action.dest] + ("" if isinstance(action.type, Number) else suffix))
    if words in DAEMON_CLIENT:
        argv += ["--socket", str(places["socket"])]
    return argv


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 1
    err = capsys.readouterr().err
    return code, err


def expected(words: tuple[str, ...]) -> int:
    """What each command exits with when its arguments are fine but there is nothing there: 6 for
    the daemon's client commands (no daemon listens), 2 for the others (no repository, a file
    missing)."""
    if words == ("job", "add"):  # refused before connecting: a backup job with a missing source is fine,
        return 6                 # the daemon checks the rest
    if words == ("config", "apply"):
        return 2  # the TOML file is read first
    return 6 if words in DAEMON_CLIENT else 2


@pytest.mark.parametrize("suffix", ["", "\nsecond line"], ids=["plain", "newline"])
@pytest.mark.parametrize("words", sorted(w for w in COMMANDS if w != ("daemon",)), ids=" ".join)
def test_nothing_there_is_a_clear_error(words: tuple[str, ...], suffix: str, places: dict[str, Path],
                                        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    if words == ("init",) and suffix:  # a new directory whose name has a newline: a fine place for one
        code, err = run(["init", str(tmp_path / f"new{suffix}")], capsys)
        assert code == 0 and not err, err
        return
    code, err = run(base_argv(words, COMMANDS[words], places, suffix), capsys)
    assert "Traceback" not in err and "unexpected" not in err, err
    assert code == expected(words), (code, err)
    assert err.count("\n") <= 1 and err.startswith("blockferry: error: "), err


@pytest.mark.parametrize("words", sorted(w for w in COMMANDS if numeric_options(COMMANDS[w])), ids=" ".join)
def test_hostile_numbers_are_refused_before_anything_starts(words: tuple[str, ...], places: dict[str, Path],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    parser = COMMANDS[words]
    base = base_argv(words, parser, places)
    if words == ("daemon",):
        base += ["--state-dir", str(places["tmp"] / "state"), "--socket", str(places["socket"])]
    for action in numeric_options(parser):
        for value in HOSTILE_NUMBERS:
            if action.option_strings:
                argv = [*base, f"{action.option_strings[0]}={value}"]
            else:  # a numeric positional: replace the value base_argv gave it
                argv = [a for a in base if a != "1"] + ["--", value]
            code, err = run(argv, capsys)
            assert "Traceback" not in err, err
            assert code == 2, (argv, code, err)
            if action.option_strings:
                assert f"argument {'/'.join(action.option_strings)}" in err, err


# -- against a real repository ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("repo")
    repo = tmp / "repo"
    assert main(["init", str(repo), "--block-size", "256KiB"]) == 0
    return repo, mixed_disk(tmp / "a.img", 2 * MiB)


@pytest.mark.parametrize("args, message", [
    (["init", "{repo}"], "already holds a repository"),
    (["init", "{repo}", "--immutable-days", "-5"], "--immutable-days"),
    (["verify", "{repo}", "--sample", "0"], "--sample"),
    (["verify", "{repo}", "--sample", "500"], "--sample"),
    (["verify", "{repo}", "--sample", "nan"], "--sample"),
    (["backup", "{repo}", "{img}", "--retries", "-1"], "--retries"),
    (["backup", "{repo}", "{img}", "--max-tasks", "0"], "--max-tasks"),
    (["backup", "{repo}", "{img}", "--max-tasks", "-3"], "--max-tasks"),
    (["backup", "{repo}", "{img}", "--immutable-days", "-5"], "--immutable-days"),
    (["backup", "{repo}", "{img}", "--immutable-days", "99999999"], "--immutable-days"),
    (["backup", "{repo}", "{img}", "{img}"], "given more than once"),
    (["backup", "{repo}", "{img}", "--name", "two\nlines"], "not allowed"),
    (["backup", "{repo}", "{img}", "--name", "a/b"], "not allowed"),
    (["backup", "{repo}", "{repo}/missing.img"], "missing.img"),
    (["gc", "{repo}", "--rewrite-threshold", "5"], "--rewrite-threshold"),
    (["gc", "{repo}", "--rewrite-threshold", "nan"], "--rewrite-threshold"),
    (["gc", "{repo}", "--wait", "-1"], "--wait"),
    (["prune", "{repo}", "--keep-last", "0"], "--keep-last"),
    (["archive", "{repo}", "--older-than", "-2"], "--older-than"),
    (["restore", "{repo}", "latest", "--to", "{repo}/out"], "no restore points"),
    (["delete", "{repo}", "no\nsuch"], "no\\nsuch"),
])
def test_bad_input_against_a_repository_exits_2(repo: tuple[Path, Path], args: list[str], message: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path, img = repo
    code, err = run([a.format(repo=path, img=img) for a in args], capsys)
    assert code == 2 and message in err and "Traceback" not in err, (code, err)
    assert "\nno\nsuch" not in err  # a name with a newline is never printed raw
    # nothing was left behind: no lock, the repository takes a backup
    assert not (path / "locks" / "writer").exists()


def test_after_all_that_the_repository_works(repo: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    path, img = repo
    assert main(["backup", str(path), str(img), "-q", "--max-tasks", "1024", "--retries", "0"]) == 0
    capsys.readouterr()
    assert main(["verify", str(path), "--sample", "100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["healthy"]


def test_as_a_process_a_hostile_command_says_one_line(tmp_path: Path) -> None:
    """The executable itself: exit codes and stderr as a user sees them."""
    for argv, code in ((["backup", str(tmp_path), "x", "--max-tasks", "0"], 2),
                       (["status", "--socket", str(tmp_path / "none.sock")], 6),
                       (["points", str(tmp_path)], 2)):
        p = subprocess.run([sys.executable, "-m", "blockferry", *argv], capture_output=True, text=True, timeout=60)
        assert p.returncode == code and "Traceback" not in p.stderr, (argv, p.returncode, p.stderr)


def test_endless_or_binary_input_files_are_refused_not_read_to_the_end(repo: tuple[Path, Path], tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """/dev/zero as a hint file or a configuration used to be read until memory ran out."""
    path, img = repo
    binary = tmp_path / "binary.toml"
    binary.write_bytes(bytes(range(256)))
    for argv, message in ((["backup", str(path), str(img), "--changed-extents", f"{img}=/dev/zero"], "larger than"),
                          (["config", "apply", "/dev/zero", "--socket", str(tmp_path / "none.sock")], "larger than"),
                          (["config", "apply", str(binary), "--socket", str(tmp_path / "none.sock")], "not UTF-8")):
        code, err = run(argv, capsys)
        assert code == 2 and message in err and "Traceback" not in err, (argv, code, err)


def test_a_daemon_that_cannot_listen_says_why(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "blockferry", "daemon", "--state-dir", str(tmp_path / "state"), "-q",
                        "--socket", str(tmp_path / ("x" * 120) / "d.sock")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "cannot listen" in p.stderr and "Traceback" not in p.stderr, p.stderr


BUG = r"""
import sys
import blockferry.cli.core as cli

async def broken(a):
    raise RuntimeError("a bug\nwith a second line")

cli.cmd_points = broken
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_an_unexpected_error_is_one_line_and_its_traceback_goes_to_the_log_with_v(tmp_path: Path,
                                                                                  verbose: bool) -> None:
    argv = (["-v"] if verbose else []) + ["points", str(tmp_path)]
    p = subprocess.run([sys.executable, "-c", BUG, *argv], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    first = p.stderr.splitlines()[0]
    assert first.startswith("blockferry: error: unexpected RuntimeError: a bug"), p.stderr
    if verbose:  # the log (stderr at -v) has the event and the traceback
        assert "unexpected_error" in p.stderr and "Traceback" in p.stderr and "second line" in p.stderr
    else:
        assert p.stderr.strip() == first and "run with -v" in first and "Traceback" not in p.stderr
