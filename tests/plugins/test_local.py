"""The ``file`` backend: the generic backend conformance suite, plus what only a local directory has
(temporary files, O_DIRECT staging and its buffered fallback, key paths, ``clean_tmp``)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from blockferry.errors import ConfigError, NotFoundError, RepositoryError
from blockferry.plugins.local import LocalBackend, LocalBackendPlugin
from blockferry.repo.backend import CleansTmp, KeyExistsError, MapsObjects, Protects

from tests.conformance import BackendConformance, MiB, listed, rand, split, upload

pytestmark = pytest.mark.anyio

TMP_NAME = re.compile(r"^(\d+)-[0-9a-f]{16}$")


async def open_local(root: Path) -> LocalBackend:
    root.mkdir(parents=True, exist_ok=True)
    backend = await LocalBackendPlugin().open(str(root), {})
    assert isinstance(backend, LocalBackend)
    return backend


class TestLocalBackend(BackendConformance):
    @pytest.fixture
    async def backend(self, tmp_path: Path) -> AsyncIterator[LocalBackend]:
        b = await open_local(tmp_path / "repo")
        yield b
        await b.aclose()

    @pytest.fixture
    def declared_capabilities(self) -> set[type]:
        return {Protects, CleansTmp, MapsObjects}


@pytest.fixture
async def repo(tmp_path: Path) -> AsyncIterator[LocalBackend]:
    b = await open_local(tmp_path / "repo")
    yield b
    await b.aclose()


def tmp_files(backend: LocalBackend) -> list[Path]:
    d = backend.root / "tmp"
    return sorted(d.iterdir()) if d.is_dir() else []


def direct_io_works(directory: Path) -> bool:
    probe = directory / f".odirect-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
        os.close(fd)
        return True
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return False
    finally:
        probe.unlink(missing_ok=True)


def refuse_direct_io(monkeypatch: pytest.MonkeyPatch, under: Path, *, creates_file: bool) -> None:
    """Make ``open(O_DIRECT)`` of files under ``under`` fail with EINVAL, as on a filesystem without
    direct I/O (ramfs, tmpfs before Linux 6.6, some FUSE and network filesystems).

    With ``creates_file`` it behaves as Linux does (checked on ramfs): ``O_CREAT`` creates the file
    before the open is refused, so the file exists when EINVAL comes back."""
    real_open = os.open
    prefix = str(under) + os.sep

    def fake_open(path, flags, mode=0o777, *, dir_fd=None):  # type: ignore[no-untyped-def]
        if flags & os.O_DIRECT and os.fspath(path).startswith(prefix):
            if creates_file and flags & os.O_CREAT:
                os.close(real_open(path, flags & ~os.O_DIRECT, mode, dir_fd=dir_fd))
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), os.fspath(path))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", fake_open)


@pytest.fixture
def no_direct_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory whose filesystem refuses O_DIRECT: a real one in /dev/shm when tmpfs refuses it
    (Linux < 6.6), else ``tmp_path`` with the refusal simulated as Linux does it."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        d = Path(tempfile.mkdtemp(prefix="blockferry-test-", dir=shm))
        try:
            if not direct_io_works(d):
                yield d
                return
        finally:
            shutil.rmtree(d, ignore_errors=True)
    d = tmp_path / "nodirect"
    d.mkdir()
    refuse_direct_io(monkeypatch, d, creates_file=True)
    yield d


# -- layout on disk ----------------------------------------------------------------------------


async def test_upload_is_staged_under_tmp_and_committed_to_a_plain_file(repo: LocalBackend) -> None:
    data = rand(5 * MiB + 123, 1)
    up = await repo.open_upload("packs/ab/ab0123")
    await up.write([data])
    staged = tmp_files(repo)
    assert len(staged) == 1
    m = TMP_NAME.match(staged[0].name)
    assert m and int(m.group(1)) == os.getpid(), staged[0].name
    assert not (repo.root / "packs" / "ab" / "ab0123").exists()
    await up.commit()
    final = repo.root / "packs" / "ab" / "ab0123"
    assert final.is_file() and not final.is_symlink()
    assert final.read_bytes() == data
    assert tmp_files(repo) == []


async def test_put_is_a_plain_file_and_leaves_no_temporary_file(repo: LocalBackend) -> None:
    await repo.put("points/p1", b"point one")
    await repo.put("locks/w", b"me", exclusive=True)
    with pytest.raises(KeyExistsError):
        await repo.put("locks/w", b"other", exclusive=True)
    assert (repo.root / "points" / "p1").read_bytes() == b"point one"
    assert (repo.root / "locks" / "w").read_bytes() == b"me"
    assert tmp_files(repo) == []
    assert await listed(repo, "") == {"points/p1": 9, "locks/w": 2}


async def test_abort_removes_the_temporary_file(repo: LocalBackend) -> None:
    up = await repo.open_upload("packs/cd/cd01")
    await up.write([rand(MiB + 1, 2)])
    assert len(tmp_files(repo)) == 1
    await up.abort()
    assert tmp_files(repo) == []


async def test_check_writable_leaves_no_probe(repo: LocalBackend) -> None:
    await repo.check_writable()
    assert tmp_files(repo) == []


async def test_file_url(tmp_path: Path) -> None:
    root = tmp_path / "my repo"
    root.mkdir()
    backend = await LocalBackendPlugin().open("file://" + str(root).replace(" ", "%20"), {})
    await backend.put("config", b"c")
    assert (root / "config").read_bytes() == b"c"


# -- O_DIRECT and the buffered fallback --------------------------------------------------------

FALLBACK_SIZES = [
    [3],
    [5000, 3, MiB + 7],
    [4 * MiB],
    [4 * MiB - 1, 1, 4 * MiB + 4095],
    [MiB] * 9 + [4097],
]


async def test_uploads_use_direct_io_where_the_filesystem_allows_it(repo: LocalBackend) -> None:
    if not direct_io_works(repo.root):
        pytest.skip(f"the filesystem of {repo.root} refuses O_DIRECT (only the fallback can run there)")
    up = await repo.open_upload("packs/ee/ee01")
    try:
        assert "direct=True" in repr(up)
    finally:
        await up.abort()


@pytest.mark.parametrize("sizes", FALLBACK_SIZES, ids=lambda s: f"{len(s)}parts-{sum(s)}")
async def test_buffered_fallback_and_direct_io_write_identical_files(
        tmp_path: Path, no_direct_dir: Path, sizes: list[int]) -> None:
    """On a filesystem that refuses O_DIRECT uploads must fall back to buffered writes (module
    docstring), and the file must be byte for byte what the direct path writes."""
    data = rand(sum(sizes), sum(sizes))
    writes = [[p] for p in split(data, sizes)]
    direct = await open_local(tmp_path / "direct")
    buffered = await open_local(no_direct_dir / "repo")
    await upload(direct, "packs/ff/ff01", writes)
    up = await buffered.open_upload("packs/ff/ff01")
    assert "direct=False" in repr(up)
    for parts in writes:
        await up.write(parts)
    await up.commit()
    a = (direct.root / "packs" / "ff" / "ff01").read_bytes()
    b = (buffered.root / "packs" / "ff" / "ff01").read_bytes()
    assert a == b == data
    assert tmp_files(buffered) == []


@pytest.mark.parametrize("sizes", FALLBACK_SIZES + [[(i * 7919) % 1500 + 1 for i in range(3000)]],
                         ids=lambda s: f"{len(s)}parts-{sum(s)}")
async def test_buffered_writer_matches_direct_io(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 sizes: list[int]) -> None:
    """The buffered writer itself (``writev`` of up to IOV_MAX parts at a time), reached here by an
    O_DIRECT refusal that creates no file, so it is tested whatever happens to the fallback's open."""
    data = rand(sum(sizes), 7 + len(sizes))
    parts = split(data, sizes)
    writes = [parts[i:i + 2000] for i in range(0, len(parts), 2000)]  # several parts per write
    direct = await open_local(tmp_path / "direct")
    await upload(direct, "packs/ff/ff02", writes)
    refuse_direct_io(monkeypatch, tmp_path / "buffered", creates_file=False)
    buffered = await open_local(tmp_path / "buffered")
    up = await buffered.open_upload("packs/ff/ff02")
    assert "direct=False" in repr(up)
    total = 0
    for w in writes:
        total += await up.write(w)
    await up.commit()
    assert total == len(data)
    assert (buffered.root / "packs/ff/ff02").read_bytes() == (direct.root / "packs/ff/ff02").read_bytes() == data


