"""The ``file`` source: the generic source conformance suite (with and without mmap), plus what only
image files have (SEEK_DATA/SEEK_HOLE extents, the ``mmap`` option, file types, file URLs)."""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from blockferry.datapath.source import MapsBlocking, ReadsBlocking
from blockferry.errors import ConfigError, SourceError
from blockferry.plugins.file_source import FileDisk, FileSourcePlugin

from tests.conformance import KiB, MiB, SourceConformance, rand
from tests.conftest import mixed_disk

pytestmark = pytest.mark.anyio


def write_image(path: Path, size: int, segments: Sequence[tuple[int, bytes]]) -> Path:
    """A sparse image: holes except the segments."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, chunk in segments:
            f.seek(off)
            f.write(chunk)
    return path


class TestFileSource(SourceConformance):
    @pytest.fixture
    def source_plugin(self) -> FileSourcePlugin:
        return FileSourcePlugin()

    @pytest.fixture
    def make_source_url(self, tmp_path: Path):  # type: ignore[no-untyped-def]
        counter = itertools.count()

        def make(size: int, segments: Sequence[tuple[int, bytes]]) -> str:
            return str(write_image(tmp_path / f"disk{next(counter)}.img", size, segments))

        return make

    @pytest.fixture
    def missing_source_url(self, tmp_path: Path) -> tuple[str, str]:
        path = tmp_path / "no-such-disk.img"
        return str(path), str(path)

    @pytest.fixture(params=[{}, {"mmap": "false"}], ids=["mmap", "no-mmap"])
    def source_options(self, request: pytest.FixtureRequest) -> dict[str, Any]:
        return request.param

    @pytest.fixture
    def declared_capabilities(self, source_options: dict[str, Any]) -> set[type]:
        # image files are mapped unless mmap=false; the plugin expands nothing
        return {ReadsBlocking} if source_options.get("mmap") == "false" else {ReadsBlocking, MapsBlocking}


async def read_all(disk: Any) -> bytes:
    buf = bytearray(disk.size)
    n = await disk.read_into(0, [buf])
    return bytes(buf[:n])


# -- extents -------------------------------------------------------------------------------------

PAGE = 4 * KiB


def holes_supported(directory: Path) -> bool:
    probe = directory / "hole-probe"
    with open(probe, "wb") as f:
        f.truncate(MiB)
    try:
        return os.stat(probe).st_blocks == 0
    finally:
        probe.unlink()


async def test_seek_data_extents_match_the_written_data(tmp_path: Path) -> None:
    if not holes_supported(tmp_path):
        pytest.skip(f"the filesystem of {tmp_path} stores no holes (a truncated file has blocks)")
    size = 8 * MiB + 100
    segments = [
        (0, rand(100, 1)),                 # first page
        (64 * KiB + 10, rand(5000, 2)),    # two pages
        (MiB, rand(PAGE, 3)),              # one page, and the next one below: merged
        (MiB + PAGE, b"\x01"),
        (5 * MiB - 1, b"\x02\x03"),        # across a page boundary
        (size - 50, rand(50, 4)),          # the last, partial page
    ]
    path = write_image(tmp_path / "sparse.img", size, segments)
    pages: set[int] = set()
    for off, chunk in segments:
        pages.update(range(off // PAGE, (off + len(chunk) - 1) // PAGE + 1))
    expect: list[tuple[int, int]] = []
    for p in sorted(pages):
        if expect and expect[-1][0] + expect[-1][1] == p * PAGE:
            expect[-1] = (expect[-1][0], expect[-1][1] + PAGE)
        else:
            expect.append((p * PAGE, PAGE))
    last_off, _ = expect[-1]
    expect[-1] = (last_off, size - last_off)
    disk = await FileSourcePlugin().open(str(path), {})
    try:
        assert await disk.data_extents() == expect
    finally:
        await disk.aclose()


async def test_extents_of_an_empty_and_of_a_hole_only_image(tmp_path: Path) -> None:
    if not holes_supported(tmp_path):
        pytest.skip(f"the filesystem of {tmp_path} stores no holes (a truncated file has blocks)")
    for size in [0, 5 * MiB + 3]:
        disk = await FileSourcePlugin().open(str(write_image(tmp_path / f"e{size}.img", size, [])), {})
        try:
            assert disk.size == size
            assert await disk.data_extents() == []
        finally:
            await disk.aclose()


# -- the mmap option -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["false", "0", "no", "off", "False", False, 0])
async def test_mmap_false_reads_without_mapping(tmp_path: Path, value: object) -> None:
    path = mixed_disk(tmp_path / "mixed.img", 4 * MiB + 4097)
    disk = await FileSourcePlugin().open(str(path), {"mmap": value})
    try:
        assert not isinstance(disk, MapsBlocking)
        assert isinstance(disk, ReadsBlocking)
        assert await read_all(disk) == path.read_bytes()
        bufs = [bytearray(MiB), bytearray(3 * MiB)]
        assert await anyio.to_thread.run_sync(disk.read_blocking, 4097, bufs) == 4 * MiB
        assert b"".join(bufs) == path.read_bytes()[4097:4097 + 4 * MiB]
    finally:
        await disk.aclose()


@pytest.mark.parametrize("options", [{}, {"mmap": "true"}, {"mmap": "yes"}, {"mmap": True}])
async def test_image_files_are_mapped_by_default(tmp_path: Path, options: dict[str, Any]) -> None:
    path = mixed_disk(tmp_path / "mixed.img", 4 * MiB)
    disk = await FileSourcePlugin().open(str(path), options)
    try:
        assert isinstance(disk, MapsBlocking)
        m = await anyio.to_thread.run_sync(disk.map_blocking, 0, disk.size)
        try:
            assert m[:] == path.read_bytes()
        finally:
            m.close()
    finally:
        await disk.aclose()


async def test_mapping_past_a_shrunk_file_raises_source_error(tmp_path: Path) -> None:
    """A mapping of a truncated range would SIGBUS: the size is checked first."""
    path = write_image(tmp_path / "shrinks.img", 2 * MiB, [(0, rand(2 * MiB, 5))])
    disk = await FileSourcePlugin().open(str(path), {})
    try:
        assert isinstance(disk, MapsBlocking)
        os.truncate(path, MiB)
        with pytest.raises(SourceError, match="shrank") as info:
            await anyio.to_thread.run_sync(disk.map_blocking, 0, 2 * MiB)
        assert str(path) in str(info.value)
        buf = bytearray(2 * MiB)
        assert await disk.read_into(0, [buf]) == MiB  # short: the file ends earlier now
    finally:
        await disk.aclose()


# -- what can be opened --------------------------------------------------------------------------


async def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        await FileSourcePlugin().open(str(tmp_path), {})
    assert str(tmp_path) in str(info.value)


async def test_a_character_device_is_refused() -> None:
    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null in this environment")
    with pytest.raises(ConfigError, match="/dev/null"):
        await FileSourcePlugin().open("/dev/null", {})


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """Opening a FIFO for reading blocks until a writer appears: the plugin must refuse it at once
    instead of hanging the job (and its event loop)."""
    fifo = tmp_path / "pipe.img"
    os.mkfifo(fifo)
    outcome: list[BaseException | str] = []

    def run() -> None:
        try:
            anyio.run(FileSourcePlugin().open, str(fifo), {})
            outcome.append("opened")
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=3)
    hung = thread.is_alive()
    if hung:  # release the blocked open: a writer appears (possible now that a reader waits)
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(timeout=10)
    assert not hung, "opening a FIFO blocked until a writer appeared"
    assert len(outcome) == 1 and isinstance(outcome[0], ConfigError), outcome


async def test_file_urls(tmp_path: Path) -> None:
    path = write_image(tmp_path / "my disk.img", MiB + 3, [(7, b"hello"), (MiB, b"end")])
    plugin = FileSourcePlugin()
    urls = [str(path), f"file://{path}".replace(" ", "%20"), f"file://localhost{path}".replace(" ", "%20")]
    for url in urls:
        assert plugin.disk_name(url) == "my disk.img"
        disk = await plugin.open(url, {})
        try:
            assert disk.name == "my disk.img"
            assert disk.identity["path"] == str(path)
            assert disk.url == url
            assert await read_all(disk) == path.read_bytes()
        finally:
            await disk.aclose()
    with pytest.raises(ConfigError):
        await plugin.open(f"file://elsewhere{path}", {})


async def test_missing_file_url(tmp_path: Path) -> None:
    path = tmp_path / "gone.img"
    with pytest.raises(SourceError, match=str(path)):
        await FileSourcePlugin().open(f"file://{path}", {})


async def test_identity_and_metadata(tmp_path: Path) -> None:
    path = write_image(tmp_path / "d.img", MiB, [(0, b"x")])
    disk = await FileSourcePlugin().open(str(path), {})
    try:
        st = os.stat(path)
        assert disk.identity == {"path": str(path), "device": str(st.st_dev), "inode": str(st.st_ino)}
        assert disk.metadata == {"kind": "image-file"}
        assert disk.change_id is None
        assert isinstance(disk, FileDisk) and not disk.is_device
    finally:
        await disk.aclose()


async def test_aclose_releases_the_file_descriptor(tmp_path: Path) -> None:
    path = write_image(tmp_path / "d.img", MiB, [(0, b"x")])
    before = len(os.listdir("/proc/self/fd"))
    disks = [await FileSourcePlugin().open(str(path), {}) for _ in range(20)]
    assert len(os.listdir("/proc/self/fd")) >= before + 20
    for disk in disks:
        await disk.aclose()
    assert len(os.listdir("/proc/self/fd")) == before
    await disks[0].aclose()  # a second close is harmless
