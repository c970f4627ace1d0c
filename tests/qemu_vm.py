"""Test helpers: real QEMU processes (a VM under TCG with no guest OS, qemu-nbd) and real qcow2
images, started and stopped by fixtures. Synchronous on purpose: fixtures set things up outside
the event loop, and the test's own QMP monitor is a second one, so the plugin under test has the
first to itself."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

MiB = 1 << 20

NEEDED = ("qemu-system-x86_64", "qemu-img", "qemu-nbd", "qemu-io", "nbdinfo")


#: Debian installs some of these (qemu-ga) in sbin, which a non-login PATH may lack
_SEARCH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


def tool(name: str) -> str:
    """The path of a QEMU tool. A missing one is a failure, not a skip: the project's setup
    (scripts/system-packages) installs them, so missing means the setup was not run."""
    path = shutil.which(name, path=_SEARCH)
    if path is None:
        pytest.fail(f"{name} is missing: run scripts/system-packages (make setup)")
    return path


def require_qemu() -> None:
    for name in NEEDED:
        tool(name)


def short_dir() -> Path:
    """A directory whose paths fit in a Unix socket address (pytest's tmp_path may not)."""
    return Path(tempfile.mkdtemp(prefix="bf-t-", dir="/tmp"))


def qcow2(path: Path, size: int = 64 * MiB, *writes: str) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    if writes:
        qemu_io(path, *writes)
    return path


def qemu_io(path: Path, *commands: str, fmt: str = "qcow2") -> None:
    argv = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    subprocess.run(argv + [str(path)], check=True, capture_output=True)


def wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Until ``proc`` accepts connections on the Unix socket ``path`` (the file appears when the
    socket is bound, a moment before it listens)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        if path.exists():
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(str(path))
                    return
                except OSError:
                    pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} is not listening")
        time.sleep(0.02)


class QMP:
    """A blocking QMP client for the test's own monitor."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(60)
        self.sock.connect(str(path))
        self.f = self.sock.makefile("rwb")
        self.events: list[dict[str, Any]] = []
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.f.readline()
        if not line:
            raise EOFError("QMP closed")
        return json.loads(line)

    def execute(self, cmd: str, **args: Any) -> Any:
        msg: dict[str, Any] = {"execute": cmd}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            r = self._read()
            if "event" in r:
                self.events.append(r)
                continue
            if "error" in r:
                raise RuntimeError(f"{cmd}: {r['error']}")
            return r["return"]

    def hmp(self, line: str) -> str:
        out = self.execute("human-monitor-command", **{"command-line": line})
        if out.strip():
            raise RuntimeError(f"HMP {line!r}: {out}")
        return out

    def guest_write(self, device: str, command: str) -> None:
        """``qemu-io`` on the device's backend: the guest's path, through the backup filter. (Its
        output goes to QEMU's stdout, not to the monitor: check results another way.)"""
        self.hmp(f'qemu-io -d /machine/peripheral/{device}/virtio-backend "{command}"')

    def close(self) -> None:
        self.f.close()
        self.sock.close()

    # -- what a test checks after a backup ---------------------------------------------------------
    def node_names(self) -> set[str]:
        return {n["node-name"] for n in self.execute("query-named-block-nodes", flat=True)}

    def bitmaps(self, node: str) -> dict[str, dict[str, Any]]:
        for n in self.execute("query-named-block-nodes", flat=True):
            if n["node-name"] == node:
                return {b["name"]: b for b in n.get("dirty-bitmaps", []) if "name" in b}
        return {}

    def exports(self) -> list[Any]:
        return self.execute("query-block-exports")

    def jobs(self) -> list[Any]:
        return self.execute("query-block-jobs")


class VM:
    """``qemu-system-x86_64`` under TCG, paused (``-S``: no guest runs, no CPU burnt; the block
    layer works all the same), with one qcow2 disk ``vda`` on node ``fmt0`` and two QMP monitors:
    ``qmp_path`` for the plugin, ``ctl`` for the test."""

    def __init__(self, workdir: Path, image: Path | None, *more: Path, blockdev: dict[str, Any] | None = None) -> None:
        self.dir = workdir
        self.image = image
        self.more = more  #: further qcow2 disks: vdb, vdc...
        #: instead of ``image``: any blockdev for ``vda`` (an NBD export, say), node ``fmt0``
        self.blockdev = blockdev
        self.qmp_path = workdir / "vm.qmp"
        self.ctl_path = workdir / "ctl.qmp"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ctl: QMP | None = None

    def start(self) -> VM:
        for p in (self.qmp_path, self.ctl_path):
            p.unlink(missing_ok=True)
        argv = [
            "qemu-system-x86_64", "-machine", "q35,accel=tcg", "-m", "64", "-nodefaults", "-display", "none",
            "-serial", "none", "-S",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-qmp", f"unix:{self.ctl_path},server=on,wait=off",
        ]
        if self.blockdev is not None:
            argv += ["-blockdev", json.dumps({**self.blockdev, "node-name": "fmt0"})]
        else:
            argv += ["-blockdev", json.dumps({"driver": "file", "filename": str(self.image), "node-name": "file0"}),
                     "-blockdev", json.dumps({"driver": "qcow2", "file": "file0", "node-name": "fmt0"})]
        argv += ["-device", "virtio-blk-pci,drive=fmt0,id=vda"]
        for i, img in enumerate(self.more, 1):
            argv += ["-blockdev", json.dumps({"driver": "file", "filename": str(img), "node-name": f"file{i}"}),
                     "-blockdev", json.dumps({"driver": "qcow2", "file": f"file{i}", "node-name": f"fmt{i}"}),
                     "-device", f"virtio-blk-pci,drive=fmt{i},id=vd{chr(ord('a') + i)}"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(self.ctl_path, self.proc)
        wait_for(self.qmp_path, self.proc)
        self.ctl = QMP(self.ctl_path)
        return self

    @property
    def url(self) -> str:
        return f"qemu:{self.qmp_path}"

    def stop(self, *, kill: bool = False) -> None:
        """Quit cleanly (bitmaps saved) or ``kill`` -9 (bitmaps left inconsistent)."""
        if self.proc is None:
            return
        if kill:
            self.proc.send_signal(signal.SIGKILL)
        else:
            try:
                assert self.ctl is not None
                self.ctl.execute("quit")
            except Exception:
                self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.ctl is not None:
            self.ctl.close()
            self.ctl = None
        self.proc = None


class QemuNbd:
    """``qemu-nbd`` exporting an image on a Unix socket (persistent: many clients in turn)."""

    def __init__(self, image: Path, sock: Path, *args: str) -> None:
        self.sock = sock
        sock.unlink(missing_ok=True)
        self.proc = subprocess.Popen(["qemu-nbd", "--persistent", "--shared=8", "--socket", str(sock), *args,
                                      str(image)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(sock, self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def file_md5(path: Path, fmt: str = "raw") -> bytes:
    """The disk's content (``qemu-img convert`` to raw when it is not raw already)."""
    if fmt != "raw":
        out = path.with_suffix(".raw-check")
        subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(out)], check=True)
        path = out
    import hashlib

    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()


def ensure_gone(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
    os.sync()