# -- keys ------------------------------------------------------------------------------------

BAD_KEYS = ["../escape", "a/../../escape", "..", "packs/../../escape", "/etc/escape", "/abs"]


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_keys_outside_the_root_are_refused(tmp_path: Path, repo: LocalBackend, key: str) -> None:
    calls = {
        "get": lambda: repo.get(key),
        "get_ranges": lambda: repo.get_ranges(key, [(0, 1)]),
        "put": lambda: repo.put(key, b"x"),
        "put exclusive": lambda: repo.put(key, b"x", exclusive=True),
        "open_upload": lambda: repo.open_upload(key),
        "delete": lambda: repo.delete(key),
        "exists": lambda: repo.exists(key),
        "stat": lambda: repo.stat(key),
    }
    for what, call in calls.items():
        with pytest.raises(ConfigError):
            await call()
            pytest.fail(f"{what}({key!r}) was not refused")
    assert not (tmp_path / "escape").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


async def test_list_never_reaches_outside_the_root(tmp_path: Path, repo: LocalBackend) -> None:
    (tmp_path / "outside").write_bytes(b"not a repository object")
    await repo.put("packs/ab/ab01", b"inside")
    for prefix in ["../", "..", "../outside", "packs/../../"]:
        try:
            got = await listed(repo, prefix)
        except ConfigError:
            continue  # refusing the prefix is fine too
        assert got == {}, f"list({prefix!r}) returned objects outside the repository: {got}"


