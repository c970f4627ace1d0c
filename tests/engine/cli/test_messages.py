"""What the commands say: messages that name the right thing and exit codes that mean it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from blockferry.cli.core import main

from tests.conftest import MiB, mixed_disk, write_disk


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def repo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    repo = tmp_path / "repo"
    assert run(capsys, "init", str(repo), "--block-size", "256KiB")[0] == 0
    return repo


def test_gc_that_removes_orphan_packs_says_done_not_nothing_to_do(tmp_path: Path, repo: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    img = mixed_disk(tmp_path / "a.img", 2 * MiB)
    assert run(capsys, "backup", str(repo), str(img), "-q")[0] == 0
    pack = next(p for p in (repo / "packs").rglob("*") if p.is_file())
    orphan = repo / "packs" / "ff" / ("f" * len(pack.name))  # a pack no index lists: a dead backup's
    orphan.parent.mkdir(exist_ok=True)
    shutil.copy(pack, orphan)
    code, out, _ = run(capsys, "gc", str(repo))
    assert code == 0 and out.startswith("done: ") and "1 orphan pack(s)" in out, out
    assert "nothing to do" not in out
    code, out, _ = run(capsys, "gc", str(repo))
    assert code == 0 and out.startswith("nothing to do: 0 B freed"), out


@pytest.mark.parametrize("as_json", [False, True])
def test_a_deferred_gc_says_so_and_exits_1(tmp_path: Path, repo: Path, capsys: pytest.CaptureFixture[str],
                                            as_json: bool) -> None:
    first = write_disk(tmp_path / "a.img", MiB, [(0, "random", MiB)], seed=1)
    assert run(capsys, "backup", str(repo), str(first), "-q", "--name", "vm")[0] == 0
    write_disk(first, MiB, [(0, "random", MiB)], seed=2)
    assert run(capsys, "backup", str(repo), str(first), "-q", "--name", "vm")[0] == 0
    points = json.loads(run(capsys, "points", str(repo), "--json")[1])
    assert run(capsys, "delete", str(repo), points[0]["id"])[0] == 0
    (repo / "locks").mkdir(exist_ok=True)  # a backup of another host is running
    (repo / "locks" / "writer").write_text(json.dumps(
        {"host": "elsewhere", "pid": 1, "pid_start": "", "created": "2026-01-01", "purpose": "backup"}))
    code, out, _ = run(capsys, "gc", str(repo), *(["--json"] if as_json else []))
    assert code == 1, out
    if as_json:
        assert json.loads(out)["state"] == "deferred"
    else:
        assert out.startswith("collection deferred: ") and "session" in out, out


@pytest.mark.parametrize("damage", [
    lambda cfg: b"\x00\xff junk",
    lambda cfg: cfg[: len(cfg) // 2],
    lambda cfg: b"[]",
    lambda cfg: b"{}",
    lambda cfg: cfg.replace(b'"format"', b'"formax"'),
    lambda cfg: cfg.replace(b'"block_size": 262144', b'"block_size": 262145'),
    lambda cfg: cfg.replace(b'"compression": "default"', b'"compression": "zip"'),
    lambda cfg: cfg.replace(b'"id"', b'"di"'),
], ids=["junk", "truncated", "list", "empty", "format", "block-size", "compression", "field"])
def test_a_damaged_config_is_always_exit_3(repo: Path, capsys: pytest.CaptureFixture[str], damage: object) -> None:
    cfg = (repo / "config").read_bytes()
    (repo / "config").write_bytes(damage(cfg))  # type: ignore[operator]
    for command in ("points", "verify", "gc"):
        code, _, err = run(capsys, command, str(repo))
        assert code == 3 and "config" in err and "Traceback" not in err, (command, code, err)


def test_a_config_edited_to_another_block_size_is_refused(tmp_path: Path, repo: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    img = mixed_disk(tmp_path / "a.img", 2 * MiB)
    assert run(capsys, "backup", str(repo), str(img), "-q")[0] == 0
    cfg = repo / "config"
    cfg.write_bytes(cfg.read_bytes().replace(b'"block_size": 262144', b'"block_size": 524288'))
    packs = sorted(p.name for p in (repo / "packs").rglob("*") if p.is_file())
    code, out, err = run(capsys, "backup", str(repo), str(img), "-q")
    assert code == 3 and "config says blocks of 524288 bytes" in (out + err), (code, out, err)
    assert sorted(p.name for p in (repo / "packs").rglob("*") if p.is_file()) == packs  # nothing written
    assert len(json.loads(run(capsys, "points", str(repo), "--json")[1])) == 1


def test_names_with_control_characters_are_shown_escaped(tmp_path: Path, repo: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A disk named after its file, or a point made before names were checked: one line each."""
    img = mixed_disk(tmp_path / "two\nlines.img", MiB)
    code, out, _ = run(capsys, "backup", str(repo), str(img), "--name", "vm", "-q")
    assert code == 0 and "two\\nlines.img" in out and "two\nlines" not in out, out
    code, out, _ = run(capsys, "points", str(repo))
    assert code == 0 and len(out.splitlines()) == 2 and "two\\nlines.img" in out, out