async def test_empty_key_is_refused(repo: LocalBackend) -> None:
    with pytest.raises(ConfigError):
        await repo.put("", b"x")
    with pytest.raises(ConfigError):
        await repo.get("")


# -- clean_tmp ---------------------------------------------------------------------------------


def dead_pid() -> int:
    """The pid of a process that has exited (and was reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    try:
        os.kill(proc.pid, 0)
    except ProcessLookupError:
        return proc.pid
    pytest.fail(f"pid {proc.pid} was reused at once")  # pragma: no cover


async def test_clean_tmp_removes_files_of_dead_writers_only(repo: LocalBackend) -> None:
    tmp = repo.root / "tmp"
    tmp.mkdir()
    dead = dead_pid()
    mine = tmp / f"{os.getpid()}-{os.urandom(8).hex()}"
    parent = tmp / f"{os.getppid()}-{os.urandom(8).hex()}"
    init = tmp / f"1-{os.urandom(8).hex()}"
    gone = [tmp / f"{dead}-{os.urandom(8).hex()}", tmp / f"{dead}-{os.urandom(8).hex()}"]
    for p in [mine, parent, init, *gone]:
        p.write_bytes(b"partial pack")
    assert repo.clean_tmp() == 2
    assert sorted(tmp.iterdir()) == sorted([mine, parent, init])
    assert repo.clean_tmp() == 0


async def test_clean_tmp_keeps_an_upload_in_progress(repo: LocalBackend) -> None:
    data = rand(4 * MiB + 5, 3)
    up = await repo.open_upload("packs/aa/aa01")
    await up.write([data[:MiB]])
    assert repo.clean_tmp(older_than=0) == 0
    await up.write([data[MiB:]])
    await up.commit()
    assert await repo.get("packs/aa/aa01") == data


async def test_clean_tmp_without_tmp_directory(repo: LocalBackend) -> None:
    assert repo.clean_tmp() == 0
    await repo.put("config", b"c")
    assert repo.clean_tmp() == 0
    assert await repo.get("config") == b"c"


async def test_missing_root(tmp_path: Path) -> None:
    backend = await LocalBackendPlugin().open(str(tmp_path / "nowhere"), {})
    with pytest.raises(NotFoundError):
        await backend.get("config")
    assert await listed(backend, "") == {}
    with pytest.raises(RepositoryError, match="not reachable"):
        await backend.check_writable()
